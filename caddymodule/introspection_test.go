package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jwt"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// Issue 13 item 2: opaque access tokens by RFC 7662 introspection, through
// real Caddy against a real IdP's introspection endpoint.

const introSecretEnv = "CTE_TEST_INTROSPECTION_SECRET"

func newIntrospectionIdP(t *testing.T) *testidp.Issuer {
	idp := newDiscoveryIdP(t)
	idp.Introspection.ClientID = "gateway"
	idp.Introspection.ClientSecret = "s3cret:with/odd chars"
	idp.Introspection.Delay = 3 * time.Second
	t.Setenv(introSecretEnv, idp.Introspection.ClientSecret)
	return idp
}

// introTrust is the trust block of an introspecting gateway; the secret
// comes from the environment through Caddy's {env.*} placeholder.
func introTrust(extra string) string {
	return `			discovery
			opaque_tokens
			introspection_client_id gateway
			introspection_client_secret {env.` + introSecretEnv + `}
			introspection_timeout 1s
` + extra
}

func (g *idpGateway) mintedClaims(t *testing.T) map[string]any {
	t.Helper()
	auth := g.upstream.last().Header.Get("Authorization")
	tok, err := jwt.Parse([]byte(strings.TrimPrefix(auth, "Bearer ")), jwt.WithKeySet(g.gatewayJWKS(t)))
	if err != nil {
		t.Fatalf("the upstream got a token that does not verify against the gateway's JWKS: %v", err)
	}
	out := map[string]any{}
	for _, k := range tok.Keys() {
		var v any
		_ = tok.Get(k, &v)
		out[k] = v
	}
	return out
}

