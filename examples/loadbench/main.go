// Command loadbench measures, in one run on loopback, what the token_exchange
// middleware costs compared with a plain reverse_proxy:
//
//	(a) plain reverse_proxy in front of an upstream,
//	(b) token_exchange with a warm cache (every request carries the same token),
//	(c) token_exchange where every request carries a new subject token,
//	(d) token_exchange with a warm cache plus a Transaction Token minted
//	    per request (txn_token),
//
// with a fixed duration and connection count, and reports req/s, p50 and p99
// latency and the ratios b/a and c/a. Usage:
//
//	go build -o /tmp/caddy ./examples/caddy
//	go run ./examples/loadbench -caddy /tmp/caddy [-duration 10s] [-conns 16]
//
// Everything listens on 127.0.0.1 only.
package main

import (
	"context"
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
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"
)

func main() {
	caddyBin := flag.String("caddy", "", "path to a caddy binary built from ./examples/caddy (required)")
	duration := flag.Duration("duration", 10*time.Second, "length of each scenario")
	warmup := flag.Duration("warmup", 2*time.Second, "warm-up before each scenario")
	conns := flag.Int("conns", 16, "concurrent connections")
	fresh := flag.Int("fresh-tokens", 0, "distinct tokens for scenario (c) (default: enough for 20k req/s)")
	flag.StringVar(&adminAddr, "admin", "off", "caddy admin address, e.g. 127.0.0.1:2019 to take pprof profiles during the run")
	flag.Parse()
	if *caddyBin == "" {
		log.Fatal("-caddy is required: go build -o /tmp/caddy ./examples/caddy")
	}
	if err := run(*caddyBin, *duration, *warmup, *conns, *fresh); err != nil {
		log.Fatal(err)
	}
}

var adminAddr string

type result struct {
	name     string
	requests int
	errors   int
	rps      float64
	p50, p99 time.Duration
}

