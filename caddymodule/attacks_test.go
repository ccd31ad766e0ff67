package caddymodule

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"hash"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwe"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jwt"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// The attack catalogue of issue 6 §1, through real Caddy. Every token attack
// goes through both front doors (the middleware and the RFC 8693 endpoint);
// request-level attacks go through the door they target. Each case asserts
// the status, the RFC error code, that the upstream was not called and that
// nothing was minted.

const (
	atkIdP       = "https://idp.test"
	atkAudience  = "https://gateway.test"
	atkRuleAud   = "https://rules.internal"
	atkClient    = "attack-svc" // audience orders, resource orders, scope orders.read orders.write
	atkSecret    = "attack-svc-secret"
	atkNarrow    = "narrow-svc" // audience orders, scope orders.read
	atkNarrowSec = "narrow-svc-secret"
	atkRuleCl    = "rule-svc" // scope orders.read, a rule granting orders.admin
	atkRuleSec   = "rule-svc-secret"
	atkResource  = "https://api.example/orders"
	atkImpCl     = "imp-svc" // may_impersonate
	atkImpSec    = "imp-svc-secret"
	atkCELCl     = "cel-svc" // atkCELRules
	atkCELSec    = "cel-svc-secret"
	atkKeyCl     = "key-svc" // private_key_jwt
	// atkCELRules, on /cel/* and cel-svc, spell a CEL string each way
	// users write one (issue 9 §1): a double-quoted "client" once loaded as
	// the client variable, so that rule never fired.
	atkCELRules = "\t\t\tdeny_if subject.sub == \"client\"\n" +
		"\t\t\tdeny_if subject.sub == 'actor'\n" +
		"\t\t\tdeny_if `subject.sub == \"route\"`\n" +
		"\t\t\tdeny_if subject.sub == \"request\" || subject.sub == \"subject\"\n" +
		"\t\t\tclaim tier \"subject\"\n"
	atkOKSeries = `caddy_token_exchange_exchanges_total{outcome="ok",`
	atkEPOK     = `caddy_token_exchange_endpoint_requests_total{outcome="ok"}`
)

// atkSeen is what one request looked like when it reached the upstream,
// trailers included.
type atkSeen struct {
	header  http.Header
	trailer http.Header
	uri     string
}

// atkUpstream reads every request to its end (so trailers arrive) and
// records it.
type atkUpstream struct {
	*httptest.Server
	mu   sync.Mutex
	seen []atkSeen
}

func newAtkUpstream(t *testing.T) *atkUpstream {
	u := &atkUpstream{}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		u.mu.Lock()
		u.seen = append(u.seen, atkSeen{header: r.Header.Clone(), trailer: r.Trailer.Clone(), uri: r.RequestURI})
		u.mu.Unlock()
		_, _ = io.WriteString(w, "upstream ok")
	}))
	t.Cleanup(u.Close)
	return u
}

func (u *atkUpstream) calls() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.seen)
}

func (u *atkUpstream) last() atkSeen {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.seen[len(u.seen)-1]
}

// atkGateway is real Caddy with the middleware on /api/* and /rule/*, the
// token endpoint and the JWKS, trusting a real IdP; evil is the attacker's
// IdP (its own keys and JWKS server, never trusted).
type atkGateway struct {
	*gateway
	up   *atkUpstream
	evil *testidp.Issuer
	// clientKey signs the private_key_jwt assertions of atkKeyCl.
	clientKey *ecdsa.PrivateKey
}

func startAttackGateway(t *testing.T, globalExtra string) *atkGateway {
	t.Helper()
	idp := newTestIdP(t, atkIdP)
	evil := newTestIdP(t, "https://evil.test") // the same kids as the real keys
	up := newAtkUpstream(t)
	clientKey, clientJWKS := newClientKey(t, "key-1")
	f := newCaddyFixture(t)
	upstream := strings.TrimPrefix(up.URL, "http://")
	config := fmt.Sprintf(`{
%s	token_exchange {
		issuer %s
		%s
		trust %s {
			jwks_url %s
			audience %s
			algorithms RS256 ES256
			refetch_interval 1h
		}
		client %s {
			secret_hash %s
			audience %s
			resource %s
			scope orders.read orders.write
		}
		client %s {
			secret_hash %s
			audience %s
			scope orders.read
		}
		client %s {
			secret_hash %s
			audience %s
			scope orders.read
			grant orders.admin if true
		}
		client %s {
			secret_hash %s
			audience %s
			scope orders.read
			may_impersonate
		}
		client %s {
			secret_hash %s
			audience %s
			scope orders.read
%s		}
		client %s {
			jwks_file %s
			audience %s
			scope orders.read
		}
	}
}
http://:%d {
	route /api/* {
		%s
		reverse_proxy %s
	}
	route /rule/* {
		token_exchange {
			audience %s
			scope orders.read
			require_scope orders.read
			grant orders.admin if true
		}
		reverse_proxy %s
	}
	route /imp/* {
		token_exchange {
			audience %s
			scope orders.read
			mode impersonation
		}
		reverse_proxy %s
	}
	route /cel/* {
		token_exchange {
			audience %s
			scope orders.read
%s		}
		reverse_proxy %s
	}
	handle /oauth2/token {
		token_exchange_endpoint
	}
	handle /.well-known/jwks.json {
		token_exchange_jwks
	}
}
`, f.globals(), gatewayIssuer, globalExtra,
		atkIdP, idp.JWKSURL(), atkAudience,
		atkClient, bcryptHash(t, atkSecret), audOrders, atkResource,
		atkNarrow, bcryptHash(t, atkNarrowSec), audOrders,
		atkRuleCl, bcryptHash(t, atkRuleSec), audOrders,
		atkImpCl, bcryptHash(t, atkImpSec), audOrders,
		atkCELCl, bcryptHash(t, atkCELSec), audOrders, atkCELRules,
		atkKeyCl, clientJWKS, audOrders,
		gatewayPort, defaultRoute, upstream, atkRuleAud, upstream,
		audOrders, upstream, audOrders, atkCELRules, upstream)
	g := f.start(t, config, idp, nil)
	fltWarmUp(t, g.tester)
	return &atkGateway{gateway: g, up: up, evil: evil, clientKey: clientKey}
}

// atkReq is one request to the middleware.
type atkReq struct {
	path    string      // default /api/orders/1
	headers [][2]string // added in order, so a name may repeat
	query   string
	trailer http.Header // sent as HTTP/1.1 chunked trailers
	form    string      // a POST body sent as application/x-www-form-urlencoded
}

func atkBearer(tok string) [][2]string { return [][2]string{{"Authorization", "Bearer " + tok}} }

