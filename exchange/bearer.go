package exchange

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
)

// BearerGate is the middleware front door over plain net/http: it takes the
// inbound bearer token off a request (RFC 6750 §2.1 only), scrubs every
// other copy of it, exchanges it for a token minted for its grant, and
// answers refusals per RFC 6750 §3. Hosts (the Caddy adapter) add logging,
// metrics and placeholders around it; Wrap makes it a complete net/http
// middleware.
type BearerGate struct {
	engine *Engine
	grant  *Grant
	// realm of the challenge; empty: the request's host.
	realm string
	// Challenge, if set, writes WWW-Authenticate instead of the Bearer
	// challenge (a DPoP route adds its own, RFC 9449 §7.1); bearer is the
	// Bearer challenge the gate would have sent.
	Challenge func(w http.ResponseWriter, r *http.Request, bearer, realm, code string, e *Error)
	// ResourceMetadata, if set, is the URL of the route's RFC 9728
	// protected resource metadata: every challenge carries it as
	// resource_metadata (RFC 9728 §5.1), so a client (an MCP client, say)
	// can discover where to obtain a token.
	ResourceMetadata string
	// ChallengeScope, if set, is the scope a client should request at the
	// authorization server, in its names: sent as scope on 401 challenges,
	// and on insufficient_scope instead of the grant's required scopes
	// (which are the gateway's mapped names).
	ChallengeScope []string
}

// AdmitHooks let a host extend the admission: how credentials are read
// (a DPoP proof, a client certificate), how the engine is called (timing,
// panic recovery), and what happens once the token is accepted (a proof's
// jti recorded). Each nil hook has the gate's default.
type AdmitHooks struct {
	// Credentials reads the inbound token and what the request proves
	// about its presenter. Default: ParseBearer, no binding.
	Credentials func(r *http.Request) (raw string, binding *Binding, err *Error)
	// Exchange runs the engine. Default: Engine.ExchangePresented.
	Exchange func(raw string, binding *Binding, info *RequestInfo) (*Minted, error)
	// Accepted runs after the exchange and every check passed, before the
	// request goes on; an error refuses it.
	Accepted func() *Error
}

// NewBearerGate builds the front door of one route.
func NewBearerGate(engine *Engine, grant *Grant, realm string) (*BearerGate, error) {
	if engine == nil || grant == nil {
		return nil, fmt.Errorf("a bearer gate needs an engine and a grant")
	}
	if err := grant.Validate(); err != nil {
		return nil, err
	}
	return &BearerGate{engine: engine, grant: grant, realm: realm}, nil
}

// Admission is what Admit did with one request.
type Admission struct {
	// Minted is the exchanged token (nil on refusal).
	Minted *Minted
	// Token is the inbound token, when one was found: for its hash in logs,
	// never to be logged itself.
	Token string
	// Err is the refusal (nil on success).
	Err *Error
	// RemovedTxnToken tells that an outside Txn-Token header was dropped.
	RemovedTxnToken bool
}

