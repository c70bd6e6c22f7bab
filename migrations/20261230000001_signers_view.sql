-- What the owners see of a proposal. `owners` is the Safe's owner list when
-- it was planned (refreshed with the confirmations); `confirmed_by` the owners
-- whose confirmation the Transaction Service holds, read with `confirmations`.
ALTER TABLE proposals ADD COLUMN owners text[];
ALTER TABLE proposals ADD COLUMN confirmed_by text[];

-- What Phala said about a proposal's apps and nodes when it was planned (the
-- app's CVMs, the nodes' names and regions), so showing a proposal never
-- waits for Phala. `tried_at` spaces out the retries when Phala is down.
CREATE TABLE proposal_facts (
    proposal_id uuid PRIMARY KEY REFERENCES proposals (id),
    facts       jsonb,
    tried_at    timestamptz NOT NULL,
    learned_at  timestamptz
);
