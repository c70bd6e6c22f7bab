-- One owner per Safe-flow task: the planner of each Safe and the follower of
-- each chain run as leased jobs. Lease times come from the database clock,
-- so processes with skewed clocks agree; `token` grows at every takeover and
-- fences out a former holder.
CREATE TABLE job_leases (
    job        text PRIMARY KEY,
    holder     uuid NOT NULL,
    token      bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The follower saw app logs it has not acted on yet (it was still catching
-- up to the head): the next pass that reaches the head re-reads the apps.
ALTER TABLE chain_cursors ADD COLUMN apps_touched boolean NOT NULL DEFAULT false;
