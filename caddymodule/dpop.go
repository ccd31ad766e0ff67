package caddymodule

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
)

// Sender-constrained tokens on the two front doors: the DPoP proof (RFC
// 9449) and the TLS client certificate (RFC 8705) of a request become an
// exchange.Binding, which the engine compares with the token's cnf. The
// protocol logic is in exchange/dpop.go; this file only reads the request.

// DPoP modes.
const (
	dpopOptional = "optional" // Bearer for unbound tokens, DPoP for DPoP-bound ones
	dpopRequired = "required" // DPoP only
)

// DPoPOptions turn DPoP on for a route (`dpop optional|required`) or
// configure it at the token endpoint.
type DPoPOptions struct {
	// Mode is optional (Bearer and DPoP) or required (DPoP only).
	Mode string `json:"mode,omitempty"`
	// Algorithms is the proof algorithm allow-list (default: RS*, PS*,
	// ES256/384/512, EdDSA). none and HMAC are refused.
	Algorithms []string `json:"algorithms,omitempty"`
	// MaxAge is how old a proof's iat may be (default 1m; 5s into the
	// future are tolerated).
	MaxAge caddy.Duration `json:"max_age,omitempty"`
	// Nonce requires server-provided nonces (DPoP-Nonce, RFC 9449 §8).
	Nonce bool `json:"nonce,omitempty"`
	// PublicOrigins are the scheme://host[:port] clients address this
	// site by, when a proxy in front of Caddy terminates TLS or changes
	// Host. Default: the scheme of the connection and the Host header of
	// the request as it reached Caddy.
	PublicOrigins []string `json:"public_origins,omitempty"`

	verifier *exchange.DPoPVerifier
	origins  []*url.URL
	algs     string
}

// dpopStates shares one replay cache and nonce key per process, handed
// from one config to the next on reload (a reload must not reopen the
// replay window of proofs already seen).
var dpopStates = caddy.NewUsagePool()

const dpopStateKey = "token_exchange.dpop"

type dpopStateHolder struct{ *exchange.DPoPState }

func (dpopStateHolder) Destruct() error { return nil }

// provision validates the options and joins the shared state. Nothing to
// do for nil (DPoP off).
func (o *DPoPOptions) provision() error {
	if o == nil {
		return nil
	}
	switch o.Mode {
	case "":
		o.Mode = dpopOptional
	case dpopOptional, dpopRequired:
	default:
		return fmt.Errorf("dpop must be optional or required, not %q", o.Mode)
	}
	if err := o.checkOrigins(); err != nil {
		return err
	}
	v, _, err := dpopStates.LoadOrNew(dpopStateKey, func() (caddy.Destructor, error) {
		st, err := exchange.NewDPoPState(0, 0)
		return dpopStateHolder{st}, err
	})
	if err != nil {
		return err
	}
	o.verifier, err = exchange.NewDPoPVerifier(exchange.DPoPConfig{
		Algorithms: o.Algorithms,
		MaxAge:     time.Duration(o.MaxAge),
		Nonce:      o.Nonce,
		State:      v.(dpopStateHolder).DPoPState,
	})
	if err != nil {
		_, _ = dpopStates.Delete(dpopStateKey)
		return err
	}
	o.algs = strings.Join(o.verifier.Algorithms(), " ")
	return nil
}

// checkOrigins parses PublicOrigins into o.origins.
func (o *DPoPOptions) checkOrigins() error {
	o.origins = o.origins[:0]
	for _, s := range o.PublicOrigins {
		u, err := url.Parse(s)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.User != nil ||
			strings.Trim(u.Path, "/") != "" || u.RawQuery != "" || u.Fragment != "" {
			return fmt.Errorf("dpop public_origin %q must be scheme://host[:port] (http or https)", s)
		}
		o.origins = append(o.origins, u)
	}
	return nil
}

// cleanup leaves the shared state.
func (o *DPoPOptions) cleanup() error {
	if o == nil || o.verifier == nil {
		return nil
	}
	_, err := dpopStates.Delete(dpopStateKey)
	return err
}

// Cleanup releases the handler's share of the DPoP state.
func (h *Handler) Cleanup() error { return h.DPoP.cleanup() }

// Cleanup releases the endpoint's share of the DPoP state.
func (h *EndpointHandler) Cleanup() error { return h.DPoP.cleanup() }

// presented is what came with a token on one request.
type presented struct {
	binding exchange.Binding
	proof   *exchange.DPoPProof
}

