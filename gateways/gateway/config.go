package gateway

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.opentelemetry.io/otel/trace"

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
	// ("ai.cloud.example.com"): bare host names, optionally with a port,
	// which is ignored (a request is matched by host name alone). With
	// neither Prefix nor Hosts, every request is served at the root.
	Hosts []string `json:"hosts"`
	// DecisionURL is the decision service, an absolute http(s) URL, e.g.
	// "http://decision:8080".
	DecisionURL string `json:"decision_url"`
	// DatabaseURL is the PostgreSQL URL (DATABASE_URL overrides it).
	DatabaseURL string `json:"database_url"`
	// Backends by name, referenced by routes.
	Backends map[string]route.Backend `json:"backends"`
	// RoutesFile replaces the built-in route table and is reloaded when it
	// changes.
	RoutesFile string `json:"routes_file"`
	// RoutesReloadInterval is how often RoutesFile is checked. Default 5s;
	// must be positive.
	RoutesReloadInterval config.Duration `json:"routes_reload_interval"`
	// TrustedProxies are CIDRs of load balancers whose X-Forwarded-*
	// headers are kept; from anyone else they are replaced.
	TrustedProxies []string `json:"trusted_proxies"`
	// DecisionTimeout bounds one Authorize call. Default 2s.
	DecisionTimeout config.Duration `json:"decision_timeout"`
	// DecisionCacheSize bounds cached decisions. Default 100000.
	DecisionCacheSize int `json:"decision_cache_size"`
	// DatabaseCheckInterval is how often the database is checked for the
	// cloudconnector_database_up gauge and its log lines. Default 5s.
	// Readiness never depends on the database.
	DatabaseCheckInterval config.Duration `json:"database_check_interval"`
	// UsageSpoolDir keeps usage events the database cannot take (outage)
	// until they can be written. Empty: no spool.
	UsageSpoolDir string `json:"usage_spool_dir"`
	// UsageSpoolMaxBytes is the spool size at which spilling stops (events
	// then wait in memory, and are dropped and counted once it is full).
	// Keep it well below the spool volume's size: a pod that outgrows an
	// emptyDir is evicted and its spool lost. Default 512 MiB.
	UsageSpoolMaxBytes int64 `json:"usage_spool_max_bytes"`
	// ShutdownDrain bounds how long in-flight requests and streams may
	// finish at shutdown. Default 30s.
	ShutdownDrain config.Duration `json:"shutdown_drain"`
	// InternalToken signs the token each authorized request carries to its
	// backend (X-Cloud-Connector-Token), so backends need not trust plain
	// headers. Unset: backends get the headers only, and the gateway warns
	// at start.
	InternalToken *InternalTokenConfig `json:"internal_token"`

	// Routes is the built-in route table, used when RoutesFile is empty.
	Routes route.Table `json:"-"`
	// TracerProvider creates the gateway's spans: one per request, which
	// starts a new trace (see startSpan), and children for its Authorize
	// call and its backend request, whose context reaches the decision
	// service and the backend as a W3C traceparent. Nil:
	// telemetry.NoExport(). The gateway owns it: Run shuts it down last,
	// within CloseTimeout (a failed New, at once), so give each gateway
	// its own.
	TracerProvider trace.TracerProvider `json:"-"`
}

// InternalTokenConfig configures the internal tokens a gateway signs; see
// package internaltoken.
type InternalTokenConfig struct {
	// Issuer is the tokens' iss claim, e.g. "https://cloud.gitlab.com/ai".
	Issuer string `json:"issuer"`
	// KeyFiles are PEM private keys (EC P-256, RSA >= 2048 or Ed25519).
	// The first signs; all are published at /.well-known/jwks.json.
	KeyFiles []string `json:"key_files"`
	// TTL is a token's lifetime. Default 5m, within [10s, 1h].
	TTL config.Duration `json:"ttl"`
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
	if c.DatabaseCheckInterval == 0 {
		c.DatabaseCheckInterval = config.Duration(5 * time.Second)
	}
	c.Prefix = strings.TrimSuffix(c.Prefix, "/")
	return c
}

