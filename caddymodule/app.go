// Package caddymodule adapts the exchange engine to Caddy: the
// `token_exchange` app (shared issuers, keys and engine), its HTTP handlers,
// and their Caddyfile syntax. Logic lives in ../exchange; this package only
// wires it into Caddy.
package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
)

func init() {
	caddy.RegisterModule(App{})
}

// App is the `token_exchange` app: the gateway's Security Token Service. It
// holds what every token_exchange handler shares: the trusted issuers and
// their JWKS caches, the signing key, and the exchange engine. It is
// configured with the `token_exchange` global Caddyfile option.
type App struct {
	// Issuer is the `iss` of every minted token. Required.
	Issuer string `json:"issuer"`

	// Actor is `act.sub` of in-process exchanges. Default: Issuer.
	Actor string `json:"actor,omitempty"`

	// SigningAlg is the algorithm minted tokens are signed with:
	// ES256 (default), ES384, EdDSA, RS256 or PS256.
	SigningAlg string `json:"signing_alg,omitempty"`

	// SigningKeyFile is a PEM or JWK private key. Default: a key generated
	// once and kept in Caddy's configured storage, so restarts and every
	// instance sharing that storage sign with the same key and kid.
	SigningKeyFile string `json:"signing_key_file,omitempty"`

	// KeyRotation is the interval between new signing keys (0: the key
	// never rotates). A new key is published key_publish_ahead before it
	// signs, and a retired key stays published until the last token it
	// signed has expired. Every instance sharing the storage follows the
	// same key set. Not with signing_key_file.
	KeyRotation caddy.Duration `json:"key_rotation,omitempty"`

	// KeyPublishAhead is how long a new key is published before it signs
	// (default 1h): longer than any verifier caches the JWKS, and at least
	// the max_age the token_exchange_jwks handler serves.
	KeyPublishAhead caddy.Duration `json:"key_publish_ahead,omitempty"`

	// ScopesSupported is what the RFC 8414 metadata publishes as
	// scopes_supported. Default: nothing, so the metadata never discloses
	// the scopes clients are configured with.
	ScopesSupported []string `json:"scopes_supported,omitempty"`

	// TokenLifetime caps the lifetime of minted tokens (default 5m); a
	// minted token never outlives its subject token.
	TokenLifetime caddy.Duration `json:"token_lifetime,omitempty"`

	// ClockSkew is the leeway for exp, nbf and iat (default 30s).
	ClockSkew caddy.Duration `json:"clock_skew,omitempty"`

	// MaxTokenSize is the largest inbound token accepted, in bytes
	// (default 16384); larger ones are refused before any parsing.
	MaxTokenSize int `json:"max_token_size,omitempty"`

	// MaxActDepth bounds the act chain of a subject token (default 5).
	MaxActDepth int `json:"max_act_depth,omitempty"`

	// MaxAssertionLifetime is how far in the future a private_key_jwt client
	// assertion's exp may lie (default 1h).
	MaxAssertionLifetime caddy.Duration `json:"max_assertion_lifetime,omitempty"`

	// MaxAssertionAge is how far in the past a private_key_jwt client
	// assertion's iat may lie (default 5m); its jti is remembered that long.
	MaxAssertionAge caddy.Duration `json:"max_assertion_age,omitempty"`

	// CacheSize bounds the cache of minted tokens (default 10000 entries).
	CacheSize int `json:"cache_size,omitempty"`
	// CacheOff disables the cache of minted tokens.
	CacheOff bool `json:"cache_off,omitempty"`

	// JWKSFetchTimeout bounds one JWKS fetch (default 5s).
	JWKSFetchTimeout caddy.Duration `json:"jwks_fetch_timeout,omitempty"`

	// TokenEndpoint is the URL of the RFC 8693 token endpoint, as published
	// in the metadata and accepted as a client assertion's aud.
	// Default: issuer + "/oauth2/token".
	TokenEndpoint string `json:"token_endpoint,omitempty"`

	// JWKSURI is the URL of the gateway's JWKS, as published in the metadata.
	// Default: issuer + "/.well-known/jwks.json".
	JWKSURI string `json:"jwks_uri,omitempty"`

	// Trust lists the issuers whose tokens are accepted as subject tokens.
	Trust []TrustedIssuer `json:"trust,omitempty"`

	// TrustSAML lists the SAML 2.0 identity providers whose assertions the
	// token endpoint accepts as subject tokens.
	TrustSAML []TrustedSAMLIssuer `json:"trust_saml,omitempty"`

	// Clients are the clients of the RFC 8693 token endpoint.
	Clients []Client `json:"clients,omitempty"`

	engine  *exchange.Engine
	trust   *exchange.TrustStore
	clients *exchange.Clients
	logger  *zap.Logger
	// the RFC 9728 documents of this config's routes (resource.go)
	resources *resourceRegistry

	// for Start: the signing key set in storage (nil with signing_key_file)
	ctx  context.Context
	keys *exchange.KeySet
}

