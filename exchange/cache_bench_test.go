package exchange

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// realisticCachedToken is what the middleware would store for subject n: a
// 600-byte ES256 at+jwt, two audiences, two scopes, a one-level act chain,
// each value freshly allocated as the engine does. Only the sizes and the
// allocations matter for memory, so the token is a random template with n
// stamped into it.
func realisticCachedToken(n int, now time.Time) *CachedToken {
	return &CachedToken{
		Minted: &Minted{
			Token:            stamped(realisticTokenTemplate, n),
			Subject:          stamped("8c1f4a3e-2b7d-4e59-9a61-000000000000", n),
			Actor:            Actor{Subject: "https://gateway.example.internal"},
			Audiences:        []string{"https://orders.internal", "https://billing.internal"},
			Scopes:           []string{"orders.read", "orders.write"},
			JTI:              stamped("q3Xv0sXQm7Zb1o2dKfYtUw", n),
			IssuedAt:         now,
			Expiry:           now.Add(5 * time.Minute),
			SubjectIssuer:    "https://idp.example.com",
			SubjectTokenHash: stamped(realisticHashTemplate, n),
			ActChain:         map[string]any{"sub": "https://gateway.example.internal"},
		},
		Issuer:        "https://idp.example.com",
		KeyThumbprint: "idp-key-2024",
		SubjectExpiry: now.Add(time.Hour),
	}
}

// realisticRawToken is an inbound token (~700 bytes, RS256) for subject n.
func realisticRawToken(n int) string { return stamped(realisticRawTemplate, n) }

var (
	realisticTokenTemplate = "eyJhbGciOiJFUzI1NiIsImtpZCI6ImdhdGV3YXkta2V5LTEiLCJ0eXAiOiJhdCtqd3QifQ." +
		randomB64(331) + "." + randomB64(64) // 70+1+442+1+86 = 600 bytes
	realisticRawTemplate  = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImlkcC1rZXktMjAyNCJ9." + randomB64(256) + "." + randomB64(256)
	realisticHashTemplate = hex.EncodeToString(make([]byte, 32))
)

func randomB64(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// stamped is a fresh copy of template with n, as ten digits, written over
// its end: distinct for distinct n.
func stamped(template string, n int) string {
	var num [20]byte
	d := strconv.AppendInt(num[:0], int64(n), 10)
	d = append([]byte("0000000000")[:max(10-len(d), 0)], d...)
	var b strings.Builder
	b.Grow(len(template))
	b.WriteString(template[:len(template)-len(d)])
	b.Write(d)
	return b.String()
}

var cacheRouteParts = []string{"route:/orders/*", "https://orders.internal", "orders.read orders.write", "delegation", "https://gateway.example.internal"}

func BenchmarkCacheHit(b *testing.B) {
	now := time.Now()
	const n = 10000
	c := NewCache(CacheConfig{MaxEntries: 2 * n}) // shards fill unevenly: no eviction here
	keys := make([]CacheKey, n)
	for i := range keys {
		keys[i] = NewCacheKey(realisticRawToken(i), cacheRouteParts...)
		c.GetOrMint(keys[i], func() (*CachedToken, error) { return realisticCachedToken(i, now), nil })
	}
	b.Run("Get", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if _, ok := c.Get(keys[i%n]); !ok {
				b.Fatal("miss")
			}
			i++
		}
	})
	b.Run("GetInto", func(b *testing.B) {
		b.ReportAllocs()
		dst := CachedToken{Minted: &Minted{}}
		i := 0
		for b.Loop() {
			if !c.GetInto(keys[i%n], &dst) {
				b.Fatal("miss")
			}
			i++
		}
	})
	b.Run("GetOrMint", func(b *testing.B) {
		b.ReportAllocs()
		mint := func() (*CachedToken, error) { panic("miss") }
		i := 0
		for b.Loop() {
			if _, hit, _ := c.GetOrMint(keys[i%n], mint); !hit {
				b.Fatal("miss")
			}
			i++
		}
	})
	// The whole hot path of the middleware: key the inbound token, then look up.
	b.Run("KeyAndGet", func(b *testing.B) {
		raw := make([]string, 64)
		for i := range raw {
			raw[i] = realisticRawToken(i)
			c.GetOrMint(NewCacheKey(raw[i], cacheRouteParts...), func() (*CachedToken, error) { return realisticCachedToken(i, now), nil })
		}
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if _, ok := c.Get(NewCacheKey(raw[i%len(raw)], cacheRouteParts...)); !ok {
				b.Fatal("miss")
			}
			i++
		}
	})
	b.Run("Parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			i := 0
			for pb.Next() {
				if _, ok := c.Get(keys[i%n]); !ok {
					b.Fatal("miss")
				}
				i += 7
			}
		})
	})
}

func BenchmarkCacheKey(b *testing.B) {
	raw := realisticRawToken(1)
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		_ = NewCacheKey(raw, cacheRouteParts...)
	}
}

// BenchmarkCacheMemory100k reports the heap a cache of 100,000 realistic
// entries holds ("cache"), next to what the same tokens take when kept as
// minted, in a plain map ("as-minted").
func BenchmarkCacheMemory100k(b *testing.B) {
	b.Run("cache", func(b *testing.B) {
		var mib float64
		for b.Loop() {
			mib = cacheMemory100k(b, true)
		}
		b.ReportMetric(mib, "MiB/100k")
	})
	b.Run("as-minted", func(b *testing.B) {
		var mib float64
		for b.Loop() {
			mib = cacheMemory100k(b, false)
		}
		b.ReportMetric(mib, "MiB/100k")
	})
}

// TestCacheMemory100k holds the cache to its target: 100,000 entries in
// under 100 MiB.
func TestCacheMemory100k(t *testing.T) {
	if testing.Short() {
		t.Skip("allocates 100,000 tokens")
	}
	if mib := cacheMemory100k(t, true); mib >= 100 {
		t.Fatalf("100,000 entries take %.1f MiB, want under 100", mib)
	} else {
		t.Logf("100,000 entries take %.1f MiB", mib)
	}
}

func cacheMemory100k(tb testing.TB, compact bool) float64 {
	const n = 100_000
	now := time.Now()
	heap := func() uint64 {
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	var held any
	if compact {
		if l := len(realisticCachedToken(0, now).Minted.Token); l != 600 {
			tb.Fatalf("the realistic token is %d bytes, want 600", l)
		}
		c := NewCache(CacheConfig{MaxEntries: 2 * n}) // shards fill unevenly: no eviction here
		for i := range n {
			key := NewCacheKey(realisticRawToken(i), cacheRouteParts...)
			c.GetOrMint(key, func() (*CachedToken, error) { return realisticCachedToken(i, now), nil })
		}
		if c.Len() != n {
			tb.Fatalf("Len = %d, want %d", c.Len(), n)
		}
		held = c
	} else {
		m := make(map[CacheKey]*CachedToken)
		for i := range n {
			m[NewCacheKey(realisticRawToken(i), cacheRouteParts...)] = realisticCachedToken(i, now)
		}
		held = m
	}
	after := heap()
	runtime.KeepAlive(held)
	return float64(after-before) / (1 << 20)
}
