package budget_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/cloud-connector/cloud-connector/gateways/budget"
	"github.com/cloud-connector/cloud-connector/migrations/pgtest"
)

var (
	_ budget.DB = (*pgxpool.Pool)(nil)
	_ budget.DB = (*pgx.Conn)(nil)
	_ budget.DB = pgx.Tx(nil)
)

// t0 is 10s into a minute window, so RetryAfter for a one-minute window is 50s.
var t0 = time.Date(2030, 1, 1, 12, 0, 10, 0, time.UTC)

func minute(limit int64) budget.Spec {
	return budget.Spec{Bucket: "complete_code", Limit: limit, Window: time.Minute, Unit: "request"}
}

// fixture is one test database, a pool on it for assertions, and a clock
// the test moves by hand. The clock is the true time: limiters read it (or
// a skewed copy) as their local clock, and the database reads it as its own
// (see useTestClock).
type fixture struct {
	url   string
	db    *pgxpool.Pool
	clock *clock
}

func setup(tb testing.TB) fixture {
	tb.Helper()
	url := pgtest.URL(tb)
	useTestClock(tb, url, t0)
	return fixture{url: url, db: openPool(tb, url), clock: &clock{now: t0}}
}

// useTestClock makes clock_timestamp() in the database at url read
// testclock.clock instead of the system clock, starting at now: a function
// of that name in a schema searched before pg_catalog shadows the built-in
// for unqualified calls. It takes effect for connections opened afterwards.
func useTestClock(tb testing.TB, url string, now time.Time) {
	tb.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		tb.Fatal(err)
	}
	defer conn.Close(ctx)
	for _, sql := range []string{
		`CREATE SCHEMA testclock`,
		`CREATE TABLE testclock.clock (now timestamptz NOT NULL)`,
		`CREATE FUNCTION testclock.clock_timestamp() RETURNS timestamptz
			LANGUAGE sql VOLATILE AS 'SELECT now FROM testclock.clock'`,
		`DO $$ BEGIN
			EXECUTE format('ALTER DATABASE %I SET search_path = testclock, pg_catalog, "$user", public', current_database());
		END $$`,
	} {
		if _, err := conn.Exec(ctx, sql); err != nil {
			tb.Fatalf("install test clock: %v", err)
		}
	}
	if _, err := conn.Exec(ctx, `INSERT INTO testclock.clock VALUES ($1)`, now); err != nil {
		tb.Fatalf("install test clock: %v", err)
	}
}

// advance moves the true time, as both the limiters and the database see it.
func (f fixture) advance(tb testing.TB, d time.Duration) {
	tb.Helper()
	f.clock.Advance(d)
	if _, err := f.db.Exec(context.Background(), `UPDATE testclock.clock SET now = $1`, f.clock.Now()); err != nil {
		tb.Fatalf("advance the database clock: %v", err)
	}
}

func openPool(tb testing.TB, url string) *pgxpool.Pool {
	tb.Helper()
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(pool.Close)
	return pool
}

// limiter starts a limiter with its own pool, as a separate gateway process
// would have, reading the fixture's clock unless cfg says otherwise.
func (f fixture) limiter(tb testing.TB, cfg budget.Config) *budget.Limiter {
	tb.Helper()
	if cfg.Now == nil {
		cfg.Now = f.clock.Now
	}
	return budget.New(openPool(tb, f.url), cfg, nil)
}

// used returns used_units and limit_units of the counter row for subject's
// complete_code bucket in the one-minute window containing at.
func (f fixture) used(tb testing.TB, subject string, at time.Time) (used, limit int64) {
	tb.Helper()
	err := f.db.QueryRow(context.Background(), `SELECT used_units, limit_units FROM budget_counters
		WHERE subject = $1 AND bucket = 'complete_code' AND window_seconds = 60 AND window_start = $2`,
		subject, at.Truncate(time.Minute)).Scan(&used, &limit)
	if err != nil {
		tb.Fatalf("read counter: %v", err)
	}
	return used, limit
}

