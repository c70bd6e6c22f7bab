//! Idempotency keys: a retried call with the same key gets the first answer.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{Postgres, Transaction};

use super::Store;

/// The response saved under a key.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum IdempotencyOutcome {
    /// The same key and body came before: answer this again.
    Replay(StoredResponse),
    /// The key was used with a different body.
    Mismatch,
}

impl Store {
    /// The earlier outcome for `(principal, key)`, if it was saved at or
    /// after `expired_before`; an older key has expired and counts as new.
    pub async fn idempotent_response(
        &self,
        principal: &str,
        key: &str,
        request_hash: &[u8],
        expired_before: DateTime<Utc>,
    ) -> Result<Option<IdempotencyOutcome>, sqlx::Error> {
        answer_under_key(&self.pool, principal, key, request_hash, expired_before).await
    }

    /// Saves the response in the transaction that created what it describes,
    /// replacing an expired use of the key (saved before `expired_before`).
    /// Call it under the caller's lock, after the same transaction found no
    /// live use of the key.
    pub async fn save_idempotent_response(
        tx: &mut Transaction<'_, Postgres>,
        principal: &str,
        key: &str,
        request_hash: &[u8],
        response: &StoredResponse,
        now: DateTime<Utc>,
        expired_before: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "INSERT INTO idempotency_keys AS k (principal, key, request_hash, response_status, response_body, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (principal, key) DO UPDATE SET
                request_hash = EXCLUDED.request_hash, response_status = EXCLUDED.response_status,
                response_body = EXCLUDED.response_body, created_at = EXCLUDED.created_at
             WHERE k.created_at < $7",
            principal,
            key,
            request_hash,
            response.status as i16,
            response.body,
            now,
            expired_before,
        )
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// [`Store::idempotent_response`], on the pool or inside a transaction.
pub(super) async fn answer_under_key<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    principal: &str,
    key: &str,
    request_hash: &[u8],
    expired_before: DateTime<Utc>,
) -> Result<Option<IdempotencyOutcome>, sqlx::Error> {
    let row = sqlx::query!(
        "SELECT request_hash, response_status, response_body FROM idempotency_keys
         WHERE principal = $1 AND key = $2 AND created_at >= $3",
        principal,
        key,
        expired_before,
    )
    .fetch_optional(executor)
    .await?;
    Ok(row.map(|row| {
        if row.request_hash == request_hash {
            IdempotencyOutcome::Replay(StoredResponse {
                status: row.response_status as u16,
                body: row.response_body,
            })
        } else {
            IdempotencyOutcome::Mismatch
        }
    }))
}
