package exchange

import (
	"context"
	"crypto"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lestrrat-go/httpcc"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"go.uber.org/zap"
)

// DefaultJWKSMaxStale is how long the last good keys of a jwks_url stay in
// use while its refreshes fail, counted from when they were last fetched.
const DefaultJWKSMaxStale = time.Hour

// minFaultRefresh is the least background retry interval after a fault,
// however small jwks_max_stale is.
const minFaultRefresh = time.Second

// errNoUsableKey: a JWKS that parsed but holds no key we can verify with.
var errNoUsableKey = errors.New("the JWKS holds no usable public signing key (RSA >= 2048 bits, EC P-256/384/521 or Ed25519)")

// KeySource is one JWK Set of public verification keys, shared by every
// trusted issuer and private_key_jwt client that names its URL: fetched from
// a jwks_url (refreshed in the background, refetched on demand when a kid is
// unknown) or read once from a jwks_file.
//
// A fetched set that is well-formed and holds at least one usable key
// replaces the keys at once: a key the publisher withdrew is gone. Anything
// else (an HTTP or network error, an unparsable or oversized body, a set
// without a usable key) is a fault: the last good keys stay, for at most
// each user's max stale time after they were fetched, then they are
// dropped and verification fails closed.
//
// Reading the current keys is one atomic load. A KeySource lives until
// Close; share one per URL through a KeySourcePool.
type KeySource struct {
	url string
	// discovery, when set, makes every fetch read the issuer's metadata
	// first and take the JWKS from its jwks_uri.
	discovery *discoveryConfig
	// meta is the last metadata document that passed the checks.
	meta       atomic.Pointer[ProviderMetadata]
	client     *http.Client
	timeout    time.Duration
	now        func() time.Time
	minRefresh time.Duration
	maxRefresh time.Duration

	state atomic.Pointer[keyState]
	// forced counts the fetches forced by unknown kids.
	forced atomic.Int64

	mu         sync.Mutex
	inflight   *keyFetch
	lastForced time.Time
	users      map[*keyUser]struct{}
	closed     bool

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	start  sync.Once
}

// keyState is an immutable snapshot of a source's keys.
type keyState struct {
	// idx is the last good set (nil: none yet).
	idx *keyIndex
	// goodAt is when idx was fetched.
	goodAt time.Time
	// faultAt is when the first fetch failed since goodAt (zero: healthy).
	faultAt time.Time
	err     error
}

// keyFetch is one fetch in flight; done is closed when it is over.
type keyFetch struct {
	done chan struct{}
	next time.Duration
}

// KeySourceConfig configures a KeySource for a URL.
type KeySourceConfig struct {
	URL string
	// Discovery, when set instead of URL, names the issuer whose metadata
	// (OIDC Discovery / RFC 8414) gives the JWKS URL on every fetch.
	Discovery *DiscoveryConfig
	// FetchTimeout bounds one fetch (default DefaultFetchTimeout).
	FetchTimeout time.Duration
	// HTTPClient fetches the set (default: a plain client; FetchTimeout
	// bounds every fetch anyway).
	HTTPClient *http.Client
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Deferred leaves the source idle until Start: a host that provisions
	// configurations it may never run (caddy validate, adapt) fetches
	// nothing until the configuration starts. A lookup before Start still
	// forces a fetch.
	Deferred bool
}

// keySourceKey names a URL source in a KeySourcePool: the URL and the fetch
// settings, so a changed fetch timeout gets a source of its own.
func keySourceKey(cfg KeySourceConfig) string {
	if d := cfg.Discovery; d != nil {
		return fmt.Sprintf("%s discovery %s %s", cfg.FetchTimeout, d.Issuer, strings.Join(d.URLs, " "))
	}
	return fmt.Sprintf("%s %s", cfg.FetchTimeout, cfg.URL)
}

// KeySourcePool shares running KeySources by key (URL and fetch settings)
// between trust stores, client registries and successive configurations,
// so that a source keeps its keys and its refresher across a reload.
type KeySourcePool interface {
	// Acquire returns the source stored under key, or stores and returns
	// the one newSource makes. Each successful Acquire is matched by one
	// Release; the last Release closes the source.
	Acquire(key string, newSource func() (*KeySource, error)) (*KeySource, error)
	Release(key string) error
}

