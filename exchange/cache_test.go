package exchange

import (
	"errors"
	"fmt"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"
)

// cacheClock is a controllable clock for Cache tests.
type cacheClock struct {
	mu sync.Mutex
	t  time.Time
}

func newCacheClock() *cacheClock {
	return &cacheClock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *cacheClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *cacheClock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

// cacheTestToken is a token issued at iat that lives for life, minted for a
// subject token that expires at subExp.
func cacheTestToken(n int, iat time.Time, life time.Duration, subExp time.Time) *CachedToken {
	return &CachedToken{
		Minted: &Minted{
			Token:            fmt.Sprintf("eyJ.%d.%s", n, strings.Repeat("s", 40)),
			Subject:          fmt.Sprintf("user-%d", n),
			Actor:            Actor{Subject: "https://gateway.example"},
			Audiences:        []string{"https://orders.internal", "https://billing.internal"},
			Scopes:           []string{"orders.read", "orders.write"},
			JTI:              fmt.Sprintf("jti-%d", n),
			IssuedAt:         iat,
			Expiry:           iat.Add(life),
			SubjectIssuer:    "https://idp.example",
			SubjectTokenHash: fmt.Sprintf("%064x", n),
			ActChain:         map[string]any{"sub": "https://gateway.example"},
		},
		Issuer:        "https://idp.example",
		KeyThumbprint: "kid-1",
		SubjectExpiry: subExp,
	}
}

func cacheTestKey(n int) CacheKey { return NewCacheKey(fmt.Sprintf("token-%d", n), "route") }

func mustStore(t *testing.T, c *Cache, key CacheKey, tok *CachedToken) {
	t.Helper()
	got, hit, err := c.GetOrMint(key, func() (*CachedToken, error) { return tok, nil })
	if err != nil || hit || got != tok {
		t.Fatalf("GetOrMint(store) = %p, %v, %v; want the minted token, miss, no error", got, hit, err)
	}
}

func TestCacheExpiryMargin(t *testing.T) {
	for _, tc := range []struct {
		name   string
		life   time.Duration
		margin time.Duration
	}{
		{"ten percent", 10 * time.Minute, time.Minute},
		{"five second floor", 20 * time.Second, 5 * time.Second},
		{"floor at the boundary", 50 * time.Second, 5 * time.Second},
		{"just above the floor", 60 * time.Second, 6 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := newCacheClock()
			c := NewCache(CacheConfig{Now: clk.Now})
			iat := clk.Now()
			tok := cacheTestToken(1, iat, tc.life, iat.Add(24*time.Hour))
			key := cacheTestKey(1)
			mustStore(t, c, key, tok)

			liveUntil := iat.Add(tc.life - tc.margin)
			clk.Set(liveUntil.Add(-time.Nanosecond))
			got, ok := c.Get(key)
			if !ok {
				t.Fatalf("Get 1ns before %v (margin %v): miss, want hit", liveUntil, tc.margin)
			}
			if got.Minted.Token != tok.Minted.Token {
				t.Fatalf("Get returned token %q, want %q", got.Minted.Token, tok.Minted.Token)
			}
			clk.Set(liveUntil)
			if _, ok := c.Get(key); ok {
				t.Fatalf("Get at %v (expiry %v minus margin %v): hit, want miss", liveUntil, tok.Minted.Expiry, tc.margin)
			}
			// Not evicted yet, and still never returned, through either door.
			if c.Len() != 1 {
				t.Fatalf("Len = %d, want 1 (expired entries stay until dropped)", c.Len())
			}
			calls := 0
			if _, hit, _ := c.GetOrMint(key, func() (*CachedToken, error) {
				calls++
				return tok, nil
			}); hit || calls != 1 {
				t.Fatalf("GetOrMint after expiry: hit=%v, mint calls=%d; want a miss that mints", hit, calls)
			}
		})
	}
}

func TestCacheNeverPastSubjectExpiry(t *testing.T) {
	clk := newCacheClock()
	c := NewCache(CacheConfig{Now: clk.Now})
	iat := clk.Now()
	subExp := iat.Add(2 * time.Minute) // well before exp - margin = iat+54m
	tok := cacheTestToken(1, iat, time.Hour, subExp)
	key := cacheTestKey(1)
	mustStore(t, c, key, tok)

	clk.Set(subExp.Add(-time.Nanosecond))
	if _, ok := c.Get(key); !ok {
		t.Fatal("Get just before the subject's exp: miss, want hit")
	}
	clk.Set(subExp)
	if got, ok := c.Get(key); ok {
		t.Fatalf("Get at the subject's exp: hit (%v), want miss", got.SubjectExpiry)
	}
}

