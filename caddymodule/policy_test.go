package caddymodule

import (
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/lestrrat-go/jwx/v3/jwt"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// The policy features of issue 4 through real Caddy: scope mapping between
// two authorities, CEL rules, computed claims, impersonation, token types
// and act depth.
func TestPolicyThroughCaddy(t *testing.T) {
	g := startGatewayWithTrust(t, `map_scope read:calendar calendar.events.read
			map_scope docs:read read:documents
			client_ids web-app`,
		"token_exchange {\n"+
			"\t\t\taudience https://docs.internal\n"+
			"\t\t\tscope calendar.events.read read:documents write:documents\n"+
			"\t\t\tclaims email\n"+
			"\t\t\tgrant write:documents if 'admin' in subject.groups\n"+
			"\t\t\tgrant admin:everything if true\n"+
			"\t\t\tdeny_if subject.sub == 'mallory'\n"+
			"\t\t\tallow_if `request.method != \"DELETE\"`\n"+
			"\t\t\tclaim tenant subject.email.split('@')[1]\n"+
			"\t\t}")

	mint := func(t *testing.T, method string, c testidp.Claims) (*http.Response, jwt.Token) {
		t.Helper()
		req, _ := http.NewRequest(method, fmt.Sprintf("http://localhost:%d/api/docs", gatewayPort), nil)
		req.Header.Set("Authorization", "Bearer "+g.idp.Token("ec-1", c))
		resp, err := g.tester.Client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return resp, nil
		}
		minted := strings.TrimPrefix(g.upstream.last().Header.Get("Authorization"), "Bearer ")
		tok, err := jwt.Parse([]byte(minted), jwt.WithKeySet(g.gatewayJWKS(t)))
		if err != nil {
			t.Fatal(err)
		}
		return resp, tok
	}
	claim := func(tok jwt.Token, name string) any {
		var v any
		_ = tok.Get(name, &v)
		return v
	}

	t.Run("mapping, grant capped by the route, computed claim", func(t *testing.T) {
		_, tok := mint(t, "GET", testidp.Claims{
			"scope": "read:calendar docs:read unmapped", "email": "ann@acme.test", "groups": []string{"admin"},
		})
		if tok == nil {
			t.Fatal("refused")
		}
		if got := claim(tok, "scope"); got != "calendar.events.read read:documents write:documents" {
			t.Fatalf("scope = %v (mapped + granted, never admin:everything, never unmapped)", got)
		}
		if got := claim(tok, "tenant"); got != "acme.test" {
			t.Fatalf("tenant = %v", got)
		}
	})
	t.Run("no grant without the group", func(t *testing.T) {
		_, tok := mint(t, "GET", testidp.Claims{"scope": "docs:read", "email": "bob@acme.test", "groups": []string{"staff"}})
		if tok == nil || claim(tok, "scope") != "read:documents" {
			t.Fatalf("scope = %v", claim(tok, "scope"))
		}
	})
	for name, tc := range map[string]struct {
		method string
		claims testidp.Claims
	}{
		"deny_if":            {"GET", testidp.Claims{"sub": "mallory", "email": "m@acme.test"}},
		"allow_if":           {"DELETE", testidp.Claims{"email": "ann@acme.test"}},
		"ID token as bearer": {"GET", testidp.Claims{"aud": "https://gateway.test", "nonce": "n", "email": "ann@acme.test"}},
		"act too deep":       {"GET", testidp.Claims{"email": "ann@acme.test", "act": deepAct(6)}},
		"act not an object":  {"GET", testidp.Claims{"email": "ann@acme.test", "act": []string{"svc"}}},
	} {
		t.Run(name, func(t *testing.T) {
			before := g.upstream.calls()
			resp, _ := mint(t, tc.method, tc.claims)
			if resp.StatusCode == http.StatusOK {
				t.Fatal("accepted")
			}
			if name == "deny_if" || name == "allow_if" {
				if resp.StatusCode != http.StatusForbidden {
					t.Fatalf("status %d, want 403", resp.StatusCode)
				}
			} else if resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("status %d, want 401", resp.StatusCode)
			}
			if g.upstream.calls() != before {
				t.Fatal("upstream called")
			}
		})
	}
}

