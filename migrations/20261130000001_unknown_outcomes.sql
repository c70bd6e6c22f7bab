-- Unknown outcomes: a create or commit whose answer never came is reconciled
-- against Phala's instance list before anything is retried.

-- The app's instances just before the first unanswered call: a replica found
-- afterwards that is not in this list (and that no other request claims) is
-- the one that call created.
ALTER TABLE replica_requests ADD COLUMN instances_before text[];
-- When the outcome of the pending call first became unknown; bounds the search.
ALTER TABLE replica_requests ADD COLUMN outcome_unknown_since timestamptz;

-- Reconciliation asks which request owns a listed instance.
CREATE INDEX replica_requests_replica_vm_uuid_idx ON replica_requests (replica_vm_uuid)
    WHERE replica_vm_uuid IS NOT NULL;

-- A source lock is held by a request while it is preparing or committing, and
-- released in the transaction that moves it on. It no longer expires by the
-- clock: a lock whose holder has moved on (a crash between two writes) is
-- simply taken over.
ALTER TABLE source_locks DROP COLUMN lease_expires_at;
