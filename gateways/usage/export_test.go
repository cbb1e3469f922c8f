package usage

import "time"

// SetPartitionRetry sets the first delay before Run checks the usage_events
// partitions again after a failed check (a minute otherwise). Call it before
// Run.
func SetPartitionRetry(r *Recorder, d time.Duration) {
	r.partitionRetry, r.partitionBackoff = d, d
}
