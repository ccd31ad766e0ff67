package exchange

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// RFC 9701: JWT introspection responses, signed by the issuer's real key,
// verified with the trust block's key source; anything that does not
// verify is a failed dependency (503), never a pass.
func TestIntrospectionJWTResponse(t *testing.T) {
	idp := introIdP(t)
	idp.AddKey("rsa-1", "RS256")       // published, but not on the ES256 allow-list
	idp.AddHiddenKey("rogue", "ES256") // not in the JWKS
	ic := introIssuer(idp)
	ic.Introspection.JWTResponse = true
	ts := newTestTrust(t, ic)
	ctx := context.Background()
	idp.Introspection.SetJWTResponse(testidp.JWTResponse{Key: "ec-1"})

	s, err := ts.Verify(ctx, idp.Opaque(testidp.Claims{"scope": "a b", "email": "alice@example.com"}), VerifyOptions{})
	if err != nil {
		t.Fatalf("a verified JWT response: %v", err)
	}
	if s.Subject != "alice" || strings.Join(s.Scopes, " ") != "a b" || s.ClientID != "web-app" {
		t.Fatalf("subject %+v", s)
	}
	if v, _ := s.Claim("email"); v != "alice@example.com" {
		t.Fatalf("email %v: the token_introspection members feed the policy", v)
	}
	idp.Introspection.Mu().Lock()
	accept := idp.Introspection.Accepts[0]
	idp.Introspection.Mu().Unlock()
	if accept != IntrospectionJWTMediaType {
		t.Fatalf("Accept %q, want %s", accept, IntrospectionJWTMediaType)
	}
	// a verified JWT saying inactive: the token's fault (401)
	_, err = ts.Verify(ctx, "opq_unknown_to_the_idp", VerifyOptions{})
	wantKind(t, err, KindInvalidToken, "inactive")

	now := time.Now()
	for name, jr := range map[string]testidp.JWTResponse{
		"signed by a key not in the JWKS": {Key: "rogue"},
		"forged signature (kid ec-1)":     {Key: "ec-1", ForgeWith: "rogue"},
		"algorithm not allowed (RS256)":   {Key: "rsa-1"},
		"typ JWT":                         {Key: "ec-1", Typ: "JWT"},
		"typ at+jwt":                      {Key: "ec-1", Typ: "at+jwt"},
		"iss of another issuer":           {Key: "ec-1", Override: testidp.Claims{"iss": "https://evil.example"}},
		"no iss":                          {Key: "ec-1", Override: testidp.Claims{"iss": nil}},
		"aud another client":              {Key: "ec-1", Override: testidp.Claims{"aud": "someone-else"}},
		"no aud":                          {Key: "ec-1", Override: testidp.Claims{"aud": nil}},
		"stale iat":                       {Key: "ec-1", Override: testidp.Claims{"iat": now.Add(-10 * time.Minute).Unix()}},
		"future iat":                      {Key: "ec-1", Override: testidp.Claims{"iat": now.Add(10 * time.Minute).Unix()}},
		"no iat":                          {Key: "ec-1", Override: testidp.Claims{"iat": nil}},
		"expired exp":                     {Key: "ec-1", Override: testidp.Claims{"exp": now.Add(-10 * time.Minute).Unix()}},
		"no token_introspection":          {Key: "ec-1", Override: testidp.Claims{"token_introspection": nil}},
		"token_introspection a string":    {Key: "ec-1", Override: testidp.Claims{"token_introspection": `{"active":true}`}},
		"active claims at the top level": {Key: "ec-1", Override: testidp.Claims{"token_introspection": nil,
			"active": true, "sub": "alice", "aud": []string{"gateway", "https://gateway.test"}}},
	} {
		t.Run(name, func(t *testing.T) {
			idp.Introspection.SetJWTResponse(jr)
			calls := idp.Introspection.Calls.Load()
			_, err := ts.Verify(ctx, idp.Opaque(testidp.Claims{"scope": "a"}), VerifyOptions{})
			wantKind(t, err, KindUnavailable, "introspection_bad_jwt")
			if AsError(err).RetryAfter <= 0 {
				t.Error("no Retry-After")
			}
			if idp.Introspection.Calls.Load() != calls+1 {
				t.Fatal("the IdP was not asked")
			}
		})
	}

	// introspection_jwt_response set: a plain JSON answer is a failed call
	idp.Introspection.SetJWTResponse(testidp.JWTResponse{})
	_, err = ts.Verify(ctx, idp.Opaque(nil), VerifyOptions{})
	wantKind(t, err, KindUnavailable, "introspection_failed")
}

