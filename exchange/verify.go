package exchange

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lestrrat-go/jwx/v3/jws/jwsbb"
)

// Subject is a verified inbound token: who it names, what it holds.
type Subject struct {
	// Issuer is the trusted issuer that signed it.
	Issuer string
	// Subject is its `sub`.
	Subject string
	// Scopes are its scopes after the issuer's scope mapping.
	Scopes []string
	// Expiry is its `exp`.
	Expiry time.Time
	// ClientID is the client it was issued to (`client_id`, else `azp`).
	ClientID string
	// JTI is its `jti`, if any.
	JTI string
	// KeyID is the kid of the key that verified it.
	KeyID string
	// KeyThumbprint is the RFC 7638 SHA-256 thumbprint (base64url) of the
	// key that verified it: what a cached exchange is bound to.
	KeyThumbprint string
	// TokenHash is the hex SHA-256 of the raw token: what logs may carry.
	TokenHash string
	// Act is its prior `act` chain (nil when none).
	Act map[string]any
	// MayAct is its `may_act` claim (nil when none).
	MayAct any
	// ActDepth is the depth of Act.
	ActDepth int
	// Confirmation holds the token's cnf members (jkt, x5t#S256) once their
	// proof was verified on this request (nil: the token is not bound).
	Confirmation map[string]string
	// Unbound tells that the token is bound but was accepted without proof
	// because the caller allowed unbinding (Binding.AllowUnbound).
	Unbound bool

	claims map[string]any
}

// Claims returns the subject token's claims as plain JSON values. The map
// is shared: read it, never write it.
func (s *Subject) Claims() map[string]any { return s.claims }

// Claim returns one of the subject token's claims.
func (s *Subject) Claim(name string) (any, bool) {
	v, ok := s.claims[name]
	return v, ok
}

// jwsHeader is the part of a JOSE header we decide on before any crypto.
type jwsHeader struct {
	Alg, Kid, Typ string
}

// HashToken returns the hex SHA-256 of a raw token, the only form of a token
// that may appear in logs.
func HashToken(raw string) string { return DigestToken(raw).Hex() }

// TokenDigest is the SHA-256 of a raw token.
type TokenDigest [32]byte

// DigestToken returns the SHA-256 of a raw token.
func DigestToken(raw string) TokenDigest {
	// Through a buffer on the stack: []byte(raw) would copy the token to
	// the heap on every request.
	h := sha256.New()
	var buf [512]byte
	for len(raw) > 0 {
		n := copy(buf[:], raw)
		h.Write(buf[:n])
		raw = raw[n:]
	}
	var d TokenDigest
	h.Sum(d[:0])
	return d
}

// Hex is the digest in hex: HashToken's form, the one logs carry.
func (d TokenDigest) Hex() string {
	var b [2 * len(d)]byte
	hex.Encode(b[:], d[:])
	return string(b[:])
}

// VerifyOptions tune one verification.
type VerifyOptions struct {
	// TokenType is the short name the token is presented as (default access_token).
	TokenType string
	// MaxActDepth bounds the subject's act chain (default DefaultMaxActDepth).
	MaxActDepth int
	// TokenHash is HashToken of the raw token, when the caller has
	// already computed it ("": Verify computes it).
	TokenHash string
	// Binding is what the presenter proved on this request (a DPoP proof's
	// key, the client certificate). nil proves nothing: a token with cnf is
	// refused (no downgrade of a sender-constrained token to a bearer token).
	Binding *Binding
}

// checkSize refuses a token larger than the store accepts, before any
// work on it (hashing included).
func (ts *TrustStore) checkSize(raw string) *Error {
	if len(raw) > ts.maxTokenSize {
		return invalidToken("too_large", "token exceeds %d bytes", ts.maxTokenSize)
	}
	return nil
}

