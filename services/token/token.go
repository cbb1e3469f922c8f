// Package token verifies GitLab instance access tokens: RS256 JWTs issued by
// the GitLab.com instance or by the customers portal, whose keys come from
// the issuer's OIDC discovery document or a configured JWKS.
package token

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	"github.com/lestrrat-go/jwx/v2/jwt"
)

// MaxTokenBytes bounds the size of a token Verify will parse.
const MaxTokenBytes = 16 << 10

// IssuerConfig is one trusted token issuer.
type IssuerConfig struct {
	// Issuer is the exact iss claim, e.g. "https://customers.gitlab.com".
	Issuer string `json:"issuer"`
	// JWKSURL is the key set URL. Empty: found by OIDC discovery at
	// <Issuer>/.well-known/openid-configuration.
	JWKSURL string `json:"jwks_url,omitempty"`
	// JWKSFile is a static key set on disk, instead of fetching one.
	JWKSFile string `json:"jwks_file,omitempty"`
	// Audiences the issuer's tokens are accepted for, e.g.
	// ["gitlab-ai-gateway"]. A token must name the requested audience and
	// the requested audience must be in this list.
	Audiences []string `json:"audiences"`
}

// Config configures a Verifier. Zero values take the defaults documented on
// each field.
type Config struct {
	Issuers []IssuerConfig
	// Algorithms allowed in the token header. Default ["RS256"].
	Algorithms []string
	// ClockSkew tolerated on exp, nbf and iat. Default 30s.
	ClockSkew time.Duration
	// KeyRefreshInterval is how often key sets are refetched in the
	// background. Default 15m.
	KeyRefreshInterval time.Duration
	// UnknownKeyRefetchInterval bounds how often a token with an unknown
	// kid may trigger a refetch, per issuer. Default 30s.
	UnknownKeyRefetchInterval time.Duration
	// MaxKeyStaleness is how long the last good keys of an unreachable
	// issuer stay trusted. Default 24h.
	MaxKeyStaleness time.Duration
	// HTTPClient fetches discovery documents and key sets. Default: a
	// client with a 10s timeout.
	HTTPClient *http.Client
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// WithDefaults returns c with every zero field set to its default.
func (c Config) WithDefaults() Config {
	if len(c.Algorithms) == 0 {
		c.Algorithms = []string{jwa.RS256.String()}
	}
	if c.ClockSkew == 0 {
		c.ClockSkew = 30 * time.Second
	}
	if c.KeyRefreshInterval == 0 {
		c.KeyRefreshInterval = 15 * time.Minute
	}
	if c.UnknownKeyRefetchInterval == 0 {
		c.UnknownKeyRefetchInterval = 30 * time.Second
	}
	if c.MaxKeyStaleness == 0 {
		c.MaxKeyStaleness = 24 * time.Hour
	}
	if c.HTTPClient == nil {
		c.HTTPClient = &http.Client{Timeout: 10 * time.Second}
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return c
}

func (c Config) validate() error {
	if len(c.Issuers) == 0 {
		return errors.New("no trusted issuers configured")
	}
	seen := map[string]bool{}
	for _, ic := range c.Issuers {
		switch {
		case ic.Issuer == "":
			return errors.New("issuer with empty name")
		case seen[ic.Issuer]:
			return fmt.Errorf("issuer %s configured twice", ic.Issuer)
		case len(ic.Audiences) == 0:
			return fmt.Errorf("issuer %s: no audiences", ic.Issuer)
		case ic.JWKSURL != "" && ic.JWKSFile != "":
			return fmt.Errorf("issuer %s: set jwks_url or jwks_file, not both", ic.Issuer)
		}
		seen[ic.Issuer] = true
	}
	for _, a := range c.Algorithms {
		var alg jwa.SignatureAlgorithm
		if err := alg.Accept(a); err != nil || alg == jwa.NoSignature || strings.HasPrefix(a, "HS") {
			return fmt.Errorf("algorithm %q not allowed: only asymmetric signature algorithms", a)
		}
	}
	if c.ClockSkew < 0 || c.ClockSkew > 5*time.Minute {
		return fmt.Errorf("clock skew %s out of range [0, 5m]", c.ClockSkew)
	}
	return nil
}

// Claims are the verified claims of an instance token.
type Claims struct {
	Issuer    string
	Subject   string
	Audience  []string
	IssuedAt  time.Time
	NotBefore time.Time
	Expiry    time.Time
	ID        string
	// Realm is the gitlab_realm claim: "saas" or "self-managed".
	Realm string
	// Scopes are the unit primitives the instance is entitled to.
	Scopes []string
	// InstanceID is the gitlab_instance_id claim, when present.
	InstanceID string
	// All holds every claim as decoded from JSON, for policy input.
	All map[string]any
}

// Verifier verifies instance tokens. It is safe for concurrent use.
type Verifier struct {
	cfg     Config
	issuers map[string]*issuer
	algs    map[jwa.SignatureAlgorithm]bool
}

type issuer struct {
	keys      *keySource
	audiences []string
}

// New returns a Verifier for the configured issuers. Remote key sets are
// fetched on first use and refreshed in the background until ctx is done.
func New(ctx context.Context, cfg Config, logger *slog.Logger) (*Verifier, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("token config: %w", err)
	}
	cache := jwk.NewCache(ctx, jwk.WithErrSink(errSink{logger}))
	v := &Verifier{cfg: cfg, issuers: map[string]*issuer{}, algs: map[jwa.SignatureAlgorithm]bool{}}
	for _, a := range cfg.Algorithms {
		v.algs[jwa.SignatureAlgorithm(a)] = true
	}
	for _, ic := range cfg.Issuers {
		ks, err := newKeySource(ic, &v.cfg, cache, logger)
		if err != nil {
			return nil, err
		}
		v.issuers[ic.Issuer] = &issuer{keys: ks, audiences: ic.Audiences}
	}
	return v, nil
}

// Warm fetches every issuer's keys once, so the first request does not pay
// for discovery. Issuers that cannot be reached are reported, not fatal:
// their keys are fetched again on demand.
func (v *Verifier) Warm(ctx context.Context) error {
	var errs []error
	for _, iss := range v.issuers {
		if _, err := iss.keys.set(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Verify checks a compact JWT: its issuer is trusted, its header names an
// allowed algorithm and a kid the issuer publishes, its signature is valid,
// exp/nbf/iat hold within the clock skew, and aud contains audience, which
// the issuer must be trusted for. Every error is an *Error.
func (v *Verifier) Verify(ctx context.Context, raw, audience string) (*Claims, error) {
	if err := checkCompact(raw); err != nil {
		return nil, err
	}
	var (
		all map[string]any
		iss *issuer
	)
	// The provider's own context is not the caller's (jwt.Parse does not
	// hand WithContext down to it), so the closure uses ctx from Verify.
	provider := jws.KeyProviderFunc(func(_ context.Context, sink jws.KeySink, sig *jws.Signature, msg *jws.Message) error {
		hdr := sig.ProtectedHeaders()
		alg := hdr.Algorithm()
		if !v.algs[alg] {
			return fail(ReasonAlgorithm, "algorithm %q not allowed", alg)
		}
		kid := hdr.KeyID()
		if kid == "" {
			return fail(ReasonMissingKeyID, "token header has no kid")
		}
		if err := json.Unmarshal(msg.Payload(), &all); err != nil {
			return fail(ReasonMalformed, "decode claims: %v", err)
		}
		name, _ := all["iss"].(string)
		if iss = v.issuers[name]; iss == nil {
			return fail(ReasonUnknownIssuer, "issuer %q not trusted", name)
		}
		key, err := iss.keys.key(ctx, kid)
		if err != nil {
			return err
		}
		if ka := key.Algorithm().String(); ka != "" && ka != alg.String() {
			return fail(ReasonAlgorithm, "token algorithm %s does not match key algorithm %s", alg, ka)
		}
		sink.Key(alg, key)
		return nil
	})
	tok, err := jwt.Parse([]byte(raw),
		jwt.WithKeyProvider(provider),
		jwt.WithContext(ctx),
		jwt.WithClock(jwt.ClockFunc(v.cfg.Now)),
		jwt.WithAcceptableSkew(v.cfg.ClockSkew),
		jwt.WithAudience(audience),
		jwt.WithRequiredClaim(jwt.ExpirationKey),
		jwt.WithRequiredClaim(jwt.SubjectKey),
	)
	if err != nil {
		return nil, classify(err)
	}
	if !slices.Contains(iss.audiences, audience) {
		return nil, fail(ReasonAudience, "issuer %s is not trusted for audience %q", tok.Issuer(), audience)
	}
	c := &Claims{
		Issuer:    tok.Issuer(),
		Subject:   tok.Subject(),
		Audience:  tok.Audience(),
		IssuedAt:  tok.IssuedAt(),
		NotBefore: tok.NotBefore(),
		Expiry:    tok.Expiration(),
		ID:        tok.JwtID(),
		All:       all,
	}
	c.Realm, _ = all["gitlab_realm"].(string)
	c.InstanceID, _ = all["gitlab_instance_id"].(string)
	if raw, ok := all["scopes"].([]any); ok {
		for _, s := range raw {
			if s, ok := s.(string); ok {
				c.Scopes = append(c.Scopes, s)
			}
		}
	}
	return c, nil
}

// checkCompact accepts only the JWS compact serialization: three base64url
// segments. It keeps JSON serializations and oversized input away from the
// parser.
func checkCompact(raw string) error {
	if raw == "" {
		return fail(ReasonMalformed, "empty token")
	}
	if len(raw) > MaxTokenBytes {
		return fail(ReasonMalformed, "token longer than %d bytes", MaxTokenBytes)
	}
	dots := 0
	for i := 0; i < len(raw); i++ {
		switch c := raw[i]; {
		case c == '.':
			dots++
		case c >= 'A' && c <= 'Z', c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '_':
		default:
			return fail(ReasonMalformed, "token has a character outside base64url at offset %d", i)
		}
	}
	if dots != 2 {
		return fail(ReasonMalformed, "token is not a compact JWS (%d dots)", dots)
	}
	return nil
}

func classify(err error) error {
	var e *Error
	switch {
	case errors.As(err, &e):
		return e
	case errors.Is(err, jwt.ErrTokenExpired()):
		return &Error{Reason: ReasonExpired, Err: err}
	case errors.Is(err, jwt.ErrTokenNotYetValid()), errors.Is(err, jwt.ErrInvalidIssuedAt()):
		return &Error{Reason: ReasonNotYetValid, Err: err}
	case errors.Is(err, jwt.ErrInvalidAudience()):
		return &Error{Reason: ReasonAudience, Err: err}
	case errors.Is(err, jwt.ErrRequiredClaim()):
		return &Error{Reason: ReasonMissingClaim, Err: err}
	case jwt.IsValidationError(err):
		return &Error{Reason: ReasonMalformed, Err: err}
	case jws.IsVerificationError(err):
		return &Error{Reason: ReasonSignature, Err: err}
	default:
		return &Error{Reason: ReasonMalformed, Err: err}
	}
}

type errSink struct{ logger *slog.Logger }

func (s errSink) Error(err error) { s.logger.Warn("refresh jwks", "error", err) }
