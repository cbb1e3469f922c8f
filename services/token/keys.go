package token

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwk"
	"golang.org/x/sync/singleflight"
)

// keySource holds one issuer's verification keys: fetched from its JWKS URL
// (found by OIDC discovery unless configured) and refreshed in the
// background, or read once from a static file.
type keySource struct {
	issuer   string
	cfg      *Config
	cache    *jwk.Cache
	logger   *slog.Logger
	static   jwk.Set
	explicit string // configured JWKS URL; "" means discover

	mu      sync.Mutex
	jwksURL string // resolved JWKS URL; "" until discovery succeeds

	lastSuccess atomic.Int64 // unix nanos of the last successful fetch
	lastForced  atomic.Int64 // unix nanos of the last unknown-kid refetch
	group       singleflight.Group
}

func newKeySource(ic IssuerConfig, cfg *Config, cache *jwk.Cache, logger *slog.Logger) (*keySource, error) {
	s := &keySource{issuer: ic.Issuer, cfg: cfg, cache: cache, logger: logger, explicit: ic.JWKSURL}
	if ic.JWKSFile != "" {
		set, err := jwk.ReadFile(ic.JWKSFile)
		if err != nil {
			return nil, fmt.Errorf("read jwks file %s: %w", ic.JWKSFile, err)
		}
		s.static = set
		s.lastSuccess.Store(cfg.Now().UnixNano())
	}
	return s, nil
}

// key returns the key with kid, refetching the key set once (rate-limited
// and single-flight across callers) when kid is not known, so a rotation is
// picked up without waiting for the next background refresh.
func (s *keySource) key(ctx context.Context, kid string) (jwk.Key, error) {
	set, err := s.set(ctx)
	if err != nil {
		return nil, err
	}
	if k, ok := set.LookupKeyID(kid); ok {
		return k, nil
	}
	if s.static != nil {
		return nil, fail(ReasonUnknownKey, "key %q not in static key set of %s", kid, s.issuer)
	}
	now := s.cfg.Now()
	last := s.lastForced.Load()
	if now.Sub(time.Unix(0, last)) < s.cfg.UnknownKeyRefetchInterval {
		return nil, fail(ReasonUnknownKey, "key %q not published by %s", kid, s.issuer)
	}
	ch := s.group.DoChan("refetch", func() (any, error) {
		s.lastForced.Store(now.UnixNano())
		// Every caller waiting on this refetch shares it, so the first
		// one's client leaving must not fail it for the rest.
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), refetchTimeout)
		defer cancel()
		u, err := s.resolve(fctx)
		if err != nil {
			return nil, err
		}
		return s.cache.Refresh(fctx, u)
	})
	var r singleflight.Result
	select {
	case <-ctx.Done():
		return nil, &Error{Reason: ReasonKeysUnavailable, Err: fmt.Errorf("refetch keys of %s: %w", s.issuer, context.Cause(ctx))}
	case r = <-ch:
	}
	if r.Err != nil {
		s.logger.Warn("refetch keys for unknown kid", "issuer", s.issuer, "kid", kid, "error", r.Err)
		return nil, fail(ReasonUnknownKey, "key %q not published by %s", kid, s.issuer)
	}
	if k, ok := r.Val.(jwk.Set).LookupKeyID(kid); ok {
		return k, nil
	}
	return nil, fail(ReasonUnknownKey, "key %q not published by %s", kid, s.issuer)
}

// refetchTimeout bounds a shared refetch of an issuer's keys, which runs
// detached from the context of the caller that started it.
const refetchTimeout = 15 * time.Second

// set returns the current key set, fetching it on first use. Keys older
// than MaxKeyStaleness (the issuer has been unreachable that long) are no
// longer trusted.
func (s *keySource) set(ctx context.Context) (jwk.Set, error) {
	if s.static != nil {
		return s.static, nil
	}
	u, err := s.resolve(ctx)
	if err != nil {
		return nil, err
	}
	set, err := s.cache.Get(ctx, u)
	if err != nil {
		return nil, &Error{Reason: ReasonKeysUnavailable, Err: fmt.Errorf("fetch keys of %s: %w", s.issuer, err)}
	}
	if age := s.cfg.Now().Sub(time.Unix(0, s.lastSuccess.Load())); age > s.cfg.MaxKeyStaleness {
		return nil, fail(ReasonKeysUnavailable, "keys of %s are stale: last fetched %s ago", s.issuer, age.Round(time.Second))
	}
	return set, nil
}

// resolve returns the JWKS URL, running OIDC discovery until it succeeds
// once, and registers the URL with the refreshing cache.
func (s *keySource) resolve(ctx context.Context) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.jwksURL != "" {
		return s.jwksURL, nil
	}
	u := s.explicit
	if u == "" {
		var err error
		if u, err = discover(ctx, s.cfg.HTTPClient, s.issuer); err != nil {
			return "", &Error{Reason: ReasonKeysUnavailable, Err: err}
		}
	}
	if !s.cache.IsRegistered(u) {
		err := s.cache.Register(u,
			jwk.WithHTTPClient(s.cfg.HTTPClient),
			jwk.WithRefreshInterval(s.cfg.KeyRefreshInterval),
			jwk.WithPostFetcher(jwk.PostFetchFunc(func(_ string, set jwk.Set) (jwk.Set, error) {
				s.lastSuccess.Store(s.cfg.Now().UnixNano())
				return set, nil
			})),
		)
		if err != nil {
			return "", &Error{Reason: ReasonKeysUnavailable, Err: fmt.Errorf("register jwks url: %w", err)}
		}
	}
	s.jwksURL = u
	return u, nil
}

// discover reads <issuer>/.well-known/openid-configuration and returns its
// jwks_uri. The document must name the same issuer (OpenID Connect
// Discovery 1.0, section 4.3).
func discover(ctx context.Context, client *http.Client, issuer string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	endpoint := strings.TrimSuffix(issuer, "/") + "/.well-known/openid-configuration"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, endpoint, nil)
	if err != nil {
		return "", fmt.Errorf("discovery request: %w", err)
	}
	res, err := client.Do(req)
	if err != nil {
		return "", fmt.Errorf("discover %s: %w", issuer, err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return "", fmt.Errorf("discover %s: status %s", issuer, res.Status)
	}
	var doc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := json.NewDecoder(io.LimitReader(res.Body, 1<<20)).Decode(&doc); err != nil {
		return "", fmt.Errorf("decode discovery document of %s: %w", issuer, err)
	}
	if doc.Issuer != issuer {
		return "", fmt.Errorf("discovery document of %s names issuer %q", issuer, doc.Issuer)
	}
	ju, err := url.Parse(doc.JWKSURI)
	if err != nil || ju.Host == "" || (ju.Scheme != "https" && !(ju.Scheme == "http" && strings.HasPrefix(issuer, "http://"))) {
		return "", fmt.Errorf("discovery document of %s has unusable jwks_uri %q", issuer, doc.JWKSURI)
	}
	return doc.JWKSURI, nil
}
