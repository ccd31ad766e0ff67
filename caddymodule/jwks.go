package caddymodule

import (
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
)

func init() {
	caddy.RegisterModule(JWKSHandler{})
}

// JWKSHandler is the `token_exchange_jwks` handler: it serves the gateway's
// public signing keys as a JWK Set (RFC 7517), so upstream APIs can verify
// the tokens the gateway mints.
type JWKSHandler struct {
	// MaxAge of the Cache-Control header (default 5m).
	MaxAge caddy.Duration `json:"max_age,omitempty"`

	engine *exchange.Engine
}

// CaddyModule returns the Caddy module information.
func (JWKSHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.token_exchange_jwks",
		New: func() caddy.Module { return new(JWKSHandler) },
	}
}

// Provision sets up the handler.
func (h *JWKSHandler) Provision(ctx caddy.Context) error {
	app, err := appFrom(ctx, "token_exchange_jwks handler")
	if err != nil {
		return err
	}
	h.engine = app.Engine()
	if h.MaxAge == 0 {
		h.MaxAge = caddy.Duration(5 * time.Minute)
	}
	// A verifier may keep this JWKS max_age long: a key must be published
	// at least that long before it signs.
	if ahead := app.publishAhead(); app.KeyRotation > 0 && time.Duration(h.MaxAge) > ahead {
		return fmt.Errorf("token_exchange_jwks: max_age %s is longer than key_publish_ahead %s: verifiers caching the JWKS that long would miss a new key",
			time.Duration(h.MaxAge), ahead)
	}
	return nil
}

// ServeHTTP serves the JWKS.
func (h *JWKSHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		return caddyhttp.Error(http.StatusMethodNotAllowed, nil)
	}
	signer := h.engine.Signer()
	if signer == nil {
		// The app loads or creates its key when it starts.
		w.Header().Set("Retry-After", "1")
		return caddyhttp.Error(http.StatusServiceUnavailable, nil)
	}
	body := signer.JWKS()
	w.Header().Set("Content-Type", "application/jwk-set+json")
	w.Header().Set("Cache-Control", "public, max-age="+strconv.Itoa(int(time.Duration(h.MaxAge).Seconds())))
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		_, _ = w.Write(body)
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*JWKSHandler)(nil)
	_ caddyhttp.MiddlewareHandler = (*JWKSHandler)(nil)
)

// jwksSourcePool holds the JWKS sources (of trusted issuers and
// private_key_jwt clients) of every loaded config, one per URL and fetch
// settings. A config reload acquires the running source before the old
// config releases it, so the source keeps its keys and its refresher: an
// IdP whose JWKS is down during a reload does not lose its last good keys.
var jwksSourcePool = caddy.NewUsagePool()

// jwksSources is the exchange.KeySourcePool of jwksSourcePool.
type jwksSources struct{}

// pooledKeySource makes a key source a caddy.Destructor.
type pooledKeySource struct{ *exchange.KeySource }

func (p pooledKeySource) Destruct() error { return p.Close() }

func (jwksSources) Acquire(key string, newSource func() (*exchange.KeySource, error)) (*exchange.KeySource, error) {
	v, _, err := jwksSourcePool.LoadOrNew(key, func() (caddy.Destructor, error) {
		src, err := newSource()
		if err != nil {
			return nil, err
		}
		return pooledKeySource{src}, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(pooledKeySource).KeySource, nil
}

func (jwksSources) Release(key string) error {
	_, err := jwksSourcePool.Delete(key)
	return err
}
