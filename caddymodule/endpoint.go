package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"runtime/debug"
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
	// TxnToken, when set, issues Transaction Tokens for
	// requested_token_type txn_token (txntoken.go).
	TxnToken *TxnEndpointOptions `json:"txn_token,omitempty"`

	tokenEndpointURLs []*url.URL

	app      *App
	logger   *zap.Logger
	endpoint *exchange.TokenEndpoint
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
		h.MaxRequestBody = exchange.DefaultMaxRequestBody
	}
	if err := h.provisionEndpointDPoP(); err != nil {
		return fmt.Errorf("token_exchange_endpoint: %w", err)
	}
	h.endpoint = &exchange.TokenEndpoint{Engine: app.engine, Clients: app.clients, Realm: app.Issuer,
		MaxRequestBody: h.MaxRequestBody, OnOutcome: h.audit, Binding: h.endpointBinding}
	if h.endpoint.Txn, err = h.TxnToken.config(app); err != nil {
		return fmt.Errorf("token_exchange_endpoint: %w", err)
	}
	return nil
}

// ServeHTTP serves one token request through the library's TokenEndpoint,
// turning a panic into a logged server error.
func (h *EndpointHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	defer func() {
		if rec := recover(); rec != nil {
			h.logger.Error("panic in token endpoint", zap.Any("panic", rec), zap.ByteString("stack", debug.Stack()))
			o := &exchange.EndpointOutcome{}
			h.endpoint.Fail(w, o, &exchange.Error{Kind: exchange.KindServer, Reason: "panic", Description: "internal error"})
			metrics.endpoint.WithLabelValues(o.Code).Inc()
		}
	}()
	h.endpoint.ServeHTTP(w, withEndpointSpan(r))
	return nil
}

// audit writes the one log line and the metric of every answer: who (the
// client, authenticated or claimed), from where, and why; never a secret or
// a token.
func (h *EndpointHandler) audit(r *http.Request, o *exchange.EndpointOutcome) {
	endEndpointSpan(r, o, h.app.engine.Cache() != nil)
	fields := []zap.Field{zap.String("remote_ip", exchange.RemoteIP(r))}
	if o.Client != nil {
		fields = append(fields, zap.String("client_id", o.Client.ClientID), zap.String("client_auth", o.Client.Method))
	} else if o.ClaimedClientID != "" {
		fields = append(fields, zap.String("claimed_client_id", o.ClaimedClientID))
	}
	if o.Issued != nil {
		if o.Client != nil {
			h.logUnbinding(r, o.Client.ClientID, o.Issued.Minted)
		}
		metrics.endpoint.WithLabelValues(outcomeOK).Inc()
		h.logger.Info("token exchanged", append(fields, mintedFields(o.Issued.Minted)...)...)
		return
	}
	e := o.Err
	metrics.endpoint.WithLabelValues(o.Code).Inc()
	fields = append(fields,
		zap.String("error", o.Code),
		zap.String("reason", e.Reason),
		zap.String("description", e.Description),
		zap.Int("status", o.Status))
	if o.SubjectTokenHash != "" {
		fields = append(fields, zap.String("subject_token_sha256", o.SubjectTokenHash))
	}
	if e.SubjectSub != "" {
		fields = append(fields, zap.String("subject_issuer", e.SubjectIssuer), zap.String("sub", e.SubjectSub))
	}
	if e.Err != nil && e.Kind != exchange.KindInvalidClient {
		fields = append(fields, zap.Error(e.Err))
	}
	switch e.Kind {
	case exchange.KindServer:
		h.logger.Error("token endpoint failed", fields...)
	case exchange.KindUnavailable:
		h.logger.Warn("token endpoint unavailable", fields...)
	default:
		h.logger.Info("token exchange refused", fields...)
	}
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
	body, err := json.Marshal(h.app.metadata())
	if err != nil {
		return caddyhttp.Error(http.StatusInternalServerError, err)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	_, err = w.Write(body)
	return err
}

// metadata is the RFC 8414 document.
func (a *App) metadata() map[string]any {
	return exchange.Metadata(exchange.MetadataConfig{
		Issuer: a.Issuer, TokenEndpoint: a.TokenEndpoint, JWKSURI: a.JWKSURI, ScopesSupported: a.ScopesSupported,
	}, a.clients)
}

// Interface guards
var (
	_ caddy.Provisioner           = (*EndpointHandler)(nil)
	_ caddyhttp.MiddlewareHandler = (*EndpointHandler)(nil)
	_ caddy.Provisioner           = (*MetadataHandler)(nil)
	_ caddyhttp.MiddlewareHandler = (*MetadataHandler)(nil)
)
