package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jwt"
	"github.com/modelcontextprotocol/go-sdk/auth"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/modelcontextprotocol/go-sdk/oauthex"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// MCP servers behind the gateway (issue 17): two MCP servers built with the
// official Go SDK, each behind its own token_exchange route with a
// resource, in real Caddy.

func resourceURL(name string) string {
	return fmt.Sprintf("http://localhost:%d/%s/mcp", gatewayPort, name)
}

func metadataURL(name string) string {
	return fmt.Sprintf("http://localhost:%d/.well-known/oauth-protected-resource/%s/mcp", gatewayPort, name)
}

type mcpGateway struct {
	tester  *caddytest.Tester
	idp     *testidp.Issuer
	kid     string
	logFile string
}

// startMCPGateway runs Caddy with routes /a/* and /b/* in front of
// upstreams a and b, each bound to its resource URL.
func startMCPGateway(t *testing.T, a, b string) *mcpGateway {
	t.Helper()
	idp := testidp.New(t, "https://idp.test")
	kid := idp.AddKey("ec-1", "ES256")
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	route := func(name, upstream string) string {
		return fmt.Sprintf(`	route /%[1]s/* {
		token_exchange {
			resource %[2]s {
				resource_name "MCP server %[1]s"
				resource_documentation https://docs.example.com/%[1]s
			}
			audience https://mcp-%[1]s.internal
			scope tools.call tools.admin
			require_scope tools.call
		}
		reverse_proxy %[3]s
	}
`, name, resourceURL(name), strings.TrimPrefix(upstream, "http://"))
	}
	config := fmt.Sprintf(`{
%s	token_exchange {
		issuer %s
		trust https://idp.test {
			jwks_url %s
			audience https://gateway.test %s %s
			algorithms ES256
			map_scope mcp:tools tools.call
			map_scope mcp:admin tools.admin
		}
	}
}
http://localhost:%d {
	token_exchange_resource_metadata
%s%s	handle /.well-known/jwks.json {
		token_exchange_jwks
	}
}
`, testGlobalOptions(logFile, t.TempDir()), gatewayIssuer, idp.JWKSURL(), resourceURL("a"), resourceURL("b"),
		gatewayPort, route("a", a), route("b", b))
	tester := caddytest.NewTester(t)
	tester.InitServer(config, "caddyfile")
	return &mcpGateway{tester: tester, idp: idp, kid: kid, logFile: logFile}
}

// seenByUpstream records what reached an MCP server.
type seenByUpstream struct {
	mu       sync.Mutex
	auth     []string
	sessions []string
	methods  []string
}

func (s *seenByUpstream) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.auth = append(s.auth, r.Header.Get("Authorization"))
		s.sessions = append(s.sessions, r.Header.Get("Mcp-Session-Id"))
		s.methods = append(s.methods, r.Method)
		s.mu.Unlock()
		next.ServeHTTP(w, r)
	})
}

func (s *seenByUpstream) snapshot() (auth, sessions, methods []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.auth), slices.Clone(s.sessions), slices.Clone(s.methods)
}

// gatewayVerifier is what an MCP server behind the gateway runs in the
// SDK's RequireBearerToken: the token must verify against the gateway's
// JWKS (fetched over HTTP), come from the gateway and be minted for this
// server's audience.
func gatewayVerifier(audience string) auth.TokenVerifier {
	return func(ctx context.Context, token string, _ *http.Request) (*auth.TokenInfo, error) {
		set, err := jwk.Fetch(ctx, fmt.Sprintf("http://localhost:%d/.well-known/jwks.json", gatewayPort))
		if err != nil {
			return nil, fmt.Errorf("jwks: %w", err)
		}
		tok, err := jwt.Parse([]byte(token), jwt.WithKeySet(set), jwt.WithValidate(true),
			jwt.WithIssuer(gatewayIssuer), jwt.WithAudience(audience))
		if err != nil {
			return nil, fmt.Errorf("%w: %v", auth.ErrInvalidToken, err)
		}
		sub, _ := tok.Subject()
		exp, _ := tok.Expiration()
		var scope string
		_ = tok.Get("scope", &scope)
		var act map[string]any
		_ = tok.Get("act", &act)
		return &auth.TokenInfo{UserID: sub, Expiration: exp, Scopes: strings.Fields(scope),
			Extra: map[string]any{"act": act}}, nil
	}
}

