package exchange

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jws/jwsbb"
	"golang.org/x/crypto/bcrypt"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// Benchmarks for the exchange hot path. Compare each against the raw crypto
// floor measured in the same run (BenchmarkCryptoFloor):
//
//	go test -run '^$' -bench . -benchmem ./exchange/

func benchEngine(b *testing.B, inboundAlg, signingAlg string) (*Engine, string) {
	b.Helper()
	idp := testidp.New(b, "https://idp.test")
	kid := idp.AddKey("k", inboundAlg)
	ts := newTestTrust(b, issuerConfig(idp, inboundAlg))
	key, err := GenerateSigningKey(signingAlg)
	if err != nil {
		b.Fatal(err)
	}
	signer, err := NewSigner(key, signingAlg)
	if err != nil {
		b.Fatal(err)
	}
	e, err := NewEngine(EngineConfig{Issuer: "https://gateway.test"}, ts, signer)
	if err != nil {
		b.Fatal(err)
	}
	tok := idp.Token(kid, testidp.Claims{"scope": "orders.read profile", "client_id": "web", "email": "a@example.com"})
	return e, tok
}

// benchGrant is validated once, as a route's grant is at provision.
var benchGrant = func() *Grant {
	g, err := NewGrant(Grant{Audiences: []string{"https://orders.internal"}, Scopes: []string{"orders.read", "orders.write"}, Claims: []string{"email"}})
	if err != nil {
		panic(err)
	}
	return g
}()

