package exchange

import (
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"net/url"
	"strconv"
)

// DefaultMaxRequestBody caps a token endpoint request body.
const DefaultMaxRequestBody = 64 << 10

// TokenEndpoint is the RFC 8693 token endpoint over plain net/http, served by
// the same engine as the middleware. It authenticates the client before it
// parses anything else of the request, and answers RFC 6749 §5.2 JSON errors
// with the codes of RFC 8693 §2.2.2. Hosts add logs and metrics through
// OnOutcome.
type TokenEndpoint struct {
	Engine  *Engine
	Clients *Clients
	// Realm of the Basic challenge (RFC 6749 §5.2), usually the issuer.
	Realm string
	// MaxRequestBody caps the body in bytes (default DefaultMaxRequestBody).
	MaxRequestBody int64
	// OnOutcome, if set, is told of every answer (for logs and metrics).
	OnOutcome func(r *http.Request, o *EndpointOutcome)
	// Binding, if set, reads what the request proves about its sender (a
	// DPoP proof to this endpoint, the TLS client certificate) once the
	// client is authenticated; bound subject tokens need it.
	Binding func(w http.ResponseWriter, r *http.Request) (*Binding, *Error)
	// Txn, if set, lets the endpoint issue Transaction Tokens
	// (requested_token_type txn_token); nil refuses them.
	Txn *TxnEndpointConfig
}

// EndpointOutcome describes one answer of the token endpoint, for the
// host's audit log. It never holds a secret or a token.
type EndpointOutcome struct {
	// Status and Code are what was answered (Code "" on success).
	Status int
	Code   string
	// Err is the refusal (nil on success).
	Err *Error
	// Client is the authenticated client (nil if authentication failed or
	// did not happen); ClaimedClientID is what a failed attempt named.
	Client          *AuthenticatedClient
	ClaimedClientID string
	// SubjectTokenHash is the SHA-256 of the subject token, once parsed.
	SubjectTokenHash string
	// Issued is the answer on success.
	Issued *Issued
}

// OAuthError maps a failure to its RFC 6749 §5.2 / RFC 8693 §2.2.2 code and
// HTTP status: the one mapping of the token endpoint (the middleware's is
// BearerStatus).
func OAuthError(e *Error) (code string, status int) {
	switch e.Kind {
	case KindInvalidClient:
		return "invalid_client", http.StatusUnauthorized
	case KindUnauthorizedClient:
		return "unauthorized_client", http.StatusBadRequest
	case KindUnsupportedGrantType:
		return "unsupported_grant_type", http.StatusBadRequest
	case KindInvalidTarget:
		return "invalid_target", http.StatusBadRequest
	case KindInvalidScope, KindInsufficientScope:
		return "invalid_scope", http.StatusBadRequest
	case KindServer:
		return "server_error", http.StatusInternalServerError
	case KindUnavailable:
		return "temporarily_unavailable", http.StatusServiceUnavailable
	case KindInvalidDPoPProof:
		return "invalid_dpop_proof", http.StatusBadRequest
	case KindUseDPoPNonce:
		return "use_dpop_nonce", http.StatusBadRequest
	default:
		if e.Status != 0 {
			return "invalid_request", e.Status
		}
		return "invalid_request", http.StatusBadRequest
	}
}

// ServeHTTP serves one token request.
func (t *TokenEndpoint) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// Token responses and errors are never cached (RFC 6749 §5.1).
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Pragma", "no-cache")
	o := &EndpointOutcome{}
	t.serve(w, r, o)
	if t.OnOutcome != nil {
		t.OnOutcome(r, o)
	}
}

