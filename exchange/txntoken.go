package exchange

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jws"
)

// Transaction Tokens, draft-ietf-oauth-transaction-tokens-10: a short-lived
// signed token that carries who a request is for, what it may do and its
// context through the call chain of one trust domain. It travels in the
// Txn-Token request header, never in Authorization, and is never an access
// token.
const (
	// TxnTokenDraft names the version of the draft implemented.
	TxnTokenDraft = "draft-ietf-oauth-transaction-tokens-10"
	// TokenTypeTxnToken is the requested_token_type (and subject_token_type
	// of a replacement) of a Txn-Token.
	TokenTypeTxnToken = "urn:ietf:params:oauth:token-type:txn_token"
	// TxnTokenTyp is the JOSE typ of every Txn-Token.
	TxnTokenTyp = "txntoken+jwt"
	// TxnTokenHeader is the HTTP request header a Txn-Token travels in.
	TxnTokenHeader = "Txn-Token"
	// DefaultTxnTokenLifetime is how long a Txn-Token lives unless configured.
	DefaultTxnTokenLifetime = 60 * time.Second
	// MaxTxnTokenLifetime bounds a configured lifetime: a Txn-Token lives
	// for one call chain, not a session.
	MaxTxnTokenLifetime = 10 * time.Minute
)

// Authentication methods recorded in rctx.authn: the RFC that defines how
// the subject token was presented.
const (
	AuthnBearer = "urn:ietf:rfc:6750"
	AuthnDPoP   = "urn:ietf:rfc:9449"
	AuthnMTLS   = "urn:ietf:rfc:8705"
	// AuthnTokenExchange: obtained at the RFC 8693 endpoint by an
	// authenticated client.
	AuthnTokenExchange = "urn:ietf:rfc:8693"
)

// TxnSpec is what one Txn-Token says. The caller has verified the subject
// and narrowed the scope; MintTxnToken only assembles and signs.
type TxnSpec struct {
	// TrustDomain is the aud.
	TrustDomain string
	// Lifetime (default DefaultTxnTokenLifetime); exp is never past NotAfter.
	Lifetime time.Duration
	NotAfter time.Time
	// Txn is the transaction id; "" generates a new unique one.
	Txn string
	// Subject is sub, unique within the trust domain (see TxnSubject).
	Subject string
	// Scopes become the scope claim (space-delimited, possibly empty).
	Scopes []string
	// RequestingWorkload is req_wl.
	RequestingWorkload string
	// Rctx and Tctx are the request and transaction context (nil: omitted).
	Rctx, Tctx map[string]any
}

// TxnToken is a minted or verified Txn-Token.
type TxnToken struct {
	Raw                string
	Issuer             string
	TrustDomain        string
	Txn                string
	Subject            string
	Scopes             []string
	RequestingWorkload string
	IssuedAt, Expiry   time.Time
	Rctx, Tctx         map[string]any
}

type txnClaims struct {
	Iss   string         `json:"iss,omitempty"`
	Iat   int64          `json:"iat"`
	Exp   int64          `json:"exp"`
	Aud   string         `json:"aud"`
	Txn   string         `json:"txn"`
	Sub   string         `json:"sub"`
	Scope string         `json:"scope"`
	ReqWL string         `json:"req_wl"`
	Rctx  map[string]any `json:"rctx,omitempty"`
	Tctx  map[string]any `json:"tctx,omitempty"`
}

// CheckTxnLifetime validates a configured Txn-Token lifetime (0: default).
func CheckTxnLifetime(d time.Duration) error {
	if d < 0 || d > MaxTxnTokenLifetime {
		return fmt.Errorf("txn_token lifetime must be between 1s and %s, not %s", MaxTxnTokenLifetime, d)
	}
	if d > 0 && d < time.Second {
		return fmt.Errorf("txn_token lifetime must be at least 1s, not %s", d)
	}
	return nil
}

