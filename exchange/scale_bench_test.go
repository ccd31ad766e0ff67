package exchange

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// Flat as the configuration grows (issue 15 §4): the per-request cost of a
// full exchange (no cache) and of a cache hit, with 1 vs 100 trusted
// issuers, a JWKS of 1 vs 100 keys, 0 vs 20 CEL rules on the grant, 1 vs
// 1,000 grants, and 10k, 100k and 1M live cache entries. Compare the rows of one run:
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
	for _, n := range []int{10_000, 100_000, 1_000_000} {
		b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
			c := NewCache(CacheConfig{MaxEntries: 2 * n}) // room to spare: shards evict a little before the whole is full
			now := time.Now()
			keys := make([]CacheKey, n)
			for i := range keys {
				keys[i] = NewCacheKey(fmt.Sprintf("tok-%d", i), "grant")
				if _, _, err := c.GetOrMint(keys[i], func() (*CachedToken, error) { return realisticCachedToken(i, now), nil }); err != nil {
					b.Fatal(err)
				}
			}
			// Hits spread over every entry, in an order the CPU cannot
			// predict: a large cache is measured with its misses in the
			// processor caches, not as one hot entry.
			order := rand.New(rand.NewPCG(1, 2)).Perm(n)
			mint := func() (*CachedToken, error) { panic("miss") }
			b.ReportAllocs()
			b.ResetTimer()
			i := 0
			for b.Loop() {
				if _, hit, _ := c.GetOrMint(keys[order[i%n]], mint); !hit {
					b.Fatal("miss")
				}
				i++
			}
		})
	}
}

// BenchmarkScaleGrants is one engine serving 1 vs 1,000 grants (routes):
// full exchanges and cache hits, each request for the next grant in turn.
// Caddy's own router is linear in routes and is not measured here.
func BenchmarkScaleGrants(b *testing.B) {
	for _, n := range []int{1, 1000} {
		idp := testidp.New(b, "https://idp.test")
		kid := idp.AddKey("k", "ES256")
		grants := make([]*Grant, n)
		for i := range grants {
			g, err := NewGrant(Grant{Audiences: []string{fmt.Sprintf("https://api-%d.internal", i)}, Scopes: []string{"orders.read"}})
			if err != nil {
				b.Fatal(err)
			}
			grants[i] = g
		}
		tok := idp.Token(kid, testidp.Claims{"scope": "orders.read"})
		b.Run(fmt.Sprintf("grants=%d/miss", n), func(b *testing.B) {
			e := scaleEngine(b, newTestTrust(b, issuerConfig(idp, "ES256")))
			ctx := context.Background()
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if _, err := e.ExchangeBearer(ctx, tok, grants[i%n], nil); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
		b.Run(fmt.Sprintf("grants=%d/hit", n), func(b *testing.B) {
			e := scaleEngineConfig(b, newTestTrust(b, issuerConfig(idp, "ES256")), EngineConfig{Issuer: "https://gateway.test", CacheSize: 2 * n})
			ctx := context.Background()
			for _, g := range grants {
				if _, err := e.ExchangeBearer(ctx, tok, g, nil); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			i := 0
			for b.Loop() {
				m, err := e.ExchangeBearer(ctx, tok, grants[i%n], nil)
				if err != nil || !m.Cached {
					b.Fatal("not a hit", err)
				}
				i++
			}
		})
	}
}

// scaleEngine is an ES256 engine without a cache: every exchange a full miss.
func scaleEngine(b *testing.B, ts *TrustStore) *Engine {
	b.Helper()
	return scaleEngineConfig(b, ts, EngineConfig{Issuer: "https://gateway.test", DisableCache: true})
}

func scaleEngineConfig(b *testing.B, ts *TrustStore, cfg EngineConfig) *Engine {
	b.Helper()
	key, err := GenerateSigningKey("ES256")
	if err != nil {
		b.Fatal(err)
	}
	signer, err := NewSigner(key, "ES256")
	if err != nil {
		b.Fatal(err)
	}
	e, err := NewEngine(cfg, ts, signer)
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
