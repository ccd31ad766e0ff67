package caddymodule

import (
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
	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

const (
	trustDomain = "https://trust.test"
	txnClient   = "orders-worker"
	txnSecret   = "orders-worker-secret"
	traceID     = "4bf92f3577b34da6a3ce929d0e0e4736"
)

var internalPort = gatewayPort + 1

// startTxnDomain runs one in-process Caddy with two sites: the edge
// (gatewayPort: token_exchange with txn_token, the JWKS, the token
// endpoint) and an internal hop (internalPort: txn_token_verify against
// the edge's JWKS over HTTP, with no token_exchange of its own) in front
// of a recording upstream. The gateway also trusts itself, so that a
// Txn-Token presented as a bearer is refused for what it is, not for an
// unknown issuer; with two trusted issuers, sub is namespaced.
func startTxnDomain(t *testing.T) *gateway {
	t.Helper()
	idp := testidp.New(t, "https://idp.test")
	idp.AddKey("rsa-1", "RS256")
	upstream := newRecordingUpstream(t)
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	edge := fmt.Sprintf("http://localhost:%d", gatewayPort)
	config := fmt.Sprintf(`{
%s	token_exchange {
		issuer %s
		trust https://idp.test {
			jwks_url %s
			audience https://gateway.test
			algorithms RS256
			refetch_interval 1h
		}
		trust %s {
			jwks_url %s/.well-known/jwks.json
			audience %s https://orders.internal
			algorithms ES256
			refetch_interval 1s
		}
		client %s {
			secret_hash %s
			audience https://orders.internal
			scope orders.read orders.write
		}
	}
}
%s {
	route /api/* {
		token_exchange {
			audience https://orders.internal
			scope orders.read orders.write
			txn_token %s {
				lifetime 60s
				tctx action request.method
				tctx tenant subject.tenant
			}
		}
		reverse_proxy localhost:%d
	}
	handle /.well-known/jwks.json {
		token_exchange_jwks
	}
	handle /oauth2/token {
		token_exchange_endpoint {
			txn_token %s
		}
	}
}
http://localhost:%d {
	txn_token_verify {
		jwks_url %s/.well-known/jwks.json
		trust_domain %s
		issuer %s
		refetch_interval 10ms
	}
	reverse_proxy %s {
		header_up X-Txn-Sub {txn_token.sub}
		header_up X-Txn-Id {txn_token.txn}
		header_up X-Txn-Scope {txn_token.scope}
		header_up X-Txn-Tenant {txn_token.tctx.tenant}
		header_up X-Txn-Workload {txn_token.req_wl}
	}
}
`, txnGlobalOptions(logFile, t.TempDir()), gatewayIssuer, idp.JWKSURL(),
		gatewayIssuer, edge, trustDomain, txnClient, bcryptHash(t, txnSecret),
		edge, trustDomain, internalPort, trustDomain,
		internalPort, edge, trustDomain, gatewayIssuer, strings.TrimPrefix(upstream.URL, "http://"))
	tester := caddytest.NewTester(t)
	tester.InitServer(config, "caddyfile")
	return &gateway{tester: tester, idp: idp, upstream: upstream, logFile: logFile}
}

// txnGlobalOptions are testGlobalOptions with the log filter the README
// prescribes for Txn-Tokens on the default logger: at DEBUG, Caddy's
// reverse_proxy logs every upstream request's headers ("upstream
// roundtrip") and redacts only Authorization and Cookie.
func txnGlobalOptions(logFile, storageDir string) string {
	return strings.Replace(testGlobalOptions(logFile, storageDir), "level DEBUG\n", `level DEBUG
		format filter {
			request>headers>Txn-Token delete
			wrap json
		}
`, 1)
}

// verifyTxn checks a Txn-Token with jwx against the gateway's JWKS over
// HTTP: typ txntoken+jwt, aud the trust domain, exp.
func verifyTxn(t *testing.T, g *gateway, raw string) jwt.Token {
	t.Helper()
	msg, err := jws.Parse([]byte(raw))
	if err != nil {
		t.Fatal(err)
	}
	if typ, _ := msg.Signatures()[0].ProtectedHeaders().Type(); typ != "txntoken+jwt" {
		t.Fatalf("typ %q, want txntoken+jwt", typ)
	}
	tok, err := jwt.Parse([]byte(raw), jwt.WithKeySet(g.gatewayJWKS(t), jws.WithRequireKid(true)),
		jwt.WithAudience(trustDomain), jwt.WithIssuer(gatewayIssuer), jwt.WithRequiredClaim("exp"))
	if err != nil {
		t.Fatalf("Txn-Token does not verify against the gateway JWKS: %v", err)
	}
	return tok
}

func txnPost(t *testing.T, g *gateway, form url.Values) (int, map[string]any) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, fmt.Sprintf("http://localhost:%d/oauth2/token", gatewayPort), strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(txnClient, txnSecret)
	resp, err := g.tester.Client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var body map[string]any
	_ = json.Unmarshal(b, &body)
	return resp.StatusCode, body
}

