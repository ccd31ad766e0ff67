package exchange

import (
	"context"
	"encoding/base64"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwt"
)

// TestTxnWorkloadSubjectTokens: the draft's self_signed and unsigned_json
// subject tokens are refused unless the endpoint allows them; when allowed,
// the subject is the workload's statement, namespaced by the workload, with
// a scope never beyond the client's; a self_signed token must verify with
// the client's own private_key_jwt keys.
func TestTxnWorkloadSubjectTokens(t *testing.T) {
	e := newEngineFixture(t, "ES256").engine
	f := newJWTFixture(t, ClientOptions{Now: time.Now})
	client := &AuthenticatedClient{ClientID: jwtID, Method: ClientAuthPrivateKeyJWT, Config: ClientConfig{ClientID: jwtID, Scopes: []string{"orders.read"}}}
	cfg := &TxnEndpointConfig{TrustDomain: "https://trust.example"}
	req := func(typ, subject string) *TokenRequest {
		return &TokenRequest{GrantType: GrantTypeTokenExchange, SubjectToken: subject, SubjectTokenType: typ,
			RequestedTokenType: TokenTypeTxnToken, SelfSigned: f.c.VerifySelfSigned}
	}
	unsigned := base64.RawURLEncoding.EncodeToString([]byte(`{"sub":"alice","scope":"orders.read orders.write"}`))
	selfSigned := func(edit func(jwt.Token)) string {
		return signAssertion(t, f.key, jwtID, time.Now(), func(tok jwt.Token) {
			_ = tok.Set(jwt.SubjectKey, "alice")
			_ = tok.Set("scope", "orders.read")
			if edit != nil {
				edit(tok)
			}
		})
	}

	// Off by default.
	for typ, subject := range map[string]string{TokenTypeUnsignedJSON: unsigned, TokenTypeSelfSigned: selfSigned(nil)} {
		if _, err := e.TxnTokenExchange(context.Background(), req(typ, subject), client, cfg); AsError(err).Reason != "unsupported_token_type" {
			t.Errorf("%s while not allowed: %v", typ, err)
		}
	}
	cfg.AllowUnsignedJSON, cfg.AllowSelfSigned = true, true
	for tokenType, subject := range map[string]string{TokenTypeUnsignedJSON: unsigned, TokenTypeSelfSigned: selfSigned(nil)} {
		typ := tokenType
		issued, err := e.TxnTokenExchange(context.Background(), req(typ, subject), client, cfg)
		if err != nil {
			t.Fatalf("%s allowed: %v", typ, err)
		}
		c, hdr := parseMinted(t, e.Signer(), issued.AccessToken)
		if typ, _ := hdr.Type(); typ != "txntoken+jwt" || !strings.Contains(issued.IssuedTokenType, "txn_token") {
			t.Errorf("%s: not a Txn-Token", typ)
		}
		if c["sub"] != jwtID+"#alice" || c["scope"] != "orders.read" || c["req_wl"] != jwtID {
			t.Errorf("%s: sub %v scope %v req_wl %v", typ, c["sub"], c["scope"], c["req_wl"])
		}
	}
	other := newES256(t, "o1", true)
	for name, subject := range map[string]string{
		"signed by another key": signAssertion(t, other, jwtID, time.Now(), func(tok jwt.Token) { _ = tok.Set(jwt.SubjectKey, "alice") }),
		"iss another client":    selfSigned(func(tok jwt.Token) { _ = tok.Set(jwt.IssuerKey, "other-svc") }),
		"expired":               selfSigned(func(tok jwt.Token) { _ = tok.Set(jwt.ExpirationKey, time.Now().Add(-time.Hour)) }),
		"no sub":                selfSigned(func(tok jwt.Token) { _ = tok.Remove(jwt.SubjectKey) }),
	} {
		if _, err := e.TxnTokenExchange(context.Background(), req(TokenTypeSelfSigned, subject), client, cfg); AsError(err).Kind != KindInvalidRequest {
			t.Errorf("self_signed %s: %v, want invalid_request", name, err)
		}
	}
	if _, err := e.TxnTokenExchange(context.Background(), req(TokenTypeUnsignedJSON, base64.RawURLEncoding.EncodeToString([]byte(`{"scope":"x"}`))), client, cfg); AsError(err).Kind != KindInvalidRequest {
		t.Errorf("unsigned_json without sub: %v", err)
	}
}