// TrustedIssuer is one issuer of subject tokens.
type TrustedIssuer struct {
	// Issuer is the exact `iss` of its tokens.
	Issuer string `json:"issuer"`
	// JWKSURL is fetched and refreshed in the background.
	JWKSURL string `json:"jwks_url,omitempty"`
	// JWKSFile is read once at provisioning.
	JWKSFile string `json:"jwks_file,omitempty"`
	// Discovery reads the issuer's OIDC Discovery document
	// (<issuer>/.well-known/openid-configuration, falling back to RFC 8414
	// /.well-known/oauth-authorization-server) and takes jwks_uri and
	// introspection_endpoint from it; its issuer must equal Issuer exactly.
	// Exactly one of JWKSURL, JWKSFile and Discovery/DiscoveryURL.
	Discovery bool `json:"discovery,omitempty"`
	// DiscoveryURL is a non-standard metadata location (implies Discovery).
	DiscoveryURL string `json:"discovery_url,omitempty"`
	// OpaqueTokens sends every bearer token that is not a compact JWS to
	// this issuer's RFC 7662 introspection endpoint. At most one trusted
	// issuer may set it.
	OpaqueTokens bool `json:"opaque_tokens,omitempty"`
	// IntrospectionURL is the RFC 7662 endpoint (default with discovery:
	// the metadata's introspection_endpoint).
	IntrospectionURL string `json:"introspection_url,omitempty"`
	// IntrospectionClientID and IntrospectionClientSecret are the gateway's
	// credentials at the issuer. Both accept {env.*} and {file.*}
	// placeholders, resolved at provision: keep the secret out of the config.
	IntrospectionClientID     string `json:"introspection_client_id,omitempty"`
	IntrospectionClientSecret string `json:"introspection_client_secret,omitempty"`
	// IntrospectionAuth is client_secret_basic (default), client_secret_post
	// or private_key_jwt (RFC 7523, signed with IntrospectionKeyFile).
	IntrospectionAuth string `json:"introspection_auth,omitempty"`
	// IntrospectionKeyFile is the gateway's private key at the issuer (JWK
	// or PEM) for private_key_jwt; read at provision.
	IntrospectionKeyFile string `json:"introspection_key_file,omitempty"`
	// IntrospectionJWTResponse asks for RFC 9701 JWT responses only (a
	// plain JSON answer is then a failed call). Without it, JSON is asked
	// for and a JWT response is verified all the same.
	IntrospectionJWTResponse bool `json:"introspection_jwt_response,omitempty"`
	// IntrospectionCache bounds how long an active result is reused
	// (default 1m; never past the token's exp).
	IntrospectionCache caddy.Duration `json:"introspection_cache,omitempty"`
	// IntrospectionNegativeCache is how long an inactive or refused result
	// is reused (default 5s).
	IntrospectionNegativeCache caddy.Duration `json:"introspection_negative_cache,omitempty"`
	// IntrospectionTimeout bounds one introspection call (default 3s).
	IntrospectionTimeout caddy.Duration `json:"introspection_timeout,omitempty"`
	// IntrospectionConcurrency bounds the calls in flight (default 16).
	IntrospectionConcurrency int `json:"introspection_concurrency,omitempty"`
	// IDTokenClaims are the claims that mark a token as an ID token, refused
	// unless presented as one. Default: at_hash c_hash nonce. ["none"]
	// turns detection off (refresh tokens are refused all the same).
	IDTokenClaims []string `json:"id_token_claims,omitempty"`
	// Audiences: an inbound `aud` must contain one of them. Required.
	Audiences []string `json:"audiences,omitempty"`
	// Algorithms is the JWS allow-list. Required; none and HMAC are refused.
	Algorithms []string `json:"algorithms,omitempty"`
	// TokenTypes are what its tokens may be presented as
	// (access_token, jwt, id_token, ...). Default: access_token jwt.
	TokenTypes []string `json:"token_types,omitempty"`
	// ClientIDs are the audiences accepted on its ID tokens (needed for
	// the id_token token type).
	ClientIDs []string `json:"client_ids,omitempty"`
	// Typ, when set, is the JOSE typ header its tokens must carry (e.g. at+jwt).
	Typ string `json:"typ,omitempty"`
	// ScopeClaim is `scope` (default, space-delimited) or `scp` (array).
	ScopeClaim string `json:"scope_claim,omitempty"`
	// ScopeMap maps an external scope to internal scopes.
	ScopeMap map[string][]string `json:"scope_map,omitempty"`
	// PassUnmappedScopes keeps external scopes that have no mapping.
	PassUnmappedScopes bool `json:"pass_unmapped_scopes,omitempty"`
	// RefetchInterval is the least time between forced JWKS refetches
	// on an unknown kid (default 30s).
	RefetchInterval caddy.Duration `json:"refetch_interval,omitempty"`
	// JWKSMaxStale is how long the last good keys of JWKSURL stay in use
	// while refreshes fail (an error, garbage, an empty set), counted from
	// the last good fetch (default 1h). After it, the issuer's tokens get
	// 503 until good keys arrive. A good set always replaces the keys at once.
	JWKSMaxStale caddy.Duration `json:"jwks_max_stale,omitempty"`
}

