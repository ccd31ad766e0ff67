package exchange

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jwt"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
)

// fakeClock is a settable clock shared by several key sets.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func newTestKeySet(t *testing.T, storage KeyStorage, clock func() time.Time, rotation, ahead time.Duration) *KeySet {
	t.Helper()
	ks, err := NewKeySet(KeySetConfig{Issuer: "https://gateway.test", Alg: "ES256", Rotation: rotation, PublishAhead: ahead,
		TokenLifetime: time.Minute, ClockSkew: time.Second, Storage: storage, Now: clock, Recheck: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	return ks
}

func jwksKIDs(t *testing.T, s *Signer) []string {
	t.Helper()
	var doc struct{ Keys []struct{ Kid string } }
	if err := json.Unmarshal(s.JWKS(), &doc); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, k := range doc.Keys {
		out = append(out, k.Kid)
	}
	return out
}

// TestKeySetRotationPublishesBeforeUse follows one schedule step by step
// with a fake clock, through three instances sharing one storage directory.
func TestKeySetRotationPublishesBeforeUse(t *testing.T) {
	dir := t.TempDir()
	clock := &fakeClock{t: time.Unix(1_800_000_000, 0)}
	ctx := context.Background()
	var sets []*KeySet
	for i := 0; i < 3; i++ {
		// Separate storage handles on one shared directory, as separate
		// processes would have.
		ks := newTestKeySet(t, &certmagic.FileStorage{Path: dir}, clock.now, time.Hour, 10*time.Minute)
		if _, err := ks.sync(ctx, false); err != nil {
			t.Fatal(err)
		}
		sets = append(sets, ks)
	}
	first := sets[0].Signer().KeyID()
	for _, ks := range sets {
		if ks.Signer().KeyID() != first {
			t.Fatal("instances sign with different keys")
		}
	}
	// 49 minutes in: nothing is due yet.
	clock.advance(49 * time.Minute)
	if _, err := sets[1].sync(ctx, false); err != nil {
		t.Fatal(err)
	}
	if kids := jwksKIDs(t, sets[1].Signer()); len(kids) != 1 {
		t.Fatalf("JWKS %v before the successor is due", kids)
	}
	// 50 minutes in (rotation 60m - publish ahead 10m): the successor is
	// published, the first key still signs.
	clock.advance(time.Minute)
	for _, ks := range sets {
		if _, err := ks.sync(ctx, false); err != nil {
			t.Fatal(err)
		}
	}
	for i, ks := range sets {
		s := ks.Signer()
		if s.KeyID() != first || len(jwksKIDs(t, s)) != 2 {
			t.Fatalf("instance %d at +50m: signs with %s, publishes %v", i, s.KeyID(), jwksKIDs(t, s))
		}
	}
	second := jwksKIDs(t, sets[0].Signer())[1]
	// At +60m the first key still signs: the successor was published 10m
	// ahead plus the re-read interval (1m), so every instance has had it
	// for the whole publish-ahead time.
	clock.advance(10 * time.Minute)
	if _, err := sets[0].sync(ctx, false); err != nil {
		t.Fatal(err)
	}
	if s := sets[0].Signer(); s.KeyID() != first {
		t.Fatalf("at +60m the successor already signs")
	}
	// At +61m the successor signs; the first key stays published.
	clock.advance(time.Minute)
	for i, ks := range sets {
		if _, err := ks.sync(ctx, false); err != nil {
			t.Fatal(err)
		}
		if s := ks.Signer(); s.KeyID() != second || len(jwksKIDs(t, s)) != 2 {
			t.Fatalf("instance %d at +60m: signs with %s, publishes %v", i, s.KeyID(), jwksKIDs(t, s))
		}
	}
	// Past token lifetime + skew, the retired key leaves the JWKS.
	clock.advance(time.Minute + 2*time.Second)
	if _, err := sets[2].sync(ctx, false); err != nil {
		t.Fatal(err)
	}
	if kids := jwksKIDs(t, sets[2].Signer()); len(kids) != 1 || kids[0] != second {
		t.Fatalf("after retirement: %v", kids)
	}
}

// TestKeySetRotateNow: a manual rotation publishes first; --now (a
// compromised key) signs at once and withdraws every other key.
func TestKeySetRotateNow(t *testing.T) {
	storage := &certmagic.FileStorage{Path: t.TempDir()}
	clock := &fakeClock{t: time.Unix(1_800_000_000, 0)}
	ks := newTestKeySet(t, storage, clock.now, 0, 10*time.Minute)
	ctx := context.Background()
	if _, err := ks.sync(ctx, false); err != nil {
		t.Fatal(err)
	}
	old := ks.Signer().KeyID()
	if err := ks.Rotate(ctx, false); err != nil {
		t.Fatal(err)
	}
	if s := ks.Signer(); s.KeyID() != old || len(jwksKIDs(t, s)) != 2 {
		t.Fatalf("planned rotation: signs with %s (old %s), publishes %v", s.KeyID(), old, jwksKIDs(t, s))
	}
	if err := ks.Rotate(ctx, true); err != nil {
		t.Fatal(err)
	}
	s := ks.Signer()
	if kids := jwksKIDs(t, s); s.KeyID() == old || len(kids) != 1 || kids[0] != s.KeyID() {
		t.Fatalf("immediate rotation: signs with %s, publishes %v", s.KeyID(), kids)
	}
	// Without key_rotation nothing rotates on its own.
	clock.advance(1000 * time.Hour)
	if _, err := ks.sync(ctx, false); err != nil {
		t.Fatal(err)
	}
	if ks.Signer().KeyID() != s.KeyID() {
		t.Fatal("a key rotated without key_rotation")
	}
}

// TestKeySetPerIssuerAndLegacyImport: key sets are per issuer, and the key
// an earlier version stored per algorithm becomes the issuer's current key.
func TestKeySetPerIssuerAndLegacyImport(t *testing.T) {
	storage := &certmagic.FileStorage{Path: t.TempDir()}
	ctx := context.Background()
	legacy, err := LoadOrCreateSigner(ctx, storage, "ES256")
	if err != nil {
		t.Fatal(err)
	}
	a := newTestKeySet(t, storage, time.Now, 0, 0)
	sa, err := a.Start(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Stop()
	if sa.KeyID() != legacy.KeyID() {
		t.Fatalf("upgrade changed the kid: %s, was %s", sa.KeyID(), legacy.KeyID())
	}
	b, err := NewKeySet(KeySetConfig{Issuer: "https://other-gateway.test", Alg: "ES256", Storage: storage})
	if err != nil {
		t.Fatal(err)
	}
	sb, err := b.Start(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Stop()
	if sb.KeyID() == sa.KeyID() {
		t.Fatal("two issuers sharing a storage sign with the same key")
	}
}

// TestKeySetClusterRotationUnderLoad: three instances on one storage
// directory rotate every few seconds while tokens are minted through all of
// them; a verifier that caches the JWKS for up to the publish-ahead time
// (fetching it from a random instance) never fails a verification.
func TestKeySetClusterRotationUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("rotation under load takes seconds")
	}
	dir := t.TempDir()
	ctx := context.Background()
	const rotation, ahead = 2 * time.Second, 1 * time.Second
	var sets []*KeySet
	for i := 0; i < 3; i++ {
		ks, err := NewKeySet(KeySetConfig{Issuer: "https://gateway.test", Alg: "ES256", Rotation: rotation, PublishAhead: ahead,
			TokenLifetime: time.Second, ClockSkew: time.Second, Storage: &certmagic.FileStorage{Path: dir}, Recheck: 250 * time.Millisecond,
			Logger: zaptest.NewLogger(t).With(zap.Int("instance", i))})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ks.Start(ctx); err != nil {
			t.Fatal(err)
		}
		defer ks.Stop()
		sets = append(sets, ks)
	}
	pick := func() *KeySet {
		n, _ := rand.Int(rand.Reader, big.NewInt(int64(len(sets))))
		return sets[n.Int64()]
	}
	// The verifier caches a JWKS for up to the publish-ahead time.
	var cacheMu sync.Mutex
	var cached jwk.Set
	var fetchedAt time.Time
	verifierKeys := func() jwk.Set {
		cacheMu.Lock()
		defer cacheMu.Unlock()
		if cached == nil || time.Since(fetchedAt) >= ahead {
			set, err := jwk.Parse(pick().Signer().JWKS())
			if err != nil {
				t.Error(err)
			}
			cached, fetchedAt = set, time.Now()
		}
		return cached
	}
	var requests, failures atomic.Int64
	kidsSeen := sync.Map{}
	deadline := time.Now().Add(4*rotation + 500*time.Millisecond)
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				s := pick().Signer()
				tok, err := s.SignPayload([]byte(fmt.Sprintf(`{"iss":"https://gateway.test","sub":"alice","exp":%d}`, time.Now().Add(time.Second).Unix())))
				if err != nil {
					t.Error(err)
					return
				}
				kidsSeen.Store(s.KeyID(), true)
				requests.Add(1)
				keys := verifierKeys()
				if _, err := jwt.Parse([]byte(tok), jwt.WithKeySet(keys), jwt.WithValidate(false)); err != nil {
					if failures.Add(1) < 5 {
						var have []string
						for i := 0; i < keys.Len(); i++ {
							k, _ := keys.Key(i)
							kid, _ := k.KeyID()
							have = append(have, kid[:6])
						}
						t.Logf("kid %s not verified with the JWKS %v", s.KeyID(), have)
					}
				}
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	kids := 0
	kidsSeen.Range(func(any, any) bool { kids++; return true })
	t.Logf("rotation under load: %d tokens minted across 3 instances with %d signing keys, %d verification failures", requests.Load(), kids, failures.Load())
	if kids < 2 {
		t.Errorf("only %d signing key in %s: the set did not rotate", kids, 4*rotation)
	}
	if failures.Load() != 0 {
		t.Errorf("%d of %d verifications failed", failures.Load(), requests.Load())
	}
}

// TestCacheHonoursWithdrawnSigningKey: a cached exchange whose token was
// signed by a key the gateway no longer publishes (rotate --now) is minted
// anew; one whose key is still published (a scheduled rotation) is reused.
func TestCacheHonoursWithdrawnSigningKey(t *testing.T) {
	f := newEngineFixture(t, "ES256")
	tok := f.idp.Token(f.kid, claims{"scope": "orders.read"})
	grant, err := NewGrant(Grant{Audiences: []string{"https://orders.internal"}, Scopes: []string{"orders.read"}})
	if err != nil {
		t.Fatal(err)
	}
	first, err := f.engine.ExchangeBearer(context.Background(), tok, grant, nil)
	if err != nil {
		t.Fatal(err)
	}
	storage := &certmagic.FileStorage{Path: t.TempDir()}
	clock := &fakeClock{t: time.Now()}
	ks := newTestKeySet(t, storage, clock.now, 0, time.Minute)
	if _, err := ks.sync(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	// A new signer that also publishes the old key: the cache still serves.
	withOld, err := signerOf(storedKeyOf(t, ks), []storedKey{{KID: f.signer.KeyID(), Alg: "ES256", Key: privateJWK(t, f.signer)}})
	if err != nil {
		t.Fatal(err)
	}
	f.engine.SetSigner(withOld)
	again, err := f.engine.ExchangeBearer(context.Background(), tok, grant, nil)
	if err != nil || !again.Cached || again.JTI != first.JTI {
		t.Fatalf("old key still published: cached=%v err=%v", again != nil && again.Cached, err)
	}
	// The old key withdrawn: minted anew with the new key.
	f.engine.SetSigner(ks.Signer())
	fresh, err := f.engine.ExchangeBearer(context.Background(), tok, grant, nil)
	if err != nil {
		t.Fatal(err)
	}
	if fresh.Cached || fresh.JTI == first.JTI || fresh.SignerKID != ks.Signer().KeyID() {
		t.Fatalf("served a token signed by a withdrawn key: cached=%v kid=%s", fresh.Cached, fresh.SignerKID)
	}
}

func storedKeyOf(t *testing.T, ks *KeySet) storedKey {
	t.Helper()
	doc, err := ks.load(context.Background())
	if err != nil || doc == nil || len(doc.Keys) != 1 {
		t.Fatalf("key set %v: %v", doc, err)
	}
	return doc.Keys[0]
}

func privateJWK(t *testing.T, s *Signer) json.RawMessage {
	t.Helper()
	k, err := jwk.Import(s.private)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(k)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestKeySetStaleLockDoesNotStopOthers: an instance killed while holding
// the key set's lock leaves a lock file behind; once it is stale, the next
// instance proceeds.
func TestKeySetStaleLockDoesNotStopOthers(t *testing.T) {
	dir := t.TempDir()
	storage := &certmagic.FileStorage{Path: dir}
	name := KeySetStorageKey("https://gateway.test")
	lockFile := filepath.Join(dir, "locks", certmagic.StorageKeys.Safe(name)+".lock")
	if err := os.MkdirAll(filepath.Dir(lockFile), 0o700); err != nil {
		t.Fatal(err)
	}
	dead := time.Now().Add(-time.Minute)
	meta, _ := json.Marshal(map[string]any{"created": dead, "updated": dead})
	if err := os.WriteFile(lockFile, meta, 0o600); err != nil {
		t.Fatal(err)
	}
	ks := newTestKeySet(t, storage, time.Now, 0, time.Minute)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := ks.Start(ctx)
	if err != nil {
		t.Fatalf("a stale lock stopped the key set: %v", err)
	}
	defer ks.Stop()
	if s.KeyID() == "" {
		t.Fatal("no signing key")
	}
}
