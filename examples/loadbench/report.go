package main

import (
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"slices"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/zitadel/oidc/v3/example/server/storage"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/zitadelsts"
)

// serveZitadel runs the zitadel/oidc example OP as the third-party STS,
// trusting the loadbench IdP (jwksPath), with client stsClient whose secret
// the example storage compares in plain text, and client stsClient-jwt,
// the same but issued JWT access tokens (RS256). The example's per-request
// log line stays on (slog's default logger, to this process's stderr,
// which is /dev/null), as the example ships.
func serveZitadel(ln net.Listener, jwksPath string) error {
	data, err := os.ReadFile(jwksPath)
	if err != nil {
		return err
	}
	keys, err := jwk.Parse(data)
	if err != nil {
		return err
	}
	iss := "http://" + ln.Addr().String()
	st := zitadelsts.NewStorage(iss, map[string]*storage.Client{
		stsClient:          storage.WebClient(stsClient, stsSecret),
		stsClient + "-jwt": storage.WebClient(stsClient+"-jwt", stsSecret),
	}, zitadelsts.Trust{Issuer: idpIssuer, Audience: gwAudience, Keys: keys})
	st.IssueJWTs(stsClient + "-jwt")
	var logger *slog.Logger // the example's default
	return http.Serve(ln, zitadelsts.Handler(iss, st, logger))
}

