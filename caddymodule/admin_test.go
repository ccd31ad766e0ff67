package caddymodule

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// adminConfig is a gateway with one route (audience aud) and one endpoint
// client, for the admin API tests.
func adminConfig(t *testing.T, logFile, storage, jwksURL, aud string, extra ...string) string {
	t.Helper()
	return fmt.Sprintf(`{
%s	token_exchange {
		issuer %s
		%s
		trust https://idp.test {
			jwks_url %s
			audience https://gateway.test
			algorithms RS256
		}
		client billing-svc {
			secret_hash %s
			audience https://billing.internal
			scope billing.read
		}
	}
}
http://localhost:%d {
	route /api/* {
		token_exchange {
			audience %s
			scope orders.read
			require_scope orders.read
		}
		respond "ok"
	}
	handle /oauth2/token {
		token_exchange_endpoint
	}
	handle /.well-known/jwks.json {
		token_exchange_jwks
	}
}
`, testGlobalOptions(logFile, storage), gatewayIssuer, strings.Join(extra, "\n\t\t"), jwksURL, bcryptHash(t, "s3cret-billing"), gatewayPort, aud)
}

// adminCall sends a request to Caddy's admin endpoint.
func adminCall(t *testing.T, tester *caddytest.Tester, method, path string, body any) (int, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, fmt.Sprintf("http://localhost:%d%s", adminPort, path), rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := tester.Client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out
}

