package e2e_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"

	"github.com/cloud-connector/cloud-connector/gateways/gateway"
	"github.com/cloud-connector/cloud-connector/gateways/internaltoken"
	"github.com/cloud-connector/cloud-connector/gateways/route"
	"github.com/cloud-connector/cloud-connector/gateways/routes"
	"github.com/cloud-connector/cloud-connector/migrations/pgtest"
	"github.com/cloud-connector/cloud-connector/policies"
	"github.com/cloud-connector/cloud-connector/services/authz"
	"github.com/cloud-connector/cloud-connector/services/decision"
	"github.com/cloud-connector/cloud-connector/services/postgres"
	"github.com/cloud-connector/cloud-connector/services/server/servertest"
	"github.com/cloud-connector/cloud-connector/services/token"
	"github.com/cloud-connector/cloud-connector/services/token/tokentest"
)

const (
	instanceID = "5c1a0b1e-8f0d-4b8e-9a4b-6f0f7c9e2a11"
	aiAudience = "gitlab-ai-gateway"
	// internalIssuer is the public host the gateways name themselves by in
	// internal tokens, followed by their prefix.
	internalIssuer = "https://cloud.example"
)

// stack is one running Cloud Connector: decision service, AI and CI/CD
// gateways, on a fresh database.
type stack struct {
	issuer   *tokentest.Issuer
	backend  *backend
	pool     *pgxpool.Pool
	dbURL    string
	orgID    string
	decision *decision.Server
	ai       *gateway.Gateway
	cicd     *gateway.Gateway

	logger     *slog.Logger
	aiBackends map[string]route.Backend
	// spans receives every component's spans as they end, as a collector
	// would; each span's resource names its service. A component that
	// stops does not clear it.
	spans *tracetest.InMemoryExporter
	// keyFile signs both gateways' internal tokens.
	keyFile string

	mu      sync.Mutex
	running []func()
}

type options struct {
	// budgets overrides the organization's budgets: bucket -> YAML flow map.
	budgets map[string]string
	plan    string
	addOns  []authz.AddOn
}

