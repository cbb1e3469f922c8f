package budget

import (
	"context"
	"fmt"
)

// pruneSQL deletes at most $2 counter rows whose window ended at least $1
// seconds ago by the database clock.
//
// Deleting such a row can neither reset a budget nor lose a return that
// matters. leaseSQL computes its window from the database clock, so no lease
// writes a window that has ended, and no lease can re-create a deleted row
// (short of the database clock stepping back by more than $1). A late
// return to an ended window (a gateway whose clock lags, or whose return
// was slow) changes a row nobody can lease from any more, so it matters
// neither whether it finds the row nor what it does to it. Config.PruneAfter
// therefore only has to be positive for safety; its default of an hour keeps
// the recent past for operators to inspect and tolerates a database clock
// stepping back by less than that. usage_events, not this table, is the
// record of spend.
//
// The range condition on window_start alone lets the scan use
// budget_counters_window_start_idx; the exact end-of-window test filters
// what it finds. The cutoff is computed once (a CTE), since a volatile
// clock_timestamp() in the WHERE clause would rule the index out. The scan
// also visits rows of still-current windows longer than PruneAfter (e.g.
// monthly quotas) that started before the cutoff and filters them out; an
// index on the window's end would avoid that, but needs a schema change.
// Rows are picked in batches by ctid with SKIP LOCKED, so a statement holds
// few locks briefly and replicas pruning at once do not wait on each other.
const pruneSQL = `
WITH cutoff AS MATERIALIZED (
    SELECT clock_timestamp() - make_interval(secs => $1::float8) AS t
)
DELETE FROM budget_counters
WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM budget_counters
    WHERE window_start < (SELECT t FROM cutoff)
      AND window_start + make_interval(secs => window_seconds) <= (SELECT t FROM cutoff)
    LIMIT $2::int
    FOR UPDATE SKIP LOCKED))`

// pruneBatch is the default for the most rows one prune statement deletes.
const pruneBatch = 1000

// maxPruneBatches bounds the prune statements of one pass, so a backlog is
// worked off over several of Run's ticks instead of delaying idle returns.
const maxPruneBatches = 10

// prune deletes counter rows of long-ended windows, one batch per
// statement, and returns how many it deleted and whether more may remain.
func (l *Limiter) prune(ctx context.Context) (rows int64, more bool, err error) {
	for range maxPruneBatches {
		n, err := l.pruneBatchOnce(ctx)
		rows += n
		if err != nil {
			return rows, false, err
		}
		if n < int64(l.pruneBatch) {
			return rows, false, nil
		}
	}
	return rows, true, nil
}

func (l *Limiter) pruneBatchOnce(ctx context.Context) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, l.cfg.StatementTimeout)
	defer cancel()
	tag, err := l.db.Exec(ctx, pruneSQL, l.cfg.PruneAfter.Seconds(), l.pruneBatch)
	if err != nil {
		return 0, fmt.Errorf("prune budget counters: %w", err)
	}
	n := tag.RowsAffected()
	l.metrics.pruned.Add(float64(n))
	return n, nil
}
