-- Exactly once against an eventually consistent Phala: a create or commit
-- whose answer never came is looked for until its outcome is known.

-- Until when a replica made by the last unanswered call may still be missing
-- from Phala's instance list (the failure's time plus the settle window).
-- Nothing is sent again before it.
ALTER TABLE replica_requests ADD COLUMN settles_at timestamptz;

-- When Phala refused a resend of a call whose first answer was lost, in a way
-- that the first call having taken effect explains (the commit token is spent,
-- the node is full): from then on the request only looks for its replica and
-- never sends or prepares again.
ALTER TABLE replica_requests ADD COLUMN first_call_took_effect_at timestamptz;

-- Other CVMs that this request's calls may have created besides its replica:
-- reported (request, page, metrics, notification), never adopted silently.
ALTER TABLE replica_requests ADD COLUMN extra_replicas text[] NOT NULL DEFAULT '{}';

-- One CVM is one request's replica, however Phala spells its id.
DO $$
DECLARE
    duplicate text;
BEGIN
    SELECT replace(lower(replica_vm_uuid), '-', '') INTO duplicate
    FROM replica_requests WHERE replica_vm_uuid IS NOT NULL
    GROUP BY 1 HAVING count(*) > 1 LIMIT 1;
    IF duplicate IS NOT NULL THEN
        RAISE EXCEPTION 'replica % is recorded on more than one request; keep it on one (UPDATE replica_requests SET replica_vm_uuid = NULL WHERE ...) and migrate again', duplicate;
    END IF;
END $$;
DROP INDEX replica_requests_replica_vm_uuid_idx;
CREATE UNIQUE INDEX replica_requests_replica_vm_uuid_key
    ON replica_requests ((replace(lower(replica_vm_uuid), '-', '')))
    WHERE replica_vm_uuid IS NOT NULL;
