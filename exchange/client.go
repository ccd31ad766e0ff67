package exchange

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"runtime"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/crypto/bcrypt"
)

// Client authentication methods of the token endpoint, named as RFC 8414
// token_endpoint_auth_methods_supported names them.
const (
	ClientAuthSecretBasic   = "client_secret_basic"
	ClientAuthSecretPost    = "client_secret_post"
	ClientAuthPrivateKeyJWT = "private_key_jwt"
)

// ClientAssertionTypeJWTBearer is the client_assertion_type of RFC 7523 §2.2.
const ClientAssertionTypeJWTBearer = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

// Defaults for client authentication.
const (
	// DefaultMaxAssertionLifetime is generous enough for common client
	// libraries (zitadel/oidc signs 1h assertions and cannot change that).
	DefaultMaxAssertionLifetime = time.Hour
	// DefaultMaxAssertionAge is how old an assertion's iat may be (RFC 7523
	// §3 lets a server refuse an old iat): the jti of an accepted assertion
	// is kept only that long, so the replay set stays small whatever the
	// assertion's exp.
	DefaultMaxAssertionAge = 5 * time.Minute
	// DefaultMaxReplayEntries bounds the jti records of one client: a client
	// that exceeds it is refused until its records expire; others are not.
	DefaultMaxReplayEntries = 50_000
	DefaultMaxAssertionSize = 8 << 10
	defaultSecretCacheSize  = 1000
	// DefaultSecretCheckWait is how long a secret check waits for a bcrypt
	// slot before the request is answered 503.
	DefaultSecretCheckWait = 250 * time.Millisecond
	// secretCheckRetryAfter is the Retry-After of that 503.
	secretCheckRetryAfter = time.Second
	// replayFullRetryAfter is the Retry-After for a client whose jti
	// records are all live.
	replayFullRetryAfter = 30 * time.Second
	// bcryptMaxPassword: bcrypt reads at most 72 bytes, and
	// bcrypt.GenerateFromPassword refuses longer secrets, so a longer one
	// can never be right; refusing it keeps a 72-byte prefix from passing.
	bcryptMaxPassword = 72
	// replaySweepInterval: how often the replay cache drops expired entries
	// on its own, and the least time between two sweeps when it is full.
	replaySweepInterval = time.Minute
	replayFullSweepGap  = time.Second
)

// ErrBasicAuthFailed is wrapped (as Error.Err) into every error of a request
// that carried Basic credentials, so the endpoint can answer an invalid_client
// with 401 and WWW-Authenticate: Basic (RFC 6749 §5.2). Test with
// BasicAuthAttempted.
var ErrBasicAuthFailed = errors.New("client_secret_basic was attempted")

// BasicAuthAttempted tells whether err came from a request that tried
// client_secret_basic.
func BasicAuthAttempted(err error) bool { return errors.Is(err, ErrBasicAuthFailed) }

// ClientConfig is one client of the token endpoint. It authenticates with a
// bcrypt-hashed secret (client_secret_basic or client_secret_post) or with
// private_key_jwt against its JWKS (exactly one of these).
type ClientConfig struct {
	ClientID string
	// SecretHash is a bcrypt hash of the client secret.
	SecretHash string
	// JWKSURL or JWKSFile: the client's public keys for private_key_jwt.
	JWKSURL  string
	JWKSFile string
	// Audiences, Resources and Scopes are what the client may ask for.
	Audiences []string
	Resources []string
	Scopes    []string
	// JWKSMaxStale is how long the last good keys of JWKSURL stay in use
	// while its refreshes fail (default DefaultJWKSMaxStale).
	JWKSMaxStale time.Duration
	// MayImpersonate lets the client obtain tokens without act.
	MayImpersonate bool
	// AllowUnbinding lets the client exchange a sender-constrained (cnf)
	// subject token without proving possession of its key; the minted
	// token is then unbound (and the exchange logged as such). Off by default.
	AllowUnbinding bool
	// Rules is the client's CEL policy (nil: none).
	Rules *Rules
}

