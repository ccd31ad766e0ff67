package caddymodule

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// Issuer faults of issue 6 §3, against a real HTTP JWKS server that
// misbehaves on demand, and config reloads of §4.

// fltMode is how the JWKS server answers.
type fltMode int32

const (
	fltOK      fltMode = iota
	fltDown            // 503
	fltReset           // the connection is closed without an answer
	fltSlow            // answers correctly, but only after fltJWKS.delay
	fltGarbage         // 200 with a body that is not JSON
	fltHuge            // 200 with a valid JWKS whose keys start past 1 MiB
	fltEmpty           // 200 with {"keys":[]}
)

var fltModeNames = map[fltMode]string{
	fltOK: "ok", fltDown: "down", fltReset: "connection reset", fltSlow: "slow",
	fltGarbage: "garbage", fltHuge: "huge body", fltEmpty: "empty key set",
}

// fltFailures are the faults, in the order the tests simulate them.
var fltFailures = []fltMode{fltDown, fltReset, fltSlow, fltGarbage, fltHuge, fltEmpty}

// fltJWKS serves the IdP's JWKS, or misbehaves, and counts every fetch.
type fltJWKS struct {
	*httptest.Server
	idp     *testidp.Issuer
	mode    atomic.Int32
	fetches atomic.Int64
	delay   time.Duration
	// hugeWrite records how a huge body ended: nil if the client read it
	// all, the write error if it hung up.
	mu        sync.Mutex
	hugeWrite []error
}

func newFltJWKS(t *testing.T, idp *testidp.Issuer, mode fltMode) *fltJWKS {
	s := &fltJWKS{idp: idp, delay: 3 * time.Second}
	s.mode.Store(int32(mode))
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.fetches.Add(1)
		switch fltMode(s.mode.Load()) {
		case fltDown:
			http.Error(w, "service unavailable", http.StatusServiceUnavailable)
			return
		case fltReset:
			if c, _, err := w.(http.Hijacker).Hijack(); err == nil {
				_ = c.Close()
			}
			return
		case fltSlow:
			select {
			case <-time.After(s.delay):
			case <-r.Context().Done():
				return
			}
		case fltGarbage:
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, "<html><body>502 Bad Gateway</body></html>")
			return
		case fltHuge:
			// A valid JWK Set whose keys only start after 2 MiB of padding:
			// a reader that stops at the cap never sees them.
			keys := string(s.idp.JWKS())
			body := `{"x-padding":"` + strings.Repeat("A", 2<<20) + `",` + strings.TrimPrefix(keys, "{")
			w.Header().Set("Content-Type", "application/json")
			_, err := io.WriteString(w, body)
			s.mu.Lock()
			s.hugeWrite = append(s.hugeWrite, err)
			s.mu.Unlock()
			return
		case fltEmpty:
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, `{"keys":[]}`)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(s.idp.JWKS())
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *fltJWKS) set(m fltMode) { s.mode.Store(int32(m)) }

type fltGateway struct {
	*gateway
	jwks *fltJWKS
}

// fltConfig is a gateway trusting idp through jwksURL, with a 1s JWKS fetch
// timeout, storage in storageDir, and audience as the route's audience. It
// proxies to upstream, or without one answers with the minted token itself.
func fltConfig(logFile, storageDir, jwksURL, refetch, audience, upstream string) string {
	next := "reverse_proxy " + strings.TrimPrefix(upstream, "http://")
	if upstream == "" {
		next = "respond {http.request.header.Authorization} 200"
	}
	return fmt.Sprintf(`{
%s	token_exchange {
		issuer %s
		jwks_fetch_timeout 1s
		trust https://idp.test {
			jwks_url %s
			audience https://gateway.test
			algorithms RS256 ES256
			refetch_interval %s
		}
	}
}
http://localhost:%d {
	route /api/* {
		token_exchange {
			audience %s
			scope orders.read
		}
		%s
	}
	handle /.well-known/jwks.json {
		token_exchange_jwks
	}
}
`, testGlobalOptions(logFile, storageDir), gatewayIssuer, jwksURL, refetch, gatewayPort, audience, next)
}

func startFaultGateway(t *testing.T, mode fltMode, refetch string) *fltGateway {
	t.Helper()
	idp := newTestIdP(t, "https://idp.test")
	s := newFltJWKS(t, idp, mode)
	upstream := newRecordingUpstream(t)
	f := newCaddyFixture(t)
	g := f.start(t, fltConfig(f.logFile, f.storage, s.URL+"/jwks.json", refetch, audOrders, upstream.URL), idp, upstream)
	fltWarmUp(t, g.tester)
	return &fltGateway{gateway: g, jwks: s}
}