func TestTxnTokenEdgeToInternalHop(t *testing.T) {
	g := startTxnDomain(t)
	inbound := g.idp.Token("rsa-1", testidp.Claims{"scope": "orders.read profile", "tenant": "acme"})
	resp := g.get(t, "/api/orders/1", map[string]string{
		"Authorization": "Bearer " + inbound,
		"Traceparent":   "00-" + traceID + "-00f067aa0ba902b7-01",
		"Txn-Token":     "forged-outside-token",
	})
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if g.upstream.calls() != 1 {
		t.Fatalf("upstream calls %d", g.upstream.calls())
	}
	seen := g.upstream.last()
	raw := seen.Header.Get("Txn-Token")
	if raw == "" || raw == "forged-outside-token" || len(seen.Header.Values("Txn-Token")) != 1 {
		t.Fatalf("upstream Txn-Token %q", seen.Header.Values("Txn-Token"))
	}
	// The delegated access token still travels in Authorization (both coexist).
	if at, ok := strings.CutPrefix(seen.Header.Get("Authorization"), "Bearer "); !ok || at == raw {
		t.Fatalf("upstream Authorization %q", seen.Header.Get("Authorization"))
	}
	tok := verifyTxn(t, g, raw)
	var txn, sub, scope, wl string
	var rctx, tctx map[string]any
	_ = tok.Get("txn", &txn)
	_ = tok.Get("scope", &scope)
	_ = tok.Get("req_wl", &wl)
	_ = tok.Get("rctx", &rctx)
	_ = tok.Get("tctx", &tctx)
	sub, _ = tok.Subject()
	// two issuers are trusted: sub is namespaced by issuer
	if sub != "https://idp.test#alice" || scope != "orders.read" || wl != gatewayIssuer {
		t.Errorf("sub %q scope %q req_wl %q", sub, scope, wl)
	}
	if txn == "" || strings.Contains(txn, traceID) {
		t.Errorf("txn %q must be generated, never the trace id", txn)
	}
	if rctx["trace_id"] != traceID || rctx["req_ip"] != "127.0.0.1" || rctx["authn"] != exchange.AuthnBearer {
		t.Errorf("rctx %v", rctx)
	}
	if tctx["action"] != "GET" || tctx["tenant"] != "acme" {
		t.Errorf("tctx %v", tctx)
	}
	exp, _ := tok.Expiration()
	iat, _ := tok.IssuedAt()
	if exp.Sub(iat) != 60*time.Second {
		t.Errorf("lifetime %v", exp.Sub(iat))
	}
	// The internal hop verified it and exposed the claims as placeholders.
	if seen.Header.Get("X-Txn-Sub") != sub || seen.Header.Get("X-Txn-Id") != txn ||
		seen.Header.Get("X-Txn-Scope") != "orders.read" || seen.Header.Get("X-Txn-Tenant") != "acme" ||
		seen.Header.Get("X-Txn-Workload") != gatewayIssuer {
		t.Errorf("placeholders: sub %q txn %q scope %q tenant %q wl %q", seen.Header.Get("X-Txn-Sub"), seen.Header.Get("X-Txn-Id"),
			seen.Header.Get("X-Txn-Scope"), seen.Header.Get("X-Txn-Tenant"), seen.Header.Get("X-Txn-Workload"))
	}

	// txn is unique per request, even for the same token and traceparent.
	resp = g.get(t, "/api/orders/1", map[string]string{"Authorization": "Bearer " + inbound, "Traceparent": "00-" + traceID + "-00f067aa0ba902b7-01"})
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("second status %d", resp.StatusCode)
	}
	second := g.upstream.last().Header.Get("Txn-Token")
	var txn2 string
	_ = verifyTxn(t, g, second).Get("txn", &txn2)
	if txn2 == "" || txn2 == txn {
		t.Errorf("txn not unique: %q then %q", txn, txn2)
	}
	// An invalid traceparent is not recorded.
	_ = g.get(t, "/api/orders/1", map[string]string{"Authorization": "Bearer " + inbound, "Traceparent": "00-" + strings.Repeat("0", 32) + "-00f067aa0ba902b7-01"})
	var rctx3 map[string]any
	_ = verifyTxn(t, g, g.upstream.last().Header.Get("Txn-Token")).Get("rctx", &rctx3)
	if _, ok := rctx3["trace_id"]; ok {
		t.Errorf("an invalid traceparent's trace id was recorded: %v", rctx3)
	}

	logs, _ := os.ReadFile(g.logFile)
	if !strings.Contains(string(logs), "outside Txn-Token removed at the edge") {
		t.Error("the outside Txn-Token was not logged")
	}
	if strings.Contains(string(logs), "forged-outside-token") {
		t.Error("the outside Txn-Token value was logged")
	}
	g.assertNoTokenLogged(t, inbound, raw, second)
}

