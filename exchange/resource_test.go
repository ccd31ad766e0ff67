package exchange

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestResourceMetadataURL(t *testing.T) {
	for _, c := range []struct{ resource, want string }{
		{"https://mcp.example.com/a/mcp", "https://mcp.example.com/.well-known/oauth-protected-resource/a/mcp"},
		{"https://mcp.example.com/a/mcp/", "https://mcp.example.com/.well-known/oauth-protected-resource/a/mcp"},
		{"https://mcp.example.com", "https://mcp.example.com/.well-known/oauth-protected-resource"},
		{"https://mcp.example.com/", "https://mcp.example.com/.well-known/oauth-protected-resource"},
		{"https://mcp.example.com:8443/x%20y", "https://mcp.example.com:8443/.well-known/oauth-protected-resource/x%20y"},
		{"http://localhost:9000/mcp", "http://localhost:9000/.well-known/oauth-protected-resource/mcp"},
		{"http://127.0.0.1:9000/mcp", "http://127.0.0.1:9000/.well-known/oauth-protected-resource/mcp"},
	} {
		got, err := ResourceMetadataURL(c.resource)
		if err != nil || got != c.want {
			t.Errorf("ResourceMetadataURL(%q) = %q, %v; want %q", c.resource, got, err, c.want)
		}
	}
	for _, bad := range []string{
		"http://mcp.example.com/mcp", // plain http off loopback
		"https://mcp.example.com/mcp?x=1",
		"https://mcp.example.com/mcp#frag",
		"https://user@mcp.example.com/mcp",
		"/mcp",
		"ftp://mcp.example.com/",
		"",
	} {
		if _, err := ResourceMetadataURL(bad); err == nil {
			t.Errorf("ResourceMetadataURL(%q) accepted", bad)
		}
	}
}

func TestProtectedResourceDocument(t *testing.T) {
	if _, err := NewProtectedResource(ProtectedResource{Resource: "https://mcp.example.com/a"}); err == nil {
		t.Fatal("a document without authorization servers was accepted")
	}
	if _, err := NewProtectedResource(ProtectedResource{Resource: "https://mcp.example.com/a", AuthorizationServers: []string{"javascript:alert(1)"}}); err == nil {
		t.Fatal("a javascript: authorization server was accepted")
	}
	p, err := NewProtectedResource(ProtectedResource{
		Resource:              "https://mcp.example.com/a/mcp",
		AuthorizationServers:  []string{"https://idp.example.com"},
		ScopesSupported:       []string{"read:orders"},
		ResourceDocumentation: "https://docs.example.com/a",
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		host, path string
		want       bool
	}{
		{"mcp.example.com", "/.well-known/oauth-protected-resource/a/mcp", true},
		{"MCP.example.com:443", "/.well-known/oauth-protected-resource/a/mcp", true},
		{"mcp.example.com:8443", "/.well-known/oauth-protected-resource/a/mcp", false},
		{"other.example.com", "/.well-known/oauth-protected-resource/a/mcp", false},
		{"mcp.example.com", "/.well-known/oauth-protected-resource/a", false},
		{"mcp.example.com", "/.well-known/oauth-protected-resource", false},
		{"mcp.example.com", "/.well-known/oauth-protected-resource/a/mcp/x", false},
	} {
		if got := p.Matches(c.host, c.path); got != c.want {
			t.Errorf("Matches(%q, %q) = %v", c.host, c.path, got)
		}
	}
	rec := httptest.NewRecorder()
	p.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/.well-known/oauth-protected-resource/a/mcp", nil))
	var doc map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &doc); err != nil || rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	want := `{"resource":"https://mcp.example.com/a/mcp","authorization_servers":["https://idp.example.com"],"scopes_supported":["read:orders"],"bearer_methods_supported":["header"],"resource_documentation":"https://docs.example.com/a"}`
	if rec.Body.String() != want || rec.Header().Get("Content-Type") != "application/json" {
		t.Fatalf("document %s (%s), want %s", rec.Body, rec.Header().Get("Content-Type"), want)
	}
	rec = httptest.NewRecorder()
	p.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/.well-known/oauth-protected-resource/a/mcp", nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Fatalf("POST: %d", rec.Code)
	}
}

func TestScopeMapExternal(t *testing.T) {
	m := ScopeMap{Map: map[string][]string{"read:orders": {"orders.read"}, "orders:all": {"orders.read", "orders.write"}}}
	if got := FormatScope(m.External([]string{"orders.write", "orders.read", "profile"})); got != "orders:all read:orders" {
		t.Fatalf("External = %q", got)
	}
	m.PassUnmapped = true
	if got := FormatScope(m.External([]string{"orders.read", "profile"})); got != "orders:all read:orders orders.read profile" {
		t.Fatalf("External with pass-unmapped = %q", got)
	}
	if got := FormatScope(ScopeMap{}.External([]string{"a", "b"})); got != "a b" {
		t.Fatalf("External without a map = %q", got)
	}
}

