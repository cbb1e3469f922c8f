// Package gateway is the engine of Cloud Connector's per-feature gateways:
// it matches a request to a route (feature and backend), asks the decision
// service, enforces the budget, proxies the request without buffering
// (JSON, SSE, NDJSON, chunked, WebSocket, gRPC) and records usage.
package gateway

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"

	"github.com/cloud-connector/cloud-connector/gateways/budget"
	"github.com/cloud-connector/cloud-connector/gateways/decisions"
	"github.com/cloud-connector/cloud-connector/gateways/internaltoken"
	"github.com/cloud-connector/cloud-connector/gateways/route"
	"github.com/cloud-connector/cloud-connector/gateways/usage"
	"github.com/cloud-connector/cloud-connector/migrations"
	"github.com/cloud-connector/cloud-connector/services/config"
	"github.com/cloud-connector/cloud-connector/services/server"
	"github.com/cloud-connector/cloud-connector/services/telemetry"
)

// Gateway is a running gateway. Its ServeHTTP is the public handler.
type Gateway struct {
	cfg       Config
	logger    *slog.Logger
	pool      *pgxpool.Pool
	decisions *decisions.Client
	budget    *budget.Limiter
	usage     *usage.Recorder
	backends  map[string]*backend
	hosts     []string // Config.Hosts without ports
	// prefixedJWKS is jwksPath under Config.Prefix, which serves it too.
	prefixedJWKS string
	mux          atomic.Pointer[http.Handler]
	routesSum    [32]byte
	metrics      *metrics
	database     *server.Dependency
	signer       *internaltoken.Signer // nil: no internal tokens
	tracing      trace.TracerProvider
	tracer       trace.Tracer

	proc          *server.Process
	sessions      *sessions
	bgCtx         context.Context
	cancel        context.CancelFunc
	bg            sync.WaitGroup
	budgetStopped chan struct{}
	usageStopped  chan struct{}
}

// CloseTimeout bounds the work Run does after the drain: returning budget
// leases, flushing recorded usage, then exporting the last spans.
const CloseTimeout = 15 * time.Second

// New builds a gateway from cfg and opens its listeners; Run serves. It
// fails if the database answers but does not carry the schema this binary
// needs; a database that does not answer is an outage the gateway serves
// through (see Run).
func New(ctx context.Context, cfg Config, logger *slog.Logger) (_ *Gateway, err error) {
	cfg = cfg.WithDefaults()
	trusted, err := cfg.validate()
	if err != nil {
		telemetry.Shutdown(context.WithoutCancel(ctx), cfg.TracerProvider) // owned, and nothing traced
		return nil, fmt.Errorf("gateway config: %w", err)
	}
	logger = telemetry.Logger(logger).With("gateway", cfg.Name)
	g := &Gateway{cfg: cfg, logger: logger, backends: map[string]*backend{}, hosts: hostNames(cfg.Hosts),
		prefixedJWKS: cfg.Prefix + jwksPath,
		sessions:     newSessions(), tracing: cfg.TracerProvider}
	if g.tracing == nil {
		g.tracing = telemetry.NoExport()
	}
	g.tracer = g.tracing.Tracer(tracerName)
	g.bgCtx, g.cancel = context.WithCancel(context.WithoutCancel(ctx))
	defer func() {
		if err != nil {
			g.cancel()
			g.closeResources()
			telemetry.Shutdown(context.WithoutCancel(ctx), g.tracing) // nothing traced
		}
	}()
	reg := server.NewRegistry()
	g.metrics = newMetrics(reg, cfg.Name)

	for name, bc := range cfg.Backends {
		b, err := newBackend(name, bc, trusted, g.tracing, logger)
		if err != nil {
			return nil, fmt.Errorf("backend %s: %w", name, err)
		}
		g.backends[name] = b
	}
	table, sum, err := g.loadRoutes()
	if err != nil {
		return nil, err
	}
	g.install(table, sum)

	if g.pool, err = pgxpool.New(ctx, cfg.DatabaseURL); err != nil {
		return nil, fmt.Errorf("open database pool: %w", err)
	}
	g.database = server.NewDependency(server.DependencyConfig{
		Name:       "database",
		Ping:       g.pool.Ping,
		Verify:     func(ctx context.Context) error { return migrations.Check(ctx, g.pool) },
		Fatal:      func(err error) bool { return errors.Is(err, migrations.ErrSchemaBehind) },
		Interval:   cfg.DatabaseCheckInterval.D(),
		Registerer: reg,
	}, logger)
	if err := g.database.Start(ctx); err != nil {
		return nil, err
	}
	if it := cfg.InternalToken; it != nil {
		if g.signer, err = internaltoken.New(internaltoken.Config{
			Issuer: it.Issuer, KeyFiles: it.KeyFiles, TTL: it.TTL.D(),
		}); err != nil {
			return nil, err
		}
	} else {
		logger.Warn("internal_token not configured: backends get identity headers without a token to verify them")
	}
	if g.decisions, err = decisions.New(decisions.Config{
		URL: cfg.DecisionURL, Timeout: cfg.DecisionTimeout.D(), CacheSize: cfg.DecisionCacheSize, Registerer: reg,
		TracerProvider: g.tracing,
	}); err != nil {
		return nil, err
	}
	g.budget = budget.New(g.pool, budget.Config{Registerer: reg}, logger)
	if g.usage, err = usage.New(g.pool, usage.Config{
		SpoolDir: cfg.UsageSpoolDir, SpoolMaxBytes: cfg.UsageSpoolMaxBytes, Registerer: reg,
	}, logger); err != nil {
		return nil, err
	}

	// Readiness leaves the database out: an outage must not empty the
	// Service, or the degraded mode (leases in hand, the usage spool,
	// fail-open routes) would never serve. g.database reports it instead.
	g.proc, err = server.NewProcess(cfg.Listen, cfg.AdminListen, cfg.ShutdownDrain.D(), g, reg, logger)
	if err != nil {
		return nil, err
	}
	return g, nil
}

