package authz_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	authzv1 "github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1"
	"github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1/authzv1connect"
	"github.com/cloud-connector/cloud-connector/services/authz"
	"github.com/cloud-connector/cloud-connector/services/opa"
	"github.com/cloud-connector/cloud-connector/services/postgres"
	"github.com/cloud-connector/cloud-connector/services/token/tokentest"
)

// protocols are the wire protocols gateways may use, each as client
// options.
var protocols = []struct {
	name string
	opts []connect.ClientOption
}{
	{"connect", nil},
	{"grpc", []connect.ClientOption{connect.WithGRPC()}},
	{"grpc-web", []connect.ClientOption{connect.WithGRPCWeb()}},
}

// logBuffer collects log output from concurrent handlers.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// serve serves svc's Connect handler over HTTP/2 with TLS, so every
// protocol (gRPC included) can reach it, and returns the server and the
// log its handler writes.
func serve(t testing.TB, svc *authz.Service) (*httptest.Server, *logBuffer) {
	t.Helper()
	logs := &logBuffer{}
	logger := slog.New(slog.NewTextHandler(logs, nil))
	mux := http.NewServeMux()
	mux.Handle(authzv1connect.NewAuthorizationServiceHandler(authz.NewHandler(svc, logger)))
	srv := httptest.NewUnstartedServer(mux)
	srv.EnableHTTP2 = true
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv, logs
}

// wireRequest is request(raw) as a gateway sends it.
func wireRequest(raw string) *authzv1.AuthorizeRequest {
	r := request(raw)
	f := r.Facts
	return &authzv1.AuthorizeRequest{
		Authorization:      r.Authorization,
		AuthenticationType: r.AuthenticationType,
		Feature:            r.Feature,
		Audience:           r.Audience,
		Request: &authzv1.RequestFacts{
			Method: f.Method, Path: f.Path, InstanceId: f.InstanceID, Realm: f.Realm,
			GlobalUserId: f.GlobalUserID, GitlabVersion: f.GitLabVersion, ClientType: f.ClientType,
			DeploymentType: f.DeploymentType, HostName: f.HostName, RequestId: f.RequestID,
		},
	}
}

func TestRPCDecisions(t *testing.T) {
	t.Parallel()
	f := setup(t)
	srv, _ := serve(t, f.svc)
	valid := mint(t, f.issuer, tokentest.Claims{})
	outOfScope := mint(t, f.issuer, tokentest.Claims{Scopes: []string{"duo_chat"}})
	for _, p := range protocols {
		t.Run(p.name, func(t *testing.T) {
			t.Parallel()
			client := authzv1connect.NewAuthorizationServiceClient(srv.Client(), srv.URL, p.opts...)
			ctx := context.Background()

			res, err := client.Authorize(ctx, connect.NewRequest(wireRequest(valid)))
			if err != nil {
				t.Fatalf("allow: %v", err)
			}
			m := res.Msg
			if m.GetOutcome() != authzv1.Outcome_OUTCOME_ALLOW || m.GetReason() != "entitled" || m.GetMessage() != "" {
				t.Errorf("allow: outcome %s reason %q message %q", m.GetOutcome(), m.GetReason(), m.GetMessage())
			}
			b := m.GetBudget()
			if b.GetBucket() != "code_suggestions" || b.GetLimit() != 600 || b.GetWindow().AsDuration() != time.Minute ||
				b.GetUnit() != "request" || b.GetKind() != authzv1.BudgetKind_BUDGET_KIND_RATE {
				t.Errorf("allow: budget %v", b)
			}
			s := m.GetSubject()
			if s.GetOrganizationId() != f.orgID || s.GetInstanceId() != instanceID || s.GetRealm() != "self-managed" ||
				s.GetGlobalUserId() != "user-1" || s.GetPlan() != "premium" {
				t.Errorf("allow: subject %v", s)
			}
			if m.GetCacheTtl().AsDuration() != 30*time.Second {
				t.Errorf("allow: cache_ttl %v, want 30s", m.GetCacheTtl())
			}
			if len(m.GetExplanation()) == 0 || m.GetPolicyRevision() == "" {
				t.Errorf("allow: explanation %q revision %q", m.GetExplanation(), m.GetPolicyRevision())
			}

			res, err = client.Authorize(ctx, connect.NewRequest(wireRequest(outOfScope)))
			if err != nil {
				t.Fatalf("forbidden: %v", err)
			}
			m = res.Msg
			if m.GetOutcome() != authzv1.Outcome_OUTCOME_FORBIDDEN || m.GetReason() != "not_in_scopes" ||
				m.GetMessage() != unauthorized || m.GetBudget() != nil || m.GetSubject().GetOrganizationId() != f.orgID {
				t.Errorf("forbidden: %v", m)
			}

			noAuth := wireRequest(valid)
			noAuth.Authorization = ""
			res, err = client.Authorize(ctx, connect.NewRequest(noAuth))
			if err != nil {
				t.Fatalf("unauthenticated: %v", err)
			}
			m = res.Msg
			if m.GetOutcome() != authzv1.Outcome_OUTCOME_UNAUTHENTICATED || m.GetReason() != "missing_authorization" ||
				m.GetMessage() != authz.MsgNoAuthorization {
				t.Errorf("unauthenticated: %v", m)
			}
			// Zero TTL means "do not cache" and is sent as an absent field.
			if m.CacheTtl != nil || m.Budget != nil {
				t.Errorf("unauthenticated: cache_ttl %v budget %v, want both absent", m.CacheTtl, m.Budget)
			}
		})
	}
}

