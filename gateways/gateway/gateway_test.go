package gateway_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/grpchealth"
	"github.com/jackc/pgx/v5/pgxpool"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/cloud-connector/cloud-connector/gateways/gateway"
	"github.com/cloud-connector/cloud-connector/gateways/route"
	"github.com/cloud-connector/cloud-connector/migrations/pgtest"
	authzv1 "github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1"
	"github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1/authzv1connect"
	"github.com/cloud-connector/cloud-connector/services/config"
	"github.com/cloud-connector/cloud-connector/services/server/servertest"
)

// Identity the fake decision service puts in the subject of its allows.
const (
	orgID      = "6f1c1e5e-4a8b-4f7e-9a51-3b2d9c0e7a10"
	instanceID = "inst-1"
	realm      = "self-managed"
	plan       = "premium"
)

// longWindow is a budget window (about 34 years, aligned to the epoch) that
// no test run straddles, so budgets never reset under a test.
const longWindow = time.Duration(1<<30) * time.Second

// fakeDecider is the decision service: it answers with the response set
// for the request's bearer token and counts calls.
type fakeDecider struct {
	authzv1connect.UnimplementedAuthorizationServiceHandler
	srv *httptest.Server

	mu      sync.Mutex
	byToken map[string]*authzv1.AuthorizeResponse
	calls   int
	reqs    []*authzv1.AuthorizeRequest
	// traceparents has each call's traceparent header.
	traceparents []string
}

func (f *fakeDecider) Authorize(_ context.Context, req *connect.Request[authzv1.AuthorizeRequest]) (*connect.Response[authzv1.AuthorizeResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.reqs = append(f.reqs, proto.CloneOf(req.Msg))
	f.traceparents = append(f.traceparents, req.Header().Get("Traceparent"))
	auth := req.Msg.GetAuthorization()
	if auth == "" {
		return connect.NewResponse(&authzv1.AuthorizeResponse{
			Outcome: authzv1.Outcome_OUTCOME_UNAUTHENTICATED, Reason: "missing_token", Message: "No authorization header presented",
		}), nil
	}
	res, ok := f.byToken[strings.TrimPrefix(auth, "Bearer ")]
	if !ok {
		res = &authzv1.AuthorizeResponse{
			Outcome: authzv1.Outcome_OUTCOME_UNAUTHENTICATED, Reason: "bad_token", Message: "Invalid authorization header",
		}
	}
	return connect.NewResponse(proto.CloneOf(res)), nil
}

// set makes the service answer res for "Bearer token".
func (f *fakeDecider) set(token string, res *authzv1.AuthorizeResponse) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.byToken[token] = res
}

func (f *fakeDecider) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

func (f *fakeDecider) last(tb testing.TB) *authzv1.AuthorizeRequest {
	tb.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.reqs) == 0 {
		tb.Fatal("the decision service was not called")
	}
	return f.reqs[len(f.reqs)-1]
}

// allowed is an allow with a rate budget of limit per longWindow, cached
// for ttl.
func allowed(ttl time.Duration, limit int64) *authzv1.AuthorizeResponse {
	return &authzv1.AuthorizeResponse{
		Outcome: authzv1.Outcome_OUTCOME_ALLOW,
		Reason:  "allowed",
		Budget: &authzv1.Budget{
			Bucket: "complete_code", Limit: limit, Window: durationpb.New(longWindow), Unit: "request",
			Kind: authzv1.BudgetKind_BUDGET_KIND_RATE,
		},
		Subject: &authzv1.Subject{
			OrganizationId: orgID, InstanceId: instanceID, Realm: realm, GlobalUserId: "user-from-token", Plan: plan,
		},
		CacheTtl: durationpb.New(ttl),
	}
}

