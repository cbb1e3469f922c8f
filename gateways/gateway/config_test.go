package gateway_test

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cloud-connector/cloud-connector/gateways/gateway"
	"github.com/cloud-connector/cloud-connector/gateways/route"
	"github.com/cloud-connector/cloud-connector/migrations/pgtest"
	"github.com/cloud-connector/cloud-connector/services/config"
)

// TestConfigValidation checks that New rejects values that would misbehave
// only later (a panic after "listening", a timeout that fires at once, a
// host that never matches) with an error naming the key, and accepts the
// valid forms next to them.
func TestConfigValidation(t *testing.T) {
	t.Parallel()
	dbURL := pgtest.URL(t)
	routesFile := filepath.Join(t.TempDir(), "routes.yaml")
	writeFile(t, routesFile, "routes:\n  - {name: r, path: /r, feature: f, backend: main}\n")
	good := func() gateway.Config {
		return gateway.Config{
			Name: "ai", Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", DatabaseURL: dbURL, DecisionURL: "http://127.0.0.1:1",
			Backends: map[string]route.Backend{"main": {URL: "http://127.0.0.1:1", Audience: "a"}},
			Routes:   route.Table{Routes: []route.Route{{Name: "r", Path: "/r", Feature: "f", Backend: "main"}}},
		}
	}
	negative := config.Duration(-time.Second)

	for _, tc := range []struct {
		name    string
		edit    func(*gateway.Config)
		wantErr string
	}{
		{"negative decision timeout", func(c *gateway.Config) { c.DecisionTimeout = negative }, "decision_timeout"},
		{"negative shutdown drain", func(c *gateway.Config) { c.ShutdownDrain = negative }, "shutdown_drain"},
		{"negative routes reload interval", func(c *gateway.Config) {
			c.RoutesFile, c.Routes, c.RoutesReloadInterval = routesFile, route.Table{}, negative
		}, "routes_reload_interval"},
		{"negative database check interval", func(c *gateway.Config) { c.DatabaseCheckInterval = negative }, "database_check_interval"},
		{"negative decision cache size", func(c *gateway.Config) { c.DecisionCacheSize = -1 }, "decision_cache_size"},
		{"negative spool bound", func(c *gateway.Config) { c.UsageSpoolMaxBytes = -1 }, "usage_spool_max_bytes"},
		{"negative backend header timeout", func(c *gateway.Config) {
			c.Backends["main"] = route.Backend{URL: "http://127.0.0.1:1", Audience: "a", ResponseHeaderTimeout: negative}
		}, "backends.main.response_header_timeout"},
		{"decision url without scheme", func(c *gateway.Config) { c.DecisionURL = "decision:8080" }, "decision_url"},
		{"decision url relative", func(c *gateway.Config) { c.DecisionURL = "/authorize" }, "decision_url"},
		{"decision url without host", func(c *gateway.Config) { c.DecisionURL = "http:///x" }, "decision_url"},
		{"decision url not http", func(c *gateway.Config) { c.DecisionURL = "grpc://decision:8080" }, "decision_url"},
		{"host is a URL", func(c *gateway.Config) { c.Hosts = []string{"https://ai.cloud.example.com"} }, "hosts"},
		{"host with a path", func(c *gateway.Config) { c.Hosts = []string{"ai.cloud.example.com/ai"} }, "hosts"},
		{"empty host", func(c *gateway.Config) { c.Hosts = []string{""} }, "hosts"},
		{"wildcard host", func(c *gateway.Config) { c.Hosts = []string{"*.cloud.example.com"} }, "hosts"},
		{"host with a bad port", func(c *gateway.Config) { c.Hosts = []string{"ai.cloud.example.com:http"} }, "hosts"},
		{"host with user info", func(c *gateway.Config) { c.Hosts = []string{"user@ai.cloud.example.com"} }, "hosts"},

		{"internal token without issuer", func(c *gateway.Config) {
			c.InternalToken = &gateway.InternalTokenConfig{KeyFiles: []string{"k.pem"}}
		}, "internal_token.issuer"},
		{"internal token without keys", func(c *gateway.Config) {
			c.InternalToken = &gateway.InternalTokenConfig{Issuer: "https://cloud.example/ai"}
		}, "internal_token.key_files"},
		{"internal token ttl", func(c *gateway.Config) {
			c.InternalToken = &gateway.InternalTokenConfig{Issuer: "https://cloud.example/ai", KeyFiles: []string{"k.pem"}, TTL: config.Duration(2 * time.Hour)}
		}, "internal_token.ttl"},
		{"internal token key missing", func(c *gateway.Config) {
			c.InternalToken = &gateway.InternalTokenConfig{Issuer: "https://cloud.example/ai", KeyFiles: []string{filepath.Join(t.TempDir(), "none.pem")}}
		}, "none.pem"},

		{"https decision url", func(c *gateway.Config) { c.DecisionURL = "https://decision.example.com" }, ""},
		{"host and port", func(c *gateway.Config) { c.Hosts = []string{"ai.cloud.example.com:8443", "AI.example.com"} }, ""},
		{"zero durations take defaults", func(c *gateway.Config) {
			c.RoutesFile, c.Routes = routesFile, route.Table{}
			c.RoutesReloadInterval, c.DecisionTimeout, c.ShutdownDrain, c.DatabaseCheckInterval = 0, 0, 0, 0
		}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg := good()
			tc.edit(&cfg)
			g, err := gateway.New(context.Background(), cfg, slog.New(slog.DiscardHandler))
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("New: %v", err)
				}
				ctx, cancel := context.WithCancel(context.Background())
				cancel()
				if err := g.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
					t.Errorf("Run: %v", err)
				}
				return
			}
			if err == nil {
				// Not Run: a bad reload interval would panic the test binary.
				t.Fatalf("New accepted the config; want an error naming %s", tc.wantErr)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("New error = %v; want one naming %s", err, tc.wantErr)
			}
		})
	}
}

// TestHostWithPortMounts checks that a hosts entry with a port serves its
// host: requests are matched by host name, whatever port they name.
func TestHostWithPortMounts(t *testing.T) {
	t.Parallel()
	e := setup(t, options{configure: func(c *gateway.Config) {
		c.Prefix, c.Hosts = "", []string{"ai.cloud.example.test:8443"}
	}})
	for _, host := range []string{"ai.cloud.example.test", "ai.cloud.example.test:8443"} {
		req := e.newRequest(t, "POST", "", "allow", strings.NewReader("{}"))
		req.URL.Path, req.Host = "/v2/code/completions", host
		if r := e.do(t, req); r.status != 200 {
			t.Errorf("Host %s: status %d; want 200", host, r.status)
		}
	}
}
