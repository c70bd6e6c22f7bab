-- Outgoing notifications (deleted with their request or proposal by the
-- retention job): an outbox written in the transaction of the status
-- change that causes it, so a crash neither loses one nor makes one up.
-- `dedupe_key` makes the cause count once: one `awaiting_approval` per
-- proposal, one `done` or `failed` per request.
CREATE TABLE notifications (
    id          uuid PRIMARY KEY,
    dedupe_key  text NOT NULL UNIQUE,
    event       text NOT NULL CHECK (event IN ('awaiting_approval', 'done', 'failed')),
    request_id  uuid NOT NULL REFERENCES replica_requests (id) ON DELETE CASCADE,
    proposal_id uuid REFERENCES proposals (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL,
    -- The message, rendered once, then sent unchanged to every target and at every attempt.
    payload     text,
    -- One delivery row per configured target has been made.
    fanned_out  boolean NOT NULL DEFAULT false
);
CREATE INDEX notifications_pending_idx ON notifications (created_at) WHERE NOT fanned_out;

-- One notification to one target. `id` is the delivery id the target sees
-- (Idempotency-Key): the same at every attempt.
CREATE TABLE notification_deliveries (
    id              uuid PRIMARY KEY,
    notification_id uuid NOT NULL REFERENCES notifications (id) ON DELETE CASCADE,
    target          text NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    lease_id        uuid,
    lease_expires_at timestamptz,
    delivered_at    timestamptz,
    gave_up_at      timestamptz,
    last_error      text,
    UNIQUE (notification_id, target)
);
CREATE INDEX notification_deliveries_due_idx ON notification_deliveries (target, next_attempt_at)
    WHERE delivered_at IS NULL AND gave_up_at IS NULL;

-- A proposal's facts go with it when the retention job deletes it.
ALTER TABLE proposal_facts DROP CONSTRAINT proposal_facts_proposal_id_fkey,
    ADD CONSTRAINT proposal_facts_proposal_id_fkey FOREIGN KEY (proposal_id) REFERENCES proposals (id) ON DELETE CASCADE;
