package exchange

import (
	"context"
	"testing"
	"time"
)

func TestExchangeBearerUsesCache(t *testing.T) {
	f := newEngineFixture(t, "ES256")
	ctx := context.Background()
	grant := &Grant{Audiences: []string{"https://orders.internal"}, Scopes: []string{"a"}}
	if err := grant.Validate(); err != nil {
		t.Fatal(err)
	}
	tok := f.idp.Token(f.kid, claims{"scope": "a"})
	first, err := f.engine.ExchangeBearer(ctx, tok, grant, nil)
	if err != nil {
		t.Fatal(err)
	}
	second, err := f.engine.ExchangeBearer(ctx, tok, grant, nil)
	if err != nil {
		t.Fatal(err)
	}
	if first.Cached || !second.Cached || second.Token != first.Token {
		t.Fatalf("second exchange of the same token should be a cache hit with the same token (cached=%v/%v)", first.Cached, second.Cached)
	}
	if hits, misses := f.engine.Cache().Stats(); hits != 1 || misses != 1 {
		t.Fatalf("hits %d misses %d", hits, misses)
	}

	// Another route's grant never shares the entry.
	other := &Grant{Audiences: []string{"https://billing.internal"}, Scopes: []string{"a"}}
	_ = other.Validate()
	m, err := f.engine.ExchangeBearer(ctx, tok, other, nil)
	if err != nil || m.Cached || m.Token == first.Token {
		t.Fatalf("another grant shared the cache entry (cached=%v, err=%v)", m.Cached, err)
	}
	// Nor does the same audience with other scopes or another mode.
	for _, g := range []*Grant{
		{Audiences: []string{"https://orders.internal"}, Scopes: []string{"a", "b"}},
		{Audiences: []string{"https://orders.internal"}, Scopes: []string{"a"}, Impersonate: true},
		{Audiences: []string{"https://orders.internal"}, Scopes: []string{"a"}, Claims: []string{"email"}},
	} {
		_ = g.Validate()
		if m, err := f.engine.ExchangeBearer(ctx, tok, g, nil); err != nil || m.Cached {
			t.Fatalf("grant %+v shared the cache entry", g)
		}
	}
}

func TestCachedExchangeDroppedWhenKeyLeavesJWKS(t *testing.T) {
	idp := newTestIssuer(t, "https://idp.test")
	idp.AddKey("old", "ES256")
	cfg := issuerConfig(idp, "ES256")
	cfg.RefetchInterval = time.Millisecond
	ts := newTestTrust(t, cfg)
	key, _ := GenerateSigningKey("ES256")
	signer, _ := NewSigner(key, "ES256")
	e, err := NewEngine(EngineConfig{Issuer: "https://gateway.test"}, ts, signer)
	if err != nil {
		t.Fatal(err)
	}
	grant := &Grant{Audiences: []string{"x"}}
	_ = grant.Validate()
	ctx := context.Background()
	tok := idp.Token("old", nil)
	if _, err := e.ExchangeBearer(ctx, tok, grant, nil); err != nil {
		t.Fatal(err)
	}
	if m, err := e.ExchangeBearer(ctx, tok, grant, nil); err != nil || !m.Cached {
		t.Fatalf("expected a hit: %v", err)
	}

	// The issuer withdraws the key (e.g. it was compromised) and we learn of it.
	idp.Withdraw("old")
	idp.AddKey("new", "ES256")
	time.Sleep(2 * time.Millisecond)
	ti := ts.issuers["https://idp.test"]
	ti.keys.refetch(ctx)

	if _, err := e.ExchangeBearer(ctx, tok, grant, nil); err == nil {
		t.Fatal("a token verified by a withdrawn key was still served from the cache")
	}
}

func TestGrantReadingRequestIsNotCached(t *testing.T) {
	f := newEngineFixture(t, "ES256")
	rules, err := CompileRules(RuleConfig{AllowIf: []string{`request.method == 'GET'`}})
	if err != nil {
		t.Fatal(err)
	}
	grant := &Grant{Audiences: []string{"x"}, Rules: rules}
	_ = grant.Validate()
	tok := f.idp.Token(f.kid, nil)
	ctx := context.Background()
	if _, err := f.engine.ExchangeBearer(ctx, tok, grant, &RequestInfo{Method: "GET"}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.engine.ExchangeBearer(ctx, tok, grant, &RequestInfo{Method: "DELETE"}); err == nil {
		t.Fatal("a request-dependent denial was bypassed by the cache")
	}
}

// TestGrantLiteralStillCaches: a grant built as a literal, never validated,
// used to lose caching silently (its cache identity was set by Validate);
// NewGrant is the constructor, and a literal is validated per call.
func TestGrantLiteralStillCaches(t *testing.T) {
	f := newEngineFixture(t, "ES256")
	tok := f.idp.Token(f.kid, claims{"scope": "orders.read"})
	literal := &Grant{Audiences: []string{"https://orders.internal"}, Scopes: []string{"orders.read"}}
	built, err := NewGrant(Grant{Audiences: []string{"https://billing.internal"}, Scopes: []string{"orders.read"}})
	if err != nil {
		t.Fatal(err)
	}
	for name, g := range map[string]*Grant{"literal": literal, "NewGrant": built} {
		first, err := f.engine.ExchangeBearer(context.Background(), tok, g, nil)
		if err != nil {
			t.Fatal(err)
		}
		second, err := f.engine.ExchangeBearer(context.Background(), tok, g, nil)
		if err != nil {
			t.Fatal(err)
		}
		if !second.Cached || second.JTI != first.JTI {
			t.Errorf("%s grant: second exchange not served from the cache", name)
		}
	}
	if _, err := NewGrant(Grant{Claims: []string{"sub"}}); err == nil {
		t.Error("NewGrant accepted a grant without audience")
	}
	if _, err := f.engine.ExchangeBearer(context.Background(), tok, &Grant{}, nil); AsError(err).Kind != KindServer {
		t.Errorf("an invalid literal grant: %v", err)
	}
}
