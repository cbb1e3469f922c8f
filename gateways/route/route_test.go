package route_test

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/cloud-connector/cloud-connector/gateways/route"
	"github.com/cloud-connector/cloud-connector/services/config"
)

var testBackends = map[string]route.Backend{
	"ai_gateway":   {URL: "http://ai-gateway:5052", Audience: "gitlab-ai-gateway"},
	"duo_workflow": {URL: "http://duo-workflow:50052", Audience: "gitlab-duo-workflow-service", HTTP2: true},
}

func validRoute() route.Route {
	return route.Route{
		Name: "code_completions", Path: "/v2/code/completions", Methods: []string{"POST"},
		Feature: "complete_code", Backend: "ai_gateway",
	}
}

func TestTableValidate(t *testing.T) {
	t.Parallel()
	with := func(f func(*route.Route)) []route.Route {
		r := validRoute()
		f(&r)
		return []route.Route{r}
	}
	for _, tc := range []struct {
		name     string
		routes   []route.Route
		backends map[string]route.Backend
		wantErr  string // substring; "" means valid
	}{
		{name: "valid", routes: []route.Route{validRoute()}},
		{name: "feature header", routes: with(func(r *route.Route) {
			r.Feature, r.FeatureHeader, r.Features = "", "X-Gitlab-Unit-Primitive", []string{"complete_code"}
		})},
		{name: "public", routes: with(func(r *route.Route) { r.Feature, r.Public = "", true })},
		{name: "fail open", routes: with(func(r *route.Route) { r.BudgetFailMode = route.FailOpen })},
		{name: "fail closed", routes: with(func(r *route.Route) { r.BudgetFailMode = route.FailClosed })},
		{name: "any method", routes: with(func(r *route.Route) { r.Methods = nil })},
		{name: "http2 backend", routes: with(func(r *route.Route) { r.Backend = "duo_workflow" })},
		{name: "websocket", routes: with(func(r *route.Route) { r.Methods, r.WebSocket = []string{"GET"}, true })},
		{name: "websocket any method", routes: with(func(r *route.Route) { r.Methods, r.WebSocket = nil, true })},
		{name: "https backend", routes: []route.Route{validRoute()},
			backends: map[string]route.Backend{"ai_gateway": {URL: "https://ai.example.com", Audience: "a"}}},

		{name: "no routes", routes: nil, wantErr: "no routes"},
		{name: "no name", routes: with(func(r *route.Route) { r.Name = "" }), wantErr: "name is required"},
		{name: "duplicate name", routes: []route.Route{validRoute(), validRoute()}, wantErr: "duplicate name"},
		{name: "relative path", routes: with(func(r *route.Route) { r.Path = "v2/code" }), wantErr: "must start with /"},
		{name: "empty path", routes: with(func(r *route.Route) { r.Path = "" }), wantErr: "must start with /"},
		{name: "unknown backend", routes: with(func(r *route.Route) { r.Backend = "nope" }), wantErr: `unknown backend "nope"`},
		{name: "public with feature", routes: with(func(r *route.Route) { r.Public = true }), wantErr: "a public route has no feature"},
		{name: "public with feature header", routes: with(func(r *route.Route) {
			r.Feature, r.Public, r.FeatureHeader = "", true, "X-Gitlab-Unit-Primitive"
		}), wantErr: "a public route has no feature"},
		{name: "feature and header", routes: with(func(r *route.Route) {
			r.FeatureHeader, r.Features = "X-Gitlab-Unit-Primitive", []string{"complete_code"}
		}), wantErr: "not both"},
		{name: "no feature", routes: with(func(r *route.Route) { r.Feature = "" }), wantErr: "feature or feature_header is required"},
		{name: "header without features", routes: with(func(r *route.Route) {
			r.Feature, r.FeatureHeader = "", "X-Gitlab-Unit-Primitive"
		}), wantErr: "needs the allowed features"},
		{name: "public websocket", routes: with(func(r *route.Route) {
			r.Feature, r.Public, r.Methods, r.WebSocket = "", true, []string{"GET"}, true
		}), wantErr: "a public route cannot accept websocket upgrades"},
		{name: "websocket without GET", routes: with(func(r *route.Route) { r.WebSocket = true }), wantErr: "websocket needs GET"},
		{name: "negative timeout", routes: with(func(r *route.Route) { r.Timeout = config.Duration(-time.Second) }), wantErr: "timeout -1s"},
		{name: "negative body limit", routes: with(func(r *route.Route) { r.MaxRequestBytes = -2 }), wantErr: "max_request_bytes -2"},
		{name: "no body limit", routes: with(func(r *route.Route) { r.MaxRequestBytes = -1 })},
		{name: "bad fail mode", routes: with(func(r *route.Route) { r.BudgetFailMode = "sometimes" }), wantErr: "budget_fail_mode"},
		{name: "lower-case method", routes: with(func(r *route.Route) { r.Methods = []string{"post"} }), wantErr: "want one of"},
		{name: "empty method", routes: with(func(r *route.Route) { r.Methods = []string{""} }), wantErr: "want one of"},
		{name: "backend without scheme", routes: []route.Route{validRoute()},
			backends: map[string]route.Backend{"ai_gateway": {URL: "ai-gateway:5052", Audience: "a"}}, wantErr: "absolute http(s) URL"},
		{name: "backend ftp", routes: []route.Route{validRoute()},
			backends: map[string]route.Backend{"ai_gateway": {URL: "ftp://ai-gateway", Audience: "a"}}, wantErr: "absolute http(s) URL"},
		{name: "backend unparsable", routes: []route.Route{validRoute()},
			backends: map[string]route.Backend{"ai_gateway": {URL: "http://[::1", Audience: "a"}}, wantErr: "absolute http(s) URL"},
		{name: "backend without audience", routes: []route.Route{validRoute()},
			backends: map[string]route.Backend{"ai_gateway": {URL: "http://ai-gateway"}}, wantErr: "audience is required"},
		{name: "http2 over https", routes: []route.Route{validRoute()},
			backends: map[string]route.Backend{"ai_gateway": {URL: "https://ai-gateway", Audience: "a", HTTP2: true}}, wantErr: "http2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			backends := tc.backends
			if backends == nil {
				backends = testBackends
			}
			err := route.Table{Routes: tc.routes}.Validate(backends)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("Validate: %v", err)
			case tc.wantErr != "" && err == nil:
				t.Fatalf("Validate: nil; want error containing %q", tc.wantErr)
			case tc.wantErr != "" && !strings.Contains(err.Error(), tc.wantErr):
				t.Fatalf("Validate: %v; want error containing %q", err, tc.wantErr)
			}
			if err != nil && !strings.HasPrefix(err.Error(), "route table: ") {
				t.Errorf("Validate error %q lacks the route table context", err)
			}
		})
	}
}

