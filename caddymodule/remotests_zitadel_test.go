package caddymodule

import (
	"crypto/sha256"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/zitadel/oidc/v3/example/server/storage"
	"github.com/zitadel/oidc/v3/pkg/op"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
	"github.com/caddy-token-exchange/caddy-token-exchange/internal/zitadelsts"
)

// startZitadelSTS serves the zitadel/oidc example OP as a third-party STS
// (internal/zitadelsts) that trusts the IdP's keys in keys, for client
// gw-zitadel. It returns the issuer and a counter of token-endpoint calls.
func startZitadelSTS(t *testing.T, trust zitadelsts.Trust, secret string) (string, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	iss := "http://" + ln.Addr().String()
	st := zitadelsts.NewStorage(iss, map[string]*storage.Client{
		"gw-zitadel": storage.WebClient("gw-zitadel", secret),
	}, trust)
	h := zitadelsts.Handler(iss, st, nil)
	var calls atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/oauth/token" {
			calls.Add(1)
		}
		h.ServeHTTP(w, r)
	}))
	_ = srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)
	return iss, &calls
}

// publicKeys is the JWKS of idp's keys in kids, each with its alg (jwx
// takes the algorithm from the key).
func publicKeys(t *testing.T, idp *testidp.Issuer, kids ...string) jwk.Set {
	t.Helper()
	set := jwk.NewSet()
	for _, kid := range kids {
		k, err := jwk.Import(idp.PrivateKey(kid).Public())
		if err != nil {
			t.Fatal(err)
		}
		_ = k.Set(jwk.KeyIDKey, kid)
		_ = k.Set(jwk.AlgorithmKey, jwa.ES256())
		_ = set.AddKey(k)
	}
	return set
}

// TestRemoteSTSAgainstZitadel: a route whose sts is the zitadel/oidc
// example OP (a third-party RFC 8693 implementation) forwards the OP's
// opaque token, caches it, and answers 401 for a token the OP refuses.
func TestRemoteSTSAgainstZitadel(t *testing.T) {
	const secret = "gw-zitadel-secret"
	t.Setenv("CTE_TEST_ZITADEL_SECRET", secret)
	idp := testidp.New(t, "https://idp.test")
	idp.AddKey("ec-1", "ES256")
	idp.AddKey("ec-2", "ES256") // the gateway trusts it, the OP does not
	// The OP knows ec-1 only.
	iss, calls := startZitadelSTS(t, zitadelsts.Trust{Issuer: "https://idp.test", Audience: "https://gateway.test",
		Keys: publicKeys(t, idp, "ec-1")}, secret)
	up := newRecordingUpstream(t)
	f := newCaddyFixture(t)
	config := fmt.Sprintf(`{
%s	token_exchange {
		issuer %s
		trust https://idp.test {
			jwks_url %s
			audience https://gateway.test
			algorithms ES256
		}
	}
}
http://localhost:%d {
	route /api/* {
		token_exchange {
			audience %s
			scope orders.read
			sts %s/oauth/token {
				client_id gw-zitadel
				client_secret {env.CTE_TEST_ZITADEL_SECRET}
				retries 0
			}
		}
		reverse_proxy %s
	}
}
`, f.globals(), gatewayIssuer, idp.JWKSURL(), gatewayPort, audOrders, iss, strings.TrimPrefix(up.URL, "http://"))
	g := f.start(t, config, idp, up)
	bearer := func(tok string) map[string]string { return map[string]string{"Authorization": "Bearer " + tok} }

	tok := idp.Token("ec-1", testidp.Claims{"scope": "orders.read orders.write"})
	for i := 0; i < 2; i++ {
		if resp := g.get(t, "/api/orders", bearer(tok)); resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d: status %d (%s)", i, resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
		}
	}
	if up.calls() != 2 {
		t.Fatalf("upstream calls %d, want 2", up.calls())
	}
	got := strings.TrimPrefix(up.last().Header.Get("Authorization"), "Bearer ")
	if got == "" || got == tok {
		t.Fatalf("the upstream got %q, not the OP's token", got)
	}
	// zitadel's opaque access token: its id and subject in a JWE
	// (A256GCMKW, A256GCM) under the example OP's key "key1".
	key := sha256.Sum256([]byte("test"))
	plain, err := op.NewAES256GCMCrypto(key, "key1").Decrypt(got)
	if err != nil {
		t.Fatalf("the forwarded token %q is not the OP's opaque token: %v", got, err)
	}
	if _, sub, ok := strings.Cut(plain, ":"); !ok || sub != "alice" {
		t.Fatalf("the OP's token is for %q, want alice", plain)
	}
	if n := calls.Load(); n != 1 {
		t.Fatalf("the OP was called %d times for two requests with one token, want 1 (cache)", n)
	}

	// Refusals by the OP: a signature it cannot check (ec-2), and a subject
	// that holds none of the route's scopes. The gateway trusts both.
	for name, refused := range map[string]string{
		"key unknown to the OP": idp.Token("ec-2", testidp.Claims{"scope": "orders.read"}),
		"no scope in common":    idp.Token("ec-1", testidp.Claims{"scope": "billing.read"}),
	} {
		before, upBefore := calls.Load(), up.calls()
		resp := g.get(t, "/api/orders", bearer(refused))
		if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="invalid_token"`) {
			t.Errorf("%s: status %d (%s), want 401 invalid_token", name, resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
		}
		if calls.Load() != before+1 {
			t.Errorf("%s: the OP was called %d times, want 1 (the gateway trusts the token)", name, calls.Load()-before)
		}
		if up.calls() != upBefore {
			t.Errorf("%s: the upstream was called", name)
		}
	}
	g.assertNoTokenLogged(t, tok, got)
}
