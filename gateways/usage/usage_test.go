package usage_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/cloud-connector/cloud-connector/gateways/usage"
	"github.com/cloud-connector/cloud-connector/migrations/pgtest"
	"github.com/cloud-connector/cloud-connector/services/pglocal"
	"github.com/cloud-connector/cloud-connector/services/server/servertest"
)

var (
	_ usage.DB = (*pgxpool.Pool)(nil)
	_ usage.DB = (*pgx.Conn)(nil)
	_ usage.DB = pgx.Tx(nil)
)

// fixture is what most tests need: a fresh migrated database and a spool
// directory.
type fixture struct {
	pool  *pgxpool.Pool
	spool string
}

func setup(t *testing.T) fixture {
	t.Helper()
	return fixture{pool: pgtest.Pool(t), spool: t.TempDir()}
}

// newRecorder returns a Recorder with its own metrics registry, closed at
// cleanup if the test did not close it.
func newRecorder(t *testing.T, db usage.DB, cfg usage.Config) (*usage.Recorder, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	cfg.Registerer = reg
	rec, err := usage.New(db, cfg, slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		rec.Close(ctx)
	})
	return rec, reg
}

// start runs rec in the background until cleanup.
func start(t *testing.T, rec *usage.Recorder) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- rec.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

func closeRecorder(t *testing.T, rec *usage.Recorder) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := rec.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

const orgID = "0190a8c2-5c7d-7b3e-9f1a-2b3c4d5e6f70"

// event returns a complete event; odd i leaves every optional column empty.
func event(i int) usage.Event {
	e := usage.Event{
		ID:             uuid.Must(uuid.NewV7()),
		OccurredAt:     time.Now().UTC().Truncate(time.Microsecond),
		OrganizationID: orgID,
		InstanceID:     fmt.Sprintf("instance-%d", i%7),
		Realm:          "saas",
		GlobalUserID:   fmt.Sprintf("user-%d", i),
		Feature:        "complete_code",
		Gateway:        "ai",
		Route:          "code_completions",
		Method:         "POST",
		Status:         200 + i%3,
		Duration:       time.Duration(i) * time.Microsecond,
		RequestBytes:   int64(i),
		ResponseBytes:  int64(2 * i),
		RequestID:      fmt.Sprintf("req-%d", i),
		GitLabVersion:  "17.3.0",
		ClientType:     "vscode",
	}
	units := int64(i * 10)
	e.Units = &units
	if i%2 == 1 {
		e.OrganizationID, e.GlobalUserID, e.Units = "", "", nil
		e.RequestID, e.GitLabVersion, e.ClientType = "", "", ""
	}
	return e
}

// rows reads every stored event by id.
func rows(t *testing.T, pool *pgxpool.Pool) map[uuid.UUID]usage.Event {
	t.Helper()
	rs, err := pool.Query(context.Background(), `SELECT event_id, occurred_at, organization_id::text, instance_id,
		realm, global_user_id, feature, gateway, route, method, status, duration_ms, request_bytes,
		response_bytes, units, request_id, gitlab_version, client_type FROM usage_events`)
	if err != nil {
		t.Fatalf("query usage_events: %v", err)
	}
	got := map[uuid.UUID]usage.Event{}
	for rs.Next() {
		var (
			e                                         usage.Event
			org, user, requestID, version, clientType *string
			ms                                        float64
		)
		if err := rs.Scan(&e.ID, &e.OccurredAt, &org, &e.InstanceID, &e.Realm, &user, &e.Feature, &e.Gateway,
			&e.Route, &e.Method, &e.Status, &ms, &e.RequestBytes, &e.ResponseBytes, &e.Units, &requestID,
			&version, &clientType); err != nil {
			t.Fatalf("scan usage_events: %v", err)
		}
		e.OccurredAt = e.OccurredAt.UTC()
		e.Duration = time.Duration(math.Round(ms * float64(time.Millisecond)))
		for _, p := range []struct {
			dst *string
			src *string
		}{{&e.OrganizationID, org}, {&e.GlobalUserID, user}, {&e.RequestID, requestID}, {&e.GitLabVersion, version}, {&e.ClientType, clientType}} {
			if p.src != nil {
				if *p.src == "" {
					t.Errorf("event %s: empty string stored instead of NULL", e.ID)
				}
				*p.dst = *p.src
			}
		}
		got[e.ID] = e
	}
	if err := rs.Err(); err != nil {
		t.Fatalf("read usage_events: %v", err)
	}
	return got
}

