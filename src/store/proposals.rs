//! The `proposals` table and the links between proposals, their calls and
//! the requests they serve.
//!
//! A proposal row is stored (with its nonce and safeTxHash) before it is
//! posted to the Transaction Service, so a crash in between leads to posting
//! the same transaction again, never to a second nonce.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::job_leases::{JobLease, fence_tx, still_held};
use super::requests::{Changes, StoredError, advance_in, query_requests};
use super::{Store, StoreError, clean};
use crate::domain::{Actor, Event, ProposalStatus, Status};

#[derive(Debug, Clone)]
pub struct ProposalRow {
    pub id: Uuid,
    pub chain_id: i64,
    pub safe: String,
    pub safe_version: String,
    pub nonce: i64,
    pub safe_tx_hash: String,
    pub to_address: String,
    pub value: String,
    pub data: String,
    pub operation: i16,
    pub status: ProposalStatus,
    pub proposer: String,
    pub gas_estimate: Option<i64>,
    pub submitted_at: Option<DateTime<Utc>>,
    pub next_attempt_at: DateTime<Utc>,
    pub confirmations: Option<i32>,
    pub threshold: Option<i32>,
    pub checked_at: Option<DateTime<Utc>>,
    pub execution_tx_hash: Option<String>,
    pub execution_block: Option<i64>,
    pub last_error_code: Option<String>,
    pub last_error_message: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub proposed_block: Option<i64>,
    pub execution_block_hash: Option<String>,
    pub execution_success: Option<bool>,
    /// The Safe's owners (lowercase), as last read.
    pub owners: Option<Vec<String>>,
    /// The owners (lowercase) whose confirmation the Transaction Service holds.
    pub confirmed_by: Option<Vec<String>>,
    /// When it was stored, or opened again for a batch with the same calls
    /// at its nonce: the bound on posting it runs from here.
    pub opened_at: DateTime<Utc>,
    /// Ended without executing, yet the owners may still execute it: the
    /// follower watches for that until the Safe uses its nonce.
    pub watch_after_end: bool,
}

/// `sqlx::query_as!` of [`ProposalRow`]s: the SQL is `$before`, every
/// column, then `$after`. The checked macros take only literals, so the one
/// list of columns lives here.
macro_rules! query_proposals {
    ($before:literal, $after:literal $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            $crate::store::ProposalRow,
            $before
                + r#"id, chain_id, safe, safe_version, nonce, safe_tx_hash, to_address, value, data, operation,
    status AS "status: crate::store::decode::ProposalStatusText", proposer, gas_estimate, submitted_at, next_attempt_at, confirmations, threshold, checked_at,
    execution_tx_hash, execution_block, last_error_code, last_error_message, created_at, updated_at,
    proposed_block, execution_block_hash, execution_success, owners, confirmed_by, opened_at, watch_after_end"#
                + $after
            $(, $arg)*
        )
    };
}
pub(super) use query_proposals;

/// A registration as stored: the app, `compose_hash` or `device`, and the 0x value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoredRegistration {
    pub app_id: String,
    pub kind: String,
    pub value: String,
}

#[derive(Debug, Clone)]
pub struct RequestRegistration {
    pub request_id: Uuid,
    pub registration: StoredRegistration,
}

/// A proposal to store, with the calls it makes and the requests it serves.
#[derive(Debug, Clone)]
pub struct NewProposal {
    pub id: Uuid,
    pub chain_id: i64,
    pub safe: String,
    pub safe_version: String,
    pub nonce: i64,
    pub safe_tx_hash: String,
    pub to_address: String,
    pub value: String,
    pub data: String,
    pub operation: i16,
    pub proposer: String,
    pub gas_estimate: Option<i64>,
    /// The chain head when it was planned: the follower scans from there.
    pub proposed_block: i64,
    /// The Safe's owners (lowercase) and threshold when it was planned.
    pub owners: Vec<String>,
    pub threshold: i32,
    pub calls: Vec<StoredRegistration>,
    pub request_ids: Vec<Uuid>,
}

/// Where [`Store::insert_proposal`] put the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProposalStored {
    /// In the new proposal.
    New(Uuid),
    /// In a stored proposal with the same safeTxHash, opened again.
    Reopened(Uuid),
}

