-- The device of the node intake resolved: the prepare's 465 must name the same one.
ALTER TABLE replica_requests ADD COLUMN expected_device_id text;

-- Hourly quotas count a caller's recent requests, per kind of KMS.
CREATE INDEX replica_requests_creator_idx ON replica_requests (created_by, onchain_kms, created_at);
