package exchange

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// DefaultTokenLifetime caps how long a minted token lives.
const DefaultTokenLifetime = 5 * time.Minute

// registeredClaims may never be copied from the subject or computed by
// configuration: they are the minting engine's to set.
var registeredClaims = []string{
	"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "act", "scope", "scp", "client_id", "may_act", "cnf",
}

// IsRegisteredClaim tells whether name is one of the claims only the engine sets.
func IsRegisteredClaim(name string) bool { return slices.Contains(registeredClaims, name) }

// EngineConfig configures the exchange engine.
type EngineConfig struct {
	// Issuer is the `iss` of every minted token.
	Issuer string
	// Actor is act.sub of in-process exchanges (default: Issuer).
	Actor string
	// TokenLifetime caps minted tokens (default 5m); never past the subject's exp.
	TokenLifetime time.Duration
	// MaxActDepth bounds a subject's act chain (default 5).
	MaxActDepth int
	// Now is the clock (default time.Now).
	Now func() time.Time
	// CacheSize bounds the minted-token cache (default DefaultCacheMaxEntries);
	// DisableCache turns it off.
	CacheSize    int
	DisableCache bool
}

// Engine is the one exchange engine both front doors share: it verifies
// subject tokens (Trust), applies policy and mints (Signer).
type Engine struct {
	cfg    EngineConfig
	trust  *TrustStore
	signer atomic.Pointer[Signer]
	cache  *Cache
}

