package exchange

import (
	"context"
	"crypto"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"sync"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"go.uber.org/zap"
)

// Signing keys shared by every gateway instance that shares a storage, with
// rotation that publishes a key before it signs and keeps a retired key
// published until the last token it signed has expired. Learned from
// Caddy's caddytls/distributedstek, minus its flaw: a failed check always
// re-arms its timer here.

// Defaults of the key set.
const (
	// DefaultKeyPublishAhead is how long a new key is published before it
	// signs: verifiers that cache a JWKS on their own schedule (jose's
	// remote key set 10 min, jwx/httprc up to 15 min) have fetched it by then.
	DefaultKeyPublishAhead = time.Hour
	// defaultKeySetRecheck is the longest an instance goes without
	// re-reading the key set.
	defaultKeySetRecheck = time.Minute
	keySetMinWait        = 100 * time.Millisecond
)

// KeySetConfig configures a KeySet.
type KeySetConfig struct {
	// Issuer owns the key set: key sets are kept per issuer in storage.
	Issuer string
	// Alg is what new keys are made for; a change goes through rotation.
	Alg string
	// Rotation is the interval between new keys; 0: keys never rotate.
	Rotation time.Duration
	// PublishAhead is how long a new key is published before it signs
	// (default DefaultKeyPublishAhead).
	PublishAhead time.Duration
	// TokenLifetime and ClockSkew bound how long a retired key must stay
	// published: until every token it signed has expired.
	TokenLifetime, ClockSkew time.Duration
	// Storage is shared by every instance of the cluster.
	Storage KeyStorage
	// Recheck is the longest time between two reads of the key set
	// (default one minute); transitions are also read when they are due.
	Recheck time.Duration
	// OnChange is told of every new signer (the key that signs and the keys
	// published next to it). It is called before Start returns.
	OnChange func(*Signer)
	// OnError, if set, is told of every failed read or write of the key
	// set in storage (for metrics); each is retried.
	OnError func(error)
	Now     func() time.Time
	Logger  *zap.Logger
}

// KeySet keeps the cluster's signing keys in storage and follows them.
type KeySet struct {
	cfg  KeySetConfig
	name string

	mu     sync.Mutex
	signer *Signer
	stop   context.CancelFunc
	done   chan struct{}
}

// storedKey is one key of the key-set document. Times are Unix seconds;
// 0 means unset (no end).
type storedKey struct {
	KID          string          `json:"kid"`
	Alg          string          `json:"alg"`
	Created      int64           `json:"created"`
	SignFrom     int64           `json:"sign_from"`
	SignUntil    int64           `json:"sign_until,omitempty"`
	PublishUntil int64           `json:"publish_until,omitempty"`
	Key          json.RawMessage `json:"key"`
}

// keySetDoc is the document in storage, changed only under its lock.
type keySetDoc struct {
	Issuer string      `json:"issuer"`
	Keys   []storedKey `json:"keys"`
}

func (d *keySetDoc) clone() *keySetDoc {
	c := *d
	c.Keys = append([]storedKey(nil), d.Keys...)
	return &c
}

var errNoSigningKey = errors.New("the key set has no key that signs now")

// KeySetStorageKey is where an issuer's key set lives in storage: a hash of
// the issuer, so two gateways sharing a storage never share keys.
func KeySetStorageKey(issuer string) string {
	sum := sha256.Sum256([]byte(issuer))
	return "token_exchange/issuers/" + hex.EncodeToString(sum[:16]) + "/keyset.json"
}