// fltWarmUp waits until the freshly loaded config answers: right after a
// load, a connection may still land on the server being replaced.
func fltWarmUp(t *testing.T, tester *caddytest.Tester) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := tester.Client.Get(fmt.Sprintf("http://localhost:%d/.well-known/jwks.json", gatewayPort))
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the gateway does not answer after a config load: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// try sends tok through the middleware and returns the status, the
// WWW-Authenticate challenge and how long the answer took.
func (g *fltGateway) try(t *testing.T, tok string) (int, string, time.Duration) {
	t.Helper()
	start := time.Now()
	resp := g.get(t, "/api/orders", map[string]string{"Authorization": "Bearer " + tok})
	return resp.StatusCode, resp.Header.Get("WWW-Authenticate"), time.Since(start)
}

// eventually retries fresh tokens of kid until one is accepted or within is
// over.
func (g *fltGateway) eventually(t *testing.T, kid string, within time.Duration) bool {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		if status, _, _ := g.try(t, fltFresh(t, g.idp, kid)); status == http.StatusOK {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// fltFresh is a new token of the IdP signed with kid: a unique jti, so the
// gateway's cache of minted tokens can never answer for it and each
// acceptance proves the key is available.
func fltFresh(t *testing.T, idp *testidp.Issuer, kid string) string {
	t.Helper()
	var b [8]byte
	_, _ = rand.Read(b[:])
	return idp.Token(kid, testidp.Claims{"scope": "orders.read", "jti": hex.EncodeToString(b[:])})
}

// fltRandomKidToken is a well-formed ES256 token of the IdP's issuer under a
// kid nobody published.
func fltRandomKidToken(t *testing.T, idp *testidp.Issuer) string {
	t.Helper()
	var b [12]byte
	_, _ = rand.Read(b[:])
	return atkJWS(`{"alg":"ES256","kid":"`+hex.EncodeToString(b[:])+`"}`,
		atkClaims(map[string]any{"scope": "orders.read"}), atkES256(idp.PrivateKey("ec-1")))
}

func (g *fltGateway) logs(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(g.logFile)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

const fltFetchErrors = `caddy_token_exchange_jwks_fetches_total{issuer="https://idp.test",result="error"}`
const fltFetchOK = `caddy_token_exchange_jwks_fetches_total{issuer="https://idp.test",result="ok"}`

// TestFaultJWKSAtStartup: whatever the IdP's JWKS does at start-up, Caddy
// starts, the IdP's tokens are refused (fail closed, with a log line)
// without hanging, and accepted once proper keys are served. With no keys
// at all the IdP cannot answer, which is not the token's fault: 503 with
// Retry-After (DESIGN §6 failure rule), not 401.
func TestFaultJWKSAtStartup(t *testing.T) {
	for _, mode := range fltFailures {
		t.Run(fltModeNames[mode], func(t *testing.T) {
			g := startFaultGateway(t, mode, "1s")
			// Caddy is up: its own JWKS is served.
			if set := g.gatewayJWKS(t); set.Len() == 0 {
				t.Fatal("the gateway publishes no key")
			}
			before := g.metrics(t)
			tok := g.idp.Token("ec-1", testidp.Claims{"scope": "orders.read"})

			start := time.Now()
			resp := g.get(t, "/api/orders", map[string]string{"Authorization": "Bearer " + tok})
			took := time.Since(start)
			if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" ||
				strings.Contains(resp.Header.Get("WWW-Authenticate"), "invalid_token") {
				t.Fatalf("status %d, Retry-After %q, WWW-Authenticate %q while the JWKS is %s, want 503 with Retry-After",
					resp.StatusCode, resp.Header.Get("Retry-After"), resp.Header.Get("WWW-Authenticate"), fltModeNames[mode])
			}
			// The fetch timeout is 1s; the server sleeps 3s when slow.
			if took > 2500*time.Millisecond {
				t.Errorf("the refusal took %v: a bad JWKS must not hang requests", took)
			}
			// Within the refetch interval no new fetch is attempted: the
			// refusal is immediate, even for many concurrent requests.
			var wg sync.WaitGroup
			var slowest atomic.Int64
			for i := 0; i < 10; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					start := time.Now()
					req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://localhost:%d/api/orders", gatewayPort), nil)
					req.Header.Set("Authorization", "Bearer "+tok)
					resp, err := g.tester.Client.Do(req)
					if err != nil {
						t.Error(err)
						return
					}
					_ = resp.Body.Close()
					if resp.StatusCode != http.StatusServiceUnavailable {
						t.Errorf("concurrent request: status %d", resp.StatusCode)
					}
					if d := time.Since(start); int64(d) > slowest.Load() {
						slowest.Store(int64(d))
					}
				}()
			}
			wg.Wait()
			if d := time.Duration(slowest.Load()); d > 2500*time.Millisecond {
				t.Errorf("the slowest of 10 concurrent refusals took %v", d)
			}
			if g.upstream.calls() != 0 {
				t.Fatal("the upstream was called")
			}

			// Every one of these is a fault, an empty key set included.
			logs := g.logs(t)
			if !strings.Contains(logs, "JWKS fetch failed") || !strings.Contains(logs, `"issuer":"https://idp.test"`) {
				t.Error("no log line says the IdP's JWKS could not be fetched")
			}
			if !strings.Contains(logs, `"reason":"keys_unavailable"`) {
				t.Error("no refusal logged with reason keys_unavailable")
			}
			after := g.metrics(t)
			if metricValue(after, fltFetchErrors) <= metricValue(before, fltFetchErrors) {
				t.Errorf("the failed fetch is not counted in %s", fltFetchErrors)
			}
			if mode == fltHuge {
				g.jwks.mu.Lock()
				results := append([]error(nil), g.jwks.hugeWrite...)
				g.jwks.mu.Unlock()
				if len(results) == 0 {
					t.Error("the huge JWKS was never fetched")
				}
			}

			// The IdP recovers: after one refetch interval its keys arrive.
			g.jwks.set(fltOK)
			start = time.Now()
			if !g.eventually(t, "ec-1", 6*time.Second) {
				t.Fatalf("still refused %v after the JWKS recovered", time.Since(start))
			}
			t.Logf("%s: refused in %v; accepted %v after recovery; %d fetches", fltModeNames[mode], took.Round(time.Millisecond),
				time.Since(start).Round(time.Millisecond), g.jwks.fetches.Load())
			if st, _, _ := g.try(t, fltFresh(t, g.idp, "rsa-1")); st != http.StatusOK {
				t.Errorf("RS256 token after recovery: %d", st)
			}
			g.assertNoTokenLogged(t, tok)
		})
	}
}

// TestFaultJWKSRefreshKeepsLastGoodKeys: once keys are known, a JWKS that
// starts failing at refresh does not take them away.
func TestFaultJWKSRefreshKeepsLastGoodKeys(t *testing.T) {
	g := startFaultGateway(t, fltOK, "1s")
	if !g.eventually(t, "ec-1", 5*time.Second) {
		t.Fatal("a valid token is refused with a healthy JWKS")
	}
	for _, mode := range fltFailures {
		t.Run(fltModeNames[mode], func(t *testing.T) {
			// Start from good keys: a forced refetch against a healthy server.
			g.jwks.set(fltOK)
			time.Sleep(1100 * time.Millisecond)
			_, _, _ = g.try(t, fltRandomKidToken(t, g.idp))
			if st, _, _ := g.try(t, fltFresh(t, g.idp, "ec-1")); st != http.StatusOK {
				t.Fatalf("could not restore good keys: %d", st)
			}

			// The JWKS fails; an unknown kid forces a refresh against it.
			g.jwks.set(mode)
			time.Sleep(1100 * time.Millisecond)
			fetches := g.jwks.fetches.Load()
			status, _, took := g.try(t, fltRandomKidToken(t, g.idp))
			if status != http.StatusUnauthorized {
				t.Fatalf("unknown kid: status %d", status)
			}
			if g.jwks.fetches.Load() == fetches {
				t.Fatal("no refresh was attempted against the failing JWKS")
			}
			if took > 2500*time.Millisecond {
				t.Errorf("the forced refresh held the request %v", took)
			}

			// The last good keys are still in use: new tokens (never seen,
			// so never cached) of both known kids verify.
			for _, kid := range []string{"ec-1", "rsa-1"} {
				if st, ch, _ := g.try(t, fltFresh(t, g.idp, kid)); st != http.StatusOK {
					t.Errorf("new token of the known kid %s: %d %s after the JWKS turned %s", kid, st, ch, fltModeNames[mode])
				}
			}
		})
	}
	g.jwks.set(fltOK)
}

// TestFaultKeyRotationAndKidFlood: a new key of the IdP is picked up by one
// throttled refetch; a flood of tokens with random kids costs at most one
// fetch per refetch interval.
func TestFaultKeyRotationAndKidFlood(t *testing.T) {
	const interval = 2 * time.Second
	g := startFaultGateway(t, fltOK, "2s")
	if !g.eventually(t, "ec-1", 5*time.Second) {
		t.Fatal("a valid token is refused with a healthy JWKS")
	}
	time.Sleep(interval + 100*time.Millisecond) // no refetch in the current interval

	// Rotation: the IdP publishes a new key and signs with it.
	g.idp.AddKey("ec-2", "ES256")
	rotated := fltFresh(t, g.idp, "ec-2")
	before := g.metrics(t)
	f0 := g.jwks.fetches.Load()
	if st, ch, _ := g.try(t, rotated); st != http.StatusOK {
		t.Fatalf("token of the rotated key: %d %s", st, ch)
	}
	if n := g.jwks.fetches.Load() - f0; n != 1 {
		t.Errorf("rotation cost %d fetches, want 1", n)
	}
	if got := metricValue(g.metrics(t), fltFetchOK) - metricValue(before, fltFetchOK); got != 1 {
		t.Errorf("%s rose by %v, want 1", fltFetchOK, got)
	}

	flood := func(t *testing.T) (int64, time.Duration) {
		t.Helper()
		tokens := make(chan string, 100)
		for i := 0; i < 100; i++ {
			tokens <- fltRandomKidToken(t, g.idp)
		}
		close(tokens)
		f := g.jwks.fetches.Load()
		start := time.Now()
		var wg sync.WaitGroup
		for w := 0; w < 10; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for tok := range tokens {
					req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://localhost:%d/api/orders", gatewayPort), nil)
					req.Header.Set("Authorization", "Bearer "+tok)
					resp, err := g.tester.Client.Do(req)
					if err != nil {
						t.Error(err)
						return
					}
					_ = resp.Body.Close()
					if resp.StatusCode != http.StatusUnauthorized {
						t.Errorf("random kid: status %d", resp.StatusCode)
					}
				}
			}()
		}
		wg.Wait()
		return g.jwks.fetches.Load() - f, time.Since(start)
	}
	allowed := func(d time.Duration) int64 { return 1 + int64(d/interval) }

	// Right after the rotation's refetch: the flood is throttled.
	n, took := flood(t)
	t.Logf("flood of 100 random kids right after a refetch: %d fetches in %v", n, took.Round(time.Millisecond))
	if n > allowed(took)-1 {
		t.Errorf("%d fetches for 100 random kids within %v of a refetch (interval %v)", n, took, interval)
	}
	// In a fresh interval: one refetch, not a hundred.
	time.Sleep(interval + 100*time.Millisecond)
	n, took = flood(t)
	t.Logf("flood of 100 random kids in a fresh interval: %d fetches in %v", n, took.Round(time.Millisecond))
	if n < 1 || n > allowed(took) {
		t.Errorf("%d fetches for 100 random kids in %v, want 1 (at most %d)", n, took, allowed(took))
	}
	for _, kid := range []string{"ec-1", "ec-2"} {
		if st, _, _ := g.try(t, fltFresh(t, g.idp, kid)); st != http.StatusOK {
			t.Errorf("new token of %s after the flood: %d", kid, st)
		}
	}
	t.Logf("issuer JWKS fetched %d times in all", g.jwks.fetches.Load())
}

