package exchange

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"
	"golang.org/x/crypto/bcrypt"
)

const (
	testEndpoint = "https://gateway.example.internal/oauth2/token"
	testIssuer   = "https://gateway.example.internal"
)

// bcryptHash hashes a secret at the lowest cost, to keep tests fast.
func bcryptHash(t testing.TB, secret string) string {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte(secret), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	return string(h)
}

// newES256 generates a P-256 private JWK with kid (and alg ES256 when withAlg).
func newES256(t *testing.T, kid string, withAlg bool) jwk.Key {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	k, err := jwk.Import(priv)
	if err != nil {
		t.Fatal(err)
	}
	if err := k.Set(jwk.KeyIDKey, kid); err != nil {
		t.Fatal(err)
	}
	if withAlg {
		if err := k.Set(jwk.AlgorithmKey, jwa.ES256()); err != nil {
			t.Fatal(err)
		}
	}
	return k
}

// publicJWKS serializes the public halves of keys as a JWKS document.
func publicJWKS(t *testing.T, keys ...jwk.Key) []byte {
	t.Helper()
	set := jwk.NewSet()
	for _, k := range keys {
		pub, err := jwk.PublicKeyOf(k)
		if err != nil {
			t.Fatal(err)
		}
		if err := set.AddKey(pub); err != nil {
			t.Fatal(err)
		}
	}
	b, err := json.Marshal(set)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func writeJWKS(t *testing.T, doc []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "jwks.json")
	if err := os.WriteFile(p, doc, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// signAssertion makes an RFC 7523 client assertion for clientID, valid at
// now, signed ES256 with key; edit changes claims before signing.
func signAssertion(t *testing.T, key jwk.Key, clientID string, now time.Time, edit func(jwt.Token)) string {
	t.Helper()
	tok := jwt.New()
	must := func(err error) {
		if err != nil {
			t.Fatal(err)
		}
	}
	must(tok.Set(jwt.IssuerKey, clientID))
	must(tok.Set(jwt.SubjectKey, clientID))
	must(tok.Set(jwt.AudienceKey, []string{testEndpoint}))
	must(tok.Set(jwt.IssuedAtKey, now))
	must(tok.Set(jwt.ExpirationKey, now.Add(2*time.Minute)))
	var jti [12]byte
	_, _ = rand.Read(jti[:])
	must(tok.Set(jwt.JwtIDKey, base64.RawURLEncoding.EncodeToString(jti[:])))
	if edit != nil {
		edit(tok)
	}
	b, err := jwt.Sign(tok, jwt.WithKey(jwa.ES256(), key))
	must(err)
	return string(b)
}

// rawJWS builds a compact JWS from a header and claims with a fake signature.
func rawJWS(t *testing.T, hdr, payload map[string]any, sig string) string {
	t.Helper()
	h, _ := json.Marshal(hdr)
	c, _ := json.Marshal(payload)
	return base64.RawURLEncoding.EncodeToString(h) + "." + base64.RawURLEncoding.EncodeToString(c) + "." + sig
}

func wantAuthError(t *testing.T, err error, kind Kind, reason string) *Error {
	t.Helper()
	if err == nil {
		t.Fatalf("authentication succeeded, want kind %d reason %s", kind, reason)
	}
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error is %T (%v), want *Error", err, err)
	}
	if e.Kind != kind || e.Reason != reason {
		t.Fatalf("kind %d reason %q, want kind %d reason %q (%v)", e.Kind, e.Reason, kind, reason, e)
	}
	if !validErrorDescription(e.Description) {
		t.Errorf("description %q has characters RFC 6749 section 5.2 forbids", e.Description)
	}
	return e
}

func TestNewClientsValidation(t *testing.T) {
	hash := bcryptHash(t, "s3cret")
	key := newES256(t, "k1", true)
	jwksFile := writeJWKS(t, publicJWKS(t, key))
	hmacKey, err := jwk.Import([]byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	hmacSet := jwk.NewSet()
	_ = hmacSet.AddKey(hmacKey)
	hmacDoc, _ := json.Marshal(hmacSet)
	hmacFile := writeJWKS(t, hmacDoc)
	badJSON := writeJWKS(t, []byte("{not json"))
	opts := ClientOptions{TokenEndpointURLs: []string{testEndpoint}}

	tests := []struct {
		name    string
		cfgs    []ClientConfig
		opts    ClientOptions
		wantErr string // "" = valid
	}{
		{"secret and jwks_file clients", []ClientConfig{
			{ClientID: "a", SecretHash: hash},
			{ClientID: "b", JWKSFile: jwksFile},
		}, opts, ""},
		{"no clients", nil, ClientOptions{}, ""},
		{"secret client needs no endpoint URL", []ClientConfig{{ClientID: "a", SecretHash: hash}}, ClientOptions{}, ""},
		{"empty client_id", []ClientConfig{{SecretHash: hash}}, opts, "client_id must not be empty"},
		{"non-printable client_id", []ClientConfig{{ClientID: "a\nb", SecretHash: hash}}, opts, "printable ASCII"},
		{"duplicate client_id", []ClientConfig{
			{ClientID: "a", SecretHash: hash}, {ClientID: "a", JWKSFile: jwksFile},
		}, opts, "configured twice"},
		{"no method", []ClientConfig{{ClientID: "a"}}, opts, "one of secret_hash, jwks_url or jwks_file is required"},
		{"secret and jwks_file", []ClientConfig{{ClientID: "a", SecretHash: hash, JWKSFile: jwksFile}}, opts, "mutually exclusive"},
		{"secret and jwks_url", []ClientConfig{{ClientID: "a", SecretHash: hash, JWKSURL: "https://a.example/jwks"}}, opts, "mutually exclusive"},
		{"jwks_url and jwks_file", []ClientConfig{{ClientID: "a", JWKSURL: "https://a.example/jwks", JWKSFile: jwksFile}}, opts, "jwks_url and jwks_file are mutually exclusive"},
		{"plain-text secret", []ClientConfig{{ClientID: "a", SecretHash: "s3cret"}}, opts, "not a bcrypt hash"},
		{"truncated bcrypt hash", []ClientConfig{{ClientID: "a", SecretHash: hash[:20]}}, opts, "not a bcrypt hash"},
		{"sha256 hex as secret hash", []ClientConfig{{ClientID: "a", SecretHash: HashToken("x")}}, opts, "not a bcrypt hash"},
		{"missing jwks_file", []ClientConfig{{ClientID: "a", JWKSFile: filepath.Join(t.TempDir(), "nope.json")}}, opts, "reading jwks_file"},
		{"jwks_file not JSON", []ClientConfig{{ClientID: "a", JWKSFile: badJSON}}, opts, "reading jwks_file"},
		{"jwks_file with only an HMAC key", []ClientConfig{{ClientID: "a", JWKSFile: hmacFile}}, opts, "no usable public signing key"},
		{"jwks_url not a URL", []ClientConfig{{ClientID: "a", JWKSURL: "jwks.json"}}, opts, "absolute http(s) URL"},
		{"jwks_url ftp", []ClientConfig{{ClientID: "a", JWKSURL: "ftp://a.example/jwks"}}, opts, "absolute http(s) URL"},
		{"private_key_jwt without endpoint URLs", []ClientConfig{{ClientID: "a", JWKSFile: jwksFile}}, ClientOptions{}, "token endpoint URLs"},
		{"empty endpoint URL", []ClientConfig{{ClientID: "a", SecretHash: hash}}, ClientOptions{TokenEndpointURLs: []string{""}}, "must not be empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := NewClients(context.Background(), tt.cfgs, tt.opts)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("NewClients: %v", err)
				}
				defer c.Close()
				for _, cfg := range tt.cfgs {
					got, ok := c.Client(cfg.ClientID)
					if !ok || got.ClientID != cfg.ClientID {
						t.Errorf("client %q not registered", cfg.ClientID)
					}
				}
				return
			}
			if err == nil {
				c.Close()
				t.Fatalf("NewClients accepted the configuration, want error containing %q", tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q lacks %q", err, tt.wantErr)
			}
		})
	}
}

