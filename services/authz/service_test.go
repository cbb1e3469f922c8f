package authz_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cloud-connector/cloud-connector/migrations/pgtest"
	"github.com/cloud-connector/cloud-connector/policies"
	"github.com/cloud-connector/cloud-connector/services/authz"
	"github.com/cloud-connector/cloud-connector/services/opa"
	"github.com/cloud-connector/cloud-connector/services/postgres"
	"github.com/cloud-connector/cloud-connector/services/token"
	"github.com/cloud-connector/cloud-connector/services/token/tokentest"
)

const (
	aiGateway  = "gitlab-ai-gateway"
	cicd       = "gitlab-cicd"
	instanceID = "inst-1"
	// bareInstanceID belongs to a premium organization with no add-on.
	bareInstanceID = "inst-bare"
	unauthorized   = "Unauthorized to access complete_code"
)

var discard = slog.New(slog.NewTextHandler(io.Discard, nil))

// fixture is a Service wired with real parts: a verifier trusting a live
// test issuer, the embedded policy and a fresh database.
type fixture struct {
	issuer    *tokentest.Issuer
	pool      *pgxpool.Pool
	reg       *prometheus.Registry
	svc       *authz.Service
	orgID     string
	bareOrgID string
}

func setup(t testing.TB) fixture {
	t.Helper()
	iss := tokentest.Start(t)
	verifier := newVerifier(t, iss.URL())
	engine := mustEngine(t)
	pool := pgtest.Pool(t)
	orgID := seed(t, pool, postgres.Seed{
		Name: "Acme", Plan: "premium",
		Instances: []postgres.SeedInstance{{ID: instanceID, Realm: "self-managed"}},
		AddOns:    []authz.AddOn{{Name: "duo_pro", Seats: 10}},
	})
	bareOrgID := seed(t, pool, postgres.Seed{
		Name: "Bare", Plan: "premium",
		Instances: []postgres.SeedInstance{{ID: bareInstanceID, Realm: "self-managed"}},
	})
	reg := prometheus.NewRegistry()
	orgs := postgres.NewOrganizations(pool, postgres.OrganizationsConfig{})
	svc := authz.New(authz.Config{Registerer: reg}, verifier, orgs, engine, discard)
	return fixture{issuer: iss, pool: pool, reg: reg, svc: svc, orgID: orgID, bareOrgID: bareOrgID}
}

// newVerifier returns a verifier trusting issuer for the AI gateway and
// CI/CD audiences, with key refresh stopped at the end of the test.
func newVerifier(t testing.TB, issuer string) *token.Verifier {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	v, err := token.New(ctx, token.Config{
		Issuers: []token.IssuerConfig{{Issuer: issuer, Audiences: []string{aiGateway, cicd}}},
	}, discard)
	if err != nil {
		t.Fatalf("token.New: %v", err)
	}
	return v
}

func seed(t testing.TB, pool *pgxpool.Pool, s postgres.Seed) string {
	t.Helper()
	id, err := postgres.Upsert(context.Background(), pool, s)
	if err != nil {
		t.Fatalf("seed %s: %v", s.Name, err)
	}
	return id
}

// mint returns a token for instanceID with the complete_code and
// generate_code scopes unless c says otherwise.
func mint(t testing.TB, iss *tokentest.Issuer, c tokentest.Claims) string {
	t.Helper()
	if c.Subject == "" {
		c.Subject = instanceID
	}
	if c.Scopes == nil {
		c.Scopes = []string{"complete_code", "generate_code"}
	}
	raw, err := iss.Mint(c)
	if err != nil {
		t.Fatalf("mint: %v", err)
	}
	return raw
}

// request is a code completion request from instanceID, as the AI gateway
// would forward it.
func request(raw string) authz.Request {
	return authz.Request{
		Authorization:      "Bearer " + raw,
		AuthenticationType: "oidc",
		Feature:            "complete_code",
		Audience:           aiGateway,
		Facts: authz.Facts{
			Method:         "POST",
			Path:           "/v2/code/completions",
			InstanceID:     instanceID,
			Realm:          "self-managed",
			GlobalUserID:   "user-1",
			GitLabVersion:  "17.6.1-ee",
			ClientType:     "vscode",
			DeploymentType: "self-managed",
			HostName:       "gitlab.example.com",
			RequestID:      "req-1",
		},
	}
}

