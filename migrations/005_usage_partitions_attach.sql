-- Replace usage_events_ensure_partitions (003) with a version that cannot be
-- stopped for good by rows in the default partition, and that does not stall
-- inserts while it works.
--
-- The old function ran CREATE TABLE ... PARTITION OF, which
--   * fails when usage_events_default already holds rows for that month, and
--     aborted the whole call, so no later month was created either: every
--     later event then landed in the default partition, for ever;
--   * takes ACCESS EXCLUSIVE on usage_events, so it queued behind any open
--     analyst transaction and every insert queued behind it.
--
-- The new one, for each month, in a sub-transaction of its own:
--   1. creates the partition as a standalone table shaped like usage_events,
--      with a CHECK constraint equal to the partition bound;
--   2. moves that month's rows out of usage_events_default into it;
--   3. attaches it with ALTER TABLE ... ATTACH PARTITION.
-- Step 3 takes SHARE UPDATE EXCLUSIVE on usage_events, which does not conflict
-- with inserts or reads, and ACCESS EXCLUSIVE only on the new table and on
-- usage_events_default (which it scans: it must not hold rows of the new
-- month). The CHECK constraint lets PostgreSQL skip scanning the new table.
-- Inserts routed to a monthly partition never touch usage_events_default, so
-- only events with no partition for their month can wait, and only for
-- lock_wait: every lock is taken with lock_timeout set.
--
-- A month that fails (lock timeout, a table in the way, ...) is rolled back
-- and reported; the other months are still done. The caller retries.

DROP FUNCTION usage_events_ensure_partitions(integer);

CREATE FUNCTION usage_events_ensure_partitions(
    months_ahead integer  DEFAULT 2,
    lock_wait    interval DEFAULT '1 second'
)
RETURNS TABLE (
    partition_name text,        -- schema-qualified partition name
    range_start    timestamptz, -- first instant of the month (UTC), inclusive
    range_end      timestamptz, -- first instant of the next month (UTC), exclusive
    month_offset   integer,     -- months after the current one; negative for past months
    outcome        text,        -- present, created or failed
    moved_rows     bigint,      -- rows moved from usage_events_default into the new partition
    error_message  text         -- why the month failed; NULL otherwise
)
LANGUAGE plpgsql
-- Waiting for another caller (the advisory lock below) is bounded by the
-- caller's statement_timeout only; table locks get lock_wait, set below. The
-- SET clause also confines that SET LOCAL to this function.
SET lock_timeout = 0
AS $$
DECLARE
    parent_schema text;
    this_month    timestamp;  -- start of the current month, UTC
    months        timestamp[];
    m             timestamp;
    rel           regclass;