type whoami struct {
	Sub   string `json:"sub"`
	Actor string `json:"actor"`
	Scope string `json:"scope"`
}

// newMCPServer is an MCP server with the SDK's bearer-token middleware. Its
// "whoami" tool reports the caller the server sees; before answering it
// sends a progress notification and waits until the client has it, so the
// call only completes if the gateway streams (flushes) the SSE response.
func newMCPServer(t *testing.T, name string, progressSeen <-chan struct{}) (*mcp.Server, *httptest.Server, *seenByUpstream) {
	server := mcp.NewServer(&mcp.Implementation{Name: "mcp-" + name, Version: "v1"}, nil)
	mcp.AddTool(server, &mcp.Tool{Name: "whoami", Description: "who the server sees"},
		func(ctx context.Context, req *mcp.CallToolRequest, _ struct{}) (*mcp.CallToolResult, whoami, error) {
			ti := req.Extra.TokenInfo
			if ti == nil {
				return nil, whoami{}, errors.New("no token info")
			}
			if tok := req.Params.GetProgressToken(); tok != nil && progressSeen != nil {
				if err := req.Session.NotifyProgress(ctx, &mcp.ProgressNotificationParams{ProgressToken: tok, Progress: 1, Total: 2, Message: "halfway"}); err != nil {
					return nil, whoami{}, err
				}
				select {
				case <-progressSeen:
				case <-time.After(10 * time.Second):
					return nil, whoami{}, errors.New("the client never saw the progress notification: the SSE stream was buffered")
				}
			}
			act, _ := ti.Extra["act"].(map[string]any)
			actor, _ := act["sub"].(string)
			return nil, whoami{Sub: ti.UserID, Actor: actor, Scope: strings.Join(ti.Scopes, " ")}, nil
		})
	handler := mcp.NewStreamableHTTPHandler(func(*http.Request) *mcp.Server { return server }, nil)
	seen := &seenByUpstream{}
	protected := auth.RequireBearerToken(gatewayVerifier("https://mcp-"+name+".internal"), nil)(handler)
	srv := httptest.NewServer(seen.wrap(protected))
	t.Cleanup(srv.Close)
	return server, srv, seen
}

// bearerTransport sends a fixed bearer token, as an MCP client does once it
// has obtained one.
type bearerTransport struct{ token string }

func (b bearerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+b.token)
	return http.DefaultTransport.RoundTrip(r)
}

