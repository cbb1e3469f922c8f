package budget_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cloud-connector/cloud-connector/gateways/budget"
)

// counterRow is a budget_counters row for the prune tests: a subject naming
// the case, and its window.
type counterRow struct {
	subject string
	start   time.Time
	window  time.Duration
}

func (f fixture) insertRows(tb testing.TB, rows []counterRow) {
	tb.Helper()
	for _, r := range rows {
		_, err := f.db.Exec(context.Background(), `INSERT INTO budget_counters
			(subject, bucket, window_start, window_seconds, unit, limit_units, used_units)
			VALUES ($1, 'complete_code', $2, $3, 'request', 10, 3)`, r.subject, r.start, int64(r.window/time.Second))
		if err != nil {
			tb.Fatalf("insert %s: %v", r.subject, err)
		}
	}
}

func (f fixture) subjects(tb testing.TB) []string {
	tb.Helper()
	rows, err := f.db.Query(context.Background(), `SELECT subject FROM budget_counters ORDER BY subject`)
	if err != nil {
		tb.Fatal(err)
	}
	var out []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			tb.Fatal(err)
		}
		out = append(out, s)
	}
	if err := rows.Err(); err != nil {
		tb.Fatal(err)
	}
	return out
}

// The database clock reads t0 = 2030-01-01 12:00:10; PruneAfter is 1h.
var pruneCases = []counterRow{
	{"delete: minute ended 2h ago a", t0.Add(-2 * time.Hour).Truncate(time.Minute), time.Minute},
	{"delete: minute ended 2h ago b", t0.Add(-2*time.Hour - time.Minute).Truncate(time.Minute), time.Minute},
	{"delete: minute ended 2h ago c", t0.Add(-2*time.Hour - 2*time.Minute).Truncate(time.Minute), time.Minute},
	{"delete: minute ended 1h0m10s ago", t0.Add(-time.Hour - time.Minute).Truncate(time.Minute), time.Minute},
	{"delete: day ended 12h ago", time.Date(2029, 12, 31, 0, 0, 0, 0, time.UTC), 24 * time.Hour},
	{"delete: hour ended years ago", time.Date(2025, 6, 1, 10, 0, 0, 0, time.UTC), time.Hour},
	{"keep: minute ended 59m10s ago", t0.Add(-time.Hour).Truncate(time.Minute), time.Minute},
	{"keep: minute ended 10s ago", t0.Add(-time.Minute).Truncate(time.Minute), time.Minute},
	{"keep: current minute", t0.Truncate(time.Minute), time.Minute},
	{"keep: current day, started 12h ago", time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC), 24 * time.Hour},
	{"keep: current 30 days, started 20 days ago", time.Date(2029, 12, 12, 0, 0, 0, 0, time.UTC), 30 * 24 * time.Hour},
	{"keep: hour ended 10s ago, started before the cutoff", t0.Add(-time.Hour).Truncate(time.Hour), time.Hour},
}

func kept() []string {
	var out []string
	for _, r := range pruneCases {
		if r.subject[:5] == "keep:" {
			out = append(out, r.subject)
		}
	}
	slices.Sort(out)
	return out
}

func TestPruneDeletesOnlyLongEndedWindows(t *testing.T) {
	t.Parallel()
	f := setup(t)
	f.insertRows(t, pruneCases)
	reg := prometheus.NewRegistry()
	// The local clock is two hours fast: pruning goes by the database's.
	l := f.skewed(t, 2*time.Hour, budget.Config{Registerer: reg})
	budget.SetPruneBatch(l, 2)

	rows, more, err := budget.Prune(t.Context(), l)
	if err != nil || rows != 6 || more {
		t.Errorf("prune: %d rows, more %v, %v; want 6 rows, no more", rows, more, err)
	}
	if got, want := f.subjects(t), kept(); !slices.Equal(got, want) {
		t.Errorf("rows left:\n%q\nwant:\n%q", got, want)
	}
	if got := gather(t, reg)["cloudconnector_budget_pruned_rows_total"]; got != 6 {
		t.Errorf("pruned_rows_total = %v, want 6", got)
	}
	if rows, more, err := budget.Prune(t.Context(), l); err != nil || rows != 0 || more {
		t.Errorf("second prune: %d rows, more %v, %v; want nothing", rows, more, err)
	}
}

func TestPruneWorksOffBacklogInBoundedPasses(t *testing.T) {
	t.Parallel()
	f := setup(t)
	var old []counterRow
	for i := range 25 {
		old = append(old, counterRow{"old", t0.Add(-2*time.Hour - time.Duration(i)*time.Minute).Truncate(time.Minute), time.Minute})
	}
	f.insertRows(t, old)
	l := f.limiter(t, budget.Config{})
	budget.SetPruneBatch(l, 1)

	// A pass runs a bounded number of statements (10), then says there is
	// more; Run goes on at its next tick.
	var got []int64
	for more := true; more; {
		rows, m, err := budget.Prune(t.Context(), l)
		if err != nil {
			t.Fatal(err)
		}
		got, more = append(got, rows), m
		if len(got) > 25 {
			t.Fatal("prune never finished")
		}
	}
	if want := []int64{10, 10, 5}; !slices.Equal(got, want) {
		t.Errorf("rows pruned per pass %v, want %v", got, want)
	}
	if left := f.subjects(t); len(left) != 0 {
		t.Errorf("%d rows left, want 0", len(left))
	}
}

func TestRunPrunes(t *testing.T) {
	t.Parallel()
	f := setup(t)
	f.insertRows(t, pruneCases)
	l := f.limiter(t, budget.Config{IdleReturn: 40 * time.Millisecond})
	type pass struct {
		rows int64
		err  error
	}
	passes := make(chan pass, 1)
	budget.OnPruned(l, func(rows int64, err error) {
		select {
		case passes <- pass{rows, err}:
		default:
		}
	})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error)
	go func() { done <- l.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	})

	if p := <-passes; p.err != nil || p.rows != 6 {
		t.Errorf("first prune pass: %d rows, %v; want 6", p.rows, p.err)
	}
	if got, want := f.subjects(t), kept(); !slices.Equal(got, want) {
		t.Errorf("rows left:\n%q\nwant:\n%q", got, want)
	}
	// Leasing in the current window is unaffected.
	if n := drain(t, l, "keep: current minute", minute(10)); n != 7 {
		t.Errorf("current window allowed %d after pruning, want the 7 left", n)
	}
}
