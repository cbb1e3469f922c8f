package usage

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/prometheus/client_golang/prometheus"
)

// insertSQL writes a batch in one statement, one array per column. ON
// CONFLICT makes retries and replays idempotent: an event already stored is
// skipped.
const insertSQL = `INSERT INTO usage_events (
	event_id, occurred_at, organization_id, instance_id, realm, global_user_id,
	feature, gateway, route, method, status, duration_ms,
	request_bytes, response_bytes, units, request_id, gitlab_version, client_type)
SELECT * FROM unnest(
	$1::uuid[], $2::timestamptz[], $3::uuid[], $4::text[], $5::text[], $6::text[],
	$7::text[], $8::text[], $9::text[], $10::text[], $11::int4[], $12::float8[],
	$13::int8[], $14::int8[], $15::int8[], $16::text[], $17::text[], $18::text[])
ON CONFLICT (event_id, occurred_at) DO NOTHING`

// columns holds the arguments of insertSQL, reused from batch to batch so
// the writer does not churn the heap the request path allocates from.
type columns struct {
	ids, orgs                             []pgtype.UUID
	occurred                              []time.Time
	instances, realms, features, gateways []string
	routes, methods                       []string
	users, requestIDs, versions, clients  []pgtype.Text
	statuses                              []int32
	durations                             []float64
	reqBytes, respBytes                   []int64
	units                                 []pgtype.Int8
}

// args fills c from events and returns the arguments of insertSQL, valid
// until the next call.
func (c *columns) args(events []Event) []any {
	c.ids, c.orgs = c.ids[:0], c.orgs[:0]
	c.occurred = c.occurred[:0]
	c.instances, c.realms, c.features, c.gateways = c.instances[:0], c.realms[:0], c.features[:0], c.gateways[:0]
	c.routes, c.methods = c.routes[:0], c.methods[:0]
	c.users, c.requestIDs, c.versions, c.clients = c.users[:0], c.requestIDs[:0], c.versions[:0], c.clients[:0]
	c.statuses, c.durations = c.statuses[:0], c.durations[:0]
	c.reqBytes, c.respBytes, c.units = c.reqBytes[:0], c.respBytes[:0], c.units[:0]
	for i := range events {
		e := &events[i]
		var org pgtype.UUID
		if id, err := uuid.Parse(e.OrganizationID); err == nil {
			org = pgtype.UUID{Bytes: id, Valid: true}
		}
		var units pgtype.Int8
		if e.Units != nil {
			units = pgtype.Int8{Int64: *e.Units, Valid: true}
		}
		c.ids = append(c.ids, pgtype.UUID{Bytes: e.ID, Valid: true})
		c.orgs = append(c.orgs, org)
		c.occurred = append(c.occurred, e.OccurredAt)
		c.instances = append(c.instances, e.InstanceID)
		c.realms = append(c.realms, e.Realm)
		c.users = append(c.users, optionalText(e.GlobalUserID))
		c.features = append(c.features, e.Feature)
		c.gateways = append(c.gateways, e.Gateway)
		c.routes = append(c.routes, e.Route)
		c.methods = append(c.methods, e.Method)
		c.statuses = append(c.statuses, int32(e.Status)) // normalize keeps it in 0..999
		c.durations = append(c.durations, float64(e.Duration)/float64(time.Millisecond))
		c.reqBytes = append(c.reqBytes, e.RequestBytes)
		c.respBytes = append(c.respBytes, e.ResponseBytes)
		c.units = append(c.units, units)
		c.requestIDs = append(c.requestIDs, optionalText(e.RequestID))
		c.versions = append(c.versions, optionalText(e.GitLabVersion))
		c.clients = append(c.clients, optionalText(e.ClientType))
	}
	return []any{c.ids, c.occurred, c.orgs, c.instances, c.realms, c.users, c.features, c.gateways,
		c.routes, c.methods, c.statuses, c.durations, c.reqBytes, c.respBytes, c.units, c.requestIDs,
		c.versions, c.clients}
}

// optionalText stores "" as NULL.
func optionalText(s string) pgtype.Text {
	return pgtype.Text{String: s, Valid: s != ""}
}

// write inserts events and adds the number committed to counter. When the
// database refuses the data rather than failing, write retries the events
// one by one and drops, with a log line and a metric, those refused again, so
// one bad row cannot hold back the others forever. Any other error is
// returned and the caller retries the whole batch; rows already committed are
// then skipped as duplicates, and rows already dropped are not counted again.
func (r *Recorder) write(ctx context.Context, events []Event, counter prometheus.Counter) error {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.WriteTimeout)
	defer cancel()
	err := r.insert(ctx, events, counter)
	if err == nil || !isDataError(err) {
		return err
	}
	r.log.Warn("usage: database refused batch; writing events one by one", "error", err, "events", len(events))
	for i := range events {
		err := r.insert(ctx, events[i:i+1], counter)
		switch {
		case err == nil:
		case isDataError(err):
			r.refuse(events[i].ID, err)
		default:
			return err
		}
	}
	return nil
}

