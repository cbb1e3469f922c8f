package migrations_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cloud-connector/cloud-connector/migrations"
	"github.com/cloud-connector/cloud-connector/migrations/pgtest"
)

func TestUpIsIdempotent(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	v1, err := migrations.Up(ctx, conn)
	if err != nil {
		t.Fatalf("Up on migrated database: %v", err)
	}
	if v1 < 3 {
		t.Fatalf("version = %d, want >= 3", v1)
	}
	v2, err := migrations.Up(ctx, conn)
	if err != nil || v2 != v1 {
		t.Fatalf("second Up = %d, %v; want %d, nil", v2, err, v1)
	}
}

// TestUsageEventsIdempotentAndPartitioned checks the two properties analysts
// rely on: a retried insert never double counts, and rows land in a monthly
// partition rather than the default one.
func TestUsageEventsIdempotentAndPartitioned(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t)
	id := uuid.Must(uuid.NewV7())
	at := time.Now().UTC().Truncate(time.Microsecond)
	for range 2 {
		_, err := pool.Exec(ctx, `INSERT INTO usage_events (event_id, occurred_at, instance_id, realm, feature,
			gateway, route, method, status, duration_ms) VALUES ($1, $2, 'i', 'saas', 'complete_code', 'ai', 'r', 'POST', 200, 1.5)
			ON CONFLICT (event_id, occurred_at) DO NOTHING`, id, at)
		if err != nil {
			t.Fatal(err)
		}
	}
	var n, inDefault int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM usage_events`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM usage_events_default`).Scan(&inDefault); err != nil {
		t.Fatal(err)
	}
	if n != 1 || inDefault != 0 {
		t.Fatalf("rows = %d (default partition %d), want 1 (0)", n, inDefault)
	}
	if _, err := pool.Exec(ctx, `SELECT usage_events_ensure_partitions(3)`); err != nil {
		t.Fatalf("ensure partitions again: %v", err)
	}
	var requests int
	if err := pool.QueryRow(ctx, `SELECT requests FROM usage_daily WHERE feature = 'complete_code'`).Scan(&requests); err != nil || requests != 1 {
		t.Fatalf("usage_daily requests = %d, %v; want 1", requests, err)
	}
}

func TestCheck(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t)
	if err := migrations.Check(ctx, pool); err != nil {
		t.Fatalf("Check on migrated database: %v", err)
	}
	if _, err := pool.Exec(ctx, "UPDATE "+migrations.VersionTable+" SET version = 1"); err != nil {
		t.Fatal(err)
	}
	if err := migrations.Check(ctx, pool); !errors.Is(err, migrations.ErrSchemaBehind) {
		t.Fatalf("Check on a database behind the embedded schema = %v; want ErrSchemaBehind", err)
	}
	if _, err := pool.Exec(ctx, "DROP TABLE "+migrations.VersionTable); err != nil {
		t.Fatal(err)
	}
	if err := migrations.Check(ctx, pool); !errors.Is(err, migrations.ErrSchemaBehind) {
		t.Fatalf("Check on an unmigrated database = %v; want ErrSchemaBehind", err)
	}
	// Failing to read the version is not the schema being behind.
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if err := migrations.Check(cancelled, pool); err == nil || errors.Is(err, migrations.ErrSchemaBehind) {
		t.Fatalf("Check that could not read the version = %v; want an error other than ErrSchemaBehind", err)
	}
}

// monthStart returns the first instant (UTC) of the month offset months from
// the current one.
func monthStart(offset int) time.Time {
	now := time.Now().UTC()
	return time.Date(now.Year(), now.Month()+time.Month(offset), 1, 0, 0, 0, 0, time.UTC)
}

// partitionOf names the monthly partition holding t.
func partitionOf(t time.Time) string { return "usage_events_" + t.UTC().Format("2006_01") }

// monthResult is one row of usage_events_ensure_partitions.
type monthResult struct {
	PartitionName string    `db:"partition_name"`
	RangeStart    time.Time `db:"range_start"`
	RangeEnd      time.Time `db:"range_end"`
	MonthOffset   int       `db:"month_offset"`
	Outcome       string    `db:"outcome"`
	MovedRows     int64     `db:"moved_rows"`
	ErrorMessage  *string   `db:"error_message"`
}

type querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// ensurePartitions calls usage_events_ensure_partitions with args and returns
// its rows by month offset.
func ensurePartitions(t *testing.T, db querier, args string) map[int]monthResult {
	t.Helper()
	byOffset, err := callEnsurePartitions(db, args)
	if err != nil {
		t.Fatal(err)
	}
	return byOffset
}

