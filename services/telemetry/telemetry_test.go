package telemetry_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"

	"github.com/cloud-connector/cloud-connector/services/telemetry"
)

// collector is an OTLP/HTTP endpoint that keeps what it receives.
type collector struct {
	srv  *httptest.Server
	mu   sync.Mutex
	reqs []string // "METHOD path body"
}

func startCollector(tb testing.TB) *collector {
	tb.Helper()
	c := &collector{}
	c.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		c.mu.Lock()
		c.reqs = append(c.reqs, r.Method+" "+r.URL.Path+" "+string(b))
		c.mu.Unlock()
		w.Header().Set("Content-Type", r.Header.Get("Content-Type"))
		io.WriteString(w, "{}")
	}))
	tb.Cleanup(c.srv.Close)
	return c
}

func (c *collector) received() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.reqs...)
}

func envOf(vars map[string]string) func(string) string {
	return func(k string) string { return vars[k] }
}

// emit creates a root span and a child, ends both and shuts tracing down,
// which exports whatever is to be exported. It returns their contexts.
func emit(tb testing.TB, tr *telemetry.Tracing) (root, child trace.SpanContext) {
	tb.Helper()
	tracer := tr.TracerProvider().Tracer("test")
	ctx, parent := tracer.Start(context.Background(), "probe")
	_, span := tracer.Start(ctx, "probe-child")
	span.End()
	parent.End()
	if err := telemetry.Shutdown(context.Background(), tr.TracerProvider()); err != nil {
		tb.Errorf("Shutdown: %v", err)
	}
	return parent.SpanContext(), span.SpanContext()
}

// TestNoEndpointExportsNothing checks the default: without an endpoint in
// the configuration no exporter exists. Spans still get ids, so trace
// context propagates; nothing is sent anywhere, not even to an endpoint
// the process environment names (an exporter created by mistake would
// read it), and OpenTelemetry reports no error (an exporter trying its
// default, localhost:4318, would fail to connect and say so).
func TestNoEndpointExportsNothing(t *testing.T) {
	c := startCollector(t)
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", c.srv.URL)
	var mu sync.Mutex
	var otelErrs []error
	otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) {
		mu.Lock()
		defer mu.Unlock()
		otelErrs = append(otelErrs, err)
	}))
	t.Cleanup(func() { otel.SetErrorHandler(otel.ErrorHandlerFunc(func(error) {})) })

	tr, err := telemetry.New(context.Background(), telemetry.Config{ServiceName: "ai", Getenv: envOf(map[string]string{
		"OTEL_EXPORTER_OTLP_HEADERS": "authorization=secret", "OTEL_TRACES_SAMPLER": "parentbased_always_on",
	})})
	if err != nil {
		t.Fatal(err)
	}
	if tr.Endpoint() != "" {
		t.Errorf("Endpoint = %q; want none", tr.Endpoint())
	}
	root, child := emit(t, tr)
	if !root.IsValid() || !root.IsSampled() || child.TraceID() != root.TraceID() || child.SpanID() == root.SpanID() {
		t.Errorf("root %v, child %v; want sampled spans with ids, the child in the root's trace", root, child)
	}
	if got := c.received(); len(got) != 0 {
		t.Errorf("collector received %q; want nothing", got)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(otelErrs) != 0 {
		t.Errorf("OpenTelemetry reported %v; want nothing", errors.Join(otelErrs...))
	}
}

// TestExport checks the endpoint variables, as the specification reads
// them, against a real collector: spans arrive with the service's name.
func TestExport(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, path string
		env        map[string]string
	}{
		{"base URL", "/base/v1/traces", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "/base"}},
		{"traces URL as is", "/custom", map[string]string{
			"OTEL_EXPORTER_OTLP_ENDPOINT": "/ignored", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "/custom",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c := startCollector(t)
			env := map[string]string{"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
			for k, v := range tc.env {
				env[k] = c.srv.URL + v
			}
			tr, err := telemetry.New(context.Background(), telemetry.Config{ServiceName: "ai", Getenv: envOf(env)})
			if err != nil {
				t.Fatal(err)
			}
			if tr.Endpoint() != c.srv.URL+tc.path {
				t.Errorf("Endpoint = %q; want %q", tr.Endpoint(), c.srv.URL+tc.path)
			}
			root, _ := emit(t, tr)
			got := c.received()
			if len(got) != 1 || !strings.HasPrefix(got[0], "POST "+tc.path+" ") {
				t.Fatalf("collector received %q; want one POST to %s", got, tc.path)
			}
			var body struct {
				ResourceSpans []struct {
					Resource struct {
						Attributes []struct {
							Key   string
							Value struct{ StringValue string }
						}
					}
					ScopeSpans []struct {
						Spans []struct{ Name, TraceID string }
					}
				}
			}
			if err := json.Unmarshal([]byte(strings.SplitN(got[0], " ", 3)[2]), &body); err != nil || len(body.ResourceSpans) != 1 {
				t.Fatalf("export %s: %v", got[0], err)
			}
			rs := body.ResourceSpans[0]
			service := ""
			for _, a := range rs.Resource.Attributes {
				if a.Key == "service.name" {
					service = a.Value.StringValue
				}
			}
			if service != "ai" {
				t.Errorf("service.name = %q; want ai", service)
			}
			var names []string
			for _, ss := range rs.ScopeSpans {
				for _, s := range ss.Spans {
					names = append(names, s.Name)
					if !strings.EqualFold(s.TraceID, root.TraceID().String()) {
						t.Errorf("span %s in trace %s; want %s", s.Name, s.TraceID, root.TraceID())
					}
				}
			}
			if len(names) != 2 {
				t.Errorf("exported spans %q; want probe and probe-child", names)
			}
		})
	}
}