// Verify checks an inbound token and returns its subject. The order is
// deliberate: size, shape and header first (no crypto), then the issuer by
// `iss`, then the key by issuer + kid + the issuer's algorithm allow-list,
// then the signature, and only then the claims.
func (ts *TrustStore) Verify(ctx context.Context, raw string, opts VerifyOptions) (*Subject, error) {
	if opts.TokenType == "" {
		opts.TokenType = defaultInboundTokenType
	}
	if opts.MaxActDepth <= 0 {
		opts.MaxActDepth = DefaultMaxActDepth
	}
	if err := ts.checkSize(raw); err != nil {
		return nil, err
	}
	hdr, p64, s64, err := splitJWS(raw)
	switch {
	case (errors.Is(err, errJWE) || errors.Is(err, errNotCompact)) && ts.opaque != nil:
		// Not a JWS: an opaque token, for the issuer that takes them. A JWE
		// is opaque too: some IdPs (zitadel/oidc) encrypt their opaque
		// access tokens to themselves; only the issuer can read them.
		return ts.opaque.verify(ctx, raw, opts)
	case errors.Is(err, errJWE):
		return nil, invalidToken("malformed", "encrypted tokens (JWE) are not accepted")
	case errors.Is(err, errNotCompact):
		return nil, invalidToken("malformed", "token is not a compact JWS (header.payload.signature)")
	case errors.Is(err, errEmptySegment):
		return nil, invalidToken("malformed", "token has an empty segment")
	case errors.Is(err, errCrit):
		return nil, invalidToken("malformed", "token header carries crit extensions, which are not supported")
	case errors.Is(err, errB64):
		return nil, invalidToken("malformed", "token header carries b64, which is not supported")
	case err != nil:
		return nil, invalidToken("malformed", "token header is not valid base64url JSON")
	}
	if hdr.Alg == "" || CheckVerifyAlgorithm(hdr.Alg) != nil {
		return nil, invalidToken("bad_algorithm", "token algorithm is not accepted")
	}

	// Checked before any key lookup or crypto; verifyJWS decodes it the
	// same strict way, so no two spellings of one signature both verify.
	if _, err := decodeSignature(s64); errors.Is(err, errSignatureTooLong) {
		return nil, invalidToken("malformed", "token signature is too long")
	} else if err != nil {
		return nil, invalidToken("malformed", "token signature is not valid base64url")
	}
	payload, err := base64.RawURLEncoding.Strict().DecodeString(p64)
	if err != nil {
		return nil, invalidToken("malformed", "token payload is not valid base64url")
	}
	if err := checkStrictJSON(payload); err != nil {
		return nil, invalidToken("malformed", "token payload is not strict JSON: %v", err)
	}
	claims, err := decodeJSONObject(payload)
	if err != nil {
		return nil, invalidToken("malformed", "token payload is not a valid JSON claims set")
	}
	iss, err := stringClaim(claims, "iss")
	if err != nil {
		return nil, invalidToken("malformed", "token iss is not a string")
	}
	ti, ok := ts.issuers[iss]
	if !ok {
		return nil, invalidToken("untrusted_issuer", "token issuer is not trusted")
	}
	if !slices.Contains(ti.tokenTypes, opts.TokenType) {
		return nil, invalidToken("token_type", "issuer's tokens may not be presented as %s", opts.TokenType)
	}
	if !ti.algorithmAllowed(hdr.Alg) {
		return nil, invalidToken("bad_algorithm", "algorithm %s is not allowed for this issuer", hdr.Alg)
	}
	if ti.cfg.RequiredTyp != "" && !typMatches(hdr.Typ, ti.cfg.RequiredTyp) {
		return nil, invalidToken("token_type", "token typ header is not %s", ti.cfg.RequiredTyp)
	}
	if err := checkTokenKind(claims, opts.TokenType, ti.cfg.IDTokenClaims); err != nil {
		return nil, err
	}
	// A Transaction Token is never an access token, whoever signed it.
	if isTxnToken(hdr.Typ, claims) {
		return nil, invalidToken("token_type", "a Transaction Token (Txn-Token) is not accepted as a subject or access token")
	}
	now := ts.now()
	key, status, err := ti.keys.verifyJWS(ctx, hdr, raw)
	switch {
	case status == keysUnavailable:
		return nil, keysUnavailableError("the issuer's keys are unavailable", ti.keys.refetchInterval)
	case status == keyUnknown:
		return nil, invalidToken("unknown_key", "no key of the issuer matches the token's kid and algorithm")
	case err != nil:
		return nil, invalidToken("bad_signature", "token signature does not verify")
	}
	verifiedHeaders.remember(raw, hdr)

	exp, terr := ts.checkTimes(claims, now)
	if terr != nil {
		return nil, terr
	}
	// An ID token is addressed to a client (RFC 7519 / OIDC Core §2): its aud
	// is checked against the issuer's client ids, everything else against
	// the gateway's audiences.
	accepted := ti.cfg.Audiences
	if opts.TokenType == "id_token" {
		accepted = ti.cfg.ClientIDs
	}
	aud, err := audienceClaim(claims)
	if err != nil {
		return nil, invalidToken("invalid_claims", "token aud is not a string or an array of strings")
	}
	if !slices.ContainsFunc(aud, func(a string) bool { return slices.Contains(accepted, a) }) {
		return nil, invalidToken("wrong_audience", "token audience is not accepted here")
	}
	sub, err := stringClaim(claims, "sub")
	if err != nil || sub == "" {
		return nil, invalidToken("missing_sub", "token has no sub")
	}
	jti, err := stringClaim(claims, "jti")
	if err != nil {
		return nil, invalidToken("invalid_claims", "token jti is not a string")
	}

	if opts.TokenHash == "" {
		opts.TokenHash = HashToken(raw)
	}
	cnf, unbound, cerr := checkConfirmation(claims, opts.Binding)
	if cerr != nil {
		return nil, cerr
	}

	s := &Subject{Issuer: iss, Subject: sub, KeyID: hdr.Kid, KeyThumbprint: key.thumbprint, TokenHash: opts.TokenHash, claims: claims, Expiry: exp, JTI: jti,
		Confirmation: cnf, Unbound: unbound}

	if v, ok := s.Claim(ti.cfg.ScopeClaim); ok {
		external, err := scopesFromClaim(v)
		if err != nil {
			return nil, invalidToken("bad_scope", "token %s claim is malformed", ti.cfg.ScopeClaim)
		}
		s.Scopes = ti.cfg.Scopes.Apply(external)
	}
	for _, name := range []string{"client_id", "azp"} {
		if v, ok := s.Claim(name); ok {
			if str, ok := v.(string); ok && str != "" {
				s.ClientID = str
				break
			}
		}
	}
	if v, ok := s.Claim("act"); ok {
		depth, err := checkActChain(v, opts.MaxActDepth)
		if err != nil {
			return nil, invalidToken("bad_act", "token act claim refused: %v", err)
		}
		s.Act, _ = v.(map[string]any)
		s.ActDepth = depth
	}
	if v, ok := s.Claim("may_act"); ok {
		s.MayAct = v
	}
	return s, nil
}

