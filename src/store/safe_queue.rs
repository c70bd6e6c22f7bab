//! The Safe's queue as the team page shows it: each watched Safe's nonce as
//! the chain follower last read it (`safe_nonces`), the open proposals in
//! nonce order with how many live requests each serves, and the proposals
//! that serve none any more, which the planner withdraws.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::job_leases::{JobLease, fence_tx};
use super::proposals::query_proposals;
use super::{ProposalRow, Store, StoreError, clean};
use crate::domain::Failure;

/// One open proposal in its Safe's queue.
#[derive(Debug, Clone)]
pub struct QueueEntry {
    pub id: Uuid,
    pub chain_id: i64,
    /// Lowercase.
    pub safe: String,
    pub nonce: i64,
    pub confirmations: Option<i32>,
    pub threshold: Option<i32>,
    /// Requests it serves that are neither cancelled nor failed.
    pub live_requests: i64,
    /// Its execution was seen (it waits for confirmations).
    pub executed: bool,
    /// Lowercase: the bridge's proposer, and the owners who confirmed.
    pub proposer: String,
    pub confirmed_by: Option<Vec<String>>,
}

/// What became of [`Store::withdraw_proposal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdrawn {
    /// It ended: its nonce is free for the next batch.
    Ended,
    /// A request joined it meanwhile: it stays open, and is posted again.
    Revived,
    /// It was no longer open (or the planner's lease ended).
    NotOpen,
}

impl Store {
    /// Records each Safe's nonce at `block` (the follower's read at the head),
    /// fenced by the follower's lease like its other writes.
    pub async fn record_safe_nonces(
        &self,
        chain_id: i64,
        nonces: &[(String, i64)],
        block: i64,
        now: DateTime<Utc>,
        fence: Option<&JobLease>,
    ) -> Result<(), StoreError> {
        if nonces.is_empty() {
            return Ok(());
        }
        let safes: Vec<String> = nonces.iter().map(|(s, _)| s.clone()).collect();
        let values: Vec<i64> = nonces.iter().map(|(_, n)| *n).collect();
        let (job, holder, token) = JobLease::binds(fence);
        let rows = sqlx::query!(
            "INSERT INTO safe_nonces (chain_id, safe, nonce, block, read_at)
             SELECT $1, s.safe, s.nonce, $4, $5 FROM UNNEST($2::text[], $3::bigint[]) AS s(safe, nonce)
             WHERE ($6::text IS NULL OR EXISTS (SELECT 1 FROM job_leases
                WHERE job = $6 AND holder = $7 AND token = $8 AND expires_at > now() FOR SHARE))
             ON CONFLICT (chain_id, safe) DO UPDATE
                SET nonce = EXCLUDED.nonce, block = EXCLUDED.block, read_at = EXCLUDED.read_at",
            chain_id,
            &safes,
            &values,
            block,
            now,
            job,
            holder,
            token,
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        self.fenced(fence, rows).await?;
        Ok(())
    }

    /// Every recorded Safe nonce, by (chain, lowercase Safe).
    pub async fn safe_nonces(&self) -> Result<HashMap<(i64, String), i64>, sqlx::Error> {
        let rows = sqlx::query!("SELECT chain_id, safe, nonce FROM safe_nonces")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| ((r.chain_id, r.safe), r.nonce))
            .collect())
    }

    /// Every open proposal, by chain, Safe and nonce.
    pub async fn open_queue(&self) -> Result<Vec<QueueEntry>, sqlx::Error> {
        sqlx::query_as!(
            QueueEntry,
            r#"SELECT p.id, p.chain_id, p.safe, p.nonce, p.confirmations, p.threshold,
                (p.execution_tx_hash IS NOT NULL) AS "executed!", p.proposer, p.confirmed_by,
                (SELECT count(*) FROM replica_requests r
                 WHERE r.proposal_id = p.id AND r.status NOT IN ('cancelled', 'failed')) AS "live_requests!"
             FROM proposals p WHERE p.status = 'proposed'
             ORDER BY p.chain_id, p.safe, p.nonce, p.created_at"#,
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Open proposals, not executed, whose requests were all cancelled or
    /// failed: they serve no request.
    pub async fn proposals_serving_nothing(&self) -> Result<Vec<ProposalRow>, sqlx::Error> {
        query_proposals!(
            "SELECT ",
            " FROM proposals p
             WHERE status = 'proposed' AND execution_tx_hash IS NULL
               AND NOT EXISTS (SELECT 1 FROM replica_requests r
                               WHERE r.proposal_id = p.id AND r.status NOT IN ('cancelled', 'failed'))
             ORDER BY nonce",
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Ends an open proposal that serves no request and that the service no
    /// longer holds (its proposer deleted it, or it never got there): it
    /// fails with `NO-REQUEST`, so the next batch reuses its nonce. A request
    /// that joined it since revives it instead: it is posted again. With
    /// `fence`, the planner's job lease must still hold ([`StoreError::JobLost`]).
    pub async fn withdraw_proposal(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        message: &str,
        fence: Option<&JobLease>,
    ) -> Result<Withdrawn, StoreError> {
        let mut tx = self.pool.begin().await?;
        fence_tx(&mut tx, fence).await?;
        // A request joining takes this row FOR SHARE: one waits for the other.
        let open = sqlx::query_scalar!(
            "SELECT id FROM proposals WHERE id = $1 AND status = 'proposed' FOR UPDATE",
            id,
        )
        .fetch_optional(&mut *tx)
        .await?;
        if open.is_none() {
            return Ok(Withdrawn::NotOpen);
        }
        let live = sqlx::query_scalar!(
            r#"SELECT count(*) AS "count!" FROM replica_requests
             WHERE proposal_id = $1 AND status NOT IN ('cancelled', 'failed')"#,
            id,
        )
        .fetch_one(&mut *tx)
        .await?;
        let outcome = if live > 0 {
            sqlx::query!(
                "UPDATE proposals SET submitted_at = NULL, next_attempt_at = $2, updated_at = $2 WHERE id = $1",
                id,
                now,
            )
            .execute(&mut *tx)
            .await?;
            Withdrawn::Revived
        } else {
            sqlx::query!(
                "UPDATE proposals SET status = 'failed', last_error_code = $4, last_error_message = $3,
                    updated_at = $2, watch_after_end = false
                 WHERE id = $1",
                id,
                now,
                clean(message),
                Failure::NoRequest.code(),
            )
            .execute(&mut *tx)
            .await?;
            Withdrawn::Ended
        };
        tx.commit().await?;
        Ok(outcome)
    }
}
