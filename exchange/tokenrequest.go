package exchange

import (
	"context"
	"fmt"
	"net/url"
	"slices"
	"strings"
)

// GrantTypeTokenExchange is the grant_type of RFC 8693 §2.1.
const GrantTypeTokenExchange = "urn:ietf:params:oauth:grant-type:token-exchange"

// Form parameters of an RFC 8693 §2.1 request, and the client authentication
// parameters of RFC 6749 §2.3.1 and RFC 7521 §4.2 that may travel with it.
const (
	paramGrantType           = "grant_type"
	paramResource            = "resource"
	paramAudience            = "audience"
	paramScope               = "scope"
	paramRequestedTokenType  = "requested_token_type"
	paramSubjectToken        = "subject_token"
	paramSubjectTokenType    = "subject_token_type"
	paramActorToken          = "actor_token"
	paramActorTokenType      = "actor_token_type"
	paramClientID            = "client_id"
	paramClientSecret        = "client_secret"
	paramClientAssertion     = "client_assertion"
	paramClientAssertionType = "client_assertion_type"
	// draft-ietf-oauth-transaction-tokens: context of a Txn-Token request.
	paramRequestContext = "request_context"
	paramRequestDetails = "request_details"
)

// singleParams may appear at most once (RFC 6749 §3.2); audience and
// resource may repeat (RFC 8693 §2.1). The order fixes which duplicate is
// reported first.
var singleParams = []string{
	paramGrantType,
	paramRequestedTokenType,
	paramSubjectToken,
	paramSubjectTokenType,
	paramActorToken,
	paramActorTokenType,
	paramScope,
	paramClientID,
	paramClientSecret,
	paramClientAssertion,
	paramClientAssertionType,
	paramRequestContext,
	paramRequestDetails,
}

// requestableTokenTypes are the requested_token_type values we can issue:
// what we mint is a JWT access token (RFC 9068), which is both.
var requestableTokenTypes = []string{TokenTypeAccessToken, TokenTypeJWT, TokenTypeTxnToken}

// TokenRequest is a parsed RFC 8693 §2.1 token-exchange request. Its token
// types are full URNs; audiences and resources keep their first-seen order
// without duplicates.
type TokenRequest struct {
	GrantType string
	Resources []string
	Audiences []string
	Scopes    []string
	// RequestedTokenType is a URN; TokenTypeAccessToken when not requested.
	RequestedTokenType string

	SubjectToken, SubjectTokenType string
	ActorToken, ActorTokenType     string

	// Client authentication parameters, when they were sent in the body.
	// ParseTokenRequest only checks that each appears at most once;
	// Clients.Authenticate judges them.
	ClientID, ClientSecret, ClientAssertion, ClientAssertionType string

	// RequestContext and RequestDetails are the request_context and
	// request_details of a Txn-Token request (nil when absent).
	RequestContext, RequestDetails map[string]any

	// Binding is what the client proved on this request: the key of a
	// verified DPoP proof to the token endpoint, the TLS client
	// certificate. Set by the front door, never read from the form.
	Binding *Binding
	// Trace, when set, records each decision (Engine.ExplainTokenExchange).
	Trace *Trace
	// SelfSigned, when set, verifies a self_signed subject token with the
	// requesting client's own keys and returns its claims.
	SelfSigned func(ctx context.Context, clientID, raw string) (map[string]any, error)
}

// SubjectTokenTypeName is the short name (access_token, jwt, ...) of the
// subject token's type, as VerifyOptions.TokenType and IssuerConfig.TokenTypes
// use it.
func (r *TokenRequest) SubjectTokenTypeName() string { return tokenTypeName(r.SubjectTokenType) }

// ActorTokenTypeName is the short name of the actor token's type, or "" when
// there is no actor token.
func (r *TokenRequest) ActorTokenTypeName() string { return tokenTypeName(r.ActorTokenType) }

// clientParams are the client authentication parameters of a token request.
var clientParams = []string{paramClientID, paramClientSecret, paramClientAssertion, paramClientAssertionType}

