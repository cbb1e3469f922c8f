package budget_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/cloud-connector/cloud-connector/gateways/budget"
)

// lossyProxy forwards TCP connections to Postgres. Armed, it holds back the
// next reply the server sends and cuts that client connection instead of
// delivering it: what a client sees when the reply path fails after
// Postgres has committed (a reply that arrives after the client's deadline
// looks the same to it). Postgres flushes an autocommit statement's reply
// only after its commit, so a reply held back here is of a committed
// statement.
type lossyProxy struct {
	ln     net.Listener
	target string
	armed  atomic.Bool
	// lost receives once for each reply held back, before the client's
	// connection is cut.
	lost chan struct{}

	mu    sync.Mutex
	conns []net.Conn
}

func newLossyProxy(tb testing.TB, dbURL string) *lossyProxy {
	tb.Helper()
	u, err := url.Parse(dbURL)
	if err != nil {
		tb.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	p := &lossyProxy{ln: ln, target: u.Host, lost: make(chan struct{}, 16)}
	go p.serve()
	tb.Cleanup(func() {
		ln.Close()
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, c := range p.conns {
			c.Close()
		}
	})
	return p
}

func (p *lossyProxy) serve() {
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		server, err := net.Dial("tcp", p.target)
		if err != nil {
			client.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, client, server)
		p.mu.Unlock()
		go func() {
			io.Copy(server, client)
			server.Close()
		}()
		go func() {
			defer client.Close()
			defer server.Close()
			buf := make([]byte, 32<<10)
			for {
				n, err := server.Read(buf)
				if n > 0 && p.armed.CompareAndSwap(true, false) {
					p.lost <- struct{}{}
					return
				}
				if n > 0 {
					if _, err := client.Write(buf[:n]); err != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
	}
}

// loseNextReply arms the proxy for one reply.
func (p *lossyProxy) loseNextReply() { p.armed.Store(true) }

// pool opens a pool through the proxy with one connection, established
// now and never pinged, that runs each statement in one round trip (no
// separate prepare), so the next reply after loseNextReply is the next
// statement's result.
func (p *lossyProxy) pool(tb testing.TB, dbURL string) *pgxpool.Pool {
	tb.Helper()
	cfg, err := pgxpool.ParseConfig(dbURL)
	if err != nil {
		tb.Fatal(err)
	}
	cfg.ConnConfig.Host, cfg.ConnConfig.Port = "127.0.0.1", uint16(p.ln.Addr().(*net.TCPAddr).Port)
	cfg.ConnConfig.DefaultQueryExecMode = pgx.QueryExecModeExec
	cfg.MaxConns = 1
	cfg.ShouldPing = func(context.Context, pgxpool.ShouldPingParams) bool { return false }
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(pool.Close)
	if err := pool.Ping(context.Background()); err != nil {
		tb.Fatal(err)
	}
	return pool
}

// A return whose reply is lost after it committed must count as done: the
// units are back in Postgres, and another replica may lease them.
func TestReturnWithLostReplyIsNotSpentAgain(t *testing.T) {
	t.Parallel()
	for name, giveBack := range map[string]func(context.Context, *budget.Limiter, fixture) error{
		"close": func(ctx context.Context, l *budget.Limiter, _ fixture) error {
			return l.Close(ctx)
		},
		"idle return": func(ctx context.Context, l *budget.Limiter, f fixture) error {
			f.advance(t, 2*time.Second) // IdleReturn is 1s
			return errors.Join(budget.Sweep(ctx, l)...)
		},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			f := setup(t)
			p := newLossyProxy(t, f.url)
			reg := prometheus.NewRegistry()
			cfg := hoarding
			cfg.IdleReturn, cfg.Now, cfg.Registerer = time.Second, f.clock.Now, reg
			a := budget.New(p.pool(t, f.url), cfg, nil)
			b := f.limiter(t, hoarding)
			spec := minute(100)

			if takeN(t, a, "org-1", spec, 1) != 1 { // a leases all 100 and spends 1
				t.Fatal("first take refused")
			}
			p.loseNextReply()
			if err := giveBack(t.Context(), a, f); err == nil {
				t.Fatal("return with its reply lost: no error")
			}
			<-p.lost
			if used, _ := f.used(t, "org-1", t0); used != 1 {
				t.Fatalf("used_units = %d after the return, want 1: the return did not commit", used)
			}

			allowedB := drain(t, b, "org-1", spec)
			allowedA := 0
			for range 200 {
				out, err := a.Take(t.Context(), "org-1", spec)
				if err != nil {
					t.Fatalf("take after the lost reply: %v", err)
				}
				if !out.Allowed {
					break
				}
				allowedA++
			}
			if total := 1 + allowedA + allowedB; total != 100 {
				t.Errorf("a allowed 1+%d, b allowed %d: total %d, want the limit 100", allowedA, allowedB, total)
			}
			if got := gather(t, reg)[`cloudconnector_budget_abandoned_units_total{reason="return_outcome_unknown"}`]; got != 99 {
				t.Errorf("abandoned return units = %v, want 99", got)
			}
		})
	}
}

// A lease whose reply is lost after it committed fails the Take, and its
// units are given up for the window (counted in Postgres, held by nobody):
// that refuses early, never allows twice, and is metered.
func TestLeaseWithLostReplyIsAbandoned(t *testing.T) {
	t.Parallel()
	f := setup(t)
	p := newLossyProxy(t, f.url)
	reg := prometheus.NewRegistry()
	a := budget.New(p.pool(t, f.url), budget.Config{LeaseTarget: time.Hour, Now: f.clock.Now, Registerer: reg}, nil)
	spec := minute(100) // leases of limit/10

	p.loseNextReply()
	if out, err := a.Take(t.Context(), "org-1", spec); err == nil || out.Allowed {
		t.Fatalf("take whose lease reply was lost: %+v, %v; want an error", out, err)
	}
	<-p.lost
	if used, _ := f.used(t, "org-1", t0); used != 10 {
		t.Fatalf("used_units = %d, want the committed lease of 10", used)
	}
	if got := gather(t, reg)[`cloudconnector_budget_abandoned_units_total{reason="lease_outcome_unknown"}`]; got != 10 {
		t.Errorf("abandoned lease units = %v, want 10", got)
	}
	total := drain(t, a, "org-1", spec) + drain(t, f.limiter(t, budget.Config{}), "org-1", spec)
	if total != 90 {
		t.Errorf("allowed %d after the lost lease, want the 90 not abandoned", total)
	}
}

// switchDB sends statements to the database, or, while down, to an address
// where nothing listens, so they fail before reaching any server.
type switchDB struct {
	up, down budget.DB
	isDown   atomic.Bool
}

func newSwitchDB(tb testing.TB, up budget.DB) *switchDB {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	down, err := pgxpool.New(context.Background(), "postgres://postgres@"+addr+"/none?sslmode=disable&connect_timeout=5")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(down.Close)
	return &switchDB{up: up, down: down}
}

func (d *switchDB) db() budget.DB {
	if d.isDown.Load() {
		return d.down
	}
	return d.up
}

func (d *switchDB) Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	return d.db().Exec(ctx, sql, args...)
}