// Client is a client of the token endpoint.
type Client struct {
	ClientID   string `json:"client_id"`
	SecretHash string `json:"secret_hash,omitempty"`
	JWKSURL    string `json:"jwks_url,omitempty"`
	JWKSFile   string `json:"jwks_file,omitempty"`
	// JWKSMaxStale: as for a trusted issuer, for the client's jwks_url.
	JWKSMaxStale   caddy.Duration `json:"jwks_max_stale,omitempty"`
	Audiences      []string       `json:"audiences,omitempty"`
	Resources      []string       `json:"resources,omitempty"`
	Scopes         []string       `json:"scopes,omitempty"`
	MayImpersonate bool           `json:"may_impersonate,omitempty"`
	// AllowUnbinding lets the client exchange a sender-constrained subject
	// token without proof of possession (logged; the minted token is unbound).
	AllowUnbinding bool `json:"allow_unbinding,omitempty"`
	// Policy holds the client's CEL rules: allow_if, deny_if, grant, claim.
	Policy
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "token_exchange",
		New: func() caddy.Module { return new(App) },
	}
}

// Provision validates the configuration, loads or creates the signing key and
// starts the JWKS caches. Everything is checked here, not on the first request.
func (a *App) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("token_exchange: registering metrics: %w", err)
	}
	if a.Issuer == "" {
		return errors.New("token_exchange: issuer is required")
	}
	alg := a.SigningAlg
	if alg == "" {
		alg = exchange.DefaultSigningAlgorithm
	}
	if err := exchange.CheckSigningAlgorithm(alg); err != nil {
		return fmt.Errorf("token_exchange: %w", err)
	}

	issuers := make([]exchange.IssuerConfig, 0, len(a.Trust))
	repl := caddy.NewReplacer()
	for _, t := range a.Trust {
		ic, err := t.issuerConfig(repl)
		if err != nil {
			return fmt.Errorf("token_exchange: trusted issuer %q: %w", t.Issuer, err)
		}
		issuers = append(issuers, ic)
	}
	onFetch := func(name string, err error) {
		result := "ok"
		if err != nil {
			result = "error"
		}
		metrics.jwksFetches.WithLabelValues(name, result).Inc()
	}
	samlRecipient := a.TokenEndpoint
	if samlRecipient == "" {
		samlRecipient = strings.TrimSuffix(a.Issuer, "/") + "/oauth2/token"
	}
	var samlIssuers []exchange.SAMLIssuerConfig
	for _, s := range a.TrustSAML {
		cfg, err := s.config(samlRecipient)
		if err != nil {
			return fmt.Errorf("token_exchange: %w", err)
		}
		samlIssuers = append(samlIssuers, cfg)
	}
	trust, err := exchange.NewTrustStore(ctx, exchange.TrustConfig{
		// Fetching starts in Start: `caddy validate` provisions too.
		DeferFetching: true,
		Issuers:       issuers,
		SAML:          samlIssuers,
		ClockSkew:     time.Duration(a.ClockSkew),
		MaxTokenSize:  a.MaxTokenSize,
		FetchTimeout:  time.Duration(a.JWKSFetchTimeout),
		Logger:        a.logger,
		OnFetch:       onFetch,
		KeySources:    jwksSources{},
		OnIntrospect: func(issuer, result string) {
			metrics.introspections.WithLabelValues(issuer, result).Inc()
		},
	})
	if err != nil {
		return fmt.Errorf("token_exchange: %w", err)
	}
	a.trust = trust

	// A key file is read (and checked) here; a key kept in storage is
	// loaded or created in Start, because provisioning must write nothing:
	// `caddy validate` and `adapt` provision too.
	var signer *exchange.Signer
	if a.SigningKeyFile != "" {
		if a.KeyRotation > 0 {
			_ = trust.Close()
			return errors.New("token_exchange: key_rotation cannot rotate a signing_key_file: remove one of them")
		}
		if signer, err = exchange.SignerFromFile(a.SigningKeyFile, alg); err != nil {
			_ = trust.Close()
			return fmt.Errorf("token_exchange: %w", err)
		}
	}
	a.ctx = ctx

	a.engine, err = exchange.NewEngine(exchange.EngineConfig{
		Issuer:        a.Issuer,
		Actor:         a.Actor,
		TokenLifetime: time.Duration(a.TokenLifetime),
		MaxActDepth:   a.MaxActDepth,
		CacheSize:     a.CacheSize,
		DisableCache:  a.CacheOff,
	}, trust, signer)
	if err != nil {
		_ = trust.Close()
		return fmt.Errorf("token_exchange: %w", err)
	}
	if a.TokenEndpoint == "" {
		a.TokenEndpoint = strings.TrimSuffix(a.Issuer, "/") + "/oauth2/token"
	}
	if a.JWKSURI == "" {
		a.JWKSURI = strings.TrimSuffix(a.Issuer, "/") + "/.well-known/jwks.json"
	}
	clientCfgs := make([]exchange.ClientConfig, 0, len(a.Clients))
	for _, c := range a.Clients {
		rules, err := c.Policy.compile()
		if err != nil {
			_ = trust.Close()
			return fmt.Errorf("token_exchange: client %s: %w", c.ClientID, err)
		}
		clientCfgs = append(clientCfgs, exchange.ClientConfig{
			Rules:          rules,
			ClientID:       c.ClientID,
			SecretHash:     c.SecretHash,
			JWKSURL:        c.JWKSURL,
			JWKSFile:       c.JWKSFile,
			JWKSMaxStale:   time.Duration(c.JWKSMaxStale),
			Audiences:      c.Audiences,
			Resources:      c.Resources,
			Scopes:         c.Scopes,
			MayImpersonate: c.MayImpersonate,
			AllowUnbinding: c.AllowUnbinding,
		})
	}
	a.clients, err = exchange.NewClients(ctx, clientCfgs, exchange.ClientOptions{
		TokenEndpointURLs:    []string{a.TokenEndpoint, a.Issuer},
		MaxAssertionLifetime: time.Duration(a.MaxAssertionLifetime),
		MaxAssertionAge:      time.Duration(a.MaxAssertionAge),
		ClockSkew:            time.Duration(a.ClockSkew),
		FetchTimeout:         time.Duration(a.JWKSFetchTimeout),
		Logger:               a.logger,
		OnFetch:              onFetch,
		KeySources:           jwksSources{},
		// A jti used at one instance is refused at every instance sharing
		// this storage.
		ReplayStorage: ctx.Storage(),
		DeferFetching: true,
	})
	if err != nil {
		_ = trust.Close()
		return fmt.Errorf("token_exchange: %w", err)
	}

	if signer == nil {
		// The issuer's key set in storage, shared by every instance of the
		// cluster; nothing is read or written until Start.
		ahead := a.publishAhead()
		a.keys, err = exchange.NewKeySet(exchange.KeySetConfig{
			Issuer: a.Issuer, Alg: alg,
			Rotation: time.Duration(a.KeyRotation), PublishAhead: ahead,
			TokenLifetime: a.engine.TokenLifetime(), ClockSkew: time.Duration(a.ClockSkew),
			Storage: ctx.Storage(), Logger: a.logger,
			Recheck: min(time.Minute, ahead/4),
			OnChange: func(s *exchange.Signer) {
				if prev := a.engine.Signer(); prev != nil && prev.KeyID() != s.KeyID() {
					metrics.keyChanges.Inc()
				}
				metrics.keySince.Set(float64(s.SigningSince().Unix()))
				a.engine.SetSigner(s)
			},
			OnError: func(error) { metrics.keyStorageErrors.Inc() },
		})
		if err != nil {
			_ = trust.Close()
			return fmt.Errorf("token_exchange: %w", err)
		}
	}
	return nil
}

