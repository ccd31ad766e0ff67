package caddymodule

import (
	"bytes"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"runtime/debug"
	"slices"
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

	engine     *exchange.Engine
	grant      exchange.Grant
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
	rules, err := h.Policy.compile()
	if err != nil {
		return fmt.Errorf("token_exchange: %w", err)
	}
	h.grant = exchange.Grant{
		Audiences:     h.Audiences,
		Scopes:        h.Scopes,
		RequireScopes: h.RequireScopes,
		Claims:        h.Claims,
		Impersonate:   h.Mode == "impersonation",
		Rules:         rules,
	}
	// Metrics name a route by its first audience: configured, so bounded.
	if len(h.Audiences) > 0 {
		h.routeLabel = h.Audiences[0]
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
	if err := h.grant.Validate(); err != nil {
		return fmt.Errorf("token_exchange: %w", err)
	}
	return nil
}

// ServeHTTP exchanges the inbound token and calls the next handler with the
// minted one.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	raw, proven, ferr := h.credentials(r)
	if ferr != nil {
		return h.refuse(w, r, raw, ferr)
	}
	// The inbound token must not travel any further, nor be logged: drop
	// every other header that carries it, and request trailers (their values
	// arrive after this handler runs, so they cannot be inspected here).
	for name, values := range r.Header {
		for _, v := range values {
			if strings.Contains(v, raw) {
				r.Header.Del(name)
				break
			}
		}
	}
	r.Trailer = nil
	r.Header.Del("Trailer")
	// A Txn-Token from outside the trust domain is never trusted nor
	// forwarded: this route is the edge.
	if r.Header.Get("Txn-Token") != "" {
		r.Header.Del("Txn-Token")
		h.logger.Info("outside Txn-Token removed at the edge", zap.String("remote_ip", remoteIP(r)), zap.String("path", loggablePath(r, raw)))
	}
	form, ferr := formBody(r)
	if ferr != nil {
		return h.refuse(w, r, raw, ferr)
	}
	minted, err := h.exchange(r, raw, proven)
	if err != nil {
		return h.refuse(w, r, raw, exchange.AsError(err))
	}
	if ferr := h.useProof(w, proven); ferr != nil {
		return h.refuse(w, r, raw, ferr)
	}
	// A valid token must not travel in the URI or a form body either, in
	// any encoding (checked once it is known to be a real token, so short
	// junk cannot match a path).
	if carriesToken(r.URL.EscapedPath(), raw) || carriesToken(r.URL.RawQuery, raw) {
		return h.refuse(w, r, raw, &exchange.Error{Kind: exchange.KindInvalidRequest, Reason: "token_in_uri",
			Description: "the bearer token must not appear in the request URI"})
	}
	if form != nil && carriesToken(string(form), raw) {
		return h.refuse(w, r, raw, &exchange.Error{Kind: exchange.KindInvalidRequest, Reason: "token_in_body",
			Description: "the bearer token must not appear in the request body"})
	}
	r.Header.Set("Authorization", "Bearer "+minted.Token)

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

	h.okCount.Inc()
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
		ce.Write(
			zap.String("route", h.routeLabel),
			zap.String("method", r.Method),
			zap.String("path", r.URL.Path),
			zap.String("remote_ip", remoteIP(r)),
			zap.Bool("cached", minted.Cached),
			zap.String("sub", minted.Subject),
			zap.String("act", actChain(minted.ActChain)),
			zap.Strings("aud", minted.Audiences),
			zap.String("scope", exchange.FormatScope(minted.Scopes)),
			zap.String("jti", minted.JTI),
			zap.String("subject_issuer", minted.SubjectIssuer),
			zap.String("subject_token_sha256", minted.SubjectTokenHash),
			zap.Time("exp", minted.Expiry))
	}
	return next.ServeHTTP(w, r)
}

// exchange runs the engine, timing it, and turns a panic into a logged
// server error: a bug must never become an open gate or a crash.
func (h *Handler) exchange(r *http.Request, raw string, proven *presented) (minted *exchange.Minted, err error) {
	start := time.Now()
	defer func() {
		if rec := recover(); rec != nil {
			h.logger.Error("panic in token exchange", zap.Any("panic", rec), zap.ByteString("stack", debug.Stack()),
				zap.String("subject_token_sha256", exchange.HashToken(raw)))
			minted, err = nil, &exchange.Error{Kind: exchange.KindServer, Reason: "panic", Description: "internal error"}
		}
		h.duration.Observe(time.Since(start).Seconds())
	}()
	var info *exchange.RequestInfo
	if h.grant.Rules != nil {
		info = requestInfo(r)
	}
	return h.engine.ExchangePresented(r.Context(), raw, proven.bindingOf(), &h.grant, info)
}

