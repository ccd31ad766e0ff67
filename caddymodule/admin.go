package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
)

func init() {
	caddy.RegisterModule(AdminAPI{})
}

// AdminAPI adds the token exchange's endpoints to Caddy's admin API:
//
//   - POST /token-exchange/explain: what `caddy token-exchange explain`
//     prints with --json, against the running config;
//   - GET /token-exchange/keys: the signing keys and their states.
//
// Caddy provisions every registered admin.api module with its admin
// server, so it needs no config. Neither endpoint shows a token or a
// private key: tokens only as their SHA-256, keys only as kid, algorithm
// and times.
type AdminAPI struct{}

// CaddyModule returns the Caddy module information.
func (AdminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.token_exchange",
		New: func() caddy.Module { return new(AdminAPI) },
	}
}

// Routes returns the admin routes.
func (a *AdminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/token-exchange/explain", Handler: caddy.AdminHandlerFunc(a.explain)},
		{Pattern: "/token-exchange/keys", Handler: caddy.AdminHandlerFunc(a.keys)},
	}
}

// adminExplainRequest is the body of POST /token-exchange/explain: the
// flags of `caddy token-exchange explain`.
type adminExplainRequest struct {
	Token      string   `json:"token"`
	Route      string   `json:"route,omitempty"`
	Method     string   `json:"method,omitempty"`
	Host       string   `json:"host,omitempty"`
	Endpoint   bool     `json:"endpoint,omitempty"`
	Client     string   `json:"client,omitempty"`
	Audience   []string `json:"audience,omitempty"`
	Scope      []string `json:"scope,omitempty"`
	ActorToken string   `json:"actor_token,omitempty"`
}

func apiError(status int, err error) error {
	return caddy.APIError{HTTPStatus: status, Err: err}
}

// runningApp is the token_exchange app of the running config.
func runningApp() (caddy.Context, *App, error) {
	ctx := caddy.ActiveContext()
	v, err := ctx.AppIfConfigured("token_exchange")
	if err != nil {
		return ctx, nil, apiError(http.StatusNotFound, errors.New("the running config has no token_exchange app"))
	}
	return ctx, v.(*App), nil
}

func (a *AdminAPI) explain(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodPost {
		return apiError(http.StatusMethodNotAllowed, errors.New("use POST"))
	}
	var req adminExplainRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return apiError(http.StatusBadRequest, fmt.Errorf("the body must be a JSON object {token, route | endpoint and client, method, host, audience, scope, actor_token}: %v", err))
	}
	switch {
	case req.Token == "":
		return apiError(http.StatusBadRequest, errors.New("token is required"))
	case req.Endpoint == (req.Route != ""):
		return apiError(http.StatusBadRequest, errors.New("give exactly one of route or endpoint with client"))
	case req.Endpoint && req.Client == "":
		return apiError(http.StatusBadRequest, errors.New("endpoint needs client"))
	}
	ctx, app, err := runningApp()
	if err != nil {
		return err
	}
	// The explanation must not outlive the admin request nor hang on a
	// JWKS fetch.
	xctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	var rep explainReport
	if req.Endpoint {
		if rep, err = explainEndpoint(xctx, app, req.Client, req.Token, req.ActorToken, req.Audience, req.Scope); err != nil {
			return apiError(http.StatusBadRequest, err)
		}
	} else {
		method := req.Method
		if method == "" {
			method = http.MethodGet
		}
		if !strings.HasPrefix(req.Route, "/") {
			return apiError(http.StatusBadRequest, errors.New("route must be a path starting with /"))
		}
		h, where, path, err := runningRouteHandler(ctx, method, req.Host, req.Route)
		if err != nil {
			return apiError(http.StatusBadRequest, err)
		}
		rep = explainRoute(xctx, h.engine, h, where, req.Token, method, req.Host, path)
	}
	rep.Note = "against the running config; a token it mints is signed with the gateway's current key and discarded, never returned"
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(rep)
}

