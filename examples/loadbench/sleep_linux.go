package main

import (
	"syscall"
	"time"
)

// preciseSleep sleeps d with nanosleep(2) on the calling thread: Go's
// timers wake through epoll_pwait, whose timeout is in milliseconds, so a
// time.Sleep of 500µs takes a millisecond or more.
func preciseSleep(d time.Duration) {
	ts := syscall.NsecToTimespec(int64(d))
	for syscall.Nanosleep(&ts, &ts) == syscall.EINTR {
	}
}
