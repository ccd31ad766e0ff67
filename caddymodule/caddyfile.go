package caddymodule

import (
	"github.com/dustin/go-humanize"
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("token_exchange", parseGlobalOption)
	httpcaddyfile.RegisterHandlerDirective("token_exchange", parseHandler)
	httpcaddyfile.RegisterHandlerDirective("token_exchange_jwks", parseJWKSHandler)
	httpcaddyfile.RegisterDirectiveOrder("token_exchange", httpcaddyfile.Before, "reverse_proxy")
	httpcaddyfile.RegisterHandlerDirective("token_exchange_endpoint", parseEndpointHandler)
	httpcaddyfile.RegisterHandlerDirective("token_exchange_metadata", parseMetadataHandler)
	httpcaddyfile.RegisterDirectiveOrder("token_exchange_jwks", httpcaddyfile.Before, "respond")
	httpcaddyfile.RegisterDirectiveOrder("token_exchange_endpoint", httpcaddyfile.Before, "respond")
	httpcaddyfile.RegisterDirectiveOrder("token_exchange_metadata", httpcaddyfile.Before, "respond")
}

// parseGlobalOption sets up the token_exchange app. Syntax:
//
//	token_exchange {
//	    issuer <url>
//	    actor <id>
//	    signing_alg ES256|ES384|EdDSA|RS256|PS256
//	    signing_key_file <path>
//	    key_rotation <duration>
//	    key_publish_ahead <duration>
//	    token_lifetime <duration>
//	    clock_skew <duration>
//	    max_token_size <bytes>
//	    cache_size <entries>
//	    cache on|off
//	    max_act_depth <n>
//	    jwks_fetch_timeout <duration>
//	    max_assertion_lifetime <duration>
//	    max_assertion_age <duration>
//	    token_endpoint <url>
//	    jwks_uri <url>
//	    scopes_supported <scope...>
//	    trust <issuer> {
//	        jwks_url <url> | jwks_file <path> | discovery | discovery_url <url>
//	        audience <aud...>
//	        algorithms <alg...>
//	        token_types <type...>
//	        client_ids <client_id...>
//	        typ <typ>
//	        id_token_claims <claim...>|none
//	        opaque_tokens
//	        introspection_url <url>
//	        introspection_client_id <id>
//	        introspection_client_secret <secret>   ({env.*}, {file.*})
//	        introspection_auth client_secret_basic|client_secret_post|private_key_jwt
//	        introspection_key_file <jwk-or-pem>   (private_key_jwt: the gateway's key at the IdP)
//	        introspection_jwt_response           (RFC 9701: ask for, and require, signed JWT responses)
//	        introspection_cache <duration>
//	        introspection_negative_cache <duration>
//	        introspection_timeout <duration>
//	        introspection_concurrency <n>
//	        scope_claim scope|scp
//	        map_scope <external> <internal...>
//	        pass_unmapped_scopes
//	        refetch_interval <duration>
//	        jwks_max_stale <duration>
//	    }
//	    client <client_id> {
//	        secret_hash <bcrypt>
//	        jwks_url <url> | jwks_file <path>
//	        jwks_max_stale <duration>
//	        audience <aud...>
//	        resource <uri...>
//	        scope <scope...>
//	        may_impersonate
//	        allow_unbinding
//	        allow_if|deny_if|grant|claim ...   (as in the handler)
//	    }
//	}
func parseGlobalOption(d *caddyfile.Dispenser, existing any) (any, error) {
	if existing != nil {
		return nil, d.Err("token_exchange global option may appear only once")
	}
	app := new(App)
	if err := app.UnmarshalCaddyfile(d); err != nil {
		return nil, err
	}
	return httpcaddyfile.App{Name: "token_exchange", Value: caddyconfig.JSON(app, nil)}, nil
}

