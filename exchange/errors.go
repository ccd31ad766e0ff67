package exchange

import (
	"errors"
	"fmt"
	"time"
)

// Kind classifies why an exchange failed. Each front door maps a Kind to its
// own wire format: the middleware to RFC 6750 (401/403 with WWW-Authenticate),
// the token endpoint to RFC 6749 §5.2 / RFC 8693 §2.2.2 JSON errors.
type Kind int

const (
	// KindMissingToken: no bearer token was presented.
	KindMissingToken Kind = iota + 1
	// KindInvalidToken: the presented token is malformed, unverifiable,
	// expired, from an untrusted issuer, or for another audience.
	KindInvalidToken
	// KindInsufficientScope: a required scope cannot be obtained.
	KindInsufficientScope
	// KindDenied: the token is valid but policy refuses the exchange
	// (may_act, act depth, rules).
	KindDenied
	// KindInvalidRequest: the exchange request itself is malformed.
	KindInvalidRequest
	// KindInvalidTarget: an audience or resource we will not issue for.
	KindInvalidTarget
	// KindInvalidScope: nothing of the requested scope can be granted.
	KindInvalidScope
	// KindInvalidClient: client authentication failed.
	KindInvalidClient
	// KindUnauthorizedClient: the client may not use this grant.
	KindUnauthorizedClient
	// KindUnsupportedGrantType: a grant_type other than token exchange.
	KindUnsupportedGrantType
	// KindServer: an internal failure (signing, storage); never the caller's fault.
	KindServer
	// KindUnavailable: a dependency or a bounded resource cannot answer now
	// (503 with Retry-After); never blamed on the token or the client.
	KindUnavailable
	// KindInvalidDPoPProof: a DPoP proof is missing, malformed, does not
	// verify, is not for this request, or was replayed (RFC 9449 §7.1
	// invalid_dpop_proof).
	KindInvalidDPoPProof
	// KindUseDPoPNonce: the proof lacks the server nonce, or it is not
	// current (RFC 9449 §8 use_dpop_nonce).
	KindUseDPoPNonce
)

// Error is a failed exchange. Description is safe to show to the caller: it
// names the reason and never echoes the token. Reason is a short, stable,
// low-cardinality code for logs and metrics. Err, when set, is the internal
// cause and is only logged.
type Error struct {
	Kind        Kind
	Reason      string
	Description string
	Err         error
	// RetryAfter, with KindUnavailable, is when to try again (0: unknown).
	RetryAfter time.Duration
	// Status, when set, overrides the HTTP status a front door would pick
	// for Kind (e.g. 413 for an oversized body).
	Status int
	// SubjectIssuer and SubjectSub name the subject once its token was
	// verified (a refusal by policy or scope), for the audit log only.
	SubjectIssuer, SubjectSub string
}

// withSubject records the verified subject on a refusal, for the log.
func withSubject(err error, s *Subject) error {
	if err == nil || s == nil {
		return err
	}
	e := *AsError(err)
	e.SubjectIssuer, e.SubjectSub = s.Issuer, s.Subject
	return &e
}

func (e *Error) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("%s: %s: %v", e.Reason, e.Description, e.Err)
	}
	return e.Reason + ": " + e.Description
}

func (e *Error) Unwrap() error { return e.Err }

// AsError returns err as an *Error, wrapping anything else as a server error.
func AsError(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return &Error{Kind: KindServer, Reason: "internal", Description: "internal error", Err: err}
}

func invalidToken(reason, format string, args ...any) *Error {
	return &Error{Kind: KindInvalidToken, Reason: reason, Description: fmt.Sprintf(format, args...)}
}

func denied(reason, format string, args ...any) *Error {
	return &Error{Kind: KindDenied, Reason: reason, Description: fmt.Sprintf(format, args...)}
}

// keysUnavailableError is the KindUnavailable error of a lookup that found
// no usable keys; a retry makes sense after the next forced refetch.
func keysUnavailableError(description string, retry time.Duration) *Error {
	return &Error{Kind: KindUnavailable, Reason: "keys_unavailable", Description: description + "; retry later", RetryAfter: retry}
}