// NewKeySet checks the configuration; it touches no storage until Start.
func NewKeySet(cfg KeySetConfig) (*KeySet, error) {
	if cfg.Issuer == "" {
		return nil, errors.New("key set: issuer is required")
	}
	if err := CheckSigningAlgorithm(cfg.Alg); err != nil {
		return nil, err
	}
	if cfg.Storage == nil {
		return nil, errors.New("key set: storage is required")
	}
	if cfg.Rotation < 0 || cfg.PublishAhead < 0 {
		return nil, errors.New("key set: durations must not be negative")
	}
	if cfg.PublishAhead == 0 {
		cfg.PublishAhead = DefaultKeyPublishAhead
	}
	if cfg.Rotation > 0 && cfg.Rotation <= cfg.PublishAhead {
		return nil, fmt.Errorf("key_rotation (%s) must be longer than key_publish_ahead (%s)", cfg.Rotation, cfg.PublishAhead)
	}
	if cfg.TokenLifetime <= 0 {
		cfg.TokenLifetime = DefaultTokenLifetime
	}
	if cfg.ClockSkew <= 0 {
		cfg.ClockSkew = DefaultClockSkew
	}
	if cfg.Recheck <= 0 {
		cfg.Recheck = defaultKeySetRecheck
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	return &KeySet{cfg: cfg, name: KeySetStorageKey(cfg.Issuer)}, nil
}

// Start reads (on first start: creates) the key set, hands its signer to
// OnChange, and follows the key set until Stop.
func (ks *KeySet) Start(ctx context.Context) (*Signer, error) {
	next, err := ks.sync(ctx, false)
	if err != nil {
		return nil, err
	}
	lctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	ks.mu.Lock()
	ks.stop, ks.done = cancel, make(chan struct{})
	signer := ks.signer
	ks.mu.Unlock()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); ks.loop(lctx, next, ks.refresh) }()
	go func() { defer wg.Done(); ks.loop(lctx, next, ks.maintain) }()
	go func() { wg.Wait(); close(ks.done) }()
	return signer, nil
}

// Stop ends the following; it waits for a sync in progress.
func (ks *KeySet) Stop() {
	ks.mu.Lock()
	stop, done := ks.stop, ks.done
	ks.stop = nil
	ks.mu.Unlock()
	if stop != nil {
		stop()
		<-done
	}
}

// Signer is the current signer (nil before Start).
func (ks *KeySet) Signer() *Signer {
	ks.mu.Lock()
	defer ks.mu.Unlock()
	return ks.signer
}

// Rotate adds a new key now. Normally it is published first and signs only
// after PublishAhead, as scheduled rotations do. With immediate (for a
// compromised key) the new key signs at once and every other key is
// withdrawn at once: tokens they signed stop verifying.
func (ks *KeySet) Rotate(ctx context.Context, immediate bool) error {
	_, err := ks.sync(ctx, true, func(doc *keySetDoc, now time.Time) error {
		if immediate {
			k, err := ks.newKey(now, now.Truncate(time.Second))
			if err != nil {
				return err
			}
			doc.Keys = []storedKey{k}
			return nil
		}
		return ks.addSuccessor(doc, now, true)
	})
	return err
}

// loop runs step when a transition is due and at least every Recheck;
// after an error it retries with backoff. It always re-arms. Two loops run:
// refresh only reads (so a slow storage lock never leaves an instance
// behind the cluster), maintain makes the changes that are due.
func (ks *KeySet) loop(ctx context.Context, next time.Time, step func(context.Context) (time.Time, error)) {
	backoff := time.Duration(0)
	for {
		wait := ks.cfg.Recheck
		if backoff > 0 {
			wait = backoff
		} else if !next.IsZero() {
			wait = min(wait, next.Sub(ks.cfg.Now()))
		}
		wait = max(wait, keySetMinWait)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		n, err := step(sctx)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			if ks.cfg.OnError != nil {
				ks.cfg.OnError(err)
			}
			backoff = min(max(2*backoff, time.Second), ks.cfg.Recheck)
			ks.cfg.Logger.Error("the signing key set could not be read or updated; the current key keeps signing, retrying",
				zap.String("issuer", ks.cfg.Issuer), zap.Duration("retry_in", backoff), zap.Error(err))
			continue
		}
		backoff, next = 0, n
	}
}

