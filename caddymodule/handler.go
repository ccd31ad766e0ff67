package caddymodule

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"os"
	"runtime/debug"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Handler is the `token_exchange` middleware. It terminates the inbound
// bearer token, exchanges it in-process for a short-lived token minted for
// this route's audiences and scopes (RFC 8693 delegation: `sub` stays the
// user, `act` names the gateway), and forwards the request with only the
// minted token. Failures answer per RFC 6750 and never reach the next handler.
type Handler struct {
	// Audiences of the minted token. At least one.
	Audiences []string `json:"audiences,omitempty"`
	// Scopes is the most this route delegates; issued scopes are these
	// intersected with the subject's (mapped) scopes.
	Scopes []string `json:"scopes,omitempty"`
	// RequireScopes must be obtainable, else 403 insufficient_scope.
	RequireScopes []string `json:"require_scopes,omitempty"`
	// Claims are subject claims copied into the minted token.
	Claims []string `json:"claims,omitempty"`
	// Mode is `delegation` (default: act present) or `impersonation` (no act).
	Mode string `json:"mode,omitempty"`
	// Realm of the WWW-Authenticate challenge. Default: the request host.
	Realm string `json:"realm,omitempty"`
	// Policy holds the route's CEL rules: allow_if, deny_if, grant, claim.
	Policy
	// DPoP, when set, accepts DPoP-bound tokens with DPoP proofs (RFC 9449).
	DPoP *DPoPOptions `json:"dpop,omitempty"`
	// BindUpstreamCertificate is a PEM certificate: the one the route's
	// reverse_proxy presents to the upstream (tls_client_auth). Minted
	// tokens are bound to it (cnf.x5t#S256, RFC 8705), so an upstream that
	// requires certificate-bound tokens accepts only tokens that came
	// through this gateway's connection.
	BindUpstreamCertificate string `json:"bind_upstream_certificate,omitempty"`
	// STS, when set, exchanges at another Security Token Service (RFC
	// 8693) instead of minting in-process.
	STS *RemoteSTS `json:"sts,omitempty"`
	// Resource, when set, binds the route to a protected resource (an MCP
	// server): inbound aud, challenge and RFC 9728 metadata (resource.go).
	Resource *ResourceOptions `json:"resource,omitempty"`
	// TxnToken, when set, also mints a Transaction Token per request and
	// sends it in the Txn-Token header (txntoken.go).
	TxnToken *TxnTokenOptions `json:"txn_token,omitempty"`

	engine     *exchange.Engine
	remote     *exchange.RemoteSTS
	grant      exchange.Grant
	gate       *exchange.BearerGate
	routeLabel string
	logger     *zap.Logger

	// metric children, resolved once: the hot path does no label lookups
	okCount   prometheus.Counter
	hitCount  prometheus.Counter
	missCount prometheus.Counter
	duration  prometheus.Observer
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.token_exchange",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets up the handler.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	app, err := appFrom(ctx, "token_exchange handler")
	if err != nil {
		return err
	}
	h.engine = app.Engine()
	if err := h.DPoP.provision(); err != nil {
		return fmt.Errorf("token_exchange: %w", err)
	}
	if err := h.TxnToken.provision(app); err != nil {
		return fmt.Errorf("token_exchange: %w", err)
	}
	rules, err := h.Policy.compile()
	if err != nil {
		return fmt.Errorf("token_exchange: %w", err)
	}
	var bind string
	if h.BindUpstreamCertificate != "" {
		if bind, err = certFileThumbprint(h.BindUpstreamCertificate); err != nil {
			return fmt.Errorf("token_exchange: bind_upstream_certificate: %w", err)
		}
	}
	h.grant = exchange.Grant{
		BindCertThumbprint: bind,
		Audiences:          h.Audiences,
		Scopes:             h.Scopes,
		RequireScopes:      h.RequireScopes,
		Claims:             h.Claims,
		Impersonate:        h.Mode == "impersonation",
		Rules:              rules,
		Resource:           h.Resource.url(),
	}
	// Metrics name a route by its first audience: configured, so bounded.
	if len(h.Audiences) > 0 {
		h.routeLabel = h.Audiences[0]
	}
	// Every line the route logs names it, encoded once.
	h.logger = h.logger.With(zap.String("route", h.routeLabel))
	if h.gate, err = exchange.NewBearerGate(h.engine, &h.grant, h.Realm); err != nil {
		return fmt.Errorf("token_exchange: %w", err)
	}
	if h.DPoP != nil {
		h.gate.Challenge = h.DPoP.setChallenges
	}
	if err := h.provisionSTS(); err != nil {
		return fmt.Errorf("token_exchange: %w", err)
	}
	if err := h.Resource.provision(app, h.gate, h.Scopes, h.RequireScopes); err != nil {
		return fmt.Errorf("token_exchange: %w", err)
	}
	h.okCount = metrics.exchanges.WithLabelValues(h.routeLabel, outcomeOK)
	h.hitCount = metrics.cache.WithLabelValues("hit")
	h.missCount = metrics.cache.WithLabelValues("miss")
	h.duration = metrics.duration.WithLabelValues(h.routeLabel)
	return nil
}

