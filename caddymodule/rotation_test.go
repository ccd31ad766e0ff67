package caddymodule

import (
	"bytes"
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
	"github.com/caddyserver/certmagic"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// rotationConfig is a gateway with the middleware on /api/* and its JWKS,
// keeping its keys in storageDir, with extra global options.
func rotationConfig(logFile, storageDir, jwksURL, extra, jwksMaxAge string) string {
	return fmt.Sprintf(`{
%s	token_exchange {
		issuer %s
		%s
		trust https://idp.test {
			jwks_url %s
			audience https://gateway.test
			algorithms ES256
		}
	}
}
http://localhost:%d {
	route /api/* {
		token_exchange {
			audience %s
		}
		# test only: hand the minted token back to the client
		header X-Minted {http.request.header.Authorization}
		respond "ok"
	}
	handle /.well-known/jwks.json {
		token_exchange_jwks {
			max_age %s
		}
	}
}
`, testGlobalOptions(logFile, storageDir), gatewayIssuer, extra, jwksURL, gatewayPort, audOrders, jwksMaxAge)
}

// TestKeyRotationThroughCaddy: with key_rotation, real Caddy rotates its
// signing key on schedule, publishing each new key before it signs; a
// verifier that caches the JWKS for its max_age verifies every minted token.
func TestKeyRotationThroughCaddy(t *testing.T) {
	idp := testidp.New(t, "https://idp.test")
	idp.AddKey("ec-1", "ES256")
	dir := t.TempDir()
	tester := caddytest.NewTester(t)
	tester.InitServer(rotationConfig(filepath.Join(dir, "caddy.log"), filepath.Join(dir, "storage"), idp.JWKSURL(),
		"key_rotation 3s\n\t\tkey_publish_ahead 1s\n\t\ttoken_lifetime 2s", "1s"), "caddyfile")

	var cached jwk.Set
	var fetched time.Time
	jwksURL := fmt.Sprintf("http://localhost:%d/.well-known/jwks.json", gatewayPort)
	kids := map[string]bool{}
	var failures, minted int
	deadline := time.Now().Add(8 * time.Second)
	for time.Now().Before(deadline) {
		if cached == nil || time.Since(fetched) >= time.Second {
			resp, err := tester.Client.Get(jwksURL)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if cached, err = jwk.Parse(body); err != nil {
				t.Fatalf("JWKS %q: %v", body, err)
			}
			fetched = time.Now()
		}
		// A fresh subject each time, so every request mints (no cache hit).
		tok := idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "jti": fmt.Sprint(minted)})
		token, kid := mintThrough(t, tester, tok)
		minted++
		kids[kid] = true
		if _, err := jwt.Parse([]byte(token), jwt.WithKeySet(cached), jwt.WithValidate(false)); err != nil {
			failures++
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("rotation through Caddy: %d tokens, %d signing keys, %d verification failures", minted, len(kids), failures)
	if len(kids) < 2 {
		t.Errorf("%d signing keys in 8s with key_rotation 3s", len(kids))
	}
	if failures != 0 {
		t.Errorf("%d of %d tokens did not verify against a JWKS cached for its max_age", failures, minted)
	}
	resp, err := tester.Client.Get(fmt.Sprintf("http://localhost:%d/metrics", adminPort))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if v := metricValue(string(body), "caddy_token_exchange_signing_key_changes_total"); v < 1 {
		t.Errorf("signing_key_changes_total %v after rotations", v)
	}
	if v := metricValue(string(body), "caddy_token_exchange_signing_key_since_timestamp_seconds"); v < float64(time.Now().Add(-time.Minute).Unix()) {
		t.Errorf("signing_key_since_timestamp_seconds %v", v)
	}
}

// mintThrough sends tok through the middleware and returns the minted
// token (the test route hands it back in X-Minted) and its kid.
func mintThrough(t *testing.T, tester *caddytest.Tester, tok string) (string, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://localhost:%d/api/x", gatewayPort), nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := tester.Client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	minted := strings.TrimPrefix(resp.Header.Get("X-Minted"), "Bearer ")
	if resp.StatusCode != http.StatusOK || strings.Count(minted, ".") != 2 {
		t.Fatalf("status %d, minted %q", resp.StatusCode, minted)
	}
	msg, err := jws.Parse([]byte(minted))
	if err != nil {
		t.Fatal(err)
	}
	kid, _ := msg.Signatures()[0].ProtectedHeaders().KeyID()
	return minted, kid
}

// TestRotateCommand: `caddy token-exchange rotate` adds a key to the key
// set in the config's storage: published first by default, at once and
// alone with --now.
func TestRotateCommand(t *testing.T) {
	idp := testidp.New(t, "https://idp.test")
	idp.AddKey("ec-1", "ES256")
	dir := t.TempDir()
	storageDir := filepath.Join(dir, "storage")
	cfgFile := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfgFile, []byte(rotationConfig(filepath.Join(dir, "caddy.log"), storageDir, idp.JWKSURL(), "", "5m")), 0o600); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) string {
		c := rotateCommand()
		var out bytes.Buffer
		c.SetOut(&out)
		c.SetErr(io.Discard)
		c.SetArgs(append([]string{"--config", cfgFile}, args...))
		if err := c.Execute(); err != nil {
			t.Fatalf("rotate %v: %v", args, err)
		}
		return out.String()
	}
	keys := func() []string {
		data, err := (&certmagic.FileStorage{Path: storageDir}).Load(t.Context(), exchange.KeySetStorageKey(gatewayIssuer))
		if err != nil {
			t.Fatal(err)
		}
		var doc struct{ Keys []struct{ KID string } }
		if err := json.Unmarshal(data, &doc); err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, k := range doc.Keys {
			out = append(out, k.KID)
		}
		return out
	}
	out := run()
	first := keys()
	// A fresh storage: the first key signs now, the rotated one is
	// published ahead.
	if len(first) != 2 || !strings.Contains(out, first[0]) || !strings.Contains(out, first[1]) {
		t.Fatalf("planned rotation: key set %v, output %q", first, out)
	}
	out = run("--now")
	after := keys()
	if len(after) != 1 || after[0] == first[0] || after[0] == first[1] || !strings.Contains(out, after[0]) {
		t.Fatalf("--now: key set %v (was %v), output %q", after, first, out)
	}
}