// refresh reads the key set and follows it; it never locks.
func (ks *KeySet) refresh(ctx context.Context) (time.Time, error) {
	doc, err := ks.load(ctx)
	if err != nil || doc == nil {
		return time.Time{}, err
	}
	return ks.use(doc, ks.cfg.Now())
}

// maintain makes the changes that are due, under the storage lock.
func (ks *KeySet) maintain(ctx context.Context) (time.Time, error) {
	return ks.sync(ctx, false)
}

// sync reads the key set, follows it at once, and when it needs a change
// (first key, a due rotation, keys past publish_until), changes it under
// the storage lock: lock, load, decide, store, unlock. Locks are for rare
// work: when nothing is due, it only reads. It returns the next transition.
func (ks *KeySet) sync(ctx context.Context, force bool, edits ...func(*keySetDoc, time.Time) error) (time.Time, error) {
	now := ks.cfg.Now()
	var next time.Time
	if !force {
		doc, err := ks.load(ctx)
		if err != nil {
			return time.Time{}, err
		}
		if doc != nil {
			// Follow what is stored before deciding anything, so a slow
			// lock never leaves this instance behind the cluster.
			if next, err = ks.use(doc.clone(), now); err != nil && !errors.Is(err, errNoSigningKey) {
				return time.Time{}, err
			}
			if !ks.plan(doc, now) {
				return next, err
			}
		}
	}
	if err := ks.cfg.Storage.Lock(ctx, ks.name); err != nil {
		return time.Time{}, fmt.Errorf("locking the key set: %w", err)
	}
	defer func() { _ = ks.cfg.Storage.Unlock(context.WithoutCancel(ctx), ks.name) }()
	doc, err := ks.load(ctx)
	if err != nil {
		return time.Time{}, err
	}
	now = ks.cfg.Now()
	if doc == nil {
		if doc, err = ks.legacy(ctx, now); err != nil {
			return time.Time{}, err
		}
	}
	known := make(map[string]bool, len(doc.Keys))
	for _, k := range doc.Keys {
		known[k.KID] = true
	}
	for _, edit := range edits {
		if err := edit(doc, now); err != nil {
			return time.Time{}, err
		}
	}
	ks.plan(doc, now)
	if err := ks.ensureSigning(doc, now); err != nil {
		return time.Time{}, err
	}
	data, err := json.Marshal(doc)
	if err != nil {
		return time.Time{}, err
	}
	if err := ks.cfg.Storage.Store(ctx, ks.name, data); err != nil {
		return time.Time{}, fmt.Errorf("storing the key set: %w", err)
	}
	// A transition of the cluster's key set: logged once, by the instance
	// that made it.
	for _, k := range doc.Keys {
		if k.Created == now.Unix() && !known[k.KID] {
			ks.cfg.Logger.Info("signing key added to the key set", zap.String("issuer", ks.cfg.Issuer),
				zap.String("kid", k.KID), zap.Time("sign_from", time.Unix(k.SignFrom, 0)))
		}
	}
	return ks.use(doc, now)
}

func (ks *KeySet) load(ctx context.Context) (*keySetDoc, error) {
	data, err := ks.cfg.Storage.Load(ctx, ks.name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("loading the key set: %w", err)
	}
	var doc keySetDoc
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("the key set in storage at %s is corrupt: %w", ks.name, err)
	}
	if doc.Issuer != ks.cfg.Issuer {
		return nil, fmt.Errorf("the key set at %s belongs to %q, not %q", ks.name, doc.Issuer, ks.cfg.Issuer)
	}
	return &doc, nil
}

