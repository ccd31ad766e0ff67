package exchange

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// ksMode is how a ksServer answers.
type ksMode int32

const (
	ksOK       ksMode = iota
	ksDown            // 500
	ksGarbage         // 200, not JSON
	ksEmpty           // 200, {"keys":[]}
	ksUnusable        // 200, a set holding only an HMAC key
)

var ksFaults = map[string]ksMode{"500": ksDown, "garbage": ksGarbage, "empty set": ksEmpty, "unusable set": ksUnusable}

// ksServer serves an IdP's real JWKS over HTTP, or misbehaves, and counts
// every request.
type ksServer struct {
	*httptest.Server
	idp   *testidp.Issuer
	mode  atomic.Int32
	delay atomic.Int64 // nanoseconds before answering
	hits  atomic.Int64
}

func newKSServer(t *testing.T, idp *testidp.Issuer) *ksServer {
	s := &ksServer{idp: idp}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.hits.Add(1)
		if d := time.Duration(s.delay.Load()); d > 0 {
			time.Sleep(d)
		}
		w.Header().Set("Content-Type", "application/json")
		switch ksMode(s.mode.Load()) {
		case ksDown:
			http.Error(w, "boom", http.StatusInternalServerError)
		case ksGarbage:
			_, _ = io.WriteString(w, "<html>502 Bad Gateway</html>")
		case ksEmpty:
			_, _ = io.WriteString(w, `{"keys":[]}`)
		case ksUnusable:
			_, _ = io.WriteString(w, `{"keys":[{"kty":"oct","kid":"h","k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}]}`)
		default:
			_, _ = w.Write(idp.JWKS())
		}
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *ksServer) set(m ksMode) { s.mode.Store(int32(m)) }

// testClock is a settable clock.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *testClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *testClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// ksToken is a fresh token of idp under kid, valid for two hours (so a
// clock moved past a max stale time does not expire it).
func ksToken(t *testing.T, idp *testidp.Issuer, kid string) string {
	t.Helper()
	var b [8]byte
	_, _ = rand.Read(b[:])
	return idp.Token(kid, claims{"jti": hex.EncodeToString(b[:]), "exp": time.Now().Add(2 * time.Hour).Unix()})
}

// ksUnknownKid is a well-formed token of idp under a kid nobody publishes:
// presenting it forces a refetch (when the throttle allows).
func ksUnknownKid(idp *testidp.Issuer) string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return rawToken(map[string]any{"alg": "ES256", "kid": hex.EncodeToString(b[:])},
		map[string]any{"iss": idp.Iss, "sub": "x", "aud": "https://gateway.test", "exp": time.Now().Add(time.Hour).Unix()},
		func([]byte) []byte { return make([]byte, 64) })
}

func ksEngine(t *testing.T, ts *TrustStore) (*Engine, *Grant) {
	t.Helper()
	key, err := GenerateSigningKey("ES256")
	if err != nil {
		t.Fatal(err)
	}
	signer, err := NewSigner(key, "ES256")
	if err != nil {
		t.Fatal(err)
	}
	e, err := NewEngine(EngineConfig{Issuer: "https://gateway.test"}, ts, signer)
	if err != nil {
		t.Fatal(err)
	}
	grant := &Grant{Audiences: []string{"https://orders.internal"}}
	if err := grant.Validate(); err != nil {
		t.Fatal(err)
	}
	return e, grant
}

func wantKind(t *testing.T, err error, kind Kind, reason string) {
	t.Helper()
	if err == nil {
		t.Fatalf("accepted, want %s", reason)
	}
	if e := AsError(err); e.Kind != kind || e.Reason != reason {
		t.Fatalf("got %v (kind %d), want kind %d reason %s", err, e.Kind, kind, reason)
	}
}