// TestRotationConfigErrors: key_rotation cannot rotate a key file, and a
// JWKS max_age longer than key_publish_ahead would let verifiers miss a new
// key: both refused at provision.
func TestRotationConfigErrors(t *testing.T) {
	idp := testidp.New(t, "https://idp.test")
	idp.AddKey("ec-1", "ES256")
	keyFile := filepath.Join(t.TempDir(), "key.jwk")
	c := keygenCommand()
	c.SetArgs([]string{"--out", keyFile})
	c.SetOut(io.Discard)
	if err := c.Execute(); err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct{ extra, maxAge, want string }{
		"key file":      {"key_rotation 24h\n\t\tsigning_key_file " + keyFile, "5m", "signing_key_file"},
		"max_age":       {"key_rotation 24h\n\t\tkey_publish_ahead 1m", "5m", "key_publish_ahead"},
		"ahead too big": {"key_rotation 1h\n\t\tkey_publish_ahead 2h", "5m", "longer than key_publish_ahead"},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(rotationConfig(filepath.Join(dir, "l"), dir, idp.JWKSURL(), tc.extra, tc.maxAge)), nil)
			if err != nil {
				t.Fatal(err)
			}
			var cfg caddy.Config
			if err := json.Unmarshal(adapted, &cfg); err != nil {
				t.Fatal(err)
			}
			if err := caddy.Validate(&cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("validate: %v, want an error naming %s", err, tc.want)
			}
		})
	}
}