// legacy starts the key set of a storage written by an earlier version,
// which kept one key per algorithm whatever the issuer: that key becomes
// the issuer's current one, so a rolling upgrade keeps its kid.
func (ks *KeySet) legacy(ctx context.Context, now time.Time) (*keySetDoc, error) {
	doc := &keySetDoc{Issuer: ks.cfg.Issuer}
	data, err := ks.cfg.Storage.Load(ctx, signingKeyStorageKey(ks.cfg.Alg))
	if errors.Is(err, fs.ErrNotExist) {
		return doc, nil
	}
	if err != nil {
		return nil, fmt.Errorf("loading the legacy signing key: %w", err)
	}
	key, err := jwk.ParseKey(data)
	if err != nil {
		return nil, fmt.Errorf("the legacy signing key is corrupt: %w", err)
	}
	kid, _ := key.KeyID()
	if _, err := NewSigner(key, ks.cfg.Alg); err != nil {
		return nil, fmt.Errorf("the legacy signing key: %w", err)
	}
	// The legacy key was one per algorithm whatever the issuer: only the
	// first issuer to upgrade takes it over; any other gets its own key.
	marker := signingKeyStorageKey(ks.cfg.Alg) + ".imported_by"
	switch by, err := ks.cfg.Storage.Load(ctx, marker); {
	case err == nil && string(by) != ks.cfg.Issuer:
		return doc, nil
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("loading the legacy key marker: %w", err)
	}
	if err := ks.cfg.Storage.Store(ctx, marker, []byte(ks.cfg.Issuer)); err != nil {
		return nil, fmt.Errorf("marking the legacy key: %w", err)
	}
	doc.Keys = append(doc.Keys, storedKey{KID: kid, Alg: ks.cfg.Alg, Created: now.Unix(), SignFrom: 0, Key: data})
	ks.cfg.Logger.Info("imported the signing key of an earlier version into the issuer's key set",
		zap.String("issuer", ks.cfg.Issuer), zap.String("kid", kid))
	return doc, nil
}

// active is the key that signs at now: the latest whose signing window
// holds now.
func active(doc *keySetDoc, now time.Time) *storedKey {
	var best *storedKey
	t := now.Unix()
	for i := range doc.Keys {
		k := &doc.Keys[i]
		if k.SignFrom <= t && (k.SignUntil == 0 || t < k.SignUntil) && (best == nil || k.SignFrom > best.SignFrom) {
			best = k
		}
	}
	return best
}

// successor is a key that will sign after cur.
func successor(doc *keySetDoc, cur *storedKey) *storedKey {
	for i := range doc.Keys {
		if doc.Keys[i].SignFrom > cur.SignFrom {
			return &doc.Keys[i]
		}
	}
	return nil
}

// plan applies the schedule to doc and tells whether it changed: keys past
// publish_until are dropped, a successor is added when the rotation (or a
// change of algorithm) calls for one, and a set with no signing key needs
// one (ensureSigning, under the lock).
func (ks *KeySet) plan(doc *keySetDoc, now time.Time) bool {
	changed := false
	t := now.Unix()
	kept := doc.Keys[:0]
	for _, k := range doc.Keys {
		if k.PublishUntil != 0 && k.PublishUntil <= t {
			changed = true
			continue
		}
		kept = append(kept, k)
	}
	doc.Keys = kept
	cur := active(doc, now)
	if cur == nil {
		return true
	}
	if successor(doc, cur) == nil {
		due := ks.cfg.Rotation > 0 && !now.Before(time.Unix(cur.SignFrom, 0).Add(ks.cfg.Rotation-ks.cfg.PublishAhead))
		if due || cur.Alg != ks.cfg.Alg {
			_ = ks.addSuccessor(doc, now, false)
			changed = true
		}
	}
	return changed
}

