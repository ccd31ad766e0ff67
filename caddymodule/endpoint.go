package caddymodule

import (
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"net/url"
	"runtime/debug"
	"slices"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
)

func init() {
	caddy.RegisterModule(EndpointHandler{})
	caddy.RegisterModule(MetadataHandler{})
}

// DefaultMaxRequestBody caps a token endpoint request body.
const DefaultMaxRequestBody = 64 << 10

// EndpointHandler is the `token_exchange_endpoint` handler: the standard
// RFC 8693 token endpoint, served by the same engine as the middleware.
// Clients authenticate with client_secret_basic, client_secret_post or
// private_key_jwt (the `client` blocks of the global option).
type EndpointHandler struct {
	// MaxRequestBody caps the request body in bytes (default 65536).
	MaxRequestBody int64 `json:"max_request_body,omitempty"`
	// DPoP configures DPoP proofs to the token endpoint (default: accepted,
	// optional, default algorithms, no nonce).
	DPoP *DPoPOptions `json:"dpop,omitempty"`

	tokenEndpointURLs []*url.URL

	app    *App
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (EndpointHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.token_exchange_endpoint",
		New: func() caddy.Module { return new(EndpointHandler) },
	}
}

// Provision sets up the handler.
func (h *EndpointHandler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	app, err := appFrom(ctx, "token_exchange_endpoint handler")
	if err != nil {
		return err
	}
	h.app = app
	if h.MaxRequestBody <= 0 {
		h.MaxRequestBody = DefaultMaxRequestBody
	}
	if err := h.provisionEndpointDPoP(); err != nil {
		return fmt.Errorf("token_exchange_endpoint: %w", err)
	}
	return nil
}

// ServeHTTP serves one token request.
func (h *EndpointHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) (err error) {
	// Token responses and errors are never cached (RFC 6749 §5.1).
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Pragma", "no-cache")
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		return h.fail(w, r, &exchange.Error{Kind: exchange.KindInvalidRequest, Reason: "method",
			Description: "the token endpoint accepts only POST"}, http.StatusMethodNotAllowed)
	}
	defer func() {
		if rec := recover(); rec != nil {
			h.logger.Error("panic in token endpoint", zap.Any("panic", rec), zap.ByteString("stack", debug.Stack()))
			err = h.fail(w, r, &exchange.Error{Kind: exchange.KindServer, Reason: "panic", Description: "internal error"}, 0)
		}
	}()

	mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if mt != "application/x-www-form-urlencoded" {
		return h.fail(w, r, &exchange.Error{Kind: exchange.KindInvalidRequest, Reason: "content_type",
			Description: "the request must be application/x-www-form-urlencoded"}, 0)
	}
	r.Body = http.MaxBytesReader(w, r.Body, h.MaxRequestBody)
	if err := r.ParseForm(); err != nil {
		var tooLarge *http.MaxBytesError
		desc := "the request body is not a valid form"
		if errors.As(err, &tooLarge) {
			desc = fmt.Sprintf("the request body exceeds %d bytes", h.MaxRequestBody)
		}
		return h.fail(w, r, &exchange.Error{Kind: exchange.KindInvalidRequest, Reason: "body", Description: desc}, 0)
	}

	// Only the body counts: parameters in the URI are not part of an RFC
	// 8693 request, and a token there would end up in access logs. The
	// client authenticates first: nothing else of the request is parsed
	// for an anonymous caller.
	cred, perr := exchange.ParseClientCredentials(r.PostForm)
	if perr != nil {
		return h.fail(w, r, exchange.AsError(perr), 0)
	}
	cred.BasicUser, cred.BasicPass, cred.HasBasic = r.BasicAuth()
	if !cred.HasBasic && r.Header.Get("Authorization") != "" {
		// RFC 6749 §5.2: a client that tried the Authorization header gets 401
		// and a challenge naming the scheme we support.
		w.Header().Set("WWW-Authenticate", `Basic realm="`+quoteSafe(h.app.Issuer)+`", charset="UTF-8"`)
		return h.fail(w, r, &exchange.Error{Kind: exchange.KindInvalidClient, Reason: "auth_scheme",
			Description: "client authentication failed"}, 0)
	}
	client, aerr := h.app.clients.Authenticate(r.Context(), cred)
	if aerr != nil {
		e := exchange.AsError(aerr)
		if exchange.BasicAuthAttempted(aerr) && e.Kind == exchange.KindInvalidClient {
			w.Header().Set("WWW-Authenticate", `Basic realm="`+quoteSafe(h.app.Issuer)+`", charset="UTF-8"`)
		}
		return h.fail(w, r, e, 0, zap.String("claimed_client_id", claimedClientID(cred)))
	}
	authenticated := zap.String("client_id", client.ClientID)
	req, perr := exchange.ParseTokenRequest(r.PostForm)
	if perr != nil {
		return h.fail(w, r, exchange.AsError(perr), 0, authenticated)
	}
	var berr *exchange.Error
	if req.Binding, berr = h.endpointBinding(w, r); berr != nil {
		return h.fail(w, r, berr, 0, authenticated)
	}

	issued, xerr := h.app.engine.TokenExchange(r.Context(), req, client)
	if xerr != nil {
		e := exchange.AsError(xerr)
		fields := []zap.Field{zap.String("client_id", client.ClientID),
			zap.String("subject_token_sha256", exchange.HashToken(req.SubjectToken))}
		if e.SubjectSub != "" {
			fields = append(fields, zap.String("subject_issuer", e.SubjectIssuer), zap.String("sub", e.SubjectSub))
		}
		return h.fail(w, r, e, 0, fields...)
	}
	m := issued.Minted
	h.logUnbinding(r, client.ClientID, m)
	metrics.endpoint.WithLabelValues(outcomeOK).Inc()
	h.logger.Info("token exchanged",
		zap.String("remote_ip", remoteIP(r)),
		zap.String("client_id", client.ClientID),
		zap.String("client_auth", client.Method),
		zap.String("sub", m.Subject),
		zap.String("act", actChain(m.ActChain)),
		zap.Strings("aud", m.Audiences),
		zap.String("scope", exchange.FormatScope(m.Scopes)),
		zap.String("jti", m.JTI),
		zap.String("subject_issuer", m.SubjectIssuer),
		zap.String("subject_token_sha256", m.SubjectTokenHash),
		zap.Time("exp", m.Expiry))
	return writeJSON(w, http.StatusOK, issued)
}

