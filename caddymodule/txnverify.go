package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
)

func init() {
	caddy.RegisterModule(TxnVerifyHandler{})
	httpcaddyfile.RegisterHandlerDirective("txn_token_verify", parseTxnVerifyHandler)
	httpcaddyfile.RegisterDirectiveOrder("txn_token_verify", httpcaddyfile.Before, "reverse_proxy")
}

// TxnVerifyHandler is `txn_token_verify`: the check of a Transaction Token
// at an internal hop of the trust domain. It needs no token_exchange
// global option. A request without a valid Txn-Token (typ txntoken+jwt,
// a key of jwks_url, aud = the trust domain, exp, iat, txn, sub, scope,
// req_wl) gets 401; keys that cannot be had get 503 with Retry-After. A
// valid token is forwarded unmodified and its claims become placeholders:
// {txn_token.sub}, {txn_token.txn}, {txn_token.scope}, {txn_token.req_wl},
// {txn_token.iss}, {txn_token.tctx} (JSON), {txn_token.tctx.<name>},
// {txn_token.rctx.<name>}.
type TxnVerifyHandler struct {
	// JWKSURL is the Txn-Token Service's JWKS (the gateway's
	// /.well-known/jwks.json). Required.
	JWKSURL string `json:"jwks_url"`
	// TrustDomain is the aud every Txn-Token must carry. Required.
	TrustDomain string `json:"trust_domain"`
	// Issuer, when set, is the iss every Txn-Token must carry.
	Issuer string `json:"issuer,omitempty"`
	// Algorithms allowed (default: ES256 ES384 EdDSA RS256 PS256).
	Algorithms []string `json:"algorithms,omitempty"`
	// ClockSkew for exp and iat (default 30s).
	ClockSkew caddy.Duration `json:"clock_skew,omitempty"`
	// RefetchInterval is the least time between forced JWKS refetches
	// on an unknown kid (default 30s).
	RefetchInterval caddy.Duration `json:"refetch_interval,omitempty"`
	// JWKSMaxStale: as for a trusted issuer (default 1h).
	JWKSMaxStale caddy.Duration `json:"jwks_max_stale,omitempty"`

	verifier *exchange.TxnVerifier
	logger   *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (TxnVerifyHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.txn_token_verify",
		New: func() caddy.Module { return new(TxnVerifyHandler) },
	}
}

// Provision validates the configuration and starts the JWKS source (shared
// per URL across reloads, like the trusted issuers' ones).
func (h *TxnVerifyHandler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("txn_token_verify: registering metrics: %w", err)
	}
	v, err := exchange.NewTxnVerifier(exchange.TxnVerifyConfig{
		TrustDomain:     h.TrustDomain,
		Issuer:          h.Issuer,
		JWKSURL:         h.JWKSURL,
		Algorithms:      h.Algorithms,
		ClockSkew:       time.Duration(h.ClockSkew),
		RefetchInterval: time.Duration(h.RefetchInterval),
		JWKSMaxStale:    time.Duration(h.JWKSMaxStale),
		KeySources:      jwksSources{},
		OnFetch: func(name string, err error) {
			result := "ok"
			if err != nil {
				result = "error"
			}
			metrics.jwksFetches.WithLabelValues(name, result).Inc()
		},
	})
	if err != nil {
		return fmt.Errorf("txn_token_verify: %w", err)
	}
	h.verifier = v
	return nil
}

// Cleanup releases the JWKS source.
func (h *TxnVerifyHandler) Cleanup() error {
	if h.verifier != nil {
		return h.verifier.Close()
	}
	return nil
}