// MintTxnToken signs a Txn-Token (typ txntoken+jwt) with the engine's key.
func (e *Engine) MintTxnToken(spec TxnSpec) (*TxnToken, error) {
	if spec.TrustDomain == "" || spec.Subject == "" || spec.RequestingWorkload == "" {
		return nil, &Error{Kind: KindServer, Reason: "txn_config", Description: "internal error",
			Err: errors.New("a Txn-Token needs a trust domain, a subject and a requesting workload")}
	}
	lifetime := spec.Lifetime
	if lifetime <= 0 {
		lifetime = DefaultTxnTokenLifetime
	}
	now := e.cfg.Now().Truncate(time.Second)
	exp := now.Add(lifetime)
	if !spec.NotAfter.IsZero() && spec.NotAfter.Before(exp) {
		exp = spec.NotAfter.Truncate(time.Second)
	}
	if !exp.After(now) {
		return nil, invalidToken("expired", "token is expired")
	}
	txn := spec.Txn
	if txn == "" {
		var err error
		if txn, err = newJTI(); err != nil {
			return nil, &Error{Kind: KindServer, Reason: "internal", Description: "internal error", Err: err}
		}
	}
	c := txnClaims{Iss: e.cfg.Issuer, Iat: now.Unix(), Exp: exp.Unix(), Aud: spec.TrustDomain, Txn: txn,
		Sub: spec.Subject, Scope: FormatScope(spec.Scopes), ReqWL: spec.RequestingWorkload, Rctx: spec.Rctx, Tctx: spec.Tctx}
	payload, err := json.Marshal(c)
	if err != nil {
		return nil, &Error{Kind: KindServer, Reason: "internal", Description: "internal error", Err: err}
	}
	signer := e.signer.Load()
	if signer == nil {
		return nil, &Error{Kind: KindUnavailable, Reason: "no_signing_key", Description: "the signing key is not loaded yet; retry later", RetryAfter: time.Second}
	}
	raw, err := signTxnToken(signer, payload)
	if err != nil {
		return nil, &Error{Kind: KindServer, Reason: "signing", Description: "internal error", Err: err}
	}
	return &TxnToken{Raw: raw, Issuer: e.cfg.Issuer, TrustDomain: spec.TrustDomain, Txn: txn, Subject: spec.Subject,
		Scopes: spec.Scopes, RequestingWorkload: spec.RequestingWorkload, IssuedAt: now, Expiry: exp, Rctx: spec.Rctx, Tctx: spec.Tctx}, nil
}

// signTxnToken signs payload as a Txn-Token (typ txntoken+jwt) with the
// signer's key and kid.
func signTxnToken(s *Signer, payload []byte) (string, error) {
	return s.signCompact(s.txnTokenHeader, payload)
}

// TxnSubject is the sub of a Txn-Token for a subject token's (issuer, sub):
// the sub itself when one issuer is trusted, else "<issuer>#<sub>". An
// issuer identifier has no fragment (RFC 8414 §2), so the first '#' splits
// the two unambiguously and two issuers' subjects never collide.
func TxnSubject(issuer, sub string, namespaced bool) string {
	if !namespaced || issuer == "" {
		return sub
	}
	return issuer + "#" + sub
}

// TraceID returns the trace-id of a W3C Trace Context traceparent header
// (version-traceid-parentid-flags, lower-case hex, neither id all zeros,
// version ff invalid), or false when the header is not a valid one.
func TraceID(traceparent string) (string, bool) {
	v := strings.TrimSpace(traceparent)
	if len(v) < 55 || v[2] != '-' || v[35] != '-' || v[52] != '-' {
		return "", false
	}
	version, trace, parent, flags := v[:2], v[3:35], v[36:52], v[53:55]
	if !lowerHex(version) || version == "ff" || !lowerHex(trace) || !lowerHex(parent) || !lowerHex(flags) {
		return "", false
	}
	// version 00 has exactly these fields; a later version may append more.
	if (version == "00" && len(v) != 55) || (len(v) > 55 && v[55] != '-') {
		return "", false
	}
	if strings.Trim(trace, "0") == "" || strings.Trim(parent, "0") == "" {
		return "", false
	}
	return trace, true
}

func lowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return s != ""
}

// isTxnToken tells whether a token is a Txn-Token by its typ header, or by
// its claims carrying both txn and req_wl (the draft's required pair: a txn
// claim alone is also a Security Event Token's transaction id, RFC 8417).
func isTxnToken(typ string, claims map[string]any) bool {
	if typMatches(typ, TxnTokenTyp) {
		return true
	}
	_, txn := claims["txn"]
	_, wl := claims["req_wl"]
	return txn && wl
}

