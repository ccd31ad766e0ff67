package caddymodule

import (
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/lestrrat-go/jwx/v3/jwt"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// TestRemoteSTSThroughCaddy (issue 15 §1): a route with `sts` exchanges the
// (locally verified) inbound token at another RFC 8693 endpoint (here this
// Caddy's own token endpoint, over real HTTP) and forwards what it returns;
// repeated requests reuse the cached token; the client secret comes from an
// {env.*} placeholder; an STS that is down answers 503, never a pass.
func TestRemoteSTSThroughCaddy(t *testing.T) {
	t.Setenv("CTE_TEST_STS_SECRET", "gw-remote-secret")
	idp := testidp.New(t, "https://idp.test")
	idp.AddKey("ec-1", "ES256")
	up := newRecordingUpstream(t)
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	config := fmt.Sprintf(`{
%s	token_exchange {
		issuer %s
		trust https://idp.test {
			jwks_url %s
			audience https://gateway.test
			algorithms ES256
		}
		client gw-remote {
			secret_hash %s
			audience %s
			scope orders.read
		}
	}
}
http://localhost:%d {
	route /api/* {
		token_exchange {
			audience %s
			scope orders.read
			sts http://localhost:%d/oauth2/token {
				client_id gw-remote
				client_secret {env.CTE_TEST_STS_SECRET}
			}
		}
		reverse_proxy %s
	}
	route /down/* {
		token_exchange {
			audience %s
			sts http://127.0.0.1:1/oauth2/token {
				client_id gw-remote
				client_secret x
				retries 0
			}
		}
		reverse_proxy %s
	}
	handle /oauth2/token {
		token_exchange_endpoint
	}
}
`, testGlobalOptions(logFile, t.TempDir()), gatewayIssuer, idp.JWKSURL(), bcryptHash(t, "gw-remote-secret"), audOrders,
		gatewayPort, audOrders, gatewayPort, strings.TrimPrefix(up.URL, "http://"), audOrders, strings.TrimPrefix(up.URL, "http://"))
	tester := caddytest.NewTester(t)
	tester.InitServer(config, "caddyfile")
	g := &gateway{tester: tester, idp: idp, upstream: up, logFile: logFile}

	// The counters are process-wide: count from here.
	okSeries := `caddy_token_exchange_endpoint_requests_total{outcome="ok"}`
	base := metricValue(g.metrics(t), okSeries)
	tok := idp.Token("ec-1", testidp.Claims{"scope": "orders.read orders.write"})
	for i := 0; i < 2; i++ {
		if resp := g.get(t, "/api/orders", map[string]string{"Authorization": "Bearer " + tok}); resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d: status %d", i, resp.StatusCode)
		}
	}
	got := strings.TrimPrefix(up.last().Header.Get("Authorization"), "Bearer ")
	if got == tok || got == "" {
		t.Fatal("the upstream did not get the STS's token")
	}
	parsed, err := jwt.ParseInsecure([]byte(got))
	if err != nil {
		t.Fatal(err)
	}
	if act := claimMap(t, parsed, "act"); act["sub"] != "gw-remote" {
		t.Errorf("act %v: the token is not the STS's exchange for the gateway's client", act)
	}
	m := g.metrics(t)
	if n := metricValue(m, okSeries) - base; n != 1 {
		t.Errorf("the STS was called %v times for two requests with one token, want 1 (cache)", n)
	}
	// An untrusted token never reaches the STS.
	evil := testidp.New(t, "https://evil.test")
	evil.AddKey("ec-1", "ES256")
	if resp := g.get(t, "/api/orders", map[string]string{"Authorization": "Bearer " + evil.Token("ec-1", nil)}); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("untrusted token: %d", resp.StatusCode)
	}
	if n := metricValue(g.metrics(t), okSeries) - base; n != 1 {
		t.Errorf("the STS was called for an untrusted token")
	}
	calls := up.calls()
	resp := g.get(t, "/down/x", map[string]string{"Authorization": "Bearer " + tok})
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Errorf("STS down: %d Retry-After %q, want 503 with Retry-After", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	if up.calls() != calls {
		t.Error("the upstream was called while the STS was down")
	}
	g.assertNoTokenLogged(t, tok, got)
}
