package caddymodule

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/zitadel/oidc/v3/example/server/exampleop"
	"github.com/zitadel/oidc/v3/example/server/storage"
	"github.com/zitadel/oidc/v3/pkg/oidc"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// Issue 13 item 4: a third-party RFC 7662 introspection server nobody here
// wrote, the zitadel/oidc v3 example OP (exampleop with its in-memory
// storage), with an opaque access token it issued through its own
// authorization code flow.

const zitadelRedirect = "http://localhost:9999/auth/callback"

// issStorage is the example storage, unchanged but for its introspection
// answers, which also carry iss and aud (RFC 7662 §2.2 makes both
// optional; the example leaves them out). aud is the introspecting client,
// which the example storage has checked to be among the token's audience.
type issStorage struct {
	*storage.Storage
	iss string
}

func (s issStorage) SetIntrospectionFromToken(ctx context.Context, in *oidc.IntrospectionResponse, tokenID, subject, clientID string) error {
	if err := s.Storage.SetIntrospectionFromToken(ctx, in, tokenID, subject, clientID); err != nil {
		return err
	}
	in.Issuer, in.Audience = s.iss, oidc.Audience{clientID}
	return nil
}

// startZitadelOP serves the example OP on a loopback port; withIssAud
// wraps its storage in issStorage.
func startZitadelOP(t *testing.T, withIssAud bool) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	iss := "http://" + ln.Addr().String()
	st := storage.NewStorageWithClients(storage.NewUserStore(iss), map[string]*storage.Client{
		"web": storage.WebClient("web", "secret", zitadelRedirect),
	})
	var s exampleop.Storage = st
	if withIssAud {
		s = issStorage{Storage: st, iss: iss}
	}
	srv := httptest.NewUnstartedServer(exampleop.SetupServer(iss, s, nil, false))
	_ = srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)
	return iss
}

// zitadelOpaqueToken runs the OP's authorization code flow for user id1
// (its login form, its callback, its token endpoint with client web) and
// returns the opaque access token it issues.
func zitadelOpaqueToken(t *testing.T, iss string) string {
	t.Helper()
	hc := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	location := func(resp *http.Response, err error) *url.URL {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		u, err := resp.Location()
		if err != nil {
			t.Fatalf("%s: status %d, no redirect: %v", resp.Request.URL.Path, resp.StatusCode, err)
		}
		return u
	}
	q := url.Values{"client_id": {"web"}, "redirect_uri": {zitadelRedirect}, "response_type": {"code"},
		"scope": {"openid email"}, "state": {"s1"}}
	login := location(hc.Get(iss + "/auth?" + q.Encode()))
	host, _, _ := net.SplitHostPort(strings.TrimPrefix(iss, "http://"))
	callback := location(hc.PostForm(iss+"/login/username", url.Values{
		"username": {"test-user@" + host}, "password": {"verysecure"}, "id": {login.Query().Get("authRequestID")}}))
	if !callback.IsAbs() {
		callback = must(url.Parse(iss)).ResolveReference(callback)
	}
	code := location(hc.Get(callback.String())).Query().Get("code")
	if code == "" {
		t.Fatal("the OP issued no authorization code")
	}
	req, _ := http.NewRequest(http.MethodPost, iss+"/oauth/token", strings.NewReader(url.Values{
		"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {zitadelRedirect}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth("web", "secret")
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var tr oidc.AccessTokenResponse
	if err := json.NewDecoder(resp.Body).Decode(&tr); err != nil || tr.AccessToken == "" {
		t.Fatalf("token endpoint: status %d, %v", resp.StatusCode, err)
	}
	if strings.Count(tr.AccessToken, ".") == 2 {
		t.Fatal("the OP issued a JWT access token; the web client's tokens should be opaque")
	}
	return tr.AccessToken
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func TestInteropZitadelIntrospection(t *testing.T) {
	t.Setenv(introSecretEnv, "secret")
	trust := `			discovery
			audience web
			opaque_tokens
			introspection_client_id web
			introspection_client_secret {env.` + introSecretEnv + `}
			introspection_timeout 2s
			map_scope email orders.read
`
	t.Run("iss and aud in the answer", func(t *testing.T) {
		iss := startZitadelOP(t, true)
		g := startIdPGateway(t, &testidp.Issuer{Iss: iss}, trust)
		tok := zitadelOpaqueToken(t, iss)
		if resp := g.try(t, tok); resp.StatusCode != http.StatusOK {
			t.Fatalf("the OP's opaque token: status %d (%s)", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
		}
		if m := g.mintedClaims(t); m["sub"] != "id1" || m["scope"] != "orders.read" || m["client_id"] != "web" {
			t.Fatalf("minted claims %v: want sub id1 (the OP's user), scope orders.read (email mapped), client_id web", m)
		}
		// a token the OP never issued: it answers active false
		if resp := g.try(t, "not-issued-by-the-op"); resp.StatusCode != http.StatusUnauthorized ||
			!strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="invalid_token"`) {
			t.Fatalf("unknown token: status %d", resp.StatusCode)
		}
		g.assertNoTokenLogged(t, tok)
	})
	// The unchanged example answers without aud: the gateway cannot tell
	// whom the token is for, so it refuses it (401), never passes it.
	t.Run("unchanged example: no aud", func(t *testing.T) {
		iss := startZitadelOP(t, false)
		g := startIdPGateway(t, &testidp.Issuer{Iss: iss}, trust)
		tok := zitadelOpaqueToken(t, iss)
		resp := g.try(t, tok)
		if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("WWW-Authenticate"), "audience") {
			t.Fatalf("an answer without aud: status %d (%s), want 401 for the audience", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
		}
		if g.upstream.calls() != 0 {
			t.Fatal("the upstream was called")
		}
	})
}