func TestTxnTokenVerifyRefusals(t *testing.T) {
	g := startTxnDomain(t)
	inbound := g.idp.Token("rsa-1", testidp.Claims{"scope": "orders.read"})
	if resp := g.get(t, "/api/x", map[string]string{"Authorization": "Bearer " + inbound}); resp.StatusCode != http.StatusOK {
		t.Fatalf("edge status %d", resp.StatusCode)
	}
	seen := g.upstream.last()
	txn := seen.Header.Get("Txn-Token")
	at := strings.TrimPrefix(seen.Header.Get("Authorization"), "Bearer ")
	calls := g.upstream.calls()

	internal := func(headers map[string]string) int {
		req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://localhost:%d/x", internalPort), nil)
		for k, v := range headers {
			req.Header.Set(k, v)
		}
		resp, err := g.tester.Client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		return resp.StatusCode
	}
	if s := internal(map[string]string{"Txn-Token": txn}); s != http.StatusOK {
		t.Fatalf("valid Txn-Token at the internal hop: %d", s)
	}
	calls++
	// tamper with the payload: the signature no longer verifies
	parts := strings.Split(txn, ".")
	payload, _ := base64.RawURLEncoding.DecodeString(parts[1])
	forged := parts[0] + "." + base64.RawURLEncoding.EncodeToString([]byte(strings.Replace(string(payload), "orders.read", "orders.admin", 1))) + "." + parts[2]
	for name, h := range map[string]map[string]string{
		"absent":                {},
		"garbage":               {"Txn-Token": "not-a-token"},
		"access token (at+jwt)": {"Txn-Token": at},
		"tampered":              {"Txn-Token": forged},
		"in Authorization":      {"Authorization": "Bearer " + txn},
	} {
		if s := internal(h); s != http.StatusUnauthorized {
			t.Errorf("%s: status %d, want 401", name, s)
		}
	}
	if g.upstream.calls() != calls {
		t.Fatalf("the upstream was called for a refused Txn-Token")
	}

	// A Txn-Token is never an access token: not at the edge (the gateway
	// trusts its own issuer here, so only the token's kind refuses it) ...
	if resp := g.get(t, "/api/x", map[string]string{"Authorization": "Bearer " + txn}); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("Txn-Token as bearer at the edge: %d", resp.StatusCode)
	}
	logs, _ := os.ReadFile(g.logFile)
	if !strings.Contains(string(logs), "a Transaction Token (Txn-Token) is not accepted") {
		t.Error("the edge did not refuse the Txn-Token for its kind")
	}
	// ... nor as a subject token at the endpoint.
	status, body := txnPost(t, g, url.Values{"grant_type": {exchange.GrantTypeTokenExchange}, "subject_token": {txn},
		"subject_token_type": {exchange.TokenTypeAccessToken}, "audience": {"https://orders.internal"}})
	if status != http.StatusBadRequest || body["error"] != "invalid_request" {
		t.Fatalf("Txn-Token as an access token at the endpoint: %d %v", status, body)
	}
	if g.upstream.calls() != calls {
		t.Fatalf("the upstream was called for a refused request")
	}
	g.assertNoTokenLogged(t, inbound, txn, at)
}

