package decision_test

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/grpchealth"
	"connectrpc.com/grpcreflect"
	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/cloud-connector/cloud-connector/migrations/pgtest"
	authzv1 "github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1"
	"github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1/authzv1connect"
	"github.com/cloud-connector/cloud-connector/services/authz"
	"github.com/cloud-connector/cloud-connector/services/config"
	"github.com/cloud-connector/cloud-connector/services/decision"
	"github.com/cloud-connector/cloud-connector/services/postgres"
	"github.com/cloud-connector/cloud-connector/services/server/servertest"
	"github.com/cloud-connector/cloud-connector/services/token"
	"github.com/cloud-connector/cloud-connector/services/token/tokentest"
)

const (
	aiGateway  = "gitlab-ai-gateway"
	instanceID = "inst-1"
)

var discard = slog.New(slog.NewTextHandler(io.Discard, nil))

// service is a running decision service.
type service struct {
	issuer  *tokentest.Issuer
	baseURL string // the Authorize API, h2c
	admin   string // the admin port
	addrs   []string
	client  *http.Client // speaks HTTP/2 without TLS only
	stop    context.CancelFunc
	done    <-chan struct{} // closed when Run returns
	err     *error          // Run's result, once done is closed
}

// start runs the decision service on loopback ports against a fresh
// database with one premium organization owning instanceID with duo_pro,
// and waits until it answers /healthz. configure, if given, edits the
// config before New.
func start(t testing.TB, configure ...func(*decision.Config)) service {
	t.Helper()
	return startLogging(t, discard, configure...)
}

