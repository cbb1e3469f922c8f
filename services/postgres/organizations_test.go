package postgres_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cloud-connector/cloud-connector/migrations/pgtest"
	"github.com/cloud-connector/cloud-connector/services/authz"
	"github.com/cloud-connector/cloud-connector/services/postgres"
)

func setup(t *testing.T, ttl time.Duration) (*pgxpool.Pool, *postgres.Organizations, string) {
	t.Helper()
	pool := pgtest.Pool(t)
	id, err := postgres.Upsert(context.Background(), pool, postgres.Seed{
		Name: "Acme", Plan: "premium",
		Instances: []postgres.SeedInstance{{ID: "inst-1", Realm: "self-managed"}, {ID: "inst-2", Realm: "self-managed"}},
		AddOns:    []authz.AddOn{{Name: "duo_pro", Seats: 5}, {Name: "duo_enterprise", Seats: 2}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return pool, postgres.NewOrganizations(pool, postgres.OrganizationsConfig{CacheTTL: ttl}), id
}

func TestFindByInstance(t *testing.T) {
	t.Parallel()
	pool, orgs, id := setup(t, -1)
	ctx := context.Background()
	// An add-on whose term has ended does not count.
	if _, err := pool.Exec(ctx, `UPDATE organization_add_ons SET starts_at = now() - interval '2 days', ends_at = now() - interval '1 hour'
		WHERE add_on = 'duo_enterprise'`); err != nil {
		t.Fatal(err)
	}
	org, err := orgs.FindByInstance(ctx, "inst-2")
	if err != nil {
		t.Fatal(err)
	}
	if org.ID != id || org.Name != "Acme" || org.Plan != "premium" || len(org.AddOns) != 1 || org.AddOns[0] != (authz.AddOn{Name: "duo_pro", Seats: 5}) {
		t.Fatalf("org = %+v", org)
	}
	if _, err := orgs.FindByInstance(ctx, "nope"); !errors.Is(err, authz.ErrNotFound) {
		t.Fatalf("unknown instance: err = %v, want ErrNotFound", err)
	}
}

func TestFindByInstanceWithoutAddOns(t *testing.T) {
	t.Parallel()
	pool, orgs, _ := setup(t, -1)
	if _, err := pool.Exec(context.Background(), `DELETE FROM organization_add_ons`); err != nil {
		t.Fatal(err)
	}
	org, err := orgs.FindByInstance(context.Background(), "inst-1")
	if err != nil || len(org.AddOns) != 0 || org.Plan != "premium" {
		t.Fatalf("org = %+v, %v", org, err)
	}
}

func TestCacheServesUntilTTL(t *testing.T) {
	t.Parallel()
	pool, orgs, _ := setup(t, time.Hour)
	ctx := context.Background()
	if _, err := orgs.FindByInstance(ctx, "inst-1"); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `UPDATE organizations SET plan = 'ultimate'`); err != nil {
		t.Fatal(err)
	}
	org, err := orgs.FindByInstance(ctx, "inst-1")
	if err != nil || org.Plan != "premium" {
		t.Fatalf("cached lookup = %+v, %v; want the cached premium plan", org, err)
	}
	// A database outage does not affect cached instances.
	pool.Close()
	if _, err := orgs.FindByInstance(ctx, "inst-1"); err != nil {
		t.Fatalf("cached lookup with database closed: %v", err)
	}
	if _, err := orgs.FindByInstance(ctx, "inst-2"); err == nil || errors.Is(err, authz.ErrNotFound) {
		t.Fatalf("uncached lookup with database closed: err = %v, want a database error", err)
	}
}

func TestUpsertIsIdempotent(t *testing.T) {
	t.Parallel()
	pool, _, id := setup(t, -1)
	again, err := postgres.Upsert(context.Background(), pool, postgres.Seed{Name: "Acme", Plan: "ultimate",
		Instances: []postgres.SeedInstance{{ID: "inst-1", Realm: "self-managed"}}})
	if err != nil || again != id {
		t.Fatalf("second upsert = %q, %v; want %q", again, err, id)
	}
	var plan string
	var n int
	pool.QueryRow(context.Background(), `SELECT plan, (SELECT count(*) FROM instances) FROM organizations`).Scan(&plan, &n)
	if plan != "ultimate" || n != 2 {
		t.Fatalf("plan %q instances %d", plan, n)
	}
}

func TestUpsertWithFixedID(t *testing.T) {
	t.Parallel()
	pool := pgtest.Pool(t)
	ctx := context.Background()
	const fixed = "4b0d3e00-0000-4000-8000-000000000001"
	for _, plan := range []string{"premium", "ultimate"} {
		id, err := postgres.Upsert(ctx, pool, postgres.Seed{ID: fixed, Name: "Demo", Plan: plan})
		if err != nil || id != fixed {
			t.Fatalf("Upsert = %q, %v; want %q", id, err, fixed)
		}
	}
	if _, err := postgres.Upsert(ctx, pool, postgres.Seed{ID: "not-a-uuid", Name: "X", Plan: "free"}); err == nil {
		t.Fatal("invalid id accepted")
	}
}

// gatedDB holds the first query until released, and counts queries.
type gatedDB struct {
	postgres.DB
	entered chan struct{}
	release chan struct{}
	queries atomic.Int32
}

func (g *gatedDB) Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error) {
	if g.queries.Add(1) == 1 {
		close(g.entered)
		select {
		case <-g.release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return g.DB.Query(ctx, sql, args...)
}

// TestSharedLookupSurvivesFirstCallerLeaving checks that a caller that
// gives up while its lookup is shared with others fails alone: the query
// goes on, and the others get its answer from the one query.
func TestSharedLookupSurvivesFirstCallerLeaving(t *testing.T) {
	t.Parallel()
	pool, _, id := setup(t, -1)
	db := &gatedDB{DB: pool, entered: make(chan struct{}), release: make(chan struct{})}
	orgs := postgres.NewOrganizations(db, postgres.OrganizationsConfig{CacheTTL: time.Hour})

	ctx1, cancel1 := context.WithCancel(context.Background())
	first := make(chan error, 1)
	go func() {
		_, err := orgs.FindByInstance(ctx1, "inst-1")
		first <- err
	}()
	<-db.entered
	type result struct {
		org authz.Organization
		err error
	}
	second := make(chan result, 1)
	go func() {
		org, err := orgs.FindByInstance(context.Background(), "inst-1")
		second <- result{org, err}
	}()
	cancel1()
	if err := <-first; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled caller: err = %v, want context.Canceled", err)
	}
	close(db.release)
	r := <-second
	if r.err != nil || r.org.ID != id {
		t.Fatalf("other caller: %+v, %v; want organization %s", r.org, r.err, id)
	}
	if n := db.queries.Load(); n != 1 {
		t.Fatalf("queries = %d, want 1 shared query", n)
	}
}
