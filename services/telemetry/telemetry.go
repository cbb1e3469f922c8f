// Package telemetry sets up OpenTelemetry tracing for a Cloud Connector
// process from the standard OTEL_* environment variables, and propagates
// trace context the W3C way (traceparent, tracestate, baggage).
//
// Unless OTEL_SDK_DISABLED says otherwise, tracing is always on in the
// sense that matters for operations: every request gets spans, so trace
// ids reach the logs and the decision service and backends receive a
// traceparent. Spans are exported (OTLP over HTTP) only when an endpoint
// is configured; without one no exporter exists, so nothing is sent,
// retried or logged.
package telemetry

import (
	"context"
	"fmt"
	"net/url"
	"path"
	"runtime/debug"
	"strings"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// ShutdownTimeout bounds Shutdown: a collector that does not answer must
// not hold up a process's exit for long.
const ShutdownTimeout = 5 * time.Second

// maxAttributeLength bounds attribute values (a request path is client
// input, up to the server's header limit) unless
// OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT says otherwise.
const maxAttributeLength = 1024

// Config configures New.
type Config struct {
	// ServiceName is the resource's service.name unless OTEL_SERVICE_NAME
	// sets it: "decision", "ai", "cicd". service.version is the main
	// module's version, when the build recorded one.
	ServiceName string
	// Getenv reads the variables below. Default: none are set.
	//
	//	OTEL_SDK_DISABLED                     true: no spans at all
	//	OTEL_TRACES_EXPORTER                  otlp (default) or none
	//	OTEL_EXPORTER_OTLP_ENDPOINT           base URL; spans go to <base>/v1/traces
	//	OTEL_EXPORTER_OTLP_TRACES_ENDPOINT    full URL for spans (wins over the above)
	//	OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL  http/protobuf (default) or http/json
	//	OTEL_SERVICE_NAME                     service.name
	//	OTEL_TRACES_SAMPLER[_ARG]             see samplerFromEnv
	//
	// The exporter reads its other settings (headers, timeout, compression,
	// TLS files), and the SDK OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_* and the
	// span limits, from the process environment.
	Getenv func(string) string
}

// Tracing is a process's tracer provider and how it was configured.
type Tracing struct {
	provider trace.TracerProvider
	endpoint string // where spans go; "" when nowhere
	sampler  string
}

// New builds the tracer provider cfg.Getenv describes. It creates no
// exporter, and so makes no connection, unless an OTLP endpoint is set.
// Invalid settings are errors, so a typo fails the start rather than
// silently turning tracing off.
func New(ctx context.Context, cfg Config) (*Tracing, error) {
	getenv := cfg.Getenv
	if getenv == nil {
		getenv = func(string) string { return "" }
	}
	env := func(name string) string { return strings.TrimSpace(getenv(name)) }

	if disabled, err := boolEnv(env, "OTEL_SDK_DISABLED"); err != nil {
		return nil, err
	} else if disabled {
		return &Tracing{provider: noop.NewTracerProvider(), sampler: "disabled"}, nil
	}
	sampler, samplerName, err := samplerFromEnv(env)
	if err != nil {
		return nil, err
	}
	// Built even when nothing is exported, so a bad setting fails now and
	// not once an endpoint is added.
	res, err := newResource(ctx, cfg, env)
	if err != nil {
		return nil, err
	}
	exporter, endpoint, err := newExporter(ctx, env)
	if err != nil {
		return nil, err
	}
	t := &Tracing{sampler: samplerName}
	if exporter == nil {
		t.provider = idProvider{sampler: sampler}
		return t, nil
	}
	t.provider = sdktrace.NewTracerProvider(sdktrace.WithSampler(sampler), sdktrace.WithResource(res),
		sdktrace.WithRawSpanLimits(spanLimits()), sdktrace.WithBatcher(exporter))
	t.endpoint = endpoint
	return t, nil
}

// Propagator is the W3C propagation every component uses: trace context
// (traceparent, tracestate) and baggage.
func Propagator() propagation.TextMapPropagator {
	return propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})
}

// TracerProvider returns the provider components create their spans with.
// Whoever it is handed to shuts it down (see Shutdown).
func (t *Tracing) TracerProvider() trace.TracerProvider { return t.provider }

// Endpoint returns the URL spans are exported to, without user
// information; "" when they are not exported.
func (t *Tracing) Endpoint() string { return t.endpoint }

// Sampler names the sampler in use, for the start-up log line.
func (t *Tracing) Sampler() string { return t.sampler }

