package caddymodule

import (
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
)

// TxnTokenOptions make a token_exchange route the edge of a trust domain:
// besides (or instead of) the delegated access token, it mints a
// Transaction Token (draft-ietf-oauth-transaction-tokens-10) per request and
// sends it in the Txn-Token request header.
type TxnTokenOptions struct {
	// Audience is the trust domain: the aud of every Txn-Token. Required.
	Audience string `json:"audience"`
	// Lifetime of a Txn-Token (default 60s, at most 10m); never past the
	// subject token's exp.
	Lifetime caddy.Duration `json:"lifetime,omitempty"`
	// Workload is req_wl, the requesting workload. Default: the app's
	// actor (its issuer unless configured).
	Workload string `json:"workload,omitempty"`
	// Subject is how sub is written: `auto` (default: namespaced when more
	// than one issuer is trusted), `plain` (the subject token's sub) or
	// `namespaced` ("<issuer>#<sub>").
	Subject string `json:"subject,omitempty"`
	// Authorization is what the Authorization header carries upstream:
	// `delegated` (default: the route's delegated access token) or `none`
	// (removed: the Txn-Token alone travels).
	Authorization string `json:"authorization,omitempty"`
	// Tctx are the members of the tctx claim, each a CEL expression over
	// subject, request and route, as the `claim` rule.
	Tctx []PolicyClaim `json:"tctx,omitempty"`
	// AllowSubjectTypes, at the token endpoint only, accepts the draft's
	// self_signed and/or unsigned_json subject tokens (off by default).
	AllowSubjectTypes []string `json:"allow_subject_types,omitempty"`

	engine     *exchange.Engine
	tctx       *exchange.Rules
	namespaced bool
	lifetime   time.Duration
}

const (
	txnSubjectAuto       = "auto"
	txnSubjectPlain      = "plain"
	txnSubjectNamespaced = "namespaced"
	txnAuthzDelegated    = "delegated"
	txnAuthzNone         = "none"
)

// provision checks the options and readies them for app's engine.
func (o *TxnTokenOptions) provision(app *App) error {
	if o == nil {
		return nil
	}
	if len(o.AllowSubjectTypes) > 0 {
		return fmt.Errorf("txn_token: allow_subject_types belongs to the token endpoint's txn_token; a route's subject is always its verified bearer token")
	}
	if o.Audience == "" {
		return fmt.Errorf("txn_token: audience (the trust domain) is required")
	}
	if err := exchange.CheckTxnLifetime(time.Duration(o.Lifetime)); err != nil {
		return err
	}
	o.lifetime = time.Duration(o.Lifetime)
	if o.Workload == "" {
		o.Workload = app.Engine().Actor().Subject
	}
	var err error
	if o.namespaced, err = txnNamespaced(o.Subject, app); err != nil {
		return err
	}
	switch o.Authorization {
	case "", txnAuthzDelegated, txnAuthzNone:
	default:
		return fmt.Errorf("txn_token: authorization must be delegated or none, not %q", o.Authorization)
	}
	if len(o.Tctx) > 0 {
		rules, err := Policy{ComputedClaims: o.Tctx}.compile()
		if err != nil {
			return fmt.Errorf("txn_token tctx: %w", err)
		}
		o.tctx = rules
	}
	o.engine = app.Engine()
	return nil
}

