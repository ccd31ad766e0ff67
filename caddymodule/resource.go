package caddymodule

import (
	"fmt"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
)

func init() {
	caddy.RegisterModule(ResourceMetadataHandler{})
	httpcaddyfile.RegisterHandlerDirective("token_exchange_resource_metadata", parseResourceMetadataHandler)
	httpcaddyfile.RegisterDirectiveOrder("token_exchange_resource_metadata", httpcaddyfile.Before, "respond")
}

// ResourceOptions bind a token_exchange route to a protected resource (an
// MCP server, say; RFC 9728, RFC 8707). The one URL drives three things:
// the inbound token's aud must name it (and the trust block of the token's
// issuer must list it among its audiences), the route's challenges carry
// resource_metadata pointing at its metadata document, and that document
// (served by token_exchange_resource_metadata) publishes it as resource.
type ResourceOptions struct {
	// URL is the resource identifier: the public URL clients use, exactly.
	URL string `json:"url"`
	// AuthorizationServers published in the metadata. Default: the issuers
	// of the trust blocks whose audience lists the URL. When set, each must
	// be one of those.
	AuthorizationServers []string `json:"authorization_servers,omitempty"`
	// ScopesSupported published in the metadata. Default: the route's
	// scopes in the names clients request at those issuers (map_scope
	// reversed).
	ScopesSupported []string `json:"scopes_supported,omitempty"`
	// Name is resource_name (optional).
	Name string `json:"resource_name,omitempty"`
	// Documentation is resource_documentation, a URL (optional).
	Documentation string `json:"resource_documentation,omitempty"`
}

// url is the grant's resource ("" when the route has none).
func (o *ResourceOptions) url() string {
	if o == nil {
		return ""
	}
	return o.URL
}

// provision builds the route's metadata document, registers it with the
// app (for token_exchange_resource_metadata) and points the gate's
// challenges at it.
func (o *ResourceOptions) provision(app *App, gate *exchange.BearerGate, scopes, requireScopes []string) error {
	if o == nil {
		return nil
	}
	if _, err := exchange.CheckResourceURL(o.URL); err != nil {
		return err
	}
	var trusted []TrustedIssuer
	for _, ti := range app.Trust {
		if slices.Contains(ti.Audiences, o.URL) {
			trusted = append(trusted, ti)
		}
	}
	if len(trusted) == 0 {
		return fmt.Errorf("resource %s is in no trust block's audience list: add it to the audience of the issuer whose tokens this resource accepts", o.URL)
	}
	servers := o.AuthorizationServers
	if len(servers) == 0 {
		for _, ti := range trusted {
			servers = append(servers, ti.Issuer)
		}
	}
	for _, as := range servers {
		if !slices.ContainsFunc(trusted, func(ti TrustedIssuer) bool { return ti.Issuer == as }) {
			return fmt.Errorf("resource %s: authorization server %s is not a trusted issuer whose audience lists the resource", o.URL, as)
		}
	}
	external := func(internal []string) []string {
		var out []string
		for _, ti := range trusted {
			m := exchange.ScopeMap{Map: ti.ScopeMap, PassUnmapped: ti.PassUnmappedScopes}
			for _, s := range m.External(internal) {
				if !slices.Contains(out, s) {
					out = append(out, s)
				}
			}
		}
		return out
	}
	supported := o.ScopesSupported
	if len(supported) == 0 {
		supported = external(scopes)
	}
	doc, err := exchange.NewProtectedResource(exchange.ProtectedResource{
		Resource:              o.URL,
		AuthorizationServers:  servers,
		ScopesSupported:       supported,
		ResourceName:          o.Name,
		ResourceDocumentation: o.Documentation,
	})
	if err != nil {
		return err
	}
	if err := app.resourceRegistry().add(doc); err != nil {
		return err
	}
	gate.ResourceMetadata = doc.MetadataURL()
	if len(requireScopes) > 0 {
		gate.ChallengeScope = external(requireScopes)
	} else {
		gate.ChallengeScope = supported
	}
	return nil
}

// resourceRegistry holds the metadata documents of the routes of one
// configuration, for token_exchange_resource_metadata.
type resourceRegistry struct {
	mu   sync.RWMutex
	docs []*exchange.ProtectedResource
}