func callEnsurePartitions(db querier, args string) (map[int]monthResult, error) {
	rows, err := db.Query(context.Background(), "SELECT * FROM usage_events_ensure_partitions("+args+")")
	if err != nil {
		return nil, fmt.Errorf("usage_events_ensure_partitions(%s): %w", args, err)
	}
	results, err := pgx.CollectRows(rows, pgx.RowToStructByName[monthResult])
	if err != nil {
		return nil, fmt.Errorf("usage_events_ensure_partitions(%s): %w", args, err)
	}
	byOffset := map[int]monthResult{}
	for _, r := range results {
		byOffset[r.MonthOffset] = r
	}
	return byOffset, nil
}

// insertEvent stores one event stamped at, as the gateway does (a retry is a
// no-op), and reports whether a row was added.
func insertEvent(t *testing.T, db *pgxpool.Pool, id uuid.UUID, at time.Time, instance string) bool {
	t.Helper()
	tag, err := db.Exec(context.Background(), `INSERT INTO usage_events (event_id, occurred_at, instance_id, realm,
		feature, gateway, route, method, status, duration_ms) VALUES ($1, $2, $3, 'saas', 'complete_code', 'ai', 'r', 'POST', 200, 1)
		ON CONFLICT (event_id, occurred_at) DO NOTHING`, id, at, instance)
	if err != nil {
		t.Fatalf("insert event at %s: %v", at, err)
	}
	return tag.RowsAffected() == 1
}

func countRows(t *testing.T, db *pgxpool.Pool, table string) int {
	t.Helper()
	var n int
	if err := db.QueryRow(context.Background(), "SELECT count(*) FROM "+pgx.Identifier{table}.Sanitize()).Scan(&n); err != nil {
		t.Fatalf("count %s: %v", table, err)
	}
	return n
}

// TestEnsurePartitionsMovesRowsOutOfDefault: rows in the default partition
// for a month used to make creating that month's partition fail, and with it
// every later month, for good. Now they are moved into the new partition, no
// row lost or doubled.
func TestEnsurePartitionsMovesRowsOutOfDefault(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t)

	// Months with no partition yet: beyond the two ahead the migration made
	// (a gateway with a skewed clock), and long before it ran (a spool
	// replayed into a new database).
	stamps := []time.Time{
		monthStart(3).Add(24 * time.Hour), monthStart(3).Add(48 * time.Hour), monthStart(4), monthStart(-13).Add(time.Hour),
	}
	ids := make([]uuid.UUID, len(stamps))
	for i, at := range stamps {
		ids[i] = uuid.Must(uuid.NewV7())
		insertEvent(t, pool, ids[i], at, "i")
	}
	if n := countRows(t, pool, "usage_events_default"); n != len(stamps) {
		t.Fatalf("default partition holds %d rows, want %d", n, len(stamps))
	}

	got := ensurePartitions(t, pool, "4")
	for offset, want := range map[int]struct {
		outcome string
		moved   int64
	}{-13: {"created", 1}, 0: {"present", 0}, 1: {"present", 0}, 2: {"present", 0}, 3: {"created", 2}, 4: {"created", 1}} {
		r, ok := got[offset]
		if !ok || r.Outcome != want.outcome || r.MovedRows != want.moved {
			t.Errorf("month %+d: %+v, want outcome %s, %d rows moved", offset, r, want.outcome, want.moved)
		}
	}
	if len(got) != 6 {
		t.Errorf("ensure reported %d months, want 6: %+v", len(got), got)
	}

	if n := countRows(t, pool, "usage_events_default"); n != 0 {
		t.Errorf("default partition holds %d rows after ensure, want 0", n)
	}
	if n := countRows(t, pool, "usage_events"); n != len(stamps) {
		t.Errorf("usage_events holds %d rows, want %d", n, len(stamps))
	}
	for i, at := range stamps {
		var part string
		if err := pool.QueryRow(ctx, "SELECT tableoid::regclass::text FROM usage_events WHERE event_id = $1", ids[i]).Scan(&part); err != nil {
			t.Fatal(err)
		}
		if part != partitionOf(at) {
			t.Errorf("event at %s is in %s, want %s", at, part, partitionOf(at))
		}
		// The primary key came along: a retried insert is still a no-op.
		if insertEvent(t, pool, ids[i], at, "i") {
			t.Errorf("event at %s stored twice after the move", at)
		}
	}

	// Idempotent: a second call finds everything in place.
	for offset, r := range ensurePartitions(t, pool, "4") {
		if r.Outcome != "present" || r.MovedRows != 0 {
			t.Errorf("second call, month %+d: %+v, want present", offset, r)
		}
	}
}

