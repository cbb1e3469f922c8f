// Package route is a gateway's route table: which request paths lead to
// which feature (unit primitive) and which backend. Tables are data (YAML),
// validated when loaded.
package route

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/cloud-connector/cloud-connector/services/config"
)

// Route maps a path pattern to a feature and a backend.
type Route struct {
	// Name identifies the route in metrics and usage events.
	Name string `json:"name"`
	// Path is a chi pattern: "/v2/code/completions", "/v1/prompts/{id}",
	// "/v1/proxy/{vendor}/*".
	Path string `json:"path"`
	// Methods allowed; empty allows any.
	Methods []string `json:"methods,omitempty"`
	// Feature is the unit primitive the route uses.
	Feature string `json:"feature,omitempty"`
	// FeatureHeader names the request header that carries the feature
	// instead (generic proxy endpoints: X-Gitlab-Unit-Primitive); the
	// value must be one of Features.
	FeatureHeader string   `json:"feature_header,omitempty"`
	Features      []string `json:"features,omitempty"`
	// Backend names an entry of the gateway's backends.
	Backend string `json:"backend"`
	// Public routes are proxied without authorization or metering
	// (health and model listings).
	Public bool `json:"public,omitempty"`
	// WebSocket lets an authorized client switch the connection to a
	// WebSocket (an HTTP/1.1 GET with "Upgrade: websocket"). Routes that do
	// not set it, and public routes, which cannot, refuse every protocol
	// upgrade: a switched connection is a raw tunnel to the backend that
	// the gateway can neither route, authorize nor meter request by request.
	WebSocket bool `json:"websocket,omitempty"`
	// BudgetFailMode says what happens when the budget store cannot be
	// reached and the local lease is spent: "closed" (503, default) or
	// "open" (allow).
	BudgetFailMode string `json:"budget_fail_mode,omitempty"`
	// MaxRequestBytes bounds the request body. Default 16 MiB; -1: no
	// limit (long-lived gRPC streams).
	MaxRequestBytes int64 `json:"max_request_bytes,omitempty"`
	// Timeout bounds the whole exchange; 0: none (streams).
	Timeout config.Duration `json:"timeout,omitempty"`
}

// Fail modes.
const (
	FailClosed = "closed"
	FailOpen   = "open"
)

// DefaultMaxRequestBytes is the body limit of routes that set none.
const DefaultMaxRequestBytes = 16 << 20

// Backend is a service routes proxy to.
type Backend struct {
	// URL of the backend; its path is prefixed to proxied paths.
	URL string `json:"url"`
	// Audience is the JWT audience tokens must carry for this backend,
	// e.g. "gitlab-ai-gateway".
	Audience string `json:"audience"`
	// HTTP2 speaks HTTP/2 without TLS (prior knowledge) to an http://
	// backend; required for gRPC backends.
	HTTP2 bool `json:"http2,omitempty"`
	// ResponseHeaderTimeout bounds the wait for the backend's response
	// headers. Default 2m (model latency before the first byte).
	ResponseHeaderTimeout config.Duration `json:"response_header_timeout,omitempty"`
}

// Table is a gateway's routes.
type Table struct {
	Routes []Route `json:"routes"`
}

