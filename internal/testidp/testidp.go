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
	"net/http"
	"net/http/httptest"
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
// served over HTTP, real signatures.
type Issuer struct {
	// Audience is the default aud of tokens it mints.
	Audience string
	t        testing.TB
	Iss      string
	mu       sync.Mutex
	keys     map[string]testKey // kid -> key
	public   []string           // kids published in the JWKS
	Server   *httptest.Server
	Fetches  atomic.Int64
}

type testKey struct {
	alg  string
	priv crypto.Signer
}

// New starts an identity provider for iss whose JWKS is served over HTTP.
func New(t testing.TB, iss string) *Issuer {
	t.Helper()
	ti := &Issuer{t: t, Iss: iss, Audience: "https://gateway.test", keys: map[string]testKey{}}
	ti.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ti.Fetches.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(ti.JWKS())
	}))
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
