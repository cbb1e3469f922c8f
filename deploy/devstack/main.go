// Command devstack runs the whole of Cloud Connector on this machine: the
// decision service, the ai and cicd gateways behind one public entry (as the
// ingress routes /ai and /cicd), a demo token issuer and a demo backend
// that streams. It uses DATABASE_URL if set, else the local PostgreSQL on
// 127.0.0.1:5432, else a throwaway cluster from the local installation;
// migrates it, seeds a demo organization, and prints a token and curl
// commands. Ctrl-C stops everything.
//
//	go run ./deploy/devstack [-addr 127.0.0.1:8080] [-log-level info]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.opentelemetry.io/otel/trace"

	"github.com/cloud-connector/cloud-connector/gateways/gateway"
	"github.com/cloud-connector/cloud-connector/gateways/internaltoken"
	"github.com/cloud-connector/cloud-connector/gateways/route"
	"github.com/cloud-connector/cloud-connector/gateways/routes"
	"github.com/cloud-connector/cloud-connector/migrations"
	"github.com/cloud-connector/cloud-connector/services/authz"
	"github.com/cloud-connector/cloud-connector/services/config"
	"github.com/cloud-connector/cloud-connector/services/decision"
	"github.com/cloud-connector/cloud-connector/services/pglocal"
	"github.com/cloud-connector/cloud-connector/services/postgres"
	"github.com/cloud-connector/cloud-connector/services/server"
	"github.com/cloud-connector/cloud-connector/services/telemetry"
	"github.com/cloud-connector/cloud-connector/services/token"
	"github.com/cloud-connector/cloud-connector/services/token/tokentest"
)

