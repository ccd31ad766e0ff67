// Command loadbench measures, interleaved in rounds on loopback, what the
// token_exchange middleware and token endpoint cost against what users run
// without them. Scenarios (-scenarios selects a subset, by name):
//
//	plain           reverse_proxy, no Authorization header
//	passthrough     reverse_proxy, the same bearer forwarded unchanged
//	warm            token_exchange, warm cache (the same token every request)
//	miss            token_exchange, a new subject token every request
//	remote-self     token_exchange with sts = our token_exchange_endpoint in a
//	                second Caddy (same binary, same IdP, ES256 both sides);
//	                a new subject token every request
//	remote-zitadel  token_exchange with sts = the zitadel/oidc v3 example OP
//	                (internal/zitadelsts) in a third process; a new subject
//	                token every request
//	txn             warm cache plus a Transaction Token minted per request
//	endpoint-ours   POST straight to our token_exchange_endpoint (second Caddy),
//	                a new subject token per request
//	endpoint-zitadel POST straight to the zitadel OP's /oauth/token, likewise
//	                (the example's client: opaque access tokens)
//	endpoint-zitadel-jwt  the same with a client the OP issues JWT access
//	                tokens to (RS256, the example storage's RSA key)
//
// Round r runs every selected scenario once (warm-up, then measure), in an
// order rotated by r. Each scenario is reported with the medians over the
// rounds of req/s, p50 and p99, and the median of the per-round ratios to
// passthrough and to plain (both measured in the same round), next to the
// targets of issue 15. The upstream is a separate lean process: a net/http
// server answering 200 with a fixed 2-byte body whatever the headers.
//
//	go build -o /tmp/caddy-lb ./examples/caddy
//	go run ./examples/loadbench -caddy /tmp/caddy-lb [-duration 5s] [-rounds 3] [-conns 16]
//
// -log-level WARN drops the gateway's per-request info lines (INFO is
// Caddy's default and what users run).
//
// -rtt 1ms puts a userspace delay proxy (half the RTT each way, and one RTT
// for each new connection) in front of both remote token services, since
// this machine's kernel has no netem qdisc; see rtt.go.
//
// Everything listens on 127.0.0.1 only; every run stops by itself.
package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"
	"golang.org/x/crypto/bcrypt"
)

const (
	idpIssuer  = "https://idp.bench"
	gwAudience = "https://gateway.bench"
	apiAud     = "https://api.bench"
	stsClient  = "lb-gateway"
	// stsSecret is the remote STS client secret of both remote STSs.
	stsSecret = "lb-gateway-secret-0123456789"
	// bcryptCost is the cost of our endpoint's secret_hash: bcrypt's
	// default, what `caddy hash-password` makes.
	bcryptCost = bcrypt.DefaultCost
	roleEnv    = "LOADBENCH_ROLE"
)

var allScenarios = []string{"plain", "passthrough", "warm", "miss", "remote-self", "remote-zitadel", "txn", "endpoint-ours", "endpoint-zitadel", "endpoint-zitadel-jwt"}

type options struct {
	caddyBin           string
	duration, warmup   time.Duration
	conns, rounds      int
	scenarios          []string
	adminAddr, profile string
	profileScenario    string
	logLevel           string
	rtt                time.Duration
}

func main() {
	if role := os.Getenv(roleEnv); role != "" {
		serveRole(role)
		return
	}
	var o options
	var scen string
	flag.StringVar(&o.caddyBin, "caddy", "", "path to a caddy binary built from ./examples/caddy (required)")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "measured length of each scenario in each round")
	flag.DurationVar(&o.warmup, "warmup", 2*time.Second, "warm-up before each measured scenario")
	flag.IntVar(&o.conns, "conns", 16, "concurrent keep-alive connections of the load generator")
	flag.IntVar(&o.rounds, "rounds", 3, "rounds; each runs every scenario once, in a rotated order")
	flag.StringVar(&scen, "scenarios", strings.Join(allScenarios, ","), "comma-separated subset of: "+strings.Join(allScenarios, ","))
	flag.StringVar(&o.adminAddr, "admin", "off", "admin address of the gateway Caddy, e.g. 127.0.0.1:2019 (pprof during the run)")
	flag.StringVar(&o.profile, "profile", "", "with -admin: write a CPU profile of the gateway Caddy, taken during the last round's -profile-scenario, to this file")
	flag.StringVar(&o.profileScenario, "profile-scenario", "warm", "the scenario -profile profiles")
	flag.StringVar(&o.logLevel, "log-level", "INFO", "the gateway Caddy's log level (INFO is Caddy's default; WARN drops the per-request info lines)")
	flag.DurationVar(&o.rtt, "rtt", 0, "emulated round-trip time to both remote STSs (userspace delay proxy), e.g. 1ms; 0 = loopback")
	flag.Parse()
	if o.caddyBin == "" {
		log.Fatal("-caddy is required: go build -o /tmp/caddy-lb ./examples/caddy")
	}
	for _, s := range strings.Split(scen, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if !slices.Contains(allScenarios, s) {
			log.Fatalf("unknown scenario %q; known: %s", s, strings.Join(allScenarios, ","))
		}
		o.scenarios = append(o.scenarios, s)
	}
	if o.profile != "" && o.adminAddr == "off" {
		log.Fatal("-profile needs -admin")
	}
	if err := run(o); err != nil {
		log.Fatal(err)
	}
}