// TestAdminExplain runs POST /token-exchange/explain on a real Caddy's
// admin endpoint: a success and refusals for a route and for the token
// endpoint, usage errors, and the running config after a reload. No raw
// token is echoed or logged.
func TestAdminExplain(t *testing.T) {
	idp := testidp.New(t, "https://idp.test")
	idp.Audience = "https://gateway.test"
	idp.AddKey("rsa-1", "RS256")
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	storage := t.TempDir()
	tester := caddytest.NewTester(t)
	tester.InitServer(adminConfig(t, logFile, storage, idp.JWKSURL(), "https://orders.internal"), "caddyfile")
	g := &gateway{tester: tester, idp: idp, logFile: logFile}

	good := idp.Token("rsa-1", testidp.Claims{"scope": "orders.read billing.read", "email": "alice@example.com"})
	explain := func(body map[string]any) (int, explainReport, string) {
		t.Helper()
		status, out := adminCall(t, tester, http.MethodPost, "/token-exchange/explain", body)
		if tok, _ := body["token"].(string); tok != "" && strings.Contains(string(out), tok) {
			t.Fatal("the admin API echoed the raw token")
		}
		var rep explainReport
		if status == http.StatusOK {
			if err := json.Unmarshal(out, &rep); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
		}
		return status, rep, string(out)
	}

	// a route: the exchange would succeed
	status, rep, out := explain(map[string]any{"token": good, "route": "/api/orders/42", "host": "localhost"})
	if status != http.StatusOK || rep.Outcome != "exchanged" || rep.Trace == nil || rep.Trace.Refusal != nil {
		t.Fatalf("status %d: %s", status, out)
	}
	if rep.Trace.TokenSHA256 != exchange.HashToken(good) || !strings.Contains(rep.Target, "audience https://orders.internal") {
		t.Fatalf("target %q, hash %q", rep.Target, rep.Trace.TokenSHA256)
	}
	if aud, _ := json.Marshal(rep.Trace.Claims["aud"]); !strings.Contains(string(aud), "https://orders.internal") || rep.Trace.Claims["sub"] != "alice" {
		t.Fatalf("claims %v", rep.Trace.Claims)
	}
	t.Logf("admin explain (success):\n%s", out)

	// refusals name the failing check
	for _, tc := range []struct {
		name  string
		token string
		check string
		code  string
	}{
		{"expired", idp.Token("rsa-1", testidp.Claims{"scope": "orders.read", "exp": time.Now().Add(-time.Hour).Unix()}), "times", "invalid_token"},
		{"no scope", idp.Token("rsa-1", testidp.Claims{"scope": "profile"}), "required scopes", "insufficient_scope"},
		{"garbage", "not.a.token", "format", "invalid_token"},
	} {
		status, rep, out := explain(map[string]any{"token": tc.token, "route": "/api/orders/1", "method": "GET"})
		if status != http.StatusOK || rep.Outcome != "refused" || rep.Trace.Refusal == nil ||
			rep.Trace.Refusal.Check != tc.check || rep.Trace.Refusal.Error != tc.code {
			t.Fatalf("%s: status %d: %s", tc.name, status, out)
		}
		if tc.name == "no scope" {
			t.Logf("admin explain (refusal):\n%s", out)
		}
	}

	// the token endpoint, for a configured client
	status, rep, out = explain(map[string]any{"token": good, "endpoint": true, "client": "billing-svc", "audience": []string{"https://billing.internal"}, "scope": []string{"billing.read"}})
	if status != http.StatusOK || rep.Outcome != "exchanged" || rep.Trace.Door != "endpoint" {
		t.Fatalf("endpoint: status %d: %s", status, out)
	}
	status, rep, out = explain(map[string]any{"token": good, "endpoint": true, "client": "billing-svc", "audience": []string{"https://orders.internal"}})
	if status != http.StatusOK || rep.Outcome != "refused" || rep.Trace.Refusal.Error != "invalid_target" {
		t.Fatalf("endpoint refusal: status %d: %s", status, out)
	}

	// usage errors are 400 (405 for the wrong method), with a message
	for _, tc := range []struct {
		method string
		body   any
		status int
		msg    string
	}{
		{http.MethodGet, nil, http.StatusMethodNotAllowed, "use POST"},
		{http.MethodPost, map[string]any{"route": "/api/x"}, http.StatusBadRequest, "token is required"},
		{http.MethodPost, map[string]any{"token": good}, http.StatusBadRequest, "exactly one of route or endpoint"},
		{http.MethodPost, map[string]any{"token": good, "route": "/nowhere"}, http.StatusBadRequest, "no token_exchange handler serves GET /nowhere"},
		{http.MethodPost, map[string]any{"token": good, "route": "/api/x", "method": "GET", "host": "elsewhere.example"}, http.StatusBadRequest, "no token_exchange handler"},
		{http.MethodPost, map[string]any{"token": good, "endpoint": true, "client": "nobody"}, http.StatusBadRequest, `no client \"nobody\"`},
		{http.MethodPost, map[string]any{"token": good, "route": "/api/x", "tokn": "typo"}, http.StatusBadRequest, "unknown field"},
	} {
		status, out := adminCall(t, tester, tc.method, "/token-exchange/explain", tc.body)
		if status != tc.status || !strings.Contains(string(out), tc.msg) {
			t.Errorf("%s %v: status %d %s; want %d %q", tc.method, tc.body, status, out, tc.status, tc.msg)
		}
		if strings.Contains(string(out), good) {
			t.Fatal("an error echoed the raw token")
		}
	}

	// the running config: after a reload the route mints for its new audience
	tester.InitServer(adminConfig(t, logFile, storage, idp.JWKSURL(), "https://orders-v2.internal"), "caddyfile")
	_, rep, out = explain(map[string]any{"token": good, "route": "/api/orders/42", "host": "localhost"})
	if rep.Outcome != "exchanged" || !strings.Contains(fmt.Sprint(rep.Trace.Claims["aud"]), "https://orders-v2.internal") {
		t.Fatalf("after reload: %s", out)
	}
	g.assertNoTokenLogged(t, good)
}

