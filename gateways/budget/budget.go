// Package budget enforces per-subject budgets that hold across gateway
// replicas sharing one PostgreSQL database.
//
// A gateway never asks Postgres per request. It leases a chunk of the
// remaining budget with one atomic statement, spends the chunk in memory, and
// returns what is left when the lease sits idle or the gateway shuts down.
// Postgres counts every unit handed to any gateway, so the units allowed in a
// window never exceed its limit, however many gateways share the budget.
//
// Windows follow the database's clock, not the gateways' (see dbClock), so
// replicas whose clocks disagree still share one counter per window. When a
// statement's outcome is unknown (its reply was lost), the limiter assumes
// whatever errs toward refusing: a return counts as done and a lease as
// granted to nobody, never the reverse.
package budget

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"math"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/client_golang/prometheus"
)

// DB is what the limiter needs from Postgres. It is satisfied by
// *pgxpool.Pool, *pgx.Conn and pgx.Tx. Every statement the limiter issues is
// atomic on its own, so a pool or a connection in autocommit mode is the
// intended use; inside a transaction, leases hold row locks until it ends.
type DB interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// ErrInvalidSpec reports a Spec the limiter cannot enforce, such as an empty
// bucket or a window that is not a whole number of seconds.
var ErrInvalidSpec = errors.New("invalid budget spec")

// Spec is a budget as the policy returned it.
type Spec struct {
	// Bucket names the counter, e.g. "complete_code".
	Bucket string
	// Limit is the number of units allowed per window; 0 allows nothing and
	// is refused without touching the database.
	Limit int64
	// Window is the window length: a positive whole number of seconds.
	// Windows are aligned to the Unix epoch on the database's clock.
	Window time.Duration
	// Unit says what one unit is, e.g. "request".
	Unit string
}

// windowSeconds validates s and returns its window in seconds.
func (s Spec) windowSeconds() (int64, error) {
	switch {
	case s.Bucket == "":
		return 0, fmt.Errorf("%w: empty bucket", ErrInvalidSpec)
	case s.Limit < 0:
		return 0, fmt.Errorf("%w: negative limit %d", ErrInvalidSpec, s.Limit)
	case s.Window < time.Second || s.Window%time.Second != 0:
		return 0, fmt.Errorf("%w: window %v is not a positive whole number of seconds", ErrInvalidSpec, s.Window)
	case s.Window/time.Second > math.MaxInt32:
		return 0, fmt.Errorf("%w: window %v too long", ErrInvalidSpec, s.Window)
	}
	return int64(s.Window / time.Second), nil
}

// windowStart returns the start, in Unix seconds, of the window of length
// seconds that contains the Unix second u. Windows are aligned to the Unix
// epoch, so every gateway computes the same start; time.Truncate would align
// to year 1.
func windowStart(u, seconds int64) int64 {
	s := u / seconds * seconds
	if s > u { // integer division truncates toward zero; floor before 1970
		s -= seconds
	}
	return s
}

// dbUnix returns the Unix second, on the database clock, of the local time
// t, given off, the database clock minus the local one. It is t.Add(off).Unix()
// in integer arithmetic, which Take's fast path can afford.
func dbUnix(t time.Time, off time.Duration) int64 {
	n := int64(t.Nanosecond()) + int64(off)
	s := n / 1e9
	if n%1e9 < 0 { // floor, not truncation
		s--
	}
	return t.Unix() + s
}

// resetAt converts end, a window end in Unix seconds on the database clock,
// to the local clock, given off, the database clock minus the local one.
func resetAt(end int64, off time.Duration) time.Time {
	return time.Unix(end, -int64(off)) // time.Unix normalizes nsec
}

// Outcome is the result of one Take.
type Outcome struct {
	// Allowed reports whether the unit was granted.
	Allowed bool
	// Limit is the window's limit, as the Spec gave it.
	Limit int64
	// Remaining is a best-effort estimate of the units left in the window
	// across all gateways; it is never negative.
	Remaining int64
	// Reset is the end of the current window, on the clock Config.Now reads
	// (the database clock decides where windows end; Reset converts that
	// instant to the local clock, so Reset.Sub(Config.Now()) is the wait).
	Reset time.Time
}

// RetryAfter returns how long until the window resets, rounded up to whole
// seconds and at least one second.
func (o Outcome) RetryAfter(now time.Time) time.Duration {
	d := o.Reset.Sub(now)
	if d <= time.Second {
		return time.Second
	}
	return (d + time.Second - 1) / time.Second * time.Second
}