func (g *atkGateway) mw(t *testing.T, r atkReq) (*http.Response, string) {
	t.Helper()
	path := r.path
	if path == "" {
		path = "/api/orders/1"
	}
	u := fmt.Sprintf("http://localhost:%d%s", gatewayPort, path)
	if r.query != "" {
		u += "?" + r.query
	}
	method, body := http.MethodGet, io.Reader(nil)
	if r.trailer != nil {
		method, body = http.MethodPost, io.MultiReader(strings.NewReader("payload")) // unknown length: chunked
	}
	if r.form != "" {
		method, body = http.MethodPost, strings.NewReader(r.form)
	}
	req, err := http.NewRequest(method, u, body)
	if err != nil {
		t.Fatal(err)
	}
	if r.form != "" {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	for _, h := range r.headers {
		req.Header.Add(h[0], h[1])
	}
	if r.trailer != nil {
		req.ContentLength = -1
		req.Trailer = r.trailer
	}
	resp, err := g.tester.Client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	return resp, string(b)
}

// atkEPResp is one answer of the token endpoint.
type atkEPResp struct {
	status int
	raw    string
	body   map[string]any
}

func (g *atkGateway) ep(t *testing.T, form url.Values, client, secret string) atkEPResp {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, stsTokenURL, strings.NewReader(form.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	basicAuth(client, secret)(req)
	resp, err := g.tester.Client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	out := atkEPResp{status: resp.StatusCode, raw: string(raw)}
	if err := json.Unmarshal(raw, &out.body); err != nil {
		t.Fatalf("status %d: body is not JSON: %q", resp.StatusCode, raw)
	}
	return out
}

// minted sums every counter of a minted token: ok exchanges on any route
// of the middleware, ok answers of the endpoint.
func (g *atkGateway) minted(t *testing.T) float64 {
	t.Helper()
	var n float64
	for _, l := range strings.Split(g.metrics(t), "\n") {
		if strings.HasPrefix(l, atkOKSeries) || strings.HasPrefix(l, atkEPOK+" ") {
			var v float64
			if _, err := fmt.Sscan(l[strings.LastIndexByte(l, ' ')+1:], &v); err == nil {
				n += v
			}
		}
	}
	return n
}

// pctReq builds a request that carries tok in the Authorization header and,
// through build, somewhere else in another encoding.
func pctReq(tok string, build func(string) atkReq) atkReq {
	r := build(tok)
	r.headers = append(atkBearer(tok), r.headers...)
	return r
}

// atkPct percent-encodes every byte of s.
func atkPct(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		fmt.Fprintf(&b, "%%%02X", s[i])
	}
	return b.String()
}

func atkManyScopes(n int) string {
	s := make([]string, n)
	for i := range s {
		s[i] = fmt.Sprint("s", i)
	}
	return strings.Join(s, " ")
}

// ---- token forging helpers ----

func atkB64(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }

// atkJWS builds a compact JWS from header and payload given as raw JSON
// text (so duplicate members and invalid UTF-8 survive), signed by sign
// (nil: empty signature).
func atkJWS(header, payload string, sign func([]byte) []byte) string {
	in := atkB64(header) + "." + atkB64(payload)
	var sig []byte
	if sign != nil {
		sig = sign([]byte(in))
	}
	return in + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// atkSignInput signs an already encoded signing input (for encodings other
// than strict base64url).
func atkSignInput(h64, p64 string, sign func([]byte) []byte) string {
	in := h64 + "." + p64
	return in + "." + base64.RawURLEncoding.EncodeToString(sign([]byte(in)))
}

func atkES256(k crypto.Signer) func([]byte) []byte {
	return func(in []byte) []byte {
		h := sha256.Sum256(in)
		r, s, err := ecdsa.Sign(rand.Reader, k.(*ecdsa.PrivateKey), h[:])
		if err != nil {
			panic(err)
		}
		size := (k.(*ecdsa.PrivateKey).Curve.Params().BitSize + 7) / 8
		out := make([]byte, 2*size)
		r.FillBytes(out[:size])
		s.FillBytes(out[size:])
		return out
	}
}

func atkRSA(k crypto.Signer, h crypto.Hash, pss bool) func([]byte) []byte {
	return func(in []byte) []byte {
		d := h.New()
		d.Write(in)
		var sig []byte
		var err error
		if pss {
			sig, err = rsa.SignPSS(rand.Reader, k.(*rsa.PrivateKey), h, d.Sum(nil), nil)
		} else {
			sig, err = rsa.SignPKCS1v15(rand.Reader, k.(*rsa.PrivateKey), h, d.Sum(nil))
		}
		if err != nil {
			panic(err)
		}
		return sig
	}
}

func atkHMAC(h func() hash.Hash, key []byte) func([]byte) []byte {
	return func(in []byte) []byte {
		m := hmac.New(h, key)
		m.Write(in)
		return m.Sum(nil)
	}
}

func atkFixed(sig []byte) func([]byte) []byte { return func([]byte) []byte { return sig } }

// atkClaims is a valid claims set of the trusted IdP as JSON text; edit
// overrides claims, a nil value removes one.
func atkClaims(edit map[string]any) string {
	now := time.Now()
	c := map[string]any{
		"iss": atkIdP, "sub": "alice", "aud": atkAudience,
		"exp": now.Add(10 * time.Minute).Unix(), "iat": now.Unix(),
		"scope": "orders.read orders.write",
	}
	for k, v := range edit {
		if v == nil {
			delete(c, k)
			continue
		}
		c[k] = v
	}
	b, err := json.Marshal(c)
	if err != nil {
		panic(err)
	}
	return string(b)
}

// atkClaimsWith returns the default claims with raw JSON members spliced in
// before the closing brace (for duplicates and invalid UTF-8).
func atkClaimsWith(raw string) string {
	c := atkClaims(nil)
	return c[:len(c)-1] + "," + raw + "}"
}

func atkPEM(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func atkSelfSigned(t *testing.T, key crypto.Signer) string {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "https://idp.test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(der)
}

func atkJWKJSON(t *testing.T, pub crypto.PublicKey) json.RawMessage {
	t.Helper()
	k, err := jwk.Import(pub)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(k)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// atkTokenOfSize pads a validly signed ES256 token of the trusted IdP to
// between want-8 and want bytes (or just above want when over is set).
func atkTokenOfSize(t *testing.T, key crypto.Signer, want int, over bool) string {
	t.Helper()
	hdr := `{"alg":"ES256","kid":"ec-1"}`
	n := want * 3 / 4
	for i := 0; i < 200; i++ {
		tok := atkJWS(hdr, atkClaims(map[string]any{"pad": strings.Repeat("p", n)}), atkES256(key))
		l := len(tok)
		switch {
		case !over && l <= want && l > want-8:
			return tok
		case over && l > want && l <= want+8:
			return tok
		}
		d := (want - l) * 3 / 4
		if d == 0 {
			d = 1
			if l > want {
				d = -1
			}
		}
		n += d
	}
	t.Fatalf("could not build a token of %d bytes", want)
	return ""
}

// atkTokenAttack is a forged or abused token, sent through both doors.
type atkTokenAttack struct {
	name     string
	token    string
	mwStatus int    // default 401
	mwCode   string // default invalid_token; "-": no challenge at all
}

// atkRequestAttack is a request-level attack on the middleware.
type atkRequestAttack struct {
	name   string
	req    atkReq
	status int
	code   string // error= of WWW-Authenticate; "" means none
	tokens []string
}

// atkEndpointAttack is a request-level attack on the token endpoint.
type atkEndpointAttack struct {
	name           string
	form           url.Values
	client, secret string // default attack-svc
	status         int
	code           string
}

func TestAttackCatalogue(t *testing.T) {
	g := startAttackGateway(t, "")
	idp, evil := g.idp, g.evil
	ecKey, rsaKey := idp.PrivateKey("ec-1"), idp.PrivateKey("rsa-1")
	evilEC, evilRSA := evil.PrivateKey("ec-1"), evil.PrivateKey("rsa-1")
	evil384 := testidp.GenerateKey(t, "ES384")
	now := time.Now()
	hdrEC := `{"alg":"ES256","kid":"ec-1"}`
	hdrRSA := `{"alg":"RS256","kid":"rsa-1"}`
	valid := idp.Token("ec-1", testidp.Claims{"scope": "orders.read orders.write"})

	// ---- controls: what the forgeries are built from does work ----
	var minted string
	t.Run("controls of issue 9", func(t *testing.T) {
		// The CEL route and client serve everyone their rules do not deny,
		// and `claim tier "subject"` is the string, not the variable.
		alice := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
		if resp, body := g.mw(t, atkReq{path: "/cel/x", headers: atkBearer(alice)}); resp.StatusCode != http.StatusOK {
			t.Fatalf("/cel/ for alice: %d %s %s", resp.StatusCode, resp.Header.Get("WWW-Authenticate"), body)
		}
		tok, err := jwt.ParseInsecure([]byte(strings.TrimPrefix(g.up.last().header.Get("Authorization"), "Bearer ")))
		if err != nil {
			t.Fatal(err)
		}
		if got := claimString(tok, "tier"); got != "subject" {
			t.Errorf(`claim tier "subject" minted %q`, got)
		}
		if r := g.ep(t, exchangeForm(alice), atkCELCl, atkCELSec); r.status != http.StatusOK {
			t.Fatalf("cel-svc for alice: %d %s", r.status, r.raw)
		}
		// The impersonation route and client serve an undelegated subject.
		if resp, _ := g.mw(t, atkReq{path: "/imp/x", headers: atkBearer(alice)}); resp.StatusCode != http.StatusOK {
			t.Fatalf("/imp/ for alice: %d", resp.StatusCode)
		}
		if r := g.ep(t, exchangeForm(alice), atkImpCl, atkImpSec); r.status != http.StatusOK {
			t.Fatalf("imp-svc for alice: %d %s", r.status, r.raw)
		}
		// A form body without a token reaches the upstream whole.
		if resp, _ := g.mw(t, atkReq{headers: atkBearer(alice), form: "a=1&b=%20two"}); resp.StatusCode != http.StatusOK {
			t.Fatalf("form body: %d", resp.StatusCode)
		}
	})

	// Issue 9 §2: the site answers any Host, so an assertion a client
	// signed for another server's token endpoint was accepted when the
	// request named that server in Host. Only the configured token
	// endpoint and issuer are an assertion's audience.
	t.Run("private_key_jwt audience through a forged Host", func(t *testing.T) {
		send := func(host, aud string) atkEPResp {
			form := exchangeForm(valid, "client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
				"client_assertion", signAssertion(t, g.clientKey, "key-1", atkKeyCl, aud, nil))
			req, err := http.NewRequest(http.MethodPost, stsTokenURL, strings.NewReader(form.Encode()))
			if err != nil {
				t.Fatal(err)
			}
			req.Host = host
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			resp, err := g.tester.Client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			raw, _ := io.ReadAll(resp.Body)
			out := atkEPResp{status: resp.StatusCode, raw: string(raw)}
			_ = json.Unmarshal(raw, &out.body)
			return out
		}
		if r := send(fmt.Sprintf("localhost:%d", gatewayPort), gatewayIssuer+"/oauth2/token"); r.status != http.StatusOK {
			t.Fatalf("assertion for the configured token endpoint: %d %s", r.status, r.raw)
		}
		before := g.minted(t)
		for _, host := range []string{"as.other.example", fmt.Sprintf("localhost:%d", gatewayPort)} {
			r := send(host, "http://as.other.example/oauth2/token")
			if r.status != http.StatusUnauthorized || r.body["error"] != "invalid_client" {
				t.Errorf("Host %s, assertion for another server: %d %s, want 401 invalid_client", host, r.status, r.raw)
			}
		}
		if g.minted(t) != before {
			t.Error("a token was minted")
		}
	})

	t.Run("controls", func(t *testing.T) {
		for name, tok := range map[string]string{
			"jwx ES256":               valid,
			"hand-signed ES256":       atkJWS(hdrEC, atkClaims(nil), atkES256(ecKey)),
			"hand-signed RS256":       atkJWS(hdrRSA, atkClaims(nil), atkRSA(rsaKey, crypto.SHA256, false)),
			"ES256 without kid":       atkJWS(`{"alg":"ES256"}`, atkClaims(nil), atkES256(ecKey)),
			"just under 16 KiB":       atkTokenOfSize(t, ecKey, 16<<10, false),
			"typ JWT and extra field": atkJWS(`{"alg":"ES256","kid":"ec-1","typ":"JWT","x-extra":1}`, atkClaims(nil), atkES256(ecKey)),
		} {
			before := g.up.calls()
			if resp, body := g.mw(t, atkReq{headers: atkBearer(tok)}); resp.StatusCode != http.StatusOK {
				t.Fatalf("%s: status %d %q %s", name, resp.StatusCode, resp.Header.Get("WWW-Authenticate"), body)
			}
			if g.up.calls() != before+1 {
				t.Fatalf("%s: upstream not called", name)
			}
		}
		minted = strings.TrimPrefix(g.up.last().header.Get("Authorization"), "Bearer ")
		if strings.Count(minted, ".") != 2 {
			t.Fatalf("no minted token captured: %q", minted)
		}
		// Upscoping through the endpoint request: a scope the client may
		// not have is never issued, even next to one it may.
		r := g.ep(t, exchangeForm(valid, "scope", "orders.read orders.admin orders.write"), atkNarrow, atkNarrowSec)
		if r.status != http.StatusOK {
			t.Fatalf("narrow client: %d %s", r.status, r.raw)
		}
		tok, err := jwt.ParseInsecure([]byte(r.body["access_token"].(string)))
		if err != nil {
			t.Fatal(err)
		}
		if s := claimString(tok, "scope"); s != "orders.read" {
			t.Fatalf("issued scope %q, want only orders.read", s)
		}
		if r.body["scope"] != "orders.read" {
			t.Fatalf("response scope %v, want orders.read (RFC 8693 2.2.1: it differs from the request)", r.body["scope"])
		}
		// Upscoping through a rule: the rule grants orders.admin, the
		// route and the client never delegate it.
		if resp, _ := g.mw(t, atkReq{path: "/rule/x", headers: atkBearer(idp.Token("ec-1", testidp.Claims{"scope": "orders.read"}))}); resp.StatusCode != 200 {
			t.Fatalf("rule route: %d", resp.StatusCode)
		}
		tok, _ = jwt.ParseInsecure([]byte(strings.TrimPrefix(g.up.last().header.Get("Authorization"), "Bearer ")))
		if s := claimString(tok, "scope"); s != "orders.read" {
			t.Fatalf("rule route minted scope %q, want orders.read", s)
		}
		r = g.ep(t, exchangeForm(valid), atkRuleCl, atkRuleSec)
		if r.status != http.StatusOK {
			t.Fatalf("rule client: %d %s", r.status, r.raw)
		}
		tok, _ = jwt.ParseInsecure([]byte(r.body["access_token"].(string)))
		if s := claimString(tok, "scope"); s != "orders.read" {
			t.Fatalf("rule client minted scope %q, want orders.read", s)
		}
	})
	if t.Failed() {
		t.FailNow()
	}

	// ---- forged keys and encodings ----
	rsaPub := rsaKey.Public().(*rsa.PublicKey)
	ecPub := ecKey.Public().(*ecdsa.PublicKey)
	rsaPKIX, _ := x509.MarshalPKIXPublicKey(rsaPub)
	ecPKIX, _ := x509.MarshalPKIXPublicKey(ecPub)
	rsaPKCS1 := x509.MarshalPKCS1PublicKey(rsaPub)
	ecPoint, _ := ecPub.ECDH()
	hmacKeys := []struct {
		name string
		kid  string
		key  []byte
	}{
		{"RSA PKIX PEM", "rsa-1", atkPEM("PUBLIC KEY", rsaPKIX)},
		{"RSA PKIX DER", "rsa-1", rsaPKIX},
		{"RSA PKCS1 PEM", "rsa-1", atkPEM("RSA PUBLIC KEY", rsaPKCS1)},
		{"RSA PKCS1 DER", "rsa-1", rsaPKCS1},
		{"RSA JWK", "rsa-1", atkJWKJSON(t, rsaPub)},
		{"EC PKIX PEM", "ec-1", atkPEM("PUBLIC KEY", ecPKIX)},
		{"EC PKIX DER", "ec-1", ecPKIX},
		{"EC point", "ec-1", ecPoint.Bytes()},
		{"EC JWK", "ec-1", atkJWKJSON(t, ecPub)},
	}
	hmacs := []struct {
		alg string
		h   func() hash.Hash
	}{{"HS256", sha256.New}, {"HS384", sha512.New384}, {"HS512", sha512.New}}

	n := elliptic.P256().Params().N
	nn := make([]byte, 64)
	n.FillBytes(nn[:32])
	n.FillBytes(nn[32:])
	x5c := atkSelfSigned(t, evilEC)
	evilJWK := atkJWKJSON(t, evilEC.Public())
	longKid := strings.Repeat("K", 10<<10)

	// A JWE of a valid claims set, encrypted to the issuer's own public key
	// (anyone can make one), and a JWE wrapping a validly signed token.
	jweClaims, err := jwe.Encrypt([]byte(atkClaims(nil)), jwe.WithKey(jwa.RSA_OAEP_256(), rsaPub))
	if err != nil {
		t.Fatal(err)
	}
	jweNested, err := jwe.Encrypt([]byte(valid), jwe.WithKey(jwa.RSA_OAEP_256(), rsaPub))
	if err != nil {
		t.Fatal(err)
	}
	vh, vrest, _ := strings.Cut(valid, ".")
	vp, vs, _ := strings.Cut(vrest, ".")

	// Encodings other than strict base64url, each validly signed over the
	// exact bytes sent.
	stdPadHeader := atkSignInput(base64.URLEncoding.EncodeToString([]byte(hdrEC+" ")), atkB64(atkClaims(nil)), atkES256(ecKey))
	stdAlphabet := func() string {
		for i := 0; i < 64; i++ {
			p := base64.StdEncoding.WithPadding(base64.NoPadding).EncodeToString([]byte(atkClaims(map[string]any{"x": strings.Repeat("~", i+3)})))
			if strings.ContainsAny(p, "+/") {
				return atkSignInput(atkB64(hdrEC), p, atkES256(ecKey))
			}
		}
		t.Fatal("no payload with + or / in standard base64")
		return ""
	}()
	nonCanonPayload := func() string {
		for i := 0; i < 3; i++ {
			p := atkB64(atkClaims(map[string]any{"x": strings.Repeat("y", i)}))
			if len(p)%4 == 2 { // last char carries 4 unused bits
				last := strings.Index(atkB64URL, p[len(p)-1:])
				return atkSignInput(atkB64(hdrEC), p[:len(p)-1]+string(atkB64URL[last|1]), atkES256(ecKey))
			}
		}
		t.Fatal("no payload length with unused trailing bits")
		return ""
	}()
	// ES256 signatures are 64 bytes: 86 characters, the last of which
	// carries 4 unused bits. Setting one gives another spelling of the
	// same signature bytes.
	nonCanonSig := vh + "." + vp + "." + vs[:len(vs)-1] + string(atkB64URL[strings.Index(atkB64URL, vs[len(vs)-1:])|1])
	paddedSig := valid + "=="
	stdSig := func() string {
		for i := 0; i < 64; i++ {
			tok := atkJWS(hdrRSA, atkClaims(map[string]any{"n": i}), atkRSA(rsaKey, crypto.SHA256, false))
			s := tok[strings.LastIndexByte(tok, '.')+1:]
			if strings.ContainsAny(s, "-_") {
				return tok[:strings.LastIndexByte(tok, '.')+1] + strings.NewReplacer("-", "+", "_", "/").Replace(s)
			}
		}
		t.Fatal("no RS256 signature with - or _")
		return ""
	}()

	var tokenAttacks []atkTokenAttack
	add := func(name, tok string) { tokenAttacks = append(tokenAttacks, atkTokenAttack{name: name, token: tok}) }

	// alg none, any case, with and without a signature.
	for _, alg := range []string{"none", "None", "NONE", "nOnE"} {
		h := `{"alg":"` + alg + `","kid":"ec-1"}`
		add("alg "+alg+" without signature", atkJWS(h, atkClaims(nil), nil))
		add("alg "+alg+" with a signature", atkJWS(h, atkClaims(nil), atkES256(ecKey)))
		add("alg "+alg+" without kid", atkJWS(`{"alg":"`+alg+`"}`, atkClaims(nil), nil))
	}
	add("alg empty", atkJWS(`{"alg":"","kid":"ec-1"}`, atkClaims(nil), atkES256(ecKey)))
	add("alg missing", atkJWS(`{"kid":"ec-1"}`, atkClaims(nil), atkES256(ecKey)))
	add("alg not a string", atkJWS(`{"alg":256,"kid":"ec-1"}`, atkClaims(nil), atkES256(ecKey)))

	// Key confusion: HMAC keyed with the issuer's public key.
	for _, hm := range hmacs {
		for _, k := range hmacKeys {
			add(hm.alg+" keyed with the "+k.name, atkJWS(`{"alg":"`+hm.alg+`","kid":"`+k.kid+`"}`, atkClaims(nil), atkHMAC(hm.h, k.key)))
		}
		add(hm.alg+" keyed with the RSA PEM, no kid", atkJWS(`{"alg":"`+hm.alg+`"}`, atkClaims(nil), atkHMAC(hm.h, hmacKeys[0].key)))
	}
	add("hs256 lower case keyed with the RSA PEM", atkJWS(`{"alg":"hs256","kid":"rsa-1"}`, atkClaims(nil), atkHMAC(sha256.New, hmacKeys[0].key)))

	// Psychic signatures (CVE-2022-21449).
	add("ES256 r=s=0", atkJWS(hdrEC, atkClaims(nil), atkFixed(make([]byte, 64))))
	add("ES256 r=s=0 without kid", atkJWS(`{"alg":"ES256"}`, atkClaims(nil), atkFixed(make([]byte, 64))))
	add("ES256 r=s=n", atkJWS(hdrEC, atkClaims(nil), atkFixed(nn)))
	add("ES256 r=s=n without kid", atkJWS(`{"alg":"ES256"}`, atkClaims(nil), atkFixed(nn)))
	add("ES256 r=s=0 DER-encoded", atkJWS(hdrEC, atkClaims(nil), atkFixed([]byte{0x30, 0x06, 0x02, 0x01, 0x00, 0x02, 0x01, 0x00})))
	add("ES256 empty signature", atkJWS(hdrEC, atkClaims(nil), atkFixed(nil)))

	// Header injection: the key is never taken from the token.
	inject := map[string]string{
		"jku": `"jku":"` + evil.JWKSURL() + `"`,
		"x5u": `"x5u":"` + evil.Server.URL + `/cert.pem"`,
		"jwk": `"jwk":` + string(evilJWK),
		"x5c": `"x5c":["` + x5c + `"]`,
	}
	for _, name := range []string{"jku", "x5u", "jwk", "x5c"} {
		for _, kid := range []string{`,"kid":"ec-1"`, ``, `,"kid":"attacker-1"`} {
			label := "no kid"
			if kid != "" {
				label = "kid " + strings.Trim(strings.TrimPrefix(kid, `,"kid":`), `"`)
			}
			add(name+" to the attacker's key, "+label, atkJWS(`{"alg":"ES256"`+kid+`,`+inject[name]+`}`, atkClaims(nil), atkES256(evilEC)))
		}
	}
	add("all four injections at once", atkJWS(`{"alg":"ES256","kid":"ec-1",`+inject["jku"]+","+inject["x5u"]+","+inject["jwk"]+","+inject["x5c"]+`}`, atkClaims(nil), atkES256(evilEC)))
	add("jwk of the attacker's RSA key, RS256", atkJWS(`{"alg":"RS256","kid":"rsa-1","jwk":`+string(atkJWKJSON(t, evilRSA.Public()))+`}`, atkClaims(nil), atkRSA(evilRSA, crypto.SHA256, false)))

	// kid games.
	add("kid path traversal, HS256 with an empty key", atkJWS(`{"alg":"HS256","kid":"../../../../../../dev/null"}`, atkClaims(nil), atkHMAC(sha256.New, nil)))
	add("kid path traversal, ES256 attacker key", atkJWS(`{"alg":"ES256","kid":"../../../../../../etc/passwd"}`, atkClaims(nil), atkES256(evilEC)))
	add("kid /dev/null, HS256 with an empty key", atkJWS(`{"alg":"HS256","kid":"/dev/null"}`, atkClaims(nil), atkHMAC(sha256.New, nil)))
	add("kid SQL injection, HS256 with the injected secret", atkJWS(`{"alg":"HS256","kid":"x' UNION SELECT 'attacker-secret' -- "}`, atkClaims(nil), atkHMAC(sha256.New, []byte("attacker-secret"))))
	add("kid SQL injection, ES256 attacker key", atkJWS(`{"alg":"ES256","kid":"ec-1' OR '1'='1"}`, atkClaims(nil), atkES256(evilEC)))
	add("kid of 10 KB", atkJWS(`{"alg":"ES256","kid":"`+longKid+`"}`, atkClaims(nil), atkES256(evilEC)))
	add("kid of 10 KB, HS256", atkJWS(`{"alg":"HS256","kid":"`+longKid+`"}`, atkClaims(nil), atkHMAC(sha256.New, []byte(longKid))))
	add("kid with a NUL after the real kid", atkJWS(`{"alg":"ES256","kid":"ec-1\u0000../x"}`, atkClaims(nil), atkES256(evilEC)))
	add("kid not a string", atkJWS(`{"alg":"ES256","kid":["ec-1"]}`, atkClaims(nil), atkES256(ecKey)))

	// crit and b64 (RFC 7515 §4.1.11, RFC 7797), validly signed by the issuer.
	add("crit with an unknown extension", atkJWS(`{"alg":"ES256","kid":"ec-1","crit":["https://evil.test/ext"],"https://evil.test/ext":true}`, atkClaims(nil), atkES256(ecKey)))
	add("crit naming a registered header", atkJWS(`{"alg":"ES256","kid":"ec-1","crit":["kid"]}`, atkClaims(nil), atkES256(ecKey)))
	add("crit empty", atkJWS(`{"alg":"ES256","kid":"ec-1","crit":[]}`, atkClaims(nil), atkES256(ecKey)))
	add("b64 false with crit", atkJWS(`{"alg":"ES256","kid":"ec-1","b64":false,"crit":["b64"]}`, atkClaims(nil), atkES256(ecKey)))
	add("b64 false without crit", atkJWS(`{"alg":"ES256","kid":"ec-1","b64":false}`, atkClaims(nil), atkES256(ecKey)))
	add("b64 true", atkJWS(`{"alg":"ES256","kid":"ec-1","b64":true}`, atkClaims(nil), atkES256(ecKey)))

	// alg that does not fit the kid's key, or is not on the allow-list.
	add("RS256 with the EC kid", atkJWS(`{"alg":"RS256","kid":"ec-1"}`, atkClaims(nil), atkRSA(evilRSA, crypto.SHA256, false)))
	add("ES256 with the RSA kid", atkJWS(`{"alg":"ES256","kid":"rsa-1"}`, atkClaims(nil), atkES256(evilEC)))
	add("PS256 validly signed by the issuer's RSA key (not allowed)", atkJWS(`{"alg":"PS256","kid":"rsa-1"}`, atkClaims(nil), atkRSA(rsaKey, crypto.SHA256, true)))
	add("RS384 validly signed by the issuer's RSA key (not allowed)", atkJWS(`{"alg":"RS384","kid":"rsa-1"}`, atkClaims(nil), atkRSA(rsaKey, crypto.SHA384, false)))
	add("ES384 with the P-256 kid", atkJWS(`{"alg":"ES384","kid":"ec-1"}`, atkClaims(nil), atkES256(evil384)))
	add("EdDSA with the EC kid", atkJWS(`{"alg":"EdDSA","kid":"ec-1"}`, atkClaims(nil), atkFixed(make([]byte, 64))))
	add("RS256 header, PSS signature", atkJWS(hdrRSA, atkClaims(nil), atkRSA(rsaKey, crypto.SHA256, true)))
	add("unknown alg", atkJWS(`{"alg":"XS256","kid":"ec-1"}`, atkClaims(nil), atkES256(ecKey)))
	add("alg with trailing space", atkJWS(`{"alg":"ES256 ","kid":"ec-1"}`, atkClaims(nil), atkES256(ecKey)))

	// Serializations and shapes.
	add("JWE encrypted to the issuer's public key", string(jweClaims))
	add("JWE wrapping a validly signed token", string(jweNested))
	add("JWE-shaped, dir", atkB64(`{"alg":"dir","enc":"A256GCM"}`)+"..aXY.Y2lwaGVy.dGFn")
	add("JWS JSON flattened", `{"protected":"`+vh+`","payload":"`+vp+`","signature":"`+vs+`"}`)
	add("JWS JSON general", `{"payload":"`+vp+`","signatures":[{"protected":"`+vh+`","signature":"`+vs+`"}]}`)
	add("four segments", valid+".ZXh0cmE")
	add("trailing dot", valid+".")
	add("six segments", valid+".a.b.c")
	add("two segments", vh+"."+vp)
	add("one segment", vp)
	add("empty payload", vh+".."+vs)
	add("empty header", "."+vp+"."+vs)
	add("signature stripped", vh+"."+vp+".")
	add("payload detached, claims in a fourth segment", vh+".."+vs+"."+vp)
	add("padded base64url header, validly signed", stdPadHeader)
	add("standard-alphabet payload, validly signed", stdAlphabet)
	add("non-canonical payload encoding, validly signed", nonCanonPayload)
	add("non-canonical signature encoding", nonCanonSig)
	add("padded signature", paddedSig)
	add("standard-alphabet signature", stdSig)
	add("invalid base64 character", vh+"."+vp[:10]+"*"+vp[11:]+"."+vs)
	add("space inside the token", vh+"."+vp[:10]+" "+vp[10:]+"."+vs)

	// Header and payload that are not JSON objects, validly signed.
	for name, p := range map[string]string{
		"not JSON": "hello", "array": `[]`, "string": `"alice"`, "number": `42`, "null": `null`, "true": `true`,
		"empty object": `{}`, "truncated": `{"iss":"https://idp.test","sub":"alice"`,
		"two objects": atkClaims(nil) + `{"sub":"mallory"}`, "BOM": "\ufeff" + atkClaims(nil),
		"comment": `{/*x*/"iss":"https://idp.test"}`, "single quotes": `{'iss':'https://idp.test'}`,
		"NaN": atkClaimsWith(`"nbf":NaN`),
	} {
		add("payload "+name, atkJWS(hdrEC, p, atkES256(ecKey)))
	}
	for name, h := range map[string]string{
		"not JSON": "alg=ES256", "array": `["ES256"]`, "string": `"ES256"`, "null": `null`,
		"two objects": hdrEC + `{"alg":"none"}`, "truncated": `{"alg":"ES256"`,
	} {
		add("header "+name, atkJWS(h, atkClaims(nil), atkES256(ecKey)))
	}

	// Duplicate member names (RFC 7515 §5.2, RFC 7519 §4), validly signed.
	add("duplicate sub", atkJWS(hdrEC, atkClaimsWith(`"sub":"mallory"`), atkES256(ecKey)))
	add("duplicate sub, escaped name", atkJWS(hdrEC, atkClaimsWith(`"\u0073ub":"mallory"`), atkES256(ecKey)))
	add("duplicate iss", atkJWS(hdrEC, `{"iss":"https://evil.test",`+atkClaims(nil)[1:], atkES256(ecKey)))
	add("duplicate aud", atkJWS(hdrEC, atkClaimsWith(`"aud":"https://other.test"`), atkES256(ecKey)))
	add("duplicate exp, second far away", atkJWS(hdrEC, atkClaimsWith(fmt.Sprintf(`"exp":%d`, now.Add(1000*time.Hour).Unix())), atkES256(ecKey)))
	add("duplicate scope", atkJWS(hdrEC, atkClaimsWith(`"scope":"orders.admin"`), atkES256(ecKey)))
	add("duplicate inside act", atkJWS(hdrEC, atkClaimsWith(`"act":{"sub":"frontend","sub":"mallory"}`), atkES256(ecKey)))
	add("duplicate alg in the header", atkJWS(`{"alg":"none","kid":"ec-1","alg":"ES256"}`, atkClaims(nil), atkES256(ecKey)))
	add("duplicate kid in the header", atkJWS(`{"alg":"ES256","kid":"attacker-1","kid":"ec-1"}`, atkClaims(nil), atkES256(ecKey)))

	// Invalid UTF-8, validly signed.
	add("invalid UTF-8 in sub", atkJWS(hdrEC, atkClaimsWith(`"name":"al`+"\xff"+`ice"`), atkES256(ecKey)))
	add("overlong UTF-8", atkJWS(hdrEC, atkClaimsWith(`"name":"`+"\xc0\xaf"+`"`), atkES256(ecKey)))
	add("UTF-8 encoded surrogate", atkJWS(hdrEC, atkClaimsWith(`"name":"`+"\xed\xa0\x80"+`"`), atkES256(ecKey)))
	add("invalid UTF-8 in the header", atkJWS(`{"alg":"ES256","kid":"ec-1","x":"`+"\xfe"+`"}`, atkClaims(nil), atkES256(ecKey)))

	// Size, before any parsing.
	add("validly signed token just over 16 KiB", atkTokenOfSize(t, ecKey, 16<<10, true))
	// Past Caddy's own header limit (16 KiB + slack) the middleware never
	// sees it: Caddy answers 431 itself. The endpoint reads it from the body.
	tokenAttacks = append(tokenAttacks, atkTokenAttack{name: "40 KB token", token: vh + "." + strings.Repeat("A", 40<<10) + "." + vs,
		mwStatus: http.StatusRequestHeaderFieldsTooLarge, mwCode: "-"})

	// Claims.
	addClaims := func(name string, c testidp.Claims) { add(name, idp.Token("ec-1", c)) }
	addClaims("exp missing", testidp.Claims{"exp": nil, "scope": "orders.read"})
	addClaims("expired an hour ago", testidp.Claims{"exp": now.Add(-time.Hour).Unix(), "scope": "orders.read"})
	addClaims("expired beyond the skew", testidp.Claims{"exp": now.Add(-2 * time.Minute).Unix(), "scope": "orders.read"})
	addClaims("exp zero", testidp.Claims{"exp": 0, "scope": "orders.read"})
	add("exp not a number", atkJWS(hdrEC, atkClaims(map[string]any{"exp": "tomorrow"}), atkES256(ecKey)))
	addClaims("nbf beyond the skew", testidp.Claims{"nbf": now.Add(2 * time.Minute).Unix(), "scope": "orders.read"})
	addClaims("iat beyond the skew", testidp.Claims{"iat": now.Add(2 * time.Minute).Unix(), "scope": "orders.read"})
	add("wrong iss (another IdP's own token)", evil.Token("ec-1", testidp.Claims{"scope": "orders.read"}))
	add("forged iss (another IdP claiming ours)", evil.Token("ec-1", testidp.Claims{"iss": atkIdP, "scope": "orders.read"}))
	addClaims("iss missing", testidp.Claims{"iss": nil, "scope": "orders.read"})
	addClaims("iss with a trailing slash", testidp.Claims{"iss": atkIdP + "/", "scope": "orders.read"})
	addClaims("iss in upper case", testidp.Claims{"iss": strings.ToUpper(atkIdP), "scope": "orders.read"})
	add("iss not a string", atkJWS(hdrEC, atkClaims(map[string]any{"iss": []string{atkIdP}}), atkES256(ecKey)))
	addClaims("aud missing", testidp.Claims{"aud": nil, "scope": "orders.read"})
	addClaims("aud wrong", testidp.Claims{"aud": "https://other.test", "scope": "orders.read"})
	addClaims("aud of the upstream (token meant for it directly)", testidp.Claims{"aud": audOrders, "scope": "orders.read"})
	addClaims("aud array without ours", testidp.Claims{"aud": []string{"https://a.test", "https://b.test"}, "scope": "orders.read"})
	addClaims("aud with a trailing slash", testidp.Claims{"aud": atkAudience + "/", "scope": "orders.read"})
	addClaims("aud in upper case", testidp.Claims{"aud": strings.ToUpper(atkAudience), "scope": "orders.read"})
	add("aud empty array", atkJWS(hdrEC, atkClaims(map[string]any{"aud": []string{}}), atkES256(ecKey)))
	addClaims("sub missing", testidp.Claims{"sub": nil, "scope": "orders.read"})
	addClaims("sub empty", testidp.Claims{"sub": "", "scope": "orders.read"})
	add("sub not a string", atkJWS(hdrEC, atkClaims(map[string]any{"sub": 42}), atkES256(ecKey)))
	add("sub an object", atkJWS(hdrEC, atkClaims(map[string]any{"sub": map[string]any{"id": "alice"}}), atkES256(ecKey)))
	for name, v := range map[string]any{
		"number": 42, "object": map[string]any{"orders.read": true}, "bool": true,
		"array of numbers": []any{1, 2}, "nested array": []any{[]any{"orders.read"}},
	} {
		add("scope "+name, atkJWS(hdrEC, atkClaims(map[string]any{"scope": v}), atkES256(ecKey)))
	}
	for name, v := range map[string]any{
		"a string": "frontend", "an array": []any{map[string]any{"sub": "frontend"}}, "a number": 7,
		"nested past the limit": deepAct(6), "nested far past the limit": deepAct(64),
		"with a non-object inside": map[string]any{"sub": "frontend", "act": "mallory"},
	} {
		addClaims("act "+name, testidp.Claims{"scope": "orders.read", "act": v})
	}
	for name, v := range map[string]any{
		"another actor":               map[string]any{"sub": "https://other-gateway.test"},
		"our actor at another iss":    map[string]any{"sub": gatewayIssuer, "iss": "https://evil.test"},
		"only an iss":                 map[string]any{"iss": gatewayIssuer},
		"nothing":                     map[string]any{},
		"a claim we cannot show":      map[string]any{"email": "gw@example.com"},
		"a string":                    gatewayIssuer,
		"an array naming our actor":   []any{map[string]any{"sub": gatewayIssuer}},
		"our actor, but not a string": map[string]any{"sub": []any{gatewayIssuer}},
	} {
		tokenAttacks = append(tokenAttacks, atkTokenAttack{
			name: "may_act " + name, mwStatus: 403, mwCode: "insufficient_scope",
			token: idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "may_act": v}),
		})
	}

	// Other kinds of tokens used as access tokens.
	for _, c := range []string{"nonce", "at_hash", "c_hash"} {
		addClaims("ID token ("+c+") as an access token", testidp.Claims{"scope": "orders.read", c: "x"})
	}
	for name, c := range map[string]testidp.Claims{
		"typ Refresh (Keycloak)":         {"typ": "Refresh", "scope": "orders.read"},
		"token_use refresh (Cognito)":    {"token_use": "refresh", "scope": "orders.read"},
		"token_type refresh_token":       {"token_type": "refresh_token", "scope": "orders.read"},
		"typ Offline refresh (Keycloak)": {"typ": "Offline-Refresh", "scope": "orders.read"},
	} {
		addClaims("refresh token, "+name, c)
	}
	add("a token the gateway minted, presented back", minted)

	// Scope tokens are delimited by %x20 alone (issue 9 §6): a scope with
	// another (Unicode) space is malformed, never split into a grant.
	for name, sp := range map[string]string{"NBSP": "\u00a0", "NEL (U+0085)": "\u0085", "em space": "\u2003", "tab": "\t", "line feed": "\n"} {
		addClaims("scope split by "+name, testidp.Claims{"scope": "tenant:acme" + sp + "orders.write"})
		addClaims("scp array element with "+name, testidp.Claims{"scope": []any{"orders.read", "tenant:acme" + sp + "orders.write"}})
	}

	// Sender-constrained tokens (issue 18): a DPoP- or mTLS-bound token
	// presented without proof of possession is never downgraded to bearer.
	addClaims("DPoP-bound token (cnf.jkt) as a bearer token", testidp.Claims{"scope": "orders.read", "cnf": map[string]any{"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}})
	addClaims("mTLS-bound token (cnf.x5t#S256) as a bearer token", testidp.Claims{"scope": "orders.read", "cnf": map[string]any{"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"}})
	addClaims("token with an unknown cnf member", testidp.Claims{"scope": "orders.read", "cnf": map[string]any{"kid": "k1"}})

	// Request-level attacks on the middleware.
	other := idp.Token("rsa-1", testidp.Claims{"sub": "bob", "scope": "orders.read"})
	queryToken := idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "jti": "in-the-query"})
	// Each request attack carries its own token, so a log line is traced
	// to the one case that sent it.
	fresh := func(i int) string {
		return idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "jti": fmt.Sprintf("request-%d", i)})
	}
	requestAttacks := []atkRequestAttack{
		{name: "two Authorization headers", req: atkReq{headers: [][2]string{{"Authorization", "Bearer " + fresh(0)}, {"Authorization", "Bearer " + other}}}, status: 400, code: "invalid_request"},
		{name: "two Authorization headers, the second garbage", req: atkReq{headers: [][2]string{{"Authorization", "Bearer " + fresh(1)}, {"Authorization", "Bearer x"}}}, status: 400, code: "invalid_request"},
		{name: "Bearer and Basic", req: atkReq{headers: [][2]string{{"Authorization", "Basic YTpi"}, {"Authorization", "Bearer " + fresh(2)}}}, status: 400, code: "invalid_request"},
		{name: "two tokens in one Authorization", req: atkReq{headers: [][2]string{{"Authorization", "Bearer " + fresh(3) + ", Bearer " + other}}}, status: 401, code: "invalid_token"},
		{name: "Bearer scheme twice", req: atkReq{headers: [][2]string{{"Authorization", "Bearer Bearer " + fresh(4)}}}, status: 401, code: "invalid_token"},
		{name: "empty bearer", req: atkReq{headers: [][2]string{{"Authorization", "Bearer "}}}, status: 401, code: ""},
		{name: "Txn-Token instead of Authorization", req: atkReq{headers: [][2]string{{"Txn-Token", fresh(5)}}}, status: 401},
		{name: "Proxy-Authorization instead of Authorization", req: atkReq{headers: [][2]string{{"Proxy-Authorization", "Bearer " + fresh(6)}}}, status: 401},
		{name: "X-Forwarded-Authorization", req: atkReq{headers: [][2]string{{"X-Forwarded-Authorization", "Bearer " + fresh(7)}}}, status: 401},
		{name: "X-Access-Token", req: atkReq{headers: [][2]string{{"X-Access-Token", fresh(8)}}}, status: 401},
		{name: "token in a cookie", req: atkReq{headers: [][2]string{{"Cookie", "access_token=" + fresh(9)}}}, status: 401},
		{name: "Authorization as a trailer only", req: atkReq{trailer: http.Header{"Authorization": {"Bearer " + fresh(10)}}}, status: 401},
		{name: "access_token in the query", req: atkReq{query: "access_token=" + queryToken}, status: 400, code: "invalid_request"},
		{name: "access_token in the query next to a valid header", req: atkReq{query: "access_token=" + queryToken, headers: atkBearer(fresh(12))}, status: 400, code: "invalid_request"},
		{name: "rule grants a scope the route does not delegate", req: atkReq{path: "/rule/x", headers: atkBearer(idp.Token("ec-1", testidp.Claims{"scope": nil}))}, status: 403, code: "insufficient_scope"},
		{name: "subject holds only the rule's scope", req: atkReq{path: "/rule/x", headers: atkBearer(idp.Token("ec-1", testidp.Claims{"scope": "orders.admin"}))}, status: 403, code: "insufficient_scope"},

		// Issue 9: double-quoted CEL strings, impersonation of a delegated
		// token, the token in the URI or a form body in other encodings.
		{name: `CEL deny_if subject.sub == "client" (double quotes)`, req: atkReq{path: "/cel/x", headers: atkBearer(idp.Token("ec-1", testidp.Claims{"sub": "client", "scope": "orders.read"}))}, status: 403, code: "insufficient_scope"},
		{name: `CEL deny_if subject.sub == 'actor' (single quotes)`, req: atkReq{path: "/cel/x", headers: atkBearer(idp.Token("ec-1", testidp.Claims{"sub": "actor", "scope": "orders.read"}))}, status: 403, code: "insufficient_scope"},
		{name: "CEL deny_if in backticks", req: atkReq{path: "/cel/x", headers: atkBearer(idp.Token("ec-1", testidp.Claims{"sub": "route", "scope": "orders.read"}))}, status: 403, code: "insufficient_scope"},
		{name: `CEL deny_if ... || subject.sub == "subject"`, req: atkReq{path: "/cel/x", headers: atkBearer(idp.Token("ec-1", testidp.Claims{"sub": "subject", "scope": "orders.read"}))}, status: 403, code: "insufficient_scope"},
		{name: "impersonation route, subject already delegated (act)", req: atkReq{path: "/imp/x", headers: atkBearer(idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "act": map[string]any{"sub": "frontend"}}))}, status: 403, code: "insufficient_scope"},
		{name: "token percent-encoded in the path", req: pctReq(fresh(20), func(tok string) atkReq { return atkReq{path: "/api/x/" + atkPct(tok)} }), status: 400, code: "invalid_request"},
		{name: "token percent-encoded twice in the path", req: pctReq(fresh(21), func(tok string) atkReq { return atkReq{path: "/api/x/" + strings.ReplaceAll(atkPct(tok), "%", "%25")} }), status: 400, code: "invalid_request"},
		{name: "token percent-encoded in the query", req: pctReq(fresh(22), func(tok string) atkReq { return atkReq{query: "q=" + atkPct(tok)} }), status: 400, code: "invalid_request"},
		{name: "token partly encoded after a stray %", req: pctReq(fresh(23), func(tok string) atkReq { return atkReq{query: "a=%zz&q=" + tok[:5] + atkPct(tok[5:])} }), status: 400, code: "invalid_request"},
		{name: "access_token in a form body beside a valid header", req: atkReq{headers: atkBearer(fresh(24)), form: "a=1&access_token=" + fresh(25)}, status: 400, code: "invalid_request"},
		{name: "access_token, key percent-encoded, in a form body", req: atkReq{headers: atkBearer(fresh(26)), form: "acc%65ss_token=" + fresh(27)}, status: 400, code: "invalid_request"},
		{name: "the bearer token in another form field", req: pctReq(fresh(28), func(tok string) atkReq { return atkReq{form: "note=" + atkPct(tok)} }), status: 400, code: "invalid_request"},
		{name: "form body over 64 KiB beside a header", req: atkReq{headers: atkBearer(fresh(29)), form: "pad=" + strings.Repeat("x", 64<<10)}, status: 413, code: "invalid_request"},
	}
	for i := range requestAttacks {
		// A token in the URI may reach Caddy's own request logs: queryToken
		// is kept out of the log scan; every other one is scanned.
		for _, h := range requestAttacks[i].req.headers {
			requestAttacks[i].tokens = append(requestAttacks[i].tokens, h[1])
		}
		for _, v := range requestAttacks[i].req.trailer {
			requestAttacks[i].tokens = append(requestAttacks[i].tokens, v...)
		}
	}

	// Request-level attacks on the token endpoint.
	idToken := idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "nonce": "n-0S6", "at_hash": "x"})
	refresh := idp.Token("ec-1", testidp.Claims{"typ": "Refresh", "scope": "orders.read"})
	narrowSubject := idp.Token("ec-1", testidp.Claims{"scope": "orders.read orders.write orders.admin"})
	endpointAttacks := []atkEndpointAttack{
		{name: "scope beyond the client", form: exchangeForm(narrowSubject, "scope", "orders.write"), client: atkNarrow, secret: atkNarrowSec, status: 400, code: "invalid_scope"},
		{name: "scope nobody delegates", form: exchangeForm(narrowSubject, "scope", "orders.admin"), status: 400, code: "invalid_scope"},
		{name: "two scopes beyond the client", form: exchangeForm(narrowSubject, "scope", "orders.write orders.admin"), client: atkNarrow, secret: atkNarrowSec, status: 400, code: "invalid_scope"},
		{name: "scope a rule grants but the client does not delegate", form: exchangeForm(valid, "scope", "orders.admin"), client: atkRuleCl, secret: atkRuleSec, status: 400, code: "invalid_scope"},
		{name: "scope the subject does not hold", form: exchangeForm(idp.Token("ec-1", testidp.Claims{"scope": "orders.read"}), "scope", "orders.write"), status: 400, code: "invalid_scope"},
		{name: "audience outside the allow-list", form: exchangeForm(valid, "audience", "https://payroll.internal"), status: 400, code: "invalid_target"},
		{name: "audience of the gateway itself", form: exchangeForm(valid, "audience", gatewayIssuer), status: 400, code: "invalid_target"},
		{name: "one good audience, one outside", form: exchangeForm(valid, "audience", audOrders, "audience", "https://payroll.internal"), status: 400, code: "invalid_target"},
		{name: "resource outside the allow-list", form: exchangeForm(valid, "resource", "https://api.example/payroll"), status: 400, code: "invalid_target"},
		{name: "resource of another client", form: exchangeForm(valid, "resource", atkResource), client: atkNarrow, secret: atkNarrowSec, status: 400, code: "invalid_target"},
		{name: "audience of another client's route", form: exchangeForm(valid, "audience", atkRuleAud), status: 400, code: "invalid_target"},
		{name: "ID token as an access token", form: exchangeForm(idToken), status: 400, code: "invalid_request"},
		{name: "ID token as an ID token (issuer not trusted for ID tokens)", form: exchangeForm(idToken, "subject_token_type", urnIDToken), status: 400, code: "invalid_request"},
		{name: "ID token as a plain JWT", form: exchangeForm(idToken, "subject_token_type", urnJWT), status: 400, code: "invalid_request"},
		{name: "refresh token as an access token", form: exchangeForm(refresh), status: 400, code: "invalid_request"},
		{name: "refresh token as a plain JWT", form: exchangeForm(refresh, "subject_token_type", urnJWT), status: 400, code: "invalid_request"},
		{name: "refresh_token subject type", form: exchangeForm(valid, "subject_token_type", urnRefreshToken), status: 400, code: "invalid_request"},
		{name: "own minted token as a plain JWT", form: exchangeForm(minted, "subject_token_type", urnJWT), status: 400, code: "invalid_request"},
		{name: "own minted token as the actor token", form: exchangeForm(valid, "actor_token", minted, "actor_token_type", urnAccessToken), status: 400, code: "invalid_request"},
		{name: "refresh token as the actor token", form: exchangeForm(valid, "actor_token", refresh, "actor_token_type", urnAccessToken), status: 400, code: "invalid_request"},
		{name: `client CEL deny_if subject.sub == "client" (double quotes)`, form: exchangeForm(idp.Token("ec-1", testidp.Claims{"sub": "client", "scope": "orders.read"})), client: atkCELCl, secret: atkCELSec, status: 400, code: "invalid_request"},
		{name: "client CEL deny_if in backticks", form: exchangeForm(idp.Token("ec-1", testidp.Claims{"sub": "route", "scope": "orders.read"})), client: atkCELCl, secret: atkCELSec, status: 400, code: "invalid_request"},
		{name: "may_impersonate client, subject already delegated (act)", form: exchangeForm(idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "act": map[string]any{"sub": "frontend"}})), client: atkImpCl, secret: atkImpSec, status: 400, code: "invalid_request"},
		{name: "scope parameter split by NBSP", form: exchangeForm(valid, "scope", "orders.read\u00a0orders.write"), status: 400, code: "invalid_scope"},
		{name: "scope parameter with 300 distinct scopes", form: exchangeForm(valid, "scope", atkManyScopes(300)), status: 400, code: "invalid_scope"},
		{name: "DPoP-bound actor token without proof", form: exchangeForm(valid, "actor_token", idp.Token("ec-1", testidp.Claims{"sub": "bob", "cnf": map[string]any{"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}}), "actor_token_type", urnAccessToken), status: 400, code: "invalid_request"},
		{name: "alg none actor token", form: exchangeForm(valid, "actor_token", atkJWS(`{"alg":"none"}`, atkClaims(map[string]any{"sub": "bob"}), nil), "actor_token_type", urnAccessToken), status: 400, code: "invalid_request"},
	}

	// ---- run ----
	base := g.minted(t)
	attempts := 0
	echoes := func(t *testing.T, where, tok string) {
		if len(tok) > 20 && strings.Contains(where, tok) {
			t.Error("the answer echoes the token")
		}
	}
	checkNothing := func(t *testing.T, calls int) {
		t.Helper()
		if g.up.calls() != calls {
			t.Error("the upstream was called")
		}
		if m := g.minted(t); m != base {
			t.Errorf("a token was minted (ok counters %v -> %v)", base, m)
			base = m
		}
	}
	checkMW := func(t *testing.T, req atkReq, status int, code string, tok string) {
		t.Helper()
		attempts++
		calls := g.up.calls()
		resp, body := g.mw(t, req)
		challenge := resp.Header.Get("WWW-Authenticate")
		if resp.StatusCode != status {
			t.Errorf("middleware: status %d (%s), want %d", resp.StatusCode, challenge, status)
		}
		if code == "-" {
			code = ""
			if challenge != "" {
				t.Errorf("middleware: WWW-Authenticate %q, want none", challenge)
			}
		} else if !strings.HasPrefix(challenge, `Bearer realm="`) {
			t.Errorf("middleware: WWW-Authenticate %q", challenge)
		}
		switch {
		case code == "" && strings.Contains(challenge, "error="):
			t.Errorf("middleware: %q carries an error code for a request without credentials", challenge)
		case code != "" && !strings.Contains(challenge, `error="`+code+`"`):
			t.Errorf("middleware: WWW-Authenticate %q, want error=%q", challenge, code)
		}
		echoes(t, challenge+body, tok)
		checkNothing(t, calls)
	}
	checkEP := func(t *testing.T, form url.Values, client, secret string, status int, code string) {
		t.Helper()
		attempts++
		if client == "" {
			client, secret = atkClient, atkSecret
		}
		calls := g.up.calls()
		r := g.ep(t, form, client, secret)
		if r.status != status || r.body["error"] != code {
			t.Errorf("endpoint: %d %v (%v), want %d %s", r.status, r.body["error"], r.body["error_description"], status, code)
		}
		if _, ok := r.body["access_token"]; ok {
			t.Error("endpoint: an access_token was issued")
		}
		echoes(t, r.raw, form.Get("subject_token"))
		checkNothing(t, calls)
	}

	type sentToken struct{ by, tok string }
	var sent []sentToken
	for _, a := range tokenAttacks {
		sent = append(sent, sentToken{"token/" + a.name, a.token})
		t.Run("token/"+a.name, func(t *testing.T) {
			status, code := a.mwStatus, a.mwCode
			if status == 0 {
				status, code = http.StatusUnauthorized, "invalid_token"
			}
			checkMW(t, atkReq{headers: atkBearer(a.token)}, status, code, a.token)
			checkEP(t, exchangeForm(a.token), "", "", http.StatusBadRequest, "invalid_request")
		})
	}
	for _, a := range requestAttacks {
		for _, tok := range a.tokens {
			sent = append(sent, sentToken{"middleware/" + a.name, tok})
		}
		t.Run("middleware/"+a.name, func(t *testing.T) {
			checkMW(t, a.req, a.status, a.code, "")
		})
	}
	for _, a := range endpointAttacks {
		sent = append(sent, sentToken{"endpoint/" + a.name, a.form.Get("subject_token")}, sentToken{"endpoint/" + a.name, a.form.Get("actor_token")})
		t.Run("endpoint/"+a.name, func(t *testing.T) {
			checkEP(t, a.form, a.client, a.secret, a.status, a.code)
		})
	}

	t.Logf("attack catalogue: %d attacks (%d forged or abused tokens through both doors, %d middleware requests, %d endpoint requests), %d requests sent",
		len(tokenAttacks)+len(requestAttacks)+len(endpointAttacks), len(tokenAttacks), len(requestAttacks), len(endpointAttacks), attempts)
	// No header made the gateway fetch an attacker's URL.
	if n := evil.Fetches.Load(); n != 0 {
		t.Errorf("the attacker's JWKS/x5u server was fetched %d times", n)
	}
	// Nothing sent, in any form, was logged (the tokens' header.payload are
	// scanned too when long enough to be meaningful). Each token logged is
	// named by the first case that sent it, then the shared check runs.
	logs, err := os.ReadFile(g.logFile)
	if err != nil {
		t.Fatal(err)
	}
	var scan []string
	for _, s := range sent {
		tok := strings.TrimPrefix(s.tok, "Bearer ")
		if i := strings.LastIndex(tok, "."); i >= 0 && i < 16 {
			tok = tok[i+1:] // too short a signing input to scan for; scan the rest
		}
		scan = append(scan, tok)
		// header.payload, when there is a payload: a header alone is shared
		// by many tokens and would blame the wrong case.
		signingInput := ""
		if i := strings.LastIndex(tok, "."); i > 0 {
			if h, p, ok := strings.Cut(tok[:i], "."); ok && h != "" && p != "" {
				signingInput = tok[:i]
			}
		}
		if len(tok) >= 16 && (strings.Contains(string(logs), tok) || signingInput != "" && strings.Contains(string(logs), signingInput)) {
			t.Errorf("logged: the token (or its header.payload) sent by %s", s.by)
		}
	}
	g.assertNoTokenLogged(t, scan...)
}

const atkB64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

// TestAttackSmuggledHeaders: a request with a valid bearer token that also
// carries the inbound token elsewhere (a Txn-Token header, a forwarded
// Authorization, a trailer, the query) is exchanged, and the upstream sees
// only the minted token: never the inbound one, in no header, trailer or URI.
func TestAttackSmuggledHeaders(t *testing.T) {
	g := startAttackGateway(t, "")
	var sent []string
	cases := []struct {
		name  string
		build func(tok string) atkReq
	}{
		{"Txn-Token", func(tok string) atkReq {
			return atkReq{headers: append(atkBearer(tok), [2]string{"Txn-Token", tok})}
		}},
		{"X-Forwarded-Authorization", func(tok string) atkReq {
			return atkReq{headers: append(atkBearer(tok), [2]string{"X-Forwarded-Authorization", "Bearer " + tok})}
		}},
		{"Proxy-Authorization", func(tok string) atkReq {
			return atkReq{headers: append(atkBearer(tok), [2]string{"Proxy-Authorization", "Bearer " + tok})}
		}},
		{"a cookie", func(tok string) atkReq {
			return atkReq{headers: append(atkBearer(tok), [2]string{"Cookie", "a=b; at=" + tok + "; c=d"})}
		}},
		{"a second value of a custom header", func(tok string) atkReq {
			return atkReq{headers: append(atkBearer(tok), [2]string{"X-Token", "harmless"}, [2]string{"X-Token", tok})}
		}},
		{"lower-case bearer scheme", func(tok string) atkReq {
			return atkReq{headers: [][2]string{{"Authorization", "bearer " + tok}, {"X-Copy", tok}}}
		}},
		{"a Txn-Token trailer", func(tok string) atkReq {
			return atkReq{headers: atkBearer(tok), trailer: http.Header{"Txn-Token": {tok}}}
		}},
		{"an Authorization trailer", func(tok string) atkReq {
			return atkReq{headers: atkBearer(tok), trailer: http.Header{"Authorization": {"Bearer " + tok}}}
		}},
		{"another query parameter", func(tok string) atkReq {
			return atkReq{headers: atkBearer(tok), query: "token=" + url.QueryEscape(tok)}
		}},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tok := g.idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "jti": fmt.Sprintf("smuggle-%d", i)})
			if c.name != "another query parameter" {
				sent = append(sent, tok)
			}
			before := g.up.calls()
			resp, body := g.mw(t, c.build(tok))
			if c.name == "another query parameter" {
				// refused outright: a URI travels into logs everywhere
				if resp.StatusCode != http.StatusBadRequest || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="invalid_request"`) {
					t.Fatalf("status %d %s", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
				}
				if g.up.calls() != before {
					t.Fatal("upstream called")
				}
				return
			}
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d %s %s", resp.StatusCode, resp.Header.Get("WWW-Authenticate"), body)
			}
			if g.up.calls() != before+1 {
				t.Fatal("upstream not called once")
			}
			seen := g.up.last()
			if m := strings.TrimPrefix(seen.header.Get("Authorization"), "Bearer "); m == "" || m == tok {
				t.Fatalf("upstream Authorization %q", seen.header.Get("Authorization"))
			}
			for where, h := range map[string]http.Header{"header": seen.header, "trailer": seen.trailer} {
				for name, values := range h {
					for _, v := range values {
						if strings.Contains(v, tok) {
							t.Errorf("the inbound token reached the upstream in %s %s", where, name)
						}
					}
				}
			}
			if u, _ := url.QueryUnescape(seen.uri); strings.Contains(u, tok) {
				t.Errorf("the inbound token reached the upstream in the request URI")
			}
		})
	}
	// The query case is kept out of the scan: Caddy's own request logs may
	// carry a URI (see the endpoint tests).
	g.assertNoTokenLogged(t, sent...)
	t.Logf("smuggling attempts: %d", len(cases))
}

// TestAttackConfiguredMaxTokenSize: a smaller max_token_size is enforced on
// validly signed tokens, through both doors; a token within it still works.
func TestAttackConfiguredMaxTokenSize(t *testing.T) {
	g := startAttackGateway(t, "max_token_size 2048")
	key := g.idp.PrivateKey("ec-1")
	fits := atkTokenOfSize(t, key, 2048, false)
	over := atkTokenOfSize(t, key, 2048, true)
	if resp, body := g.mw(t, atkReq{headers: atkBearer(fits)}); resp.StatusCode != http.StatusOK {
		t.Fatalf("a %d-byte token: %d %s %s", len(fits), resp.StatusCode, resp.Header.Get("WWW-Authenticate"), body)
	}
	base := g.minted(t)
	calls := g.up.calls()
	resp, _ := g.mw(t, atkReq{headers: atkBearer(over)})
	if c := resp.Header.Get("WWW-Authenticate"); resp.StatusCode != 401 || !strings.Contains(c, `error="invalid_token"`) {
		t.Errorf("a %d-byte token: %d %q, want 401 invalid_token", len(over), resp.StatusCode, c)
	}
	r := g.ep(t, exchangeForm(over), atkClient, atkSecret)
	if r.status != 400 || r.body["error"] != "invalid_request" {
		t.Errorf("endpoint, a %d-byte token: %d %s", len(over), r.status, r.raw)
	}
	if g.up.calls() != calls {
		t.Error("the upstream was called")
	}
	if g.minted(t) != base {
		t.Error("a token was minted")
	}
	g.assertNoTokenLogged(t, fits, over)
	logs, _ := os.ReadFile(g.logFile)
	if !strings.Contains(string(logs), `"reason":"too_large"`) {
		t.Error("no refusal logged with reason too_large")
	}
}
