package exchange

import (
	"context"
	"crypto"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

func TestVerifyAcceptsEachAlgorithm(t *testing.T) {
	for _, alg := range []string{"RS256", "PS256", "ES256", "ES384", "EdDSA"} {
		t.Run(alg, func(t *testing.T) {
			idp := newTestIssuer(t, "https://idp.test")
			kid := idp.AddKey("k-"+alg, alg)
			ts := newTestTrust(t, issuerConfig(idp, alg))
			s, err := ts.Verify(context.Background(), idp.Token(kid, claims{"scope": "a b", "client_id": "web"}), VerifyOptions{})
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if s.Subject != "alice" || s.Issuer != "https://idp.test" || s.ClientID != "web" || s.KeyID != kid {
				t.Fatalf("unexpected subject %+v", s)
			}
			if got := FormatScope(s.Scopes); got != "a b" {
				t.Fatalf("scopes = %q", got)
			}
			if len(s.TokenHash) != 64 {
				t.Fatalf("token hash %q is not hex SHA-256", s.TokenHash)
			}
		})
	}
}

func TestVerifyRefuses(t *testing.T) {
	idp := newTestIssuer(t, "https://idp.test")
	rsaKid := idp.AddKey("rsa", "RS256")
	ecKid := idp.AddKey("ec", "ES256")
	other := newTestIssuer(t, "https://evil.test")
	otherKid := other.AddKey("rsa", "RS256") // same kid, other key
	cfg := issuerConfig(idp, "RS256", "ES256")
	ts := newTestTrust(t, cfg)

	rsaPub := idp.PrivateKey(rsaKid).Public().(*rsa.PublicKey)
	pubDER, _ := x509.MarshalPKIXPublicKey(rsaPub)
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})
	now := time.Now()
	validPayload := map[string]any{"iss": "https://idp.test", "sub": "alice", "aud": "https://gateway.test", "exp": now.Add(time.Minute).Unix()}
	hmacWith := func(key []byte) func([]byte) []byte {
		return func(in []byte) []byte { m := hmac.New(sha256.New, key); m.Write(in); return m.Sum(nil) }
	}
	valid := idp.Token(rsaKid, nil)
	parts := strings.Split(valid, ".")

	cases := []struct {
		name, token, reason string
	}{
		{"alg none", rawToken(map[string]any{"alg": "none"}, validPayload, nil), "malformed"},
		{"alg none with signature", rawToken(map[string]any{"alg": "none", "kid": rsaKid}, validPayload, hmacWith([]byte("x"))), "bad_algorithm"},
		{"alg None", rawToken(map[string]any{"alg": "None", "kid": rsaKid}, validPayload, hmacWith([]byte("x"))), "bad_algorithm"},
		{"alg NONE", rawToken(map[string]any{"alg": "NONE", "kid": rsaKid}, validPayload, hmacWith([]byte("x"))), "bad_algorithm"},
		{"HS256 with the RSA public key PEM", rawToken(map[string]any{"alg": "HS256", "kid": rsaKid}, validPayload, hmacWith(pubPEM)), "bad_algorithm"},
		{"HS256 with the RSA public key DER", rawToken(map[string]any{"alg": "HS256", "kid": rsaKid}, validPayload, hmacWith(pubDER)), "bad_algorithm"},
		{"algorithm not on the issuer's list", idpTokenWithAlg(t, "PS256", validPayload), "bad_algorithm"},
		{"alg does not fit the kid's key type", rawToken(map[string]any{"alg": "ES256", "kid": rsaKid}, validPayload, func(in []byte) []byte { return make([]byte, 64) }), "unknown_key"},
		{"psychic signature r=s=0", rawToken(map[string]any{"alg": "ES256", "kid": ecKid}, validPayload, func(in []byte) []byte { return make([]byte, 64) }), "bad_signature"},
		{"signed by another issuer's key", other.Token(otherKid, claims{"iss": "https://idp.test"}), "bad_signature"},
		{"tampered payload", parts[0] + "." + b64([]byte(`{"iss":"https://idp.test","sub":"mallory","aud":"https://gateway.test","exp":9999999999}`)) + "." + parts[2], "bad_signature"},
		{"wrong issuer", other.Token(otherKid, nil), "untrusted_issuer"},
		{"wrong audience", idp.Token(rsaKid, claims{"aud": "https://other.test"}), "wrong_audience"},
		{"no audience", idp.Token(rsaKid, claims{"aud": nil}), "wrong_audience"},
		{"expired", idp.Token(rsaKid, claims{"exp": now.Add(-time.Minute).Unix()}), "expired"},
		{"expired within skew is fine, past it is not", idp.Token(rsaKid, claims{"exp": now.Add(-31 * time.Second).Unix()}), "expired"},
		{"no exp", idp.Token(rsaKid, claims{"exp": nil}), "missing_exp"},
		{"nbf in the future", idp.Token(rsaKid, claims{"nbf": now.Add(time.Minute).Unix()}), "not_yet_valid"},
		{"iat in the future", idp.Token(rsaKid, claims{"iat": now.Add(time.Minute).Unix()}), "bad_iat"},
		{"no sub", idp.Token(rsaKid, claims{"sub": nil}), "missing_sub"},
		{"empty sub", idp.Token(rsaKid, claims{"sub": ""}), "missing_sub"},
		{"scope of the wrong type", idp.Token(rsaKid, claims{"scope": 42}), "bad_scope"},
		{"act not an object", idp.Token(rsaKid, claims{"act": "gateway"}), "bad_act"},
		{"act too deep", idp.Token(rsaKid, claims{"act": nestedAct(6)}), "bad_act"},
		{"unknown kid", rawToken(map[string]any{"alg": "RS256", "kid": "nope"}, validPayload, func(in []byte) []byte { return make([]byte, 256) }), "unknown_key"},
		{"JWE", "a.b.c.d.e", "malformed"},
		{"two segments", "a.b", "malformed"},
		{"four segments", valid + ".x", "malformed"},
		{"bad base64", "!!!." + parts[1] + "." + parts[2], "malformed"},
		{"payload not JSON", parts[0] + "." + b64([]byte("not json")) + "." + parts[2], "malformed"},
		{"payload not an object", parts[0] + "." + b64([]byte("[1,2]")) + "." + parts[2], "malformed"},
		{"header not an object", b64([]byte(`"RS256"`)) + "." + parts[1] + "." + parts[2], "malformed"},
		{"crit header", rawToken(map[string]any{"alg": "RS256", "kid": rsaKid, "crit": []string{"exp"}, "exp": 1}, validPayload, nil), "malformed"},
		{"b64 false", rawToken(map[string]any{"alg": "RS256", "kid": rsaKid, "b64": false, "crit": []string{"b64"}}, validPayload, nil), "malformed"},
		{"oversized", strings.Repeat("a", DefaultMaxTokenSize+1), "too_large"},
		{"DPoP-bound (cnf.jkt) as bearer", idp.Token(rsaKid, claims{"cnf": map[string]any{"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}}), "sender_constrained"},
		{"mTLS-bound (cnf.x5t#S256) as bearer", idp.Token(rsaKid, claims{"cnf": map[string]any{"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"}}), "sender_constrained"},
		{"cnf with an unknown member", idp.Token(rsaKid, claims{"cnf": map[string]any{"jwk": map[string]any{"kty": "EC"}}}), "bad_cnf"},
		{"empty cnf", idp.Token(rsaKid, claims{"cnf": map[string]any{}}), "bad_cnf"}, // no binding to check: refused, never a bearer token
		{"cnf not an object", idp.Token(rsaKid, claims{"cnf": "x"}), "bad_cnf"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ts.Verify(context.Background(), tc.token, VerifyOptions{})
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("want *Error, got %v", err)
			}
			if e.Kind != KindInvalidToken || e.Reason != tc.reason {
				t.Fatalf("got kind %d reason %q (%s), want invalid token %q", e.Kind, e.Reason, e.Description, tc.reason)
			}
			if strings.Contains(e.Description, tc.token) && len(tc.token) > 8 {
				t.Fatalf("description echoes the token")
			}
		})
	}
}

func TestVerifyAcceptsExpiryWithinSkew(t *testing.T) {
	idp := newTestIssuer(t, "https://idp.test")
	kid := idp.AddKey("k", "ES256")
	ts := newTestTrust(t, issuerConfig(idp, "ES256"))
	_, err := ts.Verify(context.Background(), idp.Token(kid, claims{"exp": time.Now().Add(-10 * time.Second).Unix()}), VerifyOptions{})
	if err != nil {
		t.Fatalf("a token expired 10s ago is within the 30s skew: %v", err)
	}
}

// idpTokenWithAlg signs with a fresh key under an algorithm the issuer does not allow.
func idpTokenWithAlg(t *testing.T, alg string, payload map[string]any) string {
	k := testidp.GenerateKey(t, alg)
	return rawToken(map[string]any{"alg": alg, "kid": "rsa"}, payload, func(in []byte) []byte {
		h := sha256.Sum256(in)
		sig, err := k.Sign(rand.Reader, h[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256})
		if err != nil {
			t.Fatal(err)
		}
		return sig
	})
}

func nestedAct(depth int) map[string]any {
	var act map[string]any
	for i := depth; i > 0; i-- {
		next := map[string]any{"sub": fmt.Sprintf("actor-%d", i)}
		if act != nil {
			next["act"] = act
		}
		act = next
	}
	return act
}

func TestUnknownKidRefetchIsThrottled(t *testing.T) {
	idp := newTestIssuer(t, "https://idp.test")
	idp.AddKey("old", "ES256")
	cfg := issuerConfig(idp, "ES256")
	cfg.RefetchInterval = time.Hour
	ts := newTestTrust(t, cfg)
	ctx := context.Background()
	// The first request waits for the initial fetch; it forces none.
	if _, err := ts.Verify(ctx, idp.Token("old", nil), VerifyOptions{}); err != nil {
		t.Fatal(err)
	}
	if n := ts.JWKSFetches("https://idp.test"); n != 0 {
		t.Fatalf("%d forced fetches before any unknown kid", n)
	}

	// A rotated key arrives: the first token with its kid triggers one refetch.
	idp.AddHiddenKey("new", "ES256")
	tok := idp.Token("new", nil)
	idp.Publish("new")
	if _, err := ts.Verify(ctx, tok, VerifyOptions{}); err != nil {
		t.Fatalf("token with the rotated key: %v", err)
	}
	forced := ts.JWKSFetches("https://idp.test")
	if forced != 1 {
		t.Fatalf("forced fetches after rotation = %d, want 1", forced)
	}

	// A flood of random kids costs no further fetch within the interval.
	for i := 0; i < 50; i++ {
		bogus := rawToken(map[string]any{"alg": "ES256", "kid": fmt.Sprintf("random-%d", i)},
			map[string]any{"iss": "https://idp.test", "sub": "x", "aud": "https://gateway.test", "exp": time.Now().Add(time.Minute).Unix()},
			func([]byte) []byte { return make([]byte, 64) })
		if _, err := ts.Verify(ctx, bogus, VerifyOptions{}); err == nil {
			t.Fatal("random kid accepted")
		}
	}
	if got := ts.JWKSFetches("https://idp.test"); got != forced {
		t.Fatalf("random kids caused %d forced fetches, want none", got-forced)
	}
}

func TestIssuerDownAtStartFailsClosedThenRecovers(t *testing.T) {
	idp := newTestIssuer(t, "https://idp.test")
	kid := idp.AddKey("k", "ES256")
	url := idp.JWKSURL()
	idp.Server.Close() // down at start-up

	cfg := issuerConfig(idp, "ES256")
	cfg.JWKSURL = url
	cfg.RefetchInterval = time.Millisecond
	ts := newTestTrust(t, cfg)
	tok := idp.Token(kid, nil)
	_, err := ts.Verify(context.Background(), tok, VerifyOptions{})
	// Keys never fetched: the issuer cannot answer, which is not the
	// token's fault (DESIGN §6 failure rule): unavailable, not invalid.
	if e := AsError(err); e.Kind != KindUnavailable || e.Reason != "keys_unavailable" || e.RetryAfter <= 0 {
		t.Fatalf("with the JWKS down, want keys_unavailable with a retry-after, got %v", err)
	}
}

func TestJWKSFileIssuer(t *testing.T) {
	idp := newTestIssuer(t, "https://idp.test")
	kid := idp.AddKey("k", "EdDSA")
	path := filepath.Join(t.TempDir(), "jwks.json")
	if err := os.WriteFile(path, idp.JWKS(), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := issuerConfig(idp, "EdDSA")
	cfg.JWKSURL, cfg.JWKSFile = "", path
	ts := newTestTrust(t, cfg)
	if _, err := ts.Verify(context.Background(), idp.Token(kid, nil), VerifyOptions{}); err != nil {
		t.Fatal(err)
	}
	if idp.Fetches.Load() != 0 {
		t.Fatal("a jwks_file issuer fetched over HTTP")
	}
}

func TestTrustConfigErrors(t *testing.T) {
	base := IssuerConfig{Issuer: "https://idp.test", JWKSURL: "http://127.0.0.1:1/jwks", Audiences: []string{"a"}, Algorithms: []string{"RS256"}}
	cases := map[string]func(*IssuerConfig){
		"HS256":              func(c *IssuerConfig) { c.Algorithms = []string{"HS256"} },
		"none":               func(c *IssuerConfig) { c.Algorithms = []string{"none"} },
		"unknown alg":        func(c *IssuerConfig) { c.Algorithms = []string{"XX1"} },
		"no algorithms":      func(c *IssuerConfig) { c.Algorithms = nil },
		"no audience":        func(c *IssuerConfig) { c.Audiences = nil },
		"no key source":      func(c *IssuerConfig) { c.JWKSURL = "" },
		"both key sources":   func(c *IssuerConfig) { c.JWKSFile = "x" },
		"bad scope claim":    func(c *IssuerConfig) { c.ScopeClaim = "roles" },
		"unknown token type": func(c *IssuerConfig) { c.TokenTypes = []string{"cookie"} },
		"empty issuer":       func(c *IssuerConfig) { c.Issuer = "" },
	}
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			c := base
			mutate(&c)
			if _, err := NewTrustStore(context.Background(), TrustConfig{Issuers: []IssuerConfig{c}}); err == nil {
				t.Fatal("accepted a bad issuer config")
			}
		})
	}
}