type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// takeN calls Take n times one after another and returns how many were
// allowed, failing the test on an error.
func takeN(tb testing.TB, l *budget.Limiter, subject string, spec budget.Spec, n int) int {
	tb.Helper()
	allowed := 0
	for range n {
		out, err := l.Take(context.Background(), subject, spec)
		if err != nil {
			tb.Fatalf("take: %v", err)
		}
		if out.Allowed {
			allowed++
		}
	}
	return allowed
}

// drain takes until refused and returns how many were allowed.
func drain(tb testing.TB, l *budget.Limiter, subject string, spec budget.Spec) int {
	tb.Helper()
	for n := 0; ; n++ {
		out, err := l.Take(context.Background(), subject, spec)
		if err != nil {
			tb.Fatalf("take: %v", err)
		}
		if !out.Allowed {
			return n
		}
	}
}

func TestTakeAllowsExactlyLimitUnderConcurrency(t *testing.T) {
	t.Parallel()
	f := setup(t)
	l := f.limiter(t, budget.Config{})
	const limit, callers = 50, 500

	outs := make([]budget.Outcome, callers)
	errs := make([]error, callers)
	var wg sync.WaitGroup
	for i := range callers {
		wg.Go(func() { outs[i], errs[i] = l.Take(t.Context(), "org-1", minute(limit)) })
	}
	wg.Wait()

	reset := t0.Truncate(time.Minute).Add(time.Minute)
	allowed := 0
	for i, out := range outs {
		if errs[i] != nil {
			t.Fatalf("take %d: %v", i, errs[i])
		}
		if out.Allowed {
			allowed++
		}
		if !out.Reset.Equal(reset) || out.Limit != limit || out.Remaining < 0 || out.Remaining > limit {
			t.Errorf("take %d: outcome %+v, want limit %d, reset %v, 0 <= remaining <= limit", i, out, limit, reset)
		}
		if !out.Allowed && (out.Remaining != 0 || out.RetryAfter(t0) != 50*time.Second) {
			t.Errorf("refused take %d: remaining %d, retry after %v; want 0, 50s", i, out.Remaining, out.RetryAfter(t0))
		}
	}
	if allowed != limit {
		t.Errorf("allowed %d of %d callers, want exactly %d", allowed, callers, limit)
	}
	if used, _ := f.used(t, "org-1", t0); used != limit {
		t.Errorf("used_units = %d, want %d", used, limit)
	}
}

func TestReplicasNeverExceedLimitTogether(t *testing.T) {
	t.Parallel()
	f := setup(t)
	const limit, replicas, workers, attempts = 1000, 4, 16, 100
	spec := minute(limit)
	ls := make([]*budget.Limiter, replicas)
	for i := range ls {
		ls[i] = f.limiter(t, budget.Config{})
	}

	var allowed, refused atomic.Int64
	var wg sync.WaitGroup
	for _, l := range ls {
		for range workers {
			wg.Go(func() {
				for range attempts {
					out, err := l.Take(t.Context(), "org-1", spec)
					switch {
					case err != nil:
						t.Errorf("take: %v", err)
						return
					case out.Allowed:
						allowed.Add(1)
					default:
						refused.Add(1)
					}
				}
			})
		}
	}
	wg.Wait()
	if got := allowed.Load(); got > limit {
		t.Fatalf("replicas allowed %d, limit %d", got, limit)
	}
	if used, _ := f.used(t, "org-1", t0); used > limit {
		t.Fatalf("used_units = %d, limit %d", used, limit)
	}
	if refused.Load() == 0 {
		t.Fatalf("no take refused: demand %d did not exceed limit %d", replicas*workers*attempts, limit)
	}
	for _, l := range ls {
		if err := l.Close(t.Context()); err != nil {
			t.Fatalf("close: %v", err)
		}
	}
	if used, _ := f.used(t, "org-1", t0); used != allowed.Load() {
		t.Errorf("after close used_units = %d, want the %d units allowed", used, allowed.Load())
	}

	// Nothing leaked: whatever the replicas did not spend can still be spent.
	rest := drain(t, ls[0], "org-1", spec)
	if total := allowed.Load() + int64(rest); total != limit {
		t.Errorf("allowed %d while replicas ran and %d after, total %d, want %d", allowed.Load(), rest, total, limit)
	}
	if used, _ := f.used(t, "org-1", t0); used != limit {
		t.Errorf("after drain used_units = %d, want %d", used, limit)
	}
}

