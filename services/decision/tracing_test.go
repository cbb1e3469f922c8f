package decision_test

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1/authzv1connect"
	"github.com/cloud-connector/cloud-connector/services/decision"
	"github.com/cloud-connector/cloud-connector/services/server/servertest"
)

// TestAuthorizeTraced checks that an Authorize call is a child of the
// calling gateway's span, that its log line names the trace, that health
// checks are not traced, and that Run exports the spans it still holds as
// it stops: the batch would not go out for an hour otherwise.
func TestAuthorizeTraced(t *testing.T) {
	t.Parallel()
	spans := tracetest.NewInMemoryExporter()
	logs := &servertest.Buffer{}
	s := startLogging(t, slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		func(c *decision.Config) {
			c.TracerProvider = sdktrace.NewTracerProvider(
				sdktrace.WithBatcher(keep{spans}, sdktrace.WithBatchTimeout(time.Hour)))
		})

	gateway := trace.NewSpanContext(trace.SpanContextConfig{
		TraceID: trace.TraceID{0x0a, 0xf7, 1}, SpanID: trace.SpanID{0xb7, 1}, TraceFlags: trace.FlagsSampled,
	})
	req := connect.NewRequest(authorizeRequest(t, s.issuer))
	propagation.TraceContext{}.Inject(trace.ContextWithSpanContext(context.Background(), gateway),
		propagation.HeaderCarrier(req.Header()))
	client := authzv1connect.NewAuthorizationServiceClient(s.client, s.baseURL)
	if _, err := client.Authorize(context.Background(), req); err != nil {
		t.Fatalf("Authorize: %v", err)
	}
	check := healthClient(t, s.client, s.baseURL)
	if _, err := check(context.Background(), ""); err != nil {
		t.Fatalf("health check: %v", err)
	}
	if got := spans.GetSpans(); len(got) != 0 {
		t.Fatalf("%d spans exported before shutdown; want them batched", len(got))
	}

	s.stop()
	<-s.done
	got := spans.GetSpans()
	if len(got) != 1 {
		t.Fatalf("exported %d spans at shutdown; want the Authorize span alone: %v", len(got), got)
	}
	sp := got[0]
	if sp.Name != "cloudconnector.authz.v1.AuthorizationService/Authorize" || sp.SpanKind != trace.SpanKindServer ||
		sp.SpanContext.TraceID() != gateway.TraceID() || sp.Parent.SpanID() != gateway.SpanID() || !sp.Parent.IsRemote() {
		t.Errorf("span %q kind %v trace %s parent %s; want the Authorize server span, a child of the gateway's %s",
			sp.Name, sp.SpanKind, sp.SpanContext.TraceID(), sp.Parent.SpanID(), gateway.SpanID())
	}
	line := grepLines(logs.String(), `"msg":"decision"`)
	if !strings.Contains(line, `"trace_id":"`+gateway.TraceID().String()+`"`) ||
		!strings.Contains(line, `"span_id":"`+sp.SpanContext.SpanID().String()+`"`) {
		t.Errorf("decision log line lacks the trace and span ids:\n%s", line)
	}
}

// keep is an exporter that keeps its spans when shut down, which an
// InMemoryExporter forgets.
type keep struct{ *tracetest.InMemoryExporter }

func (keep) Shutdown(context.Context) error { return nil }