func TestTxnTokenEndpointAndReplacement(t *testing.T) {
	g := startTxnDomain(t)
	inbound := g.idp.Token("rsa-1", testidp.Claims{"scope": "orders.read orders.write profile"})
	rc := base64.RawURLEncoding.EncodeToString([]byte(`{"req_ip":"10.1.2.3"}`))
	status, body := txnPost(t, g, url.Values{"grant_type": {exchange.GrantTypeTokenExchange}, "subject_token": {inbound},
		"subject_token_type": {exchange.TokenTypeAccessToken}, "requested_token_type": {exchange.TokenTypeTxnToken},
		"audience": {trustDomain}, "scope": {"orders.read"},
		"request_context": {rc}, "request_details": {`{"order":42}`}})
	if status != http.StatusOK {
		t.Fatalf("status %d %v", status, body)
	}
	if body["token_type"] != "N_A" || body["issued_token_type"] != exchange.TokenTypeTxnToken {
		t.Fatalf("response %v", body)
	}
	if _, ok := body["refresh_token"]; ok {
		t.Fatal("a refresh token was issued")
	}
	first := body["access_token"].(string)
	orig := verifyTxn(t, g, first)
	var txn, wl, scope string
	var rctx, tctx map[string]any
	_ = orig.Get("txn", &txn)
	_ = orig.Get("req_wl", &wl)
	_ = orig.Get("scope", &scope)
	_ = orig.Get("rctx", &rctx)
	_ = orig.Get("tctx", &tctx)
	sub, _ := orig.Subject()
	if sub != "https://idp.test#alice" || wl != txnClient || scope != "orders.read" || rctx["req_ip"] != "10.1.2.3" || tctx["order"] != float64(42) {
		t.Fatalf("sub %q req_wl %q scope %q rctx %v tctx %v", sub, wl, scope, rctx, tctx)
	}
	origExp, _ := orig.Expiration()

	time.Sleep(1100 * time.Millisecond) // a later iat: exp must still not move
	// Replacement: asking for more scope never widens it.
	status, body = txnPost(t, g, url.Values{"grant_type": {exchange.GrantTypeTokenExchange}, "subject_token": {first},
		"subject_token_type": {exchange.TokenTypeTxnToken}, "requested_token_type": {exchange.TokenTypeTxnToken},
		"scope": {"orders.read orders.write"}})
	if status != http.StatusOK {
		t.Fatalf("replacement status %d %v", status, body)
	}
	if body["token_type"] != "N_A" || body["scope"] != "orders.read" {
		t.Fatalf("replacement response %v", body)
	}
	repl := verifyTxn(t, g, body["access_token"].(string))
	var txn2, scope2 string
	var rctx2 map[string]any
	_ = repl.Get("txn", &txn2)
	_ = repl.Get("scope", &scope2)
	_ = repl.Get("rctx", &rctx2)
	sub2, _ := repl.Subject()
	aud2, _ := repl.Audience()
	exp2, _ := repl.Expiration()
	if txn2 != txn || sub2 != sub || !slices.Equal(aud2, []string{trustDomain}) || scope2 != "orders.read" {
		t.Fatalf("replacement changed txn/sub/aud/scope: %q %q %v %q", txn2, sub2, aud2, scope2)
	}
	if exp2.After(origExp) {
		t.Fatalf("replacement exp %v after the original's %v", exp2, origExp)
	}
	if chain, _ := rctx2["chain"].([]any); len(chain) != 2 || chain[0] != txnClient || chain[1] != txnClient || rctx2["req_ip"] != "10.1.2.3" {
		t.Fatalf("replacement rctx %v", rctx2)
	}
	// A replacement that asks only for scope it does not hold gets nothing.
	status, body = txnPost(t, g, url.Values{"grant_type": {exchange.GrantTypeTokenExchange}, "subject_token": {first},
		"subject_token_type": {exchange.TokenTypeTxnToken}, "requested_token_type": {exchange.TokenTypeTxnToken},
		"scope": {"orders.write"}})
	if status != http.StatusBadRequest || body["error"] != "invalid_scope" {
		t.Fatalf("widening replacement: %d %v", status, body)
	}
	// Another trust domain is not this endpoint's to serve.
	status, body = txnPost(t, g, url.Values{"grant_type": {exchange.GrantTypeTokenExchange}, "subject_token": {inbound},
		"subject_token_type": {exchange.TokenTypeAccessToken}, "requested_token_type": {exchange.TokenTypeTxnToken},
		"audience": {"https://elsewhere.test"}})
	if status != http.StatusBadRequest || body["error"] != "invalid_target" {
		t.Fatalf("foreign trust domain: %d %v", status, body)
	}
}