// UnmarshalCaddyfile sets up the app from Caddyfile tokens.
func (a *App) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume option name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		var err error
		switch d.Val() {
		case "issuer":
			err = oneArg(d, &a.Issuer)
		case "actor":
			err = oneArg(d, &a.Actor)
		case "signing_alg":
			if err = oneArg(d, &a.SigningAlg); err == nil {
				if cerr := exchange.CheckSigningAlgorithm(a.SigningAlg); cerr != nil {
					return d.Errf("%v", cerr)
				}
			}
		case "signing_key_file":
			err = oneArg(d, &a.SigningKeyFile)
		case "key_rotation":
			err = durationArg(d, &a.KeyRotation)
		case "key_publish_ahead":
			err = durationArg(d, &a.KeyPublishAhead)
		case "token_lifetime":
			err = durationArg(d, &a.TokenLifetime)
		case "clock_skew":
			err = durationArg(d, &a.ClockSkew)
		case "max_assertion_lifetime":
			err = durationArg(d, &a.MaxAssertionLifetime)
		case "max_assertion_age":
			err = durationArg(d, &a.MaxAssertionAge)
		case "jwks_fetch_timeout":
			err = durationArg(d, &a.JWKSFetchTimeout)
		case "token_endpoint":
			err = oneArg(d, &a.TokenEndpoint)
		case "jwks_uri":
			err = oneArg(d, &a.JWKSURI)
		case "scopes_supported":
			err = appendArgs(d, &a.ScopesSupported)
		case "cache_size":
			err = intArg(d, &a.CacheSize)
		case "cache":
			var v string
			if err = oneArg(d, &v); err == nil {
				switch v {
				case "off":
					a.CacheOff = true
				case "on":
				default:
					return d.Errf("cache takes on or off, not '%s'", v)
				}
			}
		case "max_token_size":
			err = intArg(d, &a.MaxTokenSize)
		case "max_act_depth":
			err = intArg(d, &a.MaxActDepth)
		case "trust_saml":
			var t TrustedSAMLIssuer
			if err := t.unmarshalCaddyfile(d); err != nil {
				return err
			}
			a.TrustSAML = append(a.TrustSAML, t)
		case "trust":
			var t TrustedIssuer
			if err := t.unmarshalCaddyfile(d); err != nil {
				return err
			}
			if t.OpaqueTokens {
				for _, o := range a.Trust {
					if o.OpaqueTokens {
						return d.Errf("trust %s: opaque_tokens is already set on trust %s: an opaque token cannot say which issuer it is from, so at most one trust block may take them", t.Issuer, o.Issuer)
					}
				}
			}
			a.Trust = append(a.Trust, t)
		case "client":
			var c Client
			if err := c.unmarshalCaddyfile(d); err != nil {
				return err
			}
			a.Clients = append(a.Clients, c)
		default:
			return d.Errf("unrecognized token_exchange option '%s'", d.Val())
		}
		if err != nil {
			return err
		}
	}
	if a.Issuer == "" {
		return d.Err("token_exchange: issuer is required (the iss of every minted token): add `issuer https://<the gateway's public URL>` to the token_exchange global option")
	}
	return nil
}