// Admit runs the inbound side of the middleware on r. On success r carries
// only the minted token (Authorization: Bearer), every other copy of the
// inbound token is gone, and its form body (if inspected) is restored for
// the next handler.
func (g *BearerGate) Admit(r *http.Request, hooks AdmitHooks) Admission {
	var raw string
	var binding *Binding
	var err *Error
	if hooks.Credentials != nil {
		raw, binding, err = hooks.Credentials(r)
	} else {
		raw, err = ParseBearer(r)
	}
	if err != nil {
		return Admission{Token: raw, Err: err}
	}
	a := Admission{Token: raw}
	// The inbound token must not travel any further, nor be logged: drop
	// every other header that carries it, and request trailers (their values
	// arrive after this handler runs, so they cannot be inspected here).
	for name, values := range r.Header {
		for _, v := range values {
			if strings.Contains(v, raw) {
				r.Header.Del(name)
				break
			}
		}
	}
	r.Trailer = nil
	r.Header.Del("Trailer")
	// A Txn-Token from outside the trust domain is never trusted nor
	// forwarded: this route is the edge.
	if r.Header.Get("Txn-Token") != "" {
		r.Header.Del("Txn-Token")
		a.RemovedTxnToken = true
	}
	form, err := formBody(r)
	if err != nil {
		a.Err = err
		return a
	}
	var info *RequestInfo
	if g.grant.Rules != nil {
		info = RequestInfoOf(r)
	}
	exchangeFn := hooks.Exchange
	if exchangeFn == nil {
		exchangeFn = func(raw string, binding *Binding, info *RequestInfo) (*Minted, error) {
			return g.engine.ExchangePresented(r.Context(), raw, binding, g.grant, info)
		}
	}
	minted, xerr := exchangeFn(raw, binding, info)
	if xerr != nil {
		a.Err = AsError(xerr)
		return a
	}
	// A valid token must not travel in the URI or a form body either, in
	// any encoding (checked once it is known to be a real token, so short
	// junk cannot match a path).
	if carriesToken(r.URL.EscapedPath(), raw) || carriesToken(r.URL.RawQuery, raw) {
		a.Err = &Error{Kind: KindInvalidRequest, Reason: "token_in_uri",
			Description: "the bearer token must not appear in the request URI"}
		return a
	}
	if form != nil && carriesToken(string(form), raw) {
		a.Err = &Error{Kind: KindInvalidRequest, Reason: "token_in_body",
			Description: "the bearer token must not appear in the request body"}
		return a
	}
	if hooks.Accepted != nil {
		if a.Err = hooks.Accepted(); a.Err != nil {
			return a
		}
	}
	r.Header.Set("Authorization", "Bearer "+minted.Token)
	a.Minted = minted
	return a
}

// BearerStatus maps a refusal to its RFC 6750 answer: the HTTP status and
// the error code of the challenge ("" for none). It is the one mapping of
// the middleware; the token endpoint's is OAuthError.
func BearerStatus(e *Error) (status int, code string) {
	switch e.Kind {
	case KindMissingToken:
		// RFC 6750 §3.1: no error code when the request carried no credentials.
		return http.StatusUnauthorized, ""
	case KindInvalidRequest:
		if e.Status != 0 {
			return e.Status, "invalid_request"
		}
		return http.StatusBadRequest, "invalid_request"
	case KindInsufficientScope, KindDenied:
		// RFC 6750 has no code for a policy denial; insufficient_scope is
		// the closest and keeps clients within the standard vocabulary.
		return http.StatusForbidden, "insufficient_scope"
	case KindServer:
		return http.StatusInternalServerError, ""
	case KindUnavailable:
		if e.Status != 0 {
			return e.Status, "" // 502: a dependency rejected the gateway itself
		}
		return http.StatusServiceUnavailable, ""
	case KindInvalidDPoPProof:
		return http.StatusUnauthorized, "invalid_dpop_proof"
	case KindUseDPoPNonce:
		return http.StatusUnauthorized, "use_dpop_nonce"
	default:
		return http.StatusUnauthorized, "invalid_token"
	}
}