// runningRouteHandler finds, in the running HTTP servers (in name order),
// the first provisioned token_exchange handler on the way of a request;
// every matcher of the running routes applies.
func runningRouteHandler(ctx caddy.Context, method, host, route string) (*Handler, string, string, error) {
	v, err := ctx.AppIfConfigured("http")
	if err != nil {
		return nil, "", "", errors.New("the running config has no HTTP servers")
	}
	httpApp := v.(*caddyhttp.App)
	r := httptest.NewRequest(method, "http://placeholder"+route, nil)
	r.Host = host
	repl := caddy.NewReplacer()
	rctx := context.WithValue(r.Context(), caddy.ReplacerCtxKey, repl)
	rctx = context.WithValue(rctx, caddyhttp.VarsCtxKey, map[string]any{})
	r = r.WithContext(rctx)
	names := make([]string, 0, len(httpApp.Servers))
	for name := range httpApp.Servers {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if h, where, ok := walkRunningRoutes(httpApp.Servers[name].Routes, r, "server "+name); ok {
			return h, where, r.URL.Path, nil
		}
	}
	return nil, "", "", fmt.Errorf("no token_exchange handler serves %s %s%s (check route, host and method)", method, host, r.URL.Path)
}

func walkRunningRoutes(routes caddyhttp.RouteList, r *http.Request, where string) (*Handler, string, bool) {
	for i, rt := range routes {
		if !runningRouteMatches(rt.MatcherSets, r) {
			continue
		}
		for _, mh := range rt.Handlers {
			switch h := mh.(type) {
			case *Handler:
				return h, fmt.Sprintf("%s, route %d", where, i), true
			case *caddyhttp.Subroute:
				if found, w, ok := walkRunningRoutes(h.Routes, r, fmt.Sprintf("%s, route %d", where, i)); ok {
					return found, w, true
				}
			}
		}
	}
	return nil, "", false
}

// runningRouteMatches is MatcherSets.AnyMatchWithError, except that with
// no host given host matchers are passed over (as `explain --route` does).
func runningRouteMatches(sets caddyhttp.MatcherSets, r *http.Request) bool {
	if len(sets) == 0 {
		return true
	}
	for _, set := range sets {
		var kept caddyhttp.MatcherSet
		for _, m := range set {
			switch m.(type) {
			case caddyhttp.MatchHost, *caddyhttp.MatchHost:
				if r.Host == "" {
					continue
				}
			}
			kept = append(kept, m)
		}
		if ok, err := kept.MatchWithError(r); err == nil && ok {
			return true
		}
	}
	return false
}

// adminKeys is the body of GET /token-exchange/keys.
type adminKeys struct {
	Issuer string `json:"issuer"`
	// Source is "storage" (the cluster's key set) or "signing_key_file".
	Source string `json:"source"`
	// SigningKID is the key this instance signs with now.
	SigningKID string `json:"signing_kid,omitempty"`
	SigningAlg string `json:"signing_alg,omitempty"`
	// Keys are the keys in storage with their states (with
	// signing_key_file: the one key of the file).
	Keys []exchange.KeyInfo `json:"keys"`
}

func (a *AdminAPI) keys(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return apiError(http.StatusMethodNotAllowed, errors.New("use GET"))
	}
	_, app, err := runningApp()
	if err != nil {
		return err
	}
	out := adminKeys{Issuer: app.Issuer, Source: "storage", Keys: []exchange.KeyInfo{}}
	signer := app.engine.Signer()
	if signer != nil {
		out.SigningKID, out.SigningAlg = signer.KeyID(), signer.Algorithm()
	}
	if app.keys == nil {
		out.Source = "signing_key_file"
		if signer != nil {
			out.Keys = append(out.Keys, exchange.KeyInfo{KID: signer.KeyID(), Alg: signer.Algorithm(), State: "signing", SignFrom: signer.SigningSince().UTC()})
		}
	} else {
		keys, err := app.keys.Keys(r.Context())
		if err != nil {
			return apiError(http.StatusServiceUnavailable, err)
		}
		if keys != nil {
			out.Keys = keys
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}

var _ caddy.AdminRouter = (*AdminAPI)(nil)