func TestMCPServersBehindGateway(t *testing.T) {
	progressSeen := make(chan struct{}, 1)
	serverA, upA, seenA := newMCPServer(t, "a", progressSeen)
	_, upB, seenB := newMCPServer(t, "b", nil)
	g := startMCPGateway(t, upA.URL, upB.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// 1. The client knows only the server's URL: its first request gets the
	// challenge, and the SDK's oauthex helpers find the metadata from it.
	req, _ := http.NewRequest(http.MethodPost, resourceURL("a"), strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"ping"}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("no token: %d", resp.StatusCode)
	}
	t.Logf("401 challenge: WWW-Authenticate: %s", resp.Header.Get("WWW-Authenticate"))
	challenges, err := oauthex.ParseWWWAuthenticate(resp.Header.Values("WWW-Authenticate"))
	if err != nil || len(challenges) != 1 || challenges[0].Scheme != "bearer" {
		t.Fatalf("challenge %q: %v %+v", resp.Header.Get("WWW-Authenticate"), err, challenges)
	}
	if got := challenges[0].Params["resource_metadata"]; got != metadataURL("a") {
		t.Fatalf("resource_metadata = %q, want %q", got, metadataURL("a"))
	}
	if got := challenges[0].Params["scope"]; got != "mcp:tools" {
		t.Fatalf("challenge scope = %q, want the IdP's name of the required scope", got)
	}
	prm, err := oauthex.GetProtectedResourceMetadata(ctx, challenges[0].Params["resource_metadata"], resourceURL("a"), http.DefaultClient)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := json.Marshal(prm)
	t.Logf("metadata document: %s", raw)
	if prm.Resource != resourceURL("a") || !slices.Equal(prm.AuthorizationServers, []string{"https://idp.test"}) ||
		!slices.Equal(prm.ScopesSupported, []string{"mcp:tools", "mcp:admin"}) || !slices.Equal(prm.BearerMethodsSupported, []string{"header"}) ||
		prm.ResourceDocumentation != "https://docs.example.com/a" || prm.ResourceName != "MCP server a" {
		t.Fatalf("metadata %s", raw)
	}
	// B's document is B's, and the SDK refuses A's document for B.
	if _, err := oauthex.GetProtectedResourceMetadata(ctx, metadataURL("a"), resourceURL("b"), http.DefaultClient); err == nil {
		t.Fatal("the SDK accepted A's metadata for B")
	}
	prmB, err := oauthex.GetProtectedResourceMetadata(ctx, metadataURL("b"), resourceURL("b"), http.DefaultClient)
	if err != nil || prmB.Resource != resourceURL("b") {
		t.Fatalf("B's metadata: %v %+v", err, prmB)
	}

	// 2. The token: requested from the authorization server the metadata
	// names, for the resource (RFC 8707) and a scope it lists. The test
	// issuer signs it directly (no /authorize + PKCE round trip).
	tokA := g.idp.Token(g.kid, testidp.Claims{"sub": "alice", "aud": prm.Resource, "scope": "mcp:tools openid", "client_id": "mcp-client"})

	// 3. The SDK client through the gateway: initialize, the standalone GET
	// stream, list and call a tool (its response streamed as SSE with a
	// progress notification first), a server-initiated notification on the
	// GET stream.
	listChanged := make(chan struct{}, 1)
	client := mcp.NewClient(&mcp.Implementation{Name: "test-client", Version: "v1"}, &mcp.ClientOptions{
		ProgressNotificationHandler: func(context.Context, *mcp.ProgressNotificationClientRequest) {
			select {
			case progressSeen <- struct{}{}:
			default:
			}
		},
		ToolListChangedHandler: func(context.Context, *mcp.ToolListChangedRequest) {
			select {
			case listChanged <- struct{}{}:
			default:
			}
		},
	})
	session, err := client.Connect(ctx, &mcp.StreamableClientTransport{
		Endpoint:   resourceURL("a"),
		HTTPClient: &http.Client{Transport: bearerTransport{tokA}},
	}, nil)
	if err != nil {
		t.Fatalf("connect through the gateway: %v", err)
	}
	defer session.Close()
	tools, err := session.ListTools(ctx, nil)
	if err != nil || len(tools.Tools) != 1 || tools.Tools[0].Name != "whoami" {
		t.Fatalf("list tools: %v %+v", err, tools)
	}
	params := &mcp.CallToolParams{Name: "whoami", Arguments: map[string]any{}}
	params.SetProgressToken("p1")
	res, err := session.CallTool(ctx, params)
	if err != nil || res.IsError {
		t.Fatalf("call tool: %v %+v", err, res)
	}
	var who whoami
	b, _ := json.Marshal(res.StructuredContent)
	if err := json.Unmarshal(b, &who); err != nil {
		t.Fatal(err)
	}
	if who.Sub != "alice" || who.Actor != gatewayIssuer || who.Scope != "tools.call" {
		t.Fatalf("the MCP server saw %+v, want sub alice, act.sub %s, scope tools.call", who, gatewayIssuer)
	}
	// A long-lived GET stream: a server-initiated notification arrives on
	// it a while after it was opened.
	time.Sleep(1500 * time.Millisecond)
	mcp.AddTool(serverA, &mcp.Tool{Name: "late"}, func(context.Context, *mcp.CallToolRequest, struct{}) (*mcp.CallToolResult, any, error) {
		return &mcp.CallToolResult{}, nil, nil
	})
	select {
	case <-listChanged:
	case <-time.After(10 * time.Second):
		t.Fatal("the server's notification on the GET stream never arrived through the gateway")
	}
	if _, err := session.CallTool(ctx, &mcp.CallToolParams{Name: "whoami", Arguments: map[string]any{}}); err != nil {
		t.Fatal(err)
	}

	// Every request of the session reached the server with one minted
	// token (the cached exchange) and, after initialize, one session id.
	auths, sessions, methods := seenA.snapshot()
	if len(auths) < 5 || !slices.Contains(methods, http.MethodGet) {
		t.Fatalf("the MCP server saw %d requests (%v), want initialize, initialized, the GET stream, list and calls", len(auths), methods)
	}
	for i, a := range auths {
		if a != auths[0] || a == "Bearer "+tokA {
			t.Fatalf("request %d carried another token than the first (or the client's own)", i)
		}
	}
	// Before the server assigns the session (initialize) there is none;
	// after it, every request carries the one the server chose.
	sid := sessions[len(sessions)-1]
	first := slices.IndexFunc(sessions, func(s string) bool { return s != "" })
	if sid == "" || first < 1 || len(sessions)-first < 4 {
		t.Fatalf("session ids %v (methods %v)", sessions, methods)
	}
	for _, s := range sessions[first:] {
		if s != sid {
			t.Fatalf("session ids %v", sessions)
		}
	}
	logs, _ := os.ReadFile(g.logFile)
	if n := strings.Count(string(logs), `"msg":"token exchanged"`); n != 1 {
		t.Fatalf("%d exchanges minted for one session, want 1 (the rest from the cache)", n)
	}
	if n := strings.Count(string(logs), `"msg":"token exchange reused from cache"`); n < len(auths)-1 {
		t.Fatalf("%d cache hits for %d requests", n, len(auths))
	}

	// 4. A token for A is refused at B, with B's challenge; B never sees it.
	_, err = client.Connect(ctx, &mcp.StreamableClientTransport{
		Endpoint:   resourceURL("b"),
		HTTPClient: &http.Client{Transport: bearerTransport{tokA}},
	}, nil)
	if err == nil {
		t.Fatal("a token for A connected to B")
	}
	req, _ = http.NewRequest(http.MethodPost, resourceURL("b"), strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"ping"}`))
	req.Header.Set("Authorization", "Bearer "+tokA)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	ch := resp.Header.Get("WWW-Authenticate")
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(ch, `error="invalid_token"`) || !strings.Contains(ch, `resource_metadata="`+metadataURL("b")+`"`) {
		t.Fatalf("token for A at B: %d %q", resp.StatusCode, ch)
	}
	if auths, _, _ := seenB.snapshot(); len(auths) != 0 {
		t.Fatalf("B was called %d times with A's token", len(auths))
	}
	// ... while a token for B works there.
	tokB := g.idp.Token(g.kid, testidp.Claims{"sub": "bob", "aud": resourceURL("b"), "scope": "mcp:tools mcp:admin"})
	sessionB, err := client.Connect(ctx, &mcp.StreamableClientTransport{
		Endpoint: resourceURL("b"), HTTPClient: &http.Client{Transport: bearerTransport{tokB}}, DisableStandaloneSSE: true,
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sessionB.Close()
	res, err = sessionB.CallTool(ctx, &mcp.CallToolParams{Name: "whoami", Arguments: map[string]any{}})
	if err != nil || res.IsError {
		t.Fatalf("B: %v %+v", err, res)
	}
	b, _ = json.Marshal(res.StructuredContent)
	if err := json.Unmarshal(b, &who); err != nil || who.Sub != "bob" || who.Scope != "tools.call tools.admin" {
		t.Fatalf("B saw %s", b)
	}
	gw := &gateway{logFile: g.logFile}
	gw.assertNoTokenLogged(t, tokA, tokB)
}

// The metadata documents through Caddy: exact bodies, and 404 for what no
// route describes (the root document, an unknown path); hosts are matched
// in exchange's TestProtectedResourceDocument (Caddy routes by host first).
func TestResourceMetadataDocuments(t *testing.T) {
	up := newRecordingUpstream(t)
	startMCPGateway(t, up.URL, up.URL)
	get := func(host, path string) (int, string) {
		req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://localhost:%d%s", gatewayPort, path), nil)
		if host != "" {
			req.Host = host
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	code, body := get("", "/.well-known/oauth-protected-resource/b/mcp")
	want := fmt.Sprintf(`{"resource":"%s","authorization_servers":["https://idp.test"],"scopes_supported":["mcp:tools","mcp:admin"],"bearer_methods_supported":["header"],"resource_name":"MCP server b","resource_documentation":"https://docs.example.com/b"}`, resourceURL("b"))
	if code != 200 || body != want {
		t.Fatalf("%d %s\nwant %s", code, body, want)
	}
	for _, c := range []struct{ host, path string }{
		{"", "/.well-known/oauth-protected-resource"},
		{"", "/.well-known/oauth-protected-resource/c/mcp"},
		{"", "/.well-known/oauth-protected-resource/b"},
		{"", "/.well-known/oauth-protected-resource/b/mcp/extra"},
	} {
		if code, body := get(c.host, c.path); code != 404 {
			t.Errorf("%s%s: %d %s", c.host, c.path, code, body)
		}
	}
	if up.calls() != 0 {
		t.Fatal("a metadata request reached the upstream")
	}
}

// Configuration errors: Caddyfile syntax names the line; what needs the
// global option is refused at provision.
func TestResourceConfigErrors(t *testing.T) {
	handler := func(body string) string {
		return "{\n\ttoken_exchange {\n\t\tissuer https://gw\n\t}\n}\n:8080 {\n\ttoken_exchange {\n\t\taudience a\n" + body + "\n\t}\n}\n"
	}
	for _, c := range []struct{ name, input, want string }{
		{"plain http off loopback", handler("\t\tresource http://mcp.example.com/a"), "must be https"},
		{"query", handler("\t\tresource https://mcp.example.com/a?x=1"), "no query"},
		{"no URL", handler("\t\tresource"), "wrong argument count"},
		{"unknown option", handler("\t\tresource https://mcp.example.com/a {\n\t\t\tcolour blue\n\t\t}"), "unrecognized resource option 'colour'"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := adapt(t, c.input)
			if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "Caddyfile:") {
				t.Fatalf("error %v, want %q with the line", err, c.want)
			}
		})
	}
	idp := testidp.New(t, "https://idp.test")
	idp.AddKey("k", "ES256")
	provision := func(resourceBlock string) error {
		input := fmt.Sprintf(`{
	storage file_system %s
	token_exchange {
		issuer https://gw
		trust https://idp.test {
			jwks_url %s
			audience https://gw https://mcp.example.com/a
			algorithms ES256
		}
	}
}
http://localhost:1 {
	token_exchange {
		audience https://a.internal
		%s
	}
	respond ok
}
`, t.TempDir(), idp.JWKSURL(), resourceBlock)
		adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input), map[string]any{"filename": "Caddyfile"})
		if err != nil {
			t.Fatal(err)
		}
		var cfg caddy.Config
		if err := json.Unmarshal(adapted, &cfg); err != nil {
			t.Fatal(err)
		}
		return caddy.Validate(&cfg)
	}
	if err := provision("resource https://mcp.example.com/a"); err != nil {
		t.Fatalf("a valid resource: %v", err)
	}
	for _, c := range []struct{ block, want string }{
		{"resource https://mcp.example.com/b", "in no trust block's audience list"},
		{"resource https://mcp.example.com/a {\n\t\t\tauthorization_server https://other-idp.test\n\t\t}", "not a trusted issuer"},
		{"resource https://mcp.example.com/a {\n\t\t\tresource_documentation http://docs.example.com\n\t\t}", "resource documentation"},
	} {
		if err := provision(c.block); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.block, err, c.want)
		}
	}
}
