-- Safe proposals: one Safe transaction that registers what a batch of requests needs.
CREATE TABLE proposals (
    id                uuid PRIMARY KEY,
    chain_id          bigint NOT NULL,
    safe              text NOT NULL,
    safe_version      text NOT NULL,
    nonce             bigint NOT NULL,
    safe_tx_hash      text NOT NULL UNIQUE,
    to_address        text NOT NULL,
    value             text NOT NULL,
    data              text NOT NULL,
    operation         smallint NOT NULL CHECK (operation IN (0, 1)),
    status            text NOT NULL CHECK (status IN ('proposed', 'executed', 'failed', 'replaced', 'superseded')),
    proposer          text NOT NULL,
    gas_estimate      bigint,
    -- NULL until the Transaction Service accepted the POST; a proposal stored
    -- but not yet accepted is posted again, with the same hash and nonce.
    submitted_at      timestamptz,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    confirmations     integer,
    threshold         integer,
    checked_at        timestamptz,
    execution_tx_hash text,
    execution_block   bigint,
    last_error_code   text,
    last_error_message text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- Two open proposals never share a Safe nonce.
CREATE UNIQUE INDEX proposals_open_nonce_idx ON proposals (chain_id, safe, nonce) WHERE status = 'proposed';

-- The calls a proposal makes, one per deduplicated registration.
CREATE TABLE proposal_calls (
    proposal_id uuid NOT NULL REFERENCES proposals (id),
    position    integer NOT NULL,
    app_id      text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('compose_hash', 'device')),
    value       text NOT NULL,
    PRIMARY KEY (proposal_id, position)
);
CREATE INDEX proposal_calls_registration_idx ON proposal_calls (app_id, kind, value);

-- The registrations each request needed when it was prepared.
CREATE TABLE request_registrations (
    request_id uuid NOT NULL REFERENCES replica_requests (id),
    app_id     text NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('compose_hash', 'device')),
    value      text NOT NULL,
    PRIMARY KEY (request_id, kind, value)
);

ALTER TABLE replica_requests ADD COLUMN proposal_id uuid REFERENCES proposals (id);
ALTER TABLE replica_requests ADD COLUMN safe text;
CREATE INDEX replica_requests_awaiting_idx ON replica_requests (chain_id) WHERE status = 'awaiting_proposal';