// addSuccessor publishes a new key that signs PublishAhead after every
// instance has published it (the other instances read it within Recheck),
// or later when the current key's interval ends, and retires the current
// key then; the retired key stays published until every token it signed
// has expired.
func (ks *KeySet) addSuccessor(doc *keySetDoc, now time.Time, asap bool) error {
	from := now.Add(ks.cfg.PublishAhead + ks.cfg.Recheck)
	cur := active(doc, now)
	if cur != nil && !asap && ks.cfg.Rotation > 0 && cur.Alg == ks.cfg.Alg {
		if end := time.Unix(cur.SignFrom, 0).Add(ks.cfg.Rotation); end.After(from) {
			from = end
		}
	}
	k, err := ks.newKey(now, from)
	if err != nil {
		return err
	}
	for i := range doc.Keys {
		o := &doc.Keys[i]
		if o.SignUntil == 0 || o.SignUntil > k.SignFrom {
			if o.SignFrom < k.SignFrom {
				o.SignUntil = k.SignFrom
			}
		}
		if o.SignUntil != 0 {
			o.PublishUntil = time.Unix(o.SignUntil, 0).Add(ks.cfg.TokenLifetime + ks.cfg.ClockSkew).Unix()
		}
	}
	doc.Keys = append(doc.Keys, k)
	return nil
}

// ensureSigning gives a set without a signing key one that signs now:
// the first start of an issuer.
func (ks *KeySet) ensureSigning(doc *keySetDoc, now time.Time) error {
	if active(doc, now) != nil {
		return nil
	}
	k, err := ks.newKey(now, now.Truncate(time.Second))
	if err != nil {
		return err
	}
	doc.Keys = append(doc.Keys, k)
	return nil
}

func (ks *KeySet) newKey(now, signFrom time.Time) (storedKey, error) {
	key, err := GenerateSigningKey(ks.cfg.Alg)
	if err != nil {
		return storedKey{}, err
	}
	if err := jwk.AssignKeyID(key); err != nil {
		return storedKey{}, err
	}
	kid, _ := key.KeyID()
	data, err := json.Marshal(key)
	if err != nil {
		return storedKey{}, err
	}
	// Times are whole seconds: round sign_from up, so that truncation never
	// shortens the time a key is published before it signs.
	from := signFrom.Unix()
	if signFrom.After(time.Unix(from, 0)) {
		from++
	}
	return storedKey{KID: kid, Alg: ks.cfg.Alg, Created: now.Unix(), SignFrom: from, Key: data}, nil
}

// use builds the signer of doc at now (the active key signs, every key in
// the set is published), hands it on when it changed, and returns the next
// transition.
func (ks *KeySet) use(doc *keySetDoc, now time.Time) (time.Time, error) {
	cur := active(doc, now)
	if cur == nil {
		return time.Time{}, errNoSigningKey
	}
	var published []storedKey
	for _, k := range doc.Keys {
		if k.KID != cur.KID {
			published = append(published, k)
		}
	}
	ks.mu.Lock()
	old := ks.signer
	ks.mu.Unlock()
	if old == nil || old.KeyID() != cur.KID || !sameKIDs(old.publishedKIDs, published) {
		signer, err := signerOf(*cur, published)
		if err != nil {
			return time.Time{}, err
		}
		ks.mu.Lock()
		ks.signer = signer
		ks.mu.Unlock()
		if old != nil && old.KeyID() != cur.KID {
			ks.cfg.Logger.Info("signing key changed", zap.String("issuer", ks.cfg.Issuer),
				zap.String("kid", cur.KID), zap.String("previous_kid", old.KeyID()))
		}
		if ks.cfg.OnChange != nil {
			ks.cfg.OnChange(signer)
		}
	}
	// The next transition: a key starts or stops signing, a retired key
	// leaves the JWKS, or the next rotation is due.
	var next time.Time
	consider := func(unix int64) {
		if t := time.Unix(unix, 0); unix != 0 && t.After(now) && (next.IsZero() || t.Before(next)) {
			next = t
		}
	}
	for _, k := range doc.Keys {
		consider(k.SignFrom)
		consider(k.SignUntil)
		consider(k.PublishUntil)
	}
	if ks.cfg.Rotation > 0 && successor(doc, cur) == nil {
		consider(time.Unix(cur.SignFrom, 0).Add(ks.cfg.Rotation - ks.cfg.PublishAhead).Unix())
	}
	return next, nil
}

