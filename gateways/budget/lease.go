package budget

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// leaseSQL leases up to $7 units in one statement. The row is created on
// the first lease of a window. ON CONFLICT DO UPDATE locks the existing row
// and evaluates SET and WHERE against its latest committed version, so
// concurrent leases from any number of gateways serialize on the row and
// used_units never passes the limit. All SET expressions see the old row,
// which is why last_lease_units reports the grant. The limit in the request
// wins, so a policy change takes effect on the next lease. No row returned
// means the window is exhausted.
const leaseSQL = `
INSERT INTO budget_counters AS c
    (subject, bucket, window_start, window_seconds, unit, limit_units, used_units, last_lease_units)
VALUES ($1, $2, $3, $4::int, $5, $6::bigint, LEAST($7::bigint, $6::bigint), LEAST($7::bigint, $6::bigint))
ON CONFLICT (subject, bucket, window_seconds, window_start) DO UPDATE
SET used_units = c.used_units + LEAST($7::bigint, EXCLUDED.limit_units - c.used_units),
    last_lease_units = LEAST($7::bigint, EXCLUDED.limit_units - c.used_units),
    limit_units = EXCLUDED.limit_units,
    unit = EXCLUDED.unit,
    updated_at = now()
WHERE c.used_units < EXCLUDED.limit_units
RETURNING last_lease_units, used_units, limit_units`

// returnSQL gives back unspent units of a lease. The decrement is atomic on
// the row, and GREATEST keeps the CHECK (used_units >= 0) if the row was
// reset by hand meanwhile.
const returnSQL = `
UPDATE budget_counters
SET used_units = GREATEST(used_units - $5::bigint, 0), updated_at = now()
WHERE subject = $1 AND bucket = $2 AND window_seconds = $3::int AND window_start = $4`

// rateTau is the time constant of the per-key rate estimate: demand older
// than a few rateTau no longer shapes lease sizes.
const rateTau = time.Second

// key identifies a budget; each key has one counter row per window.
type key struct {
	subject       string
	bucket        string
	windowSeconds int64
}

// entry is a key's local state. All fields are guarded by mu.
type entry struct {
	key key

	mu sync.Mutex
	// dead is set when Run drops the entry from its shard; holders of a
	// dead entry look the key up again.
	dead bool
	// windowStart is the window, in Unix seconds, that the lease belongs
	// to; noWindow before the first Take.
	windowStart int64
	limit       int64
	// remaining is the unspent part of the lease in hand.
	remaining int64
	// pendingReturn holds units taken out of the lease after the limit was
	// lowered; the next lease flight returns them before leasing again.
	pendingReturn int64
	// dbLeft is limit - used_units as the last lease saw it.
	dbLeft int64
	// flight is the statement running for this key, if any. At most one
	// runs at a time; callers needing its outcome wait on flight.done.
	flight *flight
	// touched is when the lease was last granted or spent from.
	touched time.Time

	// rate is an exponentially weighted estimate of Takes per second;
	// demand counts Takes since sampledAt.
	rate      float64
	demand    int64
	sampledAt time.Time
}

// noWindow is the windowStart of an entry no Take has used yet.
const noWindow = math.MinInt64

type flightKind int

const (
	leaseFlight flightKind = iota
	returnFlight
)

// flight is one statement in progress for a key. Its result fields are
// written before done is closed and read only after.
type flight struct {
	kind      flightKind
	window    int64
	done      chan struct{}
	exhausted bool
	err       error
}

// advance moves e to the window starting at start and applies limit, and
// returns the window the caller is in. A lease for an ended window is
// dropped: its units count against a window nobody can spend from any more.
// If the clock stepped back, the caller stays in e's newer window. Called
// with e.mu held.
func (e *entry) advance(start, limit int64, now time.Time) int64 {
	if start < e.windowStart {
		start = e.windowStart
	}
	if start != e.windowStart {
		if e.windowStart == noWindow {
			e.sampledAt = now
		}
		e.windowStart = start
		e.remaining = 0
		e.pendingReturn = 0
		e.limit = limit
		e.dbLeft = limit
	}
	if limit != e.limit {
		if limit < e.limit && e.remaining > 0 {
			// The lease was sized for a larger limit; give it back so the
			// lower limit is enforced against everything granted so far.
			e.pendingReturn += e.remaining
			e.remaining = 0
		}
		e.dbLeft = max(0, e.dbLeft+limit-e.limit)
		e.limit = limit
	}
	return start
}