// ParseClientCredentials reads only the client authentication parameters of
// a token request body, each at most once, ready to be completed with the
// Authorization header's Basic credentials. The endpoint authenticates the
// client with them before it parses anything else: an unauthenticated
// caller gets no further than this.
func ParseClientCredentials(form url.Values) (ClientCredentials, error) {
	form = withoutEmpty(form)
	for _, p := range clientParams {
		if len(form[p]) > 1 {
			return ClientCredentials{}, badRequest("duplicate_parameter", "parameter "+p+" given more than once")
		}
	}
	return ClientCredentials{
		PostID:        form.Get(paramClientID),
		PostSecret:    form.Get(paramClientSecret),
		Assertion:     form.Get(paramClientAssertion),
		AssertionType: form.Get(paramClientAssertionType),
	}, nil
}

func tokenTypeName(urn string) string {
	for name, u := range tokenTypeURNs {
		if u == urn {
			return name
		}
	}
	return ""
}

// ParseTokenRequest parses the form of a token-exchange request. The caller
// has already checked the method, the content type and the body size. Errors
// are *Error: KindInvalidRequest for a malformed request,
// KindUnsupportedGrantType for another grant, KindInvalidTarget for an
// unusable resource and KindInvalidScope for a malformed scope. No error
// description ever repeats a token.
//
// As RFC 6749 §3.2 requires, unknown parameters are ignored and a parameter
// sent with an empty value counts as omitted; an empty audience or resource
// is refused, though, rather than silently dropped.
func ParseTokenRequest(form url.Values) (*TokenRequest, error) {
	form = withoutEmpty(form)
	for _, p := range singleParams {
		if len(form[p]) > 1 {
			return nil, badRequest("duplicate_parameter", "parameter "+p+" given more than once")
		}
	}

	r := &TokenRequest{
		GrantType:           form.Get(paramGrantType),
		SubjectToken:        form.Get(paramSubjectToken),
		SubjectTokenType:    form.Get(paramSubjectTokenType),
		ActorToken:          form.Get(paramActorToken),
		ActorTokenType:      form.Get(paramActorTokenType),
		RequestedTokenType:  form.Get(paramRequestedTokenType),
		ClientID:            form.Get(paramClientID),
		ClientSecret:        form.Get(paramClientSecret),
		ClientAssertion:     form.Get(paramClientAssertion),
		ClientAssertionType: form.Get(paramClientAssertionType),
	}

	switch r.GrantType {
	case "":
		return nil, badRequest("missing_grant_type", "grant_type is required")
	case GrantTypeTokenExchange:
	default:
		return nil, &Error{Kind: KindUnsupportedGrantType, Reason: "unsupported_grant_type",
			Description: "grant_type must be " + GrantTypeTokenExchange}
	}

	if r.SubjectToken == "" {
		return nil, badRequest("missing_subject_token", "subject_token is required")
	}
	if r.SubjectTokenType == "" {
		return nil, badRequest("missing_subject_token_type", "subject_token_type is required")
	}
	if err := checkTokenTypeParam(paramSubjectTokenType, r.SubjectTokenType); err != nil {
		return nil, err
	}
	switch {
	case r.ActorToken != "" && r.ActorTokenType == "":
		return nil, badRequest("missing_actor_token_type", "actor_token_type is required when actor_token is present")
	case r.ActorToken == "" && r.ActorTokenType != "":
		return nil, badRequest("unexpected_actor_token_type", "actor_token_type must not be present without actor_token")
	case r.ActorToken != "":
		if err := checkTokenTypeParam(paramActorTokenType, r.ActorTokenType); err != nil {
			return nil, err
		}
	}

	switch {
	case r.RequestedTokenType == "":
		r.RequestedTokenType = TokenTypeAccessToken
	case !slices.Contains(requestableTokenTypes, r.RequestedTokenType):
		return nil, badRequest("unsupported_requested_token_type",
			"requested_token_type is not supported; supported: "+strings.Join(requestableTokenTypes, " "))
	}

	var err *Error
	if r.Audiences, err = repeatedParam(form, paramAudience); err != nil {
		return nil, err
	}
	if r.Resources, err = repeatedParam(form, paramResource); err != nil {
		return nil, err
	}
	for _, res := range r.Resources {
		if !isResourceURI(res) {
			return nil, &Error{Kind: KindInvalidTarget, Reason: "invalid_resource",
				Description: "resource must be an absolute URI without a fragment (RFC 8707)"}
		}
	}

	if err := r.parseTxnParams(form); err != nil {
		return nil, err
	}
	if s := form.Get(paramScope); s != "" {
		scopes, err := ParseScope(s)
		if err != nil {
			return nil, &Error{Kind: KindInvalidScope, Reason: "malformed_scope", Description: "scope: " + err.Error()}
		}
		r.Scopes = scopes
	}
	return r, nil
}

