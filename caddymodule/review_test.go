package caddymodule

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// Regression tests of the second security review (issue 10) that need a
// real Caddy: logs, the access log, metadata, headers at the edge, keygen.

// reviewGateway is real Caddy with the middleware on /api/* (a deny_if rule
// for mallory), the token endpoint, the metadata, a site access log with
// the filter the README documents, and extra global options.
type reviewGateway struct {
	*gateway
	accessLog string
}

func startReviewGateway(t *testing.T, globalExtra string) *reviewGateway {
	t.Helper()
	idp := testidp.New(t, "https://idp.test")
	idp.AddKey("ec-1", "ES256")
	up := newRecordingUpstream(t)
	dir := t.TempDir()
	logFile, accessLog := filepath.Join(dir, "caddy.log"), filepath.Join(dir, "access.log")
	config := fmt.Sprintf(`{
%s	token_exchange {
		issuer %s
		%s
		trust https://idp.test {
			jwks_url %s
			audience https://gateway.test
			algorithms ES256
		}
		client %s {
			secret_hash %s
			audience %s
			scope orders.read orders.write private.scope
		}
	}
}
http://localhost:%d {
	log {
		output file %s
		format filter {
			request>uri query {
				delete access_token
			}
			request>headers>X-Forwarded-Token delete
			request>headers>Txn-Token delete
			wrap json
		}
	}
	route /api/* {
		token_exchange {
			audience %s
			scope orders.read
			deny_if subject.sub == "mallory"
		}
		reverse_proxy %s
	}
	handle /oauth2/token {
		token_exchange_endpoint
	}
	handle /.well-known/oauth-authorization-server {
		token_exchange_metadata
	}
}
`, testGlobalOptions(logFile, t.TempDir()), gatewayIssuer, globalExtra, idp.JWKSURL(),
		secretClient, bcryptHash(t, secretValue), audOrders,
		gatewayPort, accessLog, audOrders, strings.TrimPrefix(up.URL, "http://"))
	tester := caddytest.NewTester(t)
	tester.InitServer(config, "caddyfile")
	return &reviewGateway{gateway: &gateway{tester: tester, idp: idp, upstream: up, logFile: logFile}, accessLog: accessLog}
}

// logLines returns the JSON log lines whose msg is msg.
func logLines(t *testing.T, file, msg string) []map[string]any {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil && (msg == "" || m["msg"] == msg) {
			out = append(out, m)
		}
	}
	return out
}

func (g *reviewGateway) send(t *testing.T, method, path string, headers map[string]string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(method, fmt.Sprintf("http://localhost:%d%s", gatewayPort, path), nil)
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
	resp.Body.Close()
	return resp
}