// Validate checks the table against the gateway's backends.
func (t Table) Validate(backends map[string]Backend) error {
	var errs []error
	names := map[string]bool{}
	if len(t.Routes) == 0 {
		errs = append(errs, errors.New("no routes"))
	}
	for i, r := range t.Routes {
		at := fmt.Sprintf("routes[%d] %q", i, r.Name)
		switch {
		case r.Name == "":
			errs = append(errs, fmt.Errorf("%s: name is required", at))
		case names[r.Name]:
			errs = append(errs, fmt.Errorf("%s: duplicate name", at))
		}
		names[r.Name] = true
		if !strings.HasPrefix(r.Path, "/") {
			errs = append(errs, fmt.Errorf("%s: path %q must start with /", at, r.Path))
		}
		if _, ok := backends[r.Backend]; !ok {
			errs = append(errs, fmt.Errorf("%s: unknown backend %q", at, r.Backend))
		}
		switch {
		case r.Public && (r.Feature != "" || r.FeatureHeader != ""):
			errs = append(errs, fmt.Errorf("%s: a public route has no feature", at))
		case r.Public:
		case r.Feature != "" && r.FeatureHeader != "":
			errs = append(errs, fmt.Errorf("%s: set feature or feature_header, not both", at))
		case r.Feature == "" && r.FeatureHeader == "":
			errs = append(errs, fmt.Errorf("%s: feature or feature_header is required (or public: true)", at))
		case r.FeatureHeader != "" && len(r.Features) == 0:
			errs = append(errs, fmt.Errorf("%s: feature_header needs the allowed features listed", at))
		}
		switch {
		case r.WebSocket && r.Public:
			errs = append(errs, fmt.Errorf("%s: a public route cannot accept websocket upgrades", at))
		case r.WebSocket && len(r.Methods) > 0 && !slices.Contains(r.Methods, http.MethodGet):
			errs = append(errs, fmt.Errorf("%s: websocket needs GET among the methods (the handshake is a GET)", at))
		}
		if r.Timeout < 0 {
			errs = append(errs, fmt.Errorf("%s: timeout %s: must not be negative (0: none)", at, r.Timeout.D()))
		}
		if r.MaxRequestBytes < -1 {
			errs = append(errs, fmt.Errorf("%s: max_request_bytes %d: want a positive size, 0 (default) or -1 (no limit)", at, r.MaxRequestBytes))
		}
		if r.BudgetFailMode != "" && r.BudgetFailMode != FailClosed && r.BudgetFailMode != FailOpen {
			errs = append(errs, fmt.Errorf("%s: budget_fail_mode %q: want closed or open", at, r.BudgetFailMode))
		}
		for _, m := range r.Methods {
			if !slices.Contains(knownMethods, m) {
				errs = append(errs, fmt.Errorf("%s: method %q: want one of %v", at, m, knownMethods))
			}
		}
		if err := (Table{Routes: []Route{r}}).buildable(); err != nil && strings.HasPrefix(r.Path, "/") {
			errs = append(errs, fmt.Errorf("%s: path %q: %w", at, r.Path, err))
		}
	}
	if len(errs) == 0 {
		if err := t.buildable(); err != nil {
			errs = append(errs, err)
		}
	}
	for name, b := range backends {
		u, err := url.Parse(b.URL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			errs = append(errs, fmt.Errorf("backend %q: url %q must be an absolute http(s) URL", name, b.URL))
		}
		if b.Audience == "" {
			errs = append(errs, fmt.Errorf("backend %q: audience is required", name))
		}
		if b.HTTP2 && u != nil && u.Scheme != "http" {
			errs = append(errs, fmt.Errorf("backend %q: http2 (prior knowledge) applies to http:// URLs; https negotiates HTTP/2 itself", name))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("route table: %w", err)
	}
	return nil
}

// FailMode returns the route's budget fail mode.
func (r Route) FailMode() string {
	if r.BudgetFailMode == "" {
		return FailClosed
	}
	return r.BudgetFailMode
}

// BodyLimit returns the request body limit; -1 means none.
func (r Route) BodyLimit() int64 {
	if r.MaxRequestBytes == 0 {
		return DefaultMaxRequestBytes
	}
	return r.MaxRequestBytes
}

// ResponseHeaderTimeout returns the backend's header timeout.
func (b Backend) HeaderTimeout() time.Duration {
	if b.ResponseHeaderTimeout == 0 {
		return 2 * time.Minute
	}
	return b.ResponseHeaderTimeout.D()
}

// knownMethods are the methods routes may name, and those a route that
// names none accepts.
var knownMethods = []string{
	http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut,
	http.MethodPatch, http.MethodDelete, http.MethodOptions,
}

// buildable reports, as an error, a table the router cannot be built from
// (chi panics on malformed patterns), so a bad file is rejected instead of
// crashing the process.
func (t Table) buildable() (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("not a valid route pattern: %v", p)
		}
	}()
	t.Mux(func(Route) http.Handler { return http.NotFoundHandler() }, http.NotFound, http.NotFound)
	return nil
}

// Mux builds a router for the table: each route's handler comes from
// handler; unknown paths get notFound, and known paths with another method
// get methodNotAllowed with the Allow header set. Validate the table first.
func (t Table) Mux(handler func(Route) http.Handler, notFound, methodNotAllowed http.HandlerFunc) *chi.Mux {
	mux := chi.NewMux()
	mux.NotFound(notFound)
	mux.MethodNotAllowed(func(w http.ResponseWriter, r *http.Request) {
		path := r.URL.RawPath
		if path == "" {
			path = r.URL.Path
		}
		var allowed []string
		for _, m := range knownMethods {
			if mux.Match(chi.NewRouteContext(), m, path) {
				allowed = append(allowed, m)
			}
		}
		w.Header().Set("Allow", strings.Join(allowed, ", "))
		methodNotAllowed(w, r)
	})
	for _, r := range t.Routes {
		h := handler(r)
		// A route without methods takes the known ones, not any: CONNECT
		// would ask the backend for a tunnel and TRACE would echo the
		// request, internal headers and all.
		methods := r.Methods
		if len(methods) == 0 {
			methods = knownMethods
		}
		for _, m := range methods {
			mux.Method(m, r.Path, h)
		}
	}
	return mux
}

// Feature returns the feature a request uses on r: the route's own, or the
// one named by its feature header, which must be allowed. ok is false when
// the header is missing or names a feature the route does not serve.
func (r Route) FeatureOf(req *http.Request) (feature string, ok bool) {
	if r.FeatureHeader == "" {
		return r.Feature, true
	}
	f := req.Header.Get(r.FeatureHeader)
	return f, f != "" && slices.Contains(r.Features, f)
}
