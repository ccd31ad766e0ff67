package exchange

import (
	"bytes"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/beevik/etree"
	dsig "github.com/russellhaering/goxmldsig"
)

// SAML 2.0 assertions as subject tokens at the token endpoint (RFC 8693 §3,
// token type urn:ietf:params:oauth:token-type:saml2), checked as RFC 7522
// §3 asks. The XML signature is goxmldsig's; only the element it returns as
// signed is read, so a signature-wrapping document cannot show us content
// the IdP did not sign.

// SAMLIssuerConfig is one trusted SAML identity provider.
type SAMLIssuerConfig struct {
	// EntityID is the IdP's entity ID: the assertion's <Issuer>.
	EntityID string
	// Certificates are the IdP's signing certificates.
	Certificates []*x509.Certificate
	// Audience is our SP entity ID: an <AudienceRestriction> must name it.
	Audience string
	// Recipient, when set, must equal the bearer <SubjectConfirmationData
	// Recipient> (the token endpoint URL, RFC 7522 §3).
	Recipient string
	// Attributes map SAML attribute names to claims of the subject.
	Attributes map[string]string
	// ScopeAttribute, when set, is the attribute whose values are the
	// subject's scopes (mapped by Scopes).
	ScopeAttribute string
	Scopes         ScopeMap
}

const (
	samlNS           = "urn:oasis:names:tc:SAML:2.0:assertion"
	samlBearerMethod = "urn:oasis:names:tc:SAML:2.0:cm:bearer"
	maxSAMLSize      = 64 << 10
)

// samlIssuer is a configured IdP with its validator.
type samlIssuer struct {
	cfg       SAMLIssuerConfig
	validator *dsig.ValidationContext
}

func newSAMLIssuer(cfg SAMLIssuerConfig) (*samlIssuer, error) {
	switch {
	case cfg.EntityID == "":
		return nil, errors.New("trust_saml needs the IdP's entity ID")
	case len(cfg.Certificates) == 0:
		return nil, fmt.Errorf("trust_saml %s: at least one signing certificate is required", cfg.EntityID)
	case cfg.Audience == "":
		return nil, fmt.Errorf("trust_saml %s: audience (our SP entity ID) is required", cfg.EntityID)
	}
	v := dsig.NewDefaultValidationContext(&dsig.MemoryX509CertificateStore{Roots: cfg.Certificates})
	return &samlIssuer{cfg: cfg, validator: v}, nil
}

// verifySAML checks a base64url-encoded SAML 2.0 assertion (RFC 8693 §3).
func (ts *TrustStore) verifySAML(raw string) (*Subject, error) {
	if len(ts.saml) == 0 {
		return nil, invalidToken("token_type", "no SAML identity provider is trusted")
	}
	if len(raw) > base64.RawURLEncoding.EncodedLen(maxSAMLSize) {
		return nil, invalidToken("too_large", "SAML assertion exceeds %d bytes", maxSAMLSize)
	}
	doc, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(raw, "="))
	if err != nil {
		return nil, invalidToken("malformed", "SAML assertion is not base64url")
	}
	// No DTD: it is how entity expansion and external entities get in.
	if bytes.Contains(bytes.ToUpper(doc), []byte("<!DOCTYPE")) || bytes.Contains(bytes.ToUpper(doc), []byte("<!ENTITY")) {
		return nil, invalidToken("malformed", "SAML assertion carries a DTD, which is refused")
	}
	x := etree.NewDocument()
	x.ReadSettings = etree.ReadSettings{Permissive: false}
	if err := x.ReadFromBytes(doc); err != nil {
		return nil, invalidToken("malformed", "SAML assertion is not well-formed XML")
	}
	root := x.Root()
	if root == nil || root.Tag != "Assertion" || root.NamespaceURI() != samlNS {
		return nil, invalidToken("malformed", "the document is not a SAML 2.0 assertion")
	}
	issuerEl := root.FindElement("./Issuer")
	if issuerEl == nil {
		return nil, invalidToken("malformed", "SAML assertion has no Issuer")
	}
	var si *samlIssuer
	for _, s := range ts.saml {
		if s.cfg.EntityID == strings.TrimSpace(issuerEl.Text()) {
			si = s
		}
	}
	if si == nil {
		return nil, invalidToken("untrusted_issuer", "SAML assertion issuer is not trusted")
	}
	v := *si.validator // per call: the clock is the store's
	v.Clock = dsig.NewFakeClockAt(ts.now())
	signed, err := v.Validate(root)
	if err != nil {
		return nil, invalidToken("bad_signature", "SAML assertion signature does not verify")
	}
	// From here on, only the signed element is read.
	return ts.samlSubject(si, signed, raw)
}

