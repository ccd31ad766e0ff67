package exchange

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// Secret authentication of token-endpoint clients (client_secret_basic and
// client_secret_post): bcrypt in bounded slots, successes cached.

func (c *Clients) checkSecret(ctx context.Context, id, secret, method string) (*AuthenticatedClient, *Error) {
	if secret == "" || len(secret) > bcryptMaxPassword {
		return nil, clientError("bad_secret", authFailed)
	}
	rc, ok := c.clients[id]
	if !ok || rc.hash == nil {
		// Spend what a real check costs, so timing does not tell an
		// unknown client (or one with another method) from a wrong secret.
		if err := c.dummyCompare(ctx, secret); err != nil {
			return nil, err
		}
		if !ok {
			return nil, clientError("unknown_client", authFailed)
		}
		return nil, clientError("auth_method_mismatch", authFailed)
	}
	key := c.secrets.key(id, rc.hash, secret)
	if !c.secrets.has(key) {
		match, err := c.compareHash(ctx, rc.hash, secret)
		if err != nil {
			return nil, err
		}
		if !match {
			return nil, clientError("bad_secret", authFailed)
		}
		c.secrets.add(key)
	}
	return &AuthenticatedClient{ClientID: id, Method: method, Config: rc.cfg}, nil
}

// compareHash runs one bcrypt comparison in a bounded slot. bcrypt costs up
// to a second of CPU at high costs, and anyone can make us run it (an
// unknown client_id or a wrong secret): without the bound, a flood of bad
// credentials takes every core from the middleware. A check that finds no
// slot within bcryptWait is refused with KindUnavailable (503, Retry-After).
func (c *Clients) compareHash(ctx context.Context, hash []byte, secret string) (bool, *Error) {
	timer := time.NewTimer(c.bcryptWait)
	defer timer.Stop()
	select {
	case c.bcryptSlots <- struct{}{}:
	case <-timer.C:
		return false, &Error{Kind: KindUnavailable, Reason: "secret_checks_busy",
			Description: "too many client authentications in progress; retry later", RetryAfter: secretCheckRetryAfter}
	case <-ctx.Done():
		return false, &Error{Kind: KindUnavailable, Reason: "canceled", Description: "request canceled", RetryAfter: secretCheckRetryAfter}
	}
	defer func() { <-c.bcryptSlots }()
	return bcrypt.CompareHashAndPassword(hash, []byte(secret)) == nil, nil
}

// dummyCompare runs one bcrypt comparison at the highest configured cost
// against a hash no secret matches.
func (c *Clients) dummyCompare(ctx context.Context, secret string) *Error {
	if c.maxCost == 0 {
		return nil // no secret clients: nothing to hide
	}
	c.dummyOnce.Do(func() {
		var pw [32]byte
		_, _ = rand.Read(pw[:])
		c.dummyHash, _ = bcrypt.GenerateFromPassword([]byte(base64.RawURLEncoding.EncodeToString(pw[:])), c.maxCost)
	})
	if c.dummyHash == nil {
		return nil
	}
	_, err := c.compareHash(ctx, c.dummyHash, secret)
	return err
}

// secretCache remembers successful secret checks, because bcrypt costs tens
// of milliseconds. Its keys are HMAC-SHA256 under a per-process random key
// over (client_id, stored hash, secret): nothing in memory is a fast hash of
// a secret that could be brute-forced offline.
type secretCache struct {
	mu  sync.RWMutex
	mac []byte
	m   map[[sha256.Size]byte]struct{}
	max int
}

func newSecretCache(size int) (*secretCache, error) {
	s := &secretCache{mac: make([]byte, 32), m: make(map[[sha256.Size]byte]struct{}), max: size}
	if _, err := rand.Read(s.mac); err != nil {
		return nil, fmt.Errorf("seeding the secret cache: %w", err)
	}
	return s, nil
}

func (s *secretCache) key(clientID string, hash []byte, secret string) [sha256.Size]byte {
	h := hmac.New(sha256.New, s.mac)
	var n [8]byte
	for _, part := range [][]byte{[]byte(clientID), hash, []byte(secret)} {
		binary.BigEndian.PutUint64(n[:], uint64(len(part)))
		h.Write(n[:])
		h.Write(part)
	}
	var out [sha256.Size]byte
	h.Sum(out[:0])
	return out
}

func (s *secretCache) has(k [sha256.Size]byte) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	_, ok := s.m[k]
	return ok
}

func (s *secretCache) add(k [sha256.Size]byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.m) >= s.max {
		// Drop one entry at random (map order); losing a success only
		// costs one more bcrypt comparison.
		for old := range s.m {
			delete(s.m, old)
			break
		}
	}
	s.m[k] = struct{}{}
}

func (s *secretCache) len() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.m)
}
