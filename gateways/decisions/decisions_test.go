package decisions_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/cloud-connector/cloud-connector/gateways/decisions"
	authzv1 "github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1"
	"github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1/authzv1connect"
)

// fakeService is a decision service answering every call with the
// response the test set, counting calls.
type fakeService struct {
	authzv1connect.UnimplementedAuthorizationServiceHandler
	mu    sync.Mutex
	res   *authzv1.AuthorizeResponse
	err   error
	calls int
	last  *authzv1.AuthorizeRequest
}

func (f *fakeService) Authorize(_ context.Context, req *connect.Request[authzv1.AuthorizeRequest]) (*connect.Response[authzv1.AuthorizeResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.last = proto.CloneOf(req.Msg)
	if f.err != nil {
		return nil, f.err
	}
	return connect.NewResponse(proto.CloneOf(f.res)), nil
}

func (f *fakeService) set(res *authzv1.AuthorizeResponse, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.res, f.err = res, err
}

func (f *fakeService) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

// clock is a time source the test moves by hand.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

type fixture struct {
	svc    *fakeService
	srv    *httptest.Server
	client *decisions.Client
	clock  *clock
	reg    *prometheus.Registry
}

// setup serves a fake decision service over HTTP/2 cleartext (what the
// client speaks by default) and returns a client of it on a manual clock.
func setup(tb testing.TB, cfg decisions.Config) fixture {
	tb.Helper()
	svc := &fakeService{res: allow(time.Minute)}
	_, h := authzv1connect.NewAuthorizationServiceHandler(svc)
	srv := httptest.NewUnstartedServer(h)
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	srv.Config.Protocols = &p
	srv.Start()
	tb.Cleanup(srv.Close)

	clk := &clock{now: time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)}
	reg := prometheus.NewRegistry()
	cfg.URL = srv.URL
	if cfg.Now == nil {
		cfg.Now = clk.Now
	}
	cfg.Registerer = reg
	c, err := decisions.New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	return fixture{svc: svc, srv: srv, client: c, clock: clk, reg: reg}
}

func allow(ttl time.Duration) *authzv1.AuthorizeResponse {
	return &authzv1.AuthorizeResponse{
		Outcome: authzv1.Outcome_OUTCOME_ALLOW,
		Reason:  "allowed",
		Budget: &authzv1.Budget{
			Bucket: "complete_code", Limit: 100, Window: durationpb.New(time.Hour), Unit: "request",
			Kind: authzv1.BudgetKind_BUDGET_KIND_RATE,
		},
		Subject: &authzv1.Subject{
			OrganizationId: "0b9e7b5e-5d0a-4b7c-9b1e-1f6f9c2d1a11", InstanceId: "inst-1", Realm: "self-managed",
			GlobalUserId: "user-1", Plan: "premium",
		},
		CacheTtl: durationpb.New(ttl),
	}
}

// request has a distinct non-empty value in every field.
func request() *authzv1.AuthorizeRequest {
	return &authzv1.AuthorizeRequest{
		Authorization:      "Bearer token-1",
		AuthenticationType: "oidc",
		Feature:            "complete_code",
		Audience:           "gitlab-ai-gateway",
		Request: &authzv1.RequestFacts{
			Method:         "POST",
			Path:           "/v2/code/completions",
			InstanceId:     "inst-1",
			Realm:          "self-managed",
			GlobalUserId:   "user-1",
			GitlabVersion:  "17.6.0",
			ClientType:     "vscode",
			DeploymentType: "self-managed",
			HostName:       "gitlab.example.com",
			RequestId:      "req-1",
		},
	}
}

func decide(tb testing.TB, c *decisions.Client, req *authzv1.AuthorizeRequest) decisions.Decision {
	tb.Helper()
	d, err := c.Decide(context.Background(), req)
	if err != nil {
		tb.Fatalf("Decide: %v", err)
	}
	return d
}

func TestNewRequiresURL(t *testing.T) {
	t.Parallel()
	if _, err := decisions.New(decisions.Config{}); err == nil {
		t.Fatal("New without a URL: nil error")
	}
}

