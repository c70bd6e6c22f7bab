-- Sign-in for the team page. A nonce is handed out for one Sign-In with
-- Ethereum message and deleted when it is used, so a signed message works
-- once. A session is kept only as the SHA-256 digest of its cookie value:
-- a copy of this table signs nobody in.
CREATE TABLE web_nonces (
    nonce      text PRIMARY KEY,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE web_sessions (
    id_digest  bytea PRIMARY KEY,
    -- A checksummed address (Sign-In with Ethereum) or the proxy's user name.
    subject    text NOT NULL,
    -- `operator` (may queue and cancel) or `viewer` (reads everything).
    role       text NOT NULL CHECK (role IN ('operator', 'viewer')),
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);

CREATE INDEX web_sessions_expires_at ON web_sessions (expires_at);