// serveRole runs a child process: the lean upstream or the zitadel STS.
func serveRole(role string) {
	ln, err := net.Listen("tcp", os.Getenv("LOADBENCH_ADDR"))
	if err != nil {
		log.Fatal(err)
	}
	switch role {
	case "upstream":
		log.Fatal(serveUpstream(ln))
	case "zitadel":
		log.Fatal(serveZitadel(ln, os.Getenv("LOADBENCH_JWKS")))
	default:
		log.Fatalf("unknown role %s", role)
	}
}

// serveUpstream answers 200 with a fixed body. It reads nothing of the
// request beyond what net/http parses, so its cost does not depend on the
// headers it receives (the bearer, or none).
func serveUpstream(ln net.Listener) error {
	body := []byte("ok")
	length := []string{strconv.Itoa(len(body))}
	ctype := []string{"text/plain"}
	return http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		h := w.Header()
		h["Content-Length"] = length
		h["Content-Type"] = ctype
		_, _ = w.Write(body)
	}))
}

type scenario struct {
	name string
	desc string
	hops int // HTTP hops a request makes (on a miss, for the exchange scenarios)
	req  func() (*http.Request, bool)
	miss bool // consumes a fresh subject token per request
}

type result struct {
	requests, errors int
	rps              float64
	p50, p99         time.Duration
	firstErr         string
}