// A route bound to a resource: the challenge points at its metadata, and
// only tokens whose aud names that resource (and whose issuer is trusted
// for it) pass; a token for another MCP server is refused.
func TestBearerGateResource(t *testing.T) {
	const resA, resB, resC = "https://mcp.example.com/a/mcp", "https://mcp.example.com/b/mcp", "https://mcp.example.com/c/mcp"
	idp := newTestIssuer(t, "https://idp.test")
	kid := idp.AddKey("k", "ES256")
	ic := issuerConfig(idp, "ES256")
	ic.Audiences = []string{"https://gateway.test", resA, resB}
	ts := newTestTrust(t, ic)
	key, err := GenerateSigningKey("ES256")
	if err != nil {
		t.Fatal(err)
	}
	signer, err := NewSigner(key, "ES256")
	if err != nil {
		t.Fatal(err)
	}
	engine, err := NewEngine(EngineConfig{Issuer: "https://gateway.test", TokenLifetime: 5 * time.Minute}, ts, signer)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewGrant(Grant{Audiences: []string{"https://a.internal"}, Resource: "http://mcp.example.com/a"}); err == nil {
		t.Fatal("a plain-http resource off loopback was accepted")
	}
	serve := func(resource string) (*httptest.Server, *seenRequests) {
		grant, err := NewGrant(Grant{Audiences: []string{"https://a.internal"}, Scopes: []string{"tools.read"}, Resource: resource})
		if err != nil {
			t.Fatal(err)
		}
		gate, err := NewBearerGate(engine, grant, "mcp")
		if err != nil {
			t.Fatal(err)
		}
		gate.ResourceMetadata, _ = ResourceMetadataURL(resource)
		gate.ChallengeScope = []string{"mcp:tools"}
		up := &seenRequests{}
		srv := httptest.NewServer(gate.Wrap(up.handler()))
		t.Cleanup(srv.Close)
		return srv, up
	}
	srvA, upA := serve(resA)
	srvC, upC := serve(resC)
	call := func(srv *httptest.Server, tok string) *http.Response {
		req, _ := http.NewRequest(http.MethodPost, srv.URL+"/mcp", strings.NewReader(`{}`))
		if tok != "" {
			req.Header.Set("Authorization", "Bearer "+tok)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp
	}

	resp := call(srvA, "")
	wantNoToken := `Bearer realm="mcp", scope="mcp:tools", resource_metadata="https://mcp.example.com/.well-known/oauth-protected-resource/a/mcp"`
	if resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") != wantNoToken {
		t.Fatalf("no token: %d %q, want %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"), wantNoToken)
	}
	for name, aud := range map[string]any{
		"token for B":                  resB,
		"token for the gateway":        "https://gateway.test",
		"token for B and the gateway":  []string{resB, "https://gateway.test"},
		"resource as a prefix":         resA + "/x",
		"resource without its path":    "https://mcp.example.com",
		"resource with a trailing '/'": resA + "/",
	} {
		resp := call(srvA, idp.Token(kid, claims{"aud": aud, "scope": "tools.read"}))
		ch := resp.Header.Get("WWW-Authenticate")
		if resp.StatusCode != 401 || !strings.Contains(ch, `error="invalid_token"`) || !strings.Contains(ch, `resource_metadata="https://mcp.example.com/.well-known/oauth-protected-resource/a/mcp"`) {
			t.Errorf("%s: %d %q", name, resp.StatusCode, ch)
		}
	}
	if upA.count() != 0 {
		t.Fatalf("the upstream was called %d times for refused tokens", upA.count())
	}
	tokA := idp.Token(kid, claims{"aud": []string{"https://gateway.test", resA}, "scope": "tools.read"})
	if resp := call(srvA, tokA); resp.StatusCode != 200 || upA.count() != 1 {
		t.Fatalf("token for A at A: %d", resp.StatusCode)
	}
	// The same token at C, where the issuer is not trusted for C even though
	// the token names it: refused.
	tokC := idp.Token(kid, claims{"aud": []string{"https://gateway.test", resC}, "scope": "tools.read"})
	if resp := call(srvC, tokC); resp.StatusCode != 401 || upC.count() != 0 {
		t.Fatalf("token for C at C, issuer not trusted for C: %d", resp.StatusCode)
	}
}
