package exchange

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// ReplayStorage is the part of Caddy's storage (certmagic.Storage) that
// cluster-wide replay records need.
type ReplayStorage interface {
	KeyStorage
	Delete(ctx context.Context, key string) error
	List(ctx context.Context, path string, recursive bool) ([]string, error)
}

// storageReplay records used jti values in a storage shared by every
// instance, so an assertion accepted by one is refused by all.
//
// Storage has no create-if-absent, and its locks are meant for rare work,
// not short or contended ones. So each record takes the lock of one of 256
// buckets (by a hash of client and jti) for one Load and one Store: two
// instances checking the same jti serialise on its bucket; different jtis
// rarely meet. The records are few, because a jti is kept only until its
// assertion's iat window closes (max_assertion_age, default 5m), and expired
// records are swept now and then.
type storageReplay struct {
	storage ReplayStorage
	logger  *zap.Logger

	mu        sync.Mutex
	lastSweep time.Time
}

const (
	replayStoragePrefix = "token_exchange/replay"
	replaySweepEvery    = 5 * time.Minute
)

func replayRecordKey(clientID, jti string) (record, bucket string) {
	c := sha256.Sum256([]byte(clientID))
	j := sha256.Sum256([]byte(clientID + "\x00" + jti))
	return replayStoragePrefix + "/" + hex.EncodeToString(c[:8]) + "/" + hex.EncodeToString(j[:16]),
		replayStoragePrefix + "-lock-" + hex.EncodeToString(j[:1])
}

// record stores clientID+jti until until; errReplayed when it is there and
// live. A storage failure is an error: the caller fails closed.
func (s *storageReplay) record(ctx context.Context, clientID, jti string, until, now time.Time) error {
	key, bucket := replayRecordKey(clientID, jti)
	if err := s.storage.Lock(ctx, bucket); err != nil {
		return fmt.Errorf("locking the replay records: %w", err)
	}
	defer func() { _ = s.storage.Unlock(context.WithoutCancel(ctx), bucket) }()
	data, err := s.storage.Load(ctx, key)
	switch {
	case err == nil:
		if exp, perr := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64); perr != nil || now.Unix() < exp {
			return errReplayed
		}
	case !errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("loading a replay record: %w", err)
	}
	if err := s.storage.Store(ctx, key, []byte(strconv.FormatInt(until.Unix()+1, 10))); err != nil {
		return fmt.Errorf("storing a replay record: %w", err)
	}
	s.maybeSweep(now)
	return nil
}

// maybeSweep deletes expired records in the background, at most every few
// minutes per instance.
func (s *storageReplay) maybeSweep(now time.Time) {
	s.mu.Lock()
	due := now.Sub(s.lastSweep) >= replaySweepEvery
	if due {
		s.lastSweep = now
	}
	s.mu.Unlock()
	if !due {
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		keys, err := s.storage.List(ctx, replayStoragePrefix, true)
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				s.logger.Warn("sweeping replay records failed", zap.Error(err))
			}
			return
		}
		for _, k := range keys {
			data, err := s.storage.Load(ctx, k)
			if err != nil {
				continue
			}
			if exp, err := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64); err == nil && now.Unix() >= exp {
				_ = s.storage.Delete(ctx, k)
			}
		}
	}()
}