func (t *TrustedIssuer) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.Err("trust needs the issuer's exact iss, e.g. trust https://idp.example.com { ... }")
	}
	t.Issuer = d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var err error
		switch d.Val() {
		case "jwks_url":
			err = oneArg(d, &t.JWKSURL)
		case "jwks_file":
			err = oneArg(d, &t.JWKSFile)
		case "discovery":
			if d.NextArg() {
				return d.ArgErr()
			}
			t.Discovery = true
		case "discovery_url":
			err = oneArg(d, &t.DiscoveryURL)
		case "id_token_claims":
			if err = appendArgs(d, &t.IDTokenClaims); err == nil {
				if _, cerr := idTokenClaimsConfig(t.IDTokenClaims); cerr != nil {
					return d.Errf("trust %s: %v", t.Issuer, cerr)
				}
			}
		case "opaque_tokens":
			if d.NextArg() {
				return d.ArgErr()
			}
			t.OpaqueTokens = true
		case "introspection_url":
			err = oneArg(d, &t.IntrospectionURL)
		case "introspection_client_id":
			err = oneArg(d, &t.IntrospectionClientID)
		case "introspection_client_secret":
			err = oneArg(d, &t.IntrospectionClientSecret)
		case "introspection_auth":
			if err = oneArg(d, &t.IntrospectionAuth); err == nil &&
				t.IntrospectionAuth != "client_secret_basic" && t.IntrospectionAuth != "client_secret_post" && t.IntrospectionAuth != "private_key_jwt" {
				return d.Errf("trust %s: introspection_auth must be client_secret_basic, client_secret_post or private_key_jwt", t.Issuer)
			}
		case "introspection_key_file":
			err = oneArg(d, &t.IntrospectionKeyFile)
		case "introspection_jwt_response":
			if d.NextArg() {
				return d.ArgErr()
			}
			t.IntrospectionJWTResponse = true
		case "introspection_cache":
			err = durationArg(d, &t.IntrospectionCache)
		case "introspection_negative_cache":
			err = durationArg(d, &t.IntrospectionNegativeCache)
		case "introspection_timeout":
			err = durationArg(d, &t.IntrospectionTimeout)
		case "introspection_concurrency":
			err = intArg(d, &t.IntrospectionConcurrency)
		case "audience":
			err = appendArgs(d, &t.Audiences)
		case "algorithms":
			if err = appendArgs(d, &t.Algorithms); err == nil {
				for _, alg := range t.Algorithms {
					if cerr := exchange.CheckVerifyAlgorithm(alg); cerr != nil {
						return d.Errf("trust %s: %v; use the asymmetric algorithm the issuer signs with (the alg of its JWKS keys, most often RS256 or ES256)", t.Issuer, cerr)
					}
				}
			}
		case "token_types":
			if err = appendArgs(d, &t.TokenTypes); err == nil {
				for _, tt := range t.TokenTypes {
					if _, ok := exchange.TokenTypeURN(tt); !ok {
						return d.Errf("trust %s: unknown token type '%s'", t.Issuer, tt)
					}
				}
			}
		case "client_ids":
			err = appendArgs(d, &t.ClientIDs)
		case "typ":
			err = oneArg(d, &t.Typ)
		case "scope_claim":
			if err = oneArg(d, &t.ScopeClaim); err == nil && t.ScopeClaim != "scope" && t.ScopeClaim != "scp" {
				return d.Errf("trust %s: scope_claim must be scope or scp", t.Issuer)
			}
		case "map_scope":
			args := d.RemainingArgs()
			if len(args) < 2 {
				return d.ArgErr()
			}
			if t.ScopeMap == nil {
				t.ScopeMap = make(map[string][]string)
			}
			t.ScopeMap[args[0]] = append(t.ScopeMap[args[0]], args[1:]...)
		case "pass_unmapped_scopes":
			if d.NextArg() {
				return d.ArgErr()
			}
			t.PassUnmappedScopes = true
		case "refetch_interval":
			err = durationArg(d, &t.RefetchInterval)
		case "jwks_max_stale":
			err = durationArg(d, &t.JWKSMaxStale)
		default:
			return d.Errf("unrecognized trust option '%s'", d.Val())
		}
		if err != nil {
			return err
		}
	}
	// the library's own validator (also run at provision, for JSON
	// configs), without reading files: this names the block's line
	ic, err := t.issuerConfig(nil)
	if err == nil {
		err = ic.Check()
	}
	if err != nil {
		return d.Errf("trust %s: %v", t.Issuer, err)
	}
	return nil
}

