// Package deploy_test checks the deployment assets in deploy/ against the
// code they configure: the example configs load into the real config types,
// the Kubernetes manifests reference what exists and agree with the configs,
// and the Dockerfile's build step compiles. There is no container engine or
// cluster in CI, so everything is checked by parsing.
package deploy_test

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cloud-connector/cloud-connector/gateways/gateway"
	"github.com/cloud-connector/cloud-connector/gateways/internaltoken"
	"github.com/cloud-connector/cloud-connector/gateways/routes"
	"github.com/cloud-connector/cloud-connector/services/config"
	"github.com/cloud-connector/cloud-connector/services/decision"
	"github.com/cloud-connector/cloud-connector/services/server"
	"github.com/cloud-connector/cloud-connector/services/telemetry"
	"github.com/cloud-connector/cloud-connector/services/token"
)

var update = flag.Bool("update", false, "rewrite k8s/configmaps.yaml from config/*.yaml")

const (
	moduleRoot = ".."
	configDir  = "config"
	k8sDir     = "k8s"
	// decisionConfigFile is the decision service's config; every other file
	// in config/ belongs to the gateway binary of the same name.
	decisionConfigFile = "decision.yaml"
	// gatewayCloseBound is how long gateway.Run may spend after the drain
	// returning budget leases and flushing usage (its close timeout).
	gatewayCloseBound = gateway.CloseTimeout
	// adminDrain is how long a process may keep its admin port open after
	// the public drain, for requests in flight there (a metrics scrape).
	adminDrain = server.AdminDrain
	// decisionSpanExport is how long the decision service may spend
	// exporting its last spans once it has drained (gateways do so within
	// gatewayCloseBound).
	decisionSpanExport = telemetry.ShutdownTimeout
	// graceMargin is the least slack the grace period must leave over the
	// worst-case shutdown: process exit, log flush, a kubelet that is slow
	// to send SIGTERM after preStop.
	graceMargin = 5 * time.Second
)

// configs is every example config, loaded strictly into the real types.
type configs struct {
	decision decision.Config
	// gateways by binary name ("ai", "cicd"); the config file is
	// <name>.yaml.
	gateways map[string]gateway.Config
	// raw file contents by file name.
	raw map[string]string
}