func TestReviewAuditTrail(t *testing.T) {
	g := startReviewGateway(t, "scopes_supported orders.read")

	t.Run("policy refusal: the client is not told the rule, the log is", func(t *testing.T) {
		tok := g.idp.Token("ec-1", testidp.Claims{"sub": "mallory", "scope": "orders.read"})
		resp := g.send(t, http.MethodGet, "/api/x", map[string]string{"Authorization": "Bearer " + tok})
		challenge := resp.Header.Get("WWW-Authenticate")
		if resp.StatusCode != http.StatusForbidden || strings.Contains(challenge, "mallory") || !strings.Contains(challenge, `error_description="denied by policy"`) {
			t.Fatalf("%d %s", resp.StatusCode, challenge)
		}
		lines := logLines(t, g.logFile, "token exchange refused")
		if len(lines) == 0 {
			t.Fatal("no refusal line")
		}
		l := lines[len(lines)-1]
		for k, want := range map[string]any{"route": audOrders, "method": "GET", "path": "/api/x", "remote_ip": "127.0.0.1", "sub": "mallory", "subject_issuer": "https://idp.test"} {
			if l[k] != want {
				t.Errorf("refusal line %s = %v, want %v (%v)", k, l[k], want, l)
			}
		}
		if e, _ := l["error"].(string); !strings.Contains(e, "deny_if") || !strings.Contains(e, "subject.sub ==") || !strings.Contains(e, "mallory") {
			t.Errorf("the rule is not in the log: %v", l["error"])
		}
	})

	t.Run("every exchange is logged at info, cache hits included", func(t *testing.T) {
		tok := g.idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "jti": "cache-me"})
		for i := 0; i < 2; i++ {
			if resp := g.send(t, http.MethodGet, "/api/x", map[string]string{"Authorization": "Bearer " + tok}); resp.StatusCode != 200 {
				t.Fatalf("status %d", resp.StatusCode)
			}
		}
		minted := logLines(t, g.logFile, "token exchanged")
		hits := logLines(t, g.logFile, "token exchange reused from cache")
		if len(minted) == 0 || len(hits) == 0 {
			t.Fatalf("%d exchange lines, %d cache-hit lines", len(minted), len(hits))
		}
		hit := hits[len(hits)-1]
		if hit["level"] != "info" || hit["jti"] != minted[len(minted)-1]["jti"] || hit["cached"] != true || hit["remote_ip"] != "127.0.0.1" {
			t.Errorf("cache hit line %v", hit)
		}
		// Both lines name the route, the request and the subject.
		for _, l := range []map[string]any{hit, minted[len(minted)-1]} {
			for _, k := range []string{"route", "method", "path", "sub", "subject_issuer", "subject_token_sha256"} {
				if v, _ := l[k].(string); v == "" || v != minted[len(minted)-1][k] {
					t.Errorf("%s = %v in %v", k, l[k], l)
				}
			}
		}
	})

	t.Run("an outside Txn-Token never reaches the upstream", func(t *testing.T) {
		tok := g.idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		resp := g.send(t, http.MethodGet, "/api/x", map[string]string{"Authorization": "Bearer " + tok, "Txn-Token": "outside.txn.token"})
		if resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
		if v := g.upstream.last().Header.Get("Txn-Token"); v != "" {
			t.Errorf("upstream got Txn-Token %q", v)
		}
		if len(logLines(t, g.logFile, "outside Txn-Token removed at the edge")) == 0 {
			t.Error("the removal was not logged")
		}
	})

	t.Run("the endpoint logs every refusal, early ones too", func(t *testing.T) {
		before := len(logLines(t, g.logFile, "token exchange refused"))
		// Wrong secret and no subject_token: 401 invalid_client (the
		// client authenticates before parameters are checked).
		req, _ := http.NewRequest(http.MethodPost, stsTokenURL, strings.NewReader("grant_type=x"))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		basicAuth(secretClient, "wrong")(req)
		resp, err := g.tester.Client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("wrong secret without subject_token: %d, want 401", resp.StatusCode)
		}
		req, _ = http.NewRequest(http.MethodPost, stsTokenURL, strings.NewReader("grant_type=x"))
		req.Header.Set("Content-Type", "text/plain")
		resp, err = g.tester.Client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		lines := logLines(t, g.logFile, "token exchange refused")[before:]
		if len(lines) != 2 {
			t.Fatalf("%d refusal lines, want 2", len(lines))
		}
		if lines[0]["error"] != "invalid_client" || lines[0]["claimed_client_id"] != secretClient || lines[0]["remote_ip"] != "127.0.0.1" {
			t.Errorf("invalid_client line %v", lines[0])
		}
		if lines[1]["error"] != "invalid_request" {
			t.Errorf("early 400 line %v", lines[1])
		}
		raw, _ := os.ReadFile(g.logFile)
		if strings.Contains(string(raw), "wrong") {
			t.Error("a secret was logged")
		}
	})

	t.Run("metadata publishes only configured scopes", func(t *testing.T) {
		resp, err := g.tester.Client.Get(stsBase + "/.well-known/oauth-authorization-server")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var doc map[string]any
		if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
			t.Fatal(err)
		}
		if got := fmt.Sprint(doc["scopes_supported"]); got != "[orders.read]" {
			t.Errorf("scopes_supported %s, want only the configured [orders.read]", got)
		}
		if _, ok := doc["token_endpoint_auth_signing_alg_values_supported"]; ok {
			t.Error("assertion signing algorithms published without a private_key_jwt client")
		}
	})

	t.Run("no token in the access log", func(t *testing.T) {
		tok := g.idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "jti": "access-log"})
		g.send(t, http.MethodGet, "/api/x?access_token="+tok, nil)
		g.send(t, http.MethodGet, "/api/x?a=1&access_token="+tok, map[string]string{"Authorization": "Bearer " + tok})
		g.send(t, http.MethodGet, "/api/x", map[string]string{"Authorization": "Bearer " + tok, "X-Forwarded-Token": tok, "Txn-Token": tok})
		lines := logLines(t, g.accessLog, "")
		if len(lines) < 3 {
			t.Fatalf("%d access log lines", len(lines))
		}
		raw, _ := os.ReadFile(g.accessLog)
		sig := tok[strings.LastIndexByte(tok, '.')+1:]
		if strings.Contains(string(raw), tok) || strings.Contains(string(raw), sig) {
			t.Fatalf("a token is in the access log:\n%s", raw)
		}
		if !strings.Contains(string(raw), `/api/x?a=1`) {
			t.Errorf("the filtered URI is not logged:\n%s", raw)
		}
	})
}

