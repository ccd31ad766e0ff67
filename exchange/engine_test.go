package exchange

import (
	"context"
	"crypto"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/lestrrat-go/jwx/v3/jwk"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

type engineFixture struct {
	idp    *testidp.Issuer
	kid    string
	engine *Engine
	signer *Signer
}

func newEngineFixture(t testing.TB, signingAlg string) *engineFixture {
	t.Helper()
	idp := newTestIssuer(t, "https://idp.test")
	kid := idp.AddKey("k", "ES256")
	ts := newTestTrust(t, issuerConfig(idp, "ES256"))
	key, err := GenerateSigningKey(signingAlg)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := NewSigner(key, signingAlg)
	if err != nil {
		t.Fatal(err)
	}
	engine, err := NewEngine(EngineConfig{Issuer: "https://gateway.test", TokenLifetime: 5 * time.Minute}, ts, signer)
	if err != nil {
		t.Fatal(err)
	}
	return &engineFixture{idp: idp, kid: kid, engine: engine, signer: signer}
}

func TestExchangeMintsDelegatedToken(t *testing.T) {
	for _, alg := range SigningAlgorithms {
		t.Run(alg, func(t *testing.T) {
			f := newEngineFixture(t, alg)
			inbound := f.idp.Token(f.kid, claims{
				"scope": "orders.read profile", "client_id": "web-app", "email": "alice@example.com",
				"act": map[string]any{"sub": "upstream-service"},
			})
			grant := &Grant{
				Audiences: []string{"https://orders.internal"},
				Scopes:    []string{"orders.read", "orders.write"},
				Claims:    []string{"email", "missing"},
			}
			m, err := f.engine.ExchangeBearer(context.Background(), inbound, grant, nil)
			if err != nil {
				t.Fatal(err)
			}
			c, hdr := parseMinted(t, f.signer, m.Token)
			if typ, _ := hdr.Type(); typ != "at+jwt" {
				t.Fatalf("typ = %q", typ)
			}
			if kid, _ := hdr.KeyID(); kid != f.signer.KeyID() || kid == "" {
				t.Fatalf("kid = %q, want %q", kid, f.signer.KeyID())
			}
			if a, _ := hdr.Algorithm(); a.String() != alg {
				t.Fatalf("alg = %v, want %s", a, alg)
			}
			want := map[string]any{
				"iss": "https://gateway.test", "sub": "alice", "scope": "orders.read",
				"client_id": "web-app", "email": "alice@example.com",
				"act": map[string]any{"sub": "https://gateway.test", "act": map[string]any{"sub": "upstream-service"}},
			}
			for k, v := range want {
				if !reflect.DeepEqual(c[k], v) {
					t.Errorf("claim %s = %#v, want %#v", k, c[k], v)
				}
			}
			if aud, _ := c["aud"].([]any); len(aud) != 1 || aud[0] != "https://orders.internal" {
				t.Errorf("aud = %#v", c["aud"])
			}
			for _, k := range []string{"exp", "iat", "nbf", "jti"} {
				if _, ok := c[k]; !ok {
					t.Errorf("claim %s missing", k)
				}
			}
			if _, ok := c["missing"]; ok {
				t.Error("a claim the subject lacks was invented")
			}
			if exp := int64(c["exp"].(float64)); exp-int64(c["iat"].(float64)) != 300 {
				t.Errorf("lifetime = %ds, want 300", exp-int64(c["iat"].(float64)))
			}
		})
	}
}

func TestExchangeExpiryNeverPastSubject(t *testing.T) {
	f := newEngineFixture(t, "ES256")
	subjectExp := time.Now().Add(90 * time.Second).Truncate(time.Second)
	m, err := f.engine.ExchangeBearer(context.Background(), f.idp.Token(f.kid, claims{"exp": subjectExp.Unix()}), &Grant{Audiences: []string{"x"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !m.Expiry.Equal(subjectExp) {
		t.Fatalf("minted exp %v, want the subject's %v", m.Expiry, subjectExp)
	}
}

func TestExchangeJTIsAreUnique(t *testing.T) {
	f := newEngineFixture(t, "EdDSA")
	tok := f.idp.Token(f.kid, nil)
	seen := map[string]bool{}
	subject, err := f.engine.Verify(context.Background(), tok, "access_token")
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 100; i++ {
		// Exchange mints every time (ExchangeBearer would serve the cache).
		m, err := f.engine.Exchange(ExchangeInput{Subject: subject, Actor: f.engine.Actor()}, &Grant{Audiences: []string{"x"}})
		if err != nil {
			t.Fatal(err)
		}
		if seen[m.JTI] {
			t.Fatalf("jti %s repeated", m.JTI)
		}
		seen[m.JTI] = true
	}
}

func TestExchangeScopePolicy(t *testing.T) {
	f := newEngineFixture(t, "ES256")
	cases := []struct {
		name         string
		subjectScope any // nil: no scope claim
		route        []string
		require      []string
		want         string
		wantKind     Kind
	}{
		{"intersection", "a b c", []string{"b", "c", "d"}, nil, "b c", 0},
		{"never widens", "a", []string{"a", "admin"}, nil, "a", 0},
		{"no scope claim gets none", nil, []string{"a"}, nil, "", 0},
		{"required present", "a b", []string{"a", "b"}, []string{"a"}, "a b", 0},
		{"required missing", "b", []string{"a", "b"}, []string{"a"}, "", KindInsufficientScope},
		{"required with no scope claim", nil, []string{"a"}, []string{"a"}, "", KindInsufficientScope},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := claims{}
			if tc.subjectScope != nil {
				c["scope"] = tc.subjectScope
			}
			m, err := f.engine.ExchangeBearer(context.Background(), f.idp.Token(f.kid, c),
				&Grant{Audiences: []string{"x"}, Scopes: tc.route, RequireScopes: tc.require}, nil)
			if tc.wantKind != 0 {
				if e := AsError(err); e.Kind != tc.wantKind {
					t.Fatalf("err = %v, want kind %d", err, tc.wantKind)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := FormatScope(m.Scopes); got != tc.want {
				t.Fatalf("scopes = %q, want %q", got, tc.want)
			}
			claims, _ := parseMinted(t, f.signer, m.Token)
			if got, _ := claims["scope"].(string); got != tc.want {
				t.Fatalf("minted scope = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestExchangeMayAct(t *testing.T) {
	f := newEngineFixture(t, "ES256")
	cases := []struct {
		name   string
		mayAct any
		ok     bool
	}{
		{"names the gateway", map[string]any{"sub": "https://gateway.test"}, true},
		{"names the gateway with iss", map[string]any{"sub": "https://gateway.test", "iss": "https://gateway.test"}, true},
		{"names another actor", map[string]any{"sub": "https://other.test"}, false},
		{"right sub, wrong iss", map[string]any{"sub": "https://gateway.test", "iss": "https://idp.test"}, false},
		{"only iss", map[string]any{"iss": "https://gateway.test"}, false},
		{"empty", map[string]any{}, false},
		{"not an object", "https://gateway.test", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := f.engine.ExchangeBearer(context.Background(), f.idp.Token(f.kid, claims{"may_act": tc.mayAct}), &Grant{Audiences: []string{"x"}}, nil)
			if tc.ok && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !tc.ok {
				if e := AsError(err); e.Kind != KindDenied || e.Reason != "may_act" {
					t.Fatalf("err = %v, want a may_act denial", err)
				}
			}
		})
	}
}

func TestExchangeClientIDFallsBackToTheGateway(t *testing.T) {
	f := newEngineFixture(t, "ES256")
	m, err := f.engine.ExchangeBearer(context.Background(), f.idp.Token(f.kid, nil), &Grant{Audiences: []string{"x"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := parseMinted(t, f.signer, m.Token)
	if c["client_id"] != "https://gateway.test" {
		t.Fatalf("client_id = %v, want the gateway's actor", c["client_id"])
	}
	m, err = f.engine.ExchangeBearer(context.Background(), f.idp.Token(f.kid, claims{"azp": "spa"}), &Grant{Audiences: []string{"x"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c, _ := parseMinted(t, f.signer, m.Token); c["client_id"] != "spa" {
		t.Fatalf("client_id = %v, want the subject's azp", c["client_id"])
	}
}

func TestExchangeImpersonationHasNoAct(t *testing.T) {
	f := newEngineFixture(t, "ES256")
	m, err := f.engine.ExchangeBearer(context.Background(), f.idp.Token(f.kid, nil), &Grant{Audiences: []string{"x"}, Impersonate: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := parseMinted(t, f.signer, m.Token)
	if _, ok := c["act"]; ok {
		t.Fatal("impersonation minted an act claim")
	}
}

// TestExchangeRefusesImpersonatingADelegatedToken: impersonation would
// launder the subject's act chain into a clean user token (issue 9 §3).
func TestExchangeRefusesImpersonatingADelegatedToken(t *testing.T) {
	f := newEngineFixture(t, "ES256")
	tok := f.idp.Token(f.kid, claims{"act": map[string]any{"sub": "frontend"}})
	_, err := f.engine.ExchangeBearer(context.Background(), tok, &Grant{Audiences: []string{"x"}, Impersonate: true}, nil)
	if e := AsError(err); e.Kind != KindDenied || e.Reason != "impersonate_delegated" {
		t.Fatalf("err = %v, want denied impersonate_delegated", err)
	}
	// Delegation keeps the chain and still works.
	m, err := f.engine.ExchangeBearer(context.Background(), tok, &Grant{Audiences: []string{"x"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if inner, _ := m.ActChain["act"].(map[string]any); inner["sub"] != "frontend" {
		t.Fatalf("act chain %v lost the prior actor", m.ActChain)
	}
}

func TestExchangeMissingToken(t *testing.T) {
	f := newEngineFixture(t, "ES256")
	_, err := f.engine.ExchangeBearer(context.Background(), "", &Grant{Audiences: []string{"x"}}, nil)
	if e := AsError(err); e.Kind != KindMissingToken {
		t.Fatalf("err = %v", err)
	}
}

func TestGrantValidate(t *testing.T) {
	for name, g := range map[string]Grant{
		"no audience":            {},
		"registered claim":       {Audiences: []string{"a"}, Claims: []string{"sub"}},
		"require outside scopes": {Audiences: []string{"a"}, Scopes: []string{"x"}, RequireScopes: []string{"y"}},
	} {
		if err := g.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	ok := Grant{Audiences: []string{"a"}, Scopes: []string{"x"}, RequireScopes: []string{"x"}, Claims: []string{"email"}}
	if err := ok.Validate(); err != nil {
		t.Errorf("valid grant refused: %v", err)
	}
}

func TestSignerPersistsInStorage(t *testing.T) {
	storage := &certmagic.FileStorage{Path: t.TempDir()}
	ctx := context.Background()
	first, err := LoadOrCreateSigner(ctx, storage, "ES256")
	if err != nil {
		t.Fatal(err)
	}
	second, err := LoadOrCreateSigner(ctx, storage, "ES256")
	if err != nil {
		t.Fatal(err)
	}
	if first.KeyID() != second.KeyID() || string(first.JWKS()) != string(second.JWKS()) {
		t.Fatal("a second load from the same storage made a different key")
	}
	other, err := LoadOrCreateSigner(ctx, &certmagic.FileStorage{Path: t.TempDir()}, "ES256")
	if err != nil {
		t.Fatal(err)
	}
	if other.KeyID() == first.KeyID() {
		t.Fatal("two storages share a key")
	}
	if _, err := storage.Load(ctx, signingKeyStorageKey("ES256")); errors.Is(err, fs.ErrNotExist) {
		t.Fatal("key was not stored")
	}
}

func TestSignerFromFile(t *testing.T) {
	dir := t.TempDir()
	key, err := GenerateSigningKey("RS256")
	if err != nil {
		t.Fatal(err)
	}
	jwkPath := filepath.Join(dir, "key.jwk")
	b, _ := json.Marshal(key)
	if err := os.WriteFile(jwkPath, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := SignerFromFile(jwkPath, "RS256"); err != nil {
		t.Fatalf("JWK file: %v", err)
	}
	if _, err := SignerFromFile(jwkPath, "ES256"); err == nil || !strings.Contains(err.Error(), "does not fit") {
		t.Fatalf("an RSA key was accepted for ES256: %v", err)
	}
	pemBytes, err := jwk.EncodePEM(key)
	if err != nil {
		t.Fatal(err)
	}
	pemPath := filepath.Join(dir, "key.pem")
	if err := os.WriteFile(pemPath, pemBytes, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := SignerFromFile(pemPath, "PS256")
	if err != nil {
		t.Fatalf("PEM file: %v", err)
	}
	if s.Algorithm() != "PS256" || s.KeyID() == "" {
		t.Fatalf("signer %s kid %q", s.Algorithm(), s.KeyID())
	}
	pub, _ := s.PublicKeys().Key(0)
	var raw any
	if err := jwk.Export(pub, &raw); err != nil {
		t.Fatal(err)
	}
	if _, isPrivate := raw.(crypto.Signer); isPrivate {
		t.Fatal("the public JWKS holds a private key")
	}
}