// startFake serves the fake decision service over HTTP/1.1 and HTTP/2
// cleartext with prior knowledge, which the gateway's client uses.
func startFake(tb testing.TB) *fakeDecider {
	tb.Helper()
	f := &fakeDecider{byToken: map[string]*authzv1.AuthorizeResponse{
		"allow":  allowed(0, 1<<40),
		"cached": allowed(time.Minute, 1<<40),
		"unauth": {
			Outcome: authzv1.Outcome_OUTCOME_UNAUTHENTICATED, Reason: "token_invalid", Message: "Forbidden by auth provider",
			CacheTtl: durationpb.New(time.Minute),
		},
		"forbidden": {
			Outcome: authzv1.Outcome_OUTCOME_FORBIDDEN, Reason: "not_in_scopes", Message: "Unauthorized to access complete_code",
			CacheTtl: durationpb.New(time.Minute),
		},
	}}
	_, h := authzv1connect.NewAuthorizationServiceHandler(f)
	f.srv = startServer(tb, h, true)
	return f
}

// startServer starts an httptest server; with h2c it also speaks HTTP/2
// cleartext.
func startServer(tb testing.TB, h http.Handler, h2c bool) *httptest.Server {
	tb.Helper()
	srv := httptest.NewUnstartedServer(h)
	if h2c {
		var p http.Protocols
		p.SetHTTP1(true)
		p.SetUnencryptedHTTP2(true)
		srv.Config.Protocols = &p
	}
	srv.Start()
	tb.Cleanup(srv.Close)
	return srv
}

// seen is what the echo backend saw, sent back as its JSON body.
type seen struct {
	Backend    string      `json:"backend"`
	Proto      string      `json:"proto"`
	Method     string      `json:"method"`
	Path       string      `json:"path"`
	RawPath    string      `json:"raw_path"`
	RequestURI string      `json:"request_uri"`
	Query      string      `json:"query"`
	Host       string      `json:"host"`
	Header     http.Header `json:"header"`
	Body       string      `json:"body"`
}

// echo answers with what it saw, reports 42 units and sends headers a
// gateway must not pass on.
func echo(name string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		h := w.Header()
		h.Set("Content-Type", "application/json")
		h.Set("X-Backend", name)
		h.Set("X-Cloud-Connector-Units", "42")
		h.Set("X-Cloud-Connector-Internal", "backend secret")
		h.Set("Connection", "X-Back-Hop")
		h.Set("X-Back-Hop", "hop")
		h.Set("Keep-Alive", "timeout=5")
		json.NewEncoder(w).Encode(seen{
			Backend: name, Proto: r.Proto, Method: r.Method, Path: r.URL.Path, RawPath: r.URL.RawPath,
			RequestURI: r.RequestURI, Query: r.URL.RawQuery, Host: r.Host, Header: r.Header, Body: string(body),
		})
	}
}

// wsEcho switches protocols by hand (as a WebSocket server would), greets
// and echoes lines until the connection closes.
func wsEcho(w http.ResponseWriter, r *http.Request) {
	if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		http.Error(w, "upgrade required", http.StatusUpgradeRequired)
		return
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		http.Error(w, "hijack: "+err.Error(), http.StatusInternalServerError)
		return
	}
	defer conn.Close()
	fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"X-Seen-Feature: %s\r\nX-Seen-Proto: %s\r\n\r\nwelcome\n", r.Header.Get("X-Cloud-Connector-Feature"), r.Proto)
	if brw.Flush() != nil {
		return
	}
	for {
		line, err := brw.ReadString('\n')
		if err != nil {
			return
		}
		brw.WriteString("echo:" + line)
		if brw.Flush() != nil {
			return
		}
	}
}

// backendMux serves gRPC health, WebSocket echo, a backend that never
// answers, and everything else with fallback. It does not clean paths
// (http.ServeMux would redirect), so tests see paths as they arrive.
func backendMux(fallback http.Handler) http.Handler {
	healthPath, health := grpchealth.NewHandler(grpchealth.NewStaticChecker("cloudconnector.Test"))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch p := r.URL.Path; {
		case strings.HasPrefix(p, healthPath):
			health.ServeHTTP(w, r)
		case p == "/v1/ws" || p == "/v1/ws-h2":
			wsEcho(w, r)
		case p == "/v1/slow":
			// Read the body first: only then does the server notice the
			// gateway hanging up, which is what ends this handler.
			io.Copy(io.Discard, r.Body)
			<-r.Context().Done()
		default:
			fallback.ServeHTTP(w, r)
		}
	})
}

