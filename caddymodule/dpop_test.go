package caddymodule

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// Sender-constrained tokens (issue 18) through real Caddy: DPoP proofs made
// with jwx as a client library makes them, mutual TLS with certificates
// made here, both front doors.

const (
	dpClient    = "dpop-svc"
	dpSecret    = "dpop-svc-secret"
	dpUnbind    = "unbind-svc" // allow_unbinding
	dpUnbindSec = "unbind-svc-secret"
)

// dpopClient is a DPoP client: its key and the proofs it makes.
type dpopClient struct {
	key jwk.Key // private
	pub jwk.Key
	alg jwa.SignatureAlgorithm
	jkt string
}

func newDPoPClient(t testing.TB, alg string) *dpopClient {
	t.Helper()
	var raw any
	switch alg {
	case "ES256":
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		raw = k
	case "EdDSA":
		_, k, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		raw = k
	default:
		t.Fatalf("alg %s", alg)
	}
	key, err := jwk.Import(raw)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := key.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	tp, err := pub.Thumbprint(crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := jwa.LookupSignatureAlgorithm(alg)
	return &dpopClient{key: key, pub: pub, alg: a, jkt: base64.RawURLEncoding.EncodeToString(tp)}
}

// proof makes a DPoP proof (RFC 9449 §4.2) with jwx; edit may change the
// claims before signing (a nil value removes one).
func (c *dpopClient) proof(t testing.TB, method, htu, accessToken string, edit map[string]any) string {
	t.Helper()
	claims := map[string]any{"jti": randomID(t), "htm": method, "htu": htu, "iat": time.Now().Unix()}
	if accessToken != "" {
		claims["ath"] = athOf(accessToken)
	}
	for k, v := range edit {
		if v == nil {
			delete(claims, k)
		} else {
			claims[k] = v
		}
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	hdr := jws.NewHeaders()
	_ = hdr.Set(jws.TypeKey, "dpop+jwt")
	_ = hdr.Set(jws.JWKKey, c.pub)
	signed, err := jws.Sign(payload, jws.WithKey(c.alg, c.key, jws.WithProtectedHeaders(hdr)))
	if err != nil {
		t.Fatal(err)
	}
	return string(signed)
}

func athOf(tok string) string {
	sum := sha256.Sum256([]byte(tok))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

func randomID(t testing.TB) string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// dpPKI is a test CA, the gateway's server certificate and two client
// certificates, written as PEM files for Caddy.
type dpPKI struct {
	caFile, certFile, keyFile string
	caPool                    *x509.CertPool
	client, other             tls.Certificate
}

func newDPPKI(t *testing.T) *dpPKI {
	t.Helper()
	dir := t.TempDir()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	issue := func(serial int64, cn string, server bool) (tls.Certificate, []byte, []byte) {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature}
		if server {
			tmpl.DNSNames = []string{"localhost"}
			tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		} else {
			tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, k.Public(), caKey)
		if err != nil {
			t.Fatal(err)
		}
		kder, _ := x509.MarshalPKCS8PrivateKey(k)
		certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
		keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
		c, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			t.Fatal(err)
		}
		return c, certPEM, keyPEM
	}
	p := &dpPKI{caFile: filepath.Join(dir, "ca.pem"), certFile: filepath.Join(dir, "server.pem"), keyFile: filepath.Join(dir, "server-key.pem"), /* not *.key: caddytest rewrites such paths */
		caPool: x509.NewCertPool()}
	p.caPool.AddCert(ca)
	_, certPEM, keyPEM := issue(2, "localhost", true)
	p.client, _, _ = issue(3, "client", false)
	p.other, _, _ = issue(4, "other client", false)
	for f, b := range map[string][]byte{p.caFile: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), p.certFile: certPEM, p.keyFile: keyPEM} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

// x5t is the RFC 8705 thumbprint of a client certificate.
func x5t(c tls.Certificate) string {
	sum := sha256.Sum256(c.Certificate[0])
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// httpsClient talks to the mTLS site, presenting cert (nil: none).
func (p *dpPKI) httpsClient(cert *tls.Certificate) *http.Client {
	cfg := &tls.Config{RootCAs: p.caPool, ServerName: "localhost", MinVersion: tls.VersionTLS12}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: cfg, DisableKeepAlives: true}, Timeout: 10 * time.Second}
}

