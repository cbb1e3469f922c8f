package budget

import (
	"sync"
	"sync/atomic"
	"time"
)

// maxDrift bounds how fast the local and database clocks may drift apart
// between two samples, as a fraction of elapsed time: 500 ppm, the frequency
// tolerance NTP assumes. Drift beyond it is handled like a clock step.
const maxDrift = 500e-6

// dbClock estimates the database clock from the local one, so that every
// gateway puts a window boundary at the same instant: the one Postgres'
// clock says. It is safe for concurrent use; offset is the only method on
// the hot path and is one atomic load.
//
// Each lease statement reads clock_timestamp() somewhere between the moment
// it was sent and the moment its reply arrived, so it bounds the offset
// (database minus local) to [db-received, db-sent]. The estimate keeps the
// intersection of these bounds over successive samples, each widened by
// maxDrift for its age, and starts over from the newest sample when they
// stop intersecting (one of the clocks stepped).
//
// The estimate is the lower bound. Residual error: the estimated database
// time is never ahead of the real one (while drift stays within maxDrift
// and neither clock steps), and lags it by at most the width of the bounds,
// which is at most the round trip of the tightest recent lease statement,
// plus maxDrift times the time since the last sample. Because it is never
// ahead, a gateway never ends a window before Postgres does; because it may
// lag, units leased for a window can be spent up to that lag after the
// window ended by the database clock. Which window a lease counts against
// is always decided by Postgres itself (see leaseSQL), never estimated.
type dbClock struct {
	off atomic.Int64 // lo, in nanoseconds, for the hot path

	mu     sync.Mutex
	lo, hi time.Duration // bounds on the offset at `at`
	at     time.Time     // local time of the last sample
	valid  bool
}

// offset returns the estimated database time minus local time. Before the
// first sample it is 0: the local clock is taken as is.
func (c *dbClock) offset() time.Duration {
	return time.Duration(c.off.Load())
}

// observe folds in a statement sent at local time sent, answered at local
// time received, that read db on the database clock.
func (c *dbClock) observe(sent, received, db time.Time) {
	if received.Before(sent) { // the local clock stepped back meanwhile
		sent = received
	}
	lo, hi := db.Sub(received), db.Sub(sent)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.valid {
		slack := time.Duration(float64(max(received.Sub(c.at), 0)) * maxDrift)
		plo, phi := c.lo-slack, c.hi+slack
		if lo <= phi && plo <= hi {
			lo, hi = max(lo, plo), min(hi, phi)
		}
	}
	c.lo, c.hi, c.at, c.valid = lo, hi, received, true
	c.off.Store(int64(lo))
}
