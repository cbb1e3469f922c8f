package authz

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cloud-connector/cloud-connector/services/token"
)

// Messages GitLab clients expect with a 401, word for word.
const (
	MsgNoAuthorization   = "No authorization header presented"
	MsgInvalidHeader     = "Invalid authorization header"
	MsgInvalidAuthType   = "Invalid authentication token type - only OIDC is supported"
	MsgForbiddenByAuth   = "Forbidden by auth provider"
	MsgInstanceIDHeader  = "Header mismatch 'X-Gitlab-Instance-Id'"
	MsgRealmHeader       = "Header mismatch 'X-Gitlab-Realm'"
	authenticationOIDC   = "oidc"
	maxAuthorizationSize = token.MaxTokenBytes + 64
)

var (
	// ErrInvalidRequest marks a request the service cannot decide on
	// because the caller (a gateway) sent it incomplete.
	ErrInvalidRequest = errors.New("invalid request")
	// ErrUnavailable marks a failure of a dependency (keys, database,
	// policy) that a retry may fix. Callers fail closed.
	ErrUnavailable = errors.New("unavailable")
)

// Config configures a Service.
type Config struct {
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Registerer receives the service's metrics; nil registers none.
	Registerer prometheus.Registerer
}

// Service answers authorization requests. It is safe for concurrent use.
type Service struct {
	verifier TokenVerifier
	orgs     OrganizationFinder
	policy   Policy
	now      func() time.Time
	logger   *slog.Logger

	decisions *prometheus.CounterVec
	latency   prometheus.Histogram
}

// New returns a Service deciding with the given verifier, organization
// finder and policy.
func New(cfg Config, verifier TokenVerifier, orgs OrganizationFinder, policy Policy, logger *slog.Logger) *Service {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	s := &Service{
		verifier: verifier, orgs: orgs, policy: policy, now: cfg.Now, logger: logger,
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cloudconnector_authz_decisions_total",
			Help: "Authorization decisions by outcome and reason.",
		}, []string{"outcome", "reason"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "cloudconnector_authz_decision_seconds",
			Help:    "Time to decide one authorization request.",
			Buckets: prometheus.ExponentialBuckets(0.00005, 2, 16),
		}),
	}
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(s.decisions, s.latency)
	}
	return s
}

// Authorize decides on req. A refusal is a Decision, not an error; errors
// wrap ErrInvalidRequest or ErrUnavailable, or are internal.
func (s *Service) Authorize(ctx context.Context, req Request) (Decision, error) {
	began := time.Now() // latency uses the real clock even when Now is injected
	d, err := s.authorize(ctx, req, s.now())
	s.latency.Observe(time.Since(began).Seconds())
	if err != nil {
		s.decisions.WithLabelValues("error", "").Inc()
		return Decision{}, err
	}
	s.decisions.WithLabelValues(d.Outcome.String(), d.Reason).Inc()
	level := slog.LevelDebug
	if d.Outcome != Allow {
		level = slog.LevelInfo
	}
	s.logger.Log(ctx, level, "decision", "outcome", d.Outcome.String(), "reason", d.Reason,
		"feature", req.Feature, "instance_id", d.Subject.InstanceID, "organization_id", d.Subject.OrganizationID,
		"request_id", req.Facts.RequestID, "explanation", d.Explanation, "policy_revision", d.PolicyRevision)
	return d, nil
}