// credentials reads the inbound token and what the request proves about
// its presenter: the TLS client certificate, and on a DPoP route the DPoP
// proof (`Authorization: DPoP <token>` with exactly one `DPoP` header). The
// DPoP header is removed whatever happens: a proof is never forwarded.
func (h *Handler) credentials(r *http.Request) (string, *presented, *exchange.Error) {
	proofs := r.Header.Values("DPoP")
	r.Header.Del("DPoP")
	p := &presented{}
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		p.binding.CertThumbprint = exchange.CertThumbprint(r.TLS.PeerCertificates[0])
	}
	o := h.DPoP
	if o == nil || !usesDPoPScheme(r) {
		if o != nil && o.Mode == dpopRequired && len(r.Header.Values("Authorization")) > 0 {
			if _, err := exchange.ParseBearer(r); err != nil && err.Kind != exchange.KindMissingToken {
				return "", p, err
			}
			return "", p, &exchange.Error{Kind: exchange.KindInvalidToken, Reason: "dpop_required",
				Description: "this route accepts only DPoP-bound tokens with a DPoP proof"}
		}
		raw, err := exchange.ParseBearer(r)
		return raw, p, err
	}
	// Authorization: DPoP <token> (RFC 9449 §7.1), as strict as Bearer.
	// The scheme is remembered for the challenge of a refusal (the
	// Authorization header itself is gone by then).
	caddyhttp.SetVar(r.Context(), dpopSchemeVar, true)
	raw, err := exchange.ParseBearer(withScheme(r))
	if err != nil {
		return "", p, err
	}
	switch len(proofs) {
	case 0:
		return raw, p, &exchange.Error{Kind: exchange.KindInvalidDPoPProof, Reason: "dpop_missing", Description: "no DPoP proof"}
	case 1:
	default:
		return raw, p, &exchange.Error{Kind: exchange.KindInvalidDPoPProof, Reason: "dpop_multiple", Description: "more than one DPoP header"}
	}
	proof, perr := o.verifier.Check(proofs[0], exchange.DPoPRequest{Method: originalMethod(r), URLs: o.targetURIs(r), AccessToken: raw})
	if perr != nil {
		return raw, p, exchange.AsError(perr)
	}
	p.proof = proof
	p.binding.JKT, p.binding.DPoPScheme = proof.JKT, true
	return raw, p, nil
}

// bindingOf is the binding to verify the token with (nil-safe).
func (p *presented) bindingOf() *exchange.Binding {
	if p == nil {
		return nil
	}
	return &p.binding
}

// useProof records the proof's jti once its token was accepted (a replay
// is refused here, before anything is forwarded) and hands the client a
// new nonce when its nonce is about to expire.
func (h *Handler) useProof(w http.ResponseWriter, p *presented) *exchange.Error {
	if p == nil || p.proof == nil {
		return nil
	}
	if err := h.DPoP.verifier.Use(p.proof); err != nil {
		return exchange.AsError(err)
	}
	if p.proof.NewNonce != "" {
		w.Header().Set("DPoP-Nonce", p.proof.NewNonce)
	}
	return nil
}

// dpopSchemeVar marks a request whose token came with the DPoP scheme.
const dpopSchemeVar = "token_exchange.dpop_scheme"

// usesDPoPScheme tells whether the request's Authorization uses the DPoP scheme.
func usesDPoPScheme(r *http.Request) bool {
	if v, _ := caddyhttp.GetVar(r.Context(), dpopSchemeVar).(bool); v {
		return true
	}
	values := r.Header.Values("Authorization")
	if len(values) == 0 {
		return false
	}
	scheme, _, _ := strings.Cut(strings.TrimSpace(values[0]), " ")
	return strings.EqualFold(scheme, "DPoP")
}

// withScheme is r with its DPoP Authorization read as Bearer, so that the
// one strict token reader (bearerToken) serves both schemes.
func withScheme(r *http.Request) *http.Request {
	values := r.Header.Values("Authorization")
	if len(values) != 1 {
		return r
	}
	_, tok, _ := strings.Cut(strings.TrimSpace(values[0]), " ")
	r2 := *r
	r2.Header = r.Header.Clone()
	r2.Header.Set("Authorization", "Bearer "+tok)
	return &r2
}

// originalMethod and targetURIs describe the request as the client sent
// it, before any rewrite in Caddy: the original request's method and path
// (Caddy keeps them under caddyhttp.OriginalRequestCtxKey), the Host the
// request arrived with (rewrites do not change it; Caddy's copy of the
// original request does not keep it) and the connection's scheme; or,
// behind another proxy, the configured public origins with that path.
func originalMethod(r *http.Request) string {
	if or, ok := r.Context().Value(caddyhttp.OriginalRequestCtxKey).(http.Request); ok && or.Method != "" {
		return or.Method
	}
	return r.Method
}

func (o *DPoPOptions) targetURIs(r *http.Request) []*url.URL {
	path := r.URL.Path
	if or, ok := r.Context().Value(caddyhttp.OriginalRequestCtxKey).(http.Request); ok && or.URL != nil {
		path = or.URL.Path
	}
	if len(o.origins) > 0 {
		out := make([]*url.URL, 0, len(o.origins))
		for _, base := range o.origins {
			out = append(out, &url.URL{Scheme: base.Scheme, Host: base.Host, Path: path})
		}
		return out
	}
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return []*url.URL{{Scheme: scheme, Host: r.Host, Path: path}}
}

