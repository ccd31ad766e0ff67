package exchange

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestRemoteSTSAgainstOurEndpoint: the remote STS client against this
// library's own RFC 8693 endpoint over HTTP: the token it returns is the
// STS's (act names the gateway's client there), it is cached like a minted
// one, and the subject's exp bounds it.
func TestRemoteSTSAgainstOurEndpoint(t *testing.T) {
	f := newEngineFixture(t, "ES256")
	clients, err := NewClients(context.Background(), []ClientConfig{
		{ClientID: "gw", SecretHash: bcryptHash(t, "gw-secret"), Audiences: []string{"https://orders.internal"}, Scopes: []string{"orders.read"}},
	}, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer clients.Close()
	var calls atomic.Int64
	srv := httptest.NewServer(&TokenEndpoint{Engine: f.engine, Clients: clients, Realm: "sts"})
	defer srv.Close()
	sts, err := NewRemoteSTS(RemoteSTSConfig{TokenEndpoint: srv.URL, ClientID: "gw", ClientSecret: "gw-secret",
		Audiences: []string{"https://orders.internal"}, Scopes: []string{"orders.read"}})
	if err != nil {
		t.Fatal(err)
	}
	sts.Calls = func() { calls.Add(1) }
	tok := f.idp.Token(f.kid, claims{"scope": "orders.read orders.write"})
	subject, err := f.engine.Verify(context.Background(), tok, "access_token")
	if err != nil {
		t.Fatal(err)
	}
	m, err := sts.Exchange(context.Background(), tok, subject)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := parseMinted(t, f.signer, m.Token)
	if act, _ := c["act"].(map[string]any); act["sub"] != "gw" || c["scope"] != "orders.read" || m.Token == tok {
		t.Fatalf("exchanged token claims %v", c)
	}
	again, err := sts.Exchange(context.Background(), tok, subject)
	if err != nil || !again.Cached || again.Token != m.Token || calls.Load() != 1 {
		t.Fatalf("second exchange: cached=%v calls=%d err=%v", again != nil && again.Cached, calls.Load(), err)
	}
	if m.Expiry.After(subject.Expiry) {
		t.Error("cached past the subject's exp")
	}
}

// TestRemoteSTSFaults: what the STS answers maps to the failure rule: its
// refusal of the token is the token's (401), its refusal of the gateway a
// 502, and a down, slow or garbled STS a 503, retried only when it may
// help; never a pass, never the inbound token upstream.
func TestRemoteSTSFaults(t *testing.T) {
	f := newEngineFixture(t, "ES256")
	tok := f.idp.Token(f.kid, claims{"scope": "orders.read"})
	subject, err := f.engine.Verify(context.Background(), tok, "access_token")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		handler http.HandlerFunc
		kind    Kind
		status  int
		calls   int64
	}{
		{"500, retried", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(500) }, KindUnavailable, 0, 3},
		{"429, retried", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(429) }, KindUnavailable, 0, 3},
		{"400 invalid_grant", func(w http.ResponseWriter, _ *http.Request) {
			w.WriteHeader(400)
			_, _ = w.Write([]byte(`{"error":"invalid_grant"}`))
		}, KindInvalidToken, 0, 1},
		{"401 for the gateway", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(401) }, KindUnavailable, http.StatusBadGateway, 1},
		{"garbage", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("<html>")) }, KindUnavailable, 0, 3},
		{"no access_token", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte(`{"token_type":"Bearer"}`)) }, KindUnavailable, 0, 3},
		{"a refresh token issued", func(w http.ResponseWriter, _ *http.Request) {
			_, _ = w.Write([]byte(`{"access_token":"rt-1","issued_token_type":"urn:ietf:params:oauth:token-type:refresh_token","token_type":"N_A"}`))
		}, KindUnavailable, 0, 1},
		{"slow", func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-time.After(2 * time.Second):
			case <-r.Context().Done():
			}
		}, KindUnavailable, 0, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var calls atomic.Int64
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				calls.Add(1)
				_ = r.ParseForm()
				if r.PostForm.Get("subject_token") != tok {
					t.Error("the STS did not get the subject token")
				}
				if got := r.PostForm.Get("requested_token_type"); got != TokenTypeAccessToken {
					t.Errorf("requested_token_type %q, want an access token", got)
				}
				tc.handler(w, r)
			}))
			defer srv.Close()
			sts, err := NewRemoteSTS(RemoteSTSConfig{TokenEndpoint: srv.URL, ClientID: "gw", ClientSecret: "s",
				Audiences: []string{"x"}, Timeout: 200 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			_, err = sts.Exchange(context.Background(), tok, subject)
			e := AsError(err)
			if e.Kind != tc.kind || e.Status != tc.status || calls.Load() != tc.calls {
				t.Fatalf("kind %d status %d after %d calls (%v), want kind %d status %d after %d", e.Kind, e.Status, calls.Load(), err, tc.kind, tc.status, tc.calls)
			}
			if strings.Contains(e.Description, tok) {
				t.Error("the description echoes the token")
			}
		})
	}
	down := httptest.NewServer(http.NotFoundHandler())
	addr := down.URL
	down.Close()
	sts, _ := NewRemoteSTS(RemoteSTSConfig{TokenEndpoint: addr, ClientID: "gw", ClientSecret: "s", Audiences: []string{"x"}})
	if _, err := sts.Exchange(context.Background(), tok, subject); AsError(err).Kind != KindUnavailable || AsError(err).RetryAfter <= 0 {
		t.Fatalf("STS down: %v", err)
	}
	if _, err := NewRemoteSTS(RemoteSTSConfig{TokenEndpoint: "ftp://x", ClientID: "a", ClientSecret: "b"}); err == nil {
		t.Error("a non-http token endpoint accepted")
	}
}

// BenchmarkRemoteSTSMiss is a cache miss through a remote STS (our own
// endpoint over loopback HTTP, as Kong or Airlock call theirs) against the
// in-process full miss, same run:
//
//	go test -run '^$' -bench 'RemoteSTSMiss|InProcessMiss' -benchmem ./exchange/
func BenchmarkRemoteSTSMiss(b *testing.B) {
	e, tok := benchEngine(b, "ES256", "ES256")
	clients, err := NewClients(context.Background(), []ClientConfig{
		{ClientID: "gw", SecretHash: bcryptHash(b, "gw-secret"), Audiences: []string{"https://orders.internal"}, Scopes: []string{"orders.read"}},
	}, ClientOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer clients.Close()
	srv := httptest.NewServer(&TokenEndpoint{Engine: e, Clients: clients, Realm: "sts"})
	defer srv.Close()
	sts, err := NewRemoteSTS(RemoteSTSConfig{TokenEndpoint: srv.URL, ClientID: "gw", ClientSecret: "gw-secret",
		Audiences: []string{"https://orders.internal"}, Scopes: []string{"orders.read"}, DisableCache: true})
	if err != nil {
		b.Fatal(err)
	}
	e.cache = nil
	ctx := context.Background()
	for b.Loop() {
		subject, err := e.Verify(ctx, tok, "access_token")
		if err != nil {
			b.Fatal(err)
		}
		if _, err := sts.Exchange(ctx, tok, subject); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkInProcessMiss is the in-process full miss of the same exchange.
func BenchmarkInProcessMiss(b *testing.B) {
	e, tok := benchEngine(b, "ES256", "ES256")
	e.cache = nil
	grant, err := NewGrant(Grant{Audiences: []string{"https://orders.internal"}, Scopes: []string{"orders.read"}})
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := e.ExchangeBearer(context.Background(), tok, grant, nil); err != nil {
			b.Fatal(err)
		}
	}
}
