package telemetry

import (
	"context"
	"encoding/binary"
	"math/rand/v2"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/embedded"
)

// NoExport returns a tracer provider that gives every span fresh ids and
// the parent-based sampling flag, so that trace context propagates and
// trace ids reach the logs, but records nothing: spans exported nowhere
// need no names, attributes or timings. This is what New returns when no
// endpoint is configured; components given no provider use it too.
//
// An SDK provider without an exporter would record every span only to
// drop it: recording costs a gateway about half again the memory it
// allocates per request (BenchmarkGatewayAllowed/traced against /headers).
func NoExport() trace.TracerProvider {
	return idProvider{sampler: sdktrace.ParentBased(sdktrace.AlwaysSample())}
}

// idProvider is NoExport with a given sampler, which sets the sampled flag
// of the traces this process starts and, for parent-based samplers,
// follows the parent's.
type idProvider struct {
	embedded.TracerProvider
	sampler sdktrace.Sampler
}

func (p idProvider) Tracer(string, ...trace.TracerOption) trace.Tracer {
	return idTracer{sampler: p.sampler}
}

type idTracer struct {
	embedded.Tracer
	sampler sdktrace.Sampler
}

// Start returns ctx with a non-recording span: a new span id in the
// parent's trace, or a new trace when there is no parent or opts ask for a
// new root.
func (t idTracer) Start(ctx context.Context, name string, opts ...trace.SpanStartOption) (context.Context, trace.Span) {
	cfg := trace.NewSpanStartConfig(opts...)
	parentCtx := ctx
	if cfg.NewRoot() {
		parentCtx = context.Background()
	}
	parent := trace.SpanContextFromContext(parentCtx)
	tid := parent.TraceID()
	if !parent.IsValid() {
		tid = newTraceID()
	}
	res := t.sampler.ShouldSample(sdktrace.SamplingParameters{
		ParentContext: parentCtx, TraceID: tid, Name: name, Kind: cfg.SpanKind(),
		Attributes: cfg.Attributes(), Links: cfg.Links(),
	})
	flags := parent.TraceFlags() &^ trace.FlagsSampled
	if res.Decision == sdktrace.RecordAndSample {
		flags |= trace.FlagsSampled
	}
	sc := trace.NewSpanContext(trace.SpanContextConfig{
		TraceID: tid, SpanID: newSpanID(), TraceFlags: flags, TraceState: res.Tracestate,
	})
	ctx = trace.ContextWithSpanContext(ctx, sc)
	return ctx, trace.SpanFromContext(ctx)
}

// newTraceID and newSpanID draw from the runtime's per-thread generator:
// ids need to be unique, not secret, and must not contend under load.
func newTraceID() trace.TraceID {
	var id trace.TraceID
	for !id.IsValid() {
		binary.NativeEndian.PutUint64(id[:8], rand.Uint64())
		binary.NativeEndian.PutUint64(id[8:], rand.Uint64())
	}
	return id
}

func newSpanID() trace.SpanID {
	var id trace.SpanID
	for !id.IsValid() {
		binary.NativeEndian.PutUint64(id[:], rand.Uint64())
	}
	return id
}