// confirmationMembers are the cnf members (RFC 7800) we recognise: a DPoP
// key thumbprint (RFC 9449 §6.1) and a certificate thumbprint (RFC 8705 §3.1).
var confirmationMembers = []string{"jkt", "x5t#S256"}

// checkConfirmation enforces sender constraints. A token with `cnf` is
// bound to a key its presenter must prove possession of (DPoP, mutual TLS);
// accepting it as a plain bearer token would silently drop that binding and
// let a stolen token through. Every cnf member must be matched by what b
// proves: cnf.jkt by the key of a verified DPoP proof, cnf.x5t#S256 by the
// client certificate of the connection. A cnf of an unknown shape or member
// is refused (fail closed), and a token presented with the DPoP scheme must
// be DPoP-bound. It returns the verified members, or unbound = true when
// the caller allowed a bound token without proof.
func checkConfirmation(claims map[string]any, b *Binding) (verified map[string]string, unbound bool, _ *Error) {
	if b == nil {
		b = &Binding{}
	}
	v, ok := claims["cnf"]
	if !ok {
		if b.DPoPScheme {
			return nil, false, invalidToken("not_dpop_bound", "token presented with a DPoP proof is not DPoP-bound (no cnf.jkt)")
		}
		return nil, false, nil
	}
	cnf, isObject := v.(map[string]any)
	if !isObject {
		return nil, false, invalidToken("bad_cnf", "token cnf claim is not an object")
	}
	if len(cnf) == 0 {
		return nil, false, invalidToken("bad_cnf", "token cnf claim is empty")
	}
	members := make(map[string]string, len(cnf))
	for name, mv := range cnf {
		if !slices.Contains(confirmationMembers, name) {
			return nil, false, invalidToken("bad_cnf", "token cnf claim has an unsupported confirmation method")
		}
		str, isString := mv.(string)
		if !isString || str == "" {
			return nil, false, invalidToken("bad_cnf", "token cnf %s is not a non-empty string", name)
		}
		members[name] = str
	}
	jkt, hasJKT := members["jkt"]
	if b.DPoPScheme && !hasJKT {
		return nil, false, invalidToken("not_dpop_bound", "token presented with a DPoP proof is not DPoP-bound (no cnf.jkt)")
	}
	if b.AllowUnbound && b.JKT == "" && b.CertThumbprint == "" {
		return nil, true, nil
	}
	if hasJKT {
		switch {
		case b.JKT == "" && b.AllowUnbound:
			return nil, true, nil
		case b.JKT == "":
			return nil, false, invalidToken("sender_constrained", "token is DPoP-bound (cnf.jkt) and cannot be used without a DPoP proof")
		case subtle.ConstantTimeCompare([]byte(b.JKT), []byte(jkt)) != 1:
			return nil, false, invalidToken("dpop_key_mismatch", "the DPoP proof key is not the key the token is bound to (cnf.jkt)")
		}
	}
	if x5t, ok := members["x5t#S256"]; ok {
		switch {
		case b.CertThumbprint == "" && b.AllowUnbound:
			return nil, true, nil
		case b.CertThumbprint == "":
			return nil, false, invalidToken("sender_constrained", "token is bound to a client certificate (cnf.x5t#S256) and none was presented")
		case subtle.ConstantTimeCompare([]byte(b.CertThumbprint), []byte(x5t)) != 1:
			return nil, false, invalidToken("cert_mismatch", "the client certificate is not the one the token is bound to (cnf.x5t#S256)")
		}
	}
	return members, false, nil
}