func BenchmarkVerify(b *testing.B) {
	for _, alg := range []string{"RS256", "ES256", "EdDSA"} {
		b.Run(alg, func(b *testing.B) {
			e, tok := benchEngine(b, alg, "ES256")
			ctx := context.Background()
			if _, err := e.Verify(ctx, tok, "access_token"); err != nil { // warm the JWKS
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if _, err := e.Verify(ctx, tok, "access_token"); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkMint(b *testing.B) {
	for _, alg := range SigningAlgorithms {
		b.Run(alg, func(b *testing.B) {
			e, tok := benchEngine(b, "ES256", alg)
			subject, err := e.Verify(context.Background(), tok, "access_token")
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if _, err := e.Exchange(ExchangeInput{Subject: subject, Actor: e.Actor()}, benchGrant); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkExchangeBearer is validate + policy + mint, per inbound and
// signing algorithm: the full cost of one in-process exchange.
func BenchmarkExchangeBearer(b *testing.B) {
	for _, pair := range [][2]string{{"RS256", "ES256"}, {"ES256", "ES256"}, {"EdDSA", "EdDSA"}, {"RS256", "RS256"}, {"ES256", "ES384"}, {"ES256", "PS256"}} {
		b.Run("in="+pair[0]+"/out="+pair[1], func(b *testing.B) {
			e, tok := benchEngine(b, pair[0], pair[1])
			e.cache = nil // every iteration a full miss (verify, policy, mint)
			ctx := context.Background()
			if _, err := e.ExchangeBearer(ctx, tok, benchGrant, nil); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if _, err := e.ExchangeBearer(ctx, tok, benchGrant, nil); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkCryptoFloor is the raw crypto/* cost of one verify plus one sign,
// with no JOSE, JSON or policy: the floor an exchange cannot go below.
func BenchmarkCryptoFloor(b *testing.B) {
	for _, pair := range [][2]string{{"RS256", "ES256"}, {"ES256", "ES256"}, {"EdDSA", "EdDSA"}, {"RS256", "RS256"}} {
		b.Run("in="+pair[0]+"/out="+pair[1], func(b *testing.B) {
			verifyKey := testidp.GenerateKey(b, pair[0])
			signKey := testidp.GenerateKey(b, pair[1])
			msg := make([]byte, 600) // about the size of a signing input
			_, _ = rand.Read(msg)
			sig := signWith(b, verifyKey, pair[0], msg)
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if !verifyWith(verifyKey.Public(), pair[0], msg, sig) {
					b.Fatal("verify failed")
				}
				signWith(b, signKey, pair[1], msg)
			}
		})
	}
}

// BenchmarkFloorRatio interleaves, in batches, the engine's full miss and
// the raw crypto floor on the very same bytes (the inbound token's signing
// input verified, the minted token's signing input signed), and reports
// both and their ratio: the machine's load drifts during a run, and a ratio
// of two interleaved measurements cancels most of that drift.
//
//	go test -run '^$' -bench FloorRatio -benchtime 4s ./exchange/
func BenchmarkFloorRatio(b *testing.B) {
	for _, pair := range [][2]string{{"RS256", "ES256"}, {"ES256", "ES256"}, {"EdDSA", "EdDSA"}, {"RS256", "RS256"}} {
		b.Run("in="+pair[0]+"/out="+pair[1], func(b *testing.B) {
			e, tok := benchEngine(b, pair[0], pair[1])
			e.cache = nil
			ctx := context.Background()
			m, err := e.ExchangeBearer(ctx, tok, benchGrant, nil)
			if err != nil {
				b.Fatal(err)
			}
			// The floor's inputs: the inbound token's signature over its
			// signing input, with the IdP's key, and the minted token's
			// signing input for the gateway's key.
			verifyKey := testidp.GenerateKey(b, pair[0])
			verifyInput := []byte(tok[:strings.LastIndexByte(tok, '.')])
			verifySig := signWith(b, verifyKey, pair[0], verifyInput)
			signKey := testidp.GenerateKey(b, pair[1])
			signInput := []byte(m.Token[:strings.LastIndexByte(m.Token, '.')])

			// The same verify and sign through jwx's building blocks (the
			// engine signs and verifies with them): what the engine adds
			// beyond the JOSE library it must use.
			jwsSig := verifySig
			if strings.HasPrefix(pair[0], "ES") {
				jwsSig = derToJWS(b, verifySig)
			}

			const batch = 16
			var engine, floor, jwxFloor time.Duration
			ops := 0
			for b.Loop() {
				t0 := time.Now()
				for range batch {
					if _, err := e.ExchangeBearer(ctx, tok, benchGrant, nil); err != nil {
						b.Fatal(err)
					}
				}
				t1 := time.Now()
				for range batch {
					if !verifyWith(verifyKey.Public(), pair[0], verifyInput, verifySig) {
						b.Fatal("verify failed")
					}
					signWith(b, signKey, pair[1], signInput)
				}
				t2 := time.Now()
				for range batch {
					if err := jwsbb.Verify(verifyKey.Public(), pair[0], verifyInput, jwsSig); err != nil {
						b.Fatal(err)
					}
					if _, err := jwsbb.Sign(signKey, pair[1], signInput, nil); err != nil {
						b.Fatal(err)
					}
				}
				t3 := time.Now()
				engine += t1.Sub(t0)
				floor += t2.Sub(t1)
				jwxFloor += t3.Sub(t2)
				ops += batch
			}
			b.ReportMetric(float64(engine.Nanoseconds())/float64(ops), "engine-ns/op")
			b.ReportMetric(float64(floor.Nanoseconds())/float64(ops), "floor-ns/op")
			b.ReportMetric(float64(jwxFloor.Nanoseconds())/float64(ops), "jwx-floor-ns/op")
			b.ReportMetric(float64(engine)/float64(floor), "ratio")
			b.ReportMetric(float64(engine)/float64(jwxFloor), "ratio-jwx")
		})
	}
}

// derToJWS turns an ASN.1 ECDSA signature into JWS's r||s form.
func derToJWS(b *testing.B, der []byte) []byte {
	var r, s big.Int
	if err := jwsbb.UnpackASN1ECDSASignature(der, &r, &s); err != nil {
		b.Fatal(err)
	}
	out, err := jwsbb.PackECDSASignature(&r, &s, 256)
	if err != nil {
		b.Fatal(err)
	}
	return out
}

func signWith(b *testing.B, k crypto.Signer, alg string, msg []byte) []byte {
	var opts crypto.SignerOpts = crypto.SHA256
	digest := msg
	if alg != "EdDSA" {
		h := sha256.Sum256(msg)
		digest = h[:]
	} else {
		opts = crypto.Hash(0)
	}
	sig, err := k.Sign(rand.Reader, digest, opts)
	if err != nil {
		b.Fatal(err)
	}
	return sig
}

func verifyWith(pub crypto.PublicKey, alg string, msg, sig []byte) bool {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		h := sha256.Sum256(msg)
		return rsa.VerifyPKCS1v15(k, crypto.SHA256, h[:], sig) == nil
	case *ecdsa.PublicKey:
		h := sha256.Sum256(msg)
		return ecdsa.VerifyASN1(k, h[:], sig)
	case ed25519.PublicKey:
		return ed25519.Verify(k, msg, sig)
	}
	return false
}

// BenchmarkExchangeBearerCacheHit is the warm path of the middleware: the
// same token on the same route, served from the minted-token cache.
func BenchmarkExchangeBearerCacheHit(b *testing.B) {
	e, tok := benchEngine(b, "RS256", "ES256")
	grant := &Grant{Audiences: benchGrant.Audiences, Scopes: benchGrant.Scopes, Claims: benchGrant.Claims}
	if err := grant.Validate(); err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	if _, err := e.ExchangeBearer(ctx, tok, grant, nil); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		m, err := e.ExchangeBearer(ctx, tok, grant, nil)
		if err != nil || !m.Cached {
			b.Fatal("not a cache hit", err)
		}
	}
}

// BenchmarkBearerGateCacheHit is the middleware's whole warm path in the
// library (parse, scrub the headers, inspect the URI, the cache hit, the
// new Authorization header) on a real *http.Request.
func BenchmarkBearerGateCacheHit(b *testing.B) {
	e, tok := benchEngine(b, "RS256", "ES256")
	gate, err := NewBearerGate(e, benchGrant, "api")
	if err != nil {
		b.Fatal(err)
	}
	req := httptest.NewRequest(http.MethodGet, "http://gw.test/orders/42?page=2", nil)
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", "bench/1")
	admit := func() {
		req.Header.Set("Authorization", "Bearer "+tok)
		if a := gate.Admit(req, AdmitHooks{}); a.Err != nil {
			b.Fatal(a.Err)
		}
	}
	admit()
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		admit()
	}
}

// BenchmarkExchangeUnderSecretFlood shows that a flood of bad client
// credentials at the token endpoint cannot starve the middleware path
// (issue 9 §5). It runs the middleware's full exchange (no cache) alone
// ("quiet"), then while 8 goroutines send wrong secrets for a bcrypt client
// without pause, with the default bound on concurrent bcrypt work
// ("flood-bounded") and with the bound lifted ("flood-unbounded", what
// main did before). Compare ns/op of the three within one run; the flood
// rows also report how many secret checks ran and how many were refused
// 503 for want of a slot.
//
//	go test -run '^$' -bench ExchangeUnderSecretFlood -benchtime 3s ./exchange/
func BenchmarkExchangeUnderSecretFlood(b *testing.B) {
	hash, err := bcrypt.GenerateFromPassword([]byte("right"), 12)
	if err != nil {
		b.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		flood bool
		slots int
	}{
		{"quiet", false, 0},
		{"flood-bounded", true, 0},
		{"flood-unbounded", true, 64},
	} {
		b.Run(tc.name, func(b *testing.B) {
			e, tok := benchEngine(b, "ES256", "ES256")
			e.cache = nil
			clients, err := NewClients(context.Background(), []ClientConfig{{ClientID: "svc", SecretHash: string(hash)}},
				ClientOptions{MaxConcurrentSecretChecks: tc.slots})
			if err != nil {
				b.Fatal(err)
			}
			defer clients.Close()
			ctx, cancel := context.WithCancel(context.Background())
			var wg sync.WaitGroup
			var checks, busy atomic.Int64
			if tc.flood {
				for i := 0; i < 8; i++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for ctx.Err() == nil {
							_, err := clients.Authenticate(ctx, ClientCredentials{PostID: "svc", PostSecret: "wrong"})
							checks.Add(1)
							if AsError(err).Kind == KindUnavailable {
								busy.Add(1)
							}
						}
					}()
				}
			}
			if _, err := e.ExchangeBearer(ctx, tok, benchGrant, nil); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for b.Loop() {
				if _, err := e.ExchangeBearer(ctx, tok, benchGrant, nil); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			cancel()
			wg.Wait()
			if tc.flood {
				b.ReportMetric(float64(checks.Load()), "secret-checks")
				b.ReportMetric(float64(busy.Load()), "refused-503")
			}
		})
	}
}

// BenchmarkParseScope64KiB parses the largest scope a 64 KiB endpoint body
// can carry: linear, refused past MaxScopeTokens (it was quadratic, ~260 ms).
func BenchmarkParseScope64KiB(b *testing.B) {
	var sb strings.Builder
	for i := 0; sb.Len() < 64<<10; i++ {
		fmt.Fprintf(&sb, "s%d ", i%200)
	}
	s := sb.String()
	for b.Loop() {
		if _, err := ParseScope(s); err != nil {
			b.Fatal(err)
		}
	}
}
