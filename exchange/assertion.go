package exchange

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
)

// private_key_jwt client authentication (RFC 7523 §2.2, §3) and the replay
// cache of assertion jti values.

// checkAssertion verifies a private_key_jwt client assertion (RFC 7523 §3).
// As in Verify, the order is deliberate: shape and header first, then the
// client by iss/sub, then the key by the client's JWKS, kid and algorithm,
// then the signature, and only then the claims and the replay cache.
func (c *Clients) checkAssertion(ctx context.Context, cred ClientCredentials) (*AuthenticatedClient, *Error) {
	switch {
	case cred.Assertion == "":
		return nil, badRequest("missing_client_assertion", "client_assertion is required with client_assertion_type")
	case cred.AssertionType == "":
		return nil, badRequest("missing_client_assertion_type", "client_assertion_type is required with client_assertion")
	case cred.AssertionType != ClientAssertionTypeJWTBearer:
		return nil, clientError("unsupported_assertion_type", "client_assertion_type must be "+ClientAssertionTypeJWTBearer)
	}
	raw := cred.Assertion
	if len(raw) > DefaultMaxAssertionSize {
		return nil, clientError("assertion_too_large", fmt.Sprintf("client_assertion exceeds %d bytes", DefaultMaxAssertionSize))
	}
	hdr, p64, _, err := splitJWS(raw)
	switch {
	case errors.Is(err, errJWE), errors.Is(err, errNotCompact):
		return nil, clientError("malformed_assertion", "client_assertion is not a compact JWS")
	case errors.Is(err, errEmptySegment):
		return nil, clientError("malformed_assertion", "client_assertion is not a signed compact JWS")
	case errors.Is(err, errCrit), errors.Is(err, errB64):
		return nil, clientError("malformed_assertion", "client_assertion header carries unsupported extensions")
	case err != nil:
		return nil, clientError("malformed_assertion", "client_assertion header is not valid base64url JSON")
	}
	if hdr.Alg == "" || CheckVerifyAlgorithm(hdr.Alg) != nil {
		return nil, clientError("bad_algorithm", "client_assertion must be signed with an asymmetric algorithm")
	}
	payload, err := base64.RawURLEncoding.Strict().DecodeString(p64)
	if err != nil {
		return nil, clientError("malformed_assertion", "client_assertion payload is not valid base64url")
	}
	if err := checkStrictJSON(payload); err != nil {
		return nil, &Error{Kind: KindInvalidClient, Reason: "malformed_assertion",
			Description: "client_assertion payload is not strict JSON (a duplicate member or invalid UTF-8)", Err: err}
	}
	claims, err := decodeJSONObject(payload)
	if err != nil {
		return nil, clientError("malformed_assertion", "client_assertion payload is not a valid JSON claims set")
	}
	iss, err1 := stringClaim(claims, "iss")
	sub, err2 := stringClaim(claims, "sub")
	if err1 != nil || err2 != nil || iss == "" || iss != sub {
		return nil, clientError("bad_assertion_subject", "client_assertion iss and sub must both be the client_id")
	}
	if cred.PostID != "" && cred.PostID != sub {
		return nil, clientError("client_id_mismatch", "client_id does not match the client_assertion")
	}
	rc, ok := c.clients[sub]
	if !ok {
		return nil, clientError("unknown_client", authFailed)
	}
	if rc.keys == nil {
		return nil, clientError("auth_method_mismatch", authFailed)
	}

	now := c.now()
	_, status, err := rc.keys.verifyJWS(ctx, hdr, raw)
	switch {
	case status == keysUnavailable:
		return nil, keysUnavailableError("the client's keys are unavailable", rc.keys.refetchInterval)
	case status == keyUnknown:
		return nil, clientError("unknown_key", authFailed)
	case err != nil:
		return nil, &Error{Kind: KindInvalidClient, Reason: "bad_signature", Description: authFailed, Err: err}
	}

	// The same time rules as for subject tokens (RFC 7519 §4.1.4-6).
	exp, terr := checkClaimTimes(claims, now, c.skew)
	if terr != nil {
		return nil, &Error{Kind: KindInvalidClient, Reason: "assertion_" + terr.Reason,
			Description: "client_assertion " + strings.TrimPrefix(terr.Description, "token ")}
	}
	if exp.After(now.Add(c.maxLifetime + c.skew)) {
		return nil, clientError("assertion_lifetime",
			fmt.Sprintf("client_assertion exp lies more than %s in the future", c.maxLifetime))
	}
	iat, ok, _ := numericDate(claims, "iat") // its type was checked with the times
	if !ok {
		return nil, clientError("assertion_missing_iat", "client_assertion has no iat")
	}
	if iat.Before(now.Add(-c.maxAge - c.skew)) {
		return nil, clientError("assertion_too_old",
			fmt.Sprintf("client_assertion iat lies more than %s in the past", c.maxAge))
	}
	aud, err := audienceClaim(claims)
	if err != nil {
		return nil, clientError("assertion_invalid_claims", "client_assertion aud is not a string or an array of strings")
	}
	// Only the configured token endpoint URL and issuer (RFC 7523 §3), never
	// a URL derived from the request: its Host is the sender's to choose, so
	// an assertion signed for another server could be replayed here.
	if !slices.ContainsFunc(aud, func(a string) bool { return slices.Contains(c.endpointURLs, a) }) {
		return nil, clientError("assertion_audience", "client_assertion aud must name this token endpoint")
	}
	jti, err := stringClaim(claims, "jti")
	if err != nil || jti == "" {
		return nil, clientError("assertion_missing_jti", "client_assertion has no jti")
	}
	// Only a verified assertion takes a place in the replay cache, so no one
	// but a client holding its key can fill it, and only its own part. It
	// stays until the assertion could no longer pass the exp or iat check.
	until := iat.Add(c.maxAge)
	if exp.Before(until) {
		until = exp
	}
	switch c.replay.add(sub, jti, until.Add(c.skew), now) {
	case errReplayed:
		return nil, clientError("assertion_replayed", "client_assertion jti was already used")
	case errReplayFull:
		return nil, &Error{Kind: KindUnavailable, Reason: "replay_cache_full",
			Description: "too many client assertions of this client in flight; retry later", RetryAfter: replayFullRetryAfter}
	}
	// The same jti at every other instance of the cluster, through the
	// shared storage: an unreachable storage fails closed.
	if c.shared != nil {
		switch err := c.shared.record(ctx, sub, jti, until.Add(c.skew), now); {
		case errors.Is(err, errReplayed):
			return nil, clientError("assertion_replayed", "client_assertion jti was already used")
		case err != nil:
			return nil, &Error{Kind: KindUnavailable, Reason: "replay_storage",
				Description: "the replay records cannot be checked; retry later", RetryAfter: 5 * time.Second, Err: err}
		}
	}
	return &AuthenticatedClient{ClientID: sub, Method: ClientAuthPrivateKeyJWT, Config: rc.cfg}, nil
}

