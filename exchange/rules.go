package exchange

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/common/types"
	"cel.dev/cel-go/common/types/ref"
	"cel.dev/cel-go/common/types/traits"
	"cel.dev/cel-go/ext"
)

// DefaultRuleCostLimit bounds the runtime cost of evaluating one rule
// expression (cel-go cost units, roughly one per operation, more for string
// and list work proportional to their size). Subject claims are the caller's
// data: the limit keeps a huge claim from turning a rule into a CPU sink.
const DefaultRuleCostLimit = 100_000

// ruleMaxValueDepth bounds the nesting of a computed claim value.
const ruleMaxValueDepth = 32

// RuleConfig is a route's (or client's) CEL policy. Expressions see these
// variables:
//
//	subject  map(string, dyn)  the subject token's claims
//	actor    dyn               the actor token's claims (a map), or null
//	request  dyn               null on the token endpoint; otherwise a map:
//	                             method, host, path, remote_ip (strings) and
//	                             headers: map(string, list(string)) keyed by
//	                             the lower-cased header name
//	client   dyn               the client_id (a string), or null
//	route    map(string, dyn)  audiences, scopes: list(string)
//
// The standard CEL library, cel-go's strings extension (split, lowerAscii,
// replace, ...) and optional values (subject.?tenant.orValue('none')) are
// available; nothing does I/O. CEL string literals are in single or double
// quotes ('GET', "GET"); backticks are not CEL, they are the Caddyfile's raw
// quoting of a whole expression, which keeps double quotes inside it intact.
type RuleConfig struct {
	// AllowIf: every expression must evaluate to true, else denied.
	AllowIf []string
	// DenyIf: any expression evaluating to true denies.
	DenyIf []string
	// Grants add scopes when their condition holds (always narrowed to the
	// route's or client's scopes afterwards: see narrowScopes).
	Grants []GrantRule
	// Claims are computed claims of the minted token.
	Claims []ClaimRule
	// CostLimit bounds each expression's runtime cost (0: DefaultRuleCostLimit).
	CostLimit uint64
}

// GrantRule is `grant <scope...> if <expr>`.
type GrantRule struct {
	Scopes []string
	If     string
}

// ClaimRule is `claim <name> <expr>`: a computed claim of the minted token.
type ClaimRule struct {
	Name string
	Expr string
}

// RuleInput is what one evaluation sees.
type RuleInput struct {
	// Subject is the subject token's claims (nil: an empty map).
	Subject map[string]any
	// Actor is the actor token's claims; nil is CEL null.
	Actor map[string]any
	// Request is the HTTP request on the middleware path; nil (the token
	// endpoint) is CEL null.
	Request *RequestInfo
	// Client is the client_id; "" is CEL null.
	Client string
	// Route is the grant being exercised.
	Route RouteInfo
}

// RequestInfo describes the inbound HTTP request for the `request` variable.
type RequestInfo struct {
	Method, Host, Path, RemoteIP string
	// Headers are exposed under their lower-cased names (as HTTP/2 spells
	// them): request.headers['x-tenant'][0].
	Headers map[string][]string
}

// RouteInfo describes the route (or client) grant for the `route` variable.
type RouteInfo struct {
	Audiences, Scopes []string
}

// RuleResult is the outcome of evaluating a Rules.
type RuleResult struct {
	// Denied is true when an allow_if did not hold or a deny_if held, or
	// either failed to evaluate (fail closed). Granted and Claims are then
	// empty.
	Denied bool
	// Reason names the rule that denied, e.g. `deny_if "subject.sub == 'bob'"`.
	Reason string
	// Granted are the scopes of every grant whose condition was true, in
	// rule order, without duplicates. They are NOT yet narrowed: the caller
	// must pass them through narrowScopes with the route's or client's scopes.
	Granted []string
	// Claims are the computed claims, as plain JSON values (string, int64,
	// uint64, float64, bool, nil, []any, map[string]any). A claim whose
	// expression failed, or evaluated to null or to an empty optional, is
	// absent.
	Claims map[string]any
	// Errors lists every evaluation failure, each naming its rule, for the
	// caller to log: a failing allow_if/deny_if (which denied), a grant
	// condition that failed or was not a bool (grant not given), a claim
	// expression that failed or gave a value with no JSON form (omitted).
	Errors []string
}

// Rules is a compiled RuleConfig. It is immutable and safe for concurrent use.
type Rules struct {
	allow   []*compiledRule
	deny    []*compiledRule
	grants  []*compiledGrant
	claims  []*compiledClaim
	adapter types.Adapter
	cfg     RuleConfig
}