func TestCacheDoesNotStoreWhatWouldNotBeLive(t *testing.T) {
	clk := newCacheClock()
	now := clk.Now()
	for _, tc := range []struct {
		name string
		tok  *CachedToken
	}{
		{"inside the margin", cacheTestToken(1, now.Add(-56*time.Second), time.Minute, now.Add(time.Hour))},
		{"subject already expired", cacheTestToken(1, now, time.Hour, now)},
		{"no subject expiry", cacheTestToken(1, now, time.Hour, time.Time{})},
		{"no issued-at", cacheTestToken(1, time.Time{}, 0, now.Add(time.Hour))},
		{"no Minted", &CachedToken{SubjectExpiry: now.Add(time.Hour)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := NewCache(CacheConfig{Now: clk.Now})
			if tc.name == "no issued-at" {
				tc.tok.Minted.Expiry = now.Add(time.Hour)
			}
			key := cacheTestKey(1)
			got, hit, err := c.GetOrMint(key, func() (*CachedToken, error) { return tc.tok, nil })
			if err != nil || hit || got != tc.tok {
				t.Fatalf("GetOrMint = %p, %v, %v; want the minted token back", got, hit, err)
			}
			if c.Len() != 0 {
				t.Fatalf("Len = %d after minting a token that would not be live, want 0", c.Len())
			}
			if _, ok := c.Get(key); ok {
				t.Fatal("Get: hit, want miss")
			}
		})
	}
}

func TestCacheReturnsWhatWasStored(t *testing.T) {
	clk := newCacheClock()
	c := NewCache(CacheConfig{Now: clk.Now})
	tok := cacheTestToken(7, clk.Now(), 5*time.Minute, clk.Now().Add(time.Hour))
	tok.Minted.Actor = Actor{Subject: "gw", Issuer: "https://gw", ClientID: "c1"}
	tok.Minted.ActChain = map[string]any{"sub": "gw", "act": map[string]any{"sub": "prior"}}
	key := cacheTestKey(7)
	mustStore(t, c, key, tok)
	got, ok := c.Get(key)
	if !ok {
		t.Fatal("Get: miss")
	}
	// Everything but SubjectTokenHash, which the cache does not keep (the
	// caller has the token's digest it keyed the entry with).
	want := *tok
	wantMinted := *tok.Minted
	wantMinted.SubjectTokenHash = ""
	want.Minted = &wantMinted
	if !reflect.DeepEqual(got, &want) {
		t.Fatalf("Get = %+v\n%+v\nwant %+v\n%+v", got, got.Minted, &want, &wantMinted)
	}
	// GetInto gives the same, allocating nothing.
	into := CachedToken{Minted: &Minted{}}
	if allocs := testing.AllocsPerRun(100, func() {
		if !c.GetInto(key, &into) {
			t.Fatal("GetInto: miss")
		}
	}); allocs != 0 {
		t.Errorf("GetInto allocates %.0f times, want 0", allocs)
	}
	if !reflect.DeepEqual(&into, &want) {
		t.Fatalf("GetInto = %+v\n%+v\nwant %+v\n%+v", &into, into.Minted, &want, &wantMinted)
	}
	// Each hit is the caller's own struct: changing it does not change the cache.
	got.Minted.Token = "changed"
	got.Issuer = "changed"
	again, _ := c.Get(key)
	if again.Minted.Token != tok.Minted.Token || again.Issuer != tok.Issuer {
		t.Fatalf("a change to a returned CachedToken reached the cache: %q, %q", again.Minted.Token, again.Issuer)
	}
	// Appending to the shared slices does not write into them.
	_ = append(again.Minted.Scopes, "admin")
	if third, _ := c.Get(key); len(third.Minted.Scopes) != 2 || cap(third.Minted.Scopes) != 2 {
		t.Fatalf("scopes = %v (cap %d), want 2 clipped scopes", third.Minted.Scopes, cap(third.Minted.Scopes))
	}
}

