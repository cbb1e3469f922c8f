package telemetry

import (
	"context"
	"log/slog"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"
)

// Logger returns l writing trace_id and span_id on every line logged with
// a context that carries a span (the *Context methods, Log), so a request's
// log lines lead to its trace. A logger it returned is returned as is.
//
// The ids join the record's attributes, so under WithGroup they land in
// the group; the processes log without groups.
func Logger(l *slog.Logger) *slog.Logger {
	if _, ok := l.Handler().(logHandler); ok {
		return l
	}
	return slog.New(logHandler{l.Handler()})
}

type logHandler struct{ slog.Handler }

func (h logHandler) Handle(ctx context.Context, r slog.Record) error {
	if sc := trace.SpanContextFromContext(ctx); sc.IsValid() {
		r.AddAttrs(slog.String("trace_id", sc.TraceID().String()), slog.String("span_id", sc.SpanID().String()))
	}
	return h.Handler.Handle(ctx, r)
}

func (h logHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return logHandler{h.Handler.WithAttrs(attrs)}
}

func (h logHandler) WithGroup(name string) slog.Handler {
	return logHandler{h.Handler.WithGroup(name)}
}

// ReportErrors sends the errors OpenTelemetry cannot return to its caller,
// such as a failed export, to logger as WARN lines instead of the standard
// library's logger. It sets otel's global error handler, so only a
// binary's run calls it, once.
func ReportErrors(logger *slog.Logger) {
	otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) {
		logger.Warn("tracing error", "error", err)
	}))
}

// LogStart logs how t traces, once, as a process starts.
func LogStart(logger *slog.Logger, t *Tracing) {
	export := t.Endpoint()
	if export == "" {
		export = "none"
	}
	logger.Info("tracing", "export", export, "sampler", t.Sampler())
}