// localKeySourcePool is the pool of one TrustStore or Clients when the
// caller provides none: it still shares one source per URL among them.
type localKeySourcePool struct {
	mu sync.Mutex
	m  map[string]*pooledSource
}

type pooledSource struct {
	src  *KeySource
	refs int
}

func newLocalKeySourcePool() *localKeySourcePool {
	return &localKeySourcePool{m: map[string]*pooledSource{}}
}

func (p *localKeySourcePool) Acquire(key string, newSource func() (*KeySource, error)) (*KeySource, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ps, ok := p.m[key]; ok {
		ps.refs++
		return ps.src, nil
	}
	src, err := newSource()
	if err != nil {
		return nil, err
	}
	p.m[key] = &pooledSource{src: src, refs: 1}
	return src, nil
}

func (p *localKeySourcePool) Release(key string) error {
	p.mu.Lock()
	ps, ok := p.m[key]
	if ok {
		ps.refs--
		if ps.refs > 0 {
			ok = false
		} else {
			delete(p.m, key)
		}
	}
	p.mu.Unlock()
	if ok {
		return ps.src.Close()
	}
	return nil
}

// CheckJWKSURL tells whether u can be a jwks_url: an absolute http(s) URL.
func CheckJWKSURL(u string) error {
	p, err := url.Parse(u)
	if err != nil || (p.Scheme != "https" && p.Scheme != "http") || p.Host == "" {
		return errors.New("jwks_url must be an absolute http(s) URL")
	}
	return nil
}

// NewKeySource validates cfg and starts fetching the set in the background;
// it does not wait for the first fetch. Stop it with Close.
func NewKeySource(cfg KeySourceConfig) (*KeySource, error) {
	var disc *discoveryConfig
	if cfg.Discovery != nil {
		d, err := newDiscoveryConfig(*cfg.Discovery)
		if err != nil {
			return nil, err
		}
		disc = d
	} else if err := CheckJWKSURL(cfg.URL); err != nil {
		return nil, err
	}
	s := &KeySource{
		discovery:  disc,
		url:        cfg.URL,
		client:     cfg.HTTPClient,
		timeout:    cfg.FetchTimeout,
		now:        cfg.Now,
		minRefresh: defaultJWKSMinRefresh,
		maxRefresh: defaultJWKSMaxRefresh,
		users:      map[*keyUser]struct{}{},
	}
	if s.client == nil {
		s.client = &http.Client{}
	}
	if s.timeout <= 0 {
		s.timeout = DefaultFetchTimeout
	}
	if s.now == nil {
		s.now = time.Now
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if !cfg.Deferred {
		s.Start()
	}
	return s, nil
}

// Start begins the background refresh (once; later calls do nothing). The
// first fetch is in flight before anyone can look: a request arriving now
// waits for it rather than forcing a fetch of its own.
func (s *KeySource) Start() {
	if s.url == "" && s.discovery == nil {
		return // a file
	}
	s.start.Do(func() {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return
		}
		first := s.startFetchLocked(context.Background(), false)
		s.mu.Unlock()
		s.wg.Add(1)
		go s.run(first)
	})
}

// newFileKeySource reads a jwks_file once. It must hold a usable key.
func newFileKeySource(path string) (*KeySource, error) {
	set, err := jwk.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading jwks_file: %w (check the path: a relative path is resolved against the directory Caddy runs in)", err)
	}
	idx := indexKeySet(set)
	if len(idx.keys) == 0 {
		return nil, fmt.Errorf("jwks_file: %w", errNoUsableKey)
	}
	s := &KeySource{now: time.Now}
	s.state.Store(&keyState{idx: idx})
	return s, nil
}

// Close stops the refresher and waits for fetches in flight.
func (s *KeySource) Close() error {
	if s.cancel == nil {
		return nil
	}
	s.cancel()
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

// URL is the source's jwks_url ("" for a file, or before discovery found one).
func (s *KeySource) URL() string { return s.currentJWKSURL() }

// currentJWKSURL is the configured jwks_url, or the jwks_uri of the last
// good metadata document.
func (s *KeySource) currentJWKSURL() string {
	if s.discovery != nil {
		if md := s.meta.Load(); md != nil {
			return md.JWKSURI
		}
		return ""
	}
	return s.url
}

// run refreshes the set in the background until Close, starting with the
// fetch f in flight.
func (s *KeySource) run(f *keyFetch) {
	defer s.wg.Done()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-f.done:
		}
		timer := time.NewTimer(s.capInterval(f.next))
		select {
		case <-s.ctx.Done():
			timer.Stop()
			return
		case <-timer.C:
		}
		s.mu.Lock()
		if f = s.inflight; f == nil {
			f = s.startFetchLocked(context.Background(), false)
		}
		s.mu.Unlock()
	}
}