// TestNotExported checks the settings that keep spans from an endpoint
// that is configured.
func TestNotExported(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		env   map[string]string
		spans bool // spans still get ids
	}{
		{"sdk disabled", map[string]string{"OTEL_SDK_DISABLED": "true"}, false},
		{"exporter none", map[string]string{"OTEL_TRACES_EXPORTER": "none"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c := startCollector(t)
			tc.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = c.srv.URL
			tc.env["OTEL_SERVICE_NAME"] = "override"
			tr, err := telemetry.New(context.Background(), telemetry.Config{ServiceName: "ai", Getenv: envOf(tc.env)})
			if err != nil {
				t.Fatal(err)
			}
			root, _ := emit(t, tr)
			if root.IsValid() != tc.spans {
				t.Errorf("span valid = %v; want %v", root.IsValid(), tc.spans)
			}
			if tr.Endpoint() != "" || len(c.received()) != 0 {
				t.Errorf("Endpoint %q, collector received %q; want nothing", tr.Endpoint(), c.received())
			}
		})
	}
}

// TestSampler checks that the sampler sets the sampled flag of spans that
// are not exported, so services downstream sample as this one would.
func TestSampler(t *testing.T) {
	t.Parallel()
	sampled := trace.NewSpanContext(trace.SpanContextConfig{
		TraceID: [16]byte{1}, SpanID: [8]byte{1}, TraceFlags: trace.FlagsSampled, Remote: true,
	})
	notSampled := sampled.WithTraceFlags(0)
	for _, tc := range []struct {
		sampler, arg string
		parent       trace.SpanContext
		want         bool
	}{
		{"", "", trace.SpanContext{}, true},
		{"", "", notSampled, false},
		{"", "", sampled, true},
		{"traceidratio", "0", trace.SpanContext{}, false},
		{"traceidratio", "1", trace.SpanContext{}, true},
		{"parentbased_traceidratio", "0", sampled, true},
		{"parentbased_always_off", "", trace.SpanContext{}, false},
		{"always_on", "", notSampled, true},
		{"always_off", "", sampled, false},
	} {
		tr, err := telemetry.New(context.Background(), telemetry.Config{Getenv: envOf(map[string]string{
			"OTEL_TRACES_SAMPLER": tc.sampler, "OTEL_TRACES_SAMPLER_ARG": tc.arg,
		})})
		if err != nil {
			t.Fatalf("%s %s: %v", tc.sampler, tc.arg, err)
		}
		ctx := trace.ContextWithRemoteSpanContext(context.Background(), tc.parent)
		_, span := tr.TracerProvider().Tracer("test").Start(ctx, "probe")
		sc := span.SpanContext()
		if sc.IsSampled() != tc.want || (tc.parent.IsValid() && sc.TraceID() != tc.parent.TraceID()) {
			t.Errorf("sampler %q arg %q, parent %v: span %v; want sampled %v in the parent's trace",
				tc.sampler, tc.arg, tc.parent, sc, tc.want)
		}
	}
}

// TestInvalidSettings checks that a bad setting fails the start and says
// which variable is wrong.
func TestInvalidSettings(t *testing.T) {
	t.Parallel()
	for name, value := range map[string]string{
		"OTEL_SDK_DISABLED":                  "yes",
		"OTEL_TRACES_EXPORTER":               "console",
		"OTEL_TRACES_SAMPLER":                "jaeger_remote",
		"OTEL_TRACES_SAMPLER_ARG":            "1.5",
		"OTEL_EXPORTER_OTLP_ENDPOINT":        "otel-collector:4318",
		"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "grpc://otel-collector:4317",
		"OTEL_EXPORTER_OTLP_PROTOCOL":        "grpc",
	} {
		env := map[string]string{name: value, "OTEL_TRACES_SAMPLER": "traceidratio"}
		if name == "OTEL_TRACES_SAMPLER" {
			env[name] = value
		}
		if strings.Contains(name, "PROTOCOL") {
			env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://otel-collector:4318"
		}
		_, err := telemetry.New(context.Background(), telemetry.Config{Getenv: envOf(env)})
		if err == nil || !strings.Contains(err.Error(), value) {
			t.Errorf("%s=%s: err = %v; want an error naming the value", name, value, err)
		}
	}
}

// TestLogger checks that log lines written with a span's context name its
// trace and span, and only those.
func TestLogger(t *testing.T) {
	t.Parallel()
	var buf strings.Builder
	logger := telemetry.Logger(slog.New(slog.NewJSONHandler(&buf, nil))).With("gateway", "ai")
	logger = telemetry.Logger(logger) // already wrapped: unchanged
	ctx, span := telemetry.NoExport().Tracer("test").Start(context.Background(), "request")
	defer span.End()
	logger.WarnContext(ctx, "with span", "request_id", "r-1")
	logger.Warn("without span")

	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("log lines %q", lines)
	}
	var with, without map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &with); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(lines[1]), &without); err != nil {
		t.Fatal(err)
	}
	sc := span.SpanContext()
	if with["trace_id"] != sc.TraceID().String() || with["span_id"] != sc.SpanID().String() ||
		with["request_id"] != "r-1" || with["gateway"] != "ai" {
		t.Errorf("line with a span = %s; want its trace_id %s and span_id %s", lines[0], sc.TraceID(), sc.SpanID())
	}
	if strings.Count(lines[0], "trace_id") != 1 {
		t.Errorf("trace_id logged more than once: %s", lines[0])
	}
	if _, ok := without["trace_id"]; ok {
		t.Errorf("line without a span has a trace_id: %s", lines[1])
	}
}