// secretFixture is a registry with secret clients and one private_key_jwt client.
type secretFixture struct {
	c   *Clients
	key jwk.Key
	now time.Time
}

const (
	basicID     = "svc:billing a+b" // needs form-urlencoding in Basic
	basicSecret = "p@ss:wörd+&=%"
	postID      = "post-svc"
	postSecret  = "another s3cret"
	jwtID       = "key-svc"
)

func newSecretFixture(t *testing.T) *secretFixture {
	t.Helper()
	key := newES256(t, "k1", true)
	now := time.Now().Truncate(time.Second)
	c, err := NewClients(context.Background(), []ClientConfig{
		{ClientID: basicID, SecretHash: bcryptHash(t, basicSecret), Audiences: []string{"https://billing.internal"}, Scopes: []string{"billing.read"}},
		{ClientID: postID, SecretHash: bcryptHash(t, postSecret), MayImpersonate: true},
		{ClientID: jwtID, JWKSFile: writeJWKS(t, publicJWKS(t, key))},
	}, ClientOptions{TokenEndpointURLs: []string{testEndpoint, testIssuer}, Now: func() time.Time { return now },
		// Tests of outcomes, not of the bcrypt bound: never time out on a
		// loaded machine (TestSecretChecksAreBounded tests the bound).
		SecretCheckWait: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &secretFixture{c: c, key: key, now: now}
}

// basicCred builds credentials the way the endpoint gets them: the client
// form-urlencodes id and secret, and http.Request.BasicAuth hands them back.
func basicCred(t *testing.T, user, pass string) ClientCredentials {
	t.Helper()
	r := httptest.NewRequest(http.MethodPost, testEndpoint, nil)
	r.SetBasicAuth(user, pass)
	u, p, ok := r.BasicAuth()
	if !ok {
		t.Fatal("BasicAuth failed")
	}
	return ClientCredentials{BasicUser: u, BasicPass: p, HasBasic: true}
}

func TestClientAuthenticateSecrets(t *testing.T) {
	f := newSecretFixture(t)
	enc := url.QueryEscape
	tests := []struct {
		name       string
		cred       ClientCredentials
		wantID     string // success
		wantMethod string
		kind       Kind
		reason     string
		basic      bool
	}{
		{name: "basic with form-urlencoded id and secret",
			cred: basicCred(t, enc(basicID), enc(basicSecret)), wantID: basicID, wantMethod: ClientAuthSecretBasic},
		{name: "basic plus matching client_id in the body",
			cred: func() ClientCredentials {
				c := basicCred(t, enc(basicID), enc(basicSecret))
				c.PostID = basicID
				return c
			}(), wantID: basicID, wantMethod: ClientAuthSecretBasic},
		{name: "basic without urlencoding fails (+ decodes to space)",
			cred: basicCred(t, enc(basicID), "p@ss:wörd+&=%25"), kind: KindInvalidClient, reason: "bad_secret", basic: true},
		{name: "basic with malformed percent-encoding",
			cred: basicCred(t, enc(basicID), "p%zz"), kind: KindInvalidClient, reason: "malformed_basic", basic: true},
		{name: "basic wrong secret",
			cred: basicCred(t, enc(basicID), "wrong"), kind: KindInvalidClient, reason: "bad_secret", basic: true},
		{name: "basic empty secret",
			cred: basicCred(t, enc(basicID), ""), kind: KindInvalidClient, reason: "bad_secret", basic: true},
		{name: "basic unknown client",
			cred: basicCred(t, "nobody", enc(basicSecret)), kind: KindInvalidClient, reason: "unknown_client", basic: true},
		{name: "basic empty client_id",
			cred: basicCred(t, "", "x"), kind: KindInvalidClient, reason: "missing_client_id", basic: true},
		{name: "basic with another client_id in the body",
			cred: func() ClientCredentials {
				c := basicCred(t, enc(basicID), enc(basicSecret))
				c.PostID = postID
				return c
			}(), kind: KindInvalidClient, reason: "client_id_mismatch", basic: true},
		{name: "basic for a private_key_jwt client",
			cred: basicCred(t, jwtID, "whatever"), kind: KindInvalidClient, reason: "auth_method_mismatch", basic: true},
		{name: "basic secret longer than 72 bytes sharing the right prefix",
			cred: basicCred(t, enc(postID), enc(postSecret+strings.Repeat("x", 72))), kind: KindInvalidClient, reason: "bad_secret", basic: true},
		{name: "post",
			cred: ClientCredentials{PostID: postID, PostSecret: postSecret}, wantID: postID, wantMethod: ClientAuthSecretPost},
		{name: "post values are taken literally (the form parser decoded them)",
			cred: ClientCredentials{PostID: basicID, PostSecret: basicSecret}, wantID: basicID, wantMethod: ClientAuthSecretPost},
		{name: "post wrong secret",
			cred: ClientCredentials{PostID: postID, PostSecret: "wrong"}, kind: KindInvalidClient, reason: "bad_secret"},
		{name: "post another client's secret",
			cred: ClientCredentials{PostID: postID, PostSecret: basicSecret}, kind: KindInvalidClient, reason: "bad_secret"},
		{name: "post unknown client",
			cred: ClientCredentials{PostID: "nobody", PostSecret: postSecret}, kind: KindInvalidClient, reason: "unknown_client"},
		{name: "post without client_id",
			cred: ClientCredentials{PostSecret: postSecret}, kind: KindInvalidRequest, reason: "missing_client_id"},
		{name: "post for a private_key_jwt client",
			cred: ClientCredentials{PostID: jwtID, PostSecret: "whatever"}, kind: KindInvalidClient, reason: "auth_method_mismatch"},
		{name: "no credentials",
			cred: ClientCredentials{}, kind: KindInvalidClient, reason: "no_client_auth"},
		{name: "client_id alone is no authentication",
			cred: ClientCredentials{PostID: postID}, kind: KindInvalidClient, reason: "no_client_auth"},
		{name: "basic and post",
			cred: func() ClientCredentials {
				c := basicCred(t, enc(basicID), enc(basicSecret))
				c.PostID, c.PostSecret = postID, postSecret
				return c
			}(), kind: KindInvalidRequest, reason: "multiple_client_auth", basic: true},
		{name: "post and assertion",
			cred: ClientCredentials{PostID: postID, PostSecret: postSecret, Assertion: "a.b.c", AssertionType: ClientAssertionTypeJWTBearer},
			kind: KindInvalidRequest, reason: "multiple_client_auth"},
		{name: "basic and assertion type only",
			cred: func() ClientCredentials {
				c := basicCred(t, enc(basicID), enc(basicSecret))
				c.AssertionType = ClientAssertionTypeJWTBearer
				return c
			}(), kind: KindInvalidRequest, reason: "multiple_client_auth", basic: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ac, err := f.c.Authenticate(context.Background(), tt.cred)
			if tt.wantID != "" {
				if err != nil {
					t.Fatalf("Authenticate: %v", err)
				}
				if ac.ClientID != tt.wantID || ac.Method != tt.wantMethod || ac.Config.ClientID != tt.wantID {
					t.Errorf("got %+v, want client %q method %q", ac, tt.wantID, tt.wantMethod)
				}
				return
			}
			if ac != nil {
				t.Errorf("client returned with the error: %+v", ac)
			}
			e := wantAuthError(t, err, tt.kind, tt.reason)
			if got := BasicAuthAttempted(err); got != tt.basic {
				t.Errorf("BasicAuthAttempted = %v, want %v", got, tt.basic)
			}
			for _, s := range []string{basicSecret, postSecret, url.QueryEscape(basicSecret)} {
				if strings.Contains(e.Error(), s) {
					t.Errorf("error %q repeats a secret", e.Error())
				}
			}
		})
	}
}

func TestClientAuthenticateConfigCarried(t *testing.T) {
	f := newSecretFixture(t)
	ac, err := f.c.Authenticate(context.Background(), ClientCredentials{PostID: basicID, PostSecret: basicSecret})
	if err != nil {
		t.Fatal(err)
	}
	if len(ac.Config.Audiences) != 1 || ac.Config.Audiences[0] != "https://billing.internal" ||
		len(ac.Config.Scopes) != 1 || ac.Config.Scopes[0] != "billing.read" || ac.Config.MayImpersonate {
		t.Errorf("config not carried: %+v", ac.Config)
	}
	ac, err = f.c.Authenticate(context.Background(), ClientCredentials{PostID: postID, PostSecret: postSecret})
	if err != nil || !ac.Config.MayImpersonate {
		t.Errorf("MayImpersonate not carried: %+v, %v", ac, err)
	}
}

// The description of a failed authentication must not tell an unknown
// client from a wrong secret or a wrong method.
func TestClientAuthenticateGenericDescription(t *testing.T) {
	f := newSecretFixture(t)
	ctx := context.Background()
	creds := map[string]ClientCredentials{
		"unknown client":  {PostID: "nobody", PostSecret: "x"},
		"wrong secret":    {PostID: postID, PostSecret: "x"},
		"method mismatch": {PostID: jwtID, PostSecret: "x"},
		"unknown jwt client": {Assertion: signAssertion(t, f.key, "nobody", f.now, nil),
			AssertionType: ClientAssertionTypeJWTBearer},
		"secret client with assertion": {Assertion: signAssertion(t, f.key, postID, f.now, nil),
			AssertionType: ClientAssertionTypeJWTBearer},
		"wrong key": {Assertion: signAssertion(t, newES256(t, "k1", true), jwtID, f.now, nil),
			AssertionType: ClientAssertionTypeJWTBearer},
	}
	descs := map[string]bool{}
	for name, cred := range creds {
		_, err := f.c.Authenticate(ctx, cred)
		e := AsError(err)
		if err == nil || e.Kind != KindInvalidClient {
			t.Fatalf("%s: got %v, want invalid_client", name, err)
		}
		descs[e.Description] = true
	}
	if len(descs) != 1 {
		t.Errorf("descriptions differ: %v", descs)
	}
}

func TestClientSecretCache(t *testing.T) {
	f := newSecretFixture(t)
	ctx := context.Background()
	if n := f.c.secrets.len(); n != 0 {
		t.Fatalf("cache starts with %d entries", n)
	}
	if _, err := f.c.Authenticate(ctx, ClientCredentials{PostID: postID, PostSecret: "wrong"}); err == nil {
		t.Fatal("wrong secret accepted")
	}
	if n := f.c.secrets.len(); n != 0 {
		t.Errorf("a failed check was cached (%d entries)", n)
	}
	for i := 0; i < 3; i++ {
		if _, err := f.c.Authenticate(ctx, ClientCredentials{PostID: postID, PostSecret: postSecret}); err != nil {
			t.Fatal(err)
		}
	}
	if n := f.c.secrets.len(); n != 1 {
		t.Errorf("cache holds %d entries after one distinct success, want 1", n)
	}
	// The cache holds no secret in the clear, and a cached success does
	// not let a wrong secret through.
	if _, err := f.c.Authenticate(ctx, ClientCredentials{PostID: postID, PostSecret: postSecret + "x"}); err == nil {
		t.Error("wrong secret accepted after a cached success")
	}
	// A success for one client is not one for another client.
	if _, err := f.c.Authenticate(ctx, ClientCredentials{PostID: basicID, PostSecret: postSecret}); err == nil {
		t.Error("cached secret of one client accepted for another")
	}
	// The cache is consulted before bcrypt: an entry alone makes a secret
	// pass, so a cached success costs no bcrypt comparison.
	rc := f.c.clients[postID]
	f.c.secrets.add(f.c.secrets.key(postID, rc.hash, "only-in-cache"))
	if _, err := f.c.Authenticate(ctx, ClientCredentials{PostID: postID, PostSecret: "only-in-cache"}); err != nil {
		t.Errorf("cached entry not used: %v", err)
	}
	// The key depends on the stored hash: a new hash invalidates old entries.
	if f.c.secrets.key(postID, rc.hash, postSecret) == f.c.secrets.key(postID, []byte("other"), postSecret) {
		t.Error("cache key ignores the stored hash")
	}
}

func TestSecretCacheBounded(t *testing.T) {
	s, err := newSecretCache(3)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 10; i++ {
		s.add(s.key("c", []byte("h"), strings.Repeat("s", i+1)))
	}
	if n := s.len(); n != 3 {
		t.Errorf("cache holds %d entries, want 3", n)
	}
	if !s.has(s.key("c", []byte("h"), strings.Repeat("s", 10))) {
		t.Error("latest entry missing")
	}
	// Length-prefixed fields: shifting bytes between fields changes the key.
	if s.key("ab", []byte("c"), "d") == s.key("a", []byte("bc"), "d") {
		t.Error("cache key is ambiguous")
	}
	other, _ := newSecretCache(3)
	if other.key("c", []byte("h"), "s") == s.key("c", []byte("h"), "s") {
		t.Error("cache key does not depend on the per-process HMAC key")
	}
}

func TestClientAuthMethods(t *testing.T) {
	f := newSecretFixture(t)
	got := strings.Join(f.c.AuthMethods(), " ")
	if got != "client_secret_basic client_secret_post private_key_jwt" {
		t.Errorf("AuthMethods = %q", got)
	}
	c, err := NewClients(context.Background(), []ClientConfig{{ClientID: "a", SecretHash: bcryptHash(t, "x")}}, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(c.AuthMethods(), " "); got != "client_secret_basic client_secret_post" {
		t.Errorf("AuthMethods = %q", got)
	}
	if _, ok := c.Client("b"); ok {
		t.Error("unknown client found")
	}
}

// jwtFixture is a registry of private_key_jwt clients with a settable clock.
type jwtFixture struct {
	c     *Clients
	key   jwk.Key
	mu    sync.Mutex
	clock time.Time
}

func (f *jwtFixture) now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.clock
}

func (f *jwtFixture) advance(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.clock = f.clock.Add(d)
}

func newJWTFixture(t *testing.T, opts ClientOptions) *jwtFixture {
	t.Helper()
	f := &jwtFixture{key: newES256(t, "k1", true), clock: time.Now().Truncate(time.Second)}
	other := newES256(t, "other-1", false)
	opts.Now = f.now
	if opts.TokenEndpointURLs == nil {
		opts.TokenEndpointURLs = []string{testEndpoint, testIssuer}
	}
	c, err := NewClients(context.Background(), []ClientConfig{
		{ClientID: jwtID, JWKSFile: writeJWKS(t, publicJWKS(t, f.key)), Scopes: []string{"orders.read"}},
		{ClientID: "other-svc", JWKSFile: writeJWKS(t, publicJWKS(t, other))},
		{ClientID: postID, SecretHash: bcryptHash(t, postSecret)},
	}, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	f.c = c
	return f
}

func jwtCred(assertion string) ClientCredentials {
	return ClientCredentials{Assertion: assertion, AssertionType: ClientAssertionTypeJWTBearer}
}

func TestClientAuthenticatePrivateKeyJWT(t *testing.T) {
	f := newJWTFixture(t, ClientOptions{})
	now := f.now()
	hmacKey, err := jwk.Import([]byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	noneClaims := map[string]any{"iss": jwtID, "sub": jwtID, "aud": testEndpoint,
		"exp": now.Add(time.Minute).Unix(), "jti": "j-none"}
	sign := func(edit func(jwt.Token)) string { return signAssertion(t, f.key, jwtID, now, edit) }
	set := func(k string, v any) func(jwt.Token) {
		return func(tok jwt.Token) {
			if err := tok.Set(k, v); err != nil {
				t.Fatal(err)
			}
		}
	}
	remove := func(k string) func(jwt.Token) {
		return func(tok jwt.Token) {
			if err := tok.Remove(k); err != nil {
				t.Fatal(err)
			}
		}
	}

	tests := []struct {
		name   string
		cred   ClientCredentials
		kind   Kind   // 0 = success
		reason string // on failure
	}{
		{name: "valid", cred: jwtCred(sign(nil))},
		{name: "valid with the issuer as aud", cred: jwtCred(sign(set(jwt.AudienceKey, []string{"https://other", testIssuer})))},
		{name: "valid with aud as a string", cred: jwtCred(sign(set(jwt.AudienceKey, testEndpoint)))},
		{name: "aud another server's token endpoint (a forged Host cannot make it ours)", cred: jwtCred(sign(set(jwt.AudienceKey, "http://evil.example/oauth2/token"))),
			kind: KindInvalidClient, reason: "assertion_audience"},
		{name: "valid with matching client_id in the body", cred: func() ClientCredentials {
			c := jwtCred(sign(nil))
			c.PostID = jwtID
			return c
		}()},
		{name: "valid exp at the lifetime limit", cred: jwtCred(sign(set(jwt.ExpirationKey, now.Add(DefaultMaxAssertionLifetime))))},
		{name: "valid exp just past, within clock skew", cred: jwtCred(sign(set(jwt.ExpirationKey, now.Add(-10*time.Second))))},
		{name: "valid without kid when one key fits", cred: func() ClientCredentials {
			k, _ := f.key.Clone()
			_ = k.Remove(jwk.KeyIDKey)
			return jwtCred(signAssertion(t, k, jwtID, now, nil))
		}()},

		{name: "client_id in the body differs", cred: func() ClientCredentials {
			c := jwtCred(sign(nil))
			c.PostID = "other-svc"
			return c
		}(), kind: KindInvalidClient, reason: "client_id_mismatch"},
		{name: "wrong client_assertion_type", cred: ClientCredentials{Assertion: sign(nil), AssertionType: "urn:ietf:params:oauth:client-assertion-type:saml2-bearer"},
			kind: KindInvalidClient, reason: "unsupported_assertion_type"},
		{name: "assertion without type", cred: ClientCredentials{Assertion: sign(nil)},
			kind: KindInvalidRequest, reason: "missing_client_assertion_type"},
		{name: "type without assertion", cred: ClientCredentials{AssertionType: ClientAssertionTypeJWTBearer},
			kind: KindInvalidRequest, reason: "missing_client_assertion"},
		{name: "iss differs from sub", cred: jwtCred(sign(set(jwt.IssuerKey, "other-svc"))),
			kind: KindInvalidClient, reason: "bad_assertion_subject"},
		{name: "no iss", cred: jwtCred(sign(remove(jwt.IssuerKey))),
			kind: KindInvalidClient, reason: "bad_assertion_subject"},
		{name: "unknown client", cred: jwtCred(signAssertion(t, f.key, "nobody", now, nil)),
			kind: KindInvalidClient, reason: "unknown_client"},
		{name: "another client's iss/sub with our key", cred: jwtCred(signAssertion(t, f.key, "other-svc", now, nil)),
			kind: KindInvalidClient, reason: "unknown_key"},
		{name: "secret client with an assertion", cred: jwtCred(signAssertion(t, f.key, postID, now, nil)),
			kind: KindInvalidClient, reason: "auth_method_mismatch"},
		{name: "wrong aud", cred: jwtCred(sign(set(jwt.AudienceKey, []string{"https://elsewhere/token"}))),
			kind: KindInvalidClient, reason: "assertion_audience"},
		{name: "no aud", cred: jwtCred(sign(remove(jwt.AudienceKey))),
			kind: KindInvalidClient, reason: "assertion_audience"},
		{name: "no exp", cred: jwtCred(sign(remove(jwt.ExpirationKey))),
			kind: KindInvalidClient, reason: "assertion_missing_exp"},
		{name: "expired", cred: jwtCred(sign(set(jwt.ExpirationKey, now.Add(-time.Minute)))),
			kind: KindInvalidClient, reason: "assertion_expired"},
		{name: "exp too far in the future", cred: jwtCred(sign(set(jwt.ExpirationKey, now.Add(DefaultMaxAssertionLifetime+10*time.Minute)))),
			kind: KindInvalidClient, reason: "assertion_lifetime"},
		{name: "nbf in the future", cred: jwtCred(sign(set(jwt.NotBeforeKey, now.Add(time.Minute)))),
			kind: KindInvalidClient, reason: "assertion_not_yet_valid"},
		{name: "no jti", cred: jwtCred(sign(remove(jwt.JwtIDKey))),
			kind: KindInvalidClient, reason: "assertion_missing_jti"},
		{name: "signed by another key with the same kid", cred: jwtCred(signAssertion(t, newES256(t, "k1", true), jwtID, now, nil)),
			kind: KindInvalidClient, reason: "bad_signature"},
		{name: "signed by a key of unknown kid", cred: jwtCred(signAssertion(t, newES256(t, "k9", true), jwtID, now, nil)),
			kind: KindInvalidClient, reason: "unknown_key"},
		{name: "HS256", cred: func() ClientCredentials {
			tok := jwt.New()
			for k, v := range noneClaims {
				_ = tok.Set(k, v)
			}
			b, err := jwt.Sign(tok, jwt.WithKey(jwa.HS256(), hmacKey))
			if err != nil {
				t.Fatal(err)
			}
			return jwtCred(string(b))
		}(), kind: KindInvalidClient, reason: "bad_algorithm"},
		{name: "alg none, empty signature", cred: jwtCred(rawJWS(t, map[string]any{"alg": "none"}, noneClaims, "")),
			kind: KindInvalidClient, reason: "malformed_assertion"},
		{name: "alg none with a signature", cred: jwtCred(rawJWS(t, map[string]any{"alg": "none"}, noneClaims, "AAAA")),
			kind: KindInvalidClient, reason: "bad_algorithm"},
		{name: "alg NONE", cred: jwtCred(rawJWS(t, map[string]any{"alg": "NONE", "kid": "k1"}, noneClaims, "AAAA")),
			kind: KindInvalidClient, reason: "bad_algorithm"},
		{name: "ES384 header for a P-256 key", cred: jwtCred(rawJWS(t, map[string]any{"alg": "ES384", "kid": "k1"}, noneClaims, "AAAA")),
			kind: KindInvalidClient, reason: "unknown_key"},
		{name: "crit header", cred: jwtCred(rawJWS(t, map[string]any{"alg": "ES256", "kid": "k1", "crit": []string{"x"}}, noneClaims, "AAAA")),
			kind: KindInvalidClient, reason: "malformed_assertion"},
		{name: "two segments", cred: jwtCred("eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJrZXktc3ZjIn0"),
			kind: KindInvalidClient, reason: "malformed_assertion"},
		{name: "JWE shape", cred: jwtCred("a.b.c.d.e"),
			kind: KindInvalidClient, reason: "malformed_assertion"},
		{name: "payload not JSON", cred: jwtCred("eyJhbGciOiJFUzI1NiJ9.bm90IGpzb24.AAAA"),
			kind: KindInvalidClient, reason: "malformed_assertion"},
		{name: "too large", cred: jwtCred(sign(set("pad", strings.Repeat("x", DefaultMaxAssertionSize)))),
			kind: KindInvalidClient, reason: "assertion_too_large"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ac, err := f.c.Authenticate(context.Background(), tt.cred)
			if tt.kind == 0 {
				if err != nil {
					t.Fatalf("Authenticate: %v", err)
				}
				if ac.ClientID != jwtID || ac.Method != ClientAuthPrivateKeyJWT || ac.Config.Scopes[0] != "orders.read" {
					t.Errorf("got %+v", ac)
				}
				return
			}
			if ac != nil {
				t.Errorf("client returned with the error: %+v", ac)
			}
			e := wantAuthError(t, err, tt.kind, tt.reason)
			if BasicAuthAttempted(err) {
				t.Error("BasicAuthAttempted without Basic credentials")
			}
			if tt.cred.Assertion != "" && strings.Contains(e.Description, tt.cred.Assertion) {
				t.Error("description repeats the assertion")
			}
		})
	}
}

func TestClientAssertionReplay(t *testing.T) {
	f := newJWTFixture(t, ClientOptions{})
	ctx := context.Background()
	a := signAssertion(t, f.key, jwtID, f.now(), func(tok jwt.Token) { _ = tok.Set(jwt.JwtIDKey, "same-jti") })
	if _, err := f.c.Authenticate(ctx, jwtCred(a)); err != nil {
		t.Fatalf("first use: %v", err)
	}
	_, err := f.c.Authenticate(ctx, jwtCred(a))
	wantAuthError(t, err, KindInvalidClient, "assertion_replayed")

	// A fresh assertion reusing the jti is a replay too.
	b := signAssertion(t, f.key, jwtID, f.now(), func(tok jwt.Token) {
		_ = tok.Set(jwt.JwtIDKey, "same-jti")
		_ = tok.Set(jwt.ExpirationKey, f.now().Add(time.Minute))
	})
	_, err = f.c.Authenticate(ctx, jwtCred(b))
	wantAuthError(t, err, KindInvalidClient, "assertion_replayed")

	// A rejected assertion takes no place in the cache: its jti stays usable.
	bad := signAssertion(t, f.key, jwtID, f.now(), func(tok jwt.Token) {
		_ = tok.Set(jwt.JwtIDKey, "jti-2")
		_ = tok.Set(jwt.AudienceKey, "https://elsewhere")
	})
	if _, err := f.c.Authenticate(ctx, jwtCred(bad)); err == nil {
		t.Fatal("wrong audience accepted")
	}
	good := signAssertion(t, f.key, jwtID, f.now(), func(tok jwt.Token) { _ = tok.Set(jwt.JwtIDKey, "jti-2") })
	if _, err := f.c.Authenticate(ctx, jwtCred(good)); err != nil {
		t.Fatalf("jti of a rejected assertion was burnt: %v", err)
	}
	if n := f.c.replay.len(); n != 2 {
		t.Errorf("replay cache holds %d entries, want 2", n)
	}

	// Once the first assertion expired (past the skew), its entry goes.
	f.advance(2*time.Minute + DefaultClockSkew + replaySweepInterval)
	c := signAssertion(t, f.key, jwtID, f.now(), func(tok jwt.Token) { _ = tok.Set(jwt.JwtIDKey, "same-jti") })
	if _, err := f.c.Authenticate(ctx, jwtCred(c)); err != nil {
		t.Fatalf("jti reuse after expiry: %v", err)
	}
	if n := f.c.replay.len(); n != 1 {
		t.Errorf("replay cache holds %d entries after expiry, want 1", n)
	}
}

func TestClientAssertionReplayPerClient(t *testing.T) {
	f := newJWTFixture(t, ClientOptions{})
	otherKey := newES256(t, "o1", true)
	c, err := NewClients(context.Background(), []ClientConfig{
		{ClientID: "a-svc", JWKSFile: writeJWKS(t, publicJWKS(t, f.key))},
		{ClientID: "b-svc", JWKSFile: writeJWKS(t, publicJWKS(t, otherKey))},
	}, ClientOptions{TokenEndpointURLs: []string{testEndpoint}, Now: f.now})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	jti := func(tok jwt.Token) { _ = tok.Set(jwt.JwtIDKey, "shared") }
	if _, err := c.Authenticate(context.Background(), jwtCred(signAssertion(t, f.key, "a-svc", f.now(), jti))); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Authenticate(context.Background(), jwtCred(signAssertion(t, otherKey, "b-svc", f.now(), jti))); err != nil {
		t.Errorf("same jti of another client refused: %v", err)
	}
}

func TestClientAssertionReplayCacheFull(t *testing.T) {
	f := newJWTFixture(t, ClientOptions{MaxReplayEntries: 2})
	ctx := context.Background()
	for i := 0; i < 2; i++ {
		if _, err := f.c.Authenticate(ctx, jwtCred(signAssertion(t, f.key, jwtID, f.now(), nil))); err != nil {
			t.Fatal(err)
		}
	}
	_, err := f.c.Authenticate(ctx, jwtCred(signAssertion(t, f.key, jwtID, f.now(), nil)))
	wantAuthError(t, err, KindUnavailable, "replay_cache_full")
	if n := f.c.replay.len(); n != 2 {
		t.Errorf("replay cache holds %d entries, want 2 (no live entry evicted)", n)
	}
	// Once the live entries expired, there is room again.
	f.advance(2*time.Minute + DefaultClockSkew + time.Second)
	if _, err := f.c.Authenticate(ctx, jwtCred(signAssertion(t, f.key, jwtID, f.now(), nil))); err != nil {
		t.Errorf("after expiry: %v", err)
	}
}

// TestClientAssertionReplayBoundIsPerClient: one client filling its jti
// records must not lock any other client out of private_key_jwt (issue 9
// §4); before, the replay cache was one global pool.
func TestClientAssertionReplayBoundIsPerClient(t *testing.T) {
	f := newJWTFixture(t, ClientOptions{MaxReplayEntries: 3})
	ctx := context.Background()
	otherKey := newES256(t, "o1", true)
	c, err := NewClients(ctx, []ClientConfig{
		{ClientID: "noisy-svc", JWKSFile: writeJWKS(t, publicJWKS(t, f.key))},
		{ClientID: "quiet-svc", JWKSFile: writeJWKS(t, publicJWKS(t, otherKey))},
	}, ClientOptions{TokenEndpointURLs: []string{testEndpoint}, Now: f.now, MaxReplayEntries: 3})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := 0; i < 3; i++ {
		if _, err := c.Authenticate(ctx, jwtCred(signAssertion(t, f.key, "noisy-svc", f.now(), nil))); err != nil {
			t.Fatal(err)
		}
	}
	_, err = c.Authenticate(ctx, jwtCred(signAssertion(t, f.key, "noisy-svc", f.now(), nil)))
	e := wantAuthError(t, err, KindUnavailable, "replay_cache_full")
	if e.RetryAfter <= 0 {
		t.Error("no Retry-After for a full replay set")
	}
	for i := 0; i < 3; i++ {
		if _, err := c.Authenticate(ctx, jwtCred(signAssertion(t, otherKey, "quiet-svc", f.now(), nil))); err != nil {
			t.Fatalf("another client was locked out by the noisy one: %v", err)
		}
	}
}

// TestClientAssertionIatWindow: iat is required and may be at most
// max_assertion_age old, whatever exp says (zitadel/oidc signs 1h
// assertions); the jti is remembered only until that window closes, so the
// replay set stays small (issue 9 §4).
func TestClientAssertionIatWindow(t *testing.T) {
	f := newJWTFixture(t, ClientOptions{MaxAssertionAge: 2 * time.Minute})
	ctx := context.Background()
	hour := func(tok jwt.Token) { _ = tok.Set(jwt.ExpirationKey, f.now().Add(time.Hour)) }
	_, err := f.c.Authenticate(ctx, jwtCred(signAssertion(t, f.key, jwtID, f.now(), func(tok jwt.Token) { hour(tok); _ = tok.Remove(jwt.IssuedAtKey) })))
	wantAuthError(t, err, KindInvalidClient, "assertion_missing_iat")
	_, err = f.c.Authenticate(ctx, jwtCred(signAssertion(t, f.key, jwtID, f.now().Add(-3*time.Minute), hour)))
	wantAuthError(t, err, KindInvalidClient, "assertion_too_old")

	// A 1h assertion issued now is accepted; its jti is kept for the iat
	// window (+ skew), not for the hour.
	a := signAssertion(t, f.key, jwtID, f.now(), hour)
	if _, err := f.c.Authenticate(ctx, jwtCred(a)); err != nil {
		t.Fatalf("1h assertion: %v", err)
	}
	_, err = f.c.Authenticate(ctx, jwtCred(a))
	wantAuthError(t, err, KindInvalidClient, "assertion_replayed")
	f.advance(2*time.Minute + DefaultClockSkew + replaySweepInterval)
	_, err = f.c.Authenticate(ctx, jwtCred(a))
	wantAuthError(t, err, KindInvalidClient, "assertion_too_old")
	if _, err := f.c.Authenticate(ctx, jwtCred(signAssertion(t, f.key, jwtID, f.now(), hour))); err != nil {
		t.Fatal(err)
	}
	if n := f.c.replay.len(); n != 1 {
		t.Errorf("replay cache holds %d entries, want 1 (the old jti is gone once its iat window closed)", n)
	}
}

// TestClientAssertionStrictJSON: assertions get the strict JSON checks of
// subject tokens (duplicate members would let two parsers disagree).
func TestClientAssertionStrictJSON(t *testing.T) {
	f := newJWTFixture(t, ClientOptions{})
	now := f.now()
	for name, payload := range map[string]string{
		"duplicate sub": fmt.Sprintf(`{"iss":%q,"sub":%q,"sub":"other-svc","aud":%q,"iat":%d,"exp":%d,"jti":"dup"}`, jwtID, jwtID, testEndpoint, now.Unix(), now.Add(time.Minute).Unix()),
		"invalid UTF-8": fmt.Sprintf(`{"iss":%q,"sub":%q,"aud":%q,"iat":%d,"exp":%d,"jti":"`+"\xff"+`"}`, jwtID, jwtID, testEndpoint, now.Unix(), now.Add(time.Minute).Unix()),
	} {
		t.Run(name, func(t *testing.T) {
			signed, err := jws.Sign([]byte(payload), jws.WithKey(jwa.ES256(), f.key))
			if err != nil {
				t.Fatal(err)
			}
			_, err = f.c.Authenticate(context.Background(), jwtCred(string(signed)))
			wantAuthError(t, err, KindInvalidClient, "malformed_assertion")
		})
	}
}

// TestSecretChecksAreBounded: bcrypt work runs in bounded slots; a check
// that finds none within the wait is refused KindUnavailable with a
// Retry-After, instead of queueing CPU work without end (issue 9 §5).
func TestSecretChecksAreBounded(t *testing.T) {
	c, err := NewClients(context.Background(), []ClientConfig{{ClientID: "a", SecretHash: bcryptHash(t, "right")}},
		ClientOptions{MaxConcurrentSecretChecks: 1, SecretCheckWait: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.bcryptSlots <- struct{}{} // a check in progress holds the only slot
	for name, cred := range map[string]ClientCredentials{
		"wrong secret":   {PostID: "a", PostSecret: "wrong"},
		"unknown client": {PostID: "nobody", PostSecret: "x"},
	} {
		_, err := c.Authenticate(context.Background(), cred)
		if e := wantAuthError(t, err, KindUnavailable, "secret_checks_busy"); e.RetryAfter <= 0 {
			t.Errorf("%s: no Retry-After", name)
		}
	}
	<-c.bcryptSlots
	if _, err := c.Authenticate(context.Background(), ClientCredentials{PostID: "a", PostSecret: "right"}); err != nil {
		t.Fatalf("with a free slot: %v", err)
	}
	// A verified secret is cached: it needs no slot any more.
	c.bcryptSlots <- struct{}{}
	defer func() { <-c.bcryptSlots }()
	if _, err := c.Authenticate(context.Background(), ClientCredentials{PostID: "a", PostSecret: "right"}); err != nil {
		t.Fatalf("cached secret needed a slot: %v", err)
	}
}

func TestReplayCache(t *testing.T) {
	r := newReplayCache(2) // per client
	t0 := time.Unix(1_700_000_000, 0)
	if err := r.add("c", "a", t0.Add(time.Minute), t0); err != nil {
		t.Fatal(err)
	}
	if err := r.add("c", "a", t0.Add(time.Minute), t0.Add(59*time.Second)); !errors.Is(err, errReplayed) {
		t.Errorf("replay within lifetime: %v", err)
	}
	if err := r.add("c\x00a", "", t0.Add(time.Minute), t0); err != nil {
		t.Errorf("distinct client/jti split collided: %v", err)
	}
	if err := r.add("c", "b", t0.Add(5*time.Minute), t0); err != nil {
		t.Fatal(err)
	}
	if err := r.add("c", "c", t0.Add(5*time.Minute), t0); !errors.Is(err, errReplayFull) {
		t.Errorf("full client: %v", err)
	}
	if err := r.add("d", "c", t0.Add(5*time.Minute), t0); err != nil {
		t.Errorf("another client refused because c is full: %v", err)
	}
	// Once a expired, c has room again; its live entry b is kept.
	t1 := t0.Add(2 * time.Minute)
	if err := r.add("c", "c", t1.Add(time.Minute), t1); err != nil {
		t.Fatalf("after sweep: %v", err)
	}
	if err := r.add("c", "b", t1.Add(time.Minute), t1); !errors.Is(err, errReplayed) {
		t.Errorf("live entry forgotten: %v", err)
	}
	// After the periodic sweep, expired clients' records are all gone.
	t2 := t0.Add(time.Hour)
	if err := r.add("e", "x", t2.Add(time.Minute), t2); err != nil {
		t.Fatal(err)
	}
	if n := r.len(); n != 1 {
		t.Errorf("%d entries after the sweep, want 1", n)
	}
}

// jwksServer serves a JWKS document that a test can swap, and counts fetches.
type jwksServer struct {
	*httptest.Server
	doc  atomic.Pointer[[]byte]
	hits atomic.Int64
}

func newJWKSServer(t *testing.T, doc []byte) *jwksServer {
	t.Helper()
	s := &jwksServer{}
	s.doc.Store(&doc)
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.hits.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(*s.doc.Load())
	}))
	t.Cleanup(s.Close)
	return s
}

func TestClientAuthenticateJWKSURL(t *testing.T) {
	keyA := newES256(t, "a", false) // many JWKS omit alg
	keyB := newES256(t, "b", true)
	srv := newJWKSServer(t, publicJWKS(t, keyA))
	f := &jwtFixture{clock: time.Now().Truncate(time.Second)}
	c, err := NewClients(context.Background(), []ClientConfig{
		{ClientID: "url-svc", JWKSURL: srv.URL + "/jwks.json"},
		{ClientID: "url-svc-2", JWKSURL: srv.URL + "/jwks.json"},
	}, ClientOptions{TokenEndpointURLs: []string{testEndpoint}, Now: f.now, RefetchInterval: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()

	ac, err := c.Authenticate(ctx, jwtCred(signAssertion(t, keyA, "url-svc", f.now(), nil)))
	if err != nil {
		t.Fatalf("key from jwks_url: %v", err)
	}
	if ac.ClientID != "url-svc" || ac.Method != ClientAuthPrivateKeyJWT {
		t.Errorf("got %+v", ac)
	}
	// Two clients sharing one jwks_url share its fetches.
	if _, err := c.Authenticate(ctx, jwtCred(signAssertion(t, keyA, "url-svc-2", f.now(), nil))); err != nil {
		t.Fatalf("second client on the same jwks_url: %v", err)
	}

	// The client rotates to key b: an unknown kid forces one refetch.
	srv.doc.Store(ptr(publicJWKS(t, keyA, keyB)))
	f.advance(11 * time.Second)
	before := c.JWKSFetches("url-svc")
	if _, err := c.Authenticate(ctx, jwtCred(signAssertion(t, keyB, "url-svc", f.now(), nil))); err != nil {
		t.Fatalf("rotated key: %v", err)
	}
	// One forced fetch, or none when the initial background fetch (queued
	// at registration, racing with the first forced one) already saw key b.
	if got := c.JWKSFetches("url-svc") - before; got > 1 {
		t.Errorf("rotation made %d forced fetches, want at most 1", got)
	}

	// A flood of unknown kids within the refetch interval costs no more fetch.
	hits, fetches := srv.hits.Load(), c.JWKSFetches("url-svc")
	for i := 0; i < 20; i++ {
		rogue := newES256(t, "rogue-"+string(rune('a'+i)), true)
		_, err := c.Authenticate(ctx, jwtCred(signAssertion(t, rogue, "url-svc", f.now(), nil)))
		wantAuthError(t, err, KindInvalidClient, "unknown_key")
	}
	// At most the one background fetch queued at registration may land here.
	if got := srv.hits.Load() - hits; got > 1 {
		t.Errorf("unknown kids caused %d JWKS fetches within the refetch interval, want none", got)
	}
	if got := c.JWKSFetches("url-svc") - fetches; got != 0 {
		t.Errorf("unknown kids forced %d fetches, want 0", got)
	}
	// After the interval, one more fetch is allowed, and only one.
	f.advance(11 * time.Second)
	for i := 0; i < 5; i++ {
		rogue := newES256(t, "late-"+string(rune('a'+i)), true)
		_, err := c.Authenticate(ctx, jwtCred(signAssertion(t, rogue, "url-svc", f.now(), nil)))
		wantAuthError(t, err, KindInvalidClient, "unknown_key")
	}
	if got := c.JWKSFetches("url-svc") - fetches; got != 1 {
		t.Errorf("after the interval, %d forced fetches, want 1", got)
	}
}

func TestClientJWKSURLUnreachable(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "down", http.StatusServiceUnavailable)
	}))
	defer srv.Close()
	key := newES256(t, "a", true)
	c, err := NewClients(context.Background(), []ClientConfig{{ClientID: "url-svc", JWKSURL: srv.URL}},
		ClientOptions{TokenEndpointURLs: []string{testEndpoint}})
	if err != nil {
		t.Fatalf("an unreachable jwks_url must not fail start-up: %v", err)
	}
	defer c.Close()
	_, err = c.Authenticate(context.Background(), jwtCred(signAssertion(t, key, "url-svc", time.Now(), nil)))
	// The client's keys were never fetched: unavailable, not a bad client.
	wantAuthError(t, err, KindUnavailable, "keys_unavailable")
}

