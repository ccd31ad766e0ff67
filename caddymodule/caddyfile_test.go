package caddymodule

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// adapt runs the real Caddyfile adapter.
func adapt(t *testing.T, input string) (map[string]any, error) {
	t.Helper()
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		return nil, err
	}
	var cfg map[string]any
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatal(err)
	}
	return cfg, nil
}

// designCaddyfile is DESIGN.md §3, as users will write it (a one-line
// `{ token_exchange_jwks }` block is not valid Caddyfile, so it is spread out).
const designCaddyfile = `{
	order token_exchange before reverse_proxy

	token_exchange {
		issuer https://gateway.example.internal
		signing_alg ES256
		signing_key_file /etc/caddy/sts.pem
		key_rotation 720h
		token_lifetime 5m
		actor https://gateway.example.internal
		clock_skew 30s

		trust https://idp.example.com {
			jwks_url https://idp.example.com/.well-known/jwks.json
			audience https://gateway.example.internal
			algorithms RS256 ES256
			token_types access_token jwt
			map_scope read:calendar calendar.events.read
		}

		client billing-svc {
			secret_hash $2a$14$ajq8Q7fbtFRQvXpdCq7Jcuy.Rx1h/L4J60Otx.gyNLbAYctGMJ9tK
			audience https://billing.internal
			scope billing.read
		}
	}
}

api.example.com {
	route /orders/* {
		token_exchange {
			audience https://orders.internal
			scope orders.read orders.write
			require_scope orders.read
			mode delegation
			claims email groups
		}
		reverse_proxy 127.0.0.1:9001
	}
	handle /.well-known/jwks.json {
		token_exchange_jwks
	}
}
`

func TestAdaptDesignCaddyfile(t *testing.T) {
	cfg, err := adapt(t, designCaddyfile)
	if err != nil {
		t.Fatal(err)
	}
	apps := cfg["apps"].(map[string]any)
	raw, _ := json.Marshal(apps["token_exchange"])
	var app App
	if err := json.Unmarshal(raw, &app); err != nil {
		t.Fatal(err)
	}
	if app.Issuer != "https://gateway.example.internal" || app.SigningAlg != "ES256" ||
		app.SigningKeyFile != "/etc/caddy/sts.pem" || app.Actor != "https://gateway.example.internal" ||
		time.Duration(app.TokenLifetime) != 5*time.Minute || time.Duration(app.ClockSkew) != 30*time.Second ||
		time.Duration(app.KeyRotation) != 720*time.Hour {
		t.Fatalf("app = %+v", app)
	}
	wantTrust := []TrustedIssuer{{
		Issuer:     "https://idp.example.com",
		JWKSURL:    "https://idp.example.com/.well-known/jwks.json",
		Audiences:  []string{"https://gateway.example.internal"},
		Algorithms: []string{"RS256", "ES256"},
		TokenTypes: []string{"access_token", "jwt"},
		ScopeMap:   map[string][]string{"read:calendar": {"calendar.events.read"}},
	}}
	if !reflect.DeepEqual(app.Trust, wantTrust) {
		t.Fatalf("trust = %+v", app.Trust)
	}
	if len(app.Clients) != 1 || app.Clients[0].ClientID != "billing-svc" ||
		!strings.HasPrefix(app.Clients[0].SecretHash, "$2a$14$") ||
		!reflect.DeepEqual(app.Clients[0].Audiences, []string{"https://billing.internal"}) ||
		!reflect.DeepEqual(app.Clients[0].Scopes, []string{"billing.read"}) {
		t.Fatalf("clients = %+v", app.Clients)
	}

	out, _ := json.Marshal(cfg)
	for _, want := range []string{
		`"handler":"token_exchange"`,
		`"audiences":["https://orders.internal"]`,
		`"scopes":["orders.read","orders.write"]`,
		`"require_scopes":["orders.read"]`,
		`"claims":["email","groups"]`,
		`"mode":"delegation"`,
		`"handler":"token_exchange_jwks"`,
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("adapted config lacks %s", want)
		}
	}
	// token_exchange runs before reverse_proxy within the route.
	s := string(out)
	if strings.Index(s, `"handler":"token_exchange"`) > strings.Index(s, `"handler":"reverse_proxy"`) {
		t.Error("token_exchange is ordered after reverse_proxy")
	}
}

func TestAdaptHandlerWithoutOrderOption(t *testing.T) {
	// The plugin registers its own order: no `order` line is needed.
	cfg, err := adapt(t, `{
	token_exchange {
		issuer https://gw
		trust https://idp { 
			jwks_file /dev/null
			audience https://gw
			algorithms ES256
		}
	}
}
:8080 {
	reverse_proxy 127.0.0.1:9
	token_exchange https://api.internal
}`)
	if err != nil {
		t.Fatal(err)
	}
	s, _ := json.Marshal(cfg)
	if i, j := strings.Index(string(s), `"handler":"token_exchange"`), strings.Index(string(s), `"handler":"reverse_proxy"`); i < 0 || i > j {
		t.Fatalf("token_exchange not ordered before reverse_proxy: %s", s)
	}
}

