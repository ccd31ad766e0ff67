package exchange

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Defaults of RFC 7662 introspection of opaque tokens.
const (
	DefaultIntrospectionCache         = time.Minute
	DefaultIntrospectionNegativeCache = 5 * time.Second
	DefaultIntrospectionTimeout       = 3 * time.Second
	DefaultIntrospectionConcurrency   = 16
	DefaultIntrospectionCacheEntries  = 10000
	// MaxIntrospectionBodySize caps an introspection response.
	MaxIntrospectionBodySize = 64 << 10
	// introspectionSlotWait is how long a miss waits for a free slot
	// among the concurrent IdP calls before it gets 503.
	introspectionSlotWait = 250 * time.Millisecond
	// introspectionRetryAfter is the Retry-After of a failed introspection.
	introspectionRetryAfter = 2 * time.Second
	// introspectionMarker prefixes the KeyThumbprint of an introspected
	// subject: a cached exchange of it lives only while its introspection
	// result does.
	introspectionMarker = "introspection:"
)

// IntrospectionConfig is how the gateway asks an issuer about its opaque
// tokens (RFC 7662), as a client of that issuer.
type IntrospectionConfig struct {
	// URL is the introspection endpoint; empty with discovery: the
	// metadata's introspection_endpoint.
	URL string
	// ClientID and ClientSecret are the gateway's credentials at the issuer.
	ClientID, ClientSecret string
	// AuthMethod is client_secret_basic (default), client_secret_post or
	// private_key_jwt (RFC 7523, signed with the key of KeyFile).
	AuthMethod string
	// KeyFile is the gateway's private key at the issuer (JWK or PEM), for
	// private_key_jwt.
	KeyFile string
	// JWTResponse asks for RFC 9701 JWT responses only (Accept:
	// application/token-introspection+jwt): a plain JSON answer is then a
	// failed call. Without it, JSON is asked for, and a JWT response the
	// issuer sends anyway is verified all the same.
	JWTResponse bool
	// CacheTTL bounds how long an active result is reused (default
	// DefaultIntrospectionCache); never past the token's exp.
	CacheTTL time.Duration
	// NegativeCacheTTL is how long an inactive or refused result is reused
	// (default DefaultIntrospectionNegativeCache).
	NegativeCacheTTL time.Duration
	// Timeout bounds one call (default DefaultIntrospectionTimeout).
	Timeout time.Duration
	// MaxConcurrent bounds the calls in flight to the issuer (default
	// DefaultIntrospectionConcurrency); a miss that finds no free slot
	// within 250ms gets 503.
	MaxConcurrent int
	// MaxCacheEntries bounds the result cache (default DefaultIntrospectionCacheEntries).
	MaxCacheEntries int

	signer *assertionSigner
}

func (c *IntrospectionConfig) configured() bool {
	return c.URL != "" || c.ClientID != "" || c.ClientSecret != "" || c.AuthMethod != "" || c.KeyFile != "" || c.JWTResponse
}

