package pgtest

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"
)

// TestCloneOfStaleTemplateHasThisMonthsPartitions stands in for a template
// built in an earlier month, kept on the server since: it lacks the
// partitions of this month and the next two. A database cloned from it must
// still put an event stamped now into a monthly partition.
func TestCloneOfStaleTemplateHasThisMonthsPartitions(t *testing.T) {
	t.Parallel()
	ctx := context.Background()

	stale := URL(t)
	cfg, err := pgx.ParseConfig(stale)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(ctx, stale)
	if err != nil {
		t.Fatal(err)
	}
	_, err = conn.Exec(ctx, `DO $$
		BEGIN
			FOR i IN 0..2 LOOP
				EXECUTE format('DROP TABLE %I', 'usage_events_'
					|| to_char(date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => i), 'YYYY_MM'));
			END LOOP;
		END $$`)
	conn.Close(ctx) // a template must have no connections
	if err != nil {
		t.Fatalf("make the template stale: %v", err)
	}

	conn, err = pgx.Connect(ctx, clone(t, cfg.Database))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var part string
	err = conn.QueryRow(ctx, `INSERT INTO usage_events (event_id, occurred_at, instance_id, realm, feature,
		gateway, route, method, status, duration_ms) VALUES (gen_random_uuid(), now(), 'i', 'saas', 'f', 'ai', 'r', 'GET', 200, 1)
		RETURNING tableoid::regclass::text`).Scan(&part)
	if err != nil {
		t.Fatal(err)
	}
	if part == "usage_events_default" {
		t.Fatal("an event stamped now landed in the default partition of a clone of a stale template")
	}
	var ahead int
	err = conn.QueryRow(ctx, `SELECT count(*) FROM generate_series(0, $1::int) AS i
		WHERE to_regclass('usage_events_' || to_char(date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => i), 'YYYY_MM')) IS NOT NULL`,
		partitionMonthsAhead).Scan(&ahead)
	if err != nil {
		t.Fatal(err)
	}
	if ahead != partitionMonthsAhead+1 {
		t.Errorf("clone has %d of the partitions for this month and the %d after, want all", ahead, partitionMonthsAhead)
	}
}