// validate checks c after WithDefaults; every error names its key.
func (c Config) validate() ([]netip.Prefix, error) {
	var errs []error
	if !nameRE.MatchString(c.Name) {
		errs = append(errs, fmt.Errorf("name %q: want a short lowercase name like ai", c.Name))
	}
	if c.DecisionURL == "" {
		errs = append(errs, errors.New("decision_url is required"))
	} else if u, err := url.Parse(c.DecisionURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		errs = append(errs, fmt.Errorf("decision_url %q: want an absolute http(s) URL like http://decision:8080", c.DecisionURL))
	}
	for _, h := range c.Hosts {
		if !validHost(h) {
			errs = append(errs, fmt.Errorf("hosts: %q: want a bare host name like ai.cloud.example.com, optionally with a port, not a URL", h))
		}
	}
	// Zero means the default (WithDefaults); intervals that drive a ticker
	// must end up positive, or the reload would panic after start.
	if c.RoutesReloadInterval <= 0 {
		errs = append(errs, fmt.Errorf("routes_reload_interval %s: must be positive", c.RoutesReloadInterval.D()))
	}
	if c.DatabaseCheckInterval <= 0 {
		errs = append(errs, fmt.Errorf("database_check_interval %s: must be positive", c.DatabaseCheckInterval.D()))
	}
	if c.ShutdownDrain <= 0 {
		errs = append(errs, fmt.Errorf("shutdown_drain %s: must be positive", c.ShutdownDrain.D()))
	}
	if c.DecisionTimeout < 0 {
		errs = append(errs, fmt.Errorf("decision_timeout %s: must not be negative", c.DecisionTimeout.D()))
	}
	if c.UsageSpoolMaxBytes < 0 {
		errs = append(errs, fmt.Errorf("usage_spool_max_bytes %d: must not be negative", c.UsageSpoolMaxBytes))
	}
	if c.DecisionCacheSize < 0 {
		errs = append(errs, fmt.Errorf("decision_cache_size %d: must not be negative", c.DecisionCacheSize))
	}
	for _, name := range slices.Sorted(maps.Keys(c.Backends)) {
		if d := c.Backends[name].ResponseHeaderTimeout; d < 0 {
			errs = append(errs, fmt.Errorf("backends.%s.response_header_timeout %s: must not be negative", name, d.D()))
		}
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
	if it := c.InternalToken; it != nil {
		if u, err := url.Parse(it.Issuer); err != nil || u.Scheme == "" || u.Host == "" {
			errs = append(errs, fmt.Errorf("internal_token.issuer %q: want an absolute URL naming the gateway", it.Issuer))
		}
		if len(it.KeyFiles) == 0 {
			errs = append(errs, errors.New("internal_token.key_files: at least one is required"))
		}
		if it.TTL != 0 && (it.TTL.D() < 10*time.Second || it.TTL.D() > time.Hour) {
			errs = append(errs, fmt.Errorf("internal_token.ttl %s: want 10s to 1h", it.TTL.D()))
		}
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

// hostLabel is one DNS label: letters, digits and inner hyphens.
const hostLabel = `[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?`

var hostRE = regexp.MustCompile(`(?i)^` + hostLabel + `(?:\.` + hostLabel + `)*$`)

// validHost reports whether s is a host name, optionally with a port: what
// a Host header carries, never a URL, a path or a wildcard.
func validHost(s string) bool {
	host := s
	if h, port, err := net.SplitHostPort(s); err == nil {
		n, err := strconv.Atoi(port)
		if err != nil || n < 1 || n > 65535 {
			return false
		}
		host = h
	}
	return len(host) <= 253 && hostRE.MatchString(host)
}
