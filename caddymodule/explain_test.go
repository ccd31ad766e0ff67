package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// demoToken signs a subject token with the demo IdP's key, as the README's
// `token-exchange mint` does. Run from the repository root.
func demoToken(t *testing.T, claims map[string]any) string {
	t.Helper()
	data, err := os.ReadFile("examples/demo-issuer/DEMO-ONLY-private-key.jwk")
	if err != nil {
		t.Fatal(err)
	}
	key, err := jwk.ParseKey(data)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tok, _ := jwt.NewBuilder().Issuer("https://demo-idp.example").Subject("alice").Audience([]string{"http://localhost:8080"}).
		IssuedAt(now).Expiration(now.Add(10 * time.Minute)).Build()
	for k, v := range claims {
		if err := tok.Set(k, v); err != nil {
			t.Fatal(err)
		}
	}
	alg, _ := key.Algorithm()
	sigAlg, _ := jwa.LookupSignatureAlgorithm(alg.String())
	signed, err := jwt.Sign(tok, jwt.WithKey(sigAlg, key, jws.WithProtectedHeaders(jws.NewHeaders())))
	if err != nil {
		t.Fatal(err)
	}
	return string(signed)
}

// TestExplainCaddyfileExample runs `explain` against the real quickstart
// config, for a success and for refusals of each class, in text and JSON.
func TestExplainCaddyfileExample(t *testing.T) {
	t.Chdir("..")
	good := demoToken(t, map[string]any{"scope": "orders.read profile", "email": "alice@example.com", "client_id": "web-app"})
	run := func(o explainOptions) (int, string) {
		t.Helper()
		o.config = "Caddyfile.example"
		var out bytes.Buffer
		code, err := runExplain(context.Background(), o, &out)
		if err != nil {
			t.Fatalf("explain: %v", err)
		}
		if strings.Contains(out.String(), o.token) && o.token != "" {
			t.Fatal("explain printed the raw token")
		}
		return code, out.String()
	}

	code, out := run(explainOptions{token: good, route: "/api/orders/42", method: "GET", host: "localhost"})
	if code != explainOK {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	for _, want := range []string{
		`iss "https://demo-idp.example" matched the trust block`, "RFC 7638 thumbprint", "[ok  ] times: exp ",
		"orders.read -> orders.read  (map_scope)", "profile -> (none)", "+ orders.read", "- orders.write: the subject does not hold it",
		"└─ sub=http://localhost:8080", `email: "alice@example.com"`, "RESULT: the exchange would succeed", exchange.HashToken(good),
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	t.Logf("success transcript:\n%s", out)

	// rules with their values: mallory is denied on the documents route
	mallory := demoToken(t, map[string]any{"sub": "mallory", "scope": "docs.read", "email": "m@example.com"})
	code, out = run(explainOptions{token: mallory, route: "/api/documents/1", method: "GET", host: "localhost"})
	if code != explainRefused || !strings.Contains(out, `deny_if "subject.sub == 'mallory'" = true`) || !strings.Contains(out, `REFUSED at "policy rules": 403 insufficient_scope: denied by policy`) {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	t.Logf("refusal transcript:\n%s", out)

	expired := demoToken(t, map[string]any{"exp": time.Now().Add(-time.Hour).Unix(), "scope": "orders.read"})
	for _, tc := range []struct {
		name, token, check, code string
	}{
		{"expired", expired, "times", "invalid_token"},
		{"wrong audience", demoToken(t, map[string]any{"aud": "https://elsewhere", "scope": "orders.read"}), "audience", "invalid_token"},
		{"issuer typo", demoToken(t, map[string]any{"iss": "https://demo-idp.example/", "scope": "orders.read"}), "issuer", "invalid_token"},
		{"no scope", demoToken(t, map[string]any{"scope": "profile"}), "required scopes", "insufficient_scope"},
		{"garbage", "not.a.token", "format", "invalid_token"},
		{"act too deep", demoToken(t, map[string]any{"scope": "orders.read", "act": map[string]any{"sub": "a", "act": map[string]any{"sub": "b", "act": map[string]any{"sub": "c", "act": map[string]any{"sub": "d", "act": map[string]any{"sub": "e", "act": map[string]any{"sub": "f"}}}}}}}), "act", "invalid_token"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			code, err := runExplain(context.Background(), explainOptions{config: "Caddyfile.example", token: tc.token, route: "/api/orders/1", method: "GET", host: "localhost", json: true}, &out)
			if err != nil || code != explainRefused {
				t.Fatalf("exit %d, %v", code, err)
			}
			var rep explainReport
			if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
				t.Fatal(err)
			}
			if rep.Outcome != "refused" || rep.Trace.Refusal.Check != tc.check || rep.Trace.Refusal.Error != tc.code {
				t.Fatalf("refusal %+v, want %s/%s", rep.Trace.Refusal, tc.check, tc.code)
			}
			if strings.Contains(out.String(), tc.token) {
				t.Fatal("the token was printed")
			}
		})
	}

	// the token endpoint, client billing-svc
	billing := demoToken(t, map[string]any{"scope": "billing.read"})
	code, out = run(explainOptions{token: billing, endpoint: true, client: "billing-svc", audiences: []string{"https://billing.internal"}, scopes: []string{"billing.read"}})
	if code != explainOK || !strings.Contains(out, "└─ sub=billing-svc client_id=billing-svc") {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	code, out = run(explainOptions{token: billing, endpoint: true, client: "billing-svc", audiences: []string{"https://orders.internal"}})
	if code != explainRefused || !strings.Contains(out, "400 invalid_target") {
		t.Fatalf("exit %d:\n%s", code, out)
	}

	// usage and config errors exit 2
	for _, o := range []explainOptions{
		{config: "Caddyfile.example", token: good},
		{config: "Caddyfile.example", token: good, endpoint: true, client: "nobody"},
		{config: "Caddyfile.example", token: good, route: "/nowhere", host: "localhost"},
		{config: "does-not-exist", token: good, route: "/api/orders/1"},
	} {
		if code, err := runExplain(context.Background(), o, &bytes.Buffer{}); code != explainUsage || err == nil {
			t.Errorf("%+v: exit %d, err %v; want 2 and an error", o, code, err)
		}
	}
}

// TestInspect decodes without trusting, and verifies with --config.
func TestInspect(t *testing.T) {
	t.Chdir("..")
	tok := demoToken(t, map[string]any{"scope": "orders.read", "act": map[string]any{"sub": "svc-a", "act": map[string]any{"sub": "svc-b"}}})
	var out bytes.Buffer
	code, err := runInspect(context.Background(), tok, inspectOptions{config: "Caddyfile.example"}, nil, &out)
	if err != nil || code != 0 {
		t.Fatalf("exit %d, %v:\n%s", code, err, out.String())
	}
	for _, want := range []string{"header (untrusted):", `alg: "ES256"`, "exp = ", "(in ", "└─ sub=svc-a", "   └─ sub=svc-b", "verified: trust block https://demo-idp.example"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	if strings.Contains(out.String(), tok) {
		t.Fatal("inspect printed the token")
	}
	bad := demoToken(t, map[string]any{"aud": "https://elsewhere"})
	out.Reset()
	code, _ = runInspect(context.Background(), bad, inspectOptions{config: "Caddyfile.example", json: true}, nil, &out)
	var in inspection
	if err := json.Unmarshal(out.Bytes(), &in); err != nil || code != 1 || in.Verified == nil || *in.Verified || !strings.Contains(in.Verdict, "wrong_audience") {
		t.Fatalf("exit %d: %s", code, out.String())
	}
}

// TestExplainOffline: with --offline, explain fetches nothing: each trusted
// issuer's keys come from a --jwks file, and an issuer with remote keys and
// no file is a usage error naming the flag.
func TestExplainOffline(t *testing.T) {
	idp := testidp.New(t, "https://idp.test")
	idp.AddKey("ec-1", "ES256")
	dir := t.TempDir()
	jwksFile := filepath.Join(dir, "idp-jwks.json")
	if err := os.WriteFile(jwksFile, idp.JWKS(), 0o600); err != nil {
		t.Fatal(err)
	}
	cfgFile := filepath.Join(dir, "Caddyfile")
	cfg := `{
	token_exchange {
		issuer https://gateway.test
		trust https://idp.test {
			jwks_url http://127.0.0.1:1/unreachable/jwks.json
			audience https://gateway.test
			algorithms ES256
		}
	}
}
http://localhost:8080 {
	route /api/* {
		token_exchange {
			audience https://orders.internal
			scope orders.read
		}
		respond ok
	}
}
`
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	tok := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
	var out bytes.Buffer
	code, err := runExplain(context.Background(), explainOptions{config: cfgFile, token: tok, route: "/api/x", method: "GET", offline: true}, &out)
	if code != explainUsage || err == nil || !strings.Contains(err.Error(), "--jwks https://idp.test=") {
		t.Fatalf("offline without --jwks: exit %d, %v", code, err)
	}
	out.Reset()
	code, err = runExplain(context.Background(), explainOptions{config: cfgFile, token: tok, route: "/api/x", method: "GET",
		offline: true, jwks: []string{"https://idp.test=" + jwksFile}}, &out)
	if code != explainOK || err != nil {
		t.Fatalf("offline with --jwks: exit %d, %v\n%s", code, err, out.String())
	}
	if idp.Fetches.Load() != 0 {
		t.Errorf("the IdP's JWKS was fetched %d times offline", idp.Fetches.Load())
	}
	if strings.Contains(out.String(), tok) {
		t.Error("the token was printed")
	}
}