func ptr[T any](v T) *T { return &v }

// Concurrent presentations of one assertion: exactly one wins.
func TestClientAssertionReplayConcurrent(t *testing.T) {
	f := newJWTFixture(t, ClientOptions{})
	a := signAssertion(t, f.key, jwtID, f.now(), nil)
	var wg sync.WaitGroup
	var ok, replayed atomic.Int64
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := f.c.Authenticate(context.Background(), jwtCred(a))
			switch {
			case err == nil:
				ok.Add(1)
			case AsError(err).Reason == "assertion_replayed":
				replayed.Add(1)
			}
		}()
	}
	wg.Wait()
	if ok.Load() != 1 || replayed.Load() != 15 {
		t.Errorf("%d successes and %d replays, want 1 and 15", ok.Load(), replayed.Load())
	}
}

func TestClientSecretConcurrent(t *testing.T) {
	f := newSecretFixture(t)
	var wg sync.WaitGroup
	var fails atomic.Int64
	for i := 0; i < 8; i++ {
		wg.Add(2)
		go func() {
			defer wg.Done()
			if _, err := f.c.Authenticate(context.Background(), ClientCredentials{PostID: postID, PostSecret: postSecret}); err != nil {
				fails.Add(1)
			}
		}()
		go func() {
			defer wg.Done()
			if _, err := f.c.Authenticate(context.Background(), ClientCredentials{PostID: postID, PostSecret: "wrong"}); AsError(err).Kind != KindInvalidClient {
				fails.Add(1)
			}
		}()
	}
	wg.Wait()
	if fails.Load() != 0 {
		t.Errorf("%d wrong outcomes under concurrency", fails.Load())
	}
	if n := f.c.secrets.len(); n != 1 {
		t.Errorf("cache holds %d entries, want 1", n)
	}
}