// shutdowner is what an exporting (SDK) tracer provider can do beyond
// creating spans.
type shutdowner interface {
	Shutdown(ctx context.Context) error
}

var _ shutdowner = (*sdktrace.TracerProvider)(nil)

// Shutdown exports the spans tp still holds and stops its exporter, within
// ShutdownTimeout and ctx; a provider that exports nothing has nothing to
// do. The component tp was handed to calls it as the last step of its
// shutdown, once its requests have ended, so that their spans are sent
// within the process's grace period. tp creates no spans afterwards.
func Shutdown(ctx context.Context, tp trace.TracerProvider) error {
	s, ok := tp.(shutdowner)
	if !ok {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, ShutdownTimeout)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		return fmt.Errorf("shut down tracing: %w", err)
	}
	return nil
}

func newResource(ctx context.Context, cfg Config, env func(string) string) (*resource.Resource, error) {
	defaults := []attribute.KeyValue{semconv.ServiceName(cfg.ServiceName)}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		defaults = append(defaults, semconv.ServiceVersion(bi.Main.Version))
	}
	// Later options win: the defaults, then OTEL_RESOURCE_ATTRIBUTES,
	// then OTEL_SERVICE_NAME, as the specification orders them.
	opts := []resource.Option{
		resource.WithTelemetrySDK(),
		resource.WithAttributes(defaults...),
		resource.WithFromEnv(),
	}
	if name := env("OTEL_SERVICE_NAME"); name != "" {
		opts = append(opts, resource.WithAttributes(semconv.ServiceName(name)))
	}
	res, err := resource.New(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("tracing resource: %w", err)
	}
	return res, nil
}

// newExporter returns the OTLP/HTTP exporter the environment asks for, and
// where it sends spans; nil when spans are not to be exported.
func newExporter(ctx context.Context, env func(string) string) (sdktrace.SpanExporter, string, error) {
	switch v := env("OTEL_TRACES_EXPORTER"); v {
	case "", "otlp":
	case "none":
		return nil, "", nil
	default:
		return nil, "", fmt.Errorf("OTEL_TRACES_EXPORTER=%q: want otlp or none", v)
	}
	endpoint, err := endpointFromEnv(env)
	if err != nil || endpoint == nil {
		return nil, "", err
	}
	opts := []otlptracehttp.Option{otlptracehttp.WithEndpointURL(endpoint.String())}
	protocol := env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
	if protocol == "" {
		protocol = env("OTEL_EXPORTER_OTLP_PROTOCOL")
	}
	switch protocol {
	case "", "http/protobuf":
		opts = append(opts, otlptracehttp.WithEncoding(otlptracehttp.EncodingProtobuf))
	case "http/json":
		opts = append(opts, otlptracehttp.WithEncoding(otlptracehttp.EncodingJSON))
	default:
		return nil, "", fmt.Errorf("OTLP protocol %q: want http/protobuf or http/json (this build has no gRPC exporter)", protocol)
	}
	exp, err := otlptracehttp.New(ctx, opts...)
	if err != nil {
		return nil, "", fmt.Errorf("OTLP trace exporter: %w", err)
	}
	return exp, endpoint.Redacted(), nil
}

// endpointFromEnv resolves the traces URL as the specification does:
// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT as is, else
// OTEL_EXPORTER_OTLP_ENDPOINT with /v1/traces appended. Nil: neither set.
func endpointFromEnv(env func(string) string) (*url.URL, error) {
	name, raw, base := "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), false
	if raw == "" {
		name, raw, base = "OTEL_EXPORTER_OTLP_ENDPOINT", env("OTEL_EXPORTER_OTLP_ENDPOINT"), true
	}
	if raw == "" {
		return nil, nil
	}
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("%s=%q: want an http(s) URL like http://otel-collector:4318", name, raw)
	}
	if base {
		u.Path = path.Join("/", u.Path, "v1/traces")
	} else if u.Path == "" {
		u.Path = "/"
	}
	return u, nil
}

func boolEnv(env func(string) string, name string) (bool, error) {
	switch v := strings.ToLower(env(name)); v {
	case "", "false":
		return false, nil
	case "true":
		return true, nil
	default:
		return false, fmt.Errorf("%s=%q: want true or false", name, v)
	}
}

// spanLimits are the SDK's (which OTEL_SPAN_* and OTEL_ATTRIBUTE_* set),
// with attribute values bounded by default.
func spanLimits() sdktrace.SpanLimits {
	l := sdktrace.NewSpanLimits()
	if l.AttributeValueLengthLimit < 0 {
		l.AttributeValueLengthLimit = maxAttributeLength
	}
	return l
}