// expressions lists every expression, tagged by its kind.
func (r *Rules) expressions() []string {
	var out []string
	for _, e := range r.cfg.AllowIf {
		out = append(out, "allow_if "+e)
	}
	for _, e := range r.cfg.DenyIf {
		out = append(out, "deny_if "+e)
	}
	for _, g := range r.cfg.Grants {
		out = append(out, "grant "+strings.Join(g.Scopes, " ")+" if "+g.If)
	}
	for _, c := range r.cfg.Claims {
		out = append(out, "claim "+c.Name+" "+c.Expr)
	}
	return out
}

// fingerprint identifies the rules for the minted-token cache.
func (r *Rules) fingerprint() []string { return r.expressions() }

// readsRequest tells whether any expression may read the request variable.
// It errs on the side of yes (a mere mention counts), since a result that
// depends on the request must not be cached per token.
func (r *Rules) readsRequest() bool {
	for _, e := range r.expressions() {
		if strings.Contains(e, "request") {
			return true
		}
	}
	return false
}

type compiledRule struct {
	label string // e.g. `allow_if "subject.sub == 'bob'"`
	prg   cel.Program
}

type compiledGrant struct {
	compiledRule
	scopes []string
}

type compiledClaim struct {
	compiledRule
	name string
}

// ruleEnvOptions declares the rule variables and the libraries rules may use.
func ruleEnvOptions() []cel.EnvOption {
	return []cel.EnvOption{
		cel.Variable("subject", cel.MapType(cel.StringType, cel.DynType)),
		cel.Variable("actor", cel.DynType),
		cel.Variable("request", cel.DynType),
		cel.Variable("client", cel.DynType),
		cel.Variable("route", cel.MapType(cel.StringType, cel.DynType)),
		ext.Strings(),
		cel.OptionalTypes(),
	}
}

// CompileRules parses and type-checks every expression of cfg once. An
// error names the offending rule and expression. Conditions (allow_if,
// deny_if, grant ... if) must have type bool, or dyn (checked when
// evaluated). A computed claim may not be one the engine sets
// (IsRegisteredClaim), nor be named twice.
func CompileRules(cfg RuleConfig) (*Rules, error) {
	env, err := cel.NewEnv(ruleEnvOptions()...)
	if err != nil {
		return nil, fmt.Errorf("building the CEL environment: %w", err)
	}
	limit := cfg.CostLimit
	if limit == 0 {
		limit = DefaultRuleCostLimit
	}
	r := &Rules{adapter: env.CELTypeAdapter(), cfg: cfg}

	compile := func(kind, expr string, wantBool bool) (*compiledRule, error) {
		label := fmt.Sprintf("%s %q", kind, expr)
		if strings.TrimSpace(expr) == "" {
			return nil, fmt.Errorf("%s: empty expression", kind)
		}
		ast, iss := env.Compile(expr)
		if iss.Err() != nil {
			return nil, fmt.Errorf("%s: %w", label, iss.Err())
		}
		if wantBool {
			switch t := ast.OutputType(); t.Kind() {
			case types.BoolKind, types.DynKind:
			default:
				return nil, fmt.Errorf("%s: must be a bool condition, but has type %s", label, t)
			}
		}
		prg, err := env.Program(ast, cel.CostLimit(limit), cel.EvalOptions(cel.OptOptimize))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", label, err)
		}
		return &compiledRule{label: label, prg: prg}, nil
	}

	for _, e := range cfg.AllowIf {
		c, err := compile("allow_if", e, true)
		if err != nil {
			return nil, err
		}
		r.allow = append(r.allow, c)
	}
	for _, e := range cfg.DenyIf {
		c, err := compile("deny_if", e, true)
		if err != nil {
			return nil, err
		}
		r.deny = append(r.deny, c)
	}
	for _, g := range cfg.Grants {
		if len(g.Scopes) == 0 {
			return nil, fmt.Errorf("grant if %q: no scope to grant", g.If)
		}
		for _, s := range g.Scopes {
			if !ruleScopeToken(s) {
				return nil, fmt.Errorf("grant %q: not a valid scope token (RFC 6749 §3.3)", s)
			}
		}
		c, err := compile("grant "+strings.Join(g.Scopes, " ")+" if", g.If, true)
		if err != nil {
			return nil, err
		}
		r.grants = append(r.grants, &compiledGrant{compiledRule: *c, scopes: slices.Clone(g.Scopes)})
	}
	seen := map[string]bool{}
	for _, cl := range cfg.Claims {
		switch {
		case cl.Name == "":
			return nil, errors.New("claim: empty claim name")
		case IsRegisteredClaim(cl.Name):
			return nil, fmt.Errorf("claim %q is set by the engine and cannot be computed", cl.Name)
		case seen[cl.Name]:
			return nil, fmt.Errorf("claim %q is computed twice", cl.Name)
		}
		seen[cl.Name] = true
		c, err := compile("claim "+cl.Name, cl.Expr, false)
		if err != nil {
			return nil, err
		}
		r.claims = append(r.claims, &compiledClaim{compiledRule: *c, name: cl.Name})
	}
	return r, nil
}

