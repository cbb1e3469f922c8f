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
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/grpchealth"
	"connectrpc.com/grpcreflect"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cloud-connector/cloud-connector/migrations"
	"github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1/authzv1connect"
	"github.com/cloud-connector/cloud-connector/services/authz"
	"github.com/cloud-connector/cloud-connector/services/config"
	"github.com/cloud-connector/cloud-connector/services/opa"
	"github.com/cloud-connector/cloud-connector/services/postgres"
	"github.com/cloud-connector/cloud-connector/services/server"
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
	// OrganizationCacheTTL is how long organization lookups are reused.
	// Default 30s.
	OrganizationCacheTTL config.Duration `json:"organization_cache_ttl"`
	// ShutdownDrain bounds graceful shutdown. Default 15s.
	ShutdownDrain config.Duration `json:"shutdown_drain"`
	Token         TokenConfig     `json:"token"`
}

// TokenConfig configures token verification; see token.Config.
type TokenConfig struct {
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
	return c
}

func (c Config) validate() error {
	if c.DatabaseURL == "" {
		return errors.New("database_url (or DATABASE_URL) is required")
	}
	if len(c.Token.Issuers) == 0 {
		return errors.New("token.issuers: at least one trusted issuer is required")
	}
	return nil
}

// Server is a running decision service.
type Server struct {
	cfg    Config
	logger *slog.Logger
	pool   *pgxpool.Pool
	engine *opa.Engine
	health *grpchealth.StaticChecker
	proc   *server.Process
	cancel context.CancelFunc
	bgCtx  context.Context
}

// New builds the service and opens its listeners; Run serves. Background
// work (key refresh, policy reload) stops when Run returns.
func New(ctx context.Context, cfg Config, logger *slog.Logger) (_ *Server, err error) {
	cfg = cfg.WithDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("decision config: %w", err)
	}
	s := &Server{cfg: cfg, logger: logger}
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

	mux := http.NewServeMux()
	mux.Handle(authzv1connect.NewAuthorizationServiceHandler(authz.NewHandler(svc, logger),
		connect.WithReadMaxBytes(1<<20)))
	s.health = grpchealth.NewStaticChecker(authzv1connect.AuthorizationServiceName)
	mux.Handle(grpchealth.NewHandler(s.health))
	reflector := grpcreflect.NewStaticReflector(authzv1connect.AuthorizationServiceName, grpchealth.HealthV1ServiceName)
	mux.Handle(grpcreflect.NewHandlerV1(reflector))
	mux.Handle(grpcreflect.NewHandlerV1Alpha(reflector))
	s.proc, err = server.NewProcess(cfg.Listen, cfg.AdminListen, cfg.ShutdownDrain.D(), mux, reg, logger,
		server.Check{Name: "database", Fn: s.pool.Ping},
		server.Check{Name: "schema", Fn: func(ctx context.Context) error { return migrations.Check(ctx, s.pool) }},
	)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// Addr is the Authorize API's listening address.
func (s *Server) Addr() string { return s.proc.Addr() }

// AdminAddr is the admin port's listening address.
func (s *Server) AdminAddr() string { return s.proc.AdminAddr() }

// Run serves until ctx is done, then drains in-flight calls and releases
// every resource.
func (s *Server) Run(ctx context.Context) error {
	defer s.close()
	s.logger.Info("decision service listening", "addr", s.Addr(), "admin", s.AdminAddr(),
		"policy_revision", s.engine.Revision())
	go s.engine.Run(s.bgCtx)
	err := s.proc.Run(ctx, func() {
		s.health.SetStatus("", grpchealth.StatusNotServing)
		s.health.SetStatus(authzv1connect.AuthorizationServiceName, grpchealth.StatusNotServing)
	})
	s.logger.Info("decision service stopped")
	return err
}

func (s *Server) close() {
	s.cancel()
	if s.pool != nil {
		s.pool.Close()
	}
	if s.proc != nil {
		s.proc.Close()
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