// resourceRegistryMu guards the creation of an app's registry.
var resourceRegistryMu sync.Mutex

// resourceRegistry is the app's registry, created on first use.
func (a *App) resourceRegistry() *resourceRegistry {
	resourceRegistryMu.Lock()
	defer resourceRegistryMu.Unlock()
	if a.resources == nil {
		a.resources = new(resourceRegistry)
	}
	return a.resources
}

func (rr *resourceRegistry) add(doc *exchange.ProtectedResource) error {
	rr.mu.Lock()
	defer rr.mu.Unlock()
	for _, d := range rr.docs {
		if d.Resource != doc.Resource {
			continue
		}
		// The same resource on several routes (matchers, sites) is fine as
		// long as they describe it the same way.
		if !reflect.DeepEqual(d, doc) {
			return fmt.Errorf("resource %s is configured on two routes with different metadata (scopes or authorization servers)", doc.Resource)
		}
		return nil
	}
	rr.docs = append(rr.docs, doc)
	return nil
}

func (rr *resourceRegistry) find(host, escapedPath string) *exchange.ProtectedResource {
	rr.mu.RLock()
	defer rr.mu.RUnlock()
	for _, d := range rr.docs {
		if d.Matches(host, escapedPath) {
			return d
		}
	}
	return nil
}

// ResourceMetadataHandler is the `token_exchange_resource_metadata`
// handler: it serves the RFC 9728 protected resource metadata of every
// token_exchange route with a resource, at its path-suffixed well-known
// location (/.well-known/oauth-protected-resource/<resource path>; the root
// document for a resource equal to its origin), matched by host and path.
// Requests outside /.well-known/oauth-protected-resource go to the next
// handler; an unknown resource gets 404.
type ResourceMetadataHandler struct {
	app *App
}

// CaddyModule returns the Caddy module information.
func (ResourceMetadataHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.token_exchange_resource_metadata",
		New: func() caddy.Module { return new(ResourceMetadataHandler) },
	}
}

// Provision sets up the handler.
func (h *ResourceMetadataHandler) Provision(ctx caddy.Context) error {
	app, err := appFrom(ctx, "token_exchange_resource_metadata handler")
	if err != nil {
		return err
	}
	h.app = app
	return nil
}

// ServeHTTP serves a metadata document.
func (h *ResourceMetadataHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	p := r.URL.EscapedPath()
	if p != exchange.WellKnownProtectedResource && !strings.HasPrefix(p, exchange.WellKnownProtectedResource+"/") {
		return next.ServeHTTP(w, r)
	}
	doc := h.app.resourceRegistry().find(r.Host, p)
	if doc == nil {
		return caddyhttp.Error(http.StatusNotFound, nil)
	}
	doc.ServeHTTP(w, r)
	return nil
}

// parseResourceMetadataHandler sets up the handler. Syntax:
//
//	token_exchange_resource_metadata [<matcher>]
func parseResourceMetadataHandler(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	h.Next() // consume directive name
	if h.NextArg() || h.NextBlock(0) {
		return nil, h.Err("token_exchange_resource_metadata takes no arguments: each document comes from the resource of a token_exchange route")
	}
	return new(ResourceMetadataHandler), nil
}

// parseResource reads a route's `resource <url> [{ ... }]`. Every error
// names its line.
func parseResource(d *caddyfile.Dispenser) (*ResourceOptions, error) {
	o := &ResourceOptions{}
	if err := oneArg(d, &o.URL); err != nil {
		return nil, err
	}
	if _, err := exchange.CheckResourceURL(o.URL); err != nil {
		return nil, d.Errf("%v", err)
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var err error
		switch d.Val() {
		case "authorization_server":
			err = appendArgs(d, &o.AuthorizationServers)
		case "scopes_supported":
			err = appendArgs(d, &o.ScopesSupported)
		case "resource_name":
			err = oneArg(d, &o.Name)
		case "resource_documentation":
			err = oneArg(d, &o.Documentation)
		default:
			return nil, d.Errf("unrecognized resource option '%s'", d.Val())
		}
		if err != nil {
			return nil, err
		}
	}
	return o, nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*ResourceMetadataHandler)(nil)
	_ caddyhttp.MiddlewareHandler = (*ResourceMetadataHandler)(nil)
)