func TestCacheSharesRepeatedValues(t *testing.T) {
	clk := newCacheClock()
	c := NewCache(CacheConfig{Now: clk.Now})
	a := cacheTestToken(1, clk.Now(), 5*time.Minute, clk.Now().Add(time.Hour))
	b := cacheTestToken(2, clk.Now(), 5*time.Minute, clk.Now().Add(time.Hour))
	d := cacheTestToken(3, clk.Now(), 5*time.Minute, clk.Now().Add(time.Hour))
	d.Minted.ActChain = map[string]any{"sub": "https://gateway.example", "act": map[string]any{"sub": "other"}}
	mustStore(t, c, cacheTestKey(1), a)
	mustStore(t, c, cacheTestKey(2), b)
	mustStore(t, c, cacheTestKey(3), d)
	ga, _ := c.Get(cacheTestKey(1))
	gb, _ := c.Get(cacheTestKey(2))
	gd, _ := c.Get(cacheTestKey(3))
	if &ga.Minted.Audiences[0] != &gb.Minted.Audiences[0] {
		t.Error("equal audiences of two entries are not shared")
	}
	if reflect.ValueOf(ga.Minted.ActChain).UnsafePointer() != reflect.ValueOf(gb.Minted.ActChain).UnsafePointer() {
		t.Error("equal act chains of two entries are not shared")
	}
	if !reflect.DeepEqual(gd.Minted.ActChain, d.Minted.ActChain) {
		t.Errorf("a different act chain came back as %v, want %v", gd.Minted.ActChain, d.Minted.ActChain)
	}
	if ga.Minted.Subject != "user-1" || gb.Minted.Subject != "user-2" || gd.Minted.JTI != "jti-3" {
		t.Errorf("per-token values mixed up: %q %q %q", ga.Minted.Subject, gb.Minted.Subject, gd.Minted.JTI)
	}
}

func TestCacheDelete(t *testing.T) {
	clk := newCacheClock()
	c := NewCache(CacheConfig{Now: clk.Now})
	k1, k2 := cacheTestKey(1), cacheTestKey(2)
	mustStore(t, c, k1, cacheTestToken(1, clk.Now(), 5*time.Minute, clk.Now().Add(time.Hour)))
	mustStore(t, c, k2, cacheTestToken(2, clk.Now(), 5*time.Minute, clk.Now().Add(time.Hour)))
	c.Delete(k1)
	if _, ok := c.Get(k1); ok {
		t.Fatal("Get after Delete: hit")
	}
	if _, ok := c.Get(k2); !ok {
		t.Fatal("Delete of one key dropped another")
	}
	if c.Len() != 1 {
		t.Fatalf("Len = %d, want 1", c.Len())
	}
	c.Delete(k1) // absent: no-op

	// A Delete while a mint is in flight keeps its result out of the cache.
	release := make(chan struct{})
	started := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.GetOrMint(k1, func() (*CachedToken, error) {
			close(started)
			<-release
			return cacheTestToken(1, clk.Now(), 5*time.Minute, clk.Now().Add(time.Hour)), nil
		})
	}()
	<-started
	c.Delete(k1)
	close(release)
	<-done
	if _, ok := c.Get(k1); ok {
		t.Fatal("a mint in flight during Delete was stored")
	}
}

func TestCacheKeyIsolation(t *testing.T) {
	keys := map[CacheKey]string{}
	add := func(name string, k CacheKey) {
		t.Helper()
		if prev, dup := keys[k]; dup {
			t.Errorf("%s and %s have the same key", name, prev)
		}
		keys[k] = name
	}
	add(`("t")`, NewCacheKey("t"))
	add(`("t", "")`, NewCacheKey("t", ""))
	add(`("t", "", "")`, NewCacheKey("t", "", ""))
	add(`("t", "ab", "c")`, NewCacheKey("t", "ab", "c"))
	add(`("t", "a", "bc")`, NewCacheKey("t", "a", "bc"))
	add(`("t", "abc")`, NewCacheKey("t", "abc"))
	add(`("ta", "bc")`, NewCacheKey("ta", "bc"))
	add(`("u", "ab", "c")`, NewCacheKey("u", "ab", "c"))
	add(`("t", "c", "ab")`, NewCacheKey("t", "c", "ab"))
	add(`("", "t")`, NewCacheKey("", "t"))
	// Long inputs cross the internal buffer: one byte at the end still counts.
	long := strings.Repeat("x", 5000)
	add("long", NewCacheKey(long, "route"))
	add("long+1", NewCacheKey(long+"y", "route"))
	add("long, part", NewCacheKey(long, long+"y"))
	add("long, part'", NewCacheKey(long, long+"z"))

	// Two computations from distinct but equal strings agree.
	if a, b := NewCacheKey("t", "a", "b"), NewCacheKey(strings.Clone("t"), "a", "b"); a != b {
		t.Error("equal inputs give different keys")
	}
	if a, b := NewCacheKey(long, long), NewCacheKey(strings.Clone(long), strings.Clone(long)); a != b {
		t.Error("equal long inputs give different keys")
	}

	// Different keys are different entries.
	clk := newCacheClock()
	c := NewCache(CacheConfig{Now: clk.Now})
	kab, ka := NewCacheKey("t", "ab", "c"), NewCacheKey("t", "a", "bc")
	mustStore(t, c, kab, cacheTestToken(1, clk.Now(), 5*time.Minute, clk.Now().Add(time.Hour)))
	if _, ok := c.Get(ka); ok {
		t.Fatal(`the entry for ("t","ab","c") answered ("t","a","bc")`)
	}
}