// testRoutes is the route table of most tests; paths are under /ai.
func testRoutes() []route.Route {
	return []route.Route{
		{Name: "code_completions", Path: "/v2/code/completions", Methods: []string{"POST"}, Feature: "complete_code", Backend: "main"},
		{Name: "code_suggestions", Path: "/v4/code/suggestions", Methods: []string{"POST"}, Feature: "generate_code", Backend: "main"},
		{Name: "chat_agent", Path: "/v2/chat/agent", Methods: []string{"POST"}, Feature: "duo_chat", Backend: "main"},
		{Name: "stream_h2", Path: "/v1/stream-h2", Methods: []string{"POST"}, Feature: "duo_chat", Backend: "h2"},
		{Name: "prompts", Path: "/v1/prompts/*", Methods: []string{"POST"}, FeatureHeader: "X-Gitlab-Unit-Primitive",
			Features: []string{"complete_code", "duo_chat"}, Backend: "main"},
		{Name: "ws", Path: "/v1/ws", Methods: []string{"GET"}, Feature: "duo_chat", Backend: "main"},
		{Name: "ws_h2", Path: "/v1/ws-h2", Methods: []string{"GET"}, Feature: "duo_chat", Backend: "h2"},
		{Name: "health_grpc", Path: "/grpc.health.v1.Health/Check", Methods: []string{"POST"},
			Feature: "duo_workflow_execute_workflow", Backend: "h2", MaxRequestBytes: -1},
		{Name: "small", Path: "/v1/small", Methods: []string{"POST"}, Feature: "complete_code", Backend: "main", MaxRequestBytes: 16},
		{Name: "slow", Path: "/v1/slow", Methods: []string{"POST"}, Feature: "complete_code", Backend: "main",
			Timeout: config.Duration(50 * time.Millisecond)},
		{Name: "down", Path: "/v1/down", Methods: []string{"POST"}, Feature: "complete_code", Backend: "down"},
		{Name: "fail_open", Path: "/v1/open", Methods: []string{"POST"}, Feature: "complete_code", Backend: "main",
			BudgetFailMode: route.FailOpen},
		{Name: "models", Path: "/v1/models/definitions", Methods: []string{"GET"}, Public: true, Backend: "main"},
	}
}

// options adjust setup.
type options struct {
	// handler answers backend requests the backend mux does not handle
	// itself; default echo.
	handler http.Handler
	// configure edits the gateway config before New.
	configure func(*gateway.Config)
	// noExport leaves Config.TracerProvider nil, as in production without
	// an OTLP endpoint: spans carry ids but are not recorded. By default
	// the gateway records its spans into env.spans, so every test also
	// runs the proxy under a recorded trace.
	noExport bool
}

// env is a running gateway with its fake decision service, backends and
// database.
type env struct {
	g      *gateway.Gateway
	cfg    gateway.Config
	base   string // public URL including the prefix
	fake   *fakeDecider
	dbURL  string
	client *http.Client
	logs   *servertest.Buffer
	// spans receives the gateway's spans as they end; nil with noExport.
	spans *tracetest.InMemoryExporter
	// stop cancels Run and waits for it to return; later calls return the
	// first result. Usage events are in the database once it returns.
	stop func() error
}