type dpGateway struct {
	*gateway
	up  *atkUpstream
	pki *dpPKI
}

const dpRoute = `audience https://orders.internal
			scope orders.read`

func startDPoPGateway(t *testing.T) *dpGateway {
	t.Helper()
	idp := testidp.New(t, "https://idp.test")
	idp.AddKey("ec-1", "ES256")
	up := newAtkUpstream(t)
	pki := newDPPKI(t)
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	upstream := strings.TrimPrefix(up.URL, "http://")
	config := fmt.Sprintf(`{
%s	skip_install_trust
	auto_https disable_redirects
	token_exchange {
		issuer %s
		token_endpoint http://localhost:%d/oauth2/token
		trust https://idp.test {
			jwks_url %s
			audience https://gateway.test
			algorithms ES256
			refetch_interval 1h
		}
		client %s {
			secret_hash %s
			audience https://orders.internal
			scope orders.read
		}
		client %s {
			secret_hash %s
			audience https://orders.internal
			scope orders.read
			allow_unbinding
		}
	}
}
http://:%d {
	route /bearer/* {
		token_exchange {
			%s
		}
		reverse_proxy %s
	}
	route /dpop/* {
		token_exchange {
			%s
			dpop optional
		}
		reverse_proxy %s
	}
	route /dpoponly/* {
		token_exchange {
			%s
			dpop required {
				algorithms ES256
				max_age 30s
			}
		}
		reverse_proxy %s
	}
	route /nonce/* {
		token_exchange {
			%s
			dpop required {
				nonce
			}
		}
		reverse_proxy %s
	}
	route /rw/* {
		uri strip_prefix /rw
		token_exchange {
			%s
			dpop optional
		}
		reverse_proxy %s
	}
	route /proxied/* {
		token_exchange {
			%s
			dpop optional {
				public_origin https://api.example.com
			}
		}
		reverse_proxy %s
	}
	handle /oauth2/token {
		token_exchange_endpoint
	}
	handle /.well-known/jwks.json {
		token_exchange_jwks
	}
}
https://localhost:%d {
	tls %s %s {
		client_auth {
			mode verify_if_given
			trust_pool file %s
		}
	}
	route /mtls/* {
		token_exchange {
			%s
		}
		reverse_proxy %s
	}
	handle /oauth2/token {
		token_exchange_endpoint
	}
}
`, testGlobalOptions(logFile, t.TempDir()), gatewayIssuer, gatewayPort, idp.JWKSURL(),
		dpClient, bcryptHash(t, dpSecret), dpUnbind, bcryptHash(t, dpUnbindSec),
		gatewayPort, dpRoute, upstream, dpRoute, upstream, dpRoute, upstream, dpRoute, upstream, dpRoute, upstream, dpRoute, upstream,
		httpsPort, pki.certFile, pki.keyFile, pki.caFile, dpRoute, upstream)
	tester := caddytest.NewTester(t)
	tester.InitServer(config, "caddyfile")
	fltWarmUp(t, tester)
	return &dpGateway{gateway: &gateway{tester: tester, idp: idp, logFile: logFile}, up: up, pki: pki}
}

// dpReq is one request to the gateway.
type dpReq struct {
	method string // default GET
	path   string
	auth   string   // the Authorization header, if any
	proofs []string // DPoP headers
	https  bool
	cert   *tls.Certificate
	// behindRewrite: Caddy's rewrite handler in front of token_exchange
	// logs the request headers at DEBUG, the DPoP proof with them (only
	// Authorization and Cookie are redacted; see the README): its proofs
	// are left out of the log scan.
	behindRewrite bool
}