func (s *Service) authorize(ctx context.Context, req Request, now time.Time) (Decision, error) {
	if req.Feature == "" {
		return Decision{}, fmt.Errorf("%w: feature is required", ErrInvalidRequest)
	}
	if req.Audience == "" {
		return Decision{}, fmt.Errorf("%w: audience is required", ErrInvalidRequest)
	}
	f := req.Facts
	if strings.TrimSpace(req.Authorization) == "" {
		return unauthenticated("missing_authorization", MsgNoAuthorization), nil
	}
	if !strings.EqualFold(req.AuthenticationType, authenticationOIDC) {
		return unauthenticated("invalid_authentication_type", MsgInvalidAuthType), nil
	}
	raw, ok := bearer(req.Authorization)
	if !ok {
		return unauthenticated("invalid_authorization_header", MsgInvalidHeader), nil
	}
	claims, err := s.verifier.Verify(ctx, raw, req.Audience)
	if err != nil {
		var te *token.Error
		if errors.As(err, &te) && te.Temporary() && ctx.Err() == nil {
			return Decision{}, fmt.Errorf("%w: verify token: %w", ErrUnavailable, err)
		}
		reason := string(token.ReasonOf(err))
		if reason == "" {
			return Decision{}, fmt.Errorf("verify token: %w", err)
		}
		d := unauthenticated(reason, MsgForbiddenByAuth)
		d.Explanation = []string{err.Error()}
		return d, nil
	}
	// GitLab's bindings: a claim that is set must equal its header; an
	// absent header does not match a set claim.
	if claims.Subject != f.InstanceID {
		return unauthenticated("instance_id_mismatch", MsgInstanceIDHeader), nil
	}
	if claims.Realm != "" && claims.Realm != f.Realm {
		return unauthenticated("realm_mismatch", MsgRealmHeader), nil
	}

	subject := Subject{InstanceID: claims.Subject, Realm: claims.Realm, GlobalUserID: f.GlobalUserID}
	in := PolicyInput{Claims: claims.All, Feature: req.Feature, Audience: req.Audience, Facts: f, Now: now}
	org, err := s.orgs.FindByInstance(ctx, claims.Subject)
	switch {
	case err == nil:
		in.Organization = &org
		subject.OrganizationID, subject.Plan = org.ID, org.Plan
		if subject.Realm == "" && org.InstanceRealm != "" {
			// The token does not say; the instance's registration does,
			// and a header that is sent must agree with it as with a
			// claim. The client's word alone never sets the realm that
			// policy switches, metering and the backend see.
			if f.Realm != "" && f.Realm != org.InstanceRealm {
				return unauthenticated("realm_mismatch", MsgRealmHeader), nil
			}
			subject.Realm = org.InstanceRealm
		}
	case errors.Is(err, ErrNotFound):
	case ctx.Err() != nil:
		return Decision{}, fmt.Errorf("find organization: %w", err)
	default:
		return Decision{}, fmt.Errorf("%w: find organization: %w", ErrUnavailable, err)
	}

	if subject.Realm == "" {
		// Neither token nor registration: an unknown instance, which the
		// policy refuses; the header is only reported.
		subject.Realm = f.Realm
	}
	in.Facts.Realm = subject.Realm
	res, err := s.policy.Evaluate(ctx, in)
	if err != nil {
		return Decision{}, fmt.Errorf("evaluate policy: %w", err)
	}
	d := Decision{
		Outcome:        Forbidden,
		Reason:         res.Reason,
		Message:        res.Message,
		Subject:        subject,
		Explanation:    res.Explanation,
		PolicyRevision: res.Revision,
		CacheTTL:       min(res.CacheTTL, claims.Expiry.Sub(now)),
	}
	if res.Allow {
		if res.Budget == nil {
			return Decision{}, errors.New("evaluate policy: allow without a budget")
		}
		d.Outcome, d.Budget = Allow, res.Budget
	}
	if d.CacheTTL < time.Second {
		d.CacheTTL = 0
	}
	return d, nil
}

// bearer extracts the token from "Bearer <token>" (scheme case-insensitive,
// RFC 6750).
func bearer(h string) (string, bool) {
	if len(h) > maxAuthorizationSize {
		return "", false
	}
	scheme, tok, ok := strings.Cut(strings.TrimSpace(h), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	tok = strings.TrimSpace(tok)
	if tok == "" || strings.ContainsAny(tok, " \t") {
		return "", false
	}
	return tok, true
}

func unauthenticated(reason, message string) Decision {
	return Decision{Outcome: Unauthenticated, Reason: reason, Message: message}
}