func setup(tb testing.TB, o options) *env {
	tb.Helper()
	logs := &servertest.Buffer{}
	tb.Cleanup(func() {
		if tb.Failed() {
			tb.Logf("gateway logs:\n%s", logs)
		}
	})
	dbURL := pgtest.URL(tb)
	fake := startFake(tb)
	fallbackMain, fallbackH2 := o.handler, o.handler
	if o.handler == nil {
		fallbackMain, fallbackH2 = echo("main"), echo("h2")
	}
	mainSrv := startServer(tb, backendMux(fallbackMain), false)
	h2Srv := startServer(tb, backendMux(fallbackH2), true)

	cfg := gateway.Config{
		Name:        "ai",
		Listen:      "127.0.0.1:0",
		AdminListen: "127.0.0.1:0",
		Prefix:      "/ai",
		DatabaseURL: dbURL,
		DecisionURL: fake.srv.URL,
		Backends: map[string]route.Backend{
			"main": {URL: mainSrv.URL, Audience: "gitlab-ai-gateway"},
			"h2":   {URL: h2Srv.URL, Audience: "gitlab-duo-workflow-service", HTTP2: true},
			"down": {URL: "http://" + closedAddr(tb), Audience: "gitlab-ai-gateway"},
		},
		Routes:        route.Table{Routes: testRoutes()},
		ShutdownDrain: config.Duration(5 * time.Second),
	}
	var spans *tracetest.InMemoryExporter
	if !o.noExport {
		spans = tracetest.NewInMemoryExporter()
		cfg.TracerProvider = sdktrace.NewTracerProvider(sdktrace.WithSyncer(spans)) // the gateway shuts it down
	}
	if o.configure != nil {
		o.configure(&cfg)
	}
	logger := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	g, err := gateway.New(context.Background(), cfg, logger)
	if err != nil {
		tb.Fatalf("gateway.New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- g.Run(ctx) }()
	stop := sync.OnceValue(func() error {
		cancel()
		return <-done
	})
	tb.Cleanup(func() {
		if err := stop(); err != nil {
			tb.Errorf("gateway Run: %v", err)
		}
	})
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	tb.Cleanup(client.CloseIdleConnections)
	return &env{
		g: g, cfg: cfg, base: "http://" + g.Addr() + cfg.Prefix, fake: fake, dbURL: dbURL, client: client, stop: stop,
		logs: logs, spans: spans,
	}
}

// closedAddr returns a local address nothing listens on.
func closedAddr(tb testing.TB) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// newRequest builds a request as a GitLab instance sends it: bearer token
// (none when token is empty) and identity headers.
func (e *env) newRequest(tb testing.TB, method, path, token string, body io.Reader) *http.Request {
	tb.Helper()
	req, err := http.NewRequest(method, e.base+path, body)
	if err != nil {
		tb.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	req.Header.Set("X-Gitlab-Authentication-Type", "oidc")
	req.Header.Set("X-Gitlab-Instance-Id", instanceID)
	req.Header.Set("X-Gitlab-Realm", realm)
	req.Header.Set("X-Gitlab-Version", "17.6.0")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	return req
}

// result is a response read in full.
type result struct {
	status int
	header http.Header
	body   []byte
}

func (r result) json(tb testing.TB) map[string]any {
	tb.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.body, &m); err != nil {
		tb.Fatalf("response body %q is not a JSON object: %v", r.body, err)
	}
	return m
}

func (r result) seen(tb testing.TB) seen {
	tb.Helper()
	var s seen
	if err := json.Unmarshal(r.body, &s); err != nil {
		tb.Fatalf("response body %q is not from the echo backend: %v", r.body, err)
	}
	return s
}

func (e *env) do(tb testing.TB, req *http.Request) result {
	tb.Helper()
	res, err := e.client.Do(req)
	if err != nil {
		tb.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		tb.Fatalf("%s %s: read body: %v", req.Method, req.URL, err)
	}
	return result{status: res.StatusCode, header: res.Header, body: body}
}

// post sends a GitLab-like JSON POST to path (under the prefix).
func (e *env) post(tb testing.TB, path, token string) result {
	tb.Helper()
	return e.do(tb, e.newRequest(tb, http.MethodPost, path, token, strings.NewReader(sampleBody)))
}

const sampleBody = `{"prompt_version":1,"current_file":{"file_name":"test.py","content_above_cursor":"def is_even(n: int) ->","content_below_cursor":""}}`

// raw sends request (a full HTTP/1.1 request head) on its own connection
// and reads the response; http.Client would clean the paths tests need.
func (e *env) raw(tb testing.TB, request string) result {
	tb.Helper()
	conn, err := net.Dial("tcp", e.g.Addr())
	if err != nil {
		tb.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second)) // a hang fails, not stalls, the test
	if _, err := io.WriteString(conn, request); err != nil {
		tb.Fatal(err)
	}
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		tb.Fatalf("read response to %q: %v", request, err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		tb.Fatal(err)
	}
	return result{status: res.StatusCode, header: res.Header, body: body}
}

// rawRequest is a request for raw with the usual GitLab headers and
// extra header lines ("Name: value").
func rawRequest(method, target, token string, extra ...string) string {
	head := method + " " + target + " HTTP/1.1\r\nHost: cloud.example.test\r\nConnection: close\r\n" +
		"Authorization: Bearer " + token + "\r\nX-Gitlab-Authentication-Type: oidc\r\n" +
		"X-Gitlab-Instance-Id: " + instanceID + "\r\nX-Gitlab-Realm: " + realm + "\r\n"
	for _, h := range extra {
		head += h + "\r\n"
	}
	return head + "Content-Length: 2\r\n\r\n{}"
}

// wantJSON checks status, content type and the exact JSON body.
func wantJSON(tb testing.TB, r result, status int, body map[string]any) {
	tb.Helper()
	if r.status != status {
		tb.Errorf("status = %d; want %d (body %s)", r.status, status, r.body)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		tb.Errorf("Content-Type = %q; want application/json", ct)
	}
	got := r.json(tb)
	gotJSON, _ := json.Marshal(got)
	wantJSON, _ := json.Marshal(body)
	if !bytes.Equal(gotJSON, wantJSON) {
		tb.Errorf("body = %s; want %s", gotJSON, wantJSON)
	}
}

// pool opens a pool on the test database.
func (e *env) pool(tb testing.TB) *pgxpool.Pool {
	tb.Helper()
	p, err := pgxpool.New(context.Background(), e.dbURL)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(p.Close)
	return p
}

// usageRow is a usage_events row.
type usageRow struct {
	OrganizationID *string
	InstanceID     string
	Realm          string
	GlobalUserID   *string
	Feature        string
	Gateway        string
	Route          string
	Method         string
	Status         int
	DurationMS     float64
	RequestBytes   int64
	ResponseBytes  int64
	Units          *int64
	RequestID      *string
	GitLabVersion  *string
	ClientType     *string
}

// usage returns every usage_events row, oldest first.
func (e *env) usage(tb testing.TB) []usageRow {
	tb.Helper()
	rows, err := e.pool(tb).Query(context.Background(), `SELECT organization_id::text, instance_id, realm, global_user_id,
		feature, gateway, route, method, status, duration_ms, request_bytes, response_bytes, units,
		request_id, gitlab_version, client_type
		FROM usage_events ORDER BY occurred_at, event_id`)
	if err != nil {
		tb.Fatal(err)
	}
	defer rows.Close()
	var out []usageRow
	for rows.Next() {
		var u usageRow
		if err := rows.Scan(&u.OrganizationID, &u.InstanceID, &u.Realm, &u.GlobalUserID, &u.Feature, &u.Gateway,
			&u.Route, &u.Method, &u.Status, &u.DurationMS, &u.RequestBytes, &u.ResponseBytes, &u.Units,
			&u.RequestID, &u.GitLabVersion, &u.ClientType); err != nil {
			tb.Fatal(err)
		}
		out = append(out, u)
	}
	if err := rows.Err(); err != nil {
		tb.Fatal(err)
	}
	return out
}

// stopped stops the gateway, failing the test if Run failed.
func (e *env) stopped(tb testing.TB) {
	tb.Helper()
	if err := e.stop(); err != nil {
		tb.Fatalf("gateway Run: %v", err)
	}
}

// metric returns the sum of the samples of the named metric on the admin
// port whose labels include every label in labels ("code=\"429\"").
func (e *env) metric(tb testing.TB, name string, labels ...string) float64 {
	tb.Helper()
	res, err := e.client.Get("http://" + e.g.AdminAddr() + "/metrics")
	if err != nil {
		tb.Fatal(err)
	}
	defer res.Body.Close()
	var sum float64
	sc := bufio.NewScanner(res.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for _, l := range labels {
			ok = ok && strings.Contains(line, l)
		}
		if !ok {
			continue
		}
		var v float64
		if _, err := fmt.Sscan(line[strings.LastIndexByte(line, ' ')+1:], &v); err != nil {
			tb.Fatalf("metric line %q: %v", line, err)
		}
		sum += v
	}
	return sum
}

// throughProxy points c's database URL at a proxy that the test can cut.
func throughProxy(tb testing.TB, c *gateway.Config) *servertest.Proxy {
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

// admin GETs path on the admin port.
func (e *env) admin(tb testing.TB, path string) (int, string) {
	tb.Helper()
	res, err := e.client.Get("http://" + e.g.AdminAddr() + path)
	if err != nil {
		tb.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		tb.Fatal(err)
	}
	return res.StatusCode, string(b)
}

// TestDatabaseOutageKeepsReady checks that a Postgres outage does not take
// the gateway out of its Service: it stays ready so that the degraded mode
// (leases in hand, the usage spool, fail-open routes) serves, and reports
// the outage through cloudconnector_database_up and its logs instead.
func TestDatabaseOutageKeepsReady(t *testing.T) {
	t.Parallel()
	var db *servertest.Proxy
	e := setup(t, options{configure: func(c *gateway.Config) {
		db = throughProxy(t, c)
		c.UsageSpoolDir = t.TempDir()
		c.DatabaseCheckInterval = config.Duration(10 * time.Millisecond)
	}})
	if code, body := e.admin(t, "/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz with the database up = %d %s", code, body)
	}
	if got := e.metric(t, "cloudconnector_database_up"); got != 1 {
		t.Fatalf("cloudconnector_database_up = %v with the database up; want 1", got)
	}

	db.Cut()
	if code, body := e.admin(t, "/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz with the database down = %d %s; want 200", code, body)
	}
	if code, _ := e.admin(t, "/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz with the database down = %d; want 200", code)
	}
	servertest.Eventually(t, "the outage on the gauge", func() bool { return e.metric(t, "cloudconnector_database_up") == 0 })
	if !strings.Contains(e.logs.String(), "database unavailable") {
		t.Errorf("no log line reports the outage:\n%s", e.logs)
	}
	if r := e.post(t, "/v1/open", "allow"); r.status != http.StatusOK {
		t.Errorf("fail-open route with the database down: status %d; want 200", r.status)
	}
	if code, body := e.admin(t, "/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz after the outage was noticed = %d %s; want 200", code, body)
	}

	db.Restore()
	servertest.Eventually(t, "the recovery on the gauge", func() bool { return e.metric(t, "cloudconnector_database_up") == 1 })
	if !strings.Contains(e.logs.String(), "database available") {
		t.Errorf("no log line reports the recovery:\n%s", e.logs)
	}
}

