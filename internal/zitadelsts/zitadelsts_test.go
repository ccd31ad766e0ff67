package zitadelsts

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"
	"github.com/zitadel/oidc/v3/example/server/storage"
)

const (
	testIss = "https://idp.test"
	testAud = "https://gateway.test"
)

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func sign(t *testing.T, k *ecdsa.PrivateKey, aud, scope string) string {
	t.Helper()
	now := time.Now()
	tok, _ := jwt.NewBuilder().Issuer(testIss).Subject("alice").Audience([]string{aud}).
		IssuedAt(now).Expiration(now.Add(time.Minute)).Claim("scope", scope).Build()
	hdr := jws.NewHeaders()
	_ = hdr.Set(jws.KeyIDKey, "k1")
	b, err := jwt.Sign(tok, jwt.WithKey(jwa.ES256(), k, jws.WithProtectedHeaders(hdr)))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestTokenExchange(t *testing.T) {
	key, other := newKey(t), newKey(t)
	pub, _ := jwk.Import(key.Public())
	_ = pub.Set(jwk.KeyIDKey, "k1")
	_ = pub.Set(jwk.AlgorithmKey, jwa.ES256())
	set := jwk.NewSet()
	_ = set.AddKey(pub)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	iss := "http://" + ln.Addr().String()
	st := NewStorage(iss, map[string]*storage.Client{
		"gw":     storage.WebClient("gw", "s3cret"),
		"gw-jwt": storage.WebClient("gw-jwt", "s3cret"),
	}, Trust{Issuer: testIss, Audience: testAud, Keys: set})
	st.IssueJWTs("gw-jwt")
	srv := httptest.NewUnstartedServer(Handler(iss, st, nil))
	_ = srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	defer srv.Close()

	exchange := func(client, secret, subject string) (int, map[string]any) {
		form := url.Values{
			"grant_type":         {"urn:ietf:params:oauth:grant-type:token-exchange"},
			"subject_token":      {subject},
			"subject_token_type": {"urn:ietf:params:oauth:token-type:access_token"},
			"audience":           {"https://api.test"},
			"scope":              {"read write"},
		}
		req, _ := http.NewRequest(http.MethodPost, iss+"/oauth/token", strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.SetBasicAuth(client, secret)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body map[string]any
		_ = json.NewDecoder(resp.Body).Decode(&body)
		return resp.StatusCode, body
	}

	status, body := exchange("gw", "s3cret", sign(t, key, testAud, "read admin"))
	tok, _ := body["access_token"].(string)
	if status != http.StatusOK || tok == "" {
		t.Fatalf("valid subject token: %d %v", status, body)
	}
	if strings.Count(tok, ".") != 4 {
		t.Errorf("the example client's token %q: want zitadel's opaque token (a five-part JWE)", tok)
	}
	if body["scope"] != "read" || body["issued_token_type"] != "urn:ietf:params:oauth:token-type:access_token" {
		t.Errorf("scope %v, issued_token_type %v: want read (requested ∩ held), access_token", body["scope"], body["issued_token_type"])
	}

	status, body = exchange("gw-jwt", "s3cret", sign(t, key, testAud, "read"))
	tok, _ = body["access_token"].(string)
	if status != http.StatusOK {
		t.Fatalf("JWT client: %d %v", status, body)
	}
	parsed, err := jwt.ParseInsecure([]byte(tok))
	if err != nil {
		t.Fatalf("JWT client's token %q is not a JWT: %v", tok, err)
	}
	if sub, _ := parsed.Subject(); sub != "alice" {
		t.Errorf("JWT sub %q, want alice", sub)
	}

	for name, c := range map[string]struct {
		client, secret, token, code string
		status                      int
	}{
		"signed by another key": {"gw", "s3cret", sign(t, other, testAud, "read"), "invalid_request", 400},
		"another audience":      {"gw", "s3cret", sign(t, key, "https://elsewhere.test", "read"), "invalid_request", 400},
		"no scope in common":    {"gw", "s3cret", sign(t, key, testAud, "admin"), "invalid_scope", 400},
		"wrong client secret":   {"gw", "nope", sign(t, key, testAud, "read"), "invalid_client", 401},
		"not a JWT":             {"gw", "s3cret", "garbage", "invalid_request", 400},
	} {
		status, body := exchange(c.client, c.secret, c.token)
		if status != c.status || body["error"] != c.code {
			t.Errorf("%s: %d %v, want %d %s", name, status, body, c.status, c.code)
		}
	}
}