// TestEnsurePartitionsReportsFailedMonthAndDoesTheRest: one month that cannot
// be created is reported and rolled back, rows included, and the months
// after it are created anyway.
func TestEnsurePartitionsReportsFailedMonthAndDoesTheRest(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t)

	// Month +3: a table of that name is in the way.
	if _, err := pool.Exec(ctx, "CREATE TABLE "+partitionOf(monthStart(3))+" (x int)"); err != nil {
		t.Fatal(err)
	}
	// Month +4: its row cannot leave the default partition; the failure
	// comes halfway through, after the partition was created.
	if _, err := pool.Exec(ctx, `CREATE FUNCTION refuse_delete() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN RAISE EXCEPTION 'row is stuck'; END $$;
		CREATE TRIGGER stuck BEFORE DELETE ON usage_events_default FOR EACH ROW
		WHEN (OLD.instance_id = 'stuck') EXECUTE FUNCTION refuse_delete()`); err != nil {
		t.Fatal(err)
	}
	stuck := uuid.Must(uuid.NewV7())
	insertEvent(t, pool, stuck, monthStart(4).Add(time.Hour), "stuck")
	// Month +5: fine, with a row to move.
	insertEvent(t, pool, uuid.Must(uuid.NewV7()), monthStart(5).Add(time.Hour), "i")

	got := ensurePartitions(t, pool, "5")
	if r := got[3]; r.Outcome != "failed" || r.ErrorMessage == nil || !strings.Contains(*r.ErrorMessage, "not a partition") {
		t.Errorf("month +3: %+v, want failed: not a partition", r)
	}
	if r := got[4]; r.Outcome != "failed" || r.ErrorMessage == nil || !strings.Contains(*r.ErrorMessage, "row is stuck") || r.MovedRows != 0 {
		t.Errorf("month +4: %+v, want failed: row is stuck", r)
	}
	if r := got[5]; r.Outcome != "created" || r.MovedRows != 1 {
		t.Errorf("month +5: %+v, want created with 1 row moved", r)
	}

	// Month +4 was rolled back: no half-made table, its row still stored.
	var exists bool
	if err := pool.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", partitionOf(monthStart(4))).Scan(&exists); err != nil {
		t.Fatal(err)
	}
	if exists {
		t.Error("the failed month left its table behind")
	}
	var part string
	if err := pool.QueryRow(ctx, "SELECT tableoid::regclass::text FROM usage_events WHERE event_id = $1", stuck).Scan(&part); err != nil {
		t.Fatalf("row of the failed month: %v", err)
	}
	if part != "usage_events_default" {
		t.Errorf("row of the failed month is in %s, want usage_events_default", part)
	}
}

