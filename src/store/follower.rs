//! What the chain follower keeps: its cursor per chain, the executions it
//! has seen, and the moves of requests when a proposal ends.

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::job_leases::{JobLease, fence_tx};
use super::proposals::{ProposalRow, query_proposals};
use super::requests::{Changes, ReplicaRequest, StoredError, advance_in, query_requests};
use super::{Store, StoreError, clean};
use crate::domain::{Actor, Event, Failure, ProposalEnd, ProposalStatus, Status};

/// Where a chain's follower stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The last block done with: confirmed, and every log up to it seen.
    pub block_number: i64,
    /// Its hash, to notice a reorg that replaced it.
    pub block_hash: String,
    /// App logs were seen that the follower has not acted on yet.
    pub apps_touched: bool,
}

impl Store {
    /// Chains with proposals the service accepted and nobody executed yet,
    /// or ended ones the owners may still execute.
    pub async fn chains_to_follow(&self) -> Result<Vec<i64>, sqlx::Error> {
        sqlx::query_scalar!(
            "SELECT DISTINCT chain_id FROM proposals
             WHERE (status = 'proposed' AND submitted_at IS NOT NULL) OR watch_after_end ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await
    }

    pub async fn open_proposals(&self, chain_id: i64) -> Result<Vec<ProposalRow>, sqlx::Error> {
        query_proposals!(
            "SELECT ",
            " FROM proposals WHERE chain_id = $1 AND status = 'proposed' AND submitted_at IS NOT NULL
             ORDER BY nonce",
            chain_id,
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Proposals of a chain that ended without executing and that the owners
    /// may still execute (see [`ProposalRow::watch_after_end`]).
    pub async fn proposals_watched_after_end(
        &self,
        chain_id: i64,
    ) -> Result<Vec<ProposalRow>, sqlx::Error> {
        query_proposals!(
            "SELECT ",
            " FROM proposals WHERE chain_id = $1 AND watch_after_end ORDER BY nonce",
            chain_id,
        )
        .fetch_all(&self.pool)
        .await
    }

    /// The follower is done with an ended proposal: its nonce went to another
    /// transaction, or it executed with `ExecutionFailure`.
    pub async fn stop_watching(
        &self,
        proposal_id: Uuid,
        fence: Option<&JobLease>,
    ) -> Result<(), StoreError> {
        let (job, holder, token) = JobLease::binds(fence);
        let rows = sqlx::query!(
            "UPDATE proposals SET watch_after_end = false WHERE id = $1
               AND ($2::text IS NULL OR EXISTS (SELECT 1 FROM job_leases
                 WHERE job = $2 AND holder = $3 AND token = $4 AND expires_at > now() FOR SHARE))",
            proposal_id,
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

    /// The owners executed a proposal after it ended: it is recorded as
    /// executed, and the requests it had failed are settled as
    /// [`settle_failed`] says, in one transaction.
    pub async fn executed_after_end(
        &self,
        proposal_id: Uuid,
        now: DateTime<Utc>,
        fence: Option<&JobLease>,
    ) -> Result<LateExecution, StoreError> {
        let mut tx = self.pool.begin().await?;
        fence_tx(&mut tx, fence).await?;
        let ended = sqlx::query!(
            "UPDATE proposals SET status = $2, watch_after_end = false, updated_at = $3
             WHERE id = $1 AND watch_after_end AND status <> 'proposed'
             RETURNING safe_tx_hash, execution_tx_hash",
            proposal_id,
            ProposalStatus::Executed.as_str(),
            now,
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some(ended) = ended else {
            return Ok(LateExecution::default());
        };
        let execution = ended.execution_tx_hash.as_deref().unwrap_or("?");
        let settled =
            settle_failed(&mut tx, proposal_id, &ended.safe_tx_hash, execution, now).await?;
        tx.commit().await?;
        Ok(settled)
    }

    /// The apps the open proposals of a chain register on.
    pub async fn watched_apps(&self, chain_id: i64) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar!(
            "SELECT DISTINCT c.app_id FROM proposal_calls c JOIN proposals p ON p.id = c.proposal_id
             WHERE p.chain_id = $1 AND p.status = 'proposed'",
            chain_id,
        )
        .fetch_all(&self.pool)
        .await
    }

    /// The last block the follower is done with, its hash, and whether app
    /// logs seen so far still wait to be acted on.
    pub async fn cursor(&self, chain_id: i64) -> Result<Option<Cursor>, sqlx::Error> {
        sqlx::query_as!(
            Cursor,
            "SELECT block_number, block_hash, apps_touched FROM chain_cursors WHERE chain_id = $1",
            chain_id,
        )
        .fetch_optional(&self.pool)
        .await
    }

    pub async fn set_cursor(
        &self,
        chain_id: i64,
        cursor: &Cursor,
        now: DateTime<Utc>,
        fence: Option<&JobLease>,
    ) -> Result<(), StoreError> {
        let (job, holder, token) = JobLease::binds(fence);
        let rows = sqlx::query!(
            "INSERT INTO chain_cursors (chain_id, block_number, block_hash, apps_touched, updated_at)
             SELECT $1::bigint, $2::bigint, $3::text, $4::bool, $5::timestamptz
             WHERE ($6::text IS NULL OR EXISTS (SELECT 1 FROM job_leases
                WHERE job = $6 AND holder = $7 AND token = $8 AND expires_at > now() FOR SHARE))
             ON CONFLICT (chain_id) DO UPDATE SET block_number = $2, block_hash = $3, apps_touched = $4,
                updated_at = $5",
            chain_id,
            cursor.block_number,
            cursor.block_hash,
            cursor.apps_touched,
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

    /// The app logs seen so far have been acted on.
    pub async fn clear_apps_touched(
        &self,
        chain_id: i64,
        fence: Option<&JobLease>,
    ) -> Result<(), StoreError> {
        let (job, holder, token) = JobLease::binds(fence);
        let rows = sqlx::query!(
            "UPDATE chain_cursors SET apps_touched = false WHERE chain_id = $1
               AND ($2::text IS NULL OR EXISTS (SELECT 1 FROM job_leases
                 WHERE job = $2 AND holder = $3 AND token = $4 AND expires_at > now() FOR SHARE))",
            chain_id,
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

    /// Forgets executions seen at or after `block`: a reorg took them away.
    pub async fn forget_executions_from(
        &self,
        chain_id: i64,
        block: i64,
        fence: Option<&JobLease>,
    ) -> Result<u64, StoreError> {
        let (job, holder, token) = JobLease::binds(fence);
        let rows = sqlx::query!(
            "UPDATE proposals SET execution_tx_hash = NULL, execution_block = NULL, execution_block_hash = NULL,
                execution_success = NULL
             WHERE chain_id = $1 AND (status = 'proposed' OR watch_after_end) AND execution_block >= $2
               AND ($3::text IS NULL OR EXISTS (SELECT 1 FROM job_leases
                 WHERE job = $3 AND holder = $4 AND token = $5 AND expires_at > now() FOR SHARE))",
            chain_id,
            block,
            job,
            holder,
            token,
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        self.fenced(fence, rows).await
    }

    /// An execution seen in the logs, not final until confirmed.
    pub async fn observe_execution(
        &self,
        proposal_id: Uuid,
        tx_hash: &str,
        block: i64,
        block_hash: &str,
        success: bool,
        fence: Option<&JobLease>,
    ) -> Result<(), StoreError> {
        let (job, holder, token) = JobLease::binds(fence);
        let rows = sqlx::query!(
            "UPDATE proposals SET execution_tx_hash = $2, execution_block = $3, execution_block_hash = $4,
                execution_success = $5
             WHERE id = $1 AND (status = 'proposed' OR watch_after_end)
               AND ($6::text IS NULL OR EXISTS (SELECT 1 FROM job_leases
                 WHERE job = $6 AND holder = $7 AND token = $8 AND expires_at > now() FOR SHARE))",
            proposal_id,
            tx_hash,
            block,
            block_hash,
            success,
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

    /// The requests still waiting on a proposal.
    pub async fn requests_of_proposal(
        &self,
        proposal_id: Uuid,
    ) -> Result<Vec<ReplicaRequest>, sqlx::Error> {
        query_requests!(
            "SELECT ",
            " FROM replica_requests
             WHERE proposal_id = $1 AND status IN ('awaiting_proposal', 'awaiting_approval') ORDER BY created_at",
            proposal_id,
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Requests on `chain_id` waiting for the owners to execute.
    pub async fn requests_awaiting_approval(
        &self,
        chain_id: i64,
    ) -> Result<Vec<ReplicaRequest>, sqlx::Error> {
        query_requests!(
            "SELECT ",
            " FROM replica_requests
             WHERE chain_id = $1 AND status = 'awaiting_approval' ORDER BY created_at",
            chain_id,
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Ends an open proposal and moves each of its waiting requests as
    /// `move_of` says, in ONE transaction: a crash leaves both or neither.
    /// `move_of` gets the request and how often it lost a proposal before.
    /// A request still awaiting the proposal's submission is only unlinked
    /// when dropped: it is planned afresh. `Ok(false)`: the proposal had
    /// ended already.
    pub async fn end_proposal(
        &self,
        proposal_id: Uuid,
        end: ProposalEnd,
        now: DateTime<Utc>,
        error: Option<&StoredError>,
        fence: Option<&JobLease>,
        mut move_of: impl FnMut(&ReplicaRequest, i64) -> RequestMove,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        fence_tx(&mut tx, fence).await?;
        // The row lock orders this after (or before) a request joining.
        let ended = sqlx::query!(
            "UPDATE proposals SET status = $2, updated_at = $3,
                last_error_code = COALESCE($4, last_error_code), last_error_message = COALESCE($5, last_error_message),
                watch_after_end = $6
             WHERE id = $1 AND status = 'proposed'
             RETURNING safe_tx_hash, execution_tx_hash",
            proposal_id,
            end.status().as_str(),
            now,
            error.map(|e| &e.code),
            error.map(|e| clean(&e.message)),
            end.watch_after_end(),
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some(ended) = ended else {
            return Ok(false);
        };
        // Opened again after it had failed requests (they were queued again),
        // and executed now: those are settled as after a late execution.
        if end.settles_failed_requests() {
            let execution = ended.execution_tx_hash.as_deref().unwrap_or("?");
            settle_failed(&mut tx, proposal_id, &ended.safe_tx_hash, execution, now).await?;
        }
        for request in waiting_on(&mut tx, proposal_id).await? {
            let lost_before = proposals_lost_in(&mut tx, request.id).await?;
            let RequestMove {
                event,
                message,
                changes,
            } = move_of(&request, lost_before);
            if request.status() == Status::AwaitingProposal && event == Event::ProposalDropped {
                unlink(&mut tx, request.id, now).await?;
                continue;
            }
            advance_in(
                &mut tx,
                request.id,
                None,
                now,
                request.status(),
                event,
                &Actor::Worker,
                Some(&message),
                changes,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Everything the given requests need was allowed on chain without this
    /// proposal: they move on to committing, and the proposal, left with
    /// nothing to do, is superseded, in one transaction. A proposal with an
    /// execution on record is left alone: the follower confirms that one.
    /// Returns how many requests moved.
    pub async fn release_allowed(
        &self,
        proposal_id: Uuid,
        request_ids: &[Uuid],
        now: DateTime<Utc>,
        message: &str,
        fence: Option<&JobLease>,
    ) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await?;
        fence_tx(&mut tx, fence).await?;
        let open = sqlx::query_scalar!(
            r#"SELECT 1 AS "open!" FROM proposals WHERE id = $1 AND status = 'proposed' AND execution_tx_hash IS NULL
             FOR UPDATE"#,
            proposal_id,
        )
        .fetch_optional(&mut *tx)
        .await?;
        if open.is_none() {
            return Ok(0);
        }
        let waiting = waiting_on(&mut tx, proposal_id).await?;
        let mut moved = 0;
        for request in waiting.iter().filter(|r| request_ids.contains(&r.id)) {
            advance_in(
                &mut tx,
                request.id,
                None,
                now,
                request.status(),
                Event::RegistrationsAllowed,
                &Actor::Worker,
                Some(message),
                Changes::default(),
            )
            .await?;
            moved += 1;
        }
        if moved == waiting.len() {
            sqlx::query!(
                "UPDATE proposals SET status = $2, updated_at = $3 WHERE id = $1 AND status = 'proposed'",
                proposal_id,
                ProposalStatus::Superseded.as_str(),
                now,
            )
            .execute(&mut *tx)
            .await?;
            tracing::info!(%proposal_id, "proposal superseded: nothing left in it");
        }
        tx.commit().await?;
        Ok(moved)
    }

    /// Keeps `error` visible on the requests of a proposal without moving
    /// them: the follower saw something doubtful and waits.
    pub async fn note_on_requests(
        &self,
        proposal_id: Uuid,
        error: &StoredError,
        fence: Option<&JobLease>,
    ) -> Result<(), StoreError> {
        let (job, holder, token) = JobLease::binds(fence);
        let rows = sqlx::query!(
            "UPDATE replica_requests SET last_error_code = $2, last_error_message = $3, last_error_suggestion = $4
             WHERE proposal_id = $1 AND status IN ('awaiting_proposal', 'awaiting_approval')
               AND ($5::text IS NULL OR EXISTS (SELECT 1 FROM job_leases
                 WHERE job = $5 AND holder = $6 AND token = $7 AND expires_at > now() FOR SHARE))",
            proposal_id,
            error.code,
            clean(&error.message),
            error.suggestion,
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

    /// Moves a waiting request on by `event` (no worker holds it). `Ok(false)`
    /// when it changed meanwhile. `fence`: the lease of the job that moves it.
    pub async fn move_waiting(
        &self,
        request: &ReplicaRequest,
        event: Event,
        now: DateTime<Utc>,
        message: &str,
        changes: Changes,
        fence: Option<&JobLease>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        fence_tx(&mut tx, fence).await?;
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
}

/// What a late execution did to the requests its proposal had failed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LateExecution {
    /// Planned again.
    pub revived: u64,
    /// Left failed: a newer request makes the same replica.
    pub superseded: u64,
}

/// The requests that `proposal_id` failed (it expired, or the bridge gave up
/// posting it), now that `execution` put their registrations on chain. Each
/// is planned again ([`Event::ExecutedLate`]; the planner commits it at
/// confirmed depth), unless a newer request for the same replica (the same
/// source, node and compose hash) is under way or done: then it stays
/// failed with `PROPOSAL-EXECUTED-LATE` naming that request, which makes the
/// replica. A newer request stands in for one failed request only.
async fn settle_failed(
    tx: &mut Transaction<'_, Postgres>,
    proposal_id: Uuid,
    safe_tx_hash: &str,
    execution: &str,
    now: DateTime<Utc>,
) -> Result<LateExecution, StoreError> {
    // Intake holds the source's lock from its insert to its commit (see
    // `store::orders`): taken here first, a newer request being stored right
    // now is committed, and seen below, before any request is revived.
    sqlx::query!(
        "SELECT pg_advisory_xact_lock(hashtextextended('replica-source:' || source_vm_uuid, 0))
         FROM (SELECT DISTINCT source_vm_uuid FROM replica_requests
               WHERE proposal_id = $1 AND status = 'failed' ORDER BY source_vm_uuid) AS sorted",
        proposal_id,
    )
    .fetch_all(&mut **tx)
    .await?;
    let failed = sqlx::query_scalar!(
        "SELECT id FROM replica_requests WHERE proposal_id = $1 AND status = 'failed'
         ORDER BY created_at, id FOR UPDATE",
        proposal_id,
    )
    .fetch_all(&mut **tx)
    .await?;
    let mut settled = LateExecution::default();
    let mut taken: Vec<Uuid> = Vec::new();
    for id in failed {
        let newer = sqlx::query_scalar!(
            "SELECT n.id FROM replica_requests n JOIN replica_requests o ON o.id = $1
             WHERE n.id <> o.id AND NOT n.id = ANY($2) AND (n.created_at, n.id) > (o.created_at, o.id)
               AND n.status NOT IN ('failed', 'cancelled')
               AND n.source_vm_uuid = o.source_vm_uuid
               AND (n.node_id IS NULL OR o.node_id IS NULL OR n.node_id = o.node_id)
               AND (COALESCE(n.compose_hash, n.requested_compose_hash) IS NULL
                    OR lower(COALESCE(n.compose_hash, n.requested_compose_hash))
                       IS NOT DISTINCT FROM lower(COALESCE(o.compose_hash, o.requested_compose_hash)))
             ORDER BY n.created_at, n.id LIMIT 1",
            id,
            &taken,
        )
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(newer) = newer {
            taken.push(newer);
            let report = StoredError::suggesting(
                Failure::ProposalExecutedLate,
                &format!(
                    "the Safe owners executed proposal {safe_tx_hash} in {execution} after the bridge had given up on it; \
                     request {newer} queued the same replica again and makes it"
                ),
                &format!("Follow request {newer}."),
            );
            sqlx::query!(
                "UPDATE replica_requests SET last_error_code = $2, last_error_message = $3, last_error_suggestion = $4,
                    updated_at = $5
                 WHERE id = $1 AND status = 'failed'",
                id,
                report.code,
                clean(&report.message),
                report.suggestion,
                now,
            )
            .execute(&mut **tx)
            .await?;
            settled.superseded += 1;
            continue;
        }
        let message = format!(
            "the Safe owners executed proposal {safe_tx_hash} in {execution} after the bridge had given up on it: \
             what this request needs is on chain, so it is planned again and commits at confirmed depth"
        );
        advance_in(
            tx,
            id,
            None,
            now,
            Status::Failed,
            Event::ExecutedLate,
            &Actor::Worker,
            Some(&message),
            Changes::default(),
        )
        .await?;
        settled.revived += 1;
    }
    Ok(settled)
}

/// How one request leaves a proposal that ends.
#[derive(Debug)]
pub struct RequestMove {
    pub event: Event,
    pub message: String,
    pub changes: Changes,
}

/// The requests still waiting on a proposal, locked.
async fn waiting_on(
    tx: &mut Transaction<'_, Postgres>,
    proposal_id: Uuid,
) -> Result<Vec<ReplicaRequest>, sqlx::Error> {
    query_requests!(
        "SELECT ",
        " FROM replica_requests
         WHERE proposal_id = $1 AND status IN ('awaiting_proposal', 'awaiting_approval')
         ORDER BY created_at FOR UPDATE",
        proposal_id,
    )
    .fetch_all(&mut **tx)
    .await
}

/// How often a request lost its proposal (execution failure, replaced, ...).
async fn proposals_lost_in(
    tx: &mut Transaction<'_, Postgres>,
    request_id: Uuid,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM request_events WHERE request_id = $1 AND from_status = $2 AND to_status = $3"#,
        request_id,
        Status::AwaitingApproval.as_str(),
        Status::AwaitingProposal.as_str(),
    )
    .fetch_one(&mut **tx)
    .await
}

/// Takes a request that never got to await approval off its proposal.
async fn unlink(
    tx: &mut Transaction<'_, Postgres>,
    request_id: Uuid,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE replica_requests SET proposal_id = NULL, next_attempt_at = $2, updated_at = $2
         WHERE id = $1 AND status = 'awaiting_proposal'",
        request_id,
        now,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}