func run(caddyBin string, duration, warmup time.Duration, conns, fresh int) error {
	dir, err := os.MkdirTemp("", "loadbench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	// A test identity provider: an ES256 key and its JWKS in a file.
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	key, _ := jwk.Import(priv)
	_ = key.Set(jwk.KeyIDKey, "bench")
	pub, _ := jwk.PublicKeyOf(key)
	set := jwk.NewSet()
	_ = set.AddKey(pub)
	jwksPath := filepath.Join(dir, "jwks.json")
	if b, _ := json.Marshal(set); os.WriteFile(jwksPath, b, 0o600) != nil {
		return errors.New("writing JWKS")
	}

	// The upstream: a minimal HTTP server.
	upstream, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	go http.Serve(upstream, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "ok")
	}))

	plainPort, gwPort, txnPort := freePort(), freePort(), freePort()
	caddyfile := fmt.Sprintf(`{
	admin %s
	storage file_system %s
	token_exchange {
		issuer https://gateway.bench
		trust https://idp.bench {
			jwks_file %s
			audience https://gateway.bench
			algorithms ES256
		}
	}
}
http://127.0.0.1:%d {
	reverse_proxy %s
}
http://127.0.0.1:%d {
	token_exchange {
		audience https://api.bench
		scope read write
	}
	reverse_proxy %s
}
http://127.0.0.1:%d {
	token_exchange {
		audience https://api.bench
		scope read write
		txn_token https://bench.internal
	}
	reverse_proxy %s
}
`, adminAddr, filepath.Join(dir, "storage"), jwksPath, plainPort, upstream.Addr(), gwPort, upstream.Addr(), txnPort, upstream.Addr())
	cfgPath := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfgPath, []byte(caddyfile), 0o600); err != nil {
		return err
	}
	cmd := exec.Command(caddyBin, "run", "--config", cfgPath, "--adapter", "caddyfile")
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	if err := cmd.Start(); err != nil {
		return err
	}
	defer func() { _ = cmd.Process.Kill(); _, _ = cmd.Process.Wait() }()
	if err := waitListening(gwPort, 15*time.Second); err != nil {
		return err
	}

	mint := func() string {
		now := time.Now()
		tok, _ := jwt.NewBuilder().Issuer("https://idp.bench").Subject("alice").Audience([]string{"https://gateway.bench"}).
			IssuedAt(now).Expiration(now.Add(time.Hour)).Claim("scope", "read write").Build()
		hdr := jws.NewHeaders()
		_ = hdr.Set(jws.KeyIDKey, "bench")
		b, err := jwt.Sign(tok, jwt.WithKey(jwa.ES256(), priv, jws.WithProtectedHeaders(hdr)))
		if err != nil {
			log.Fatal(err)
		}
		return string(b)
	}
	if fresh <= 0 {
		fresh = int((duration + warmup).Seconds()) * 20000
	}
	log.Printf("minting %d distinct subject tokens for scenario (c)...", fresh)
	freshTokens := make([]string, fresh)
	var wg sync.WaitGroup
	for w := 0; w < runtime.NumCPU(); w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := w; i < fresh; i += runtime.NumCPU() {
				freshTokens[i] = mint()
			}
		}(w)
	}
	wg.Wait()
	same := mint()

	plainURL := fmt.Sprintf("http://127.0.0.1:%d/", plainPort)
	gwURL := fmt.Sprintf("http://127.0.0.1:%d/", gwPort)
	txnURL := fmt.Sprintf("http://127.0.0.1:%d/", txnPort)
	var next atomic.Int64
	scenarios := []struct {
		name  string
		url   string
		token func() string
	}{
		{"(a) plain reverse_proxy", plainURL, func() string { return same }},
		{"(b) token_exchange, warm cache", gwURL, func() string { return same }},
		{"(c) token_exchange, new token per request", gwURL, func() string {
			i := next.Add(1) - 1
			if int(i) >= len(freshTokens) {
				return ""
			}
			return freshTokens[i]
		}},
		{"(d) + txn_token (warm cache, Txn-Token per req)", txnURL, func() string { return same }},
	}
	var results []result
	for _, sc := range scenarios {
		load(sc.url, sc.token, conns, warmup) // warm-up, not measured
		r := load(sc.url, sc.token, conns, duration)
		r.name = sc.name
		results = append(results, r)
	}

	fmt.Printf("\nloopback, %d connections, %v per scenario, GOMAXPROCS=%d, %s/%s\n\n", conns, duration, runtime.GOMAXPROCS(0), runtime.GOOS, runtime.GOARCH)
	fmt.Printf("%-44s %10s %10s %10s %8s\n", "scenario", "req/s", "p50", "p99", "errors")
	for _, r := range results {
		fmt.Printf("%-44s %10.0f %10v %10v %8d\n", r.name, r.rps, r.p50.Round(time.Microsecond), r.p99.Round(time.Microsecond), r.errors)
	}
	a, b, c, d := results[0], results[1], results[2], results[3]
	fmt.Printf("\nthroughput b/a = %.2f   c/a = %.2f   d/a = %.2f\n", b.rps/a.rps, c.rps/a.rps, d.rps/a.rps)
	fmt.Printf("p99 added    b-a = %v   c-a = %v   d-a = %v\n", (b.p99 - a.p99).Round(time.Microsecond), (c.p99 - a.p99).Round(time.Microsecond), (d.p99 - a.p99).Round(time.Microsecond))
	if c.errors > 0 {
		fmt.Println("note: (c) ran out of fresh tokens or saw errors; raise -fresh-tokens")
	}
	return nil
}

// load drives url with conns keep-alive connections for d and measures
// every request's latency. A request counts as an error unless it is a 200.
func load(url string, token func() string, conns int, d time.Duration) result {
	transport := &http.Transport{MaxIdleConnsPerHost: conns, MaxConnsPerHost: conns}
	client := &http.Client{Transport: transport, Timeout: 10 * time.Second}
	defer transport.CloseIdleConnections()
	deadline := time.Now().Add(d)
	var mu sync.Mutex
	var latencies []time.Duration
	var errs int
	var wg sync.WaitGroup
	for c := 0; c < conns; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			local := make([]time.Duration, 0, 1<<14)
			localErrs := 0
			for time.Now().Before(deadline) {
				tok := token()
				if tok == "" {
					localErrs++
					break
				}
				req, _ := http.NewRequestWithContext(context.Background(), http.MethodGet, url, nil)
				req.Header.Set("Authorization", "Bearer "+tok)
				start := time.Now()
				resp, err := client.Do(req)
				if err != nil {
					localErrs++
					continue
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					localErrs++
					continue
				}
				local = append(local, time.Since(start))
			}
			mu.Lock()
			latencies = append(latencies, local...)
			errs += localErrs
			mu.Unlock()
		}()
	}
	wg.Wait()
	slices.Sort(latencies)
	r := result{requests: len(latencies), errors: errs, rps: float64(len(latencies)) / d.Seconds()}
	if n := len(latencies); n > 0 {
		r.p50 = latencies[n*50/100]
		r.p99 = latencies[n*99/100]
	}
	return r
}

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func waitListening(port int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			c.Close()
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("caddy did not listen on %d within %v", port, timeout)
}
