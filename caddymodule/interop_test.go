package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/zitadel/oidc/v3/pkg/client"
	"github.com/zitadel/oidc/v3/pkg/client/rp"
	"github.com/zitadel/oidc/v3/pkg/client/tokenexchange"
	"github.com/zitadel/oidc/v3/pkg/oidc"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// Interop with a third-party RFC 8693 client nobody here wrote:
// github.com/zitadel/oidc/v3, unchanged. It discovers our metadata, calls the
// token endpoint, and verifies what we issue against our JWKS with its own
// remote key set (go-jose), besides the jwx check of verifyMinted.

func interopContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// zitadelVerify verifies an issued token with zitadel's remote key set,
// fetching our jwks_uri as any zitadel resource server would, and returns its
// claims as zitadel parses them.
func zitadelVerify(t *testing.T, ctx context.Context, hc *http.Client, jwksURI, token string) *oidc.AccessTokenClaims {
	t.Helper()
	sig, err := jose.ParseSignedCompact(token, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		t.Fatalf("go-jose cannot parse the issued token: %v", err)
	}
	if typ, _ := sig.Signatures[0].Header.ExtraHeaders[jose.HeaderType].(string); typ != "at+jwt" {
		t.Errorf("typ %q, want at+jwt", typ)
	}
	payload, err := rp.NewRemoteKeySet(hc, jwksURI).VerifySignature(ctx, sig)
	if err != nil {
		t.Fatalf("zitadel's key set does not verify the issued token against %s: %v", jwksURI, err)
	}
	claims := new(oidc.AccessTokenClaims)
	if err := json.Unmarshal(payload, claims); err != nil {
		t.Fatalf("zitadel cannot read the claims: %v", err)
	}
	if err := oidc.CheckIssuerWithISSVerifier(claims, stsBase, nil); err != nil {
		t.Errorf("iss: %v", err)
	}
	if err := oidc.CheckExpiration(claims, 0); err != nil {
		t.Errorf("exp: %v", err)
	}
	return claims
}

// checkZitadelResponse checks a token-exchange answer as zitadel decoded it.
func checkZitadelResponse(t *testing.T, resp *oidc.TokenExchangeResponse) {
	t.Helper()
	if resp.AccessToken == "" {
		t.Fatal("no access_token")
	}
	if resp.IssuedTokenType != oidc.AccessTokenType {
		t.Errorf("issued_token_type %q", resp.IssuedTokenType)
	}
	if resp.TokenType != "Bearer" {
		t.Errorf("token_type %q", resp.TokenType)
	}
	if resp.ExpiresIn == 0 || resp.ExpiresIn > 300 {
		t.Errorf("expires_in %d", resp.ExpiresIn)
	}
	if resp.RefreshToken != "" || resp.IDToken != "" {
		t.Error("a refresh or ID token was issued")
	}
}

func TestInteropZitadelDiscovery(t *testing.T) {
	s := startSTS(t, stsOptions{})
	ctx := interopContext(t)
	hc := s.tester.Client

	// OIDC-style discovery (what tokenexchange.NewTokenExchanger* use) and
	// RFC 8414 discovery through the well-known URL override.
	for _, wellKnown := range []string{"", stsBase + "/.well-known/oauth-authorization-server"} {
		cfg, err := client.Discover(ctx, stsBase, hc, wellKnown)
		if err != nil {
			t.Fatalf("zitadel discovery (%q): %v", wellKnown, err)
		}
		if cfg.Issuer != stsBase || cfg.TokenEndpoint != stsTokenURL || cfg.JwksURI != stsJWKSURL {
			t.Errorf("discovered issuer %q token_endpoint %q jwks_uri %q", cfg.Issuer, cfg.TokenEndpoint, cfg.JwksURI)
		}
		if !slices.Contains(cfg.GrantTypesSupported, oidc.GrantTypeTokenExchange) {
			t.Errorf("grant_types_supported %v", cfg.GrantTypesSupported)
		}
		for _, m := range []oidc.AuthMethod{oidc.AuthMethodBasic, oidc.AuthMethodPost, oidc.AuthMethodPrivateKeyJWT} {
			if !slices.Contains(cfg.TokenEndpointAuthMethodsSupported, m) {
				t.Errorf("token_endpoint_auth_methods_supported %v lacks %s", cfg.TokenEndpointAuthMethodsSupported, m)
			}
		}
		if !slices.Contains(cfg.TokenEndpointAuthSigningAlgValuesSupported, string(jose.ES256)) {
			t.Errorf("token_endpoint_auth_signing_alg_values_supported %v", cfg.TokenEndpointAuthSigningAlgValuesSupported)
		}
		if len(cfg.ScopesSupported) != 0 {
			t.Errorf("scopes_supported %v published without configuration", cfg.ScopesSupported)
		}
	}

	// zitadel refuses a document whose issuer differs from the URL it
	// discovered from: ours must match it exactly.
	te, err := tokenexchange.NewTokenExchanger(ctx, stsBase, tokenexchange.WithHTTPClient(hc))
	if err != nil {
		t.Fatalf("zitadel token exchanger: %v", err)
	}
	if te.TokenEndpoint() != stsTokenURL {
		t.Errorf("token endpoint %q", te.TokenEndpoint())
	}
}

