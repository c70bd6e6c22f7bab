//! One prepare at a time per source CVM: a newer prepare for the same CVM
//! cancels the older commit token, so prepares must not overlap.
//!
//! The lock belongs to a request, not to a worker: a request holds it while it
//! is preparing or committing (see [`crate::domain::holds_source_lock`]), and
//! the transition that moves it on releases it in the same transaction. So a
//! commit whose answer was lost keeps the lock until its outcome is known.

use uuid::Uuid;

use super::Store;

impl Store {
    /// Takes the lock on `source_vm_uuid` for `holder`, or confirms `holder`
    /// has it. A lock whose holder no longer prepares or commits (it was
    /// failed or cancelled from outside) is taken over.
    pub async fn try_lock_source(
        &self,
        source_vm_uuid: &str,
        holder: Uuid,
    ) -> Result<bool, sqlx::Error> {
        let acquired = sqlx::query_scalar!(
            "INSERT INTO source_locks (source_vm_uuid, holder) VALUES ($1, $2)
             ON CONFLICT (source_vm_uuid) DO UPDATE SET holder = EXCLUDED.holder
                WHERE source_locks.holder = EXCLUDED.holder OR NOT EXISTS (
                    SELECT 1 FROM replica_requests r
                    WHERE r.id = source_locks.holder AND r.status IN ('preparing', 'committing'))
             RETURNING holder",
            source_vm_uuid,
            holder,
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(acquired.is_some())
    }
}
