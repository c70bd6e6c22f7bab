-- Each watched Safe's nonce as the chain follower last read it at the head: the queue on the
-- team page marks its proposals "next", "blocked by nonce N" or "ready to execute" from it,
-- without calling out while it renders.
CREATE TABLE safe_nonces (
    chain_id   bigint NOT NULL,
    safe       text NOT NULL,
    nonce      bigint NOT NULL,
    block      bigint NOT NULL,
    read_at    timestamptz NOT NULL,
    PRIMARY KEY (chain_id, safe)
);