// ServeHTTP verifies the Txn-Token header and calls the next handler with
// the request unchanged.
func (h *TxnVerifyHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	values := r.Header.Values(exchange.TxnTokenHeader)
	var t *exchange.TxnToken
	var err error
	switch len(values) {
	case 0:
		err = &exchange.Error{Kind: exchange.KindMissingToken, Reason: "missing_txn_token", Description: "no Txn-Token"}
	case 1:
		t, err = h.verifier.Verify(r.Context(), strings.TrimSpace(values[0]))
	default:
		err = &exchange.Error{Kind: exchange.KindInvalidToken, Reason: "multiple_txn_tokens", Description: "more than one Txn-Token header"}
	}
	if err != nil {
		e := exchange.AsError(err)
		fields := []zap.Field{zap.String("remote_ip", exchange.RemoteIP(r)), zap.String("path", r.URL.Path),
			zap.String("reason", e.Reason), zap.String("description", e.Description)}
		if len(values) > 0 {
			fields = append(fields, zap.String("txn_token_sha256", exchange.HashToken(values[0])))
		}
		if e.Kind == exchange.KindUnavailable {
			h.logger.Warn("txn token check unavailable", fields...)
			exchange.SetRetryAfter(w, e)
			w.WriteHeader(http.StatusServiceUnavailable)
			return nil
		}
		h.logger.Info("txn token refused", fields...)
		w.WriteHeader(http.StatusUnauthorized)
		return nil
	}
	repl := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	repl.Map(func(key string) (any, bool) {
		name, ok := strings.CutPrefix(key, "txn_token.")
		if !ok {
			return nil, false
		}
		switch name {
		case "sub":
			return t.Subject, true
		case "txn":
			return t.Txn, true
		case "scope":
			return exchange.FormatScope(t.Scopes), true
		case "req_wl":
			return t.RequestingWorkload, true
		case "iss":
			return t.Issuer, true
		case "tctx", "rctx":
			m := t.Tctx
			if name == "rctx" {
				m = t.Rctx
			}
			b, _ := json.Marshal(m)
			return string(b), true
		}
		if member, ok := strings.CutPrefix(name, "tctx."); ok {
			return contextValue(t.Tctx, member)
		}
		if member, ok := strings.CutPrefix(name, "rctx."); ok {
			return contextValue(t.Rctx, member)
		}
		return nil, false
	})
	h.logger.Debug("txn token verified", zap.String("txn", t.Txn), zap.String("sub", t.Subject),
		zap.String("req_wl", t.RequestingWorkload), zap.String("txn_token_sha256", exchange.HashToken(t.Raw)))
	return next.ServeHTTP(w, r)
}

// contextValue renders one member of tctx or rctx: a string as is, any
// other value as JSON.
func contextValue(m map[string]any, name string) (any, bool) {
	v, ok := m[name]
	if !ok {
		return "", true
	}
	if s, isString := v.(string); isString {
		return s, true
	}
	b, _ := json.Marshal(v)
	return string(b), true
}

// parseTxnVerifyHandler reads:
//
//	txn_token_verify [<matcher>] {
//	    jwks_url <url>
//	    trust_domain <aud>
//	    issuer <iss>
//	    algorithms <alg...>
//	    clock_skew <duration>
//	    refetch_interval <duration>
//	    jwks_max_stale <duration>
//	}
func parseTxnVerifyHandler(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(TxnVerifyHandler)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens.
func (h *TxnVerifyHandler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		var err error
		switch d.Val() {
		case "jwks_url":
			if err = oneArg(d, &h.JWKSURL); err == nil {
				if cerr := exchange.CheckJWKSURL(h.JWKSURL); cerr != nil {
					return d.Errf("%v", cerr)
				}
			}
		case "trust_domain", "audience":
			err = oneArg(d, &h.TrustDomain)
		case "issuer":
			err = oneArg(d, &h.Issuer)
		case "algorithms":
			if err = appendArgs(d, &h.Algorithms); err == nil {
				for _, alg := range h.Algorithms {
					if cerr := exchange.CheckVerifyAlgorithm(alg); cerr != nil {
						return d.Errf("txn_token_verify algorithms: %v", cerr)
					}
				}
			}
		case "clock_skew":
			err = durationArg(d, &h.ClockSkew)
		case "refetch_interval":
			err = durationArg(d, &h.RefetchInterval)
		case "jwks_max_stale":
			err = durationArg(d, &h.JWKSMaxStale)
		default:
			return d.Errf("unrecognized txn_token_verify option '%s'", d.Val())
		}
		if err != nil {
			return err
		}
	}
	if h.JWKSURL == "" || h.TrustDomain == "" {
		return d.Err("txn_token_verify needs jwks_url and trust_domain")
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*TxnVerifyHandler)(nil)
	_ caddy.CleanerUpper          = (*TxnVerifyHandler)(nil)
	_ caddyhttp.MiddlewareHandler = (*TxnVerifyHandler)(nil)
	_ caddyfile.Unmarshaler       = (*TxnVerifyHandler)(nil)
)