// Without introspection_jwt_response the gateway asks for JSON, and a JWT
// response the issuer sends anyway is verified all the same.
func TestIntrospectionJWTResponseUnasked(t *testing.T) {
	idp := introIdP(t)
	idp.AddHiddenKey("rogue", "ES256")
	ts := newTestTrust(t, introIssuer(idp))
	ctx := context.Background()
	idp.Introspection.SetJWTResponse(testidp.JWTResponse{Key: "ec-1", Always: true})
	if _, err := ts.Verify(ctx, idp.Opaque(nil), VerifyOptions{}); err != nil {
		t.Fatalf("an unasked but valid JWT response: %v", err)
	}
	idp.Introspection.Mu().Lock()
	accept := idp.Introspection.Accepts[0]
	idp.Introspection.Mu().Unlock()
	if accept != "application/json" {
		t.Fatalf("Accept %q without introspection_jwt_response", accept)
	}
	idp.Introspection.SetJWTResponse(testidp.JWTResponse{Key: "rogue", Always: true})
	_, err := ts.Verify(ctx, idp.Opaque(nil), VerifyOptions{})
	wantKind(t, err, KindUnavailable, "introspection_bad_jwt")
}

// writeClientKey writes a private key for alg to a file (a JWK with kid, or
// PKCS#8 PEM) and returns its path and public JWKS as the IdP registers it.
func writeClientKey(t testing.TB, alg string, asPEM bool) (string, jwk.Set) {
	t.Helper()
	priv := testidp.GenerateKey(t, alg)
	path := filepath.Join(t.TempDir(), "gateway-key")
	pub, err := jwk.Import(priv.Public())
	if err != nil {
		t.Fatal(err)
	}
	sigAlg, _ := jwa.LookupSignatureAlgorithm(alg)
	_ = pub.Set(jwk.AlgorithmKey, sigAlg)
	var data []byte
	if asPEM {
		der, err := x509.MarshalPKCS8PrivateKey(priv)
		if err != nil {
			t.Fatal(err)
		}
		data = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
		tp, _ := thumbprint(pub)
		_ = pub.Set(jwk.KeyIDKey, tp)
	} else {
		k, err := jwk.Import(priv)
		if err != nil {
			t.Fatal(err)
		}
		_ = k.Set(jwk.KeyIDKey, "gw-1")
		_ = pub.Set(jwk.KeyIDKey, "gw-1")
		if data, err = json.Marshal(k); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	set := jwk.NewSet()
	_ = set.AddKey(pub)
	return path, set
}

// private_key_jwt towards the IdP: the test IdP verifies each RFC 7523
// assertion with jwx (signature by the registered key, iss = sub =
// client_id, aud = the introspection URL, exp, iat, a jti never seen).
func TestIntrospectionPrivateKeyJWT(t *testing.T) {
	for _, tc := range []struct {
		alg   string
		asPEM bool
	}{{"ES256", false}, {"RS256", true}, {"EdDSA", false}} {
		t.Run(tc.alg, func(t *testing.T) {
			idp := introIdP(t)
			path, pub := writeClientKey(t, tc.alg, tc.asPEM)
			idp.Introspection.ClientKeys = pub
			ic := introIssuer(idp)
			ic.Introspection.ClientSecret = ""
			ic.Introspection.AuthMethod = "private_key_jwt"
			ic.Introspection.KeyFile = path
			ts := newTestTrust(t, ic)
			for i := 0; i < 3; i++ { // three calls: three distinct jti, or the IdP refuses
				if _, err := ts.Verify(context.Background(), idp.Opaque(nil), VerifyOptions{}); err != nil {
					t.Fatalf("call %d: %v", i, err)
				}
			}
			idp.Introspection.Mu().Lock()
			methods := strings.Join(idp.Introspection.Methods, " ")
			idp.Introspection.Mu().Unlock()
			if methods != "private_key_jwt private_key_jwt private_key_jwt" {
				t.Fatalf("client authentication %q", methods)
			}
		})
	}
	t.Run("a key the IdP does not know", func(t *testing.T) {
		idp := introIdP(t)
		_, registered := writeClientKey(t, "ES256", false)
		path, _ := writeClientKey(t, "ES256", false) // same kid, another key
		idp.Introspection.ClientKeys = registered
		ic := introIssuer(idp)
		ic.Introspection.ClientSecret = ""
		ic.Introspection.AuthMethod = "private_key_jwt"
		ic.Introspection.KeyFile = path
		ts := newTestTrust(t, ic)
		_, err := ts.Verify(context.Background(), idp.Opaque(nil), VerifyOptions{})
		wantKind(t, err, KindUnavailable, "introspection_failed")
	})
}

func TestIntrospectionPrivateKeyJWTConfigErrors(t *testing.T) {
	idp := introIdP(t)
	path, _ := writeClientKey(t, "ES256", false)
	pubOnly := filepath.Join(t.TempDir(), "pub.jwk")
	k, _ := jwk.Import(testidp.GenerateKey(t, "ES256").Public())
	b, _ := json.Marshal(k)
	_ = os.WriteFile(pubOnly, b, 0o600)
	garbage := filepath.Join(t.TempDir(), "garbage")
	_ = os.WriteFile(garbage, []byte("not a key"), 0o600)
	pkj := func(file, secret string) IssuerConfig {
		ic := introIssuer(idp)
		ic.Introspection.AuthMethod, ic.Introspection.KeyFile, ic.Introspection.ClientSecret = "private_key_jwt", file, secret
		return ic
	}
	keyWithSecret := introIssuer(idp)
	keyWithSecret.Introspection.KeyFile = path
	for name, tc := range map[string]struct {
		ic   IssuerConfig
		want string
	}{
		"no key file":                 {pkj("", ""), "needs introspection_client_id and introspection_key_file"},
		"key file and secret":         {pkj(path, "s3cret"), "no introspection_client_secret"},
		"missing key file":            {pkj(filepath.Join(t.TempDir(), "nope"), ""), "introspection_key_file"},
		"public key only":             {pkj(pubOnly, ""), "not a private key"},
		"not a key":                   {pkj(garbage, ""), "not a private JWK or PEM key"},
		"key file with a secret auth": {keyWithSecret, "only with introspection_auth private_key_jwt"},
	} {
		t.Run(name, func(t *testing.T) {
			ts, err := NewTrustStore(context.Background(), TrustConfig{Issuers: []IssuerConfig{tc.ic}})
			if err == nil {
				_ = ts.Close()
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q, want %q", err, tc.want)
			}
		})
	}
}

// A JWE is opaque to the gateway: with an opaque_tokens issuer it is
// introspected (zitadel/oidc encrypts its opaque access tokens to itself),
// without one it is refused as before.
func TestIntrospectionJWEShapedToken(t *testing.T) {
	idp := introIdP(t)
	ts := newTestTrust(t, introIssuer(idp))
	jwe := idp.OpaqueAs("eyJhbGciOiJBMjU2R0NNS1ciLCJlbmMiOiJBMjU2R0NNIn0.a2V5.aXY.Y2lwaGVy.dGFn", testidp.Claims{"scope": "a"})
	s, err := ts.Verify(context.Background(), jwe, VerifyOptions{})
	if err != nil || s.Subject != "alice" {
		t.Fatalf("a JWE-shaped opaque token: %v", err)
	}
	if n := idp.Introspection.Calls.Load(); n != 1 {
		t.Fatalf("%d introspection calls", n)
	}
	plain := newTestTrust(t, issuerConfig(idp, "ES256"))
	_, err = plain.Verify(context.Background(), jwe, VerifyOptions{})
	wantKind(t, err, KindInvalidToken, "malformed")
}

// Cold introspection cost with an RFC 9701 response (ES256 verify on top of
// the call) and with private_key_jwt (ES256 assertion signed per call; the
// test IdP verifies it).
func BenchmarkIntrospectionSigned(b *testing.B) {
	ctx := context.Background()
	run := func(b *testing.B, idp *testidp.Issuer, ts *TrustStore) {
		toks := make([]string, b.N)
		for i := range toks {
			toks[i] = idp.Opaque(testidp.Claims{"scope": "a"})
		}
		b.ReportAllocs()
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if _, err := ts.Verify(ctx, toks[i], VerifyOptions{}); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("cold-jwt-response", func(b *testing.B) {
		idp := introIdP(b)
		idp.Introspection.SetJWTResponse(testidp.JWTResponse{Key: "ec-1"})
		ic := introIssuer(idp)
		ic.Introspection.JWTResponse = true
		run(b, idp, newTestTrust(b, ic))
	})
	b.Run("cold-private_key_jwt", func(b *testing.B) {
		idp := introIdP(b)
		path, pub := writeClientKey(b, "ES256", false)
		idp.Introspection.ClientKeys = pub
		ic := introIssuer(idp)
		ic.Introspection.ClientSecret, ic.Introspection.AuthMethod, ic.Introspection.KeyFile = "", "private_key_jwt", path
		run(b, idp, newTestTrust(b, ic))
	})
}
