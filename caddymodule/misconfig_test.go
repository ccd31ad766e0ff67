package caddymodule

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// loadCaddyfile adapts a Caddyfile and provisions it as `caddy validate`
// does (nothing listens, nothing is written to storage).
func loadCaddyfile(t *testing.T, input string) error {
	t.Helper()
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		return err
	}
	var cfg caddy.Config
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatal(err)
	}
	return caddy.Validate(&cfg)
}

// TestMisconfigurationMessages: the ten mistakes newcomers make most, each
// answered with a message that names the line (Caddyfile errors) and says
// what to change.
func TestMisconfigurationMessages(t *testing.T) {
	const okTrust = `trust https://idp.example.com {
			jwks_file ../examples/demo-issuer/jwks.json
			audience https://gateway.example.com
			algorithms ES256
		}`
	global := func(body string) string {
		return "{\n\tadmin off\n\ttoken_exchange {\n" + body + "\n\t}\n}\n"
	}
	site := func(handler string) string {
		return "http://localhost:1 {\n\troute /api/* {\n\t\t" + handler + "\n\t\trespond ok\n\t}\n}\n"
	}
	cases := []struct {
		name, input string
		// wants: all must be in the message; the last is the advice
		wants []string
	}{
		{"route without audience",
			global("\t\tissuer https://gw.example.com\n\t\t"+okTrust) + site("token_exchange {\n\t\t\tscope orders.read\n\t\t}"),
			[]string{"Caddyfile:", "at least one audience", "add `audience"}},
		{"token_exchange without the global option",
			"{\n\tadmin off\n}\n" + site("token_exchange https://orders.internal"),
			[]string{"needs the token_exchange global option", "add to the global options"}},
		{"missing issuer",
			global("\t\t"+okTrust) + site("token_exchange https://orders.internal"),
			[]string{"Caddyfile:", "issuer is required", "add `issuer https://"}},
		{"trust without audience",
			global("\t\tissuer https://gw.example.com\n\t\ttrust https://idp.example.com {\n\t\t\tjwks_file x\n\t\t\talgorithms RS256\n\t\t}"),
			[]string{"Caddyfile:", "audience is required", "add `audience"}},
		{"trust without algorithms",
			global("\t\tissuer https://gw.example.com\n\t\ttrust https://idp.example.com {\n\t\t\tjwks_file x\n\t\t\taudience a\n\t\t}"),
			[]string{"Caddyfile:", "algorithms is required", "RS256"}},
		{"HMAC algorithm",
			global("\t\tissuer https://gw.example.com\n\t\ttrust https://idp.example.com {\n\t\t\tjwks_file x\n\t\t\taudience a\n\t\t\talgorithms HS256\n\t\t}"),
			[]string{"Caddyfile:", "HMAC", "use the asymmetric algorithm"}},
		{"no key source",
			global("\t\tissuer https://gw.example.com\n\t\ttrust https://idp.example.com {\n\t\t\taudience a\n\t\t\talgorithms RS256\n\t\t}"),
			[]string{"Caddyfile:", "exactly one of jwks_url", "for example: jwks_url https://idp.example.com/"}},
		{"jwks_file missing",
			global("\t\tissuer https://gw.example.com\n\t\ttrust https://idp.example.com {\n\t\t\tjwks_file /nonexistent/jwks.json\n\t\t\taudience a\n\t\t\talgorithms RS256\n\t\t}") + site("token_exchange https://orders.internal"),
			[]string{"/nonexistent/jwks.json", "check the path"}},
		{"secret_hash not bcrypt",
			global("\t\tissuer https://gw.example.com\n\t\t"+okTrust+"\n\t\tclient billing {\n\t\t\tsecret_hash s3cret\n\t\t\taudience https://billing.internal\n\t\t}") + site("token_exchange https://orders.internal"),
			[]string{"billing", "bcrypt", "caddy hash-password"}},
		{"require_scope outside scope",
			global("\t\tissuer https://gw.example.com\n\t\t"+okTrust) + site("token_exchange {\n\t\t\taudience a\n\t\t\tscope orders.read\n\t\t\trequire_scope orders.write\n\t\t}"),
			[]string{"Caddyfile:", "require_scope 'orders.write'", "add it to scope"}},
		{"id_token without client_ids",
			global("\t\tissuer https://gw.example.com\n\t\ttrust https://idp.example.com {\n\t\t\tjwks_file ../examples/demo-issuer/jwks.json\n\t\t\taudience a\n\t\t\talgorithms RS256\n\t\t\ttoken_types id_token\n\t\t}") + site("token_exchange https://orders.internal"),
			[]string{"id_token needs client_ids", "add `client_ids"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := loadCaddyfile(t, tc.input)
			if err == nil {
				t.Fatalf("loaded without error:\n%s", tc.input)
			}
			for _, want := range tc.wants {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q\nwant it to contain %q", err, want)
				}
			}
		})
	}
}
