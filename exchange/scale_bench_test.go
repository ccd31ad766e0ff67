package exchange

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// Flat as the configuration grows (issue 15 §4): the per-request cost of a
// full exchange (no cache) and of a cache hit, with 1 vs 100 trusted
// issuers, a JWKS of 1 vs 100 keys, 0 vs 20 CEL rules on the grant, and 10k
// vs 100k live cache entries. Compare the rows of one run:
//
//	go test -run '^$' -bench 'Scale' -benchtime 2s ./exchange/
func BenchmarkScaleIssuers(b *testing.B) {
	for _, n := range []int{1, 100} {
		b.Run(fmt.Sprintf("issuers=%d", n), func(b *testing.B) {
			idp := testidp.New(b, "https://idp.test")
			kid := idp.AddKey("k", "ES256")
			cfgs := []IssuerConfig{issuerConfig(idp, "ES256")}
			for i := 1; i < n; i++ {
				other := testidp.New(b, fmt.Sprintf("https://idp-%d.test", i))
				other.AddKey("k", "ES256")
				cfgs = append(cfgs, issuerConfig(other, "ES256"))
			}
			e := scaleEngine(b, newTestTrust(b, cfgs...))
			runFullExchange(b, e, idp.Token(kid, testidp.Claims{"scope": "orders.read"}), benchGrant)
		})
	}
}

func BenchmarkScaleJWKSKeys(b *testing.B) {
	for _, n := range []int{1, 100} {
		b.Run(fmt.Sprintf("keys=%d", n), func(b *testing.B) {
			idp := testidp.New(b, "https://idp.test")
			for i := 1; i < n; i++ {
				idp.AddKey(fmt.Sprintf("other-%d", i), "ES256")
			}
			kid := idp.AddKey("k", "ES256")
			e := scaleEngine(b, newTestTrust(b, issuerConfig(idp, "ES256")))
			runFullExchange(b, e, idp.Token(kid, testidp.Claims{"scope": "orders.read"}), benchGrant)
		})
	}
}

func BenchmarkScaleRules(b *testing.B) {
	for _, n := range []int{0, 20} {
		b.Run(fmt.Sprintf("rules=%d", n), func(b *testing.B) {
			idp := testidp.New(b, "https://idp.test")
			kid := idp.AddKey("k", "ES256")
			e := scaleEngine(b, newTestTrust(b, issuerConfig(idp, "ES256")))
			g := Grant{Audiences: []string{"https://orders.internal"}, Scopes: []string{"orders.read"}}
			if n > 0 {
				var cfg RuleConfig
				for i := 0; i < n; i++ {
					cfg.DenyIf = append(cfg.DenyIf, fmt.Sprintf("subject.sub == 'blocked-%d'", i))
				}
				rules, err := CompileRules(cfg)
				if err != nil {
					b.Fatal(err)
				}
				g.Rules = rules
			}
			grant, err := NewGrant(g)
			if err != nil {
				b.Fatal(err)
			}
			runFullExchange(b, e, idp.Token(kid, testidp.Claims{"scope": "orders.read"}), grant)
		})
	}
}

func BenchmarkScaleCacheEntries(b *testing.B) {
	for _, n := range []int{10_000, 100_000} {
		b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
			c := NewCache(CacheConfig{MaxEntries: 2 * n}) // room to spare: shards evict a little before the whole is full
			exp := time.Now().Add(time.Hour)
			ct := func(i int) *CachedToken {
				return &CachedToken{Minted: &Minted{Token: fmt.Sprintf("token-%d", i), Subject: "alice", JTI: fmt.Sprint(i),
					IssuedAt: time.Now(), Expiry: exp}, Issuer: "https://idp.test", SubjectExpiry: exp}
			}
			for i := 0; i < n; i++ {
				k := NewCacheKey(fmt.Sprintf("tok-%d", i), "grant")
				if _, _, err := c.GetOrMint(k, func() (*CachedToken, error) { return ct(i), nil }); err != nil {
					b.Fatal(err)
				}
			}
			key := NewCacheKey("tok-7", "grant")
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if _, hit, _ := c.GetOrMint(key, func() (*CachedToken, error) { return ct(7), nil }); !hit {
					b.Fatal("miss")
				}
			}
		})
	}
}

func scaleEngine(b *testing.B, ts *TrustStore) *Engine {
	b.Helper()
	key, err := GenerateSigningKey("ES256")
	if err != nil {
		b.Fatal(err)
	}
	signer, err := NewSigner(key, "ES256")
	if err != nil {
		b.Fatal(err)
	}
	e, err := NewEngine(EngineConfig{Issuer: "https://gateway.test", DisableCache: true}, ts, signer)
	if err != nil {
		b.Fatal(err)
	}
	return e
}

func runFullExchange(b *testing.B, e *Engine, tok string, grant *Grant) {
	b.Helper()
	ctx := context.Background()
	if _, err := e.ExchangeBearer(ctx, tok, grant, nil); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := e.ExchangeBearer(ctx, tok, grant, nil); err != nil {
			b.Fatal(err)
		}
	}
}
