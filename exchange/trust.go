package exchange

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwk"
	"go.uber.org/zap"
)

// Defaults for trusted issuers.
const (
	DefaultClockSkew        = 30 * time.Second
	DefaultMaxTokenSize     = 16 << 10
	DefaultRefetchInterval  = 30 * time.Second
	DefaultFetchTimeout     = 5 * time.Second
	DefaultMaxJWKSBodySize  = 1 << 20
	defaultJWKSMinRefresh   = time.Minute
	defaultJWKSMaxRefresh   = time.Hour
	defaultScopeClaim       = "scope"
	defaultInboundTokenType = "access_token"
)

// supportedVerifyAlgorithms are the asymmetric JWS algorithms an issuer may
// be trusted with. `none` and HMAC are never among them: a shared secret
// cannot come from a public JWKS, and accepting HS* is how key confusion starts.
var supportedVerifyAlgorithms = []string{
	"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
}

// CheckVerifyAlgorithm tells whether alg may be put on an issuer's allow-list.
func CheckVerifyAlgorithm(alg string) error {
	switch {
	case slices.Contains(supportedVerifyAlgorithms, alg):
		return nil
	case alg == "" || equalFoldASCII(alg, "none"):
		return fmt.Errorf("algorithm %q is refused: unsigned tokens are never accepted", alg)
	case len(alg) >= 2 && equalFoldASCII(alg[:2], "HS"):
		return fmt.Errorf("algorithm %q is refused: HMAC cannot be verified with public keys and invites key confusion", alg)
	default:
		return fmt.Errorf("algorithm %q is not supported (supported: %v)", alg, supportedVerifyAlgorithms)
	}
}

func equalFoldASCII(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		ca, cb := a[i]|0x20, b[i]|0x20
		if ca != cb {
			return false
		}
	}
	return true
}

// IssuerConfig describes one trusted issuer of subject tokens.
type IssuerConfig struct {
	// Issuer is the exact `iss` its tokens carry.
	Issuer string
	// JWKSURL, JWKSFile or Discovery/DiscoveryURL: where its public keys
	// come from (exactly one).
	JWKSURL  string
	JWKSFile string
	// Discovery reads the issuer's metadata (OIDC Discovery at
	// <issuer>/.well-known/openid-configuration, else RFC 8414) and takes
	// its jwks_uri (and introspection_endpoint) from there, on every refresh.
	Discovery bool
	// DiscoveryURL is the metadata's location when it is not the standard
	// one (implies Discovery; no fallback).
	DiscoveryURL string
	// OpaqueTokens sends every bearer that is not a compact JWS to this
	// issuer's introspection endpoint (at most one issuer).
	OpaqueTokens bool
	// Introspection is how (RFC 7662) and with which credentials.
	Introspection IntrospectionConfig
	// IDTokenClaims are the claims that mark a token as an ID token, which
	// is then refused unless presented as id_token. nil: DefaultIDTokenClaims;
	// empty (non-nil): no detection.
	IDTokenClaims []string
	// Audiences: an inbound token's `aud` must contain one of them.
	Audiences []string
	// Algorithms is the required allow-list of JWS algorithms.
	Algorithms []string
	// TokenTypes are the short names (access_token, jwt, id_token, ...) of
	// what this issuer's tokens may be presented as. Default: access_token, jwt.
	TokenTypes []string
	// ClientIDs are the audiences accepted on this issuer's ID tokens
	// (token type id_token); without them ID tokens are refused.
	ClientIDs []string
	// RequiredTyp, when set, is the JOSE typ its tokens must carry (e.g. at+jwt).
	RequiredTyp string
	// ScopeClaim is `scope` (space-delimited string, default) or `scp` (array).
	ScopeClaim string
	// Scopes maps the issuer's scopes to ours.
	Scopes ScopeMap
	// RefetchInterval is the least time between two forced JWKS fetches
	// (on an unknown kid), so a flood of random kids costs one fetch.
	RefetchInterval time.Duration
	// JWKSMaxStale is how long the last good keys of JWKSURL stay in use
	// while its refreshes fail, from when they were fetched (default
	// DefaultJWKSMaxStale); after it, the issuer's tokens are refused.
	JWKSMaxStale time.Duration
}