func run(o options) error {
	dir, err := os.MkdirTemp("", "loadbench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	self, err := os.Executable()
	if err != nil {
		return err
	}

	// The test identity provider: an ES256 key; its JWKS in a file.
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	key, _ := jwk.Import(priv)
	_ = key.Set(jwk.KeyIDKey, "bench")
	pub, _ := jwk.PublicKeyOf(key)
	_ = pub.Set(jwk.AlgorithmKey, jwa.ES256())
	set := jwk.NewSet()
	_ = set.AddKey(pub)
	jwksPath := filepath.Join(dir, "jwks.json")
	if b, _ := json.Marshal(set); os.WriteFile(jwksPath, b, 0o600) != nil {
		return errors.New("writing JWKS")
	}

	var procsMu sync.Mutex
	var procs []*exec.Cmd
	stopAll := func() {
		procsMu.Lock()
		defer procsMu.Unlock()
		for _, p := range procs {
			_ = p.Process.Kill()
			_, _ = p.Process.Wait()
		}
		procs = nil
	}
	defer stopAll()
	// Interrupted: stop the child processes too, then exit.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sig
		stopAll()
		os.RemoveAll(dir)
		os.Exit(130)
	}()
	start := func(name string, cmd *exec.Cmd, port int) error {
		cmd.Stdout, cmd.Stderr = nil, nil // /dev/null
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		procsMu.Lock()
		procs = append(procs, cmd)
		procsMu.Unlock()
		return waitListening(port, 20*time.Second, name)
	}
	child := func(role string, port int, env ...string) *exec.Cmd {
		cmd := exec.Command(self)
		cmd.Env = append(os.Environ(), append(env, roleEnv+"="+role, fmt.Sprintf("LOADBENCH_ADDR=127.0.0.1:%d", port))...)
		return cmd
	}

	// The lean upstream, in its own process.
	upPort := freePort()
	if err := start("upstream", child("upstream", upPort), upPort); err != nil {
		return err
	}
	upstream := fmt.Sprintf("127.0.0.1:%d", upPort)

	// Caddy B: our token_exchange_endpoint, trusting the same IdP, ES256.
	hash, err := bcrypt.GenerateFromPassword([]byte(stsSecret), bcryptCost)
	if err != nil {
		return err
	}
	bPort := freePort()
	cfgB := fmt.Sprintf(`{
	admin off
	storage file_system %s
	token_exchange {
		issuer https://sts-b.bench
		signing_alg ES256
		trust %s {
			jwks_file %s
			audience %s
			algorithms ES256
		}
		client %s {
			secret_hash %s
			audience %s
			scope read write
		}
	}
}
http://127.0.0.1:%d {
	handle /token {
		token_exchange_endpoint
	}
}
`, filepath.Join(dir, "storage-b"), idpIssuer, jwksPath, gwAudience, stsClient, hash, apiAud, bPort)
	if err := startCaddy(start, o.caddyBin, filepath.Join(dir, "Caddyfile.b"), cfgB, bPort, "caddy B (our endpoint)"); err != nil {
		return err
	}

	// The zitadel/oidc example OP, in a third process.
	zPort := freePort()
	if err := start("zitadel OP", child("zitadel", zPort, "LOADBENCH_JWKS="+jwksPath), zPort); err != nil {
		return err
	}

	// With -rtt, the gateway reaches both STSs through delay proxies.
	bAddr, zAddr := fmt.Sprintf("127.0.0.1:%d", bPort), fmt.Sprintf("127.0.0.1:%d", zPort)
	if o.rtt > 0 {
		if bAddr, err = startDelayProxy(bAddr, o.rtt); err != nil {
			return err
		}
		if zAddr, err = startDelayProxy(zAddr, o.rtt); err != nil {
			return err
		}
	}

	// Caddy A: the gateway under test.
	plainPort, gwPort, txnPort, selfPort, zitPort := freePort(), freePort(), freePort(), freePort(), freePort()
	cfgA := fmt.Sprintf(`{
	admin %s
	log {
		level %s
	}
	storage file_system %s
	token_exchange {
		issuer https://gateway.bench
		signing_alg ES256
		trust %s {
			jwks_file %s
			audience %s
			algorithms ES256
		}
	}
}
http://127.0.0.1:%d {
	reverse_proxy %s
}
http://127.0.0.1:%d {
	token_exchange {
		audience %s
		scope read write
	}
	reverse_proxy %s
}
http://127.0.0.1:%d {
	token_exchange {
		audience %s
		scope read write
		txn_token https://bench.internal
	}
	reverse_proxy %s
}
http://127.0.0.1:%d {
	token_exchange {
		audience %s
		scope read write
		sts http://%s/token {
			client_id %s
			client_secret {env.LOADBENCH_STS_SECRET}
		}
	}
	reverse_proxy %s
}
http://127.0.0.1:%d {
	token_exchange {
		audience %s
		scope read write
		sts http://%s/oauth/token {
			client_id %s
			client_secret {env.LOADBENCH_STS_SECRET}
		}
	}
	reverse_proxy %s
}
`, o.adminAddr, o.logLevel, filepath.Join(dir, "storage-a"), idpIssuer, jwksPath, gwAudience,
		plainPort, upstream,
		gwPort, apiAud, upstream,
		txnPort, apiAud, upstream,
		selfPort, apiAud, bAddr, stsClient, upstream,
		zitPort, apiAud, zAddr, stsClient, upstream)
	if err := startCaddy(start, o.caddyBin, filepath.Join(dir, "Caddyfile.a"), cfgA, gwPort, "caddy A (gateway)"); err != nil {
		return err
	}

	// Subject tokens: one for the warm scenarios, a pool of fresh ones.
	var seq atomic.Int64
	mint := func() string {
		now := time.Now()
		tok, _ := jwt.NewBuilder().Issuer(idpIssuer).Subject("alice").Audience([]string{gwAudience}).
			JwtID(strconv.FormatInt(seq.Add(1), 36)).
			IssuedAt(now).Expiration(now.Add(time.Hour)).Claim("scope", "read write").Build()
		hdr := jws.NewHeaders()
		_ = hdr.Set(jws.KeyIDKey, "bench")
		b, err := jwt.Sign(tok, jwt.WithKey(jwa.ES256(), priv, jws.WithProtectedHeaders(hdr)))
		if err != nil {
			log.Fatal(err)
		}
		return string(b)
	}
	same := mint()
	pool := &tokenPool{mint: mint}

	u := func(port int, path string) string { return fmt.Sprintf("http://127.0.0.1:%d%s", port, path) }
	get := func(target string, tok func() (string, bool)) func() (*http.Request, bool) {
		return func() (*http.Request, bool) {
			req, _ := http.NewRequest(http.MethodGet, target, nil)
			if tok != nil {
				t, ok := tok()
				if !ok {
					return nil, false
				}
				req.Header.Set("Authorization", "Bearer "+t)
			}
			return req, true
		}
	}
	sameTok := func() (string, bool) { return same, true }
	post := func(target, client string) func() (*http.Request, bool) {
		return func() (*http.Request, bool) {
			t, ok := pool.next()
			if !ok {
				return nil, false
			}
			form := url.Values{
				"grant_type":         {"urn:ietf:params:oauth:grant-type:token-exchange"},
				"subject_token":      {t},
				"subject_token_type": {"urn:ietf:params:oauth:token-type:access_token"},
				"audience":           {apiAud},
				"scope":              {"read write"},
			}
			req, _ := http.NewRequest(http.MethodPost, target, strings.NewReader(form.Encode()))
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			req.SetBasicAuth(url.QueryEscape(client), url.QueryEscape(stsSecret))
			return req, true
		}
	}
	byName := map[string]scenario{
		"plain":                {desc: "reverse_proxy, no Authorization", hops: 2, req: get(u(plainPort, "/"), nil)},
		"passthrough":          {desc: "reverse_proxy, bearer passed through", hops: 2, req: get(u(plainPort, "/"), sameTok)},
		"warm":                 {desc: "token_exchange, warm cache", hops: 2, req: get(u(gwPort, "/"), sameTok)},
		"miss":                 {desc: "token_exchange, new token/request", hops: 2, req: get(u(gwPort, "/"), pool.next), miss: true},
		"remote-self":          {desc: "sts = our endpoint (Caddy B), miss", hops: 3, req: get(u(selfPort, "/"), pool.next), miss: true},
		"remote-zitadel":       {desc: "sts = zitadel example OP, miss", hops: 3, req: get(u(zitPort, "/"), pool.next), miss: true},
		"txn":                  {desc: "warm cache + txn_token per request", hops: 2, req: get(u(txnPort, "/"), sameTok)},
		"endpoint-ours":        {desc: "POST our token_exchange_endpoint", hops: 1, req: post("http://"+bAddr+"/token", stsClient), miss: true},
		"endpoint-zitadel":     {desc: "POST zitadel OP /oauth/token", hops: 1, req: post("http://"+zAddr+"/oauth/token", stsClient), miss: true},
		"endpoint-zitadel-jwt": {desc: "same, zitadel issuing RS256 JWTs", hops: 1, req: post("http://"+zAddr+"/oauth/token", stsClient+"-jwt"), miss: true},
	}
	var scens []scenario
	for _, n := range o.scenarios {
		s := byName[n]
		s.name = n
		scens = append(scens, s)
	}

	// Check every scenario answers 200 before measuring anything.
	for _, s := range scens {
		if s.miss {
			pool.fill(5000)
		}
		if r := load(s.req, 1, 300*time.Millisecond); r.requests == 0 {
			return fmt.Errorf("scenario %s does not work: %s", s.name, r.firstErr)
		}
	}

	results := map[string][]result{}
	// est is the req/s a miss scenario is expected to reach, to mint
	// enough fresh tokens before it runs (outside the measurement).
	est := map[string]float64{}
	for r := 0; r < o.rounds; r++ {
		for i := range scens {
			s := scens[(i+r)%len(scens)]
			if s.miss {
				// The warm-up can run faster than an earlier measured
				// window: a margin of 2x, at least 8000/s.
				rate := max(2*est[s.name], 8000)
				pool.fill(int(rate * (o.duration + o.warmup).Seconds()))
			}
			load(s.req, o.conns, o.warmup)
			var prof chan error
			if o.profile != "" && s.name == o.profileScenario && r == o.rounds-1 {
				prof = make(chan error, 1)
				go func() { prof <- takeProfile(o.adminAddr, o.duration, o.profile) }()
			}
			res := load(s.req, o.conns, o.duration)
			if prof != nil {
				if err := <-prof; err != nil {
					log.Printf("profile: %v", err)
				} else {
					log.Printf("wrote CPU profile of the gateway during %s to %s", s.name, o.profile)
				}
			}
			est[s.name] = max(est[s.name], res.rps)
			results[s.name] = append(results[s.name], res)
			log.Printf("round %d %-16s %8.0f req/s  p50 %-9v p99 %-9v errors %d %s", r+1, s.name, res.rps,
				res.p50.Round(time.Microsecond), res.p99.Round(time.Microsecond), res.errors, res.firstErr)
		}
	}
	report(os.Stdout, o, scens, results)
	return nil
}