impl ProposalStored {
    pub fn id(self) -> Uuid {
        match self {
            ProposalStored::New(id) | ProposalStored::Reopened(id) => id,
        }
    }
}

/// Why a proposal could not be stored; all but `HashTaken` mean "plan again".
#[derive(Debug, thiserror::Error)]
pub enum ProposalConflict {
    #[error("nonce {wanted} is taken; the next free nonce is {next}")]
    NonceTaken { wanted: i64, next: i64 },
    #[error("another planner took some of the requests")]
    RequestsTaken,
    #[error("the planner's lease on {0} ended")]
    LeaseLost(String),
    /// The same transaction is stored already and cannot be opened again
    /// (it executed, or its nonce was used).
    #[error("the same Safe transaction is stored already as a proposal that is {status}")]
    HashTaken { status: ProposalStatus },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl Store {
    /// Requests waiting for a proposal and in none yet: all of them, once
    /// any is due. A group is planned whole; the due times only wake the planner.
    pub async fn requests_awaiting_proposal(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<super::ReplicaRequest>, sqlx::Error> {
        query_requests!(
            "SELECT ",
            " FROM replica_requests
             WHERE status = 'awaiting_proposal' AND proposal_id IS NULL
               AND EXISTS (SELECT 1 FROM replica_requests
                           WHERE status = 'awaiting_proposal' AND proposal_id IS NULL AND next_attempt_at <= $1)
             ORDER BY created_at",
            now,
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Requests on `chain_id` queued by `queued_by` that have not finished
    /// preparing: the batch being planned waits for them.
    pub async fn count_unprepared(
        &self,
        chain_id: i64,
        queued_by: DateTime<Utc>,
    ) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar!(
            r#"SELECT count(*) AS "count!" FROM replica_requests
             WHERE chain_id = $1 AND status IN ('queued', 'preparing') AND created_at <= $2"#,
            chain_id,
            queued_by,
        )
        .fetch_one(&self.pool)
        .await
    }

    pub async fn registrations_of(
        &self,
        request_ids: &[Uuid],
    ) -> Result<Vec<RequestRegistration>, sqlx::Error> {
        let rows = sqlx::query!(
            "SELECT request_id, app_id, kind, value FROM request_registrations
             WHERE request_id = ANY($1) ORDER BY request_id, kind, value",
            request_ids,
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| RequestRegistration {
                request_id: row.request_id,
                registration: registration(row.app_id, row.kind, row.value),
            })
            .collect())
    }

    /// Registrations already in an open proposal on `chain_id`, with that proposal.
    pub async fn open_registrations(
        &self,
        chain_id: i64,
    ) -> Result<Vec<(Uuid, StoredRegistration)>, sqlx::Error> {
        let calls = sqlx::query!(
            "SELECT c.proposal_id, c.app_id, c.kind, c.value FROM proposal_calls c
             JOIN proposals p ON p.id = c.proposal_id
             WHERE p.chain_id = $1 AND p.status = 'proposed'",
            chain_id,
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(calls
            .into_iter()
            .map(|c| (c.proposal_id, registration(c.app_id, c.kind, c.value)))
            .collect())
    }

    /// The highest nonce of the Safe's open proposals.
    pub async fn highest_open_nonce(
        &self,
        chain_id: i64,
        safe: &str,
    ) -> Result<Option<i64>, sqlx::Error> {
        highest_open_nonce(&self.pool, chain_id, safe).await
    }

    /// The lowest nonce at or above `onchain` that one of our own proposals
    /// took and gave up without executing (expired, refused, superseded), and
    /// that no open proposal holds: the Safe cannot move past it until some
    /// transaction uses it, so the next batch takes it. Safe{Wallet} then
    /// shows both at that nonce, and only one can execute.
    pub async fn reusable_nonce(
        &self,
        chain_id: i64,
        safe: &str,
        onchain: i64,
    ) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar!(
            "SELECT min(nonce) FROM proposals p
             WHERE chain_id = $1 AND safe = $2 AND nonce >= $3
               AND status IN ('failed', 'superseded') AND execution_tx_hash IS NULL
               AND NOT EXISTS (SELECT 1 FROM proposals o
                               WHERE o.chain_id = p.chain_id AND o.safe = p.safe AND o.nonce = p.nonce
                                 AND o.status = 'proposed')",
            chain_id,
            safe,
            onchain,
        )
        .fetch_one(&self.pool)
        .await
    }

    /// Stores a proposal and links its requests, under a per-Safe lock so two
    /// planners never take the same nonce: no open proposal of the Safe may
    /// hold `p.nonce`. With `fence`, the planner's job lease must still hold.
    ///
    /// The same calls at the same nonce hash alike. A stored proposal with
    /// that hash which ended without executing (it expired, or the service
    /// refused it, or the bridge gave up posting it) is still valid at the
    /// service, owners' confirmations and all: it is opened again, to be
    /// posted (or found at the service) once more, instead of stored twice.
    /// Returns the id of the proposal the requests are linked to.
    pub async fn insert_proposal(
        &self,
        p: &NewProposal,
        now: DateTime<Utc>,
        fence: Option<&JobLease>,
    ) -> Result<ProposalStored, ProposalConflict> {
        let mut tx = self.pool.begin().await?;
        if let Some(lease) = fence
            && !still_held(&mut tx, lease).await?
        {
            return Err(ProposalConflict::LeaseLost(lease.job.clone()));
        }
        // Held until commit: nonce allocation for one Safe is serialized.
        sqlx::query!(
            "SELECT pg_advisory_xact_lock(hashtextextended('safe-nonce:' || $1 || ':' || $2, 0))",
            p.chain_id.to_string(),
            p.safe,
        )
        .execute(&mut *tx)
        .await?;
        let taken: bool = sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM proposals
                            WHERE chain_id = $1 AND safe = $2 AND nonce = $3 AND status = 'proposed') AS "taken!""#,
            p.chain_id,
            p.safe,
            p.nonce,
        )
        .fetch_one(&mut *tx)
        .await?;
        if taken {
            let highest = highest_open_nonce(&mut *tx, p.chain_id, &p.safe).await?;
            return Err(ProposalConflict::NonceTaken {
                wanted: p.nonce,
                next: highest.unwrap_or(p.nonce) + 1,
            });
        }
        let same = sqlx::query!(
            "SELECT id, status, execution_tx_hash FROM proposals WHERE safe_tx_hash = $1 FOR UPDATE",
            p.safe_tx_hash,
        )
        .fetch_optional(&mut *tx)
        .await?;
        let same = match same {
            Some(old) => {
                let status: ProposalStatus = old
                    .status
                    .parse()
                    .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                Some((old.id, status, old.execution_tx_hash.is_some()))
            }
            None => None,
        };
        let stored = match same {
            None => {
                sqlx::query!(
                "INSERT INTO proposals (id, chain_id, safe, safe_version, nonce, safe_tx_hash, to_address, value, data,
                    operation, status, proposer, gas_estimate, next_attempt_at, created_at, updated_at, opened_at,
                    proposed_block, owners, threshold)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'proposed', $11, $12, $13, $13, $13, $13, $14, $15, $16)",
                p.id,
                p.chain_id,
                p.safe,
                p.safe_version,
                p.nonce,
                p.safe_tx_hash,
                p.to_address,
                p.value,
                p.data,
                p.operation,
                p.proposer,
                p.gas_estimate,
                now,
                p.proposed_block,
                &p.owners,
                p.threshold,
            )
            .execute(&mut *tx)
            .await?;
                for (position, call) in p.calls.iter().enumerate() {
                    sqlx::query!(
                    "INSERT INTO proposal_calls (proposal_id, position, app_id, kind, value) VALUES ($1, $2, $3, $4, $5)",
                    p.id,
                    position as i32,
                    call.app_id,
                    call.kind,
                    call.value,
                )
                .execute(&mut *tx)
                .await?;
                }
                ProposalStored::New(p.id)
            }
            Some((old, status, executed)) if status.may_reopen(executed) => {
                // Posted again from scratch: `submitted_at` is set anew once the
                // service has it, and the follower scans from today's head.
                sqlx::query!(
                    "UPDATE proposals SET status = 'proposed', submitted_at = NULL, next_attempt_at = $2,
                        opened_at = $2, updated_at = $2, proposed_block = $3, gas_estimate = $4, owners = $5,
                        threshold = $6, last_error_code = NULL, last_error_message = NULL,
                        watch_after_end = false, execution_block = NULL, execution_block_hash = NULL,
                        execution_success = NULL
                     WHERE id = $1",
                    old,
                    now,
                    p.proposed_block,
                    p.gas_estimate,
                    &p.owners,
                    p.threshold,
                )
                .execute(&mut *tx)
                .await?;
                ProposalStored::Reopened(old)
            }
            Some((_, status, _)) => return Err(ProposalConflict::HashTaken { status }),
        };
        let linked = sqlx::query!(
            "UPDATE replica_requests SET proposal_id = $1, safe = $2, updated_at = $4
             WHERE id = ANY($3) AND status = 'awaiting_proposal' AND proposal_id IS NULL",
            stored.id(),
            p.safe,
            &p.request_ids,
            now,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if linked != p.request_ids.len() as u64 {
            return Err(ProposalConflict::RequestsTaken);
        }
        tx.commit().await?;
        Ok(stored)
    }

    /// Links a waiting request to an open proposal that already carries what
    /// it needs; once that proposal is accepted, the request awaits approval.
    /// The proposal row is share-locked first: recording its submission (or
    /// its end) waits for this link, and a link made after it sees it.
    pub async fn join_open_proposal(
        &self,
        request_id: Uuid,
        proposal_id: Uuid,
        safe: &str,
        now: DateTime<Utc>,
        fence: Option<&JobLease>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        fence_tx(&mut tx, fence).await?;
        let open = sqlx::query!(
            "SELECT submitted_at, nonce, safe_tx_hash FROM proposals
             WHERE id = $1 AND status = 'proposed' FOR SHARE",
            proposal_id,
        )
        .fetch_optional(&mut *tx)
        .await?;
        // Ended meanwhile: the request stays unlinked and is planned afresh.
        let Some(open) = open else {
            return Ok(());
        };
        let (submitted_at, nonce, hash) = (open.submitted_at, open.nonce, open.safe_tx_hash);
        let linked = sqlx::query!(
            "UPDATE replica_requests SET proposal_id = $2, safe = $3, updated_at = $4
             WHERE id = $1 AND status = 'awaiting_proposal' AND proposal_id IS NULL",
            request_id,
            proposal_id,
            safe,
            now,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if linked == 1 && submitted_at.is_some() {
            let message = format!(
                "joined the open proposal {hash} (nonce {nonce}), which already registers what it needs"
            );
            advance_in(
                &mut tx,
                request_id,
                None,
                now,
                Status::AwaitingProposal,
                Event::Proposed,
                &Actor::Worker,
                Some(&message),
                Changes::default(),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Stored proposals the service has not accepted yet, due for a (re)post.
    pub async fn proposals_to_submit(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<ProposalRow>, sqlx::Error> {
        query_proposals!(
            "SELECT ",
            " FROM proposals
             WHERE status = 'proposed' AND submitted_at IS NULL AND next_attempt_at <= $1 ORDER BY created_at",
            now,
        )
        .fetch_all(&self.pool)
        .await
    }

    /// When the planner next has something due: a request waiting for its
    /// batch or its chain, or a stored proposal to post.
    pub async fn next_plan_due_at(&self) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        sqlx::query_scalar!(
            "SELECT min(due) FROM (
                SELECT next_attempt_at AS due FROM replica_requests
                WHERE status = 'awaiting_proposal' AND proposal_id IS NULL
                UNION ALL
                SELECT next_attempt_at FROM proposals WHERE status = 'proposed' AND submitted_at IS NULL
             ) due",
        )
        .fetch_one(&self.pool)
        .await
    }

    /// Proposals whose confirmations are due for a read: accepted ones still
    /// open and last read before `checked_before`, and ones that ended since
    /// `ended_since` and were not read after they ended (their final tally:
    /// the owners may confirm and execute between two reads).
    pub async fn proposals_to_check(
        &self,
        checked_before: DateTime<Utc>,
        ended_since: DateTime<Utc>,
    ) -> Result<Vec<ProposalRow>, sqlx::Error> {
        query_proposals!(
            "SELECT ",
            " FROM proposals
             WHERE submitted_at IS NOT NULL AND (
                (status = 'proposed' AND (checked_at IS NULL OR checked_at < $1))
                OR (status <> 'proposed' AND updated_at >= $2 AND (checked_at IS NULL OR checked_at < updated_at)))",
            checked_before,
            ended_since,
        )
        .fetch_all(&self.pool)
        .await
    }

    pub async fn proposals(&self, ids: &[Uuid]) -> Result<Vec<ProposalRow>, sqlx::Error> {
        query_proposals!("SELECT ", " FROM proposals WHERE id = ANY($1)", ids)
            .fetch_all(&self.pool)
            .await
    }

    /// The calls of the given proposals, in order.
    pub async fn proposal_calls(
        &self,
        ids: &[Uuid],
    ) -> Result<Vec<(Uuid, StoredRegistration)>, sqlx::Error> {
        let calls = sqlx::query!(
            "SELECT proposal_id, app_id, kind, value FROM proposal_calls WHERE proposal_id = ANY($1)
             ORDER BY proposal_id, position",
            ids,
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(calls
            .into_iter()
            .map(|c| (c.proposal_id, registration(c.app_id, c.kind, c.value)))
            .collect())
    }

    pub async fn proposal_by_hash(
        &self,
        safe_tx_hash: &str,
    ) -> Result<Option<ProposalRow>, sqlx::Error> {
        query_proposals!(
            "SELECT ",
            " FROM proposals WHERE safe_tx_hash = $1",
            safe_tx_hash
        )
        .fetch_optional(&self.pool)
        .await
    }

    /// The service accepted the proposal (or the chain is to tell what became
    /// of it): its requests now await the owners. The UPDATE locks the
    /// proposal row, so a request joining at the same time is either seen
    /// here or sees the submission itself.
    pub async fn mark_submitted(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        message: &str,
        fence: Option<&JobLease>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        fence_tx(&mut tx, fence).await?;
        let open = sqlx::query!(
            "UPDATE proposals SET submitted_at = COALESCE(submitted_at, $2), last_error_code = NULL,
                last_error_message = NULL, updated_at = $2
             WHERE id = $1 AND status = 'proposed'",
            id,
            now,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if open == 0 {
            return Ok(());
        }
        let waiting: Vec<Uuid> = sqlx::query_scalar!(
            "SELECT id FROM replica_requests WHERE proposal_id = $1 AND status = 'awaiting_proposal' FOR UPDATE",
            id,
        )
        .fetch_all(&mut *tx)
        .await?;
        for request in waiting {
            let changes = Changes::default();
            advance_in(
                &mut tx,
                request,
                None,
                now,
                Status::AwaitingProposal,
                Event::Proposed,
                &Actor::Worker,
                Some(message),
                changes,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A transient failure to post: keep the proposal, try again at `retry_at`.
    pub async fn proposal_retry_later(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        retry_at: DateTime<Utc>,
        error: &StoredError,
        fence: Option<&JobLease>,
    ) -> Result<(), StoreError> {
        let (job, holder, token) = JobLease::binds(fence);
        let rows = sqlx::query!(
            "UPDATE proposals SET next_attempt_at = $3, last_error_code = $4, last_error_message = $5, updated_at = $2
             WHERE id = $1 AND ($6::text IS NULL OR EXISTS (SELECT 1 FROM job_leases
                WHERE job = $6 AND holder = $7 AND token = $8 AND expires_at > now() FOR SHARE))",
            id,
            now,
            retry_at,
            error.code,
            clean(&error.message),
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

    /// The service refused the proposal, or the bridge gave up posting it:
    /// it fails, and so do its requests, each keeping the service's answer
    /// verbatim, in one transaction. `watch_after_end`: the service may hold
    /// it all the same (an answer was lost), so the follower watches for the
    /// owners executing it.
    pub async fn reject_proposal(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        error: &StoredError,
        watch_after_end: bool,
        fence: Option<&JobLease>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        fence_tx(&mut tx, fence).await?;
        let open = sqlx::query!(
            "UPDATE proposals SET status = 'failed', last_error_code = $3, last_error_message = $4, updated_at = $2,
                watch_after_end = $5
             WHERE id = $1 AND status = 'proposed'",
            id,
            now,
            error.code,
            clean(&error.message),
            watch_after_end,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if open == 0 {
            return Ok(());
        }
        let requests = sqlx::query!(
            "SELECT id, status FROM replica_requests WHERE proposal_id = $1 AND status IN ('awaiting_proposal', 'awaiting_approval')
             FOR UPDATE",
            id,
        )
        .fetch_all(&mut *tx)
        .await?;
        for row in requests {
            let request = row.id;
            let from: Status = row
                .status
                .parse()
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            let changes = Changes {
                error: Some(error.clone()),
                ..Changes::default()
            };
            advance_in(
                &mut tx,
                request,
                None,
                now,
                from,
                Event::Fail,
                &Actor::Worker,
                None,
                changes,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records the owners (lowercase) whose confirmation the Transaction
    /// Service holds, with the threshold and owners when known.
    pub async fn set_confirmations(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        confirmed_by: &[String],
        threshold: Option<i32>,
        owners: Option<&[String]>,
        fence: Option<&JobLease>,
    ) -> Result<(), StoreError> {
        let (job, holder, token) = JobLease::binds(fence);
        let rows = sqlx::query!(
            "UPDATE proposals SET confirmations = $3, confirmed_by = $4, threshold = COALESCE($5, threshold),
                owners = COALESCE($6, owners), checked_at = $2
             WHERE id = $1 AND ($7::text IS NULL OR EXISTS (SELECT 1 FROM job_leases
                WHERE job = $7 AND holder = $8 AND token = $9 AND expires_at > now() FOR SHARE))",
            id,
            now,
            confirmed_by.len() as i32,
            confirmed_by,
            threshold,
            owners,
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

    /// Records a read of confirmations that changed nothing, for many
    /// proposals in one statement.
    pub async fn mark_checked(
        &self,
        ids: &[Uuid],
        now: DateTime<Utc>,
        fence: Option<&JobLease>,
    ) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let (job, holder, token) = JobLease::binds(fence);
        let rows = sqlx::query!(
            "UPDATE proposals SET checked_at = $2 WHERE id = ANY($1)
               AND ($3::text IS NULL OR EXISTS (SELECT 1 FROM job_leases
                 WHERE job = $3 AND holder = $4 AND token = $5 AND expires_at > now() FOR SHARE))",
            ids,
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

    /// Puts waiting requests off until `until`, keeping `error` on them (or
    /// clearing it). No status changes: they wait for the batch window, or
    /// for a chain problem to pass.
    pub async fn defer_requests(
        &self,
        ids: &[Uuid],
        until: DateTime<Utc>,
        error: Option<&StoredError>,
        fence: Option<&JobLease>,
    ) -> Result<(), StoreError> {
        let (job, holder, token) = JobLease::binds(fence);
        let rows = sqlx::query!(
            "UPDATE replica_requests SET next_attempt_at = $2,
                last_error_code = $3, last_error_message = $4, last_error_suggestion = $5
             WHERE id = ANY($1) AND status = 'awaiting_proposal' AND proposal_id IS NULL
               AND ($6::text IS NULL OR EXISTS (SELECT 1 FROM job_leases
                 WHERE job = $6 AND holder = $7 AND token = $8 AND expires_at > now() FOR SHARE))",
            ids,
            until,
            error.map(|e| &e.code),
            error.map(|e| clean(&e.message)),
            error.and_then(|e| e.suggestion.as_ref()),
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
}

async fn highest_open_nonce<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    chain_id: i64,
    safe: &str,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT max(nonce) FROM proposals WHERE chain_id = $1 AND safe = $2 AND status = 'proposed'",
        chain_id,
        safe,
    )
    .fetch_one(executor)
    .await
}

/// A registration from its stored columns.
fn registration(app_id: String, kind: String, value: String) -> StoredRegistration {
    StoredRegistration {
        app_id,
        kind,
        value,
    }
}
