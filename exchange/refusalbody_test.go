package exchange

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestBearerRefusalBody: 401 and 403 carry a short JSON body naming the
// same error as the challenge, so `curl -s` shows why, and never the token.
func TestBearerRefusalBody(t *testing.T) {
	f := newEngineFixture(t, "ES256")
	grant := &Grant{Audiences: []string{"https://orders.internal"}, Scopes: []string{"orders.read"}, RequireScopes: []string{"orders.read"}}
	gate, err := NewBearerGate(f.engine, grant, "api")
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(gate.Wrap(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		t.Error("the upstream was called")
	})))
	defer srv.Close()

	expired := f.idp.Token(f.kid, claims{"scope": "orders.read", "exp": 1})
	noScope := f.idp.Token(f.kid, claims{"scope": "profile"})
	cases := []struct {
		name, token    string
		status         int
		code, descPart string
	}{
		{"no token", "", 401, "unauthorized", "no bearer token"},
		{"garbage", "not.a.token", 401, "invalid_token", "base64url"},
		{"expired", expired, 401, "invalid_token", "expired"},
		{"no scope", noScope, 403, "insufficient_scope", "orders.read"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(http.MethodGet, srv.URL+"/api", nil)
			if tc.token != "" {
				req.Header.Set("Authorization", "Bearer "+tc.token)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.status)
			}
			if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
				t.Fatalf("Content-Type %q", ct)
			}
			var body struct {
				Error       string `json:"error"`
				Description string `json:"error_description"`
			}
			raw := new(strings.Builder)
			if err := json.NewDecoder(io.TeeReader(resp.Body, raw)).Decode(&body); err != nil {
				t.Fatal(err)
			}
			if body.Error != tc.code || !strings.Contains(body.Description, tc.descPart) {
				t.Fatalf("body %s, want error %q and a description with %q", raw, tc.code, tc.descPart)
			}
			if tc.token != "" && strings.Contains(raw.String(), tc.token) {
				t.Fatal("the body echoes the token")
			}
		})
	}
}
