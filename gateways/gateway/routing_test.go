package gateway_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cloud-connector/cloud-connector/gateways/gateway"
	"github.com/cloud-connector/cloud-connector/gateways/route"
	"github.com/cloud-connector/cloud-connector/migrations/pgtest"
	"github.com/cloud-connector/cloud-connector/services/config"
	"github.com/cloud-connector/cloud-connector/services/server/servertest"
)

func TestRouting(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	notFound := map[string]any{"detail": "Not Found"}
	for _, tc := range []struct {
		name, method, path string
		status             int
		body               map[string]any
	}{
		{"unknown path", "POST", "/v9/nothing", 404, notFound},
		{"unknown path under a route", "POST", "/v2/code/completions/extra", 404, notFound},
		{"prefix only", "GET", "", 404, notFound},
		{"wrong method", "GET", "/v2/code/completions", 405, map[string]any{"detail": "Method Not Allowed"}},
		{"wrong method on public route", "POST", "/v1/models/definitions", 405, map[string]any{"detail": "Method Not Allowed"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var body io.Reader
			if tc.method == "POST" {
				body = strings.NewReader("{}")
			}
			r := e.do(t, e.newRequest(t, tc.method, tc.path, "allow", body))
			wantJSON(t, r, tc.status, tc.body)
		})
	}
	t.Run("prefix required", func(t *testing.T) {
		req := e.newRequest(t, "POST", "", "allow", strings.NewReader("{}"))
		for _, p := range []string{"/v2/code/completions", "/aix/v2/code/completions", "/AI/v2/code/completions", "/cicd/v2/code/completions"} {
			req.URL.Path = p
			wantJSON(t, e.do(t, req), 404, notFound)
		}
	})
	if n := e.fake.count(); n != 0 {
		t.Errorf("decision calls for unrouted requests = %d; want 0", n)
	}
}

// TestMethodNotAllowedAllow: RFC 9110 15.5.6, a 405 response MUST carry an
// Allow header.
func TestMethodNotAllowedAllow(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	r := e.do(t, e.newRequest(t, "GET", "/v2/code/completions", "allow", nil))
	if r.status != 405 {
		t.Fatalf("status = %d; want 405", r.status)
	}
	if got := r.header.Get("Allow"); got != "POST" {
		t.Fatalf("405 has Allow %q, want \"POST\" (RFC 9110 15.5.6)", got)
	}
}

func TestPathNormalization(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	bad := map[string]any{"detail": "Invalid request path"}
	for _, target := range []string{
		"/ai/v2/../x",
		"/ai/v2/code/../code/completions",
		"/ai//v2/code/completions",
		"/ai/v2//code/completions",
		"/ai/./v2/code/completions",
		"/ai/v2/code%2fcompletions",
		"/ai/v2/code%2Fcompletions",
		"/ai/v2/%2e%2e/v2/code/completions",
		"/ai/v2/%2E%2E/x",
		"/ai/v2/code/completions%2e",
		"/ai/v2\\code\\completions",
		"/ai/v2/code%5ccompletions",
		"/ai/v1/prompts/%00",
		"/ai%2fv2/code/completions",
		// Path parameters on dot segments (Tomcat, Jetty and Spring drop
		// them, then resolve the ".."), raw or with ";" encoded.
		"/ai/v1/prompts/..;/..;/v2/chat/agent",
		"/ai/v1/prompts/..%3B/..%3B/v2/chat/agent",
		"/ai/v1/prompts/..%3b/x",
		"/ai/v1/prompts/.%3B/x",
		// Overlong UTF-8 dots, which lax decoders read as ".".
		"/ai/v1/prompts/%C0%AE%C0%AE/v2/chat/agent",
		"/ai/v1/prompts/%c0%ae%c0%ae/v2/chat/agent",
		"/ai/v1/prompts/%E0%80%AE%E0%80%AE/v2/chat/agent",
		"/ai/v1/prompts/x%FF",
	} {
		t.Run(target, func(t *testing.T) {
			// The unit primitive lets a path that slips through reach the
			// backend instead of failing for want of a feature.
			r := e.raw(t, rawRequest("POST", target, "allow", "X-Gitlab-Unit-Primitive: duo_chat"))
			wantJSON(t, r, 400, bad)
		})
	}
	t.Run("canonical", func(t *testing.T) {
		r := e.raw(t, rawRequest("POST", "/ai/v1/prompts/chat%20agent/v1?x=%2F..", "allow", "X-Gitlab-Unit-Primitive: duo_chat"))
		if r.status != 200 {
			t.Fatalf("status = %d (%s); want 200", r.status, r.body)
		}
		s := r.seen(t)
		if s.RequestURI != "/v1/prompts/chat%20agent/v1?x=%2F.." {
			t.Errorf("backend request URI = %q; want /v1/prompts/chat%%20agent/v1?x=%%2F..", s.RequestURI)
		}
	})
	if n := e.fake.count(); n != 1 {
		t.Errorf("decision calls = %d; want 1 (refused paths are never authorized)", n)
	}
}

