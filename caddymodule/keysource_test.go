package caddymodule

import (
	"crypto/ecdsa"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/lestrrat-go/jwx/v3/jwt"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// Key sources through real Caddy: one per jwks_url, shared by trust blocks
// and clients; kept across config reloads; last good keys only within
// jwks_max_stale.

// TestKeySourceSharedJWKSURL: two trust blocks (a multi-tenant IdP) and a
// private_key_jwt client naming one jwks_url load, all work, and share one
// refresher.
func TestKeySourceSharedJWKSURL(t *testing.T) {
	idp := testidp.New(t, "https://idp.test")
	idp.AddKey("ec-1", "ES256")
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	config := fmt.Sprintf(`{
%s	token_exchange {
		issuer %s
		trust https://idp.test {
			jwks_url %s
			audience https://gateway.test
			algorithms ES256
		}
		trust https://tenant-2.idp.test {
			jwks_url %s
			audience https://gateway.test
			algorithms ES256
			jwks_max_stale 10m
		}
		client idp-svc {
			jwks_url %s
			jwks_max_stale 10m
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
		}
		respond "ok" 200
	}
	handle /oauth2/token {
		token_exchange_endpoint
	}
	handle /.well-known/jwks.json {
		token_exchange_jwks
	}
}
`, testGlobalOptions(logFile, t.TempDir()), stsBase, idp.JWKSURL(), idp.JWKSURL(), idp.JWKSURL(), audOrders, gatewayPort, audOrders)
	tester := caddytest.NewTester(t)
	tester.InitServer(config, "caddyfile")
	tester.Client.CloseIdleConnections()
	fltWarmUp(t, tester)
	g := &fltGateway{gateway: &gateway{tester: tester, idp: idp, logFile: logFile}}

	for _, iss := range []string{"https://idp.test", "https://tenant-2.idp.test"} {
		tok := idp.Token("ec-1", testidp.Claims{"iss": iss, "scope": "orders.read"})
		if st, ch, _ := g.try(t, tok); st != http.StatusOK {
			t.Fatalf("token of %s: %d %s", iss, st, ch)
		}
	}
	// The client authenticates with a key of the shared set.
	s := &sts{tester: tester, idp: idp, logFile: logFile}
	key := idp.PrivateKey("ec-1").(*ecdsa.PrivateKey)
	subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
	r := s.post(t, exchangeForm(subject, "audience", audOrders,
		"client_id", "idp-svc",
		"client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
		"client_assertion", signAssertion(t, key, "ec-1", "idp-svc", stsTokenURL, nil)), nil)
	if r.status != http.StatusOK || r.str("access_token") == "" {
		t.Fatalf("private_key_jwt client on the shared jwks_url: %d %s", r.status, r.raw)
	}
	if n := fltKeySourceRefreshers(); n != 1 {
		t.Errorf("%d JWKS refreshers for one jwks_url, want 1", n)
	}
	if n := idp.Fetches.Load(); n != 1 {
		t.Errorf("one jwks_url fetched %d times, want 1", n)
	}
}

// TestKeySourceReloadDuringOutage: a config reload (POST /load through the
// admin API) while the IdP's JWKS is down or serves garbage keeps the last
// good keys: the new config takes over the running key source.
func TestKeySourceReloadDuringOutage(t *testing.T) {
	for _, mode := range []fltMode{fltDown, fltGarbage} {
		t.Run(fltModeNames[mode], func(t *testing.T) {
			idp := testidp.New(t, "https://idp.test")
			idp.AddKey("rsa-1", "RS256")
			idp.AddKey("ec-1", "ES256")
			s := newFltJWKS(t, idp, fltOK)
			logFile := filepath.Join(t.TempDir(), "caddy.log")
			storage := t.TempDir()
			tester := caddytest.NewTester(t)
			g := &fltGateway{gateway: &gateway{tester: tester, idp: idp, logFile: logFile}, jwks: s}
			load := func(aud string) {
				t.Helper()
				tester.InitServer(fltConfig(logFile, storage, s.URL+"/jwks.json", "1s", aud, ""), "caddyfile")
				// No request may travel on a connection to the config replaced.
				tester.Client.CloseIdleConnections()
				fltWarmUp(t, tester)
			}
			// passes sends a fresh token of kid and tells whether the
			// config minting for aud let it through.
			passes := func(kid, aud string) bool {
				t.Helper()
				req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://localhost:%d/api/orders", gatewayPort), nil)
				req.Header.Set("Authorization", "Bearer "+fltFresh(t, idp, kid))
				resp, err := tester.Client.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				body, _ := io.ReadAll(resp.Body)
				_ = resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					t.Logf("%s: status %d %s", kid, resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
					return false
				}
				m, err := jwt.ParseInsecure([]byte(strings.TrimPrefix(string(body), "Bearer ")))
				if err != nil {
					t.Fatalf("minted %q: %v", body, err)
				}
				if a, _ := m.Audience(); len(a) != 1 || a[0] != aud {
					t.Fatalf("minted aud %v: the config for %s is not the one serving", a, aud)
				}
				return true
			}

			load("https://orders-1.internal")
			if !g.eventually(t, "ec-1", 5*time.Second) {
				t.Fatal("refused with a healthy JWKS")
			}
			s.set(mode)
			load("https://orders-2.internal")
			for _, kid := range []string{"ec-1", "rsa-1"} {
				if !passes(kid, "https://orders-2.internal") {
					t.Fatalf("after a reload while the JWKS is %s, a fresh token of %s is refused", fltModeNames[mode], kid)
				}
			}
			// A forced refresh against the failing JWKS changes nothing.
			time.Sleep(1100 * time.Millisecond)
			fetches := s.fetches.Load()
			if st, _, _ := g.try(t, fltRandomKidToken(t, idp)); st != http.StatusUnauthorized {
				t.Fatalf("unknown kid: %d", st)
			}
			if s.fetches.Load() == fetches {
				t.Fatal("no refresh was attempted against the failing JWKS")
			}
			if !passes("ec-1", "https://orders-2.internal") {
				t.Fatal("a failed refresh after the reload dropped the keys")
			}
			if n := fltKeySourceRefreshers(); n != 1 {
				t.Errorf("%d JWKS refreshers after the reload, want 1", n)
			}
			s.set(fltOK)
		})
	}
}

// TestKeySourceMaxStale: a JWKS that fails at refresh keeps its last good
// keys for jwks_max_stale; after that the IdP's tokens get 503 with
// Retry-After (its keys are unavailable, not the token bad), until the JWKS
// recovers.
func TestKeySourceMaxStale(t *testing.T) {
	idp := testidp.New(t, "https://idp.test")
	idp.AddKey("ec-1", "ES256")
	s := newFltJWKS(t, idp, fltOK)
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	config := strings.Replace(fltConfig(logFile, t.TempDir(), s.URL+"/jwks.json", "1s", audOrders, ""),
		"refetch_interval 1s", "refetch_interval 1s\n\t\t\tjwks_max_stale 3s", 1)
	tester := caddytest.NewTester(t)
	tester.InitServer(config, "caddyfile")
	tester.Client.CloseIdleConnections()
	fltWarmUp(t, tester)
	g := &fltGateway{gateway: &gateway{tester: tester, idp: idp, logFile: logFile}, jwks: s}
	if !g.eventually(t, "ec-1", 5*time.Second) {
		t.Fatal("refused with a healthy JWKS")
	}
	cached := fltFresh(t, idp, "ec-1")
	if st, _, _ := g.try(t, cached); st != http.StatusOK {
		t.Fatalf("status %d", st)
	}

	s.set(fltGarbage)
	failedAt := time.Now()
	// Within jwks_max_stale (3s from the last good fetch, at most ~1.5s
	// before failedAt: refreshes run every max_stale/2), tokens pass.
	if st, ch, _ := g.try(t, fltFresh(t, idp, "ec-1")); st != http.StatusOK {
		t.Fatalf("right after the JWKS turned bad: %d %s", st, ch)
	}
	// An unknown kid forces a refresh: the fault is recorded whatever the
	// background refresher's timing.
	time.Sleep(1100 * time.Millisecond)
	if st, _, _ := g.try(t, fltRandomKidToken(t, idp)); st != http.StatusUnauthorized {
		t.Fatalf("unknown kid within jwks_max_stale: %d", st)
	}
	time.Sleep(time.Until(failedAt.Add(3500 * time.Millisecond)))
	for _, tok := range []string{fltFresh(t, idp, "ec-1"), cached} {
		resp := g.get(t, "/api/orders", map[string]string{"Authorization": "Bearer " + tok})
		if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
			t.Fatalf("past jwks_max_stale: status %d, Retry-After %q, WWW-Authenticate %q; want 503 with Retry-After",
				resp.StatusCode, resp.Header.Get("Retry-After"), resp.Header.Get("WWW-Authenticate"))
		}
	}
	if logs := g.logs(t); !strings.Contains(logs, "last good keys are dropped") || !strings.Contains(logs, "JWKS fetch failed") {
		t.Error("neither the failed fetch nor the drop of the last good keys was logged")
	}
	s.set(fltOK)
	if !g.eventually(t, "ec-1", 5*time.Second) {
		for _, l := range strings.Split(g.logs(t), "\n") {
			if strings.Contains(l, "token exchange") || strings.Contains(l, "JWKS") {
				t.Log(l)
			}
		}
		t.Fatal("still refused after the JWKS recovered")
	}
	g.assertNoTokenLogged(t, cached)
}
