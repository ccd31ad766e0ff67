package caddymodule

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"strings"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
)

// TrustedSAMLIssuer is a SAML 2.0 identity provider whose assertions the
// token endpoint accepts as subject tokens (subject_token_type
// urn:ietf:params:oauth:token-type:saml2, base64url-encoded, RFC 8693 §3).
type TrustedSAMLIssuer struct {
	// EntityID is the IdP's entity ID, the assertions' <Issuer>.
	EntityID string `json:"entity_id"`
	// CertificateFiles are PEM files of the IdP's signing certificates.
	CertificateFiles []string `json:"certificate_files"`
	// Audience is our SP entity ID.
	Audience string `json:"audience"`
	// Recipient is the bearer SubjectConfirmationData Recipient required
	// (default: the token_endpoint URL).
	Recipient string `json:"recipient,omitempty"`
	// Attributes map a SAML attribute name to a claim name.
	Attributes map[string]string `json:"attributes,omitempty"`
	// ScopeAttribute is the attribute holding the subject's scopes.
	ScopeAttribute string `json:"scope_attribute,omitempty"`
	// ScopeMap maps its scopes to ours, as in trust blocks.
	ScopeMap map[string][]string `json:"scope_map,omitempty"`
	// PassUnmappedScopes keeps scopes without a mapping.
	PassUnmappedScopes bool `json:"pass_unmapped_scopes,omitempty"`
}

// config reads the certificates and builds the library's configuration.
func (s TrustedSAMLIssuer) config(defaultRecipient string) (exchange.SAMLIssuerConfig, error) {
	cfg := exchange.SAMLIssuerConfig{
		EntityID: s.EntityID, Audience: s.Audience, Recipient: s.Recipient,
		Attributes: s.Attributes, ScopeAttribute: s.ScopeAttribute,
		Scopes: exchange.ScopeMap{Map: s.ScopeMap, PassUnmapped: s.PassUnmappedScopes},
	}
	if cfg.Recipient == "" {
		cfg.Recipient = defaultRecipient
	}
	for _, f := range s.CertificateFiles {
		data, err := os.ReadFile(f)
		if err != nil {
			return cfg, fmt.Errorf("trust_saml %s: %w", s.EntityID, err)
		}
		for {
			var block *pem.Block
			if block, data = pem.Decode(data); block == nil {
				break
			}
			if block.Type != "CERTIFICATE" {
				continue
			}
			cert, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return cfg, fmt.Errorf("trust_saml %s: %s: %w", s.EntityID, f, err)
			}
			cfg.Certificates = append(cfg.Certificates, cert)
		}
	}
	if len(cfg.Certificates) == 0 {
		return cfg, fmt.Errorf("trust_saml %s: no PEM certificate in %s", s.EntityID, strings.Join(s.CertificateFiles, ", "))
	}
	return cfg, nil
}

func (s *TrustedSAMLIssuer) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.Err("trust_saml needs the IdP's entity ID, e.g. trust_saml https://idp.example.com/metadata { ... }")
	}
	s.EntityID = d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var err error
		switch d.Val() {
		case "certificate":
			err = appendArgs(d, &s.CertificateFiles)
		case "audience":
			err = oneArg(d, &s.Audience)
		case "recipient":
			err = oneArg(d, &s.Recipient)
		case "attribute":
			args := d.RemainingArgs()
			if len(args) != 2 {
				return d.Err("attribute needs a SAML attribute name and a claim name: attribute <saml-name> <claim>")
			}
			if exchange.IsRegisteredClaim(args[1]) {
				return d.Errf("attribute: claim '%s' is set by the gateway", args[1])
			}
			if s.Attributes == nil {
				s.Attributes = map[string]string{}
			}
			s.Attributes[args[0]] = args[1]
		case "scope_attribute":
			err = oneArg(d, &s.ScopeAttribute)
		case "map_scope":
			args := d.RemainingArgs()
			if len(args) < 2 {
				return d.ArgErr()
			}
			if s.ScopeMap == nil {
				s.ScopeMap = map[string][]string{}
			}
			s.ScopeMap[args[0]] = append(s.ScopeMap[args[0]], args[1:]...)
		case "pass_unmapped_scopes":
			s.PassUnmappedScopes = true
		default:
			return d.Errf("unrecognized trust_saml option '%s'", d.Val())
		}
		if err != nil {
			return err
		}
	}
	if len(s.CertificateFiles) == 0 || s.Audience == "" {
		return d.Errf("trust_saml %s: certificate and audience (our SP entity ID) are required", s.EntityID)
	}
	return nil
}
