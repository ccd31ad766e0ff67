package caddymodule

import (
	"crypto"
	"crypto/hmac"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// Test ports. CTE_TEST_PORT_OFFSET shifts them all, so that test runs from
// several checkouts on one machine do not share Caddy's admin or HTTP port.
var (
	portOffset  = testPortOffset()
	gatewayPort = 9080 + portOffset
	adminPort   = 2999 + portOffset
	httpsPort   = 9443 + portOffset
)

func testPortOffset() int {
	n, _ := strconv.Atoi(os.Getenv("CTE_TEST_PORT_OFFSET"))
	return n
}

func init() { caddytest.Default.AdminPort = adminPort }

const (
	gatewayIssuer = "https://gateway.test"
)

// recordingUpstream is the internal API behind the gateway: it records what
// reaches it.
type recordingUpstream struct {
	*httptest.Server
	mu       sync.Mutex
	requests []*http.Request
}

func newRecordingUpstream(t *testing.T) *recordingUpstream {
	u := &recordingUpstream{}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		u.requests = append(u.requests, r.Clone(r.Context()))
		u.mu.Unlock()
		_, _ = io.WriteString(w, "upstream ok")
	}))
	t.Cleanup(u.Close)
	return u
}

func (u *recordingUpstream) calls() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.requests)
}

func (u *recordingUpstream) last() *http.Request {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.requests[len(u.requests)-1]
}

// testGlobalOptions are the global options every in-process test Caddy
// shares: caddytest's admin port, the test HTTP ports, a DEBUG log to
// logFile (scanned for leaked tokens) and storage in storageDir.
func testGlobalOptions(logFile, storageDir string) string {
	return fmt.Sprintf(`	admin localhost:%d
	http_port %d
	https_port %d
	log {
		output file %s
		level DEBUG
	}
	storage file_system %s
`, adminPort, gatewayPort, httpsPort, logFile, storageDir)
}

type gateway struct {
	tester   *caddytest.Tester
	idp      *testidp.Issuer
	upstream *recordingUpstream
	logFile  string
}

// assertNoTokenLogged scans every log line Caddy wrote for raw tokens.
func (g *gateway) assertNoTokenLogged(t *testing.T, tokens ...string) {
	t.Helper()
	logs, err := os.ReadFile(g.logFile)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(logs), "token exchange") {
		t.Fatal("no exchange was logged at all")
	}
	for _, tok := range tokens {
		if len(tok) < 16 {
			continue
		}
		if strings.Contains(string(logs), tok) {
			t.Fatalf("a raw token was logged")
		}
		// the signing input alone (header.payload) is as good as the token
		if i := strings.LastIndex(tok, "."); i > 0 && strings.Contains(string(logs), tok[:i]) {
			t.Fatalf("a token's header.payload was logged")
		}
	}
}