func median[T int64 | float64 | time.Duration](v []T) T {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func report(w io.Writer, o options, scens []scenario, res map[string][]result) {
	fmt.Fprintf(w, "\nloopback, %d connections, %d rounds x (%v warm-up + %v measured) per scenario, interleaved (order rotated per round)\n",
		o.conns, o.rounds, o.warmup, o.duration)
	fmt.Fprintf(w, "%d CPUs, GOMAXPROCS=%d, %s/%s, %s; load generator, gateway, upstream and STSs share the CPUs", runtime.NumCPU(), runtime.GOMAXPROCS(0), runtime.GOOS, runtime.GOARCH, runtime.Version())
	if o.rtt > 0 {
		fmt.Fprintf(w, "; remote STSs behind a %v RTT delay proxy", o.rtt)
	}
	fmt.Fprintf(w, "\nmedians over rounds; ratios are medians of per-round ratios\n\n")

	perRound := func(a, b string, f func(ra, rb result) float64) (float64, bool) {
		ra, rb := res[a], res[b]
		if len(ra) == 0 || len(rb) == 0 {
			return 0, false
		}
		var v []float64
		for i := range min(len(ra), len(rb)) {
			v = append(v, f(ra[i], rb[i]))
		}
		return median(v), true
	}
	rpsRatio := func(a, b string) (float64, bool) {
		return perRound(a, b, func(ra, rb result) float64 {
			if rb.rps == 0 {
				return 0
			}
			return ra.rps / rb.rps
		})
	}
	p99Added := func(a, b string) (time.Duration, bool) {
		v, ok := perRound(a, b, func(ra, rb result) float64 { return float64(ra.p99 - rb.p99) })
		return time.Duration(v), ok
	}
	p50Added := func(a, b string) (time.Duration, bool) {
		v, ok := perRound(a, b, func(ra, rb result) float64 { return float64(ra.p50 - rb.p50) })
		return time.Duration(v), ok
	}
	fmtRatio := func(v float64, ok bool) string {
		if !ok {
			return "-"
		}
		return fmt.Sprintf("%.2f", v)
	}
	fmtDur := func(d time.Duration, ok bool) string {
		if !ok {
			return "-"
		}
		return d.Round(time.Microsecond).String()
	}

	fmt.Fprintf(w, "%-21s %-37s %4s %9s %10s %10s %7s %8s %8s %10s\n", "scenario", "", "hops", "req/s", "p50", "p99", "errors", "/passthr", "/plain", "p99-passthr")
	for _, s := range scens {
		rs := res[s.name]
		var rps []float64
		var p50, p99 []time.Duration
		errs := 0
		for _, r := range rs {
			rps, p50, p99 = append(rps, r.rps), append(p50, r.p50), append(p99, r.p99)
			errs += r.errors
		}
		pt, okPt := rpsRatio(s.name, "passthrough")
		pl, okPl := rpsRatio(s.name, "plain")
		add, okAdd := p99Added(s.name, "passthrough")
		if s.hops == 1 { // direct endpoint POSTs: no proxy to compare with
			okPt, okPl, okAdd = false, false, false
		}
		fmt.Fprintf(w, "%-21s %-37s %4d %9.0f %10v %10v %7d %8s %8s %10s\n", s.name, s.desc, s.hops, median(rps),
			median(p50).Round(time.Microsecond), median(p99).Round(time.Microsecond), errs,
			fmtRatio(pt, okPt), fmtRatio(pl, okPl), fmtDur(add, okAdd))
	}

	fmt.Fprintf(w, "\ntargets (issue 15):\n")
	target := func(label string, v float64, ok bool, goal float64, unit string, atLeast bool) {
		if !ok {
			fmt.Fprintf(w, "  %-58s %10s  (scenarios not run)\n", label, "-")
			return
		}
		met := v >= goal
		cmpS := ">="
		if !atLeast {
			met, cmpS = v <= goal, "<="
		}
		verdict := "met"
		if !met {
			verdict = "NOT met"
		}
		fmt.Fprintf(w, "  %-58s %10s  target %s %g%s  %s\n", label, fmt.Sprintf("%.2f%s", v, unit), cmpS, goal, unit, verdict)
	}
	v, ok := rpsRatio("miss", "passthrough")
	target("miss / passthrough req/s", v, ok, 0.65, "", true)
	v, ok = rpsRatio("warm", "passthrough")
	target("warm / passthrough req/s", v, ok, 0.99, "", true)
	d, ok := p99Added("warm", "passthrough")
	target("warm p99 added over passthrough", float64(d)/1e6, ok, 0.3, " ms", false)
	v, ok = rpsRatio("miss", "remote-self")
	target("in-process miss / remote-to-ourselves req/s", v, ok, 2, "", true)
	v, ok = rpsRatio("miss", "remote-zitadel")
	target("in-process miss / remote-to-zitadel req/s", v, ok, 5, "", true)
	v, ok = rpsRatio("endpoint-ours", "endpoint-zitadel")
	target("our endpoint / zitadel OP exchanges/s", v, ok, 3, "", true)
	v, ok = rpsRatio("endpoint-ours", "endpoint-zitadel-jwt")
	target("  (informational) ours / zitadel issuing RS256 JWTs", v, ok, 3, "", true)

	fmt.Fprintf(w, "\nlatency added per miss by the remote hop (median of per-round p50 differences against the in-process miss):\n")
	for _, s := range []string{"remote-self", "remote-zitadel"} {
		d, ok := p50Added(s, "miss")
		fmt.Fprintf(w, "  %-16s p50 %s", s, fmtDur(d, ok))
		if d99, ok := p99Added(s, "miss"); ok {
			fmt.Fprintf(w, "  p99 %s", fmtDur(d99, ok))
		}
		fmt.Fprintln(w)
	}
	if o.rtt == 0 {
		fmt.Fprintf(w, "  over a network, each miss adds 1 more HTTP hop (3 vs 2): + 1 RTT per miss on a reused connection,\n"+
			"  + 2 RTT when the gateway must open a new connection to the STS (TCP handshake; + TLS round trips over https)\n"+
			"  (computed from the hop count, not measured; -rtt 1ms measures it through a delay proxy)\n")
	}
	for _, s := range scens {
		for i, r := range res[s.name] {
			if r.errors > 0 {
				log.Printf("%s round %d: %d errors, first: %s", s.name, i+1, r.errors, r.firstErr)
			}
		}
	}
}