// A key the issuer withdraws is refused as soon as a refreshed set without
// it arrives, and the exchange cached for a token it verified is no longer
// served.
func TestKeySourceWithdrawnKeyRefusedAtOnce(t *testing.T) {
	idp := newTestIssuer(t, "https://idp.test")
	idp.AddKey("a", "ES256")
	idp.AddKey("b", "ES256")
	cfg := issuerConfig(idp, "ES256")
	cfg.RefetchInterval = time.Millisecond
	ts := newTestTrust(t, cfg)
	e, grant := ksEngine(t, ts)
	ctx := context.Background()

	tok := ksToken(t, idp, "a")
	if _, err := e.ExchangeBearer(ctx, tok, grant, nil); err != nil {
		t.Fatal(err)
	}
	if m, err := e.ExchangeBearer(ctx, tok, grant, nil); err != nil || !m.Cached {
		t.Fatalf("want a cache hit: %v", err)
	}

	idp.Withdraw("a")
	time.Sleep(2 * time.Millisecond)
	// Any unknown kid makes us look at the issuer's current set.
	_, _ = ts.Verify(ctx, ksUnknownKid(idp), VerifyOptions{})

	_, err := e.ExchangeBearer(ctx, tok, grant, nil)
	wantKind(t, err, KindInvalidToken, "unknown_key")
	_, err = ts.Verify(ctx, ksToken(t, idp, "a"), VerifyOptions{})
	wantKind(t, err, KindInvalidToken, "unknown_key")
	if _, err := ts.Verify(ctx, ksToken(t, idp, "b"), VerifyOptions{}); err != nil {
		t.Fatalf("the key still published: %v", err)
	}
}