var (
	errReplayed   = errors.New("jti replayed")
	errReplayFull = errors.New("replay cache full")
)

// replayCache remembers the jti of every accepted client assertion until it
// can no longer pass the time checks. Each client has its own bounded set:
// when a client's set is full of live entries, that client's new assertions
// are refused; a live jti is never forgotten early (that would reopen the
// replay window), and no client can crowd out another.
type replayCache struct {
	mu        sync.Mutex
	clients   map[string]*clientReplay
	max       int
	maxOwners int // 0: no bound on the number of owners (clients, proof keys)
	lastSweep time.Time
}

type clientReplay struct {
	jtis      map[[sha256.Size]byte]time.Time
	lastSweep time.Time
}

func newReplayCache(perClient int) *replayCache {
	return &replayCache{clients: make(map[string]*clientReplay), max: perClient}
}

// add records clientID+jti until until. It returns errReplayed when that jti
// is still recorded, errReplayFull when the client has no room.
func (r *replayCache) add(clientID, jti string, until, now time.Time) error {
	// A hash keeps each entry small however long the jti is.
	k := sha256.Sum256([]byte(jti))
	r.mu.Lock()
	defer r.mu.Unlock()
	full := r.maxOwners > 0 && len(r.clients) >= r.maxOwners
	if now.Sub(r.lastSweep) >= replaySweepInterval || full && now.Sub(r.lastSweep) >= replayFullSweepGap {
		r.sweepAll(now)
	}
	cr := r.clients[clientID]
	if cr == nil {
		if r.maxOwners > 0 && len(r.clients) >= r.maxOwners {
			return errReplayFull
		}
		cr = &clientReplay{jtis: make(map[[sha256.Size]byte]time.Time)}
		r.clients[clientID] = cr
	}
	if exp, ok := cr.jtis[k]; ok && now.Before(exp) {
		return errReplayed
	}
	if len(cr.jtis) >= r.max && now.Sub(cr.lastSweep) >= replayFullSweepGap {
		cr.sweep(now)
	}
	if _, ok := cr.jtis[k]; !ok && len(cr.jtis) >= r.max {
		return errReplayFull
	}
	cr.jtis[k] = until
	return nil
}

