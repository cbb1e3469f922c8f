package budget_test

import (
	"testing"
	"time"

	"github.com/cloud-connector/cloud-connector/gateways/budget"
)

// skewed returns a limiter whose local clock reads the fixture's true time
// plus skew; windows must still follow the database clock (the true time).
func (f fixture) skewed(tb testing.TB, skew time.Duration, cfg budget.Config) *budget.Limiter {
	tb.Helper()
	cfg.Now = func() time.Time { return f.clock.Now().Add(skew) }
	return f.limiter(tb, cfg)
}

func TestReplicasWithSkewedClocksShareWindows(t *testing.T) {
	t.Parallel()
	f := setup(t) // true time 12:00:10
	const skew = 30 * time.Second
	exact := f.limiter(t, budget.Config{})
	behind := f.skewed(t, -skew, budget.Config{}) // reads 11:59:40
	ahead := f.skewed(t, skew, budget.Config{})   // reads 12:00:40
	spec := minute(10)

	n := drain(t, exact, "org-1", spec) + drain(t, behind, "org-1", spec) + drain(t, ahead, "org-1", spec)
	f.advance(t, 40*time.Second) // true 12:00:50: behind reads 12:00:20, ahead 12:01:20
	n += drain(t, behind, "org-1", spec) + drain(t, ahead, "org-1", spec)
	if n != 10 {
		t.Errorf("allowed %d in the minute from 12:00 by the database clock, want the limit 10", n)
	}

	// Reset is the database's window end on each replica's own clock.
	for name, tc := range map[string]struct {
		l    *budget.Limiter
		skew time.Duration
	}{"exact": {exact, 0}, "behind": {behind, -skew}, "ahead": {ahead, skew}} {
		out, err := tc.l.Take(t.Context(), "org-1", spec)
		if err != nil || out.Allowed {
			t.Fatalf("%s: %+v, %v; want refused", name, out, err)
		}
		want := time.Date(2030, 1, 1, 12, 1, 0, 0, time.UTC).Add(tc.skew)
		if !out.Reset.Equal(want) {
			t.Errorf("%s: reset %v, want %v", name, out.Reset.UTC(), want)
		}
	}

	f.advance(t, 20*time.Second) // true 12:01:10: a new window for all, whatever they read
	n = drain(t, behind, "org-1", spec) + drain(t, ahead, "org-1", spec) + drain(t, exact, "org-1", spec)
	if n != 10 {
		t.Errorf("allowed %d in the minute from 12:01, want the limit 10", n)
	}
}

// A replica whose clock lags must stop spending a lease when the window
// ends by the database clock, not by its own.
func TestLeaseInHandEndsWithDatabaseWindow(t *testing.T) {
	t.Parallel()
	f := setup(t) // true time 12:00:10
	l := f.skewed(t, -30*time.Second, hoarding)
	spec := minute(10)

	if takeN(t, l, "org-1", spec, 1) != 1 { // leases all 10, 9 in hand
		t.Fatal("first take refused")
	}
	f.advance(t, 55*time.Second) // true 12:01:05; l reads 12:00:35
	n := drain(t, l, "org-1", spec)
	f.advance(t, 30*time.Second) // true 12:01:35; l reads 12:01:05
	n += drain(t, l, "org-1", spec)
	if n != 10 {
		t.Errorf("allowed %d in the minute from 12:01 by the database clock, want the limit 10", n)
	}
	if used, _ := f.used(t, "org-1", t0); used != 10 {
		t.Errorf("12:00 window used_units = %d, want 10", used)
	}
}
