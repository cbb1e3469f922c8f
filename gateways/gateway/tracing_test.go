package gateway_test

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/cloud-connector/cloud-connector/gateways/gateway"
	"github.com/cloud-connector/cloud-connector/services/server/servertest"
)

// A GitLab instance's trace context, as a client might send it.
const (
	clientTraceID     = "0af7651916cd43dd8448eb211c80319c"
	clientSpanID      = "b7ad6b7169203331"
	clientTraceparent = "00-" + clientTraceID + "-" + clientSpanID + "-01"
)

// parseTraceparent returns the span context a traceparent header names;
// it fails the test if the header is not valid.
func parseTraceparent(tb testing.TB, v string) trace.SpanContext {
	tb.Helper()
	ctx := propagation.TraceContext{}.Extract(context.Background(), propagation.MapCarrier{"traceparent": v})
	sc := trace.SpanContextFromContext(ctx)
	if !sc.IsValid() {
		tb.Fatalf("traceparent %q is not valid", v)
	}
	return sc
}

// withClientTrace adds the client's trace context, state and baggage.
func withClientTrace(req *http.Request) *http.Request {
	req.Header.Set("Traceparent", clientTraceparent)
	req.Header.Set("Tracestate", "client=state")
	req.Header.Set("Baggage", "user=mallory")
	return req
}

// waitSpan returns the first ended span that match accepts, waiting for the
// gateway to end it (it may end after the client has read the response).
func waitSpan(tb testing.TB, spans *tracetest.InMemoryExporter, what string, match func(tracetest.SpanStub) bool) tracetest.SpanStub {
	tb.Helper()
	var found tracetest.SpanStub
	servertest.Eventually(tb, what, func() bool {
		for _, s := range spans.GetSpans() {
			if match(s) {
				found = s
				return true
			}
		}
		return false
	})
	return found
}

func attr(s tracetest.SpanStub, key attribute.Key) attribute.Value {
	for _, a := range s.Attributes {
		if a.Key == key {
			return a.Value
		}
	}
	return attribute.Value{}
}

// TestTraceRecorded follows one allowed request through a recorded trace:
// the gateway's server span starts a new trace linked to the client's,
// the Authorize call and the backend request are its children, and the
// decision service and the backend receive their contexts as traceparent,
// with nothing of the client's trace context.
func TestTraceRecorded(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	req := e.newRequest(t, http.MethodPost, "/v2/code/completions", "allow", strings.NewReader(sampleBody))
	r := e.do(t, withClientTrace(req))
	if r.status != http.StatusOK {
		t.Fatalf("status %d: %s", r.status, r.body)
	}
	seen := r.seen(t)

	server := waitSpan(t, e.spans, "the server span", func(s tracetest.SpanStub) bool {
		return s.SpanKind == trace.SpanKindServer
	})
	tid := server.SpanContext.TraceID()
	if server.Parent.IsValid() || tid.String() == clientTraceID {
		t.Errorf("server span parent %v, trace %s; want a new root, not the client's trace", server.Parent, tid)
	}
	if len(server.Links) != 1 || server.Links[0].SpanContext.TraceID().String() != clientTraceID ||
		server.Links[0].SpanContext.SpanID().String() != clientSpanID {
		t.Errorf("server span links = %+v; want one, to the client's span", server.Links)
	}
	if server.Name != "POST /v2/code/completions" || attr(server, "http.route").AsString() != "/v2/code/completions" ||
		attr(server, "cloudconnector.route").AsString() != "code_completions" ||
		attr(server, "http.response.status_code").AsInt64() != 200 ||
		attr(server, "cloudconnector.feature").AsString() != "complete_code" {
		t.Errorf("server span %q attributes %v", server.Name, server.Attributes)
	}

	child := func(what, name string) tracetest.SpanStub {
		t.Helper()
		s := waitSpan(t, e.spans, what, func(s tracetest.SpanStub) bool {
			return s.SpanKind == trace.SpanKindClient && s.Name == name
		})
		if s.SpanContext.TraceID() != tid || s.Parent.SpanID() != server.SpanContext.SpanID() {
			t.Errorf("%s: trace %s parent %s; want a child of the server span %s in trace %s", what,
				s.SpanContext.TraceID(), s.Parent.SpanID(), server.SpanContext.SpanID(), tid)
		}
		return s
	}
	decision := child("the Authorize span", "cloudconnector.authz.v1.AuthorizationService/Authorize")
	backend := child("the backend span", "POST")
	if got := attr(backend, "cloudconnector.backend").AsString(); got != "main" {
		t.Errorf("backend span names backend %q; want main", got)
	}

	e.fake.mu.Lock()
	decisionTP := e.fake.traceparents[len(e.fake.traceparents)-1]
	e.fake.mu.Unlock()
	if sc := parseTraceparent(t, decisionTP); sc.TraceID() != tid || sc.SpanID() != decision.SpanContext.SpanID() {
		t.Errorf("decision service got traceparent %s; want the Authorize span %s of trace %s", decisionTP,
			decision.SpanContext.SpanID(), tid)
	}
	sc := parseTraceparent(t, seen.Header.Get("Traceparent"))
	if sc.TraceID() != tid || sc.SpanID() != backend.SpanContext.SpanID() || !sc.IsSampled() {
		t.Errorf("backend got traceparent %s; want the backend span %s of trace %s, sampled",
			seen.Header.Get("Traceparent"), backend.SpanContext.SpanID(), tid)
	}
	for _, h := range []string{"Tracestate", "Baggage"} {
		if v, ok := seen.Header[h]; ok {
			t.Errorf("backend got the client's %s %q", h, v)
		}
	}
	if n := len(seen.Header.Values("Traceparent")); n != 1 {
		t.Errorf("backend got %d traceparent headers; want 1", n)
	}

	// Nothing secret is recorded: the token travels in a header and the
	// Authorize message, neither of which a span describes.
	for _, s := range e.spans.GetSpans() {
		for _, a := range s.Attributes {
			if v := a.Value.Emit(); strings.Contains(v, "Bearer") || strings.Contains(strings.ToLower(string(a.Key)), "authorization") {
				t.Errorf("span %q records %s=%q", s.Name, a.Key, v)
			}
		}
	}
}