func validateIntrospection(ic *IssuerConfig, load bool) error {
	c := &ic.Introspection
	if !ic.OpaqueTokens {
		if c.configured() {
			return errors.New("introspection settings need opaque_tokens: only opaque tokens are introspected")
		}
		return nil
	}
	if c.URL == "" && !ic.Discovery {
		return errors.New("opaque_tokens needs introspection_url or discovery (whose metadata offers an introspection_endpoint)")
	}
	if c.URL != "" {
		p, err := url.Parse(c.URL)
		if err != nil || (p.Scheme != "https" && p.Scheme != "http") || p.Host == "" {
			return errors.New("introspection_url must be an absolute http(s) URL")
		}
	}
	if c.ClientID == "" && c.AuthMethod != "private_key_jwt" {
		return errors.New("opaque_tokens needs introspection_client_id and introspection_client_secret (the gateway's credentials at the issuer), or introspection_auth private_key_jwt")
	}
	switch c.AuthMethod {
	case "":
		c.AuthMethod = "client_secret_basic"
	case "client_secret_basic", "client_secret_post", "private_key_jwt":
	default:
		return fmt.Errorf("introspection_auth must be client_secret_basic, client_secret_post or private_key_jwt, not %q", c.AuthMethod)
	}
	if c.AuthMethod == "private_key_jwt" {
		if c.ClientID == "" || c.KeyFile == "" || c.ClientSecret != "" {
			return errors.New("introspection_auth private_key_jwt needs introspection_client_id and introspection_key_file, and no introspection_client_secret")
		}
		if load {
			s, err := loadAssertionKey(c.KeyFile)
			if err != nil {
				return err
			}
			c.signer = s
		}
	} else {
		if c.ClientSecret == "" {
			return errors.New("opaque_tokens needs introspection_client_id and introspection_client_secret (the gateway's credentials at the issuer), or introspection_auth private_key_jwt")
		}
		if c.KeyFile != "" {
			return errors.New("introspection_key_file is used only with introspection_auth private_key_jwt")
		}
	}
	for _, d := range []struct {
		v    *time.Duration
		def  time.Duration
		name string
	}{
		{&c.CacheTTL, DefaultIntrospectionCache, "introspection_cache"},
		{&c.NegativeCacheTTL, DefaultIntrospectionNegativeCache, "introspection_negative_cache"},
		{&c.Timeout, DefaultIntrospectionTimeout, "introspection_timeout"},
	} {
		switch {
		case *d.v < 0:
			return fmt.Errorf("%s must not be negative", d.name)
		case *d.v == 0:
			*d.v = d.def
		}
	}
	if c.MaxConcurrent <= 0 {
		c.MaxConcurrent = DefaultIntrospectionConcurrency
	}
	if c.MaxCacheEntries <= 0 {
		c.MaxCacheEntries = DefaultIntrospectionCacheEntries
	}
	if len(ic.TokenTypes) > 0 && !containsString(ic.TokenTypes, "access_token") {
		return errors.New("opaque_tokens needs access_token among token_types")
	}
	return nil
}