// hoarding makes the first lease take the whole limit, so the tests below
// can check that another replica gets the units back.
var hoarding = budget.Config{LeaseTarget: time.Hour, MaxLeaseShare: 1}

func TestClosedLeaseGoesToOtherReplica(t *testing.T) {
	t.Parallel()
	f := setup(t)
	a, b := f.limiter(t, hoarding), f.limiter(t, hoarding)
	spec := minute(100)

	if takeN(t, a, "org-1", spec, 1) != 1 {
		t.Fatal("first take refused")
	}
	if used, _ := f.used(t, "org-1", t0); used != 100 {
		t.Fatalf("used_units = %d after the first lease, want the whole limit 100", used)
	}
	if takeN(t, b, "org-1", spec, 1) != 0 {
		t.Fatal("b allowed while a holds the whole budget")
	}
	if err := a.Close(t.Context()); err != nil {
		t.Fatal(err)
	}
	if used, _ := f.used(t, "org-1", t0); used != 1 {
		t.Fatalf("used_units = %d after close, want 1", used)
	}
	if n := drain(t, b, "org-1", spec); n != 99 {
		t.Errorf("b allowed %d after a closed, want 99", n)
	}
}

func TestIdleLeaseGoesToOtherReplica(t *testing.T) {
	t.Parallel()
	f := setup(t)
	cfg := hoarding
	cfg.IdleReturn = time.Second
	a, b := f.limiter(t, cfg), f.limiter(t, hoarding)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	})
	spec := minute(100)

	if takeN(t, a, "org-1", spec, 1) != 1 || takeN(t, b, "org-1", spec, 1) != 0 {
		t.Fatal("want a allowed and b refused while a holds the whole budget")
	}
	f.advance(t, 2*time.Second) // a's lease is now idle, in the same window
	deadline := time.Now().Add(10 * time.Second)
	for {
		used, _ := f.used(t, "org-1", t0)
		if used == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("idle lease not returned: used_units = %d, want 1", used)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := drain(t, b, "org-1", spec); n != 99 {
		t.Errorf("b allowed %d after a's lease went idle, want 99", n)
	}
}

func TestWindowRolloverAndLimitChange(t *testing.T) {
	t.Parallel()
	f := setup(t)
	l := f.limiter(t, budget.Config{})

	if n := drain(t, l, "org-1", minute(3)); n != 3 {
		t.Fatalf("first window allowed %d, want 3", n)
	}
	f.advance(t, time.Minute)
	t1 := f.clock.Now()
	out, err := l.Take(t.Context(), "org-1", minute(3))
	if err != nil || !out.Allowed {
		t.Fatalf("first take of the next window: %+v, %v; want allowed", out, err)
	}
	if want := t1.Truncate(time.Minute).Add(time.Minute); !out.Reset.Equal(want) {
		t.Errorf("reset %v, want %v", out.Reset, want)
	}
	if n := drain(t, l, "org-1", minute(3)); n != 2 {
		t.Fatalf("second window allowed %d more, want 2", n)
	}
	if used, _ := f.used(t, "org-1", t0); used != 3 {
		t.Errorf("first window used_units = %d, want 3", used)
	}

	// Policy raises the limit mid-window.
	if n := drain(t, l, "org-1", minute(5)); n != 2 {
		t.Errorf("after raising the limit to 5 allowed %d more, want 2", n)
	}
	if used, limit := f.used(t, "org-1", t1); used != 5 || limit != 5 {
		t.Errorf("second window used %d of limit %d, want 5 of 5", used, limit)
	}
	// And lowers it below what was used.
	if n := takeN(t, l, "org-1", minute(4), 3); n != 0 {
		t.Errorf("after lowering the limit below use, allowed %d", n)
	}
}