// TestReloadKeepsSigningKeyAndGoroutines: config reloads (through the admin
// API, as caddytest loads configs) keep the signing key kept in storage, and
// do not leave JWKS refreshers or other goroutines behind.
func TestReloadKeepsSigningKeyAndGoroutines(t *testing.T) {
	idp := testidp.New(t, "https://idp.test")
	idp.AddKey("ec-1", "ES256")
	storage := t.TempDir()
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	tester := caddytest.NewTester(t)
	g := &gateway{tester: tester, idp: idp, logFile: logFile}
	// No reverse_proxy here: its per-config transports keep idle upstream
	// connections (and their goroutines) open for their keep-alive time,
	// which is Caddy's behaviour, not ours. The route answers with the
	// minted token instead.
	load := func(i int) (minted string) {
		t.Helper()
		aud := fmt.Sprintf("https://orders-%d.internal", i)
		tester.InitServer(fltConfig(logFile, storage, idp.JWKSURL(), "1s", aud, ""), "caddyfile")
		fltWarmUp(t, tester)
		tok := idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "jti": fmt.Sprintf("reload-%d", i)})
		deadline := time.Now().Add(5 * time.Second)
		for {
			req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://localhost:%d/api/x", gatewayPort), nil)
			req.Header.Set("Authorization", "Bearer "+tok)
			resp, err := tester.Client.Do(req)
			status := 0
			if err == nil {
				body, _ := io.ReadAll(resp.Body)
				_ = resp.Body.Close()
				if status = resp.StatusCode; status == http.StatusOK {
					minted = strings.TrimPrefix(string(body), "Bearer ")
					break
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("config %d: status %d, error %v", i, status, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
		m, err := jwt.ParseInsecure([]byte(minted))
		if err != nil {
			t.Fatalf("config %d answered %q: %v", i, minted, err)
		}
		if a, _ := m.Audience(); len(a) != 1 || a[0] != aud {
			t.Fatalf("config %d is not the one serving: minted aud %v", i, a)
		}
		return minted
	}
	kids := func() []string {
		set := g.gatewayJWKS(t)
		var out []string
		for i := 0; i < set.Len(); i++ {
			k, _ := set.Key(i)
			kid, _ := k.KeyID()
			out = append(out, kid)
		}
		return out
	}

	minted0 := load(0)
	kid0 := kids()
	if len(kid0) == 0 || kid0[0] == "" {
		t.Fatalf("gateway JWKS kids %v", kid0)
	}

	load(1)
	if kid1 := kids(); strings.Join(kid1, ",") != strings.Join(kid0, ",") {
		t.Fatalf("kids %v after a reload, want %v: the signing key did not persist", kid1, kid0)
	}
	// What was minted before the reload still verifies against the JWKS
	// published after it.
	if _, err := jwt.Parse([]byte(minted0), jwt.WithKeySet(g.gatewayJWKS(t), jws.WithRequireKid(true)), jwt.WithValidate(false)); err != nil {
		t.Fatalf("a token minted before the reload does not verify after it: %v", err)
	}

	settle := func() int {
		tester.Client.CloseIdleConnections()
		http.DefaultClient.CloseIdleConnections()
		time.Sleep(300 * time.Millisecond)
		runtime.GC()
		return runtime.NumGoroutine()
	}
	base := settle()
	const reloads, slack = 5, 8
	for i := 2; i < 2+reloads; i++ {
		load(i)
	}
	if got := kids(); strings.Join(got, ",") != strings.Join(kid0, ",") {
		t.Errorf("kids %v after %d reloads, want %v", got, reloads+1, kid0)
	}
	var after int
	deadline := time.Now().Add(5 * time.Second)
	for {
		after = settle()
		if after <= base+slack || time.Now().After(deadline) {
			break
		}
	}
	t.Logf("goroutines: %d before %d reloads, %d after", base, reloads, after)
	// Exactly one JWKS refresher runs: the IdP's, shared by every config
	// that used its URL and handed from one to the next.
	if n := fltKeySourceRefreshers(); n != 1 {
		t.Errorf("%d JWKS refreshers running after %d reloads, want 1", n, reloads+1)
	}
	if after > base+slack {
		buf := make([]byte, 1<<20)
		n := runtime.Stack(buf, true)
		t.Errorf("goroutines grew from %d to %d over %d reloads (slack %d): leak?\n%s", base, after, reloads, slack, fltSummarizeStacks(string(buf[:n])))
	}
	g.assertNoTokenLogged(t, minted0)
}

// fltKeySourceRefreshers counts the running JWKS refreshers: the background
// loops of key sources.
func fltKeySourceRefreshers() int {
	buf := make([]byte, 4<<20)
	dump := string(buf[:runtime.Stack(buf, true)])
	n := 0
	for _, g := range strings.Split(dump, "\n\n") {
		if strings.Contains(g, "exchange.(*KeySource).run(") {
			n++
		}
	}
	return n
}

// fltSummarizeStacks counts goroutines by the function they were created by.
func fltSummarizeStacks(dump string) string {
	counts := map[string]int{}
	for _, g := range strings.Split(dump, "\n\n") {
		if i := strings.Index(g, "created by "); i >= 0 {
			line, _, _ := strings.Cut(g[i:], "\n")
			counts[line]++
		}
	}
	var b strings.Builder
	for line, n := range counts {
		if n > 1 {
			fmt.Fprintf(&b, "%4d %s\n", n, line)
		}
	}
	return b.String()
}
