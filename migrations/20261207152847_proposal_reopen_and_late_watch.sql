-- When a proposal was last opened: when it was stored, or when a batch with the same calls at its
-- nonce (so the same safeTxHash) opened it again after it expired or was refused. The bound on
-- posting it runs from here.
ALTER TABLE proposals ADD COLUMN opened_at timestamptz;
UPDATE proposals SET opened_at = created_at;
ALTER TABLE proposals ALTER COLUMN opened_at SET NOT NULL;

-- An ended proposal the owners may still execute in Safe{Wallet} (it expired, or the bridge gave
-- up posting it while the service may hold it): the follower watches for its execution until
-- the Safe uses its nonce.
ALTER TABLE proposals ADD COLUMN watch_after_end boolean NOT NULL DEFAULT false;
CREATE INDEX proposals_watch_after_end_idx ON proposals (chain_id) WHERE watch_after_end;