// ruleScopeToken reports whether s is an RFC 6749 §3.3 scope-token:
// 1*( %x21 / %x23-5B / %x5D-7E ).
func ruleScopeToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x21 || c > 0x7e || c == '"' || c == '\\' {
			return false
		}
	}
	return true
}

// Empty reports whether there is no rule at all (a nil Rules is empty).
func (r *Rules) Empty() bool {
	return r == nil || len(r.allow)+len(r.deny)+len(r.grants)+len(r.claims) == 0
}

// grantableScopes returns every scope some grant rule may give, so that
// configuration can warn about grants outside a route's scopes (which
// narrowScopes would always remove).
func (r *Rules) grantableScopes() []string {
	if r == nil {
		return nil
	}
	var out []string
	for _, g := range r.grants {
		for _, s := range g.scopes {
			if !slices.Contains(out, s) {
				out = append(out, s)
			}
		}
	}
	return out
}

// Evaluate runs the rules against one exchange. Allow and deny rules fail
// closed: a rule that errors (a missing key, a type mismatch, the cost limit)
// or gives a non-bool denies, with Reason naming it. Allow rules run first,
// then deny rules, each in order; the first that denies ends the evaluation.
// A grant is given only when its condition is exactly true. The error is
// reserved for an internal failure (a recovered panic), on which the caller
// must fail the exchange.
func (r *Rules) Evaluate(in RuleInput) (res *RuleResult, err error) {
	res = &RuleResult{}
	if r.Empty() {
		return res, nil
	}
	defer func() {
		if p := recover(); p != nil {
			res, err = nil, fmt.Errorf("evaluating rules: internal error: %v", p)
		}
	}()
	act, err := cel.NewActivation(r.activation(in))
	if err != nil {
		return nil, fmt.Errorf("evaluating rules: %w", err)
	}

	deny := func(c *compiledRule, msg string) (*RuleResult, error) {
		res.Denied = true
		res.Reason = c.label
		if msg != "" {
			res.Errors = append(res.Errors, c.label+": "+msg)
		}
		return res, nil
	}
	for _, c := range r.allow {
		b, msg := c.evalBool(act)
		if msg != "" || !b {
			return deny(c, msg)
		}
	}
	for _, c := range r.deny {
		b, msg := c.evalBool(act)
		if msg != "" || b {
			return deny(c, msg)
		}
	}
	for _, g := range r.grants {
		b, msg := g.evalBool(act)
		if msg != "" {
			res.Errors = append(res.Errors, g.label+": "+msg+" (not granted)")
			continue
		}
		if !b {
			continue
		}
		for _, s := range g.scopes {
			if !slices.Contains(res.Granted, s) {
				res.Granted = append(res.Granted, s)
			}
		}
	}
	for _, c := range r.claims {
		v, ok, msg := c.evalClaim(act)
		if msg != "" {
			res.Errors = append(res.Errors, c.label+": "+msg+" (claim omitted)")
			continue
		}
		if !ok {
			continue
		}
		if res.Claims == nil {
			res.Claims = make(map[string]any, len(r.claims))
		}
		res.Claims[c.name] = v
	}
	return res, nil
}

