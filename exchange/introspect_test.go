package exchange

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

func introIdP(t testing.TB) *testidp.Issuer {
	idp := testidp.New(t, "")
	idp.AddKey("ec-1", "ES256")
	idp.Introspection.ClientID, idp.Introspection.ClientSecret = "gateway", "s3cret"
	return idp
}

func introIssuer(idp *testidp.Issuer) IssuerConfig {
	ic := issuerConfig(idp, "ES256")
	ic.OpaqueTokens = true
	ic.Introspection = IntrospectionConfig{URL: idp.IntrospectionURL(), ClientID: "gateway", ClientSecret: "s3cret"}
	return ic
}

func TestIntrospectionConfigErrors(t *testing.T) {
	a, b := introIdP(t), introIdP(t)
	noCreds := introIssuer(a)
	noCreds.Introspection.ClientSecret = ""
	noOpaque := introIssuer(a)
	noOpaque.OpaqueTokens = false
	badAuth := introIssuer(a)
	badAuth.Introspection.AuthMethod = "tls_client_auth"
	noURL := introIssuer(a)
	noURL.Introspection.URL = ""
	for name, tc := range map[string]struct {
		issuers []IssuerConfig
		want    string
	}{
		"two opaque issuers": {[]IssuerConfig{introIssuer(a), introIssuer(b)}, "at most one"},
		"no credentials":     {[]IssuerConfig{noCreds}, "introspection_client_secret"},
		"no opaque_tokens":   {[]IssuerConfig{noOpaque}, "need opaque_tokens"},
		"bad auth method":    {[]IssuerConfig{badAuth}, "introspection_auth"},
		"no endpoint":        {[]IssuerConfig{noURL}, "introspection_url"},
	} {
		t.Run(name, func(t *testing.T) {
			ts, err := NewTrustStore(context.Background(), TrustConfig{Issuers: tc.issuers})
			if err == nil {
				_ = ts.Close()
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q, want %q", err, tc.want)
			}
		})
	}
}

// Concurrent requests for one new opaque token make one IdP call.
func TestIntrospectionSingleFlight(t *testing.T) {
	idp := introIdP(t)
	idp.Introspection.Delay = 200 * time.Millisecond
	idp.Introspection.Mode.Store(int32(testidp.IntrospectSlow))
	ts := newTestTrust(t, introIssuer(idp))
	tok := idp.Opaque(testidp.Claims{"scope": "a b"})
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := ts.Verify(context.Background(), tok, VerifyOptions{})
			if err == nil && (s.Subject != "alice" || strings.Join(s.Scopes, " ") != "a b") {
				t.Errorf("subject %+v", s)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := idp.Introspection.Calls.Load(); n != 1 {
		t.Fatalf("%d IdP calls for 50 concurrent requests with one token", n)
	}
	// presented as anything but an access token, an opaque token is refused
	_, err := ts.Verify(context.Background(), tok, VerifyOptions{TokenType: "jwt"})
	wantKind(t, err, KindInvalidToken, "token_type")
}

// A request that goes away does not cancel the call its waiters share.
func TestIntrospectionSurvivesCanceledRequest(t *testing.T) {
	idp := introIdP(t)
	idp.Introspection.Delay = 300 * time.Millisecond
	idp.Introspection.Mode.Store(int32(testidp.IntrospectSlow))
	ts := newTestTrust(t, introIssuer(idp))
	tok := idp.Opaque(nil)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := ts.Verify(ctx, tok, VerifyOptions{})
	wantKind(t, err, KindUnavailable, "canceled")
	if _, err := ts.Verify(context.Background(), tok, VerifyOptions{}); err != nil {
		t.Fatal(err)
	}
	if n := idp.Introspection.Calls.Load(); n != 1 {
		t.Fatalf("%d IdP calls, want the first call to be shared", n)
	}
}

// Cold: every token is new (one IdP call over loopback HTTP each). Warm:
// the same token, from the cache.
func BenchmarkIntrospection(b *testing.B) {
	idp := introIdP(b)
	ts := newTestTrust(b, introIssuer(idp))
	ctx := context.Background()
	b.Run("warm", func(b *testing.B) {
		tok := idp.Opaque(testidp.Claims{"scope": "a"})
		if _, err := ts.Verify(ctx, tok, VerifyOptions{}); err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if _, err := ts.Verify(ctx, tok, VerifyOptions{}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("cold", func(b *testing.B) {
		toks := make([]string, b.N)
		for i := range toks {
			toks[i] = idp.Opaque(testidp.Claims{"scope": "a"})
		}
		b.ReportAllocs()
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if _, err := ts.Verify(ctx, toks[i], VerifyOptions{}); err != nil {
				b.Fatal(err)
			}
		}
	})
}
