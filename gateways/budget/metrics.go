package budget

import (
	"errors"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the limiter's Prometheus collectors. They always exist, so
// the hot path never checks for nil; they are exported only when a
// Registerer is given.
type metrics struct {
	allowed, refused, errored       prometheus.Counter
	leases                          *prometheus.CounterVec
	returned                        prometheus.Counter
	abandonedLease, abandonedReturn prometheus.Counter
	pruned                          prometheus.Counter
	leaseSeconds                    prometheus.Observer
}

func newMetrics(reg prometheus.Registerer, logger *slog.Logger) *metrics {
	takes := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "cloudconnector", Subsystem: "budget", Name: "takes_total",
		Help: "Budget units asked for, by result: allowed, refused (budget exhausted) or error (database unreachable or invalid spec).",
	}, []string{"result"})
	leases := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "cloudconnector", Subsystem: "budget", Name: "lease_statements_total",
		Help: "Lease statements run against Postgres, by result: granted, exhausted or error.",
	}, []string{"result"})
	returned := prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "cloudconnector", Subsystem: "budget", Name: "returned_units_total",
		Help: "Unspent leased units returned to Postgres.",
	})
	abandoned := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "cloudconnector", Subsystem: "budget", Name: "abandoned_units_total",
		Help: "Units given up for their window because a statement's outcome is unknown (its reply was lost or late), " +
			"by reason: lease_outcome_unknown (units asked for; at most this many are counted in Postgres but held by no gateway) " +
			"or return_outcome_unknown (units dropped from hand that Postgres may still count).",
	}, []string{"reason"})
	pruned := prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "cloudconnector", Subsystem: "budget", Name: "pruned_rows_total",
		Help: "Counter rows of long-ended windows deleted from budget_counters.",
	})
	latency := prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "cloudconnector", Subsystem: "budget", Name: "lease_statement_duration_seconds",
		Help:    "Latency of lease statements.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14), // 0.5ms to about 4s
	})
	if reg != nil {
		takes = register(reg, takes, logger)
		leases = register(reg, leases, logger)
		returned = register(reg, returned, logger)
		abandoned = register(reg, abandoned, logger)
		pruned = register(reg, pruned, logger)
		latency = register(reg, latency, logger)
	}
	return &metrics{
		allowed:         takes.WithLabelValues("allowed"),
		refused:         takes.WithLabelValues("refused"),
		errored:         takes.WithLabelValues("error"),
		leases:          leases,
		returned:        returned,
		abandonedLease:  abandoned.WithLabelValues("lease_outcome_unknown"),
		abandonedReturn: abandoned.WithLabelValues("return_outcome_unknown"),
		pruned:          pruned,
		leaseSeconds:    latency,
	}
}

// register registers c, or returns the identical collector already
// registered (by another Limiter on the same Registerer). Any other failure
// is logged and leaves c working but unexported: metrics must not stop the
// gateway.
func register[C prometheus.Collector](reg prometheus.Registerer, c C, logger *slog.Logger) C {
	err := reg.Register(c)
	if err == nil {
		return c
	}
	if are, ok := errors.AsType[prometheus.AlreadyRegisteredError](err); ok {
		if existing, ok := are.ExistingCollector.(C); ok {
			return existing
		}
	}
	logger.Error("budget: register metrics", "err", err)
	return c
}
