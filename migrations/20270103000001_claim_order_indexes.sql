-- Claims walk the due rows in claim order and stop at the first one they
-- may take, instead of sorting every workable row: under a burst of queued
-- requests a claim used to cost a scan of the whole backlog.
-- The predicates spell the statuses out, as the queries do, so that the
-- planner can use these indexes in a prepared statement's generic plan.
DROP INDEX replica_requests_due_idx;
CREATE INDEX replica_requests_due_idx ON replica_requests (next_attempt_at, created_at)
    WHERE status IN ('queued', 'preparing', 'committing');

-- The commit lane's claim.
CREATE INDEX replica_requests_due_commits_idx ON replica_requests (next_attempt_at, created_at)
    WHERE status = 'committing';

-- The requests of one source that may wait for its lock, in the order the
-- lock's release wakes them.
DROP INDEX replica_requests_source_active_idx;
CREATE INDEX replica_requests_source_active_idx
    ON replica_requests (source_vm_uuid, next_attempt_at, created_at)
    WHERE status IN ('preparing', 'committing');