func TestAdaptErrors(t *testing.T) {
	global := func(body string) string {
		return "{\n\ttoken_exchange {\n" + body + "\n\t}\n}\n:8080 {\n\trespond ok\n}\n"
	}
	trust := func(body string) string {
		return global("\t\tissuer https://gw\n\t\ttrust https://idp {\n" + body + "\n\t\t}")
	}
	// a trust block taking opaque tokens, but for the client's credentials
	const opaqueBase = "\t\t\tdiscovery\n\t\t\taudience a\n\t\t\talgorithms RS256\n\t\t\topaque_tokens\n\t\t\tintrospection_client_id gw\n"
	handler := func(body string) string {
		return "{\n\ttoken_exchange {\n\t\tissuer https://gw\n\t}\n}\n:8080 {\n\ttoken_exchange {\n" + body + "\n\t}\n}\n"
	}
	cases := []struct {
		name, input, want string
	}{
		{"missing issuer", global("\t\tsigning_alg ES256"), "issuer is required"},
		{"unknown option", global("\t\tissuer https://gw\n\t\tfrobnicate on"), "unrecognized token_exchange option 'frobnicate'"},
		{"unknown signing alg", global("\t\tissuer https://gw\n\t\tsigning_alg HS256"), "signing algorithm"},
		{"bad duration", global("\t\tissuer https://gw\n\t\ttoken_lifetime soon"), "invalid duration"},
		{"HMAC algorithm", trust("\t\t\tjwks_file x\n\t\t\taudience a\n\t\t\talgorithms RS256 HS256"), "HMAC"},
		{"none algorithm", trust("\t\t\tjwks_file x\n\t\t\taudience a\n\t\t\talgorithms none"), "unsigned"},
		{"no algorithms", trust("\t\t\tjwks_file x\n\t\t\taudience a"), "algorithms is required"},
		{"no audience", trust("\t\t\tjwks_file x\n\t\t\talgorithms RS256"), "audience is required"},
		{"no key source", trust("\t\t\taudience a\n\t\t\talgorithms RS256"), "exactly one of jwks_url, jwks_file or discovery"},
		{"two key sources", trust("\t\t\tjwks_url https://idp/jwks\n\t\t\tdiscovery\n\t\t\taudience a\n\t\t\talgorithms RS256"), "exactly one of jwks_url, jwks_file or discovery"},
		{"discovery_url and jwks_file", trust("\t\t\tjwks_file x\n\t\t\tdiscovery_url https://idp/meta\n\t\t\taudience a\n\t\t\talgorithms RS256"), "exactly one of jwks_url, jwks_file or discovery"},
		{"discovery with an argument", trust("\t\t\tdiscovery https://idp\n\t\t\taudience a\n\t\t\talgorithms RS256"), "wrong argument count"},
		{"introspection without opaque_tokens", trust("\t\t\tjwks_file x\n\t\t\taudience a\n\t\t\talgorithms RS256\n\t\t\tintrospection_url https://idp/introspect"), "introspection settings need opaque_tokens"},
		{"opaque_tokens without endpoint", trust("\t\t\tjwks_file x\n\t\t\taudience a\n\t\t\talgorithms RS256\n\t\t\topaque_tokens\n\t\t\tintrospection_client_id gw\n\t\t\tintrospection_client_secret {env.S}"), "opaque_tokens needs introspection_url or discovery"},
		{"opaque_tokens without credentials", trust("\t\t\tdiscovery\n\t\t\taudience a\n\t\t\talgorithms RS256\n\t\t\topaque_tokens"), "needs introspection_client_id and introspection_client_secret"},
		{"bad introspection_auth", trust("\t\t\tdiscovery\n\t\t\tintrospection_auth tls_client_auth"), "introspection_auth must be"},
		{"private_key_jwt without a key file", trust(opaqueBase + "\t\t\tintrospection_auth private_key_jwt"), "needs introspection_client_id and introspection_key_file"},
		{"private_key_jwt with a secret", trust(opaqueBase + "\t\t\tintrospection_auth private_key_jwt\n\t\t\tintrospection_key_file gw.jwk\n\t\t\tintrospection_client_secret s"), "no introspection_client_secret"},
		{"key file with a secret method", trust(opaqueBase + "\t\t\tintrospection_client_secret s\n\t\t\tintrospection_key_file gw.jwk"), "introspection_key_file is used only with introspection_auth private_key_jwt"},
		{"introspection_jwt_response with an argument", trust(opaqueBase + "\t\t\tintrospection_client_secret s\n\t\t\tintrospection_jwt_response yes"), "wrong argument count"},
		{"introspection_jwt_response without opaque_tokens", trust("\t\t\tdiscovery\n\t\t\taudience a\n\t\t\talgorithms RS256\n\t\t\tintrospection_jwt_response"), "introspection settings need opaque_tokens"},
		{"two opaque_tokens blocks", global("\t\tissuer https://gw\n\t\ttrust https://a {\n\t\t\tdiscovery\n\t\t\taudience a\n\t\t\talgorithms RS256\n\t\t\topaque_tokens\n\t\t\tintrospection_client_id gw\n\t\t\tintrospection_client_secret s\n\t\t}\n\t\ttrust https://b {\n\t\t\tdiscovery\n\t\t\taudience a\n\t\t\talgorithms RS256\n\t\t\topaque_tokens\n\t\t\tintrospection_client_id gw\n\t\t\tintrospection_client_secret s\n\t\t}"), "at most one trust block"},
		{"id_token_claims none and a claim", trust("\t\t\tdiscovery\n\t\t\tid_token_claims none nonce"), "id_token_claims none cannot be combined"},
		{"unknown trust option", trust("\t\t\tjwks_file x\n\t\t\tcolour blue"), "unrecognized trust option 'colour'"},
		{"unknown token type", trust("\t\t\tjwks_file x\n\t\t\ttoken_types cookie"), "unknown token type"},
		{"unknown subdirective", handler("\t\taudience a\n\t\tscopes x"), "unrecognized token_exchange subdirective 'scopes'"},
		{"no audience on route", handler("\t\tscope a"), "at least one audience"},
		{"registered claim", handler("\t\taudience a\n\t\tclaims email sub"), "'sub' is set by the gateway"},
		{"require outside scope", handler("\t\taudience a\n\t\tscope a\n\t\trequire_scope b"), "require_scope 'b'"},
		{"bad mode", handler("\t\taudience a\n\t\tmode sudo"), "mode must be"},
		{"dpop without a mode", handler("\t\taudience a\n\t\tdpop"), "wrong argument count"},
		{"dpop bad mode", handler("\t\taudience a\n\t\tdpop on"), "dpop must be optional or required, not 'on'"},
		{"dpop HMAC", handler("\t\taudience a\n\t\tdpop required {\n\t\t\talgorithms ES256 HS256\n\t\t}"), "HMAC"},
		{"dpop none", handler("\t\taudience a\n\t\tdpop required {\n\t\t\talgorithms none\n\t\t}"), "unsigned"},
		{"dpop unknown option", handler("\t\taudience a\n\t\tdpop optional {\n\t\t\tlifetime 1m\n\t\t}"), "unrecognized dpop option 'lifetime'"},
		{"dpop public_origin with a path", handler("\t\taudience a\n\t\tdpop optional {\n\t\t\tpublic_origin https://api.example.com/v1\n\t\t}"), "must be scheme://host"},
		{"dpop zero max_age", handler("\t\taudience a\n\t\tdpop optional {\n\t\t\tmax_age 0s\n\t\t}"), "max_age must be positive"},
		{"allow_unbinding with an argument", global("\t\tissuer https://gw\n\t\tclient c {\n\t\t\tallow_unbinding yes\n\t\t}"), "wrong argument count"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := adapt(t, tc.input)
			if err == nil {
				t.Fatal("adapted without error")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q, want it to contain %q", err, tc.want)
			}
			if !strings.Contains(err.Error(), "Caddyfile:") {
				t.Fatalf("error %q does not name the Caddyfile line", err)
			}
		})
	}
}

