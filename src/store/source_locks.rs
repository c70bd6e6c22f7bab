//! One prepare at a time per source CVM: a newer prepare for the same CVM
//! cancels the older commit token, so prepares must not overlap.
//!
//! `source_tokens` names the request whose token is the source's newest, so
//! a commit uses its stored token only while no prepare came after it.
//!
//! The lock belongs to a request, not to a worker: a request holds it while it
//! is preparing or committing (see [`crate::domain::holds_source_lock`]), and
//! the transition that moves it on releases it in the same transaction. So a
//! commit whose answer was lost keeps the lock until its outcome is known.

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{Lease, Store, StoreError};

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

    /// A prepare for the source is about to be sent by the holder of
    /// `lease`: until its answer is stored, no token of the source is known
    /// to be the newest. Fenced: a worker whose lease is gone (it was paused
    /// past it) learns so here, before it sends anything.
    pub async fn prepare_outstanding(
        &self,
        lease: &Lease,
        source_vm_uuid: &str,
    ) -> Result<(), StoreError> {
        let updated = sqlx::query!(
            "INSERT INTO source_tokens (source_vm_uuid, holder)
             SELECT $1, NULL WHERE EXISTS (
                 SELECT 1 FROM replica_requests
                 WHERE id = $2 AND lease_id = $3 AND lease_expires_at > now())
             ON CONFLICT (source_vm_uuid) DO UPDATE SET holder = NULL",
            source_vm_uuid,
            lease.request_id,
            lease.lease_id,
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        if updated == 0 {
            return Err(StoreError::LeaseLost(lease.request_id));
        }
        Ok(())
    }

    /// Whether `request`'s stored token came from the source's last answered
    /// prepare, with none sent since.
    pub async fn holds_newest_token(
        &self,
        source_vm_uuid: &str,
        request: Uuid,
    ) -> Result<bool, sqlx::Error> {
        let holder: Option<Option<Uuid>> = sqlx::query_scalar!(
            "SELECT holder FROM source_tokens WHERE source_vm_uuid = $1",
            source_vm_uuid,
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(holder.flatten() == Some(request))
    }

    /// Keeps the token of a prepare made right before the commit, and names
    /// the request the holder of the source's newest token, in one
    /// transaction fenced by the lease.
    pub async fn store_fresh_token(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        token: &SecretString,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query!(
            "UPDATE replica_requests SET commit_token = $3, prepared_at = $4, updated_at = $4
             WHERE id = $1 AND lease_id = $2 AND lease_expires_at > now()",
            lease.request_id,
            lease.lease_id,
            token.expose_secret(),
            now,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 0 {
            return Err(StoreError::LeaseLost(lease.request_id));
        }
        newest_token_of(&mut tx, lease.request_id).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Names `request` the holder of its source's newest token, inside the
/// transaction that stores the token.
pub(super) async fn newest_token_of(
    tx: &mut Transaction<'_, Postgres>,
    request: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "INSERT INTO source_tokens (source_vm_uuid, holder)
         SELECT source_vm_uuid, id FROM replica_requests WHERE id = $1
         ON CONFLICT (source_vm_uuid) DO UPDATE SET holder = EXCLUDED.holder",
        request,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Gives up `holder`'s source lock, if it has one, and makes the next
/// request of that source that waits for it due at once, so the source's
/// prepares and commits follow each other without a poll in between.
/// Returns whether someone was woken.
pub(super) async fn release_source_lock(
    tx: &mut Transaction<'_, Postgres>,
    holder: Uuid,
    now: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let released: Option<String> = sqlx::query_scalar!(
        "DELETE FROM source_locks WHERE holder = $1 RETURNING source_vm_uuid",
        holder,
    )
    .fetch_optional(&mut **tx)
    .await?;
    let Some(source) = released else {
        return Ok(false);
    };
    // Only a request that merely waits: no backoff spent (attempts = 0), no
    // unanswered call, and no worker on it right now.
    let woken = sqlx::query!(
        "UPDATE replica_requests SET next_attempt_at = $3
         WHERE id = (
            SELECT id FROM replica_requests
            WHERE source_vm_uuid = $1 AND id <> $2 AND status IN ('preparing', 'committing')
              AND attempts = 0 AND call_sent_at IS NULL AND next_attempt_at > $3
              AND (lease_expires_at IS NULL OR lease_expires_at <= now())
            ORDER BY next_attempt_at, created_at
            LIMIT 1 FOR UPDATE SKIP LOCKED)",
        source,
        holder,
        now,
    )
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(woken > 0)
}
