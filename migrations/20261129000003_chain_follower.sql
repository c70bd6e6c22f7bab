-- Where each chain's follower stands: the last processed block and its hash.
-- A different hash at that height on the next pass means a reorg.
CREATE TABLE chain_cursors (
    chain_id     bigint PRIMARY KEY,
    block_number bigint NOT NULL,
    block_hash   text NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- The chain head when a proposal was made: the follower scans from there.
ALTER TABLE proposals ADD COLUMN proposed_block bigint;
-- An execution seen in the logs; final only after enough confirmations.
ALTER TABLE proposals ADD COLUMN execution_block_hash text;
ALTER TABLE proposals ADD COLUMN execution_success boolean;

-- For the Phala dashboard link of a replica.
ALTER TABLE replica_requests ADD COLUMN workspace_slug text;
