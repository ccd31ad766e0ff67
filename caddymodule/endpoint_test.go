package caddymodule

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"
	"golang.org/x/crypto/bcrypt"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// The token endpoint is served on the same port as the middleware tests'
// gateway; its issuer is the very base URL the tests call, so token_endpoint
// and jwks_uri default to URLs that work.
var (
	stsBase     = fmt.Sprintf("http://localhost:%d", gatewayPort)
	stsTokenURL = stsBase + "/oauth2/token"
	stsJWKSURL  = stsBase + "/.well-known/jwks.json"
)

const (
	tokenExchangeGrant = "urn:ietf:params:oauth:grant-type:token-exchange"
	urnAccessToken     = "urn:ietf:params:oauth:token-type:access_token"
	urnRefreshToken    = "urn:ietf:params:oauth:token-type:refresh_token"
	urnIDToken         = "urn:ietf:params:oauth:token-type:id_token"
	urnJWT             = "urn:ietf:params:oauth:token-type:jwt"
	urnSAML2           = "urn:ietf:params:oauth:token-type:saml2"

	audOrders  = "https://orders.internal"
	audBilling = "https://billing.internal"
	resOrders  = "https://api.example/orders"

	// Clients of the STS under test.
	secretClient = "orders-svc" // client_secret_basic / client_secret_post
	secretValue  = "orders-svc-secret: with spaces & symbols/+%"
	keyClient    = "key-svc" // private_key_jwt, jwks_file
	impClient    = "imp-svc" // secret, may_impersonate
	impSecret    = "imp-svc-secret"
	noAudClient  = "noaud-svc" // secret, no audience or resource configured
	noAudSecret  = "noaud-svc-secret"
)

// sts is a real Caddy serving the RFC 8693 token endpoint, the JWKS and the
// RFC 8414 metadata, with a real IdP whose tokens it trusts.
type sts struct {
	tester    *caddytest.Tester
	idp       *testidp.Issuer
	logFile   string
	clientKey *ecdsa.PrivateKey // key-svc's private_key_jwt key
	clientKid string
}

// stsOptions tunes startSTS.
type stsOptions struct {
	// trustSelf adds a trust block for the STS's own issuer, so its minted
	// tokens can be exchanged again.
	trustSelf bool
}

func bcryptHash(t *testing.T, secret string) string {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte(secret), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	return string(h)
}

// newClientKey generates an ES256 key and writes its public JWKS to a file.
func newClientKey(t *testing.T, kid string) (*ecdsa.PrivateKey, string) {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := jwk.Import(priv.Public())
	if err != nil {
		t.Fatal(err)
	}
	_ = pub.Set(jwk.KeyIDKey, kid)
	_ = pub.Set(jwk.AlgorithmKey, jwa.ES256())
	_ = pub.Set(jwk.KeyUsageKey, "sig")
	set := jwk.NewSet()
	if err := set.AddKey(pub); err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(set)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "client-jwks.json")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return priv, path
}

// startSTS runs real Caddy in-process with the token endpoint, the JWKS and
// the metadata document.
func startSTS(t *testing.T, opts stsOptions) *sts {
	t.Helper()
	idp := newTestIdP(t, "https://idp.test")
	clientKey, jwksFile := newClientKey(t, "key-svc-1")
	f := newCaddyFixture(t)
	selfTrust := ""
	if opts.trustSelf {
		selfTrust = fmt.Sprintf(`trust %s {
			jwks_url %s
			audience %s %s
			algorithms ES256
			refetch_interval 1s
		}`, stsBase, stsJWKSURL, audOrders, audBilling)
	}
	config := fmt.Sprintf(`{
%s	token_exchange {
		issuer %s
		trust https://idp.test {
			jwks_url %s
			audience https://gateway.test
			algorithms RS256 ES256
			refetch_interval 1h
		}
		%s
		client %s {
			secret_hash %s
			audience %s %s
			resource %s
			scope orders.read orders.write billing.read
		}
		client %s {
			jwks_file %s
			audience %s
			scope orders.read
		}
		client %s {
			secret_hash %s
			audience %s
			scope orders.read
			may_impersonate
		}
		client %s {
			secret_hash %s
		}
	}
}
http://localhost:%d {
	handle /oauth2/token {
		token_exchange_endpoint
	}
	handle /.well-known/jwks.json {
		token_exchange_jwks
	}
	handle /.well-known/oauth-authorization-server {
		token_exchange_metadata
	}
	handle /.well-known/openid-configuration {
		token_exchange_metadata
	}
}
`, f.globals(), stsBase, idp.JWKSURL(), selfTrust,
		secretClient, bcryptHash(t, secretValue), audOrders, audBilling, resOrders,
		keyClient, jwksFile, audOrders,
		impClient, bcryptHash(t, impSecret), audOrders,
		noAudClient, bcryptHash(t, noAudSecret),
		gatewayPort)
	g := f.start(t, config, idp, nil)
	return &sts{tester: g.tester, idp: idp, logFile: g.logFile, clientKey: clientKey, clientKid: "key-svc-1"}
}

// stsResponse is one answer of the token endpoint.
type stsResponse struct {
	status int
	header http.Header
	raw    []byte
	body   map[string]any
}

func (r *stsResponse) str(name string) string {
	s, _ := r.body[name].(string)
	return s
}

