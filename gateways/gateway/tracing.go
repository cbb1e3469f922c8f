package gateway

import (
	"context"
	"net/http"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/cloud-connector/cloud-connector/gateways/route"
)

// tracerName names the gateway's instrumentation scope.
const tracerName = "github.com/cloud-connector/cloud-connector/gateways/gateway"

// Trace context headers (W3C). A client's never reach a backend: the
// proxy removes them and sends the gateway's instead.
var traceHeaders = []string{"Traceparent", "Tracestate", "Baggage"}

// startSpan starts the server span of a request from the internet; path is
// its escaped path as received.
//
// Every request starts a new trace. A GitLab instance may send a
// traceparent, but it is a client on the internet, and continuing its
// trace would hand it our trace ids and, through the sampled flag, the
// sampling decision for every span of the decision service and the
// backends: any caller could have all of its requests recorded and
// exported, loading the tracing pipeline at will. So the gateway's own
// sampler decides, at the root, and the caller's span context is kept as a
// link, which still joins the two traces for whoever sees both. Only the
// trace context is read: the caller's baggage is not extracted, and the
// backend gets the gateway's traceparent and nothing of the caller's.
func (g *Gateway) startSpan(r *http.Request, path string) (context.Context, trace.Span) {
	ctx, span := g.tracer.Start(r.Context(), spanName(r.Method), serverSpan...)
	if !span.IsRecording() {
		// Sampled out, or not exported at all: the span is there for its
		// ids, and describing it would be wasted work.
		return ctx, span
	}
	method, known := knownMethod(r.Method)
	attrs := make([]attribute.KeyValue, 0, 6)
	attrs = append(attrs, method, semconv.URLPath(path), semconv.URLScheme(scheme(r)),
		semconv.ServerAddress(hostName(r.Host)), semconv.NetworkProtocolVersion(protoVersion(r)))
	if !known {
		attrs = append(attrs, semconv.HTTPRequestMethodOriginal(r.Method))
	}
	span.SetAttributes(attrs...)
	if _, ok := r.Header["Traceparent"]; ok {
		remote := propagation.TraceContext{}.Extract(context.Background(), propagation.HeaderCarrier(r.Header))
		if sc := trace.SpanContextFromContext(remote); sc.IsValid() {
			span.AddLink(trace.Link{SpanContext: sc})
		}
	}
	return ctx, span
}

// serverSpan starts a request's span: a server span, in a trace of its own.
var serverSpan = []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindServer), trace.WithNewRoot()}

// spanName is an HTTP span's name before (or without) a route: its method,
// or HTTP for a method HTTP does not define.
func spanName(method string) string {
	if _, known := knownMethod(method); known {
		return method
	}
	return "HTTP"
}

// nameSpan names the request's span after its route, as OpenTelemetry's
// HTTP conventions do ("POST /v2/code/completions"), and notes the route.
func nameSpan(span trace.Span, r *http.Request, rt route.Route, requestID string) {
	if !span.IsRecording() {
		return
	}
	if _, known := knownMethod(r.Method); known {
		span.SetName(r.Method + " " + rt.Path)
	}
	span.SetAttributes(semconv.HTTPRoute(rt.Path), attribute.String("cloudconnector.route", rt.Name),
		attribute.String("cloudconnector.request_id", requestID))
}

// spanStatus records the status the gateway answered with. As for any
// server span, only 5xx is an error: a 4xx is the client's.
func spanStatus(ctx context.Context, status int) {
	span := trace.SpanFromContext(ctx)
	span.SetAttributes(semconv.HTTPResponseStatusCode(status))
	if status >= 500 {
		span.SetStatus(codes.Error, http.StatusText(status))
	}
}

// knownMethod returns the http.request.method attribute: the method, or
// _OTHER for one HTTP does not define (the attribute's values stay few).
func knownMethod(m string) (attribute.KeyValue, bool) {
	switch m {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch,
		http.MethodDelete, http.MethodConnect, http.MethodOptions, http.MethodTrace:
		return semconv.HTTPRequestMethodKey.String(m), true
	}
	return semconv.HTTPRequestMethodOther, false
}

func scheme(r *http.Request) string {
	if r.TLS != nil {
		return "https"
	}
	return "http"
}

func protoVersion(r *http.Request) string {
	switch {
	case r.ProtoMajor == 2:
		return "2"
	case r.ProtoMajor == 1 && r.ProtoMinor == 0:
		return "1.0"
	}
	return "1.1"
}