// setChallenges sets WWW-Authenticate on a refusal of a DPoP route (RFC
// 9449 §7.1): a DPoP challenge with the allowed algs, and on an optional
// route a Bearer one too. The error code goes on the scheme the client
// used (DPoP for a proof error or a DPoP-only route).
func (o *DPoPOptions) setChallenges(w http.ResponseWriter, r *http.Request, bearer, realm, code string, e *exchange.Error) {
	dpopErr := o.Mode == dpopRequired || usesDPoPScheme(r) ||
		e.Kind == exchange.KindInvalidDPoPProof || e.Kind == exchange.KindUseDPoPNonce
	dpop := `DPoP realm="` + exchange.QuoteSafe(realm) + `"`
	if code != "" && dpopErr {
		dpop += `, error="` + code + `", error_description="` + exchange.QuoteSafe(e.Description) + `"`
	}
	dpop += `, algs="` + o.algs + `"`
	if o.Mode == dpopOptional {
		if dpopErr {
			bearer = `Bearer realm="` + exchange.QuoteSafe(realm) + `"`
		}
		w.Header().Add("WWW-Authenticate", bearer)
	}
	w.Header().Add("WWW-Authenticate", dpop)
	if e.Kind == exchange.KindUseDPoPNonce {
		w.Header().Set("DPoP-Nonce", o.verifier.Nonce())
	}
}

// endpointBinding is what a token endpoint request proves: the TLS client
// certificate and an optional DPoP proof for POST to the configured
// token_endpoint (never a URL built from Host, which the sender chooses).
// A proof is recorded as used at once: the client authenticated already.
func (h *EndpointHandler) endpointBinding(w http.ResponseWriter, r *http.Request) (*exchange.Binding, *exchange.Error) {
	b := &exchange.Binding{}
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		b.CertThumbprint = exchange.CertThumbprint(r.TLS.PeerCertificates[0])
	}
	proofs := r.Header.Values("DPoP")
	switch {
	case len(proofs) == 0 && h.DPoP.Mode == dpopRequired:
		return nil, &exchange.Error{Kind: exchange.KindInvalidDPoPProof, Reason: "dpop_missing", Description: "a DPoP proof is required"}
	case len(proofs) == 0:
		return b, nil
	case len(proofs) > 1:
		return nil, &exchange.Error{Kind: exchange.KindInvalidDPoPProof, Reason: "dpop_multiple", Description: "more than one DPoP header"}
	}
	proof, err := h.DPoP.verifier.Check(proofs[0], exchange.DPoPRequest{Method: http.MethodPost, URLs: h.tokenEndpointURLs})
	if err == nil {
		err = h.DPoP.verifier.Use(proof)
	}
	if err != nil {
		e := exchange.AsError(err)
		if e.Kind == exchange.KindUseDPoPNonce {
			w.Header().Set("DPoP-Nonce", h.DPoP.verifier.Nonce())
		}
		return nil, e
	}
	if proof.NewNonce != "" {
		w.Header().Set("DPoP-Nonce", proof.NewNonce)
	}
	b.JKT = proof.JKT
	return b, nil
}

// provisionEndpointDPoP sets up DPoP at the token endpoint: always
// accepted (optional) unless configured otherwise.
func (h *EndpointHandler) provisionEndpointDPoP() error {
	if h.DPoP == nil {
		h.DPoP = &DPoPOptions{Mode: dpopOptional}
	}
	if len(h.DPoP.PublicOrigins) > 0 {
		return errors.New("dpop public_origin has no meaning at the token endpoint: proofs are checked against the token_endpoint URL of the global option")
	}
	if err := h.DPoP.provision(); err != nil {
		return err
	}
	u, err := url.Parse(h.app.TokenEndpoint)
	if err != nil {
		return fmt.Errorf("token_endpoint %q: %w", h.app.TokenEndpoint, err)
	}
	h.tokenEndpointURLs = []*url.URL{u}
	return nil
}

// logUnbinding records an exchange that dropped a subject token's binding
// (a client with allow_unbinding): never silent.
func (h *EndpointHandler) logUnbinding(r *http.Request, client string, m *exchange.Minted) {
	if m == nil || !m.Unbound {
		return
	}
	h.logger.Warn("sender-constrained subject token exchanged without proof of possession (allow_unbinding): the minted token is not bound",
		zap.String("client_id", client), zap.String("remote_ip", exchange.RemoteIP(r)),
		zap.String("sub", m.Subject), zap.String("jti", m.JTI), zap.String("subject_token_sha256", m.SubjectTokenHash))
}