// requestInfo describes the request for policy rules. Credentials are left
// out, so no rule can copy the inbound token into a claim.
func requestInfo(r *http.Request) *exchange.RequestInfo {
	headers := make(map[string][]string, len(r.Header))
	for name, values := range r.Header {
		switch name {
		case "Authorization", "Proxy-Authorization", "Cookie":
			continue
		}
		headers[name] = values
	}
	return &exchange.RequestInfo{Method: r.Method, Host: r.Host, Path: r.URL.Path, RemoteIP: remoteIP(r), Headers: headers}
}

// loggablePath is the request path for a log line, unless it carries the
// bearer token (in any encoding): a token must never reach the logs.
func loggablePath(r *http.Request, raw string) string {
	if raw != "" && carriesToken(r.URL.EscapedPath(), raw) {
		return "[path carries the token: not logged]"
	}
	return r.URL.Path
}

// remoteIP is the address of the connection's peer.
func remoteIP(r *http.Request) string {
	remote, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return remote
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

// bearerToken extracts the RFC 6750 §2.1 bearer token. It accepts exactly
// one Authorization header with the Bearer scheme; tokens in the query are
// refused rather than ignored, so they cannot slip through to the upstream.
func bearerToken(r *http.Request) (string, *exchange.Error) {
	if r.URL.Query().Has("access_token") {
		return "", &exchange.Error{Kind: exchange.KindInvalidRequest, Reason: "token_in_query",
			Description: "access tokens in the URI query are not accepted; use the Authorization header"}
	}
	values := r.Header.Values("Authorization")
	switch len(values) {
	case 0:
		return "", &exchange.Error{Kind: exchange.KindMissingToken, Reason: "missing_token", Description: "no bearer token"}
	case 1:
	default:
		return "", &exchange.Error{Kind: exchange.KindInvalidRequest, Reason: "multiple_authorization",
			Description: "more than one Authorization header"}
	}
	scheme, token, ok := strings.Cut(strings.TrimSpace(values[0]), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", &exchange.Error{Kind: exchange.KindMissingToken, Reason: "missing_token", Description: "no bearer token"}
	}
	token = strings.TrimSpace(token)
	if token == "" {
		return "", &exchange.Error{Kind: exchange.KindInvalidToken, Reason: "malformed", Description: "empty bearer token"}
	}
	return token, nil
}

// maxInspectedForm is the largest form body the middleware reads to look
// for a token in it; a larger one beside a bearer header is refused (413).
const maxInspectedForm = 64 << 10

// formBody reads an application/x-www-form-urlencoded request body (at most
// maxInspectedForm bytes) and puts it back for the upstream. RFC 6750 §2.2
// (the access_token body parameter) is a method we do not accept: a form
// carrying one is refused, so a token sent beside the header never reaches
// the upstream. Other bodies are not read (nil, nil).
func formBody(r *http.Request) ([]byte, *exchange.Error) {
	if r.Body == nil || r.Body == http.NoBody {
		return nil, nil
	}
	mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if mt != "application/x-www-form-urlencoded" {
		return nil, nil
	}
	if r.ContentLength > maxInspectedForm {
		return nil, &exchange.Error{Kind: exchange.KindInvalidRequest, Reason: "form_too_large", Status: http.StatusRequestEntityTooLarge,
			Description: fmt.Sprintf("a form body beside a bearer token may hold at most %d bytes", maxInspectedForm)}
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxInspectedForm+1))
	if err != nil {
		return nil, &exchange.Error{Kind: exchange.KindInvalidRequest, Reason: "body", Description: "the request body could not be read"}
	}
	if len(body) > maxInspectedForm {
		return nil, &exchange.Error{Kind: exchange.KindInvalidRequest, Reason: "form_too_large", Status: http.StatusRequestEntityTooLarge,
			Description: fmt.Sprintf("a form body beside a bearer token may hold at most %d bytes", maxInspectedForm)}
	}
	_ = r.Body.Close()
	r.Body = io.NopCloser(bytes.NewReader(body))
	// Every key, as a lenient form parser would read it (& or ; between
	// pairs, percent-decoded), so no spelling slips past.
	if slices.ContainsFunc(strings.FieldsFunc(string(body), func(r rune) bool { return r == '&' || r == ';' }), func(pair string) bool {
		key, _, _ := strings.Cut(pair, "=")
		return strings.TrimSpace(percentDecode(key)) == "access_token"
	}) {
		return nil, &exchange.Error{Kind: exchange.KindInvalidRequest, Reason: "token_in_body",
			Description: "access tokens in a form body are not accepted; use the Authorization header"}
	}
	return body, nil
}