func sameKIDs(have []string, keys []storedKey) bool {
	if len(have) != len(keys) {
		return false
	}
	want := make([]string, len(keys))
	for i, k := range keys {
		want[i] = k.KID
	}
	sort.Strings(want)
	for i := range want {
		if have[i] != want[i] {
			return false
		}
	}
	return true
}

// signerOf makes the signer of cur, publishing the other keys too.
func signerOf(cur storedKey, others []storedKey) (*Signer, error) {
	key, err := jwk.ParseKey(cur.Key)
	if err != nil {
		return nil, fmt.Errorf("key %s in the key set is corrupt: %w", cur.KID, err)
	}
	s, err := NewSigner(key, cur.Alg)
	if err != nil {
		return nil, err
	}
	s.since = time.Unix(cur.SignFrom, 0)
	for _, o := range others {
		k, err := jwk.ParseKey(o.Key)
		if err != nil {
			return nil, fmt.Errorf("key %s in the key set is corrupt: %w", o.KID, err)
		}
		var raw any
		if err := jwk.Export(k, &raw); err != nil {
			return nil, err
		}
		priv, ok := raw.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("key %s in the key set is not a private key", o.KID)
		}
		pub, err := jwk.Import(priv.Public())
		if err != nil {
			return nil, err
		}
		alg, _ := jwa.LookupSignatureAlgorithm(o.Alg)
		for name, v := range map[string]any{jwk.KeyIDKey: o.KID, jwk.AlgorithmKey: alg, jwk.KeyUsageKey: "sig"} {
			if err := pub.Set(name, v); err != nil {
				return nil, err
			}
		}
		if err := s.public.AddKey(pub); err != nil {
			return nil, err
		}
		s.publishedKIDs = append(s.publishedKIDs, o.KID)
	}
	sort.Strings(s.publishedKIDs)
	if s.jwks, err = json.Marshal(s.public); err != nil {
		return nil, err
	}
	return s, nil
}

// KeyInfo describes one key of the key set: public facts only, never key
// material.
type KeyInfo struct {
	KID string `json:"kid"`
	Alg string `json:"alg"`
	// State at the time asked: "signing" (the key that signs now),
	// "next" (published, signs from SignFrom) or "retired" (still
	// published so that tokens it signed verify, signs no more).
	State        string    `json:"state"`
	Created      time.Time `json:"created,omitzero"`
	SignFrom     time.Time `json:"sign_from,omitzero"`
	SignUntil    time.Time `json:"sign_until,omitzero"`
	PublishUntil time.Time `json:"publish_until,omitzero"`
}

// Keys reads the key set from storage (no lock, no change) and describes
// its keys as of now, in the stored order. It is nil before the first
// start created the set.
func (ks *KeySet) Keys(ctx context.Context) ([]KeyInfo, error) {
	doc, err := ks.load(ctx)
	if err != nil || doc == nil {
		return nil, err
	}
	now := ks.cfg.Now()
	cur := active(doc, now)
	unix := func(s int64) time.Time {
		if s == 0 {
			return time.Time{}
		}
		return time.Unix(s, 0).UTC()
	}
	infos := make([]KeyInfo, 0, len(doc.Keys))
	for _, k := range doc.Keys {
		state := "retired"
		switch {
		case cur != nil && k.KID == cur.KID:
			state = "signing"
		case k.SignFrom > now.Unix():
			state = "next"
		}
		infos = append(infos, KeyInfo{KID: k.KID, Alg: k.Alg, State: state, Created: unix(k.Created),
			SignFrom: unix(k.SignFrom), SignUntil: unix(k.SignUntil), PublishUntil: unix(k.PublishUntil)})
	}
	return infos, nil
}