// do sends a request to the token endpoint. form is the body; setup may
// change the request (method, headers) before it is sent.
func (s *sts) do(t *testing.T, method, body, contentType string, setup func(*http.Request)) *stsResponse {
	t.Helper()
	req, err := http.NewRequest(method, stsTokenURL, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	if setup != nil {
		setup(req)
	}
	resp, err := s.tester.Client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	out := &stsResponse{status: resp.StatusCode, header: resp.Header, raw: raw}
	if err := json.Unmarshal(raw, &out.body); err != nil {
		t.Fatalf("status %d: body is not a JSON object: %v: %q", resp.StatusCode, err, raw)
	}
	return out
}

// post sends form as application/x-www-form-urlencoded.
func (s *sts) post(t *testing.T, form url.Values, setup func(*http.Request)) *stsResponse {
	t.Helper()
	return s.do(t, http.MethodPost, form.Encode(), "application/x-www-form-urlencoded", setup)
}

// basicAuth sets client_secret_basic credentials, form-urlencoded first as
// RFC 6749 §2.3.1 requires.
func basicAuth(id, secret string) func(*http.Request) {
	return func(r *http.Request) { r.SetBasicAuth(url.QueryEscape(id), url.QueryEscape(secret)) }
}

// assertion builds a private_key_jwt client assertion (RFC 7523) with jwx.
// edit may change the claims before signing.
func (s *sts) assertion(t *testing.T, edit func(jwt.Token)) string {
	t.Helper()
	return signAssertion(t, s.clientKey, s.clientKid, keyClient, stsTokenURL, edit)
}

func signAssertion(t *testing.T, key *ecdsa.PrivateKey, kid, clientID, aud string, edit func(jwt.Token)) string {
	t.Helper()
	now := time.Now()
	var jti [16]byte
	_, _ = rand.Read(jti[:])
	tok, err := jwt.NewBuilder().
		Issuer(clientID).
		Subject(clientID).
		Audience([]string{aud}).
		IssuedAt(now).
		Expiration(now.Add(time.Minute)).
		JwtID(base64.RawURLEncoding.EncodeToString(jti[:])).
		Build()
	if err != nil {
		t.Fatal(err)
	}
	if edit != nil {
		edit(tok)
	}
	hdr := jws.NewHeaders()
	_ = hdr.Set(jws.KeyIDKey, kid)
	signed, err := jwt.Sign(tok, jwt.WithKey(jwa.ES256(), key, jws.WithProtectedHeaders(hdr)))
	if err != nil {
		t.Fatal(err)
	}
	return string(signed)
}

// exchangeForm is a valid token-exchange request for subject, edited by the
// key/value pairs in kv ("" removes a parameter; a parameter given twice in kv
// is sent twice).
func exchangeForm(subject string, kv ...string) url.Values {
	f := url.Values{
		"grant_type":         {tokenExchangeGrant},
		"subject_token":      {subject},
		"subject_token_type": {urnAccessToken},
	}
	overridden := map[string]bool{}
	for i := 0; i+1 < len(kv); i += 2 {
		k, v := kv[i], kv[i+1]
		if !overridden[k] {
			overridden[k] = true
			f.Del(k)
		}
		if v != "" {
			f.Add(k, v)
		}
	}
	return f
}

// assertOAuthError checks an RFC 6749 §5.2 error answer: status, code,
// no-store, JSON, and that nothing was issued.
func assertOAuthError(t *testing.T, r *stsResponse, status int, code string, secrets ...string) {
	t.Helper()
	if r.status != status || r.str("error") != code {
		t.Fatalf("got %d %q (%s), want %d %q", r.status, r.str("error"), r.str("error_description"), status, code)
	}
	if cc := r.header.Get("Cache-Control"); cc != "no-store" {
		t.Errorf("Cache-Control %q, want no-store", cc)
	}
	if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("Content-Type %q", ct)
	}
	for _, k := range []string{"access_token", "refresh_token", "issued_token_type", "token_type"} {
		if _, ok := r.body[k]; ok {
			t.Errorf("error answer carries %s", k)
		}
	}
	desc, ok := r.body["error_description"].(string)
	if !ok {
		t.Errorf("no error_description: %s", r.raw)
	}
	// RFC 6749 §5.2: error_description MUST NOT include characters outside
	// %x20-21 / %x23-5B / %x5D-7E (no quote, no backslash, ASCII only).
	for i := 0; i < len(desc); i++ {
		if c := desc[i]; c < 0x20 || c > 0x7e || c == '"' || c == '\\' {
			t.Errorf("error_description %q has %q, outside the RFC 6749 section 5.2 character set", desc, c)
			break
		}
	}
	for _, sec := range secrets {
		if len(sec) >= 16 && strings.Contains(string(r.raw), sec) {
			t.Errorf("error answer echoes a token or secret")
		}
	}
}

// verifyMinted checks an issued token the way a resource server would: against
// the STS's JWKS fetched over HTTP.
func (s *sts) verifyMinted(t *testing.T, token string, wantAud ...string) jwt.Token {
	t.Helper()
	set := (&gateway{tester: s.tester}).gatewayJWKS(t)
	opts := []jwt.ParseOption{jwt.WithKeySet(set, jws.WithRequireKid(true)), jwt.WithIssuer(stsBase)}
	for _, a := range wantAud {
		opts = append(opts, jwt.WithAudience(a))
	}
	tok, err := jwt.Parse([]byte(token), opts...)
	if err != nil {
		t.Fatalf("issued token does not verify against the STS JWKS: %v", err)
	}
	msg, err := jws.Parse([]byte(token))
	if err != nil {
		t.Fatal(err)
	}
	if typ, _ := msg.Signatures()[0].ProtectedHeaders().Type(); typ != "at+jwt" {
		t.Errorf("typ %q, want at+jwt", typ)
	}
	if aud, _ := tok.Audience(); len(aud) != len(wantAud) {
		t.Errorf("aud %v, want %v", aud, wantAud)
	}
	for _, k := range []string{"exp", "iat", "jti"} {
		if !tok.Has(k) {
			t.Errorf("issued token has no %s", k)
		}
	}
	return tok
}

// claimMap returns a JSON object claim (nil when absent).
func claimMap(t *testing.T, tok jwt.Token, name string) map[string]any {
	t.Helper()
	if !tok.Has(name) {
		return nil
	}
	var m map[string]any
	if err := tok.Get(name, &m); err != nil {
		t.Fatalf("claim %s: %v", name, err)
	}
	return m
}

func claimString(tok jwt.Token, name string) string {
	var s string
	_ = tok.Get(name, &s)
	return s
}

// assertIssued checks an RFC 8693 §2.2.1 success answer and returns the
// verified token.
func (s *sts) assertIssued(t *testing.T, r *stsResponse, wantIssuedType, wantTokenType string, wantAud ...string) jwt.Token {
	t.Helper()
	if r.status != http.StatusOK {
		t.Fatalf("status %d: %s", r.status, r.raw)
	}
	if cc := r.header.Get("Cache-Control"); cc != "no-store" {
		t.Errorf("Cache-Control %q, want no-store", cc)
	}
	if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("Content-Type %q", ct)
	}
	if got := r.str("issued_token_type"); got != wantIssuedType {
		t.Errorf("issued_token_type %q, want %q", got, wantIssuedType)
	}
	if got := r.str("token_type"); got != wantTokenType {
		t.Errorf("token_type %q, want %q", got, wantTokenType)
	}
	if exp, ok := r.body["expires_in"].(float64); !ok || exp <= 0 || exp > 300 {
		t.Errorf("expires_in %v, want in (0, 300]", r.body["expires_in"])
	}
	if _, ok := r.body["refresh_token"]; ok {
		t.Error("a refresh token was issued")
	}
	if _, ok := r.body["error"]; ok {
		t.Errorf("success carries error %v", r.body["error"])
	}
	at := r.str("access_token")
	if at == "" {
		t.Fatalf("no access_token: %s", r.raw)
	}
	return s.verifyMinted(t, at, wantAud...)
}

