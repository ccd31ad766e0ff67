package exchange

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

func TestTraceID(t *testing.T) {
	const trace = "4bf92f3577b34da6a3ce929d0e0e4736"
	for _, tc := range []struct {
		in   string
		want string
		ok   bool
	}{
		{"00-" + trace + "-00f067aa0ba902b7-01", trace, true},
		{"01-" + trace + "-00f067aa0ba902b7-01-future", trace, true},
		{"00-" + trace + "-00f067aa0ba902b7-01-extra", "", false}, // version 00 has no more fields
		{"ff-" + trace + "-00f067aa0ba902b7-01", "", false},
		{"00-" + strings.ToUpper(trace) + "-00f067aa0ba902b7-01", "", false},
		{"00-00000000000000000000000000000000-00f067aa0ba902b7-01", "", false},
		{"00-" + trace + "-0000000000000000-01", "", false},
		{"00-" + trace + "-00f067aa0ba902b7", "", false},
		{"", "", false},
	} {
		got, ok := TraceID(tc.in)
		if got != tc.want || ok != tc.ok {
			t.Errorf("TraceID(%q) = %q, %v; want %q, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

func TestTxnSubject(t *testing.T) {
	if got := TxnSubject("https://idp.test", "alice", false); got != "alice" {
		t.Errorf("plain %q", got)
	}
	if got := TxnSubject("https://idp.test", "alice", true); got != "https://idp.test#alice" {
		t.Errorf("namespaced %q", got)
	}
}

// A minted Txn-Token verifies with jwx against the signer's JWKS, has typ
// txntoken+jwt and the draft's claims; it is refused as an access token
// even by a trust store that trusts the gateway itself.
func TestTxnTokenMintAndNeverAccessToken(t *testing.T) {
	key, _ := GenerateSigningKey("ES256")
	signer, err := NewSigner(key, "ES256")
	if err != nil {
		t.Fatal(err)
	}
	idp := testidp.New(t, "https://idp.test")
	idp.AddKey("k", "ES256")
	e, err := NewEngine(EngineConfig{Issuer: "https://gateway.test"}, newTestTrust(t, issuerConfig(idp, "ES256")), signer)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := e.MintTxnToken(TxnSpec{TrustDomain: "https://trust.test", Subject: "alice", Scopes: []string{"orders.read"},
		RequestingWorkload: "gw", NotAfter: time.Now().Add(time.Hour), Rctx: map[string]any{"req_ip": "10.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	msg, err := jws.Parse([]byte(tok.Raw))
	if err != nil {
		t.Fatal(err)
	}
	if typ, _ := msg.Signatures()[0].ProtectedHeaders().Type(); typ != TxnTokenTyp {
		t.Fatalf("typ %q", typ)
	}
	parsed, err := jwt.Parse([]byte(tok.Raw), jwt.WithKeySet(signer.PublicKeys()), jwt.WithAudience("https://trust.test"))
	if err != nil {
		t.Fatal(err)
	}
	var txn, wl, scope string
	_ = parsed.Get("txn", &txn)
	_ = parsed.Get("req_wl", &wl)
	_ = parsed.Get("scope", &scope)
	if txn == "" || txn != tok.Txn || wl != "gw" || scope != "orders.read" {
		t.Fatalf("txn %q req_wl %q scope %q", txn, wl, scope)
	}
	exp, _ := parsed.Expiration()
	iat, _ := parsed.IssuedAt()
	if exp.Sub(iat) != DefaultTxnTokenLifetime {
		t.Fatalf("lifetime %v", exp.Sub(iat))
	}
	if got, err := e.verifyOwnTxn(context.Background(), tok.Raw, "https://trust.test"); err != nil || got.Txn != tok.Txn {
		t.Fatalf("own verification: %v", err)
	}
	if _, err := e.verifyOwnTxn(context.Background(), tok.Raw, "https://other.test"); AsError(err).Reason != "wrong_audience" {
		t.Fatalf("another trust domain: %v", err)
	}

	// The gateway trusting itself must still refuse its Txn-Token as an access token.
	self := IssuerConfig{Issuer: "https://gateway.test", JWKSFile: writeJWKS(t, signer.JWKS()),
		Audiences: []string{"https://trust.test"}, Algorithms: []string{"ES256"}}
	ts := newTestTrust(t, self)
	_, err = ts.Verify(context.Background(), tok.Raw, VerifyOptions{TokenType: "access_token"})
	if e := AsError(err); e.Reason != "token_type" || !strings.Contains(e.Description, "Txn-Token") {
		t.Fatalf("a Txn-Token was not refused as an access token: %v", err)
	}
}

func BenchmarkMintTxnToken(b *testing.B) {
	for _, alg := range []string{"ES256", "EdDSA", "RS256"} {
		b.Run(alg, func(b *testing.B) {
			key, _ := GenerateSigningKey(alg)
			signer, err := NewSigner(key, alg)
			if err != nil {
				b.Fatal(err)
			}
			idp := testidp.New(b, "https://idp.test")
			idp.AddKey("k", "ES256")
			e, _ := NewEngine(EngineConfig{Issuer: "https://gateway.test"}, newTestTrust(b, issuerConfig(idp, "ES256")), signer)
			spec := TxnSpec{TrustDomain: "https://trust.test", Subject: "https://idp.test#alice", Scopes: []string{"orders.read"},
				RequestingWorkload: "https://gateway.test", Rctx: map[string]any{"req_ip": "10.0.0.1", "authn": AuthnBearer},
				Tctx: map[string]any{"action": "GET"}}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := e.MintTxnToken(spec); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
