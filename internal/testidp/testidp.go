// Package testidp is a real identity provider for tests: real keys, a real
// JWKS served over HTTP, real signatures. It is used by tests only.
package testidp

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"
)

// Issuer is a real identity provider for tests: real keys, a real JWKS
// served over HTTP, real signatures; an OIDC Discovery / RFC 8414 metadata
// document and an RFC 7662 introspection endpoint for opaque tokens.
type Issuer struct {
	// Audience is the default aud of tokens it mints.
	Audience string
	t        testing.TB
	Iss      string
	mu       sync.Mutex
	keys     map[string]testKey // kid -> key
	public   []string           // kids published in the JWKS
	Server   *httptest.Server
	// Fetches counts JWKS fetches.
	Fetches atomic.Int64

	// MetadataFetches counts requests for either metadata document.
	MetadataFetches atomic.Int64
	// Down makes every endpoint answer 503.
	Down atomic.Bool
	// NoOIDCDiscovery makes /.well-known/openid-configuration answer 404
	// (a plain OAuth server with only RFC 8414 metadata).
	NoOIDCDiscovery atomic.Bool
	// DocIssuer, if set, is the issuer the metadata claims (a mismatch).
	DocIssuer atomic.Pointer[string]

	// Introspection is the RFC 7662 endpoint's behaviour.
	Introspection Introspection
	opaque        map[string]Claims
}

// IntrospectionMode is how the introspection endpoint answers.
type IntrospectionMode int32

const (
	IntrospectOK      IntrospectionMode = iota
	IntrospectDown                      // 503
	IntrospectSlow                      // correct, after Delay
	IntrospectGarbage                   // 200 with a body that is not JSON
)

// Introspection is the introspection endpoint's state.
type Introspection struct {
	// ClientID and ClientSecret are the credentials it requires (Basic or form).
	ClientID, ClientSecret string
	Mode                   atomic.Int32
	Delay                  time.Duration
	// Calls counts requests; Hints records token_type_hint values; Methods
	// records the client authentication used ("basic", "post" or
	// "private_key_jwt"); Accepts records the Accept headers.
	Calls   atomic.Int64
	mu      sync.Mutex
	Hints   []string
	Methods []string
	Accepts []string

	// ClientKeys, when set, are the public keys of the client: a request
	// must authenticate with an RFC 7523 client assertion (private_key_jwt)
	// signed with one of them, iss = sub = ClientID, aud = the
	// introspection URL, unexpired, with a jti never seen before.
	ClientKeys jwk.Set
	jtis       map[string]bool

	jwt JWTResponse
}

// JWTResponse is how the endpoint answers with RFC 9701 JWTs.
type JWTResponse struct {
	// Key, when set, is the kid of the IdP key that signs RFC 9701 JWT
	// responses, sent when the request's Accept names
	// application/token-introspection+jwt (or always, with Always).
	Key    string
	Always bool
	// Override changes the JWT's top-level claims (a nil value removes
	// one); Typ, if set, replaces its typ header.
	Override Claims
	Typ      string
	// ForgeWith, if set, is the kid of the key that really signs the JWT
	// while its header names Key (a forged signature).
	ForgeWith string
}

// SetJWTResponse sets how the endpoint answers with JWTs.
func (in *Introspection) SetJWTResponse(j JWTResponse) {
	in.mu.Lock()
	in.jwt = j
	in.mu.Unlock()
}

// Mu guards Hints and Methods.
func (in *Introspection) Mu() *sync.Mutex { return &in.mu }

// IntrospectionURL is the RFC 7662 endpoint.
func (ti *Issuer) IntrospectionURL() string { return ti.Server.URL + "/introspect" }

// Opaque registers an opaque access token whose introspection answers
// active with claims (iss, sub, aud, exp, iat, client_id, scope defaults;
// a nil value removes a claim) and returns it.
func (ti *Issuer) Opaque(c Claims) string {
	b := make([]byte, 24)
	_, _ = rand.Read(b)
	return ti.OpaqueAs("opq_"+base64.RawURLEncoding.EncodeToString(b), c)
}

