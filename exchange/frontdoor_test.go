package exchange

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
)

// Both front doors over plain net/http (httptest), without Caddy: the
// bearer middleware core and the RFC 8693 token endpoint with its RFC 8414
// metadata.

type seenRequests struct {
	mu   sync.Mutex
	reqs []*http.Request
}

func (s *seenRequests) handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.reqs = append(s.reqs, r.Clone(context.Background()))
		s.mu.Unlock()
		_, _ = io.WriteString(w, "upstream ok")
	})
}

func (s *seenRequests) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.reqs)
}

func TestBearerGateOverHTTP(t *testing.T) {
	f := newEngineFixture(t, "ES256")
	grant := &Grant{Audiences: []string{"https://orders.internal"}, Scopes: []string{"orders.read", "orders.write"}, RequireScopes: []string{"orders.read"}}
	gate, err := NewBearerGate(f.engine, grant, "api")
	if err != nil {
		t.Fatal(err)
	}
	up := &seenRequests{}
	srv := httptest.NewServer(gate.Wrap(up.handler()))
	defer srv.Close()

	send := func(path string, headers map[string]string, body string) *http.Response {
		t.Helper()
		method, rd := http.MethodGet, io.Reader(nil)
		if body != "" {
			method, rd = http.MethodPost, strings.NewReader(body)
		}
		req, _ := http.NewRequest(method, srv.URL+path, rd)
		if body != "" {
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		}
		for k, v := range headers {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp
	}

	tok := f.idp.Token(f.kid, claims{"scope": "orders.read"})
	resp := send("/x", map[string]string{"Authorization": "Bearer " + tok, "X-Copy": tok, "Txn-Token": "outside"}, "a=1")
	if resp.StatusCode != http.StatusOK || up.count() != 1 {
		t.Fatalf("valid token: %d, upstream calls %d", resp.StatusCode, up.count())
	}
	got := up.reqs[0]
	minted := strings.TrimPrefix(got.Header.Get("Authorization"), "Bearer ")
	if minted == tok || strings.Count(minted, ".") != 2 {
		t.Fatalf("upstream got %q", got.Header.Get("Authorization"))
	}
	if got.Header.Get("X-Copy") != "" || got.Header.Get("Txn-Token") != "" {
		t.Error("a copy of the inbound token or an outside Txn-Token reached the upstream")
	}
	c, _ := parseMinted(t, f.signer, minted)
	if c["scope"] != "orders.read" {
		t.Errorf("minted scope %v", c["scope"])
	}

	for _, tc := range []struct {
		name      string
		path      string
		headers   map[string]string
		body      string
		status    int
		challenge string
	}{
		{"no token", "/x", nil, "", 401, `Bearer realm="api"`},
		{"garbage", "/x", map[string]string{"Authorization": "Bearer x.y.z"}, "", 401, `error="invalid_token"`},
		{"token in the query", "/x?access_token=" + tok, map[string]string{"Authorization": "Bearer " + tok}, "", 400, `error="invalid_request"`},
		{"access_token in a form body", "/x", map[string]string{"Authorization": "Bearer " + tok}, "access_token=" + tok, 400, `error="invalid_request"`},
		{"required scope missing", "/x", map[string]string{"Authorization": "Bearer " + f.idp.Token(f.kid, claims{"scope": "orders.write"})}, "", 403, `scope="orders.read"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := up.count()
			resp := send(tc.path, tc.headers, tc.body)
			if resp.StatusCode != tc.status || !strings.Contains(resp.Header.Get("WWW-Authenticate"), tc.challenge) {
				t.Errorf("%d %q, want %d with %s", resp.StatusCode, resp.Header.Get("WWW-Authenticate"), tc.status, tc.challenge)
			}
			if up.count() != before {
				t.Error("the upstream was called")
			}
		})
	}
}

func TestTokenEndpointOverHTTP(t *testing.T) {
	f := newEngineFixture(t, "ES256")
	clients, err := NewClients(context.Background(), []ClientConfig{
		{ClientID: postID, SecretHash: bcryptHash(t, postSecret), Audiences: []string{"https://orders.internal"}, Scopes: []string{"orders.read"}},
	}, ClientOptions{TokenEndpointURLs: []string{testEndpoint}})
	if err != nil {
		t.Fatal(err)
	}
	defer clients.Close()
	var outcomes []*EndpointOutcome
	ep := &TokenEndpoint{Engine: f.engine, Clients: clients, Realm: "https://gateway.test",
		OnOutcome: func(_ *http.Request, o *EndpointOutcome) { outcomes = append(outcomes, o) }}
	srv := httptest.NewServer(ep)
	defer srv.Close()

	post := func(form url.Values, user, pass, contentType string) (*http.Response, map[string]any) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, srv.URL, strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", contentType)
		if user != "" {
			req.SetBasicAuth(url.QueryEscape(user), url.QueryEscape(pass))
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body map[string]any
		_ = json.NewDecoder(resp.Body).Decode(&body)
		return resp, body
	}
	form := url.Values{"grant_type": {GrantTypeTokenExchange}, "subject_token": {f.idp.Token(f.kid, claims{"scope": "orders.read"})},
		"subject_token_type": {TokenTypeAccessToken}}
	resp, body := post(form, postID, postSecret, "application/x-www-form-urlencoded")
	if resp.StatusCode != 200 || body["token_type"] != "Bearer" || resp.Header.Get("Cache-Control") != "no-store" {
		t.Fatalf("exchange: %d %v", resp.StatusCode, body)
	}
	c, _ := parseMinted(t, f.signer, body["access_token"].(string))
	if c["client_id"] != postID {
		t.Errorf("client_id %v", c["client_id"])
	}
	if o := outcomes[len(outcomes)-1]; o.Issued == nil || o.Client == nil || o.Client.ClientID != postID {
		t.Errorf("outcome %+v", o)
	}

	resp, body = post(url.Values{"grant_type": {"x"}}, postID, "wrong", "application/x-www-form-urlencoded")
	if resp.StatusCode != 401 || body["error"] != "invalid_client" || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Basic ") {
		t.Errorf("wrong secret: %d %v %q", resp.StatusCode, body, resp.Header.Get("WWW-Authenticate"))
	}
	if o := outcomes[len(outcomes)-1]; o.Code != "invalid_client" || o.ClaimedClientID != postID {
		t.Errorf("outcome %+v", o)
	}
	resp, body = post(form, postID, postSecret, "application/json")
	if resp.StatusCode != 400 || body["error"] != "invalid_request" {
		t.Errorf("JSON body: %d %v", resp.StatusCode, body)
	}
	getResp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	getResp.Body.Close()
	if getResp.StatusCode != http.StatusMethodNotAllowed || getResp.Header.Get("Allow") != http.MethodPost {
		t.Errorf("GET: %d allow %q", getResp.StatusCode, getResp.Header.Get("Allow"))
	}

	doc := Metadata(MetadataConfig{Issuer: "https://gateway.test", TokenEndpoint: testEndpoint, JWKSURI: "https://gateway.test/jwks"}, clients)
	if _, ok := doc["scopes_supported"]; ok {
		t.Error("scopes_supported published without configuration")
	}
	if _, ok := doc["token_endpoint_auth_signing_alg_values_supported"]; ok {
		t.Error("assertion algorithms published without a private_key_jwt client")
	}
}

// BenchmarkTokenEndpoint is one RFC 8693 exchange at the token endpoint,
// in process (no network): client authentication (client_secret_basic, its
// verified secret remembered as in production), form parsing, the subject
// token verified, a token minted, the JSON answer. A new subject token per
// request, as in the loopback comparison with zitadel's OP.
func BenchmarkTokenEndpoint(b *testing.B) {
	f := newEngineFixture(b, "ES256")
	clients, err := NewClients(context.Background(), []ClientConfig{
		{ClientID: postID, SecretHash: bcryptHash(b, postSecret), Audiences: []string{"https://orders.internal"}, Scopes: []string{"orders.read"}},
	}, ClientOptions{TokenEndpointURLs: []string{testEndpoint}})
	if err != nil {
		b.Fatal(err)
	}
	defer clients.Close()
	ep := &TokenEndpoint{Engine: f.engine, Clients: clients, Realm: "https://gateway.test"}
	tokens := make([]string, 512)
	for i := range tokens {
		tokens[i] = f.idp.Token(f.kid, claims{"scope": "orders.read", "jti": fmt.Sprint("bench-", i)})
	}
	f.engine.cache = nil // every request a new subject token: no cache hits
	i := 0
	b.ReportAllocs()
	for b.Loop() {
		form := "grant_type=" + url.QueryEscape(GrantTypeTokenExchange) + "&subject_token_type=" + url.QueryEscape(TokenTypeAccessToken) +
			"&subject_token=" + tokens[i%len(tokens)]
		req := httptest.NewRequest(http.MethodPost, testEndpoint, strings.NewReader(form))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.SetBasicAuth(postID, postSecret)
		w := httptest.NewRecorder()
		ep.ServeHTTP(w, req)
		if w.Code != 200 {
			b.Fatalf("status %d: %s", w.Code, w.Body)
		}
		i++
	}
}