func deepAct(n int) map[string]any {
	act := map[string]any{"sub": "svc-0"}
	for i := 1; i < n; i++ {
		act = map[string]any{"sub": "svc", "act": act}
	}
	return act
}

func TestAdaptPolicyErrors(t *testing.T) {
	handler := func(body string) string {
		return "{\n\ttoken_exchange {\n\t\tissuer https://gw\n\t}\n}\n:8080 {\n\ttoken_exchange {\n\t\taudience a\n\t\tscope x\n" + body + "\n\t}\n}\n"
	}
	for name, tc := range map[string]struct{ input, want string }{
		"syntax error":                              {handler("\t\tallow_if subject.sub ==="), "Caddyfile:10"},
		"non-bool condition":                        {handler("\t\tdeny_if 1 + 2"), "Caddyfile:10"},
		"unknown variable":                          {handler("\t\tallow_if user.sub == 'x'"), "Caddyfile:10"},
		"registered claim":                          {handler("\t\tclaim sub 'x'"), "Caddyfile:10"},
		"grant without if":                          {handler("\t\tgrant x"), "grant needs scopes and a condition"},
		"claim without expr":                        {handler("\t\tclaim tenant"), "claim needs a name and an expression"},
		"a double-quoted string is not a condition": {handler("\t\tallow_if \"subject.sub == 'x'\""), "Caddyfile:10"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := adapt(t, tc.input)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
	cfg, err := adapt(t, handler("\t\tgrant write:documents if 'admin' in subject.groups\n\t\tallow_if `subject.email.endsWith(\"@acme.test\")`\n\t\tclaim tenant subject.email.split('@')[1]"))
	if err != nil {
		t.Fatal(err)
	}
	out := mustJSON(t, cfg)
	for _, want := range []string{
		`"grants":[{"if":"'admin' in subject.groups","scopes":["write:documents"]}]`,
		`"allow_if":["subject.email.endsWith(\"@acme.test\")"]`,
		`"computed_claims":[{"expr":"subject.email.split('@')[1]","name":"tenant"}]`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("adapted config lacks %s:\n%s", want, out)
		}
	}
}

// TestAdaptCELStringSpellings: the Caddyfile lexer strips double quotes, so
// `deny_if subject.sub == "client"` used to load as a comparison with the
// `client` variable and never fire (issue 9 §1). Every CEL-bearing line, in
// a route and in a client block, keeps each spelling's meaning.
func TestAdaptCELStringSpellings(t *testing.T) {
	lines := "\t\t\tdeny_if subject.sub == \"client\"\n" +
		"\t\t\tallow_if subject.sub != 'actor'\n" +
		"\t\t\tdeny_if `subject.sub == \"route\"`\n" +
		"\t\t\tgrant orders.write if subject.sub == \"request\" && \"x y\" != \"a \\\"q\\\"\"\n" +
		"\t\t\tclaim tier \"subject\"\n" +
		"\t\t\tclaim quoted \"actor\" + 'x'\n"
	input := "{\n\ttoken_exchange {\n\t\tissuer https://gw\n\t\tclient svc {\n\t\t\tsecret_hash x\n" + lines +
		"\t\t}\n\t}\n}\n:8080 {\n\ttoken_exchange {\n\t\taudience a\n\t\tscope orders.write\n" + lines + "\t}\n}\n"
	cfg, err := adapt(t, input)
	if err != nil {
		t.Fatal(err)
	}
	out := mustJSON(t, cfg)
	for _, want := range []string{
		`"deny_if":["subject.sub == \"client\"","subject.sub == \"route\""]`,
		`"allow_if":["subject.sub != 'actor'"]`,
		`"grants":[{"if":"subject.sub == \"request\" \u0026\u0026 \"x y\" != \"a \\\"q\\\"\"","scopes":["orders.write"]}]`,
		`"computed_claims":[{"expr":"\"subject\"","name":"tier"},{"expr":"\"actor\" + 'x'","name":"quoted"}]`,
	} {
		if n := strings.Count(out, want); n != 2 {
			t.Errorf("adapted config holds %s %d times, want twice (route and client):\n%s", want, n, out)
		}
	}
}