func (ts *TrustStore) samlSubject(si *samlIssuer, a *etree.Element, raw string) (*Subject, error) {
	now := ts.now()
	skew := ts.clockSkew
	if iss := a.FindElement("./Issuer"); iss == nil || strings.TrimSpace(iss.Text()) != si.cfg.EntityID {
		return nil, invalidToken("untrusted_issuer", "signed SAML assertion issuer is not the trusted one")
	}
	cond := a.FindElement("./Conditions")
	if cond == nil {
		return nil, invalidToken("invalid_claims", "SAML assertion has no Conditions")
	}
	notOnOrAfter, err := samlTime(cond, "NotOnOrAfter")
	if err != nil || notOnOrAfter.IsZero() {
		return nil, invalidToken("missing_exp", "SAML assertion Conditions have no NotOnOrAfter")
	}
	if !now.Before(notOnOrAfter.Add(skew)) {
		return nil, invalidToken("expired", "SAML assertion is expired (NotOnOrAfter)")
	}
	if nb, err := samlTime(cond, "NotBefore"); err != nil {
		return nil, invalidToken("invalid_claims", "SAML assertion NotBefore is malformed")
	} else if !nb.IsZero() && now.Add(skew).Before(nb) {
		return nil, invalidToken("not_yet_valid", "SAML assertion is not valid yet (NotBefore)")
	}
	audOK := false
	for _, ar := range cond.SelectElements("AudienceRestriction") {
		for _, au := range ar.SelectElements("Audience") {
			if strings.TrimSpace(au.Text()) == si.cfg.Audience {
				audOK = true
			}
		}
	}
	if !audOK {
		return nil, invalidToken("wrong_audience", "SAML assertion audience is not accepted here")
	}
	subj := a.FindElement("./Subject")
	var nameID string
	if subj != nil {
		if n := subj.FindElement("./NameID"); n != nil {
			nameID = strings.TrimSpace(n.Text())
		}
	}
	if nameID == "" {
		return nil, invalidToken("missing_sub", "SAML assertion has no Subject NameID")
	}
	// RFC 7522 §3: a bearer SubjectConfirmation whose data has a
	// NotOnOrAfter, and the Recipient when one is configured.
	expiry := notOnOrAfter
	confirmed := false
	for _, sc := range subj.SelectElements("SubjectConfirmation") {
		if sc.SelectAttrValue("Method", "") != samlBearerMethod {
			continue
		}
		d := sc.SelectElement("SubjectConfirmationData")
		if d == nil {
			continue
		}
		t, err := samlTime(d, "NotOnOrAfter")
		if err != nil || t.IsZero() || !now.Before(t.Add(skew)) {
			continue
		}
		if si.cfg.Recipient != "" && d.SelectAttrValue("Recipient", "") != si.cfg.Recipient {
			continue
		}
		confirmed = true
		if t.Before(expiry) {
			expiry = t
		}
	}
	if !confirmed {
		return nil, invalidToken("saml_confirmation", "SAML assertion has no valid bearer SubjectConfirmation for this recipient")
	}
	claims := map[string]any{"iss": si.cfg.EntityID, "sub": nameID, "exp": float64(expiry.Unix())}
	var scopes []string
	if st := a.FindElement("./AttributeStatement"); st != nil {
		for _, at := range st.SelectElements("Attribute") {
			name := at.SelectAttrValue("Name", "")
			var values []any
			var strs []string
			for _, v := range at.SelectElements("AttributeValue") {
				values = append(values, strings.TrimSpace(v.Text()))
				strs = append(strs, strings.TrimSpace(v.Text()))
			}
			if name != "" && name == si.cfg.ScopeAttribute {
				for _, v := range strs {
					p, err := ParseScope(v)
					if err != nil {
						return nil, invalidToken("bad_scope", "SAML scope attribute is malformed")
					}
					scopes = append(scopes, p...)
				}
			}
			if claim, ok := si.cfg.Attributes[name]; ok && !IsRegisteredClaim(claim) {
				if len(values) == 1 {
					claims[claim] = values[0]
				} else {
					claims[claim] = values
				}
			}
		}
	}
	s := &Subject{Issuer: si.cfg.EntityID, Subject: nameID, Expiry: expiry, TokenHash: HashToken(raw),
		KeyThumbprint: "saml:" + si.cfg.EntityID, claims: claims}
	if id := a.SelectAttrValue("ID", ""); id != "" {
		s.JTI = id
	}
	s.Scopes = si.cfg.Scopes.Apply(slices.Compact(scopes))
	return s, nil
}

// samlTime reads an xs:dateTime attribute; zero when absent.
func samlTime(el *etree.Element, name string) (time.Time, error) {
	v := el.SelectAttrValue(name, "")
	if v == "" {
		return time.Time{}, nil
	}
	return time.Parse(time.RFC3339Nano, v)
}