func startCaddy(start func(string, *exec.Cmd, int) error, bin, path, cfg string, port int, name string) error {
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		return err
	}
	cmd := exec.Command(bin, "run", "--config", path, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(), "LOADBENCH_STS_SECRET="+stsSecret)
	return start(name, cmd, port)
}

// tokenPool hands out fresh subject tokens, each once.
type tokenPool struct {
	mint   func() string
	tokens []string
	next_  atomic.Int64
}

func (p *tokenPool) next() (string, bool) {
	i := p.next_.Add(1) - 1
	if int(i) >= len(p.tokens) {
		return "", false
	}
	return p.tokens[i], true
}

// fill drops used tokens and mints until n unused ones are ready.
func (p *tokenPool) fill(n int) {
	used := min(int(p.next_.Load()), len(p.tokens))
	p.tokens = p.tokens[used:]
	p.next_.Store(0)
	need := n - len(p.tokens)
	if need <= 0 {
		return
	}
	fresh := make([]string, need)
	var wg sync.WaitGroup
	w := runtime.NumCPU()
	for k := 0; k < w; k++ {
		wg.Add(1)
		go func(k int) {
			defer wg.Done()
			for i := k; i < need; i += w {
				fresh[i] = p.mint()
			}
		}(k)
	}
	wg.Wait()
	p.tokens = append(p.tokens, fresh...)
}

