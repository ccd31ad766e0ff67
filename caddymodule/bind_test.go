package caddymodule

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwt"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// writeClientCert makes a self-signed client certificate and key as PEM files.
func writeClientCert(t *testing.T, name string) (certFile, keyFile string, der []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err = x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile, der
}

// TestBindUpstreamCertificate (issue 18 §5): the minted token is bound to
// the client certificate the route's reverse_proxy presents upstream
// (cnf.x5t#S256), and an upstream that requires certificate-bound tokens
// accepts it over that mutual-TLS connection.
func TestBindUpstreamCertificate(t *testing.T) {
	certFile, keyFile, der := writeClientCert(t, "gateway-client")
	sum := sha256.Sum256(der)
	want := base64.RawURLEncoding.EncodeToString(sum[:])
	var seenCnf string
	up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// An upstream enforcing RFC 8705 §3: the token's cnf must name the
		// certificate of this very connection.
		tok, err := jwt.ParseInsecure([]byte(strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")))
		if err != nil || r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
			http.Error(w, "no bound token or certificate", http.StatusUnauthorized)
			return
		}
		var cnf map[string]any
		_ = tok.Get("cnf", &cnf)
		seenCnf, _ = cnf["x5t#S256"].(string)
		peer := sha256.Sum256(r.TLS.PeerCertificates[0].Raw)
		if seenCnf != base64.RawURLEncoding.EncodeToString(peer[:]) {
			http.Error(w, "token not bound to this connection", http.StatusUnauthorized)
			return
		}
		fmt.Fprint(w, "bound ok")
	}))
	up.TLS = &tls.Config{ClientAuth: tls.RequireAnyClientCert}
	up.StartTLS()
	defer up.Close()

	g := startGatewayWithTrust(t, "", fmt.Sprintf(`token_exchange {
			audience %s
			bind_upstream_certificate %s
		}
		reverse_proxy %s {
			transport http {
				tls_client_auth %s %s
				tls_insecure_skip_verify
			}
		}`, audOrders, certFile, up.URL, certFile, keyFile))
	resp := g.get(t, "/api/orders", map[string]string{"Authorization": "Bearer " + g.idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})})
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d through the mutual-TLS upstream", resp.StatusCode)
	}
	if seenCnf != want {
		t.Fatalf("minted cnf.x5t#S256 %q, want the gateway client certificate's %q", seenCnf, want)
	}
}