func TestEndpointRefusals(t *testing.T) {
	s := startSTS(t, stsOptions{})
	idp := s.idp
	now := time.Now()
	subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read orders.write"})
	actor := idp.Token("rsa-1", testidp.Claims{"sub": "bob"})
	other := testidp.New(t, "https://evil.test")
	other.AddKey("ec-1", "ES256")
	nonePayload := map[string]any{"iss": "https://idp.test", "sub": "alice", "aud": "https://gateway.test",
		"exp": now.Add(time.Minute).Unix(), "iat": now.Unix(), "scope": "orders.read"}
	basic := basicAuth(secretClient, secretValue)
	// A token sent in the URI may show up in Caddy's own request logs: it
	// is kept out of the log scan below.
	queryToken := idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "jti": "query"})
	big := exchangeForm(subject, "padding", strings.Repeat("a", 70<<10))

	type tc struct {
		name   string
		method string // default POST
		ctype  string // default form
		body   string // default form.Encode()
		form   url.Values
		setup  func(*http.Request)
		status int
		code   string
		check  func(t *testing.T, r *stsResponse)
	}
	cases := []tc{
		// Transport (issue 3: only POST, only form-urlencoded, body capped).
		{name: "GET", method: http.MethodGet, form: exchangeForm(subject), setup: basic, status: 405, code: "invalid_request",
			check: func(t *testing.T, r *stsResponse) {
				if a := r.header.Get("Allow"); a != "POST" {
					t.Errorf("Allow %q, want POST", a)
				}
			}},
		{name: "PUT", method: http.MethodPut, form: exchangeForm(subject), setup: basic, status: 405, code: "invalid_request",
			check: func(t *testing.T, r *stsResponse) {
				if a := r.header.Get("Allow"); a != "POST" {
					t.Errorf("Allow %q, want POST", a)
				}
			}},
		{name: "JSON content type", ctype: "application/json",
			body:  `{"grant_type":"` + tokenExchangeGrant + `","subject_token":"` + subject + `","subject_token_type":"` + urnAccessToken + `"}`,
			setup: basic, status: 400, code: "invalid_request"},
		{name: "no content type", ctype: "-", form: exchangeForm(subject), setup: basic, status: 400, code: "invalid_request"},
		{name: "multipart content type", ctype: "multipart/form-data; boundary=x", form: exchangeForm(subject), setup: basic, status: 400, code: "invalid_request"},
		{name: "body over 64 KiB", form: big, setup: basic, status: 400, code: "invalid_request"},
		{name: "parameters in the query only", body: "-", setup: func(r *http.Request) {
			r.URL.RawQuery = exchangeForm(queryToken).Encode()
			basic(r)
		}, status: 400, code: "invalid_request"},

		// Parameters (RFC 8693 §2.1).
		{name: "missing grant_type", form: exchangeForm(subject, "grant_type", ""), setup: basic, status: 400, code: "invalid_request"},
		{name: "other grant_type", form: exchangeForm(subject, "grant_type", "client_credentials"), setup: basic, status: 400, code: "unsupported_grant_type"},
		{name: "jwt-bearer grant_type", form: exchangeForm(subject, "grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), setup: basic, status: 400, code: "unsupported_grant_type"},
		{name: "missing subject_token", form: exchangeForm(subject, "subject_token", ""), setup: basic, status: 400, code: "invalid_request"},
		{name: "missing subject_token_type", form: exchangeForm(subject, "subject_token_type", ""), setup: basic, status: 400, code: "invalid_request"},
		{name: "unknown subject_token_type URN", form: exchangeForm(subject, "subject_token_type", "urn:example:token-type:magic"), setup: basic, status: 400, code: "invalid_request"},
		{name: "short subject_token_type name", form: exchangeForm(subject, "subject_token_type", "access_token"), setup: basic, status: 400, code: "invalid_request"},
		{name: "unknown actor_token_type URN", form: exchangeForm(subject, "actor_token", actor, "actor_token_type", "urn:example:token-type:magic"), setup: basic, status: 400, code: "invalid_request"},
		{name: "actor_token without actor_token_type", form: exchangeForm(subject, "actor_token", actor), setup: basic, status: 400, code: "invalid_request"},
		{name: "actor_token_type without actor_token", form: exchangeForm(subject, "actor_token_type", urnAccessToken), setup: basic, status: 400, code: "invalid_request"},
		{name: "repeated scope", form: exchangeForm(subject, "scope", "orders.read", "scope", "orders.write"), setup: basic, status: 400, code: "invalid_request"},
		{name: "repeated subject_token", form: exchangeForm(subject, "subject_token", subject, "subject_token", subject), setup: basic, status: 400, code: "invalid_request"},
		{name: "repeated subject_token_type", form: exchangeForm(subject, "subject_token_type", urnAccessToken, "subject_token_type", urnAccessToken), setup: basic, status: 400, code: "invalid_request"},
		{name: "repeated grant_type", form: exchangeForm(subject, "grant_type", tokenExchangeGrant, "grant_type", tokenExchangeGrant), setup: basic, status: 400, code: "invalid_request"},
		{name: "repeated requested_token_type", form: exchangeForm(subject, "requested_token_type", urnAccessToken, "requested_token_type", urnAccessToken), setup: basic, status: 400, code: "invalid_request"},
		{name: "repeated actor_token", form: exchangeForm(subject, "actor_token", actor, "actor_token", actor, "actor_token_type", urnAccessToken), setup: basic, status: 400, code: "invalid_request"},
		{name: "repeated client_id", form: exchangeForm(subject, "client_id", secretClient, "client_id", secretClient), setup: basic, status: 400, code: "invalid_request"},
		{name: "relative resource", form: exchangeForm(subject, "resource", "/orders"), setup: basic, status: 400, code: "invalid_target"},
		{name: "resource with fragment", form: exchangeForm(subject, "resource", resOrders+"#frag"), setup: basic, status: 400, code: "invalid_target"},
		{name: "resource scheme only", form: exchangeForm(subject, "resource", "https:"), setup: basic, status: 400, code: "invalid_target"},
		{name: "requested id_token", form: exchangeForm(subject, "requested_token_type", urnIDToken), setup: basic, status: 400, code: "invalid_request",
			check: func(t *testing.T, r *stsResponse) {
				d := r.str("error_description")
				if !strings.Contains(d, urnAccessToken) || !strings.Contains(d, urnJWT) {
					t.Errorf("error_description %q does not name the supported types", d)
				}
			}},
		{name: "requested refresh_token", form: exchangeForm(subject, "requested_token_type", urnRefreshToken), setup: basic, status: 400, code: "invalid_request"},
		{name: "requested saml2", form: exchangeForm(subject, "requested_token_type", urnSAML2), setup: basic, status: 400, code: "invalid_request"},
		{name: "requested unknown type", form: exchangeForm(subject, "requested_token_type", "urn:example:magic"), setup: basic, status: 400, code: "invalid_request"},
		{name: "malformed scope", form: exchangeForm(subject, "scope", `orders."read"`), setup: basic, status: 400, code: "invalid_scope"},

		// Targets: never silently dropped.
		{name: "audience not allowed", form: exchangeForm(subject, "audience", "https://payroll.internal"), setup: basic, status: 400, code: "invalid_target"},
		{name: "one audience of two not allowed", form: exchangeForm(subject, "audience", audOrders, "audience", "https://payroll.internal"), setup: basic, status: 400, code: "invalid_target"},
		{name: "resource not allowed", form: exchangeForm(subject, "resource", "https://api.example/payroll"), setup: basic, status: 400, code: "invalid_target"},
		{name: "audience with a quote and non-ASCII", form: exchangeForm(subject, "audience", `https://payroll.internal/"é"`), setup: basic, status: 400, code: "invalid_target"},
		{name: "audience allowed to another client", form: exchangeForm(subject, "audience", audBilling), setup: basicAuth(impClient, impSecret), status: 400, code: "invalid_target"},

		// Subject and actor tokens: invalid_request, never invalid_grant (RFC 8693 §2.2.2).
		{name: "expired subject token", form: exchangeForm(idp.Token("ec-1", testidp.Claims{"exp": now.Add(-time.Hour).Unix(), "scope": "orders.read"})), setup: basic, status: 400, code: "invalid_request"},
		{name: "wrong-issuer subject token", form: exchangeForm(other.Token("ec-1", testidp.Claims{"scope": "orders.read"})), setup: basic, status: 400, code: "invalid_request"},
		{name: "forged issuer subject token", form: exchangeForm(other.Token("ec-1", testidp.Claims{"iss": "https://idp.test", "scope": "orders.read"})), setup: basic, status: 400, code: "invalid_request"},
		{name: "alg none subject token", form: exchangeForm(testidp.RawToken(map[string]any{"alg": "none"}, nonePayload, nil)), setup: basic, status: 400, code: "invalid_request"},
		{name: "subject token for another audience", form: exchangeForm(idp.Token("ec-1", testidp.Claims{"aud": "https://other.test", "scope": "orders.read"})), setup: basic, status: 400, code: "invalid_request"},
		{name: "subject token without exp", form: exchangeForm(idp.Token("ec-1", testidp.Claims{"exp": nil, "scope": "orders.read"})), setup: basic, status: 400, code: "invalid_request"},
		{name: "garbage subject token", form: exchangeForm("not-a-jwt"), setup: basic, status: 400, code: "invalid_request"},
		{name: "refresh_token subject type", form: exchangeForm(subject, "subject_token_type", urnRefreshToken), setup: basic, status: 400, code: "invalid_request"},
		{name: "saml2 subject type", form: exchangeForm(subject, "subject_token_type", urnSAML2), setup: basic, status: 400, code: "invalid_request"},
		{name: "id_token subject type not accepted from this issuer", form: exchangeForm(subject, "subject_token_type", urnIDToken), setup: basic, status: 400, code: "invalid_request"},
		{name: "may_act names someone else", form: exchangeForm(idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "may_act": map[string]any{"sub": "someone-else"}})), setup: basic, status: 400, code: "invalid_request"},
		{name: "may_act names an unknown member", form: exchangeForm(idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "may_act": map[string]any{"email": "x@example.com"}})), setup: basic, status: 400, code: "invalid_request"},
		{name: "subject token with a duplicate claim", form: exchangeForm(testidp.B64([]byte(`{"alg":"ES256","kid":"ec-1"}`)) + "." +
			testidp.B64([]byte(fmt.Sprintf(`{"iss":"https://idp.test","sub":"alice","sub":"mallory","aud":"https://gateway.test","exp":%d}`, now.Add(time.Minute).Unix()))) + "." +
			testidp.B64(make([]byte, 64))), setup: basic, status: 400, code: "invalid_request"},
		{name: "may_act names someone other than the actor token", form: exchangeForm(idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "may_act": map[string]any{"sub": secretClient}}), "actor_token", actor, "actor_token_type", urnAccessToken), setup: basic, status: 400, code: "invalid_request"},
		{name: "expired actor token", form: exchangeForm(subject, "actor_token", idp.Token("rsa-1", testidp.Claims{"sub": "bob", "exp": now.Add(-time.Hour).Unix()}), "actor_token_type", urnAccessToken), setup: basic, status: 400, code: "invalid_request"},
		{name: "wrong-issuer actor token", form: exchangeForm(subject, "actor_token", other.Token("ec-1", testidp.Claims{"sub": "bob"}), "actor_token_type", urnAccessToken), setup: basic, status: 400, code: "invalid_request"},
		{name: "refresh_token actor type", form: exchangeForm(subject, "actor_token", actor, "actor_token_type", urnRefreshToken), setup: basic, status: 400, code: "invalid_request"},

		// Client authentication (RFC 6749 §2.3, RFC 7523).
		{name: "no client authentication", form: exchangeForm(subject), status: 401, code: "invalid_client"},
		{name: "client_id alone", form: exchangeForm(subject, "client_id", secretClient), status: 401, code: "invalid_client"},
		{name: "wrong secret via Basic", form: exchangeForm(subject), setup: basicAuth(secretClient, "wrong"), status: 401, code: "invalid_client",
			check: func(t *testing.T, r *stsResponse) {
				if c := r.header.Get("WWW-Authenticate"); !strings.HasPrefix(c, "Basic ") {
					t.Errorf("WWW-Authenticate %q, want a Basic challenge", c)
				}
			}},
		{name: "unknown client via Basic", form: exchangeForm(subject), setup: basicAuth("nobody", "whatever"), status: 401, code: "invalid_client",
			check: func(t *testing.T, r *stsResponse) {
				if c := r.header.Get("WWW-Authenticate"); !strings.HasPrefix(c, "Basic ") {
					t.Errorf("WWW-Authenticate %q, want a Basic challenge", c)
				}
			}},
		{name: "secret of another client via Basic", form: exchangeForm(subject), setup: basicAuth(secretClient, impSecret), status: 401, code: "invalid_client"},
		{name: "Basic for a private_key_jwt client", form: exchangeForm(subject), setup: basicAuth(keyClient, "anything"), status: 401, code: "invalid_client"},
		{name: "wrong secret via client_secret_post", form: exchangeForm(subject, "client_id", secretClient, "client_secret", "wrong"), status: 401, code: "invalid_client"},
		{name: "client_secret without client_id", form: exchangeForm(subject, "client_secret", secretValue), status: 400, code: "invalid_request"},
		{name: "Basic and client_secret_post", form: exchangeForm(subject, "client_id", secretClient, "client_secret", secretValue), setup: basic, status: 400, code: "invalid_request"},
		{name: "Basic and private_key_jwt", form: exchangeForm(subject, "client_assertion", s.assertion(t, nil), "client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"), setup: basic, status: 400, code: "invalid_request"},
		{name: "client_secret_post and private_key_jwt", form: exchangeForm(subject, "client_id", secretClient, "client_secret", secretValue, "client_assertion", s.assertion(t, nil), "client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"), status: 400, code: "invalid_request"},
		// RFC 6749 §5.2: a client that tried the Authorization header gets
		// 401 with WWW-Authenticate.
		{name: "Bearer Authorization", form: exchangeForm(subject), setup: func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+subject) }, status: 401, code: "invalid_client",
			check: func(t *testing.T, r *stsResponse) {
				if c := r.header.Get("WWW-Authenticate"); c == "" {
					t.Errorf("no WWW-Authenticate although the client tried the Authorization header (RFC 6749 section 5.2)")
				}
			}},
		{name: "malformed Basic credentials", form: exchangeForm(subject), setup: func(r *http.Request) { r.Header.Set("Authorization", "Basic !!not-base64!!") }, status: 401, code: "invalid_client",
			check: func(t *testing.T, r *stsResponse) {
				if c := r.header.Get("WWW-Authenticate"); !strings.HasPrefix(c, "Basic ") {
					t.Errorf("WWW-Authenticate %q, want a Basic challenge: Basic was tried", c)
				}
			}},
		{name: "Basic without colon", form: exchangeForm(subject), setup: func(r *http.Request) {
			r.Header.Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(secretClient)))
		}, status: 401, code: "invalid_client",
			check: func(t *testing.T, r *stsResponse) {
				if c := r.header.Get("WWW-Authenticate"); !strings.HasPrefix(c, "Basic ") {
					t.Errorf("WWW-Authenticate %q, want a Basic challenge: Basic was tried", c)
				}
			}},
		{name: "Basic with bad percent-encoding", form: exchangeForm(subject), setup: func(r *http.Request) { r.SetBasicAuth(secretClient, "%zz") }, status: 401, code: "invalid_client",
			check: func(t *testing.T, r *stsResponse) {
				if c := r.header.Get("WWW-Authenticate"); !strings.HasPrefix(c, "Basic ") {
					t.Errorf("WWW-Authenticate %q, want a Basic challenge", c)
				}
			}},
		{name: "Basic client_id differs from body client_id", form: exchangeForm(subject, "client_id", impClient), setup: basic, status: 401, code: "invalid_client"},
		{name: "assertion signed by another key", form: exchangeForm(subject, "client_assertion", func() string {
			k, _ := newClientKey(t, "key-svc-1")
			return signAssertion(t, k, "key-svc-1", keyClient, stsTokenURL, nil)
		}(), "client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"), status: 401, code: "invalid_client"},
		{name: "assertion for another audience", form: exchangeForm(subject, "client_assertion", signAssertion(t, s.clientKey, s.clientKid, keyClient, "https://other.example/token", nil), "client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"), status: 401, code: "invalid_client"},
		{name: "expired assertion", form: exchangeForm(subject, "client_assertion", s.assertion(t, func(tok jwt.Token) { _ = tok.Set(jwt.ExpirationKey, now.Add(-time.Hour)) }), "client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"), status: 401, code: "invalid_client"},
		{name: "assertion without exp", form: exchangeForm(subject, "client_assertion", s.assertion(t, func(tok jwt.Token) { _ = tok.Remove(jwt.ExpirationKey) }), "client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"), status: 401, code: "invalid_client"},
		{name: "assertion valid for a year", form: exchangeForm(subject, "client_assertion", s.assertion(t, func(tok jwt.Token) { _ = tok.Set(jwt.ExpirationKey, now.Add(365*24*time.Hour)) }), "client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"), status: 401, code: "invalid_client"},
		{name: "assertion without jti", form: exchangeForm(subject, "client_assertion", s.assertion(t, func(tok jwt.Token) { _ = tok.Remove(jwt.JwtIDKey) }), "client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"), status: 401, code: "invalid_client"},
		{name: "assertion iss differs from sub", form: exchangeForm(subject, "client_assertion", s.assertion(t, func(tok jwt.Token) { _ = tok.Set(jwt.IssuerKey, secretClient) }), "client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"), status: 401, code: "invalid_client"},
		{name: "assertion without assertion type", form: exchangeForm(subject, "client_assertion", s.assertion(t, nil)), status: 400, code: "invalid_request"},
		{name: "assertion with wrong assertion type", form: exchangeForm(subject, "client_assertion", s.assertion(t, nil), "client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:saml2-bearer"), status: 401, code: "invalid_client"},

		// Policy.
		{name: "client without audience or resource", form: exchangeForm(subject), setup: basicAuth(noAudClient, noAudSecret), status: 400, code: "unauthorized_client"},
		{name: "requested scope the subject does not hold", form: exchangeForm(idp.Token("ec-1", testidp.Claims{"scope": "orders.read"}), "scope", "orders.write"), setup: basic, status: 400, code: "invalid_scope"},
		{name: "requested scope beyond the client", form: exchangeForm(subject, "scope", "admin"), setup: basic, status: 400, code: "invalid_scope"},
		{name: "requested scope, subject has no scope claim", form: exchangeForm(idp.Token("ec-1", nil), "scope", "orders.read"), setup: basic, status: 400, code: "invalid_scope"},
	}

	before := (&gateway{tester: s.tester}).metrics(t)
	var sent []string
	for _, c := range cases {
		sent = append(sent, c.form.Get("subject_token"), c.form.Get("actor_token"), c.form.Get("client_assertion"))
		t.Run(c.name, func(t *testing.T) {
			method := c.method
			if method == "" {
				method = http.MethodPost
			}
			ctype := c.ctype
			switch ctype {
			case "":
				ctype = "application/x-www-form-urlencoded"
			case "-":
				ctype = ""
			}
			body := c.body
			switch body {
			case "":
				body = c.form.Encode()
			case "-":
				body = ""
			}
			r := s.do(t, method, body, ctype, c.setup)
			assertOAuthError(t, r, c.status, c.code, subject, actor, secretValue, c.form.Get("subject_token"))
			if c.check != nil {
				c.check(t, r)
			}
		})
	}

	// Every refusal was counted by its code, and no token reached the log.
	after := (&gateway{tester: s.tester}).metrics(t)
	want := map[string]float64{}
	for _, c := range cases {
		want[c.code]++
	}
	for code, n := range want {
		series := `caddy_token_exchange_endpoint_requests_total{outcome="` + code + `"}`
		if got := metricValue(after, series) - metricValue(before, series); got != n {
			t.Errorf("%s rose by %v, want %v", series, got, n)
		}
	}
	logs, err := os.ReadFile(s.logFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, tok := range append(sent, secretValue) {
		if len(tok) < 16 {
			continue
		}
		if strings.Contains(string(logs), tok) {
			t.Errorf("a raw token or secret was logged")
		}
	}
}

