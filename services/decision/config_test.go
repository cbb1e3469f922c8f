package decision_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cloud-connector/cloud-connector/migrations/pgtest"
	"github.com/cloud-connector/cloud-connector/services/config"
	"github.com/cloud-connector/cloud-connector/services/decision"
	"github.com/cloud-connector/cloud-connector/services/token"
)

// TestConfigValidation checks that New rejects values that would misbehave
// only later (keys fetched over plain HTTP, a timer that fires at once) with
// an error naming the key, and accepts the valid forms next to them.
func TestConfigValidation(t *testing.T) {
	t.Parallel()
	dbURL := pgtest.URL(t)
	jwksFile := filepath.Join(t.TempDir(), "jwks.json")
	if err := os.WriteFile(jwksFile, []byte(`{"keys":[]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	good := func() decision.Config {
		return decision.Config{
			Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", DatabaseURL: dbURL,
			Token: decision.TokenConfig{Issuers: []token.IssuerConfig{
				{Issuer: "https://customers.example.com", Audiences: []string{aiGateway}},
			}},
		}
	}
	negative := config.Duration(-time.Second)
	issuer := func(ic token.IssuerConfig) func(*decision.Config) {
		return func(c *decision.Config) {
			ic.Audiences = []string{aiGateway}
			c.Token.Issuers = append(c.Token.Issuers, ic)
		}
	}

	for _, tc := range []struct {
		name    string
		edit    func(*decision.Config)
		wantErr string
	}{
		{"negative policy reload interval", func(c *decision.Config) { c.PolicyReloadInterval = negative }, "policy_reload_interval"},
		{"negative organization cache ttl", func(c *decision.Config) { c.OrganizationCacheTTL = negative }, "organization_cache_ttl"},
		{"negative shutdown drain", func(c *decision.Config) { c.ShutdownDrain = negative }, "shutdown_drain"},
		{"negative database check interval", func(c *decision.Config) { c.DatabaseCheckInterval = negative }, "database_check_interval"},
		{"negative clock skew", func(c *decision.Config) { c.Token.ClockSkew = negative }, "token.clock_skew"},
		{"negative key refresh interval", func(c *decision.Config) { c.Token.KeyRefreshInterval = negative }, "token.key_refresh_interval"},
		{"negative unknown key refetch interval", func(c *decision.Config) { c.Token.UnknownKeyRefetchInterval = negative },
			"token.unknown_key_refetch_interval"},
		{"negative max key staleness", func(c *decision.Config) { c.Token.MaxKeyStaleness = negative }, "token.max_key_staleness"},
		{"plain http issuer", issuer(token.IssuerConfig{Issuer: "http://gitlab.example.com"}), "token.issuers[1]"},
		{"issuer without scheme", issuer(token.IssuerConfig{Issuer: "gitlab.example.com"}), "token.issuers[1]"},
		{"issuer without host", issuer(token.IssuerConfig{Issuer: "https:///x"}), "token.issuers[1]"},
		{"issuer with a query", issuer(token.IssuerConfig{Issuer: "https://gitlab.example.com?x=1"}), "token.issuers[1]"},
		{"plain http jwks url", issuer(token.IssuerConfig{Issuer: "gitlab", JWKSURL: "http://gitlab.example.com/jwks"}),
			"token.issuers[1].jwks_url"},
		{"relative jwks url", issuer(token.IssuerConfig{Issuer: "gitlab", JWKSURL: "/jwks"}), "token.issuers[1].jwks_url"},

		{"loopback http issuer", issuer(token.IssuerConfig{Issuer: "http://127.0.0.1:9"}), ""},
		{"localhost http issuer", issuer(token.IssuerConfig{Issuer: "http://localhost:9"}), ""},
		{"ipv6 loopback http issuer", issuer(token.IssuerConfig{Issuer: "http://[::1]:9"}), ""},
		{"issuer with a path", issuer(token.IssuerConfig{Issuer: "https://gitlab.example.com/oauth"}), ""},
		{"any issuer name with a jwks url", issuer(token.IssuerConfig{Issuer: "gitlab", JWKSURL: "https://gitlab.example.com/jwks"}), ""},
		{"any issuer name with a jwks file", issuer(token.IssuerConfig{Issuer: "http://gitlab.example.com", JWKSFile: jwksFile}), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg := good()
			tc.edit(&cfg)
			s, err := decision.New(context.Background(), cfg, discard)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("New: %v", err)
				}
				ctx, cancel := context.WithCancel(context.Background())
				cancel()
				if err := s.Run(ctx); err != nil {
					t.Errorf("Run: %v", err)
				}
				return
			}
			if err == nil {
				ctx, cancel := context.WithCancel(context.Background())
				cancel()
				s.Run(ctx)
				t.Fatalf("New accepted the config; want an error naming %s", tc.wantErr)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("New error = %v; want one naming %s", err, tc.wantErr)
			}
		})
	}
}
