package gateway

import (
	"context"
	"sync"
	"time"
)

// sessions tracks upgraded connections (WebSocket), which http.Server's
// graceful shutdown does not: it neither waits for nor closes hijacked
// connections. Shutdown gives them the rest of the drain window, then cuts
// them, so none outlives the gateway or loses its usage event.
type sessions struct {
	mu      sync.Mutex
	closing bool
	active  sync.WaitGroup
	cut     context.Context
	cutAll  context.CancelFunc
}

func newSessions() *sessions {
	s := &sessions{}
	s.cut, s.cutAll = context.WithCancel(context.Background())
	return s
}

// begin registers a session; ok is false once shutdown has started.
func (s *sessions) begin() (done func(), ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return nil, false
	}
	s.active.Add(1)
	return s.active.Done, true
}

// drain refuses new sessions, waits for open ones until deadline, then cuts
// the rest and waits for them to end.
func (s *sessions) drain(deadline time.Time) {
	s.mu.Lock()
	s.closing = true
	s.mu.Unlock()
	ended := make(chan struct{})
	go func() { s.active.Wait(); close(ended) }()
	select {
	case <-ended:
	case <-time.After(time.Until(deadline)):
		s.cutAll()
		<-ended
	}
	s.cutAll()
}
