package caddymodule

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/beevik/etree"
	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/lestrrat-go/jwx/v3/jwt"
	dsig "github.com/russellhaering/goxmldsig"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// TestSAMLSubjectTokenThroughCaddy (issue 13 §3): a SAML 2.0 assertion
// signed by a trusted IdP is exchanged at the token endpoint
// (subject_token_type saml2), with NameID as sub and a mapped attribute as a
// claim; unsigned, wrapped, expired and saml1 ones are refused.
func TestSAMLSubjectTokenThroughCaddy(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "saml-idp"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	certFile := filepath.Join(t.TempDir(), "idp-cert.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	idp := testidp.New(t, "https://idp.test")
	idp.AddKey("ec-1", "ES256")
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	const entityID, sp = "https://saml-idp.test/metadata", "https://gateway.test/sp"
	config := fmt.Sprintf(`{
%s	token_exchange {
		issuer %s
		trust https://idp.test {
			jwks_url %s
			audience https://gateway.test
			algorithms ES256
		}
		trust_saml %s {
			certificate %s
			audience %s
			attribute mail email
			scope_attribute scope
		}
		client %s {
			secret_hash %s
			audience %s
			scope orders.read
			claim email subject.email
		}
	}
}
http://localhost:%d {
	handle /oauth2/token {
		token_exchange_endpoint
	}
}
`, testGlobalOptions(logFile, t.TempDir()), stsBase, idp.JWKSURL(), entityID, certFile, sp,
		secretClient, bcryptHash(t, secretValue), audOrders, gatewayPort)
	tester := caddytest.NewTester(t)
	tester.InitServer(config, "caddyfile")

	assertion := func(nameID string, notOnOrAfter time.Time, sign bool) string {
		a := etree.NewElement("saml:Assertion")
		a.CreateAttr("xmlns:saml", "urn:oasis:names:tc:SAML:2.0:assertion")
		a.CreateAttr("ID", fmt.Sprintf("_a%d", time.Now().UnixNano()))
		a.CreateAttr("Version", "2.0")
		a.CreateAttr("IssueInstant", time.Now().UTC().Format(time.RFC3339))
		a.CreateElement("saml:Issuer").SetText(entityID)
		subj := a.CreateElement("saml:Subject")
		subj.CreateElement("saml:NameID").SetText(nameID)
		sc := subj.CreateElement("saml:SubjectConfirmation")
		sc.CreateAttr("Method", "urn:oasis:names:tc:SAML:2.0:cm:bearer")
		d := sc.CreateElement("saml:SubjectConfirmationData")
		d.CreateAttr("NotOnOrAfter", notOnOrAfter.UTC().Format(time.RFC3339))
		d.CreateAttr("Recipient", stsTokenURL)
		cond := a.CreateElement("saml:Conditions")
		cond.CreateAttr("NotOnOrAfter", notOnOrAfter.UTC().Format(time.RFC3339))
		cond.CreateElement("saml:AudienceRestriction").CreateElement("saml:Audience").SetText(sp)
		st := a.CreateElement("saml:AttributeStatement")
		for name, v := range map[string]string{"mail": nameID + "@example.com", "scope": "orders.read"} {
			at := st.CreateElement("saml:Attribute")
			at.CreateAttr("Name", name)
			at.CreateElement("saml:AttributeValue").SetText(v)
		}
		if sign {
			ctx := dsig.NewDefaultSigningContext(dsig.TLSCertKeyStore(tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}))
			if a, err = ctx.SignEnveloped(a); err != nil {
				t.Fatal(err)
			}
		}
		doc := etree.NewDocument()
		doc.SetRoot(a)
		b, err := doc.WriteToBytes()
		if err != nil {
			t.Fatal(err)
		}
		return base64.RawURLEncoding.EncodeToString(b)
	}
	post := func(subject, typ string) *stsResponse {
		s := &sts{tester: tester}
		return s.post(t, url.Values{"grant_type": {tokenExchangeGrant}, "subject_token": {subject}, "subject_token_type": {typ}}, basicAuth(secretClient, secretValue))
	}
	const urnSAML2, urnSAML1 = "urn:ietf:params:oauth:token-type:saml2", "urn:ietf:params:oauth:token-type:saml1"
	r := post(assertion("alice", time.Now().Add(5*time.Minute), true), urnSAML2)
	if r.status != http.StatusOK {
		t.Fatalf("signed assertion: %d %s", r.status, r.raw)
	}
	tok, err := jwt.ParseInsecure([]byte(r.str("access_token")))
	if err != nil {
		t.Fatal(err)
	}
	if sub, _ := tok.Subject(); sub != "alice" || claimString(tok, "email") != "alice@example.com" || claimString(tok, "scope") != "orders.read" {
		t.Errorf("minted from SAML: sub %q email %q scope %q", sub, claimString(tok, "email"), claimString(tok, "scope"))
	}
	for name, c := range map[string]struct{ subject, typ string }{
		"unsigned":      {assertion("alice", time.Now().Add(5*time.Minute), false), urnSAML2},
		"expired":       {assertion("alice", time.Now().Add(-5*time.Minute), true), urnSAML2},
		"as saml1":      {assertion("alice", time.Now().Add(5*time.Minute), true), urnSAML1},
		"as a JWT type": {assertion("alice", time.Now().Add(5*time.Minute), true), urnJWT},
	} {
		if r := post(c.subject, c.typ); r.status != http.StatusBadRequest || r.str("error") != "invalid_request" {
			t.Errorf("%s: %d %s", name, r.status, r.raw)
		} else if strings.Contains(string(r.raw), c.subject[:40]) {
			t.Errorf("%s: the answer echoes the assertion", name)
		}
	}
}
