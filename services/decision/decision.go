// Package decision assembles the authorization decision service: the
// Connect Authorize API (Connect, gRPC and gRPC-Web on one h2c port) with
// gRPC health and reflection, token verification, organization lookup in
// PostgreSQL and the OPA policy, plus the admin port.
package decision

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/grpchealth"
	"connectrpc.com/grpcreflect"
	"connectrpc.com/otelconnect"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.opentelemetry.io/otel/trace"

	"github.com/cloud-connector/cloud-connector/migrations"
	"github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1/authzv1connect"
	"github.com/cloud-connector/cloud-connector/services/authz"
	"github.com/cloud-connector/cloud-connector/services/config"
	"github.com/cloud-connector/cloud-connector/services/opa"
	"github.com/cloud-connector/cloud-connector/services/postgres"
	"github.com/cloud-connector/cloud-connector/services/server"
	"github.com/cloud-connector/cloud-connector/services/telemetry"
	"github.com/cloud-connector/cloud-connector/services/token"
)

// Config configures the decision service. It is read from YAML; see
// deploy/ for an example.
type Config struct {
	// Listen is the Authorize API address. Default ":8080".
	Listen string `json:"listen"`
	// AdminListen serves /healthz, /readyz and /metrics. Default ":9090".
	AdminListen string `json:"admin_listen"`
	// DatabaseURL is the PostgreSQL URL (DATABASE_URL overrides it).
	DatabaseURL string `json:"database_url"`
	// PolicyDir replaces the embedded policies and is hot-reloaded.
	PolicyDir string `json:"policy_dir"`
	// PolicyReloadInterval is how often PolicyDir is checked. Default 5s.
	PolicyReloadInterval config.Duration `json:"policy_reload_interval"`
	// OrganizationCacheTTL is how long organization lookups are reused,
	// and so how long known organizations keep being answered through a
	// database outage. Default 30s.
	OrganizationCacheTTL config.Duration `json:"organization_cache_ttl"`
	// DatabaseCheckInterval is how often the database is checked for the
	// cloudconnector_database_up gauge and its log lines. Default 5s.
	// Readiness never depends on the database.
	DatabaseCheckInterval config.Duration `json:"database_check_interval"`
	// ShutdownDrain bounds graceful shutdown. Default 15s.
	ShutdownDrain config.Duration `json:"shutdown_drain"`
	Token         TokenConfig     `json:"token"`

	// TracerProvider creates a server span per Authorize call, a child of
	// the calling gateway's span (W3C traceparent). Nil:
	// telemetry.NoExport(). The service owns it: Run shuts it down last,
	// within telemetry.ShutdownTimeout (a failed New, at once).
	TracerProvider trace.TracerProvider `json:"-"`
}

// TokenConfig configures token verification; see token.Config. Durations
// left zero take token.Config's defaults.
type TokenConfig struct {
	// Issuers are the trusted issuers. An issuer whose keys come from
	// OIDC discovery must be an absolute https URL (http only on a
	// loopback host, for development); one with jwks_url or jwks_file may
	// be any name its tokens carry in iss, and jwks_url must be https
	// (again, http only on loopback).
	Issuers                   []token.IssuerConfig `json:"issuers"`
	Algorithms                []string             `json:"algorithms"`
	ClockSkew                 config.Duration      `json:"clock_skew"`
	KeyRefreshInterval        config.Duration      `json:"key_refresh_interval"`
	UnknownKeyRefetchInterval config.Duration      `json:"unknown_key_refetch_interval"`
	MaxKeyStaleness           config.Duration      `json:"max_key_staleness"`
}

// WithDefaults returns c with defaults for unset fields.
func (c Config) WithDefaults() Config {
	if c.Listen == "" {
		c.Listen = ":8080"
	}
	if c.AdminListen == "" {
		c.AdminListen = ":9090"
	}
	if c.ShutdownDrain == 0 {
		c.ShutdownDrain = config.Duration(15 * time.Second)
	}
	if c.DatabaseCheckInterval == 0 {
		c.DatabaseCheckInterval = config.Duration(5 * time.Second)
	}
	return c
}