// Refuse writes the RFC 6750 §3 answer to a refusal: a challenge for 4xx,
// Retry-After for 503, a bare status for 500. A 4xx carries a short JSON
// body with the same error and description as the challenge (so `curl -s`
// shows why); it never echoes a token.
func (g *BearerGate) Refuse(w http.ResponseWriter, r *http.Request, e *Error) {
	status, code := BearerStatus(e)
	switch status {
	case http.StatusInternalServerError:
		w.WriteHeader(status)
		return
	case http.StatusServiceUnavailable, http.StatusBadGateway:
		SetRetryAfter(w, e)
		w.WriteHeader(status)
		return
	}
	realm := g.realm
	if realm == "" {
		realm = r.Host
	}
	challenge := `Bearer realm="` + QuoteSafe(realm) + `"`
	if code != "" {
		challenge += `, error="` + code + `", error_description="` + QuoteSafe(e.Description) + `"`
	}
	switch {
	case len(g.ChallengeScope) > 0 && (status == http.StatusUnauthorized || e.Kind == KindInsufficientScope):
		challenge += `, scope="` + QuoteSafe(FormatScope(g.ChallengeScope)) + `"`
	case e.Kind == KindInsufficientScope && len(g.grant.RequireScopes) > 0:
		challenge += `, scope="` + QuoteSafe(FormatScope(g.grant.RequireScopes)) + `"`
	}
	if g.ResourceMetadata != "" {
		challenge += `, resource_metadata="` + QuoteSafe(g.ResourceMetadata) + `"`
	}
	if g.Challenge != nil {
		g.Challenge(w, r, challenge, realm, code, e)
	} else {
		w.Header().Set("WWW-Authenticate", challenge)
	}
	writeRefusalBody(w, status, code, e.Description)
}

// writeRefusalBody writes the status and a small JSON body:
// {"error":"invalid_token","error_description":"..."}.
func writeRefusalBody(w http.ResponseWriter, status int, code, description string) {
	if code == "" {
		code = "unauthorized"
	}
	body, _ := json.Marshal(struct {
		Error       string `json:"error"`
		Description string `json:"error_description,omitempty"`
	}{code, description})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n'))
}

