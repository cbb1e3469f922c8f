// Package migrations holds Cloud Connector's PostgreSQL schema as versioned
// SQL files and applies them. The files are embedded so every binary can
// migrate the database it is pointed at.
package migrations

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/tern/v2/migrate"
)

//go:embed *.sql
var files embed.FS

// FS returns the migration files: NNN_name.sql, in tern's format.
func FS() fs.FS { return files }

// VersionTable is the table tern records the applied version in.
const VersionTable = "schema_version"

// Up applies every migration not yet applied to the database conn is
// connected to. Concurrent callers are serialized by an advisory lock, so
// several processes may call it at start. It returns the resulting version.
func Up(ctx context.Context, conn *pgx.Conn) (int32, error) {
	m, err := migrate.NewMigrator(ctx, conn, VersionTable)
	if err != nil {
		return 0, fmt.Errorf("new migrator: %w", err)
	}
	if err := m.LoadMigrations(files); err != nil {
		return 0, fmt.Errorf("load migrations: %w", err)
	}
	if err := m.Migrate(ctx); err != nil {
		return 0, fmt.Errorf("migrate: %w", err)
	}
	v, err := m.GetCurrentVersion(ctx)
	if err != nil {
		return 0, fmt.Errorf("read schema version: %w", err)
	}
	return v, nil
}

// UpURL connects to databaseURL and applies every pending migration.
func UpURL(ctx context.Context, databaseURL string) (int32, error) {
	conn, err := pgx.Connect(ctx, databaseURL)
	if err != nil {
		return 0, fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	return Up(ctx, conn)
}

// Latest is the version the embedded migrations bring a database to.
func Latest() (int32, error) {
	names, err := migrate.FindMigrations(files)
	if err != nil {
		return 0, fmt.Errorf("find migrations: %w", err)
	}
	return int32(len(names)), nil
}

// Querier runs a query returning one row; a pool satisfies it.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// undefinedTable is SQLSTATE 42P01: the version table was never created.
const undefinedTable = "42P01"

// ErrSchemaBehind reports a database the migration job has not brought to
// the embedded schema version: no waiting fixes it.
var ErrSchemaBehind = errors.New("run migrations")

// Check reports an error unless the database is at the embedded schema
// version (or newer, during a rolling upgrade's migrate-first phase): a
// process must not serve on a database the migration job has not prepared.
// Such a database gives an error wrapping ErrSchemaBehind; failing to read
// the version (a timeout, a lost connection) gives another.
func Check(ctx context.Context, db Querier) error {
	want, err := Latest()
	if err != nil {
		return err
	}
	var got int32
	if err := db.QueryRow(ctx, "SELECT version FROM "+VersionTable).Scan(&got); err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == undefinedTable {
			return fmt.Errorf("no %s table: %w", VersionTable, ErrSchemaBehind)
		}
		return fmt.Errorf("read schema version: %w", err)
	}
	if got < want {
		return fmt.Errorf("schema at version %d, want %d: %w", got, want, ErrSchemaBehind)
	}
	return nil
}
