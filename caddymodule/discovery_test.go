package caddymodule

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// Issue 13 item 1: OIDC / RFC 8414 discovery for a trusted issuer, through
// real Caddy against a real IdP serving its metadata over HTTP.

// idpGateway is a gateway trusting idp (its issuer is its own URL) with the
// given lines in the trust block, in front of a recording upstream.
type idpGateway struct {
	*gateway
}

func startIdPGateway(t *testing.T, idp *testidp.Issuer, trustLines string) *idpGateway {
	t.Helper()
	upstream := newRecordingUpstream(t)
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	config := fmt.Sprintf(`{
%s	token_exchange {
		issuer %s
		jwks_fetch_timeout 1s
		trust %s {
			audience https://gateway.test
			algorithms RS256 ES256
			refetch_interval 1s
%s
		}
	}
}
http://localhost:%d {
	route /api/* {
		token_exchange {
			audience %s
			scope orders.read orders.write
		}
		reverse_proxy %s
	}
	handle /.well-known/jwks.json {
		token_exchange_jwks
	}
}
`, testGlobalOptions(logFile, t.TempDir()), gatewayIssuer, idp.Iss, trustLines, gatewayPort, audOrders,
		strings.TrimPrefix(upstream.URL, "http://"))
	tester := caddytest.NewTester(t)
	tester.InitServer(config, "caddyfile")
	fltWarmUp(t, tester)
	return &idpGateway{&gateway{tester: tester, idp: idp, upstream: upstream, logFile: logFile}}
}

func (g *idpGateway) try(t *testing.T, tok string) *http.Response {
	t.Helper()
	return g.get(t, "/api/orders", map[string]string{"Authorization": "Bearer " + tok})
}

