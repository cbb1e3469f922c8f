// Package pgtest gives each test its own PostgreSQL database carrying the
// project's schema, cloned from a template migrated once per schema version
// and given this month's usage_events partitions.
//
// The server is TEST_DATABASE_URL if set, else the local server on
// 127.0.0.1:5432, else a shared throwaway cluster started from the local
// PostgreSQL installation. When none can be had the test is skipped, except
// under CI=true, where it fails.
package pgtest

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cloud-connector/cloud-connector/migrations"
	"github.com/cloud-connector/cloud-connector/services/pglocal"
)

var (
	setupOnce sync.Once
	serverURL string
	template  string
	setupErr  error
)

// URL creates a fresh, migrated database for the test and returns its URL.
// The database is dropped when the test ends.
func URL(tb testing.TB) string {
	tb.Helper()
	setupOnce.Do(func() { serverURL, template, setupErr = setup(context.Background()) })
	if setupErr != nil {
		if os.Getenv("CI") == "true" {
			tb.Fatalf("pgtest: PostgreSQL is required under CI: %v", setupErr)
		}
		tb.Skipf("pgtest: no PostgreSQL available: %v", setupErr)
	}
	return clone(tb, template)
}

// partitionMonthsAhead matches what the migrations and the gateways keep.
const partitionMonthsAhead = 2

// clone creates a database from tmpl, dropped when the test ends, and
// returns its URL.
//
// The template is built once per schema version and kept on the server, so
// its usage_events partitions are those of the month it was built in. The
// clone gets this month's partitions before the test sees it: otherwise, once
// the months the template covers are past, rows stamped now land in the
// default partition and tests that check partitioning fail on the calendar.
func clone(tb testing.TB, tmpl string) string {
	tb.Helper()
	ctx := context.Background()
	name := "cc_test_" + randomSuffix()
	conn, err := pgx.Connect(ctx, serverURL)
	if err != nil {
		tb.Fatalf("pgtest: connect: %v", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, fmt.Sprintf("CREATE DATABASE %s TEMPLATE %s", pgx.Identifier{name}.Sanitize(),
		pgx.Identifier{tmpl}.Sanitize())); err != nil {
		tb.Fatalf("pgtest: create database: %v", err)
	}
	tb.Cleanup(func() {
		conn, err := pgx.Connect(ctx, serverURL)
		if err != nil {
			tb.Errorf("pgtest: connect for drop: %v", err)
			return
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, fmt.Sprintf("DROP DATABASE IF EXISTS %s WITH (FORCE)", pgx.Identifier{name}.Sanitize())); err != nil {
			tb.Errorf("pgtest: drop database: %v", err)
		}
	})
	u, err := pglocal.WithDatabase(serverURL, name)
	if err != nil {
		tb.Fatal(err)
	}
	if err := ensurePartitions(ctx, u); err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	return u
}

// ensurePartitions creates the usage_events partitions of this month and the
// next ones in the database at u. Nothing else uses that database yet, so no
// lock waits; when the template is current it only looks.
func ensurePartitions(ctx context.Context, u string) error {
	conn, err := pgx.Connect(ctx, u)
	if err != nil {
		return fmt.Errorf("connect to new database: %w", err)
	}
	defer conn.Close(ctx)
	var failed string
	err = conn.QueryRow(ctx, `SELECT coalesce(string_agg(partition_name || ': ' || error_message, '; '), '')
		FROM usage_events_ensure_partitions($1) WHERE outcome = 'failed'`, partitionMonthsAhead).Scan(&failed)
	switch {
	case err != nil:
		return fmt.Errorf("ensure usage_events partitions: %w", err)
	case failed != "":
		return fmt.Errorf("ensure usage_events partitions: %s", failed)
	}
	return nil
}

// Pool creates a fresh, migrated database for the test and returns a pool
// connected to it, closed when the test ends.
func Pool(tb testing.TB) *pgxpool.Pool {
	tb.Helper()
	u := URL(tb)
	pool, err := pgxpool.New(context.Background(), u)
	if err != nil {
		tb.Fatalf("pgtest: open pool: %v", err)
	}
	// Registered after URL's cleanup, so it runs before the database drop.
	tb.Cleanup(pool.Close)
	return pool
}

func setup(ctx context.Context) (string, string, error) {
	u, err := server(ctx)
	if err != nil {
		return "", "", err
	}
	sum, err := schemaHash()
	if err != nil {
		return "", "", err
	}
	name := "cc_template_" + sum
	if err := ensureTemplate(ctx, u, name); err != nil {
		return "", "", err
	}
	return u, name, nil
}

func server(ctx context.Context) (string, error) {
	if u := os.Getenv("TEST_DATABASE_URL"); u != "" {
		if err := pglocal.Ping(ctx, u); err != nil {
			return "", fmt.Errorf("TEST_DATABASE_URL: %w", err)
		}
		return u, nil
	}
	if pglocal.Ping(ctx, pglocal.DefaultURL) == nil {
		return pglocal.DefaultURL, nil
	}
	return pglocal.Shared(ctx, filepath.Join(os.TempDir(), "cloud-connector-pgtest"))
}

// ensureTemplate creates and migrates the template database once per schema
// version. An advisory lock serializes test binaries running in parallel; the
// database comment marks a template as complete, so one left half-built by a
// killed process is rebuilt.
func ensureTemplate(ctx context.Context, serverURL, name string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, serverURL)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(ctx)
	const lockKey = 7_311_402_118
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1)", lockKey); err != nil {
		return fmt.Errorf("lock: %w", err)
	}
	defer conn.Exec(context.WithoutCancel(ctx), "SELECT pg_advisory_unlock($1)", lockKey)

	var ready bool
	err = conn.QueryRow(ctx, `SELECT coalesce(shobj_description(oid, 'pg_database') = 'ready', false)
		FROM pg_database WHERE datname = $1`, name).Scan(&ready)
	switch {
	case err == nil && ready:
		return nil
	case err == nil:
		if _, err := conn.Exec(ctx, fmt.Sprintf("DROP DATABASE %s WITH (FORCE)", pgx.Identifier{name}.Sanitize())); err != nil {
			return fmt.Errorf("drop incomplete template: %w", err)
		}
	case err != pgx.ErrNoRows:
		return fmt.Errorf("look up template: %w", err)
	}
	if _, err := conn.Exec(ctx, fmt.Sprintf("CREATE DATABASE %s", pgx.Identifier{name}.Sanitize())); err != nil {
		return fmt.Errorf("create template: %w", err)
	}
	tmplURL, err := pglocal.WithDatabase(serverURL, name)
	if err != nil {
		return err
	}
	if _, err := migrations.UpURL(ctx, tmplURL); err != nil {
		return fmt.Errorf("migrate template: %w", err)
	}
	if _, err := conn.Exec(ctx, fmt.Sprintf("COMMENT ON DATABASE %s IS 'ready'", pgx.Identifier{name}.Sanitize())); err != nil {
		return fmt.Errorf("mark template ready: %w", err)
	}
	return nil
}

func schemaHash() (string, error) {
	h := sha256.New()
	err := fs.WalkDir(migrations.FS(), ".", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := fs.ReadFile(migrations.FS(), path)
		if err != nil {
			return err
		}
		fmt.Fprintf(h, "%s\x00%d\x00", path, len(b))
		h.Write(b)
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("hash migrations: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil))[:12], nil
}

func randomSuffix() string {
	b := make([]byte, 6)
	rand.Read(b)
	return hex.EncodeToString(b)
}
