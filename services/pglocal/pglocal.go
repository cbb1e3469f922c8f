// Package pglocal finds a PostgreSQL server for local development and tests:
// the one named by a URL, else the local server on 127.0.0.1:5432, else a
// throwaway cluster started from the local PostgreSQL installation.
package pglocal

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// DefaultURL is the local server a developer machine normally runs, with
// trust authentication.
const DefaultURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"

// Server is a PostgreSQL server found or started by Find.
type Server struct {
	// URL connects to the server's maintenance database as a superuser.
	URL string
	// Started is true when Find started a throwaway cluster, which Stop
	// shuts down and deletes.
	Started bool

	dir   string
	pgCtl string
	asPG  bool
}

// Find returns a reachable server. If url is set it must be reachable;
// otherwise DefaultURL is tried, then a throwaway cluster is started with
// initdb and pg_ctl. Call Stop when done.
func Find(ctx context.Context, url string) (*Server, error) {
	if url != "" {
		if err := Ping(ctx, url); err != nil {
			return nil, fmt.Errorf("postgres at given url: %w", err)
		}
		return &Server{URL: url}, nil
	}
	if err := Ping(ctx, DefaultURL); err == nil {
		return &Server{URL: DefaultURL}, nil
	}
	return Start(ctx)
}

// Ping connects to url and runs a trivial query.
func Ping(ctx context.Context, url string) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	return conn.Ping(ctx)
}

// Start initializes and starts a throwaway cluster on a free loopback port
// with trust authentication for the postgres role.
func Start(ctx context.Context) (*Server, error) {
	bin, err := binDir()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "cloud-connector-pg-")
	if err != nil {
		return nil, fmt.Errorf("create cluster dir: %w", err)
	}
	s := &Server{dir: dir, pgCtl: filepath.Join(bin, "pg_ctl"), Started: true}
	// initdb refuses to run as root; run the cluster as the postgres OS user.
	if os.Geteuid() == 0 {
		pgUser, err := user.Lookup("postgres")
		if err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("running as root and no postgres OS user to run initdb as: %w", err)
		}
		uid, _ := strconv.Atoi(pgUser.Uid)
		gid, _ := strconv.Atoi(pgUser.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("chown cluster dir: %w", err)
		}
		s.asPG = true
	}
	port, err := freePort()
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	data := filepath.Join(dir, "data")
	if out, err := s.command(ctx, filepath.Join(bin, "initdb"), "-D", data, "-U", "postgres",
		"--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions").CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("initdb: %w: %s", err, out)
	}
	opts := fmt.Sprintf("-c listen_addresses=127.0.0.1 -p %d -k %s -c fsync=off -c max_connections=200", port, dir)
	if out, err := s.command(ctx, s.pgCtl, "-D", data, "-o", opts, "-l", filepath.Join(dir, "log"),
		"-w", "-t", "60", "start").CombinedOutput(); err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "log"))
		os.RemoveAll(dir)
		return nil, fmt.Errorf("pg_ctl start: %w: %s %s", err, out, log)
	}
	s.URL = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
	if err := Ping(ctx, s.URL); err != nil {
		s.Stop()
		return nil, fmt.Errorf("ping started cluster: %w", err)
	}
	return s, nil
}

// Stop shuts down and deletes a cluster Find started; otherwise it does
// nothing.
func (s *Server) Stop() error {
	if !s.Started {
		return nil
	}
	out, err := s.command(context.Background(), s.pgCtl, "-D", filepath.Join(s.dir, "data"),
		"-m", "immediate", "-w", "stop").CombinedOutput()
	rmErr := os.RemoveAll(s.dir)
	if err != nil {
		return fmt.Errorf("pg_ctl stop: %w: %s", err, out)
	}
	return rmErr
}

// WithDatabase returns the connection string u (a postgres:// URL or
// libpq keyword/value settings) with its database name replaced by name.
func WithDatabase(u, name string) (string, error) {
	if !strings.HasPrefix(u, "postgres://") && !strings.HasPrefix(u, "postgresql://") {
		// Keyword/value settings: a later keyword overrides an earlier one.
		quoted := strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(name)
		return strings.TrimSpace(u) + " dbname='" + quoted + "'", nil
	}
	parsed, err := url.Parse(u)
	if err != nil {
		return "", fmt.Errorf("parse database url: %w", err)
	}
	parsed.Path = "/" + name
	return parsed.String(), nil
}

func (s *Server) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	if s.asPG {
		return exec.CommandContext(ctx, "runuser", append([]string{"-u", "postgres", "--", name}, args...)...)
	}
	return exec.CommandContext(ctx, name, args...)
}

// binDir finds the directory holding initdb and pg_ctl: PATH first, then the
// newest /usr/lib/postgresql/<version>/bin (Debian's layout).
func binDir() (string, error) {
	if p, err := exec.LookPath("initdb"); err == nil {
		return filepath.Dir(p), nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return versionOf(dirs[i]) > versionOf(dirs[j]) })
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d, nil
		}
	}
	return "", errors.New("no PostgreSQL installation found (initdb not on PATH or in /usr/lib/postgresql/*/bin); install postgresql or set DATABASE_URL")
}

func versionOf(binDir string) int {
	v, _ := strconv.Atoi(strings.Split(filepath.Base(filepath.Dir(binDir)), ".")[0])
	return v
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
