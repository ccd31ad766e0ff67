// Package zitadelsts runs the zitadel/oidc v3 example OpenID Provider
// (github.com/zitadel/oidc/v3/example/server/exampleop with its in-memory
// example storage) as a third-party RFC 8693 token service that accepts
// subject tokens from a foreign identity provider.
//
// The example OP only exchanges tokens it issued itself. zitadel's
// extension point for other issuers' tokens is op.TokenExchangeTokensVerifierStorage
// (VerifyExchangeSubjectToken): Storage implements it on top of the
// example storage, checking the subject token's signature against a JWKS,
// its iss, aud, exp and nbf with jwx v3. It also replaces the example's
// ValidateTokenExchangeRequest, which only lets its own admin user (id1)
// be exchanged without an actor token, with a delegation rule: the
// authenticated client exchanges for a verified subject, scopes are the
// requested ones held by the subject (RFC 8693 down-scoping), and an
// access token is issued unless the client asks for another type.
//
// What the OP issues back: the example's WebClient has access token type
// Bearer, so the exchanged access_token is zitadel's opaque token (its
// token id and subject in a JWE, A256GCMKW/A256GCM, under the OP's own
// key: a compact JWE of five parts, not a signed JWT), expires_in 300.
//
// Client secrets are compared the way the example storage does in
// production use of the example: plain text (AuthorizeClientIDSecret).
//
// It is test and benchmark code: the storage keeps every issued token in
// memory for the life of the process.
package zitadelsts

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"

	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jwt"
	"github.com/zitadel/oidc/v3/example/server/exampleop"
	"github.com/zitadel/oidc/v3/example/server/storage"
	"github.com/zitadel/oidc/v3/pkg/oidc"
	"github.com/zitadel/oidc/v3/pkg/op"
)

// Trust names the identity provider whose tokens the OP accepts as
// subject tokens. Keys must carry "alg" (jwx picks the algorithm from the
// key, never from the token's header).
type Trust struct {
	Issuer   string
	Audience string // the token's aud must contain it
	Keys     jwk.Set
}

// Storage is the example storage plus the token-exchange hooks.
type Storage struct {
	*storage.Storage
	trust      Trust
	jwtClients map[string]bool
}

var (
	_ exampleop.Storage                     = (*Storage)(nil)
	_ op.TokenExchangeStorage               = (*Storage)(nil)
	_ op.TokenExchangeTokensVerifierStorage = (*Storage)(nil)
)

// NewStorage wraps the example storage (its user store for issuer, and
// clients, e.g. storage.WebClient("gw", "secret")).
func NewStorage(issuer string, clients map[string]*storage.Client, trust Trust) *Storage {
	return &Storage{Storage: storage.NewStorageWithClients(storage.NewUserStore(issuer), clients), trust: trust, jwtClients: map[string]bool{}}
}

// IssueJWTs makes the OP issue JWT access tokens (RS256, signed with the
// example storage's 2048-bit RSA key) to these clients instead of opaque
// ones. The example has no constructor for such a client: the client is
// wrapped on lookup. Call it before serving.
func (s *Storage) IssueJWTs(clientIDs ...string) {
	for _, id := range clientIDs {
		s.jwtClients[id] = true
	}
}

type jwtClient struct{ op.Client }

func (jwtClient) AccessTokenType() op.AccessTokenType { return op.AccessTokenTypeJWT }

// GetClientByClientID implements op.Storage, wrapping the clients of
// IssueJWTs.
func (s *Storage) GetClientByClientID(ctx context.Context, clientID string) (op.Client, error) {
	c, err := s.Storage.GetClientByClientID(ctx, clientID)
	if err != nil || !s.jwtClients[clientID] {
		return c, err
	}
	return jwtClient{c}, nil
}

// Handler is the example OP (discovery, /oauth/token, /keys, ...) for
// issuer over s. A nil logger keeps the example's default: one info line
// per request through slog's default logger.
func Handler(issuer string, s *Storage, logger *slog.Logger) http.Handler {
	return exampleop.SetupServer(issuer, s, logger, false)
}

// ErrUntrusted is what VerifyExchangeSubjectToken answers for a token it
// does not accept (the OP turns it into invalid_request).
var ErrUntrusted = errors.New("zitadelsts: subject token not accepted")

// VerifyExchangeSubjectToken implements op.TokenExchangeTokensVerifierStorage:
// a JWT from the trusted issuer, signature checked against its keys.
func (s *Storage) VerifyExchangeSubjectToken(_ context.Context, token string, tokenType oidc.TokenType) (string, string, map[string]any, error) {
	if tokenType != oidc.AccessTokenType && tokenType != oidc.JWTTokenType {
		return "", "", nil, fmt.Errorf("%w: subject_token_type %s", ErrUntrusted, tokenType)
	}
	t, err := jwt.Parse([]byte(token),
		jwt.WithKeySet(s.trust.Keys),
		jwt.WithValidate(true),
		jwt.WithIssuer(s.trust.Issuer),
		jwt.WithAudience(s.trust.Audience),
	)
	if err != nil {
		return "", "", nil, fmt.Errorf("%w: %v", ErrUntrusted, err)
	}
	sub, ok := t.Subject()
	if !ok || sub == "" {
		return "", "", nil, fmt.Errorf("%w: no sub", ErrUntrusted)
	}
	claims := map[string]any{"iss": s.trust.Issuer, "sub": sub}
	var scope string
	if t.Get("scope", &scope) == nil {
		claims["scope"] = scope
	}
	id := token
	if jti, ok := t.JwtID(); ok && jti != "" {
		id = jti
	}
	return id, sub, claims, nil
}

// VerifyExchangeActorToken implements op.TokenExchangeTokensVerifierStorage
// with the same rule as subject tokens.
func (s *Storage) VerifyExchangeActorToken(ctx context.Context, token string, tokenType oidc.TokenType) (string, string, map[string]any, error) {
	return s.VerifyExchangeSubjectToken(ctx, token, tokenType)
}

// ValidateTokenExchangeRequest implements op.TokenExchangeStorage for
// foreign subjects: delegation to the authenticated client, scopes cut
// down to those the subject holds.
func (s *Storage) ValidateTokenExchangeRequest(_ context.Context, request op.TokenExchangeRequest) error {
	switch request.GetRequestedTokenType() {
	case "":
		request.SetRequestedTokenType(oidc.AccessTokenType)
	case oidc.AccessTokenType:
	default:
		return oidc.ErrInvalidRequest().WithDescription("only access tokens are issued")
	}
	held, _ := request.GetExchangeSubjectTokenClaims()["scope"].(string)
	heldScopes := strings.Fields(held)
	var granted []string
	for _, sc := range request.GetScopes() {
		if slices.Contains(heldScopes, sc) {
			granted = append(granted, sc)
		}
	}
	if len(request.GetScopes()) > 0 && len(granted) == 0 {
		return oidc.ErrInvalidScope().WithDescription("the subject holds none of the requested scopes")
	}
	if len(request.GetScopes()) == 0 {
		granted = heldScopes
	}
	request.SetCurrentScopes(granted)
	return nil
}
