package exchange

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"maps"
	"net/url"
	"slices"
	"strings"
	"time"
)

// TxnEndpointConfig lets the RFC 8693 endpoint issue Transaction Tokens.
type TxnEndpointConfig struct {
	// TrustDomain is the aud of every Txn-Token issued (required).
	TrustDomain string
	// Lifetime of issued Txn-Tokens (default DefaultTxnTokenLifetime).
	Lifetime time.Duration
	// Namespaced prefixes sub with the subject token's issuer (see
	// TxnSubject): set it when several issuers are trusted.
	Namespaced bool
	// AllowSelfSigned and AllowUnsignedJSON accept the draft's
	// self_signed and unsigned_json subject tokens (off by default): the
	// authenticated workload asserts the subject itself, signed with its
	// private_key_jwt key or not at all. The subject is namespaced by the
	// workload, and the scope is never more than the client's.
	AllowSelfSigned, AllowUnsignedJSON bool
}

// Validate checks the configuration.
func (c *TxnEndpointConfig) Validate() error {
	if c.TrustDomain == "" {
		return errors.New("txn_token needs a trust domain (audience)")
	}
	return CheckTxnLifetime(c.Lifetime)
}

// maxTxnContext bounds request_context and request_details, decoded.
const maxTxnContext = 8 << 10

// parseTxnParams reads request_context and request_details: a JSON object,
// sent either as is or base64url-encoded (as the draft's examples do).
func (r *TokenRequest) parseTxnParams(form url.Values) *Error {
	for _, p := range []struct {
		name string
		dst  *map[string]any
	}{{paramRequestContext, &r.RequestContext}, {paramRequestDetails, &r.RequestDetails}} {
		v := form.Get(p.name)
		if v == "" {
			continue
		}
		if r.RequestedTokenType != TokenTypeTxnToken {
			return badRequest("txn_parameter", p.name+" is only meaningful with requested_token_type "+TokenTypeTxnToken)
		}
		m, err := decodeContextObject(v)
		if err != nil {
			return badRequest("invalid_"+p.name, p.name+" must be a JSON object (optionally base64url-encoded) of at most 8 KiB: "+err.Error())
		}
		*p.dst = m
	}
	return nil
}