// Addr is the public listening address.
func (g *Gateway) Addr() string { return g.proc.Addr() }

// AdminAddr is the admin listening address.
func (g *Gateway) AdminAddr() string { return g.proc.AdminAddr() }

// ServeHTTP normalizes the path, applies host or prefix mounting and routes
// the request.
func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	escaped := r.URL.EscapedPath()
	ctx, span := g.startSpan(r, escaped)
	defer span.End()
	path, err := route.CleanPath(escaped)
	if err != nil {
		g.observe(ctx, "", http.StatusBadRequest, time.Now())
		detail(http.StatusBadRequest, grpcInvalidArgument, msgBadPath).write(w, r)
		return
	}
	if g.signer != nil && r.Method == http.MethodGet && (path == jwksPath || path == g.prefixedJWKS) {
		// On every host and port, with or without the prefix: backends
		// fetch it over the cluster network, by the Service's name.
		g.serveJWKS(w)
		spanStatus(ctx, http.StatusOK)
		return
	}
	if !g.hostMounted(r.Host) {
		var ok bool
		if path, ok = route.StripPrefix(path, g.cfg.Prefix); !ok || (g.cfg.Prefix == "" && len(g.cfg.Hosts) > 0) {
			g.observe(ctx, "", http.StatusNotFound, time.Now())
			detail(http.StatusNotFound, grpcUnimplemented, msgNotFound).write(w, r)
			return
		}
	}
	u := *r.URL
	u.RawPath, u.Path = path, unescape(path)
	r2 := r.WithContext(ctx)
	r2.URL = &u
	(*g.mux.Load()).ServeHTTP(w, r2)
}

// jwksPath serves the public keys of the gateway's internal tokens.
const jwksPath = "/.well-known/jwks.json"

func (g *Gateway) serveJWKS(w http.ResponseWriter) {
	h := w.Header()
	h.Set("Content-Type", "application/jwk-set+json")
	// Backends refetch within the hour; rotation publishes a new key well
	// before it signs (see package internaltoken).
	h.Set("Cache-Control", "public, max-age=3600")
	w.Write(g.signer.JWKS())
}