func TestLoweredLimitReturnsLeaseInHand(t *testing.T) {
	t.Parallel()
	f := setup(t)
	l := f.limiter(t, budget.Config{LeaseTarget: time.Hour}) // leases limit/10

	if takeN(t, l, "org-1", minute(100), 1) != 1 {
		t.Fatal("first take refused")
	}
	if used, _ := f.used(t, "org-1", t0); used != 10 {
		t.Fatalf("used_units = %d, want a lease of 10", used)
	}
	if n := drain(t, l, "org-1", minute(5)); n != 4 {
		t.Errorf("after lowering the limit to 5, allowed %d more, want 4", n)
	}
	if used, limit := f.used(t, "org-1", t0); used != 5 || limit != 5 {
		t.Errorf("used %d of limit %d, want 5 of 5", used, limit)
	}
}

func TestZeroLimitRefusesWithoutDatabase(t *testing.T) {
	t.Parallel()
	l := budget.New(failDB{t}, budget.Config{Now: func() time.Time { return t0 }}, nil)
	out, err := l.Take(t.Context(), "org-1", minute(0))
	if err != nil || out.Allowed {
		t.Fatalf("take: %+v, %v; want refused without error", out, err)
	}
	if want := t0.Truncate(time.Minute).Add(time.Minute); !out.Reset.Equal(want) || out.RetryAfter(t0) != 50*time.Second {
		t.Errorf("reset %v, retry after %v; want %v, 50s", out.Reset, out.RetryAfter(t0), want)
	}
}

// failDB fails the test if the limiter touches the database.
type failDB struct{ tb testing.TB }

func (d failDB) Exec(context.Context, string, ...any) (pgconn.CommandTag, error) {
	d.tb.Error("unexpected Exec")
	return pgconn.CommandTag{}, errors.New("unexpected Exec")
}

func (d failDB) QueryRow(context.Context, string, ...any) pgx.Row {
	d.tb.Error("unexpected QueryRow")
	return errRow{errors.New("unexpected QueryRow")}
}

type errRow struct{ err error }

func (r errRow) Scan(...any) error { return r.err }

func TestDatabaseDownSpendsLeaseInHandFirst(t *testing.T) {
	t.Parallel()
	f := setup(t)
	pool := openPool(t, f.url)
	l := budget.New(pool, budget.Config{LeaseTarget: time.Hour, Now: f.clock.Now}, nil)
	spec := minute(1000)

	if takeN(t, l, "org-1", spec, 1) != 1 {
		t.Fatal("first take refused")
	}
	leased, _ := f.used(t, "org-1", t0)
	if leased < 2 {
		t.Fatalf("lease of %d, want at least 2 for this test", leased)
	}
	pool.Close()

	if n := takeN(t, l, "org-1", spec, int(leased)-1); n != int(leased)-1 {
		t.Fatalf("with the database down allowed %d of the %d units in hand", n, leased-1)
	}
	for range 2 {
		out, err := l.Take(t.Context(), "org-1", spec)
		if err == nil || out.Allowed {
			t.Fatalf("take after the lease ran out with the database down: %+v, %v; want an error", out, err)
		}
	}
	if err := l.Close(t.Context()); err != nil {
		t.Errorf("close with nothing in hand: %v", err)
	}
}

// countingDB records, per subject, the most lease statements in flight at
// once. Each lease statement is held open briefly so overlaps would show.
type countingDB struct {
	budget.DB
	mu       sync.Mutex
	inFlight map[string]int
	max      map[string]int
}