func TestAuthorizeAllow(t *testing.T) {
	t.Parallel()
	f := setup(t)
	d, err := f.svc.Authorize(context.Background(), request(mint(t, f.issuer, tokentest.Claims{})))
	if err != nil {
		t.Fatalf("Authorize: %v", err)
	}
	if d.Outcome != authz.Allow || d.Reason != "entitled" || d.Message != "" {
		t.Fatalf("decision = %s %q %q (%q), want allow entitled", d.Outcome, d.Reason, d.Message, d.Explanation)
	}
	wantBudget := authz.Budget{Bucket: "code_suggestions", Limit: 600, Window: time.Minute, Unit: "request", Kind: authz.Rate}
	if d.Budget == nil || *d.Budget != wantBudget {
		t.Errorf("budget = %+v, want %+v", d.Budget, wantBudget)
	}
	wantSubject := authz.Subject{OrganizationID: f.orgID, InstanceID: instanceID, Realm: "self-managed", GlobalUserID: "user-1", Plan: "premium"}
	if d.Subject != wantSubject {
		t.Errorf("subject = %+v, want %+v", d.Subject, wantSubject)
	}
	if d.CacheTTL != 30*time.Second {
		t.Errorf("cache TTL = %v, want 30s", d.CacheTTL)
	}
	if len(d.Explanation) == 0 || d.Explanation[0] == "" {
		t.Errorf("explanation = %q, want the deciding rule", d.Explanation)
	}
	if d.PolicyRevision == "" {
		t.Error("policy revision is empty")
	}
}

// TestAuthorizeCacheTTL checks that a decision is never reusable past the
// token's expiry.
func TestAuthorizeCacheTTL(t *testing.T) {
	t.Parallel()
	f := setup(t)
	tests := []struct {
		name     string
		claims   tokentest.Claims
		min, max time.Duration
	}{
		{"long-lived token: policy TTL", tokentest.Claims{TTL: time.Hour}, 30 * time.Second, 30 * time.Second},
		{"token expiring in 10s", tokentest.Claims{TTL: 10 * time.Second}, time.Second, 10 * time.Second},
		// Accepted within the verifier's 30s clock skew, but already past
		// its expiry: usable once, never cached (and never negative).
		{"token expired within clock skew", tokentest.Claims{IssuedAt: time.Now().Add(-70 * time.Second), TTL: time.Minute}, 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d, err := f.svc.Authorize(context.Background(), request(mint(t, f.issuer, tt.claims)))
			if err != nil {
				t.Fatalf("Authorize: %v", err)
			}
			if d.Outcome != authz.Allow {
				t.Fatalf("outcome = %s (%s), want allow", d.Outcome, d.Reason)
			}
			if d.CacheTTL < tt.min || d.CacheTTL > tt.max {
				t.Fatalf("cache TTL = %v, want in [%v, %v]", d.CacheTTL, tt.min, tt.max)
			}
		})
	}
}

