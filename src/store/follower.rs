//! What the chain follower keeps: its cursor per chain, the executions it
//! has seen, and the moves of requests when a proposal ends.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::proposals::ProposalRow;
use super::requests::{
    COLUMNS as REQUEST_COLUMNS, Changes, ReplicaRequest, StoredError, advance_in,
};
use super::{Store, StoreError, clean};
use crate::domain::{Actor, Event, Status};

/// How a proposal ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProposalEnd {
    Executed,
    /// Executed with `ExecutionFailure`, or never executed in time.
    Failed,
    /// Its nonce was used by another transaction.
    Replaced,
    /// Everything it would register got allowed some other way.
    Superseded,
}

impl ProposalEnd {
    fn as_str(self) -> &'static str {
        match self {
            ProposalEnd::Executed => "executed",
            ProposalEnd::Failed => "failed",
            ProposalEnd::Replaced => "replaced",
            ProposalEnd::Superseded => "superseded",
        }
    }
}

impl Store {
    /// Chains with proposals the service accepted and nobody executed yet.
    pub async fn chains_to_follow(&self) -> Result<Vec<i64>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT DISTINCT chain_id FROM proposals WHERE status = 'proposed' AND submitted_at IS NOT NULL ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await
    }

    pub async fn open_proposals(&self, chain_id: i64) -> Result<Vec<ProposalRow>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {} FROM proposals WHERE chain_id = $1 AND status = 'proposed' AND submitted_at IS NOT NULL
             ORDER BY nonce",
            super::proposals::COLUMNS
        ))
        .bind(chain_id)
        .fetch_all(&self.pool)
        .await
    }

    /// The apps the open proposals of a chain register on.
    pub async fn watched_apps(&self, chain_id: i64) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT DISTINCT c.app_id FROM proposal_calls c JOIN proposals p ON p.id = c.proposal_id
             WHERE p.chain_id = $1 AND p.status = 'proposed'",
        )
        .bind(chain_id)
        .fetch_all(&self.pool)
        .await
    }

    pub async fn cursor(&self, chain_id: i64) -> Result<Option<(i64, String)>, sqlx::Error> {
        sqlx::query_as("SELECT block_number, block_hash FROM chain_cursors WHERE chain_id = $1")
            .bind(chain_id)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn set_cursor(
        &self,
        chain_id: i64,
        block: i64,
        hash: &str,
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO chain_cursors (chain_id, block_number, block_hash, updated_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (chain_id) DO UPDATE SET block_number = $2, block_hash = $3, updated_at = $4",
        )
        .bind(chain_id)
        .bind(block)
        .bind(hash)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets executions seen at or after `block`: a reorg took them away.
    pub async fn forget_executions_from(
        &self,
        chain_id: i64,
        block: i64,
    ) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query(
            "UPDATE proposals SET execution_tx_hash = NULL, execution_block = NULL, execution_block_hash = NULL,
                execution_success = NULL
             WHERE chain_id = $1 AND status = 'proposed' AND execution_block >= $2",
        )
        .bind(chain_id)
        .bind(block)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// An execution seen in the logs, not final until confirmed.
    pub async fn observe_execution(
        &self,
        proposal_id: Uuid,
        tx_hash: &str,
        block: i64,
        block_hash: &str,
        success: bool,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE proposals SET execution_tx_hash = $2, execution_block = $3, execution_block_hash = $4,
                execution_success = $5
             WHERE id = $1 AND status = 'proposed'",
        )
        .bind(proposal_id)
        .bind(tx_hash)
        .bind(block)
        .bind(block_hash)
        .bind(success)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The requests still waiting on a proposal.
    pub async fn requests_of_proposal(
        &self,
        proposal_id: Uuid,
    ) -> Result<Vec<ReplicaRequest>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {REQUEST_COLUMNS} FROM replica_requests
             WHERE proposal_id = $1 AND status IN ('awaiting_proposal', 'awaiting_approval') ORDER BY created_at"
        ))
        .bind(proposal_id)
        .fetch_all(&self.pool)
        .await
    }

    /// Requests on `chain_id` waiting for the owners to execute.
    pub async fn requests_awaiting_approval(
        &self,
        chain_id: i64,
    ) -> Result<Vec<ReplicaRequest>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {REQUEST_COLUMNS} FROM replica_requests
             WHERE chain_id = $1 AND status = 'awaiting_approval' ORDER BY created_at"
        ))
        .bind(chain_id)
        .fetch_all(&self.pool)
        .await
    }

    /// Ends a proposal.
    pub async fn end_proposal(
        &self,
        proposal_id: Uuid,
        end: ProposalEnd,
        now: DateTime<Utc>,
        error: Option<&StoredError>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE proposals SET status = $2, updated_at = $3,
                last_error_code = COALESCE($4, last_error_code), last_error_message = COALESCE($5, last_error_message)
             WHERE id = $1 AND status = 'proposed'",
        )
        .bind(proposal_id)
        .bind(end.as_str())
        .bind(now)
        .bind(error.map(|e| &e.code))
        .bind(error.map(|e| clean(&e.message)))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Keeps `error` visible on the requests of a proposal without moving
    /// them: the follower saw something doubtful and waits.
    pub async fn note_on_requests(
        &self,
        proposal_id: Uuid,
        error: &StoredError,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE replica_requests SET last_error_code = $2, last_error_message = $3, last_error_suggestion = $4
             WHERE proposal_id = $1 AND status IN ('awaiting_proposal', 'awaiting_approval')",
        )
        .bind(proposal_id)
        .bind(&error.code)
        .bind(clean(&error.message))
        .bind(&error.suggestion)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Moves a waiting request on by `event` (no worker holds it). `Ok(false)`
    /// when it changed meanwhile.
    pub async fn move_waiting(
        &self,
        request: &ReplicaRequest,
        event: Event,
        now: DateTime<Utc>,
        message: &str,
        changes: Changes,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        match advance_in(
            &mut tx,
            request.id,
            None,
            now,
            request.status(),
            event,
            &Actor::Worker,
            Some(message),
            changes,
        )
        .await
        {
            Ok(_) => {
                tx.commit().await?;
                Ok(true)
            }
            Err(StoreError::LeaseLost(_)) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// How often a request lost its proposal (execution failure, replaced, ...).
    pub async fn proposals_lost(&self, request_id: Uuid) -> Result<i64, sqlx::Error> {
        self.count_transitions(
            request_id,
            Status::AwaitingApproval,
            Status::AwaitingProposal,
        )
        .await
    }
}
