package pglocal_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/cloud-connector/cloud-connector/migrations/pgtest"
	"github.com/cloud-connector/cloud-connector/services/pglocal"
)

// TestStart starts a real throwaway cluster from the local installation,
// the path developers without a running server depend on.
func TestStart(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("starts a PostgreSQL cluster")
	}
	ctx := context.Background()
	s, err := pglocal.Start(ctx)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	// Stopped below; this only keeps a failing test from leaving a
	// cluster running (a second Stop fails harmlessly).
	t.Cleanup(func() { _ = s.Stop() })
	if !s.Started {
		t.Fatal("Started = false for a cluster Start created")
	}
	if err := pglocal.Ping(ctx, s.URL); err != nil {
		t.Fatalf("Ping started cluster: %v", err)
	}
	if err := s.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if err := pglocal.Ping(ctx, s.URL); err == nil {
		t.Fatal("cluster still answers after Stop")
	}
}

func TestWithDatabase(t *testing.T) {
	t.Parallel()
	got, err := pglocal.WithDatabase("postgres://u@h:5/postgres?sslmode=disable", "other")
	if err != nil {
		t.Fatal(err)
	}
	if want := "postgres://u@h:5/other?sslmode=disable"; got != want {
		t.Fatalf("WithDatabase = %q, want %q", got, want)
	}
}

// TestWithDatabaseKeywordValue checks libpq keyword/value settings (as
// TEST_DATABASE_URL or DATABASE_URL may hold) against a real server: the
// database named by WithDatabase is the one connected to.
func TestWithDatabaseKeywordValue(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	cfg, err := pgx.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	kv := fmt.Sprintf("host=%s port=%d user=%s dbname=nonexistent sslmode=disable", cfg.Host, cfg.Port, cfg.User)
	got, err := pglocal.WithDatabase(kv, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(ctx, got)
	if err != nil {
		t.Fatalf("connect with %q: %v", got, err)
	}
	defer conn.Close(ctx)
	var db string
	if err := conn.QueryRow(ctx, "SELECT current_database()").Scan(&db); err != nil || db != "postgres" {
		t.Fatalf("current_database() = %q, %v; want postgres", db, err)
	}
	if got, _ := pglocal.WithDatabase("host=h", `o'dd\\name`); got != `host=h dbname='o\'dd\\\\name'` {
		t.Fatalf("quoting: %q", got)
	}
}
