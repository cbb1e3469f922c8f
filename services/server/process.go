package server

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync/atomic"
	"time"
)

// Process runs a public server and its admin server through a graceful
// shutdown: readiness fails first, the public server drains in-flight
// requests (streams included), and only then the admin server stops, so
// probes and metrics keep answering during the drain.
type Process struct {
	Public, Admin     *http.Server
	PublicLn, AdminLn net.Listener
	// Drain bounds the public server's drain.
	Drain time.Duration
	// DrainDelay keeps serving normally for a moment after shutdown starts
	// while readiness already fails, so load balancers stop sending new
	// requests before the listener closes. Default 0.
	DrainDelay time.Duration

	draining atomic.Bool
}

// Ready is a readiness check that fails once shutdown has begun.
func (p *Process) Ready(context.Context) error {
	if p.draining.Load() {
		return errors.New("shutting down")
	}
	return nil
}

// Run serves until ctx is done or a server fails, then shuts down as
// described on Process. onDrain runs when draining begins.
func (p *Process) Run(ctx context.Context, onDrain func()) error {
	publicCtx, stopPublic := context.WithCancel(context.WithoutCancel(ctx))
	adminCtx, stopAdmin := context.WithCancel(context.WithoutCancel(ctx))
	defer stopPublic()
	defer stopAdmin()
	publicErr, adminErr := make(chan error, 1), make(chan error, 1)
	go func() { publicErr <- Serve(publicCtx, p.Public, p.PublicLn, p.Drain) }()
	go func() { adminErr <- Serve(adminCtx, p.Admin, p.AdminLn, 5*time.Second) }()

	var errs []error
	select {
	case <-ctx.Done():
	case err := <-publicErr:
		errs = append(errs, err)
		publicErr = nil
	case err := <-adminErr:
		errs = append(errs, err)
		adminErr = nil
	}
	p.draining.Store(true)
	if onDrain != nil {
		onDrain()
	}
	if p.DrainDelay > 0 && ctx.Err() != nil {
		time.Sleep(p.DrainDelay)
	}
	stopPublic()
	if publicErr != nil {
		errs = append(errs, <-publicErr)
	}
	stopAdmin()
	if adminErr != nil {
		errs = append(errs, <-adminErr)
	}
	return errors.Join(errs...)
}
