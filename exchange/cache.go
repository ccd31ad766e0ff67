package exchange

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"maps"
	"math"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"
)

// DefaultCacheMaxEntries is the size bound of a Cache whose MaxEntries is
// not set.
const DefaultCacheMaxEntries = 10000

const (
	// cacheMinMargin is the least time before a minted token's expiry at
	// which its cache entry stops being served.
	cacheMinMargin = 5 * time.Second
	// cacheMaxShards bounds the number of shards; cacheMinShardEntries keeps
	// small caches in few shards so that eviction stays close to global.
	cacheMaxShards       = 64
	cacheMinShardEntries = 64
	// cacheMaxShapes bounds the table of interned per-route values.
	cacheMaxShapes = 4096
)

// CacheConfig configures a Cache.
type CacheConfig struct {
	// MaxEntries bounds the number of entries (default 10000); Len never
	// exceeds it. The cache is split into shards whose bounds add up to
	// MaxEntries, so eviction in a shard may begin a little before the
	// whole cache is full. Inserting into a full shard drops an expired
	// entry or, failing that, one not read since the eviction hand last
	// passed it (SIEVE, an LRU approximation whose reads take no write
	// lock).
	MaxEntries int
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// CacheKey identifies a cache entry: see NewCacheKey.
type CacheKey [32]byte

// NewCacheKey is CacheKeyOf the token's digest.
func NewCacheKey(rawToken string, parts ...string) CacheKey {
	return CacheKeyOf(DigestToken(rawToken), parts...)
}

// CacheKeyOf is a SHA-256 over everything that shapes the result: the
// inbound token's digest and parts (route configuration, audiences,
// scopes, actor, ...). Keying by the digest lets a caller hash the token
// once, for the key and for the subject_token_sha256 of its logs. Every
// part is prefixed with its length, so parts cannot run into each other:
// ("ab", "c") and ("a", "bc") give different keys, as do ("a") and
// ("a", "").
func CacheKeyOf(token TokenDigest, parts ...string) CacheKey {
	// The input goes to the hash through a buffer on the stack, so that a
	// key costs no allocation whatever the length of the parts.
	h := sha256.New()
	var buf [512]byte
	b := append(buf[:0], cacheKeyDomain...)
	b = append(b, token[:]...)
	for _, s := range parts {
		if len(b)+8 > cap(b) {
			h.Write(b)
			b = buf[:0]
		}
		b = binary.BigEndian.AppendUint64(b, uint64(len(s)))
		for len(s) > 0 {
			if len(b) == cap(b) {
				h.Write(b)
				b = buf[:0]
			}
			n := copy(b[len(b):cap(b)], s)
			b = b[:len(b)+n]
			s = s[n:]
		}
	}
	h.Write(b)
	var k CacheKey
	h.Sum(k[:0])
	return k
}

const cacheKeyDomain = "caddy-token-exchange cache key v2\x00"

// CachedToken is what is stored: a minted token and what the caller needs
// about the subject token it was minted for.
//
// A CachedToken returned by the cache is the caller's own copy of the
// struct and of its Minted, but the slices (Audiences, Scopes) and the
// ActChain map are shared with other entries and must not be modified.
// The cache does not keep Minted.SubjectTokenHash (64 bytes an entry): the
// caller keyed the entry from the token's digest (CacheKeyOf) and sets it
// from there.
type CachedToken struct {
	Minted *Minted
	// Issuer is the subject token's issuer.
	Issuer string
	// KeyThumbprint is the RFC 7638 thumbprint of the issuer key that
	// verified the subject token.
	KeyThumbprint string
	// SubjectExpiry is the subject token's exp. A token whose SubjectExpiry
	// is zero is never stored.
	SubjectExpiry time.Time
}

// reusedFor marks a cache hit's own copy as reused, for the caller that
// keyed it from token's digest: Cached, and the SubjectTokenHash that the
// cache does not keep. (A miss's result may be shared with concurrent
// waiters and is never marked.)
func (t *CachedToken) reusedFor(token TokenDigest) *Minted {
	t.Minted.Cached = true
	t.Minted.SubjectTokenHash = token.Hex()
	return t.Minted
}

// Cache holds minted tokens for the middleware's hot path. An entry is live
// until min(Minted.Expiry - margin, SubjectExpiry), where margin =
// max(10% of (Minted.Expiry - Minted.IssuedAt), 5s); an entry that is not
// live is never returned, evicted or not. A Cache is safe for concurrent
// use.
//
// Entries are kept compactly: the strings that differ per token (Token,
// Subject, JTI) share one allocation, and the values that
// repeat across tokens (actor, audiences, scopes, act chain, issuer, key thumbprint)
// are interned. A hit therefore returns a fresh CachedToken (one
// allocation) rather than the pointer that was stored.
//
// The zero Cache is not usable: use NewCache. A Cache starts no goroutine
// and needs no closing.
type Cache struct {
	now    func() time.Time
	shards []cacheShard
	mask   uint64

	shapeMu sync.Mutex
	shapes  map[string]*cacheShape
}

type cacheShard struct {
	mu sync.RWMutex
	// m is keyed by 64 bits of the CacheKey; an entry answers only for its
	// full key, and a colliding insert replaces it.
	m        map[uint64]*cacheEntry
	inflight map[CacheKey]*cacheCall
	// The SIEVE queue: head is the newest entry, tail the oldest; prev
	// points towards head. The hand moves from tail towards head.
	head, tail, hand *cacheEntry
	max              int
	hits, misses     atomic.Uint64
	_                [40]byte // keep shards on separate cache lines
}

// cacheEntry is laid out to fit the 96-byte size class.
type cacheEntry struct {
	// buf is the CacheKey, Token, Subject and JTI, in that order: the key
	// shares the allocation of the token, whose size class usually has the
	// room, rather than making every entry 32 bytes larger.
	buf        string
	shape      *cacheShape
	prev, next *cacheEntry
	// IssuedAt, Expiry and SubjectExpiry, as Unix seconds and nanoseconds
	// (their locations are in the shape).
	iatSec, expSec, subExpSec    int64
	live                         int64 // unix ns, clamped; live while now < live
	iatNsec, expNsec, subExpNsec int32
	tokEnd                       uint32
	subLen, jtiLen               uint16
	visited                      atomic.Bool
}

// cacheShape is what tokens minted for one route and issuer have in common.
type cacheShape struct {
	actor                 Actor
	audiences             []string
	scopes                []string
	actChain              map[string]any
	subjectIssuer         string
	issuer, keyThumbprint string
	signerKID             string
	// The locations of IssuedAt, Expiry and SubjectExpiry.
	iatLoc, expLoc, subExpLoc *time.Location
}

type cacheCall struct {
	done   chan struct{}
	tok    *CachedToken
	err    error
	forget bool // Delete was called while in flight: do not store
}

// NewCache returns an empty cache.
func NewCache(cfg CacheConfig) *Cache {
	if cfg.MaxEntries <= 0 {
		cfg.MaxEntries = DefaultCacheMaxEntries
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	target := min(4*runtime.GOMAXPROCS(0), cacheMaxShards)
	n := 1
	for n < target && 2*n*cacheMinShardEntries <= cfg.MaxEntries {
		n *= 2
	}
	c := &Cache{
		now:    cfg.Now,
		shards: make([]cacheShard, n),
		mask:   uint64(n - 1),
		shapes: make(map[string]*cacheShape),
	}
	// The shard bounds add up to MaxEntries exactly.
	for i := range c.shards {
		s := &c.shards[i]
		s.max = cfg.MaxEntries / n
		if i < cfg.MaxEntries%n {
			s.max++
		}
		s.m = make(map[uint64]*cacheEntry)
		s.inflight = make(map[CacheKey]*cacheCall)
	}
	return c
}

func (c *Cache) shard(key CacheKey) *cacheShard {
	return &c.shards[binary.LittleEndian.Uint64(key[:8])&c.mask]
}

// mapKey is the key of an entry in its shard's map: other bits than those
// that chose the shard.
func (k *CacheKey) mapKey() uint64 { return binary.LittleEndian.Uint64(k[8:16]) }

func (c *Cache) nowNano() int64 { return clampUnixNano(c.now()) }

// Get returns a live entry.
func (c *Cache) Get(key CacheKey) (*CachedToken, bool) {
	s := c.shard(key)
	if e := s.lookup(key, c.nowNano()); e != nil {
		s.hits.Add(1)
		return e.materialize(), true
	}
	s.misses.Add(1)
	return nil, false
}

// GetInto is Get without allocating: it fills dst and dst.Minted (which
// must not be nil) with a live entry. The strings share the entry's
// memory; the slices and the ActChain map must not be modified.
func (c *Cache) GetInto(key CacheKey, dst *CachedToken) bool {
	s := c.shard(key)
	if e := s.lookup(key, c.nowNano()); e != nil {
		s.hits.Add(1)
		e.fill(dst)
		return true
	}
	s.misses.Add(1)
	return false
}

// GetOrMint returns a live entry or calls mint, once per key even under
// concurrent callers: concurrent misses for one key wait for the call in
// flight and share its result. An error is returned to every waiter and is
// not cached. The result is stored only if it would be live. hit reports
// whether the result came from the cache; waiters that shared a mint count
// as misses.
//
// If mint panics, the waiters get an error and the panic goes on in the
// caller that ran mint.
func (c *Cache) GetOrMint(key CacheKey, mint func() (*CachedToken, error)) (tok *CachedToken, hit bool, err error) {
	s := c.shard(key)
	if e := s.lookup(key, c.nowNano()); e != nil {
		s.hits.Add(1)
		return e.materialize(), true, nil
	}

	s.mu.Lock()
	if e := s.m[key.mapKey()]; e != nil && e.hasKey(key) {
		if e.live > c.nowNano() {
			e.visited.Store(true)
			s.mu.Unlock()
			s.hits.Add(1)
			return e.materialize(), true, nil
		}
		s.remove(e)
	}
	s.misses.Add(1)
	if call := s.inflight[key]; call != nil {
		s.mu.Unlock()
		<-call.done
		return call.tok, false, call.err
	}
	call := &cacheCall{done: make(chan struct{})}
	s.inflight[key] = call
	s.mu.Unlock()

	c.runMint(s, key, call, mint)
	return call.tok, false, call.err
}

func (c *Cache) runMint(s *cacheShard, key CacheKey, call *cacheCall, mint func() (*CachedToken, error)) {
	normal := false
	defer func() {
		var r any
		if !normal {
			// A panic, or runtime.Goexit when r is nil.
			r = recover()
			call.tok, call.err = nil, fmt.Errorf("exchange: minting for the token cache did not return (panic: %v)", r)
		}
		var e *cacheEntry
		if call.err == nil {
			e = c.newEntry(key, call.tok)
		}
		s.mu.Lock()
		delete(s.inflight, key)
		if e != nil && !call.forget {
			if now := c.nowNano(); e.live > now {
				s.insert(e, now)
			}
		}
		s.mu.Unlock()
		close(call.done)
		if r != nil {
			panic(r)
		}
	}()
	call.tok, call.err = mint()
	normal = true
}

// Delete drops the entry for key, and keeps a mint in flight for key from
// storing its result.
func (c *Cache) Delete(key CacheKey) {
	s := c.shard(key)
	s.mu.Lock()
	if e := s.m[key.mapKey()]; e != nil && e.hasKey(key) {
		s.remove(e)
	}
	if call := s.inflight[key]; call != nil {
		call.forget = true
	}
	s.mu.Unlock()
}

// Len is the number of entries held, live or not yet dropped; it never
// exceeds MaxEntries.
func (c *Cache) Len() int {
	n := 0
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.RLock()
		n += len(s.m)
		s.mu.RUnlock()
	}
	return n
}

// Stats returns the number of lookups (Get and GetOrMint calls) answered
// from the cache and not.
func (c *Cache) Stats() (hits, misses uint64) {
	for i := range c.shards {
		hits += c.shards[i].hits.Load()
		misses += c.shards[i].misses.Load()
	}
	return hits, misses
}

// lookup returns the live entry for key, or nil.
func (s *cacheShard) lookup(key CacheKey, now int64) *cacheEntry {
	s.mu.RLock()
	e := s.m[key.mapKey()]
	if e != nil {
		if e.hasKey(key) && e.live > now {
			if !e.visited.Load() {
				e.visited.Store(true)
			}
		} else {
			e = nil
		}
	}
	s.mu.RUnlock()
	return e
}

// insert adds e, replacing any entry for its key (or a colliding map key).
// It drops expired entries at the old end of the queue, then evicts while
// the shard is full.
func (s *cacheShard) insert(e *cacheEntry, now int64) {
	if old := s.m[e.mapKey()]; old != nil {
		s.remove(old)
	}
	for i := 0; i < 2 && s.tail != nil && s.tail.live <= now; i++ {
		s.remove(s.tail)
	}
	for len(s.m) >= s.max && s.tail != nil {
		s.evict(now)
	}
	e.next = s.head
	if s.head != nil {
		s.head.prev = e
	}
	s.head = e
	if s.tail == nil {
		s.tail = e
	}
	s.m[e.mapKey()] = e
}

// evict drops one entry: the first, from the hand towards the newest, that
// is expired or was not visited since the hand last passed it (SIEVE).
func (s *cacheShard) evict(now int64) {
	p := s.hand
	if p == nil {
		p = s.tail
	}
	for p.live > now && p.visited.Load() {
		p.visited.Store(false)
		p = p.prev
		if p == nil {
			p = s.tail
		}
	}
	s.hand = p.prev
	s.remove(p)
}

func (s *cacheShard) remove(e *cacheEntry) {
	if s.hand == e {
		s.hand = e.prev
	}
	if e.prev != nil {
		e.prev.next = e.next
	} else {
		s.head = e.next
	}
	if e.next != nil {
		e.next.prev = e.prev
	} else {
		s.tail = e.prev
	}
	e.prev, e.next = nil, nil
	delete(s.m, e.mapKey())
}

// cacheLiveUntil is when t stops being served, in clamped unix ns; ok is
// false when t cannot be stored at all.
func cacheLiveUntil(t *CachedToken) (until int64, ok bool) {
	if t == nil || t.Minted == nil || t.Minted.Expiry.IsZero() || t.SubjectExpiry.IsZero() {
		return 0, false
	}
	m := t.Minted
	margin := max(m.Expiry.Sub(m.IssuedAt)/10, cacheMinMargin)
	u := m.Expiry.Add(-margin)
	if t.SubjectExpiry.Before(u) {
		u = t.SubjectExpiry
	}
	return clampUnixNano(u), true
}

// clampUnixNano is t.UnixNano, saturated outside the years 1678 to 2262.
func clampUnixNano(t time.Time) int64 {
	const limit = math.MaxInt64/int64(time.Second) - 1
	switch sec := t.Unix(); {
	case sec > limit:
		return math.MaxInt64
	case sec < -limit:
		return math.MinInt64
	}
	return t.UnixNano()
}

// newEntry is the compact form of t, or nil when t cannot be stored.
func (c *Cache) newEntry(key CacheKey, t *CachedToken) *cacheEntry {
	live, ok := cacheLiveUntil(t)
	if !ok {
		return nil
	}
	m := t.Minted
	if len(m.Token) > math.MaxUint32/2 || len(m.Subject) > math.MaxUint16 || len(m.JTI) > math.MaxUint16 {
		return nil
	}
	var b strings.Builder
	b.Grow(len(key) + len(m.Token) + len(m.Subject) + len(m.JTI))
	b.Write(key[:])
	b.WriteString(m.Token)
	b.WriteString(m.Subject)
	b.WriteString(m.JTI)
	return &cacheEntry{
		buf:        b.String(),
		shape:      c.shape(t),
		iatSec:     m.IssuedAt.Unix(),
		iatNsec:    int32(m.IssuedAt.Nanosecond()),
		expSec:     m.Expiry.Unix(),
		expNsec:    int32(m.Expiry.Nanosecond()),
		subExpSec:  t.SubjectExpiry.Unix(),
		subExpNsec: int32(t.SubjectExpiry.Nanosecond()),
		live:       live,
		tokEnd:     uint32(len(key) + len(m.Token)),
		subLen:     uint16(len(m.Subject)),
		jtiLen:     uint16(len(m.JTI)),
	}
}

func (e *cacheEntry) hasKey(key CacheKey) bool { return e.buf[:len(key)] == string(key[:]) }

func (e *cacheEntry) mapKey() uint64 {
	return binary.LittleEndian.Uint64([]byte(e.buf[8:16])) // CacheKey.mapKey of the stored key
}

// materialize rebuilds the CachedToken of e in one allocation.
func (e *cacheEntry) materialize() *CachedToken {
	p := &struct {
		t CachedToken
		m Minted
	}{}
	p.t.Minted = &p.m
	e.fill(&p.t)
	return &p.t
}

// fill writes the CachedToken of e into t and t.Minted, allocating nothing:
// the strings are slices of the entry's one buffer.
func (e *cacheEntry) fill(t *CachedToken) {
	sh := e.shape
	subEnd := e.tokEnd + uint32(e.subLen)
	jtiEnd := subEnd + uint32(e.jtiLen)
	*t.Minted = Minted{
		Token:         e.buf[len(CacheKey{}):e.tokEnd],
		Subject:       e.buf[e.tokEnd:subEnd],
		Actor:         sh.actor,
		Audiences:     sh.audiences,
		Scopes:        sh.scopes,
		JTI:           e.buf[subEnd:jtiEnd],
		IssuedAt:      time.Unix(e.iatSec, int64(e.iatNsec)).In(sh.iatLoc),
		Expiry:        time.Unix(e.expSec, int64(e.expNsec)).In(sh.expLoc),
		SubjectIssuer: sh.subjectIssuer,
		ActChain:      sh.actChain,
		SignerKID:     sh.signerKID,
	}
	*t = CachedToken{
		Minted:        t.Minted,
		Issuer:        sh.issuer,
		KeyThumbprint: sh.keyThumbprint,
		SubjectExpiry: time.Unix(e.subExpSec, int64(e.subExpNsec)).In(sh.subExpLoc),
	}
}

// shape returns the interned shape of t. Act chains are told apart by their
// JSON form (map keys sorted); one that cannot be encoded is not interned.
func (c *Cache) shape(t *CachedToken) *cacheShape {
	m := t.Minted
	iatLoc, expLoc, subExpLoc := m.IssuedAt.Location(), m.Expiry.Location(), t.SubjectExpiry.Location()
	var kw shapeKey
	kw.str(m.Actor.Subject)
	kw.str(m.Actor.Issuer)
	kw.str(m.Actor.ClientID)
	kw.list(m.Audiences)
	kw.list(m.Scopes)
	kw.str(m.SubjectIssuer)
	kw.str(t.Issuer)
	kw.str(t.KeyThumbprint)
	kw.str(m.SignerKID)
	for _, loc := range []*time.Location{iatLoc, expLoc, subExpLoc} {
		kw.b = binary.AppendUvarint(kw.b, uint64(uintptr(unsafe.Pointer(loc))))
	}
	intern := true
	if m.ActChain == nil {
		kw.b = append(kw.b, 0)
	} else if act, err := appendJSONValue(nil, m.ActChain); err == nil {
		kw.b = append(kw.b, 1)
		kw.str(string(act))
	} else {
		intern = false
	}

	if intern {
		c.shapeMu.Lock()
		defer c.shapeMu.Unlock()
		if got := c.shapes[string(kw.b)]; got != nil {
			return got
		}
	}
	sh := &cacheShape{
		actor:         m.Actor,
		audiences:     slices.Clip(slices.Clone(m.Audiences)),
		scopes:        slices.Clip(slices.Clone(m.Scopes)),
		actChain:      maps.Clone(m.ActChain),
		subjectIssuer: m.SubjectIssuer,
		issuer:        t.Issuer,
		keyThumbprint: t.KeyThumbprint,
		signerKID:     m.SignerKID,
		iatLoc:        iatLoc,
		expLoc:        expLoc,
		subExpLoc:     subExpLoc,
	}
	if intern {
		if len(c.shapes) >= cacheMaxShapes {
			clear(c.shapes)
		}
		c.shapes[string(kw.b)] = sh
	}
	return sh
}

type shapeKey struct{ b []byte }

func (k *shapeKey) str(s string) {
	k.b = binary.AppendUvarint(k.b, uint64(len(s)))
	k.b = append(k.b, s...)
}

func (k *shapeKey) list(l []string) {
	if l == nil {
		k.b = append(k.b, 0)
		return
	}
	k.b = append(k.b, 1)
	k.b = binary.AppendUvarint(k.b, uint64(len(l)))
	for _, s := range l {
		k.str(s)
	}
}
