package caddymodule

import (
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// FuzzUnmarshalCaddyfile feeds arbitrary Caddyfile text to the global option
// and every directive's unmarshaller: errors are fine, panics are not.
func FuzzUnmarshalCaddyfile(f *testing.F) {
	for _, seed := range []string{
		designCaddyfile,
		"token_exchange {\n\tissuer https://gw\n\ttrust https://idp {\n\t\tjwks_file x\n\t\taudience a\n\t\talgorithms RS256\n\t\tmap_scope a b c\n\t}\n}",
		"token_exchange https://a {\n\taudience b\n\tscope x y\n\trequire_scope x\n\tgrant y if 'admin' in subject.groups\n\tclaim t subject.email.split('@')[1]\n}",
		"token_exchange {\n\tclient c {\n\t\tsecret_hash $2a$10$x\n\t\tallow_if true\n\t}\n}",
		"token_exchange_endpoint {\n\tmax_request_body 1KiB\n}",
		"token_exchange_jwks {\n\tmax_age 1m\n}",
		"token_exchange {\n\tgrant if\n\tclaim\n\tdeny_if\n}",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, input string) {
		for _, u := range []caddyfile.Unmarshaler{new(App), new(Handler), new(JWKSHandler), new(EndpointHandler)} {
			d := caddyfile.NewTestDispenser(input)
			_ = u.UnmarshalCaddyfile(d)
		}
	})
}