func TestTableValidateReportsEveryProblem(t *testing.T) {
	t.Parallel()
	err := route.Table{Routes: []route.Route{
		{Name: "", Path: "x", Backend: "nope", BudgetFailMode: "x", Methods: []string{"get"}},
	}}.Validate(testBackends)
	if err == nil {
		t.Fatal("Validate: nil")
	}
	for _, want := range []string{"name is required", "must start with /", "unknown backend", "feature or feature_header", "budget_fail_mode", "want one of"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Validate error lacks %q:\n%v", want, err)
		}
	}
}

// TestTableValidateRejectsWhatMuxCannotBuild: a table that Validate accepts
// must build a router. chi panics on malformed patterns and on methods it
// does not know, and the gateway builds the router from a hot-reloaded file
// in a background goroutine, so such a file takes the whole process down
// instead of being rejected.
func TestTableValidateRejectsWhatMuxCannotBuild(t *testing.T) {
	t.Parallel()
	for _, r := range []route.Route{
		func() route.Route { r := validRoute(); r.Path = "/v1/prompts/{id"; return r }(),
		func() route.Route { r := validRoute(); r.Path = "/v1/*/x"; return r }(),
		func() route.Route { r := validRoute(); r.Path = "/v1/{id}/{id}"; return r }(),
		func() route.Route { r := validRoute(); r.Path = "/v1/{id:[}"; return r }(),
		func() route.Route { r := validRoute(); r.Methods = []string{"PURGE"}; return r }(),
	} {
		tbl := route.Table{Routes: []route.Route{r}}
		if err := tbl.Validate(testBackends); err != nil {
			continue // rejected: fine
		}
		func() {
			defer func() {
				if p := recover(); p != nil {
					t.Errorf("Validate accepted path %q methods %q but Mux panics: %v", r.Path, r.Methods, p)
				}
			}()
			tbl.Mux(func(route.Route) http.Handler { return http.NotFoundHandler() }, nil, nil)
		}()
	}
}

// TestRouteYAML: route tables are YAML; websocket is the key that opts a
// route in to WebSocket upgrades, and it is off unless set.
func TestRouteYAML(t *testing.T) {
	t.Parallel()
	var tbl route.Table
	err := config.Parse("routes.yaml", []byte(`routes:
  - {name: ws, path: /v1/ws, methods: [GET], feature: duo_chat, backend: ai_gateway, websocket: true}
  - {name: plain, path: /v1/plain, methods: [GET], feature: duo_chat, backend: ai_gateway}
`), &tbl)
	if err != nil {
		t.Fatal(err)
	}
	if len(tbl.Routes) != 2 || !tbl.Routes[0].WebSocket || tbl.Routes[1].WebSocket {
		t.Fatalf("routes %+v; want websocket on the first only", tbl.Routes)
	}
	if err := tbl.Validate(testBackends); err != nil {
		t.Fatal(err)
	}
}

