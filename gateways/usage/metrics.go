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

	timeFuture prometheus.Counter // occurred_at set to now: it was too far ahead
	timePast   prometheus.Counter // occurred_at set to now: it was too far behind

	partitionErrors      prometheus.Counter
	partitionMonthsAhead prometheus.Gauge

	droppedFull     prometheus.Counter
	droppedClosed   prometheus.Counter
	droppedInvalid  prometheus.Counter
	droppedCorrupt  prometheus.Counter
	droppedShutdown prometheus.Counter

	batchSeconds prometheus.Histogram
}

// newMetrics creates the Recorder's metrics and registers them with reg, if
// not nil. held reports the events in memory.
func newMetrics(reg prometheus.Registerer, held, spoolBytes func() float64) (*metrics, error) {
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
	}
	dropped := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cloudconnector_usage_events_dropped_total",
		Help: "Usage events lost, by reason.",
	}, []string{"reason"})
	timeCorrected := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cloudconnector_usage_events_time_corrected_total",
		Help: "Usage events stored with the time they were recorded because their occurred_at was implausible: " +
			"more than an hour in the future, or more than an hour before the request can have started (direction past). " +
			"Also counted in cloudconnector_usage_events_corrected_total.",
	}, []string{"direction"})
	m := &metrics{
		recorded:    counter("cloudconnector_usage_events_recorded_total", "Usage events accepted by Record."),
		written:     counter("cloudconnector_usage_events_written_total", "Usage events committed to the database from memory."),
		duplicates:  counter("cloudconnector_usage_events_duplicate_total", "Usage events written again and skipped as already stored (retries, replays)."),
		spooled:     counter("cloudconnector_usage_events_spooled_total", "Usage events written to the local spool."),
		replayed:    counter("cloudconnector_usage_events_replayed_total", "Usage events committed to the database from the spool."),
		corrected:   counter("cloudconnector_usage_events_corrected_total", "Usage events with values corrected before writing (negative numbers, invalid text or ids)."),
		flushErrors: counter("cloudconnector_usage_flush_errors_total", "Failed attempts to write queued usage events to the database."),

		timeFuture: timeCorrected.WithLabelValues("future"),
		timePast:   timeCorrected.WithLabelValues("past"),

		partitionErrors: counter("cloudconnector_usage_partition_errors_total",
			"Checks of the usage_events partitions that failed or left a month without its partition. "+
				"Events of a month without a partition go to usage_events_default until a later check moves them."),
		partitionMonthsAhead: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cloudconnector_usage_partition_months_ahead",
			Help: "Months after the current one (UTC) that have a usage_events partition, counted from the current " +
				"month up to the first one missing; -1 when the current month has none. Set by each successful check; " +
				"alert when below 1.",
		}),

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
	spool := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "cloudconnector_usage_spool_bytes",
		Help: "Size of the local usage spool. Spilling stops at the configured maximum; alert well before it.",
	}, spoolBytes)
	collectors := []prometheus.Collector{
		m.recorded, m.written, m.duplicates, m.spooled, m.replayed, m.corrected, m.flushErrors,
		dropped, timeCorrected, m.partitionErrors, m.partitionMonthsAhead, m.batchSeconds, buffer, spool,
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