// TestEndpointAssertionReplay: a client assertion's jti cannot be used twice.
func TestEndpointAssertionReplay(t *testing.T) {
	s := startSTS(t, stsOptions{})
	subject := s.idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
	assertion := s.assertion(t, nil)
	form := exchangeForm(subject, "client_assertion", assertion,
		"client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
	first := s.post(t, form, nil)
	s.assertIssued(t, first, urnAccessToken, "Bearer", audOrders)
	second := s.post(t, form, nil)
	assertOAuthError(t, second, 401, "invalid_client", subject, assertion)
}

func TestEndpointExchanges(t *testing.T) {
	s := startSTS(t, stsOptions{})
	idp := s.idp
	basic := basicAuth(secretClient, secretValue)
	jwtBearer := "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

	t.Run("client_secret_basic, requested scope granted as asked", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read profile", "client_id": "web-app", "email": "alice@example.com"})
		r := s.post(t, exchangeForm(subject, "audience", audOrders, "scope", "orders.read"), basic)
		tok := s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
		if _, ok := r.body["scope"]; ok {
			t.Errorf("scope %v in the answer although it equals the request", r.body["scope"])
		}
		if sub, _ := tok.Subject(); sub != "alice" {
			t.Errorf("sub %q", sub)
		}
		if got := claimString(tok, "scope"); got != "orders.read" {
			t.Errorf("scope claim %q", got)
		}
		if got := claimString(tok, "client_id"); got != secretClient {
			t.Errorf("client_id %q, want the authenticated client", got)
		}
		if tok.Has("email") {
			t.Error("a subject claim was copied without being configured")
		}
		act := claimMap(t, tok, "act")
		if act["sub"] != secretClient && act["client_id"] != secretClient {
			t.Errorf("act %v does not name the client", act)
		}
		if _, nested := act["act"]; nested {
			t.Errorf("act %v has a nested act the subject did not carry", act)
		}
		exp, _ := tok.Expiration()
		if d := time.Until(exp); d <= 0 || d > 5*time.Minute+time.Second {
			t.Errorf("lifetime %v", d)
		}
	})

	t.Run("requested_token_type jwt is N_A", func(t *testing.T) {
		subject := idp.Token("rsa-1", testidp.Claims{"scope": "orders.read"})
		r := s.post(t, exchangeForm(subject, "audience", audOrders, "requested_token_type", urnJWT), basic)
		s.assertIssued(t, r, urnJWT, "N_A", audOrders)
	})

	t.Run("requested_token_type access_token explicitly", func(t *testing.T) {
		subject := idp.Token("rsa-1", testidp.Claims{"scope": "orders.read"})
		r := s.post(t, exchangeForm(subject, "audience", audOrders, "requested_token_type", urnAccessToken), basic)
		s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
	})

	t.Run("subject_token_type jwt", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		r := s.post(t, exchangeForm(subject, "subject_token_type", urnJWT, "audience", audOrders), basic)
		s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
	})

	t.Run("no scope requested: scope in the answer", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read profile"})
		r := s.post(t, exchangeForm(subject, "audience", audOrders), basic)
		tok := s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
		if got := r.str("scope"); got != "orders.read" {
			t.Errorf("answer scope %q, want orders.read", got)
		}
		if got := claimString(tok, "scope"); got != "orders.read" {
			t.Errorf("scope claim %q", got)
		}
	})

	t.Run("scope narrowed: scope in the answer", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		r := s.post(t, exchangeForm(subject, "audience", audOrders, "scope", "orders.read orders.write"), basic)
		tok := s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
		if got := r.str("scope"); got != "orders.read" {
			t.Errorf("answer scope %q, want orders.read", got)
		}
		if got := claimString(tok, "scope"); got != "orders.read" {
			t.Errorf("scope claim %q", got)
		}
	})

	t.Run("subject without scope, none requested: no scope", func(t *testing.T) {
		subject := idp.Token("ec-1", nil)
		r := s.post(t, exchangeForm(subject, "audience", audOrders), basic)
		tok := s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
		if tok.Has("scope") {
			t.Errorf("scope %q issued to a subject that holds none", claimString(tok, "scope"))
		}
		if _, ok := r.body["scope"]; ok {
			t.Errorf("answer scope %v although none was requested nor granted", r.body["scope"])
		}
	})

	t.Run("client_secret_post", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		r := s.post(t, exchangeForm(subject, "audience", audOrders, "client_id", secretClient, "client_secret", secretValue), nil)
		tok := s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
		if got := claimString(tok, "client_id"); got != secretClient {
			t.Errorf("client_id %q", got)
		}
	})

	t.Run("Basic with the body's matching client_id", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		r := s.post(t, exchangeForm(subject, "audience", audOrders, "client_id", secretClient), basic)
		s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
	})

	t.Run("repeated audience", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read billing.read"})
		r := s.post(t, exchangeForm(subject, "audience", audOrders, "audience", audBilling, "scope", "orders.read billing.read"), basic)
		s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders, audBilling)
	})

	t.Run("resource", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		r := s.post(t, exchangeForm(subject, "resource", resOrders), basic)
		s.assertIssued(t, r, urnAccessToken, "Bearer", resOrders)
	})

	t.Run("audience and resource together", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		r := s.post(t, exchangeForm(subject, "audience", audOrders, "resource", resOrders), basic)
		s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders, resOrders)
	})

	t.Run("no audience: the client's", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		r := s.post(t, exchangeForm(subject), basic)
		s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders, audBilling)
	})

	t.Run("unknown parameters are ignored", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		r := s.post(t, exchangeForm(subject, "audience", audOrders, "x_vendor", "1", "x_vendor", "2"), basic)
		s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
	})

	t.Run("content type with charset", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		r := s.do(t, http.MethodPost, exchangeForm(subject, "audience", audOrders).Encode(), "application/x-www-form-urlencoded; charset=UTF-8", basic)
		s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
	})

	t.Run("minted token never outlives the subject", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "exp": time.Now().Add(40 * time.Second).Unix()})
		r := s.post(t, exchangeForm(subject, "audience", audOrders), basic)
		tok := s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
		if e, _ := r.body["expires_in"].(float64); e > 41 {
			t.Errorf("expires_in %v beyond the subject's exp", e)
		}
		exp, _ := tok.Expiration()
		if time.Until(exp) > 41*time.Second {
			t.Errorf("exp %v beyond the subject's exp", exp)
		}
	})

	t.Run("actor token: act names the actor, prior act nested", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "act": map[string]any{"sub": "frontend"}})
		actor := idp.Token("rsa-1", testidp.Claims{"sub": "bob"})
		r := s.post(t, exchangeForm(subject, "audience", audOrders, "actor_token", actor, "actor_token_type", urnAccessToken), basic)
		tok := s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
		act := claimMap(t, tok, "act")
		if act["sub"] != "bob" {
			t.Errorf("act.sub %v, want the actor token's sub", act["sub"])
		}
		if act["iss"] != "https://idp.test" {
			t.Errorf("act.iss %v, want the actor token's issuer (it differs from ours)", act["iss"])
		}
		inner, _ := act["act"].(map[string]any)
		if inner["sub"] != "frontend" {
			t.Errorf("prior act lost: %v", act)
		}
		if sub, _ := tok.Subject(); sub != "alice" {
			t.Errorf("sub %q", sub)
		}
	})

	t.Run("actor token of type jwt", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		actor := idp.Token("rsa-1", testidp.Claims{"sub": "bob"})
		r := s.post(t, exchangeForm(subject, "audience", audOrders, "actor_token", actor, "actor_token_type", urnJWT), basic)
		tok := s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
		if act := claimMap(t, tok, "act"); act["sub"] != "bob" {
			t.Errorf("act %v", act)
		}
	})

	t.Run("may_act naming the actor token's subject", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "may_act": map[string]any{"sub": "bob", "iss": "https://idp.test"}})
		actor := idp.Token("rsa-1", testidp.Claims{"sub": "bob"})
		r := s.post(t, exchangeForm(subject, "audience", audOrders, "actor_token", actor, "actor_token_type", urnAccessToken), basic)
		tok := s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
		if tok.Has("may_act") {
			t.Error("may_act was copied into the issued token")
		}
	})

	t.Run("may_act naming the client", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "may_act": map[string]any{"sub": secretClient}})
		r := s.post(t, exchangeForm(subject, "audience", audOrders), basic)
		s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
	})

	t.Run("may_impersonate: a delegated subject is never laundered", func(t *testing.T) {
		// Issue 9 §3: impersonation would drop the prior actors.
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "act": map[string]any{"sub": "frontend"}})
		r := s.post(t, exchangeForm(subject, "audience", audOrders), basicAuth(impClient, impSecret))
		assertOAuthError(t, r, http.StatusBadRequest, "invalid_request")
	})

	t.Run("may_impersonate: no act", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		r := s.post(t, exchangeForm(subject, "audience", audOrders), basicAuth(impClient, impSecret))
		tok := s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
		if tok.Has("act") {
			t.Errorf("impersonation token carries act %v", claimMap(t, tok, "act"))
		}
		if sub, _ := tok.Subject(); sub != "alice" {
			t.Errorf("sub %q", sub)
		}
		if got := claimString(tok, "client_id"); got != impClient {
			t.Errorf("client_id %q", got)
		}
	})

	t.Run("may_impersonate with an actor token: delegation", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		actor := idp.Token("rsa-1", testidp.Claims{"sub": "bob"})
		r := s.post(t, exchangeForm(subject, "audience", audOrders, "actor_token", actor, "actor_token_type", urnAccessToken), basicAuth(impClient, impSecret))
		tok := s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
		if act := claimMap(t, tok, "act"); act["sub"] != "bob" {
			t.Errorf("act %v, want the actor", act)
		}
	})

	t.Run("private_key_jwt, aud = token endpoint", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		r := s.post(t, exchangeForm(subject, "audience", audOrders,
			"client_assertion", s.assertion(t, nil), "client_assertion_type", jwtBearer), nil)
		tok := s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
		act := claimMap(t, tok, "act")
		if act["sub"] != keyClient && act["client_id"] != keyClient {
			t.Errorf("act %v does not name the client", act)
		}
		if got := claimString(tok, "client_id"); got != keyClient {
			t.Errorf("client_id %q", got)
		}
	})

	t.Run("private_key_jwt, aud = issuer, with client_id", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		assertion := signAssertion(t, s.clientKey, s.clientKid, keyClient, stsBase, nil)
		r := s.post(t, exchangeForm(subject, "client_id", keyClient,
			"client_assertion", assertion, "client_assertion_type", jwtBearer), nil)
		s.assertIssued(t, r, urnAccessToken, "Bearer", audOrders)
	})

	t.Run("private_key_jwt client held to its own targets", func(t *testing.T) {
		subject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		r := s.post(t, exchangeForm(subject, "audience", audBilling,
			"client_assertion", s.assertion(t, nil), "client_assertion_type", jwtBearer), nil)
		assertOAuthError(t, r, 400, "invalid_target", subject)
	})

	g := &gateway{tester: s.tester, logFile: s.logFile}
	if v := metricValue(g.metrics(t), `caddy_token_exchange_endpoint_requests_total{outcome="ok"}`); v < 20 {
		t.Errorf("metrics count %v ok endpoint requests", v)
	}
	logs, _ := os.ReadFile(s.logFile)
	if !strings.Contains(string(logs), "token exchanged") {
		t.Error("no exchange was logged")
	}
	if strings.Contains(string(logs), secretValue) {
		t.Error("a client secret was logged")
	}
}

