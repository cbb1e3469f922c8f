package server_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cloud-connector/cloud-connector/services/server"
	"github.com/cloud-connector/cloud-connector/services/server/servertest"
)

// fakeDB is a dependency whose answers the test sets.
type fakeDB struct {
	down     atomic.Bool
	behind   atomic.Bool
	slow     atomic.Bool // Verify times out
	verifies atomic.Int32
}

var errBehind = errors.New("schema at version 1, want 2: run migrations")

func (f *fakeDB) ping(context.Context) error {
	if f.down.Load() {
		return errors.New("connection refused")
	}
	return nil
}

func (f *fakeDB) verify(context.Context) error {
	f.verifies.Add(1)
	if f.behind.Load() {
		return errBehind
	}
	if f.slow.Load() {
		return context.DeadlineExceeded
	}
	return nil
}

func newDependency(t *testing.T, f *fakeDB) (*server.Dependency, *prometheus.Registry, *servertest.Buffer) {
	t.Helper()
	reg := prometheus.NewRegistry()
	logs := &servertest.Buffer{}
	d := server.NewDependency(server.DependencyConfig{
		Name: "database", Ping: f.ping, Verify: f.verify, Interval: time.Millisecond, Registerer: reg,
		Fatal: func(err error) bool { return errors.Is(err, errBehind) },
	}, slog.New(slog.NewJSONHandler(logs, nil)))
	return d, reg, logs
}

func gauge(t *testing.T, reg *prometheus.Registry) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "cloudconnector_database_up" {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatal("no cloudconnector_database_up")
	return 0
}

func TestDependencyStart(t *testing.T) {
	t.Parallel()
	t.Run("up and verified", func(t *testing.T) {
		t.Parallel()
		d, reg, _ := newDependency(t, &fakeDB{})
		if err := d.Start(context.Background()); err != nil {
			t.Fatalf("Start: %v", err)
		}
		if !d.Up() || gauge(t, reg) != 1 {
			t.Errorf("Up = %v, gauge %v; want up", d.Up(), gauge(t, reg))
		}
	})
	t.Run("answers but unusable", func(t *testing.T) {
		t.Parallel()
		f := &fakeDB{}
		f.behind.Store(true)
		d, _, _ := newDependency(t, f)
		err := d.Start(context.Background())
		if err == nil || !strings.Contains(err.Error(), "database") || !strings.Contains(err.Error(), "run migrations") {
			t.Fatalf("Start = %v; want the Verify error naming the database", err)
		}
	})
	t.Run("answers but cannot be verified in time", func(t *testing.T) {
		t.Parallel()
		f := &fakeDB{}
		f.slow.Store(true)
		d, reg, _ := newDependency(t, f)
		if err := d.Start(context.Background()); err != nil {
			t.Fatalf("Start = %v; want nil: a slow database is an outage, not a deployment mistake", err)
		}
		if d.Up() || gauge(t, reg) != 0 {
			t.Errorf("Up = %v, gauge %v; want down until verified", d.Up(), gauge(t, reg))
		}
	})
	t.Run("unreachable", func(t *testing.T) {
		t.Parallel()
		f := &fakeDB{}
		f.down.Store(true)
		d, reg, logs := newDependency(t, f)
		if err := d.Start(context.Background()); err != nil {
			t.Fatalf("Start = %v; want nil: an outage at start is served through", err)
		}
		if d.Up() || gauge(t, reg) != 0 {
			t.Errorf("Up = %v, gauge %v; want down", d.Up(), gauge(t, reg))
		}
		if !strings.Contains(logs.String(), `"level":"WARN","msg":"database unavailable`) {
			t.Errorf("no WARN line for the outage:\n%s", logs)
		}
	})
}

// TestDependencyRun checks that Run follows the dependency, verifies it
// once when it first answers, and logs changes rather than every check.
func TestDependencyRun(t *testing.T) {
	t.Parallel()
	f := &fakeDB{}
	f.down.Store(true)
	d, reg, logs := newDependency(t, f)
	if err := d.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); d.Run(ctx) }()
	defer func() { cancel(); <-done }()

	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(time.Millisecond)
		}
	}

	// It answers, but with an old schema: still not usable.
	f.behind.Store(true)
	f.down.Store(false)
	waitFor("a verification", func() bool { return f.verifies.Load() >= 2 })
	if d.Up() {
		t.Fatal("up on a database behind the schema")
	}
	f.behind.Store(false)
	waitFor("the recovery", d.Up)
	if got := gauge(t, reg); got != 1 {
		t.Errorf("gauge = %v; want 1", got)
	}
	verified := f.verifies.Load()

	f.down.Store(true)
	waitFor("the outage", func() bool { return !d.Up() })
	f.down.Store(false)
	waitFor("the second recovery", d.Up)
	if got := f.verifies.Load(); got != verified {
		t.Errorf("verified %d more times after it passed; want once", got-verified)
	}
	cancel()
	<-done

	l := logs.String()
	if n := strings.Count(l, `"msg":"database unavailable`); n != 2 {
		t.Errorf("%d unavailable lines; want 2 (at start, then the second outage):\n%s", n, l)
	}
	if n := strings.Count(l, `"msg":"database available"`); n != 2 {
		t.Errorf("%d available lines; want 2:\n%s", n, l)
	}
}