func (g *Gateway) hostMounted(host string) bool {
	host = hostName(host)
	return slices.ContainsFunc(g.hosts, func(h string) bool { return strings.EqualFold(h, host) })
}

// hostNames returns hosts without their ports: a request is matched by its
// host name alone, whatever port it names.
func hostNames(hosts []string) []string {
	names := make([]string, len(hosts))
	for i, h := range hosts {
		names[i] = hostName(h)
	}
	return names
}

// hostName is host (a Host header or hosts entry) without its port.
func hostName(host string) string {
	if h, _, err := net.SplitHostPort(host); err == nil {
		return h
	}
	return host
}

// Run serves until ctx is done, then drains in-flight requests, returns
// budget leases, flushes usage and releases every resource. While the
// database is unreachable it keeps serving: budgets from the leases in hand
// and then each route's fail mode, usage into the spool; the gauge
// cloudconnector_database_up and a log line on every change report it.
func (g *Gateway) Run(ctx context.Context) error {
	g.logger.Info("gateway listening", "addr", g.Addr(), "admin", g.AdminAddr(), "prefix", g.cfg.Prefix, "hosts", g.cfg.Hosts)
	g.budgetStopped, g.usageStopped = make(chan struct{}), make(chan struct{})
	go func() { defer close(g.budgetStopped); g.budget.Run(g.bgCtx) }()
	go func() { defer close(g.usageStopped); g.usage.Run(g.bgCtx) }()
	g.bg.Add(1)
	go func() { defer g.bg.Done(); g.database.Run(g.bgCtx) }()
	if g.cfg.RoutesFile != "" {
		g.bg.Add(1)
		go func() { defer g.bg.Done(); g.watchRoutes(g.bgCtx) }()
	}

	var drainDeadline time.Time
	errs := []error{g.proc.Run(ctx, func() { drainDeadline = time.Now().Add(g.cfg.ShutdownDrain.D()) })}
	// The public server has drained its requests; upgraded sessions get the
	// rest of the drain window.
	g.sessions.drain(drainDeadline)

	// Traffic has stopped: hand back what this replica holds, then write
	// what it recorded.
	g.cancel()
	<-g.budgetStopped
	<-g.usageStopped
	g.bg.Wait()
	closeCtx, cancel := context.WithTimeout(context.Background(), CloseTimeout)
	defer cancel()
	if err := g.budget.Close(closeCtx); err != nil {
		errs = append(errs, fmt.Errorf("return budget leases: %w", err))
	}
	if err := g.usage.Close(closeCtx); err != nil {
		errs = append(errs, fmt.Errorf("flush usage: %w", err))
	}
	g.closeResources()
	// Last, as it was opened first: the drained requests' spans go out
	// within the grace period. Losing them is no failure of the gateway.
	if err := telemetry.Shutdown(closeCtx, g.tracing); err != nil {
		g.logger.Warn("spans not exported at shutdown", "error", err)
	}
	g.logger.Info("gateway stopped")
	return errors.Join(errs...)
}

func (g *Gateway) closeResources() {
	for _, b := range g.backends {
		b.closer.CloseIdleConnections()
	}
	if g.pool != nil {
		g.pool.Close()
	}
	if g.proc != nil {
		g.proc.Close()
	}
}

// loadRoutes returns the validated route table: the built-in one, or the
// routes file's with the hash of its content.
func (g *Gateway) loadRoutes() (route.Table, [32]byte, error) {
	if g.cfg.RoutesFile == "" {
		if err := g.cfg.Routes.Validate(g.cfg.Backends); err != nil {
			return route.Table{}, [32]byte{}, err
		}
		return g.cfg.Routes, [32]byte{}, nil
	}
	b, err := os.ReadFile(g.cfg.RoutesFile)
	if err != nil {
		return route.Table{}, [32]byte{}, fmt.Errorf("read routes: %w", err)
	}
	t, err := g.parseRoutes(b)
	return t, sha256.Sum256(b), err
}