// metric returns the admin /metrics exposition.
func (g *gateway) metrics(t *testing.T) string {
	t.Helper()
	resp, err := g.tester.Client.Get(fmt.Sprintf("http://localhost:%d/metrics", adminPort))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// startGateway runs real Caddy in-process with the module, trusting a real
// IdP whose JWKS is served over HTTP, in front of a real upstream.
func startGateway(t *testing.T, routeBlock string) *gateway {
	return startGatewayWithTrust(t, "", routeBlock)
}

// startGatewayWithTrust is startGateway with extra lines in the IdP's trust
// block. routeBlock is what the /api/* route runs before reverse_proxy.
func startGatewayWithTrust(t *testing.T, trustExtra, routeBlock string) *gateway {
	t.Helper()
	idp := newTestIdP(t, "https://idp.test")
	upstream := newRecordingUpstream(t)
	f := newCaddyFixture(t)
	config := fmt.Sprintf(`{
%s	token_exchange {
		issuer %s
		trust https://idp.test {
			jwks_url %s
			audience https://gateway.test
			algorithms RS256 ES256
			refetch_interval 1h
			%s
		}
	}
}
http://localhost:%d {
	route /api/* {
		%s
		reverse_proxy %s
	}
	handle /.well-known/jwks.json {
		token_exchange_jwks
	}
}
`, f.globals(), gatewayIssuer, idp.JWKSURL(), trustExtra, gatewayPort, routeBlock, strings.TrimPrefix(upstream.URL, "http://"))
	return f.start(t, config, idp, upstream)
}

func (g *gateway) get(t *testing.T, path string, headers map[string]string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, fmt.Sprintf("http://localhost:%d%s", gatewayPort, path), nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := g.tester.Client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return resp
}

// gatewayJWKS fetches the gateway's published keys over HTTP.
func (g *gateway) gatewayJWKS(t *testing.T) jwk.Set {
	t.Helper()
	resp, err := g.tester.Client.Get(fmt.Sprintf("http://localhost:%d/.well-known/jwks.json", gatewayPort))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "application/jwk-set+json" {
		t.Fatalf("JWKS content type %q", ct)
	}
	if cc := resp.Header.Get("Cache-Control"); !strings.Contains(cc, "max-age=") {
		t.Fatalf("JWKS Cache-Control %q", cc)
	}
	body, _ := io.ReadAll(resp.Body)
	set, err := jwk.Parse(body)
	if err != nil {
		t.Fatalf("JWKS: %v", err)
	}
	for i := 0; i < set.Len(); i++ {
		k, _ := set.Key(i)
		if _, err := jwk.PublicKeyOf(k); err != nil {
			t.Fatal(err)
		}
		var raw any
		_ = jwk.Export(k, &raw)
		if _, private := raw.(crypto.Signer); private {
			t.Fatal("JWKS publishes a private key")
		}
	}
	return set
}

const defaultRoute = `token_exchange {
			audience https://orders.internal
			scope orders.read orders.write
			require_scope orders.read
			claims email
		}`

func TestMiddlewareForwardsDelegatedToken(t *testing.T) {
	g := startGateway(t, defaultRoute)
	inbound := g.idp.Token("rsa-1", testidp.Claims{
		"scope": "orders.read profile", "client_id": "web-app", "email": "alice@example.com",
		"act": map[string]any{"sub": "frontend"},
	})
	resp := g.get(t, "/api/orders/1", map[string]string{
		"Authorization": "Bearer " + inbound,
		"X-Smuggled":    "copy of " + inbound,
	})
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, want 200", resp.StatusCode)
	}
	if g.upstream.calls() != 1 {
		t.Fatalf("upstream called %d times", g.upstream.calls())
	}
	seen := g.upstream.last()
	for name, values := range seen.Header {
		for _, v := range values {
			if strings.Contains(v, inbound) {
				t.Fatalf("the inbound token reached the upstream in %s", name)
			}
		}
	}
	minted, ok := strings.CutPrefix(seen.Header.Get("Authorization"), "Bearer ")
	if !ok {
		t.Fatalf("upstream Authorization %q", seen.Header.Get("Authorization"))
	}

	// Verify as an upstream would: against the gateway's JWKS, over HTTP.
	tok, err := jwt.Parse([]byte(minted),
		jwt.WithKeySet(g.gatewayJWKS(t), jws.WithRequireKid(true)),
		jwt.WithIssuer(gatewayIssuer), jwt.WithAudience("https://orders.internal"))
	if err != nil {
		t.Fatalf("minted token does not verify against the gateway JWKS: %v", err)
	}
	msg, _ := jws.Parse([]byte(minted))
	if typ, _ := msg.Signatures()[0].ProtectedHeaders().Type(); typ != "at+jwt" {
		t.Errorf("typ %q, want at+jwt", typ)
	}
	if sub, _ := tok.Subject(); sub != "alice" {
		t.Errorf("sub %q", sub)
	}
	var scope, clientID, email string
	_ = tok.Get("scope", &scope)
	_ = tok.Get("client_id", &clientID)
	_ = tok.Get("email", &email)
	if scope != "orders.read" || clientID != "web-app" || email != "alice@example.com" {
		t.Errorf("scope %q client_id %q email %q", scope, clientID, email)
	}
	var act map[string]any
	if err := tok.Get("act", &act); err != nil {
		t.Fatalf("no act: %v", err)
	}
	if act["sub"] != gatewayIssuer {
		t.Errorf("act.sub %v", act["sub"])
	}
	if inner, _ := act["act"].(map[string]any); inner["sub"] != "frontend" {
		t.Errorf("prior act chain lost: %#v", act)
	}
	exp, _ := tok.Expiration()
	if d := time.Until(exp); d <= 0 || d > 5*time.Minute+time.Second {
		t.Errorf("minted lifetime %v, want at most 5m", d)
	}
	g.assertNoTokenLogged(t, inbound, minted)
	if v := metricValue(g.metrics(t), `caddy_token_exchange_exchanges_total{outcome="ok",route="https://orders.internal"}`); v < 1 {
		t.Errorf("metrics count %v ok exchanges", v)
	}
}

