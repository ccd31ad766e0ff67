//go:build !linux

package main

import "time"

// preciseSleep is time.Sleep here (which may round sub-millisecond delays up).
func preciseSleep(d time.Duration) { time.Sleep(d) }
