-- Budget counters: how much of each budget has been handed out per window.
-- Gateways lease chunks of a budget with one atomic statement and spend them
-- in memory, so used_units counts units granted to gateways, including units
-- a gateway still holds; unspent units are returned when a gateway stops.
CREATE TABLE budget_counters (
    subject          text        NOT NULL CHECK (subject <> ''),
    bucket           text        NOT NULL CHECK (bucket <> ''),
    window_start     timestamptz NOT NULL,
    window_seconds   integer     NOT NULL CHECK (window_seconds > 0),
    unit             text        NOT NULL,
    limit_units      bigint      NOT NULL CHECK (limit_units >= 0),
    used_units       bigint      NOT NULL DEFAULT 0 CHECK (used_units >= 0),
    last_lease_units bigint      NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, bucket, window_seconds, window_start)
);
COMMENT ON TABLE budget_counters IS 'One row per subject x budget bucket x window. Actual spend per request is in usage_events; this table is what enforcement uses.';
COMMENT ON COLUMN budget_counters.subject IS 'Who the budget belongs to: an organization id, or instance:<id> for an instance not registered to an organization.';
COMMENT ON COLUMN budget_counters.bucket IS 'Budget bucket named by policy; usually the feature (unit primitive) name.';
COMMENT ON COLUMN budget_counters.window_start IS 'Start of the window (aligned to the Unix epoch in multiples of window_seconds).';
COMMENT ON COLUMN budget_counters.window_seconds IS 'Length of the window in seconds.';
COMMENT ON COLUMN budget_counters.unit IS 'What one unit is, e.g. request.';
COMMENT ON COLUMN budget_counters.limit_units IS 'Units allowed in the window, as policy last said.';
COMMENT ON COLUMN budget_counters.used_units IS 'Units granted to gateways in the window, spent or still held in a lease. Never exceeds limit_units through a lease.';
COMMENT ON COLUMN budget_counters.last_lease_units IS 'Size of the most recent lease (diagnostic).';
COMMENT ON COLUMN budget_counters.updated_at IS 'Last lease or return.';

CREATE INDEX budget_counters_window_start_idx ON budget_counters (window_start);

---- create above / drop below ----

DROP TABLE budget_counters;