func TestAuthorizeUnauthenticated(t *testing.T) {
	t.Parallel()
	f := setup(t)
	valid := mint(t, f.issuer, tokentest.Claims{})

	// A token whose payload was swapped for another token's, under the
	// first token's signature: known kid, signature does not match.
	other := mint(t, f.issuer, tokentest.Claims{Subject: "inst-other"})
	vp, op := strings.Split(valid, "."), strings.Split(other, ".")
	tampered := vp[0] + "." + op[1] + "." + vp[2]

	// A token from an issuer that is up and well-formed but not trusted.
	foreign := mint(t, tokentest.Start(t), tokentest.Claims{})

	tests := []struct {
		name    string
		edit    func(*authz.Request)
		reason  string
		message string
	}{
		{"no authorization header", func(r *authz.Request) { r.Authorization = "" }, "missing_authorization", authz.MsgNoAuthorization},
		{"blank authorization header", func(r *authz.Request) { r.Authorization = "  " }, "missing_authorization", authz.MsgNoAuthorization},
		{"authentication type missing", func(r *authz.Request) { r.AuthenticationType = "" }, "invalid_authentication_type", authz.MsgInvalidAuthType},
		{"authentication type not oidc", func(r *authz.Request) { r.AuthenticationType = "pat" }, "invalid_authentication_type", authz.MsgInvalidAuthType},
		{"basic scheme", func(r *authz.Request) { r.Authorization = "Basic x" }, "invalid_authorization_header", authz.MsgInvalidHeader},
		{"bearer without token", func(r *authz.Request) { r.Authorization = "Bearer" }, "invalid_authorization_header", authz.MsgInvalidHeader},
		{"bearer with blank token", func(r *authz.Request) { r.Authorization = "Bearer   " }, "invalid_authorization_header", authz.MsgInvalidHeader},
		{"bearer with two tokens", func(r *authz.Request) { r.Authorization = "Bearer a b" }, "invalid_authorization_header", authz.MsgInvalidHeader},
		{"token without scheme", func(r *authz.Request) { r.Authorization = valid }, "invalid_authorization_header", authz.MsgInvalidHeader},
		{"oversized header", func(r *authz.Request) { r.Authorization = "Bearer " + strings.Repeat("a", token.MaxTokenBytes+64) }, "invalid_authorization_header", authz.MsgInvalidHeader},
		{"malformed token", func(r *authz.Request) { r.Authorization = "Bearer not-a-jwt" }, string(token.ReasonMalformed), authz.MsgForbiddenByAuth},
		{"expired token", func(r *authz.Request) {
			*r = request(mint(t, f.issuer, tokentest.Claims{IssuedAt: time.Now().Add(-2 * time.Hour), TTL: time.Hour}))
		}, string(token.ReasonExpired), authz.MsgForbiddenByAuth},
		{"token for another audience", func(r *authz.Request) {
			*r = request(mint(t, f.issuer, tokentest.Claims{Audience: []string{cicd}}))
		}, string(token.ReasonAudience), authz.MsgForbiddenByAuth},
		{"audience the issuer is not trusted for", func(r *authz.Request) {
			*r = request(mint(t, f.issuer, tokentest.Claims{Audience: []string{"gitlab-duo-workflow-service"}}))
			r.Audience = "gitlab-duo-workflow-service"
		}, string(token.ReasonAudience), authz.MsgForbiddenByAuth},
		{"untrusted iss claim", func(r *authz.Request) {
			*r = request(mint(t, f.issuer, tokentest.Claims{Issuer: "https://customers.example"}))
		}, string(token.ReasonUnknownIssuer), authz.MsgForbiddenByAuth},
		{"token from an untrusted issuer", func(r *authz.Request) { *r = request(foreign) }, string(token.ReasonUnknownIssuer), authz.MsgForbiddenByAuth},
		{"bad signature", func(r *authz.Request) { *r = request(tampered) }, string(token.ReasonSignature), authz.MsgForbiddenByAuth},
		{"instance id header mismatch", func(r *authz.Request) { r.Facts.InstanceID = "inst-2" }, "instance_id_mismatch", authz.MsgInstanceIDHeader},
		{"realm header mismatch", func(r *authz.Request) { r.Facts.Realm = "saas" }, "realm_mismatch", authz.MsgRealmHeader},
		// A set claim must be matched: an absent header does not match.
		{"instance id header absent", func(r *authz.Request) { r.Facts.InstanceID = "" }, "instance_id_mismatch", authz.MsgInstanceIDHeader},
		{"realm header absent", func(r *authz.Request) { r.Facts.Realm = "" }, "realm_mismatch", authz.MsgRealmHeader},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			req := request(valid)
			tt.edit(&req)
			d, err := f.svc.Authorize(context.Background(), req)
			if err != nil {
				t.Fatalf("Authorize: %v", err)
			}
			if d.Outcome != authz.Unauthenticated || d.Reason != tt.reason || d.Message != tt.message {
				t.Fatalf("decision = %s %q %q (%q), want unauthenticated %q %q",
					d.Outcome, d.Reason, d.Message, d.Explanation, tt.reason, tt.message)
			}
			if d.Budget != nil || d.CacheTTL != 0 || d.Subject != (authz.Subject{}) {
				t.Fatalf("refusal carries budget %+v, cache TTL %v, subject %+v", d.Budget, d.CacheTTL, d.Subject)
			}
			if tt.message == authz.MsgForbiddenByAuth && len(d.Explanation) == 0 {
				t.Fatal("token refusal without an explanation")
			}
		})
	}
}

