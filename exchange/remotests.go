package exchange

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
)

// Remote STS mode: for users who keep Keycloak or another Security Token
// Service, a route exchanges the (locally verified) inbound token at that
// STS over RFC 8693, with the same cache rules as in-process minting, and
// forwards the token it gets back. Never the inbound token.

// Defaults of a remote STS.
const (
	DefaultRemoteSTSTimeout = 5 * time.Second
	DefaultRemoteSTSRetries = 2
	maxRemoteSTSBody        = 64 << 10
	// remoteSTSDefaultLifetime bounds a token whose response has no
	// expires_in: it is cached no longer than this.
	remoteSTSDefaultLifetime = time.Minute
)

// RemoteSTSConfig configures a RemoteSTS.
type RemoteSTSConfig struct {
	// TokenEndpoint is the STS's RFC 8693 token endpoint.
	TokenEndpoint string
	// ClientID and ClientSecret are the gateway's credentials at the STS.
	ClientID, ClientSecret string
	// AuthMethod is client_secret_basic (default) or client_secret_post.
	AuthMethod string
	// Audiences, Resources and Scopes are what the request asks for.
	Audiences, Resources, Scopes []string
	// Timeout bounds one attempt (default DefaultRemoteSTSTimeout).
	Timeout time.Duration
	// Retries after a connection error, 408, 429 or 5xx (default 2; a
	// negative value: none).
	Retries int
	// CacheSize bounds the cache of exchanged tokens (default
	// DefaultCacheMaxEntries); DisableCache turns it off.
	CacheSize    int
	DisableCache bool
	HTTPClient   *http.Client
	Now          func() time.Time
	Logger       *zap.Logger
}

// RemoteSTS exchanges tokens at another STS.
type RemoteSTS struct {
	cfg      RemoteSTSConfig
	cache    *Cache
	identity string
	// Calls counts requests sent to the STS (for tests and metrics).
	Calls func()
}

