package budget

import (
	"testing"
	"time"
)

func TestDBClockEstimate(t *testing.T) {
	t.Parallel()
	local := time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)
	at := func(d time.Duration) time.Time { return local.Add(d) }
	const ms = time.Millisecond
	var c dbClock
	if c.offset() != 0 {
		t.Fatalf("offset before any sample: %v, want 0", c.offset())
	}

	// The database is 30s ahead; a 10ms round trip bounds the offset to
	// [30s-10ms, 30s] and the estimate is the lower bound: never ahead.
	c.observe(at(0), at(10*ms), at(30*time.Second+4*ms))
	if want := 30*time.Second - 6*ms; c.offset() != want {
		t.Errorf("after one sample: %v, want %v", c.offset(), want)
	}
	// A tighter sample a second later narrows the bounds.
	c.observe(at(time.Second), at(time.Second+2*ms), at(31*time.Second+ms))
	if want := 30*time.Second - ms; c.offset() != want {
		t.Errorf("after a tighter sample: %v, want %v", c.offset(), want)
	}
	// A slow sample that agrees only widens the bounds by the drift allowed
	// since the last one (1.498s between replies).
	c.observe(at(2*time.Second), at(2*time.Second+500*ms), at(32*time.Second+100*ms))
	if got, want := c.offset(), 30*time.Second-ms-time.Duration(float64(1498*ms)*maxDrift); got != want {
		t.Errorf("after a slow sample: %v, want %v", got, want)
	}
	// A sample that contradicts the bounds (a clock stepped) starts over.
	c.observe(at(3*time.Second), at(3*time.Second+2*ms), at(13*time.Second))
	if want := 10*time.Second - 2*ms; c.offset() != want {
		t.Errorf("after a clock step: %v, want %v", c.offset(), want)
	}
}

func TestDBUnixIsAddThenUnix(t *testing.T) {
	t.Parallel()
	for _, at := range []time.Time{
		time.Date(2030, 1, 1, 12, 0, 59, 999_999_999, time.UTC),
		time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC),
		time.Unix(-1, 500_000_000),
		time.Unix(0, 0),
	} {
		for _, off := range []time.Duration{0, 1, -1, time.Nanosecond * 500_000_001, -30 * time.Second, 30*time.Second + 3, -time.Hour - 7} {
			if got, want := dbUnix(at, off), at.Add(off).Unix(); got != want {
				t.Errorf("dbUnix(%v, %v) = %d, want %d", at, off, got, want)
			}
			if got, want := resetAt(120, off), time.Unix(120, 0).Add(-off); !got.Equal(want) {
				t.Errorf("resetAt(120, %v) = %v, want %v", off, got, want)
			}
		}
	}
}