// Config tunes a Limiter. Zero values take the documented defaults.
type Config struct {
	// LeaseTarget is how much traffic, at the rate observed for a key, one
	// lease should cover. Default 1s.
	LeaseTarget time.Duration
	// MaxLease bounds one lease. Default 1000.
	MaxLease int64
	// MaxLeaseShare bounds one lease to limit/MaxLeaseShare (at least 1), so
	// one replica cannot hoard a budget others need. Default 10.
	MaxLeaseShare int64
	// IdleReturn is how long a lease may go untouched before Run returns its
	// unspent units. Default 5s.
	IdleReturn time.Duration
	// StatementTimeout bounds each statement the limiter issues. Statements
	// run detached from the caller's cancellation, because other callers may
	// be waiting on the same lease. Default 5s.
	StatementTimeout time.Duration
	// PruneAfter is how long after its window ended a counter row is
	// deleted by Run. Default 1h. See pruneSQL for why deletion is safe.
	PruneAfter time.Duration
	// PruneInterval is how often Run looks for counter rows to delete.
	// Default 5m.
	PruneInterval time.Duration
	// Now reads the local clock; tests inject it. Default time.Now. Window
	// boundaries are not taken from it directly: each lease statement reads
	// the database clock, and the limiter corrects Now by the offset it
	// observes.
	Now func() time.Time
	// Registerer receives the limiter's metrics; nil registers none.
	// Limiters sharing a Registerer share their metrics.
	Registerer prometheus.Registerer
}

// Validate reports settings that are out of range. Zero means "default" and
// is valid.
func (c Config) Validate() error {
	var errs []error
	if c.LeaseTarget < 0 {
		errs = append(errs, fmt.Errorf("LeaseTarget %v is negative", c.LeaseTarget))
	}
	if c.MaxLease < 0 {
		errs = append(errs, fmt.Errorf("MaxLease %d is negative", c.MaxLease))
	}
	if c.MaxLeaseShare < 0 {
		errs = append(errs, fmt.Errorf("MaxLeaseShare %d is negative", c.MaxLeaseShare))
	}
	if c.IdleReturn < 0 {
		errs = append(errs, fmt.Errorf("IdleReturn %v is negative", c.IdleReturn))
	}
	if c.StatementTimeout < 0 {
		errs = append(errs, fmt.Errorf("StatementTimeout %v is negative", c.StatementTimeout))
	}
	if c.PruneAfter < 0 {
		errs = append(errs, fmt.Errorf("PruneAfter %v is negative", c.PruneAfter))
	}
	if c.PruneInterval < 0 {
		errs = append(errs, fmt.Errorf("PruneInterval %v is negative", c.PruneInterval))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("budget config: %w", err)
	}
	return nil
}