const (
	// Fixed ids, so policy overrides (policies/overrides) can name the demo
	// organization.
	demoOrganization = "4b0d3e00-0000-4000-8000-000000000001"
	demoInstance     = "8f0e2f6c-3c3a-4a55-9c1e-0d6b7d1a2b3c"
	devDatabase      = "cloud_connector_dev"
	aiAudience       = "gitlab-ai-gateway"
	cicdAudience     = "gitlab-cicd"
	duoAudience      = "gitlab-duo-workflow-service"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "devstack:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("devstack", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:8080", "public entry address (/ai and /cicd)")
	logLevel := fs.String("log-level", "warn", "debug, info, warn or error")
	policyDir := fs.String("policy-dir", "", "policy directory replacing the embedded policy (hot-reloaded)")
	backendToken := fs.Bool("backend-token", false, "also print BACKEND_TOKEN, an internal token (valid 1h) for calling the demo backend directly, as .ci/load does")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("log level: %w", err)
	}
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))

	dbURL, stopDB, err := database(ctx, getenv("DATABASE_URL"), stderr)
	if err != nil {
		return err
	}
	defer stopDB()
	if _, err := migrations.UpURL(ctx, dbURL); err != nil {
		return err
	}
	pool, err := pgxpool.New(ctx, dbURL)
	if err != nil {
		return fmt.Errorf("open database: %w", err)
	}
	defer pool.Close()
	orgID, err := postgres.Upsert(ctx, pool, postgres.Seed{
		ID: demoOrganization, Name: "Demo Organization", Plan: "premium",
		Instances: []postgres.SeedInstance{{ID: demoInstance, Realm: "self-managed"}},
		AddOns:    []authz.AddOn{{Name: "duo_pro", Seats: 25}},
	})
	if err != nil {
		return err
	}

	var c components
	defer c.stop()

	// The demo issuer plays the customers portal: discovery, JWKS, tokens.
	issuerLn, err := server.Listen("127.0.0.1:0")
	if err != nil {
		return err
	}
	issuer, err := tokentest.New("http://" + issuerLn.Addr().String())
	if err != nil {
		return err
	}
	c.serve(ctx, issuer.Handler(), issuerLn, logger)

	// The public entry listens first: the gateways name themselves by it.
	publicLn, err := server.Listen(*addr)
	if err != nil {
		return fmt.Errorf("%w (choose another with -addr 127.0.0.1:0)", err)
	}
	defer publicLn.Close() // on an early return; serving closes it otherwise
	entryURL := "http://" + publicLn.Addr().String()

	// Both gateways sign internal tokens with one key, as replicas share
	// one from a Secret in production; the demo backend checks them.
	keyDir, err := os.MkdirTemp("", "cloud-connector-devstack-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(keyDir)
	keyFile := filepath.Join(keyDir, "internal-token.pem")
	if err := internaltoken.WriteKeyFile(keyFile); err != nil {
		return err
	}
	keys, err := internaltoken.PublicKeys(keyFile)
	if err != nil {
		return err
	}

	backendLn, err := server.Listen("127.0.0.1:0")
	if err != nil {
		return err
	}
	c.serve(ctx, demoBackend(keys, []tokenFor{
		{entryURL + "/ai", aiAudience}, {entryURL + "/ai", duoAudience}, {entryURL + "/cicd", cicdAudience},
	}), backendLn, logger)
	backendURL := "http://" + backendLn.Addr().String()

	// Each component traces as its own service, exported as the OTEL_*
	// variables say (to a local Jaeger, say); each shuts its own down.
	telemetry.ReportErrors(logger)
	tracing := func(service string) (trace.TracerProvider, error) {
		t, err := telemetry.New(ctx, telemetry.Config{ServiceName: service, Getenv: getenv})
		if err != nil {
			return nil, err
		}
		return t.TracerProvider(), nil
	}
	decisionTracing, err := tracing("decision")
	if err != nil {
		return err
	}
	dec, err := decision.New(ctx, decision.Config{
		Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", DatabaseURL: dbURL, PolicyDir: *policyDir,
		Token: decision.TokenConfig{Issuers: []token.IssuerConfig{{
			Issuer: issuer.URL(), Audiences: []string{aiAudience, cicdAudience, duoAudience},
		}}},
		TracerProvider: decisionTracing,
	}, logger)
	if err != nil {
		return err
	}
	c.run(ctx, dec.Run)

	gateways := map[string]*gateway.Gateway{}
	for name, backends := range map[string]map[string]route.Backend{
		"ai": {
			"ai_gateway":   {URL: backendURL, Audience: aiAudience},
			"duo_workflow": {URL: backendURL, Audience: duoAudience, HTTP2: true},
		},
		"cicd": {"cicd_service": {URL: backendURL, Audience: cicdAudience}},
	} {
		table, err := routes.Default(name)
		if err != nil {
			return err
		}
		tp, err := tracing(name)
		if err != nil {
			return err
		}
		g, err := gateway.New(ctx, gateway.Config{
			Name: name, Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", Prefix: "/" + name,
			DecisionURL: "http://" + dec.Addr(), DatabaseURL: dbURL, Backends: backends, Routes: table,
			ShutdownDrain:  config.Duration(5 * time.Second),
			InternalToken:  &gateway.InternalTokenConfig{Issuer: entryURL + "/" + name, KeyFiles: []string{keyFile}},
			TracerProvider: tp,
		}, logger)
		if err != nil {
			return err
		}
		gateways[name] = g
		c.run(ctx, g.Run)
	}

	// The public entry routes by path prefix, as the ingress does; the
	// gateways strip their prefix themselves.
	entry := http.NewServeMux()
	for name, g := range gateways {
		target, _ := url.Parse("http://" + g.Addr())
		entry.Handle("/"+name+"/", &httputil.ReverseProxy{
			Rewrite: func(pr *httputil.ProxyRequest) {
				pr.SetURL(target)
				pr.Out.Host = pr.In.Host
				pr.SetXForwarded()
			},
			FlushInterval: -1,
		})
	}
	c.serve(ctx, entry, publicLn, logger)

	tok, err := issuer.Mint(tokentest.Claims{
		Subject:  demoInstance,
		Audience: []string{aiAudience},
		Realm:    "self-managed",
		Scopes:   []string{"complete_code", "generate_code", "duo_chat", "documentation_search"},
		TTL:      24 * time.Hour,
		Extra:    map[string]any{"gitlab_instance_id": demoInstance},
	})
	if err != nil {
		return err
	}
	if *backendToken {
		// What the AI gateway would hand the backend for the demo instance.
		s, err := internaltoken.New(internaltoken.Config{Issuer: entryURL + "/ai", KeyFiles: []string{keyFile}, TTL: time.Hour})
		if err != nil {
			return err
		}
		bt, err := s.Token(internaltoken.Claims{Audience: aiAudience, Subject: demoInstance, OrganizationID: orgID,
			Realm: "self-managed", Feature: "complete_code", Plan: "premium"})
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "export BACKEND_TOKEN=%s\n", bt)
	}
	printReady(stdout, readyInfo{
		Entry: entryURL, Token: tok, OrgID: orgID,
		Decision: dec.Addr(), DecisionAdmin: dec.AdminAddr(),
		AI: gateways["ai"].Addr(), CICD: gateways["cicd"].Addr(),
		AIAdmin: gateways["ai"].AdminAddr(), CICDAdmin: gateways["cicd"].AdminAddr(),
		Issuer: issuer.URL(), Database: redact(dbURL), Backend: backendURL,
	})

	select {
	case <-ctx.Done():
		fmt.Fprintln(stderr, "\nstopping...")
	case err := <-c.failed:
		return err
	}
	return c.stop()
}