// ClientOptions tune client authentication.
type ClientOptions struct {
	// TokenEndpointURLs are the acceptable aud values of a client assertion:
	// the token endpoint's URL(s) and our issuer. Required when a client uses
	// private_key_jwt.
	TokenEndpointURLs []string
	// Now is the clock (default time.Now).
	Now func() time.Time
	// MaxAssertionLifetime: how far in the future a client assertion's exp
	// may lie (default DefaultMaxAssertionLifetime, 1h).
	MaxAssertionLifetime time.Duration
	// MaxAssertionAge: how far in the past a client assertion's iat may lie
	// (default DefaultMaxAssertionAge, 5m). iat is required.
	MaxAssertionAge time.Duration
	// HTTPClient fetches jwks_url; FetchTimeout bounds every fetch.
	HTTPClient *http.Client
	// FetchTimeout bounds one jwks_url fetch (default DefaultFetchTimeout).
	FetchTimeout time.Duration
	// KeySources, if set, shares jwks_url sources with trust stores and
	// other registries (and across configuration reloads).
	KeySources KeySourcePool
	// OnFetch, if set, is told of every fetch of a client's jwks_url, with
	// the client_id (for metrics).
	OnFetch func(clientID string, err error)
	// ClockSkew tolerated on assertion exp/nbf/iat (default DefaultClockSkew).
	ClockSkew time.Duration
	// RefetchInterval is the least time between two forced fetches of one
	// jwks_url on an unknown kid (default DefaultRefetchInterval).
	RefetchInterval time.Duration
	// MaxReplayEntries caps the jti records of each client (default
	// DefaultMaxReplayEntries). When a client's records are all live, its
	// new assertions are refused (KindUnavailable) rather than a record
	// evicted early; other clients are not affected.
	MaxReplayEntries int
	// DeferFetching leaves new jwks_url sources idle until StartFetching.
	DeferFetching bool
	// ReplayStorage, if set, also records every accepted assertion's jti in
	// a storage shared by the cluster, so a jti used at one instance is
	// refused at every other. Unreachable storage fails closed (503).
	ReplayStorage ReplayStorage
	// MaxConcurrentSecretChecks bounds the bcrypt comparisons running at
	// once (default: half the CPUs, at least one), so a flood of wrong
	// secrets or unknown client_ids cannot take every core.
	MaxConcurrentSecretChecks int
	// SecretCheckWait is how long a check waits for a free slot before it
	// fails with KindUnavailable (default DefaultSecretCheckWait).
	SecretCheckWait time.Duration
	// Logger reports JWKS fetch failures (default: none).
	Logger *zap.Logger
}

// ClientCredentials are the client authentication parts of a token request:
// the Authorization header's Basic credentials as http.Request.BasicAuth
// returns them (still form-urlencoded) and the body's parameters.
type ClientCredentials struct {
	BasicUser, BasicPass string
	HasBasic             bool
	PostID, PostSecret   string
	Assertion            string
	AssertionType        string
}

// AuthenticatedClient is a client that proved who it is.
type AuthenticatedClient struct {
	ClientID string
	// Method is ClientAuthSecretBasic, ClientAuthSecretPost or ClientAuthPrivateKeyJWT.
	Method string
	// Config is the client's configuration; its slices are shared, read only.
	Config ClientConfig
}

// Clients is the registry of token-endpoint clients and authenticates them.
// Its jwks_url sources stay in use until Close.
type Clients struct {
	clients      map[string]*registeredClient
	endpointURLs []string
	now          func() time.Time
	maxLifetime  time.Duration
	maxAge       time.Duration
	skew         time.Duration
	maxCost      int
	logger       *zap.Logger

	// bcryptSlots bounds concurrent bcrypt work; bcryptWait is how long a
	// check waits for a slot.
	bcryptSlots chan struct{}
	bcryptWait  time.Duration

	sources *keySources

	secrets *secretCache
	replay  *replayCache
	shared  *storageReplay // cluster-wide jti records (nil: this instance only)

	dummyOnce sync.Once
	dummyHash []byte
}

type registeredClient struct {
	cfg  ClientConfig
	hash []byte
	keys *keyUser
}