// typMatches compares a JOSE typ with an expected media type, ignoring case
// and an "application/" prefix (RFC 7515 §4.1.9).
func typMatches(typ, want string) bool {
	norm := func(s string) string {
		s = strings.ToLower(s)
		return strings.TrimPrefix(s, "application/")
	}
	return typ != "" && norm(typ) == norm(want)
}

// checkTokenKind refuses tokens whose own claims say they are not what they
// are presented as: a refresh token is never accepted, and an ID token (one
// of idTokenClaims: by default at_hash, c_hash or nonce, claims only ID
// tokens carry) is accepted only where it is presented as an id_token.
func checkTokenKind(claims map[string]any, presentedAs string, idTokenClaims []string) *Error {
	for _, name := range []string{"typ", "token_use", "token_type"} {
		if v, ok := claims[name].(string); ok && strings.Contains(strings.ToLower(v), "refresh") {
			return invalidToken("token_type", "refresh tokens are not accepted")
		}
	}
	if presentedAs != "id_token" {
		for _, name := range idTokenClaims {
			if _, ok := claims[name]; ok {
				return invalidToken("token_type", "an ID token is not an access token")
			}
		}
	}
	return nil
}

// checkTimes enforces RFC 7519 §4.1.4-6 with the configured leeway: exp is
// required and must be in the future, nbf and iat (when present) not in
// it. Times compare at whole seconds, as NumericDates are usually written.
func (ts *TrustStore) checkTimes(claims map[string]any, now time.Time) (time.Time, *Error) {
	return checkClaimTimes(claims, now, ts.clockSkew)
}

// checkClaimTimes is checkTimes with an explicit leeway: the one time rule
// of subject tokens, actor tokens and client assertions.
func checkClaimTimes(claims map[string]any, now time.Time, skew time.Duration) (time.Time, *Error) {
	now = now.Truncate(time.Second)
	exp, ok, err := numericDate(claims, "exp")
	switch {
	case err != nil:
		return time.Time{}, invalidToken("invalid_claims", "token exp is not a NumericDate")
	case !ok:
		return time.Time{}, invalidToken("missing_exp", "token has no exp")
	case !now.Before(exp.Truncate(time.Second).Add(skew)):
		return time.Time{}, invalidToken("expired", "token is expired")
	}
	if nbf, ok, err := numericDate(claims, "nbf"); err != nil {
		return time.Time{}, invalidToken("invalid_claims", "token nbf is not a NumericDate")
	} else if ok && now.Add(skew).Before(nbf.Truncate(time.Second)) {
		return time.Time{}, invalidToken("not_yet_valid", "token is not valid yet (nbf)")
	}
	if iat, ok, err := numericDate(claims, "iat"); err != nil {
		return time.Time{}, invalidToken("invalid_claims", "token iat is not a NumericDate")
	} else if ok && now.Add(skew).Before(iat.Truncate(time.Second)) {
		return time.Time{}, invalidToken("bad_iat", "token was issued in the future (iat)")
	}
	return exp, nil
}