// Start loads the signing key kept in storage, generating and storing it
// under the storage lock on first start; a signing_key_file was loaded at
// provision.
func (a *App) Start() error {
	a.trust.StartFetching()
	a.clients.StartFetching()
	signer := a.engine.Signer()
	if a.keys != nil {
		var err error
		if signer, err = a.keys.Start(a.ctx); err != nil {
			return fmt.Errorf("token_exchange: %w", err)
		}
	}
	a.logger.Info("token exchange ready",
		zap.String("issuer", a.Issuer),
		zap.String("signing_alg", signer.Algorithm()),
		zap.String("kid", signer.KeyID()),
		zap.Strings("trusted_issuers", a.trust.Issuers()))
	return nil
}

// idTokenClaimsConfig maps id_token_claims to exchange.IssuerConfig: nil
// is the default, ["none"] no detection.
func idTokenClaimsConfig(v []string) ([]string, error) {
	if slices.Contains(v, "none") {
		if len(v) != 1 {
			return nil, errors.New("id_token_claims none cannot be combined with claim names")
		}
		return []string{}, nil
	}
	for _, c := range v {
		if c == "" {
			return nil, errors.New("id_token_claims holds an empty claim name")
		}
	}
	return v, nil
}

// Stop implements caddy.App.
func (a *App) Stop() error {
	if a.keys != nil {
		a.keys.Stop()
	}
	return nil
}

