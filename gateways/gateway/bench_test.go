package gateway_test

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/cloud-connector/cloud-connector/gateways/gateway"
)

// BenchmarkGatewayAllowed measures the whole gateway path of an allowed
// request whose decision is cached: path cleaning, routing, decision cache,
// budget lease, header rewriting, proxying to a trivial backend and the
// usage event, the request's span and the backend's traceparent; with
// internal_token, also the (cached) internal token; with traced, spans
// recorded and exported (to nowhere) for every request.
// Client and backend run in the same process, so ns/op and allocs/op
// include their share.
func BenchmarkGatewayAllowed(b *testing.B) {
	b.Run("headers", func(b *testing.B) { benchGatewayAllowed(b, nil) })
	b.Run("internal_token", func(b *testing.B) { benchGatewayAllowed(b, withInternalToken(b)) })
	b.Run("traced", func(b *testing.B) {
		benchGatewayAllowed(b, func(c *gateway.Config) {
			c.TracerProvider = sdktrace.NewTracerProvider(sdktrace.WithBatcher(tracetest.NewNoopExporter()))
		})
	})
}

func benchGatewayAllowed(b *testing.B, configure func(*gateway.Config)) {
	reply := []byte(`{"choices":[{"text":"return n % 2 == 0"}]}`)
	backend := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Write(reply)
	})
	// Tracing as in production without an OTLP endpoint: every request
	// has a span and the backend a traceparent, nothing is recorded.
	e := setup(b, options{handler: backend, configure: configure, noExport: true})
	e.fake.set("bench", allowed(time.Hour, 1<<50))
	if r := e.post(b, "/v2/code/completions", "bench"); r.status != http.StatusOK {
		b.Fatalf("priming request: status %d (%s)", r.status, r.body)
	}
	header := e.newRequest(b, http.MethodPost, "/v2/code/completions", "bench", strings.NewReader("")).Header
	url := e.base + "/v2/code/completions"
	tr := &http.Transport{MaxIdleConns: 1024, MaxIdleConnsPerHost: 1024}
	b.Cleanup(tr.CloseIdleConnections)
	client := &http.Client{Transport: tr}

	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(sampleBody))
			if err != nil {
				b.Error(err)
				return
			}
			req.Header = header.Clone()
			res, err := client.Do(req)
			if err != nil {
				b.Error(err)
				return
			}
			io.Copy(io.Discard, res.Body)
			res.Body.Close()
			if res.StatusCode != http.StatusOK {
				b.Errorf("status %d", res.StatusCode)
				return
			}
		}
	})
	b.StopTimer()
	if n := e.fake.count(); n != 1 {
		b.Errorf("decision calls = %d; want 1 (every request after the first is a cache hit)", n)
	}
}