func TestScpArrayClaimAndScopeMapping(t *testing.T) {
	idp := newTestIssuer(t, "https://idp.test")
	kid := idp.AddKey("k", "ES256")
	cfg := issuerConfig(idp, "ES256")
	cfg.ScopeClaim = "scp"
	cfg.Scopes = ScopeMap{Map: map[string][]string{"read:calendar": {"calendar.events.read"}}}
	ts := newTestTrust(t, cfg)
	s, err := ts.Verify(context.Background(), idp.Token(kid, claims{"scp": []string{"read:calendar", "unmapped"}}), VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := FormatScope(s.Scopes); got != "calendar.events.read" {
		t.Fatalf("mapped scopes = %q, want calendar.events.read (unmapped dropped)", got)
	}
}

func TestVerifyTokenKindRules(t *testing.T) {
	idp := newTestIssuer(t, "https://idp.test")
	kid := idp.AddKey("k", "ES256")
	cfg := issuerConfig(idp, "ES256")
	cfg.TokenTypes = []string{"access_token", "id_token"}
	cfg.ClientIDs = []string{"web-app"}
	ts := newTestTrust(t, cfg)
	ctx := context.Background()

	cases := []struct {
		name   string
		token  string
		as     string
		reason string // "" means accepted
	}{
		{"access token", idp.Token(kid, nil), "access_token", ""},
		{"ID token as access token", idp.Token(kid, claims{"nonce": "n", "at_hash": "x"}), "access_token", "token_type"},
		{"refresh token (typ claim)", idp.Token(kid, claims{"typ": "Refresh"}), "access_token", "token_type"},
		{"refresh token (token_use)", idp.Token(kid, claims{"token_use": "refresh"}), "access_token", "token_type"},
		{"ID token for its client", idp.Token(kid, claims{"aud": "web-app", "nonce": "n"}), "id_token", ""},
		{"ID token for another client", idp.Token(kid, claims{"aud": "other-app"}), "id_token", "wrong_audience"},
		{"token type the issuer may not present", idp.Token(kid, nil), "jwt", "token_type"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ts.Verify(ctx, tc.token, VerifyOptions{TokenType: tc.as})
			if tc.reason == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if e := AsError(err); e.Reason != tc.reason {
				t.Fatalf("err = %v, want reason %s", err, tc.reason)
			}
		})
	}
}

