-- Replica requests: one row per replica to create, driven through its states by the workers.
CREATE TABLE replica_requests (
    id                   uuid PRIMARY KEY,
    status               text NOT NULL CHECK (status IN (
                             'queued', 'preparing', 'awaiting_proposal', 'awaiting_approval',
                             'committing', 'provisioning', 'done', 'failed', 'cancelled')),

    -- What was asked for, as given by the caller.
    source               text NOT NULL,
    node                 text,
    requested_compose_hash text,
    env_names            text[] NOT NULL DEFAULT '{}',
    note                 text,
    -- Ciphertext for the app's KMS key; the plaintext env is never stored.
    encrypted_env        text,
    created_by           text NOT NULL,

    -- What intake resolved against Phala Cloud.
    source_vm_uuid       text NOT NULL,
    source_name          text,
    node_id              integer,
    node_name            text,
    kms_type             text,
    onchain_kms          boolean NOT NULL,

    -- What the prepare step learned (the HTTP 465 details).
    app_id               text,
    chain_id             bigint,
    compose_hash         text,
    device_id            text,
    compose_hash_allowed boolean,
    device_id_allowed    boolean,
    -- Bearer secret: never logged, never returned by the API.
    commit_token         text,
    prepared_at          timestamptz,

    -- Commit and provisioning.
    commit_tx_hash       text,
    -- Set just before a call that must not be repeated once it succeeded (a direct
    -- replicate, a commit); cleared when Phala answers. Still set on the next try
    -- means the outcome of the last call is unknown.
    call_sent_at         timestamptz,
    replica_vm_uuid      text,
    replica_status       text,

    -- Worker bookkeeping.
    attempts             integer NOT NULL DEFAULT 0,
    next_attempt_at      timestamptz NOT NULL DEFAULT now(),
    lease_id             uuid,
    lease_expires_at     timestamptz,

    last_error_code      text,
    last_error_message   text,
    last_error_suggestion text,

    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- The claim query: due rows in a workable state.
CREATE INDEX replica_requests_due_idx ON replica_requests (next_attempt_at)
    WHERE status IN ('queued', 'preparing', 'committing', 'provisioning');
CREATE INDEX replica_requests_created_idx ON replica_requests (created_at DESC, id DESC);
CREATE INDEX replica_requests_status_idx ON replica_requests (status, created_at DESC);
CREATE INDEX replica_requests_source_idx ON replica_requests (source_vm_uuid);

-- Append-only audit log: every transition and who caused it.
CREATE TABLE request_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id  uuid NOT NULL REFERENCES replica_requests (id),
    from_status text,
    to_status   text NOT NULL,
    actor       text NOT NULL,
    message     text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX request_events_request_idx ON request_events (request_id, id);

CREATE FUNCTION request_events_are_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'request_events is append-only';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER request_events_append_only
    BEFORE UPDATE OR DELETE ON request_events
    FOR EACH ROW EXECUTE FUNCTION request_events_are_append_only();

-- Idempotency keys, scoped to the caller (an API token or a CI client).
CREATE TABLE idempotency_keys (
    principal      text NOT NULL,
    key            text NOT NULL,
    request_hash   bytea NOT NULL,
    response_status smallint NOT NULL,
    response_body  jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal, key)
);

-- One prepare at a time per source CVM: a newer prepare cancels the older commit token.
CREATE TABLE source_locks (
    source_vm_uuid   text PRIMARY KEY,
    holder           uuid NOT NULL,
    lease_expires_at timestamptz NOT NULL
);