func (g *dpGateway) do(t *testing.T, r dpReq) *http.Response {
	t.Helper()
	method := r.method
	if method == "" {
		method = http.MethodGet
	}
	base := fmt.Sprintf("http://localhost:%d", gatewayPort)
	client := g.tester.Client
	if r.https {
		base = fmt.Sprintf("https://localhost:%d", httpsPort)
		client = g.pki.httpsClient(r.cert)
	}
	req, err := http.NewRequest(method, base+r.path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if r.auth != "" {
		req.Header.Set("Authorization", r.auth)
	}
	for _, p := range r.proofs {
		req.Header.Add("DPoP", p)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return resp
}

// htu is the URL a client addresses on the HTTP site.
func htu(path string) string { return fmt.Sprintf("http://localhost:%d%s", gatewayPort, path) }

// endpoint posts a token request, with optional DPoP proofs, over HTTP or
// (with https) over mTLS presenting cert.
func (g *dpGateway) endpoint(t *testing.T, form url.Values, client, secret string, proofs []string, https bool, cert *tls.Certificate) atkEPResp {
	t.Helper()
	u, c := stsTokenURL, g.tester.Client
	if https {
		u, c = fmt.Sprintf("https://localhost:%d/oauth2/token", httpsPort), g.pki.httpsClient(cert)
	}
	req, err := http.NewRequest(http.MethodPost, u, strings.NewReader(form.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	basicAuth(client, secret)(req)
	for _, p := range proofs {
		req.Header.Add("DPoP", p)
	}
	resp, err := c.Do(req)
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

func TestSenderConstrainedTokens(t *testing.T) {
	g := startDPoPGateway(t)
	idp := g.idp
	alice := newDPoPClient(t, "ES256")
	mallory := newDPoPClient(t, "ES256")
	edClient := newDPoPClient(t, "EdDSA")
	bound := func(jkt string) string {
		return idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "cnf": map[string]any{"jkt": jkt}})
	}
	certBound := func(c tls.Certificate) string {
		return idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "cnf": map[string]any{"x5t#S256": x5t(c)}})
	}
	unbound := idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})
	var sent []string // every token and proof, for the log scan

	ok := func(t *testing.T, r dpReq) atkSeen {
		t.Helper()
		sent = append(sent, r.auth)
		if !r.behindRewrite {
			sent = append(sent, r.proofs...)
		}
		before := g.up.calls()
		resp := g.do(t, r)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d, WWW-Authenticate %q", resp.StatusCode, resp.Header.Values("WWW-Authenticate"))
		}
		if g.up.calls() != before+1 {
			t.Fatal("the upstream was not called")
		}
		seen := g.up.last()
		// What travels upstream: the minted token as Bearer, unbound, and
		// never the proof or the inbound token.
		if seen.header.Get("DPoP") != "" {
			t.Error("the DPoP proof was forwarded")
		}
		fwd, found := strings.CutPrefix(seen.header.Get("Authorization"), "Bearer ")
		if !found || strings.Contains(r.auth, fwd) {
			t.Fatalf("upstream Authorization %q is not a minted bearer token", seen.header.Get("Authorization"))
		}
		tok, err := jwt.ParseInsecure([]byte(fwd))
		if err != nil {
			t.Fatal(err)
		}
		var cnf any
		if tok.Get("cnf", &cnf) == nil {
			t.Errorf("the minted token is bound (cnf %v): the upstream could not use it as a bearer token", cnf)
		}
		return seen
	}
	refused := func(t *testing.T, r dpReq, status int, scheme, code string) *http.Response {
		t.Helper()
		sent = append(sent, r.auth)
		if !r.behindRewrite {
			sent = append(sent, r.proofs...)
		}
		before := g.up.calls()
		resp := g.do(t, r)
		if resp.StatusCode != status {
			t.Errorf("status %d (%q), want %d", resp.StatusCode, resp.Header.Values("WWW-Authenticate"), status)
		}
		if g.up.calls() != before {
			t.Error("the upstream was called")
		}
		var challenge string
		for _, c := range resp.Header.Values("WWW-Authenticate") {
			if strings.HasPrefix(c, scheme+" ") {
				challenge = c
			}
		}
		if challenge == "" {
			t.Fatalf("no %s challenge in %q", scheme, resp.Header.Values("WWW-Authenticate"))
		}
		if code != "" && !strings.Contains(challenge, `error="`+code+`"`) {
			t.Errorf("%s challenge %q, want error=%q", scheme, challenge, code)
		}
		if code == "" && strings.Contains(challenge, "error=") {
			t.Errorf("%s challenge %q carries an error code", scheme, challenge)
		}
		if scheme == "DPoP" && !strings.Contains(challenge, `algs="`) {
			t.Errorf("DPoP challenge %q has no algs", challenge)
		}
		return resp
	}
	dpop := func(tok string) string { return "DPoP " + tok }

	// ---- controls ----
	t.Run("control: unbound bearer token on a bearer route and on a DPoP-optional route", func(t *testing.T) {
		ok(t, dpReq{path: "/bearer/x", auth: "Bearer " + unbound})
		ok(t, dpReq{path: "/dpop/x", auth: "Bearer " + unbound})
	})
	aliceTok := bound(alice.jkt)
	t.Run("control: DPoP-bound token with a valid proof (jwx), twice with fresh proofs (cache)", func(t *testing.T) {
		for range 2 {
			ok(t, dpReq{path: "/dpop/orders/1", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", htu("/dpop/orders/1"), aliceTok, nil)}})
		}
		// a query is not part of htu (RFC 9449 §4.3)
		ok(t, dpReq{path: "/dpop/orders/1?page=2", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", htu("/dpop/orders/1"), aliceTok, nil)}})
	})
	t.Run("control: EdDSA proof on an optional route; DPoP-only route with ES256", func(t *testing.T) {
		edTok := bound(edClient.jkt)
		ok(t, dpReq{path: "/dpop/x", auth: dpop(edTok), proofs: []string{edClient.proof(t, "GET", htu("/dpop/x"), edTok, nil)}})
		ok(t, dpReq{path: "/dpoponly/x", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", htu("/dpoponly/x"), aliceTok, nil)}})
	})
	t.Run("control: htu is the URI the client sent, before Caddy's rewrite", func(t *testing.T) {
		ok(t, dpReq{path: "/rw/orders", auth: dpop(aliceTok), behindRewrite: true, proofs: []string{alice.proof(t, "GET", htu("/rw/orders"), aliceTok, nil)}})
		refused(t, dpReq{path: "/rw/orders", auth: dpop(aliceTok), behindRewrite: true, proofs: []string{alice.proof(t, "GET", htu("/orders"), aliceTok, nil)}}, 401, "DPoP", "invalid_dpop_proof")
	})
	t.Run("control: behind a proxy, htu is the configured public origin", func(t *testing.T) {
		ok(t, dpReq{path: "/proxied/x", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", "https://api.example.com/proxied/x", aliceTok, nil)}})
		refused(t, dpReq{path: "/proxied/x", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", htu("/proxied/x"), aliceTok, nil)}}, 401, "DPoP", "invalid_dpop_proof")
	})
	t.Run("control: server nonce", func(t *testing.T) {
		resp := refused(t, dpReq{path: "/nonce/x", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", htu("/nonce/x"), aliceTok, nil)}}, 401, "DPoP", "use_dpop_nonce")
		nonce := resp.Header.Get("DPoP-Nonce")
		if nonce == "" {
			t.Fatal("no DPoP-Nonce with use_dpop_nonce")
		}
		ok(t, dpReq{path: "/nonce/x", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", htu("/nonce/x"), aliceTok, map[string]any{"nonce": nonce})}})
		refused(t, dpReq{path: "/nonce/x", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", htu("/nonce/x"), aliceTok, map[string]any{"nonce": nonce + "x"})}}, 401, "DPoP", "use_dpop_nonce")
	})
	t.Run("control: mTLS-bound token with its certificate", func(t *testing.T) {
		tok := certBound(g.pki.client)
		ok(t, dpReq{https: true, cert: &g.pki.client, path: "/mtls/x", auth: "Bearer " + tok})
	})
	if t.Failed() {
		t.FailNow()
	}

	// ---- attack rows ----
	replayed := alice.proof(t, "GET", htu("/dpop/r"), aliceTok, nil)
	ok(t, dpReq{path: "/dpop/r", auth: dpop(aliceTok), proofs: []string{replayed}})
	hs256 := testidp.RawToken(map[string]any{"typ": "dpop+jwt", "alg": "HS256", "jwk": json.RawMessage(dpJSON(t, alice.pub))},
		map[string]any{"jti": "h1", "htm": "GET", "htu": htu("/dpop/x"), "iat": time.Now().Unix(), "ath": athOf(aliceTok)},
		atkHMAC(sha256.New, dpJSON(t, alice.pub)))
	none := testidp.RawToken(map[string]any{"typ": "dpop+jwt", "alg": "none", "jwk": json.RawMessage(dpJSON(t, alice.pub))},
		map[string]any{"jti": "n1", "htm": "GET", "htu": htu("/dpop/x"), "iat": time.Now().Unix(), "ath": athOf(aliceTok)}, nil)
	var priv any
	if err := jwk.Export(alice.key, &priv); err != nil {
		t.Fatal(err)
	}
	withPrivate := testidp.RawToken(map[string]any{"typ": "dpop+jwt", "alg": "ES256", "jwk": json.RawMessage(dpJSON(t, alice.key))},
		map[string]any{"jti": "p1", "htm": "GET", "htu": htu("/dpop/x"), "iat": time.Now().Unix(), "ath": athOf(aliceTok)},
		atkES256(priv.(crypto.Signer)))
	typJWT := testidp.RawToken(map[string]any{"typ": "JWT", "alg": "ES256", "jwk": json.RawMessage(dpJSON(t, alice.pub))},
		map[string]any{"jti": "t1", "htm": "GET", "htu": htu("/dpop/x"), "iat": time.Now().Unix(), "ath": athOf(aliceTok)},
		atkES256(priv.(crypto.Signer)))
	x := htu("/dpop/x")
	mtlsTok := certBound(g.pki.client)

	rows := []struct {
		name   string
		req    dpReq
		scheme string
		code   string
	}{
		{"DPoP-bound token as Bearer", dpReq{path: "/dpop/x", auth: "Bearer " + aliceTok}, "Bearer", "invalid_token"},
		{"DPoP-bound token as Bearer, with a valid proof beside it", dpReq{path: "/dpop/x", auth: "Bearer " + aliceTok, proofs: []string{alice.proof(t, "GET", x, aliceTok, nil)}}, "Bearer", "invalid_token"},
		{"DPoP-bound token as Bearer on a bearer-only route", dpReq{path: "/bearer/x", auth: "Bearer " + aliceTok}, "Bearer", "invalid_token"},
		{"missing proof", dpReq{path: "/dpop/x", auth: dpop(aliceTok)}, "DPoP", "invalid_dpop_proof"},
		{"proof for another method", dpReq{path: "/dpop/x", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "POST", x, aliceTok, nil)}}, "DPoP", "invalid_dpop_proof"},
		{"proof for another path", dpReq{path: "/dpop/x", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", htu("/dpop/y"), aliceTok, nil)}}, "DPoP", "invalid_dpop_proof"},
		{"proof for another scheme", dpReq{path: "/dpop/x", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", "https"+strings.TrimPrefix(x, "http"), aliceTok, nil)}}, "DPoP", "invalid_dpop_proof"},
		{"proof for another host", dpReq{path: "/dpop/x", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", strings.Replace(x, "localhost", "evil.example", 1), aliceTok, nil)}}, "DPoP", "invalid_dpop_proof"},
		{"stale iat (5 minutes old)", dpReq{path: "/dpop/x", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", x, aliceTok, map[string]any{"iat": time.Now().Add(-5 * time.Minute).Unix()})}}, "DPoP", "invalid_dpop_proof"},
		{"stale iat for the route's max_age 30s", dpReq{path: "/dpoponly/x", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", htu("/dpoponly/x"), aliceTok, map[string]any{"iat": time.Now().Add(-45 * time.Second).Unix()})}}, "DPoP", "invalid_dpop_proof"},
		{"future iat (5 minutes ahead)", dpReq{path: "/dpop/x", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", x, aliceTok, map[string]any{"iat": time.Now().Add(5 * time.Minute).Unix()})}}, "DPoP", "invalid_dpop_proof"},
		{"no iat", dpReq{path: "/dpop/x", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", x, aliceTok, map[string]any{"iat": nil})}}, "DPoP", "invalid_dpop_proof"},
		{"no jti", dpReq{path: "/dpop/x", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", x, aliceTok, map[string]any{"jti": nil})}}, "DPoP", "invalid_dpop_proof"},
		{"replayed jti", dpReq{path: "/dpop/r", auth: dpop(aliceTok), proofs: []string{replayed}}, "DPoP", "invalid_dpop_proof"},
		{"wrong ath", dpReq{path: "/dpop/x", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", x, unbound, nil)}}, "DPoP", "invalid_dpop_proof"},
		{"no ath", dpReq{path: "/dpop/x", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", x, aliceTok, map[string]any{"ath": nil})}}, "DPoP", "invalid_dpop_proof"},
		{"proof key not matching cnf.jkt", dpReq{path: "/dpop/x", auth: dpop(aliceTok), proofs: []string{mallory.proof(t, "GET", x, aliceTok, nil)}}, "DPoP", "invalid_token"},
		{"unbound token with the DPoP scheme", dpReq{path: "/dpop/x", auth: dpop(unbound), proofs: []string{alice.proof(t, "GET", x, unbound, nil)}}, "DPoP", "invalid_token"},
		{"proof signed with HS256", dpReq{path: "/dpop/x", auth: dpop(aliceTok), proofs: []string{hs256}}, "DPoP", "invalid_dpop_proof"},
		{"proof with alg none", dpReq{path: "/dpop/x", auth: dpop(aliceTok), proofs: []string{none}}, "DPoP", "invalid_dpop_proof"},
		{"private key members in the proof jwk", dpReq{path: "/dpop/x", auth: dpop(aliceTok), proofs: []string{withPrivate}}, "DPoP", "invalid_dpop_proof"},
		{"typ JWT instead of dpop+jwt", dpReq{path: "/dpop/x", auth: dpop(aliceTok), proofs: []string{typJWT}}, "DPoP", "invalid_dpop_proof"},
		{"two DPoP headers", dpReq{path: "/dpop/x", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", x, aliceTok, nil), alice.proof(t, "GET", x, aliceTok, nil)}}, "DPoP", "invalid_dpop_proof"},
		{"proof algorithm off the route's allow-list (EdDSA, route allows ES256)", dpReq{path: "/dpoponly/x", auth: dpop(bound(edClient.jkt)), proofs: []string{edClient.proof(t, "GET", htu("/dpoponly/x"), bound(edClient.jkt), nil)}}, "DPoP", "invalid_dpop_proof"},
		{"unbound bearer token on a DPoP-only route", dpReq{path: "/dpoponly/x", auth: "Bearer " + unbound}, "DPoP", "invalid_token"},
		{"no credentials on a DPoP-only route", dpReq{path: "/dpoponly/x"}, "DPoP", ""},
		{"proof header only, no token", dpReq{path: "/dpop/x", proofs: []string{alice.proof(t, "GET", x, "", nil)}}, "DPoP", ""},
		{"mTLS-bound token without a certificate", dpReq{https: true, path: "/mtls/x", auth: "Bearer " + mtlsTok}, "Bearer", "invalid_token"},
		{"mTLS-bound token with the wrong certificate", dpReq{https: true, cert: &g.pki.other, path: "/mtls/x", auth: "Bearer " + mtlsTok}, "Bearer", "invalid_token"},
		{"mTLS-bound token over plain HTTP", dpReq{path: "/bearer/x", auth: "Bearer " + mtlsTok}, "Bearer", "invalid_token"},
		{"DPoP-bound token with the bound key's proof, over mTLS, as Bearer", dpReq{https: true, cert: &g.pki.client, path: "/mtls/x", auth: "Bearer " + aliceTok}, "Bearer", "invalid_token"},
	}
	for _, row := range rows {
		t.Run("attack/"+row.name, func(t *testing.T) {
			refused(t, row.req, http.StatusUnauthorized, row.scheme, row.code)
		})
	}
	// A DPoP exchange was cached for aliceTok: the same token as Bearer
	// must still be refused (the cache is keyed by what was proven).
	t.Run("attack/bearer after a cached DPoP exchange", func(t *testing.T) {
		ok(t, dpReq{path: "/dpop/c", auth: dpop(aliceTok), proofs: []string{alice.proof(t, "GET", htu("/dpop/c"), aliceTok, nil)}})
		refused(t, dpReq{path: "/dpop/c", auth: "Bearer " + aliceTok}, http.StatusUnauthorized, "Bearer", "invalid_token")
		refused(t, dpReq{path: "/dpop/c", auth: dpop(aliceTok), proofs: []string{mallory.proof(t, "GET", htu("/dpop/c"), aliceTok, nil)}}, http.StatusUnauthorized, "DPoP", "invalid_token")
	})

	// ---- the token endpoint ----
	tokenURL := stsTokenURL
	epOK := func(t *testing.T, r atkEPResp) jwt.Token {
		t.Helper()
		if r.status != http.StatusOK {
			t.Fatalf("endpoint: %d %s", r.status, r.raw)
		}
		tok, err := jwt.ParseInsecure([]byte(r.body["access_token"].(string)))
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	epRefused := func(t *testing.T, r atkEPResp, code string) {
		t.Helper()
		if r.status != http.StatusBadRequest || r.body["error"] != code {
			t.Errorf("endpoint: %d %s, want 400 %s", r.status, r.raw, code)
		}
		if _, ok := r.body["access_token"]; ok {
			t.Error("an access_token was issued")
		}
	}
	cnfOf := func(tok jwt.Token) map[string]any {
		var cnf map[string]any
		_ = tok.Get("cnf", &cnf)
		return cnf
	}
	t.Run("endpoint: DPoP-bound subject token with a proof of its key: the minted token stays bound", func(t *testing.T) {
		sent = append(sent, aliceTok)
		r := g.endpoint(t, exchangeForm(aliceTok), dpClient, dpSecret, []string{alice.proof(t, "POST", tokenURL, "", nil)}, false, nil)
		tok := epOK(t, r)
		if r.body["token_type"] != "DPoP" {
			t.Errorf("token_type %v, want DPoP", r.body["token_type"])
		}
		if cnf := cnfOf(tok); cnf["jkt"] != alice.jkt {
			t.Errorf("minted cnf %v, want jkt %s", cnf, alice.jkt)
		}
	})
	t.Run("endpoint: mTLS-bound subject token with its certificate: the minted token stays bound", func(t *testing.T) {
		tok := epOK(t, g.endpoint(t, exchangeForm(mtlsTok), dpClient, dpSecret, nil, true, &g.pki.client))
		if cnf := cnfOf(tok); cnf["x5t#S256"] != x5t(g.pki.client) {
			t.Errorf("minted cnf %v, want x5t#S256 of the client certificate", cnf)
		}
	})
	t.Run("endpoint: allow_unbinding exchanges a bound token without proof, unbound and logged", func(t *testing.T) {
		tok := epOK(t, g.endpoint(t, exchangeForm(aliceTok), dpUnbind, dpUnbindSec, nil, false, nil))
		if cnf := cnfOf(tok); cnf != nil {
			t.Errorf("minted cnf %v, want none", cnf)
		}
		logs, _ := os.ReadFile(g.logFile)
		if !strings.Contains(string(logs), "allow_unbinding") {
			t.Error("the unbinding was not logged")
		}
		// allow_unbinding does not accept a proof of another key
		epRefused(t, g.endpoint(t, exchangeForm(aliceTok), dpUnbind, dpUnbindSec, []string{mallory.proof(t, "POST", tokenURL, "", nil)}, false, nil), "invalid_request")
	})
	endpointProofReplayed := alice.proof(t, "POST", tokenURL, "", nil)
	epOK(t, g.endpoint(t, exchangeForm(aliceTok), dpClient, dpSecret, []string{endpointProofReplayed}, false, nil))
	epRows := []struct {
		name   string
		form   url.Values
		proofs []string
		https  bool
		cert   *tls.Certificate
		code   string
	}{
		{"DPoP-bound subject token without proof", exchangeForm(aliceTok), nil, false, nil, "invalid_request"},
		{"DPoP-bound subject token, proof of another key", exchangeForm(aliceTok), []string{mallory.proof(t, "POST", tokenURL, "", nil)}, false, nil, "invalid_request"},
		{"proof for another token endpoint URL", exchangeForm(aliceTok), []string{alice.proof(t, "POST", "http://as.other.example/oauth2/token", "", nil)}, false, nil, "invalid_dpop_proof"},
		{"proof for GET", exchangeForm(aliceTok), []string{alice.proof(t, "GET", tokenURL, "", nil)}, false, nil, "invalid_dpop_proof"},
		{"replayed proof", exchangeForm(aliceTok), []string{endpointProofReplayed}, false, nil, "invalid_dpop_proof"},
		{"two DPoP headers", exchangeForm(aliceTok), []string{alice.proof(t, "POST", tokenURL, "", nil), alice.proof(t, "POST", tokenURL, "", nil)}, false, nil, "invalid_dpop_proof"},
		{"mTLS-bound subject token without a certificate", exchangeForm(mtlsTok), nil, true, nil, "invalid_request"},
		{"mTLS-bound subject token with the wrong certificate", exchangeForm(mtlsTok), nil, true, &g.pki.other, "invalid_request"},
		{"DPoP-bound actor token without proof", exchangeForm(unbound, "actor_token", aliceTok, "actor_token_type", urnAccessToken), nil, false, nil, "invalid_request"},
	}
	for _, row := range epRows {
		t.Run("endpoint attack/"+row.name, func(t *testing.T) {
			sent = append(sent, row.proofs...)
			epRefused(t, g.endpoint(t, row.form, dpClient, dpSecret, row.proofs, row.https, row.cert), row.code)
		})
	}
	t.Logf("sender-constrained attack rows: %d middleware, %d endpoint", len(rows)+1, len(epRows))
	logs, _ := os.ReadFile(g.logFile)
	for _, s := range sent {
		s = strings.TrimPrefix(strings.TrimPrefix(s, "DPoP "), "Bearer ")
		if len(s) > 16 && strings.Contains(string(logs), s) {
			i := strings.Index(string(logs), s)
			t.Errorf("logged: %q", string(logs)[max(0, i-300):i+20])
		}
	}
	g.assertNoTokenLogged(t, sent...)
}

func dpJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
