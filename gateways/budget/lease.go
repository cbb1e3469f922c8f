package budget

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
)

// leaseSQL leases up to $6 units of the window of $3 seconds that the
// database clock is in, in one statement. The window is computed here, from
// clock_timestamp(), never by a gateway: gateways with skewed clocks would
// otherwise count the same instant against different rows, and no lease
// can ever be granted for a window that has ended by the database clock
// (which is what makes pruning ended windows safe).
//
// The row is created on the first lease of a window. ON CONFLICT DO UPDATE
// locks the existing row and evaluates SET and WHERE against its latest
// committed version, so concurrent leases from any number of gateways
// serialize on the row and used_units never passes the limit. All SET
// expressions see the old row, which is why last_lease_units reports the
// grant. The limit in the request wins, so a policy change takes effect on
// the next lease.
//
// It always returns one row: the database time it read and the window it
// chose, then the grant, which is NULL when the window is exhausted.
const leaseSQL = `
WITH clock AS MATERIALIZED (
    SELECT t AS now, to_timestamp(floor(extract(epoch FROM t) / $3::int) * $3::int) AS window_start
    FROM clock_timestamp() AS t
), leased AS (
    INSERT INTO budget_counters AS c
        (subject, bucket, window_start, window_seconds, unit, limit_units, used_units, last_lease_units)
    SELECT $1::text, $2::text, clock.window_start, $3::int, $4::text, $5::bigint,
        LEAST($6::bigint, $5::bigint), LEAST($6::bigint, $5::bigint)
    FROM clock
    ON CONFLICT (subject, bucket, window_seconds, window_start) DO UPDATE
    SET used_units = c.used_units + LEAST($6::bigint, EXCLUDED.limit_units - c.used_units),
        last_lease_units = LEAST($6::bigint, EXCLUDED.limit_units - c.used_units),
        limit_units = EXCLUDED.limit_units,
        unit = EXCLUDED.unit,
        updated_at = now()
    WHERE c.used_units < EXCLUDED.limit_units
    RETURNING last_lease_units, used_units
)
SELECT clock.now, clock.window_start, leased.last_lease_units, leased.used_units
FROM clock LEFT JOIN leased ON true`

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
	// windowStart is the window, in Unix seconds on the database clock,
	// that the lease belongs to; noWindow before the first Take. Units in
	// hand were always granted for it.
	windowStart int64
	limit       int64
	// remaining is the unspent part of the lease in hand.
	remaining int64
	// pendingReturn holds units of windowStart that must not be spent: they
	// were granted under a limit that has since been lowered. The next
	// lease flight (or an idle return) gives them back; they never flow
	// back into remaining.
	pendingReturn int64
	// dbLeft is limit - used_units as the last lease saw it.
	dbLeft int64
	// flight is the statement running for this key, if any. At most one
	// runs at a time; callers needing its outcome wait on flight.done.
	flight *flight
	// touched is when, on the local clock, the lease was last granted or
	// spent from.
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
	kind flightKind
	// window is the entry's window when the flight started; a completed
	// lease flight sets it to the window Postgres leased in.
	window int64
	// limit is the limit a lease flight asked Postgres to enforce.
	limit     int64
	done      chan struct{}
	exhausted bool
	err       error
}