func TestInteropZitadelClientSecretBasic(t *testing.T) {
	s := startSTS(t, stsOptions{})
	ctx := interopContext(t)
	hc := s.tester.Client

	te, err := tokenexchange.NewTokenExchangerClientCredentials(ctx, stsBase, secretClient, secretValue,
		tokenexchange.WithHTTPClient(hc))
	if err != nil {
		t.Fatalf("zitadel token exchanger: %v", err)
	}

	t.Run("delegation to the client", func(t *testing.T) {
		subject := s.idp.Token("ec-1", testidp.Claims{"scope": "orders.read billing.read profile", "act": map[string]any{"sub": "frontend"}})
		resp, err := tokenexchange.ExchangeToken(ctx, te, subject, oidc.AccessTokenType, "", "",
			nil, []string{audOrders, audBilling}, []string{"orders.read", "billing.read"}, oidc.AccessTokenType)
		if err != nil {
			t.Fatalf("zitadel ExchangeToken: %v", err)
		}
		checkZitadelResponse(t, resp)
		if len(resp.Scopes) != 0 {
			t.Errorf("scope %v returned although it equals the request", resp.Scopes)
		}
		claims := zitadelVerify(t, ctx, hc, stsJWKSURL, resp.AccessToken)
		if claims.Subject != "alice" {
			t.Errorf("sub %q", claims.Subject)
		}
		if !slices.Contains(claims.Audience, audOrders) || !slices.Contains(claims.Audience, audBilling) {
			t.Errorf("aud %v", claims.Audience)
		}
		if !slices.Equal(claims.Scopes, []string{"orders.read", "billing.read"}) {
			t.Errorf("scope %v", claims.Scopes)
		}
		if claims.Actor == nil || claims.Actor.Subject != secretClient {
			t.Fatalf("act %+v, want the client", claims.Actor)
		}
		if claims.Actor.Actor == nil || claims.Actor.Actor.Subject != "frontend" {
			t.Errorf("prior act lost: %+v", claims.Actor)
		}
		s.verifyMinted(t, resp.AccessToken, audOrders, audBilling)
	})

	t.Run("with an actor token", func(t *testing.T) {
		subject := s.idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		actor := s.idp.Token("rsa-1", testidp.Claims{"sub": "bob"})
		resp, err := tokenexchange.ExchangeToken(ctx, te, subject, oidc.AccessTokenType, actor, oidc.AccessTokenType,
			nil, []string{audOrders}, nil, oidc.AccessTokenType)
		if err != nil {
			t.Fatalf("zitadel ExchangeToken: %v", err)
		}
		checkZitadelResponse(t, resp)
		if !slices.Equal(resp.Scopes, []string{"orders.read"}) {
			t.Errorf("scope %v, want orders.read (none was asked)", resp.Scopes)
		}
		claims := zitadelVerify(t, ctx, hc, stsJWKSURL, resp.AccessToken)
		if claims.Actor == nil || claims.Actor.Subject != "bob" || claims.Actor.Issuer != "https://idp.test" {
			t.Errorf("act %+v, want bob from https://idp.test", claims.Actor)
		}
		s.verifyMinted(t, resp.AccessToken, audOrders)
	})

	t.Run("resource and requested jwt", func(t *testing.T) {
		subject := s.idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		resp, err := tokenexchange.ExchangeToken(ctx, te, subject, oidc.JWTTokenType, "", "",
			[]string{resOrders}, nil, []string{"orders.read"}, oidc.JWTTokenType)
		if err != nil {
			t.Fatalf("zitadel ExchangeToken: %v", err)
		}
		if resp.IssuedTokenType != oidc.JWTTokenType || resp.TokenType != "N_A" {
			t.Errorf("issued_token_type %q token_type %q", resp.IssuedTokenType, resp.TokenType)
		}
		zitadelVerify(t, ctx, hc, stsJWKSURL, resp.AccessToken)
		s.verifyMinted(t, resp.AccessToken, resOrders)
	})

	t.Run("errors reach zitadel as OAuth errors", func(t *testing.T) {
		subject := s.idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		for _, c := range []struct {
			name string
			te   tokenexchange.TokenExchanger
			aud  []string
			want string
		}{
			{"audience not allowed", te, []string{"https://payroll.internal"}, "invalid_target"},
			{"wrong secret", func() tokenexchange.TokenExchanger {
				bad, err := tokenexchange.NewTokenExchangerClientCredentials(ctx, stsBase, secretClient, "wrong", tokenexchange.WithHTTPClient(hc))
				if err != nil {
					t.Fatal(err)
				}
				return bad
			}(), []string{audOrders}, "invalid_client"},
		} {
			_, err := tokenexchange.ExchangeToken(ctx, c.te, subject, oidc.AccessTokenType, "", "", nil, c.aud, nil, oidc.AccessTokenType)
			var oe *oidc.Error
			if !errors.As(err, &oe) || string(oe.ErrorType) != c.want {
				t.Errorf("%s: error %v, want %s", c.name, err, c.want)
			}
		}
	})
}