// TestTraceNotRecorded checks the production default without an OTLP
// endpoint: nothing is recorded, yet the decision service and the backend
// get the request's trace context, a new trace the gateway's sampler
// marked sampled, and not the client's.
func TestTraceNotRecorded(t *testing.T) {
	t.Parallel()
	e := setup(t, options{noExport: true})
	req := e.newRequest(t, http.MethodPost, "/v2/code/completions", "allow", strings.NewReader(sampleBody))
	first := e.do(t, withClientTrace(req))
	second := e.post(t, "/v2/code/completions", "allow")
	if first.status != http.StatusOK || second.status != http.StatusOK {
		t.Fatalf("statuses %d, %d; want 200", first.status, second.status)
	}
	seen := first.seen(t)
	sc := parseTraceparent(t, seen.Header.Get("Traceparent"))
	if sc.TraceID().String() == clientTraceID || !sc.IsSampled() {
		t.Errorf("backend got traceparent %s; want a new, sampled trace", seen.Header.Get("Traceparent"))
	}
	for _, h := range []string{"Tracestate", "Baggage"} {
		if v, ok := seen.Header[h]; ok {
			t.Errorf("backend got the client's %s %q", h, v)
		}
	}
	e.fake.mu.Lock()
	decisionTP := e.fake.traceparents[0]
	e.fake.mu.Unlock()
	if d := parseTraceparent(t, decisionTP); d.TraceID() != sc.TraceID() {
		t.Errorf("decision service got trace %s, backend %s; want one trace", d.TraceID(), sc.TraceID())
	}
	if other := parseTraceparent(t, second.seen(t).Header.Get("Traceparent")); other.TraceID() == sc.TraceID() {
		t.Error("two requests share a trace")
	}
}

// TestLogsCarryTraceID checks that the gateway's request log lines name
// the request's trace and span next to its request id.
func TestLogsCarryTraceID(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	if r := e.post(t, "/v1/down", "allow"); r.status != http.StatusBadGateway {
		t.Fatalf("backend down: status %d; want 502", r.status)
	}
	r := e.post(t, "/v2/code/completions", "nobody-knows-me")
	if r.status != http.StatusUnauthorized {
		t.Fatalf("status %d; want 401", r.status)
	}
	spans := map[string]tracetest.SpanStub{}
	servertest.Eventually(t, "two server spans", func() bool {
		for _, s := range e.spans.GetSpans() {
			if s.SpanKind == trace.SpanKindServer {
				spans[attr(s, "cloudconnector.route").AsString()] = s
			}
		}
		return len(spans) == 2
	})
	down := spans["down"]
	line := logLine(t, e.logs.String(), "proxy to backend failed")
	for _, want := range []string{
		"trace_id=" + down.SpanContext.TraceID().String(),
		"span_id=" + down.SpanContext.SpanID().String(),
		"request_id=" + attr(down, "cloudconnector.request_id").AsString(),
	} {
		if !strings.Contains(line, want) {
			t.Errorf("log line lacks %s:\n%s", want, line)
		}
	}
	if attr(down, "cloudconnector.request_id").AsString() == "" || attr(down, "http.response.status_code").AsInt64() != 502 {
		t.Errorf("down span attributes %v", down.Attributes)
	}
	if s := spans["code_completions"]; attr(s, "cloudconnector.denial_reason").AsString() != "bad_token" {
		t.Errorf("refused span attributes %v; want the denial reason", s.Attributes)
	}
}

// logLine returns the one log line containing msg.
func logLine(tb testing.TB, logs, msg string) string {
	tb.Helper()
	var found []string
	for l := range strings.Lines(logs) {
		if strings.Contains(l, msg) {
			found = append(found, l)
		}
	}
	if len(found) != 1 {
		tb.Fatalf("%d log lines with %q; want 1:\n%s", len(found), msg, logs)
	}
	return found[0]
}

// TestShutdownExportsSpans checks that Run, as it stops, exports the spans
// its tracer provider still holds: with a batch that would not go out for
// an hour, the request's spans arrive only then.
func TestShutdownExportsSpans(t *testing.T) {
	t.Parallel()
	spans := tracetest.NewInMemoryExporter()
	e := setup(t, options{configure: func(c *gateway.Config) {
		c.TracerProvider = sdktrace.NewTracerProvider(
			sdktrace.WithBatcher(keep{spans}, sdktrace.WithBatchTimeout(time.Hour)))
	}})
	if r := e.post(t, "/v2/code/completions", "allow"); r.status != http.StatusOK {
		t.Fatalf("status %d: %s", r.status, r.body)
	}
	if got := spans.GetSpans(); len(got) != 0 {
		t.Fatalf("%d spans exported while running; want them batched", len(got))
	}
	e.stopped(t)
	kinds := map[trace.SpanKind]int{}
	for _, s := range spans.GetSpans() {
		kinds[s.SpanKind]++
	}
	if kinds[trace.SpanKindServer] != 1 || kinds[trace.SpanKindClient] != 2 {
		t.Errorf("exported at shutdown: %v; want the server span and its two client spans", kinds)
	}
}

// keep is an exporter that keeps its spans when shut down, which an
// InMemoryExporter forgets.
type keep struct{ *tracetest.InMemoryExporter }

func (keep) Shutdown(context.Context) error { return nil }
