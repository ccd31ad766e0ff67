package exchange

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"

	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

type claims = testidp.Claims

var (
	newTestIssuer = testidp.New
	rawToken      = testidp.RawToken
	b64           = testidp.B64
)

// newTestTrust builds a trust store for issuers, with the gateway audience.
func newTestTrust(t testing.TB, issuers ...IssuerConfig) *TrustStore {
	t.Helper()
	return newTestTrustWith(t, TrustConfig{Issuers: issuers})
}

// newTestTrustWith builds a trust store from cfg, closed when the test ends.
func newTestTrustWith(t testing.TB, cfg TrustConfig) *TrustStore {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ts, err := NewTrustStore(ctx, cfg)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ts.Close(); cancel() })
	return ts
}

// issuerConfig trusts a test IdP for the gateway audience.
func issuerConfig(ti *testidp.Issuer, algs ...string) IssuerConfig {
	return IssuerConfig{
		Issuer:     ti.Iss,
		JWKSURL:    ti.JWKSURL(),
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