// TestDecidePassesResponse: an allow comes back as the service sent it,
// then from the cache.
func TestDecidePassesResponse(t *testing.T) {
	t.Parallel()
	f := setup(t, decisions.Config{})
	res := allow(time.Minute)
	res.Budget.Kind = authzv1.BudgetKind_BUDGET_KIND_QUOTA
	f.svc.set(res, nil)

	d := decide(t, f.client, request())
	if d.Cached || !proto.Equal(d.AuthorizeResponse, res) {
		t.Fatalf("Decide = %v (cached %v); want %v, not cached", d.AuthorizeResponse, d.Cached, res)
	}
	if !proto.Equal(f.svc.last, request()) {
		t.Errorf("service got %v; want the request as given %v", f.svc.last, request())
	}
	d = decide(t, f.client, request())
	if !d.Cached || !proto.Equal(d.AuthorizeResponse, res) {
		t.Errorf("second Decide = %v (cached %v); want the same decision, cached", d.AuthorizeResponse, d.Cached)
	}
	if n := f.svc.count(); n != 1 {
		t.Errorf("service calls = %d; want 1", n)
	}
}

func TestDecideDenials(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		res     *authzv1.AuthorizeResponse
		outcome authzv1.Outcome
		reason  string
		message string
	}{
		{"unauthenticated",
			&authzv1.AuthorizeResponse{Outcome: authzv1.Outcome_OUTCOME_UNAUTHENTICATED, Reason: "token_expired", Message: "Forbidden by auth provider"},
			authzv1.Outcome_OUTCOME_UNAUTHENTICATED, "token_expired", "Forbidden by auth provider"},
		{"forbidden",
			&authzv1.AuthorizeResponse{Outcome: authzv1.Outcome_OUTCOME_FORBIDDEN, Reason: "not_in_scopes", Message: "Unauthorized to access complete_code"},
			authzv1.Outcome_OUTCOME_FORBIDDEN, "not_in_scopes", "Unauthorized to access complete_code"},
		// Fail closed: anything that is not a clear allow is a refusal.
		{"unspecified outcome",
			&authzv1.AuthorizeResponse{Outcome: authzv1.Outcome_OUTCOME_UNSPECIFIED, Budget: allow(0).Budget, Message: "m"},
			authzv1.Outcome_OUTCOME_FORBIDDEN, "", "m"},
		{"unknown outcome",
			&authzv1.AuthorizeResponse{Outcome: authzv1.Outcome(42), Budget: allow(0).Budget, Message: "m"},
			authzv1.Outcome_OUTCOME_FORBIDDEN, "", "m"},
		{"allow without budget",
			&authzv1.AuthorizeResponse{Outcome: authzv1.Outcome_OUTCOME_ALLOW, Reason: "allowed"},
			authzv1.Outcome_OUTCOME_FORBIDDEN, "no_budget", "Unauthorized to access complete_code"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := setup(t, decisions.Config{})
			f.svc.set(tc.res, nil)
			d := decide(t, f.client, request())
			if d.Outcome != tc.outcome || d.Reason != tc.reason || d.Message != tc.message {
				t.Fatalf("Decide = {Outcome:%v Reason:%q Message:%q}; want {%v %q %q}",
					d.Outcome, d.Reason, d.Message, tc.outcome, tc.reason, tc.message)
			}
		})
	}
}