// TestAdminKeys lists the signing keys of a real Caddy: the key that signs
// is the one the gateway's JWKS publishes, no key material shows, and a
// rotation in storage shows as a published successor.
func TestAdminKeys(t *testing.T) {
	idp := testidp.New(t, "https://idp.test")
	idp.AddKey("rsa-1", "RS256")
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	storage := t.TempDir()
	tester := caddytest.NewTester(t)
	tester.InitServer(adminConfig(t, logFile, storage, idp.JWKSURL(), "https://orders.internal"), "caddyfile")
	g := &gateway{tester: tester, idp: idp, logFile: logFile}

	keys := func() adminKeys {
		t.Helper()
		status, out := adminCall(t, tester, http.MethodGet, "/token-exchange/keys", nil)
		if status != http.StatusOK {
			t.Fatalf("status %d: %s", status, out)
		}
		for _, private := range []string{`"d"`, `"key"`, `"x"`, `"n"`} {
			if strings.Contains(string(out), private) {
				t.Fatalf("keys shows %s: %s", private, out)
			}
		}
		var k adminKeys
		if err := json.Unmarshal(out, &k); err != nil {
			t.Fatal(err)
		}
		t.Logf("GET /token-exchange/keys:\n%s", out)
		return k
	}
	k := keys()
	jwks := g.gatewayJWKS(t)
	published, _ := jwks.Key(0)
	kid, _ := published.KeyID()
	if k.Issuer != gatewayIssuer || k.Source != "storage" || k.SigningKID != kid || k.SigningAlg == "" ||
		len(k.Keys) != 1 || k.Keys[0].KID != kid || k.Keys[0].State != "signing" || k.Keys[0].SignFrom.IsZero() {
		t.Fatalf("keys %+v, JWKS kid %s", k, kid)
	}

	// a scheduled rotation, as `caddy token-exchange rotate` makes it,
	// through the running app's key set
	_, app, err := runningApp()
	if err != nil {
		t.Fatal(err)
	}
	if err := app.keys.Rotate(t.Context(), false); err != nil {
		t.Fatal(err)
	}
	k = keys()
	if len(k.Keys) != 2 || k.SigningKID != kid {
		t.Fatalf("after rotate: %+v", k)
	}
	states := map[string]string{}
	for _, key := range k.Keys {
		states[key.KID] = key.State
	}
	if states[kid] != "signing" || len(states) != 2 {
		t.Fatalf("after rotate: %v", states)
	}
	for id, st := range states {
		if id != kid && st != "next" {
			t.Fatalf("the successor is %q, want next", st)
		}
	}

	if status, out := adminCall(t, tester, http.MethodPost, "/token-exchange/keys", map[string]any{}); status != http.StatusMethodNotAllowed {
		t.Fatalf("POST keys: %d %s", status, out)
	}

	// a signing_key_file: its one key, from the file
	keyFile := filepath.Join(t.TempDir(), "key.jwk")
	c := keygenCommand()
	c.SetArgs([]string{"--out", keyFile})
	c.SetOut(io.Discard)
	if err := c.Execute(); err != nil {
		t.Fatal(err)
	}
	tester.InitServer(adminConfig(t, logFile, storage, idp.JWKSURL(), "https://orders.internal", "signing_key_file "+keyFile), "caddyfile")
	k = keys()
	published, _ = g.gatewayJWKS(t).Key(0)
	fileKID, _ := published.KeyID()
	if k.Source != "signing_key_file" || k.SigningKID != fileKID || fileKID == kid || len(k.Keys) != 1 || k.Keys[0].KID != fileKID || k.Keys[0].State != "signing" {
		t.Fatalf("with signing_key_file: %+v (JWKS kid %s)", k, fileKID)
	}

	// a running config without the app: 404 with a message
	tester.InitServer(fmt.Sprintf("{\n%s}\nhttp://localhost:%d {\n\trespond ok\n}\n", testGlobalOptions(logFile, storage), gatewayPort), "caddyfile")
	for _, tc := range []struct {
		method, path string
		body         any
	}{{http.MethodGet, "/token-exchange/keys", nil}, {http.MethodPost, "/token-exchange/explain", map[string]any{"token": "x", "route": "/api/x"}}} {
		if status, out := adminCall(t, tester, tc.method, tc.path, tc.body); status != http.StatusNotFound || !strings.Contains(string(out), "no token_exchange app") {
			t.Fatalf("%s without the app: %d %s", tc.path, status, out)
		}
	}
}
