// Package decisions asks the decision service whether a request may
// proceed, caching answers for as long as the service allows (never past
// the token's expiry) under a key covering everything the decision used.
package decisions

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/otelconnect"
	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	"golang.org/x/sync/singleflight"

	authzv1 "github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1"
	"github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1/authzv1connect"
	"github.com/cloud-connector/cloud-connector/services/telemetry"
)

// Decision is the service's answer, normalized to fail closed, and whether
// it came from the cache. Cached answers are shared: callers must not
// modify them.
type Decision struct {
	*authzv1.AuthorizeResponse
	Cached bool
}

// ErrUnavailable means no decision could be had: the service is down or
// timed out and nothing valid was cached. Gateways fail closed.
var ErrUnavailable = errors.New("decision service unavailable")

// Config configures a Client.
type Config struct {
	// URL of the decision service, e.g. "http://decision:8080".
	URL string
	// Timeout bounds one Authorize call. Default 2s.
	Timeout time.Duration
	// CacheSize bounds the number of cached decisions. Default 100_000.
	CacheSize int
	// MaxTTL caps how long any decision is cached. Default 5m.
	MaxTTL time.Duration
	// HTTPClient overrides the HTTP/2 cleartext client used by default.
	HTTPClient connect.HTTPClient
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Registerer receives metrics; nil registers none.
	Registerer prometheus.Registerer
	// TracerProvider creates a client span per Authorize call, a child of
	// the caller's span, whose context the service receives (W3C
	// traceparent). Nil: no spans of its own, though the caller's trace
	// context still reaches the service.
	TracerProvider trace.TracerProvider
}

// Client is a caching Authorize client. It is safe for concurrent use.
type Client struct {
	rpc     authzv1connect.AuthorizationServiceClient
	cfg     Config
	cache   *lru.Cache[[32]byte, entry]
	group   singleflight.Group
	lookups *prometheus.CounterVec
}

type entry struct {
	d       Decision
	expires time.Time
}

// New returns a client of the decision service at cfg.URL.
func New(cfg Config) (*Client, error) {
	if cfg.URL == "" {
		return nil, errors.New("decision service url is required")
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 2 * time.Second
	}
	if cfg.CacheSize == 0 {
		cfg.CacheSize = 100_000
	}
	if cfg.MaxTTL == 0 {
		cfg.MaxTTL = 5 * time.Minute
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = h2cClient()
	}
	if cfg.TracerProvider == nil {
		cfg.TracerProvider = noop.NewTracerProvider()
	}
	cache, err := lru.New[[32]byte, entry](cfg.CacheSize)
	if err != nil {
		return nil, fmt.Errorf("decision cache: %w", err)
	}
	tracing, err := otelconnect.NewInterceptor(otelconnect.WithTracerProvider(cfg.TracerProvider),
		otelconnect.WithPropagator(telemetry.Propagator()), otelconnect.WithoutMetrics())
	if err != nil {
		return nil, fmt.Errorf("decision client tracing: %w", err)
	}
	c := &Client{
		rpc: authzv1connect.NewAuthorizationServiceClient(cfg.HTTPClient, cfg.URL,
			connect.WithInterceptors(tracing)),
		cfg:   cfg,
		cache: cache,
		lookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cloudconnector_gateway_decision_lookups_total",
			Help: "Decision lookups by result: hit (cache), miss (asked the service), error (no decision).",
		}, []string{"result"}),
	}
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(c.lookups)
	}
	return c, nil
}

// h2cClient speaks HTTP/2 without TLS to the decision service, so many
// concurrent calls share a few connections.
func h2cClient() *http.Client {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	return &http.Client{Transport: &http.Transport{
		Protocols:           &p,
		DialContext:         (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		IdleConnTimeout:     90 * time.Second,
		MaxIdleConnsPerHost: 16,
	}}
}

// Decide returns the decision for req, from the cache when an identical
// request was decided recently. Identical concurrent requests share one
// call. Errors wrap ErrUnavailable.
func (c *Client) Decide(ctx context.Context, req *authzv1.AuthorizeRequest) (Decision, error) {
	key := cacheKey(req)
	now := c.cfg.Now()
	if e, ok := c.cache.Get(key); ok && now.Before(e.expires) {
		c.lookups.WithLabelValues("hit").Inc()
		d := e.d
		d.Cached = true
		return d, nil
	}
	v, err, _ := c.group.Do(string(key[:]), func() (any, error) {
		// The shared call must not die with the first caller's context. It
		// keeps its trace: the call's span is a child of the first caller's.
		callCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.cfg.Timeout)
		defer cancel()
		res, err := c.rpc.Authorize(callCtx, connect.NewRequest(req))
		if err != nil {
			return nil, err
		}
		d := Decision{AuthorizeResponse: failClosed(res.Msg, req.GetFeature())}
		if ttl := min(d.GetCacheTtl().AsDuration(), c.cfg.MaxTTL); ttl > 0 {
			c.cache.Add(key, entry{d: d, expires: c.cfg.Now().Add(ttl)})
		}
		return d, nil
	})
	if err != nil {
		c.lookups.WithLabelValues("error").Inc()
		return Decision{}, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	c.lookups.WithLabelValues("miss").Inc()
	return v.(Decision), nil
}

// cacheKey hashes every field the decision may depend on: all of req but
// the request id (which is for logs only). Fields are length-prefixed so
// no two requests share a key.
func cacheKey(req *authzv1.AuthorizeRequest) [32]byte {
	f := req.GetRequest()
	h := sha256.New()
	var n [8]byte
	for _, s := range []string{
		req.GetAuthorization(), req.GetAuthenticationType(), req.GetFeature(), req.GetAudience(),
		f.GetMethod(), f.GetPath(), f.GetInstanceId(), f.GetRealm(), f.GetGlobalUserId(),
		f.GetGitlabVersion(), f.GetClientType(), f.GetDeploymentType(), f.GetHostName(),
	} {
		binary.BigEndian.PutUint64(n[:], uint64(len(s)))
		h.Write(n[:])
		h.Write([]byte(s))
	}
	var key [32]byte
	h.Sum(key[:0])
	return key
}

// failClosed turns anything but a well-formed allow or refusal into a
// refusal: an outcome this gateway does not know, or an allow without a
// budget (which would otherwise be proxied unmetered).
func failClosed(m *authzv1.AuthorizeResponse, feature string) *authzv1.AuthorizeResponse {
	switch m.GetOutcome() {
	case authzv1.Outcome_OUTCOME_UNAUTHENTICATED, authzv1.Outcome_OUTCOME_FORBIDDEN:
	case authzv1.Outcome_OUTCOME_ALLOW:
		if m.GetBudget() == nil {
			m.Outcome, m.Reason, m.Message = authzv1.Outcome_OUTCOME_FORBIDDEN, "no_budget", "Unauthorized to access "+feature
		}
	default:
		m.Outcome = authzv1.Outcome_OUTCOME_FORBIDDEN
	}
	return m
}
