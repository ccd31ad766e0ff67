package caddymodule

import (
	"errors"
	"fmt"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
)

// RemoteSTS sends a route's exchanges to another Security Token Service
// (Keycloak or any RFC 8693 endpoint) instead of minting in-process. The
// inbound token is verified locally first (the trust blocks), then
// exchanged at the STS for the route's audience and scope; the token the
// STS returns is forwarded, cached like a minted one.
type RemoteSTS struct {
	// TokenEndpoint is the STS's RFC 8693 token endpoint.
	TokenEndpoint string `json:"token_endpoint"`
	// ClientID and ClientSecret are the gateway's credentials at the STS;
	// use {env.*} or {file.*} placeholders for the secret.
	ClientID     string `json:"client_id"`
	ClientSecret string `json:"client_secret"`
	// AuthMethod is client_secret_basic (default) or client_secret_post.
	AuthMethod string `json:"auth_method,omitempty"`
	// Timeout bounds one call (default 5s).
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// Retries after a connection error, 408, 429 or 5xx (default 2).
	Retries int `json:"retries,omitempty"`
}

// provisionSTS builds the route's remote STS client. Route options that
// only an in-process exchange honours are refused with it.
func (h *Handler) provisionSTS() error {
	if h.STS == nil {
		return nil
	}
	if h.Mode == "impersonation" || len(h.Claims) > 0 || len(h.RequireScopes) > 0 ||
		len(h.AllowIf)+len(h.DenyIf)+len(h.Grants)+len(h.ComputedClaims) > 0 || h.BindUpstreamCertificate != "" {
		return errors.New("sts: the remote STS decides what it issues; mode, claims, require_scope, bind_upstream_certificate and policy rules apply to in-process exchanges only")
	}
	repl := caddy.NewReplacer()
	secret, err := repl.ReplaceOrErr(h.STS.ClientSecret, true, true)
	if err != nil {
		return fmt.Errorf("sts client_secret: %w", err)
	}
	h.remote, err = exchange.NewRemoteSTS(exchange.RemoteSTSConfig{
		TokenEndpoint: repl.ReplaceKnown(h.STS.TokenEndpoint, ""),
		ClientID:      repl.ReplaceKnown(h.STS.ClientID, ""),
		ClientSecret:  secret,
		AuthMethod:    h.STS.AuthMethod,
		Audiences:     h.Audiences,
		Scopes:        h.Scopes,
		Timeout:       time.Duration(h.STS.Timeout),
		Retries:       h.STS.Retries,
		DisableCache:  h.engine.Cache() == nil,
		Logger:        h.logger,
	})
	return err
}

// unmarshalCaddyfile reads `sts <token-endpoint> { ... }`.
func (s *RemoteSTS) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.Err("sts needs the STS's token endpoint URL: sts <url> { client_id ...; client_secret ... }")
	}
	s.TokenEndpoint = d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var err error
		switch d.Val() {
		case "client_id":
			err = oneArg(d, &s.ClientID)
		case "client_secret":
			err = oneArg(d, &s.ClientSecret)
		case "auth_method":
			err = oneArg(d, &s.AuthMethod)
		case "timeout":
			err = durationArg(d, &s.Timeout)
		case "retries":
			var n string
			if err = oneArg(d, &n); err == nil {
				if _, serr := fmt.Sscan(n, &s.Retries); serr != nil || s.Retries < 0 {
					return d.Errf("retries must be a whole number >= 0, not '%s'", n)
				}
			}
		default:
			return d.Errf("unrecognized sts option '%s'", d.Val())
		}
		if err != nil {
			return err
		}
	}
	if s.ClientID == "" || s.ClientSecret == "" {
		return d.Err("sts: client_id and client_secret are required")
	}
	return nil
}