// attach mints the request's Txn-Token from the exchange's result and puts
// it in the Txn-Token header. rctx holds req_ip, authn and, when the
// request carries a valid W3C traceparent, its trace_id; txn is always
// generated here (a traceparent is chosen by the caller).
func (o *TxnTokenOptions) attach(r *http.Request, m *exchange.Minted) (*exchange.TxnToken, []string, *exchange.Error) {
	rctx := map[string]any{"req_ip": exchange.RemoteIP(r), "authn": authnMethod(m.SubjectClaims)}
	if id, ok := exchange.TraceID(r.Header.Get("Traceparent")); ok {
		rctx["trace_id"] = id
	}
	var tctx map[string]any
	var problems []string
	if o.tctx != nil {
		res, err := o.tctx.Evaluate(exchange.RuleInput{
			Subject: m.SubjectClaims,
			Request: exchange.RequestInfoOf(r),
			Route:   exchange.RouteInfo{Audiences: []string{o.Audience}, Scopes: m.Scopes},
		})
		if err != nil {
			return nil, nil, &exchange.Error{Kind: exchange.KindServer, Reason: "txn_tctx", Description: "internal error", Err: err}
		}
		tctx, problems = res.Claims, res.Errors
	}
	t, err := o.engine.MintTxnToken(exchange.TxnSpec{
		TrustDomain: o.Audience, Lifetime: o.lifetime, NotAfter: m.Expiry,
		Subject:            exchange.TxnSubject(m.SubjectIssuer, m.Subject, o.namespaced),
		Scopes:             m.Scopes,
		RequestingWorkload: o.Workload,
		Rctx:               rctx, Tctx: tctx,
	})
	if err != nil {
		return nil, problems, exchange.AsError(err)
	}
	r.Header.Set(exchange.TxnTokenHeader, t.Raw)
	if o.Authorization == txnAuthzNone {
		r.Header.Del("Authorization")
	}
	return t, problems, nil
}

// authnMethod names how the subject token was presented, by its verified
// binding: DPoP (RFC 9449), a client certificate (RFC 8705), else bearer.
func authnMethod(claims map[string]any) string {
	cnf, _ := claims["cnf"].(map[string]any)
	switch {
	case cnf["jkt"] != nil:
		return exchange.AuthnDPoP
	case cnf["x5t#S256"] != nil:
		return exchange.AuthnMTLS
	}
	return exchange.AuthnBearer
}

// serveTxn runs after a successful exchange on a txn_token route: it mints
// and attaches the Txn-Token, sets {token_exchange.txn} and logs the
// transaction (never the token: its hash).
func (h *Handler) serveTxn(r *http.Request, m *exchange.Minted, repl *caddy.Replacer) *exchange.Error {
	t, problems, err := h.TxnToken.attach(r, m)
	if len(problems) > 0 {
		h.logger.Warn("txn_token tctx expressions failed; their members are omitted", zap.Strings("errors", problems))
	}
	if err != nil {
		return err
	}
	repl.Set("token_exchange.txn", t.Txn)
	h.logger.Info("txn token minted",
		zap.String("route", h.routeLabel),
		zap.String("txn", t.Txn),
		zap.String("sub", t.Subject),
		zap.String("scope", exchange.FormatScope(t.Scopes)),
		zap.String("aud", t.TrustDomain),
		zap.Time("exp", t.Expiry),
		zap.String("txn_token_sha256", exchange.HashToken(t.Raw)))
	return nil
}

// unmarshalTxnToken reads a route's `txn_token [<trust-domain>] { ... }`.
// Every error names its line.
func unmarshalTxnToken(d *caddyfile.Dispenser) (*TxnTokenOptions, error) {
	o := &TxnTokenOptions{}
	if d.NextArg() {
		o.Audience = d.Val()
		if d.NextArg() {
			return nil, d.ArgErr()
		}
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var err error
		switch d.Val() {
		case "audience", "trust_domain":
			err = oneArg(d, &o.Audience)
		case "lifetime":
			if err = durationArg(d, &o.Lifetime); err == nil {
				if cerr := exchange.CheckTxnLifetime(time.Duration(o.Lifetime)); cerr != nil || o.Lifetime == 0 {
					return nil, d.Errf("txn_token lifetime: must be between 1s and %s", exchange.MaxTxnTokenLifetime)
				}
			}
		case "workload":
			err = oneArg(d, &o.Workload)
		case "subject":
			if err = oneArg(d, &o.Subject); err == nil && o.Subject != txnSubjectAuto && o.Subject != txnSubjectPlain && o.Subject != txnSubjectNamespaced {
				return nil, d.Errf("txn_token subject must be auto, plain or namespaced, not '%s'", o.Subject)
			}
		case "authorization":
			if err = oneArg(d, &o.Authorization); err == nil && o.Authorization != txnAuthzDelegated && o.Authorization != txnAuthzNone {
				return nil, d.Errf("txn_token authorization must be delegated or none, not '%s'", o.Authorization)
			}
		case "allow_subject_types":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return nil, d.ArgErr()
			}
			for _, a := range args {
				if a != "self_signed" && a != "unsigned_json" {
					return nil, d.Errf("allow_subject_types takes self_signed and/or unsigned_json, not '%s'", a)
				}
			}
			o.AllowSubjectTypes = append(o.AllowSubjectTypes, args...)
		case "tctx":
			if !d.NextArg() {
				return nil, d.Err("tctx needs a name and an expression: tctx <name> <cel-expr>")
			}
			name := d.Val()
			expr := strings.Join(rawArgs(d), " ")
			if expr == "" {
				return nil, d.Err("tctx needs a name and an expression: tctx <name> <cel-expr>")
			}
			o.Tctx = append(o.Tctx, PolicyClaim{Name: name, Expr: expr})
			if _, cerr := (Policy{ComputedClaims: o.Tctx}).compile(); cerr != nil {
				return nil, d.Errf("txn_token tctx: %v", cerr)
			}
		default:
			return nil, d.Errf("unrecognized txn_token option '%s'", d.Val())
		}
		if err != nil {
			return nil, err
		}
	}
	if o.Audience == "" {
		return nil, d.Err("txn_token needs the trust domain: txn_token <trust-domain> or audience <trust-domain>")
	}
	return o, nil
}