// NewRemoteSTS checks the configuration.
func NewRemoteSTS(cfg RemoteSTSConfig) (*RemoteSTS, error) {
	u, err := url.Parse(cfg.TokenEndpoint)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return nil, fmt.Errorf("sts: the token endpoint must be an absolute http(s) URL, not %q", cfg.TokenEndpoint)
	}
	if cfg.ClientID == "" || cfg.ClientSecret == "" {
		return nil, errors.New("sts: client_id and client_secret are required")
	}
	switch cfg.AuthMethod {
	case "":
		cfg.AuthMethod = ClientAuthSecretBasic
	case ClientAuthSecretBasic, ClientAuthSecretPost:
	default:
		return nil, fmt.Errorf("sts: auth_method must be %s or %s", ClientAuthSecretBasic, ClientAuthSecretPost)
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultRemoteSTSTimeout
	}
	if cfg.Retries == 0 {
		cfg.Retries = DefaultRemoteSTSRetries
	}
	if cfg.Retries < 0 {
		cfg.Retries = 0
	}
	if cfg.HTTPClient == nil {
		// http.DefaultTransport keeps 2 idle connections per host: under
		// concurrent misses most calls would open a new connection (a
		// handshake more per miss over a network; 14,000 sockets in
		// TIME_WAIT in examples/loadbench).
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.MaxIdleConnsPerHost = remoteSTSIdleConns
		cfg.HTTPClient = &http.Client{Transport: t, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	s := &RemoteSTS{cfg: cfg}
	if !cfg.DisableCache {
		s.cache = NewCache(CacheConfig{MaxEntries: cfg.CacheSize, Now: cfg.Now})
	}
	g := Grant{Audiences: append(append([]string{cfg.TokenEndpoint, cfg.ClientID}, cfg.Audiences...), cfg.Resources...), Scopes: cfg.Scopes}
	s.identity = g.identity()
	return s, nil
}

// Exchange trades subject's token at the STS. The subject was verified
// locally first: a token the gateway does not trust never leaves it, and
// the subject's exp bounds the cache.
func (s *RemoteSTS) Exchange(ctx context.Context, raw string, subject *Subject) (*Minted, error) {
	if s.cache == nil {
		return s.call(ctx, raw, subject)
	}
	digest := DigestToken(raw)
	key := CacheKeyOf(digest, "remote-sts", s.identity)
	ct, hit, err := s.cache.GetOrMint(key, func() (*CachedToken, error) {
		m, err := s.call(ctx, raw, subject)
		if err != nil {
			return nil, err
		}
		return &CachedToken{Minted: m, Issuer: subject.Issuer, KeyThumbprint: subject.KeyThumbprint, SubjectExpiry: subject.Expiry}, nil
	})
	if err != nil {
		return nil, err
	}
	if hit {
		return ct.reusedFor(digest), nil
	}
	return ct.Minted, nil
}

// remoteSTSIdleConns is how many idle connections to its STS a route
// keeps: enough for the gateway's concurrent misses.
const remoteSTSIdleConns = 256

// call sends one RFC 8693 request, retrying transient failures.
func (s *RemoteSTS) call(ctx context.Context, raw string, subject *Subject) (*Minted, error) {
	form := url.Values{
		"grant_type":         {GrantTypeTokenExchange},
		"subject_token":      {raw},
		"subject_token_type": {TokenTypeAccessToken},
		// Explicit: without it some STSs issue a refresh token (the
		// zitadel/oidc example's default), which is not what is forwarded.
		"requested_token_type": {TokenTypeAccessToken},
	}
	for _, a := range s.cfg.Audiences {
		form.Add("audience", a)
	}
	for _, r := range s.cfg.Resources {
		form.Add("resource", r)
	}
	if len(s.cfg.Scopes) > 0 {
		form.Set("scope", FormatScope(s.cfg.Scopes))
	}
	if s.cfg.AuthMethod == ClientAuthSecretPost {
		form.Set("client_id", s.cfg.ClientID)
		form.Set("client_secret", s.cfg.ClientSecret)
	}
	body := form.Encode()
	// The call belongs to every request waiting on it (single flight): a
	// client that goes away does not cancel it.
	ctx = context.WithoutCancel(ctx)
	var lastErr *Error
	for attempt := 0; attempt <= s.cfg.Retries; attempt++ {
		if attempt > 0 {
			time.Sleep(time.Duration(attempt) * 100 * time.Millisecond)
		}
		m, retry, err := s.attempt(ctx, body, subject)
		if err == nil {
			return m, nil
		}
		lastErr = err
		if !retry {
			break
		}
	}
	return nil, lastErr
}

func (s *RemoteSTS) attempt(ctx context.Context, body string, subject *Subject) (*Minted, bool, *Error) {
	if s.Calls != nil {
		s.Calls()
	}
	actx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(actx, http.MethodPost, s.cfg.TokenEndpoint, strings.NewReader(body))
	if err != nil {
		return nil, false, &Error{Kind: KindServer, Reason: "sts_request", Description: "internal error", Err: err}
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	if s.cfg.AuthMethod == ClientAuthSecretBasic {
		req.SetBasicAuth(url.QueryEscape(s.cfg.ClientID), url.QueryEscape(s.cfg.ClientSecret))
	}
	now := s.cfg.Now()
	resp, err := s.cfg.HTTPClient.Do(req)
	if err != nil {
		return nil, true, stsUnavailable("sts_unreachable", "the token service cannot be reached", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxRemoteSTSBody+1))
	if err != nil || len(data) > maxRemoteSTSBody {
		return nil, true, stsUnavailable("sts_garbage", "the token service answered unreadably", err)
	}
	switch {
	case resp.StatusCode == http.StatusOK:
	case resp.StatusCode == http.StatusRequestTimeout || resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
		return nil, true, stsUnavailable("sts_status", fmt.Sprintf("the token service answered %d", resp.StatusCode), nil)
	case resp.StatusCode == http.StatusBadRequest:
		// RFC 6749 §5.2: the STS refuses this token or this request. What
		// it says about the token is the token's business: 401.
		var oe struct {
			Error string `json:"error"`
		}
		_ = json.Unmarshal(data, &oe)
		code := QuoteSafe(oe.Error)
		if code == "" {
			code = "invalid_request"
		}
		return nil, false, &Error{Kind: KindInvalidToken, Reason: "sts_refused", Description: "the token service refused the exchange: " + code}
	default:
		// 401/403 and the rest: the gateway's own credentials or setup are
		// wrong, never the caller's fault.
		return nil, false, &Error{Kind: KindUnavailable, Reason: "sts_rejected_gateway", Status: http.StatusBadGateway,
			Description: fmt.Sprintf("the token service answered %d to the gateway", resp.StatusCode), RetryAfter: 30 * time.Second}
	}
	var tr struct {
		AccessToken     string          `json:"access_token"`
		IssuedTokenType string          `json:"issued_token_type"`
		TokenType       string          `json:"token_type"`
		ExpiresIn       json.RawMessage `json:"expires_in"`
		Scope           string          `json:"scope"`
		RefreshToken    string          `json:"refresh_token"`
	}
	if err := json.Unmarshal(data, &tr); err != nil || tr.AccessToken == "" {
		return nil, true, stsUnavailable("sts_garbage", "the token service answered without an access_token", err)
	}
	if tr.IssuedTokenType != "" && tr.IssuedTokenType != TokenTypeAccessToken && tr.IssuedTokenType != TokenTypeJWT {
		return nil, false, stsUnavailable("sts_garbage", "the token service issued a token that is not an access token",
			fmt.Errorf("issued_token_type %q", tr.IssuedTokenType)) // the STS's words go to the log only
	}
	if len(tr.AccessToken) > DefaultMaxTokenSize || strings.ContainsAny(tr.AccessToken, " \r\n\t") {
		return nil, false, stsUnavailable("sts_garbage", "the token service answered an unusable access_token", nil)
	}
	lifetime := remoteSTSDefaultLifetime
	if len(tr.ExpiresIn) > 0 {
		n, err := strconv.ParseInt(strings.Trim(string(tr.ExpiresIn), `"`), 10, 64)
		if err != nil || n <= 0 {
			return nil, false, stsUnavailable("sts_garbage", "the token service answered a bad expires_in", err)
		}
		lifetime = time.Duration(n) * time.Second
	}
	exp := now.Add(lifetime)
	if subject != nil && subject.Expiry.Before(exp) {
		exp = subject.Expiry
	}
	m := &Minted{Token: tr.AccessToken, IssuedAt: now, Expiry: exp, JTI: HashToken(tr.AccessToken)[:22]}
	if subject != nil {
		m.Subject, m.SubjectIssuer, m.SubjectTokenHash = subject.Subject, subject.Issuer, subject.TokenHash
	}
	m.Audiences = append(append([]string(nil), s.cfg.Audiences...), s.cfg.Resources...)
	if tr.Scope != "" {
		m.Scopes, _ = ParseScope(tr.Scope)
	} else {
		m.Scopes = s.cfg.Scopes
	}
	m.Actor = Actor{Subject: s.cfg.TokenEndpoint}
	return m, false, nil
}

func stsUnavailable(reason, description string, err error) *Error {
	return &Error{Kind: KindUnavailable, Reason: reason, Description: description + "; retry later", RetryAfter: 2 * time.Second, Err: err}
}
