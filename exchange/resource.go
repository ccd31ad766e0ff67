package exchange

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
)

// WellKnownProtectedResource is the well-known path of RFC 9728 §3:
// protected resource metadata lives at this path, suffixed with the
// resource's own path (§3.1).
const WellKnownProtectedResource = "/.well-known/oauth-protected-resource"

// ProtectedResource is the RFC 9728 §2 metadata document of one protected
// resource (an MCP server behind a route, say). Build it with
// NewProtectedResource, which validates it.
type ProtectedResource struct {
	// Resource is the resource identifier: the URL clients use, exactly
	// (RFC 9728 §3.3 requires clients to compare it with what they asked for).
	Resource string `json:"resource"`
	// AuthorizationServers are the issuer identifiers (RFC 8414) of the
	// authorization servers a client can obtain a token for this resource at.
	AuthorizationServers []string `json:"authorization_servers,omitempty"`
	// ScopesSupported are the scope names a client requests at those
	// authorization servers (theirs, not the gateway's mapped ones).
	ScopesSupported []string `json:"scopes_supported,omitempty"`
	// BearerMethodsSupported is always ["header"]: RFC 6750 §2.1 only.
	BearerMethodsSupported []string `json:"bearer_methods_supported"`
	// ResourceName is a human-readable name (optional).
	ResourceName string `json:"resource_name,omitempty"`
	// ResourceDocumentation is a URL of human-readable documentation (optional).
	ResourceDocumentation string `json:"resource_documentation,omitempty"`
}

// NewProtectedResource validates a metadata document and completes it
// (bearer_methods_supported). Every URL must be https (http only on a
// loopback host, for development) without fragment; the resource also
// without query.
func NewProtectedResource(p ProtectedResource) (*ProtectedResource, error) {
	if _, err := CheckResourceURL(p.Resource); err != nil {
		return nil, err
	}
	if len(p.AuthorizationServers) == 0 {
		return nil, fmt.Errorf("resource %s: at least one authorization server is required, so clients know where to get a token", p.Resource)
	}
	for _, as := range p.AuthorizationServers {
		if err := checkPublicURL(as); err != nil {
			return nil, fmt.Errorf("authorization server %q: %w", as, err)
		}
	}
	if p.ResourceDocumentation != "" {
		if err := checkPublicURL(p.ResourceDocumentation); err != nil {
			return nil, fmt.Errorf("resource documentation %q: %w", p.ResourceDocumentation, err)
		}
	}
	for _, s := range p.ScopesSupported {
		if _, err := ParseScope(s); err != nil || strings.Contains(s, " ") {
			return nil, fmt.Errorf("scope %q is not one scope token", s)
		}
	}
	p.AuthorizationServers = slices.Clone(p.AuthorizationServers)
	p.ScopesSupported = slices.Clone(p.ScopesSupported)
	p.BearerMethodsSupported = []string{"header"}
	return &p, nil
}

// CheckResourceURL checks a resource identifier (RFC 9728 §1.2, RFC 8707
// §2): an absolute https URL (http only on a loopback host) with a host, no
// userinfo, query or fragment.
func CheckResourceURL(resource string) (*url.URL, error) {
	if err := checkPublicURL(resource); err != nil {
		return nil, fmt.Errorf("resource %q: %w", resource, err)
	}
	u, _ := url.Parse(resource)
	if u.RawQuery != "" || u.ForceQuery {
		return nil, fmt.Errorf("resource %q: a resource identifier has no query here", resource)
	}
	return u, nil
}

func checkPublicURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return errors.New("not a URL")
	}
	if u.Host == "" || u.Opaque != "" {
		return errors.New("not an absolute URL with a host")
	}
	if u.User != nil {
		return errors.New("a URL with userinfo is not accepted")
	}
	if u.Fragment != "" || strings.Contains(s, "#") {
		return errors.New("a URL with a fragment is not accepted")
	}
	switch u.Scheme {
	case "https":
	case "http":
		if !isLoopbackHost(u.Hostname()) {
			return errors.New("must be https (http only for a loopback host)")
		}
	default:
		return errors.New("must be https (http only for a loopback host)")
	}
	return nil
}