// failingStorage is a storage that cannot be reached.
type failingStorage struct{ *certmagic.FileStorage }

func (failingStorage) Lock(context.Context, string) error { return errors.New("storage unreachable") }

// TestClientAssertionReplayAcrossInstances: two instances (two registries,
// separate storage handles on one shared directory): an assertion accepted
// by one is refused by the other; an unreachable storage fails closed.
func TestClientAssertionReplayAcrossInstances(t *testing.T) {
	dir := t.TempDir()
	key := newES256(t, "k1", true)
	jwks := writeJWKS(t, publicJWKS(t, key))
	instance := func(storage ReplayStorage) *Clients {
		c, err := NewClients(context.Background(), []ClientConfig{{ClientID: jwtID, JWKSFile: jwks}},
			ClientOptions{TokenEndpointURLs: []string{testEndpoint}, ReplayStorage: storage})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	a, b := instance(&certmagic.FileStorage{Path: dir}), instance(&certmagic.FileStorage{Path: dir})
	assertion := signAssertion(t, key, jwtID, time.Now(), nil)
	if _, err := a.Authenticate(context.Background(), jwtCred(assertion)); err != nil {
		t.Fatalf("instance a: %v", err)
	}
	_, err := b.Authenticate(context.Background(), jwtCred(assertion))
	wantAuthError(t, err, KindInvalidClient, "assertion_replayed")
	if _, err := b.Authenticate(context.Background(), jwtCred(signAssertion(t, key, jwtID, time.Now(), nil))); err != nil {
		t.Fatalf("a fresh assertion at instance b: %v", err)
	}
	down := instance(failingStorage{&certmagic.FileStorage{Path: dir}})
	_, err = down.Authenticate(context.Background(), jwtCred(signAssertion(t, key, jwtID, time.Now(), nil)))
	if e := wantAuthError(t, err, KindUnavailable, "replay_storage"); e.RetryAfter <= 0 {
		t.Error("no Retry-After")
	}
}

// BenchmarkAssertionReplayStorage is the cost of the cluster-wide replay
// record per private_key_jwt assertion on file_system storage, against
// the in-memory check alone (same run):
//
//	go test -run '^$' -bench AssertionReplayStorage -benchtime 2s ./exchange/
func BenchmarkAssertionReplayStorage(b *testing.B) {
	for _, shared := range []bool{false, true} {
		b.Run(fmt.Sprintf("shared=%v", shared), func(b *testing.B) {
			var storage ReplayStorage
			if shared {
				storage = &certmagic.FileStorage{Path: b.TempDir()}
			}
			r := newReplayCache(1 << 30)
			s := &storageReplay{storage: storage, logger: zap.NewNop()}
			now := time.Now()
			i := 0
			for b.Loop() {
				i++
				jti := strconv.Itoa(i)
				if err := r.add("svc", jti, now.Add(time.Minute), now); err != nil {
					b.Fatal(err)
				}
				if shared {
					if err := s.record(context.Background(), "svc", jti, now.Add(time.Minute), now); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}