// numericDate reads a NumericDate claim (RFC 7519 §2): a JSON number of
// seconds since the epoch.
func numericDate(claims map[string]any, name string) (time.Time, bool, error) {
	v, ok := claims[name]
	if !ok {
		return time.Time{}, false, nil
	}
	f, isNum := v.(float64)
	if !isNum || math.IsNaN(f) || math.IsInf(f, 0) || f < 0 || f > 1<<40 {
		return time.Time{}, true, fmt.Errorf("%s is not a NumericDate", name)
	}
	sec, frac := math.Modf(f)
	return time.Unix(int64(sec), int64(frac*1e9)), true, nil
}

// stringClaim reads an optional string claim; another type is an error.
func stringClaim(claims map[string]any, name string) (string, error) {
	v, ok := claims[name]
	if !ok {
		return "", nil
	}
	s, isString := v.(string)
	if !isString {
		return "", fmt.Errorf("%s is not a string", name)
	}
	return s, nil
}

// audienceClaim reads aud: a string or an array of strings (RFC 7519 §4.1.3).
func audienceClaim(claims map[string]any) ([]string, error) {
	switch v := claims["aud"].(type) {
	case nil:
		return nil, nil
	case string:
		return []string{v}, nil
	case []any:
		out := make([]string, 0, len(v))
		for _, e := range v {
			s, ok := e.(string)
			if !ok {
				return nil, errors.New("aud holds a non-string")
			}
			out = append(out, s)
		}
		return out, nil
	default:
		return nil, errors.New("aud is not a string or an array")
	}
}

// Ways a compact JWS fails before any key or crypto is involved.
var (
	errJWE          = errors.New("five segments: an encrypted token (JWE)")
	errNotCompact   = errors.New("not a compact JWS")
	errEmptySegment = errors.New("a JWS segment is empty")
	errCrit         = errors.New("crit header present")
	errB64          = errors.New("b64 header present")
)

// splitJWS splits a compact JWS and decodes its protected header strictly.
// crit and b64 are refused: nothing here needs them, and jws.VerifyCompactFast
// does not support them. Any other error means the header is not valid
// base64url JSON.
func splitJWS(raw string) (hdr jwsHeader, payload64, sig64 string, err error) {
	switch strings.Count(raw, ".") {
	case 2:
	case 4:
		return hdr, "", "", errJWE
	default:
		return hdr, "", "", errNotCompact
	}
	h64, rest, _ := strings.Cut(raw, ".")
	payload64, sig64, _ = strings.Cut(rest, ".")
	if h64 == "" || payload64 == "" || sig64 == "" {
		return hdr, "", "", errEmptySegment
	}
	if known, ok := verifiedHeaders.get(h64); ok {
		return known, payload64, sig64, nil
	}
	hdr, err = decodeJWSHeader(h64)
	if err != nil {
		return hdr, "", "", err
	}
	return hdr, payload64, sig64, nil
}

// headerMemo remembers the decoded protected headers of tokens whose
// signature verified. An issuer signs every token of a key under the same
// header, so nearly every token finds its header here and skips decoding
// it. Only verified headers are added (a trusted key signed them), so
// nobody can fill it with junk; it starts over when full. Decoding is a
// pure function of the header string, so a remembered header decodes to
// exactly what decoding it again would give.
type headerMemo struct {
	headers atomic.Pointer[map[string]jwsHeader]
	mu      sync.Mutex // serialises writers; readers never lock
}

const maxRememberedHeaders = 256

var verifiedHeaders headerMemo

func (m *headerMemo) get(h64 string) (jwsHeader, bool) {
	if p := m.headers.Load(); p != nil {
		hdr, ok := (*p)[h64]
		return hdr, ok
	}
	return jwsHeader{}, false
}