// activation builds the CEL variables of one evaluation. Values are adapted
// once here rather than once per rule.
func (r *Rules) activation(in RuleInput) map[string]any {
	subject := in.Subject
	if subject == nil {
		subject = map[string]any{}
	}
	var actor ref.Val = types.NullValue
	if in.Actor != nil {
		actor = r.adapter.NativeToValue(in.Actor)
	}
	var client ref.Val = types.NullValue
	if in.Client != "" {
		client = types.String(in.Client)
	}
	var request ref.Val = types.NullValue
	if in.Request != nil {
		headers := make(map[string]any, len(in.Request.Headers))
		for k, vs := range in.Request.Headers {
			lk := strings.ToLower(k)
			prior, _ := headers[lk].([]string)
			headers[lk] = append(slices.Clip(prior), vs...)
		}
		request = r.adapter.NativeToValue(map[string]any{
			"method":    in.Request.Method,
			"host":      in.Request.Host,
			"path":      in.Request.Path,
			"remote_ip": in.Request.RemoteIP,
			"headers":   headers,
		})
	}
	orEmpty := func(s []string) []string {
		if s == nil {
			return []string{}
		}
		return s
	}
	route := r.adapter.NativeToValue(map[string]any{
		"audiences": orEmpty(in.Route.Audiences),
		"scopes":    orEmpty(in.Route.Scopes),
	})
	return map[string]any{
		"subject": r.adapter.NativeToValue(subject),
		"actor":   actor,
		"request": request,
		"client":  client,
		"route":   route,
	}
}

// evalBool evaluates a condition. msg is non-empty when it failed or gave
// something other than a bool.
func (c *compiledRule) evalBool(act cel.Activation) (bool, string) {
	out, _, err := c.prg.Eval(act)
	if err != nil {
		return false, "evaluation error: " + err.Error()
	}
	b, ok := out.(types.Bool)
	if !ok {
		return false, fmt.Sprintf("evaluated to %s, not a bool", out.Type().TypeName())
	}
	return bool(b), ""
}

// evalClaim evaluates a computed claim. ok is false when there is no value
// to set (null, an empty optional); msg is non-empty when it failed.
func (c *compiledRule) evalClaim(act cel.Activation) (v any, ok bool, msg string) {
	out, _, err := c.prg.Eval(act)
	if err != nil {
		return nil, false, "evaluation error: " + err.Error()
	}
	if o, isOpt := out.(*types.Optional); isOpt {
		if !o.HasValue() {
			return nil, false, ""
		}
		out = o.GetValue()
	}
	if out == types.NullValue {
		return nil, false, ""
	}
	v, err = celToJSON(out, 0)
	if err != nil {
		return nil, false, err.Error()
	}
	return v, true, ""
}

// celToJSON converts a CEL value to a plain Go value that encoding/json
// (and jwx) serialize faithfully: string, bool, int64, uint64, float64, nil,
// []any, map[string]any. Timestamps become RFC 3339 strings and durations
// their string form ("1.5s"); bytes, NaN, infinities, non-string map keys and
// types have no JSON form and are errors.
func celToJSON(v ref.Val, depth int) (any, error) {
	if depth > ruleMaxValueDepth {
		return nil, errors.New("value nested too deeply")
	}
	switch t := v.(type) {
	case types.Null:
		return nil, nil
	case types.Bool:
		return bool(t), nil
	case types.String:
		return string(t), nil
	case types.Int:
		return int64(t), nil
	case types.Uint:
		return uint64(t), nil
	case types.Double:
		f := float64(t)
		if math.IsNaN(f) || math.IsInf(f, 0) {
			return nil, fmt.Errorf("%v has no JSON form", f)
		}
		return f, nil
	case types.Timestamp:
		return t.Time.UTC().Format(time.RFC3339Nano), nil
	case types.Duration:
		return t.Duration.String(), nil
	case *types.Optional:
		if !t.HasValue() {
			return nil, nil
		}
		return celToJSON(t.GetValue(), depth+1)
	case *types.Err:
		return nil, t
	case traits.Mapper:
		out := make(map[string]any)
		for it := t.Iterator(); it.HasNext() == types.True; {
			k := it.Next()
			ks, ok := k.(types.String)
			if !ok {
				return nil, fmt.Errorf("map key of type %s has no JSON form", k.Type().TypeName())
			}
			ev, err := celToJSON(t.Get(k), depth+1)
			if err != nil {
				return nil, err
			}
			out[string(ks)] = ev
		}
		return out, nil
	case traits.Lister:
		out := make([]any, 0)
		for it := t.Iterator(); it.HasNext() == types.True; {
			ev, err := celToJSON(it.Next(), depth+1)
			if err != nil {
				return nil, err
			}
			out = append(out, ev)
		}
		return out, nil
	default:
		return nil, fmt.Errorf("value of type %s has no JSON form", v.Type().TypeName())
	}
}

// narrowScopes returns the scopes of granted that are within ceiling, in the
// order of granted and without duplicates. It is the rule that a grant never
// widens: whatever the rules grant, the result holds no scope outside the
// route's (or client's) declared scopes; an empty ceiling yields nothing.
func narrowScopes(granted, ceiling []string) []string {
	return IntersectScopes(granted, ceiling)
}