// leaseSize folds the demand since the last lease into the rate estimate
// and returns how many units to ask for. The rate is a time-weighted EWMA:
// with weight a = 1-exp(-dt/tau), a burst of n Takes in a short dt adds
// about n/tau, so the next lease grows with the queue of waiting callers
// while sustained traffic converges to its real rate. Called with e.mu held.
func (e *entry) leaseSize(now time.Time, cfg Config) int64 {
	dt := now.Sub(e.sampledAt).Seconds()
	n := float64(e.demand)
	if dt > 0 {
		a := -math.Expm1(-dt / rateTau.Seconds())
		e.rate = e.rate*(1-a) + n/dt*a
	} else {
		e.rate += n / rateTau.Seconds()
	}
	e.demand = 0
	e.sampledAt = now

	ceiling := min(cfg.MaxLease, max(1, e.limit/cfg.MaxLeaseShare))
	want := math.Ceil(e.rate * cfg.LeaseTarget.Seconds())
	switch {
	case !(want >= 1): // also catches NaN
		return 1
	case want >= float64(ceiling):
		return ceiling
	}
	return int64(want)
}

// startLease starts the lease flight for e and returns it. Called with e.mu
// held and no flight running.
func (l *Limiter) startLease(ctx context.Context, e *entry, unit string, now time.Time) *flight {
	f := &flight{kind: leaseFlight, window: e.windowStart, done: make(chan struct{})}
	e.flight = f
	req := leaseRequest{
		key:    e.key,
		window: e.windowStart,
		unit:   unit,
		limit:  e.limit,
		want:   e.leaseSize(now, l.cfg),
		ret:    e.pendingReturn,
	}
	e.pendingReturn = 0
	// The statement runs on its own goroutine, detached from ctx's
	// cancellation: other callers may join the flight, and a caller that
	// gives up must not fail them or lose a grant that already committed.
	go l.lease(context.WithoutCancel(ctx), e, f, req)
	return f
}

type leaseRequest struct {
	key    key
	window int64
	unit   string
	limit  int64
	want   int64
	ret    int64 // units to return before leasing
}

// lease runs a lease flight and publishes its outcome.
func (l *Limiter) lease(ctx context.Context, e *entry, f *flight, req leaseRequest) {
	ctx, cancel := context.WithTimeout(ctx, l.cfg.StatementTimeout)
	defer cancel()

	var err error
	returned := req.ret == 0
	if !returned {
		err = l.giveBack(ctx, req.key, req.window, req.ret)
		returned = err == nil
	}
	var g grant
	if err == nil {
		g, err = l.leaseUnits(ctx, req)
	}

	e.mu.Lock()
	current := e.windowStart == f.window
	switch {
	case err != nil:
		f.err = fmt.Errorf("lease budget: %w", err)
		if !returned && current {
			// Still counted in Postgres, so still ours to spend.
			e.remaining += req.ret
		}
		l.log.DebugContext(ctx, "budget: lease failed", "subject", req.key.subject, "bucket", req.key.bucket, "err", err)
	case g.units == 0:
		f.exhausted = true
		if current {
			e.dbLeft = 0
		}
	case current:
		e.remaining += g.units
		e.dbLeft = max(0, g.limit-g.used)
		e.touched = l.cfg.Now()
	}
	e.flight = nil
	e.mu.Unlock()
	close(f.done)
}

type grant struct {
	units, used, limit int64
}

// leaseUnits runs leaseSQL. A zero grant means the window is exhausted.
func (l *Limiter) leaseUnits(ctx context.Context, req leaseRequest) (grant, error) {
	began := time.Now()
	var g grant
	err := l.db.QueryRow(ctx, leaseSQL,
		req.key.subject, req.key.bucket, time.Unix(req.window, 0).UTC(), req.key.windowSeconds,
		req.unit, req.limit, req.want,
	).Scan(&g.units, &g.used, &g.limit)
	l.metrics.leaseSeconds.Observe(time.Since(began).Seconds())
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		l.metrics.leases.WithLabelValues("exhausted").Inc()
		return grant{}, nil
	case err != nil:
		l.metrics.leases.WithLabelValues("error").Inc()
		return grant{}, err
	}
	l.metrics.leases.WithLabelValues("granted").Inc()
	return g, nil
}

// giveBack returns n unspent units of the window starting at window.
func (l *Limiter) giveBack(ctx context.Context, k key, window, n int64) error {
	_, err := l.db.Exec(ctx, returnSQL, k.subject, k.bucket, k.windowSeconds, time.Unix(window, 0).UTC(), n)
	if err != nil {
		return fmt.Errorf("return budget: %w", err)
	}
	l.metrics.returned.Add(float64(n))
	return nil
}