// OpaqueAs is Opaque with the token's text chosen by the caller (a
// JWE-shaped one, say).
func (ti *Issuer) OpaqueAs(tok string, c Claims) string {
	now := time.Now()
	full := Claims{"active": true, "iss": ti.Iss, "sub": "alice", "aud": ti.Audience, "client_id": "web-app",
		"exp": now.Add(10 * time.Minute).Unix(), "iat": now.Unix(), "token_type": "Bearer"}
	for name, v := range c {
		if v == nil {
			delete(full, name)
			continue
		}
		full[name] = v
	}
	ti.mu.Lock()
	ti.opaque[tok] = full
	ti.mu.Unlock()
	return tok
}

// Revoke makes an opaque token inactive.
func (ti *Issuer) Revoke(tok string) {
	ti.mu.Lock()
	delete(ti.opaque, tok)
	ti.mu.Unlock()
}

// Metadata is the discovery document.
func (ti *Issuer) Metadata() []byte {
	iss := ti.Iss
	if p := ti.DocIssuer.Load(); p != nil {
		iss = *p
	}
	b, _ := json.Marshal(map[string]any{
		"issuer":                 iss,
		"jwks_uri":               ti.JWKSURL(),
		"introspection_endpoint": ti.IntrospectionURL(),
		"introspection_endpoint_auth_methods_supported": []string{"client_secret_basic", "client_secret_post"},
		"token_endpoint":                        ti.Server.URL + "/token",
		"response_types_supported":              []string{"code"},
		"subject_types_supported":               []string{"public"},
		"id_token_signing_alg_values_supported": []string{"RS256", "ES256"},
	})
	return b
}

func (ti *Issuer) serve(w http.ResponseWriter, r *http.Request) {
	if ti.Down.Load() {
		http.Error(w, "down", http.StatusServiceUnavailable)
		return
	}
	switch {
	case r.URL.Path == "/.well-known/openid-configuration" || strings.HasSuffix(r.URL.Path, "/.well-known/openid-configuration"):
		ti.MetadataFetches.Add(1)
		if ti.NoOIDCDiscovery.Load() {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(ti.Metadata())
	case strings.HasPrefix(r.URL.Path, "/.well-known/oauth-authorization-server"):
		ti.MetadataFetches.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(ti.Metadata())
	case r.URL.Path == "/introspect":
		ti.introspect(w, r)
	default:
		ti.Fetches.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(ti.JWKS())
	}
}

func (ti *Issuer) introspect(w http.ResponseWriter, r *http.Request) {
	in := &ti.Introspection
	in.Calls.Add(1)
	switch IntrospectionMode(in.Mode.Load()) {
	case IntrospectDown:
		http.Error(w, "down", http.StatusServiceUnavailable)
		return
	case IntrospectSlow:
		select {
		case <-time.After(in.Delay):
		case <-r.Context().Done():
			return
		}
	case IntrospectGarbage:
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, "<html>502 Bad Gateway</html>")
		return
	}
	if r.Method != http.MethodPost || r.ParseForm() != nil {
		http.Error(w, "bad request", http.StatusBadRequest)
		return
	}
	method := "post"
	id, secret, basic := r.BasicAuth()
	switch {
	case basic:
		method = "basic"
		id, _ = url.QueryUnescape(id)
		secret, _ = url.QueryUnescape(secret)
	case r.PostForm.Get("client_assertion") != "":
		method = "private_key_jwt"
		id = r.PostForm.Get("client_id")
	default:
		id, secret = r.PostForm.Get("client_id"), r.PostForm.Get("client_secret")
	}
	in.mu.Lock()
	in.Hints = append(in.Hints, r.PostForm.Get("token_type_hint"))
	in.Methods = append(in.Methods, method)
	in.Accepts = append(in.Accepts, r.Header.Get("Accept"))
	jr := in.jwt
	in.mu.Unlock()
	var authOK bool
	if in.ClientKeys != nil {
		authOK = method == "private_key_jwt" && ti.checkAssertion(r, id)
	} else {
		authOK = in.ClientID != "" && method != "private_key_jwt" && id == in.ClientID && secret == in.ClientSecret
	}
	if !authOK {
		w.Header().Set("WWW-Authenticate", `Basic realm="idp"`)
		http.Error(w, `{"error":"invalid_client"}`, http.StatusUnauthorized)
		return
	}
	ti.mu.Lock()
	claims, ok := ti.opaque[r.PostForm.Get("token")]
	ti.mu.Unlock()
	if !ok {
		claims = Claims{"active": false}
	}
	if jr.Key != "" && (jr.Always || strings.Contains(r.Header.Get("Accept"), "application/token-introspection+jwt")) {
		w.Header().Set("Content-Type", "application/token-introspection+jwt")
		_, _ = io.WriteString(w, ti.introspectionJWT(jr, claims))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(claims)
}

// checkAssertion verifies an RFC 7523 client assertion with jwx: signature
// by one of ClientKeys, iss = sub = ClientID = client_id, aud = the
// introspection URL, exp, iat, and a jti not seen before.
func (ti *Issuer) checkAssertion(r *http.Request, id string) bool {
	in := &ti.Introspection
	if r.PostForm.Get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" || id != in.ClientID {
		return false
	}
	tok, err := jwt.Parse([]byte(r.PostForm.Get("client_assertion")), jwt.WithKeySet(in.ClientKeys),
		jwt.WithIssuer(in.ClientID), jwt.WithSubject(in.ClientID), jwt.WithAudience(ti.IntrospectionURL()),
		jwt.WithRequiredClaim("exp"), jwt.WithRequiredClaim("iat"), jwt.WithRequiredClaim("jti"),
		jwt.WithMaxDelta(2*time.Minute, jwt.ExpirationKey, jwt.IssuedAtKey))
	if err != nil {
		return false
	}
	jti, _ := tok.JwtID()
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.jtis == nil {
		in.jtis = map[string]bool{}
	}
	if jti == "" || in.jtis[jti] {
		return false
	}
	in.jtis[jti] = true
	return true
}

