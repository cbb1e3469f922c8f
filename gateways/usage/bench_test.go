package usage_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/cloud-connector/cloud-connector/gateways/usage"
)

// discardDB accepts every statement at once, so the benchmark measures
// Record and not PostgreSQL.
type discardDB struct{}

func (discardDB) Exec(context.Context, string, ...any) (pgconn.CommandTag, error) {
	return pgconn.NewCommandTag("INSERT 0 0"), nil
}

// QueryRow answers the partition check: nothing failed, nothing to do.
func (discardDB) QueryRow(context.Context, string, ...any) pgx.Row { return discardRow{} }

type discardRow struct{}

func (discardRow) Scan(...any) error { return nil }

// BenchmarkRecord measures the request path: queueing while Run drains the
// buffer, and dropping when the buffer is full.
func BenchmarkRecord(b *testing.B) {
	e := event(0)
	b.Run("queue", func(b *testing.B) {
		reg := prometheus.NewRegistry()
		rec, err := usage.New(discardDB{}, usage.Config{Registerer: reg}, nil)
		if err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- rec.Run(ctx) }()
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				rec.Record(e)
			}
		})
		b.StopTimer()
		cancel()
		<-done
		if err := rec.Close(context.Background()); err != nil {
			b.Fatal(err)
		}
		families, _ := reg.Gather()
		for _, f := range families {
			if f.GetName() == "cloudconnector_usage_events_dropped_total" {
				var dropped float64
				for _, m := range f.GetMetric() {
					dropped += m.GetCounter().GetValue()
				}
				b.ReportMetric(dropped/float64(b.N), "dropped/op")
			}
		}
	})
	b.Run("full", func(b *testing.B) {
		rec, err := usage.New(discardDB{}, usage.Config{BatchSize: 1, BufferSize: 1, FlushInterval: time.Hour}, nil)
		if err != nil {
			b.Fatal(err)
		}
		rec.Record(e) // fills the buffer; Run is not started
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				rec.Record(e)
			}
		})
	})
}