// TestAuthorizeLenientForms checks what GitLab accepts besides the exact
// forms: empty claims are not compared, and scheme and authentication type
// match case-insensitively.
func TestAuthorizeLenientForms(t *testing.T) {
	t.Parallel()
	f := setup(t)
	raw := mint(t, f.issuer, tokentest.Claims{})
	noRealm := mint(t, f.issuer, tokentest.Claims{Extra: map[string]any{"gitlab_realm": ""}})
	tests := []struct {
		name string
		edit func(*authz.Request)
	}{
		{"token without realm claim: header matches the registration", func(r *authz.Request) {
			r.Authorization = "Bearer " + noRealm
			r.Facts.Realm = "self-managed"
		}},
		{"token without realm claim, no header: the registration's realm", func(r *authz.Request) {
			r.Authorization = "Bearer " + noRealm
			r.Facts.Realm = ""
		}},
		{"scheme and authentication type in other case", func(r *authz.Request) {
			r.Authorization = "bearer " + raw
			r.AuthenticationType = "OIDC"
		}},
		{"surrounding whitespace", func(r *authz.Request) { r.Authorization = "  Bearer  " + raw + " " }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			req := request(raw)
			tt.edit(&req)
			d, err := f.svc.Authorize(context.Background(), req)
			if err != nil {
				t.Fatalf("Authorize: %v", err)
			}
			if d.Outcome != authz.Allow {
				t.Fatalf("decision = %s %q %q, want allow", d.Outcome, d.Reason, d.Message)
			}
			if d.Subject.Realm != "self-managed" {
				t.Fatalf("subject realm = %q, want the token's (or registration's) self-managed", d.Subject.Realm)
			}
		})
	}
}