// TrustConfig configures a TrustStore.
type TrustConfig struct {
	Issuers []IssuerConfig
	// DeferFetching leaves new JWKS and discovery sources idle until
	// StartFetching (sources shared with a running configuration keep
	// running).
	DeferFetching bool
	// SAML are the trusted SAML 2.0 identity providers (subject tokens of
	// type saml2 at the token endpoint).
	SAML         []SAMLIssuerConfig
	ClockSkew    time.Duration
	MaxTokenSize int
	// FetchTimeout bounds one JWKS fetch (default DefaultFetchTimeout).
	FetchTimeout time.Duration
	// HTTPClient fetches JWKS; FetchTimeout bounds every fetch.
	HTTPClient *http.Client
	Now        func() time.Time
	Logger     *zap.Logger
	// OnFetch, if set, is told of every JWKS fetch of an issuer's keys,
	// forced or in the background (for metrics).
	OnFetch func(issuer string, err error)
	// KeySources, if set, shares the jwks_url sources with other trust
	// stores and client registries (and across configuration reloads).
	// Without it, the store shares one source per URL among its issuers.
	KeySources KeySourcePool
	// OnIntrospect, if set, is told of every introspection request and
	// its result (active, inactive, error), for metrics.
	OnIntrospect func(issuer, result string)
}

// TrustStore holds the trusted issuers and their keys, and verifies inbound
// tokens against them. Its JWKS sources stay in use until Close.
type TrustStore struct {
	issuers      map[string]*trustedIssuer
	saml         []*samlIssuer
	clockSkew    time.Duration
	maxTokenSize int
	now          func() time.Time
	logger       *zap.Logger
	sources      *keySources
	// opaque introspects opaque tokens (nil: none are accepted).
	opaque *introspector
}

// DefaultIDTokenClaims are the claims only ID tokens carry (OIDC Core §2,
// §3.1.3.6, §3.3.2.11): a token with one of them is an ID token.
var DefaultIDTokenClaims = []string{"at_hash", "c_hash", "nonce"}

type trustedIssuer struct {
	cfg        IssuerConfig
	tokenTypes []string
	scopeClaim string
	keys       *keyUser
}

// keyIndex is a JWKS turned into ready-to-use public keys, by kid.
type keyIndex struct {
	keys []verifyKey
}

type verifyKey struct {
	kid        string
	alg        string // the JWK's own alg, if any
	thumbprint string // RFC 7638, SHA-256, base64url
	pub        any
}

// NewTrustStore validates the configuration, loads JWKS files and starts (or
// shares) the sources of JWKS URLs. It does not wait for remote JWKS: an
// issuer that is down at start-up fails closed (its tokens are refused)
// until its keys arrive.
func NewTrustStore(ctx context.Context, cfg TrustConfig) (*TrustStore, error) {
	ts := &TrustStore{
		issuers:      make(map[string]*trustedIssuer, len(cfg.Issuers)),
		clockSkew:    cfg.ClockSkew,
		maxTokenSize: cfg.MaxTokenSize,
		now:          cfg.Now,
		logger:       cfg.Logger,
	}
	if ts.clockSkew == 0 {
		ts.clockSkew = DefaultClockSkew
	}
	if ts.maxTokenSize <= 0 {
		ts.maxTokenSize = DefaultMaxTokenSize
	}
	if ts.now == nil {
		ts.now = time.Now
	}
	if ts.logger == nil {
		ts.logger = zap.NewNop()
	}
	if len(cfg.Issuers)+len(cfg.SAML) == 0 {
		return nil, errors.New("no trusted issuer configured")
	}
	for _, sc := range cfg.SAML {
		si, err := newSAMLIssuer(sc)
		if err != nil {
			return nil, err
		}
		for _, o := range ts.saml {
			if o.cfg.EntityID == sc.EntityID {
				return nil, fmt.Errorf("trust_saml %s is configured twice", sc.EntityID)
			}
		}
		ts.saml = append(ts.saml, si)
	}
	ts.sources = newKeySources(cfg.KeySources, KeySourceConfig{
		FetchTimeout: cfg.FetchTimeout, HTTPClient: cfg.HTTPClient, Now: ts.now, Deferred: cfg.DeferFetching,
	})
	for _, ic := range cfg.Issuers {
		if err := validateIssuerConfig(&ic, true); err != nil {
			ts.Close()
			return nil, fmt.Errorf("trusted issuer %q: %w", ic.Issuer, err)
		}
		if _, dup := ts.issuers[ic.Issuer]; dup {
			ts.Close()
			return nil, fmt.Errorf("trusted issuer %q is configured twice", ic.Issuer)
		}
		var disc *DiscoveryConfig
		if ic.Discovery {
			disc = &DiscoveryConfig{Issuer: ic.Issuer}
			if ic.DiscoveryURL != "" {
				disc.URLs = []string{ic.DiscoveryURL}
			}
		}
		keys, err := ts.sources.user(keyUserConfig{
			url: ic.JWKSURL, file: ic.JWKSFile, discovery: disc, name: ic.Issuer, field: zap.String("issuer", ic.Issuer),
			maxStale: ic.JWKSMaxStale, refetchInterval: ic.RefetchInterval,
			logger: ts.logger, onFetch: cfg.OnFetch,
		})
		if err != nil {
			ts.Close()
			return nil, fmt.Errorf("trusted issuer %q: %w", ic.Issuer, err)
		}
		ti := &trustedIssuer{cfg: ic, tokenTypes: ic.TokenTypes, scopeClaim: ic.ScopeClaim, keys: keys}
		ts.issuers[ic.Issuer] = ti
		if ic.OpaqueTokens {
			if ts.opaque != nil {
				ts.Close()
				return nil, fmt.Errorf("opaque_tokens is set on trusted issuers %q and %q: an opaque token cannot say which issuer it is from, so at most one may take them",
					ts.opaque.ti.cfg.Issuer, ic.Issuer)
			}
			ts.opaque = newIntrospector(ts, ti, cfg.HTTPClient, cfg.OnIntrospect)
		}
	}
	return ts, nil
}

