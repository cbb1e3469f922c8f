// Package authz decides whether a GitLab instance may use a hosted feature:
// it verifies the instance token and its binding to the request, resolves
// the organization behind the instance, and asks the policy for a decision
// and a budget. Adapters (token verification, Postgres, OPA) plug in through
// the small interfaces declared here.
package authz

import (
	"context"
	"errors"
	"time"

	"github.com/cloud-connector/cloud-connector/services/token"
)

// Request is what a gateway asks about one client request.
type Request struct {
	// Authorization is the raw Authorization header ("Bearer <jwt>").
	Authorization string
	// AuthenticationType is the raw X-Gitlab-Authentication-Type header.
	AuthenticationType string
	// Feature is the unit primitive, e.g. "complete_code".
	Feature string
	// Audience is the JWT audience of the backend behind the feature.
	Audience string
	Facts    Facts
}

// Facts are request details the policy may use; all but RequestID are part
// of the decision.
type Facts struct {
	Method         string
	Path           string
	InstanceID     string
	Realm          string
	GlobalUserID   string
	GitLabVersion  string
	ClientType     string
	DeploymentType string
	HostName       string
	RequestID      string
}

// Outcome is the kind of a decision.
type Outcome int

// Outcomes. A spent budget is not an outcome: gateways enforce budgets.
const (
	Allow Outcome = iota + 1
	Unauthenticated
	Forbidden
)

func (o Outcome) String() string {
	switch o {
	case Allow:
		return "allow"
	case Unauthenticated:
		return "unauthenticated"
	case Forbidden:
		return "forbidden"
	}
	return "unspecified"
}

// BudgetKind says how an exhausted budget is reported.
type BudgetKind string

// Budget kinds.
const (
	// Rate budgets answer 429 with Retry-After.
	Rate BudgetKind = "rate"
	// Quota budgets answer 402 USAGE_QUOTA_EXCEEDED.
	Quota BudgetKind = "quota"
)

// Budget is what a subject may spend on a bucket per window.
type Budget struct {
	Bucket string
	Limit  int64
	Window time.Duration
	Unit   string
	Kind   BudgetKind
}

// Subject is who a request is metered against.
type Subject struct {
	OrganizationID string
	InstanceID     string
	Realm          string
	GlobalUserID   string
	Plan           string
}

// Decision is the answer to a Request.
type Decision struct {
	Outcome Outcome
	// Reason is stable and machine-readable, e.g. "token_expired".
	Reason string
	// Message is for the client, in GitLab's words.
	Message string
	// Budget is set on Allow.
	Budget  *Budget
	Subject Subject
	// CacheTTL is how long an identical request may reuse the decision.
	CacheTTL time.Duration
	// Explanation says which rule decided and with which data.
	Explanation    []string
	PolicyRevision string
}

// Organization is the customer an instance belongs to.
type Organization struct {
	ID     string
	Name   string
	Plan   string
	AddOns []AddOn
	// InstanceRealm is the realm the looked-up instance is registered
	// with: saas or self-managed.
	InstanceRealm string
}

// AddOn is an add-on active for an organization now.
type AddOn struct {
	Name  string
	Seats int
}

// ErrNotFound is returned by an OrganizationFinder for an instance that is
// not registered to an organization.
var ErrNotFound = errors.New("not found")

// TokenVerifier verifies an instance token for an audience.
type TokenVerifier interface {
	Verify(ctx context.Context, raw, audience string) (*token.Claims, error)
}

// OrganizationFinder resolves the organization of an instance. It returns
// ErrNotFound for an unregistered instance.
type OrganizationFinder interface {
	FindByInstance(ctx context.Context, instanceID string) (Organization, error)
}

// PolicyInput is what the policy decides on.
type PolicyInput struct {
	Claims map[string]any
	// Organization is nil when the instance is not registered.
	Organization *Organization
	Feature      string
	Audience     string
	Facts        Facts
	Now          time.Time
}

// PolicyResult is what the policy decided.
type PolicyResult struct {
	Allow       bool
	Reason      string
	Message     string
	Explanation []string
	Budget      *Budget
	CacheTTL    time.Duration
	Revision    string
}

// Policy evaluates the authorization policy.
type Policy interface {
	Evaluate(ctx context.Context, in PolicyInput) (PolicyResult, error)
}