func TestRPCInvalidArgument(t *testing.T) {
	t.Parallel()
	f := setup(t)
	srv, _ := serve(t, f.svc)
	raw := mint(t, f.issuer, tokentest.Claims{})
	for _, p := range protocols {
		t.Run(p.name, func(t *testing.T) {
			t.Parallel()
			client := authzv1connect.NewAuthorizationServiceClient(srv.Client(), srv.URL, p.opts...)
			for _, edit := range []func(*authzv1.AuthorizeRequest){
				func(r *authzv1.AuthorizeRequest) { r.Feature = "" },
				func(r *authzv1.AuthorizeRequest) { r.Audience = "" },
			} {
				req := wireRequest(raw)
				edit(req)
				_, err := client.Authorize(context.Background(), connect.NewRequest(req))
				if got := connect.CodeOf(err); got != connect.CodeInvalidArgument {
					t.Fatalf("code = %v (%v), want invalid_argument", got, err)
				}
			}
		})
	}
}

func TestRPCUnavailable(t *testing.T) {
	t.Parallel()
	f := setup(t)
	srv, logs := serve(t, f.svc)
	raw := mint(t, f.issuer, tokentest.Claims{})
	f.pool.Close()
	for _, p := range protocols {
		t.Run(p.name, func(t *testing.T) {
			t.Parallel()
			client := authzv1connect.NewAuthorizationServiceClient(srv.Client(), srv.URL, p.opts...)
			_, err := client.Authorize(context.Background(), connect.NewRequest(wireRequest(raw)))
			var ce *connect.Error
			if !errors.As(err, &ce) || ce.Code() != connect.CodeUnavailable {
				t.Fatalf("err = %v, want unavailable", err)
			}
			if ce.Message() != "authorization temporarily unavailable" {
				t.Fatalf("message = %q: internal detail must not reach the client", ce.Message())
			}
		})
	}
	t.Cleanup(func() {
		// The detail goes to the log, with the request id.
		if l := logs.String(); !strings.Contains(l, "find organization") || !strings.Contains(l, "request_id=req-1") {
			t.Errorf("log lacks the failure detail:\n%s", l)
		}
	})
}

// TestRPCInternal uses a real policy bundle that allows without a budget:
// the policy error becomes a generic internal error on the wire.
func TestRPCInternal(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "broken.rego"), `package cloudconnector.authz

decision := {"allow": true, "reason": "always"}
`)
	writeFile(t, filepath.Join(dir, "broken_test.rego"), `package cloudconnector.authz_test

test_allows if data.cloudconnector.authz.decision.allow
`)
	engine, err := opa.New(context.Background(), opa.Config{Dir: dir}, discard)
	if err != nil {
		t.Fatalf("opa.New: %v", err)
	}
	f := setup(t)
	svc := authz.New(authz.Config{}, newVerifier(t, f.issuer.URL()),
		postgres.NewOrganizations(f.pool, postgres.OrganizationsConfig{}), engine, discard)
	srv, logs := serve(t, svc)
	client := authzv1connect.NewAuthorizationServiceClient(srv.Client(), srv.URL)
	_, err = client.Authorize(context.Background(), connect.NewRequest(wireRequest(mint(t, f.issuer, tokentest.Claims{}))))
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != connect.CodeInternal || ce.Message() != "internal error" {
		t.Fatalf("err = %v, want internal: internal error", err)
	}
	if !strings.Contains(logs.String(), "without a budget") {
		t.Fatalf("log lacks the failure detail:\n%s", logs.String())
	}
}

// TestRPCQuotaBudget follows a CI/CD gateway: its feature is metered by a
// quota, which travels as BUDGET_KIND_QUOTA.
func TestRPCQuotaBudget(t *testing.T) {
	t.Parallel()
	f := setup(t)
	srv, _ := serve(t, f.svc)
	req := wireRequest(mint(t, f.issuer, tokentest.Claims{Audience: []string{cicd}, Scopes: []string{"ci_hosted_runners"}}))
	req.Feature, req.Audience = "ci_hosted_runners", cicd
	client := authzv1connect.NewAuthorizationServiceClient(srv.Client(), srv.URL, connect.WithGRPC())
	res, err := client.Authorize(context.Background(), connect.NewRequest(req))
	if err != nil {
		t.Fatal(err)
	}
	b := res.Msg.GetBudget()
	if res.Msg.GetOutcome() != authzv1.Outcome_OUTCOME_ALLOW || b.GetKind() != authzv1.BudgetKind_BUDGET_KIND_QUOTA ||
		b.GetBucket() != "ci_hosted_runners" || b.GetLimit() != 10000 || b.GetWindow().AsDuration() != 30*24*time.Hour {
		t.Fatalf("response = %v", res.Msg)
	}
}

func writeFile(t testing.TB, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}
