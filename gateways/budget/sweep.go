package budget

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// returnConcurrency bounds the return statements one sweep or Close runs at
// once, so a burst of idle keys neither crawls nor floods the pool.
const returnConcurrency = 8

// Run returns the unspent units of leases untouched for Config.IdleReturn,
// so other gateways can lease them, and drops the state of keys whose window
// has ended, until ctx is done. It returns nil when ctx is done.
func (l *Limiter) Run(ctx context.Context) error {
	t := time.NewTicker(min(max(l.cfg.IdleReturn/4, 10*time.Millisecond), time.Second))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			for _, err := range l.sweep(ctx) {
				l.log.WarnContext(ctx, "budget: return idle lease", "err", err)
			}
		}
	}
}

// sweep drops entries of ended windows and returns idle leases.
func (l *Limiter) sweep(ctx context.Context) []error {
	now := l.cfg.Now()
	var idle []claim
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		for k, e := range s.m {
			e.mu.Lock()
			switch {
			case e.flight != nil:
			case e.windowStart+k.windowSeconds <= now.Unix():
				// Units of an ended window cannot be spent by anyone, so
				// there is nothing to return.
				e.dead = true
				delete(s.m, k)
			case e.remaining+e.pendingReturn > 0 && now.Sub(e.touched) >= l.cfg.IdleReturn:
				idle = append(idle, claimReturn(e))
			}
			e.mu.Unlock()
		}
		s.mu.Unlock()
	}
	return l.returnAll(ctx, idle)
}

// Close returns every unspent unit of current-window leases to Postgres.
// Call it on shutdown after traffic has stopped; a Take after Close leases
// afresh. Units whose return fails stay in hand and the error says so.
func (l *Limiter) Close(ctx context.Context) error {
	var entries []*entry
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.RLock()
		for _, e := range s.m {
			entries = append(entries, e)
		}
		s.mu.RUnlock()
	}
	var claims []claim
	var waitErr error
	for _, e := range entries {
		e.mu.Lock()
		for e.flight != nil && waitErr == nil {
			// Wait for a lease in flight: what it grants must go back too.
			f := e.flight
			e.mu.Unlock()
			select {
			case <-f.done:
			case <-ctx.Done():
				waitErr = context.Cause(ctx)
			}
			e.mu.Lock()
		}
		if e.flight == nil && e.remaining+e.pendingReturn > 0 &&
			e.windowStart+e.key.windowSeconds > l.cfg.Now().Unix() {
			claims = append(claims, claimReturn(e))
		}
		e.mu.Unlock()
		if waitErr != nil {
			break
		}
	}
	errs := l.returnAll(ctx, claims)
	if waitErr != nil {
		errs = append(errs, waitErr)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close budget: %w", err)
	}
	return nil
}

// claim is a return taken out of an entry's lease and not yet applied.
type claim struct {
	e *entry
	f *flight
	n int64
}

// claimReturn takes all unspent units out of e's lease and occupies e's
// flight slot until the return is applied, so Takes for the key wait for it
// instead of racing it with a lease. Called with e.mu held and no flight.
func claimReturn(e *entry) claim {
	c := claim{
		e: e,
		f: &flight{kind: returnFlight, window: e.windowStart, done: make(chan struct{})},
		n: e.remaining + e.pendingReturn,
	}
	e.remaining, e.pendingReturn = 0, 0
	e.flight = c.f
	return c
}

// returnAll applies claims, a few at a time, and returns the errors.
func (l *Limiter) returnAll(ctx context.Context, claims []claim) []error {
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
		sem  = make(chan struct{}, returnConcurrency)
	)
	for _, c := range claims {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := l.applyReturn(ctx, c); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return errs
}

// applyReturn gives c's units back and releases the entry's flight slot. If
// the statement fails the units are still counted in Postgres, so they go
// back into the lease in hand.
func (l *Limiter) applyReturn(ctx context.Context, c claim) error {
	ctx, cancel := context.WithTimeout(ctx, l.cfg.StatementTimeout)
	defer cancel()
	err := l.giveBack(ctx, c.e.key, c.f.window, c.n)
	if err != nil {
		err = fmt.Errorf("subject %q bucket %q: %w", c.e.key.subject, c.e.key.bucket, err)
	}
	c.e.mu.Lock()
	if err != nil && c.e.windowStart == c.f.window {
		c.e.remaining += c.n
	}
	c.e.flight = nil
	c.e.mu.Unlock()
	close(c.f.done)
	return err
}