// TestRealmWithoutClaimFollowsRegistration: a token without gitlab_realm
// cannot choose its realm by header. A header contradicting the instance's
// registration is refused like one contradicting a claim, and a realm
// switch catches the request even when the header is left out.
func TestRealmWithoutClaimFollowsRegistration(t *testing.T) {
	t.Parallel()
	f := setup(t)
	noRealm := mint(t, f.issuer, tokentest.Claims{Extra: map[string]any{"gitlab_realm": ""}})
	req := request(noRealm)
	req.Facts.Realm = "saas"
	d, err := f.svc.Authorize(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if d.Outcome != authz.Unauthenticated || d.Reason != "realm_mismatch" || d.Message != authz.MsgRealmHeader {
		t.Fatalf("header saas for a self-managed registration: %s %q %q; want realm_mismatch", d.Outcome, d.Reason, d.Message)
	}

	dir := t.TempDir()
	if err := os.CopyFS(dir, policies.FS()); err != nil {
		t.Fatal(err)
	}
	// The bundle's own tests assume no switches are set; a bundle needs
	// some test, so this one checks the switch.
	if err := os.WriteFile(filepath.Join(dir, "authz_test.rego"), []byte(`package cloudconnector.authz_test

import data.cloudconnector.authz

test_switch_set if count(data.switches.disabled) == 1
`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "switches", "data.yaml"),
		[]byte("disabled:\n  - {realm: self-managed, message: paused}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	engine, err := opa.New(context.Background(), opa.Config{Dir: dir}, discard)
	if err != nil {
		t.Fatal(err)
	}
	svc := authz.New(authz.Config{}, newVerifier(t, f.issuer.URL()),
		postgres.NewOrganizations(f.pool, postgres.OrganizationsConfig{}), engine, discard)
	req.Facts.Realm = ""
	d, err = svc.Authorize(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if d.Outcome != authz.Forbidden || d.Reason != "feature_disabled" || d.Subject.Realm != "self-managed" {
		t.Fatalf("realm switch without header or claim: %s %q realm %q; want feature_disabled for self-managed", d.Outcome, d.Reason, d.Subject.Realm)
	}
}

func TestAuthorizeForbidden(t *testing.T) {
	t.Parallel()
	f := setup(t)
	tests := []struct {
		name    string
		claims  tokentest.Claims
		edit    func(*authz.Request)
		reason  string
		message string
		orgID   string // "" for an unregistered instance
		plan    string
	}{
		{
			name:   "feature not in token scopes",
			claims: tokentest.Claims{Scopes: []string{"duo_chat"}},
			reason: "not_in_scopes", message: unauthorized, orgID: f.orgID, plan: "premium",
		},
		{
			name:   "no scopes at all",
			claims: tokentest.Claims{Scopes: []string{}},
			reason: "not_in_scopes", message: unauthorized, orgID: f.orgID, plan: "premium",
		},
		{
			name:   "unknown feature",
			claims: tokentest.Claims{Scopes: []string{"teleport"}},
			edit:   func(r *authz.Request) { r.Feature = "teleport" },
			reason: "unknown_feature", message: "Unauthorized to access teleport", orgID: f.orgID, plan: "premium",
		},
		{
			name:   "feature not served by the audience",
			claims: tokentest.Claims{Audience: []string{cicd}},
			edit:   func(r *authz.Request) { r.Audience = cicd },
			reason: "wrong_backend", message: unauthorized, orgID: f.orgID, plan: "premium",
		},
		{
			name:   "unregistered instance",
			claims: tokentest.Claims{Subject: "inst-unknown"},
			edit:   func(r *authz.Request) { r.Facts.InstanceID = "inst-unknown" },
			reason: "unknown_instance", message: unauthorized,
		},
		{
			name:   "plan without add-on after the free period",
			claims: tokentest.Claims{Subject: bareInstanceID},
			edit:   func(r *authz.Request) { r.Facts.InstanceID = bareInstanceID },
			reason: "not_entitled", message: unauthorized, orgID: f.bareOrgID, plan: "premium",
		},
		{
			name:   "gitlab version too old",
			edit:   func(r *authz.Request) { r.Facts.GitLabVersion = "16.7.9" },
			reason: "gitlab_version_too_old", message: unauthorized, orgID: f.orgID, plan: "premium",
		},
		{
			name:   "gitlab version not a version",
			edit:   func(r *authz.Request) { r.Facts.GitLabVersion = "latest" },
			reason: "gitlab_version_invalid", message: "Invalid X-Gitlab-Version header", orgID: f.orgID, plan: "premium",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			req := request(mint(t, f.issuer, tt.claims))
			if tt.edit != nil {
				tt.edit(&req)
			}
			d, err := f.svc.Authorize(context.Background(), req)
			if err != nil {
				t.Fatalf("Authorize: %v", err)
			}
			if d.Outcome != authz.Forbidden || d.Reason != tt.reason || d.Message != tt.message {
				t.Fatalf("decision = %s %q %q (%q), want forbidden %q %q",
					d.Outcome, d.Reason, d.Message, d.Explanation, tt.reason, tt.message)
			}
			if d.Budget != nil {
				t.Errorf("denial carries budget %+v", d.Budget)
			}
			if d.Subject.OrganizationID != tt.orgID || d.Subject.Plan != tt.plan || d.Subject.InstanceID != req.Facts.InstanceID {
				t.Errorf("subject = %+v, want organization %q plan %q instance %q", d.Subject, tt.orgID, tt.plan, req.Facts.InstanceID)
			}
			if d.CacheTTL != 30*time.Second || len(d.Explanation) == 0 || d.PolicyRevision == "" {
				t.Errorf("cache TTL %v, explanation %q, revision %q", d.CacheTTL, d.Explanation, d.PolicyRevision)
			}
		})
	}
}

// TestAuthorizeFreeAccessBeforeCutOff decides at an instant before
// complete_code's cut-off date: the organization without an add-on is let
// in on the free period, and entitlement after the cut-off is refused.
func TestAuthorizeFreeAccessBeforeCutOff(t *testing.T) {
	t.Parallel()
	f := setup(t)
	cutOff := time.Date(2024, 2, 15, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		name    string
		now     time.Time
		outcome authz.Outcome
		reason  string
	}{
		{"before cut-off", cutOff.Add(-time.Hour), authz.Allow, "entitled"},
		{"at cut-off", cutOff, authz.Forbidden, "not_entitled"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			svc := authz.New(authz.Config{Now: func() time.Time { return tt.now }}, newVerifier(t, f.issuer.URL()),
				postgres.NewOrganizations(f.pool, postgres.OrganizationsConfig{}), mustEngine(t), discard)
			req := request(mint(t, f.issuer, tokentest.Claims{Subject: bareInstanceID}))
			req.Facts.InstanceID = bareInstanceID
			d, err := svc.Authorize(context.Background(), req)
			if err != nil {
				t.Fatalf("Authorize: %v", err)
			}
			if d.Outcome != tt.outcome || d.Reason != tt.reason || d.Subject.OrganizationID != f.bareOrgID {
				t.Fatalf("decision = %s %q %+v (%q), want %s %q", d.Outcome, d.Reason, d.Subject, d.Explanation, tt.outcome, tt.reason)
			}
			if tt.outcome == authz.Allow && !strings.Contains(strings.Join(d.Explanation, "\n"), "free access until 2024-02-15") {
				t.Fatalf("explanation %q does not name the free period", d.Explanation)
			}
		})
	}
}

func TestAuthorizeInvalidRequest(t *testing.T) {
	t.Parallel()
	f := setup(t)
	raw := mint(t, f.issuer, tokentest.Claims{})
	tests := []struct {
		name string
		edit func(*authz.Request)
	}{
		{"empty feature", func(r *authz.Request) { r.Feature = "" }},
		{"empty audience", func(r *authz.Request) { r.Audience = "" }},
		// The gateway's mistake is reported before the client's.
		{"empty feature and no authorization", func(r *authz.Request) { r.Feature, r.Authorization = "", "" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			req := request(raw)
			tt.edit(&req)
			d, err := f.svc.Authorize(context.Background(), req)
			if !errors.Is(err, authz.ErrInvalidRequest) {
				t.Fatalf("Authorize = %+v, %v; want ErrInvalidRequest", d, err)
			}
		})
	}
}

func TestAuthorizeDatabaseDown(t *testing.T) {
	t.Parallel()
	f := setup(t)
	f.pool.Close()
	_, err := f.svc.Authorize(context.Background(), request(mint(t, f.issuer, tokentest.Claims{})))
	if !errors.Is(err, authz.ErrUnavailable) {
		t.Fatalf("err = %v, want ErrUnavailable", err)
	}
}

func TestAuthorizeIssuerUnreachable(t *testing.T) {
	t.Parallel()
	f := setup(t)
	srv := httptest.NewServer(nil)
	url := srv.URL
	srv.Close()
	iss, err := tokentest.New(url)
	if err != nil {
		t.Fatal(err)
	}
	svc := authz.New(authz.Config{}, newVerifier(t, url), postgres.NewOrganizations(f.pool, postgres.OrganizationsConfig{}),
		mustEngine(t), discard)
	_, err = svc.Authorize(context.Background(), request(mint(t, iss, tokentest.Claims{})))
	if !errors.Is(err, authz.ErrUnavailable) {
		t.Fatalf("err = %v, want ErrUnavailable", err)
	}
	if token.ReasonOf(err) != token.ReasonKeysUnavailable {
		t.Fatalf("err = %v, want it to wrap keys_unavailable", err)
	}
}

func TestAuthorizeMetrics(t *testing.T) {
	t.Parallel()
	f := setup(t)
	ctx := context.Background()
	raw := mint(t, f.issuer, tokentest.Claims{})
	for range 2 {
		if _, err := f.svc.Authorize(ctx, request(raw)); err != nil {
			t.Fatal(err)
		}
	}
	noAuth := request(raw)
	noAuth.Authorization = ""
	if _, err := f.svc.Authorize(ctx, noAuth); err != nil {
		t.Fatal(err)
	}
	bad := request(raw)
	bad.Feature = ""
	if _, err := f.svc.Authorize(ctx, bad); err == nil {
		t.Fatal("empty feature accepted")
	}
	want := `
# HELP cloudconnector_authz_decisions_total Authorization decisions by outcome and reason.
# TYPE cloudconnector_authz_decisions_total counter
cloudconnector_authz_decisions_total{outcome="allow",reason="entitled"} 2
cloudconnector_authz_decisions_total{outcome="error",reason=""} 1
cloudconnector_authz_decisions_total{outcome="unauthenticated",reason="missing_authorization"} 1
`
	if err := testutil.GatherAndCompare(f.reg, strings.NewReader(want), "cloudconnector_authz_decisions_total"); err != nil {
		t.Fatal(err)
	}
	if n, err := testutil.GatherAndCount(f.reg, "cloudconnector_authz_decision_seconds"); err != nil || n != 1 {
		t.Fatalf("latency histogram: %d series, %v", n, err)
	}
}

func mustEngine(t testing.TB) *opa.Engine {
	t.Helper()
	e, err := opa.New(context.Background(), opa.Config{}, discard)
	if err != nil {
		t.Fatalf("opa.New: %v", err)
	}
	return e
}

// BenchmarkAuthorize measures a whole decision for a cached organization:
// token verification, binding checks and policy evaluation.
func BenchmarkAuthorize(b *testing.B) {
	f := setup(b)
	ctx := context.Background()
	req := request(mint(b, f.issuer, tokentest.Claims{}))
	if d, err := f.svc.Authorize(ctx, req); err != nil || d.Outcome != authz.Allow {
		b.Fatalf("warm-up: %+v, %v", d, err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			d, err := f.svc.Authorize(ctx, req)
			if err != nil || d.Outcome != authz.Allow {
				b.Errorf("Authorize: %s, %v", d.Outcome, err)
				return
			}
		}
	})
}