// TxnVerifyConfig configures a TxnVerifier.
type TxnVerifyConfig struct {
	// TrustDomain is the aud every Txn-Token must carry.
	TrustDomain string
	// Issuer, when set, is the iss every Txn-Token must carry.
	Issuer string
	// JWKSURL is the Txn-Token Service's JWKS (the gateway's
	// /.well-known/jwks.json); fetched, refreshed and refetched on an
	// unknown kid by a KeySource.
	JWKSURL string
	// Algorithms is the allow-list (default: the algorithms the gateway
	// can sign with).
	Algorithms []string
	// ClockSkew for exp and iat (default DefaultClockSkew).
	ClockSkew time.Duration
	// MaxTokenSize in bytes (default DefaultMaxTokenSize).
	MaxTokenSize    int
	FetchTimeout    time.Duration
	RefetchInterval time.Duration
	JWKSMaxStale    time.Duration
	// KeySources shares the JWKS source with others (and across reloads).
	KeySources KeySourcePool
	Now        func() time.Time
	OnFetch    func(name string, err error)
}

// TxnVerifier checks Txn-Tokens at an internal hop: typ, signature (a key
// of the JWKS by kid and the allow-list), exp, iat, aud = the trust domain,
// and the required claims.
type TxnVerifier struct {
	cfg     TxnVerifyConfig
	sources *keySources
	keys    *keyUser
}