func (c *Client) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.Err("client needs a client_id, e.g. client billing-svc { ... }")
	}
	c.ClientID = d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var err error
		switch d.Val() {
		case "secret_hash":
			err = oneArg(d, &c.SecretHash)
		case "jwks_url":
			err = oneArg(d, &c.JWKSURL)
		case "jwks_file":
			err = oneArg(d, &c.JWKSFile)
		case "jwks_max_stale":
			err = durationArg(d, &c.JWKSMaxStale)
		case "audience":
			err = appendArgs(d, &c.Audiences)
		case "resource":
			err = appendArgs(d, &c.Resources)
		case "scope":
			err = appendArgs(d, &c.Scopes)
		case "may_impersonate":
			if d.NextArg() {
				return d.ArgErr()
			}
			c.MayImpersonate = true
		case "allow_unbinding":
			if d.NextArg() {
				return d.ArgErr()
			}
			c.AllowUnbinding = true
		default:
			if ok, perr := c.Policy.unmarshalPolicyLine(d); ok {
				err = perr
				break
			}
			return d.Errf("unrecognized client option '%s'", d.Val())
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// parseHandler sets up the token_exchange middleware. Syntax:
//
//	token_exchange [<matcher>] [<audience...>] {
//	    audience <aud...>
//	    scope <scope...>
//	    require_scope <scope...>
//	    claims <claim...>
//	    mode delegation|impersonation
//	    realm <realm>
//	    bind_upstream_certificate <cert.pem>
//	    sts <token-endpoint> {
//	        client_id <id>
//	        client_secret <secret>
//	        auth_method client_secret_basic|client_secret_post
//	        timeout <duration>
//	        retries <n>
//	    }
//	    dpop optional|required {
//	        algorithms <alg...>
//	        max_age <duration>
//	        nonce
//	        public_origin <scheme://host[:port]...>
//	    }
//	    resource <url> {                 (RFC 9728 / RFC 8707; see resource.go)
//	        authorization_server <issuer...>
//	        scopes_supported <scope...>
//	        resource_name <name>
//	        resource_documentation <url>
//	    }
//	    allow_if <cel-expr>
//	    deny_if <cel-expr>
//	    grant <scope...> if <cel-expr>
//	    claim <name> <cel-expr>
//	    txn_token [<trust-domain>] {
//	        audience <trust-domain>
//	        lifetime <duration>
//	        workload <req_wl>
//	        subject auto|plain|namespaced
//	        authorization delegated|none
//	        tctx <name> <cel-expr>
//	    }
//	}
func parseHandler(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(Handler)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	h.Audiences = append(h.Audiences, d.RemainingArgs()...)
	for d.NextBlock(0) {
		var err error
		switch d.Val() {
		case "audience":
			err = appendArgs(d, &h.Audiences)
		case "scope":
			err = appendArgs(d, &h.Scopes)
		case "require_scope":
			err = appendArgs(d, &h.RequireScopes)
		case "claims":
			if err = appendArgs(d, &h.Claims); err == nil {
				for _, c := range h.Claims {
					if exchange.IsRegisteredClaim(c) {
						return d.Errf("claims: '%s' is set by the gateway and cannot be copied", c)
					}
				}
			}
		case "mode":
			if err = oneArg(d, &h.Mode); err == nil && h.Mode != "delegation" && h.Mode != "impersonation" {
				return d.Errf("mode must be delegation or impersonation, not '%s'", h.Mode)
			}
		case "realm":
			err = oneArg(d, &h.Realm)
		case "bind_upstream_certificate":
			err = oneArg(d, &h.BindUpstreamCertificate)
		case "sts":
			h.STS = new(RemoteSTS)
			err = h.STS.unmarshalCaddyfile(d)
		case "dpop":
			h.DPoP, err = parseDPoP(d, true)
		case "resource":
			h.Resource, err = parseResource(d)
		case "txn_token":
			h.TxnToken, err = unmarshalTxnToken(d)
		default:
			if ok, perr := h.Policy.unmarshalPolicyLine(d); ok {
				err = perr
				break
			}
			return d.Errf("unrecognized token_exchange subdirective '%s'", d.Val())
		}
		if err != nil {
			return err
		}
	}
	// The library's validator, as Provision runs it for JSON configs; here
	// the error names the line.
	g := exchange.Grant{Audiences: h.Audiences, Scopes: h.Scopes, RequireScopes: h.RequireScopes, Claims: h.Claims}
	if err := g.Validate(); err != nil {
		return d.Errf("token_exchange: %v", err)
	}
	return nil
}

// parseJWKSHandler sets up the token_exchange_jwks handler. Syntax:
//
//	token_exchange_jwks [<matcher>] {
//	    max_age <duration>
//	}
func parseJWKSHandler(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(JWKSHandler)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens.
func (h *JWKSHandler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "max_age":
			if err := durationArg(d, &h.MaxAge); err != nil {
				return err
			}
		default:
			return d.Errf("unrecognized token_exchange_jwks subdirective '%s'", d.Val())
		}
	}
	return nil
}