// Validate checks the route's policy at load time.
func (h *Handler) Validate() error {
	switch h.Mode {
	case "", "delegation", "impersonation":
	default:
		return fmt.Errorf("token_exchange: mode must be delegation or impersonation, not %q", h.Mode)
	}
	return nil
}

// ServeHTTP exchanges the inbound token and calls the next handler with the
// minted one. The protocol (bearer parsing, scrubbing, the exchange, RFC 6750
// answers) is the library's BearerGate; this adds Caddy's logs, metrics and
// placeholders.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	span := startExchangeSpan(r.Context(), h.routeLabel)
	a := h.admit(w, r)
	if a.RemovedTxnToken {
		h.logger.Info("outside Txn-Token removed at the edge", zap.String("remote_ip", exchange.RemoteIP(r)), zap.String("path", exchange.LoggablePath(r, a.Token)))
	}
	if a.Err != nil {
		span.refused(a.Err)
		h.refuse(w, r, a.Token, a.Err)
		// Answered here rather than returned as an error: Caddy's error path
		// logs all request headers at debug level, and a client may have
		// put a token in one it does not redact.
		return nil
	}
	minted := a.Minted

	// Placeholders are resolved lazily: most requests never read them.
	repl := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	repl.Map(func(key string) (any, bool) {
		switch key {
		case "http.auth.user.id", "token_exchange.subject":
			return minted.Subject, true
		case "token_exchange.actor":
			return minted.Actor.String(), true
		case "token_exchange.scope":
			return exchange.FormatScope(minted.Scopes), true
		case "token_exchange.jti":
			return minted.JTI, true
		}
		return nil, false
	})

	if h.TxnToken != nil {
		if e := h.serveTxn(r, minted, repl); e != nil {
			span.refused(e)
			h.refuse(w, r, a.Token, e)
			return nil
		}
	}
	h.okCount.Inc()
	span.exchanged(minted, h.engine.Cache() != nil)
	if h.engine.Cache() != nil {
		if minted.Cached {
			h.hitCount.Inc()
		} else {
			h.missCount.Inc()
		}
	}
	// The audit line: one per exchange, at info, cache hits included (they
	// carry the reused token's jti and cached=true).
	msg := "token exchanged"
	if minted.Cached {
		msg = "token exchange reused from cache"
	}
	if ce := h.logger.Check(zapcore.InfoLevel, msg); ce != nil {
		fields := append(requestFields(r, a.Token), zap.Bool("cached", minted.Cached))
		if minted.Cached {
			// The line of the mint that the same jti names carries the
			// rest (act, aud, scope, exp): a hit repeats only who and which.
			fields = append(fields, zap.String("sub", minted.Subject), zap.String("jti", minted.JTI),
				zap.String("subject_issuer", minted.SubjectIssuer), zap.String("subject_token_sha256", minted.SubjectTokenHash))
		} else {
			fields = append(fields, mintedFields(minted)...)
		}
		ce.Write(fields...)
	}
	return next.ServeHTTP(w, r)
}

// mintedFields are the audit fields of a minted token, the same for both
// front doors: who, for whom, what, which token; never the token itself.
func mintedFields(m *exchange.Minted) []zap.Field {
	return []zap.Field{
		zap.String("sub", m.Subject),
		zap.String("act", actChain(m.ActChain)),
		zap.Strings("aud", m.Audiences),
		zap.String("scope", exchange.FormatScope(m.Scopes)),
		zap.String("jti", m.JTI),
		zap.String("subject_issuer", m.SubjectIssuer),
		zap.String("subject_token_sha256", m.SubjectTokenHash),
		zap.Time("exp", m.Expiry),
	}
}

// requestFields are the fields every middleware log line starts with,
// after the route (which the handler's logger carries, encoded once).
func requestFields(r *http.Request, token string) []zap.Field {
	return []zap.Field{
		zap.String("method", r.Method),
		zap.String("path", exchange.LoggablePath(r, token)),
		zap.String("remote_ip", exchange.RemoteIP(r)),
	}
}

