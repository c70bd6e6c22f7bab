//! One prepare at a time per source CVM: a newer prepare for the same CVM
//! cancels the older commit token, so prepares must not overlap.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Store;

impl Store {
    /// Takes the lock on `source_vm_uuid` for `holder` until `expires_at`.
    /// An expired lock (its holder crashed) is taken over.
    pub async fn try_lock_source(
        &self,
        source_vm_uuid: &str,
        holder: Uuid,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<bool, sqlx::Error> {
        let acquired: Option<(Uuid,)> = sqlx::query_as(
            "INSERT INTO source_locks (source_vm_uuid, holder, lease_expires_at) VALUES ($1, $2, $4)
             ON CONFLICT (source_vm_uuid) DO UPDATE
                SET holder = EXCLUDED.holder, lease_expires_at = EXCLUDED.lease_expires_at
                WHERE source_locks.lease_expires_at <= $3 OR source_locks.holder = EXCLUDED.holder
             RETURNING holder",
        )
        .bind(source_vm_uuid)
        .bind(holder)
        .bind(now)
        .bind(expires_at)
        .fetch_optional(&self.pool)
        .await?;
        Ok(acquired.is_some())
    }

    pub async fn unlock_source(
        &self,
        source_vm_uuid: &str,
        holder: Uuid,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM source_locks WHERE source_vm_uuid = $1 AND holder = $2")
            .bind(source_vm_uuid)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