// fail writes an RFC 6749 §5.2 error, and the one log line of every refused
// request: who (the client, authenticated or claimed), from where, and why;
// never a secret or a token. status 0 picks the one the code implies.
func (h *EndpointHandler) fail(w http.ResponseWriter, r *http.Request, e *exchange.Error, status int, fields ...zap.Field) error {
	code, defStatus := oauthError(e.Kind)
	if status == 0 {
		status = defStatus
	}
	metrics.endpoint.WithLabelValues(code).Inc()
	fields = append(fields,
		zap.String("remote_ip", remoteIP(r)),
		zap.String("error", code),
		zap.String("reason", e.Reason),
		zap.String("description", e.Description),
		zap.Int("status", status))
	if e.Err != nil && e.Kind != exchange.KindInvalidClient {
		fields = append(fields, zap.Error(e.Err))
	}
	switch e.Kind {
	case exchange.KindServer:
		h.logger.Error("token endpoint failed", fields...)
	case exchange.KindUnavailable:
		setRetryAfter(w, e)
		h.logger.Warn("token endpoint unavailable", fields...)
	default:
		h.logger.Info("token exchange refused", fields...)
	}
	// RFC 6749 §5.2 limits error_description to printable ASCII without " or \.
	return writeJSON(w, status, map[string]string{"error": code, "error_description": quoteSafe(e.Description)})
}

