package exchange

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/url"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// testProofKey is a DPoP client key (jwx).
type testProofKey struct {
	priv, pub jwk.Key
	alg       jwa.SignatureAlgorithm
	jkt       string
}

func newTestProofKey(tb testing.TB, alg string) *testProofKey {
	tb.Helper()
	var raw any
	switch alg {
	case "ES256":
		raw, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "EdDSA":
		_, raw, _ = ed25519.GenerateKey(rand.Reader)
	}
	priv, err := jwk.Import(raw)
	if err != nil {
		tb.Fatal(err)
	}
	pub, _ := priv.PublicKey()
	tp, _ := pub.Thumbprint(crypto.SHA256)
	a, _ := jwa.LookupSignatureAlgorithm(alg)
	return &testProofKey{priv: priv, pub: pub, alg: a, jkt: base64.RawURLEncoding.EncodeToString(tp)}
}

func (k *testProofKey) proof(tb testing.TB, claims map[string]any) string {
	tb.Helper()
	payload, _ := json.Marshal(claims)
	hdr := jws.NewHeaders()
	_ = hdr.Set(jws.TypeKey, "dpop+jwt")
	_ = hdr.Set(jws.JWKKey, k.pub)
	signed, err := jws.Sign(payload, jws.WithKey(k.alg, k.priv, jws.WithProtectedHeaders(hdr)))
	if err != nil {
		tb.Fatal(err)
	}
	return string(signed)
}

func newTestDPoP(tb testing.TB, perKey, keys int, now func() time.Time) *DPoPVerifier {
	tb.Helper()
	st, err := NewDPoPState(perKey, keys)
	if err != nil {
		tb.Fatal(err)
	}
	v, err := NewDPoPVerifier(DPoPConfig{State: st, Now: now, Nonce: false})
	if err != nil {
		tb.Fatal(err)
	}
	return v
}