// TestDecideCacheKey changes one field of the request at a time: every
// field but request_id is part of the decision, so every change but that
// one must reach the service. The table must name every field of the
// protos, so a field added later cannot be forgotten by the cache key.
func TestDecideCacheKey(t *testing.T) {
	t.Parallel()
	cases := []struct {
		field  string // full proto name of the field changed
		change func(*authzv1.AuthorizeRequest)
		cached bool
	}{
		{"cloudconnector.authz.v1.AuthorizeRequest.authorization", func(r *authzv1.AuthorizeRequest) { r.Authorization = "Bearer token-2" }, false},
		{"cloudconnector.authz.v1.AuthorizeRequest.authentication_type", func(r *authzv1.AuthorizeRequest) { r.AuthenticationType = "oauth" }, false},
		{"cloudconnector.authz.v1.AuthorizeRequest.feature", func(r *authzv1.AuthorizeRequest) { r.Feature = "duo_chat" }, false},
		{"cloudconnector.authz.v1.AuthorizeRequest.audience", func(r *authzv1.AuthorizeRequest) { r.Audience = "gitlab-duo-workflow-service" }, false},
		{"cloudconnector.authz.v1.AuthorizeRequest.request", func(r *authzv1.AuthorizeRequest) { r.Request = nil }, false},
		{"cloudconnector.authz.v1.RequestFacts.method", func(r *authzv1.AuthorizeRequest) { r.Request.Method = "GET" }, false},
		{"cloudconnector.authz.v1.RequestFacts.path", func(r *authzv1.AuthorizeRequest) { r.Request.Path = "/v2/completions" }, false},
		{"cloudconnector.authz.v1.RequestFacts.instance_id", func(r *authzv1.AuthorizeRequest) { r.Request.InstanceId = "inst-2" }, false},
		{"cloudconnector.authz.v1.RequestFacts.realm", func(r *authzv1.AuthorizeRequest) { r.Request.Realm = "saas" }, false},
		{"cloudconnector.authz.v1.RequestFacts.global_user_id", func(r *authzv1.AuthorizeRequest) { r.Request.GlobalUserId = "user-2" }, false},
		{"cloudconnector.authz.v1.RequestFacts.gitlab_version", func(r *authzv1.AuthorizeRequest) { r.Request.GitlabVersion = "17.7.0" }, false},
		{"cloudconnector.authz.v1.RequestFacts.client_type", func(r *authzv1.AuthorizeRequest) { r.Request.ClientType = "jetbrains" }, false},
		{"cloudconnector.authz.v1.RequestFacts.deployment_type", func(r *authzv1.AuthorizeRequest) { r.Request.DeploymentType = "dedicated" }, false},
		{"cloudconnector.authz.v1.RequestFacts.host_name", func(r *authzv1.AuthorizeRequest) { r.Request.HostName = "other.example.com" }, false},
		{"cloudconnector.authz.v1.RequestFacts.request_id", func(r *authzv1.AuthorizeRequest) { r.Request.RequestId = "req-2" }, true},
	}

	named := map[protoreflect.FullName]bool{}
	for _, tc := range cases {
		named[protoreflect.FullName(tc.field)] = true
	}
	for _, md := range []protoreflect.MessageDescriptor{
		(&authzv1.AuthorizeRequest{}).ProtoReflect().Descriptor(),
		(&authzv1.RequestFacts{}).ProtoReflect().Descriptor(),
	} {
		for i := range md.Fields().Len() {
			if fd := md.Fields().Get(i); !named[fd.FullName()] {
				t.Errorf("field %s is not in the cache key table", fd.FullName())
			}
		}
	}

	for _, tc := range cases {
		name := tc.field[strings.LastIndex(tc.field, ".")+1:]
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			f := setup(t, decisions.Config{})
			decide(t, f.client, request())
			req := request()
			tc.change(req)
			if proto.Equal(req, request()) {
				t.Fatal("change left the request as it was")
			}
			d := decide(t, f.client, req)
			wantCalls := 2
			if tc.cached {
				wantCalls = 1
			}
			if n := f.svc.count(); n != wantCalls || d.Cached != tc.cached {
				t.Errorf("after changing %s: service calls = %d, cached = %v; want %d, %v", name, n, d.Cached, wantCalls, tc.cached)
			}
			// The changed request is now cached in its own right.
			if d := decide(t, f.client, req); !d.Cached {
				t.Errorf("changed request not cached on repeat")
			}
		})
	}
}

// TestDecideCacheKeyFieldBoundaries: moving bytes from one field to the
// next must not produce the same key.
func TestDecideCacheKeyFieldBoundaries(t *testing.T) {
	t.Parallel()
	f := setup(t, decisions.Config{})
	a := request()
	a.Authorization, a.AuthenticationType = "Bearer ab", "c"
	b := request()
	b.Authorization, b.AuthenticationType = "Bearer a", "bc"
	c := request()
	c.Request.InstanceId, c.Request.Realm = "", "inst-1self-managed"
	decide(t, f.client, a)
	if d := decide(t, f.client, b); d.Cached {
		t.Error("shifting bytes between authorization and authentication_type hit the cache")
	}
	decide(t, f.client, request())
	if d := decide(t, f.client, c); d.Cached {
		t.Error("shifting bytes between instance_id and realm hit the cache")
	}
}

func TestDecideExpiry(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		ttl     time.Duration
		maxTTL  time.Duration
		expires time.Duration // how long the decision is served from cache; 0: not cached
	}{
		{"policy ttl", 30 * time.Second, 0, 30 * time.Second},
		{"capped by default max", time.Hour, 0, 5 * time.Minute},
		{"capped by max", time.Hour, 10 * time.Second, 10 * time.Second},
		{"zero ttl", 0, 0, 0},
		{"negative ttl", -time.Minute, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := setup(t, decisions.Config{MaxTTL: tc.maxTTL})
			f.svc.set(allow(tc.ttl), nil)
			if d := decide(t, f.client, request()); d.Cached {
				t.Fatal("first Decide cached")
			}
			if tc.expires == 0 {
				if d := decide(t, f.client, request()); d.Cached {
					t.Errorf("ttl %v: decision cached", tc.ttl)
				}
				if n := f.svc.count(); n != 2 {
					t.Errorf("service calls = %d; want 2", n)
				}
				return
			}
			f.clock.advance(tc.expires - time.Nanosecond)
			if d := decide(t, f.client, request()); !d.Cached {
				t.Errorf("just before expiry: not cached")
			}
			f.clock.advance(time.Nanosecond)
			if d := decide(t, f.client, request()); d.Cached {
				t.Errorf("at expiry: still cached")
			}
			if n := f.svc.count(); n != 2 {
				t.Errorf("service calls = %d; want 2", n)
			}
		})
	}
}