func setup(t *testing.T, opts options) *stack {
	t.Helper()
	ctx := context.Background()
	s := &stack{issuer: tokentest.Start(t), backend: newBackend(t), dbURL: pgtest.URL(t),
		keyFile: filepath.Join(t.TempDir(), "internal-token.pem"), spans: tracetest.NewInMemoryExporter()}
	if err := internaltoken.WriteKeyFile(s.keyFile); err != nil {
		t.Fatal(err)
	}
	var err error
	if s.pool, err = pgxpool.New(ctx, s.dbURL); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.pool.Close)
	if opts.plan == "" {
		opts.plan = "premium"
	}
	if opts.addOns == nil {
		opts.addOns = []authz.AddOn{{Name: "duo_pro", Seats: 10}}
	}
	s.orgID, err = postgres.Upsert(ctx, s.pool, postgres.Seed{
		Name: "Acme Corp", Plan: opts.plan, AddOns: opts.addOns,
		Instances: []postgres.SeedInstance{{ID: instanceID, Realm: "self-managed"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	logger := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	s.logger = logger

	policyDir := ""
	if len(opts.budgets) > 0 {
		policyDir = s.writePolicy(t, opts.budgets)
	}
	s.decision, err = decision.New(ctx, decision.Config{
		Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", DatabaseURL: s.dbURL, PolicyDir: policyDir,
		Token: decision.TokenConfig{Issuers: []token.IssuerConfig{{
			Issuer: s.issuer.URL(), Audiences: []string{aiAudience, "gitlab-cicd"},
		}}},
		TracerProvider: s.tracerProvider("decision"),
	}, logger)
	if err != nil {
		t.Fatal(err)
	}
	s.start(t, s.decision.Run)
	s.aiBackends = map[string]route.Backend{
		"ai_gateway":   {URL: s.backend.srv.URL, Audience: aiAudience},
		"duo_workflow": {URL: s.backend.srv.URL, Audience: "gitlab-duo-workflow-service", HTTP2: true},
	}
	s.ai = s.startGateway(t, "ai", "/ai", s.aiBackends)
	s.cicd = s.startGateway(t, "cicd", "/cicd", map[string]route.Backend{
		"cicd_service": {URL: s.backend.srv.URL, Audience: "gitlab-cicd"},
	})
	servertest.WaitHealthy(t, s.decision.AdminAddr(), s.ai.AdminAddr(), s.cicd.AdminAddr())
	return s
}

func (s *stack) startGateway(t *testing.T, name, prefix string, backends map[string]route.Backend) *gateway.Gateway {
	t.Helper()
	table, err := routes.Default(name)
	if err != nil {
		t.Fatal(err)
	}
	g, err := gateway.New(context.Background(), gateway.Config{
		Name: name, Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", Prefix: prefix,
		DecisionURL: "http://" + s.decision.Addr(), DatabaseURL: s.dbURL,
		Backends: backends, Routes: table, UsageSpoolDir: t.TempDir(),
		InternalToken:  &gateway.InternalTokenConfig{Issuer: internalIssuer + prefix, KeyFiles: []string{s.keyFile}},
		TracerProvider: s.tracerProvider(name),
	}, s.logger)
	if err != nil {
		t.Fatal(err)
	}
	s.start(t, g.Run)
	return g
}

// tracerProvider records the spans of the service named name into
// s.spans, as that service's own process would export them. The component
// it is handed to shuts it down.
func (s *stack) tracerProvider(name string) *sdktrace.TracerProvider {
	return sdktrace.NewTracerProvider(sdktrace.WithSyncer(keep{s.spans}),
		sdktrace.WithResource(resource.NewSchemaless(semconv.ServiceName(name))))
}

// keep is an exporter that keeps its spans when shut down, which an
// InMemoryExporter forgets.
type keep struct{ *tracetest.InMemoryExporter }

func (keep) Shutdown(context.Context) error { return nil }

// start runs fn until the test ends (or stop is called) and fails the test
// if it returns an error.
func (s *stack) start(t *testing.T, run func(context.Context) error) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := run(ctx); err != nil {
			t.Errorf("component stopped with error: %v", err)
		}
	}()
	stop := sync.OnceFunc(func() { cancel(); <-done })
	s.mu.Lock()
	s.running = append(s.running, stop)
	s.mu.Unlock()
	t.Cleanup(stop)
}

// stop shuts everything down gracefully, gateways first (which returns
// leases and flushes usage events).
func (s *stack) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := len(s.running) - 1; i >= 0; i-- {
		s.running[i]()
	}
}

// writePolicy copies the embedded policy to a directory with budget
// overrides for the test organization.
func (s *stack) writePolicy(t *testing.T, budgets map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.CopyFS(dir, policies.FS()); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "organizations:\n  %q:\n    budgets:\n", s.orgID)
	for bucket, spec := range budgets {
		fmt.Fprintf(&b, "      %s: %s\n", bucket, spec)
	}
	path := filepath.Join(dir, "overrides", "data.yaml")
	os.Chmod(path, 0o644)
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// mint returns a token GitLab's customers portal would issue the test
// instance, with c's fields overriding the defaults.
func (s *stack) mint(t testing.TB, c tokentest.Claims) string {
	t.Helper()
	if c.Subject == "" {
		c.Subject = instanceID
	}
	if c.Scopes == nil {
		c.Scopes = []string{"complete_code", "generate_code", "duo_chat", "documentation_search"}
	}
	if c.Audience == nil {
		c.Audience = []string{aiAudience}
	}
	tok, err := s.issuer.Mint(c)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// gitlabHeaders are the headers a self-managed instance sends.
func gitlabHeaders(tok string) http.Header {
	return http.Header{
		"Authorization":                {"Bearer " + tok},
		"X-Gitlab-Authentication-Type": {"oidc"},
		"X-Gitlab-Instance-Id":         {instanceID},
		"X-Gitlab-Realm":               {"self-managed"},
		"X-Gitlab-Global-User-Id":      {"user-77"},
		"X-Gitlab-Version":             {"17.6.1-ee"},
		"X-Gitlab-Host-Name":           {"gitlab.acme.example"},
		"X-Gitlab-Deployment-Type":     {"self-managed"},
		"Content-Type":                 {"application/json"},
	}
}

const completionBody = `{"prompt_version":1,"current_file":{"file_name":"test.py","content_above_cursor":"def is_even(n: int) ->","content_below_cursor":""}}`

func (s *stack) do(t testing.TB, method, url string, h http.Header, body string) *http.Response {
	t.Helper()
	return s.doCtx(t, context.Background(), method, url, h, body)
}

func (s *stack) doCtx(t testing.TB, ctx context.Context, method, url string, h http.Header, body string) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header = h
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { res.Body.Close() })
	return res
}