// zitadelSigner is key-svc's key as a go-jose signer, which zitadel's JWT
// profile functions take.
func zitadelSigner(t *testing.T, s *sts) jose.Signer {
	t.Helper()
	signer, err := jose.NewSigner(jose.SigningKey{
		Algorithm: jose.ES256,
		Key:       jose.JSONWebKey{Key: s.clientKey, KeyID: s.clientKid},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return signer
}

// TestInteropZitadelPrivateKeyJWT uses zitadel's own JWT-profile token
// exchanger, unchanged: it signs a client assertion with iss = sub =
// client_id, aud = our issuer, jti, and a lifetime of one hour.
func TestInteropZitadelPrivateKeyJWT(t *testing.T) {
	s := startSTS(t, stsOptions{})
	ctx := interopContext(t)
	hc := s.tester.Client

	te, err := tokenexchange.NewTokenExchangerJWTProfile(ctx, stsBase, keyClient, zitadelSigner(t, s),
		tokenexchange.WithHTTPClient(hc))
	if err != nil {
		t.Fatalf("zitadel token exchanger: %v", err)
	}
	subject := s.idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
	resp, err := tokenexchange.ExchangeToken(ctx, te, subject, oidc.AccessTokenType, "", "",
		nil, []string{audOrders}, []string{"orders.read"}, oidc.AccessTokenType)
	if err != nil {
		t.Fatalf("zitadel's stock private_key_jwt exchange (1h client assertion) was refused: %v", err)
	}
	checkZitadelResponse(t, resp)
	claims := zitadelVerify(t, ctx, hc, stsJWKSURL, resp.AccessToken)
	if claims.Actor == nil || claims.Actor.Subject != keyClient {
		t.Errorf("act %+v, want %s", claims.Actor, keyClient)
	}
	s.verifyMinted(t, resp.AccessToken, audOrders)
}

// shortAssertionExchanger is a zitadel TokenExchanger whose client assertion
// zitadel itself signs (client.SignedJWTProfileAssertion), with a short
// lifetime and the token endpoint as audience.
type shortAssertionExchanger struct {
	endpoint string
	hc       *http.Client
	clientID string
	signer   jose.Signer
	aud      string
}

func (e *shortAssertionExchanger) TokenEndpoint() string    { return e.endpoint }
func (e *shortAssertionExchanger) HttpClient() *http.Client { return e.hc }
func (e *shortAssertionExchanger) AuthFn() (any, error) {
	assertion, err := client.SignedJWTProfileAssertion(e.clientID, []string{e.aud}, time.Minute, e.signer)
	if err != nil {
		return nil, err
	}
	return client.ClientAssertionFormAuthorization(assertion), nil
}

func TestInteropZitadelPrivateKeyJWTShortAssertion(t *testing.T) {
	s := startSTS(t, stsOptions{})
	ctx := interopContext(t)
	hc := s.tester.Client
	cfg, err := client.Discover(ctx, stsBase, hc)
	if err != nil {
		t.Fatalf("zitadel discovery: %v", err)
	}
	signer := zitadelSigner(t, s)
	for _, aud := range []string{cfg.TokenEndpoint, cfg.Issuer} {
		t.Run("aud "+aud, func(t *testing.T) {
			te := &shortAssertionExchanger{endpoint: cfg.TokenEndpoint, hc: hc, clientID: keyClient, signer: signer, aud: aud}
			subject := s.idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "act": map[string]any{"sub": "frontend"}})
			resp, err := tokenexchange.ExchangeToken(ctx, te, subject, oidc.AccessTokenType, "", "",
				nil, []string{audOrders}, []string{"orders.read"}, oidc.AccessTokenType)
			if err != nil {
				t.Fatalf("zitadel ExchangeToken with private_key_jwt: %v", err)
			}
			checkZitadelResponse(t, resp)
			claims := zitadelVerify(t, ctx, hc, cfg.JwksURI, resp.AccessToken)
			if claims.Subject != "alice" || !slices.Equal([]string(claims.Audience), []string{audOrders}) {
				t.Errorf("sub %q aud %v", claims.Subject, claims.Audience)
			}
			if claims.Actor == nil || claims.Actor.Subject != keyClient {
				t.Fatalf("act %+v, want %s", claims.Actor, keyClient)
			}
			if claims.Actor.Actor == nil || claims.Actor.Actor.Subject != "frontend" {
				t.Errorf("prior act lost: %+v", claims.Actor)
			}
			if claims.ClientID != keyClient {
				t.Errorf("client_id %q", claims.ClientID)
			}
			s.verifyMinted(t, resp.AccessToken, audOrders)
		})
	}

	// The same assertion twice: the second is a replay.
	assertion, err := client.SignedJWTProfileAssertion(keyClient, []string{cfg.TokenEndpoint}, time.Minute, signer)
	if err != nil {
		t.Fatal(err)
	}
	fixed := &fixedAuthExchanger{endpoint: cfg.TokenEndpoint, hc: hc, auth: client.ClientAssertionFormAuthorization(assertion)}
	subject := s.idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
	if _, err := tokenexchange.ExchangeToken(ctx, fixed, subject, oidc.AccessTokenType, "", "", nil, []string{audOrders}, nil, ""); err != nil {
		t.Fatalf("first use: %v", err)
	}
	_, err = tokenexchange.ExchangeToken(ctx, fixed, subject, oidc.AccessTokenType, "", "", nil, []string{audOrders}, nil, "")
	var oe *oidc.Error
	if !errors.As(err, &oe) || string(oe.ErrorType) != "invalid_client" {
		t.Errorf("replayed assertion: %v, want invalid_client", err)
	}
}

type fixedAuthExchanger struct {
	endpoint string
	hc       *http.Client
	auth     any
}

func (e *fixedAuthExchanger) TokenEndpoint() string    { return e.endpoint }
func (e *fixedAuthExchanger) HttpClient() *http.Client { return e.hc }
func (e *fixedAuthExchanger) AuthFn() (any, error)     { return e.auth, nil }