func (r *replayCache) sweepAll(now time.Time) {
	r.lastSweep = now
	for id, cr := range r.clients {
		cr.sweep(now)
		if len(cr.jtis) == 0 {
			delete(r.clients, id)
		}
	}
}

func (cr *clientReplay) sweep(now time.Time) {
	cr.lastSweep = now
	for k, exp := range cr.jtis {
		if !now.Before(exp) {
			delete(cr.jtis, k)
		}
	}
}

func (r *replayCache) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, cr := range r.clients {
		n += len(cr.jtis)
	}
	return n
}

// VerifySelfSigned checks a JWT that a client signed with its own
// private_key_jwt keys (the draft's self_signed subject token of a
// Transaction Token request): a compact JWS with an asymmetric algorithm
// and one of the client's keys, strict JSON, iss = the client, and the time
// rules of every token (exp required). It returns the claims.
func (c *Clients) VerifySelfSigned(ctx context.Context, clientID, raw string) (map[string]any, error) {
	rc, ok := c.clients[clientID]
	if !ok || rc.keys == nil {
		return nil, invalidToken("unknown_key", "self_signed subject tokens need a client that authenticates with private_key_jwt keys")
	}
	if len(raw) > DefaultMaxAssertionSize {
		return nil, invalidToken("too_large", "self_signed subject token exceeds %d bytes", DefaultMaxAssertionSize)
	}
	hdr, p64, _, err := splitJWS(raw)
	if err != nil {
		return nil, invalidToken("malformed", "self_signed subject token is not a compact JWS")
	}
	if hdr.Alg == "" || CheckVerifyAlgorithm(hdr.Alg) != nil {
		return nil, invalidToken("bad_algorithm", "self_signed subject token must be signed with an asymmetric algorithm")
	}
	payload, err := base64.RawURLEncoding.Strict().DecodeString(p64)
	if err != nil || checkStrictJSON(payload) != nil {
		return nil, invalidToken("malformed", "self_signed subject token payload is not strict JSON")
	}
	claims, err := decodeJSONObject(payload)
	if err != nil {
		return nil, invalidToken("malformed", "self_signed subject token payload is not a JSON object")
	}
	_, status, verr := rc.keys.verifyJWS(ctx, hdr, raw)
	switch {
	case status == keysUnavailable:
		return nil, keysUnavailableError("the client's keys are unavailable", rc.keys.refetchInterval)
	case status == keyUnknown:
		return nil, invalidToken("unknown_key", "no key of the client matches the self_signed token")
	case verr != nil:
		return nil, invalidToken("bad_signature", "self_signed subject token signature does not verify")
	}
	if iss, _ := stringClaim(claims, "iss"); iss != clientID {
		return nil, invalidToken("untrusted_issuer", "a self_signed subject token's iss must be the requesting client")
	}
	if _, terr := checkClaimTimes(claims, c.now(), c.skew); terr != nil {
		return nil, terr
	}
	return claims, nil
}