func (s *stack) aiURL(path string) string   { return "http://" + s.ai.Addr() + "/ai" + path }
func (s *stack) cicdURL(path string) string { return "http://" + s.cicd.Addr() + "/cicd" + path }

func readJSON(t testing.TB, res *http.Response) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.NewDecoder(res.Body).Decode(&m); err != nil {
		t.Fatalf("decode %d response: %v", res.StatusCode, err)
	}
	return m
}

// backend is a fake AI gateway / CI service. Streams can be held after
// their first chunk until release is closed, to prove the gateway does not
// buffer.
type backend struct {
	srv     *httptest.Server
	release chan struct{}
	once    sync.Once
	mu      sync.Mutex
	seen    []http.Header
}

// releaseStreams lets held streams finish.
func (b *backend) releaseStreams() { b.once.Do(func() { close(b.release) }) }

func (b *backend) lastHeaders() http.Header {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.seen) == 0 {
		return nil
	}
	return b.seen[len(b.seen)-1]
}

func newBackend(t *testing.T) *backend {
	b := &backend{release: make(chan struct{})}
	mux := http.NewServeMux()
	record := func(r *http.Request) {
		b.mu.Lock()
		b.seen = append(b.seen, r.Header.Clone())
		b.mu.Unlock()
	}
	mux.HandleFunc("POST /v2/code/completions", func(w http.ResponseWriter, r *http.Request) {
		record(r)
		var req struct {
			Stream bool `json:"stream"`
		}
		json.NewDecoder(r.Body).Decode(&req)
		if !req.Stream {
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("X-Cloud-Connector-Units", "12")
			io.WriteString(w, `{"choices":[{"text":" bool:\n    return n % 2 == 0"}],"model":{"engine":"fake"}}`)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: bool:\n\n")
		http.NewResponseController(w).Flush()
		<-b.release
		io.WriteString(w, "data:     return n % 2 == 0\n\n")
	})
	mux.HandleFunc("POST /v2/chat/agent", func(w http.ResponseWriter, r *http.Request) {
		record(r)
		w.Header().Set("Content-Type", "application/x-ndjson")
		enc := json.NewEncoder(w)
		for i, part := range []string{"Hello", ", ", "world"} {
			enc.Encode(map[string]any{"type": "chunk", "index": i, "content": part})
			http.NewResponseController(w).Flush()
		}
	})
	mux.HandleFunc("POST /v1/runners/jobs", func(w http.ResponseWriter, r *http.Request) {
		record(r)
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"job":null}`)
	})
	b.srv = httptest.NewServer(mux)
	t.Cleanup(b.srv.Close)
	t.Cleanup(b.releaseStreams) // runs first: held streams end before Close waits on them
	return b
}

// readLine reads one line from a streamed body.
func readLine(t testing.TB, r *bufio.Reader) string {
	t.Helper()
	line, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("read stream: %v", err)
	}
	return line
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}