func containsString(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// introspector introspects one issuer's opaque tokens and caches results by
// the token's SHA-256.
type introspector struct {
	ts     *TrustStore
	ti     *trustedIssuer
	cfg    IntrospectionConfig
	client *http.Client
	slots  chan struct{}
	onCall func(issuer, result string)

	calls atomic.Int64

	mu       sync.Mutex
	cache    map[[32]byte]*introResult
	inflight map[[32]byte]*introCall
}

type introResult struct {
	subject *Subject
	err     *Error
	until   time.Time
}

type introCall struct {
	done chan struct{}
	res  *introResult
}

func newIntrospector(ts *TrustStore, ti *trustedIssuer, client *http.Client, onCall func(string, string)) *introspector {
	if client == nil {
		client = &http.Client{}
	}
	return &introspector{
		ts: ts, ti: ti, cfg: ti.cfg.Introspection, client: client, onCall: onCall,
		slots:    make(chan struct{}, ti.cfg.Introspection.MaxConcurrent),
		cache:    map[[32]byte]*introResult{},
		inflight: map[[32]byte]*introCall{},
	}
}

// IntrospectionCalls reports how many introspection requests the gateway
// made to issuer's endpoint.
func (ts *TrustStore) IntrospectionCalls(issuer string) int64 {
	if ts.opaque != nil && ts.opaque.ti.cfg.Issuer == issuer {
		return ts.opaque.calls.Load()
	}
	return 0
}

// verify returns the subject of an opaque token: from the cache, or from one
// call to the issuer shared by every concurrent request for the same token.
func (in *introspector) verify(ctx context.Context, raw string, opts VerifyOptions) (*Subject, error) {
	if opts.TokenType != "access_token" {
		return nil, invalidToken("token_type", "an opaque token is accepted only as an access token")
	}
	key := sha256.Sum256([]byte(raw))
	now := in.ts.now()
	in.mu.Lock()
	if r, ok := in.cache[key]; ok {
		if now.Before(r.until) {
			in.mu.Unlock()
			return r.outcome()
		}
		delete(in.cache, key)
	}
	c, leader := in.inflight[key], false
	if c == nil {
		c, leader = &introCall{done: make(chan struct{})}, true
		in.inflight[key] = c
	}
	in.mu.Unlock()

	if leader {
		// The call is bound to its own timeout, not to the request that
		// caused it, so a client hanging up does not fail its waiters.
		go in.lead(context.WithoutCancel(ctx), raw, key, c, ctx, opts.MaxActDepth)
	}
	select {
	case <-c.done:
		return c.res.outcome()
	case <-ctx.Done():
		return nil, &Error{Kind: KindUnavailable, Reason: "canceled", Description: "request canceled", RetryAfter: introspectionRetryAfter}
	}
}

func (r *introResult) outcome() (*Subject, error) {
	if r.err != nil {
		return nil, r.err
	}
	return r.subject, nil
}

// lead makes the one call for key, caches what may be cached and wakes the
// waiters. reqCtx only bounds the wait for a free slot.
func (in *introspector) lead(ctx context.Context, raw string, key [32]byte, c *introCall, reqCtx context.Context, maxAct int) {
	res := in.call(ctx, reqCtx, raw, maxAct)
	in.mu.Lock()
	delete(in.inflight, key)
	if !res.until.IsZero() {
		in.storeLocked(key, res)
	}
	in.mu.Unlock()
	c.res = res
	close(c.done)
}

// storeLocked caches res, keeping the cache within its bound: expired
// entries go first, then arbitrary ones.
func (in *introspector) storeLocked(key [32]byte, res *introResult) {
	if len(in.cache) >= in.cfg.MaxCacheEntries {
		now := in.ts.now()
		for k, r := range in.cache {
			if !now.Before(r.until) {
				delete(in.cache, k)
			}
		}
		for k := range in.cache {
			if len(in.cache) < in.cfg.MaxCacheEntries {
				break
			}
			delete(in.cache, k)
		}
	}
	in.cache[key] = res
}

// live tells whether the active result for the token of hex hash h is still
// cached: what a cached exchange of an opaque token is bound to.
func (in *introspector) live(h string) bool {
	b, err := hex.DecodeString(h)
	if err != nil || len(b) != 32 {
		return false
	}
	var key [32]byte
	copy(key[:], b)
	in.mu.Lock()
	defer in.mu.Unlock()
	r, ok := in.cache[key]
	return ok && r.subject != nil && in.ts.now().Before(r.until)
}

func (in *introspector) unavailable(reason, description string, err error, raw string) *introResult {
	in.ts.logger.Warn("token introspection failed: the issuer's opaque tokens get 503 until it answers",
		zap.String("issuer", in.ti.cfg.Issuer), zap.String("reason", reason),
		zap.String("subject_token_sha256", HashToken(raw)), zap.Error(err))
	return &introResult{err: &Error{Kind: KindUnavailable, Reason: reason,
		Description: description + "; retry later", Err: err, RetryAfter: introspectionRetryAfter}}
}

// endpoint is the configured introspection URL or the discovered one.
func (in *introspector) endpoint(ctx context.Context) string {
	if in.cfg.URL != "" {
		return in.cfg.URL
	}
	src := in.ti.keys.src
	if md := src.Metadata(); md != nil {
		return md.IntrospectionEndpoint
	}
	// Discovery has not answered yet: one throttled refetch.
	in.ti.keys.refetch(ctx)
	if md := src.Metadata(); md != nil {
		return md.IntrospectionEndpoint
	}
	return ""
}

func (in *introspector) count(result string) {
	if in.onCall != nil {
		in.onCall(in.ti.cfg.Issuer, result)
	}
}

// call asks the issuer once. A result with a zero until is not cached.
func (in *introspector) call(ctx, reqCtx context.Context, raw string, maxAct int) *introResult {
	wait, cancelWait := context.WithTimeout(reqCtx, introspectionSlotWait)
	select {
	case in.slots <- struct{}{}:
		cancelWait()
	case <-wait.Done():
		cancelWait()
		return &introResult{err: &Error{Kind: KindUnavailable, Reason: "introspection_busy",
			Description: "too many token introspections in flight; retry later", RetryAfter: introspectionRetryAfter}}
	}
	defer func() { <-in.slots }()

	endpoint := in.endpoint(ctx)
	if endpoint == "" {
		return in.unavailable("introspection_unknown", "the issuer's introspection endpoint is not known",
			errors.New("no introspection_url, and discovery has not offered an introspection_endpoint"), raw)
	}
	ctx, cancel := context.WithTimeout(ctx, in.cfg.Timeout)
	defer cancel()
	form := url.Values{"token": {raw}, "token_type_hint": {"access_token"}}
	switch in.cfg.AuthMethod {
	case "client_secret_post":
		form.Set("client_id", in.cfg.ClientID)
		form.Set("client_secret", in.cfg.ClientSecret)
	case "private_key_jwt":
		// RFC 7523 §2.2; aud is the endpoint the assertion is sent to.
		assertion, err := in.cfg.signer.sign(in.cfg.ClientID, endpoint, in.ts.now())
		if err != nil {
			return in.unavailable("introspection_failed", "token introspection failed", err, raw)
		}
		form.Set("client_id", in.cfg.ClientID)
		form.Set("client_assertion_type", ClientAssertionTypeJWTBearer)
		form.Set("client_assertion", assertion)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, strings.NewReader(form.Encode()))
	if err != nil {
		return in.unavailable("introspection_failed", "token introspection failed", err, raw)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if in.cfg.JWTResponse {
		req.Header.Set("Accept", IntrospectionJWTMediaType)
	} else {
		req.Header.Set("Accept", "application/json")
	}
	if in.cfg.AuthMethod == "client_secret_basic" {
		// RFC 6749 §2.3.1: both form-urlencoded before Basic.
		req.SetBasicAuth(url.QueryEscape(in.cfg.ClientID), url.QueryEscape(in.cfg.ClientSecret))
	}
	in.calls.Add(1)
	resp, err := in.client.Do(req)
	if err != nil {
		in.count("error")
		return in.unavailable("introspection_failed", "token introspection failed", err, raw)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		in.count("error")
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, MaxIntrospectionBodySize))
		return in.unavailable("introspection_failed", "token introspection failed", fmt.Errorf("HTTP status %d", resp.StatusCode), raw)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxIntrospectionBodySize+1))
	switch {
	case err != nil:
		in.count("error")
		return in.unavailable("introspection_failed", "token introspection failed", fmt.Errorf("reading the response: %w", err), raw)
	case len(body) > MaxIntrospectionBodySize:
		in.count("error")
		return in.unavailable("introspection_failed", "token introspection failed", fmt.Errorf("the response exceeds %d bytes", MaxIntrospectionBodySize), raw)
	}
	var claims map[string]any
	if mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); mt == IntrospectionJWTMediaType {
		// RFC 9701: verified with the issuer's keys, else a failed call.
		if claims, err = in.verifyIntrospectionJWT(ctx, body); err != nil {
			in.count("error")
			return in.unavailable("introspection_bad_jwt", "token introspection failed", err, raw)
		}
	} else {
		if in.cfg.JWTResponse {
			in.count("error")
			return in.unavailable("introspection_failed", "token introspection failed",
				fmt.Errorf("introspection_jwt_response is set and the response is %q, not %s", mt, IntrospectionJWTMediaType), raw)
		}
		if err := checkStrictJSON(body); err != nil {
			in.count("error")
			return in.unavailable("introspection_failed", "token introspection failed", fmt.Errorf("the response is not strict JSON: %w", err), raw)
		}
		if err := json.Unmarshal(body, &claims); err != nil || claims == nil {
			in.count("error")
			return in.unavailable("introspection_failed", "token introspection failed", errors.New("the response is not a JSON object"), raw)
		}
	}
	now := in.ts.now()
	s, until, terr := in.subject(raw, claims, now, maxAct)
	if terr != nil {
		in.count("inactive")
		return &introResult{err: terr, until: now.Add(in.cfg.NegativeCacheTTL)}
	}
	in.count("active")
	return &introResult{subject: s, until: until}
}