BEGIN
    IF months_ahead IS NULL OR months_ahead < 0 THEN
        RAISE EXCEPTION 'usage_events_ensure_partitions: months_ahead must be >= 0, got %', months_ahead;
    END IF;
    IF lock_wait IS NULL OR lock_wait <= interval '0' THEN
        RAISE EXCEPTION 'usage_events_ensure_partitions: lock_wait must be positive, got %', lock_wait;
    END IF;

    -- One caller at a time: a second one waits here and then finds the
    -- partitions in place, instead of failing on the first one's locks.
    PERFORM pg_advisory_xact_lock(hashtext('usage_events_ensure_partitions'));

    SELECT n.nspname INTO parent_schema
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = 'usage_events'::regclass;

    this_month := date_trunc('month', now() AT TIME ZONE 'UTC');

    -- The months ahead, and every earlier month that has rows stranded in the
    -- default partition (e.g. events replayed from a spool into a database
    -- created after they happened). Moving those out keeps the default
    -- partition small, and ATTACH PARTITION scans all of it.
    SELECT array_agg(DISTINCT x ORDER BY x) INTO months
    FROM (
        SELECT this_month + make_interval(months => i) AS x
        FROM generate_series(0, months_ahead) AS i
        UNION ALL
        SELECT date_trunc('month', d.occurred_at AT TIME ZONE 'UTC')
        FROM usage_events_default AS d
        WHERE isfinite(d.occurred_at) AND d.occurred_at < this_month AT TIME ZONE 'UTC'
    ) AS wanted;

    PERFORM set_config('lock_timeout', (ceil(extract(epoch FROM lock_wait) * 1000))::bigint::text, true);

    FOREACH m IN ARRAY months LOOP
        partition_name := format('%I.%I', parent_schema, 'usage_events_' || to_char(m, 'YYYY_MM'));
        range_start    := m AT TIME ZONE 'UTC';
        range_end      := (m + interval '1 month') AT TIME ZONE 'UTC';
        month_offset   := ((extract(year FROM m) - extract(year FROM this_month)) * 12
                          + extract(month FROM m) - extract(month FROM this_month))::integer;
        moved_rows     := 0;
        error_message  := NULL;
        rel            := to_regclass(partition_name);

        IF rel IS NOT NULL AND EXISTS (
            SELECT 1 FROM pg_inherits WHERE inhparent = 'usage_events'::regclass AND inhrelid = rel
        ) THEN
            outcome := 'present';
        ELSIF rel IS NOT NULL THEN
            -- Not ours to drop: it may hold data someone put there.
            outcome := 'failed';
            error_message := format('%s exists but is not a partition of usage_events', partition_name);
        ELSE
            BEGIN
                -- Parent first, then the default partition: the order
                -- ATTACH PARTITION and inserts use, so no deadlock. Holding
                -- the default partition from here on means no insert can
                -- add a row of this month to it behind our back.
                LOCK TABLE ONLY usage_events IN SHARE UPDATE EXCLUSIVE MODE;
                LOCK TABLE usage_events_default IN ACCESS EXCLUSIVE MODE;

                EXECUTE format('CREATE TABLE %s (LIKE usage_events INCLUDING ALL)', partition_name);
                -- Equal to the partition bound, so ATTACH need not scan the
                -- table to prove its rows belong to the month.
                EXECUTE format(
                    'ALTER TABLE %s ADD CONSTRAINT usage_events_partition_bound CHECK (occurred_at >= %L AND occurred_at < %L)',
                    partition_name, range_start, range_end);

                -- Same transaction as the ATTACH: a row is either still in
                -- the default partition or in the new one, never both, never
                -- neither. Both tables have the primary key, so the move
                -- cannot duplicate an event.
                EXECUTE format(
                    'WITH moved AS (
                         DELETE FROM usage_events_default
                         WHERE occurred_at >= %L AND occurred_at < %L
                         RETURNING *)
                     INSERT INTO %s SELECT * FROM moved',
                    range_start, range_end, partition_name);
                GET DIAGNOSTICS moved_rows = ROW_COUNT;

                EXECUTE format('ALTER TABLE usage_events ATTACH PARTITION %s FOR VALUES FROM (%L) TO (%L)',
                    partition_name, range_start, range_end);
                -- The partition constraint now says the same thing.
                EXECUTE format('ALTER TABLE %s DROP CONSTRAINT usage_events_partition_bound', partition_name);
                outcome := 'created';
            EXCEPTION WHEN OTHERS THEN
                -- Everything this month did is rolled back, rows included.
                outcome := 'failed';
                moved_rows := 0;
                error_message := SQLERRM || ' (SQLSTATE ' || SQLSTATE || ')';
            END;
        END IF;
        IF outcome = 'failed' THEN
            -- For whoever runs it by hand; gateways read the rows.
            RAISE WARNING 'usage_events_ensure_partitions: % not created: %', partition_name, error_message;
        END IF;
        RETURN NEXT;
    END LOOP;
END;
$$;

COMMENT ON FUNCTION usage_events_ensure_partitions(integer, interval) IS
'Makes sure usage_events has a monthly partition for this month through months_ahead months ahead (UTC), '
'and for every earlier month with rows in usage_events_default, moving those rows into it. Each month is done '
'on its own: one that fails is reported (outcome failed, error_message) and the others are still done. Table '
'locks wait at most lock_wait. Returns one row per month considered. Call it in its own transaction: the locks '
'it takes are held until commit. Gateways call it at start, daily, and soon again after a failure.';

---- create above / drop below ----

DROP FUNCTION usage_events_ensure_partitions(integer, interval);

CREATE FUNCTION usage_events_ensure_partitions(months_ahead integer DEFAULT 2)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    month_start date;
    part_name   text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('usage_events_ensure_partitions'));
    FOR i IN 0..months_ahead LOOP
        month_start := (date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => i))::date;
        part_name := format('usage_events_%s', to_char(month_start, 'YYYY_MM'));
        IF to_regclass(part_name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF usage_events FOR VALUES FROM (%L) TO (%L)',
                part_name,
                (month_start::timestamp AT TIME ZONE 'UTC'),
                ((month_start + interval '1 month')::timestamp AT TIME ZONE 'UTC'));
        END IF;
    END LOOP;
END;
$$;
COMMENT ON FUNCTION usage_events_ensure_partitions(integer) IS 'Creates monthly usage_events partitions from this month through months_ahead months ahead. Gateways call it at start and daily.';