// validate checks c after WithDefaults; every error names its key.
func (c Config) validate() error {
	var errs []error
	if c.DatabaseURL == "" {
		errs = append(errs, errors.New("database_url (or DATABASE_URL) is required"))
	}
	// Zero means the default, here or in the package the value is for.
	for _, d := range []struct {
		key string
		v   config.Duration
	}{
		{"policy_reload_interval", c.PolicyReloadInterval},
		{"organization_cache_ttl", c.OrganizationCacheTTL},
		{"token.clock_skew", c.Token.ClockSkew},
		{"token.key_refresh_interval", c.Token.KeyRefreshInterval},
		{"token.unknown_key_refetch_interval", c.Token.UnknownKeyRefetchInterval},
		{"token.max_key_staleness", c.Token.MaxKeyStaleness},
	} {
		if d.v < 0 {
			errs = append(errs, fmt.Errorf("%s %s: must not be negative", d.key, d.v.D()))
		}
	}
	if c.DatabaseCheckInterval <= 0 {
		errs = append(errs, fmt.Errorf("database_check_interval %s: must be positive", c.DatabaseCheckInterval.D()))
	}
	if c.ShutdownDrain <= 0 {
		errs = append(errs, fmt.Errorf("shutdown_drain %s: must be positive", c.ShutdownDrain.D()))
	}
	if len(c.Token.Issuers) == 0 {
		errs = append(errs, errors.New("token.issuers: at least one trusted issuer is required"))
	}
	for i, ic := range c.Token.Issuers {
		if err := validateIssuer(ic); err != nil {
			errs = append(errs, fmt.Errorf("token.issuers[%d]%w", i, err))
		}
	}
	return errors.Join(errs...)
}

// validateIssuer checks where an issuer's keys come from: over https, or
// plain http to a loopback host (tests, the devstack), or from a file.
// Keys fetched over plain http from anywhere else could be swapped in
// transit, and any token signed with them would verify. Its errors start
// with the key below token.issuers[i].
func validateIssuer(ic token.IssuerConfig) error {
	switch {
	case ic.JWKSFile != "":
		return nil // the issuer is just the iss claim's value
	case ic.JWKSURL != "":
		if err := secureURL(ic.JWKSURL); err != nil {
			return fmt.Errorf(".jwks_url %q: %w", ic.JWKSURL, err)
		}
		return nil
	}
	if err := secureURL(ic.Issuer); err != nil {
		return fmt.Errorf(".issuer %q: %w (its keys are found by OIDC discovery; or set jwks_url or jwks_file)", ic.Issuer, err)
	}
	if u, _ := url.Parse(ic.Issuer); u.RawQuery != "" || u.Fragment != "" {
		return fmt.Errorf(".issuer %q: an OIDC issuer has no query or fragment", ic.Issuer)
	}
	return nil
}

// secureURL accepts an absolute https URL, or an http one whose host is a
// loopback address or localhost.
func secureURL(raw string) error {
	u, err := url.Parse(raw)
	switch {
	case err != nil:
		return err
	case u.Host == "" || u.Hostname() == "" || (u.Scheme != "https" && u.Scheme != "http"):
		return errors.New("want an absolute https URL")
	case u.Scheme == "http" && !loopback(u.Hostname()):
		return errors.New("want https (plain http only for a loopback host)")
	}
	return nil
}

func loopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.IsLoopback()
}

// Server is a running decision service.
type Server struct {
	cfg      Config
	logger   *slog.Logger
	pool     *pgxpool.Pool
	database *server.Dependency
	engine   *opa.Engine
	health   *grpchealth.StaticChecker
	proc     *server.Process
	cancel   context.CancelFunc
	bgCtx    context.Context
	bg       sync.WaitGroup
	tracing  trace.TracerProvider
}