// TestPathDoubleSlashBeforeTrailingSlash: "//" must never reach a backend.
func TestPathDoubleSlashBeforeTrailingSlash(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	r := e.raw(t, rawRequest("POST", "/ai/v1/prompts//x/", "allow", "X-Gitlab-Unit-Primitive: duo_chat"))
	if r.status == 200 {
		t.Fatalf("BUG: route/path.go CleanPath accepts \"//\" when the path ends in \"/\"; the backend got %q "+
			"(see route.TestCleanPathEmptySegmentBeforeTrailingSlash)", r.seen(t).RequestURI)
	}
	wantJSON(t, r, 400, map[string]any{"detail": "Invalid request path"})
}

func TestHostMounting(t *testing.T) {
	t.Parallel()
	post := func(t *testing.T, e *env, host, path string) int {
		t.Helper()
		req := e.newRequest(t, "POST", "", "allow", strings.NewReader("{}"))
		req.URL.Path = path
		req.Host = host
		r := e.do(t, req)
		if r.status == 200 {
			if p := r.seen(t).Path; p != "/v2/code/completions" {
				t.Errorf("%s%s reached the backend as %s", host, path, p)
			}
		}
		return r.status
	}
	t.Run("hosts only", func(t *testing.T) {
		t.Parallel()
		e := setup(t, options{configure: func(c *gateway.Config) { c.Prefix, c.Hosts = "", []string{"ai.cloud.example.test"} }})
		for _, tc := range []struct {
			host, path string
			status     int
		}{
			{"ai.cloud.example.test", "/v2/code/completions", 200},
			{"AI.Cloud.Example.Test:443", "/v2/code/completions", 200},
			{"cloud.example.test", "/v2/code/completions", 404},
			{"cicd.cloud.example.test", "/v2/code/completions", 404},
			{"ai.cloud.example.test", "/ai/v2/code/completions", 404},
		} {
			if got := post(t, e, tc.host, tc.path); got != tc.status {
				t.Errorf("Host %s, %s: status %d; want %d", tc.host, tc.path, got, tc.status)
			}
		}
	})
	t.Run("hosts and prefix", func(t *testing.T) {
		t.Parallel()
		e := setup(t, options{configure: func(c *gateway.Config) { c.Hosts = []string{"ai.cloud.example.test"} }})
		for _, tc := range []struct {
			host, path string
			status     int
		}{
			{"ai.cloud.example.test", "/v2/code/completions", 200},
			{"cloud.example.test", "/ai/v2/code/completions", 200},
			{"cloud.example.test", "/v2/code/completions", 404},
		} {
			if got := post(t, e, tc.host, tc.path); got != tc.status {
				t.Errorf("Host %s, %s: status %d; want %d", tc.host, tc.path, got, tc.status)
			}
		}
	})
	t.Run("neither", func(t *testing.T) {
		t.Parallel()
		e := setup(t, options{configure: func(c *gateway.Config) { c.Prefix = "" }})
		if got := post(t, e, "anything.example.test", "/v2/code/completions"); got != 200 {
			t.Errorf("status %d; want 200 at the root", got)
		}
	})
}

func TestFeatureHeader(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	send := func(values ...string) result {
		req := e.newRequest(t, "POST", "/v1/prompts/code/suggest", "allow", strings.NewReader("{}"))
		for _, v := range values {
			req.Header.Add("X-Gitlab-Unit-Primitive", v)
		}
		return e.do(t, req)
	}
	wantJSON(t, send(), 400, map[string]any{"detail": "Missing X-Gitlab-Unit-Primitive header"})
	wantJSON(t, send(""), 400, map[string]any{"detail": "Missing X-Gitlab-Unit-Primitive header"})
	wantJSON(t, send("generate_code"), 403, map[string]any{"detail": "Unauthorized to access generate_code"})
	if n := e.fake.count(); n != 0 {
		t.Fatalf("decision calls = %d; want 0 before a feature is known", n)
	}
	r := send("duo_chat")
	if r.status != 200 {
		t.Fatalf("status = %d; want 200", r.status)
	}
	if got := e.fake.last(t).GetFeature(); got != "duo_chat" {
		t.Errorf("authorized feature = %q; want duo_chat", got)
	}
	if got := r.seen(t).Header.Get("X-Cloud-Connector-Feature"); got != "duo_chat" {
		t.Errorf("backend X-Cloud-Connector-Feature = %q; want duo_chat", got)
	}
}