// A key replaced under the same kid: the cached exchange verified under the
// old material is not served, though the kid is still published.
func TestKeySourceSameKidNewMaterialDropsCache(t *testing.T) {
	idp := newTestIssuer(t, "https://idp.test")
	idp.AddKey("k", "ES256")
	cfg := issuerConfig(idp, "ES256")
	cfg.RefetchInterval = time.Millisecond
	ts := newTestTrust(t, cfg)
	e, grant := ksEngine(t, ts)
	ctx := context.Background()

	tok := ksToken(t, idp, "k")
	first, err := e.ExchangeBearer(ctx, tok, grant, nil)
	if err != nil {
		t.Fatal(err)
	}
	s, err := ts.Verify(ctx, tok, VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if s.KeyThumbprint == "" || s.KeyID != "k" {
		t.Fatalf("subject verified by kid %q thumbprint %q", s.KeyID, s.KeyThumbprint)
	}

	// The issuer replaces the key material but keeps the kid.
	idp.Withdraw("k")
	idp.AddKey("k", "ES256")
	time.Sleep(2 * time.Millisecond)
	_, _ = ts.Verify(ctx, ksUnknownKid(idp), VerifyOptions{})

	m, err := e.ExchangeBearer(ctx, tok, grant, nil)
	if err == nil && m.Token == first.Token {
		t.Fatal("the exchange cached under the replaced key was served")
	}
	wantKind(t, err, KindInvalidToken, "bad_signature")
	// Tokens of the new material verify, under another thumbprint.
	s2, err := ts.Verify(ctx, ksToken(t, idp, "k"), VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if s2.KeyThumbprint == s.KeyThumbprint {
		t.Fatal("old and new key material share a thumbprint")
	}
}

// A refresh that fails (HTTP 500, garbage, an empty or unusable set) keeps
// the last good keys, for jwks_max_stale after they were fetched; then they
// are dropped and the issuer's tokens are refused as unavailable (and no
// cached exchange is served), until good keys arrive again.
func TestKeySourceFaultKeepsKeysUntilMaxStale(t *testing.T) {
	for name, mode := range ksFaults {
		t.Run(name, func(t *testing.T) {
			idp := newTestIssuer(t, "https://idp.test")
			idp.AddKey("k", "ES256")
			srv := newKSServer(t, idp)
			clock := &testClock{t: time.Now()}
			cfg := issuerConfig(idp, "ES256")
			cfg.JWKSURL = srv.URL + "/jwks.json"
			cfg.RefetchInterval = time.Second
			cfg.JWKSMaxStale = 10 * time.Minute
			var fetchErrs atomic.Int64
			ts := newTestTrustWith(t, TrustConfig{Issuers: []IssuerConfig{cfg}, Now: clock.now,
				OnFetch: func(_ string, err error) {
					if err != nil {
						fetchErrs.Add(1)
					}
				}})
			e, grant := ksEngine(t, ts)
			ctx := context.Background()

			cached := ksToken(t, idp, "k")
			if _, err := e.ExchangeBearer(ctx, cached, grant, nil); err != nil {
				t.Fatalf("healthy JWKS: %v", err)
			}

			// The JWKS turns bad; an unknown kid forces a refresh against it.
			srv.set(mode)
			clock.advance(2 * time.Second)
			hits := srv.hits.Load()
			_, err := ts.Verify(ctx, ksUnknownKid(idp), VerifyOptions{})
			wantKind(t, err, KindInvalidToken, "unknown_key")
			if srv.hits.Load() == hits || fetchErrs.Load() == 0 {
				t.Fatal("no failed refresh happened")
			}
			// Within jwks_max_stale the last good keys stay.
			clock.advance(9 * time.Minute)
			if _, err := ts.Verify(ctx, ksToken(t, idp, "k"), VerifyOptions{}); err != nil {
				t.Fatalf("within jwks_max_stale after a %s refresh: %v", name, err)
			}
			if m, err := e.ExchangeBearer(ctx, cached, grant, nil); err != nil || !m.Cached {
				t.Fatalf("within jwks_max_stale the cached exchange should be served: %v", err)
			}

			// Past it, the keys are dropped: fail closed, as unavailable.
			clock.advance(time.Minute + time.Second)
			_, err = ts.Verify(ctx, ksToken(t, idp, "k"), VerifyOptions{})
			wantKind(t, err, KindUnavailable, "keys_unavailable")
			if e := AsError(err); e.RetryAfter != time.Second {
				t.Errorf("RetryAfter %v, want the refetch interval", e.RetryAfter)
			}
			_, err = e.ExchangeBearer(ctx, cached, grant, nil)
			wantKind(t, err, KindUnavailable, "keys_unavailable")

			// Good keys again: accepted at the next forced refetch.
			srv.set(ksOK)
			clock.advance(2 * time.Second)
			if _, err := ts.Verify(ctx, ksToken(t, idp, "k"), VerifyOptions{}); err != nil {
				t.Fatalf("after recovery: %v", err)
			}
		})
	}
}

// The same rule holds for a private_key_jwt client's jwks_url.
func TestKeySourceClientFaultUntilMaxStale(t *testing.T) {
	key := newES256(t, "a", true)
	srv := newJWKSServer(t, publicJWKS(t, key))
	clock := &testClock{t: time.Now().Truncate(time.Second)}
	c, err := NewClients(context.Background(), []ClientConfig{{ClientID: "svc", JWKSURL: srv.URL, JWKSMaxStale: time.Minute}},
		ClientOptions{TokenEndpointURLs: []string{testEndpoint}, Now: clock.now, RefetchInterval: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	if _, err := c.Authenticate(ctx, jwtCred(signAssertion(t, key, "svc", clock.now(), nil))); err != nil {
		t.Fatal(err)
	}
	srv.doc.Store(ptr([]byte(`{"keys":[]}`)))
	clock.advance(2 * time.Second)
	rogue := newES256(t, "rogue", true)
	_, err = c.Authenticate(ctx, jwtCred(signAssertion(t, rogue, "svc", clock.now(), nil)))
	wantAuthError(t, err, KindInvalidClient, "unknown_key")
	if _, err := c.Authenticate(ctx, jwtCred(signAssertion(t, key, "svc", clock.now(), nil))); err != nil {
		t.Fatalf("an empty set at refresh, within jwks_max_stale: %v", err)
	}
	clock.advance(time.Minute)
	_, err = c.Authenticate(ctx, jwtCred(signAssertion(t, key, "svc", clock.now(), nil)))
	wantAuthError(t, err, KindUnavailable, "keys_unavailable")
}

// Issuers (a multi-tenant IdP) and clients naming one jwks_url share one
// source: they load, verify, and fetch it once.
func TestKeySourceSharedURL(t *testing.T) {
	idp := newTestIssuer(t, "https://idp.test")
	idp.AddKey("k", "ES256")
	first := issuerConfig(idp, "ES256")
	second := first
	second.Issuer = "https://tenant-2.idp.test"
	pool := newLocalKeySourcePool()
	ctx := context.Background()
	ts, err := NewTrustStore(ctx, TrustConfig{Issuers: []IssuerConfig{first, second}, KeySources: pool})
	if err != nil {
		t.Fatalf("two issuers on one jwks_url: %v", err)
	}
	defer ts.Close()
	for _, iss := range []string{first.Issuer, second.Issuer} {
		tok := idp.Token("k", claims{"iss": iss})
		if _, err := ts.Verify(ctx, tok, VerifyOptions{}); err != nil {
			t.Fatalf("%s: %v", iss, err)
		}
	}
	if ts.issuers[first.Issuer].keys.src != ts.issuers[second.Issuer].keys.src {
		t.Fatal("two sources for one URL")
	}
	c, err := NewClients(ctx, []ClientConfig{{ClientID: "svc", JWKSURL: idp.JWKSURL()}},
		ClientOptions{TokenEndpointURLs: []string{testEndpoint}, KeySources: pool})
	if err != nil {
		t.Fatal(err)
	}
	if c.clients["svc"].keys.src != ts.issuers[first.Issuer].keys.src {
		t.Fatal("the client does not share the issuers' source")
	}
	if n := idp.Fetches.Load(); n != 1 {
		t.Errorf("%d fetches of one URL, want 1", n)
	}
	// The source outlives any one of its users.
	_ = c.Close()
	if _, err := ts.Verify(ctx, idp.Token("k", nil), VerifyOptions{}); err != nil {
		t.Fatalf("after the clients closed: %v", err)
	}
	_ = ts.Close()
	if len(pool.m) != 0 {
		t.Fatal("the source outlived its last user")
	}
}

// A refetch forced by a request is not cancelled when that request goes
// away: it completes, succeeds, and serves the next request.
func TestKeySourceRefetchSurvivesCancelledRequest(t *testing.T) {
	var mu sync.Mutex
	var results []error
	idp, srv, ts := refetchFixture(t, "old", func(c *TrustConfig) {
		c.FetchTimeout = 5 * time.Second
		c.OnFetch = func(_ string, err error) { mu.Lock(); results = append(results, err); mu.Unlock() }
	})
	ctx := context.Background()
	mu.Lock()
	results = nil
	mu.Unlock()
	forced := ts.JWKSFetches(idp.Iss)

	idp.AddKey("new", "ES256")
	srv.delay.Store(int64(300 * time.Millisecond))
	rctx, cancel := context.WithCancel(ctx)
	time.AfterFunc(30*time.Millisecond, cancel) // the client hangs up mid-fetch
	start := time.Now()
	_, err := ts.Verify(rctx, idp.Token("new", nil), VerifyOptions{})
	if err == nil {
		t.Fatal("verified before the fetch could have completed")
	}
	if d := time.Since(start); d > 250*time.Millisecond {
		t.Errorf("a request that went away waited %v for the fetch", d)
	}
	// The fetch runs to its end and succeeds.
	deadline := time.Now().Add(3 * time.Second)
	for {
		mu.Lock()
		n := len(results)
		mu.Unlock()
		if n > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	got := append([]error(nil), results...)
	mu.Unlock()
	if len(got) != 1 || got[0] != nil {
		t.Fatalf("fetch results %v, want one success", got)
	}
	srv.delay.Store(0)
	if _, err := ts.Verify(ctx, idp.Token("new", nil), VerifyOptions{}); err != nil {
		t.Fatalf("the key of the completed refetch: %v", err)
	}
	if n := ts.JWKSFetches(idp.Iss) - forced; n != 1 {
		t.Errorf("%d forced fetches, want 1", n)
	}
}

// A request already gone forces no fetch, and so does not use up the
// throttle window: the next request with the new kid gets its refetch.
func TestKeySourceNoFetchKeepsThrottleWindow(t *testing.T) {
	idp, srv, ts := refetchFixture(t, "old", nil)
	ctx := context.Background()
	forced := ts.JWKSFetches(idp.Iss)

	idp.AddKey("new", "ES256")
	tok := idp.Token("new", nil)
	gone, cancel := context.WithCancel(ctx)
	cancel()
	hits := srv.hits.Load()
	if _, err := ts.Verify(gone, tok, VerifyOptions{}); err == nil {
		t.Fatal("verified without a fetch")
	}
	if srv.hits.Load() != hits || ts.JWKSFetches(idp.Iss) != forced {
		t.Fatal("a request already gone forced a fetch")
	}
	if _, err := ts.Verify(ctx, tok, VerifyOptions{}); err != nil {
		t.Fatalf("the refetch window was used up without a fetch: %v", err)
	}
	if n := ts.JWKSFetches(idp.Iss) - forced; n != 1 {
		t.Errorf("%d forced fetches, want 1", n)
	}
}

// A flood of concurrent random kids while a slow fetch is in flight costs
// one fetch: every caller waits for the one in flight.
func TestKeySourceConcurrentUnknownKidsOneFetch(t *testing.T) {
	idp, srv, ts := refetchFixture(t, "k", nil)
	ctx := context.Background()
	srv.delay.Store(int64(100 * time.Millisecond))
	hits := srv.hits.Load()
	var wg sync.WaitGroup
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := ts.Verify(ctx, ksUnknownKid(idp), VerifyOptions{}); err == nil {
				t.Error("random kid accepted")
			}
		}()
	}
	wg.Wait()
	if n := srv.hits.Load() - hits; n != 1 {
		t.Errorf("%d fetches for 50 concurrent random kids, want 1", n)
	}
}

// refetchFixture is an issuer whose JWKS is served over HTTP with a short
// refetch interval (400ms): its key kid already fetched, and the refetch
// window of that first fetch already past. tune adjusts the trust config.
func refetchFixture(t *testing.T, kid string, tune func(*TrustConfig)) (*testidp.Issuer, *ksServer, *TrustStore) {
	t.Helper()
	idp := newTestIssuer(t, "https://idp.test")
	idp.AddKey(kid, "ES256")
	srv := newKSServer(t, idp)
	cfg := issuerConfig(idp, "ES256")
	cfg.JWKSURL = srv.URL
	cfg.RefetchInterval = 400 * time.Millisecond
	tc := TrustConfig{Issuers: []IssuerConfig{cfg}}
	if tune != nil {
		tune(&tc)
	}
	ts := newTestTrustWith(t, tc)
	if _, err := ts.Verify(context.Background(), idp.Token(kid, nil), VerifyOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond) // out of any refetch window
	return idp, srv, ts
}

// A JWKS larger than 1 MiB is a fault, not a set.
func TestKeySourceBodyLimit(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, `{"x":"`+strings.Repeat("A", DefaultMaxJWKSBodySize)+`","keys":[]}`)
	}))
	defer srv.Close()
	s, err := NewKeySource(KeySourceConfig{URL: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	deadline := time.Now().Add(3 * time.Second)
	for s.state.Load() == nil && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	st := s.state.Load()
	if st == nil || st.err == nil || !strings.Contains(st.err.Error(), "exceeds") || st.idx != nil {
		t.Fatalf("state %+v, want a fault for the oversized body", st)
	}
}

func TestKeySourceConfigErrors(t *testing.T) {
	base := IssuerConfig{Issuer: "https://idp.test", Audiences: []string{"a"}, Algorithms: []string{"ES256"}}
	for name, mutate := range map[string]func(*IssuerConfig){
		"relative jwks_url":       func(c *IssuerConfig) { c.JWKSURL = "/jwks.json" },
		"ftp jwks_url":            func(c *IssuerConfig) { c.JWKSURL = "ftp://idp.test/jwks" },
		"negative jwks_max_stale": func(c *IssuerConfig) { c.JWKSURL = "https://idp.test/jwks"; c.JWKSMaxStale = -time.Second },
	} {
		c := base
		mutate(&c)
		if ts, err := NewTrustStore(context.Background(), TrustConfig{Issuers: []IssuerConfig{c}}); err == nil {
			_ = ts.Close()
			t.Errorf("%s: accepted", name)
		}
	}
}