func TestMiddlewareRefusals(t *testing.T) {
	g := startGateway(t, defaultRoute)
	idp := g.idp
	now := time.Now()
	payload := map[string]any{"iss": "https://idp.test", "sub": "alice", "aud": "https://gateway.test", "exp": now.Add(time.Minute).Unix(), "scope": "orders.read"}
	rsaPub := idp.PrivateKey("rsa-1").Public().(*rsa.PublicKey)
	der, _ := x509.MarshalPKIXPublicKey(rsaPub)
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
	hs256 := func(key []byte) func([]byte) []byte {
		return func(in []byte) []byte { m := hmac.New(sha256.New, key); m.Write(in); return m.Sum(nil) }
	}
	other := testidp.New(t, "https://evil.test")
	other.AddKey("rsa-1", "RS256")
	before := g.metrics(t)

	cases := []struct {
		name      string
		auth      string
		status    int
		wantError string // error= in WWW-Authenticate; "" means none
	}{
		{"missing token", "", 401, ""},
		{"other scheme", "Basic YWxpY2U6cGFzcw==", 401, ""},
		{"malformed", "Bearer not-a-jwt", 401, "invalid_token"},
		{"alg none", "Bearer " + testidp.RawToken(map[string]any{"alg": "none"}, payload, nil), 401, "invalid_token"},
		{"HS256 with the issuer's public key", "Bearer " + testidp.RawToken(map[string]any{"alg": "HS256", "kid": "rsa-1"}, payload, hs256(pubPEM)), 401, "invalid_token"},
		{"wrong iss", "Bearer " + other.Token("rsa-1", testidp.Claims{"scope": "orders.read"}), 401, "invalid_token"},
		{"forged iss", "Bearer " + other.Token("rsa-1", testidp.Claims{"iss": "https://idp.test", "scope": "orders.read"}), 401, "invalid_token"},
		{"wrong aud", "Bearer " + idp.Token("rsa-1", testidp.Claims{"aud": "https://other.test", "scope": "orders.read"}), 401, "invalid_token"},
		{"expired", "Bearer " + idp.Token("ec-1", testidp.Claims{"exp": now.Add(-time.Hour).Unix(), "scope": "orders.read"}), 401, "invalid_token"},
		{"nbf in the future", "Bearer " + idp.Token("ec-1", testidp.Claims{"nbf": now.Add(time.Hour).Unix(), "scope": "orders.read"}), 401, "invalid_token"},
		{"unknown kid", "Bearer " + testidp.RawToken(map[string]any{"alg": "RS256", "kid": "unknown"}, payload, func([]byte) []byte { return make([]byte, 256) }), 401, "invalid_token"},
		{"scope not obtainable", "Bearer " + idp.Token("rsa-1", testidp.Claims{"scope": "profile"}), 403, "insufficient_scope"},
		{"no scope claim", "Bearer " + idp.Token("rsa-1", nil), 403, "insufficient_scope"},
		{"may_act names another actor", "Bearer " + idp.Token("rsa-1", testidp.Claims{"scope": "orders.read", "may_act": map[string]any{"sub": "https://other-gateway.test"}}), 403, "insufficient_scope"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := g.upstream.calls()
			headers := map[string]string{}
			if tc.auth != "" {
				headers["Authorization"] = tc.auth
			}
			resp := g.get(t, "/api/orders/1", headers)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.status)
			}
			challenge := resp.Header.Get("WWW-Authenticate")
			if !strings.HasPrefix(challenge, `Bearer realm="`) {
				t.Fatalf("WWW-Authenticate %q", challenge)
			}
			if tc.wantError == "" && strings.Contains(challenge, "error=") {
				t.Fatalf("WWW-Authenticate %q carries an error for a request without credentials", challenge)
			}
			if tc.wantError != "" && !strings.Contains(challenge, `error="`+tc.wantError+`"`) {
				t.Fatalf("WWW-Authenticate %q, want error=%q", challenge, tc.wantError)
			}
			if tok := strings.TrimPrefix(tc.auth, "Bearer "); len(tok) > 20 && strings.Contains(challenge, tok) {
				t.Fatal("the challenge echoes the token")
			}
			if g.upstream.calls() != before {
				t.Fatal("the upstream was called")
			}
		})
	}
	var sent []string
	for _, tc := range cases {
		sent = append(sent, strings.TrimPrefix(tc.auth, "Bearer "))
	}
	g.assertNoTokenLogged(t, sent...)
	after := g.metrics(t)
	for series, want := range map[string]float64{
		`caddy_token_exchange_exchanges_total{outcome="invalid_token",route="https://orders.internal"}`:      11,
		`caddy_token_exchange_exchanges_total{outcome="insufficient_scope",route="https://orders.internal"}`: 2,
		`caddy_token_exchange_exchanges_total{outcome="denied",route="https://orders.internal"}`:             1,
	} {
		if got := metricValue(after, series) - metricValue(before, series); got != want {
			t.Errorf("%s rose by %v, want %v", series, got, want)
		}
	}
}