// TestStartWithoutDatabase checks that a gateway starts while the database
// is unreachable (it serves degraded), and that it checks the schema once
// the database answers.
func TestStartWithoutDatabase(t *testing.T) {
	t.Parallel()
	var db *servertest.Proxy
	e := setup(t, options{configure: func(c *gateway.Config) {
		db = throughProxy(t, c)
		db.Cut()
		c.UsageSpoolDir = t.TempDir()
		c.DatabaseCheckInterval = config.Duration(10 * time.Millisecond)
	}})
	if code, body := e.admin(t, "/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz of a gateway started without its database = %d %s; want 200", code, body)
	}
	if got := e.metric(t, "cloudconnector_database_up"); got != 0 {
		t.Fatalf("cloudconnector_database_up = %v; want 0", got)
	}
	db.Restore()
	servertest.Eventually(t, "the database on the gauge", func() bool { return e.metric(t, "cloudconnector_database_up") == 1 })
}

// TestNewRequiresMigratedSchema checks that a gateway refuses to start on a
// database the migration job has not brought to its schema version.
func TestNewRequiresMigratedSchema(t *testing.T) {
	t.Parallel()
	dbURL := pgtest.URL(t)
	pool, err := pgxpool.New(context.Background(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	if _, err := pool.Exec(context.Background(), "UPDATE schema_version SET version = 1"); err != nil {
		t.Fatal(err)
	}
	g, err := gateway.New(context.Background(), gateway.Config{
		Name: "ai", Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", DatabaseURL: dbURL, DecisionURL: "http://127.0.0.1:1",
		Backends: map[string]route.Backend{"main": {URL: "http://127.0.0.1:1", Audience: "a"}},
		Routes:   route.Table{Routes: []route.Route{{Name: "r", Path: "/r", Feature: "f", Backend: "main"}}},
	}, slog.New(slog.DiscardHandler))
	if err == nil {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		g.Run(ctx)
		t.Fatal("New started on a database behind the embedded schema")
	}
	if !strings.Contains(err.Error(), "run migrations") {
		t.Fatalf("New error = %v; want one telling the operator to run migrations", err)
	}
}
