package main

import (
	"net"
	"sync"
	"time"
)

// This machine's kernel has no netem qdisc (tc answers "Specified qdisc
// kind is unknown"), so -rtt emulates a round-trip time in user space: a
// TCP proxy in front of a remote STS that
//   - accepts a connection and dials the STS after one RTT (the TCP
//     handshake a new connection costs over a network), and
//   - delivers every chunk read in either direction RTT/2 after it was
//     read, in order, without holding up later reads (a pipe with latency,
//     not a bandwidth limit).
//
// Delays are slept with nanosleep(2) (sleep_linux.go): Go's timers round
// sub-millisecond sleeps up to a millisecond or more.
//
// It costs CPU of its own (two goroutines and a copy per chunk) on the
// same two cores, so compare its figures with the loopback run for the
// latency, not for throughput.

// startDelayProxy listens on a free loopback port and forwards to target.
func startDelayProxy(target string, rtt time.Duration) (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				preciseSleep(rtt) // SYN, SYN-ACK
				s, err := net.Dial("tcp", target)
				if err != nil {
					c.Close()
					return
				}
				var wg sync.WaitGroup
				wg.Add(2)
				go func() { defer wg.Done(); delayedCopy(s, c, rtt/2) }()
				go func() { defer wg.Done(); delayedCopy(c, s, rtt/2) }()
				wg.Wait()
				c.Close()
				s.Close()
			}()
		}
	}()
	return ln.Addr().String(), nil
}

type chunk struct {
	at   time.Time
	data []byte
}

// delayedCopy reads from src and writes each chunk to dst delay after it
// was read.
func delayedCopy(dst, src net.Conn, delay time.Duration) {
	q := make(chan chunk, 1024)
	go func() {
		defer close(q)
		for {
			buf := make([]byte, 32<<10)
			n, err := src.Read(buf)
			if n > 0 {
				q <- chunk{at: time.Now().Add(delay), data: buf[:n]}
			}
			if err != nil {
				return
			}
		}
	}()
	for c := range q {
		if d := time.Until(c.at); d > 0 {
			preciseSleep(d)
		}
		if _, err := dst.Write(c.data); err != nil {
			break
		}
	}
	// half-close so the other side sees EOF
	if tc, ok := dst.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
	for range q {
		// drop what arrives after dst failed, until src ends
	}
}