// TestKeygenKeepsPrivateKeysPrivate: keygen refuses to replace a key without
// --force, and with it leaves the file at 0600 even when it existed with a
// wider mode (os.WriteFile keeps an existing file's mode).
func TestKeygenKeepsPrivateKeysPrivate(t *testing.T) {
	out := filepath.Join(t.TempDir(), "key.jwk")
	run := func(args ...string) error {
		c := keygenCommand()
		c.SetArgs(args)
		c.SetOut(io.Discard)
		c.SetErr(io.Discard)
		return c.Execute()
	}
	if err := run("--out", out); err != nil {
		t.Fatal(err)
	}
	first, _ := os.ReadFile(out)
	if err := run("--out", out); err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("second keygen without --force: %v", err)
	}
	if again, _ := os.ReadFile(out); string(again) != string(first) {
		t.Fatal("the existing key was replaced")
	}
	if err := os.Chmod(out, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := run("--out", out, "--force"); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("mode %o after --force, want 600", st.Mode().Perm())
	}
	if again, _ := os.ReadFile(out); string(again) == string(first) {
		t.Error("--force did not write a new key")
	}
}

// TestValidateWritesNoKeys: provisioning writes nothing to storage, so
// `caddy validate` (and adapt, dry runs) never creates a signing key; the
// key is created when the app starts (DESIGN §6).
func TestValidateWritesNoKeys(t *testing.T) {
	idp := testidp.New(t, "https://idp.test")
	idp.AddKey("ec-1", "ES256")
	storage := t.TempDir()
	validateGateway(t, idp, storage)
	var written []string
	_ = filepath.WalkDir(storage, func(path string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			written = append(written, path)
		}
		return nil
	})
	if len(written) != 0 {
		t.Fatalf("validate wrote to storage: %v", written)
	}
}

// TestValidateFetchesNothing: provisioning (caddy validate) starts no JWKS
// fetch either; the app's Start does (DESIGN §6).
func TestValidateFetchesNothing(t *testing.T) {
	idp := testidp.New(t, "https://idp.test")
	idp.AddKey("ec-1", "ES256")
	validateGateway(t, idp, t.TempDir())
	time.Sleep(200 * time.Millisecond)
	if n := idp.Fetches.Load(); n != 0 {
		t.Fatalf("validate fetched the JWKS %d times", n)
	}
}

// validateGateway runs caddy.Validate (what `caddy validate` does) on a
// gateway that trusts idp's JWKS URL and keeps its storage in storage.
func validateGateway(t *testing.T, idp *testidp.Issuer, storage string) {
	t.Helper()
	input := fmt.Sprintf(`{
	storage file_system %s
	token_exchange {
		issuer https://gateway.test
		trust https://idp.test {
			jwks_url %s
			audience https://gateway.test
			algorithms ES256
		}
	}
}
http://localhost:1 {
	token_exchange {
		audience %s
	}
	respond ok
}
`, storage, idp.JWKSURL(), audOrders)
	adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatal(err)
	}
	var cfg caddy.Config
	if err := json.Unmarshal(adapted, &cfg); err != nil {
		t.Fatal(err)
	}
	if err := caddy.Validate(&cfg); err != nil {
		t.Fatalf("validate: %v", err)
	}
}
