package usage

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Reasons an event is dropped, the values of usage_events_dropped_total's
// reason label.
const (
	reasonBufferFull   = "buffer_full"   // Record found the buffer full (no spool, or the spool cannot keep up)
	reasonClosed       = "closed"        // Record after Close
	reasonInvalid      = "invalid"       // the database refused the event even alone
	reasonSpoolCorrupt = "spool_corrupt" // a spooled line could not be decoded
	reasonShutdown     = "shutdown"      // Close could neither write nor spool the event
)

type metrics struct {
	recorded    prometheus.Counter
	written     prometheus.Counter
	duplicates  prometheus.Counter
	spooled     prometheus.Counter
	replayed    prometheus.Counter
	corrected   prometheus.Counter
	flushErrors prometheus.Counter

	droppedFull     prometheus.Counter
	droppedClosed   prometheus.Counter
	droppedInvalid  prometheus.Counter
	droppedCorrupt  prometheus.Counter
	droppedShutdown prometheus.Counter

	batchSeconds prometheus.Histogram
}

// newMetrics creates the Recorder's metrics and registers them with reg, if
// not nil. held reports the events in memory.
func newMetrics(reg prometheus.Registerer, held func() float64) (*metrics, error) {
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
	}
	dropped := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cloudconnector_usage_events_dropped_total",
		Help: "Usage events lost, by reason.",
	}, []string{"reason"})
	m := &metrics{
		recorded:    counter("cloudconnector_usage_events_recorded_total", "Usage events accepted by Record."),
		written:     counter("cloudconnector_usage_events_written_total", "Usage events committed to the database from memory."),
		duplicates:  counter("cloudconnector_usage_events_duplicate_total", "Usage events written again and skipped as already stored (retries, replays)."),
		spooled:     counter("cloudconnector_usage_events_spooled_total", "Usage events written to the local spool."),
		replayed:    counter("cloudconnector_usage_events_replayed_total", "Usage events committed to the database from the spool."),
		corrected:   counter("cloudconnector_usage_events_corrected_total", "Usage events with values corrected before writing (negative numbers, invalid text or ids)."),
		flushErrors: counter("cloudconnector_usage_flush_errors_total", "Failed attempts to write queued usage events to the database."),

		droppedFull:     dropped.WithLabelValues(reasonBufferFull),
		droppedClosed:   dropped.WithLabelValues(reasonClosed),
		droppedInvalid:  dropped.WithLabelValues(reasonInvalid),
		droppedCorrupt:  dropped.WithLabelValues(reasonSpoolCorrupt),
		droppedShutdown: dropped.WithLabelValues(reasonShutdown),

		batchSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "cloudconnector_usage_batch_duration_seconds",
			Help:    "Time to write one batch of usage events.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 15), // 1ms to 16s
		}),
	}
	if reg == nil {
		return m, nil
	}
	buffer := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "cloudconnector_usage_buffer_events",
		Help: "Usage events held in memory, including those being written or spooled.",
	}, held)
	collectors := []prometheus.Collector{
		m.recorded, m.written, m.duplicates, m.spooled, m.replayed, m.corrected, m.flushErrors,
		dropped, m.batchSeconds, buffer,
	}
	for i, c := range collectors {
		if err := reg.Register(c); err != nil {
			for _, c := range collectors[:i] {
				reg.Unregister(c)
			}
			return nil, fmt.Errorf("register usage metrics: %w", err)
		}
	}
	return m, nil
}
