-- Which request holds the newest commit token of each source CVM: a newer
-- prepare for the same CVM supersedes the older tokens. `holder` is NULL
-- while a prepare's answer is outstanding, or after it was lost: then no
-- stored token of the source is trusted, and the next commit prepares first.
CREATE TABLE source_tokens (
    source_vm_uuid text PRIMARY KEY,
    holder         uuid
);

-- The requests of one source that may wait for its lock.
CREATE INDEX replica_requests_source_active_idx ON replica_requests (source_vm_uuid)
    WHERE status IN ('preparing', 'committing');