func (g *idpGateway) logs(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(g.logFile)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// eventuallyOK retries fresh tokens until one passes or within is over.
func (g *idpGateway) eventuallyOK(t *testing.T, within time.Duration) bool {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		if resp := g.try(t, fltFresh(t, g.idp, "ec-1")); resp.StatusCode == http.StatusOK {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func newDiscoveryIdP(t *testing.T) *testidp.Issuer {
	idp := testidp.New(t, "")
	idp.AddKey("ec-1", "ES256")
	idp.AddKey("rsa-1", "RS256")
	return idp
}

func assertServed503(t *testing.T, resp *http.Response, why string) {
	t.Helper()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" ||
		strings.Contains(resp.Header.Get("WWW-Authenticate"), "invalid_token") {
		t.Fatalf("%s: status %d, Retry-After %q, WWW-Authenticate %q; want 503 with Retry-After, not blamed on the token",
			why, resp.StatusCode, resp.Header.Get("Retry-After"), resp.Header.Get("WWW-Authenticate"))
	}
}

// TestDiscoveryThroughCaddy: `discovery` reads the IdP's OIDC metadata, takes
// its jwks_uri and verifies its tokens; `discovery_url` reads a non-standard
// location. Metadata fetches are counted in jwks_fetches_total.
func TestDiscoveryThroughCaddy(t *testing.T) {
	for _, tc := range []struct{ name, lines string }{
		{"discovery", "\t\t\tdiscovery"},
		{"discovery_url", "\t\t\tdiscovery_url %s/tenant-a/.well-known/openid-configuration"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			idp := newDiscoveryIdP(t)
			lines := tc.lines
			if strings.Contains(lines, "%s") {
				lines = fmt.Sprintf(lines, idp.Server.URL)
			}
			g := startIdPGateway(t, idp, lines)
			if !g.eventuallyOK(t, 5*time.Second) {
				t.Fatal("a token of the discovered issuer was never accepted")
			}
			if g.upstream.calls() == 0 {
				t.Fatal("the upstream was not called")
			}
			if idp.MetadataFetches.Load() == 0 || idp.Fetches.Load() == 0 {
				t.Fatalf("metadata fetched %d times, JWKS %d times", idp.MetadataFetches.Load(), idp.Fetches.Load())
			}
			// An RS256 token too: the discovered JWKS holds both keys.
			if resp := g.try(t, fltFresh(t, idp, "rsa-1")); resp.StatusCode != http.StatusOK {
				t.Fatalf("RS256 token: %d", resp.StatusCode)
			}
			// A token signed by another key is still refused as a bad token.
			other := testidp.New(t, idp.Iss)
			other.AddKey("ec-1", "ES256")
			if resp := g.try(t, fltFresh(t, other, "ec-1")); resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("forged token: %d", resp.StatusCode)
			}
			// metadata + JWKS fetches are both counted
			series := fmt.Sprintf(`caddy_token_exchange_jwks_fetches_total{issuer=%q,result="ok"}`, idp.Iss)
			if n := metricValue(g.metrics(t), series); n < 2 {
				t.Errorf("%s = %v, want metadata and JWKS fetches counted (>= 2)", series, n)
			}
		})
	}
}

// TestDiscoveryFallbackRFC8414: an OAuth server without OIDC discovery is
// found through /.well-known/oauth-authorization-server.
func TestDiscoveryFallbackRFC8414(t *testing.T) {
	idp := newDiscoveryIdP(t)
	idp.NoOIDCDiscovery.Store(true)
	g := startIdPGateway(t, idp, "\t\t\tdiscovery")
	if !g.eventuallyOK(t, 5*time.Second) {
		t.Fatal("a token was never accepted through RFC 8414 metadata")
	}
	if n := idp.MetadataFetches.Load(); n < 2 {
		t.Fatalf("%d metadata fetches, want the OIDC location tried, then the RFC 8414 one", n)
	}
}

// TestDiscoveryIssuerMismatch: a metadata document naming another issuer is
// refused (logged); the issuer has no keys, so its tokens get 503, never a
// pass. Once the document is right, tokens pass.
func TestDiscoveryIssuerMismatch(t *testing.T) {
	idp := newDiscoveryIdP(t)
	evil := "https://evil.example"
	idp.DocIssuer.Store(&evil)
	g := startIdPGateway(t, idp, "\t\t\tdiscovery")
	tok := fltFresh(t, idp, "ec-1")
	assertServed503(t, g.try(t, tok), "metadata names another issuer")
	if g.upstream.calls() != 0 {
		t.Fatal("the upstream was called")
	}
	if n := idp.Fetches.Load(); n != 0 {
		t.Fatalf("the JWKS of a refused document was fetched %d times", n)
	}
	logs := g.logs(t)
	if !strings.Contains(logs, `is not the configured issuer`) || !strings.Contains(logs, evil) {
		t.Fatal("the refused metadata is not logged")
	}
	// the RFC 8414 location is not tried after a refused document
	if n := idp.MetadataFetches.Load(); n == 0 {
		t.Fatal("no metadata fetched")
	}
	idp.DocIssuer.Store(nil)
	if !g.eventuallyOK(t, 5*time.Second) {
		t.Fatal("tokens still refused after the metadata was corrected")
	}
	g.assertNoTokenLogged(t, tok)
}

// TestDiscoveryIdPDownAtStart: Caddy starts while the IdP is down; its tokens
// get 503 with Retry-After until it answers, then pass.
func TestDiscoveryIdPDownAtStart(t *testing.T) {
	idp := newDiscoveryIdP(t)
	idp.Down.Store(true)
	g := startIdPGateway(t, idp, "\t\t\tdiscovery")
	if set := g.gatewayJWKS(t); set.Len() == 0 {
		t.Fatal("Caddy is not serving")
	}
	assertServed503(t, g.try(t, fltFresh(t, idp, "ec-1")), "IdP down")
	if !strings.Contains(g.logs(t), "discovery failed") {
		t.Error("the failed discovery is not logged")
	}
	series := fmt.Sprintf(`caddy_token_exchange_jwks_fetches_total{issuer=%q,result="error"}`, idp.Iss)
	if n := metricValue(g.metrics(t), series); n < 1 {
		t.Errorf("%s = %v, want the failed metadata fetch counted", series, n)
	}
	idp.Down.Store(false)
	if !g.eventuallyOK(t, 6*time.Second) {
		t.Fatal("tokens still refused after the IdP came up")
	}
}