func (d *countingDB) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	subject := args[0].(string)
	d.mu.Lock()
	d.inFlight[subject]++
	d.max[subject] = max(d.max[subject], d.inFlight[subject])
	d.mu.Unlock()
	time.Sleep(time.Millisecond)
	return countedRow{d.DB.QueryRow(ctx, sql, args...), func() {
		d.mu.Lock()
		d.inFlight[subject]--
		d.mu.Unlock()
	}}
}

type countedRow struct {
	pgx.Row
	done func()
}

func (r countedRow) Scan(dest ...any) error {
	defer r.done()
	return r.Row.Scan(dest...)
}

func TestOneLeaseStatementPerKeyAtATime(t *testing.T) {
	t.Parallel()
	f := setup(t)
	db := &countingDB{DB: f.db, inFlight: map[string]int{}, max: map[string]int{}}
	l := budget.New(db, budget.Config{Now: f.clock.Now}, nil)

	var wg sync.WaitGroup
	for i := range 400 {
		wg.Go(func() {
			subject := fmt.Sprintf("org-%d", i%4)
			if _, err := l.Take(t.Context(), subject, minute(10_000)); err != nil {
				t.Errorf("take: %v", err)
			}
		})
	}
	wg.Wait()
	for subject, n := range db.max {
		if n != 1 {
			t.Errorf("%s: %d lease statements in flight at once, want 1", subject, n)
		}
	}
}

// gateDB holds lease statements for one subject until the gate opens.
type gateDB struct {
	budget.DB
	subject string
	entered chan struct{}
	gate    chan struct{}
}

func (d *gateDB) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	if args[0] == d.subject {
		d.entered <- struct{}{}
		<-d.gate
	}
	return d.DB.QueryRow(ctx, sql, args...)
}

func TestKeysDoNotWaitOnEachOther(t *testing.T) {
	t.Parallel()
	f := setup(t)
	db := &gateDB{DB: f.db, subject: "slow", entered: make(chan struct{}), gate: make(chan struct{})}
	l := budget.New(db, budget.Config{Now: f.clock.Now}, nil)

	slow := make(chan error)
	go func() {
		out, err := l.Take(t.Context(), "slow", minute(10))
		if err == nil && !out.Allowed {
			err = errors.New("refused")
		}
		slow <- err
	}()
	<-db.entered // the lease for "slow" is stuck in the database

	if out, err := l.Take(t.Context(), "fast", minute(10)); err != nil || !out.Allowed {
		t.Errorf("take for another key while one is stuck: %+v, %v; want allowed", out, err)
	}
	// A caller that gives up waiting on the stuck lease gets its context's error.
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := l.Take(ctx, "slow", minute(10)); !errors.Is(err, context.Canceled) {
		t.Errorf("take with a canceled context: %v, want context.Canceled", err)
	}

	close(db.gate)
	if err := <-slow; err != nil {
		t.Errorf("stuck take once released: %v, want allowed", err)
	}
}

func TestMetrics(t *testing.T) {
	t.Parallel()
	f := setup(t)
	reg := prometheus.NewRegistry()
	a := f.limiter(t, budget.Config{Registerer: reg, LeaseTarget: time.Hour, MaxLeaseShare: 1})
	b := f.limiter(t, budget.Config{Registerer: reg}) // shares the collectors

	takeN(t, a, "org-1", minute(10), 3) // one lease of 10, 3 allowed
	takeN(t, b, "org-1", minute(10), 2) // exhausted: 2 refused
	if err := a.Close(t.Context()); err != nil {
		t.Fatal(err)
	}

	got := gather(t, reg)
	for name, want := range map[string]float64{
		`cloudconnector_budget_takes_total{result="allowed"}`:                 3,
		`cloudconnector_budget_takes_total{result="refused"}`:                 2,
		`cloudconnector_budget_lease_statements_total{result="granted"}`:      1,
		`cloudconnector_budget_lease_statements_total{result="exhausted"}`:    2,
		`cloudconnector_budget_returned_units_total`:                          7,
		`cloudconnector_budget_lease_statement_duration_seconds_sample_count`: 3,
	} {
		if got[name] != want {
			t.Errorf("%s = %v, want %v", name, got[name], want)
		}
	}
}