// oauthError maps a failure to its RFC 6749 §5.2 / RFC 8693 §2.2.2 code.
func oauthError(k exchange.Kind) (string, int) {
	switch k {
	case exchange.KindInvalidClient:
		return "invalid_client", http.StatusUnauthorized
	case exchange.KindUnauthorizedClient:
		return "unauthorized_client", http.StatusBadRequest
	case exchange.KindUnsupportedGrantType:
		return "unsupported_grant_type", http.StatusBadRequest
	case exchange.KindInvalidTarget:
		return "invalid_target", http.StatusBadRequest
	case exchange.KindInvalidScope, exchange.KindInsufficientScope:
		return "invalid_scope", http.StatusBadRequest
	case exchange.KindServer:
		return "server_error", http.StatusInternalServerError
	case exchange.KindUnavailable:
		return "temporarily_unavailable", http.StatusServiceUnavailable
	case exchange.KindInvalidDPoPProof:
		return "invalid_dpop_proof", http.StatusBadRequest
	case exchange.KindUseDPoPNonce:
		return "use_dpop_nonce", http.StatusBadRequest
	default:
		return "invalid_request", http.StatusBadRequest
	}
}

// claimedClientID is the client_id a failed authentication named, for the
// log: the body's client_id, else the Basic user. Never a secret.
func claimedClientID(cred exchange.ClientCredentials) string {
	if cred.PostID != "" {
		return cred.PostID
	}
	if id, err := url.QueryUnescape(cred.BasicUser); err == nil {
		return id
	}
	return ""
}

// setRetryAfter sets Retry-After (whole seconds, at least 1) for a 503.
func setRetryAfter(w http.ResponseWriter, e *exchange.Error) {
	secs := int(e.RetryAfter.Round(time.Second) / time.Second)
	w.Header().Set("Retry-After", strconv.Itoa(max(1, secs)))
}

func writeJSON(w http.ResponseWriter, status int, v any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return caddyhttp.Error(http.StatusInternalServerError, err)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
	return nil
}

// MetadataHandler is the `token_exchange_metadata` handler: the RFC 8414
// authorization server metadata of the gateway's STS, usually served at
// /.well-known/oauth-authorization-server (and, for OIDC-style discovery
// clients, at /.well-known/openid-configuration).
type MetadataHandler struct {
	app *App
}

// CaddyModule returns the Caddy module information.
func (MetadataHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.token_exchange_metadata",
		New: func() caddy.Module { return new(MetadataHandler) },
	}
}

// Provision sets up the handler.
func (h *MetadataHandler) Provision(ctx caddy.Context) error {
	app, err := appFrom(ctx, "token_exchange_metadata handler")
	if err != nil {
		return err
	}
	h.app = app
	return nil
}

// ServeHTTP serves the metadata document.
func (h *MetadataHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		return caddyhttp.Error(http.StatusMethodNotAllowed, nil)
	}
	w.Header().Set("Cache-Control", "public, max-age="+strconv.Itoa(int((5*time.Minute).Seconds())))
	return writeJSON(w, http.StatusOK, h.app.metadata())
}

// metadata is the RFC 8414 document.
func (a *App) metadata() map[string]any {
	methods := a.clients.AuthMethods()
	doc := map[string]any{
		"issuer":                                a.Issuer,
		"token_endpoint":                        a.TokenEndpoint,
		"jwks_uri":                              a.JWKSURI,
		"grant_types_supported":                 []string{exchange.GrantTypeTokenExchange},
		"response_types_supported":              []string{}, // no authorization endpoint
		"token_endpoint_auth_methods_supported": methods,
	}
	// Signing algorithms of client assertions mean something only when a
	// client authenticates with private_key_jwt.
	if slices.Contains(methods, exchange.ClientAuthPrivateKeyJWT) {
		doc["token_endpoint_auth_signing_alg_values_supported"] = exchange.VerifyAlgorithms()
	}
	// Only what is configured for publication: client scopes are private.
	if len(a.ScopesSupported) > 0 {
		doc["scopes_supported"] = a.ScopesSupported
	}
	return doc
}

// Interface guards
var (
	_ caddy.Provisioner           = (*EndpointHandler)(nil)
	_ caddyhttp.MiddlewareHandler = (*EndpointHandler)(nil)
	_ caddy.Provisioner           = (*MetadataHandler)(nil)
	_ caddyhttp.MiddlewareHandler = (*MetadataHandler)(nil)
)
