-- The id of the HTTP request that queued a request (the `x-request-id`
-- header), so the worker's log lines for it carry the same id as intake's.
ALTER TABLE replica_requests ADD COLUMN http_request_id text;

-- The retention job may delete the events of finished requests once they
-- are older than the configured time; nothing else may change the log. It
-- says so for its own transaction with `SET LOCAL approval_bridge.retention = 'on'`.
CREATE OR REPLACE FUNCTION request_events_are_append_only() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('approval_bridge.retention', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'request_events is append-only';
END;
$$ LANGUAGE plpgsql;

-- Expiry of idempotency keys.
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);
-- Finished requests by age, for the retention job.
CREATE INDEX replica_requests_finished_idx ON replica_requests (updated_at)
    WHERE status IN ('done', 'failed', 'cancelled');