// gather flattens counters and histogram sample counts into name{labels} → value.
func gather(tb testing.TB, reg *prometheus.Registry) map[string]float64 {
	tb.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		tb.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			name := mf.GetName()
			for _, lp := range m.GetLabel() {
				name += fmt.Sprintf("{%s=%q}", lp.GetName(), lp.GetValue())
			}
			switch {
			case m.GetCounter() != nil:
				out[name] = m.GetCounter().GetValue()
			case m.GetHistogram() != nil:
				out[name+"_sample_count"] = float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return out
}

func TestWindowsAlignToUnixEpoch(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		now    time.Time
		window time.Duration
		reset  time.Time
	}{
		{"minute", t0, time.Minute, time.Date(2030, 1, 1, 12, 1, 0, 0, time.UTC)},
		{"seven seconds", time.Unix(1_000_000_003, 0), 7 * time.Second, time.Unix(1_000_000_008, 0)}, // 142857143 * 7 = 1_000_000_001,
		{"day at midnight UTC", t0, 24 * time.Hour, time.Date(2030, 1, 2, 0, 0, 0, 0, time.UTC)},
		// The epoch was a Thursday, so week windows turn on Thursdays.
		{"week", t0, 7 * 24 * time.Hour, time.Date(2030, 1, 3, 0, 0, 0, 0, time.UTC)},
		{"before the epoch", time.Unix(-1, 0), time.Minute, time.Unix(0, 0)},
		{"on a boundary", time.Unix(120, 0), time.Minute, time.Unix(180, 0)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			l := budget.New(failDB{t}, budget.Config{Now: func() time.Time { return tc.now }}, nil)
			out, err := l.Take(t.Context(), "org-1", budget.Spec{Bucket: "b", Window: tc.window})
			if err != nil {
				t.Fatal(err)
			}
			if !out.Reset.Equal(tc.reset) {
				t.Errorf("reset %v, want %v", out.Reset.UTC(), tc.reset.UTC())
			}
		})
	}
}

func TestRetryAfter(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		untilReset time.Duration
		want       time.Duration
	}{
		{50 * time.Second, 50 * time.Second},
		{49*time.Second + time.Millisecond, 50 * time.Second},
		{time.Nanosecond, time.Second},
		{0, time.Second},
		{-time.Hour, time.Second},
	} {
		out := budget.Outcome{Reset: t0.Add(tc.untilReset)}
		if got := out.RetryAfter(t0); got != tc.want {
			t.Errorf("%v before reset: RetryAfter = %v, want %v", tc.untilReset, got, tc.want)
		}
	}
}

