package migrations_test

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

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
	if err := migrations.Check(ctx, pool); err == nil {
		t.Fatal("Check passed on a database behind the embedded schema")
	}
	if _, err := pool.Exec(ctx, "DROP TABLE "+migrations.VersionTable); err != nil {
		t.Fatal(err)
	}
	if err := migrations.Check(ctx, pool); err == nil {
		t.Fatal("Check passed on an unmigrated database")
	}
}