// load drives req with conns keep-alive connections for d and measures
// every request's latency. Anything but a 200 is an error.
func load(newReq func() (*http.Request, bool), conns int, d time.Duration) result {
	transport := &http.Transport{MaxIdleConnsPerHost: conns, MaxConnsPerHost: conns, DisableCompression: true}
	client := &http.Client{Transport: transport, Timeout: 10 * time.Second}
	defer transport.CloseIdleConnections()
	deadline := time.Now().Add(d)
	var mu sync.Mutex
	var latencies []time.Duration
	var errs int
	var firstErr string
	var wg sync.WaitGroup
	for c := 0; c < conns; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			local := make([]time.Duration, 0, 1<<14)
			localErrs, localFirst := 0, ""
			fail := func(s string) {
				localErrs++
				if localFirst == "" {
					localFirst = s
				}
			}
			for time.Now().Before(deadline) {
				req, ok := newReq()
				if !ok {
					fail("out of fresh tokens")
					break
				}
				start := time.Now()
				resp, err := client.Do(req)
				if err != nil {
					fail(err.Error())
					continue
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					fail(fmt.Sprintf("status %d %s %s", resp.StatusCode, resp.Header.Get("WWW-Authenticate"), bytes.TrimSpace(body)))
					continue
				}
				local = append(local, time.Since(start))
			}
			mu.Lock()
			latencies = append(latencies, local...)
			errs += localErrs
			if firstErr == "" {
				firstErr = localFirst
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	slices.Sort(latencies)
	r := result{requests: len(latencies), errors: errs, rps: float64(len(latencies)) / d.Seconds(), firstErr: firstErr}
	if n := len(latencies); n > 0 {
		r.p50 = latencies[n*50/100]
		r.p99 = latencies[n*99/100]
	}
	return r
}

// takeProfile fetches a CPU profile of the gateway Caddy from its admin
// endpoint while the scenario runs.
func takeProfile(admin string, d time.Duration, path string) error {
	secs := max(1, int(d.Seconds())-1)
	resp, err := http.Get(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", admin, secs))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("pprof: status %d", resp.StatusCode)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func waitListening(port int, timeout time.Duration, name string) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			c.Close()
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s did not listen on %d within %v", name, port, timeout)
}