func (d *switchDB) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	return d.db().QueryRow(ctx, sql, args...)
}

// A return that certainly failed changed nothing: the units are still
// ours, so an outage does not take away the lease in hand.
func TestFailedReturnKeepsUnits(t *testing.T) {
	t.Parallel()
	for name, fail := range map[string]func(testing.TB, fixture, *switchDB){
		"never reached the database": func(_ testing.TB, _ fixture, db *switchDB) { db.isDown.Store(true) },
		"refused by the database": func(tb testing.TB, f fixture, _ *switchDB) {
			if _, err := f.db.Exec(context.Background(), `ALTER TABLE budget_counters RENAME TO budget_counters_gone`); err != nil {
				tb.Fatal(err)
			}
		},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			f := setup(t)
			db := newSwitchDB(t, f.db)
			reg := prometheus.NewRegistry()
			cfg := hoarding
			cfg.IdleReturn, cfg.Now, cfg.Registerer = time.Second, f.clock.Now, reg
			l := budget.New(db, cfg, nil)
			spec := minute(100)

			if takeN(t, l, "org-1", spec, 1) != 1 {
				t.Fatal("first take refused")
			}
			fail(t, f, db)
			f.advance(t, 2*time.Second)
			if errs := budget.Sweep(t.Context(), l); len(errs) != 1 {
				t.Fatalf("idle return that fails: %v, want one error", errs)
			}
			if n := takeN(t, l, "org-1", spec, 99); n != 99 {
				t.Errorf("after the failed return allowed %d of the 99 units in hand", n)
			}
			if out, err := l.Take(t.Context(), "org-1", spec); err == nil || out.Allowed {
				t.Errorf("take past the lease: %+v, %v; want an error", out, err)
			}
			if got := gather(t, reg)[`cloudconnector_budget_abandoned_units_total{reason="lease_outcome_unknown"}`]; got != 0 {
				t.Errorf("abandoned lease units = %v, want 0: the failure was certain", got)
			}
		})
	}
}