func TestIntrospectionThroughCaddy(t *testing.T) {
	for _, tc := range []struct{ name, extra, method string }{
		{"discovered endpoint, client_secret_basic", "introspection_cache 1s", "basic"},
		{"introspection_url, client_secret_post", "introspection_cache 1s\nintrospection_auth client_secret_post\nintrospection_url %s", "post"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			idp := newIntrospectionIdP(t)
			extra := tc.extra
			if strings.Contains(extra, "%s") {
				extra = fmt.Sprintf(extra, idp.IntrospectionURL())
			}
			g := startIdPGateway(t, idp, introTrust(extra))
			bearer := func(tok string) *http.Response { return g.try(t, tok) }

			opaque := idp.Opaque(testidp.Claims{"scope": "orders.read profile", "email": "alice@example.com"})
			calls, start := idp.Introspection.Calls.Load(), time.Now()
			if resp := bearer(opaque); resp.StatusCode != http.StatusOK {
				t.Fatalf("active opaque token: status %d (%s)", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
			}
			m := g.mintedClaims(t)
			if m["sub"] != "alice" || m["scope"] != "orders.read" || m["client_id"] != "web-app" || m["iss"] != gatewayIssuer {
				t.Fatalf("minted claims %v: want sub alice, scope orders.read, client_id web-app", m)
			}
			if strings.Contains(g.upstream.last().Header.Get("Authorization"), opaque) {
				t.Fatal("the opaque token reached the upstream")
			}
			// 1000 more requests with the same token: one introspection
			// call per introspection_cache (1s here)
			for i := 0; i < 999; i++ {
				if resp := bearer(opaque); resp.StatusCode != http.StatusOK {
					t.Fatalf("repeat %d: status %d", i, resp.StatusCode)
				}
			}
			elapsed := time.Since(start)
			if n, most := idp.Introspection.Calls.Load()-calls, 1+int64(elapsed/time.Second); n < 1 || n > most {
				t.Errorf("1000 requests with one token in %v cost %d introspection calls, want 1..%d", elapsed, n, most)
			} else {
				t.Logf("IdP calls per 1000 requests with a repeated token: %d (in %v, introspection_cache 1s)", n, elapsed.Round(time.Millisecond))
			}
			idp.Introspection.Mu().Lock()
			hints, methods := append([]string(nil), idp.Introspection.Hints...), append([]string(nil), idp.Introspection.Methods...)
			idp.Introspection.Mu().Unlock()
			for i := range hints {
				if hints[i] != "access_token" || methods[i] != tc.method {
					t.Fatalf("call %d: token_type_hint %q, client auth %q; want access_token, %s", i, hints[i], methods[i], tc.method)
				}
			}

			// Revocation is seen once introspection_cache (1s) is over,
			// also for the minted-token cache.
			idp.Revoke(opaque)
			time.Sleep(1200 * time.Millisecond)
			if resp := bearer(opaque); resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("revoked token after introspection_cache: status %d", resp.StatusCode)
			}

			now := time.Now()
			refused := map[string]testidp.Claims{
				"unknown (active false)":   nil,
				"active missing":           {"active": nil},
				"active not a bool":        {"active": "true"},
				"other issuer":             {"iss": "https://evil.example"},
				"other audience":           {"aud": "https://other.example"},
				"no audience":              {"aud": nil},
				"expired":                  {"exp": now.Add(-time.Hour).Unix()},
				"refresh token":            {"token_type": "refresh_token"},
				"sender-constrained (cnf)": {"cnf": map[string]any{"jkt": "abc"}},
				"act not an object":        {"act": "admin"},
			}
			var toks []string
			for name, c := range refused {
				tok := "opq_never_issued_" + strings.ReplaceAll(name, " ", "_")
				if c != nil {
					tok = idp.Opaque(c)
				}
				toks = append(toks, tok)
				resp := bearer(tok)
				if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="invalid_token"`) {
					t.Errorf("%s: status %d, challenge %q; want 401 invalid_token", name, resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
				}
			}
			// may_act naming someone else: the policy refuses (403)
			if resp := bearer(idp.Opaque(testidp.Claims{"scope": "orders.read", "may_act": map[string]any{"sub": "someone-else"}})); resp.StatusCode != http.StatusForbidden {
				t.Errorf("may_act for another actor: status %d, want 403", resp.StatusCode)
			}
			// a prior act chain is kept inside the minted act
			if resp := bearer(idp.Opaque(testidp.Claims{"scope": "orders.read", "act": map[string]any{"sub": "agent-7"}})); resp.StatusCode != http.StatusOK {
				t.Fatalf("delegated opaque token: status %d", resp.StatusCode)
			}
			act, _ := g.mintedClaims(t)["act"].(map[string]any)
			if inner, _ := act["act"].(map[string]any); act["sub"] != gatewayIssuer || inner["sub"] != "agent-7" {
				t.Errorf("minted act %v: want the gateway with agent-7 nested", act)
			}
			// JWTs of the same issuer still go the JWT way
			if resp := bearer(fltFresh(t, idp, "ec-1")); resp.StatusCode != http.StatusOK {
				t.Errorf("JWT beside opaque tokens: status %d", resp.StatusCode)
			}
			series := fmt.Sprintf(`caddy_token_exchange_introspections_total{issuer=%q,result="active"}`, idp.Iss)
			if metricValue(g.metrics(t), series) < 1 {
				t.Errorf("%s not counted", series)
			}
			logs := g.logs(t)
			if strings.Contains(logs, idp.Introspection.ClientSecret) {
				t.Fatal("the introspection client secret was logged")
			}
			g.assertNoTokenLogged(t, append(toks, opaque)...)
		})
	}
}

// TestIntrospectionFaults: an introspection endpoint that is down, slow or
// answers garbage is a failed dependency: 503 with Retry-After, never a pass
// and never 401; once it answers, the token passes.
func TestIntrospectionFaults(t *testing.T) {
	for _, tc := range []struct {
		name string
		mode testidp.IntrospectionMode
	}{{"down", testidp.IntrospectDown}, {"slow", testidp.IntrospectSlow}, {"garbage", testidp.IntrospectGarbage}} {
		t.Run(tc.name, func(t *testing.T) {
			idp := newIntrospectionIdP(t)
			g := startIdPGateway(t, idp, introTrust(""))
			idp.Introspection.Mode.Store(int32(tc.mode))
			tok := idp.Opaque(testidp.Claims{"scope": "orders.read"})
			start := time.Now()
			resp := g.try(t, tok)
			took := time.Since(start)
			assertServed503(t, resp, "introspection "+tc.name)
			if took > 2500*time.Millisecond {
				t.Errorf("the refusal took %v; introspection_timeout is 1s", took)
			}
			if g.upstream.calls() != 0 {
				t.Fatal("the upstream was called")
			}
			if !strings.Contains(g.logs(t), "token introspection failed") {
				t.Error("the failure is not logged")
			}
			// failures are not cached: the IdP recovers, the token passes
			idp.Introspection.Mode.Store(int32(testidp.IntrospectOK))
			if resp := g.try(t, tok); resp.StatusCode != http.StatusOK {
				t.Fatalf("after recovery: status %d", resp.StatusCode)
			}
			g.assertNoTokenLogged(t, tok)
		})
	}
}

// TestIntrospectionFlood: distinct garbage opaque tokens each cost at most
// one IdP call, never pass, and repeating them within the negative cache
// costs none.
func TestIntrospectionFlood(t *testing.T) {
	idp := newIntrospectionIdP(t)
	g := startIdPGateway(t, idp, introTrust(""))
	const n = 1000
	toks := make([]string, n)
	for i := range toks {
		toks[i] = fmt.Sprintf("garbage-%04d-%d", i, time.Now().UnixNano())
	}
	run := func() map[int]int {
		var mu sync.Mutex
		statuses := map[int]int{}
		var wg sync.WaitGroup
		next := make(chan string)
		for w := 0; w < 16; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for tok := range next {
					req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://localhost:%d/api/orders", gatewayPort), nil)
					req.Header.Set("Authorization", "Bearer "+tok)
					resp, err := g.tester.Client.Do(req)
					if err != nil {
						t.Error(err)
						continue
					}
					_ = resp.Body.Close()
					mu.Lock()
					statuses[resp.StatusCode]++
					mu.Unlock()
				}
			}()
		}
		for _, tok := range toks {
			next <- tok
		}
		close(next)
		wg.Wait()
		return statuses
	}
	before := idp.Introspection.Calls.Load()
	first := run()
	calls := idp.Introspection.Calls.Load() - before
	if first[http.StatusOK] != 0 || g.upstream.calls() != 0 {
		t.Fatalf("garbage passed: %v", first)
	}
	if calls > n {
		t.Fatalf("%d distinct garbage tokens cost %d IdP calls", n, calls)
	}
	second := run()
	again := idp.Introspection.Calls.Load() - before - calls
	if again != 0 {
		t.Errorf("repeating %d garbage tokens within the negative cache cost %d more IdP calls", n, again)
	}
	t.Logf("IdP calls per %d distinct garbage tokens: %d (statuses %v); repeated within 5s: %d (statuses %v)", n, calls, first, again, second)
}

// TestIntrospectionJWTAndPrivateKeyJWTThroughCaddy: the gateway
// authenticates at the IdP with an RFC 7523 client assertion signed by its
// key file (the IdP verifies it with jwx), asks for RFC 9701 JWT responses
// and verifies them with the trust block's keys; a forged response is 503,
// never a pass.
func TestIntrospectionJWTAndPrivateKeyJWTThroughCaddy(t *testing.T) {
	idp := newDiscoveryIdP(t)
	idp.AddHiddenKey("rogue", "ES256")
	idp.Introspection.ClientID = "gateway"
	priv := testidp.GenerateKey(t, "ES256")
	key, err := jwk.Import(priv)
	if err != nil {
		t.Fatal(err)
	}
	_ = key.Set(jwk.KeyIDKey, "gw-1")
	data, _ := json.Marshal(key)
	keyFile := filepath.Join(t.TempDir(), "gateway-at-idp.jwk")
	if err := os.WriteFile(keyFile, data, 0o600); err != nil {
		t.Fatal(err)
	}
	pub, _ := jwk.Import(priv.Public())
	_ = pub.Set(jwk.KeyIDKey, "gw-1")
	_ = pub.Set(jwk.AlgorithmKey, jwa.ES256())
	set := jwk.NewSet()
	_ = set.AddKey(pub)
	idp.Introspection.ClientKeys = set
	idp.Introspection.SetJWTResponse(testidp.JWTResponse{Key: "ec-1"})

	g := startIdPGateway(t, idp, `			discovery
			opaque_tokens
			introspection_client_id gateway
			introspection_auth private_key_jwt
			introspection_key_file `+keyFile+`
			introspection_jwt_response
			introspection_timeout 1s
`)
	opaque := idp.Opaque(testidp.Claims{"scope": "orders.read profile"})
	if resp := g.try(t, opaque); resp.StatusCode != http.StatusOK {
		t.Fatalf("opaque token, signed introspection response: status %d (%s)", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}
	if m := g.mintedClaims(t); m["sub"] != "alice" || m["scope"] != "orders.read" {
		t.Fatalf("minted claims %v", m)
	}
	// a second token: a second assertion with a fresh jti (the IdP refuses replays)
	if resp := g.try(t, idp.Opaque(testidp.Claims{"scope": "orders.read"})); resp.StatusCode != http.StatusOK {
		t.Fatalf("second opaque token: status %d", resp.StatusCode)
	}
	idp.Introspection.Mu().Lock()
	methods, accepts := strings.Join(idp.Introspection.Methods, " "), strings.Join(idp.Introspection.Accepts, " ")
	idp.Introspection.Mu().Unlock()
	if methods != "private_key_jwt private_key_jwt" || accepts != "application/token-introspection+jwt application/token-introspection+jwt" {
		t.Fatalf("client authentication %q, Accept %q", methods, accepts)
	}
	// a response signed by a key the issuer never published: 503, logged
	idp.Introspection.SetJWTResponse(testidp.JWTResponse{Key: "ec-1", ForgeWith: "rogue"})
	forged := idp.Opaque(testidp.Claims{"scope": "orders.read"})
	assertServed503(t, g.try(t, forged), "forged JWT introspection response")
	// an IdP that answers plain JSON although a JWT was asked for: 503
	idp.Introspection.SetJWTResponse(testidp.JWTResponse{})
	assertServed503(t, g.try(t, forged), "JSON introspection response with introspection_jwt_response")
	if g.upstream.calls() != 2 {
		t.Fatalf("the upstream was called %d times, want 2", g.upstream.calls())
	}
	if !strings.Contains(g.logs(t), "introspection_bad_jwt") {
		t.Error("the bad JWT response is not logged")
	}
	// not cached: a good response again, the token passes
	idp.Introspection.SetJWTResponse(testidp.JWTResponse{Key: "ec-1"})
	if resp := g.try(t, forged); resp.StatusCode != http.StatusOK {
		t.Fatalf("after recovery: status %d", resp.StatusCode)
	}
	if strings.Contains(g.logs(t), string(data)) || strings.Contains(g.logs(t), `"d":`) {
		t.Fatal("the gateway's private key was logged")
	}
	g.assertNoTokenLogged(t, opaque, forged)
}
