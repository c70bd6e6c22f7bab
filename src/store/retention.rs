//! Retention: expired idempotency keys, and finished requests with their
//! events and registrations once they are older than the configured time.

use chrono::{DateTime, Utc};

use super::Store;

/// What one purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub idempotency_keys: u64,
    pub requests: u64,
    pub events: u64,
    pub proposals: u64,
}

/// Rows deleted per statement, so one pass never holds long locks.
const BATCH: i64 = 1000;

impl Store {
    /// Deletes idempotency keys saved before `cutoff`.
    pub async fn purge_idempotency_keys(&self, cutoff: DateTime<Utc>) -> Result<u64, sqlx::Error> {
        let mut total = 0;
        loop {
            let deleted = sqlx::query!(
                "DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY(
                    SELECT ctid FROM idempotency_keys WHERE created_at < $1 LIMIT $2))",
                cutoff,
                BATCH,
            )
            .execute(&self.pool)
            .await?
            .rows_affected();
            total += deleted;
            if deleted < BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// Deletes requests that finished (done, failed, cancelled) before
    /// `cutoff`, with their events and registrations, then the finished
    /// proposals no request points to any more, with their calls.
    pub async fn purge_finished(&self, cutoff: DateTime<Utc>) -> Result<Purged, sqlx::Error> {
        let mut purged = Purged::default();
        loop {
            let mut tx = self.pool.begin().await?;
            // The one writer allowed to delete from the append-only event log.
            sqlx::query!("SET LOCAL approval_bridge.retention = 'on'")
                .execute(&mut *tx)
                .await?;
            let ids: Vec<uuid::Uuid> = sqlx::query_scalar!(
                "SELECT id FROM replica_requests
                 WHERE status IN ('done', 'failed', 'cancelled') AND updated_at < $1
                 ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED",
                cutoff,
                BATCH,
            )
            .fetch_all(&mut *tx)
            .await?;
            if ids.is_empty() {
                tx.commit().await?;
                break;
            }
            purged.events += sqlx::query!(
                "DELETE FROM request_events WHERE request_id = ANY($1)",
                &ids
            )
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sqlx::query!(
                "DELETE FROM request_registrations WHERE request_id = ANY($1)",
                &ids
            )
            .execute(&mut *tx)
            .await?;
            purged.requests +=
                sqlx::query!("DELETE FROM replica_requests WHERE id = ANY($1)", &ids)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            tx.commit().await?;
            if (ids.len() as i64) < BATCH {
                break;
            }
        }
        let mut tx = self.pool.begin().await?;
        let proposals: Vec<uuid::Uuid> = sqlx::query_scalar!(
            "SELECT p.id FROM proposals p
             WHERE p.status <> 'proposed' AND p.updated_at < $1
               AND NOT EXISTS (SELECT 1 FROM replica_requests r WHERE r.proposal_id = p.id)
             FOR UPDATE SKIP LOCKED",
            cutoff,
        )
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query!(
            "DELETE FROM proposal_calls WHERE proposal_id = ANY($1)",
            &proposals
        )
        .execute(&mut *tx)
        .await?;
        purged.proposals = sqlx::query!("DELETE FROM proposals WHERE id = ANY($1)", &proposals)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(purged)
    }
}