// TxnEndpointOptions let token_exchange_endpoint issue Transaction Tokens
// (requested_token_type urn:ietf:params:oauth:token-type:txn_token).
type TxnEndpointOptions struct {
	// Audience is the trust domain. Required.
	Audience string `json:"audience"`
	// Lifetime of an issued Txn-Token (default 60s, at most 10m).
	Lifetime caddy.Duration `json:"lifetime,omitempty"`
	// Subject: auto (default), plain or namespaced, as on a route.
	Subject string `json:"subject,omitempty"`
	// AllowSubjectTypes accepts the draft's self_signed and/or
	// unsigned_json subject tokens from authenticated workloads (default:
	// neither).
	AllowSubjectTypes []string `json:"allow_subject_types,omitempty"`
}

// txnNamespaced tells whether a Txn-Token's sub is namespaced by its
// issuer, for the subject option (auto: when more than one issuer is
// trusted, where the same sub could name different users).
func txnNamespaced(subject string, app *App) (bool, error) {
	switch subject {
	case "", txnSubjectAuto:
		return len(app.trust.Issuers()) > 1, nil
	case txnSubjectPlain:
		return false, nil
	case txnSubjectNamespaced:
		return true, nil
	}
	return false, fmt.Errorf("txn_token: subject must be auto, plain or namespaced, not %q", subject)
}

// config turns the options into the library's (nil: Txn-Tokens refused).
func (o *TxnEndpointOptions) config(app *App) (*exchange.TxnEndpointConfig, error) {
	if o == nil {
		return nil, nil
	}
	c := &exchange.TxnEndpointConfig{TrustDomain: o.Audience, Lifetime: time.Duration(o.Lifetime)}
	for _, t := range o.AllowSubjectTypes {
		switch t {
		case "self_signed":
			c.AllowSelfSigned = true
		case "unsigned_json":
			c.AllowUnsignedJSON = true
		default:
			return nil, fmt.Errorf("txn_token allow_subject_types: %q is not self_signed or unsigned_json", t)
		}
	}
	var err error
	if c.Namespaced, err = txnNamespaced(o.Subject, app); err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// unmarshalTxnEndpoint reads the endpoint's `txn_token [<trust-domain>] { ... }`.
func unmarshalTxnEndpoint(d *caddyfile.Dispenser) (*TxnEndpointOptions, error) {
	o, err := unmarshalTxnToken(d)
	if err != nil {
		return nil, err
	}
	if o.Workload != "" || o.Authorization != "" || len(o.Tctx) > 0 {
		return nil, d.Err("txn_token at the token endpoint takes audience, lifetime and subject only: req_wl is the client, rctx and tctx come from request_context and request_details")
	}
	return &TxnEndpointOptions{Audience: o.Audience, Lifetime: o.Lifetime, Subject: o.Subject, AllowSubjectTypes: o.AllowSubjectTypes}, nil
}
