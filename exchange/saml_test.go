package exchange

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/beevik/etree"
	dsig "github.com/russellhaering/goxmldsig"
)

const (
	samlIdP      = "https://saml-idp.test/metadata"
	samlSP       = "https://gateway.test/saml-sp"
	samlRecipent = "https://gateway.test/oauth2/token"
)

// samlKey is a test IdP signing key and certificate.
type samlKey struct {
	cert *x509.Certificate
	tls  tls.Certificate
}

func newSAMLKey(t *testing.T) samlKey {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "saml-idp"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return samlKey{cert: cert, tls: tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}}
}

// samlAssertion builds an assertion; edit may change it before signing.
func samlAssertion(nameID string, now time.Time, edit func(a *etree.Element)) *etree.Element {
	a := etree.NewElement("saml:Assertion")
	a.CreateAttr("xmlns:saml", samlNS)
	a.CreateAttr("ID", "_a"+strings.ReplaceAll(now.Format("150405.000000000"), ".", ""))
	a.CreateAttr("Version", "2.0")
	a.CreateAttr("IssueInstant", now.UTC().Format(time.RFC3339))
	a.CreateElement("saml:Issuer").SetText(samlIdP)
	subj := a.CreateElement("saml:Subject")
	subj.CreateElement("saml:NameID").SetText(nameID)
	sc := subj.CreateElement("saml:SubjectConfirmation")
	sc.CreateAttr("Method", samlBearerMethod)
	d := sc.CreateElement("saml:SubjectConfirmationData")
	d.CreateAttr("NotOnOrAfter", now.Add(5*time.Minute).UTC().Format(time.RFC3339))
	d.CreateAttr("Recipient", samlRecipent)
	cond := a.CreateElement("saml:Conditions")
	cond.CreateAttr("NotBefore", now.Add(-time.Minute).UTC().Format(time.RFC3339))
	cond.CreateAttr("NotOnOrAfter", now.Add(5*time.Minute).UTC().Format(time.RFC3339))
	cond.CreateElement("saml:AudienceRestriction").CreateElement("saml:Audience").SetText(samlSP)
	st := a.CreateElement("saml:AttributeStatement")
	at := st.CreateElement("saml:Attribute")
	at.CreateAttr("Name", "scope")
	at.CreateElement("saml:AttributeValue").SetText("orders.read")
	mail := st.CreateElement("saml:Attribute")
	mail.CreateAttr("Name", "mail")
	mail.CreateElement("saml:AttributeValue").SetText(nameID + "@example.com")
	if edit != nil {
		edit(a)
	}
	return a
}

func signSAML(t *testing.T, k samlKey, a *etree.Element) *etree.Element {
	t.Helper()
	ks := dsig.TLSCertKeyStore(k.tls)
	ctx := dsig.NewDefaultSigningContext(ks)
	signed, err := ctx.SignEnveloped(a)
	if err != nil {
		t.Fatal(err)
	}
	return signed
}

func encodeSAML(t *testing.T, el *etree.Element) string {
	t.Helper()
	doc := etree.NewDocument()
	doc.SetRoot(el)
	b, err := doc.WriteToBytes()
	if err != nil {
		t.Fatal(err)
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

func samlTrust(t *testing.T, k samlKey) *TrustStore {
	t.Helper()
	ts, err := NewTrustStore(context.Background(), TrustConfig{SAML: []SAMLIssuerConfig{{
		EntityID: samlIdP, Certificates: []*x509.Certificate{k.cert}, Audience: samlSP, Recipient: samlRecipent,
		Attributes: map[string]string{"mail": "email"}, ScopeAttribute: "scope"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ts.Close() })
	return ts
}

func TestSAMLAssertion(t *testing.T) {
	k := newSAMLKey(t)
	ts := samlTrust(t, k)
	now := time.Now()
	s, err := ts.verifySAML(encodeSAML(t, signSAML(t, k, samlAssertion("alice", now, nil))))
	if err != nil {
		t.Fatal(err)
	}
	if s.Subject != "alice" || s.Issuer != samlIdP || strings.Join(s.Scopes, " ") != "orders.read" {
		t.Fatalf("subject %+v", s)
	}
	if v, _ := s.Claim("email"); v != "alice@example.com" {
		t.Errorf("email claim %v", v)
	}

	other := newSAMLKey(t)
	valid := signSAML(t, k, samlAssertion("alice", now, nil))
	wrapped := func() *etree.Element {
		// Signature wrapping: an unsigned evil assertion as the root, the
		// genuinely signed one hidden inside it.
		evil := samlAssertion("mallory", now, nil)
		evil.RemoveAttr("ID")
		evil.CreateAttr("ID", "_evil")
		evil.AddChild(valid.Copy())
		return evil
	}()
	for name, tc := range map[string]struct {
		raw    string
		reason string
	}{
		"unsigned":           {encodeSAML(t, samlAssertion("alice", now, nil)), "bad_signature"},
		"signed by another":  {encodeSAML(t, signSAML(t, other, samlAssertion("alice", now, nil))), "bad_signature"},
		"signature wrapping": {encodeSAML(t, wrapped), "bad_signature"},
		"tampered after signing": {encodeSAML(t, func() *etree.Element {
			c := valid.Copy()
			c.FindElement("./Subject/NameID").SetText("mallory")
			return c
		}()), "bad_signature"},
		"expired": {encodeSAML(t, signSAML(t, k, samlAssertion("alice", now, func(a *etree.Element) {
			a.FindElement("./Conditions").RemoveAttr("NotOnOrAfter")
			a.FindElement("./Conditions").CreateAttr("NotOnOrAfter", now.Add(-time.Hour).UTC().Format(time.RFC3339))
		}))), "expired"},
		"wrong audience": {encodeSAML(t, signSAML(t, k, samlAssertion("alice", now, func(a *etree.Element) {
			a.FindElement("./Conditions/AudienceRestriction/Audience").SetText("https://other-sp.test")
		}))), "wrong_audience"},
		"recipient mismatch": {encodeSAML(t, signSAML(t, k, samlAssertion("alice", now, func(a *etree.Element) {
			d := a.FindElement("./Subject/SubjectConfirmation/SubjectConfirmationData")
			d.RemoveAttr("Recipient")
			d.CreateAttr("Recipient", "https://evil.test/token")
		}))), "saml_confirmation"},
		"untrusted issuer": {encodeSAML(t, signSAML(t, k, samlAssertion("alice", now, func(a *etree.Element) {
			a.FindElement("./Issuer").SetText("https://evil-idp.test")
		}))), "untrusted_issuer"},
		"DTD with entity expansion": {base64.RawURLEncoding.EncodeToString([]byte(
			`<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>` +
				`<saml:Assertion xmlns:saml="` + samlNS + `">&b;</saml:Assertion>`)), "malformed"},
		"not XML":          {base64.RawURLEncoding.EncodeToString([]byte("not xml <")), "malformed"},
		"not an assertion": {base64.RawURLEncoding.EncodeToString([]byte(`<samlp:Response xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol"/>`)), "malformed"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := ts.verifySAML(tc.raw)
			if e := AsError(err); e.Kind != KindInvalidToken || e.Reason != tc.reason {
				t.Fatalf("got %v, want invalid token %s", err, tc.reason)
			}
		})
	}
}