func TestProxyFailures(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	t.Run("body too large", func(t *testing.T) {
		r := e.post(t, "/v1/small", "allow") // sampleBody is over the route's 16 bytes
		wantJSON(t, r, 413, map[string]any{"detail": "Request body too large"})
	})
	t.Run("body too large, chunked", func(t *testing.T) {
		req := e.newRequest(t, "POST", "/v1/small", "allow", io.MultiReader(strings.NewReader(sampleBody)))
		req.ContentLength = -1
		wantJSON(t, e.do(t, req), 413, map[string]any{"detail": "Request body too large"})
	})
	t.Run("body at the limit", func(t *testing.T) {
		req := e.newRequest(t, "POST", "/v1/small", "allow", strings.NewReader(strings.Repeat("x", 16)))
		if r := e.do(t, req); r.status != 200 || r.seen(t).Body != strings.Repeat("x", 16) {
			t.Errorf("status %d; want 200 with the body", r.status)
		}
	})
	t.Run("backend down", func(t *testing.T) {
		wantJSON(t, e.post(t, "/v1/down", "allow"), 502, map[string]any{"detail": "Bad gateway"})
	})
	t.Run("backend slower than the route timeout", func(t *testing.T) {
		wantJSON(t, e.post(t, "/v1/slow", "allow"), 504, map[string]any{"detail": "Gateway timeout"})
	})
	t.Run("public route", func(t *testing.T) {
		before := e.fake.count()
		req := e.newRequest(t, "GET", "/v1/models/definitions", "", nil)
		req.Header.Set("X-Cloud-Connector-Organization-Id", orgID)
		r := e.do(t, req)
		if r.status != 200 {
			t.Fatalf("status %d; want 200", r.status)
		}
		if n := e.fake.count(); n != before {
			t.Errorf("public route called the decision service")
		}
		s := r.seen(t)
		if s.Path != "/v1/models/definitions" || s.Header.Get("X-Cloud-Connector-Gateway") != "ai" ||
			s.Header.Get("X-Cloud-Connector-Organization-Id") != "" || s.Header.Get("X-Request-Id") == "" {
			t.Errorf("backend saw %s with headers %v", s.Path, s.Header)
		}
	})
	e.stopped(t)
	statuses := map[string]int{}
	for _, u := range e.usage(t) {
		statuses[u.Route] = u.Status
	}
	for rt, want := range map[string]int{"down": 502, "slow": 504, "small": 200} {
		if statuses[rt] != want {
			t.Errorf("usage status for route %s = %d; want %d", rt, statuses[rt], want)
		}
	}
	if _, ok := statuses["models"]; ok {
		t.Error("public route metered")
	}
}