// NewClients validates the client configurations, loads jwks_file keys and
// starts (or shares) the sources of jwks_url sets.
// It does not wait for remote JWKS: until they arrive, the client's
// assertions are refused.
func NewClients(ctx context.Context, cfgs []ClientConfig, opts ClientOptions) (*Clients, error) {
	c := &Clients{
		clients:     make(map[string]*registeredClient, len(cfgs)),
		now:         opts.Now,
		maxLifetime: opts.MaxAssertionLifetime,
		maxAge:      opts.MaxAssertionAge,
		skew:        opts.ClockSkew,
		logger:      opts.Logger,
		bcryptWait:  opts.SecretCheckWait,
	}
	if c.now == nil {
		c.now = time.Now
	}
	if c.maxLifetime <= 0 {
		c.maxLifetime = DefaultMaxAssertionLifetime
	}
	if c.maxAge <= 0 {
		c.maxAge = DefaultMaxAssertionAge
	}
	if c.bcryptWait <= 0 {
		c.bcryptWait = DefaultSecretCheckWait
	}
	slots := opts.MaxConcurrentSecretChecks
	if slots <= 0 {
		slots = max(1, runtime.GOMAXPROCS(0)/2)
	}
	c.bcryptSlots = make(chan struct{}, slots)
	if c.skew <= 0 {
		c.skew = DefaultClockSkew
	}
	if c.logger == nil {
		c.logger = zap.NewNop()
	}
	refetch := opts.RefetchInterval
	if refetch <= 0 {
		refetch = DefaultRefetchInterval
	}
	maxReplay := opts.MaxReplayEntries
	if maxReplay <= 0 {
		maxReplay = DefaultMaxReplayEntries
	}
	for _, u := range opts.TokenEndpointURLs {
		if u == "" {
			return nil, errors.New("token endpoint URLs must not be empty")
		}
		if !slices.Contains(c.endpointURLs, u) {
			c.endpointURLs = append(c.endpointURLs, u)
		}
	}
	var err error
	if c.secrets, err = newSecretCache(defaultSecretCacheSize); err != nil {
		return nil, err
	}
	c.replay = newReplayCache(maxReplay)
	if opts.ReplayStorage != nil {
		c.shared = &storageReplay{storage: opts.ReplayStorage, logger: c.logger}
	}

	c.sources = newKeySources(opts.KeySources, KeySourceConfig{
		FetchTimeout: opts.FetchTimeout, HTTPClient: opts.HTTPClient, Now: c.now, Deferred: opts.DeferFetching,
	})
	for _, cfg := range cfgs {
		if _, dup := c.clients[cfg.ClientID]; dup {
			c.Close()
			return nil, fmt.Errorf("client %q is configured twice", cfg.ClientID)
		}
		rc, err := c.newRegisteredClient(cfg, opts, refetch)
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("client %q: %w", cfg.ClientID, err)
		}
		c.clients[cfg.ClientID] = rc
	}
	return c, nil
}

func (c *Clients) newRegisteredClient(cfg ClientConfig, opts ClientOptions, refetch time.Duration) (*registeredClient, error) {
	if cfg.ClientID == "" {
		return nil, errors.New("client_id must not be empty")
	}
	for i := 0; i < len(cfg.ClientID); i++ {
		// RFC 6749 Appendix A.1: client-id = *VSCHAR.
		if ch := cfg.ClientID[i]; ch < 0x20 || ch > 0x7e {
			return nil, errors.New("client_id must be printable ASCII")
		}
	}
	hasJWKS := cfg.JWKSURL != "" || cfg.JWKSFile != ""
	switch {
	case cfg.SecretHash == "" && !hasJWKS:
		return nil, errors.New("one of secret_hash, jwks_url or jwks_file is required")
	case cfg.SecretHash != "" && hasJWKS:
		return nil, errors.New("secret_hash and jwks_url/jwks_file are mutually exclusive: a client has one authentication method")
	case cfg.JWKSURL != "" && cfg.JWKSFile != "":
		return nil, errors.New("jwks_url and jwks_file are mutually exclusive")
	}
	rc := &registeredClient{cfg: cfg}
	switch {
	case cfg.SecretHash != "":
		cost, err := bcrypt.Cost([]byte(cfg.SecretHash))
		if err != nil {
			return nil, fmt.Errorf("secret_hash is not a bcrypt hash (%w): make one with `caddy hash-password --plaintext <secret>` and put the $2a$... output there, never the secret itself", err)
		}
		c.maxCost = max(c.maxCost, cost)
		rc.hash = []byte(cfg.SecretHash)
	default:
		if len(c.endpointURLs) == 0 {
			return nil, errors.New("private_key_jwt needs the token endpoint URLs to check the assertion audience")
		}
		keys, err := c.sources.user(keyUserConfig{
			url: cfg.JWKSURL, file: cfg.JWKSFile, name: cfg.ClientID, field: zap.String("client_id", cfg.ClientID),
			maxStale: cfg.JWKSMaxStale, refetchInterval: refetch, logger: c.logger, onFetch: opts.OnFetch,
		})
		if err != nil {
			return nil, err
		}
		rc.keys = keys
	}
	return rc, nil
}