// withDefaults returns c with every unset or out-of-range setting replaced by
// its default.
func (c Config) withDefaults() Config {
	if c.LeaseTarget <= 0 {
		c.LeaseTarget = time.Second
	}
	if c.MaxLease <= 0 {
		c.MaxLease = 1000
	}
	if c.MaxLeaseShare <= 0 {
		c.MaxLeaseShare = 10
	}
	if c.IdleReturn <= 0 {
		c.IdleReturn = 5 * time.Second
	}
	if c.StatementTimeout <= 0 {
		c.StatementTimeout = 5 * time.Second
	}
	if c.PruneAfter <= 0 {
		c.PruneAfter = time.Hour
	}
	if c.PruneInterval <= 0 {
		c.PruneInterval = 5 * time.Minute
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return c
}

// Limiter enforces budgets by leasing them from Postgres. It is safe for
// concurrent use.
type Limiter struct {
	db      DB
	cfg     Config
	log     *slog.Logger
	metrics *metrics
	seed    maphash.Seed
	shards  [shardCount]shard
	clock   dbClock
	// pruneBatch is the most rows one prune statement deletes.
	pruneBatch int
	hooks      hooks
}

// hooks let tests observe the limiter's slow paths; they are nil outside
// tests (see export_test.go) and never run on Take's fast path.
type hooks struct {
	// wait runs when a Take is about to wait for a statement.
	wait func()
	// pruned runs when Run has finished a prune pass.
	pruned func(rows int64, err error)
}

// shardCount spreads keys over independently locked maps so Takes for
// different keys do not contend on one lock.
const shardCount = 64

type shard struct {
	mu sync.RWMutex
	m  map[key]*entry
}

// New returns a Limiter that leases budgets from db. Settings in cfg that are
// out of range (see Config.Validate) are logged and replaced by defaults. A
// nil logger discards logs.
func New(db DB, cfg Config, logger *slog.Logger) *Limiter {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if err := cfg.Validate(); err != nil {
		logger.Error("budget: using defaults for invalid settings", "err", err)
	}
	l := &Limiter{
		db:         db,
		cfg:        cfg.withDefaults(),
		log:        logger,
		metrics:    newMetrics(cfg.Registerer, logger),
		seed:       maphash.MakeSeed(),
		pruneBatch: pruneBatch,
	}
	for i := range l.shards {
		l.shards[i].m = make(map[key]*entry)
	}
	return l
}

// Take consumes one unit of subject's budget. It spends the local lease when
// it can and leases more from Postgres when it cannot, so it refuses only
// when Postgres has nothing left to lease. An error means the database could
// not be asked or its answer was lost (or spec is invalid, see
// ErrInvalidSpec) and the caller applies its fail mode; units already leased
// are always spent first, so a Postgres outage does not refuse them (units
// set aside because the limit was lowered are the exception: they are not
// spent until Postgres has them back).
//
// Take is safe for concurrent use. Concurrent Takes for one key share a
// single lease statement; Takes for different keys do not wait on each other.
func (l *Limiter) Take(ctx context.Context, subject string, spec Spec) (Outcome, error) {
	ws, err := spec.windowSeconds()
	if err != nil {
		l.metrics.errored.Inc()
		return Outcome{Limit: spec.Limit}, fmt.Errorf("take budget: %w", err)
	}
	if subject == "" {
		l.metrics.errored.Inc()
		return Outcome{Limit: spec.Limit}, fmt.Errorf("take budget: %w: empty subject", ErrInvalidSpec)
	}
	out := Outcome{Limit: spec.Limit}
	if spec.Limit == 0 {
		local, off := l.cfg.Now(), l.clock.offset()
		out.Reset = resetAt(windowStart(dbUnix(local, off), ws)+ws, off)
		l.metrics.refused.Inc()
		return out, nil
	}
	k := key{subject: subject, bucket: spec.Bucket, windowSeconds: ws}
	counted := false
	for {
		// The clocks are read afresh on every pass: a pass may follow a
		// wait for a statement, during which the window may have ended.
		// local measures durations; local+off, the estimated database
		// time, places windows.
		local, off := l.cfg.Now(), l.clock.offset()
		start := windowStart(dbUnix(local, off), ws)
		e := l.entry(k)
		e.mu.Lock()
		if e.dead {
			e.mu.Unlock()
			continue
		}
		win := e.advance(start, spec.Limit, local)
		out.Reset = resetAt(win+ws, off)
		if !counted {
			e.demand++
			counted = true
		}
		if e.remaining > 0 {
			e.remaining--
			e.touched = local
			out.Allowed = true
			out.Remaining = e.remaining + e.dbLeft
			e.mu.Unlock()
			l.metrics.allowed.Inc()
			return out, nil
		}
		f := e.flight
		if f == nil {
			f = l.startLease(ctx, e, spec.Unit, local)
		}
		e.mu.Unlock()

		if l.hooks.wait != nil {
			l.hooks.wait()
		}
		select {
		case <-f.done:
		case <-ctx.Done():
			l.metrics.errored.Inc()
			return out, fmt.Errorf("lease budget: %w", context.Cause(ctx))
		}
		if f.kind != leaseFlight {
			continue // a return: the lease slot is free again
		}
		switch {
		case f.err != nil:
			l.metrics.errored.Inc()
			return out, f.err
		case f.exhausted && f.limit >= spec.Limit:
			// Postgres has nothing left under a limit at least this
			// caller's, in f.window. If that window has ended since, look
			// again in the new one.
			off := l.clock.offset()
			if windowStart(dbUnix(l.cfg.Now(), off), ws) <= f.window {
				out.Reset = resetAt(f.window+ws, off)
				l.metrics.refused.Inc()
				return out, nil
			}
		}
		// The lease was granted, or refused under a lower limit than this
		// caller's (a caller with the old limit started it): spend from
		// the lease, or lease again, under this caller's limit.
	}
}

// entry returns the state for k, creating it if needed.
func (l *Limiter) entry(k key) *entry {
	s := &l.shards[maphash.Comparable(l.seed, k)%shardCount]
	s.mu.RLock()
	e := s.m[k]
	s.mu.RUnlock()
	if e != nil {
		return e
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if e = s.m[k]; e == nil {
		e = &entry{key: k, windowStart: noWindow}
		s.m[k] = e
	}
	return e
}