// capInterval keeps the next background fetch within half the least max
// stale time of the source's users, so a fault is retried before their
// last good keys run out.
func (s *KeySource) capInterval(next time.Duration) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	for u := range s.users {
		if half := u.maxStale / 2; next > half {
			next = max(half, minFaultRefresh)
		}
	}
	return next
}

// startFetchLocked starts a fetch in its own goroutine (s.mu held). forced
// fetches (on an unknown kid) count and open a new throttle window. The
// fetch is bound to the source's life and FetchTimeout, never to the
// request that caused it: ctx only lends its values.
func (s *KeySource) startFetchLocked(ctx context.Context, forced bool) *keyFetch {
	f := &keyFetch{done: make(chan struct{})}
	if s.closed {
		close(f.done)
		return f
	}
	s.inflight = f
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		start := s.now()
		attempted, next := s.fetch(context.WithoutCancel(ctx))
		f.next = next
		s.mu.Lock()
		s.inflight = nil
		if forced && attempted {
			// Only a fetch that happened consumes the throttle window.
			s.lastForced = start
			s.forced.Add(1)
		}
		s.mu.Unlock()
		close(f.done)
	}()
	return f
}

// fetch gets the set once and installs it, or records the fault. It reports
// whether a request was made, and when the next background fetch is due.
func (s *KeySource) fetch(ctx context.Context) (attempted bool, next time.Duration) {
	if s.ctx.Err() != nil {
		return false, 0
	}
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	stop := context.AfterFunc(s.ctx, cancel)
	defer stop()

	jwksURL := s.url
	var err error
	if s.discovery != nil {
		var md *ProviderMetadata
		if md, err = s.discover(ctx); err == nil {
			jwksURL = md.JWKSURI
		}
	}
	var maxAge time.Duration
	var idx *keyIndex
	if err == nil {
		var set jwk.Set
		if set, maxAge, err = s.get(ctx, jwksURL); err == nil {
			if idx = indexKeySet(set); len(idx.keys) == 0 {
				err = errNoUsableKey
			}
		}
		s.count(err)
	}
	now := s.now()
	if err != nil {
		st := &keyState{}
		if prev := s.state.Load(); prev != nil {
			*st = *prev
		}
		if st.faultAt.IsZero() {
			st.faultAt = now
		}
		st.err = err
		s.state.Store(st)
		s.report(st, err)
		return true, s.minRefresh
	}
	st := &keyState{idx: idx, goodAt: now}
	s.state.Store(st)
	switch {
	case maxAge <= 0:
		return true, s.minRefresh
	case maxAge < s.minRefresh:
		return true, s.minRefresh
	case maxAge > s.maxRefresh:
		return true, s.maxRefresh
	}
	return true, maxAge
}

// get fetches and parses the set (at most DefaultMaxJWKSBodySize bytes) and
// returns it with the max-age of its Cache-Control.
func (s *KeySource) get(ctx context.Context, jwksURL string) (jwk.Set, time.Duration, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, jwksURL, nil)
	if err != nil {
		return nil, 0, err
	}
	req.Header.Set("Accept", "application/jwk-set+json, application/json")
	resp, err := s.client.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, 0, fmt.Errorf("HTTP status %d", resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, DefaultMaxJWKSBodySize+1))
	if err != nil {
		return nil, 0, fmt.Errorf("reading the body: %w", err)
	}
	if len(body) > DefaultMaxJWKSBodySize {
		return nil, 0, fmt.Errorf("the body exceeds %d bytes", DefaultMaxJWKSBodySize)
	}
	set, err := jwk.Parse(body)
	if err != nil {
		return nil, 0, fmt.Errorf("parsing the JWKS: %w", err)
	}
	var maxAge time.Duration
	if cc := resp.Header.Get("Cache-Control"); cc != "" {
		if dir, err := httpcc.ParseResponse(cc); err == nil {
			if v, ok := dir.MaxAge(); ok {
				maxAge = time.Duration(v) * time.Second
			}
		}
	}
	return set, maxAge, nil
}