// NewTxnVerifier validates cfg and starts fetching the JWKS; Close stops it.
func NewTxnVerifier(cfg TxnVerifyConfig) (*TxnVerifier, error) {
	if cfg.TrustDomain == "" {
		return nil, errors.New("trust_domain is required: it is the aud of every Txn-Token")
	}
	if err := CheckJWKSURL(cfg.JWKSURL); err != nil {
		return nil, err
	}
	if len(cfg.Algorithms) == 0 {
		cfg.Algorithms = slices.Clone(SigningAlgorithms)
	}
	for _, alg := range cfg.Algorithms {
		if err := CheckVerifyAlgorithm(alg); err != nil {
			return nil, err
		}
	}
	if cfg.ClockSkew == 0 {
		cfg.ClockSkew = DefaultClockSkew
	}
	if cfg.MaxTokenSize <= 0 {
		cfg.MaxTokenSize = DefaultMaxTokenSize
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	v := &TxnVerifier{cfg: cfg}
	v.sources = newKeySources(cfg.KeySources, KeySourceConfig{FetchTimeout: cfg.FetchTimeout, Now: cfg.Now})
	keys, err := v.sources.user(keyUserConfig{url: cfg.JWKSURL, name: cfg.JWKSURL, maxStale: cfg.JWKSMaxStale,
		refetchInterval: cfg.RefetchInterval, onFetch: cfg.OnFetch})
	if err != nil {
		_ = v.sources.close()
		return nil, err
	}
	v.keys = keys
	return v, nil
}

// Close releases the JWKS source.
func (v *TxnVerifier) Close() error { return v.sources.close() }

// Verify checks a Txn-Token. A bad token is KindInvalidToken; keys that
// cannot be had are KindUnavailable (never blamed on the token).
func (v *TxnVerifier) Verify(ctx context.Context, raw string) (*TxnToken, error) {
	return verifyTxn(ctx, raw, txnCheck{
		trustDomain: v.cfg.TrustDomain, issuer: v.cfg.Issuer, algorithms: v.cfg.Algorithms,
		skew: v.cfg.ClockSkew, maxSize: v.cfg.MaxTokenSize, now: v.cfg.Now(),
		key: func(ctx context.Context, hdr jwsHeader) (verifyKey, keyStatus) {
			return v.keys.keyFor(ctx, hdr.Kid, hdr.Alg)
		},
		retry: v.keys.refetchInterval,
	})
}

type txnCheck struct {
	trustDomain, issuer string
	algorithms          []string
	skew                time.Duration
	maxSize             int
	now                 time.Time
	key                 func(ctx context.Context, hdr jwsHeader) (verifyKey, keyStatus)
	retry               time.Duration
}

// verifyTxn is the one Txn-Token check: shape and header first, then key
// and signature, then the claims.
func verifyTxn(ctx context.Context, raw string, c txnCheck) (*TxnToken, error) {
	if raw == "" {
		return nil, &Error{Kind: KindMissingToken, Reason: "missing_txn_token", Description: "no Txn-Token"}
	}
	if len(raw) > c.maxSize {
		return nil, invalidToken("too_large", "Txn-Token exceeds %d bytes", c.maxSize)
	}
	hdr, p64, _, err := splitJWS(raw)
	if err != nil {
		return nil, invalidToken("malformed", "Txn-Token is not a compact JWS")
	}
	if !typMatches(hdr.Typ, TxnTokenTyp) {
		return nil, invalidToken("token_type", "token typ header is not %s", TxnTokenTyp)
	}
	if !slices.Contains(c.algorithms, hdr.Alg) || CheckVerifyAlgorithm(hdr.Alg) != nil {
		return nil, invalidToken("bad_algorithm", "token algorithm is not accepted")
	}
	payload, err := base64.RawURLEncoding.Strict().DecodeString(p64)
	if err != nil || checkStrictJSON(payload) != nil {
		return nil, invalidToken("malformed", "Txn-Token payload is not strict base64url JSON")
	}
	key, status := c.key(ctx, hdr)
	switch status {
	case keysUnavailable:
		return nil, keysUnavailableError("the Txn-Token Service's keys are unavailable", c.retry)
	case keyUnknown:
		return nil, invalidToken("unknown_key", "no key matches the Txn-Token's kid and algorithm")
	}
	alg, ok := jwa.LookupSignatureAlgorithm(hdr.Alg)
	if !ok {
		return nil, invalidToken("bad_algorithm", "token algorithm is not accepted")
	}
	if _, err := jws.VerifyCompactFast(key.pub, []byte(raw), alg); err != nil {
		return nil, invalidToken("bad_signature", "Txn-Token signature does not verify")
	}
	claims, err := decodeJSONObject(payload)
	if err != nil {
		return nil, invalidToken("malformed", "Txn-Token payload is not a JSON claims set")
	}
	exp, terr := checkClaimTimes(claims, c.now, c.skew)
	if terr != nil {
		return nil, terr
	}
	iat, ok, err := numericDate(claims, "iat")
	if err != nil || !ok {
		return nil, invalidToken("invalid_claims", "Txn-Token has no valid iat")
	}
	aud, err := audienceClaim(claims)
	if err != nil || !slices.Contains(aud, c.trustDomain) {
		return nil, invalidToken("wrong_audience", "Txn-Token is not for this trust domain")
	}
	t := &TxnToken{Raw: raw, TrustDomain: c.trustDomain, IssuedAt: iat, Expiry: exp}
	if t.Issuer, err = stringClaim(claims, "iss"); err != nil || (c.issuer != "" && t.Issuer != c.issuer) {
		return nil, invalidToken("untrusted_issuer", "Txn-Token issuer is not accepted")
	}
	for name, dst := range map[string]*string{"txn": &t.Txn, "sub": &t.Subject, "req_wl": &t.RequestingWorkload} {
		if *dst, err = stringClaim(claims, name); err != nil || *dst == "" {
			return nil, invalidToken("invalid_claims", "Txn-Token has no %s", name)
		}
	}
	scope, err := stringClaim(claims, "scope")
	if _, present := claims["scope"]; err != nil || !present {
		return nil, invalidToken("invalid_claims", "Txn-Token has no scope")
	}
	if t.Scopes, err = ParseScope(scope); scope != "" && err != nil {
		return nil, invalidToken("bad_scope", "Txn-Token scope is malformed")
	}
	for name, dst := range map[string]*map[string]any{"rctx": &t.Rctx, "tctx": &t.Tctx} {
		if v, ok := claims[name]; ok {
			m, isObject := v.(map[string]any)
			if !isObject {
				return nil, invalidToken("invalid_claims", "Txn-Token %s is not an object", name)
			}
			*dst = m
		}
	}
	return t, nil
}

// verifyOwnTxn checks a Txn-Token this engine issued (a replacement
// request): against the signer's published keys, for trustDomain.
func (e *Engine) verifyOwnTxn(ctx context.Context, raw, trustDomain string) (*TxnToken, error) {
	signer := e.signer.Load()
	if signer == nil {
		return nil, &Error{Kind: KindUnavailable, Reason: "no_signing_key", Description: "the signing key is not loaded yet; retry later", RetryAfter: time.Second}
	}
	idx := indexKeySet(signer.PublicKeys())
	return verifyTxn(ctx, raw, txnCheck{
		trustDomain: trustDomain, issuer: e.cfg.Issuer, algorithms: SigningAlgorithms,
		skew: DefaultClockSkew, maxSize: DefaultMaxTokenSize, now: e.cfg.Now(),
		key: func(_ context.Context, hdr jwsHeader) (verifyKey, keyStatus) {
			if k, ok := idx.find(hdr.Kid, hdr.Alg); ok {
				return k, keyFound
			}
			return verifyKey{}, keyUnknown
		},
	})
}