func TestDecideUnavailable(t *testing.T) {
	t.Parallel()
	t.Run("service error", func(t *testing.T) {
		t.Parallel()
		f := setup(t, decisions.Config{})
		f.svc.set(nil, connect.NewError(connect.CodeInternal, errors.New("boom")))
		_, err := f.client.Decide(context.Background(), request())
		if !errors.Is(err, decisions.ErrUnavailable) {
			t.Fatalf("Decide error = %v; want ErrUnavailable", err)
		}
		if got := lookups(t, f.reg, "error"); got != 1 {
			t.Errorf("error lookups = %v; want 1", got)
		}
	})
	t.Run("service down keeps cached decisions until they expire", func(t *testing.T) {
		t.Parallel()
		f := setup(t, decisions.Config{})
		f.svc.set(allow(time.Minute), nil)
		decide(t, f.client, request())
		f.srv.Close()

		req := request()
		req.Request.RequestId = "another"
		if d := decide(t, f.client, req); !d.Cached || d.Outcome != authzv1.Outcome_OUTCOME_ALLOW {
			t.Errorf("with the service down, Decide = %+v; want the cached allow", d)
		}
		other := request()
		other.Authorization = "Bearer other"
		if _, err := f.client.Decide(context.Background(), other); !errors.Is(err, decisions.ErrUnavailable) {
			t.Errorf("uncached request with the service down: error %v; want ErrUnavailable", err)
		}
		f.clock.advance(time.Minute)
		if _, err := f.client.Decide(context.Background(), request()); !errors.Is(err, decisions.ErrUnavailable) {
			t.Errorf("expired request with the service down: error %v; want ErrUnavailable", err)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		t.Parallel()
		release := make(chan struct{})
		t.Cleanup(func() { close(release) })
		_, h := authzv1connect.NewAuthorizationServiceHandler(blockingService{release})
		srv := httptest.NewServer(h)
		t.Cleanup(srv.Close)
		c, err := decisions.New(decisions.Config{URL: srv.URL, Timeout: 20 * time.Millisecond, HTTPClient: srv.Client()})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Decide(context.Background(), request()); !errors.Is(err, decisions.ErrUnavailable) {
			t.Fatalf("Decide error = %v; want ErrUnavailable", err)
		}
	})
}

type blockingService struct {
	release chan struct{}
}

func (b blockingService) Authorize(ctx context.Context, _ *connect.Request[authzv1.AuthorizeRequest]) (*connect.Response[authzv1.AuthorizeResponse], error) {
	select {
	case <-b.release:
	case <-ctx.Done():
	}
	return nil, connect.NewError(connect.CodeUnavailable, errors.New("released"))
}

func TestDecideCacheSize(t *testing.T) {
	t.Parallel()
	f := setup(t, decisions.Config{CacheSize: 1})
	a, b := request(), request()
	b.Authorization = "Bearer b"
	decide(t, f.client, a)
	decide(t, f.client, b) // evicts a
	if d := decide(t, f.client, a); d.Cached {
		t.Error("evicted decision served from cache")
	}
	if n := f.svc.count(); n != 3 {
		t.Errorf("service calls = %d; want 3", n)
	}
}

func TestDecideMetrics(t *testing.T) {
	t.Parallel()
	f := setup(t, decisions.Config{})
	decide(t, f.client, request())
	decide(t, f.client, request())
	decide(t, f.client, request())
	if got := lookups(t, f.reg, "miss"); got != 1 {
		t.Errorf("miss lookups = %v; want 1", got)
	}
	if got := lookups(t, f.reg, "hit"); got != 2 {
		t.Errorf("hit lookups = %v; want 2", got)
	}
}

// lookups returns the value of the lookups counter with result label.
func lookups(tb testing.TB, reg *prometheus.Registry, result string) float64 {
	tb.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		tb.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "cloudconnector_gateway_decision_lookups_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "result" && l.GetValue() == result {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}