func badRequest(reason, description string) *Error {
	return &Error{Kind: KindInvalidRequest, Reason: reason, Description: description}
}

// checkTokenTypeParam accepts only the full RFC 8693 §3 URNs on the wire; the
// short names are a configuration convenience, not part of the protocol.
func checkTokenTypeParam(param, value string) *Error {
	if urn, ok := TokenTypeURN(value); ok && urn == value {
		return nil
	}
	if urn, ok := tokenTypeURNs[value]; ok {
		return badRequest("unsupported_token_type", param+" must be a token type URN such as "+urn)
	}
	desc := param + " is not a supported token type"
	if safeToEcho(value) {
		desc = param + " " + value + " is not a supported token type"
	}
	urns := make([]string, 0, len(tokenTypeURNs))
	for _, urn := range tokenTypeURNs {
		urns = append(urns, urn)
	}
	slices.Sort(urns)
	return badRequest("unsupported_token_type", desc+"; supported: "+strings.Join(urns, " "))
}

// safeToEcho tells whether a client-supplied token type may be repeated in
// an error description: it must look like a URN, be short, and hold only
// characters RFC 6749 §5.2 allows there, so neither a token pasted into the
// wrong field nor markup ever comes back.
func safeToEcho(v string) bool {
	if !strings.HasPrefix(v, "urn:") || len(v) > 100 {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte(":-._", c) >= 0) {
			return false
		}
	}
	return true
}

// repeatedParam returns the values of a parameter that may repeat, without
// duplicates. An empty value is refused: dropping it would silently change
// what was asked for.
func repeatedParam(form url.Values, name string) ([]string, *Error) {
	vals := form[name]
	if len(vals) == 0 {
		return nil, nil
	}
	out := make([]string, 0, len(vals))
	seen := make(map[string]struct{}, len(vals))
	for _, v := range vals {
		if _, dup := seen[v]; dup {
			continue
		}
		if len(out) == maxTargets {
			return nil, badRequest("too_many_targets", fmt.Sprintf("at most %d distinct %s parameters are accepted", maxTargets, name))
		}
		seen[v] = struct{}{}
		out = append(out, v)
	}
	return out, nil
}

// maxTargets caps the distinct audience (and resource) parameters of one request.
const maxTargets = 64

// withoutEmpty drops parameters sent without a value: RFC 6749 §3.2 says to
// treat them as omitted. The form is copied only when it holds one.
func withoutEmpty(form url.Values) url.Values {
	clean, copied := form, false
	for name, vals := range form {
		if !slices.Contains(vals, "") {
			continue
		}
		if !copied {
			clean, copied = make(url.Values, len(form)), true
			for n, v := range form {
				clean[n] = v
			}
		}
		kept := slices.DeleteFunc(slices.Clone(vals), func(v string) bool { return v == "" })
		if len(kept) == 0 {
			delete(clean, name)
		} else {
			clean[name] = kept
		}
	}
	return clean
}

// isResourceURI tells whether s is an absolute URI without a fragment, as
// RFC 8707 §2 requires of a resource indicator.
func isResourceURI(s string) bool {
	if strings.Contains(s, "#") {
		return false
	}
	u, err := url.Parse(s)
	if err != nil || !u.IsAbs() {
		return false
	}
	// Hierarchical URIs need something after the scheme ("https:" alone,
	// or "https://" with no host, names nothing).
	if u.Opaque == "" && u.Host == "" && u.Path == "" {
		return false
	}
	return true
}
