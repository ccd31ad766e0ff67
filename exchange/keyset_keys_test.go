package exchange

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// TestKeySetKeysStates follows Keys through one rotation: before the first
// start, with one signing key, with a published successor, and after the
// switch; the JSON holds no key material.
func TestKeySetKeysStates(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1_800_000_000, 0)}
	ctx := context.Background()
	ks := newTestKeySet(t, &certmagic.FileStorage{Path: t.TempDir()}, clock.now, time.Hour, 10*time.Minute)
	if keys, err := ks.Keys(ctx); err != nil || keys != nil {
		t.Fatalf("before start: %v, %v", keys, err)
	}
	states := func() []KeyInfo {
		t.Helper()
		if _, err := ks.sync(ctx, false); err != nil {
			t.Fatal(err)
		}
		keys, err := ks.Keys(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return keys
	}
	keys := states()
	if len(keys) != 1 || keys[0].State != "signing" || keys[0].KID != ks.Signer().KeyID() || keys[0].Alg != "ES256" ||
		!keys[0].SignFrom.Equal(clock.now()) || !keys[0].SignUntil.IsZero() {
		t.Fatalf("one key: %+v", keys)
	}
	first := keys[0].KID
	clock.advance(50 * time.Minute)
	keys = states()
	if len(keys) != 2 || keys[0].State != "signing" || keys[1].State != "next" || !keys[1].SignFrom.After(clock.now()) {
		t.Fatalf("with a successor: %+v", keys)
	}
	second := keys[1].KID
	clock.advance(12 * time.Minute)
	keys = states()
	byKID := map[string]KeyInfo{}
	for _, k := range keys {
		byKID[k.KID] = k
	}
	if byKID[second].State != "signing" || byKID[first].State != "retired" || byKID[first].PublishUntil.IsZero() {
		t.Fatalf("after the switch: %+v", keys)
	}
	if ks.Signer().KeyID() != second {
		t.Fatal("Keys and Signer disagree on the signing key")
	}
	data, _ := json.Marshal(keys)
	for _, private := range []string{`"d"`, `"key"`, `"x"`} {
		if strings.Contains(string(data), private) {
			t.Fatalf("key info shows %s: %s", private, data)
		}
	}
}