func TestDPoPReplayBounded(t *testing.T) {
	now := time.Now()
	v := newTestDPoP(t, 2, 1, func() time.Time { return now })
	k := newTestProofKey(t, "ES256")
	target, _ := url.Parse("https://api.example/x")
	check := func(jti string) *DPoPProof {
		p, err := v.Check(k.proof(t, map[string]any{"jti": jti, "htm": "GET", "htu": "https://api.example/x", "iat": now.Unix(), "ath": AccessTokenHash("tok")}),
			DPoPRequest{Method: "GET", URLs: []*url.URL{target}, AccessToken: "tok"})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	if err := v.Use(check("a")); err != nil {
		t.Fatal(err)
	}
	if e := AsError(v.Use(check("a"))); e.Kind != KindInvalidDPoPProof || e.Reason != "dpop_replayed" {
		t.Fatalf("replay: %v", e)
	}
	if err := v.Use(check("b")); err != nil {
		t.Fatal(err)
	}
	// the key's two records are live: a third proof gets 503, never a
	// forgotten record
	if e := AsError(v.Use(check("c"))); e.Kind != KindUnavailable {
		t.Fatalf("full per-key cache: %v", e)
	}
	if e := AsError(v.Use(check("a"))); e.Kind != KindInvalidDPoPProof {
		t.Fatalf("replay after full: %v", e)
	}
	// one key only: another key's proof cannot get a place either
	other := newTestProofKey(t, "ES256")
	p, err := v.Check(other.proof(t, map[string]any{"jti": "z", "htm": "GET", "htu": "https://api.example/x", "iat": now.Unix(), "ath": AccessTokenHash("tok")}),
		DPoPRequest{Method: "GET", URLs: []*url.URL{target}, AccessToken: "tok"})
	if err != nil {
		t.Fatal(err)
	}
	if e := AsError(v.Use(p)); e.Kind != KindUnavailable {
		t.Fatalf("full key table: %v", e)
	}
	// once the records expire, room comes back
	now = now.Add(2 * time.Minute)
	if err := v.Use(p); err != nil {
		t.Fatalf("after expiry: %v", err)
	}
}

func TestSameTargetURI(t *testing.T) {
	target := &url.URL{Scheme: "https", Host: "API.example.com", Path: "/a/b"}
	for htu, want := range map[string]bool{
		"https://api.example.com/a/b":         true,
		"HTTPS://api.EXAMPLE.com:443/a/b":     true,
		"https://api.example.com/a/b?q=1#f":   true,
		"https://api.example.com/a/b/":        false,
		"http://api.example.com/a/b":          false,
		"https://api.example.com:8443/a/b":    false,
		"https://user@api.example.com/a/b":    false,
		"https://api.example.com/a/c":         false,
		"/a/b":                                false,
		"ftp://api.example.com/a/b":           false,
		"https://api.example.com.evil/a/b":    false,
		"https://api.example.com%2f@evil/a/b": false,
	} {
		if got := sameTargetURI(htu, target); got != want {
			t.Errorf("%s: %v, want %v", htu, got, want)
		}
	}
}

func TestCheckConfirmation(t *testing.T) {
	jkt := map[string]any{"cnf": map[string]any{"jkt": "J"}}
	x5t := map[string]any{"cnf": map[string]any{"x5t#S256": "X"}}
	both := map[string]any{"cnf": map[string]any{"jkt": "J", "x5t#S256": "X"}}
	plain := map[string]any{}
	for _, c := range []struct {
		name    string
		claims  map[string]any
		b       *Binding
		reason  string // "" accepted
		unbound bool
	}{
		{"jkt, no binding", jkt, nil, "sender_constrained", false},
		{"jkt, proof of it", jkt, &Binding{JKT: "J", DPoPScheme: true}, "", false},
		{"jkt, proof of another key", jkt, &Binding{JKT: "K", DPoPScheme: true}, "dpop_key_mismatch", false},
		{"jkt, certificate only", jkt, &Binding{CertThumbprint: "X"}, "sender_constrained", false},
		{"jkt, allow unbound", jkt, &Binding{AllowUnbound: true}, "", true},
		{"jkt, allow unbound but a wrong proof", jkt, &Binding{JKT: "K", AllowUnbound: true}, "dpop_key_mismatch", false},
		{"x5t, its certificate", x5t, &Binding{CertThumbprint: "X"}, "", false},
		{"x5t, another certificate", x5t, &Binding{CertThumbprint: "Y"}, "cert_mismatch", false},
		{"x5t, none", x5t, &Binding{}, "sender_constrained", false},
		{"x5t with the DPoP scheme", x5t, &Binding{JKT: "J", CertThumbprint: "X", DPoPScheme: true}, "not_dpop_bound", false},
		{"both, both proven", both, &Binding{JKT: "J", CertThumbprint: "X", DPoPScheme: true}, "", false},
		{"both, only the proof", both, &Binding{JKT: "J", DPoPScheme: true}, "sender_constrained", false},
		{"unbound token with the DPoP scheme", plain, &Binding{JKT: "J", DPoPScheme: true}, "not_dpop_bound", false},
		{"unbound token over mTLS", plain, &Binding{CertThumbprint: "X"}, "", false},
		{"jkt not a string", map[string]any{"cnf": map[string]any{"jkt": 1.0}}, &Binding{JKT: "J"}, "bad_cnf", false},
		{"unknown member, unbinding allowed", map[string]any{"cnf": map[string]any{"kid": "k"}}, &Binding{AllowUnbound: true}, "bad_cnf", false},
	} {
		_, unbound, err := checkConfirmation(c.claims, c.b)
		switch {
		case c.reason == "" && err != nil:
			t.Errorf("%s: refused %v", c.name, err)
		case c.reason != "" && (err == nil || err.Reason != c.reason):
			t.Errorf("%s: %v, want %s", c.name, err, c.reason)
		case unbound != c.unbound:
			t.Errorf("%s: unbound %v", c.name, unbound)
		}
	}
}

// BenchmarkDPoP is the cost of one DPoP proof check (RFC 9449 §4.3:
// parse, jwk, signature, claims, thumbprint), and the middleware's warm path
// with DPoP (check + cached exchange + jti record) next to the plain bearer
// warm path in the same run:
//
//	go test -run '^$' -bench 'DPoP|BearerCacheHit' -benchmem ./exchange/
func BenchmarkDPoP(b *testing.B) {
	target, _ := url.Parse("https://api.example/orders/1")
	for _, alg := range []string{"ES256", "EdDSA"} {
		b.Run("check/"+alg, func(b *testing.B) {
			v := newTestDPoP(b, 0, 0, nil)
			k := newTestProofKey(b, alg)
			proof := k.proof(b, map[string]any{"jti": "j", "htm": "GET", "htu": target.String(), "iat": time.Now().Unix(), "ath": AccessTokenHash("tok")})
			req := DPoPRequest{Method: "GET", URLs: []*url.URL{target}, AccessToken: "tok"}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := v.Check(proof, req); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	grant := &Grant{Audiences: benchGrant.Audiences, Scopes: benchGrant.Scopes, Claims: benchGrant.Claims}
	if err := grant.Validate(); err != nil { // cacheable, as a route's grant is
		b.Fatal(err)
	}
	b.Run("warm path/bearer", func(b *testing.B) {
		e, tok := benchEngine(b, "ES256", "ES256")
		ctx := context.Background()
		b.ReportAllocs()
		for b.Loop() {
			if _, err := e.ExchangeBearer(ctx, tok, grant, nil); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("warm path/dpop ES256", func(b *testing.B) {
		idp := testidp.New(b, "https://idp.test")
		kid := idp.AddKey("k", "ES256")
		e, _ := benchEngine(b, "ES256", "ES256")
		e.trust = newTestTrust(b, issuerConfig(idp, "ES256"))
		k := newTestProofKey(b, "ES256")
		tok := idp.Token(kid, testidp.Claims{"scope": "orders.read", "cnf": map[string]any{"jkt": k.jkt}})
		v := newTestDPoP(b, 1<<30, 0, nil)
		proof := k.proof(b, map[string]any{"jti": "j", "htm": "GET", "htu": target.String(), "iat": time.Now().Unix(), "ath": AccessTokenHash(tok)})
		req := DPoPRequest{Method: "GET", URLs: []*url.URL{target}, AccessToken: tok}
		ctx := context.Background()
		i := 0
		b.ReportAllocs()
		for b.Loop() {
			p, err := v.Check(proof, req)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := e.ExchangePresented(ctx, tok, &Binding{JKT: p.JKT, DPoPScheme: true}, grant, nil); err != nil {
				b.Fatal(err)
			}
			i++
			p.jti = fmt.Sprint(i) // as if each request carried a new proof
			if err := v.Use(p); err != nil {
				b.Fatal(err)
			}
		}
	})
}