// startLogging is start with the service logging to logger.
func startLogging(t testing.TB, logger *slog.Logger, configure ...func(*decision.Config)) service {
	t.Helper()
	iss := tokentest.Start(t)
	dbURL := pgtest.URL(t)
	pool, err := pgxpool.New(context.Background(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	_, err = postgres.Upsert(context.Background(), pool, postgres.Seed{
		Name: "Acme", Plan: "premium",
		Instances: []postgres.SeedInstance{{ID: instanceID, Realm: "self-managed"}},
		AddOns:    []authz.AddOn{{Name: "duo_pro", Seats: 10}},
	})
	pool.Close()
	if err != nil {
		t.Fatalf("seed: %v", err)
	}

	cfg := decision.Config{
		Listen:      "127.0.0.1:0",
		AdminListen: "127.0.0.1:0",
		DatabaseURL: dbURL,
		Token: decision.TokenConfig{Issuers: []token.IssuerConfig{
			{Issuer: iss.URL(), Audiences: []string{aiGateway, "gitlab-cicd"}},
		}},
	}
	for _, f := range configure {
		f(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s, err := decision.New(ctx, cfg, logger)
	if err != nil {
		cancel()
		t.Fatalf("decision.New: %v", err)
	}
	done := make(chan struct{})
	var runErr error
	go func() {
		defer close(done)
		runErr = s.Run(ctx)
	}()
	// Stop before the database is dropped (cleanups run last-in first-out).
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})

	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	svc := service{
		issuer:  iss,
		baseURL: "http://" + s.Addr(),
		admin:   "http://" + s.AdminAddr(),
		addrs:   []string{s.Addr(), s.AdminAddr()},
		client:  &http.Client{Transport: &http.Transport{Protocols: &p}},
		stop:    cancel,
		done:    done,
		err:     &runErr,
	}
	t.Cleanup(svc.client.CloseIdleConnections)
	servertest.WaitHealthy(t, strings.TrimPrefix(svc.admin, "http://"))
	return svc
}

func get(t testing.TB, url string) (int, string) {
	t.Helper()
	res, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return res.StatusCode, string(b)
}

func authorizeRequest(t testing.TB, iss *tokentest.Issuer) *authzv1.AuthorizeRequest {
	t.Helper()
	raw, err := iss.Mint(tokentest.Claims{Subject: instanceID, Scopes: []string{"complete_code"}})
	if err != nil {
		t.Fatal(err)
	}
	return &authzv1.AuthorizeRequest{
		Authorization:      "Bearer " + raw,
		AuthenticationType: "oidc",
		Feature:            "complete_code",
		Audience:           aiGateway,
		Request: &authzv1.RequestFacts{
			Method: "POST", Path: "/v2/code/completions", InstanceId: instanceID,
			Realm: "self-managed", GitlabVersion: "17.6.0", RequestId: "req-1",
		},
	}
}

func TestReady(t *testing.T) {
	t.Parallel()
	s := start(t)
	code, body := get(t, s.admin+"/readyz")
	if code != http.StatusOK {
		t.Fatalf("/readyz = %d %s", code, body)
	}
	var doc struct{ Status string }
	if err := json.Unmarshal([]byte(body), &doc); err != nil || doc.Status != "ready" {
		t.Fatalf("/readyz body %q: %v", body, err)
	}
}

func TestAuthorize(t *testing.T) {
	t.Parallel()
	s := start(t)
	for _, p := range []struct {
		name string
		opts []connect.ClientOption
	}{
		{"connect", nil},
		{"grpc", []connect.ClientOption{connect.WithGRPC()}},
	} {
		t.Run(p.name, func(t *testing.T) {
			client := authzv1connect.NewAuthorizationServiceClient(s.client, s.baseURL, p.opts...)
			res, err := client.Authorize(context.Background(), connect.NewRequest(authorizeRequest(t, s.issuer)))
			if err != nil {
				t.Fatalf("Authorize: %v", err)
			}
			m := res.Msg
			if m.GetOutcome() != authzv1.Outcome_OUTCOME_ALLOW || m.GetBudget().GetBucket() != "code_suggestions" ||
				m.GetSubject().GetPlan() != "premium" || m.GetCacheTtl().AsDuration() != 30*time.Second {
				t.Fatalf("response = %v", m)
			}
		})
	}

	// Both calls are counted on the admin port.
	code, body := get(t, s.admin+"/metrics")
	want := `cloudconnector_authz_decisions_total{outcome="allow",reason="entitled"} 2`
	if code != http.StatusOK || !strings.Contains(body, want) {
		t.Fatalf("/metrics = %d, lacks %q:\n%s", code, want, grepLines(body, "cloudconnector_"))
	}
}

func TestAuthorizeRejectsOversizedRequest(t *testing.T) {
	t.Parallel()
	s := start(t)
	client := authzv1connect.NewAuthorizationServiceClient(s.client, s.baseURL, connect.WithGRPC())
	req := authorizeRequest(t, s.issuer)
	req.Authorization = strings.Repeat("a", 2<<20)
	_, err := client.Authorize(context.Background(), connect.NewRequest(req))
	if got := connect.CodeOf(err); got != connect.CodeResourceExhausted {
		t.Fatalf("code = %v (%v), want resource_exhausted", got, err)
	}
}

func TestHealth(t *testing.T) {
	t.Parallel()
	s := start(t)
	check := healthClient(t, s.client, s.baseURL)
	for _, service := range []string{"", authzv1connect.AuthorizationServiceName} {
		status, err := check(context.Background(), service)
		if err != nil {
			t.Fatalf("Check(%q): %v", service, err)
		}
		if status != grpchealth.StatusServing {
			t.Fatalf("Check(%q) = %v, want SERVING", service, status)
		}
	}
	if _, err := check(context.Background(), "acme.Unknown"); connect.CodeOf(err) != connect.CodeNotFound {
		t.Fatalf("Check(unknown service): %v, want not_found", err)
	}
}

// healthClient returns a gRPC client for grpc.health.v1.Health/Check, as
// grpc_health_probe and Kubernetes send it. grpchealth ships no client and
// keeps its generated types internal, so the messages are built from the
// public health.proto schema.
func healthClient(t testing.TB, httpClient *http.Client, baseURL string) func(context.Context, string) (grpchealth.Status, error) {
	t.Helper()
	method := healthCheckMethod(t)
	client := connect.NewClient[dynamicpb.Message, dynamicpb.Message](httpClient,
		baseURL+"/"+grpchealth.HealthV1ServiceName+"/Check",
		connect.WithGRPC(),
		connect.WithSchema(method),
		connect.WithResponseInitializer(func(_ connect.Spec, msg any) error {
			*msg.(*dynamicpb.Message) = *dynamicpb.NewMessage(method.Output())
			return nil
		}),
	)
	return func(ctx context.Context, service string) (grpchealth.Status, error) {
		req := dynamicpb.NewMessage(method.Input())
		req.Set(method.Input().Fields().ByName("service"), protoreflect.ValueOfString(service))
		res, err := client.CallUnary(ctx, connect.NewRequest(req))
		if err != nil {
			return 0, err
		}
		return grpchealth.Status(res.Msg.Get(method.Output().Fields().ByName("status")).Enum()), nil
	}
}

// healthCheckMethod describes grpc.health.v1.Health.Check
// (github.com/grpc/grpc-proto grpc/health/v1/health.proto).
func healthCheckMethod(t testing.TB) protoreflect.MethodDescriptor {
	t.Helper()
	fd, err := protodesc.NewFile(&descriptorpb.FileDescriptorProto{
		Name:    proto.String("grpc/health/v1/health.proto"),
		Package: proto.String("grpc.health.v1"),
		Syntax:  proto.String("proto3"),
		MessageType: []*descriptorpb.DescriptorProto{
			{
				Name: proto.String("HealthCheckRequest"),
				Field: []*descriptorpb.FieldDescriptorProto{{
					Name: proto.String("service"), JsonName: proto.String("service"), Number: proto.Int32(1),
					Label: descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL.Enum(),
					Type:  descriptorpb.FieldDescriptorProto_TYPE_STRING.Enum(),
				}},
			},
			{
				Name: proto.String("HealthCheckResponse"),
				Field: []*descriptorpb.FieldDescriptorProto{{
					Name: proto.String("status"), JsonName: proto.String("status"), Number: proto.Int32(1),
					Label:    descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL.Enum(),
					Type:     descriptorpb.FieldDescriptorProto_TYPE_ENUM.Enum(),
					TypeName: proto.String(".grpc.health.v1.HealthCheckResponse.ServingStatus"),
				}},
				EnumType: []*descriptorpb.EnumDescriptorProto{{
					Name: proto.String("ServingStatus"),
					Value: []*descriptorpb.EnumValueDescriptorProto{
						{Name: proto.String("UNKNOWN"), Number: proto.Int32(0)},
						{Name: proto.String("SERVING"), Number: proto.Int32(1)},
						{Name: proto.String("NOT_SERVING"), Number: proto.Int32(2)},
						{Name: proto.String("SERVICE_UNKNOWN"), Number: proto.Int32(3)},
					},
				}},
			},
		},
		Service: []*descriptorpb.ServiceDescriptorProto{{
			Name: proto.String("Health"),
			Method: []*descriptorpb.MethodDescriptorProto{{
				Name:       proto.String("Check"),
				InputType:  proto.String(".grpc.health.v1.HealthCheckRequest"),
				OutputType: proto.String(".grpc.health.v1.HealthCheckResponse"),
			}},
		}},
	}, new(protoregistry.Files))
	if err != nil {
		t.Fatalf("health.proto: %v", err)
	}
	return fd.Services().Get(0).Methods().Get(0)
}

func TestReflection(t *testing.T) {
	t.Parallel()
	s := start(t)
	stream := grpcreflect.NewClient(s.client, s.baseURL, connect.WithGRPC()).NewStream(context.Background())
	t.Cleanup(func() { stream.Close() })
	names, err := stream.ListServices()
	if err != nil {
		t.Fatalf("ListServices: %v", err)
	}
	for _, want := range []protoreflect.FullName{authzv1connect.AuthorizationServiceName, grpchealth.HealthV1ServiceName} {
		if !slices.Contains(names, want) {
			t.Fatalf("services = %v, want %s among them", names, want)
		}
	}
	// Every listed service can be described, as grpcurl does before a call.
	for _, name := range names {
		files, err := stream.FileContainingSymbol(name)
		if err != nil || len(files) == 0 {
			t.Fatalf("FileContainingSymbol(%s): %d files, %v", name, len(files), err)
		}
	}
}

func TestShutdown(t *testing.T) {
	t.Parallel()
	s := start(t)
	s.stop()
	select {
	case <-s.done:
		if err := *s.err; err != nil {
			t.Fatalf("Run = %v, want nil after cancel", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
	for _, addr := range s.addrs {
		if conn, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			conn.Close()
			t.Errorf("%s still accepts connections after Run returned", addr)
		}
	}
}

func TestNewInvalidConfig(t *testing.T) {
	t.Parallel()
	issuers := []token.IssuerConfig{{Issuer: "https://customers.example", Audiences: []string{aiGateway}}}
	tests := []struct {
		name string
		cfg  decision.Config
	}{
		{"no issuers", decision.Config{DatabaseURL: "postgres://127.0.0.1:5432/x"}},
		{"no database url", decision.Config{Token: decision.TokenConfig{Issuers: issuers}}},
		{"bad database url", decision.Config{DatabaseURL: "postgres://%zz", Token: decision.TokenConfig{Issuers: issuers}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tt.cfg.Listen, tt.cfg.AdminListen = "127.0.0.1:0", "127.0.0.1:0"
			s, err := decision.New(context.Background(), tt.cfg, discard)
			if err == nil {
				t.Fatalf("New accepted %+v: serving on %s", tt.cfg, s.Addr())
			}
		})
	}
}

// TestNewPortInUse checks that a failed New releases what it opened: the
// admin port it could not get is reported and the Authorize port it did
// get is free again.
func TestNewPortInUse(t *testing.T) {
	t.Parallel()
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { taken.Close() })
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	freeAddr := free.Addr().String()
	free.Close()

	_, err = decision.New(context.Background(), decision.Config{
		Listen: freeAddr, AdminListen: taken.Addr().String(), DatabaseURL: pgtest.URL(t),
		Token: decision.TokenConfig{Issuers: []token.IssuerConfig{{Issuer: "https://customers.example", Audiences: []string{aiGateway}}}},
	}, discard)
	if err == nil || !strings.Contains(err.Error(), taken.Addr().String()) {
		t.Fatalf("New with admin port in use: %v", err)
	}
	ln, err := net.Listen("tcp", freeAddr)
	if err != nil {
		t.Fatalf("Authorize port not released after failed New: %v", err)
	}
	ln.Close()
}

func grepLines(s, substr string) string {
	var out []string
	for l := range strings.Lines(s) {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "")
}

// throughProxy points c's database URL at a proxy that the test can cut.
func throughProxy(tb testing.TB, c *decision.Config) *servertest.Proxy {
	tb.Helper()
	u, err := url.Parse(c.DatabaseURL)
	if err != nil || u.Host == "" {
		tb.Skipf("database URL %q has no TCP host to proxy", c.DatabaseURL)
	}
	p := servertest.StartProxy(tb, u.Host)
	u.Host = p.Addr()
	c.DatabaseURL = u.String()
	return p
}

// TestDatabaseOutageKeepsReady checks that a Postgres outage does not take
// the decision service out of its Service: cached organizations keep
// answering, so it stays ready and keeps authorizing them, and reports the
// outage through cloudconnector_database_up instead.
func TestDatabaseOutageKeepsReady(t *testing.T) {
	t.Parallel()
	var db *servertest.Proxy
	s := start(t, func(c *decision.Config) {
		db = throughProxy(t, c)
		c.DatabaseCheckInterval = config.Duration(10 * time.Millisecond)
	})
	client := authzv1connect.NewAuthorizationServiceClient(s.client, s.baseURL)
	authorize := func() *authzv1.AuthorizeResponse {
		t.Helper()
		res, err := client.Authorize(context.Background(), connect.NewRequest(authorizeRequest(t, s.issuer)))
		if err != nil {
			t.Fatalf("Authorize: %v", err)
		}
		return res.Msg
	}
	databaseUp := func(v string) func() bool {
		return func() bool {
			_, body := get(t, s.admin+"/metrics")
			return strings.Contains(body, "\ncloudconnector_database_up "+v+"\n")
		}
	}
	if got := authorize().GetOutcome(); got != authzv1.Outcome_OUTCOME_ALLOW {
		t.Fatalf("outcome with the database up = %v", got)
	}
	if !databaseUp("1")() {
		t.Fatal("cloudconnector_database_up is not 1 with the database up")
	}

	db.Cut()
	if code, body := get(t, s.admin+"/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz with the database down = %d %s; want 200", code, body)
	}
	servertest.Eventually(t, "the outage on the gauge", databaseUp("0"))
	if code, body := get(t, s.admin+"/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz after the outage was noticed = %d %s; want 200", code, body)
	}
	if got := authorize().GetOutcome(); got != authzv1.Outcome_OUTCOME_ALLOW {
		t.Errorf("outcome for a cached organization with the database down = %v; want allow", got)
	}

	db.Restore()
	servertest.Eventually(t, "the recovery on the gauge", databaseUp("1"))
}

// TestNewRequiresMigratedSchema checks that the service refuses to start on
// a database the migration job has not brought to its schema version.
func TestNewRequiresMigratedSchema(t *testing.T) {
	t.Parallel()
	dbURL := pgtest.URL(t)
	pool, err := pgxpool.New(context.Background(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	if _, err := pool.Exec(context.Background(), "DROP TABLE schema_version"); err != nil {
		t.Fatal(err)
	}
	s, err := decision.New(context.Background(), decision.Config{
		Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", DatabaseURL: dbURL,
		Token: decision.TokenConfig{Issuers: []token.IssuerConfig{{Issuer: "https://customers.example", Audiences: []string{aiGateway}}}},
	}, discard)
	if err == nil {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		s.Run(ctx)
		t.Fatal("New started on an unmigrated database")
	}
	if !strings.Contains(err.Error(), "run migrations") {
		t.Fatalf("New error = %v; want one telling the operator to run migrations", err)
	}
}
