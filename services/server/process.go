package server

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// AdminDrain bounds the admin server's own drain, which starts only after
// the public drain has finished: a process may take up to its public drain
// plus AdminDrain to stop serving after shutdown begins.
const AdminDrain = 5 * time.Second

// Process runs a public server and its admin server through a graceful
// shutdown: readiness fails first, the public server drains in-flight
// requests (streams included), and only then the admin server stops, so
// probes and metrics keep answering during the drain.
//
// Readiness reflects only the process's own state: it fails before Run
// serves (the admin port does not answer yet) and once shutdown begins.
// Dependencies the process can serve without, degraded, such as its
// database, are watched by a Dependency instead: failing readiness on a
// shared dependency would take every replica out of its Service at once.
type Process struct {
	Public, Admin     *http.Server
	PublicLn, AdminLn net.Listener
	// Drain bounds the public server's drain.
	Drain time.Duration

	logger   *slog.Logger
	draining atomic.Bool
}

// NewProcess opens the public and admin listeners and builds the servers:
// the public one serves h over HTTP/1.1 and HTTP/2 cleartext, the admin one
// serves Admin(reg, ...) whose readiness fails once shutdown begins, then
// runs checks. Close releases the listeners of a process that never runs.
func NewProcess(listen, adminListen string, drain time.Duration, h http.Handler, reg *prometheus.Registry,
	logger *slog.Logger, checks ...Check) (*Process, error) {
	ln, err := Listen(listen)
	if err != nil {
		return nil, err
	}
	adminLn, err := Listen(adminListen)
	if err != nil {
		ln.Close()
		return nil, err
	}
	p := &Process{PublicLn: ln, AdminLn: adminLn, Drain: drain, Public: New(h, true, logger), logger: logger}
	p.Admin = New(Admin(reg, append([]Check{{Name: "shutdown", Fn: p.Ready}}, checks...)...), false, logger)
	return p, nil
}

// Addr is the public listening address.
func (p *Process) Addr() string { return p.PublicLn.Addr().String() }

// AdminAddr is the admin listening address.
func (p *Process) AdminAddr() string { return p.AdminLn.Addr().String() }

// Close closes both listeners; Run does so itself.
func (p *Process) Close() {
	p.PublicLn.Close()
	p.AdminLn.Close()
}

// Ready is a readiness check that fails once shutdown has begun.
func (p *Process) Ready(context.Context) error {
	if p.draining.Load() {
		return errors.New("shutting down")
	}
	return nil
}

// Run serves until ctx is done or a server fails, then shuts down as
// described on Process. onDrain runs when draining begins, after readiness
// has started failing and before the public listener closes.
func (p *Process) Run(ctx context.Context, onDrain func()) error {
	publicCtx, stopPublic := context.WithCancel(context.WithoutCancel(ctx))
	adminCtx, stopAdmin := context.WithCancel(context.WithoutCancel(ctx))
	defer stopPublic()
	defer stopAdmin()
	publicErr, adminErr := make(chan error, 1), make(chan error, 1)
	go func() { publicErr <- Serve(publicCtx, p.Public, p.PublicLn, p.Drain) }()
	go func() { adminErr <- Serve(adminCtx, p.Admin, p.AdminLn, AdminDrain) }()

	var errs []error
	cause := "shutdown requested"
	select {
	case <-ctx.Done():
	case err := <-publicErr:
		errs = append(errs, err)
		publicErr = nil
		cause = "public server failed"
	case err := <-adminErr:
		errs = append(errs, err)
		adminErr = nil
		cause = "admin server failed"
	}
	p.draining.Store(true)
	start := time.Now()
	// Readiness fails from here on; say so, as it is why the pod leaves
	// its Service.
	attrs := []any{"cause", cause, "ready", false, "drain", p.Drain, "public", p.Addr()}
	if err := errors.Join(errs...); err != nil {
		attrs = append(attrs, "error", err)
	}
	p.logger.Info("drain started", attrs...)
	if onDrain != nil {
		onDrain()
	}
	stopPublic()
	if publicErr != nil {
		if err := <-publicErr; err != nil {
			errs = append(errs, err)
			p.logger.Warn("drain finished", "took", time.Since(start).Round(time.Millisecond), "error", err)
		} else {
			p.logger.Info("drain finished", "took", time.Since(start).Round(time.Millisecond))
		}
	}
	stopAdmin()
	if adminErr != nil {
		errs = append(errs, <-adminErr)
	}
	return errors.Join(errs...)
}