// introspectionJWT signs an RFC 9701 response carrying claims as its
// token_introspection member: typ token-introspection+jwt, iss, aud (the
// client), iat.
func (ti *Issuer) introspectionJWT(jr JWTResponse, claims Claims) string {
	full := map[string]any{"iss": ti.Iss, "aud": ti.Introspection.ClientID, "iat": time.Now().Unix(), "token_introspection": claims}
	for name, v := range jr.Override {
		if v == nil {
			delete(full, name)
			continue
		}
		full[name] = v
	}
	payload, _ := json.Marshal(full)
	ti.mu.Lock()
	k := ti.keys[jr.Key]
	if jr.ForgeWith != "" {
		k = ti.keys[jr.ForgeWith]
	}
	ti.mu.Unlock()
	typ := "token-introspection+jwt"
	if jr.Typ != "" {
		typ = jr.Typ
	}
	hdr := jws.NewHeaders()
	_ = hdr.Set(jws.KeyIDKey, jr.Key)
	_ = hdr.Set(jws.TypeKey, typ)
	alg, _ := jwa.LookupSignatureAlgorithm(k.alg)
	b, err := jws.Sign(payload, jws.WithKey(alg, k.priv, jws.WithProtectedHeaders(hdr)))
	if err != nil {
		panic(err)
	}
	return string(b)
}

type testKey struct {
	alg  string
	priv crypto.Signer
}

// New starts an identity provider for iss whose JWKS, metadata and
// introspection endpoint are served over HTTP. An empty iss is the
// server's own URL (so that discovery from the issuer works).
func New(t testing.TB, iss string) *Issuer {
	t.Helper()
	ti := &Issuer{t: t, Iss: iss, Audience: "https://gateway.test", keys: map[string]testKey{}, opaque: map[string]Claims{}}
	ti.Server = httptest.NewServer(http.HandlerFunc(ti.serve))
	if iss == "" {
		ti.Iss = ti.Server.URL
	}
	t.Cleanup(ti.Server.Close)
	return ti
}