func count(t *testing.T, pool *pgxpool.Pool) int {
	t.Helper()
	var n int
	if err := pool.QueryRow(context.Background(), "SELECT count(*) FROM usage_events").Scan(&n); err != nil {
		t.Fatalf("count usage_events: %v", err)
	}
	return n
}

// metric sums the samples of the named metric whose labels include the given
// name/value pairs.
func metric(t *testing.T, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather metrics: %v", err)
	}
	var sum float64
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	samples:
		for _, m := range f.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				found := false
				for _, lp := range m.GetLabel() {
					found = found || lp.GetName() == labels[i] && lp.GetValue() == labels[i+1]
				}
				if !found {
					continue samples
				}
			}
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return sum
}

// unreachablePool returns a pool for a port nothing listens on.
func unreachablePool(t *testing.T) *pgxpool.Pool {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	pool, err := pgxpool.New(context.Background(), "postgres://postgres@"+addr+"/usage?sslmode=disable&connect_timeout=5")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

func spoolFiles(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func TestRecordWritesEveryEventOnce(t *testing.T) {
	t.Parallel()
	f := setup(t)
	rec, reg := newRecorder(t, f.pool, usage.Config{BatchSize: 50, BufferSize: 5000, FlushInterval: 10 * time.Millisecond})
	start(t, rec)

	const writers, each = 8, 250
	want := make([][]usage.Event, writers)
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				e := event(w*each + i)
				want[w] = append(want[w], e)
				rec.Record(e)
			}
		})
	}
	wg.Wait()
	closeRecorder(t, rec)

	got := rows(t, f.pool)
	if len(got) != writers*each {
		t.Fatalf("stored %d events, want %d", len(got), writers*each)
	}
	for _, events := range want {
		for _, w := range events {
			if g, ok := got[w.ID]; !ok {
				t.Errorf("event %s missing", w.ID)
			} else if !reflect.DeepEqual(g, w) {
				t.Errorf("event round trip:\n got %+v\nwant %+v", g, w)
			}
		}
	}
	for name, want := range map[string]float64{
		"cloudconnector_usage_events_recorded_total": writers * each,
		"cloudconnector_usage_events_written_total":  writers * each,
		"cloudconnector_usage_events_dropped_total":  0,
		"cloudconnector_usage_events_spooled_total":  0,
		"cloudconnector_usage_buffer_events":         0,
	} {
		if got := metric(t, reg, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}

func TestRecordSameEventTwiceStoresOneRow(t *testing.T) {
	t.Parallel()
	f := setup(t)
	e := event(1)

	// Twice in one batch.
	rec, reg := newRecorder(t, f.pool, usage.Config{})
	rec.Record(e)
	rec.Record(e)
	closeRecorder(t, rec)
	if got := metric(t, reg, "cloudconnector_usage_events_duplicate_total"); got != 1 {
		t.Errorf("duplicates = %v, want 1", got)
	}

	// Again in a later batch, as a retry after an unknown outcome would.
	rec, reg = newRecorder(t, f.pool, usage.Config{})
	rec.Record(e)
	closeRecorder(t, rec)
	if got := metric(t, reg, "cloudconnector_usage_events_duplicate_total"); got != 1 {
		t.Errorf("duplicates = %v, want 1", got)
	}

	if n := count(t, f.pool); n != 1 {
		t.Fatalf("stored %d rows, want 1", n)
	}
}

func TestDatabaseOutageLosesNoEvents(t *testing.T) {
	t.Parallel()
	spool := t.TempDir()
	url := pgtest.URL(t)
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	cfg := usage.Config{BatchSize: 10, FlushInterval: 5 * time.Millisecond, RetryBackoff: 5 * time.Millisecond, SpoolDir: spool}
	rec, reg := newRecorder(t, pool, cfg)
	start(t, rec)

	for i := range 25 {
		rec.Record(event(i))
	}
	servertest.Eventually(t, "events written before the outage", func() bool { return count(t, pool) == 25 })

	// The database goes away for good while the gateway keeps serving.
	cc, err := pgx.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	adminURL, err := pglocal.WithDatabase(url, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	admin, err := pgx.Connect(context.Background(), adminURL)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Exec(context.Background(), "DROP DATABASE "+pgx.Identifier{cc.Database}.Sanitize()+" WITH (FORCE)"); err != nil {
		t.Fatal(err)
	}
	admin.Close(context.Background())

	var during []usage.Event
	for i := range 45 {
		e := event(100 + i)
		during = append(during, e)
		rec.Record(e)
	}
	servertest.Eventually(t, "a failed flush", func() bool { return metric(t, reg, "cloudconnector_usage_flush_errors_total") > 0 })
	closeRecorder(t, rec)
	if got := metric(t, reg, "cloudconnector_usage_events_spooled_total"); got != 45 {
		t.Errorf("spooled %v events, want 45", got)
	}
	if got := metric(t, reg, "cloudconnector_usage_events_dropped_total"); got != 0 {
		t.Errorf("dropped %v events, want 0", got)
	}
	if len(spoolFiles(t, spool)) == 0 {
		t.Fatal("spool is empty after Close during an outage")
	}

	// A recorder started against a healthy database replays the spool.
	healthy := pgtest.Pool(t)
	cfg.SpoolDir = spool
	rec2, reg2 := newRecorder(t, healthy, cfg)
	start(t, rec2)
	servertest.Eventually(t, "spool replayed", func() bool { return len(spoolFiles(t, spool)) == 0 })
	got := rows(t, healthy)
	if len(got) != len(during) {
		t.Errorf("replayed %d events, want %d", len(got), len(during))
	}
	for _, w := range during {
		if g, ok := got[w.ID]; !ok {
			t.Errorf("event %s lost", w.ID)
		} else if !reflect.DeepEqual(g, w) {
			t.Errorf("event round trip through the spool:\n got %+v\nwant %+v", g, w)
		}
	}
	if got := metric(t, reg2, "cloudconnector_usage_events_replayed_total"); got != 45 {
		t.Errorf("replayed metric = %v, want 45", got)
	}
}

func TestFullBufferSpillsToSpoolDuringOutage(t *testing.T) {
	t.Parallel()
	f := setup(t)
	const bufferSize, burst, bursts = 40, 10, 15
	highWater := float64(bufferSize - bufferSize/4)
	rec, reg := newRecorder(t, unreachablePool(t), usage.Config{
		BatchSize: 5, BufferSize: bufferSize, FlushInterval: time.Millisecond,
		RetryBackoff: time.Millisecond, SpoolDir: f.spool,
	})
	start(t, rec)

	// Far more events than the buffer holds. Each burst fits in what is left
	// below the high-water mark, so none may be dropped.
	for range bursts {
		servertest.Eventually(t, "buffer below its high-water mark", func() bool {
			return metric(t, reg, "cloudconnector_usage_buffer_events") < highWater
		})
		for i := range burst {
			rec.Record(event(i))
		}
	}
	servertest.Eventually(t, "a spill while running", func() bool { return metric(t, reg, "cloudconnector_usage_events_spooled_total") > 0 })
	closeRecorder(t, rec)

	for name, want := range map[string]float64{
		"cloudconnector_usage_events_recorded_total": burst * bursts,
		"cloudconnector_usage_events_spooled_total":  burst * bursts,
		"cloudconnector_usage_events_dropped_total":  0,
	} {
		if got := metric(t, reg, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}

	rec2, _ := newRecorder(t, f.pool, usage.Config{SpoolDir: f.spool})
	start(t, rec2)
	servertest.Eventually(t, "spool replayed", func() bool {
		return len(spoolFiles(t, f.spool)) == 0 && count(t, f.pool) == burst*bursts
	})
}

// TestSpoolStopsAtItsLimit fills the spool past SpoolMaxBytes during an
// outage: spilling stops (the volume must not overflow, or the pod and its
// whole spool would go), events then wait in memory and, with memory full,
// are dropped and counted. Everything not dropped is stored once the
// database is back.
func TestSpoolStopsAtItsLimit(t *testing.T) {
	t.Parallel()
	f := setup(t)
	const bufferSize = 40
	highWater := float64(bufferSize - bufferSize/4)
	rec, reg := newRecorder(t, unreachablePool(t), usage.Config{
		BatchSize: 5, BufferSize: bufferSize, FlushInterval: time.Millisecond,
		RetryBackoff: time.Millisecond, SpoolDir: f.spool, SpoolMaxBytes: 1, // one spill reaches it
	})
	start(t, rec)
	// Up to the high-water mark: one spill, which reaches the limit.
	recorded := 0
	for ; recorded < int(highWater); recorded++ {
		rec.Record(event(recorded))
	}
	servertest.Eventually(t, "the first spill", func() bool {
		return metric(t, reg, "cloudconnector_usage_events_spooled_total") > 0
	})
	spooled := metric(t, reg, "cloudconnector_usage_events_spooled_total")
	if size := metric(t, reg, "cloudconnector_usage_spool_bytes"); size <= 0 {
		t.Fatalf("cloudconnector_usage_spool_bytes = %v after a spill", size)
	}
	// Fill memory: nothing more may reach the spool, and once the buffer is
	// full new events are dropped.
	servertest.Eventually(t, "buffer full and events dropped", func() bool {
		rec.Record(event(recorded))
		recorded++
		return metric(t, reg, "cloudconnector_usage_events_dropped_total", "reason", "buffer_full") > 0
	})
	if got := metric(t, reg, "cloudconnector_usage_events_spooled_total"); got != spooled {
		t.Fatalf("spooled %v events past the limit (had %v)", got, spooled)
	}
	if held := metric(t, reg, "cloudconnector_usage_buffer_events"); held != bufferSize {
		t.Fatalf("buffer holds %v events, want it full (%d) before dropping", held, bufferSize)
	}
	if files := spoolFiles(t, f.spool); len(files) != 1 {
		t.Fatalf("spool holds %v, want the one spill", files)
	}
	dropped := metric(t, reg, "cloudconnector_usage_events_dropped_total", "reason", "buffer_full")
	closeRecorder(t, rec) // spools what memory holds: Close never drops

	rec2, _ := newRecorder(t, f.pool, usage.Config{SpoolDir: f.spool})
	start(t, rec2)
	want := recorded - int(dropped)
	servertest.Eventually(t, "spool replayed", func() bool {
		return len(spoolFiles(t, f.spool)) == 0 && count(t, f.pool) == want
	})
}

func TestReplayIsCrashSafe(t *testing.T) {
	t.Parallel()
	f := setup(t)

	// Spool 20 events: the database is unreachable at Close.
	rec, _ := newRecorder(t, unreachablePool(t), usage.Config{SpoolDir: f.spool})
	for i := range 20 {
		rec.Record(event(i))
	}
	closeRecorder(t, rec)
	files := spoolFiles(t, f.spool)
	if len(files) != 1 {
		t.Fatalf("spool holds %v, want one file", files)
	}
	path := filepath.Join(f.spool, files[0])
	spooled, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}

	// A crash mid-spill: the file was never renamed into place and its last
	// line is torn.
	torn := append(append([]byte{}, spooled...), `{"id":"0190a8c2-5c7d`...)
	if err := os.WriteFile(path+".tmp", torn, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	rec, reg := newRecorder(t, f.pool, usage.Config{SpoolDir: f.spool})
	start(t, rec)
	servertest.Eventually(t, "spool replayed", func() bool { return len(spoolFiles(t, f.spool)) == 0 })
	if n := count(t, f.pool); n != 20 {
		t.Errorf("stored %d events, want 20", n)
	}
	if got := metric(t, reg, "cloudconnector_usage_events_dropped_total", "reason", "spool_corrupt"); got != 1 {
		t.Errorf("corrupt lines = %v, want 1", got)
	}
	closeRecorder(t, rec)

	// A crash after the events were committed but before the file was
	// deleted: the same file is replayed again.
	if err := os.WriteFile(path, spooled, 0o600); err != nil {
		t.Fatal(err)
	}
	rec, reg = newRecorder(t, f.pool, usage.Config{SpoolDir: f.spool})
	start(t, rec)
	servertest.Eventually(t, "spool replayed again", func() bool { return len(spoolFiles(t, f.spool)) == 0 })
	if n := count(t, f.pool); n != 20 {
		t.Errorf("stored %d events after a second replay, want 20", n)
	}
	if got := metric(t, reg, "cloudconnector_usage_events_duplicate_total"); got != 20 {
		t.Errorf("duplicates = %v, want 20", got)
	}
}

func TestFullBufferWithoutSpoolDrops(t *testing.T) {
	t.Parallel()
	f := setup(t)
	rec, reg := newRecorder(t, f.pool, usage.Config{BatchSize: 5, BufferSize: 10})

	// Run is not started, so nothing drains the buffer; Record must still
	// return every time.
	for i := range 25 {
		rec.Record(event(i))
	}
	if got := metric(t, reg, "cloudconnector_usage_events_dropped_total", "reason", "buffer_full"); got != 15 {
		t.Errorf("dropped %v events, want 15", got)
	}
	if got := metric(t, reg, "cloudconnector_usage_buffer_events"); got != 10 {
		t.Errorf("buffer holds %v events, want 10", got)
	}

	closeRecorder(t, rec)
	if n := count(t, f.pool); n != 10 {
		t.Errorf("stored %d events, want 10", n)
	}

	rec.Record(event(99))
	if got := metric(t, reg, "cloudconnector_usage_events_dropped_total", "reason", "closed"); got != 1 {
		t.Errorf("dropped after Close = %v, want 1", got)
	}
}

func TestCloseWithoutSpoolReportsLostEvents(t *testing.T) {
	t.Parallel()
	rec, reg := newRecorder(t, unreachablePool(t), usage.Config{RetryBackoff: time.Millisecond})
	start(t, rec)
	for i := range 3 {
		rec.Record(event(i))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := rec.Close(ctx); err == nil {
		t.Fatal("Close succeeded though the database is unreachable and there is no spool")
	}
	if got := metric(t, reg, "cloudconnector_usage_events_dropped_total", "reason", "shutdown"); got != 3 {
		t.Errorf("dropped %v events, want 3", got)
	}
}

// TestCloseInterruptsHungDatabase points the recorder at a server that
// accepts connections and never answers.
func TestCloseInterruptsHungDatabase(t *testing.T) {
	t.Parallel()
	spool := t.TempDir()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pool, err := pgxpool.New(context.Background(), "postgres://postgres@"+l.Addr().String()+"/usage?sslmode=disable")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	// Registered after pool.Close, so it runs first and ends connection
	// attempts the pool may still be waiting on.
	var (
		mu     sync.Mutex
		conns  []net.Conn
		closed bool
	)
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		defer mu.Unlock()
		closed = true
		for _, c := range conns {
			c.Close()
		}
	})
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if closed {
				c.Close()
			} else {
				conns = append(conns, c)
			}
			mu.Unlock()
		}
	}()

	rec, reg := newRecorder(t, pool, usage.Config{WriteTimeout: time.Hour, SpoolDir: spool})
	start(t, rec)
	for i := range 7 {
		rec.Record(event(i))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := rec.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if got := metric(t, reg, "cloudconnector_usage_events_spooled_total"); got != 7 {
		t.Errorf("spooled %v events, want 7", got)
	}
}

func TestRefusedEventDoesNotBlockItsBatch(t *testing.T) {
	t.Parallel()
	f := setup(t)
	// A rule the recorder does not know about refuses one event.
	if _, err := f.pool.Exec(context.Background(),
		"ALTER TABLE usage_events ADD CONSTRAINT no_teapots CHECK (status <> 418)"); err != nil {
		t.Fatal(err)
	}
	rec, reg := newRecorder(t, f.pool, usage.Config{})
	for i := range 10 {
		e := event(i)
		if i == 4 {
			e.Status = 418
		}
		rec.Record(e)
	}
	closeRecorder(t, rec)
	if n := count(t, f.pool); n != 9 {
		t.Errorf("stored %d events, want 9", n)
	}
	if got := metric(t, reg, "cloudconnector_usage_events_dropped_total", "reason", "invalid"); got != 1 {
		t.Errorf("dropped %v invalid events, want 1", got)
	}
}

func TestRecordCorrectsInvalidValues(t *testing.T) {
	t.Parallel()
	f := setup(t)
	rec, reg := newRecorder(t, f.pool, usage.Config{})
	units := int64(-5)
	rec.Record(usage.Event{
		OrganizationID: "not-a-uuid",
		InstanceID:     "instance",
		Realm:          "self-managed",
		GlobalUserID:   "bad\xffutf8",
		Feature:        "complete_code",
		Gateway:        "ai",
		Route:          "nul\x00route",
		Method:         "GET",
		Status:         -1,
		Duration:       -time.Second,
		RequestBytes:   -1,
		ResponseBytes:  -2,
		Units:          &units,
		ClientType:     strings.Repeat("é", 2000),
	})
	closeRecorder(t, rec)

	got := rows(t, f.pool)
	if len(got) != 1 {
		t.Fatalf("stored %d events, want 1", len(got))
	}
	for _, e := range got {
		if e.ID == uuid.Nil || e.OccurredAt.IsZero() {
			t.Errorf("id %s, occurred at %s: want both set", e.ID, e.OccurredAt)
		}
		if e.OrganizationID != "" || e.Status != 0 || e.Duration != 0 || e.RequestBytes != 0 ||
			e.ResponseBytes != 0 || e.Units == nil || *e.Units != 0 {
			t.Errorf("numbers and organization not corrected: %+v", e)
		}
		if e.GlobalUserID != "bad\uFFFDutf8" || e.Route != "nulroute" {
			t.Errorf("text not corrected: user %q, route %q", e.GlobalUserID, e.Route)
		}
		if len(e.ClientType) != 1024 || !strings.HasPrefix(e.ClientType, "é") {
			t.Errorf("long text: %d bytes, want cut to 1024", len(e.ClientType))
		}
	}
	if units != -5 {
		t.Errorf("Record changed the caller's units to %d", units)
	}
	if got := metric(t, reg, "cloudconnector_usage_events_corrected_total"); got != 1 {
		t.Errorf("corrected = %v, want 1", got)
	}
}

func TestRunEnsuresPartitions(t *testing.T) {
	t.Parallel()
	f := setup(t)
	ctx := context.Background()
	// The partition two months ahead, as the migration created it.
	month := time.Now().UTC()
	month = time.Date(month.Year(), month.Month()+2, 1, 0, 0, 0, 0, time.UTC)
	name := "usage_events_" + month.Format("2006_01")
	if _, err := f.pool.Exec(ctx, "DROP TABLE IF EXISTS "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	rec, _ := newRecorder(t, f.pool, usage.Config{})
	start(t, rec)
	servertest.Eventually(t, "partition "+name, func() bool {
		var exists bool
		if err := f.pool.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", name).Scan(&exists); err != nil {
			t.Fatal(err)
		}
		return exists
	})
}

func TestCloseAfterRunStopped(t *testing.T) {
	t.Parallel()
	f := setup(t)
	rec, _ := newRecorder(t, f.pool, usage.Config{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- rec.Run(ctx) }()
	rec.Record(event(1))
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	// Events recorded between Run's end and Close are still written.
	rec.Record(event(2))
	closeRecorder(t, rec)
	if n := count(t, f.pool); n != 2 {
		t.Errorf("stored %d events, want 2", n)
	}
	if err := rec.Run(context.Background()); err != nil {
		t.Errorf("Run after Close: %v, want nil", err)
	}
	if err := rec.Close(context.Background()); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestRunTwice(t *testing.T) {
	t.Parallel()
	f := setup(t)
	rec, _ := newRecorder(t, f.pool, usage.Config{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := rec.Run(ctx); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if err := rec.Run(context.Background()); err == nil {
		t.Error("second Run returned nil, want an error")
	}
}

func TestNewRejectsInvalidConfig(t *testing.T) {
	t.Parallel()
	pool := unreachablePool(t)
	for name, cfg := range map[string]usage.Config{
		"negative batch":           {BatchSize: -1},
		"negative buffer":          {BufferSize: -1},
		"batch larger than buffer": {BatchSize: 100, BufferSize: 10},
		"negative flush interval":  {FlushInterval: -time.Second},
		"backoff above the cap":    {RetryBackoff: time.Hour},
		"negative write timeout":   {WriteTimeout: -time.Second},
	} {
		if _, err := usage.New(pool, cfg, nil); err == nil {
			t.Errorf("%s: New succeeded", name)
		}
	}
	if _, err := usage.New(nil, usage.Config{}, nil); err == nil {
		t.Error("nil DB: New succeeded")
	}
	if _, err := usage.New(pool, usage.Config{BufferSize: 10}, nil); err != nil {
		t.Errorf("small buffer with the default batch size: %v", err)
	}
	reg := prometheus.NewRegistry()
	if _, err := usage.New(pool, usage.Config{Registerer: reg}, nil); err != nil {
		t.Fatalf("New: %v", err)
	}
	if _, err := usage.New(pool, usage.Config{Registerer: reg}, nil); err == nil {
		t.Error("second Recorder on one registerer: New succeeded")
	}
}

// TestRunReportsPartitionFailureAndRetriesSoon: a partition that cannot be
// created shows in the metrics, and the check is retried well before the
// next day.
func TestRunReportsPartitionFailureAndRetriesSoon(t *testing.T) {
	t.Parallel()
	f := setup(t)
	ctx := context.Background()
	// Next month's partition cannot be created: a table of its name is in
	// the way.
	month := time.Now().UTC()
	month = time.Date(month.Year(), month.Month()+1, 1, 0, 0, 0, 0, time.UTC)
	name := pgx.Identifier{"usage_events_" + month.Format("2006_01")}.Sanitize()
	if _, err := f.pool.Exec(ctx, "DROP TABLE "+name+"; CREATE TABLE "+name+" (x int)"); err != nil {
		t.Fatal(err)
	}
	rec, reg := newRecorder(t, f.pool, usage.Config{})
	usage.SetPartitionRetry(rec, time.Millisecond)
	start(t, rec)

	servertest.Eventually(t, "a failed partition check", func() bool {
		return metric(t, reg, "cloudconnector_usage_partition_errors_total") > 0
	})
	if got := metric(t, reg, "cloudconnector_usage_partition_months_ahead"); got != 0 {
		t.Errorf("months ahead = %v, want 0: the current month only", got)
	}

	if _, err := f.pool.Exec(ctx, "DROP TABLE "+name); err != nil {
		t.Fatal(err)
	}
	servertest.Eventually(t, "partitions two months ahead", func() bool {
		return metric(t, reg, "cloudconnector_usage_partition_months_ahead") == 2
	})
}

// TestRecordCorrectsImplausibleTimes: an event stamped far in the future
// would land in a month without a partition (and show analysts usage to
// come); one stamped before its request can have started is a clock bug.
// Both are kept, stamped with the time they were recorded, and counted.
func TestRecordCorrectsImplausibleTimes(t *testing.T) {
	t.Parallel()
	f := setup(t)
	rec, reg := newRecorder(t, f.pool, usage.Config{})
	now := time.Now().UTC().Truncate(time.Microsecond)

	farFuture, ahead, epoch := event(0), event(1), event(2)
	farFuture.OccurredAt = time.Date(9999, 12, 31, 23, 0, 0, 0, time.UTC)
	ahead.OccurredAt = now.AddDate(0, 3, 0)
	epoch.OccurredAt = time.Unix(0, 0)
	// Plausible: a clock a little ahead, and a WebSocket session that
	// started three hours ago and just ended.
	skewed, stream := event(3), event(4)
	skewed.OccurredAt = now.Add(30 * time.Minute)
	stream.OccurredAt, stream.Duration = now.Add(-3*time.Hour), 3*time.Hour

	before := time.Now()
	for _, e := range []usage.Event{farFuture, ahead, epoch, skewed, stream} {
		rec.Record(e)
	}
	after := time.Now()
	closeRecorder(t, rec)

	got := rows(t, f.pool)
	if len(got) != 5 {
		t.Fatalf("stored %d events, want 5", len(got))
	}
	for _, e := range []usage.Event{farFuture, ahead, epoch} {
		at := got[e.ID].OccurredAt
		if at.Before(before.Truncate(time.Microsecond)) || at.After(after) {
			t.Errorf("event stamped %s stored at %s, want the time it was recorded", e.OccurredAt, at)
		}
	}
	for _, e := range []usage.Event{skewed, stream} {
		if at := got[e.ID].OccurredAt; !at.Equal(e.OccurredAt) {
			t.Errorf("event stamped %s stored at %s, want it kept", e.OccurredAt, at)
		}
	}
	for labels, want := range map[[2]string]float64{{"direction", "future"}: 2, {"direction", "past"}: 1} {
		if got := metric(t, reg, "cloudconnector_usage_events_time_corrected_total", labels[:]...); got != want {
			t.Errorf("time corrected %v = %v, want %v", labels, got, want)
		}
	}
	if got := metric(t, reg, "cloudconnector_usage_events_corrected_total"); got != 3 {
		t.Errorf("corrected = %v, want 3", got)
	}
	var inDefault int
	if err := f.pool.QueryRow(context.Background(), "SELECT count(*) FROM usage_events_default").Scan(&inDefault); err != nil {
		t.Fatal(err)
	}
	if inDefault != 0 {
		t.Errorf("%d events in the default partition, want 0", inDefault)
	}
}

// TestReplayCorrectsFutureTimesOnly: a spool file written before events were
// checked may hold one stamped in the future; it is corrected on replay.
// An old event is not: events wait in the spool for as long as an outage
// lasts.
func TestReplayCorrectsFutureTimesOnly(t *testing.T) {
	t.Parallel()
	f := setup(t)
	future, old := uuid.Must(uuid.NewV7()), uuid.Must(uuid.NewV7())
	oldAt := time.Now().UTC().AddDate(0, 0, -20).Truncate(time.Microsecond)
	line := `{"id":%q,"occurred_at":%q,"instance_id":"i","realm":"saas","feature":"f","gateway":"ai","route":"r",` +
		`"method":"GET","status":200,"duration_ns":1000,"request_bytes":0,"response_bytes":0}` + "\n"
	spooled := fmt.Sprintf(line, future, "9999-01-01T00:00:00Z") + fmt.Sprintf(line, old, oldAt.Format(time.RFC3339Nano))
	if err := os.WriteFile(filepath.Join(f.spool, "usage-00000000000000000001-1-1.jsonl"), []byte(spooled), 0o600); err != nil {
		t.Fatal(err)
	}
	before := time.Now()
	rec, _ := newRecorder(t, f.pool, usage.Config{SpoolDir: f.spool})
	start(t, rec)
	servertest.Eventually(t, "spool replayed", func() bool { return len(spoolFiles(t, f.spool)) == 0 })
	after := time.Now()

	got := rows(t, f.pool)
	if at := got[future].OccurredAt; at.Before(before.Truncate(time.Microsecond)) || at.After(after) {
		t.Errorf("event stamped 9999-01-01 replayed at %s, want the time of replay", at)
	}
	if at := got[old].OccurredAt; !at.Equal(oldAt) {
		t.Errorf("event stamped %s replayed at %s, want it kept", oldAt, at)
	}
}

// flakyDB passes statements to a pool but fails its failAt-th Exec, once,
// the way a dropped connection would: not the data's fault.
type flakyDB struct {
	*pgxpool.Pool
	mu            sync.Mutex
	calls, failAt int
}

func (d *flakyDB) Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	d.mu.Lock()
	d.calls++
	fail := d.calls == d.failAt
	d.mu.Unlock()
	if fail {
		return pgconn.CommandTag{}, errors.New("flakyDB: connection reset")
	}
	return d.Pool.Exec(ctx, sql, args...)
}

// TestRefusedEventCountedOnceWhenBatchRetried: a batch that fell back to
// writing events one by one, dropped one the database refused, and then
// failed for another reason is retried whole. The refused event must not be
// counted (or logged) as dropped a second time.
func TestRefusedEventCountedOnceWhenBatchRetried(t *testing.T) {
	t.Parallel()
	f := setup(t)
	if _, err := f.pool.Exec(context.Background(),
		"ALTER TABLE usage_events ADD CONSTRAINT no_teapots CHECK (status <> 418)"); err != nil {
		t.Fatal(err)
	}
	// Exec 1: the batch, refused. Execs 2 to 6: events 0 to 4 one by one,
	// event 4 refused. Exec 7, event 5: the connection drops.
	db := &flakyDB{Pool: f.pool, failAt: 7}
	rec, reg := newRecorder(t, db, usage.Config{RetryBackoff: time.Millisecond})
	for i := range 10 {
		e := event(i)
		if i == 4 {
			e.Status = 418
		}
		rec.Record(e)
	}
	closeRecorder(t, rec) // without a spool: retries until written
	if db.calls < 8 {
		t.Fatalf("%d statements; the test wants the batch retried after the dropped connection", db.calls)
	}
	if n := count(t, f.pool); n != 9 {
		t.Errorf("stored %d events, want 9", n)
	}
	if got := metric(t, reg, "cloudconnector_usage_events_dropped_total", "reason", "invalid"); got != 1 {
		t.Errorf("dropped %v invalid events, want 1", got)
	}
}
