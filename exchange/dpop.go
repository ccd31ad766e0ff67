package exchange

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"
)

// Sender-constrained tokens: DPoP (RFC 9449) proofs and mutual-TLS
// certificate thumbprints (RFC 8705 §3). A front door proves what it can
// (a DPoP proof's key, the client certificate of the connection) and hands
// the result to Verify as a Binding; checkConfirmation compares it with the
// token's cnf.

// Binding is what the presenter of a token has proven possession of on this
// request. The zero value proves nothing: a token with cnf is refused.
type Binding struct {
	// JKT is the RFC 7638 SHA-256 thumbprint (base64url) of the key of a
	// verified DPoP proof.
	JKT string
	// CertThumbprint is the base64url SHA-256 of the DER of the client
	// certificate on the TLS connection (RFC 8705 §3.1 x5t#S256).
	CertThumbprint string
	// DPoPScheme: the token was presented with the DPoP authorization
	// scheme (RFC 9449 §7.1), so it must be DPoP-bound (cnf.jkt).
	DPoPScheme bool
	// AllowUnbound accepts a bound token without proof (a token endpoint
	// client with allow_unbinding). Unknown cnf members stay refused.
	AllowUnbound bool
}

// cacheID is the part of a cache key a binding contributes: a result
// minted after one proof must never be served to a request that proved
// something else (or nothing).
func (b *Binding) cacheID() string {
	if b == nil || *b == (Binding{}) {
		return "" // proves nothing, as no binding at all
	}
	return "jkt=" + strconv.Itoa(len(b.JKT)) + ":" + b.JKT + ";x5t=" + strconv.Itoa(len(b.CertThumbprint)) + ":" + b.CertThumbprint +
		";dpop=" + strconv.FormatBool(b.DPoPScheme) + ";unbound=" + strconv.FormatBool(b.AllowUnbound)
}

// CertThumbprint is the RFC 8705 §3.1 x5t#S256 of a certificate: the
// base64url SHA-256 of its DER.
func CertThumbprint(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.Raw)
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// AccessTokenHash is the RFC 9449 §4.2 ath of an access token: the base64url
// SHA-256 of its ASCII bytes.
func AccessTokenHash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// DPoP defaults.
const (
	// DefaultDPoPMaxAge is how old a proof's iat may be.
	DefaultDPoPMaxAge = time.Minute
	// DefaultDPoPLeeway is how far in the future a proof's iat may lie.
	DefaultDPoPLeeway = 5 * time.Second
	// DefaultDPoPNonceLifetime is how long a server nonce is current; the
	// previous one is accepted too (and answered with a fresh one).
	DefaultDPoPNonceLifetime = 5 * time.Minute
	// DefaultDPoPReplayPerKey bounds the jti records of one proof key.
	DefaultDPoPReplayPerKey = 10000
	// DefaultDPoPReplayKeys bounds how many proof keys have jti records.
	DefaultDPoPReplayKeys = 100000
	// maxProofSize: a larger DPoP header is refused before parsing.
	maxProofSize = 8 << 10
	// maxProofJTI: longer jti values are refused (the replay cache keeps
	// hashes, but nothing needs more).
	maxProofJTI = 512
	// dpopFullRetryAfter is the Retry-After of a full replay cache.
	dpopFullRetryAfter = 10 * time.Second
)

// DPoPState is what every DPoP verifier of one gateway shares: the jti
// replay records (in memory, per instance) and the key of server nonces.
type DPoPState struct {
	// replay holds the jti of every accepted proof until the proof can no
	// longer pass the iat check, per proof key (the same bounded records as
	// private_key_jwt assertions), with the number of keys bounded too.
	replay   *replayCache
	nonceKey [32]byte
}

// NewDPoPState makes the shared state: perKey bounds the jti records of one
// proof key, keys how many keys have records (0: defaults).
func NewDPoPState(perKey, keys int) (*DPoPState, error) {
	if perKey <= 0 {
		perKey = DefaultDPoPReplayPerKey
	}
	if keys <= 0 {
		keys = DefaultDPoPReplayKeys
	}
	replay := newReplayCache(perKey)
	replay.maxOwners = keys
	s := &DPoPState{replay: replay}
	if _, err := rand.Read(s.nonceKey[:]); err != nil {
		return nil, err
	}
	return s, nil
}