// usersNow is a snapshot of the source's users, taken under its lock so
// that they are called without it.
func (s *KeySource) usersNow() []*keyUser {
	s.mu.Lock()
	defer s.mu.Unlock()
	users := make([]*keyUser, 0, len(s.users))
	for u := range s.users {
		users = append(users, u)
	}
	return users
}

// report logs a failed fetch loudly to every user of the source, with how
// long the last good keys last.
func (s *KeySource) report(st *keyState, err error) {
	for _, u := range s.usersNow() {
		fields := []zap.Field{u.field, zap.String("jwks_url", s.currentJWKSURL()), zap.Error(err)}
		if s.discovery != nil {
			fields = append(fields, zap.Strings("discovery_urls", s.discovery.urls))
		}
		if st.idx == nil {
			u.logger.Error("JWKS fetch failed and no good keys are known: tokens are refused until they arrive", fields...)
			continue
		}
		until := st.goodAt.Add(u.maxStale)
		u.logger.Warn("JWKS fetch failed; keeping the last good keys for at most jwks_max_stale",
			append(fields, zap.Time("last_good_fetch", st.goodAt), zap.Time("keys_dropped_at", until))...)
	}
}

// count tells every user's metrics of one HTTP request the source made (a
// JWKS or a metadata fetch) and how it went.
func (s *KeySource) count(err error) {
	for _, u := range s.usersNow() {
		if u.onFetch != nil {
			u.onFetch(u.name, err)
		}
	}
}

// keyUser is one trusted issuer's or client's view of a KeySource: its own
// max stale time, refetch interval, logger and metrics.
type keyUser struct {
	src             *KeySource
	name            string
	field           zap.Field
	maxStale        time.Duration
	refetchInterval time.Duration
	logger          *zap.Logger
	onFetch         func(name string, err error)
	// droppedLogged is the goodAt (UnixNano) of the set whose drop was logged.
	droppedLogged atomic.Int64
}

// subscribe makes u a user of its source: told of fetches from now on.
func (u *keyUser) subscribe() {
	u.src.mu.Lock()
	u.src.users[u] = struct{}{}
	u.src.mu.Unlock()
}

func (u *keyUser) unsubscribe() {
	u.src.mu.Lock()
	delete(u.src.users, u)
	u.src.mu.Unlock()
}

// keyStatus is the outcome of a key lookup.
type keyStatus int

const (
	keyFound keyStatus = iota
	// keyUnknown: the source's keys are current, none fits.
	keyUnknown
	// keysUnavailable: no keys (never fetched, or dropped after max stale).
	keysUnavailable
)

// current returns the keys u may verify with: nil when none were ever
// fetched, or when refreshes have failed for longer than u's max stale time
// since the last good set.
func (u *keyUser) current() *keyIndex {
	st := u.src.state.Load()
	if st == nil || st.idx == nil {
		return nil
	}
	if !st.faultAt.IsZero() && u.src.now().Sub(st.goodAt) > u.maxStale {
		if good := st.goodAt.UnixNano(); u.droppedLogged.Swap(good) != good {
			u.logger.Error("JWKS unavailable past jwks_max_stale: the last good keys are dropped and tokens refused",
				u.field, zap.String("jwks_url", u.src.currentJWKSURL()), zap.Time("last_good_fetch", st.goodAt),
				zap.Duration("jwks_max_stale", u.maxStale), zap.NamedError("last_error", st.err))
		}
		return nil
	}
	return st.idx
}

// keyFor returns the key for kid and alg, refetching the set (throttled)
// when none fits.
func (u *keyUser) keyFor(ctx context.Context, kid, alg string) (verifyKey, keyStatus) {
	if k, ok := u.current().find(kid, alg); ok {
		return k, keyFound
	}
	if u.src.url != "" || u.src.discovery != nil {
		u.refetch(ctx)
	}
	idx := u.current()
	if idx == nil {
		return verifyKey{}, keysUnavailable
	}
	if k, ok := idx.find(kid, alg); ok {
		return k, keyFound
	}
	return verifyKey{}, keyUnknown
}

