package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// DependencyConfig configures a Dependency.
type DependencyConfig struct {
	// Name names the dependency in logs and in its gauge,
	// cloudconnector_<Name>_up: "database".
	Name string
	// Ping reports whether the dependency answers.
	Ping func(context.Context) error
	// Verify reports whether a dependency that answers is one this
	// process can use, e.g. that a database carries the schema version
	// the binary was built for. Optional. Once it has passed it is not
	// run again.
	Verify func(context.Context) error
	// Fatal reports a Verify error that no waiting fixes (migrations not
	// run), which stops the process at Start. Other Verify errors (a
	// timeout, a dropped connection) leave it starting degraded, as an
	// unanswered ping does. Nil: none is fatal.
	Fatal func(error) bool
	// Interval between checks. Default 5s.
	Interval time.Duration
	// Timeout bounds one check. Default 5s.
	Timeout time.Duration
	// Registerer receives the gauge; nil registers none.
	Registerer prometheus.Registerer
}

// Dependency watches something a process keeps serving without, degraded,
// such as its database: Postgres down means spending the budget lease in
// hand, spooling usage and answering from cached organizations, which
// only happens if the process stays in its Service. So a Dependency never
// affects readiness; it exports its state as the gauge
// cloudconnector_<name>_up (1 up, 0 down) and logs every change. It is safe
// for concurrent use.
type Dependency struct {
	cfg    DependencyConfig
	logger *slog.Logger
	gauge  prometheus.Gauge

	mu       sync.Mutex
	known    bool // a check has completed
	up       bool
	verified bool
}

// NewDependency returns a Dependency; Start checks it once, Run keeps
// checking.
func NewDependency(cfg DependencyConfig, logger *slog.Logger) *Dependency {
	if cfg.Interval <= 0 {
		cfg.Interval = 5 * time.Second
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	d := &Dependency{cfg: cfg, logger: logger, gauge: prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "cloudconnector_" + cfg.Name + "_up",
		Help: "Whether the " + cfg.Name + " answered the last check and is usable (1) or not (0). " +
			"The process keeps serving, degraded, while it is 0; readiness does not depend on it.",
	})}
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(d.gauge)
	}
	return d
}

// Start checks the dependency once, as the process starts. A Verify error
// that Fatal says no waiting fixes (migrations not run) is a deployment
// mistake: Start returns it, so the process fails to start and says why.
// Anything else, a dependency that does not answer or cannot be verified
// in time, is an outage the process is built to ride out: Start logs it
// and returns nil, and Run verifies the dependency once it answers.
func (d *Dependency) Start(ctx context.Context) error {
	pingCtx, cancel := context.WithTimeout(ctx, d.cfg.Timeout)
	defer cancel()
	if err := d.cfg.Ping(pingCtx); err != nil {
		d.record(false, fmt.Errorf("ping: %w", err))
		return nil
	}
	if d.cfg.Verify != nil {
		// A timeout of its own: a slow ping must not leave it none.
		verifyCtx, cancel := context.WithTimeout(ctx, d.cfg.Timeout)
		defer cancel()
		if err := d.cfg.Verify(verifyCtx); err != nil {
			if d.cfg.Fatal != nil && d.cfg.Fatal(err) {
				return fmt.Errorf("%s: %w", d.cfg.Name, err)
			}
			d.record(false, err)
			return nil
		}
	}
	d.mu.Lock()
	d.verified = true
	d.mu.Unlock()
	d.record(true, nil)
	return nil
}

// Run checks the dependency every Interval until ctx is done.
func (d *Dependency) Run(ctx context.Context) {
	t := time.NewTicker(d.cfg.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		err := d.check(ctx)
		if ctx.Err() != nil {
			return // stopping, not an outage
		}
		d.record(err == nil, err)
	}
}

// Up reports whether the last check succeeded.
func (d *Dependency) Up() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.up
}

func (d *Dependency) check(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, d.cfg.Timeout)
	defer cancel()
	if err := d.cfg.Ping(ctx); err != nil {
		return fmt.Errorf("ping: %w", err)
	}
	d.mu.Lock()
	verified := d.verified
	d.mu.Unlock()
	if verified || d.cfg.Verify == nil {
		return nil
	}
	if err := d.cfg.Verify(ctx); err != nil {
		return err
	}
	d.mu.Lock()
	d.verified = true
	d.mu.Unlock()
	return nil
}

// record sets the state and logs a change: WARN when the dependency
// becomes unusable, INFO when it recovers.
func (d *Dependency) record(up bool, err error) {
	d.mu.Lock()
	changed := !d.known || d.up != up
	d.known, d.up = true, up
	d.mu.Unlock()
	if up {
		d.gauge.Set(1)
	} else {
		d.gauge.Set(0)
	}
	switch {
	case !changed:
	case up:
		d.logger.Info(d.cfg.Name+" available", "dependency", d.cfg.Name)
	default:
		if err == nil {
			err = errors.New("unavailable")
		}
		d.logger.Warn(d.cfg.Name+" unavailable; serving degraded until it recovers (still ready)",
			"dependency", d.cfg.Name, "error", err)
	}
}