// Cleanup stops the JWKS refreshers of this config.
func (a *App) Cleanup() error {
	var errs []error
	if a.clients != nil {
		errs = append(errs, a.clients.Close())
	}
	if a.trust != nil {
		errs = append(errs, a.trust.Close())
	}
	return errors.Join(errs...)
}

// publishAhead is key_publish_ahead with its default.
func (a *App) publishAhead() time.Duration {
	if a.KeyPublishAhead > 0 {
		return time.Duration(a.KeyPublishAhead)
	}
	return exchange.DefaultKeyPublishAhead
}

// Engine is the shared exchange engine.
func (a *App) Engine() *exchange.Engine { return a.engine }

// appFrom looks the app up for a handler, failing provisioning with a clear
// message when the global option is missing (ctx.App would silently create
// an empty one).
func appFrom(ctx caddy.Context, handler string) (*App, error) {
	v, err := ctx.AppIfConfigured("token_exchange")
	if errors.Is(err, caddy.ErrNotConfigured) {
		return nil, fmt.Errorf("%s needs the token_exchange global option (an issuer and at least one trust block): add to the global options: token_exchange { issuer https://<gateway> trust https://<idp> { jwks_url ... audience ... algorithms ... } }: %w", handler, err)
	}
	if err != nil {
		// the app is configured but failed: its own error says why
		return nil, fmt.Errorf("%s: %w", handler, err)
	}
	return v.(*App), nil
}

// Interface guards
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
)

// issuerConfig is the library's configuration of this trust block. With a
// replacer, the introspection credentials' placeholders are resolved (at
// provision); without one (the Caddyfile adapter's check) they stay as
// written.
func (t *TrustedIssuer) issuerConfig(repl *caddy.Replacer) (exchange.IssuerConfig, error) {
	idTokenClaims, err := idTokenClaimsConfig(t.IDTokenClaims)
	if err != nil {
		return exchange.IssuerConfig{}, err
	}
	replace := func(s string) string {
		if repl == nil {
			return s
		}
		return repl.ReplaceKnown(s, "")
	}
	return exchange.IssuerConfig{
		Issuer:        t.Issuer,
		JWKSURL:       t.JWKSURL,
		JWKSFile:      t.JWKSFile,
		Discovery:     t.Discovery,
		DiscoveryURL:  t.DiscoveryURL,
		IDTokenClaims: idTokenClaims,
		OpaqueTokens:  t.OpaqueTokens,
		Introspection: exchange.IntrospectionConfig{
			URL:              t.IntrospectionURL,
			ClientID:         replace(t.IntrospectionClientID),
			ClientSecret:     replace(t.IntrospectionClientSecret),
			AuthMethod:       t.IntrospectionAuth,
			KeyFile:          replace(t.IntrospectionKeyFile),
			JWTResponse:      t.IntrospectionJWTResponse,
			CacheTTL:         time.Duration(t.IntrospectionCache),
			NegativeCacheTTL: time.Duration(t.IntrospectionNegativeCache),
			Timeout:          time.Duration(t.IntrospectionTimeout),
			MaxConcurrent:    t.IntrospectionConcurrency,
		},
		Audiences:       t.Audiences,
		Algorithms:      t.Algorithms,
		TokenTypes:      t.TokenTypes,
		ClientIDs:       t.ClientIDs,
		RequiredTyp:     t.Typ,
		ScopeClaim:      t.ScopeClaim,
		Scopes:          exchange.ScopeMap{Map: t.ScopeMap, PassUnmapped: t.PassUnmappedScopes},
		RefetchInterval: time.Duration(t.RefetchInterval),
		JWKSMaxStale:    time.Duration(t.JWKSMaxStale),
	}, nil
}