// parseEndpointHandler sets up the token_exchange_endpoint handler. Syntax:
//
//	token_exchange_endpoint [<matcher>] {
//	    max_request_body <size>
//	    dpop optional|required {
//	        algorithms <alg...>
//	        max_age <duration>
//	        nonce
//	    }
//	    txn_token [<trust-domain>] {
//	        audience <trust-domain>
//	        lifetime <duration>
//	        subject auto|plain|namespaced
//	    }
//	}
func parseEndpointHandler(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(EndpointHandler)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens.
func (h *EndpointHandler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "max_request_body":
			var s string
			if err := oneArg(d, &s); err != nil {
				return err
			}
			size, err := humanize.ParseBytes(s)
			if err != nil || size == 0 {
				return d.Errf("invalid max_request_body '%s'", s)
			}
			h.MaxRequestBody = int64(size)
		case "dpop":
			var err error
			if h.DPoP, err = parseDPoP(d, false); err != nil {
				return err
			}
		case "txn_token":
			var err error
			if h.TxnToken, err = unmarshalTxnEndpoint(d); err != nil {
				return err
			}
		default:
			return d.Errf("unrecognized token_exchange_endpoint subdirective '%s'", d.Val())
		}
	}
	return nil
}

// parseMetadataHandler sets up the token_exchange_metadata handler. Syntax:
//
//	token_exchange_metadata [<matcher>]
func parseMetadataHandler(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	h.Next() // consume directive name
	if h.NextArg() || h.NextBlock(0) {
		return nil, h.Err("token_exchange_metadata takes no arguments: issuer, token_endpoint and jwks_uri come from the token_exchange global option")
	}
	return new(MetadataHandler), nil
}

func oneArg(d *caddyfile.Dispenser, dst *string) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	*dst = d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	return nil
}

func appendArgs(d *caddyfile.Dispenser, dst *[]string) error {
	args := d.RemainingArgs()
	if len(args) == 0 {
		return d.ArgErr()
	}
	*dst = append(*dst, args...)
	return nil
}

func durationArg(d *caddyfile.Dispenser, dst *caddy.Duration) error {
	var s string
	if err := oneArg(d, &s); err != nil {
		return err
	}
	dur, err := caddy.ParseDuration(s)
	if err != nil {
		return d.Errf("invalid duration '%s': %v", s, err)
	}
	if dur < 0 {
		return d.Errf("duration '%s' must not be negative", s)
	}
	*dst = caddy.Duration(dur)
	return nil
}

func intArg(d *caddyfile.Dispenser, dst *int) error {
	var s string
	if err := oneArg(d, &s); err != nil {
		return err
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		return d.Errf("'%s' must be a positive whole number", s)
	}
	*dst = n
	return nil
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*App)(nil)
	_ caddyfile.Unmarshaler = (*Handler)(nil)
	_ caddyfile.Unmarshaler = (*JWKSHandler)(nil)
	_ caddyfile.Unmarshaler = (*EndpointHandler)(nil)
)

// parseDPoP reads `dpop optional|required [{ ... }]` of a route (withOrigin)
// or of the token endpoint. Every error names its line.
func parseDPoP(d *caddyfile.Dispenser, withOrigin bool) (*DPoPOptions, error) {
	o := &DPoPOptions{}
	if err := oneArg(d, &o.Mode); err != nil {
		return nil, err
	}
	if o.Mode != dpopOptional && o.Mode != dpopRequired {
		return nil, d.Errf("dpop must be optional or required, not '%s'", o.Mode)
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var err error
		switch d.Val() {
		case "algorithms":
			if err = appendArgs(d, &o.Algorithms); err == nil {
				for _, alg := range o.Algorithms {
					if cerr := exchange.CheckVerifyAlgorithm(alg); cerr != nil {
						return nil, d.Errf("dpop algorithms: %v", cerr)
					}
				}
			}
		case "max_age":
			if err = durationArg(d, &o.MaxAge); err == nil && o.MaxAge == 0 {
				return nil, d.Err("dpop max_age must be positive")
			}
		case "nonce":
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			o.Nonce = true
		case "public_origin":
			if !withOrigin {
				return nil, d.Err("dpop public_origin has no meaning at the token endpoint: proofs are checked against the token_endpoint URL of the global option")
			}
			if err = appendArgs(d, &o.PublicOrigins); err == nil {
				if perr := (&DPoPOptions{Mode: o.Mode, PublicOrigins: o.PublicOrigins}).checkOrigins(); perr != nil {
					return nil, d.Errf("%v", perr)
				}
			}
		default:
			return nil, d.Errf("unrecognized dpop option '%s'", d.Val())
		}
		if err != nil {
			return nil, err
		}
	}
	return o, nil
}