// TestCacheEvictionBound: Len never exceeds MaxEntries, exactly (the shard
// bounds add up to MaxEntries).
func TestCacheEvictionBound(t *testing.T) {
	for _, max := range []int{1, 7, 100, 1000} {
		t.Run(fmt.Sprint(max), func(t *testing.T) {
			clk := newCacheClock()
			c := NewCache(CacheConfig{MaxEntries: max, Now: clk.Now})
			n := 5*max + 50
			for i := range n {
				mustStore(t, c, cacheTestKey(i), cacheTestToken(i, clk.Now(), 5*time.Minute, clk.Now().Add(time.Hour)))
				if l := c.Len(); l > max {
					t.Fatalf("after %d inserts Len = %d > MaxEntries %d", i+1, l, max)
				}
			}
			if l := c.Len(); l < max/2 {
				t.Fatalf("Len = %d after %d inserts, want close to %d", l, n, max)
			}
			// The newest entry is always there.
			if _, ok := c.Get(cacheTestKey(n - 1)); !ok {
				t.Fatal("the entry inserted last was evicted")
			}
		})
	}
}

func TestCacheEvictionKeepsVisitedEntries(t *testing.T) {
	clk := newCacheClock()
	c := NewCache(CacheConfig{MaxEntries: 100, Now: clk.Now}) // one shard
	if len(c.shards) != 1 {
		t.Fatalf("%d shards for 100 entries, want 1", len(c.shards))
	}
	tok := func(i int) *CachedToken {
		return cacheTestToken(i, clk.Now(), 5*time.Minute, clk.Now().Add(time.Hour))
	}
	for i := range 100 {
		mustStore(t, c, cacheTestKey(i), tok(i))
	}
	hot := cacheTestKey(0) // oldest, but in use
	for i := 100; i < 1000; i++ {
		if _, ok := c.Get(hot); !ok {
			t.Fatalf("the entry in use was evicted before insert %d", i)
		}
		mustStore(t, c, cacheTestKey(i), tok(i))
	}
	if _, ok := c.Get(cacheTestKey(1)); ok {
		t.Fatal("an entry never used survived 900 inserts into a cache of 100")
	}
}

func TestCacheFullDropsExpiredFirst(t *testing.T) {
	// Expired entries at the old end of the queue are dropped on insert;
	// those further in are the first the eviction hand takes.
	for _, shortFirst := range []bool{true, false} {
		t.Run(fmt.Sprintf("short-lived first %v", shortFirst), func(t *testing.T) {
			clk := newCacheClock()
			c := NewCache(CacheConfig{MaxEntries: 10, Now: clk.Now})
			start := clk.Now()
			// 5 short-lived entries and 5 long-lived ones, all visited.
			for i := range 10 {
				life := time.Hour
				if (i < 5) == shortFirst {
					life = time.Minute
				}
				mustStore(t, c, cacheTestKey(i), cacheTestToken(i, start, life, start.Add(2*time.Hour)))
				c.Get(cacheTestKey(i))
			}
			clk.Set(start.Add(55 * time.Second)) // the short-lived ones are past their margin
			for i := 10; i < 15; i++ {
				mustStore(t, c, cacheTestKey(i), cacheTestToken(i, clk.Now(), time.Hour, clk.Now().Add(2*time.Hour)))
			}
			for i := range 15 {
				if _, ok := c.Get(cacheTestKey(i)); !ok && (i >= 10 || (i < 5) != shortFirst) {
					t.Errorf("live entry %d was evicted while expired entries were there", i)
				}
			}
			if c.Len() != 10 {
				t.Errorf("Len = %d, want 10", c.Len())
			}
		})
	}
}