func TestAdmin(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	e.post(t, "/v2/code/completions", "allow")
	for path, want := range map[string]string{"/healthz": "ok\n", "/readyz": `{"status":"ready"}` + "\n"} {
		res, err := e.client.Get("http://" + e.g.AdminAddr() + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != 200 || string(body) != want {
			t.Errorf("%s = %d %q; want 200 %q", path, res.StatusCode, body, want)
		}
	}
	if got := e.metric(t, "cloudconnector_gateway_requests_total", `gateway="ai"`, `route="code_completions"`, `code="200"`); got != 1 {
		t.Errorf("requests metric = %v; want 1", got)
	}
	// The admin endpoints are not on the public port.
	res, err := e.client.Get("http://" + e.g.Addr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 404 {
		t.Errorf("public /metrics: status %d; want 404", res.StatusCode)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	t.Parallel()
	dbURL := pgtest.URL(t)
	good := func() gateway.Config {
		return gateway.Config{
			Name: "ai", Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", DatabaseURL: dbURL, DecisionURL: "http://127.0.0.1:1",
			Backends: map[string]route.Backend{"main": {URL: "http://127.0.0.1:1", Audience: "a"}},
			Routes:   route.Table{Routes: []route.Route{{Name: "r", Path: "/r", Feature: "f", Backend: "main"}}},
		}
	}
	for name, edit := range map[string]func(*gateway.Config){
		"name":           func(c *gateway.Config) { c.Name = "AI" },
		"decision url":   func(c *gateway.Config) { c.DecisionURL = "" },
		"database url":   func(c *gateway.Config) { c.DatabaseURL = "" },
		"prefix":         func(c *gateway.Config) { c.Prefix = "/a/../b" },
		"root prefix":    func(c *gateway.Config) { c.Prefix = "//" },
		"no backends":    func(c *gateway.Config) { c.Backends = nil },
		"trusted":        func(c *gateway.Config) { c.TrustedProxies = []string{"10.0.0.1"} },
		"routes":         func(c *gateway.Config) { c.Routes.Routes[0].Backend = "nope" },
		"routes file":    func(c *gateway.Config) { c.RoutesFile = filepath.Join(t.TempDir(), "missing.yaml") },
		"bad listen":     func(c *gateway.Config) { c.Listen = "256.0.0.1:0" },
		"backend url":    func(c *gateway.Config) { c.Backends["main"] = route.Backend{URL: "ftp://x", Audience: "a"} },
		"empty audience": func(c *gateway.Config) { c.Backends["main"] = route.Backend{URL: "http://x"} },
	} {
		cfg := good()
		edit(&cfg)
		g, err := gateway.New(context.Background(), cfg, slog.New(slog.DiscardHandler))
		if err == nil {
			t.Errorf("%s: New accepted %+v", name, cfg)
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			g.Run(ctx)
		}
	}
	// The good config starts and stops.
	g, err := gateway.New(context.Background(), good(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("New(good): %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := g.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		t.Errorf("Run: %v", err)
	}
}

func TestRoutesReload(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	file := filepath.Join(dir, "routes.yaml")
	const oldRoutes = `routes:
  - name: code_completions
    path: /v2/code/completions
    methods: [POST]
    feature: complete_code
    backend: main
`
	writeFile(t, file, oldRoutes)
	e := setup(t, options{configure: func(c *gateway.Config) {
		c.RoutesFile = file
		c.RoutesReloadInterval = config.Duration(10_000_000) // 10ms
		c.Routes = route.Table{}                             // the file replaces the built-in table
	}})
	if r := e.post(t, "/v2/code/completions", "allow"); r.status != 200 {
		t.Fatalf("route from file: status %d; want 200", r.status)
	}
	if r := e.post(t, "/v2/chat/agent", "allow"); r.status != 404 {
		t.Fatalf("route not in file: status %d; want 404", r.status)
	}

	writeFile(t, file, oldRoutes+`  - name: chat_agent
    path: /v2/chat/agent
    methods: [POST]
    feature: duo_chat
    backend: main
    timeout: 30s
`)
	servertest.Eventually(t, "the new route", func() bool { return e.post(t, "/v2/chat/agent", "allow").status == 200 })
	if got := e.metric(t, "cloudconnector_gateway_route_reloads_total", `result="ok"`); got != 1 {
		t.Errorf("ok reloads = %v; want 1", got)
	}

	for i, bad := range []string{
		"routes: [",    // not YAML
		"routes: []\n", // no routes
		strings.Replace(oldRoutes, "main", "nowhere", 1), // unknown backend
		oldRoutes + "    surprise: true\n",               // unknown field
	} {
		writeFile(t, file, bad)
		servertest.Eventually(t, "the rejection", func() bool {
			return e.metric(t, "cloudconnector_gateway_route_reloads_total", `result="rejected"`) == float64(i+1)
		})
		for _, p := range []string{"/v2/code/completions", "/v2/chat/agent"} {
			if r := e.post(t, p, "allow"); r.status != 200 {
				t.Errorf("after rejected file %d, %s: status %d; want 200 from the old table", i, p, r.status)
			}
		}
	}
	e.stopped(t)
	if rows := e.usage(t); len(rows) == 0 || rows[len(rows)-1].Route != "chat_agent" {
		t.Errorf("usage rows do not name the reloaded route")
	}
}

// writeFile replaces path atomically, as a config management tool would.
func writeFile(tb testing.TB, path, content string) {
	tb.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		tb.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		tb.Fatal(err)
	}
}
