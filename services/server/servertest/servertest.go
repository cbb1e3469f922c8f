// Package servertest helps tests run Cloud Connector processes: wait for
// them to come up and capture what they write.
package servertest

import (
	"bytes"
	"net/http"
	"sync"
	"testing"
	"time"
)

// WaitHealthy polls each admin address's /healthz until it answers 200,
// failing the test after 10s.
func WaitHealthy(tb testing.TB, adminAddrs ...string) {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for _, a := range adminAddrs {
		for {
			res, err := http.Get("http://" + a + "/healthz")
			if err == nil {
				res.Body.Close()
				if res.StatusCode == http.StatusOK {
					break
				}
			}
			if time.Now().After(deadline) {
				tb.Fatalf("%s not healthy in time: %v", a, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// Buffer is a bytes.Buffer safe for concurrent use, for capturing the logs
// or output of a running component.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *Buffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String returns everything written so far.
func (s *Buffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Eventually polls cond until it holds, failing the test with what after a
// generous deadline (30s). It waits for a state, it does not time anything.
func Eventually(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