// metricValue reads one series from a Prometheus exposition (0 if absent).
func metricValue(exposition, series string) float64 {
	for _, l := range strings.Split(exposition, "\n") {
		if v, ok := strings.CutPrefix(l, series+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return 0
}

func TestMiddlewarePlaceholdersAndImpersonation(t *testing.T) {
	g := startGateway(t, `token_exchange {
			audience https://orders.internal
			scope orders.read
			mode impersonation
		}
		request_header X-Subject {token_exchange.subject}
		request_header X-Scope {token_exchange.scope}
		request_header X-User {http.auth.user.id}
		request_header X-Jti {token_exchange.jti}
		request_header X-Actor {token_exchange.actor}`)
	inbound := g.idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
	if resp := g.get(t, "/api/x", map[string]string{"Authorization": "Bearer " + inbound}); resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	seen := g.upstream.last()
	if seen.Header.Get("X-Subject") != "alice" || seen.Header.Get("X-User") != "alice" ||
		seen.Header.Get("X-Scope") != "orders.read" || seen.Header.Get("X-Jti") == "" ||
		seen.Header.Get("X-Actor") != gatewayIssuer {
		t.Fatalf("placeholders: %v", seen.Header)
	}
	minted := strings.TrimPrefix(seen.Header.Get("Authorization"), "Bearer ")
	tok, err := jwt.Parse([]byte(minted), jwt.WithKeySet(g.gatewayJWKS(t)))
	if err != nil {
		t.Fatal(err)
	}
	var jti string
	_ = tok.Get("jti", &jti)
	if jti != seen.Header.Get("X-Jti") {
		t.Fatalf("jti placeholder %q, token %q", seen.Header.Get("X-Jti"), jti)
	}
	if tok.Has("act") {
		t.Fatal("impersonation minted act")
	}
}