// refetch forces one fetch unless one was forced within u's refetch
// interval; a caller finding a fetch in flight waits for it. A caller that
// is gone fetches nothing; one that leaves while it waits leaves the fetch
// running to its end.
func (u *keyUser) refetch(ctx context.Context) {
	if ctx.Err() != nil {
		return
	}
	s := u.src
	s.mu.Lock()
	f := s.inflight
	if f == nil {
		if !s.lastForced.IsZero() && s.now().Sub(s.lastForced) < u.refetchInterval {
			s.mu.Unlock()
			return
		}
		f = s.startFetchLocked(ctx, true)
	}
	s.mu.Unlock()
	select {
	case <-f.done:
	case <-ctx.Done():
	}
}

// hasThumbprint tells whether u's current keys include the key with the
// RFC 7638 thumbprint tp.
func (u *keyUser) hasThumbprint(tp string) bool {
	idx := u.current()
	if idx == nil || tp == "" {
		return false
	}
	for _, k := range idx.keys {
		if k.thumbprint == tp {
			return true
		}
	}
	return false
}

// thumbprint is the base64url RFC 7638 SHA-256 thumbprint of k.
func thumbprint(k jwk.Key) (string, error) {
	tp, err := k.Thumbprint(crypto.SHA256)
	if err != nil {
		return "", err
	}
	return base64.RawURLEncoding.EncodeToString(tp), nil
}

// keySources are the key sources one TrustStore or Clients uses, acquired
// from a pool and released at close.
type keySources struct {
	pool  KeySourcePool
	base  KeySourceConfig
	mu    sync.Mutex
	held  []string
	users []*keyUser
}

type keyUserConfig struct {
	url, file       string
	discovery       *DiscoveryConfig
	name            string
	field           zap.Field
	maxStale        time.Duration
	refetchInterval time.Duration
	logger          *zap.Logger
	onFetch         func(name string, err error)
}

func newKeySources(pool KeySourcePool, base KeySourceConfig) *keySources {
	if pool == nil {
		pool = newLocalKeySourcePool()
	}
	return &keySources{pool: pool, base: base}
}

// user returns a view of the source for cfg.url (shared through the pool)
// or of cfg.file (read now).
func (ks *keySources) user(cfg keyUserConfig) (*keyUser, error) {
	if cfg.maxStale < 0 {
		return nil, errors.New("jwks_max_stale must not be negative")
	}
	u := &keyUser{name: cfg.name, field: cfg.field, maxStale: cfg.maxStale, refetchInterval: cfg.refetchInterval,
		logger: cfg.logger, onFetch: cfg.onFetch}
	if u.maxStale == 0 {
		u.maxStale = DefaultJWKSMaxStale
	}
	if u.refetchInterval <= 0 {
		u.refetchInterval = DefaultRefetchInterval
	}
	if u.logger == nil {
		u.logger = zap.NewNop()
	}
	if cfg.file != "" {
		src, err := newFileKeySource(cfg.file)
		if err != nil {
			return nil, err
		}
		u.src = src
		return u, nil
	}
	sc := ks.base
	if cfg.discovery != nil {
		sc.Discovery = cfg.discovery
	} else {
		if err := CheckJWKSURL(cfg.url); err != nil {
			return nil, err
		}
		sc.URL = cfg.url
	}
	if sc.FetchTimeout <= 0 {
		sc.FetchTimeout = DefaultFetchTimeout
	}
	key := keySourceKey(sc)
	src, err := ks.pool.Acquire(key, func() (*KeySource, error) { return NewKeySource(sc) })
	if err != nil {
		if cfg.discovery != nil {
			return nil, fmt.Errorf("discovery: %w", err)
		}
		return nil, fmt.Errorf("jwks_url: %w", err)
	}
	u.src = src
	u.subscribe()
	ks.mu.Lock()
	ks.held = append(ks.held, key)
	ks.users = append(ks.users, u)
	ks.mu.Unlock()
	return u, nil
}

// close unsubscribes every user and releases every source acquired.
func (ks *keySources) close() error {
	ks.mu.Lock()
	held, users := ks.held, ks.users
	ks.held, ks.users = nil, nil
	ks.mu.Unlock()
	for _, u := range users {
		u.unsubscribe()
	}
	var errs []error
	for _, key := range held {
		errs = append(errs, ks.pool.Release(key))
	}
	return errors.Join(errs...)
}