func (t *TokenEndpoint) serve(w http.ResponseWriter, r *http.Request, o *EndpointOutcome) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		t.Fail(w, o, &Error{Kind: KindInvalidRequest, Reason: "method", Status: http.StatusMethodNotAllowed,
			Description: "the token endpoint accepts only POST"})
		return
	}
	mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if mt != "application/x-www-form-urlencoded" {
		t.Fail(w, o, badRequest("content_type", "the request must be application/x-www-form-urlencoded"))
		return
	}
	limit := t.MaxRequestBody
	if limit <= 0 {
		limit = DefaultMaxRequestBody
	}
	r.Body = http.MaxBytesReader(w, r.Body, limit)
	if err := r.ParseForm(); err != nil {
		var tooLarge *http.MaxBytesError
		desc := "the request body is not a valid form"
		if errors.As(err, &tooLarge) {
			desc = fmt.Sprintf("the request body exceeds %d bytes", limit)
		}
		t.Fail(w, o, badRequest("body", desc))
		return
	}

	// Only the body counts: parameters in the URI are not part of an RFC
	// 8693 request, and a token there would end up in access logs. The
	// client authenticates first: nothing else of the request is parsed
	// for an anonymous caller.
	cred, err := ParseClientCredentials(r.PostForm)
	if err != nil {
		t.Fail(w, o, AsError(err))
		return
	}
	cred.BasicUser, cred.BasicPass, cred.HasBasic = r.BasicAuth()
	o.ClaimedClientID = claimedClientID(cred)
	basicChallenge := `Basic realm="` + QuoteSafe(t.Realm) + `", charset="UTF-8"`
	if !cred.HasBasic && r.Header.Get("Authorization") != "" {
		// RFC 6749 §5.2: a client that tried the Authorization header gets
		// 401 and a challenge naming the scheme we support.
		w.Header().Set("WWW-Authenticate", basicChallenge)
		t.Fail(w, o, &Error{Kind: KindInvalidClient, Reason: "auth_scheme", Description: authFailed})
		return
	}
	client, err := t.Clients.Authenticate(r.Context(), cred)
	if err != nil {
		e := AsError(err)
		if BasicAuthAttempted(err) && e.Kind == KindInvalidClient {
			w.Header().Set("WWW-Authenticate", basicChallenge)
		}
		t.Fail(w, o, e)
		return
	}
	o.Client = client
	req, err := ParseTokenRequest(r.PostForm)
	if err != nil {
		t.Fail(w, o, AsError(err))
		return
	}
	o.SubjectTokenHash = HashToken(req.SubjectToken)
	if t.Binding != nil {
		var berr *Error
		if req.Binding, berr = t.Binding(w, r); berr != nil {
			t.Fail(w, o, berr)
			return
		}
	}
	var issued *Issued
	if req.RequestedTokenType == TokenTypeTxnToken {
		req.SelfSigned = t.Clients.VerifySelfSigned
		issued, err = t.Engine.TxnTokenExchange(r.Context(), req, client, t.Txn)
	} else {
		issued, err = t.Engine.TokenExchange(r.Context(), req, client)
	}
	if err != nil {
		t.Fail(w, o, AsError(err))
		return
	}
	o.Issued, o.Status = issued, http.StatusOK
	writeJSON(w, http.StatusOK, issued)
}

// Fail writes the RFC 6749 §5.2 answer to e and records it in o.
func (t *TokenEndpoint) Fail(w http.ResponseWriter, o *EndpointOutcome, e *Error) {
	code, status := OAuthError(e)
	o.Err, o.Code, o.Status = e, code, status
	if e.Kind == KindUnavailable {
		SetRetryAfter(w, e)
	}
	// RFC 6749 §5.2 limits error_description to printable ASCII without " or \.
	writeJSON(w, status, map[string]string{"error": code, "error_description": QuoteSafe(e.Description)})
}

// claimedClientID is the client_id a request named, for the log: the
// body's client_id, else the Basic user. Never a secret.
func claimedClientID(cred ClientCredentials) string {
	if cred.PostID != "" {
		return cred.PostID
	}
	if id, err := url.QueryUnescape(cred.BasicUser); err == nil {
		return id
	}
	return ""
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// MetadataConfig is what the RFC 8414 document of the gateway's STS names.
type MetadataConfig struct {
	Issuer, TokenEndpoint, JWKSURI string
	// ScopesSupported is published as is; empty: not published (client
	// scopes are private).
	ScopesSupported []string
}

// Metadata is the RFC 8414 authorization server metadata document.
func Metadata(cfg MetadataConfig, clients *Clients) map[string]any {
	methods := clients.AuthMethods()
	doc := map[string]any{
		"issuer":                                cfg.Issuer,
		"token_endpoint":                        cfg.TokenEndpoint,
		"jwks_uri":                              cfg.JWKSURI,
		"grant_types_supported":                 []string{GrantTypeTokenExchange},
		"response_types_supported":              []string{}, // no authorization endpoint
		"token_endpoint_auth_methods_supported": methods,
	}
	// Signing algorithms of client assertions mean something only when a
	// client authenticates with private_key_jwt.
	for _, m := range methods {
		if m == ClientAuthPrivateKeyJWT {
			doc["token_endpoint_auth_signing_alg_values_supported"] = VerifyAlgorithms()
		}
	}
	if len(cfg.ScopesSupported) > 0 {
		doc["scopes_supported"] = cfg.ScopesSupported
	}
	return doc
}