func TestUnmarshalHandlerDirective(t *testing.T) {
	d := caddyfile.NewTestDispenser(`token_exchange https://a.internal {
		audience https://b.internal
		scope x y
		require_scope x
		claims email
		realm api
	}`)
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	want := Handler{Audiences: []string{"https://a.internal", "https://b.internal"}, Scopes: []string{"x", "y"},
		RequireScopes: []string{"x"}, Claims: []string{"email"}, Realm: "api"}
	if !reflect.DeepEqual(h, want) {
		t.Fatalf("got %+v", h)
	}
}

func TestUnmarshalDPoP(t *testing.T) {
	d := caddyfile.NewTestDispenser(`token_exchange {
		audience https://a.internal
		dpop required {
			algorithms ES256 EdDSA
			max_age 30s
			nonce
			public_origin https://api.example.com https://api.example.net:8443
		}
	}`)
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	if h.DPoP == nil || h.DPoP.Mode != "required" || !reflect.DeepEqual(h.DPoP.Algorithms, []string{"ES256", "EdDSA"}) ||
		time.Duration(h.DPoP.MaxAge) != 30*time.Second || !h.DPoP.Nonce ||
		!reflect.DeepEqual(h.DPoP.PublicOrigins, []string{"https://api.example.com", "https://api.example.net:8443"}) {
		t.Fatalf("got %+v", h.DPoP)
	}
	d = caddyfile.NewTestDispenser(`token_exchange_endpoint {
		dpop optional {
			public_origin https://api.example.com
		}
	}`)
	var e EndpointHandler
	if err := e.UnmarshalCaddyfile(d); err == nil || !strings.Contains(err.Error(), "no meaning at the token endpoint") {
		t.Fatalf("public_origin at the endpoint: %v", err)
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