func (g *Gateway) parseRoutes(b []byte) (route.Table, error) {
	var t route.Table
	if err := config.Parse(g.cfg.RoutesFile, b, &t); err != nil {
		return route.Table{}, err
	}
	if err := t.Validate(g.cfg.Backends); err != nil {
		return route.Table{}, err
	}
	return t, nil
}

// install swaps in a router for t.
func (g *Gateway) install(t route.Table, sum [32]byte) {
	var h http.Handler = t.Mux(func(rt route.Route) http.Handler {
		b, hdrs := g.backends[rt.Backend], decisionHeaders(rt)
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			g.serveRoute(rt, b, hdrs, w, r, r.URL.EscapedPath())
		})
	}, func(w http.ResponseWriter, r *http.Request) {
		spanStatus(r.Context(), http.StatusNotFound)
		detail(http.StatusNotFound, grpcUnimplemented, msgNotFound).write(w, r)
	}, func(w http.ResponseWriter, r *http.Request) {
		spanStatus(r.Context(), http.StatusMethodNotAllowed)
		detail(http.StatusMethodNotAllowed, grpcUnimplemented, msgMethod).write(w, r)
	})
	g.mux.Store(&h)
	g.routesSum = sum
	g.logger.Info("routes installed", "routes", len(t.Routes))
}

// watchRoutes reloads RoutesFile when its content changes. A table that
// does not parse or validate is rejected and the current one keeps serving.
func (g *Gateway) watchRoutes(ctx context.Context) {
	t := time.NewTicker(g.cfg.RoutesReloadInterval.D())
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		b, err := os.ReadFile(g.cfg.RoutesFile)
		if err != nil {
			g.logger.Error("read routes; keeping current", "error", err)
			continue
		}
		sum := sha256.Sum256(b)
		if sum == g.routesSum {
			continue
		}
		table, err := g.parseRoutes(b)
		if err != nil {
			g.metrics.routeReloads.WithLabelValues("rejected").Inc()
			g.logger.Error("route table rejected; keeping current", "error", err)
			g.routesSum = sum // do not log the same bad file every tick
			continue
		}
		g.install(table, sum)
		g.metrics.routeReloads.WithLabelValues("ok").Inc()
	}
}

type metrics struct {
	gateway      string
	requests     *prometheus.CounterVec
	duration     *prometheus.HistogramVec
	denials      *prometheus.CounterVec
	routeReloads *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer, gateway string) *metrics {
	m := &metrics{
		gateway: gateway,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cloudconnector_gateway_requests_total",
			Help: "Requests answered, by route and status code.",
		}, []string{"gateway", "route", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "cloudconnector_gateway_request_duration_seconds",
			Help:    "Time from request arrival to the end of the response (streams included).",
			Buckets: prometheus.ExponentialBuckets(0.001, 2.5, 14),
		}, []string{"gateway", "route"}),
		denials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cloudconnector_gateway_denials_total",
			Help: "Requests refused by the gateway, by route, status and reason.",
		}, []string{"gateway", "route", "code", "reason"}),
		routeReloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name:        "cloudconnector_gateway_route_reloads_total",
			Help:        "Route table reloads by result (ok, rejected).",
			ConstLabels: prometheus.Labels{"gateway": gateway},
		}, []string{"result"}),
	}
	reg.MustRegister(m.requests, m.duration, m.denials, m.routeReloads)
	return m
}

// observe counts a response in the metrics and on the request's span.
func (g *Gateway) observe(ctx context.Context, route string, status int, start time.Time) {
	g.metrics.observe(route, status, start)
	spanStatus(ctx, status)
}

func (m *metrics) observe(route string, status int, start time.Time) {
	m.requests.WithLabelValues(m.gateway, route, strconv.Itoa(status)).Inc()
	m.duration.WithLabelValues(m.gateway, route).Observe(time.Since(start).Seconds())
}

// Run builds a gateway from cfg and serves until ctx is done.
func Run(ctx context.Context, cfg Config, logger *slog.Logger) error {
	g, err := New(ctx, cfg, logger)
	if err != nil {
		return err
	}
	return g.Run(ctx)
}