// Check validates a trusted issuer's configuration as NewTrustStore does,
// without reading any file or touching the network: the one validator of a
// trust block, for the Caddyfile adapter (which adds the line) as well as
// for JSON configs (through NewTrustStore).
func (ic IssuerConfig) Check() error {
	return validateIssuerConfig(&ic, false)
}

// validateIssuerConfig checks ic and fills in its defaults; with load, it
// also loads what the configuration names (the introspection key file).
func validateIssuerConfig(ic *IssuerConfig, load bool) error {
	if ic.Issuer == "" {
		return errors.New("issuer must not be empty")
	}
	if ic.DiscoveryURL != "" {
		ic.Discovery = true
	}
	n := 0
	for _, set := range []bool{ic.JWKSURL != "", ic.JWKSFile != "", ic.Discovery} {
		if set {
			n++
		}
	}
	switch {
	case n != 1:
		return errors.New("exactly one of jwks_url, jwks_file or discovery (discovery_url) is required, for example: jwks_url https://idp.example.com/.well-known/jwks.json, or discovery")
	case ic.JWKSURL != "":
		if err := CheckJWKSURL(ic.JWKSURL); err != nil {
			return err
		}
	case ic.Discovery:
		dc := DiscoveryConfig{Issuer: ic.Issuer}
		if ic.DiscoveryURL != "" {
			dc.URLs = []string{ic.DiscoveryURL}
		}
		if err := CheckDiscovery(dc); err != nil {
			return err
		}
	}
	if err := validateIntrospection(ic, load); err != nil {
		return err
	}
	if ic.IDTokenClaims == nil {
		ic.IDTokenClaims = DefaultIDTokenClaims
	}
	if len(ic.Audiences) == 0 {
		return errors.New("audience is required: add `audience <aud>`, the aud the issuer puts into tokens meant for this gateway (often the gateway's URL or an API identifier); tokens meant for another service must not pass")
	}
	if len(ic.Algorithms) == 0 {
		return errors.New("algorithms is required (for example: algorithms RS256 ES256)")
	}
	for _, alg := range ic.Algorithms {
		if err := CheckVerifyAlgorithm(alg); err != nil {
			return err
		}
	}
	if len(ic.TokenTypes) == 0 {
		ic.TokenTypes = []string{"access_token", "jwt"}
	}
	for _, tt := range ic.TokenTypes {
		if _, ok := tokenTypeURNs[tt]; !ok {
			return fmt.Errorf("unknown token type %q", tt)
		}
		switch tt {
		case "refresh_token":
			return errors.New("refresh_token cannot be a trusted token type: refresh tokens are never accepted")
		case "txn_token":
			return errors.New("txn_token cannot be a trusted token type: Txn-Tokens are checked with txn_token_verify, never as subject tokens of an issuer")
		case "saml1", "saml2":
			return fmt.Errorf("token type %s is not supported: only JWTs are verified", tt)
		case "self_signed", "unsigned_json":
			return fmt.Errorf("token type %s cannot be a trusted token type: the token endpoint's txn_token accepts it from authenticated workloads (allow_subject_types)", tt)
		case "id_token":
			if len(ic.ClientIDs) == 0 {
				return errors.New("token type id_token needs client_ids: the audiences its ID tokens are issued to; add `client_ids <client_id...>` to the trust block")
			}
		}
	}
	switch ic.ScopeClaim {
	case "":
		ic.ScopeClaim = defaultScopeClaim
	case "scope", "scp":
	default:
		return fmt.Errorf("scope_claim must be scope or scp, not %q", ic.ScopeClaim)
	}
	if ic.RefetchInterval <= 0 {
		ic.RefetchInterval = DefaultRefetchInterval
	}
	if ic.JWKSMaxStale < 0 {
		return errors.New("jwks_max_stale must not be negative")
	}
	return nil
}

