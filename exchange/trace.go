package exchange

import (
	"context"

	"cel.dev/cel-go/cel"

	"encoding/base64"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Trace is the decision record of one exchange: which trust block matched,
// which key verified the token, each check, the scope mapping, every policy
// rule with its value, the scopes kept or dropped and why, the act chain and
// the claims that would be minted, or the first refusal. The engine fills it
// as it works when a caller asks for one (Engine.Explain,
// Engine.ExplainTokenExchange); a nil *Trace records nothing and costs a
// nil check. It never holds a raw token, only its SHA-256.
type Trace struct {
	// Door is "middleware" or "endpoint".
	Door string `json:"door"`
	// TokenSHA256 is the hex SHA-256 of the subject token.
	TokenSHA256 string `json:"token_sha256"`
	// Issuer is the trust block that matched ("" when none did).
	Issuer string `json:"issuer,omitempty"`
	// Steps are the checks in the order they ran; the last one failed
	// when Refusal is set.
	Steps []TraceStep `json:"steps"`
	// ScopeMapping is the issuer's map_scope applied to each scope of the token.
	ScopeMapping []ScopeMapping `json:"scope_mapping,omitempty"`
	// Rules are the CEL rules with their values, in evaluation order.
	Rules []RuleTrace `json:"rules,omitempty"`
	// Scopes tells, for every scope in play, whether it was issued and why.
	Scopes []ScopeDecision `json:"scopes,omitempty"`
	// Act is the act claim that would be minted (nil: impersonation).
	Act map[string]any `json:"act,omitempty"`
	// Claims are the claims that would be minted.
	Claims map[string]any `json:"claims,omitempty"`
	// Refusal is the first refusal, if any.
	Refusal *Refusal `json:"refusal,omitempty"`
}

// TraceStep is one check.
type TraceStep struct {
	Check  string `json:"check"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
}

// ScopeMapping is one external scope and what the issuer's map_scope made of it.
type ScopeMapping struct {
	External string   `json:"external"`
	Internal []string `json:"internal"`
	Note     string   `json:"note"`
}

// RuleTrace is one CEL rule and its value.
type RuleTrace struct {
	Rule   string `json:"rule"`
	Value  any    `json:"value,omitempty"`
	Error  string `json:"error,omitempty"`
	Effect string `json:"effect"`
}

// ScopeDecision tells whether one scope was issued, and why.
type ScopeDecision struct {
	Scope string `json:"scope"`
	Kept  bool   `json:"kept"`
	Why   string `json:"why"`
}

// Refusal is the first refusal: the wire answer and the exact reason.
type Refusal struct {
	// Check is the step that failed.
	Check string `json:"check"`
	// Status and Error are what the front door answers (RFC 6750 on the
	// middleware, RFC 6749/8693 on the endpoint).
	Status int    `json:"status"`
	Error  string `json:"error"`
	// Reason is the stable reason code, Description what the caller is told.
	Reason      string `json:"reason"`
	Description string `json:"description"`
	// Internal is what only the log learns (e.g. the policy rule that denied).
	Internal string `json:"internal,omitempty"`
}

// Explain runs the middleware's exchange of raw for grant, as
// ExchangePresented does but bypassing the minted-token cache, and returns
// its trace. The error is the one the middleware would answer.
func (e *Engine) Explain(ctx context.Context, raw string, binding *Binding, grant *Grant, req *RequestInfo) (*Trace, *Minted, error) {
	t := &Trace{Door: "middleware", TokenSHA256: HashToken(raw)}
	fail := func(check string, err error) (*Trace, *Minted, error) {
		ae := AsError(err)
		status, code := BearerStatus(ae)
		t.refuse(check, ae, status, code)
		return t, nil, err
	}
	if raw == "" {
		t.TokenSHA256 = ""
		return fail("bearer token", &Error{Kind: KindMissingToken, Reason: "missing_token", Description: "no bearer token"})
	}
	g, err := grant.ready()
	if err != nil {
		return fail("route configuration", err)
	}
	opts := VerifyOptions{TokenType: "access_token", MaxActDepth: e.cfg.MaxActDepth, Binding: binding}
	subject, err := e.trust.Verify(ctx, raw, opts)
	if check := t.verification("", raw, opts, subject, err, e.trust); err != nil {
		return fail(check, err)
	}
	m, err := e.Exchange(ExchangeInput{Subject: subject, Actor: e.Actor(), Request: req, Trace: t}, g)
	if err != nil {
		return fail(policyCheck(AsError(err)), withSubject(err, subject))
	}
	return t, m, nil
}

// ExplainTokenExchange runs the token endpoint's exchange for an already
// identified client (its authentication is not part of the explanation)
// and returns its trace.
func (e *Engine) ExplainTokenExchange(ctx context.Context, req *TokenRequest, client *AuthenticatedClient) (*Trace, *Issued, error) {
	t := &Trace{Door: "endpoint", TokenSHA256: HashToken(req.SubjectToken)}
	r := *req
	r.Trace = t
	issued, err := e.TokenExchange(ctx, &r, client)
	if err != nil {
		ae := AsError(err)
		code, status := OAuthError(ae)
		check := policyCheck(ae)
		if n := len(t.Steps); n > 0 && !t.Steps[n-1].OK {
			check = t.Steps[n-1].Check
		}
		t.refuse(check, ae, status, code)
	}
	return t, issued, err
}

// policyCheck names the check of a refusal after verification.
func policyCheck(e *Error) string {
	switch e.Reason {
	case "may_act":
		return "may_act"
	case "impersonate_delegated":
		return "mode"
	case "policy":
		return "policy rules"
	case "insufficient_scope", "invalid_scope":
		return "required scopes"
	case "invalid_target", "unauthorized_client":
		return "targets"
	case "no_signing_key", "signing":
		return "signing"
	case "expired":
		return "lifetime"
	}
	return e.Reason
}

func (t *Trace) refuse(check string, e *Error, status int, code string) {
	if t.Refusal != nil {
		return
	}
	r := &Refusal{Check: check, Status: status, Error: code, Reason: e.Reason, Description: e.Description}
	if e.Err != nil {
		r.Internal = e.Err.Error()
	}
	if n := len(t.Steps); n == 0 || t.Steps[n-1].OK || t.Steps[n-1].Check != check {
		t.Steps = append(t.Steps, TraceStep{Check: check, OK: false, Detail: e.Description})
	}
	t.Refusal = r
}

func (t *Trace) step(check string, ok bool, format string, args ...any) {
	if t == nil {
		return
	}
	t.Steps = append(t.Steps, TraceStep{Check: check, OK: ok, Detail: fmt.Sprintf(format, args...)})
}

// verifyStages are the checks of TrustStore.Verify in the order it runs them.
var verifyStages = []string{
	"size", "format", "algorithm", "issuer", "presented type", "issuer algorithms",
	"typ header", "token kind", "key and signature", "times", "audience", "subject",
	"sender constraint", "scope claim", "act",
}

// verifyStage maps a verification refusal to the check that failed.
func verifyStage(e *Error) string {
	d := e.Description
	switch e.Reason {
	case "too_large":
		return "size"
	case "malformed":
		return "format"
	case "bad_algorithm":
		if strings.Contains(d, "for this issuer") {
			return "issuer algorithms"
		}
		return "algorithm"
	case "untrusted_issuer":
		return "issuer"
	case "token_type":
		switch {
		case strings.Contains(d, "may not be presented"):
			return "presented type"
		case strings.Contains(d, "typ header"):
			return "typ header"
		}
		return "token kind"
	case "unknown_key", "keys_unavailable", "bad_signature":
		return "key and signature"
	case "missing_exp", "expired", "not_yet_valid", "bad_iat":
		return "times"
	case "wrong_audience":
		return "audience"
	case "missing_sub":
		return "subject"
	case "invalid_claims":
		switch {
		case strings.Contains(d, " aud "):
			return "audience"
		case strings.Contains(d, " jti "):
			return "subject"
		case strings.Contains(d, "iss"):
			return "issuer"
		}
		return "times"
	case "bad_cnf", "not_dpop_bound", "sender_constrained", "dpop_key_mismatch", "cert_mismatch":
		return "sender constraint"
	case "bad_scope":
		return "scope claim"
	case "bad_act":
		return "act"
	}
	return e.Reason
}

// verification records the checks of one verification (label "" for the
// subject token, "actor_token" for an actor token) and returns the name of
// the check that failed ("" when none did). The checks before the failing
// one passed; their details come from the token as decoded (unverified) and
// the matched trust block.
func (t *Trace) verification(label, raw string, opts VerifyOptions, s *Subject, err error, ts *TrustStore) string {
	if t == nil {
		return ""
	}
	name := func(check string) string {
		if label == "" {
			return check
		}
		return label + ": " + check
	}
	failed := ""
	if err != nil {
		failed = verifyStage(AsError(err))
	}
	if strings.Count(raw, ".") != 2 && ts.opaque != nil {
		// an opaque token: one RFC 7662 call decides
		if err != nil {
			return name("introspection")
		}
		t.Issuer = s.Issuer
		t.step(name("introspection"), true, "opaque token, active at %s's introspection endpoint (RFC 7662)", s.Issuer)
		t.scopeMapping(s, ts)
		return ""
	}
	hdr, claims := decodeUnverified(raw)
	var ti *trustedIssuer
	if iss, ok := claims["iss"].(string); ok {
		ti = ts.issuers[iss]
	}
	for _, stage := range verifyStages {
		if stage == failed {
			detail := AsError(err).Description
			if extra := failureHint(stage, hdr, claims, ti, ts); extra != "" {
				detail += "; " + extra
			}
			t.step(name(stage), false, "%s", detail)
			return name(stage)
		}
		t.step(name(stage), true, "%s", passedDetail(stage, raw, hdr, claims, ti, ts, opts, s))
		if stage == "issuer" && label == "" && ti != nil {
			t.Issuer = ti.cfg.Issuer
		}
	}
	if label == "" && s != nil {
		t.scopeMapping(s, ts)
	}
	return ""
}

// passedDetail describes a check that passed.
func passedDetail(stage, raw string, hdr jwsHeader, claims map[string]any, ti *trustedIssuer, ts *TrustStore, opts VerifyOptions, s *Subject) string {
	switch stage {
	case "size":
		return fmt.Sprintf("%d bytes, at most %d", len(raw), ts.maxTokenSize)
	case "format":
		return fmt.Sprintf("compact JWS; header alg=%s kid=%q typ=%q", hdr.Alg, hdr.Kid, hdr.Typ)
	case "algorithm":
		return hdr.Alg + " is an accepted signature algorithm (never none or HMAC)"
	case "issuer":
		return fmt.Sprintf("iss %q matched the trust block %q (%s)", ti.cfg.Issuer, ti.cfg.Issuer, keySourceOf(ti.cfg))
	case "presented type":
		return fmt.Sprintf("presented as %s; the issuer's token_types are %s", opts.TokenType, strings.Join(ti.tokenTypes, " "))
	case "issuer algorithms":
		return fmt.Sprintf("%s is on the issuer's allow-list [%s]", hdr.Alg, strings.Join(ti.cfg.Algorithms, " "))
	case "typ header":
		if ti.cfg.RequiredTyp == "" {
			return fmt.Sprintf("typ %q (the trust block requires none)", hdr.Typ)
		}
		return fmt.Sprintf("typ %q is %s", hdr.Typ, ti.cfg.RequiredTyp)
	case "token kind":
		return "not a refresh token, and no ID-token marker claim"
	case "key and signature":
		if s == nil {
			return fmt.Sprintf("signature verified with kid %q", hdr.Kid)
		}
		return fmt.Sprintf("signature verified with kid %q, RFC 7638 thumbprint %s", s.KeyID, s.KeyThumbprint)
	case "times":
		return timesDetail(claims, ts.now(), ts.clockSkew)
	case "audience":
		aud, _ := audienceClaim(claims)
		var hit []string
		for _, a := range aud {
			if slices.Contains(ti.cfg.Audiences, a) || (opts.TokenType == "id_token" && slices.Contains(ti.cfg.ClientIDs, a)) {
				hit = append(hit, a)
			}
		}
		return fmt.Sprintf("aud [%s] includes the accepted %s", strings.Join(aud, " "), strings.Join(hit, " "))
	case "subject":
		return fmt.Sprintf("sub %q", claims["sub"])
	case "sender constraint":
		switch {
		case s == nil:
			return "passed"
		case s.Unbound:
			return "bound (cnf) but accepted without proof: the client may unbind (allow_unbinding)"
		case len(s.Confirmation) > 0:
			return fmt.Sprintf("bound and proven: cnf %v", s.Confirmation)
		}
		return "no cnf: a bearer token"
	case "scope claim":
		if _, ok := claims[ti.cfg.ScopeClaim]; !ok {
			return fmt.Sprintf("no %s claim: the subject holds no scopes", ti.cfg.ScopeClaim)
		}
		return fmt.Sprintf("%s claim well-formed", ti.cfg.ScopeClaim)
	case "act":
		if s == nil || s.Act == nil {
			return "no prior act chain"
		}
		return fmt.Sprintf("prior act chain of depth %d (at most %d)", s.ActDepth, opts.MaxActDepth)
	}
	return ""
}

// failureHint adds what an operator needs to fix a refusal.
func failureHint(stage string, hdr jwsHeader, claims map[string]any, ti *trustedIssuer, ts *TrustStore) string {
	switch stage {
	case "issuer":
		iss, _ := claims["iss"].(string)
		trusted := ts.Issuers()
		hint := fmt.Sprintf("the token's iss is %q; trusted: %s", iss, strings.Join(trusted, ", "))
		for _, tr := range trusted {
			if near(iss, tr) {
				hint += fmt.Sprintf("; did you mean trust %s? iss must match exactly (scheme, host, path, trailing slash)", iss)
				break
			}
		}
		return hint
	case "issuer algorithms":
		return fmt.Sprintf("the token is signed with %s; the trust block allows [%s]: add it to algorithms if the issuer really signs with it", hdr.Alg, strings.Join(ti.cfg.Algorithms, " "))
	case "key and signature":
		return fmt.Sprintf("kid %q, keys from %s", hdr.Kid, keySourceOf(ti.cfg))
	case "audience":
		aud, _ := audienceClaim(claims)
		return fmt.Sprintf("the token's aud is [%s]; the trust block accepts [%s]", strings.Join(aud, " "), strings.Join(ti.cfg.Audiences, " "))
	case "times":
		return timesDetail(claims, ts.now(), ts.clockSkew)
	}
	return ""
}

// near tells whether two issuers differ only in case, a trailing slash or
// the scheme: the usual typos.
func near(a, b string) bool {
	norm := func(s string) string {
		s = strings.ToLower(strings.TrimSuffix(s, "/"))
		s = strings.TrimPrefix(strings.TrimPrefix(s, "https://"), "http://")
		return s
	}
	return a != b && norm(a) == norm(b)
}

func keySourceOf(c IssuerConfig) string {
	switch {
	case c.JWKSURL != "":
		return "jwks_url " + c.JWKSURL
	case c.JWKSFile != "":
		return "jwks_file " + c.JWKSFile
	case c.DiscoveryURL != "":
		return "discovery_url " + c.DiscoveryURL
	case c.Discovery:
		return "discovery at " + c.Issuer
	}
	return "no key source"
}

// timesDetail shows exp, nbf and iat in human time.
func timesDetail(claims map[string]any, now time.Time, skew time.Duration) string {
	var parts []string
	for _, name := range []string{"exp", "nbf", "iat"} {
		if at, ok, err := numericDate(claims, name); ok && err == nil {
			parts = append(parts, fmt.Sprintf("%s %s (%s)", name, at.UTC().Format(time.RFC3339), Relative(at, now)))
		}
	}
	return strings.Join(parts, ", ") + fmt.Sprintf("; now %s, clock skew %s", now.UTC().Format(time.RFC3339), skew)
}

// Relative renders at relative to now: "in 4m59s", "2h0m0s ago".
func Relative(at, now time.Time) string {
	d := at.Sub(now).Round(time.Second)
	if d >= 0 {
		return "in " + d.String()
	}
	return (-d).String() + " ago"
}

// decodeUnverified decodes a compact JWS's header and claims without
// verifying anything: for explanations only.
func decodeUnverified(raw string) (jwsHeader, map[string]any) {
	var hdr jwsHeader
	var claims map[string]any
	parts := strings.Split(raw, ".")
	if len(parts) != 3 {
		return hdr, nil
	}
	if b, err := base64.RawURLEncoding.DecodeString(parts[0]); err == nil {
		_ = json.Unmarshal(b, &hdr)
	}
	if b, err := base64.RawURLEncoding.DecodeString(parts[1]); err == nil {
		_ = json.Unmarshal(b, &claims)
	}
	return hdr, claims
}

// scopeMapping records the issuer's map_scope applied to each scope.
func (t *Trace) scopeMapping(s *Subject, ts *TrustStore) {
	ti := ts.issuers[s.Issuer]
	if ti == nil {
		return
	}
	v, ok := s.Claim(ti.cfg.ScopeClaim)
	if !ok {
		return
	}
	external, err := scopesFromClaim(v)
	if err != nil {
		return
	}
	for _, ext := range external {
		m := ScopeMapping{External: ext, Internal: ti.cfg.Scopes.Apply([]string{ext})}
		_, mapped := ti.cfg.Scopes.Map[ext]
		switch {
		case len(ti.cfg.Scopes.Map) == 0:
			m.Note = "passed through: the issuer has no map_scope"
		case mapped:
			m.Note = "map_scope"
		case ti.cfg.Scopes.PassUnmapped:
			m.Note = "no mapping; kept (pass_unmapped_scopes)"
		default:
			m.Note = "no mapping; dropped (unmapped scopes are dropped unless pass_unmapped_scopes)"
		}
		t.ScopeMapping = append(t.ScopeMapping, m)
	}
}

// rules records every rule of r with its value for in. Rules are
// deterministic, so evaluating each one again gives the value it had.
func (t *Trace) rules(r *Rules, in RuleInput, res *RuleResult) {
	if t == nil || r == nil || r.Empty() {
		return
	}
	act, err := celActivation(r, in)
	if err != nil {
		t.step("policy rules", false, "evaluating rules: %v", err)
		return
	}
	for _, c := range r.allow {
		b, msg := c.evalBool(act)
		t.Rules = append(t.Rules, RuleTrace{Rule: c.label, Value: b, Error: msg, Effect: effect(msg == "" && b, "holds", "does not hold: denies")})
	}
	for _, c := range r.deny {
		b, msg := c.evalBool(act)
		t.Rules = append(t.Rules, RuleTrace{Rule: c.label, Value: b, Error: msg, Effect: effect(msg == "" && !b, "does not hold", "holds (or failed): denies")})
	}
	for _, g := range r.grants {
		b, msg := g.evalBool(act)
		t.Rules = append(t.Rules, RuleTrace{Rule: g.label, Value: b, Error: msg, Effect: effect(msg == "" && b, "grants "+strings.Join(g.scopes, " "), "grants nothing")})
	}
	for _, c := range r.claims {
		v, ok, msg := c.evalClaim(act)
		t.Rules = append(t.Rules, RuleTrace{Rule: c.label, Value: v, Error: msg, Effect: effect(ok && msg == "", "sets claim "+c.name, "claim omitted")})
	}
	if res != nil && res.Denied {
		t.step("policy rules", false, "denied by %s", res.Reason)
		return
	}
	t.step("policy rules", true, "%d rule(s) evaluated, none denies", len(t.Rules))
}

func effect(ok bool, yes, no string) string {
	if ok {
		return yes
	}
	return no
}

// scopes records why each scope in play was issued or not.
func (t *Trace) scopes(grant *Grant, held, ruleGranted, issued []string) {
	if t == nil {
		return
	}
	seen := map[string]bool{}
	add := func(s string) {
		if seen[s] {
			return
		}
		seen[s] = true
		d := ScopeDecision{Scope: s, Kept: slices.Contains(issued, s)}
		inGrant := slices.Contains(grant.Scopes, s)
		switch {
		case d.Kept && slices.Contains(held, s):
			d.Why = "the subject holds it and the grant delegates it"
		case d.Kept:
			d.Why = "granted by a rule, within the grant's scope"
		case !inGrant && (slices.Contains(held, s) || slices.Contains(ruleGranted, s)):
			d.Why = "not in the grant's scope (a grant never widens)"
		default:
			d.Why = "the subject does not hold it and no rule grants it"
		}
		t.Scopes = append(t.Scopes, d)
	}
	for _, s := range grant.Scopes {
		add(s)
	}
	for _, s := range held {
		add(s)
	}
	for _, s := range ruleGranted {
		add(s)
	}
	if missing := missingScopes(grant.RequireScopes, issued); len(missing) > 0 {
		t.step("required scopes", false, "require_scope %s not obtainable", FormatScope(missing))
		return
	}
	t.step("required scopes", true, "issued %q; required %q", FormatScope(issued), FormatScope(grant.RequireScopes))
}

// minted records the claims that would be minted.
func (t *Trace) minted(payload []byte) {
	if t == nil {
		return
	}
	_ = json.Unmarshal(payload, &t.Claims)
	t.Act, _ = t.Claims["act"].(map[string]any)
}

func celActivation(r *Rules, in RuleInput) (cel.Activation, error) {
	return cel.NewActivation(r.activation(in))
}

// mode records delegation or impersonation.
func (t *Trace) mode(grant *Grant, s *Subject) {
	if t == nil {
		return
	}
	if grant.Impersonate {
		t.step("mode", true, "impersonation: no act (the subject carries no prior act)")
		return
	}
	t.step("mode", true, "delegation: the minted act names the actor, the subject's prior act nested inside")
}

// mayAct records the may_act check that passed.
func (t *Trace) mayAct(s *Subject, actor Actor) {
	if t == nil {
		return
	}
	if s.MayAct == nil {
		t.step("may_act", true, "no may_act claim: any actor may act")
		return
	}
	t.step("may_act", true, "may_act names the actor %q", actor.String())
}