// DPoPConfig configures one DPoP verifier (a route, or the token endpoint).
type DPoPConfig struct {
	// Algorithms is the proof algorithm allow-list (default: every
	// supported asymmetric algorithm). none and HMAC are refused.
	Algorithms []string
	// MaxAge is how old a proof's iat may be (default DefaultDPoPMaxAge);
	// Leeway how far in the future (default DefaultDPoPLeeway).
	MaxAge time.Duration
	Leeway time.Duration
	// Nonce requires server-provided nonces (RFC 9449 §8).
	Nonce bool
	// NonceLifetime is how long one nonce is current (default 5m).
	NonceLifetime time.Duration
	// State is shared by every verifier of the gateway (required).
	State *DPoPState
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// DPoPVerifier checks DPoP proofs.
type DPoPVerifier struct {
	cfg DPoPConfig
}

// NewDPoPVerifier validates the configuration.
func NewDPoPVerifier(cfg DPoPConfig) (*DPoPVerifier, error) {
	if cfg.State == nil {
		return nil, errors.New("dpop: no shared state")
	}
	if len(cfg.Algorithms) == 0 {
		cfg.Algorithms = VerifyAlgorithms()
	}
	for _, alg := range cfg.Algorithms {
		if err := CheckVerifyAlgorithm(alg); err != nil {
			return nil, fmt.Errorf("dpop: %w", err)
		}
	}
	if cfg.MaxAge < 0 || cfg.Leeway < 0 || cfg.NonceLifetime < 0 {
		return nil, errors.New("dpop: durations must not be negative")
	}
	if cfg.MaxAge == 0 {
		cfg.MaxAge = DefaultDPoPMaxAge
	}
	if cfg.Leeway == 0 {
		cfg.Leeway = DefaultDPoPLeeway
	}
	if cfg.NonceLifetime == 0 {
		cfg.NonceLifetime = DefaultDPoPNonceLifetime
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &DPoPVerifier{cfg: cfg}, nil
}

// Algorithms is the allow-list, for the WWW-Authenticate algs parameter.
func (v *DPoPVerifier) Algorithms() []string { return slices.Clone(v.cfg.Algorithms) }

// NonceRequired tells whether proofs must carry a server nonce.
func (v *DPoPVerifier) NonceRequired() bool { return v.cfg.Nonce }

// DPoPRequest is the request a proof must be for.
type DPoPRequest struct {
	// Method is the HTTP method as the client sent it.
	Method string
	// URLs are the target URI as the client may have sent it (one of
	// them must match): scheme, host and path count; query and fragment
	// do not (RFC 9449 §4.3). Several when the gateway is known under more
	// than one public origin.
	URLs []*url.URL
	// AccessToken is the token presented with the proof (its hash must be
	// the proof's ath); empty at the token endpoint, where ath is not used.
	AccessToken string
}

// DPoPProof is a verified proof, not yet marked as used.
type DPoPProof struct {
	// JKT is the RFC 7638 thumbprint of the proof's public key.
	JKT string
	// Hash is the hex SHA-256 of the proof, what logs may carry.
	Hash string
	// NewNonce, when set, is a nonce the client should use from now on
	// (send it as DPoP-Nonce).
	NewNonce string

	jti   string
	until time.Time
}

// dpopHeader is the protected header of a proof.
type dpopHeader struct {
	Typ  string          `json:"typ"`
	Alg  string          `json:"alg"`
	JWK  json.RawMessage `json:"jwk"`
	Crit json.RawMessage `json:"crit"`
	B64  json.RawMessage `json:"b64"`
	// key references have no place in a proof: its key is the jwk
	Kid json.RawMessage `json:"kid"`
	X5c json.RawMessage `json:"x5c"`
	Jku json.RawMessage `json:"jku"`
	X5u json.RawMessage `json:"x5u"`
}

// dpopClaims are a proof's claims (RFC 9449 §4.2).
type dpopClaims struct {
	JTI   *string  `json:"jti"`
	HTM   *string  `json:"htm"`
	HTU   *string  `json:"htu"`
	IAT   *float64 `json:"iat"`
	ATH   *string  `json:"ath"`
	Nonce *string  `json:"nonce"`
}

// privateJWKMembers are JWK members that only private or symmetric keys
// have (RFC 7518 §6.2.2, §6.3.2, §6.4; RFC 8037 §2).
var privateJWKMembers = []string{"d", "p", "q", "dp", "dq", "qi", "oth", "k"}

func badProof(reason, format string, args ...any) *Error {
	return &Error{Kind: KindInvalidDPoPProof, Reason: reason, Description: fmt.Sprintf(format, args...)}
}

// Check verifies one DPoP proof (RFC 9449 §4.3) for req: typ dpop+jwt, an
// allowed asymmetric alg, a public jwk (no private members) that verifies
// the signature, htm and htu of this request, iat within the window, a jti,
// ath of the access token, and the nonce when nonces are required. The jti
// is not recorded yet: call Use once the token it comes with is accepted.
func (v *DPoPVerifier) Check(proof string, req DPoPRequest) (*DPoPProof, error) {
	if proof == "" {
		return nil, badProof("dpop_missing", "no DPoP proof")
	}
	if len(proof) > maxProofSize {
		return nil, badProof("dpop_malformed", "DPoP proof exceeds %d bytes", maxProofSize)
	}
	parts := strings.Split(proof, ".")
	if len(parts) != 3 || parts[0] == "" || parts[1] == "" || parts[2] == "" {
		return nil, badProof("dpop_malformed", "DPoP proof is not a compact JWS")
	}
	var hdr dpopHeader
	if err := decodeSegment(parts[0], &hdr); err != nil {
		return nil, badProof("dpop_malformed", "DPoP proof header is not valid base64url JSON")
	}
	if hdr.Crit != nil || hdr.B64 != nil {
		return nil, badProof("dpop_malformed", "DPoP proof header carries crit or b64")
	}
	if hdr.Typ != "dpop+jwt" {
		return nil, badProof("dpop_typ", "DPoP proof typ is not dpop+jwt")
	}
	if !slices.Contains(v.cfg.Algorithms, hdr.Alg) {
		return nil, badProof("dpop_alg", "DPoP proof algorithm is not accepted")
	}
	if hdr.Kid != nil || hdr.X5c != nil || hdr.Jku != nil || hdr.X5u != nil {
		return nil, badProof("dpop_key", "DPoP proof header names its key other than by jwk")
	}
	if len(hdr.JWK) == 0 || hdr.JWK[0] != '{' {
		return nil, badProof("dpop_key", "DPoP proof header has no jwk object")
	}
	var members map[string]json.RawMessage
	if err := json.Unmarshal(hdr.JWK, &members); err != nil {
		return nil, badProof("dpop_key", "DPoP proof jwk is not a JSON object")
	}
	for _, m := range privateJWKMembers {
		if _, ok := members[m]; ok {
			return nil, badProof("dpop_private_key", "DPoP proof jwk carries private or symmetric key material")
		}
	}
	key, err := jwk.ParseKey(hdr.JWK)
	if err != nil {
		return nil, badProof("dpop_key", "DPoP proof jwk is not a valid key")
	}
	if private, err := jwk.IsPrivateKey(key); err != nil || private {
		return nil, badProof("dpop_private_key", "DPoP proof jwk is not an asymmetric public key")
	}
	var pub any
	if err := jwk.Export(key, &pub); err != nil || !keyFitsAlgorithm(pub, hdr.Alg) {
		return nil, badProof("dpop_key", "DPoP proof jwk does not fit the algorithm")
	}
	alg, ok := jwa.LookupSignatureAlgorithm(hdr.Alg)
	if !ok {
		return nil, badProof("dpop_alg", "DPoP proof algorithm is not accepted")
	}
	payload, err := jws.VerifyCompactFast(pub, []byte(proof), alg)
	if err != nil {
		return nil, badProof("dpop_signature", "DPoP proof signature does not verify")
	}
	if err := checkStrictJSON(payload); err != nil {
		return nil, badProof("dpop_malformed", "DPoP proof payload is not strict JSON")
	}
	var c dpopClaims
	if err := json.Unmarshal(payload, &c); err != nil {
		return nil, badProof("dpop_malformed", "DPoP proof claims are not valid")
	}
	switch {
	case c.JTI == nil || *c.JTI == "":
		return nil, badProof("dpop_claims", "DPoP proof has no jti")
	case len(*c.JTI) > maxProofJTI:
		return nil, badProof("dpop_claims", "DPoP proof jti is too long")
	case c.HTM == nil || c.HTU == nil || c.IAT == nil:
		return nil, badProof("dpop_claims", "DPoP proof lacks htm, htu or iat")
	}
	if *c.HTM != req.Method {
		return nil, badProof("dpop_htm", "DPoP proof htm is not the request method")
	}
	if !slices.ContainsFunc(req.URLs, func(u *url.URL) bool { return sameTargetURI(*c.HTU, u) }) {
		return nil, badProof("dpop_htu", "DPoP proof htu is not the request URI")
	}
	now := v.cfg.Now()
	if *c.IAT < 0 || *c.IAT > 1<<33 {
		return nil, badProof("dpop_iat", "DPoP proof iat is not a NumericDate")
	}
	iat := time.Unix(0, int64(*c.IAT*1e9))
	if now.Sub(iat) > v.cfg.MaxAge {
		return nil, badProof("dpop_iat", "DPoP proof is too old (iat)")
	}
	if iat.Sub(now) > v.cfg.Leeway {
		return nil, badProof("dpop_iat", "DPoP proof was issued in the future (iat)")
	}
	if req.AccessToken != "" {
		if c.ATH == nil {
			return nil, badProof("dpop_ath", "DPoP proof has no ath")
		}
		if subtle.ConstantTimeCompare([]byte(*c.ATH), []byte(AccessTokenHash(req.AccessToken))) != 1 {
			return nil, badProof("dpop_ath", "DPoP proof ath is not the hash of the access token")
		}
	}
	tp, err := thumbprint(key)
	if err != nil {
		return nil, badProof("dpop_key", "DPoP proof jwk has no thumbprint")
	}
	p := &DPoPProof{JKT: tp, Hash: HashToken(proof), jti: *c.JTI, until: iat.Add(v.cfg.MaxAge + v.cfg.Leeway)}
	if v.cfg.Nonce {
		if c.Nonce == nil {
			return nil, &Error{Kind: KindUseDPoPNonce, Reason: "dpop_nonce", Description: "a DPoP nonce is required"}
		}
		fresh, ok := v.checkNonce(*c.Nonce, now)
		if !ok {
			return nil, &Error{Kind: KindUseDPoPNonce, Reason: "dpop_nonce", Description: "the DPoP nonce is not current"}
		}
		if !fresh {
			p.NewNonce = v.Nonce()
		}
	}
	return p, nil
}

// Use records the proof's jti for its key; a jti already recorded is a
// replay (KindInvalidDPoPProof). A key whose records are all live, or a
// full cache, answers KindUnavailable (503): a live record is never
// forgotten early, which would reopen the replay window.
func (v *DPoPVerifier) Use(p *DPoPProof) error {
	switch v.cfg.State.replay.add(p.JKT, p.jti, p.until, v.cfg.Now()) {
	case errReplayed:
		return badProof("dpop_replayed", "DPoP proof jti was already used")
	case errReplayFull:
		return &Error{Kind: KindUnavailable, Reason: "dpop_replay_full", Description: "too many DPoP proofs in flight; retry later", RetryAfter: dpopFullRetryAfter}
	}
	return nil
}

// Nonce is the current server nonce (RFC 9449 §8): the time window's number
// and its MAC under the gateway's nonce key, so any instance that shares no
// state with this one still answers consistently for its own nonces.
func (v *DPoPVerifier) Nonce() string {
	return v.nonceFor(uint64(v.cfg.Now().UnixNano() / int64(v.cfg.NonceLifetime)))
}

func (v *DPoPVerifier) nonceFor(window uint64) string {
	var b [8 + 16]byte
	binary.BigEndian.PutUint64(b[:8], window)
	mac := hmac.New(sha256.New, v.cfg.State.nonceKey[:])
	mac.Write(b[:8])
	copy(b[8:], mac.Sum(nil))
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// checkNonce accepts the current window's nonce (fresh) and the previous
// one (not fresh: the client gets a new nonce).
func (v *DPoPVerifier) checkNonce(nonce string, now time.Time) (fresh, ok bool) {
	cur := uint64(now.UnixNano() / int64(v.cfg.NonceLifetime))
	for _, w := range []uint64{cur, cur - 1} {
		if hmac.Equal([]byte(nonce), []byte(v.nonceFor(w))) {
			return w == cur, true
		}
	}
	return false, false
}

// sameTargetURI compares a proof's htu with the request's URI: scheme and
// host case-insensitively (default ports dropped), the path exactly (empty
// means /), ignoring query and fragment (RFC 9449 §4.3, RFC 3986 §6.2.2-3).
func sameTargetURI(htu string, target *url.URL) bool {
	if target == nil {
		return false
	}
	u, err := url.Parse(htu)
	if err != nil || u.User != nil || u.Opaque != "" || u.Host == "" {
		return false
	}
	norm := func(scheme, host, path string) string {
		scheme = strings.ToLower(scheme)
		host = strings.ToLower(host)
		if scheme == "https" {
			host = strings.TrimSuffix(host, ":443")
		} else if scheme == "http" {
			host = strings.TrimSuffix(host, ":80")
		}
		if path == "" {
			path = "/"
		}
		return scheme + "://" + host + path
	}
	a := norm(u.Scheme, u.Host, u.Path)
	b := norm(target.Scheme, target.Host, target.Path)
	return (u.Scheme == "https" || u.Scheme == "http") && a == b
}