// Units taken out of the lease because the limit was lowered must not
// become spendable again when their return fails: they were granted under
// the old limit.
func TestLoweredLimitFailedReturnIsNotSpent(t *testing.T) {
	t.Parallel()
	f := setup(t)
	db := newSwitchDB(t, f.db)
	l := budget.New(db, budget.Config{LeaseTarget: time.Hour, IdleReturn: time.Second, Now: f.clock.Now}, nil)

	if takeN(t, l, "org-1", minute(100), 1) != 1 { // a lease of 10, 9 in hand
		t.Fatal("first take refused")
	}
	db.isDown.Store(true)
	// The limit drops to 5 while the database is down: the 9 in hand must
	// go back before anything more is allowed, and cannot.
	for range 3 {
		if out, err := l.Take(t.Context(), "org-1", minute(5)); err == nil || out.Allowed {
			t.Fatalf("take under the lowered limit with the database down: %+v, %v; want an error", out, err)
		}
	}
	// An idle return fails the same way and must not put them in reach.
	f.advance(t, 2*time.Second)
	if errs := budget.Sweep(t.Context(), l); len(errs) != 1 {
		t.Fatalf("idle return with the database down: %v, want one error", errs)
	}
	for range 3 {
		if out, err := l.Take(t.Context(), "org-1", minute(5)); err == nil || out.Allowed {
			t.Fatalf("take after the failed idle return: %+v, %v; want an error", out, err)
		}
	}

	db.isDown.Store(false)
	if n := drain(t, l, "org-1", minute(5)); n != 4 {
		t.Errorf("with the database back allowed %d more, want 4", n)
	}
	if used, limit := f.used(t, "org-1", t0); used != 5 || limit != 5 {
		t.Errorf("used %d of limit %d, want 5 of 5", used, limit)
	}
}

// A statement that never got a connection (every pooled one busy until its
// deadline) certainly did not apply: the units of a failed return stay in
// hand, and a failed lease abandons nothing.
func TestStatementWithoutConnectionIsNotAbandoned(t *testing.T) {
	t.Parallel()
	f := setup(t)
	cfg, err := pgxpool.ParseConfig(f.url)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 1
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	reg := prometheus.NewRegistry()
	l := budget.New(pool, budget.Config{LeaseTarget: time.Hour, StatementTimeout: 50 * time.Millisecond,
		Now: f.clock.Now, Registerer: reg}, nil)
	spec := minute(100)
	if out, err := l.Take(t.Context(), "org-1", spec); err != nil || !out.Allowed {
		t.Fatalf("first take: %+v, %v", out, err)
	}

	held, err := pool.Acquire(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	// The lease in hand is returned at Close; with no connection to be had
	// the return fails, certainly unsent.
	if err := l.Close(t.Context()); err == nil {
		t.Fatal("Close returned its lease with no connection to be had")
	}
	// A lease by a second limiter cannot get a connection either.
	other := budget.New(pool, budget.Config{StatementTimeout: 50 * time.Millisecond, Now: f.clock.Now, Registerer: reg}, nil)
	if out, err := other.Take(t.Context(), "org-2", spec); err == nil || out.Allowed {
		t.Fatalf("take without a connection: %+v, %v; want an error", out, err)
	}
	held.Release()

	for name, v := range gather(t, reg) {
		if strings.HasPrefix(name, "cloudconnector_budget_abandoned_units_total") && v != 0 {
			t.Errorf("%s = %v; nothing was sent, nothing may be abandoned", name, v)
		}
	}
}
