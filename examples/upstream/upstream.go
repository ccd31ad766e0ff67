// Package upstream is the demo internal API of the quickstart: a Caddy
// handler (`demo_upstream`) that verifies every request's bearer token the way
// any upstream would, against the gateway's published JWKS with jwx, and
// answers with the claims it saw. It deliberately does not use the exchange
// package: it is a third party to the gateway.
package upstream

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/lestrrat-go/httprc/v3"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"
)

func init() {
	caddy.RegisterModule(Upstream{})
	httpcaddyfile.RegisterHandlerDirective("demo_upstream", func(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
		u := new(Upstream)
		return u, u.UnmarshalCaddyfile(h.Dispenser)
	})
	httpcaddyfile.RegisterDirectiveOrder("demo_upstream", httpcaddyfile.Before, "respond")
}

// Upstream verifies minted tokens against the gateway's JWKS and echoes
// their claims as JSON.
type Upstream struct {
	// JWKSURL is the gateway's token_exchange_jwks endpoint.
	JWKSURL string `json:"jwks_url"`
	// Issuer is the gateway's issuer.
	Issuer string `json:"issuer"`
	// Audiences this API accepts (one must be in the token's aud).
	Audiences []string `json:"audiences"`

	cache  *jwk.Cache
	cancel context.CancelFunc
}

// CaddyModule returns the Caddy module information.
func (Upstream) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "http.handlers.demo_upstream", New: func() caddy.Module { return new(Upstream) }}
}

// Provision registers the JWKS without waiting: the gateway may be the very
// server that is starting.
func (u *Upstream) Provision(ctx caddy.Context) error {
	if u.JWKSURL == "" || u.Issuer == "" || len(u.Audiences) == 0 {
		return fmt.Errorf("demo_upstream needs jwks_url, issuer and audience")
	}
	cctx, cancel := context.WithCancel(ctx)
	cache, err := jwk.NewCache(cctx, httprc.NewClient())
	if err != nil {
		cancel()
		return err
	}
	if err := cache.Register(cctx, u.JWKSURL, jwk.WithWaitReady(false)); err != nil {
		cancel()
		return err
	}
	u.cache, u.cancel = cache, cancel
	return nil
}

// Cleanup stops the JWKS refresher.
func (u *Upstream) Cleanup() error {
	if u.cancel != nil {
		u.cancel()
	}
	return nil
}

func (u *Upstream) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	w.Header().Set("Content-Type", "application/json")
	raw, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		w.WriteHeader(http.StatusUnauthorized)
		return json.NewEncoder(w).Encode(map[string]string{"error": "no bearer token"})
	}
	set, err := u.cache.Lookup(r.Context(), u.JWKSURL)
	if err != nil {
		set, err = u.cache.Refresh(r.Context(), u.JWKSURL)
	}
	if err != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		return json.NewEncoder(w).Encode(map[string]string{"error": "gateway JWKS unavailable"})
	}
	tok, err := jwt.Parse([]byte(raw),
		jwt.WithKeySet(set, jws.WithRequireKid(true)),
		jwt.WithIssuer(u.Issuer),
		jwt.WithAcceptableSkew(5*time.Second),
	)
	if err == nil {
		aud, _ := tok.Audience()
		if !slices.ContainsFunc(aud, func(a string) bool { return slices.Contains(u.Audiences, a) }) {
			err = fmt.Errorf("aud %v is not this API's", aud)
		}
	}
	if err != nil {
		w.WriteHeader(http.StatusUnauthorized)
		return json.NewEncoder(w).Encode(map[string]string{"error": "token rejected: " + err.Error()})
	}
	msg, err := jws.Parse([]byte(raw))
	if err != nil {
		return err
	}
	claims := map[string]any{}
	for _, k := range tok.Keys() {
		var v any
		if tok.Get(k, &v) == nil {
			claims[k] = v
		}
	}
	typ, _ := msg.Signatures()[0].ProtectedHeaders().Type()
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(map[string]any{
		"verified":   true,
		"typ":        typ,
		"claims":     claims,
		"path":       r.URL.Path,
		"user_agent": r.UserAgent(),
	})
}

// UnmarshalCaddyfile sets up the handler. Syntax:
//
//	demo_upstream {
//	    jwks_url <url>
//	    issuer <issuer>
//	    audience <audience...>
//	}
func (u *Upstream) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next()
	for d.NextBlock(0) {
		key := d.Val()
		if !d.NextArg() {
			return d.ArgErr()
		}
		switch key {
		case "jwks_url":
			u.JWKSURL = d.Val()
		case "issuer":
			u.Issuer = d.Val()
		case "audience":
			u.Audiences = append(u.Audiences, d.Val())
			u.Audiences = append(u.Audiences, d.RemainingArgs()...)
		default:
			return d.Errf("unrecognized demo_upstream subdirective '%s'", key)
		}
	}
	return nil
}

var (
	_ caddy.Provisioner           = (*Upstream)(nil)
	_ caddy.CleanerUpper          = (*Upstream)(nil)
	_ caddyhttp.MiddlewareHandler = (*Upstream)(nil)
	_ caddyfile.Unmarshaler       = (*Upstream)(nil)
)