func TestRouteDefaults(t *testing.T) {
	t.Parallel()
	r := validRoute()
	if got := r.FailMode(); got != route.FailClosed {
		t.Errorf("FailMode() = %q; want closed", got)
	}
	r.BudgetFailMode = route.FailOpen
	if got := r.FailMode(); got != route.FailOpen {
		t.Errorf("FailMode() = %q; want open", got)
	}
	if got := r.BodyLimit(); got != 16<<20 {
		t.Errorf("BodyLimit() = %d; want 16 MiB", got)
	}
	r.MaxRequestBytes = -1
	if got := r.BodyLimit(); got != -1 {
		t.Errorf("BodyLimit() = %d; want -1", got)
	}
	r.MaxRequestBytes = 10
	if got := r.BodyLimit(); got != 10 {
		t.Errorf("BodyLimit() = %d; want 10", got)
	}
	var b route.Backend
	if got := b.HeaderTimeout(); got != 2*time.Minute {
		t.Errorf("HeaderTimeout() = %v; want 2m", got)
	}
	b.ResponseHeaderTimeout = config.Duration(3 * time.Second)
	if got := b.HeaderTimeout(); got != 3*time.Second {
		t.Errorf("HeaderTimeout() = %v; want 3s", got)
	}
}

func TestFeatureOf(t *testing.T) {
	t.Parallel()
	fixed := validRoute()
	byHeader := route.Route{
		Name: "prompts", Path: "/v1/prompts/*", FeatureHeader: "X-Gitlab-Unit-Primitive",
		Features: []string{"complete_code", "duo_chat"}, Backend: "ai_gateway",
	}
	for _, tc := range []struct {
		name   string
		r      route.Route
		header string // X-Gitlab-Unit-Primitive; "-" for none
		want   string
		ok     bool
	}{
		{"fixed feature", fixed, "-", "complete_code", true},
		{"fixed feature ignores header", fixed, "duo_chat", "complete_code", true},
		{"header allowed", byHeader, "duo_chat", "duo_chat", true},
		{"header missing", byHeader, "-", "", false},
		{"header empty", byHeader, "", "", false},
		{"header not allowed", byHeader, "generate_code", "generate_code", false},
		{"header case matters", byHeader, "Duo_Chat", "Duo_Chat", false},
	} {
		req := httptest.NewRequest(http.MethodPost, "/v1/prompts/x", nil)
		if tc.header != "-" {
			req.Header.Set("X-Gitlab-Unit-Primitive", tc.header)
		}
		got, ok := tc.r.FeatureOf(req)
		if got != tc.want || ok != tc.ok {
			t.Errorf("%s: FeatureOf = %q, %v; want %q, %v", tc.name, got, ok, tc.want, tc.ok)
		}
	}
}

func TestMux(t *testing.T) {
	t.Parallel()
	tbl := route.Table{Routes: []route.Route{
		validRoute(),
		{Name: "prompts", Path: "/v1/prompts/*", Methods: []string{"POST"}, FeatureHeader: "X-Gitlab-Unit-Primitive",
			Features: []string{"duo_chat"}, Backend: "ai_gateway"},
		{Name: "job_analysis", Path: "/v1/jobs/{id}/analysis", Methods: []string{"POST", "PUT"}, Feature: "ci_job_analysis", Backend: "ai_gateway"},
		{Name: "anything", Path: "/v1/any", Feature: "complete_code", Backend: "ai_gateway"},
	}}
	if err := tbl.Validate(testBackends); err != nil {
		t.Fatal(err)
	}
	mux := tbl.Mux(func(r route.Route) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "route:"+r.Name) })
	}, func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusNotFound)
		io.WriteString(w, "not found")
	}, func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusMethodNotAllowed)
		io.WriteString(w, "method")
	})
	for _, tc := range []struct {
		method, path string
		code         int
		body         string
	}{
		{"POST", "/v2/code/completions", 200, "route:code_completions"},
		{"GET", "/v2/code/completions", 405, "method"},
		{"POST", "/v2/code/completions/x", 404, "not found"},
		{"POST", "/v1/prompts/a/b", 200, "route:prompts"},
		{"POST", "/v1/jobs/7/analysis", 200, "route:job_analysis"},
		{"PUT", "/v1/jobs/7/analysis", 200, "route:job_analysis"},
		{"DELETE", "/v1/jobs/7/analysis", 405, "method"},
		{"DELETE", "/v1/any", 200, "route:anything"},
		{"PATCH", "/v1/any", 200, "route:anything"},
		{"CONNECT", "/v1/any", 405, "method"},
		{"TRACE", "/v1/any", 405, "method"},
		{"PROPFIND", "/v1/any", 405, "method"},
		{"GET", "/nope", 404, "not found"},
	} {
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, httptest.NewRequest(tc.method, tc.path, nil))
		if rec.Code != tc.code || rec.Body.String() != tc.body {
			t.Errorf("%s %s = %d %q; want %d %q", tc.method, tc.path, rec.Code, rec.Body, tc.code, tc.body)
		}
	}
}

func ExampleCleanPath() {
	for _, p := range []string{"/v2/code/completions", "/v2/../admin", "/v2/code%2fcompletions"} {
		_, err := route.CleanPath(p)
		fmt.Println(p, err)
	}
	// Output:
	// /v2/code/completions <nil>
	// /v2/../admin invalid request path
	// /v2/code%2fcompletions invalid request path
}
