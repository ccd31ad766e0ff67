package exchange

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
)

// DefaultMaxMetadataBodySize caps a discovery document.
const DefaultMaxMetadataBodySize = 256 << 10

// DiscoveryConfig names where an issuer's metadata is read: OpenID Connect
// Discovery 1.0 or RFC 8414 authorization server metadata.
type DiscoveryConfig struct {
	// Issuer is the configured issuer; the document's `issuer` must equal it
	// exactly (OIDC Discovery §4.3, RFC 8414 §3.3).
	Issuer string
	// URLs are tried in order; the next one only when a URL answers with
	// an HTTP status other than 200 (or cannot be reached). Default:
	// DiscoveryURLs(Issuer).
	URLs []string
}

// ProviderMetadata is what the gateway uses of an issuer's metadata.
type ProviderMetadata struct {
	Issuer                string `json:"issuer"`
	JWKSURI               string `json:"jwks_uri"`
	IntrospectionEndpoint string `json:"introspection_endpoint,omitempty"`
	// IntrospectionAuthMethods is
	// introspection_endpoint_auth_methods_supported (RFC 8414 §2).
	IntrospectionAuthMethods []string `json:"introspection_endpoint_auth_methods_supported,omitempty"`
	// URL is where the document was read.
	URL string `json:"-"`
}

type discoveryConfig struct {
	issuer string
	urls   []string
	// httpsOnly: a document read over https must not send us to http.
	httpsOnly bool
}

// DiscoveryURLs are the metadata locations of issuer, in the order they are
// tried: OIDC Discovery (`<issuer>/.well-known/openid-configuration`), then
// RFC 8414 §3.1 (`/.well-known/oauth-authorization-server` inserted between
// the host and the issuer's path).
func DiscoveryURLs(issuer string) ([]string, error) {
	u, err := url.Parse(issuer)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return nil, errors.New("discovery needs an issuer that is an absolute http(s) URL without query or fragment (or give discovery_url)")
	}
	path := strings.TrimSuffix(u.EscapedPath(), "/")
	base := u.Scheme + "://" + u.Host
	return []string{
		base + path + "/.well-known/openid-configuration",
		base + "/.well-known/oauth-authorization-server" + path,
	}, nil
}

// CheckDiscovery validates a discovery configuration: the issuer's own
// locations, or the given URLs.
func CheckDiscovery(cfg DiscoveryConfig) error {
	_, err := newDiscoveryConfig(cfg)
	return err
}

func newDiscoveryConfig(cfg DiscoveryConfig) (*discoveryConfig, error) {
	if cfg.Issuer == "" {
		return nil, errors.New("discovery needs the issuer")
	}
	urls := cfg.URLs
	if len(urls) == 0 {
		var err error
		if urls, err = DiscoveryURLs(cfg.Issuer); err != nil {
			return nil, err
		}
	}
	d := &discoveryConfig{issuer: cfg.Issuer, urls: urls, httpsOnly: true}
	for _, u := range urls {
		p, err := url.Parse(u)
		if err != nil || (p.Scheme != "https" && p.Scheme != "http") || p.Host == "" {
			return nil, fmt.Errorf("discovery_url %q must be an absolute http(s) URL", u)
		}
		if p.Scheme != "https" {
			d.httpsOnly = false
		}
	}
	return d, nil
}

// errMetadataStatus: a location answered with an HTTP status other than
// 200; the next location is tried.
type errMetadataStatus int

func (e errMetadataStatus) Error() string { return fmt.Sprintf("HTTP status %d", int(e)) }

// Metadata returns the last metadata document that passed the checks (nil
// before the first one, and for sources without discovery).
func (s *KeySource) Metadata() *ProviderMetadata { return s.meta.Load() }

// discover reads the metadata, trying each location in order, and keeps it
// when it passes the checks. Every request made is counted like a JWKS fetch.
func (s *KeySource) discover(ctx context.Context) (*ProviderMetadata, error) {
	var errs []error
	for _, u := range s.discovery.urls {
		md, err := s.getMetadata(ctx, u)
		s.count(err)
		if err == nil {
			s.meta.Store(md)
			return md, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", u, err))
		var status errMetadataStatus
		if !errors.As(err, &status) || ctx.Err() != nil {
			// Only a location that answered "not here" sends us to the
			// next: a document that fails its checks is refused outright.
			break
		}
	}
	return nil, fmt.Errorf("discovery failed: %w", errors.Join(errs...))
}

func (s *KeySource) getMetadata(ctx context.Context, u string) (*ProviderMetadata, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := s.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, errMetadataStatus(resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, DefaultMaxMetadataBodySize+1))
	if err != nil {
		return nil, fmt.Errorf("reading the metadata: %w", err)
	}
	if len(body) > DefaultMaxMetadataBodySize {
		return nil, fmt.Errorf("the metadata exceeds %d bytes", DefaultMaxMetadataBodySize)
	}
	if err := checkStrictJSON(body); err != nil {
		return nil, fmt.Errorf("the metadata is not strict JSON: %w", err)
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(body, &raw); err != nil || raw == nil {
		return nil, errors.New("the metadata is not a JSON object")
	}
	md := &ProviderMetadata{URL: u}
	for name, dst := range map[string]*string{"issuer": &md.Issuer, "jwks_uri": &md.JWKSURI, "introspection_endpoint": &md.IntrospectionEndpoint} {
		if v, ok := raw[name]; ok {
			if err := json.Unmarshal(v, dst); err != nil {
				return nil, fmt.Errorf("the metadata's %s is not a string", name)
			}
		}
	}
	if v, ok := raw["introspection_endpoint_auth_methods_supported"]; ok {
		_ = json.Unmarshal(v, &md.IntrospectionAuthMethods)
	}
	// OIDC Discovery §4.3 / RFC 8414 §3.3: exactly the configured issuer,
	// or the document describes someone else (and an attacker who can
	// serve it would pick our keys).
	if md.Issuer != s.discovery.issuer {
		return nil, fmt.Errorf("the metadata's issuer %q is not the configured issuer %q: refused", md.Issuer, s.discovery.issuer)
	}
	if err := s.checkMetadataURL("jwks_uri", md.JWKSURI); err != nil {
		return nil, err
	}
	if md.IntrospectionEndpoint != "" {
		if err := s.checkMetadataURL("introspection_endpoint", md.IntrospectionEndpoint); err != nil {
			return nil, err
		}
	}
	return md, nil
}

// checkMetadataURL: an absolute URL, https when the metadata was configured
// on https (no downgrade by the document).
func (s *KeySource) checkMetadataURL(name, v string) error {
	if v == "" {
		return fmt.Errorf("the metadata has no %s", name)
	}
	p, err := url.Parse(v)
	if err != nil || (p.Scheme != "https" && p.Scheme != "http") || p.Host == "" {
		return fmt.Errorf("the metadata's %s is not an absolute http(s) URL", name)
	}
	if s.discovery.httpsOnly && p.Scheme != "https" {
		return fmt.Errorf("the metadata's %s is not https", name)
	}
	return nil
}
