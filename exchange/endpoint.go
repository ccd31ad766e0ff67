package exchange

import (
	"context"
	"slices"
	"time"
)

// Issued is the RFC 8693 §2.2.1 response of the token endpoint.
type Issued struct {
	AccessToken     string `json:"access_token"`
	IssuedTokenType string `json:"issued_token_type"`
	TokenType       string `json:"token_type"`
	ExpiresIn       int64  `json:"expires_in"`
	Scope           string `json:"scope,omitempty"`

	// Minted describes the token for audit logs; not part of the response.
	Minted *Minted `json:"-"`
}

// TokenExchange serves one RFC 8693 request of an authenticated client, with
// the same verification, policy and minting as the middleware. Its errors use
// the codes of RFC 8693 §2.2.2: an invalid or unacceptable subject or actor
// token is KindInvalidRequest, an audience or resource the client may not
// have is KindInvalidTarget, a requested scope of which nothing can be granted
// is KindInvalidScope.
func (e *Engine) TokenExchange(ctx context.Context, req *TokenRequest, client *AuthenticatedClient) (*Issued, error) {
	cfg := client.Config
	if len(cfg.Audiences) == 0 && len(cfg.Resources) == 0 {
		return nil, &Error{Kind: KindUnauthorizedClient, Reason: "unauthorized_client",
			Description: "client may not exchange tokens: it has no audience or resource configured"}
	}

	// Targets: each requested audience and resource must be allowed; none is
	// ever dropped silently. Without any, the client's audiences are used.
	for _, a := range req.Audiences {
		if !slices.Contains(cfg.Audiences, a) {
			return nil, &Error{Kind: KindInvalidTarget, Reason: "invalid_target", Description: "a requested audience is not allowed for this client"}
		}
	}
	for _, r := range req.Resources {
		if !slices.Contains(cfg.Resources, r) {
			return nil, &Error{Kind: KindInvalidTarget, Reason: "invalid_target", Description: "a requested resource is not allowed for this client"}
		}
	}
	audiences := append(slices.Clone(req.Audiences), req.Resources...)
	if len(audiences) == 0 {
		audiences = slices.Clone(cfg.Audiences)
		if len(audiences) == 0 {
			audiences = slices.Clone(cfg.Resources)
		}
	}
	req.Trace.step("targets", true, "client %s may have audiences %q", client.ClientID, audiences)

	subjectType := req.SubjectTokenTypeName()
	switch subjectType {
	case "refresh_token":
		return nil, asRequestError(invalidToken("token_type", "refresh tokens are never accepted as subject tokens"))
	case "saml1":
		return nil, asRequestError(invalidToken("token_type", "SAML 1.1 subject tokens are not supported; send a SAML 2.0 assertion (saml2)"))
	}
	// Sender constraints: a bound subject token is exchanged only when the
	// client proves possession (a DPoP proof to this endpoint, the bound
	// certificate on the connection), or may unbind it (allow_unbinding).
	var proven Binding
	if req.Binding != nil {
		proven = Binding{JKT: req.Binding.JKT, CertThumbprint: req.Binding.CertThumbprint}
	}
	subjectBinding := proven
	subjectBinding.AllowUnbound = cfg.AllowUnbinding
	var subject *Subject
	var err error
	if subjectType == "saml2" {
		subject, err = e.trust.verifySAML(req.SubjectToken)
	} else {
		subject, err = e.VerifyBound(ctx, req.SubjectToken, subjectType, &subjectBinding)
	}
	req.Trace.verification("", req.SubjectToken, VerifyOptions{TokenType: subjectType, MaxActDepth: e.cfg.MaxActDepth, Binding: &subjectBinding}, subject, err, e.trust)
	if err != nil {
		return nil, asRequestError(prefixed(AsError(err), "subject_token: "))
	}
	if subjectType == "id_token" && !issuedTo(subject, client.ClientID) {
		return nil, badRequest("id_token_client", "subject_token: the ID token was not issued to this client")
	}

	actor := Actor{Subject: client.ClientID, ClientID: client.ClientID}
	impersonate := false
	var actorSubject *Subject
	if req.ActorToken != "" {
		actorType := req.ActorTokenTypeName()
		if actorType == "refresh_token" || actorType == "saml1" || actorType == "saml2" {
			return nil, asRequestError(invalidToken("token_type", "actor_token type is not supported"))
		}
		actorSubject, err = e.VerifyBound(ctx, req.ActorToken, actorType, &proven)
		req.Trace.verification("actor_token", req.ActorToken, VerifyOptions{TokenType: actorType, MaxActDepth: e.cfg.MaxActDepth, Binding: &proven}, actorSubject, err, e.trust)
		if err != nil {
			return nil, asRequestError(prefixed(AsError(err), "actor_token: "))
		}
		if actorType == "id_token" && !issuedTo(actorSubject, client.ClientID) {
			return nil, badRequest("id_token_client", "actor_token: the ID token was not issued to this client")
		}
		actor = Actor{Subject: actorSubject.Subject}
		if actorSubject.Issuer != e.cfg.Issuer {
			actor.Issuer = actorSubject.Issuer
		}
	} else if cfg.MayImpersonate {
		// No actor token and a client trusted to impersonate: RFC 8693
		// impersonation, the minted token carries no act.
		impersonate = true
	}

	// Scopes: what was asked (or, if nothing, all the client may have),
	// never beyond the client's ceiling, then cut to what the subject holds.
	ceiling := cfg.Scopes
	if len(req.Scopes) > 0 {
		ceiling = IntersectScopes(req.Scopes, cfg.Scopes)
	}
	// What we mint keeps the binding that was proven: a DPoP proof to the
	// token endpoint binds the issued token to its key (RFC 9449 §5), and a
	// certificate-bound subject token stays bound to that certificate
	// (RFC 8705 §3). Only allow_unbinding mints an unbound token from a
	// bound one, and the front door logs it (Minted.Unbound).
	var confirm map[string]string
	if proven.JKT != "" {
		confirm = map[string]string{"jkt": proven.JKT}
	}
	if x5t, ok := subject.Confirmation["x5t#S256"]; ok {
		if confirm == nil {
			confirm = make(map[string]string, 1)
		}
		confirm["x5t#S256"] = x5t
	}
	grant := &Grant{Audiences: audiences, Scopes: ceiling, ClientID: client.ClientID, Impersonate: impersonate, Rules: cfg.Rules}
	minted, err := e.Exchange(ExchangeInput{Subject: subject, Actor: actor, ActorToken: actorSubject, Client: client.ClientID, Confirmation: confirm, Trace: req.Trace}, grant)
	if err != nil {
		return nil, asRequestError(AsError(withSubject(err, subject)))
	}
	if len(req.Scopes) > 0 && len(minted.Scopes) == 0 {
		return nil, &Error{Kind: KindInvalidScope, Reason: "invalid_scope", Description: "none of the requested scope can be granted"}
	}

	issued := &Issued{
		AccessToken:     minted.Token,
		IssuedTokenType: req.RequestedTokenType,
		TokenType:       "N_A",
		ExpiresIn:       int64(minted.Expiry.Sub(e.cfg.Now()).Round(time.Second) / time.Second),
		Minted:          minted,
	}
	if issued.IssuedTokenType == "" {
		issued.IssuedTokenType = TokenTypeAccessToken
	}
	if issued.IssuedTokenType == TokenTypeAccessToken {
		issued.TokenType = "Bearer"
		if confirm["jkt"] != "" {
			issued.TokenType = "DPoP" // RFC 9449 §5
		}
	}
	minted.Unbound = subject.Unbound
	if issued.ExpiresIn < 1 {
		issued.ExpiresIn = 1
	}
	// RFC 8693 §2.2.1: scope is required when it differs from the request.
	if granted := FormatScope(minted.Scopes); granted != FormatScope(req.Scopes) {
		issued.Scope = granted
	}
	return issued, nil
}

// issuedTo tells whether an ID token was issued to clientID: its azp, or
// its aud (OIDC Core §2). Any listed client_ids of the issuer are not
// enough: one client must not exchange another client's ID tokens.
func issuedTo(s *Subject, clientID string) bool {
	if azp, ok := s.Claim("azp"); ok {
		return azp == clientID
	}
	aud, err := audienceClaim(s.Claims())
	return err == nil && slices.Contains(aud, clientID)
}

// asRequestError maps verification and policy failures to the codes RFC 8693
// §2.2.2 prescribes for the endpoint: an invalid or unacceptable token is
// invalid_request (not invalid_grant), a scope that cannot be had is
// invalid_scope.
func asRequestError(e *Error) *Error {
	out := *e
	switch e.Kind {
	case KindInvalidToken, KindDenied, KindMissingToken:
		out.Kind = KindInvalidRequest
	case KindInsufficientScope:
		out.Kind = KindInvalidScope
	}
	return &out
}

func prefixed(e *Error, prefix string) *Error {
	out := *e
	out.Description = prefix + e.Description
	return &out
}
