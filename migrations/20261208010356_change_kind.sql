-- A request is one change of a kind. Today every change is a replica; the
-- kinds to come (updates, devices, removals) each extend the check. The
-- queue, the locks and the Safe flow are shared by every kind: no index or
-- claim reads this column, only the worker's choice of Phala calls does.
ALTER TABLE replica_requests
    ADD COLUMN kind text NOT NULL DEFAULT 'replica' CHECK (kind IN ('replica'));