// remember adds the header segment of a token whose signature verified.
func (m *headerMemo) remember(raw string, hdr jwsHeader) {
	h64, _, _ := strings.Cut(raw, ".")
	if _, ok := m.get(h64); ok {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	old := m.headers.Load()
	next := make(map[string]jwsHeader, 8)
	if old != nil && len(*old) < maxRememberedHeaders {
		maps.Copy(next, *old)
	}
	next[h64] = hdr
	m.headers.Store(&next)
}

// decodeJWSHeader decodes a protected header strictly: member names match
// exactly (encoding/json would also read "ALG" as alg), alg, kid and typ
// must be strings, and crit and b64 are refused.
func decodeJWSHeader(h64 string) (jwsHeader, error) {
	var hdr jwsHeader
	b, err := segmentJSON(h64)
	if err != nil {
		return hdr, err
	}
	m, err := decodeJSONObject(b)
	if err != nil {
		return hdr, err
	}
	if _, ok := m["crit"]; ok {
		return hdr, errCrit
	}
	if _, ok := m["b64"]; ok {
		return hdr, errB64
	}
	alg, ok1 := optionalString(m, "alg")
	kid, ok2 := optionalString(m, "kid")
	typ, ok3 := optionalString(m, "typ")
	if !ok1 || !ok2 || !ok3 {
		return hdr, errors.New("header alg, kid or typ is not a string")
	}
	return jwsHeader{Alg: alg, Kid: kid, Typ: typ}, nil
}

// optionalString is m[name] when it is a string or absent ("").
func optionalString(m map[string]any, name string) (string, bool) {
	v, ok := m[name]
	if !ok {
		return "", true
	}
	s, ok := v.(string)
	return s, ok
}

// decodeSegment decodes one base64url JWS segment holding a JSON object.
func decodeSegment(seg string, dst any) error {
	b, err := segmentJSON(seg)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, dst)
}

// segmentJSON is a base64url JWS segment decoded strictly, checked to be
// one strict JSON object (checkStrictJSON) and not yet parsed.
func segmentJSON(seg string) ([]byte, error) {
	b, err := base64.RawURLEncoding.Strict().DecodeString(seg)
	if err != nil {
		return nil, err
	}
	if !bytes.HasPrefix(bytes.TrimLeft(b, " \t\r\n"), []byte("{")) {
		return nil, errors.New("not a JSON object")
	}
	if err := checkStrictJSON(b); err != nil {
		return nil, err
	}
	return b, nil
}

// verifyJWS checks a compact JWS with the key its header selects (kid and
// alg within the source's keys, refetching when none fits): the one
// signature check of subject tokens, actor tokens and client assertions.
// The caller has checked alg against its allow-list, and splitJWS has
// checked the shape of raw. The check itself is jwx's building block
// (jwsbb.Verify, where jws.Verify ends): the header was already parsed
// once, strictly, and is not parsed again.
func (u *keyUser) verifyJWS(ctx context.Context, hdr jwsHeader, raw string) (verifyKey, keyStatus, error) {
	key, status := u.keyFor(ctx, hdr.Kid, hdr.Alg)
	if status != keyFound {
		return key, status, nil
	}
	dot := strings.LastIndexByte(raw, '.')
	if dot < 0 {
		return key, keyFound, errNotCompact
	}
	sig, err := decodeSignature(raw[dot+1:])
	if err != nil {
		return key, keyFound, err
	}
	return key, keyFound, jwsbb.Verify(key.pub, hdr.Alg, []byte(raw[:dot]), sig)
}

// maxSignatureBytes bounds a signature: an RSA signature of a 8192-bit key
// is 1024 bytes, larger than any other algorithm's.
const maxSignatureBytes = 1024

var errSignatureTooLong = errors.New("signature is too long")

// decodeSignature decodes a base64url signature segment strictly (one
// spelling per signature).
func decodeSignature(s64 string) ([]byte, error) {
	enc := base64.RawURLEncoding.Strict()
	if len(s64) > enc.EncodedLen(maxSignatureBytes) {
		return nil, errSignatureTooLong
	}
	sig := make([]byte, enc.DecodedLen(len(s64)))
	n, err := enc.Decode(sig, []byte(s64))
	if err != nil {
		return nil, err
	}
	return sig[:n], nil
}
