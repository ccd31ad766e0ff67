package exchange

import (
	"context"
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

// testIssuer is a real identity provider for tests: real keys, a real JWKS
// served over HTTP, real signatures.
type testIssuer struct {
	t       *testing.T
	iss     string
	mu      sync.Mutex
	keys    map[string]testKey // kid -> key
	public  []string           // kids published in the JWKS
	server  *httptest.Server
	fetches atomic.Int64
}

type testKey struct {
	alg  string
	priv crypto.Signer
}

func newTestIssuer(t *testing.T, iss string) *testIssuer {
	t.Helper()
	ti := &testIssuer{t: t, iss: iss, keys: map[string]testKey{}}
	ti.server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ti.fetches.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(ti.jwks())
	}))
	t.Cleanup(ti.server.Close)
	return ti
}

func (ti *testIssuer) jwksURL() string { return ti.server.URL + "/jwks.json" }

// addKey generates a key for alg, publishes it under kid, and returns kid.
func (ti *testIssuer) addKey(kid, alg string) string {
	ti.t.Helper()
	ti.mu.Lock()
	defer ti.mu.Unlock()
	ti.keys[kid] = testKey{alg: alg, priv: generateTestKey(ti.t, alg)}
	ti.public = append(ti.public, kid)
	return kid
}

// addHiddenKey generates a key that is not (yet) in the JWKS.
func (ti *testIssuer) addHiddenKey(kid, alg string) {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	ti.keys[kid] = testKey{alg: alg, priv: generateTestKey(ti.t, alg)}
}

func (ti *testIssuer) publish(kid string) {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	ti.public = append(ti.public, kid)
}

func (ti *testIssuer) jwks() []byte {
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

func generateTestKey(t *testing.T, alg string) crypto.Signer {
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

// claims is a subject token's claims set; defaults are filled by token().
type claims map[string]any

// token signs claims with the key kid. Missing iss, aud, exp, iat and sub
// get sane defaults; a nil value removes a claim.
func (ti *testIssuer) token(kid string, c claims) string {
	ti.t.Helper()
	ti.mu.Lock()
	k, ok := ti.keys[kid]
	ti.mu.Unlock()
	if !ok {
		ti.t.Fatalf("no key %s", kid)
	}
	now := time.Now()
	full := claims{
		"iss": ti.iss, "sub": "alice", "aud": "https://gateway.test",
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

// rawToken builds a compact JWS from a header and payload by hand, signed
// with sign (nil: empty signature). For attacks jwx would refuse to produce.
func rawToken(header, payload map[string]any, sign func(signingInput []byte) []byte) string {
	h, _ := json.Marshal(header)
	p, _ := json.Marshal(payload)
	input := b64(h) + "." + b64(p)
	var sig []byte
	if sign != nil {
		sig = sign([]byte(input))
	}
	return input + "." + b64(sig)
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

// newTestTrust builds a trust store for issuers, with the gateway audience.
func newTestTrust(t *testing.T, issuers ...IssuerConfig) *TrustStore {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ts, err := NewTrustStore(ctx, TrustConfig{Issuers: issuers})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ts.Close(); cancel() })
	return ts
}

func (ti *testIssuer) config(algs ...string) IssuerConfig {
	return IssuerConfig{
		Issuer:     ti.iss,
		JWKSURL:    ti.jwksURL(),
		Audiences:  []string{"https://gateway.test"},
		Algorithms: algs,
	}
}

// parseMinted verifies a minted token against the signer's public JWKS the
// way an upstream would, and returns its claims and header.
func parseMinted(t *testing.T, s *Signer, token string) (map[string]any, jws.Headers) {
	t.Helper()
	tok, err := jwt.Parse([]byte(token), jwt.WithKeySet(s.PublicKeys()))
	if err != nil {
		t.Fatalf("minted token does not verify against the JWKS: %v", err)
	}
	msg, err := jws.Parse([]byte(token))
	if err != nil {
		t.Fatal(err)
	}
	parts := strings.Split(token, ".")
	raw, _ := base64.RawURLEncoding.DecodeString(parts[1])
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	_ = tok
	return m, msg.Signatures()[0].ProtectedHeaders()
}