// TestCacheMapKeyCollision: the shard maps are keyed by 64 bits of the key;
// an entry must still answer only for its own full key.
func TestCacheMapKeyCollision(t *testing.T) {
	clk := newCacheClock()
	c := NewCache(CacheConfig{Now: clk.Now})
	k1 := cacheTestKey(1)
	k2 := k1
	k2[31] ^= 1 // same shard, same map key, different CacheKey
	t1 := cacheTestToken(1, clk.Now(), 5*time.Minute, clk.Now().Add(time.Hour))
	t2 := cacheTestToken(2, clk.Now(), 5*time.Minute, clk.Now().Add(time.Hour))
	mustStore(t, c, k1, t1)
	if got, ok := c.Get(k2); ok {
		t.Fatalf("Get(k2) answered with the entry of k1 (%s)", got.Minted.Subject)
	}
	c.Delete(k2) // must not drop k1
	if _, ok := c.Get(k1); !ok {
		t.Fatal("Delete of a colliding key dropped another key's entry")
	}
	mustStore(t, c, k2, t2) // replaces k1's entry
	if got, ok := c.Get(k2); !ok || got.Minted.Subject != "user-2" {
		t.Fatalf("Get(k2) = %v, %v; want user-2", got, ok)
	}
	if got, ok := c.Get(k1); ok {
		t.Fatalf("Get(k1) answered with %s after k2 took its slot", got.Minted.Subject)
	}
	if c.Len() != 1 {
		t.Fatalf("Len = %d, want 1", c.Len())
	}
}