// database returns a database URL: DATABASE_URL as given, else a
// cloud_connector_dev database on the local server, which is started from
// the local installation if none runs (and stopped by the returned func).
func database(ctx context.Context, given string, stderr io.Writer) (string, func(), error) {
	if given != "" {
		return given, func() {}, nil
	}
	srv, err := pglocal.Find(ctx, "")
	if err != nil {
		return "", nil, fmt.Errorf("no PostgreSQL: %w (or set DATABASE_URL)", err)
	}
	if srv.Started {
		fmt.Fprintln(stderr, "started a throwaway PostgreSQL cluster (deleted on exit)")
	}
	stop := func() {
		if err := srv.Stop(); err != nil {
			fmt.Fprintln(stderr, "stop PostgreSQL:", err)
		}
	}
	conn, err := pgx.Connect(ctx, srv.URL)
	if err != nil {
		stop()
		return "", nil, fmt.Errorf("connect to PostgreSQL: %w", err)
	}
	defer conn.Close(ctx)
	var exists bool
	if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)`, devDatabase).Scan(&exists); err != nil {
		stop()
		return "", nil, fmt.Errorf("look up %s: %w", devDatabase, err)
	}
	if !exists {
		if _, err := conn.Exec(ctx, "CREATE DATABASE "+devDatabase); err != nil {
			stop()
			return "", nil, fmt.Errorf("create %s: %w", devDatabase, err)
		}
	}
	u, err := pglocal.WithDatabase(srv.URL, devDatabase)
	if err != nil {
		stop()
		return "", nil, err
	}
	return u, stop, nil
}

// components runs servers until stopped, in reverse order of starting.
type components struct {
	mu     sync.Mutex
	stops  []func() error
	failed chan error
	once   sync.Once
}

func (c *components) run(ctx context.Context, fn func(context.Context) error) {
	c.once.Do(func() { c.failed = make(chan error, 16) })
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		err := fn(ctx)
		if err != nil && ctx.Err() == nil {
			c.failed <- err
		}
		done <- err
	}()
	c.mu.Lock()
	c.stops = append(c.stops, func() error { cancel(); return <-done })
	c.mu.Unlock()
}

// serve runs an HTTP server for h on ln as one of the components.
func (c *components) serve(ctx context.Context, h http.Handler, ln net.Listener, logger *slog.Logger) {
	srv := server.New(h, false, logger)
	c.run(ctx, func(ctx context.Context) error { return server.Serve(ctx, srv, ln, 5*time.Second) })
}

func (c *components) stop() error {
	c.mu.Lock()
	stops := c.stops
	c.stops = nil
	c.mu.Unlock()
	var errs []error
	for i := len(stops) - 1; i >= 0; i-- {
		if err := stops[i](); err != nil && !errors.Is(err, context.Canceled) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func redact(u string) string {
	parsed, err := url.Parse(u)
	if err != nil {
		return "(unparsable)"
	}
	return parsed.Redacted()
}

type readyInfo struct {
	Entry, Token, OrgID                         string
	Decision, DecisionAdmin, AIAdmin, CICDAdmin string
	AI, CICD                                    string
	Issuer, Database, Backend                   string
}

func printReady(w io.Writer, r readyInfo) {
	headers := strings.Join([]string{
		`-H "Authorization: Bearer $TOKEN"`,
		`-H "X-Gitlab-Authentication-Type: oidc"`,
		`-H "X-Gitlab-Instance-Id: ` + demoInstance + `"`,
		`-H "X-Gitlab-Realm: self-managed"`,
		`-H "X-Gitlab-Version: 17.6.0"`,
		`-H "Content-Type: application/json"`,
	}, " \\\n     ")
	fmt.Fprintf(w, `Cloud Connector is running. Ctrl-C stops everything.

  public entry    %s   (/ai -> ai gateway, /cicd -> cicd gateway)
  decision        h2c://%s   (Connect, gRPC, gRPC-Web; admin http://%s/metrics)
  gateways        ai http://%s (admin http://%s/readyz)   cicd http://%s (admin http://%s/readyz)
  token issuer    %s/.well-known/openid-configuration
  demo backend    %s   (what the gateways proxy to)
  database        %s   (demo organization %s, plan premium, add-on duo_pro)

export TOKEN=%s

# Code completion (JSON):
curl -sS %s/ai/v2/code/completions \
     %s \
     -d '{"prompt_version":1,"current_file":{"file_name":"test.py","content_above_cursor":"def is_even(n: int) ->","content_below_cursor":""}}'

# Code completion streamed (server-sent events, arriving chunk by chunk):
curl -sSN %s/ai/v2/code/completions \
     %s \
     -d '{"stream":true,"current_file":{"file_name":"test.py","content_above_cursor":"def is_even(n: int) ->","content_below_cursor":""}}'

# Refused (401): this token is for the AI gateway, not the CI/CD gateway:
curl -sS -X POST %s/cicd/v1/runners/jobs %s

`, r.Entry, r.Decision, r.DecisionAdmin, r.AI, r.AIAdmin, r.CICD, r.CICDAdmin, r.Issuer, r.Backend, r.Database, r.OrgID, r.Token,
		r.Entry, headers, r.Entry, headers, r.Entry, strings.ReplaceAll(headers, " \\\n     ", " "))
}