// New builds the service and opens its listeners; Run serves. Background
// work (key refresh, policy reload, database checks) stops when Run
// returns. New fails if the database answers but does not carry the schema
// this binary needs; a database that does not answer is an outage the
// service serves through, from cached organizations.
func New(ctx context.Context, cfg Config, logger *slog.Logger) (_ *Server, err error) {
	cfg = cfg.WithDefaults()
	if err := cfg.validate(); err != nil {
		telemetry.Shutdown(context.WithoutCancel(ctx), cfg.TracerProvider) // owned, and nothing traced
		return nil, fmt.Errorf("decision config: %w", err)
	}
	logger = telemetry.Logger(logger)
	s := &Server{cfg: cfg, logger: logger, tracing: cfg.TracerProvider}
	if s.tracing == nil {
		s.tracing = telemetry.NoExport()
	}
	s.bgCtx, s.cancel = context.WithCancel(context.WithoutCancel(ctx))
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	reg := server.NewRegistry()

	poolCfg, err := pgxpool.ParseConfig(cfg.DatabaseURL)
	if err != nil {
		return nil, fmt.Errorf("database url: %w", err)
	}
	if s.pool, err = pgxpool.NewWithConfig(ctx, poolCfg); err != nil {
		return nil, fmt.Errorf("open database pool: %w", err)
	}
	s.database = server.NewDependency(server.DependencyConfig{
		Name:       "database",
		Ping:       s.pool.Ping,
		Verify:     func(ctx context.Context) error { return migrations.Check(ctx, s.pool) },
		Fatal:      func(err error) bool { return errors.Is(err, migrations.ErrSchemaBehind) },
		Interval:   cfg.DatabaseCheckInterval.D(),
		Registerer: reg,
	}, logger)
	if err := s.database.Start(ctx); err != nil {
		return nil, err
	}
	verifier, err := token.New(s.bgCtx, token.Config{
		Issuers:                   cfg.Token.Issuers,
		Algorithms:                cfg.Token.Algorithms,
		ClockSkew:                 cfg.Token.ClockSkew.D(),
		KeyRefreshInterval:        cfg.Token.KeyRefreshInterval.D(),
		UnknownKeyRefetchInterval: cfg.Token.UnknownKeyRefetchInterval.D(),
		MaxKeyStaleness:           cfg.Token.MaxKeyStaleness.D(),
	}, logger)
	if err != nil {
		return nil, err
	}
	go func() {
		if err := verifier.Warm(s.bgCtx); err != nil {
			logger.Warn("issuer keys not fetched at start; will retry on demand", "error", err)
		}
	}()
	if s.engine, err = opa.New(ctx, opa.Config{
		Dir: cfg.PolicyDir, ReloadInterval: cfg.PolicyReloadInterval.D(), Registerer: reg,
	}, logger); err != nil {
		return nil, err
	}
	orgs := postgres.NewOrganizations(s.pool, postgres.OrganizationsConfig{
		CacheTTL: cfg.OrganizationCacheTTL.D(), Registerer: reg,
	})
	svc := authz.New(authz.Config{Registerer: reg}, verifier, orgs, s.engine, logger)

	// Only gateways can reach this port (NetworkPolicy decision), and they
	// start every trace themselves (see package gateway), so a caller's
	// trace context is trusted: Authorize is a child of the gateway's call.
	// Health checks and reflection are left untraced.
	tracing, err := otelconnect.NewInterceptor(otelconnect.WithTracerProvider(s.tracing),
		otelconnect.WithPropagator(telemetry.Propagator()), otelconnect.WithTrustRemote(), otelconnect.WithoutMetrics())
	if err != nil {
		return nil, fmt.Errorf("authorize tracing: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle(authzv1connect.NewAuthorizationServiceHandler(authz.NewHandler(svc, logger),
		connect.WithReadMaxBytes(1<<20), connect.WithInterceptors(tracing)))
	s.health = grpchealth.NewStaticChecker(authzv1connect.AuthorizationServiceName)
	mux.Handle(grpchealth.NewHandler(s.health))
	reflector := grpcreflect.NewStaticReflector(authzv1connect.AuthorizationServiceName, grpchealth.HealthV1ServiceName)
	mux.Handle(grpcreflect.NewHandlerV1(reflector))
	mux.Handle(grpcreflect.NewHandlerV1Alpha(reflector))
	// Readiness leaves the database out: an outage must not empty the
	// Service while cached organizations can still be answered.
	// s.database reports it instead.
	s.proc, err = server.NewProcess(cfg.Listen, cfg.AdminListen, cfg.ShutdownDrain.D(), mux, reg, logger)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// Addr is the Authorize API's listening address.
func (s *Server) Addr() string { return s.proc.Addr() }

// AdminAddr is the admin port's listening address.
func (s *Server) AdminAddr() string { return s.proc.AdminAddr() }

// Run serves until ctx is done, then drains in-flight calls, releases
// every resource and exports the last spans (within
// telemetry.ShutdownTimeout).
func (s *Server) Run(ctx context.Context) error {
	defer s.close()
	s.logger.Info("decision service listening", "addr", s.Addr(), "admin", s.AdminAddr(),
		"policy_revision", s.engine.Revision())
	go s.engine.Run(s.bgCtx)
	s.bg.Add(1)
	go func() { defer s.bg.Done(); s.database.Run(s.bgCtx) }()
	err := s.proc.Run(ctx, func() {
		s.health.SetStatus("", grpchealth.StatusNotServing)
		s.health.SetStatus(authzv1connect.AuthorizationServiceName, grpchealth.StatusNotServing)
	})
	s.logger.Info("decision service stopped")
	return err
}

func (s *Server) close() {
	s.cancel()
	s.bg.Wait() // the database checks use the pool
	if s.pool != nil {
		s.pool.Close()
	}
	if s.proc != nil {
		s.proc.Close()
	}
	// Last, as it was opened first: the drained calls' spans go out
	// within the grace period. Losing them is no failure of the service.
	if err := telemetry.Shutdown(context.Background(), s.tracing); err != nil {
		s.logger.Warn("spans not exported at shutdown", "error", err)
	}
}

// Run builds the service from cfg and serves until ctx is done.
func Run(ctx context.Context, cfg Config, logger *slog.Logger) error {
	s, err := New(ctx, cfg, logger)
	if err != nil {
		return err
	}
	return s.Run(ctx)
}