func TestVerifyRequiredTyp(t *testing.T) {
	idp := newTestIssuer(t, "https://idp.test")
	kid := idp.AddKey("k", "ES256")
	cfg := issuerConfig(idp, "ES256")
	cfg.RequiredTyp = "at+jwt"
	ts := newTestTrust(t, cfg)
	// testidp signs without typ: refused.
	if _, err := ts.Verify(context.Background(), idp.Token(kid, nil), VerifyOptions{}); AsError(err).Reason != "token_type" {
		t.Fatalf("token without typ accepted or refused for the wrong reason: %v", err)
	}
	if !typMatches("application/AT+JWT", "at+jwt") || typMatches("JWT", "at+jwt") {
		t.Fatal("typMatches")
	}
}

func TestVerifyStrictJSON(t *testing.T) {
	idp := newTestIssuer(t, "https://idp.test")
	kid := idp.AddKey("k", "ES256")
	ts := newTestTrust(t, issuerConfig(idp, "ES256"))
	valid := idp.Token(kid, nil)
	parts := strings.Split(valid, ".")
	exp := time.Now().Add(time.Minute).Unix()
	dup := fmt.Sprintf(`{"iss":"https://idp.test","sub":"alice","sub":"admin","aud":"https://gateway.test","exp":%d}`, exp)
	nonUTF8 := fmt.Sprintf("{\"iss\":\"https://idp.test\",\"sub\":\"al\xffice\",\"aud\":\"https://gateway.test\",\"exp\":%d}", exp)
	for name, tok := range map[string]string{
		"duplicate claim":    parts[0] + "." + b64([]byte(dup)) + "." + parts[2],
		"non-UTF-8 claim":    parts[0] + "." + b64([]byte(nonUTF8)) + "." + parts[2],
		"duplicate header":   b64([]byte(`{"alg":"ES256","alg":"none"}`)) + "." + parts[1] + "." + parts[2],
		"JWS JSON encoding":  `{"payload":"` + parts[1] + `","signatures":[{"protected":"` + parts[0] + `","signature":"` + parts[2] + `"}]}`,
		"whitespace wrapped": " " + valid,
	} {
		t.Run(name, func(t *testing.T) {
			_, err := ts.Verify(context.Background(), tok, VerifyOptions{})
			if e := AsError(err); e.Kind != KindInvalidToken {
				t.Fatalf("accepted or wrong kind: %v", err)
			}
		})
	}
}