// advance moves e to the window starting at start and applies limit, and
// returns the window the caller is in. A lease for an ended window is
// dropped: its units count against a window nobody can spend from any more.
// If the clock stepped back, or a lease put e in a window the caller's
// estimate of the database clock has not reached yet, the caller stays in
// e's newer window. now is the local time. Called with e.mu held.
func (e *entry) advance(start, limit int64, now time.Time) int64 {
	if start < e.windowStart {
		start = e.windowStart
	}
	if start != e.windowStart {
		if e.windowStart == noWindow {
			e.sampledAt = now
		}
		e.moveTo(start, limit)
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

// moveTo puts e in the window starting at start with nothing in hand.
// Called with e.mu held.
func (e *entry) moveTo(start, limit int64) {
	e.windowStart = start
	e.remaining = 0
	e.pendingReturn = 0
	e.limit = limit
	e.dbLeft = limit
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

// startLease starts the lease flight for e and returns it. now is the local
// time. Called with e.mu held and no flight running.
func (l *Limiter) startLease(ctx context.Context, e *entry, unit string, now time.Time) *flight {
	f := &flight{kind: leaseFlight, window: e.windowStart, limit: e.limit, done: make(chan struct{})}
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
	window int64 // the entry's window, which ret belongs to
	unit   string
	limit  int64
	want   int64
	ret    int64 // units of window to return before leasing
}

// lease runs a lease flight and publishes its outcome.
func (l *Limiter) lease(ctx context.Context, e *entry, f *flight, req leaseRequest) {
	ctx, cancel := context.WithTimeout(ctx, l.cfg.StatementTimeout)
	defer cancel()

	var retErr, err error
	if req.ret > 0 {
		retErr = l.giveBack(ctx, req.key, req.window, req.ret)
	}
	var g grant
	if retErr == nil {
		g, err = l.leaseUnits(ctx, req)
	}

	retUnknown := retErr != nil && mayHaveApplied(retErr)
	leaseUnknown := err != nil && mayHaveApplied(err)
	e.mu.Lock()
	switch {
	case retErr != nil:
		f.err = fmt.Errorf("lease budget: %w", retErr)
		if !retUnknown && e.windowStart == req.window {
			// Still counted in Postgres and still ours, but granted under
			// a higher limit than now applies: keep them out of reach
			// until a later flight or an idle return gives them back.
			e.pendingReturn += req.ret
		}
	case err != nil:
		f.err = fmt.Errorf("lease budget: %w", err)
	default:
		// Postgres chose the window by its own clock; the entry follows.
		f.window = g.window
		if e.windowStart != g.window {
			e.moveTo(g.window, e.limit)
		}
		switch {
		case g.units == 0:
			f.exhausted = true
			if e.limit <= req.limit {
				e.dbLeft = 0
			}
		case e.limit < req.limit:
			// Granted under a limit that was lowered while the statement
			// ran: give it back before spending, as advance does with a
			// lease in hand.
			e.pendingReturn += g.units
			e.dbLeft = max(0, e.limit-g.used)
		default:
			e.remaining += g.units
			e.dbLeft = max(0, e.limit-g.used)
			e.touched = l.cfg.Now()
		}
	}
	e.flight = nil
	e.mu.Unlock()
	close(f.done)

	switch {
	case retUnknown:
		l.abandon(ctx, req.key, l.metrics.abandonedReturn, req.ret, retErr)
	case leaseUnknown:
		l.abandon(ctx, req.key, l.metrics.abandonedLease, req.want, err)
	case err != nil:
		l.log.DebugContext(ctx, "budget: lease failed", "subject", req.key.subject, "bucket", req.key.bucket, "err", err)
	}
}

// mayHaveApplied reports whether a statement that failed with err may
// nevertheless have taken effect in Postgres. Only a certain outcome says it
// did not: an error that happened before the statement reached the server
// (pgconn marks those SafeToRetry; a failed connection attempt, which it
// does not mark, happens before any statement is sent), or an error the
// server answered with, which rolled the statement back. Anything else, such
// as a reply lost or too late after the statement committed, may have.
func mayHaveApplied(err error) bool {
	var unsent notSentError
	if pgconn.SafeToRetry(err) || errors.As(err, &unsent) {
		return false
	}
	var connect *pgconn.ConnectError
	var server *pgconn.PgError
	return !errors.As(err, &connect) && !errors.As(err, &server)
}

// acquirer is what a connection pool adds to DB. Taking the connection
// before the statement tells one that was never sent (no connection in
// time: the pool was busy or the database unreachable) from one whose reply
// was lost, which the pool's own QueryRow and Exec report alike.
type acquirer interface {
	Acquire(ctx context.Context) (*pgxpool.Conn, error)
}

// notSentError is a statement that never left the gateway.
type notSentError struct{ err error }

func (e notSentError) Error() string { return "no database connection: " + e.err.Error() }
func (e notSentError) Unwrap() error { return e.err }

// withConn runs fn on a connection of its own when the limiter's DB is a
// pool, so that failing to get one is known not to have applied anything.
func (l *Limiter) withConn(ctx context.Context, fn func(DB) error) error {
	pool, ok := l.db.(acquirer)
	if !ok {
		return fn(l.db)
	}
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return notSentError{err}
	}
	defer conn.Release()
	return fn(conn)
}

// abandon records n units given up for the current window because a
// statement's outcome is unknown. They may stay counted in Postgres with
// no gateway holding them, so the window may refuse up to n units early;
// assuming the opposite could allow them twice.
func (l *Limiter) abandon(ctx context.Context, k key, c prometheus.Counter, n int64, err error) {
	c.Add(float64(n))
	l.log.WarnContext(ctx, "budget: statement outcome unknown; its units are given up for this window",
		"subject", k.subject, "bucket", k.bucket, "units", n, "err", err)
}

type grant struct {
	window      int64 // Unix seconds on the database clock
	units, used int64
}

// leaseUnits runs leaseSQL and feeds the database time it read to the
// clock estimate. A zero grant means the window is exhausted.
func (l *Limiter) leaseUnits(ctx context.Context, req leaseRequest) (grant, error) {
	began := time.Now()
	sent := l.cfg.Now()
	var (
		dbNow, window time.Time
		units, used   *int64
	)
	err := l.withConn(ctx, func(db DB) error {
		return db.QueryRow(ctx, leaseSQL,
			req.key.subject, req.key.bucket, req.key.windowSeconds, req.unit, req.limit, req.want,
		).Scan(&dbNow, &window, &units, &used)
	})
	received := l.cfg.Now()
	l.metrics.leaseSeconds.Observe(time.Since(began).Seconds())
	if err != nil {
		l.metrics.leases.WithLabelValues("error").Inc()
		return grant{}, err
	}
	l.clock.observe(sent, received, dbNow)
	g := grant{window: window.Unix()}
	if units == nil || used == nil {
		l.metrics.leases.WithLabelValues("exhausted").Inc()
		return g, nil
	}
	g.units, g.used = *units, *used
	l.metrics.leases.WithLabelValues("granted").Inc()
	return g, nil
}

// giveBack returns n unspent units of the window starting at window.
func (l *Limiter) giveBack(ctx context.Context, k key, window, n int64) error {
	err := l.withConn(ctx, func(db DB) error {
		_, err := db.Exec(ctx, returnSQL, k.subject, k.bucket, k.windowSeconds, time.Unix(window, 0).UTC(), n)
		return err
	})
	if err != nil {
		return fmt.Errorf("return budget: %w", err)
	}
	l.metrics.returned.Add(float64(n))
	return nil
}