func loadConfigs(t testing.TB) configs {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(configDir, "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	c := configs{gateways: map[string]gateway.Config{}, raw: map[string]string{}}
	for _, path := range files {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		base := filepath.Base(path)
		c.raw[base] = string(b)
		if base == decisionConfigFile {
			if err := config.Load(path, &c.decision); err != nil {
				t.Fatal(err)
			}
			continue
		}
		var g gateway.Config
		if err := config.Load(path, &g); err != nil {
			t.Fatal(err)
		}
		c.gateways[strings.TrimSuffix(base, ".yaml")] = g
	}
	if _, ok := c.raw[decisionConfigFile]; !ok {
		t.Fatalf("%s/%s is missing", configDir, decisionConfigFile)
	}
	if len(c.gateways) == 0 {
		t.Fatalf("no gateway configs in %s", configDir)
	}
	return c
}

func TestDecisionConfig(t *testing.T) {
	t.Parallel()
	c := loadConfigs(t).decision
	if c.DatabaseURL != "" {
		t.Error("database_url is set in the file; it must come from DATABASE_URL (the Secret)")
	}
	if c.PolicyDir != "" {
		t.Errorf("policy_dir %q: the example uses the embedded policies; a directory must be mounted first", c.PolicyDir)
	}
	if c.ShutdownDrain.D() <= 0 {
		t.Error("shutdown_drain must be set: the Deployment's grace period is derived from it")
	}
	for _, addr := range []string{c.Listen, c.AdminListen} {
		if _, err := portOf(addr); err != nil {
			t.Error(err)
		}
	}
	// token.New validates issuers, algorithms and durations without
	// touching the network.
	_, err := token.New(t.Context(), token.Config{
		Issuers:                   c.Token.Issuers,
		Algorithms:                c.Token.Algorithms,
		ClockSkew:                 c.Token.ClockSkew.D(),
		KeyRefreshInterval:        c.Token.KeyRefreshInterval.D(),
		UnknownKeyRefetchInterval: c.Token.UnknownKeyRefetchInterval.D(),
		MaxKeyStaleness:           c.Token.MaxKeyStaleness.D(),
	}, discardLogger())
	if err != nil {
		t.Error(err)
	}
	for _, ic := range c.Token.Issuers {
		if ic.JWKSURL == "" && ic.JWKSFile == "" && !strings.HasPrefix(ic.Issuer, "https://") {
			t.Errorf("issuer %s: OIDC discovery needs an https issuer", ic.Issuer)
		}
	}
}

func TestGatewayConfigs(t *testing.T) {
	t.Parallel()
	cs := loadConfigs(t)
	for name, cfg := range cs.gateways {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			if cfg.Name != name {
				t.Errorf("name %q: want %q, the binary that reads %s.yaml", cfg.Name, name, name)
			}
			if cfg.DecisionURL == "" {
				t.Error("decision_url is required")
			}
			if len(cfg.Backends) == 0 {
				t.Error("backends: at least one is required")
			}
			if cfg.DatabaseURL != "" {
				t.Error("database_url is set in the file; it must come from DATABASE_URL (the Secret)")
			}
			if cfg.ShutdownDrain.D() <= 0 {
				t.Error("shutdown_drain must be set: the Deployment's grace period is derived from it")
			}
			if cfg.UsageSpoolDir == "" {
				t.Error("usage_spool_dir: without a spool, usage is lost during a database outage")
			}
			if cfg.InternalToken == nil {
				t.Error("internal_token: without it backends can only trust plain headers")
			} else if !strings.HasPrefix(cfg.InternalToken.Issuer, "https://") {
				t.Errorf("internal_token.issuer %q: want the gateway's public https address", cfg.InternalToken.Issuer)
			}
			tbl, err := routes.Default(name)
			if err != nil {
				t.Fatal(err)
			}
			if err := tbl.Validate(cfg.Backends); err != nil {
				t.Error(err)
			}
			// Every backend's audience must be one the decision service
			// accepts from some issuer, or every request would be denied.
			for bname, b := range cfg.Backends {
				if !slices.ContainsFunc(cs.decision.Token.Issuers, func(ic token.IssuerConfig) bool {
					return slices.Contains(ic.Audiences, b.Audience)
				}) {
					t.Errorf("backend %s: audience %q is trusted by no issuer in %s", bname, b.Audience, decisionConfigFile)
				}
			}
			checkGatewayStarts(t, cfg)
		})
	}
}

// checkGatewayStarts builds the gateway exactly as the binary does (its
// unexported validation included: prefix, trusted_proxies, backend URLs),
// with local ports, a database that is never dialed and a temporary spool,
// then shuts it down.
func checkGatewayStarts(t *testing.T, cfg gateway.Config) {
	t.Helper()
	tbl, err := routes.Default(cfg.Name)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Routes = tbl
	cfg.Listen, cfg.AdminListen = "127.0.0.1:0", "127.0.0.1:0"
	cfg.DatabaseURL = "postgres://deploy-test@127.0.0.1:1/deploy_test?connect_timeout=1"
	cfg.UsageSpoolDir = t.TempDir()
	cfg.ShutdownDrain = config.Duration(time.Second)
	if it := cfg.InternalToken; it != nil {
		// The Secret's files, as generated keys in the same number.
		c := *it
		c.KeyFiles = nil
		for i := range it.KeyFiles {
			f := filepath.Join(t.TempDir(), fmt.Sprintf("key%d.pem", i))
			if err := internaltoken.WriteKeyFile(f); err != nil {
				t.Fatal(err)
			}
			c.KeyFiles = append(c.KeyFiles, f)
		}
		cfg.InternalToken = &c
	}
	g, err := gateway.New(t.Context(), cfg, discardLogger())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := g.Run(ctx); err != nil {
		t.Errorf("shutdown: %v", err)
	}
}

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// portOf returns the port of a listen address (":8080").
func portOf(addr string) (string, error) {
	_, port, err := net.SplitHostPort(addr)
	return port, err
}

// hostPort returns the host and port of an http URL, the port defaulting
// to 80.
func hostPort(t testing.TB, raw string) (string, string) {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	port := u.Port()
	if port == "" {
		port = "80"
	}
	return u.Hostname(), port
}
