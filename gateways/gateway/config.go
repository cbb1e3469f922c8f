package gateway

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"strings"
	"time"

	"github.com/cloud-connector/cloud-connector/gateways/route"
	"github.com/cloud-connector/cloud-connector/services/config"
)

// Config configures a gateway. It is read from YAML; see deploy/.
type Config struct {
	// Name identifies the gateway in usage events and metrics: "ai", "cicd".
	Name string `json:"name"`
	// Listen is the public address. Default ":8080".
	Listen string `json:"listen"`
	// AdminListen serves /healthz, /readyz and /metrics. Default ":9090".
	AdminListen string `json:"admin_listen"`
	// Prefix mounts the routes under a path prefix on a shared public host
	// ("/ai": /ai/v2/code/completions reaches /v2/code/completions). The
	// prefix is stripped before proxying.
	Prefix string `json:"prefix"`
	// Hosts serve the routes at the root for these Host names
	// ("ai.cloud.example.com"). With neither Prefix nor Hosts, every
	// request is served at the root.
	Hosts []string `json:"hosts"`
	// DecisionURL is the decision service, e.g. "http://decision:8080".
	DecisionURL string `json:"decision_url"`
	// DatabaseURL is the PostgreSQL URL (DATABASE_URL overrides it).
	DatabaseURL string `json:"database_url"`
	// Backends by name, referenced by routes.
	Backends map[string]route.Backend `json:"backends"`
	// RoutesFile replaces the built-in route table and is reloaded when it
	// changes.
	RoutesFile string `json:"routes_file"`
	// RoutesReloadInterval is how often RoutesFile is checked. Default 5s.
	RoutesReloadInterval config.Duration `json:"routes_reload_interval"`
	// TrustedProxies are CIDRs of load balancers whose X-Forwarded-*
	// headers are kept; from anyone else they are replaced.
	TrustedProxies []string `json:"trusted_proxies"`
	// DecisionTimeout bounds one Authorize call. Default 2s.
	DecisionTimeout config.Duration `json:"decision_timeout"`
	// DecisionCacheSize bounds cached decisions. Default 100000.
	DecisionCacheSize int `json:"decision_cache_size"`
	// UsageSpoolDir keeps usage events the database cannot take (outage)
	// until they can be written. Empty: no spool.
	UsageSpoolDir string `json:"usage_spool_dir"`
	// ShutdownDrain bounds how long in-flight requests and streams may
	// finish at shutdown. Default 30s.
	ShutdownDrain config.Duration `json:"shutdown_drain"`

	// Routes is the built-in route table, used when RoutesFile is empty.
	Routes route.Table `json:"-"`
}

var nameRE = regexp.MustCompile(`^[a-z][a-z0-9_-]{0,31}$`)

// WithDefaults returns c with defaults for unset fields.
func (c Config) WithDefaults() Config {
	if c.Listen == "" {
		c.Listen = ":8080"
	}
	if c.AdminListen == "" {
		c.AdminListen = ":9090"
	}
	if c.RoutesReloadInterval == 0 {
		c.RoutesReloadInterval = config.Duration(5 * time.Second)
	}
	if c.ShutdownDrain == 0 {
		c.ShutdownDrain = config.Duration(30 * time.Second)
	}
	c.Prefix = strings.TrimSuffix(c.Prefix, "/")
	return c
}

func (c Config) validate() ([]netip.Prefix, error) {
	var errs []error
	if !nameRE.MatchString(c.Name) {
		errs = append(errs, fmt.Errorf("name %q: want a short lowercase name like ai", c.Name))
	}
	if c.DecisionURL == "" {
		errs = append(errs, errors.New("decision_url is required"))
	}
	if c.DatabaseURL == "" {
		errs = append(errs, errors.New("database_url (or DATABASE_URL) is required"))
	}
	if c.Prefix != "" {
		if _, err := route.CleanPath(c.Prefix); err != nil || c.Prefix == "/" {
			errs = append(errs, fmt.Errorf("prefix %q: want a path like /ai", c.Prefix))
		}
	}
	if len(c.Backends) == 0 {
		errs = append(errs, errors.New("backends: at least one is required"))
	}
	var trusted []netip.Prefix
	for _, s := range c.TrustedProxies {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("trusted_proxies: %w", err))
			continue
		}
		trusted = append(trusted, p)
	}
	return trusted, errors.Join(errs...)
}