// Close releases the jwks_url sources; the last user of a source stops it.
func (c *Clients) Close() error {
	return c.sources.close()
}

// Client returns a client's configuration.
func (c *Clients) Client(id string) (ClientConfig, bool) {
	rc, ok := c.clients[id]
	if !ok {
		return ClientConfig{}, false
	}
	return rc.cfg, true
}

// AuthMethods lists the authentication methods the configured clients use,
// for RFC 8414 token_endpoint_auth_methods_supported.
func (c *Clients) AuthMethods() []string {
	var secret, key bool
	for _, rc := range c.clients {
		secret = secret || rc.hash != nil
		key = key || rc.keys != nil
	}
	var out []string
	if secret {
		out = append(out, ClientAuthSecretBasic, ClientAuthSecretPost)
	}
	if key {
		out = append(out, ClientAuthPrivateKeyJWT)
	}
	return out
}

// VerifyAlgorithms lists the asymmetric JWS algorithms tokens and client
// assertions may be signed with (RFC 8414
// token_endpoint_auth_signing_alg_values_supported).
func VerifyAlgorithms() []string { return slices.Clone(supportedVerifyAlgorithms) }

// JWKSFetches reports how many forced fetches a client's jwks_url source
// has made (shared by everyone using the URL).
func (c *Clients) JWKSFetches(clientID string) int64 {
	if rc, ok := c.clients[clientID]; ok && rc.keys != nil {
		return rc.keys.src.forced.Load()
	}
	return 0
}

// Authenticate checks a request's client authentication (RFC 6749 §2.3.1,
// RFC 7523 §2.2). Errors are *Error: KindInvalidRequest for a malformed
// attempt (several methods at once, half an assertion), KindInvalidClient
// when authentication fails, which never tells whether the client exists,
// and KindServer when the replay cache is full. When the request carried
// Basic credentials, BasicAuthAttempted(err) is true.
func (c *Clients) Authenticate(ctx context.Context, cred ClientCredentials) (*AuthenticatedClient, error) {
	ac, err := c.authenticate(ctx, cred)
	if err != nil {
		if cred.HasBasic {
			if err.Err == nil {
				err.Err = ErrBasicAuthFailed
			} else {
				err.Err = fmt.Errorf("%w: %w", ErrBasicAuthFailed, err.Err)
			}
		}
		return nil, err
	}
	return ac, nil
}

func (c *Clients) authenticate(ctx context.Context, cred ClientCredentials) (*AuthenticatedClient, *Error) {
	basic := cred.HasBasic
	post := cred.PostSecret != ""
	assertion := cred.Assertion != "" || cred.AssertionType != ""
	n := 0
	for _, used := range []bool{basic, post, assertion} {
		if used {
			n++
		}
	}
	switch {
	case n > 1:
		return nil, badRequest("multiple_client_auth", "more than one client authentication method was used")
	case n == 0:
		return nil, clientError("no_client_auth", "client authentication is required")
	case basic:
		id, err1 := url.QueryUnescape(cred.BasicUser)
		secret, err2 := url.QueryUnescape(cred.BasicPass)
		if err1 != nil || err2 != nil {
			return nil, clientError("malformed_basic", "Basic credentials must be form-urlencoded (RFC 6749 section 2.3.1)")
		}
		if id == "" {
			return nil, clientError("missing_client_id", "Basic credentials carry no client_id")
		}
		if cred.PostID != "" && cred.PostID != id {
			return nil, clientError("client_id_mismatch", "client_id in the body does not match the Basic credentials")
		}
		return c.checkSecret(ctx, id, secret, ClientAuthSecretBasic)
	case post:
		if cred.PostID == "" {
			return nil, badRequest("missing_client_id", "client_secret requires client_id")
		}
		return c.checkSecret(ctx, cred.PostID, cred.PostSecret, ClientAuthSecretPost)
	default:
		return c.checkAssertion(ctx, cred)
	}
}

// authFailed is the one description of every failed authentication of an
// identified client, so the answer never tells whether the client exists.
const authFailed = "client authentication failed"

func clientError(reason, description string) *Error {
	return &Error{Kind: KindInvalidClient, Reason: reason, Description: description}
}

// StartFetching starts the background refresh of every client's jwks_url.
func (c *Clients) StartFetching() {
	for _, rc := range c.clients {
		if rc.keys != nil {
			rc.keys.src.Start()
		}
	}
}