func isLoopbackHost(h string) bool {
	if strings.EqualFold(h, "localhost") {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}

// ResourceMetadataURL is where the metadata of resource lives (RFC 9728
// §3.1): the well-known path inserted between the host and the resource's
// path, a terminating slash removed; the root document for a resource equal
// to its origin.
func ResourceMetadataURL(resource string) (string, error) {
	u, err := CheckResourceURL(resource)
	if err != nil {
		return "", err
	}
	return u.Scheme + "://" + u.Host + ResourceMetadataPath(u), nil
}

// ResourceMetadataPath is the path part of ResourceMetadataURL.
func ResourceMetadataPath(resource *url.URL) string {
	return WellKnownProtectedResource + strings.TrimSuffix(resource.EscapedPath(), "/")
}

// MetadataURL is the location of p (see ResourceMetadataURL).
func (p *ProtectedResource) MetadataURL() string {
	s, _ := ResourceMetadataURL(p.Resource)
	return s
}

// Matches tells whether a request for a metadata document (host as the
// client sent it, escaped path) asks for p: the same host (ports compared
// with defaults filled in) and exactly p's well-known path.
func (p *ProtectedResource) Matches(host, escapedPath string) bool {
	u, err := url.Parse(p.Resource)
	if err != nil {
		return false
	}
	return strings.EqualFold(hostPort(u.Host, u.Scheme), hostPort(host, u.Scheme)) && escapedPath == ResourceMetadataPath(u)
}

func hostPort(host, scheme string) string {
	if _, _, err := net.SplitHostPort(host); err == nil {
		return host
	}
	if scheme == "http" {
		return net.JoinHostPort(strings.Trim(host, "[]"), "80")
	}
	return net.JoinHostPort(strings.Trim(host, "[]"), "443")
}

// ServeHTTP writes the document: GET and HEAD (and CORS preflight, since
// browser-based MCP clients fetch it cross-origin: the document is public).
func (p *ProtectedResource) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Access-Control-Allow-Origin", "*")
	switch r.Method {
	case http.MethodGet, http.MethodHead:
	case http.MethodOptions:
		w.Header().Set("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
		w.WriteHeader(http.StatusNoContent)
		return
	default:
		w.Header().Set("Allow", "GET, HEAD, OPTIONS")
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	body, err := json.Marshal(p)
	if err != nil {
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "public, max-age=300")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		_, _ = w.Write(body)
	}
}

// External returns the issuer's scope names that give the internal scopes
// (the reverse of Apply), in the order of internal, each once: what a
// client must request at the issuer to obtain them. With no mapping, the
// names are the same.
func (m ScopeMap) External(internal []string) []string {
	if len(m.Map) == 0 {
		return slices.Clone(internal)
	}
	var out []string
	add := func(s string) {
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	names := make([]string, 0, len(m.Map))
	for ext := range m.Map {
		names = append(names, ext)
	}
	slices.Sort(names)
	for _, s := range internal {
		for _, ext := range names {
			if slices.Contains(m.Map[ext], s) {
				add(ext)
			}
		}
		if _, mapped := m.Map[s]; m.PassUnmapped && !mapped {
			add(s)
		}
	}
	return out
}

// checkResource binds a verified subject to a resource (RFC 8707): its aud
// must name the resource, and the resource must be one of the audiences its
// issuer is trusted for, so a token for one MCP server is refused at
// another, and no issuer is trusted for a resource it was not configured for.
func (ts *TrustStore) checkResource(s *Subject, resource string) error {
	if resource == "" {
		return nil
	}
	aud, err := audienceClaim(s.claims)
	if err != nil {
		return invalidToken("invalid_claims", "token aud is not a string or an array of strings")
	}
	ti, ok := ts.issuers[s.Issuer]
	if !ok || !slices.Contains(aud, resource) || !slices.Contains(ti.cfg.Audiences, resource) {
		return invalidToken("wrong_resource", "token audience does not name this resource")
	}
	return nil
}