func TestCacheSingleFlight(t *testing.T) {
	clk := newCacheClock()
	c := NewCache(CacheConfig{Now: clk.Now})
	key := cacheTestKey(1)
	const n = 64
	var calls atomic.Int32
	release := make(chan struct{})
	tok := cacheTestToken(1, clk.Now(), 5*time.Minute, clk.Now().Add(time.Hour))

	var wg sync.WaitGroup
	results := make([]*CachedToken, n)
	errs := make([]error, n)
	var entered atomic.Int32
	for i := range n {
		wg.Go(func() {
			entered.Add(1)
			results[i], _, errs[i] = c.GetOrMint(key, func() (*CachedToken, error) {
				calls.Add(1)
				<-release
				return tok, nil
			})
		})
	}
	// Let every goroutine reach the cache before the mint returns.
	for entered.Load() < n {
		runtime.Gosched()
	}
	time.Sleep(20 * time.Millisecond)
	close(release)
	wg.Wait()
	if got := calls.Load(); got != 1 {
		t.Fatalf("mint called %d times for %d concurrent callers, want 1", got, n)
	}
	for i := range n {
		if errs[i] != nil || results[i] == nil || results[i].Minted.Token != tok.Minted.Token {
			t.Fatalf("caller %d got %v, %v", i, results[i], errs[i])
		}
	}
	hits, misses := c.Stats()
	if hits+misses != n || misses < 1 {
		t.Fatalf("Stats = %d hits, %d misses; want %d lookups, at least one miss", hits, misses, n)
	}

	// Many goroutines on many keys: one mint per key.
	const keys = 16
	var perKey [keys]atomic.Int32
	c2 := NewCache(CacheConfig{Now: clk.Now})
	for g := range 8 * keys {
		wg.Go(func() {
			k := g % keys
			for range 20 {
				_, _, err := c2.GetOrMint(cacheTestKey(k), func() (*CachedToken, error) {
					perKey[k].Add(1)
					time.Sleep(time.Millisecond)
					return cacheTestToken(k, clk.Now(), 5*time.Minute, clk.Now().Add(time.Hour)), nil
				})
				if err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	for k := range keys {
		if got := perKey[k].Load(); got != 1 {
			t.Errorf("key %d minted %d times, want 1", k, got)
		}
	}
}

func TestCacheErrorsAreNotCached(t *testing.T) {
	clk := newCacheClock()
	c := NewCache(CacheConfig{Now: clk.Now})
	key := cacheTestKey(1)
	boom := errors.New("boom")

	// Concurrent waiters all see the error.
	const n = 16
	var calls atomic.Int32
	release := make(chan struct{})
	var wg sync.WaitGroup
	errs := make([]error, n)
	var entered atomic.Int32
	for i := range n {
		wg.Go(func() {
			entered.Add(1)
			_, _, errs[i] = c.GetOrMint(key, func() (*CachedToken, error) {
				calls.Add(1)
				<-release
				return nil, boom
			})
		})
	}
	for entered.Load() < n {
		runtime.Gosched()
	}
	time.Sleep(20 * time.Millisecond)
	close(release)
	wg.Wait()
	if calls.Load() != 1 {
		t.Fatalf("mint called %d times, want 1", calls.Load())
	}
	for i, err := range errs {
		if !errors.Is(err, boom) {
			t.Fatalf("caller %d got error %v, want %v", i, err, boom)
		}
	}
	if c.Len() != 0 {
		t.Fatalf("Len = %d after an error, want 0", c.Len())
	}
	// The next call mints again, and its success is cached.
	tok := cacheTestToken(1, clk.Now(), 5*time.Minute, clk.Now().Add(time.Hour))
	got, hit, err := c.GetOrMint(key, func() (*CachedToken, error) { calls.Add(1); return tok, nil })
	if err != nil || hit || got != tok || calls.Load() != 2 {
		t.Fatalf("GetOrMint after an error = %v, %v, %v (calls %d); want a fresh mint", got, hit, err, calls.Load())
	}
	if _, hit, _ := c.GetOrMint(key, func() (*CachedToken, error) { t.Fatal("minted again"); return nil, nil }); !hit {
		t.Fatal("the success after an error was not cached")
	}
}

func TestCacheMintPanic(t *testing.T) {
	clk := newCacheClock()
	c := NewCache(CacheConfig{Now: clk.Now})
	key := cacheTestKey(1)
	started := make(chan struct{})
	waiterErr := make(chan error, 1)
	go func() {
		<-started
		_, _, err := c.GetOrMint(key, func() (*CachedToken, error) {
			t.Error("the waiter minted: it did not join the flight")
			return nil, nil
		})
		waiterErr <- err
	}()
	func() {
		defer func() {
			if r := recover(); r != "mint exploded" {
				t.Errorf("recovered %v, want the mint's panic", r)
			}
		}()
		c.GetOrMint(key, func() (*CachedToken, error) {
			close(started)
			time.Sleep(100 * time.Millisecond) // the waiter joins
			panic("mint exploded")
		})
	}()
	if err := <-waiterErr; err == nil || !strings.Contains(err.Error(), "mint exploded") {
		t.Fatalf("the waiter got error %v, want one that names the panic", err)
	}
	// The key is usable afterwards.
	tok := cacheTestToken(1, clk.Now(), 5*time.Minute, clk.Now().Add(time.Hour))
	if _, _, err := c.GetOrMint(key, func() (*CachedToken, error) { return tok, nil }); err != nil {
		t.Fatalf("GetOrMint after a panic: %v", err)
	}
	if _, ok := c.Get(key); !ok {
		t.Fatal("not cached after a panic")
	}
}

func TestCacheStats(t *testing.T) {
	clk := newCacheClock()
	c := NewCache(CacheConfig{Now: clk.Now})
	k := cacheTestKey(1)
	c.Get(k)                                                                                     // miss
	mustStore(t, c, k, cacheTestToken(1, clk.Now(), 5*time.Minute, clk.Now().Add(time.Hour)))    // miss
	c.Get(k)                                                                                     // hit
	c.GetOrMint(k, func() (*CachedToken, error) { t.Fatal("minted on a hit"); return nil, nil }) // hit
	c.GetOrMint(cacheTestKey(2), func() (*CachedToken, error) { return nil, errors.New("x") })   // miss
	clk.Set(clk.Now().Add(time.Hour))
	c.Get(k) // miss: expired
	if h, m := c.Stats(); h != 2 || m != 4 {
		t.Fatalf("Stats = %d hits, %d misses; want 2, 4", h, m)
	}
}

func TestCacheShardsAndDefaults(t *testing.T) {
	c := NewCache(CacheConfig{})
	if c.now == nil {
		t.Fatal("no default clock")
	}
	total := 0
	for i := range c.shards {
		total += c.shards[i].max
	}
	if total != DefaultCacheMaxEntries {
		t.Fatalf("shard bounds add up to %d, want %d", total, DefaultCacheMaxEntries)
	}
	if n := len(c.shards); n&(n-1) != 0 {
		t.Fatalf("%d shards, want a power of two", n)
	}
}

// The memory target (issue 15: 100,000 entries near the bytes of their
// tokens) leaves no room for a larger entry: it stays in the 96-byte size
// class.
func TestCacheEntrySize(t *testing.T) {
	if size := unsafe.Sizeof(cacheEntry{}); size > 96 && unsafe.Sizeof(uintptr(0)) == 8 {
		t.Fatalf("cacheEntry is %d bytes, want at most 96", size)
	}
}
