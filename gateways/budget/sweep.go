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
// so other gateways can lease them, drops the state of keys whose window
// has ended, and every Config.PruneInterval deletes counter rows of windows
// that ended Config.PruneAfter ago, until ctx is done. It returns nil when
// ctx is done.
func (l *Limiter) Run(ctx context.Context) error {
	t := time.NewTicker(min(max(l.cfg.IdleReturn/4, 10*time.Millisecond), time.Second))
	defer t.Stop()
	var nextPrune time.Time // the zero time: prune on the first tick
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			for _, err := range l.sweep(ctx) {
				l.log.WarnContext(ctx, "budget: return idle lease", "err", err)
			}
			if now := l.cfg.Now(); !now.Before(nextPrune) {
				nextPrune = now.Add(l.cfg.PruneInterval)
				n, more, err := l.prune(ctx)
				switch {
				case err != nil && ctx.Err() == nil:
					l.log.WarnContext(ctx, "budget: prune ended windows", "err", err, "rows", n)
				case more:
					nextPrune = time.Time{} // a backlog: go on at the next tick
				}
				if l.hooks.pruned != nil {
					l.hooks.pruned(n, err)
				}
			}
		}
	}
}

// sweep drops entries of ended windows and returns idle leases.
func (l *Limiter) sweep(ctx context.Context) []error {
	local := l.cfg.Now()
	now := dbUnix(local, l.clock.offset())
	var idle []claim
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		for k, e := range s.m {
			e.mu.Lock()
			switch {
			case e.flight != nil:
			case e.windowStart+k.windowSeconds <= now:
				// Units of an ended window cannot be spent by anyone, so
				// there is nothing to return.
				e.dead = true
				delete(s.m, k)
			case e.remaining+e.pendingReturn > 0 && local.Sub(e.touched) >= l.cfg.IdleReturn:
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
// afresh. Units whose return certainly did not reach Postgres stay in hand
// and the error says so; units whose return's outcome is unknown are given
// up (see abandon), and the error says so too.
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
			e.windowStart+e.key.windowSeconds > dbUnix(l.cfg.Now(), l.clock.offset()) {
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
	// spendable came from remaining, pending from pendingReturn; limit is
	// the entry's limit when they were taken.
	spendable, pending, limit int64
}

// claimReturn takes all unspent units out of e's lease and occupies e's
// flight slot until the return is applied, so Takes for the key wait for it
// instead of racing it with a lease. Called with e.mu held and no flight.
func claimReturn(e *entry) claim {
	c := claim{
		e:         e,
		f:         &flight{kind: returnFlight, window: e.windowStart, done: make(chan struct{})},
		spendable: e.remaining,
		pending:   e.pendingReturn,
		limit:     e.limit,
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

// applyReturn gives c's units back and releases the entry's flight slot.
//
// If the statement certainly did not reach Postgres, the units are still
// counted there and still ours: they go back where they came from, except
// that units are never made spendable under a limit lowered meanwhile. If
// its outcome is unknown, the return may have committed and other gateways
// may already be leasing the units, so they are given up: spending them
// again could allow them twice.
func (l *Limiter) applyReturn(ctx context.Context, c claim) error {
	ctx, cancel := context.WithTimeout(ctx, l.cfg.StatementTimeout)
	defer cancel()
	n := c.spendable + c.pending
	err := l.giveBack(ctx, c.e.key, c.f.window, n)
	unknown := err != nil && mayHaveApplied(err)
	e := c.e
	e.mu.Lock()
	switch {
	case err == nil, unknown:
	case e.windowStart == c.f.window && e.limit < c.limit:
		e.pendingReturn += n
	case e.windowStart == c.f.window:
		e.remaining += c.spendable
		e.pendingReturn += c.pending
	}
	e.flight = nil
	e.mu.Unlock()
	close(c.f.done)
	if unknown {
		l.abandon(ctx, e.key, l.metrics.abandonedReturn, n, err)
	}
	if err != nil {
		return fmt.Errorf("subject %q bucket %q: %w", e.key.subject, e.key.bucket, err)
	}
	return nil
}