// TestEndpointReExchange: a token the STS minted, fed back as a subject token,
// keeps its act chain and gains the new actor outermost.
func TestEndpointReExchange(t *testing.T) {
	s := startSTS(t, stsOptions{trustSelf: true})
	subject := s.idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "act": map[string]any{"sub": "frontend"}})

	first := s.post(t, exchangeForm(subject, "audience", audOrders, "scope", "orders.read"), basicAuth(secretClient, secretValue))
	t1 := s.assertIssued(t, first, urnAccessToken, "Bearer", audOrders)
	act1 := claimMap(t, t1, "act")
	if act1["sub"] != secretClient && act1["client_id"] != secretClient {
		t.Fatalf("first act %v does not name %s", act1, secretClient)
	}
	if inner, _ := act1["act"].(map[string]any); inner["sub"] != "frontend" {
		t.Fatalf("first act %v lost the subject's act", act1)
	}
	minted1 := first.str("access_token")

	// key-svc exchanges what orders-svc got.
	second := s.post(t, exchangeForm(minted1, "audience", audOrders,
		"client_assertion", s.assertion(t, nil),
		"client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"), nil)
	t2 := s.assertIssued(t, second, urnAccessToken, "Bearer", audOrders)
	if sub, _ := t2.Subject(); sub != "alice" {
		t.Errorf("sub %q, want the original subject", sub)
	}
	act2 := claimMap(t, t2, "act")
	if act2["sub"] != keyClient && act2["client_id"] != keyClient {
		t.Errorf("outer act %v does not name %s", act2, keyClient)
	}
	mid, _ := act2["act"].(map[string]any)
	if mid["sub"] != act1["sub"] || mid["client_id"] != act1["client_id"] {
		t.Errorf("middle act %v, want the first exchange's actor %v", mid, act1)
	}
	innermost, _ := mid["act"].(map[string]any)
	if innermost["sub"] != "frontend" {
		t.Errorf("act chain dropped its oldest actor: %v", act2)
	}
	if got := claimString(t2, "scope"); got != "orders.read" {
		t.Errorf("scope %q", got)
	}

	// Our own token as the actor token, too.
	third := s.post(t, exchangeForm(s.idp.Token("ec-1", testidp.Claims{"scope": "orders.read"}), "audience", audOrders,
		"actor_token", minted1, "actor_token_type", urnAccessToken), basicAuth(secretClient, secretValue))
	t3 := s.assertIssued(t, third, urnAccessToken, "Bearer", audOrders)
	act3 := claimMap(t, t3, "act")
	if act3["sub"] != "alice" {
		t.Errorf("act %v, want the actor token's sub", act3)
	}
	if _, ok := act3["iss"]; ok {
		t.Errorf("act.iss %v present although the actor token is ours", act3["iss"])
	}
}