// subject checks an introspection response (RFC 7662 §2.2) and builds the
// subject the policy sees, as from a JWT's claims.
func (in *introspector) subject(raw string, claims map[string]any, now time.Time, maxAct int) (*Subject, time.Time, *Error) {
	cfg := &in.ti.cfg
	active, ok := claims["active"].(bool)
	if !ok {
		return nil, time.Time{}, invalidToken("inactive", "the issuer did not say the token is active")
	}
	if !active {
		return nil, time.Time{}, invalidToken("inactive", "token is not active")
	}
	delete(claims, "active")
	for _, name := range []string{"token_type", "typ", "token_use"} {
		if v, ok := claims[name].(string); ok && strings.Contains(strings.ToLower(v), "refresh") {
			return nil, time.Time{}, invalidToken("token_type", "refresh tokens are not accepted")
		}
	}
	if iss, err := stringClaim(claims, "iss"); err != nil || (iss != "" && iss != cfg.Issuer) {
		return nil, time.Time{}, invalidToken("untrusted_issuer", "token issuer is not the introspected issuer")
	}
	aud, err := audienceClaim(claims)
	if err != nil {
		return nil, time.Time{}, invalidToken("invalid_claims", "token aud is not a string or an array of strings")
	}
	if !containsAny(aud, cfg.Audiences) {
		return nil, time.Time{}, invalidToken("wrong_audience", "token audience is not accepted here")
	}
	until := now.Add(in.cfg.CacheTTL)
	expiry := until
	skew := in.ts.clockSkew
	nowS := now.Truncate(time.Second)
	if exp, ok, err := numericDate(claims, "exp"); err != nil {
		return nil, time.Time{}, invalidToken("invalid_claims", "token exp is not a NumericDate")
	} else if ok {
		if !nowS.Before(exp.Truncate(time.Second).Add(skew)) {
			return nil, time.Time{}, invalidToken("expired", "token is expired")
		}
		expiry = exp
		if exp.Before(until) {
			until = exp
		}
	}
	if nbf, ok, err := numericDate(claims, "nbf"); err != nil {
		return nil, time.Time{}, invalidToken("invalid_claims", "token nbf is not a NumericDate")
	} else if ok && nowS.Add(skew).Before(nbf.Truncate(time.Second)) {
		return nil, time.Time{}, invalidToken("not_yet_valid", "token is not valid yet (nbf)")
	}
	sub, err := stringClaim(claims, "sub")
	if err != nil || sub == "" {
		return nil, time.Time{}, invalidToken("missing_sub", "token has no sub")
	}
	jti, err := stringClaim(claims, "jti")
	if err != nil {
		return nil, time.Time{}, invalidToken("invalid_claims", "token jti is not a string")
	}
	// A sender-constrained opaque token is refused: no proof is checked on
	// this path (fail closed).
	if _, _, err := checkConfirmation(claims, nil); err != nil {
		return nil, time.Time{}, err
	}
	h := HashToken(raw)
	s := &Subject{Issuer: cfg.Issuer, Subject: sub, Expiry: expiry, JTI: jti, TokenHash: h,
		KeyThumbprint: introspectionMarker + h, claims: claims}
	// RFC 7662 §2.2: scope is a space-delimited string.
	if v, ok := claims["scope"]; ok {
		external, err := scopesFromClaim(v)
		if err != nil {
			return nil, time.Time{}, invalidToken("bad_scope", "token scope is malformed")
		}
		s.Scopes = cfg.Scopes.Apply(external)
	}
	if v, ok := claims["client_id"].(string); ok {
		s.ClientID = v
	}
	if v, ok := claims["act"]; ok {
		if maxAct <= 0 {
			maxAct = DefaultMaxActDepth
		}
		depth, err := checkActChain(v, maxAct)
		if err != nil {
			return nil, time.Time{}, invalidToken("bad_act", "token act claim refused: %v", err)
		}
		s.Act, _ = v.(map[string]any)
		s.ActDepth = depth
	}
	if v, ok := claims["may_act"]; ok {
		s.MayAct = v
	}
	return s, until, nil
}

func containsAny(have, want []string) bool {
	for _, h := range have {
		if containsString(want, h) {
			return true
		}
	}
	return false
}