// admit runs the gate, timing the exchange, and turns a panic anywhere in
// it into a logged server error: a bug must never become an open gate or a
// crash.
func (h *Handler) admit(w http.ResponseWriter, r *http.Request) (a exchange.Admission) {
	defer func() {
		if rec := recover(); rec != nil {
			h.logger.Error("panic in token exchange", zap.Any("panic", rec), zap.ByteString("stack", debug.Stack()),
				zap.String("subject_token_sha256", exchange.HashToken(a.Token)))
			a = exchange.Admission{Token: a.Token, Err: &exchange.Error{Kind: exchange.KindServer, Reason: "panic", Description: "internal error"}}
		}
	}()
	// What the request proves (a DPoP proof, a client certificate) comes
	// with its token; a proof's jti is recorded only once the token was
	// accepted, so strangers' proofs cannot fill the replay cache.
	var proven *presented
	return h.gate.Admit(r, exchange.AdmitHooks{
		Credentials: func(r *http.Request) (string, *exchange.Binding, *exchange.Error) {
			raw, p, err := h.credentials(r)
			proven = p
			return raw, p.bindingOf(), err
		},
		Exchange: func(raw string, binding *exchange.Binding, info *exchange.RequestInfo) (*exchange.Minted, error) {
			a.Token = raw // for the panic log
			start := time.Now()
			defer func() { h.duration.Observe(time.Since(start).Seconds()) }()
			if h.remote != nil {
				// Verified here first: a token the gateway does not trust
				// never leaves it.
				subject, err := h.engine.VerifyPresented(r.Context(), raw, binding)
				if err != nil {
					return nil, err
				}
				return h.remote.Exchange(r.Context(), raw, subject)
			}
			return h.engine.ExchangePresented(r.Context(), raw, binding, &h.grant, info)
		},
		Accepted: func() *exchange.Error { return h.useProof(w, proven) },
	})
}

// actChain renders an act claim for logs, outermost actor first:
// "gateway > frontend". Cheaper than reflecting over the map.
func actChain(act map[string]any) string {
	var b strings.Builder
	for act != nil {
		if b.Len() > 0 {
			b.WriteString(" > ")
		}
		if sub, ok := act["sub"].(string); ok {
			b.WriteString(sub)
		} else if id, ok := act["client_id"].(string); ok {
			b.WriteString(id)
		}
		act, _ = act["act"].(map[string]any)
	}
	return b.String()
}

// refusalOutcome is the outcome label of a refusal (metrics, spans).
func refusalOutcome(e *exchange.Error) string {
	switch e.Kind {
	case exchange.KindInsufficientScope:
		return outcomeInsufficientScope
	case exchange.KindDenied:
		return outcomeDenied
	case exchange.KindServer, exchange.KindUnavailable:
		return outcomeError
	}
	return outcomeInvalidToken
}

// refuse logs and counts a refusal, then lets the gate answer it.
func (h *Handler) refuse(w http.ResponseWriter, r *http.Request, raw string, e *exchange.Error) {
	status, _ := exchange.BearerStatus(e)
	metrics.exchanges.WithLabelValues(h.routeLabel, refusalOutcome(e)).Inc()
	fields := append(requestFields(r, raw),
		zap.String("reason", e.Reason),
		zap.String("description", e.Description),
		zap.Int("status", status))
	if e.SubjectSub != "" {
		fields = append(fields, zap.String("subject_issuer", e.SubjectIssuer), zap.String("sub", e.SubjectSub))
	}
	if raw != "" {
		fields = append(fields, zap.String("subject_token_sha256", exchange.HashToken(raw)))
	}
	if e.Err != nil {
		fields = append(fields, zap.Error(e.Err))
	}
	switch status {
	case http.StatusInternalServerError:
		h.logger.Error("token exchange failed", fields...)
	case http.StatusServiceUnavailable:
		// A dependency failed: never a pass, never blamed on the token.
		h.logger.Warn("token exchange unavailable", fields...)
	default:
		h.logger.Info("token exchange refused", fields...)
	}
	h.gate.Refuse(w, r, e)
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)

// certFileThumbprint is the RFC 8705 x5t#S256 of the first certificate in a
// PEM file.
func certFileThumbprint(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return "", errors.New("no PEM certificate in the file")
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return "", err
		}
		return exchange.CertThumbprint(cert), nil
	}
}