func (ti *Issuer) JWKSURL() string { return ti.Server.URL + "/jwks.json" }

// AddKey generates a key for alg, publishes it under kid, and returns kid.
func (ti *Issuer) AddKey(kid, alg string) string {
	ti.t.Helper()
	ti.mu.Lock()
	defer ti.mu.Unlock()
	ti.keys[kid] = testKey{alg: alg, priv: GenerateKey(ti.t, alg)}
	ti.public = append(ti.public, kid)
	return kid
}

// AddHiddenKey generates a key that is not (yet) in the JWKS.
func (ti *Issuer) AddHiddenKey(kid, alg string) {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	ti.keys[kid] = testKey{alg: alg, priv: GenerateKey(ti.t, alg)}
}

func (ti *Issuer) Publish(kid string) {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	ti.public = append(ti.public, kid)
}

func (ti *Issuer) JWKS() []byte {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	set := jwk.NewSet()
	for _, kid := range ti.public {
		k := ti.keys[kid]
		pub, err := jwk.Import(k.priv.Public())
		if err != nil {
			panic(err)
		}
		_ = pub.Set(jwk.KeyIDKey, kid)
		_ = set.AddKey(pub)
	}
	b, _ := json.Marshal(set)
	return b
}

func GenerateKey(t testing.TB, alg string) crypto.Signer {
	t.Helper()
	var k crypto.Signer
	var err error
	switch alg {
	case "RS256", "PS256", "RS384", "RS512", "PS384", "PS512":
		k, err = rsa.GenerateKey(rand.Reader, 2048)
	case "ES256":
		k, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "ES384":
		k, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case "EdDSA":
		_, k, err = ed25519.GenerateKey(rand.Reader)
	default:
		t.Fatalf("no test key for %s", alg)
	}
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// Claims is a subject token's claims set; defaults are filled by token().
type Claims map[string]any

// Token signs claims with the key kid. Missing iss, aud, exp, iat and sub
// get sane defaults; a nil value removes a claim.
func (ti *Issuer) Token(kid string, c Claims) string {
	ti.t.Helper()
	ti.mu.Lock()
	k, ok := ti.keys[kid]
	ti.mu.Unlock()
	if !ok {
		ti.t.Fatalf("no key %s", kid)
	}
	now := time.Now()
	full := Claims{
		"iss": ti.Iss, "sub": "alice", "aud": ti.Audience,
		"exp": now.Add(10 * time.Minute).Unix(), "iat": now.Unix(),
	}
	for name, v := range c {
		if v == nil {
			delete(full, name)
			continue
		}
		full[name] = v
	}
	tok := jwt.New()
	for name, v := range full {
		if err := tok.Set(name, v); err != nil {
			ti.t.Fatalf("set %s: %v", name, err)
		}
	}
	alg, _ := jwa.LookupSignatureAlgorithm(k.alg)
	hdr := jws.NewHeaders()
	_ = hdr.Set(jws.KeyIDKey, kid)
	signed, err := jwt.Sign(tok, jwt.WithKey(alg, k.priv, jws.WithProtectedHeaders(hdr)))
	if err != nil {
		ti.t.Fatal(err)
	}
	return string(signed)
}

// RawToken builds a compact JWS from a header and payload by hand, signed
// with sign (nil: empty signature). For attacks jwx would refuse to produce.
func RawToken(header, payload map[string]any, sign func(signingInput []byte) []byte) string {
	h, _ := json.Marshal(header)
	p, _ := json.Marshal(payload)
	input := B64(h) + "." + B64(p)
	var sig []byte
	if sign != nil {
		sig = sign([]byte(input))
	}
	return input + "." + B64(sig)
}

func B64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

// Withdraw removes kid from the published JWKS.
func (ti *Issuer) Withdraw(kid string) {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	out := ti.public[:0]
	for _, k := range ti.public {
		if k != kid {
			out = append(out, k)
		}
	}
	ti.public = out
}

// PrivateKey returns the private key published under kid.
func (ti *Issuer) PrivateKey(kid string) crypto.Signer {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	return ti.keys[kid].priv
}