func TestInvalidSpec(t *testing.T) {
	t.Parallel()
	l := budget.New(failDB{t}, budget.Config{}, nil)
	for name, tc := range map[string]struct {
		subject string
		spec    budget.Spec
	}{
		"empty subject":     {"", minute(1)},
		"empty bucket":      {"org-1", budget.Spec{Limit: 1, Window: time.Minute}},
		"negative limit":    {"org-1", minute(-1)},
		"no window":         {"org-1", budget.Spec{Bucket: "b", Limit: 1}},
		"fractional window": {"org-1", budget.Spec{Bucket: "b", Limit: 1, Window: 1500 * time.Millisecond}},
	} {
		if _, err := l.Take(t.Context(), tc.subject, tc.spec); !errors.Is(err, budget.ErrInvalidSpec) {
			t.Errorf("%s: %v, want ErrInvalidSpec", name, err)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	if err := (budget.Config{}).Validate(); err != nil {
		t.Errorf("zero config: %v", err)
	}
	if err := (budget.Config{MaxLease: -1, IdleReturn: -time.Second}).Validate(); err == nil {
		t.Error("negative settings accepted")
	}
}

// holdDB holds lease statements for one subject until released; entered
// receives once for each statement held.
type holdDB struct {
	budget.DB
	subject string
	entered chan struct{}
	release chan struct{}
}

func newHoldDB(db budget.DB, subject string) *holdDB {
	return &holdDB{DB: db, subject: subject, entered: make(chan struct{}, 16), release: make(chan struct{})}
}

func (d *holdDB) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	if args[0] == d.subject {
		d.entered <- struct{}{}
		<-d.release
	}
	return d.DB.QueryRow(ctx, sql, args...)
}

// A caller whose policy gives a higher limit, joining a lease that a caller
// with the lower limit started, must not take that lease's "exhausted" as
// its own answer while budget under its limit remains.
func TestHigherLimitJoiningLowerLimitLeaseIsNotRefused(t *testing.T) {
	t.Parallel()
	f := setup(t)
	if n := drain(t, f.limiter(t, budget.Config{}), "org-1", minute(5)); n != 5 {
		t.Fatalf("another replica allowed %d, want 5", n)
	}
	db := newHoldDB(f.db, "org-1")
	l := budget.New(db, budget.Config{Now: f.clock.Now}, nil)
	waiting := make(chan struct{}, 16)
	budget.OnWait(l, func() { waiting <- struct{}{} })

	type result struct {
		out budget.Outcome
		err error
	}
	take := func(limit int64) chan result {
		c := make(chan result, 1)
		go func() {
			out, err := l.Take(t.Context(), "org-1", minute(limit))
			c <- result{out, err}
		}()
		return c
	}
	low := take(5) // starts a lease under limit 5
	<-db.entered
	<-waiting
	high := take(10) // joins it
	<-waiting
	close(db.release)

	if r := <-low; r.err != nil || r.out.Allowed {
		t.Errorf("take under limit 5: %+v, %v; want refused", r.out, r.err)
	}
	if r := <-high; r.err != nil || !r.out.Allowed {
		t.Errorf("take under limit 10 with 5 used: %+v, %v; want allowed", r.out, r.err)
	}
}

// A Take that waited for a lease while the window ended must be answered
// in the new window, and must not date its use of the lease to before the
// wait (which would make the lease look idle at once).
func TestTakeWaitingAcrossWindowEnd(t *testing.T) {
	t.Parallel()
	f := setup(t)
	f.advance(t, 47*time.Second) // 12:00:57
	db := newHoldDB(f.db, "org-1")
	l := budget.New(db, budget.Config{LeaseTarget: time.Hour, IdleReturn: 5 * time.Second, Now: f.clock.Now}, nil)

	type result struct {
		out budget.Outcome
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := l.Take(t.Context(), "org-1", minute(100))
		done <- result{out, err}
	}()
	<-db.entered
	f.advance(t, 6*time.Second) // 12:01:03, while the lease statement waits
	close(db.release)
	r := <-done

	t1 := f.clock.Now()
	if r.err != nil || !r.out.Allowed {
		t.Fatalf("take: %+v, %v; want allowed", r.out, r.err)
	}
	if want := time.Date(2030, 1, 1, 12, 2, 0, 0, time.UTC); !r.out.Reset.Equal(want) {
		t.Errorf("reset %v, want %v: the end of the window the unit was taken in", r.out.Reset.UTC(), want)
	}
	if used, _ := f.used(t, "org-1", t1); used != 10 {
		t.Errorf("12:01 window used_units = %d, want the lease of 10", used)
	}
	// Just used: not idle.
	if errs := budget.Sweep(t.Context(), l); len(errs) != 0 {
		t.Fatal(errs)
	}
	if used, _ := f.used(t, "org-1", t1); used != 10 {
		t.Errorf("after a sweep used_units = %d, want 10: a lease just spent from was returned as idle", used)
	}
}