// NewEngine checks the configuration and assembles an engine. signer may be
// nil when the key is loaded later (SetSigner): a host that must not touch
// its key storage while only validating a configuration loads it at start;
// until then every exchange answers KindUnavailable.
func NewEngine(cfg EngineConfig, trust *TrustStore, signer *Signer) (*Engine, error) {
	if cfg.Issuer == "" {
		return nil, errors.New("issuer is required: it is the iss of every minted token")
	}
	if trust == nil {
		return nil, errors.New("engine needs a trust store")
	}
	if cfg.Actor == "" {
		cfg.Actor = cfg.Issuer
	}
	if cfg.TokenLifetime <= 0 {
		cfg.TokenLifetime = DefaultTokenLifetime
	}
	if cfg.MaxActDepth <= 0 {
		cfg.MaxActDepth = DefaultMaxActDepth
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	e := &Engine{cfg: cfg, trust: trust}
	if signer != nil {
		e.signer.Store(signer)
	}
	if !cfg.DisableCache {
		e.cache = NewCache(CacheConfig{MaxEntries: cfg.CacheSize, Now: cfg.Now})
	}
	return e, nil
}

// Cache is the minted-token cache (nil when disabled).
func (e *Engine) Cache() *Cache { return e.cache }

// Actor is the gateway's own actor identity.
func (e *Engine) Actor() Actor { return Actor{Subject: e.cfg.Actor} }

// Signer is the engine's signer; nil until one is set.
func (e *Engine) Signer() *Signer { return e.signer.Load() }

// TokenLifetime is the longest a minted token lives.
func (e *Engine) TokenLifetime() time.Duration { return e.cfg.TokenLifetime }

// SetSigner sets (or replaces) the key minted tokens are signed with.
func (e *Engine) SetSigner(s *Signer) { e.signer.Store(s) }

// Grant is what one exchange may issue: the route's (or client's) policy.
type Grant struct {
	// Audiences of the minted token (at least one).
	Audiences []string
	// Scopes is the most this grant delegates; issued scopes are
	// Scopes ∩ the subject's (mapped) scopes.
	Scopes []string
	// RequireScopes must all be issued, else KindInsufficientScope.
	RequireScopes []string
	// Claims are subject claims copied into the minted token.
	Claims []string
	// Impersonate mints without act (RFC 8693 impersonation).
	Impersonate bool
	// ClientID overrides the minted client_id (the endpoint's client).
	ClientID string
	// Rules are the grant's CEL policy (nil: none).
	Rules *Rules
	// BindCertThumbprint, when set, binds every minted token to the client
	// certificate the gateway presents upstream (RFC 8705 cnf.x5t#S256), so
	// an upstream that requires certificate-bound tokens accepts only tokens
	// that came through this gateway.
	BindCertThumbprint string
	// Resource, when set, is the protected resource this grant serves
	// (RFC 8707, RFC 9728): the subject token's aud must name it, and its
	// issuer must be trusted for it as an audience.
	Resource string

	// cacheID names everything above that shapes a minted token; empty
	// means the grant's results are not cacheable. Set by Validate.
	cacheID   string
	validated bool
}

// NewGrant checks a grant and returns it ready for use: the one way to
// make a grant whose results can be cached.
func NewGrant(g Grant) (*Grant, error) {
	if err := g.Validate(); err != nil {
		return nil, err
	}
	return &g, nil
}

// ready returns g validated: g itself when it already is, else a validated
// copy (a grant built as a literal still works, and still caches, at the
// cost of validating it on each call).
func (g *Grant) ready() (*Grant, error) {
	if g.validated {
		return g, nil
	}
	c := *g
	if err := c.Validate(); err != nil {
		return nil, &Error{Kind: KindServer, Reason: "invalid_grant_config", Description: "internal error", Err: err}
	}
	return &c, nil
}

// ExchangeInput is what one exchange acts on, beyond the grant.
type ExchangeInput struct {
	// Subject is the verified subject token.
	Subject *Subject
	// Actor is who acts: the gateway, the client, or the actor token's subject.
	Actor Actor
	// ActorToken is the verified actor token, if one was presented.
	ActorToken *Subject
	// Client is the endpoint's authenticated client_id ("" on the middleware).
	Client string
	// Request describes the HTTP request on the middleware (nil on the endpoint).
	Request *RequestInfo
	// Confirmation, when set, binds the minted token (its cnf claim:
	// jkt and/or x5t#S256).
	Confirmation map[string]string
	// Trace, when set, records each decision (see Trace); nil costs nothing.
	Trace *Trace
}

// Validate checks a grant at configuration time.
func (g *Grant) Validate() error {
	if len(g.Audiences) == 0 {
		return errors.New("at least one audience is required: add `audience <aud>` (the aud the upstream API expects, e.g. audience https://orders.internal) to this block, or write it inline: token_exchange https://orders.internal")
	}
	for _, c := range g.Claims {
		if IsRegisteredClaim(c) {
			return fmt.Errorf("claim %q is set by the engine and cannot be copied", c)
		}
	}
	if g.Resource != "" {
		if _, err := CheckResourceURL(g.Resource); err != nil {
			return err
		}
	}
	for _, s := range g.RequireScopes {
		if !slices.Contains(g.Scopes, s) {
			return fmt.Errorf("require_scope '%s' is not among the route's scope: add it to scope, or remove it from require_scope", s)
		}
	}
	g.cacheID = g.identity()
	g.validated = true
	return nil
}

// identity is the cache identity of a grant: every field that shapes the
// minted token, length-prefixed by NewCacheKey's encoding of each part. A
// grant whose rules read the request is not cacheable (""): its result can
// differ between two requests with the same token.
func (g *Grant) identity() string {
	if g.Rules != nil && g.Rules.readsRequest() {
		return ""
	}
	var b strings.Builder
	part := func(name string, vals ...string) {
		fmt.Fprintf(&b, "%s=%d", name, len(vals))
		for _, v := range vals {
			fmt.Fprintf(&b, ":%d:%s", len(v), v)
		}
		b.WriteByte(';')
	}
	part("aud", g.Audiences...)
	part("scope", g.Scopes...)
	part("require", g.RequireScopes...)
	part("claims", g.Claims...)
	part("impersonate", fmt.Sprint(g.Impersonate))
	part("client", g.ClientID)
	part("bind", g.BindCertThumbprint)
	part("resource", g.Resource)
	if g.Rules != nil {
		part("rules", g.Rules.fingerprint()...)
	}
	return b.String()
}

// Minted is the outcome of a successful exchange.
type Minted struct {
	Token     string
	Subject   string
	Actor     Actor
	Audiences []string
	Scopes    []string
	JTI       string
	IssuedAt  time.Time
	Expiry    time.Time
	// SubjectIssuer and SubjectTokenHash describe the inbound token for audit.
	SubjectIssuer    string
	SubjectTokenHash string
	// ActChain is the minted act claim (nil under impersonation).
	ActChain map[string]any
	// Cached tells that this result came from the minted-token cache.
	Cached bool
	// SignerKID is the kid of the gateway key that signed Token.
	SignerKID string
	// Confirmation is the minted token's cnf (nil: not bound).
	Confirmation map[string]string
	// Unbound tells that the subject token was bound (cnf) and accepted
	// without proof of possession (a client with allow_unbinding).
	Unbound bool
	// SubjectClaims are the verified subject token's claims (shared: read
	// only), for what is computed beside the minted token (a Txn-Token's tctx).
	SubjectClaims map[string]any
}

// ExchangeBearer is the in-process exchange of the middleware: it verifies a
// bearer token as an access token and mints for grant with the gateway as
// actor. req describes the HTTP request for policy rules (may be nil).
func (e *Engine) ExchangeBearer(ctx context.Context, raw string, grant *Grant, req *RequestInfo) (*Minted, error) {
	return e.ExchangePresented(ctx, raw, nil, grant, req)
}

// ExchangePresented is ExchangeBearer for a token presented with what its
// presenter proved on this request (a DPoP proof's key, the client
// certificate): a sender-constrained token is accepted only when binding
// matches its cnf. A cached result is reused only for the same binding.
func (e *Engine) ExchangePresented(ctx context.Context, raw string, binding *Binding, grant *Grant, req *RequestInfo) (*Minted, error) {
	if raw == "" {
		return nil, &Error{Kind: KindMissingToken, Reason: "missing_token", Description: "no bearer token"}
	}
	grant, err := grant.ready()
	if err != nil {
		return nil, err
	}
	if err := e.trust.checkSize(raw); err != nil {
		return nil, err // before anything hashes it
	}
	digest := DigestToken(raw) // once: for the cache key and for the logs
	mint := func() (*Minted, *Subject, error) {
		subject, err := e.trust.Verify(ctx, raw, VerifyOptions{TokenType: "access_token", MaxActDepth: e.cfg.MaxActDepth, Binding: binding, TokenHash: digest.Hex()})
		if err != nil {
			return nil, nil, err
		}
		if err := e.trust.checkResource(subject, grant.Resource); err != nil {
			return nil, nil, withSubject(err, subject)
		}
		m, err := e.Exchange(ExchangeInput{Subject: subject, Actor: e.Actor(), Request: req}, grant)
		return m, subject, withSubject(err, subject)
	}
	if e.cache == nil || grant.cacheID == "" {
		m, _, err := mint()
		return m, err
	}

	// The same immutable token, for the same grant, was already verified and
	// exchanged: reuse the result while it is fresh and the issuer still
	// publishes the key that verified it (the same key material, by RFC 7638
	// thumbprint, not merely the same kid) and its keys are usable.
	key := CacheKeyOf(digest, e.cfg.Actor, grant.cacheID, binding.cacheID())
	mintEntry := func() (*CachedToken, error) {
		m, subject, err := mint()
		if err != nil {
			return nil, err
		}
		return &CachedToken{Minted: m, Issuer: subject.Issuer, KeyThumbprint: subject.KeyThumbprint, SubjectExpiry: subject.Expiry}, nil
	}
	ct, hit, err := e.cache.GetOrMint(key, mintEntry)
	// A token signed by a key the gateway no longer publishes (a rotation
	// with --now withdrew it) would fail upstream: mint anew.
	if err == nil && hit && (!e.trust.hasKey(ct.Issuer, ct.KeyThumbprint) || !e.signer.Load().Publishes(ct.Minted.SignerKID)) {
		e.cache.Delete(key)
		ct, hit, err = e.cache.GetOrMint(key, mintEntry)
	}
	if err != nil {
		return nil, err
	}
	if hit {
		return ct.reusedFor(digest), nil
	}
	return ct.Minted, nil
}

// VerifyPresented checks a bearer access token with what its request
// proved (nil: nothing), as the middleware does before an exchange.
func (e *Engine) VerifyPresented(ctx context.Context, raw string, binding *Binding) (*Subject, error) {
	return e.trust.Verify(ctx, raw, VerifyOptions{TokenType: "access_token", MaxActDepth: e.cfg.MaxActDepth, Binding: binding})
}

// Verify checks an inbound token presented as tokenType (a short name).
func (e *Engine) Verify(ctx context.Context, raw, tokenType string) (*Subject, error) {
	return e.VerifyBound(ctx, raw, tokenType, nil)
}

// VerifyBound is Verify with what the presenter proved (see Binding).
func (e *Engine) VerifyBound(ctx context.Context, raw, tokenType string, binding *Binding) (*Subject, error) {
	return e.trust.Verify(ctx, raw, VerifyOptions{TokenType: tokenType, MaxActDepth: e.cfg.MaxActDepth, Binding: binding})
}

// Exchange applies policy to a verified subject and mints a token for grant.
func (e *Engine) Exchange(in ExchangeInput, grant *Grant) (*Minted, error) {
	subject, actor := in.Subject, in.Actor
	if grant.Impersonate && subject.Act != nil {
		// Impersonation mints without act: the subject's prior actors would
		// vanish and the token come out as the user's own, resetting the
		// act depth limit (the class of bug of keycloak#52691).
		return nil, denied("impersonate_delegated", "a token that already carries act cannot be impersonated; its delegation chain would be lost")
	}
	in.Trace.mode(grant, subject)
	if subject.MayAct != nil {
		actorTokenIssuer := ""
		if in.ActorToken != nil {
			actorTokenIssuer = in.ActorToken.Issuer
		}
		if err := mayActPermits(subject.MayAct, actor, e.cfg.Issuer, subject.Issuer, actorTokenIssuer); err != nil {
			return nil, denied("may_act", "subject token does not permit this actor: %v", err)
		}
	}
	in.Trace.mayAct(subject, actor)
	held := subject.Scopes
	var computed map[string]any
	if grant.Rules != nil && !grant.Rules.Empty() {
		ruleIn := RuleInput{
			Subject: subject.Claims(),
			Request: in.Request,
			Client:  in.Client,
			Route:   RouteInfo{Audiences: grant.Audiences, Scopes: grant.Scopes},
		}
		if in.ActorToken != nil {
			ruleIn.Actor = in.ActorToken.Claims()
		}
		res, err := grant.Rules.Evaluate(ruleIn)
		if err != nil {
			return nil, &Error{Kind: KindServer, Reason: "policy", Description: "internal error", Err: err}
		}
		in.Trace.rules(grant.Rules, ruleIn, res)
		if res.Denied {
			// The rule is policy, not the caller's business: it goes to the
			// log (Err), the caller learns only that policy denied it.
			return nil, &Error{Kind: KindDenied, Reason: "policy", Description: "denied by policy",
				Err: errors.Join(errors.New("rule: "+res.Reason), ruleErrors(res.Errors))}
		}
		// Rule grants add to what the subject holds; the route's (or
		// client's) scope below still caps them: a rule cannot widen.
		held = append(slices.Clone(held), res.Granted...)
		computed = res.Claims
	}
	// Issued = the grant's scope ∩ what the subject holds (rule grants
	// included): never beyond the grant's scope, in its order.
	scopes := IntersectScopes(grant.Scopes, held)
	in.Trace.scopes(grant, subject.Scopes, held[len(subject.Scopes):], scopes)
	if missing := missingScopes(grant.RequireScopes, scopes); len(missing) > 0 {
		return nil, &Error{Kind: KindInsufficientScope, Reason: "insufficient_scope",
			Description: "subject token does not hold the required scope " + FormatScope(missing)}
	}

	now := e.cfg.Now().Truncate(time.Second)
	exp := now.Add(e.cfg.TokenLifetime)
	if subject.Expiry.Before(exp) {
		exp = subject.Expiry
	}
	if !exp.After(now) {
		return nil, invalidToken("expired", "token is expired")
	}
	jti, err := newJTI()
	if err != nil {
		return nil, &Error{Kind: KindServer, Reason: "internal", Description: "internal error", Err: err}
	}

	confirm := in.Confirmation
	if confirm == nil && grant.BindCertThumbprint != "" {
		confirm = map[string]string{"x5t#S256": grant.BindCertThumbprint}
	}
	claims := mintedClaims{
		Iss: e.cfg.Issuer, Sub: subject.Subject, Aud: grant.Audiences,
		Exp: exp.Unix(), Iat: now.Unix(), Nbf: now.Unix(), Jti: jti,
		Scope: FormatScope(scopes), ClientID: grant.ClientID, Cnf: confirm,
	}
	if claims.ClientID == "" {
		claims.ClientID = subject.ClientID
	}
	if claims.ClientID == "" {
		// RFC 9068 requires client_id: when the subject token names no
		// client, the party that obtained this token is the gateway itself.
		claims.ClientID = e.cfg.Actor
	}
	var act map[string]any
	if !grant.Impersonate {
		act = nestAct(actor, subject.Act)
		claims.Act = act
	}
	// Copied claims, then computed ones; never a registered claim.
	var extra map[string]any
	for _, name := range grant.Claims {
		if v, ok := subject.Claim(name); ok && !IsRegisteredClaim(name) {
			if extra == nil {
				extra = make(map[string]any, len(grant.Claims)+len(computed))
			}
			extra[name] = v
		}
	}
	for name, v := range computed {
		if !IsRegisteredClaim(name) {
			if extra == nil {
				extra = make(map[string]any, len(computed))
			}
			extra[name] = v
		}
	}
	payload, err := claims.marshal(extra)
	if err != nil {
		return nil, &Error{Kind: KindServer, Reason: "internal", Description: "internal error", Err: err}
	}
	in.Trace.minted(payload)
	signer := e.signer.Load()
	if signer == nil {
		return nil, &Error{Kind: KindUnavailable, Reason: "no_signing_key", Description: "the signing key is not loaded yet; retry later", RetryAfter: time.Second}
	}
	signed, err := signer.SignPayload(payload)
	signerKID := signer.KeyID()
	if err != nil {
		return nil, &Error{Kind: KindServer, Reason: "signing", Description: "internal error", Err: err}
	}
	return &Minted{
		Token:            signed,
		SignerKID:        signerKID,
		Subject:          subject.Subject,
		Actor:            actor,
		Audiences:        grant.Audiences,
		Scopes:           scopes,
		JTI:              jti,
		IssuedAt:         now,
		Expiry:           exp,
		SubjectIssuer:    subject.Issuer,
		SubjectTokenHash: subject.TokenHash,
		ActChain:         act,
		Confirmation:     confirm,
		SubjectClaims:    subject.Claims(),
	}, nil
}

// mintedClaims is the claims set of a minted token (RFC 9068 §2.2).
type mintedClaims struct {
	Iss      string            `json:"iss"`
	Sub      string            `json:"sub"`
	Aud      []string          `json:"aud"`
	Exp      int64             `json:"exp"`
	Iat      int64             `json:"iat"`
	Nbf      int64             `json:"nbf"`
	Jti      string            `json:"jti"`
	Scope    string            `json:"scope,omitempty"`
	ClientID string            `json:"client_id,omitempty"`
	Act      map[string]any    `json:"act,omitempty"`
	Cnf      map[string]string `json:"cnf,omitempty"`
}

// marshal serializes the claims, in the order of the struct's JSON tags,
// with extra (non-registered) claims appended in name order. It writes the
// JSON itself rather than through encoding/json's reflection: this runs on
// every mint. FuzzMintedClaimsMarshal holds it, byte for byte, to what
// encoding/json writes (without HTML escaping).
func (c *mintedClaims) marshal(extra map[string]any) ([]byte, error) {
	b := make([]byte, 0, 384)
	b = append(b, `{"iss":`...)
	b = appendJSONString(b, c.Iss)
	b = append(b, `,"sub":`...)
	b = appendJSONString(b, c.Sub)
	b = append(b, `,"aud":`...)
	b, _ = appendJSONValue(b, c.Aud) // strings cannot fail
	b = append(b, `,"exp":`...)
	b = strconv.AppendInt(b, c.Exp, 10)
	b = append(b, `,"iat":`...)
	b = strconv.AppendInt(b, c.Iat, 10)
	b = append(b, `,"nbf":`...)
	b = strconv.AppendInt(b, c.Nbf, 10)
	b = append(b, `,"jti":`...)
	b = appendJSONString(b, c.Jti)
	if c.Scope != "" {
		b = append(b, `,"scope":`...)
		b = appendJSONString(b, c.Scope)
	}
	if c.ClientID != "" {
		b = append(b, `,"client_id":`...)
		b = appendJSONString(b, c.ClientID)
	}
	var err error
	if len(c.Act) > 0 {
		b = append(b, `,"act":`...)
		if b, err = appendJSONValue(b, c.Act); err != nil {
			return nil, fmt.Errorf("claim act: %w", err)
		}
	}
	if len(c.Cnf) > 0 {
		b = append(b, `,"cnf":`...)
		b, _ = appendJSONValue(b, c.Cnf) // a map of strings cannot fail
	}
	for _, name := range sortedKeys(extra) {
		b = append(b, ',')
		b = appendJSONString(b, name)
		b = append(b, ':')
		if b, err = appendJSONValue(b, extra[name]); err != nil {
			return nil, fmt.Errorf("claim %s: %w", name, err)
		}
	}
	return append(b, '}'), nil
}

func ruleErrors(msgs []string) error {
	if len(msgs) == 0 {
		return nil
	}
	return errors.New(strings.Join(msgs, "; "))
}

func newJTI() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	return base64.RawURLEncoding.EncodeToString(b[:]), nil
}