// Close releases the JWKS sources; the last user of a source stops it.
func (ts *TrustStore) Close() error {
	return ts.sources.close()
}

// JWKSFetches reports how many forced fetches the JWKS source of an issuer
// has made (shared by everyone using its URL).
func (ts *TrustStore) JWKSFetches(issuer string) int64 {
	if ti, ok := ts.issuers[issuer]; ok {
		return ti.keys.src.forced.Load()
	}
	return 0
}

// Issuers lists the trusted issuers.
func (ts *TrustStore) Issuers() []string {
	out := make([]string, 0, len(ts.issuers))
	for iss := range ts.issuers {
		out = append(out, iss)
	}
	slices.Sort(out)
	return out
}

// hasKey tells whether issuer still publishes the key with RFC 7638
// thumbprint tp, and its keys are usable: a cached exchange is reused only
// while the key that verified its subject remains, material and all.
func (ts *TrustStore) hasKey(issuer, tp string) bool {
	if h, ok := strings.CutPrefix(tp, introspectionMarker); ok {
		return ts.opaque != nil && ts.opaque.ti.cfg.Issuer == issuer && ts.opaque.live(h)
	}
	ti, ok := ts.issuers[issuer]
	return ok && ti.keys.hasThumbprint(tp)
}

// indexKeySet turns a JWKS into usable public signing keys: keys marked for
// another use, and keys of no type an accepted algorithm fits (symmetric keys
// among them), are left out.
func indexKeySet(set jwk.Set) *keyIndex {
	idx := &keyIndex{}
	for i := 0; i < set.Len(); i++ {
		k, _ := set.Key(i)
		if use, ok := k.KeyUsage(); ok && use != "sig" {
			continue
		}
		pk, err := jwk.PublicKeyOf(k)
		if err != nil {
			continue
		}
		var raw any
		if err := jwk.Export(pk, &raw); err != nil {
			continue
		}
		if !slices.ContainsFunc(supportedVerifyAlgorithms, func(a string) bool { return keyFitsAlgorithm(raw, a) }) {
			continue
		}
		tp, err := thumbprint(pk)
		if err != nil {
			continue
		}
		vk := verifyKey{pub: raw, thumbprint: tp}
		vk.kid, _ = k.KeyID()
		if a, ok := k.Algorithm(); ok {
			vk.alg = a.String()
		}
		idx.keys = append(idx.keys, vk)
	}
	return idx
}

// find picks the key for kid that fits alg. An empty kid is accepted only when
// exactly one key of the set fits, so the header never chooses among several.
func (idx *keyIndex) find(kid, alg string) (verifyKey, bool) {
	if idx == nil {
		return verifyKey{}, false
	}
	var found verifyKey
	n := 0
	for _, k := range idx.keys {
		if kid != "" && k.kid != kid {
			continue
		}
		if k.alg != "" && k.alg != alg {
			continue
		}
		if !keyFitsAlgorithm(k.pub, alg) {
			continue
		}
		found = k
		n++
		if kid != "" {
			return found, true
		}
	}
	return found, n == 1
}

// keyFitsAlgorithm tells whether alg can be verified with pub: the key type
// (and curve) must be the one the algorithm is defined for.
func keyFitsAlgorithm(pub any, alg string) bool {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		switch alg {
		case "RS256", "RS384", "RS512", "PS256", "PS384", "PS512":
			return k.N.BitLen() >= 2048
		}
	case *ecdsa.PublicKey:
		switch alg {
		case "ES256":
			return k.Curve == elliptic.P256()
		case "ES384":
			return k.Curve == elliptic.P384()
		case "ES512":
			return k.Curve == elliptic.P521()
		}
	case ed25519.PublicKey:
		return alg == "EdDSA"
	}
	return false
}

// algorithmAllowed tells whether alg is on the issuer's allow-list.
func (ti *trustedIssuer) algorithmAllowed(alg string) bool {
	return slices.Contains(ti.cfg.Algorithms, alg)
}

// StartFetching starts the background refresh of every issuer's keys
// (sources already running are left as they are).
func (ts *TrustStore) StartFetching() {
	for _, ti := range ts.issuers {
		if ti.keys != nil {
			ti.keys.src.Start()
		}
	}
}
