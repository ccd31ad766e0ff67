package main

import (
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// TestDelayProxy: a request on a kept-alive connection through the proxy
// takes about one RTT more than without it, and the first one (a new
// connection) about two.
func TestDelayProxy(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok") }))
	defer srv.Close()
	const rtt = 1 * time.Millisecond
	addr, err := startDelayProxy(srv.Listener.Addr().String(), rtt)
	if err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Transport: &http.Transport{}}
	get := func() time.Duration {
		start := time.Now()
		resp, err := client.Get("http://" + addr + "/")
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return time.Since(start)
	}
	first := get()
	if first < 2*rtt || first > 2*rtt+20*time.Millisecond {
		t.Errorf("first request (new connection) took %v, want about %v", first, 2*rtt)
	}
	var total time.Duration
	const n = 20
	for range n {
		total += get()
	}
	if avg := total / n; avg < rtt || avg > rtt+3*time.Millisecond {
		t.Errorf("kept-alive requests took %v on average, want about %v", avg, rtt)
	} else {
		t.Logf("avg %v first %v", avg, first)
	}
}
