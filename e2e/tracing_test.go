package e2e_test

import (
	"context"
	"net/http"
	"testing"

	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/cloud-connector/cloud-connector/services/server/servertest"
	"github.com/cloud-connector/cloud-connector/services/token/tokentest"
)

// TestOneTrace follows a completion through the real components: the AI
// gateway, the decision service and the backend all see one trace, which
// the gateway starts. The backend's traceparent is in the trace of the
// gateway's server span, and the decision service's Authorize span is a
// child of the gateway's Authorize call.
func TestOneTrace(t *testing.T) {
	t.Parallel()
	s := setup(t, options{})
	h := gitlabHeaders(s.mint(t, tokentest.Claims{}))
	// A GitLab instance's own trace: linked, not continued.
	h.Set("Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	res := s.do(t, "POST", s.aiURL("/v2/code/completions"), h, completionBody)
	if res.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %v", res.StatusCode, readJSON(t, res))
	}

	span := func(what, service string, kind trace.SpanKind, name string) tracetest.SpanStub {
		t.Helper()
		var found tracetest.SpanStub
		servertest.Eventually(t, what, func() bool {
			for _, sp := range s.spans.GetSpans() {
				if serviceOf(sp) == service && sp.SpanKind == kind && (name == "" || sp.Name == name) {
					found = sp
					return true
				}
			}
			return false
		})
		return found
	}
	const authorize = "cloudconnector.authz.v1.AuthorizationService/Authorize"
	server := span("the gateway's span", "ai", trace.SpanKindServer, "POST /v2/code/completions")
	call := span("the gateway's Authorize call", "ai", trace.SpanKindClient, authorize)
	decided := span("the decision service's Authorize span", "decision", trace.SpanKindServer, authorize)
	proxied := span("the gateway's backend request", "ai", trace.SpanKindClient, "POST")

	tid := server.SpanContext.TraceID()
	if server.Parent.IsValid() || tid.String() == "0af7651916cd43dd8448eb211c80319c" {
		t.Errorf("gateway span: parent %v, trace %s; want a new trace", server.Parent, tid)
	}
	if call.Parent.SpanID() != server.SpanContext.SpanID() || call.SpanContext.TraceID() != tid {
		t.Errorf("Authorize call: parent %s, trace %s; want the gateway span %s of trace %s",
			call.Parent.SpanID(), call.SpanContext.TraceID(), server.SpanContext.SpanID(), tid)
	}
	if decided.Parent.SpanID() != call.SpanContext.SpanID() || decided.SpanContext.TraceID() != tid || !decided.Parent.IsRemote() {
		t.Errorf("decision service span: parent %s (remote %v), trace %s; want the gateway's call %s of trace %s",
			decided.Parent.SpanID(), decided.Parent.IsRemote(), decided.SpanContext.TraceID(), call.SpanContext.SpanID(), tid)
	}
	if proxied.Parent.SpanID() != server.SpanContext.SpanID() {
		t.Errorf("backend request: parent %s; want the gateway span %s", proxied.Parent.SpanID(), server.SpanContext.SpanID())
	}

	tp := s.backend.lastHeaders().Get("Traceparent")
	sc := trace.SpanContextFromContext(propagation.TraceContext{}.Extract(context.Background(),
		propagation.MapCarrier{"traceparent": tp}))
	if sc.TraceID() != tid || sc.SpanID() != proxied.SpanContext.SpanID() {
		t.Errorf("backend got traceparent %q; want the gateway's backend request %s of trace %s",
			tp, proxied.SpanContext.SpanID(), tid)
	}
}

func serviceOf(s tracetest.SpanStub) string {
	v, _ := s.Resource.Set().Value(semconv.ServiceNameKey)
	return v.AsString()
}