func TestMetadataDocument(t *testing.T) {
	s := startSTS(t, stsOptions{})
	for _, path := range []string{"/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"} {
		t.Run(path, func(t *testing.T) {
			resp, err := s.tester.Client.Get(stsBase + path)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Fatalf("status %d", resp.StatusCode)
			}
			if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
				t.Errorf("Content-Type %q", ct)
			}
			var doc struct {
				Issuer          string   `json:"issuer"`
				TokenEndpoint   string   `json:"token_endpoint"`
				JWKSURI         string   `json:"jwks_uri"`
				GrantTypes      []string `json:"grant_types_supported"`
				AuthMethods     []string `json:"token_endpoint_auth_methods_supported"`
				AuthSigningAlgs []string `json:"token_endpoint_auth_signing_alg_values_supported"`
				Scopes          []string `json:"scopes_supported"`
			}
			if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
				t.Fatal(err)
			}
			if doc.Issuer != stsBase {
				t.Errorf("issuer %q", doc.Issuer)
			}
			if doc.TokenEndpoint != stsTokenURL {
				t.Errorf("token_endpoint %q", doc.TokenEndpoint)
			}
			if doc.JWKSURI != stsJWKSURL {
				t.Errorf("jwks_uri %q", doc.JWKSURI)
			}
			if !slices.Contains(doc.GrantTypes, tokenExchangeGrant) {
				t.Errorf("grant_types_supported %v", doc.GrantTypes)
			}
			for _, m := range []string{"client_secret_basic", "client_secret_post", "private_key_jwt"} {
				if !slices.Contains(doc.AuthMethods, m) {
					t.Errorf("token_endpoint_auth_methods_supported %v lacks %s", doc.AuthMethods, m)
				}
			}
			if slices.Contains(doc.AuthMethods, "none") {
				t.Errorf("token_endpoint_auth_methods_supported %v offers none", doc.AuthMethods)
			}
			if !slices.Contains(doc.AuthSigningAlgs, "ES256") {
				t.Errorf("token_endpoint_auth_signing_alg_values_supported %v", doc.AuthSigningAlgs)
			}
			for _, a := range doc.AuthSigningAlgs {
				if a == "none" || strings.HasPrefix(a, "HS") {
					t.Errorf("token_endpoint_auth_signing_alg_values_supported offers %s", a)
				}
			}
			// Issue 10: clients' scopes are private; nothing is published
			// unless scopes_supported is configured.
			if doc.Scopes != nil {
				t.Errorf("scopes_supported %v disclosed without configuration", doc.Scopes)
			}
			// The advertised endpoints are live.
			for _, u := range []string{doc.JWKSURI} {
				r, err := s.tester.Client.Get(u)
				if err != nil {
					t.Fatal(err)
				}
				r.Body.Close()
				if r.StatusCode != 200 {
					t.Errorf("%s: status %d", u, r.StatusCode)
				}
			}
		})
	}
	t.Run("POST is refused", func(t *testing.T) {
		resp, err := s.tester.Client.Post(stsBase+"/.well-known/oauth-authorization-server", "application/x-www-form-urlencoded", strings.NewReader("a=b"))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("status %d, want 405", resp.StatusCode)
		}
	})
}