// TestEnsurePartitionsDoesNotBlockInserts: creating a partition used to take
// ACCESS EXCLUSIVE on usage_events, so it queued behind an open analyst
// transaction and every insert queued behind it. Now, while it waits for
// that transaction, inserts of this month go through.
func TestEnsurePartitionsDoesNotBlockInserts(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t)
	missing := partitionOf(monthStart(2))
	if _, err := pool.Exec(ctx, "DROP TABLE "+missing); err != nil {
		t.Fatal(err)
	}
	connect := func() *pgx.Conn {
		conn, err := pgx.Connect(ctx, pool.Config().ConnConfig.ConnString())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close(ctx) })
		return conn
	}

	// An analyst's transaction, left open, that has read usage_daily.
	analyst := connect()
	tx, err := analyst.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if err := tx.QueryRow(ctx, "SELECT count(*) FROM usage_daily").Scan(&n); err != nil {
		t.Fatal(err)
	}

	// The partition check, told to wait as long as it takes.
	ensurer := connect()
	var pid int
	if err := ensurer.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	type result struct {
		months map[int]monthResult
		err    error
	}
	done, finished := make(chan result, 1), make(chan struct{})
	go func() {
		defer close(finished)
		months, err := callEnsurePartitions(ensurer, "2, '10 minutes'")
		done <- result{months, err}
	}()
	// Should the test stop early: end the analyst's transaction, so the
	// check finishes before its connection is closed.
	t.Cleanup(func() {
		analyst.Close(ctx)
		<-finished
	})

	// Wait until it waits for a lock, and see which.
	var waitingFor string
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		err := pool.QueryRow(ctx, "SELECT relation::regclass::text FROM pg_locks WHERE pid = $1 AND NOT granted", pid).Scan(&waitingFor)
		if err == nil {
			break
		}
		if err != pgx.ErrNoRows {
			t.Fatal(err)
		}
		select {
		case res := <-done:
			t.Fatalf("the partition check returned without waiting for the analyst's transaction: %+v, %v", res.months, res.err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the partition check never waited for the analyst's transaction")
		}
	}
	if waitingFor == "usage_events" {
		t.Errorf("the partition check waits for a lock on usage_events itself: inserts queue behind it")
	}

	// An insert of this month must not wait behind the partition check. It
	// gives up at once if it has to wait for a lock at all.
	inserter := connect()
	if _, err := inserter.Exec(ctx, "SET lock_timeout = '100ms'"); err != nil {
		t.Fatal(err)
	}
	if _, err := inserter.Exec(ctx, `INSERT INTO usage_events (event_id, occurred_at, instance_id, realm, feature,
		gateway, route, method, status, duration_ms) VALUES ($1, now(), 'i', 'saas', 'complete_code', 'ai', 'r', 'POST', 200, 1)
		ON CONFLICT (event_id, occurred_at) DO NOTHING`, uuid.Must(uuid.NewV7())); err != nil {
		t.Errorf("insert while the partition check waits: %v", err)
	}

	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	res := <-done
	if res.err != nil {
		t.Fatal(res.err)
	}
	if r := res.months[2]; r.Outcome != "created" {
		t.Errorf("month +2 after the analyst committed: %+v, want created", r)
	}
}

// TestUsageDailyCountsEveryStatus: every request falls in exactly one of
// succeeded, client_errors, cancelled and failed (status 0, unknown, in
// none); a WebSocket session (101) is a success, a client that went away
// (499) is cancelled.
func TestUsageDailyCountsEveryStatus(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t)
	for _, status := range []int{101, 200, 304, 400, 404, 499, 499, 502, 504, 0} {
		if _, err := pool.Exec(ctx, `INSERT INTO usage_events (event_id, occurred_at, instance_id, realm, feature,
			gateway, route, method, status, duration_ms) VALUES (gen_random_uuid(), now(), 'i', 'saas', 'complete_code', 'ai', 'r', 'GET', $1, 1)`,
			status); err != nil {
			t.Fatal(err)
		}
	}
	var requests, succeeded, clientErrors, cancelled, failed int
	if err := pool.QueryRow(ctx, `SELECT requests, succeeded, client_errors, cancelled, failed FROM usage_daily`).
		Scan(&requests, &succeeded, &clientErrors, &cancelled, &failed); err != nil {
		t.Fatal(err)
	}
	if requests != 10 || succeeded != 3 || clientErrors != 2 || cancelled != 2 || failed != 2 {
		t.Errorf("requests %d, succeeded %d, client_errors %d, cancelled %d, failed %d; want 10, 3, 2, 2, 2",
			requests, succeeded, clientErrors, cancelled, failed)
	}

	// The columns reports already use keep their place.
	rows, err := pool.Query(ctx, "SELECT * FROM usage_daily LIMIT 0")
	if err != nil {
		t.Fatal(err)
	}
	rows.Close()
	var names []string
	for _, f := range rows.FieldDescriptions() {
		names = append(names, f.Name)
	}
	want := []string{"day", "organization_id", "instance_id", "feature", "requests", "succeeded", "failed", "units",
		"request_bytes", "response_bytes", "p50_duration_ms", "p99_duration_ms"}
	if len(names) < len(want) || strings.Join(names[:len(want)], ",") != strings.Join(want, ",") {
		t.Errorf("usage_daily columns %v, want %v first", names, want)
	}
}

// TestUsageColumnsDocumented: analysts read the column comments (\d+).
func TestUsageColumnsDocumented(t *testing.T) {
	t.Parallel()
	pool := pgtest.Pool(t)
	rows, err := pool.Query(context.Background(), `SELECT c.relname || '.' || a.attname
		FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
		WHERE c.relname IN ('usage_events', 'usage_daily') AND c.relnamespace = 'public'::regnamespace
			AND a.attnum > 0 AND NOT a.attisdropped AND coalesce(col_description(c.oid, a.attnum), '') = ''
		ORDER BY 1`)
	if err != nil {
		t.Fatal(err)
	}
	undocumented, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	if len(undocumented) > 0 {
		t.Errorf("columns without a comment: %v", undocumented)
	}
}