// Wrap is the gate as a complete net/http middleware, for hosts other than
// Caddy and for tests.
func (g *BearerGate) Wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if a := g.Admit(r, AdmitHooks{}); a.Err != nil {
			g.Refuse(w, r, a.Err)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// RequestInfoOf describes a request for policy rules. Credentials are left
// out, so no rule can copy the inbound token into a claim.
func RequestInfoOf(r *http.Request) *RequestInfo {
	headers := make(map[string][]string, len(r.Header))
	for name, values := range r.Header {
		switch name {
		case "Authorization", "Proxy-Authorization", "Cookie":
			continue
		}
		headers[name] = values
	}
	return &RequestInfo{Method: r.Method, Host: r.Host, Path: r.URL.Path, RemoteIP: RemoteIP(r), Headers: headers}
}

// RemoteIP is the address of the connection's peer.
func RemoteIP(r *http.Request) string {
	remote, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return remote
}

// LoggablePath is the request path for a log line, unless it carries the
// token (in any encoding): a token must never reach the logs.
func LoggablePath(r *http.Request, token string) string {
	if token != "" && carriesToken(r.URL.EscapedPath(), token) {
		return "[path carries the token: not logged]"
	}
	return r.URL.Path
}

// SetRetryAfter sets Retry-After (whole seconds, at least 1) for a 503.
func SetRetryAfter(w http.ResponseWriter, e *Error) {
	secs := int((e.RetryAfter + time.Second - 1) / time.Second)
	w.Header().Set("Retry-After", strconv.Itoa(max(1, secs)))
}

// ParseBearer extracts the RFC 6750 §2.1 bearer token. It accepts exactly
// one Authorization header with the Bearer scheme; tokens in the query are
// refused rather than ignored, so they cannot slip through to the upstream.
func ParseBearer(r *http.Request) (string, *Error) {
	// Without a '%', a key that decodes to access_token must be spelled
	// out: most requests skip parsing the query.
	if q := r.URL.RawQuery; (strings.Contains(q, "access_token") || strings.Contains(q, "%")) && r.URL.Query().Has("access_token") {
		return "", &Error{Kind: KindInvalidRequest, Reason: "token_in_query",
			Description: "access tokens in the URI query are not accepted; use the Authorization header"}
	}
	values := r.Header.Values("Authorization")
	switch len(values) {
	case 0:
		return "", &Error{Kind: KindMissingToken, Reason: "missing_token", Description: "no bearer token"}
	case 1:
	default:
		return "", &Error{Kind: KindInvalidRequest, Reason: "multiple_authorization",
			Description: "more than one Authorization header"}
	}
	scheme, token, ok := strings.Cut(strings.TrimSpace(values[0]), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", &Error{Kind: KindMissingToken, Reason: "missing_token", Description: "no bearer token"}
	}
	token = strings.TrimSpace(token)
	if token == "" {
		return "", &Error{Kind: KindInvalidToken, Reason: "malformed", Description: "empty bearer token"}
	}
	return token, nil
}

// maxInspectedForm is the largest form body the middleware reads to look
// for a token in it; a larger one beside a bearer header is refused (413).
const maxInspectedForm = 64 << 10

// formBody reads an application/x-www-form-urlencoded request body (at most
// maxInspectedForm bytes) and puts it back for the upstream. RFC 6750 §2.2
// (the access_token body parameter) is a method we do not accept: a form
// carrying one is refused, so a token sent beside the header never reaches
// the upstream. Other bodies are not read (nil, nil).
func formBody(r *http.Request) ([]byte, *Error) {
	if r.Body == nil || r.Body == http.NoBody {
		return nil, nil
	}
	mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if mt != "application/x-www-form-urlencoded" {
		return nil, nil
	}
	if r.ContentLength > maxInspectedForm {
		return nil, &Error{Kind: KindInvalidRequest, Reason: "form_too_large", Status: http.StatusRequestEntityTooLarge,
			Description: fmt.Sprintf("a form body beside a bearer token may hold at most %d bytes", maxInspectedForm)}
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxInspectedForm+1))
	if err != nil {
		return nil, &Error{Kind: KindInvalidRequest, Reason: "body", Description: "the request body could not be read"}
	}
	if len(body) > maxInspectedForm {
		return nil, &Error{Kind: KindInvalidRequest, Reason: "form_too_large", Status: http.StatusRequestEntityTooLarge,
			Description: fmt.Sprintf("a form body beside a bearer token may hold at most %d bytes", maxInspectedForm)}
	}
	_ = r.Body.Close()
	r.Body = io.NopCloser(bytes.NewReader(body))
	// Every key, as a lenient form parser would read it (& or ; between
	// pairs, percent-decoded), so no spelling slips past.
	if slices.ContainsFunc(strings.FieldsFunc(string(body), func(r rune) bool { return r == '&' || r == ';' }), func(pair string) bool {
		key, _, _ := strings.Cut(pair, "=")
		return strings.TrimSpace(percentDecode(key)) == "access_token"
	}) {
		return nil, &Error{Kind: KindInvalidRequest, Reason: "token_in_body",
			Description: "access tokens in a form body are not accepted; use the Authorization header"}
	}
	return body, nil
}

// carriesToken tells whether s holds the token, literally or percent-encoded
// (up to three layers deep, each decoded leniently: a stray % cannot hide
// an encoded token behind a decoding error).
func carriesToken(s, token string) bool {
	for range 4 {
		if strings.Contains(s, token) {
			return true
		}
		d := percentDecode(s)
		if d == s {
			return false
		}
		s = d
	}
	return false
}

// percentDecode decodes every valid %XX (and + as space, for forms) and
// keeps anything else as it is.
func percentDecode(s string) string {
	if !strings.ContainsAny(s, "%+") {
		return s
	}
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '%' && i+2 < len(s) && isHex(s[i+1]) && isHex(s[i+2]):
			b = append(b, unhex(s[i+1])<<4|unhex(s[i+2]))
			i += 2
		case c == '+':
			b = append(b, ' ')
		default:
			b = append(b, c)
		}
	}
	return string(b)
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case '0' <= c && c <= '9':
		return c - '0'
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10
	default:
		return c - 'A' + 10
	}
}

// quoteSafe keeps a value within an RFC 6750 quoted-string: printable ASCII
// without `"` or `\`.
func QuoteSafe(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e || r == '"' || r == '\\' {
			return -1
		}
		return r
	}, s)
}