// carriesToken tells whether s holds the token, literally or percent-encoded
// (up to three layers deep, each decoded leniently: a stray % cannot hide
// an encoded token behind a decoding error).
func carriesToken(s, token string) bool {
	for range 4 {
		if strings.Contains(s, token) {
			return true
		}
		d := percentDecode(s)
		if d == s {
			return false
		}
		s = d
	}
	return false
}

// percentDecode decodes every valid %XX (and + as space, for forms) and
// keeps anything else as it is.
func percentDecode(s string) string {
	if !strings.ContainsAny(s, "%+") {
		return s
	}
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '%' && i+2 < len(s) && isHex(s[i+1]) && isHex(s[i+2]):
			b = append(b, unhex(s[i+1])<<4|unhex(s[i+2]))
			i += 2
		case c == '+':
			b = append(b, ' ')
		default:
			b = append(b, c)
		}
	}
	return string(b)
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case '0' <= c && c <= '9':
		return c - '0'
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10
	default:
		return c - 'A' + 10
	}
}

// refuse answers a failed exchange per RFC 6750 §3 and logs it without the token.
func (h *Handler) refuse(w http.ResponseWriter, r *http.Request, raw string, e *exchange.Error) error {
	status, code, outcome := http.StatusUnauthorized, "", outcomeInvalidToken
	switch e.Kind {
	case exchange.KindMissingToken:
		// RFC 6750 §3.1: no error code when the request carried no credentials.
	case exchange.KindInvalidRequest:
		status, code = http.StatusBadRequest, "invalid_request"
		if e.Status != 0 {
			status = e.Status
		}
	case exchange.KindInsufficientScope:
		status, code, outcome = http.StatusForbidden, "insufficient_scope", outcomeInsufficientScope
	case exchange.KindDenied:
		status, code, outcome = http.StatusForbidden, "insufficient_scope", outcomeDenied
	case exchange.KindServer:
		status, outcome = http.StatusInternalServerError, outcomeError
	case exchange.KindUnavailable:
		status, outcome = http.StatusServiceUnavailable, outcomeError
	case exchange.KindInvalidDPoPProof:
		code = "invalid_dpop_proof"
	case exchange.KindUseDPoPNonce:
		code = "use_dpop_nonce"
	default:
		code = "invalid_token"
	}
	metrics.exchanges.WithLabelValues(h.routeLabel, outcome).Inc()
	fields := []zap.Field{
		zap.String("route", h.routeLabel),
		zap.String("method", r.Method),
		zap.String("path", loggablePath(r, raw)),
		zap.String("remote_ip", remoteIP(r)),
		zap.String("reason", e.Reason),
		zap.String("description", e.Description),
		zap.Int("status", status),
	}
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
		w.WriteHeader(status)
		return nil
	case http.StatusServiceUnavailable:
		// A dependency failed: never a pass, never blamed on the token.
		h.logger.Warn("token exchange unavailable", fields...)
		setRetryAfter(w, e)
		w.WriteHeader(status)
		return nil
	}
	h.logger.Info("token exchange refused", fields...)

	realm := h.Realm
	if realm == "" {
		realm = r.Host
	}
	challenge := `Bearer realm="` + quoteSafe(realm) + `"`
	if code != "" {
		challenge += `, error="` + code + `", error_description="` + quoteSafe(e.Description) + `"`
	}
	if e.Kind == exchange.KindInsufficientScope && len(h.RequireScopes) > 0 {
		challenge += `, scope="` + quoteSafe(exchange.FormatScope(h.RequireScopes)) + `"`
	}
	if h.DPoP != nil {
		h.DPoP.setChallenges(w, r, challenge, realm, code, e)
	} else {
		w.Header().Set("WWW-Authenticate", challenge)
	}
	// Answer here rather than return an error: Caddy's error path logs all
	// request headers at debug level, and a client may have put a token in
	// one it does not redact.
	w.WriteHeader(status)
	return nil
}

// quoteSafe keeps a value within an RFC 6750 quoted-string: printable ASCII
// without `"` or `\`.
func quoteSafe(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e || r == '"' || r == '\\' {
			return -1
		}
		return r
	}, s)
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
