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
// then skipped as duplicates.
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
			r.log.Error("usage: dropping event the database refused", "event_id", events[i].ID, "error", err)
			r.drop(r.m.droppedInvalid, 1)
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

// partitionMonthsAhead is how many monthly partitions beyond the current one
// ensurePartitions keeps ready.
const partitionMonthsAhead = 2

// ensurePartitions creates the usage_events partitions the next months need.
// Failure is logged, not fatal: rows outside every partition still land in
// the default partition.
func (r *Recorder) ensurePartitions(ctx context.Context) {
	tctx, cancel := context.WithTimeout(ctx, r.cfg.WriteTimeout)
	defer cancel()
	if _, err := r.db.Exec(tctx, "SELECT usage_events_ensure_partitions($1)", partitionMonthsAhead); err != nil && ctx.Err() == nil {
		r.log.Warn("usage: ensure partitions", "error", err)
	}
}
