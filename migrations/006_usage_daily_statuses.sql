-- usage_daily classified each request by status as succeeded (2xx, 3xx) or
-- failed (5xx). Two statuses the gateway records fell through both:
--   * 101, a WebSocket session that ran and ended normally (one the backend
--     broke is recorded as 502). Analysts count it as a success.
--   * 499, the client went away before the response was complete. Neither a
--     success nor the service's failure: code completion clients cancel
--     requests as the user keeps typing, and counting that as failed would
--     bury real outages. It gets a column of its own, cancelled.
-- Other 4xx statuses (the backend refused the request, e.g. 400, 404, 413)
-- get client_errors, so every request is now in a column and reports can
-- check that the parts add up.
--
-- Existing columns keep their names, order and types; new ones are appended
-- (CREATE OR REPLACE VIEW cannot do otherwise). The columns that had no
-- comment get one.
CREATE OR REPLACE VIEW usage_daily AS
SELECT
    (date_trunc('day', occurred_at AT TIME ZONE 'UTC'))::date                 AS day,
    organization_id,
    instance_id,
    feature,
    count(*)                                                                  AS requests,
    count(*) FILTER (WHERE status = 101 OR (status >= 200 AND status < 400)) AS succeeded,
    count(*) FILTER (WHERE status >= 500)                                     AS failed,
    coalesce(sum(units), 0)                                                   AS units,
    sum(request_bytes)                                                        AS request_bytes,
    sum(response_bytes)                                                       AS response_bytes,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms)                  AS p50_duration_ms,
    percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ms)                 AS p99_duration_ms,
    count(*) FILTER (WHERE status >= 400 AND status < 500 AND status <> 499) AS client_errors,
    count(*) FILTER (WHERE status = 499)                                      AS cancelled
FROM usage_events
GROUP BY 1, 2, 3, 4;

COMMENT ON VIEW usage_daily IS 'Daily usage per organization x instance x feature (UTC days). Stable columns for reports. requests = succeeded + client_errors + cancelled + failed, plus the rare request with status 0 (unknown) or another 1xx.';
COMMENT ON COLUMN usage_daily.day IS 'UTC calendar day.';
COMMENT ON COLUMN usage_daily.organization_id IS 'Organization billed; NULL for requests from instances not registered to an organization (see usage_events.organization_id).';
COMMENT ON COLUMN usage_daily.instance_id IS 'GitLab instance id (token sub).';
COMMENT ON COLUMN usage_daily.feature IS 'Unit primitive used, e.g. complete_code.';
COMMENT ON COLUMN usage_daily.requests IS 'Proxied requests.';
COMMENT ON COLUMN usage_daily.succeeded IS 'Requests answered with a 2xx or 3xx status, or 101: a WebSocket session that ended normally.';
COMMENT ON COLUMN usage_daily.failed IS 'Requests answered with a 5xx status: the backend failed (502, also mid-stream) or the route timeout cut it (504).';
COMMENT ON COLUMN usage_daily.units IS 'Sum of backend-reported units; 0 when none reported any.';
COMMENT ON COLUMN usage_daily.request_bytes IS 'Sum of request body bytes read from clients.';
COMMENT ON COLUMN usage_daily.response_bytes IS 'Sum of response body bytes written to clients, including partial responses.';
COMMENT ON COLUMN usage_daily.p50_duration_ms IS 'Median request duration in milliseconds.';
COMMENT ON COLUMN usage_daily.p99_duration_ms IS '99th percentile request duration in milliseconds.';
COMMENT ON COLUMN usage_daily.client_errors IS 'Requests the backend refused with a 4xx status other than 499 (e.g. 400, 404, 413, 429).';
COMMENT ON COLUMN usage_daily.cancelled IS 'Requests with status 499: the client went away before the response was complete. Neither succeeded nor failed.';

---- create above / drop below ----

-- The old view has fewer columns: it has to be dropped and created again.
DROP VIEW usage_daily;
CREATE VIEW usage_daily AS
SELECT
    (date_trunc('day', occurred_at AT TIME ZONE 'UTC'))::date   AS day,
    organization_id,
    instance_id,
    feature,
    count(*)                                                    AS requests,
    count(*) FILTER (WHERE status >= 200 AND status < 400)      AS succeeded,
    count(*) FILTER (WHERE status >= 500)                       AS failed,
    coalesce(sum(units), 0)                                     AS units,
    sum(request_bytes)                                          AS request_bytes,
    sum(response_bytes)                                         AS response_bytes,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms)    AS p50_duration_ms,
    percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ms)   AS p99_duration_ms
FROM usage_events
GROUP BY 1, 2, 3, 4;
COMMENT ON VIEW usage_daily IS 'Daily usage per organization x instance x feature (UTC days). Stable columns for reports.';
COMMENT ON COLUMN usage_daily.day IS 'UTC calendar day.';
COMMENT ON COLUMN usage_daily.requests IS 'Proxied requests.';
COMMENT ON COLUMN usage_daily.succeeded IS 'Requests answered with a 2xx or 3xx status.';
COMMENT ON COLUMN usage_daily.failed IS 'Requests answered with a 5xx status.';
COMMENT ON COLUMN usage_daily.units IS 'Sum of backend-reported units.';
COMMENT ON COLUMN usage_daily.p50_duration_ms IS 'Median request duration in milliseconds.';
COMMENT ON COLUMN usage_daily.p99_duration_ms IS '99th percentile request duration in milliseconds.';
