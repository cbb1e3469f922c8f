-- Document the statuses the gateway records for requests it could not
-- complete normally.
COMMENT ON COLUMN usage_events.status IS 'HTTP status the client got: the backend''s, 101 for a WebSocket session, 502 when the backend failed (also mid-stream), 504 when the route timeout cut it, 499 when the client went away first.';

---- create above / drop below ----

COMMENT ON COLUMN usage_events.status IS 'HTTP status returned to the client (502 when the backend was unreachable).';
