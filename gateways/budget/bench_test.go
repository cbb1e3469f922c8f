package budget_test

import (
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cloud-connector/cloud-connector/gateways/budget"
	"github.com/cloud-connector/cloud-connector/migrations/pgtest"
)

// BenchmarkTake measures the hot path: the lease is in hand, so Take does
// not reach Postgres (leases are large enough that the rare refill is noise).
func BenchmarkTake(b *testing.B) {
	spec := budget.Spec{Bucket: "complete_code", Limit: 1 << 50, Window: time.Hour, Unit: "request"}
	cfg := budget.Config{LeaseTarget: time.Hour, MaxLease: 1 << 40, MaxLeaseShare: 1}
	warm := func(b *testing.B, l *budget.Limiter, subject string) {
		b.Helper()
		for range 1000 {
			if out, err := l.Take(b.Context(), subject, spec); err != nil || !out.Allowed {
				b.Fatalf("warm up: %+v, %v", out, err)
			}
		}
	}

	b.Run("same key", func(b *testing.B) {
		l := budget.New(pgtest.Pool(b), cfg, nil)
		warm(b, l, "org-1")
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if out, err := l.Take(b.Context(), "org-1", spec); err != nil || !out.Allowed {
					b.Errorf("take: %+v, %v", out, err)
					return
				}
			}
		})
	})

	b.Run("key per goroutine", func(b *testing.B) {
		l := budget.New(pgtest.Pool(b), cfg, nil)
		keys := runtime.GOMAXPROCS(0) // RunParallel's goroutine count
		for i := range keys {
			warm(b, l, fmt.Sprintf("org-%d", i))
		}
		var next atomic.Int64
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			subject := fmt.Sprintf("org-%d", (next.Add(1)-1)%int64(keys))
			for pb.Next() {
				if out, err := l.Take(b.Context(), subject, spec); err != nil || !out.Allowed {
					b.Errorf("take: %+v, %v", out, err)
					return
				}
			}
		})
	})
}