func (r *Recorder) insert(ctx context.Context, events []Event, counter prometheus.Counter) error {
	start := time.Now()
	tag, err := r.db.Exec(ctx, insertSQL, r.cols.args(events)...)
	r.m.batchSeconds.Observe(time.Since(start).Seconds())
	if err != nil {
		return fmt.Errorf("write usage batch: %w", err)
	}
	counter.Add(float64(len(events)))
	r.m.duplicates.Add(float64(int64(len(events)) - tag.RowsAffected()))
	return nil
}

// isDataError reports whether the database refused the data itself (SQLSTATE
// class 22 data exception or 23 integrity constraint violation), so that
// retrying the same rows cannot succeed.
func isDataError(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && (strings.HasPrefix(pgErr.Code, "22") || strings.HasPrefix(pgErr.Code, "23"))
}

// maxRefused bounds the ids refusedSet remembers. Refused events are rare;
// past the bound the set starts over, and an event refused again after that
// is counted twice rather than memory growing.
const maxRefused = 1024

// refusedSet holds the ids of events the database refused and write dropped.
// A batch is retried whole after a failure that is not the data's fault, and
// a spool file is replayed whole after one, so the same event can be refused
// again: it is dropped once, and counted and logged once.
type refusedSet map[uuid.UUID]struct{}

// refuse records that the database refused event id with err: the event is
// dropped, and counted and logged unless it was dropped before.
func (r *Recorder) refuse(id uuid.UUID, err error) {
	if _, ok := r.refused[id]; ok {
		r.log.Debug("usage: event refused again", "event_id", id, "error", err)
		return
	}
	if r.refused == nil || len(r.refused) >= maxRefused {
		r.refused = refusedSet{}
	}
	r.refused[id] = struct{}{}
	r.log.Error("usage: dropping event the database refused", "event_id", id, "error", err)
	r.drop(r.m.droppedInvalid, 1)
}

const (
	// partitionMonthsAhead is how many monthly partitions beyond the current
	// one ensurePartitions keeps ready.
	partitionMonthsAhead = 2
	// partitionEvery is how often Run checks the partitions while all is
	// well: they are kept months ahead, so a day is often enough.
	partitionEvery = 24 * time.Hour
	// After a failed check Run tries again after partitionRetryMin, doubling
	// up to partitionRetryMax, so a month is not left without its partition
	// for a day because of one lock timeout.
	partitionRetryMin = time.Minute
	partitionRetryMax = time.Hour
	// partitionLockWait bounds each lock the check waits for, so it gives up
	// (and retries later) rather than queue behind a long analyst query.
	partitionLockWait = time.Second
)

// ensurePartitionsSQL runs usage_events_ensure_partitions (migration 005),
// which does each month on its own and returns one row per month, and sums
// up its answer: failed months, months ahead ready (counted from the
// current one up to the first failure, -1 when the current one failed),
// months created, rows moved out of the default partition, and what failed.
const ensurePartitionsSQL = `SELECT
	count(*) FILTER (WHERE outcome = 'failed'),
	coalesce(min(month_offset) FILTER (WHERE outcome = 'failed' AND month_offset >= 0), $1::int + 1) - 1,
	count(*) FILTER (WHERE outcome = 'created'),
	coalesce(sum(moved_rows), 0)::bigint,
	coalesce(string_agg(partition_name || ': ' || error_message, '; ' ORDER BY range_start)
		FILTER (WHERE outcome = 'failed'), '')
FROM usage_events_ensure_partitions($1::int, make_interval(secs => $2::float8))`

// ensurePartitions makes sure usage_events has its partitions for this month
// and the next partitionMonthsAhead, moving any of their rows out of the
// default partition, and returns when to check again. Failure is counted,
// logged and retried soon, not fatal: rows outside every partition still land
// in the default partition, and the next successful check moves them.
func (r *Recorder) ensurePartitions(ctx context.Context) (next time.Duration) {
	tctx, cancel := context.WithTimeout(ctx, r.cfg.WriteTimeout)
	defer cancel()
	var (
		failed, ahead, created int
		moved                  int64
		detail                 string
	)
	err := r.db.QueryRow(tctx, ensurePartitionsSQL, partitionMonthsAhead, partitionLockWait.Seconds()).
		Scan(&failed, &ahead, &created, &moved, &detail)
	switch {
	case err != nil && ctx.Err() != nil:
		return r.partitionBackoff // shutting down; Run is about to return
	case err != nil:
		err = fmt.Errorf("ensure usage_events partitions: %w", err)
	default:
		r.m.partitionMonthsAhead.Set(float64(ahead))
		if created > 0 {
			r.log.Info("usage: created usage_events partitions", "partitions", created, "moved_rows", moved)
		}
		if failed > 0 {
			err = fmt.Errorf("ensure usage_events partitions: %d months failed: %s", failed, detail)
		}
	}
	if err == nil {
		r.partitionBackoff = r.partitionRetry
		return partitionEvery
	}
	r.m.partitionErrors.Inc()
	next = r.partitionBackoff
	r.partitionBackoff = min(2*next, partitionRetryMax)
	r.log.Error("usage: usage_events partitions missing; events of months without one go to the default partition",
		"error", err, "retry_in", next)
	return next
}