func decodeContextObject(v string) (map[string]any, error) {
	if len(v) > 2*maxTxnContext {
		return nil, errors.New("too large")
	}
	b := []byte(v)
	if !strings.HasPrefix(strings.TrimSpace(v), "{") {
		var err error
		if b, err = base64.RawURLEncoding.DecodeString(strings.TrimRight(v, "=")); err != nil {
			return nil, errors.New("neither JSON nor base64url")
		}
	}
	if len(b) > maxTxnContext {
		return nil, errors.New("too large")
	}
	if err := checkStrictJSON(b); err != nil {
		return nil, err
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil || m == nil {
		return nil, errors.New("not a JSON object")
	}
	return m, nil
}

// TxnTokenExchange serves requested_token_type txn_token for an
// authenticated client (the requesting workload):
//   - with an access token or JWT as subject token, a new transaction: the
//     subject is verified and the client's policy applied exactly as for
//     an access token (audience is the trust domain, scope ≤ the client's
//     scope ∩ what the subject holds); req_wl is the client, rctx is
//     request_context, tctx is request_details;
//   - with a Txn-Token as subject token, a replacement: txn, sub, aud,
//     req_wl, rctx and tctx are kept, the client is appended to
//     rctx.chain, scope is never wider (narrowed by the request and the
//     client's scope) and exp never later.
//
// The answer's token_type is N_A and there is never a refresh token.
func (e *Engine) TxnTokenExchange(ctx context.Context, req *TokenRequest, client *AuthenticatedClient, cfg *TxnEndpointConfig) (*Issued, error) {
	if cfg == nil {
		return nil, badRequest("unsupported_requested_token_type", "this endpoint does not issue Transaction Tokens")
	}
	for _, a := range req.Audiences {
		if a != cfg.TrustDomain {
			return nil, &Error{Kind: KindInvalidTarget, Reason: "invalid_target", Description: "the audience of a Txn-Token is the trust domain"}
		}
	}
	if len(req.Resources) > 0 {
		return nil, &Error{Kind: KindInvalidTarget, Reason: "invalid_target", Description: "resource is not meaningful for a Txn-Token"}
	}
	if req.ActorToken != "" {
		return nil, badRequest("actor_token", "actor_token is not supported for Txn-Tokens: the requesting workload is the authenticated client")
	}
	var spec TxnSpec
	m := &Minted{Actor: Actor{Subject: client.ClientID, ClientID: client.ClientID}, Audiences: []string{cfg.TrustDomain}, SubjectTokenHash: HashToken(req.SubjectToken)}
	switch req.SubjectTokenTypeName() {
	case "txn_token":
		if req.RequestContext != nil || req.RequestDetails != nil {
			return nil, badRequest("immutable_context", "a replacement Txn-Token keeps the original rctx and tctx: request_context and request_details are not accepted")
		}
		old, err := e.verifyOwnTxn(ctx, req.SubjectToken, cfg.TrustDomain)
		if err != nil {
			return nil, asRequestError(prefixed(AsError(err), "subject_token: "))
		}
		scopes := IntersectScopes(old.Scopes, client.Config.Scopes)
		if len(req.Scopes) > 0 {
			scopes = IntersectScopes(scopes, req.Scopes)
			if len(scopes) == 0 {
				return nil, &Error{Kind: KindInvalidScope, Reason: "invalid_scope", Description: "none of the requested scope is held by the Txn-Token"}
			}
		}
		rctx := maps.Clone(old.Rctx)
		if rctx == nil {
			rctx = map[string]any{}
		}
		chain, _ := rctx["chain"].([]any)
		if len(chain) == 0 {
			chain = []any{old.RequestingWorkload}
		}
		rctx["chain"] = append(slices.Clone(chain), client.ClientID)
		spec = TxnSpec{TrustDomain: cfg.TrustDomain, Lifetime: cfg.Lifetime, NotAfter: old.Expiry, Txn: old.Txn,
			Subject: old.Subject, Scopes: scopes, RequestingWorkload: old.RequestingWorkload, Rctx: rctx, Tctx: old.Tctx}
		m.SubjectIssuer = old.Issuer
	case "access_token", "jwt":
		var proven Binding
		if req.Binding != nil {
			proven = Binding{JKT: req.Binding.JKT, CertThumbprint: req.Binding.CertThumbprint}
		}
		proven.AllowUnbound = client.Config.AllowUnbinding
		subject, err := e.VerifyBound(ctx, req.SubjectToken, req.SubjectTokenTypeName(), &proven)
		if err != nil {
			return nil, asRequestError(prefixed(AsError(err), "subject_token: "))
		}
		if spec, err = e.subjectTxnSpec(subject, m.Actor, req, client, cfg, AuthnTokenExchange, cfg.Namespaced); err != nil {
			return nil, err
		}
		m.SubjectIssuer = subject.Issuer
	case "self_signed", "unsigned_json":
		subject, err := e.workloadSubject(ctx, req, client, cfg)
		if err != nil {
			return nil, asRequestError(prefixed(AsError(err), "subject_token: "))
		}
		// a workload's own statement: its sub is always namespaced by it
		if spec, err = e.subjectTxnSpec(subject, m.Actor, req, client, cfg, req.SubjectTokenType, true); err != nil {
			return nil, err
		}
		m.SubjectIssuer = subject.Issuer
	default:
		return nil, badRequest("unsupported_token_type", "a Txn-Token is issued for an access token, a JWT, a Txn-Token (replacement), or where allowed a self_signed or unsigned_json subject token")
	}
	t, err := e.MintTxnToken(spec)
	if err != nil {
		return nil, err
	}
	m.Token, m.Subject, m.Scopes, m.JTI, m.IssuedAt, m.Expiry = t.Raw, t.Subject, t.Scopes, t.Txn, t.IssuedAt, t.Expiry
	issued := &Issued{AccessToken: t.Raw, IssuedTokenType: TokenTypeTxnToken, TokenType: "N_A",
		ExpiresIn: max(1, int64(t.Expiry.Sub(e.cfg.Now()).Round(time.Second)/time.Second)), Minted: m}
	if granted := FormatScope(t.Scopes); granted != FormatScope(req.Scopes) {
		issued.Scope = granted
	}
	return issued, nil
}

// subjectTxnSpec describes the Txn-Token for a verified subject: the
// client's policy (may_act, rules, scope narrowing) is the one of an
// access-token exchange, and its result gives sub and scope; rctx is the
// request's request_context, with authn as its default "authn".
func (e *Engine) subjectTxnSpec(subject *Subject, actor Actor, req *TokenRequest, client *AuthenticatedClient, cfg *TxnEndpointConfig, authn string, namespaced bool) (TxnSpec, error) {
	ceiling := client.Config.Scopes
	if len(req.Scopes) > 0 {
		ceiling = IntersectScopes(req.Scopes, ceiling)
	}
	grant := &Grant{Audiences: []string{cfg.TrustDomain}, Scopes: ceiling, ClientID: client.ClientID, Rules: client.Config.Rules}
	policy, err := e.Exchange(ExchangeInput{Subject: subject, Actor: actor, Client: client.ClientID}, grant)
	if err != nil {
		return TxnSpec{}, asRequestError(AsError(withSubject(err, subject)))
	}
	if len(req.Scopes) > 0 && len(policy.Scopes) == 0 {
		return TxnSpec{}, &Error{Kind: KindInvalidScope, Reason: "invalid_scope", Description: "none of the requested scope can be granted"}
	}
	rctx := maps.Clone(req.RequestContext)
	if rctx == nil {
		rctx = map[string]any{}
	}
	if _, ok := rctx["authn"]; !ok {
		rctx["authn"] = authn
	}
	return TxnSpec{TrustDomain: cfg.TrustDomain, Lifetime: cfg.Lifetime, NotAfter: subject.Expiry,
		Subject: TxnSubject(subject.Issuer, subject.Subject, namespaced), Scopes: policy.Scopes,
		RequestingWorkload: client.ClientID, Rctx: rctx, Tctx: req.RequestDetails}, nil
}

// workloadSubject reads a self_signed or unsigned_json subject token: the
// authenticated workload's own statement of the subject (draft-ietf-oauth-
// transaction-tokens). Each is refused unless allowed. A self_signed token
// must verify with the client's private_key_jwt keys; both need a sub and
// may carry a scope, and the subject's issuer is the workload.
func (e *Engine) workloadSubject(ctx context.Context, req *TokenRequest, client *AuthenticatedClient, cfg *TxnEndpointConfig) (*Subject, error) {
	var claims map[string]any
	now := e.cfg.Now()
	switch req.SubjectTokenTypeName() {
	case "unsigned_json":
		if !cfg.AllowUnsignedJSON {
			return nil, badRequest("unsupported_token_type", "unsigned_json subject tokens are not allowed here (allow_subject_types)")
		}
		m, err := decodeContextObject(req.SubjectToken)
		if err != nil {
			return nil, invalidToken("malformed", "unsigned_json subject token is not a JSON object: %v", err)
		}
		claims = m
	default:
		if !cfg.AllowSelfSigned {
			return nil, badRequest("unsupported_token_type", "self_signed subject tokens are not allowed here (allow_subject_types)")
		}
		if req.SelfSigned == nil {
			return nil, invalidToken("unknown_key", "self_signed subject tokens need a client that authenticates with private_key_jwt keys")
		}
		m, err := req.SelfSigned(ctx, client.ClientID, req.SubjectToken)
		if err != nil {
			return nil, err
		}
		claims = m
	}
	sub, err := stringClaim(claims, "sub")
	if err != nil || sub == "" {
		return nil, invalidToken("missing_sub", "the workload's subject token has no sub")
	}
	s := &Subject{Issuer: client.ClientID, Subject: sub, Expiry: now.Add(DefaultTxnTokenLifetime), TokenHash: HashToken(req.SubjectToken), claims: claims}
	if exp, ok, err := numericDate(claims, "exp"); err != nil {
		return nil, invalidToken("invalid_claims", "subject token exp is not a NumericDate")
	} else if ok && exp.Before(s.Expiry) {
		s.Expiry = exp
	}
	if v, ok := claims["scope"]; ok {
		if s.Scopes, err = scopesFromClaim(v); err != nil {
			return nil, invalidToken("bad_scope", "the workload's subject token scope is malformed")
		}
	}
	return s, nil
}
