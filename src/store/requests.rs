//! The `replica_requests` table and its append-only `request_events` log.
//!
//! Every status change goes through [`crate::domain::next`] and writes its
//! event in the same transaction. Worker writes are fenced by the lease: a
//! worker whose lease expired, or was taken over, changes nothing.

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgTypeInfo, PgValueRef};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::lease::Lease;
use super::source_locks::{newest_token_of, release_source_lock};
use super::{Store, StoreError, WAKE_CHANNEL, clean};
use crate::domain::{Actor, ChangeKind, Event, Failure, Status, Transition, transition};

/// Statuses a worker acts on by itself. The others wait for the Safe flow,
/// or, in `provisioning`, for the replica tracker.
pub const WORKABLE: [Status; 3] = [Status::Queued, Status::Preparing, Status::Committing];

/// Which due requests a worker task claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Any workable request, the most overdue first.
    All,
    /// Only commits. A replica whose Safe transaction has executed waits
    /// for nothing else: not even a burst of queued requests ahead of it.
    Commits,
}

/// A request as stored. The commit token is deliberately absent: it is read
/// only by the commit step, through [`Store::commit_token`].
#[derive(Debug, Clone)]
pub struct ReplicaRequest {
    pub id: Uuid,
    pub status: StatusColumn,
    pub source: String,
    pub node: Option<String>,
    pub requested_compose_hash: Option<String>,
    pub env_names: Vec<String>,
    pub note: Option<String>,
    pub encrypted_env: Option<String>,
    pub created_by: String,
    pub source_vm_uuid: String,
    pub source_name: Option<String>,
    pub node_id: Option<i32>,
    pub node_name: Option<String>,
    pub kms_type: Option<String>,
    pub onchain_kms: bool,
    pub app_id: Option<String>,
    pub chain_id: Option<i64>,
    pub compose_hash: Option<String>,
    pub device_id: Option<String>,
    pub compose_hash_allowed: Option<bool>,
    pub device_id_allowed: Option<bool>,
    pub prepared_at: Option<DateTime<Utc>>,
    pub commit_tx_hash: Option<String>,
    pub call_sent_at: Option<DateTime<Utc>>,
    pub replica_vm_uuid: Option<String>,
    pub replica_status: Option<String>,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error_code: Option<String>,
    pub last_error_message: Option<String>,
    pub last_error_suggestion: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub proposal_id: Option<Uuid>,
    pub safe: Option<String>,
    pub workspace_slug: Option<String>,
    /// The app's instances just before the first unanswered create or commit.
    pub instances_before: Option<Vec<String>>,
    /// Since when the outcome of that call has been unknown.
    pub outcome_unknown_since: Option<DateTime<Utc>>,
    /// Until when a replica made by the last unanswered call may still be
    /// missing from Phala's instance list: nothing is sent again before.
    pub settles_at: Option<DateTime<Utc>>,
    /// When Phala refused a resend in a way the first call having taken effect
    /// explains: from then on the request only looks for its replica.
    pub first_call_took_effect_at: Option<DateTime<Utc>>,
    /// Other CVMs this request's calls may have created besides its replica.
    pub extra_replicas: Vec<String>,
    /// The target node's device as intake resolved it; the prepare must agree.
    pub expected_device_id: Option<String>,
    /// The `x-request-id` of the HTTP request that queued it, carried into
    /// the worker's spans.
    pub http_request_id: Option<String>,
    /// What the change changes: it decides the worker's Phala calls only
    /// (see `worker::change`).
    pub kind: ChangeKind,
}

/// `status` as read from the database (checked by a constraint there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusColumn(pub Status);

impl sqlx::Type<Postgres> for StatusColumn {
    fn type_info() -> PgTypeInfo {
        <str as sqlx::Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <str as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, Postgres> for StatusColumn {
    fn decode(value: PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let text = <&str as sqlx::Decode<Postgres>>::decode(value)?;
        Ok(StatusColumn(text.parse()?))
    }
}

/// `kind` is read from the database as the domain's type (the column is
/// checked by a constraint there).
impl sqlx::Type<Postgres> for ChangeKind {
    fn type_info() -> PgTypeInfo {
        <str as sqlx::Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <str as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, Postgres> for ChangeKind {
    fn decode(value: PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let text = <&str as sqlx::Decode<Postgres>>::decode(value)?;
        Ok(text.parse()?)
    }
}

impl ReplicaRequest {
    pub fn status(&self) -> Status {
        self.status.0
    }
}

/// `sqlx::query_as!` of [`ReplicaRequest`]s: the SQL is `$before`, every
/// column, then `$after`. The checked macros take only literals, so the one
/// list of columns lives here.
macro_rules! query_requests {
    ($before:literal, $after:literal $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            $crate::store::ReplicaRequest,
            $before
                + r#"id, status AS "status: crate::store::requests::StatusColumn", source, node,
    requested_compose_hash, env_names, note, encrypted_env, created_by, source_vm_uuid,
    source_name, node_id, node_name, kms_type, onchain_kms, app_id, chain_id, compose_hash,
    device_id, compose_hash_allowed, device_id_allowed, prepared_at, commit_tx_hash, call_sent_at,
    replica_vm_uuid, replica_status, attempts, next_attempt_at, last_error_code, last_error_message,
    last_error_suggestion, created_at, updated_at, proposal_id, safe, workspace_slug, instances_before,
    outcome_unknown_since, expected_device_id, http_request_id, settles_at, first_call_took_effect_at,
    extra_replicas, kind AS "kind: crate::domain::ChangeKind""#
                + $after
            $(, $arg)*
        )
    };
}
pub(super) use query_requests;

#[derive(Debug, Clone)]
pub struct EventRow {
    pub from_status: Option<String>,
    pub to_status: String,
    pub actor: String,
    pub message: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A request to insert, as intake resolved it.
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub id: Uuid,
    pub source: String,
    pub node: Option<String>,
    pub requested_compose_hash: Option<String>,
    pub env_names: Vec<String>,
    pub note: Option<String>,
    pub encrypted_env: Option<String>,
    pub source_vm_uuid: String,
    pub source_name: Option<String>,
    pub node_id: Option<i32>,
    pub node_name: Option<String>,
    pub kms_type: Option<String>,
    pub onchain_kms: bool,
    pub app_id: Option<String>,
    pub chain_id: Option<i64>,
    pub workspace_slug: Option<String>,
    pub expected_device_id: Option<String>,
    /// The `x-request-id` of the HTTP request that queued it.
    pub http_request_id: Option<String>,
}

/// An error as kept on the request: Phala's code (or ours), what happened, what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredError {
    pub code: String,
    pub message: String,
    pub suggestion: Option<String>,
}

impl StoredError {
    pub fn new(code: &str, message: &str, suggestion: Option<&str>) -> StoredError {
        StoredError {
            code: code.to_owned(),
            message: message.to_owned(),
            suggestion: suggestion.map(str::to_owned),
        }
    }

    /// A failure of the catalogue, with its suggestion.
    pub fn of(failure: Failure, message: &str) -> StoredError {
        StoredError::new(failure.code(), message, failure.suggestion())
    }

    /// A failure of the catalogue, where the case offers no suggestion.
    pub fn without_suggestion(failure: Failure, message: &str) -> StoredError {
        StoredError::new(failure.code(), message, None)
    }

    /// A failure of the catalogue, with a suggestion worded for the case.
    pub fn suggesting(failure: Failure, message: &str, suggestion: &str) -> StoredError {
        StoredError::new(failure.code(), message, Some(suggestion))
    }
}

/// What a successful prepare learned.
#[derive(Debug)]
pub struct PreparedFields {
    pub app_id: String,
    pub chain_id: Option<i64>,
    pub compose_hash: String,
    pub device_id: Option<String>,
    pub compose_hash_allowed: bool,
    pub device_id_allowed: bool,
    pub commit_token: SecretString,
    /// The node Phala chose for an order that left it to Phala ("Auto").
    pub placed_on: Option<crate::phala::ResolvedNode>,
}

/// Columns a transition sets besides the status.
#[derive(Debug, Default)]
pub struct Changes {
    pub prepared: Option<PreparedFields>,
    pub replica_vm_uuid: Option<String>,
    pub replica_status: Option<String>,
    /// Kept on the request (for `Fail`); other transitions clear the last error.
    pub error: Option<StoredError>,
    /// The transaction hash the commit sends (the Safe execution's).
    pub commit_tx_hash: Option<String>,
    /// CVMs besides the replica that the request's calls may have created.
    pub extra_replicas: Vec<String>,
}

/// How a request waits for the outcome of a create or commit whose answer
/// never came (see `worker::reconcile`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwaitedOutcome {
    /// When to look at Phala's instance list again.
    pub check_at: DateTime<Utc>,
    pub error: StoredError,
    /// Set when the call has just gone unanswered: until then its replica may
    /// still be missing from the list, so nothing is sent again.
    pub settles_at: Option<DateTime<Utc>>,
    /// Phala refused a resend in a way that the first call having taken
    /// effect explains: only look from now on.
    pub first_call_took_effect: bool,
}

#[derive(Debug, Clone)]
pub struct Claimed {
    pub request: ReplicaRequest,
    pub lease: Lease,
}

impl Store {
    /// The given requests, read inside the transaction that created them.
    pub async fn requests_in(
        tx: &mut Transaction<'_, Postgres>,
        ids: &[Uuid],
    ) -> Result<Vec<ReplicaRequest>, sqlx::Error> {
        query_requests!(
            "SELECT ",
            " FROM replica_requests WHERE id = ANY($1) ORDER BY id",
            ids
        )
        .fetch_all(&mut **tx)
        .await
    }

    pub async fn get_request(&self, id: Uuid) -> Result<Option<ReplicaRequest>, sqlx::Error> {
        query_requests!("SELECT ", " FROM replica_requests WHERE id = $1", id)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn events(&self, id: Uuid) -> Result<Vec<EventRow>, sqlx::Error> {
        sqlx::query_as!(
            EventRow,
            "SELECT from_status, to_status, actor, message, created_at FROM request_events
             WHERE request_id = $1 ORDER BY id",
            id,
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Cancels a request if its status allows it. `Ok(None)`: no such request.
    /// `Err(Illegal)`: too late to cancel. `Err(CallInFlight)`: a create is on
    /// its way to Phala (or its answer was lost), so a replica may exist.
    pub async fn cancel_request(
        &self,
        id: Uuid,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Option<ReplicaRequest>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let current = sqlx::query!(
            "SELECT status, call_sent_at FROM replica_requests WHERE id = $1 FOR UPDATE",
            id,
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some(current) = current else {
            return Ok(None);
        };
        let call_sent_at = current.call_sent_at;
        let from: Status = current
            .status
            .parse()
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        let to = transition(from, Event::Cancel)?;
        if call_sent_at.is_some() {
            return Err(StoreError::CallInFlight(id));
        }
        // Dropping the lease fences out a worker that is mid-step on this
        // request: its marker write (before any create) then fails.
        write_transition(&mut tx, id, to, &Changes::default(), now).await?;
        insert_event(&mut tx, id, Some(from), to.to, actor, None, now).await?;
        tx.commit().await?;
        Ok(self.get_request(id).await?)
    }

    /// Claims the most overdue request of `lane`: a short transaction that
    /// skips rows other workers hold. The lease runs on the database's clock,
    /// so workers on machines whose clocks disagree still fence each other.
    pub async fn claim_due(
        &self,
        now: DateTime<Utc>,
        lease_for: std::time::Duration,
        lane: Lane,
    ) -> Result<Option<Claimed>, sqlx::Error> {
        let lease_id = Uuid::new_v4();
        let lease_secs = lease_for.as_secs_f64();
        // The statuses are spelt out (they are [`WORKABLE`]), not passed as a
        // parameter: the claim-order indexes then serve even a generic plan,
        // and a claim stops at the first row it may take.
        let request: Option<ReplicaRequest> = match lane {
            Lane::All => {
                query_requests!(
                    "UPDATE replica_requests SET lease_id = $1, lease_expires_at = now() + make_interval(secs => $2)
                     WHERE id = (
                        SELECT id FROM replica_requests
                        WHERE status IN ('queued', 'preparing', 'committing') AND next_attempt_at <= $3
                          AND (lease_expires_at IS NULL OR lease_expires_at <= now())
                        ORDER BY next_attempt_at, created_at
                        LIMIT 1 FOR UPDATE SKIP LOCKED)
                     RETURNING ",
                    "",
                    lease_id,
                    lease_secs,
                    now,
                )
                .fetch_optional(&self.pool)
                .await?
            }
            Lane::Commits => {
                query_requests!(
                    "UPDATE replica_requests SET lease_id = $1, lease_expires_at = now() + make_interval(secs => $2)
                     WHERE id = (
                        SELECT id FROM replica_requests
                        WHERE status = 'committing' AND next_attempt_at <= $3
                          AND (lease_expires_at IS NULL OR lease_expires_at <= now())
                        ORDER BY next_attempt_at, created_at
                        LIMIT 1 FOR UPDATE SKIP LOCKED)
                     RETURNING ",
                    "",
                    lease_id,
                    lease_secs,
                    now,
                )
                .fetch_optional(&self.pool)
                .await?
            }
        };
        Ok(request.map(|request| Claimed {
            lease: Lease {
                request_id: request.id,
                lease_id,
            },
            request,
        }))
    }

    /// Extends a lease that is still held: a long step's heartbeat. `false`
    /// when the lease was lost, so the step must stop writing.
    pub async fn renew_lease(
        &self,
        lease: &Lease,
        lease_for: std::time::Duration,
    ) -> Result<bool, sqlx::Error> {
        let renewed = sqlx::query!(
            "UPDATE replica_requests SET lease_expires_at = now() + make_interval(secs => $3)
             WHERE id = $1 AND lease_id = $2 AND lease_expires_at > now()",
            lease.request_id,
            lease.lease_id,
            lease_for.as_secs_f64(),
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(renewed == 1)
    }

    /// Gives a lease back without changing anything else (a worker shutting
    /// down before its step ran), so another worker may claim the row at once.
    pub async fn release_lease(&self, lease: &Lease) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "UPDATE replica_requests SET lease_id = NULL, lease_expires_at = NULL
             WHERE id = $1 AND lease_id = $2",
            lease.request_id,
            lease.lease_id,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Moves a leased request on by `event`, sets `changes`, records the event,
    /// and releases the lease, all in one transaction.
    #[allow(clippy::too_many_arguments)]
    pub async fn advance(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        from: Status,
        event: Event,
        actor: &Actor,
        message: Option<&str>,
        changes: Changes,
    ) -> Result<Status, StoreError> {
        let mut tx = self.pool.begin().await?;
        let to = advance_in(
            &mut tx,
            lease.request_id,
            Some(lease.lease_id),
            now,
            from,
            event,
            actor,
            message,
            changes,
        )
        .await?;
        tx.commit().await?;
        Ok(to)
    }

    /// Records a transient failure: one more attempt spent, the error kept,
    /// the next try at `retry_at`. The status does not change.
    pub async fn retry_later(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        status: Status,
        error: &StoredError,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let message = format!(
            "{} (retrying at {})",
            error.message,
            retry_at.format("%Y-%m-%d %H:%M:%S UTC")
        );
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query!(
            "UPDATE replica_requests SET attempts = attempts + 1, next_attempt_at = $4,
                last_error_code = $5, last_error_message = $6, last_error_suggestion = $7,
                lease_id = NULL, lease_expires_at = NULL, updated_at = $3
             WHERE id = $1 AND lease_id = $2 AND lease_expires_at > now()",
            lease.request_id,
            lease.lease_id,
            now,
            retry_at,
            error.code,
            clean(&error.message),
            error.suggestion,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        held(tx, lease, updated, now, status, &message).await
    }

    /// Waits without spending an attempt: release the lease until `until`.
    pub async fn snooze(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let updated = sqlx::query!(
            "UPDATE replica_requests SET next_attempt_at = $4, lease_id = NULL, lease_expires_at = NULL, updated_at = $3
             WHERE id = $1 AND lease_id = $2 AND lease_expires_at > now()",
            lease.request_id,
            lease.lease_id,
            now,
            until,
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        fenced(lease, updated)
    }

    /// Marks that a call whose success cannot be repeated (a direct replicate,
    /// a commit) is about to be sent, so that a crash cannot send it twice.
    /// `instances` is the app's instance list just before the first such call;
    /// a later retry of the same call keeps the first list.
    pub async fn mark_call_sent(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        instances: &[String],
    ) -> Result<(), StoreError> {
        let updated = sqlx::query!(
            "UPDATE replica_requests SET call_sent_at = $3, instances_before = COALESCE(instances_before, $4),
                settles_at = NULL, updated_at = $3
             WHERE id = $1 AND lease_id = $2 AND lease_expires_at > now()",
            lease.request_id,
            lease.lease_id,
            now,
            instances,
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        fenced(lease, updated)
    }

    /// Clears the marker once Phala answered with a refusal: nothing was created.
    pub async fn clear_call_sent(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let updated = sqlx::query!(
            "UPDATE replica_requests SET call_sent_at = NULL, instances_before = NULL, outcome_unknown_since = NULL,
                settles_at = NULL, first_call_took_effect_at = NULL, updated_at = $3
             WHERE id = $1 AND lease_id = $2 AND lease_expires_at > now()",
            lease.request_id,
            lease.lease_id,
            now,
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        fenced(lease, updated)
    }

    /// The outcome of the marked call is unknown: keep the marker (and the
    /// source lock), record why, and look for the replica at `check_at`. No
    /// attempt is spent: an unknown outcome has its own bound.
    pub async fn await_outcome(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        status: Status,
        wait: &AwaitedOutcome,
    ) -> Result<(), StoreError> {
        let AwaitedOutcome {
            check_at,
            error,
            settles_at,
            first_call_took_effect,
        } = wait;
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query!(
            "UPDATE replica_requests SET outcome_unknown_since = COALESCE(outcome_unknown_since, $3),
                next_attempt_at = $4,
                last_error_code = $5, last_error_message = $6, last_error_suggestion = $7,
                settles_at = COALESCE($8, settles_at),
                first_call_took_effect_at = CASE WHEN $9 THEN COALESCE(first_call_took_effect_at, $3)
                    ELSE first_call_took_effect_at END,
                lease_id = NULL, lease_expires_at = NULL, updated_at = $3
             WHERE id = $1 AND lease_id = $2 AND lease_expires_at > now() AND call_sent_at IS NOT NULL",
            lease.request_id,
            lease.lease_id,
            now,
            check_at,
            error.code,
            clean(&error.message),
            error.suggestion,
            *settles_at,
            first_call_took_effect,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        held(tx, lease, updated, now, status, &error.message).await
    }

    /// Which of `vm_uuids` (lowercase, no dashes) some other request already
    /// owns as its replica.
    pub async fn replicas_owned_by_others(
        &self,
        me: Uuid,
        vm_uuids: &[String],
    ) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar!(
            r#"SELECT replica_vm_uuid AS "replica_vm_uuid!" FROM replica_requests
             WHERE replace(lower(replica_vm_uuid), '-', '') = ANY($2) AND id <> $1"#,
            me,
            vm_uuids,
        )
        .fetch_all(&self.pool)
        .await
    }

    /// The requests of `app_id` (with or without `0x`) on `node_id` whose
    /// create or commit has no known outcome and no replica yet, the earliest
    /// sent first: they compete for the same new instances.
    pub async fn unanswered_calls_on(
        &self,
        app_id: &str,
        node_id: Option<i32>,
    ) -> Result<Vec<Uuid>, sqlx::Error> {
        sqlx::query_scalar!(
            "SELECT id FROM replica_requests
             WHERE lower(replace(app_id, '0x', '')) = lower(replace($1, '0x', ''))
               AND node_id IS NOT DISTINCT FROM $2
               AND call_sent_at IS NOT NULL AND replica_vm_uuid IS NULL
               AND status IN ('preparing', 'committing')
             ORDER BY call_sent_at, id",
            app_id,
            node_id,
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Sets the transaction hash the next commit sends.
    pub async fn set_commit_tx_hash(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        tx_hash: &str,
    ) -> Result<(), StoreError> {
        let updated = sqlx::query!(
            "UPDATE replica_requests SET commit_tx_hash = $4, updated_at = $3
             WHERE id = $1 AND lease_id = $2 AND lease_expires_at > now()",
            lease.request_id,
            lease.lease_id,
            now,
            tx_hash,
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        fenced(lease, updated)
    }

    /// When the request last entered `status` (for timeouts measured per status).
    pub async fn entered_status_at(
        &self,
        id: Uuid,
        status: Status,
    ) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        sqlx::query_scalar!(
            "SELECT max(created_at) FROM request_events
             WHERE request_id = $1 AND to_status = $2 AND from_status IS DISTINCT FROM to_status",
            id,
            status.as_str(),
        )
        .fetch_one(&self.pool)
        .await
    }

    /// How often the request has gone from `from` to `to`.
    pub async fn count_transitions(
        &self,
        id: Uuid,
        from: Status,
        to: Status,
    ) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar!(
            r#"SELECT count(*) AS "count!" FROM request_events WHERE request_id = $1 AND from_status = $2 AND to_status = $3"#,
            id,
            from.as_str(),
            to.as_str(),
        )
        .fetch_one(&self.pool)
        .await
    }

    /// The earliest time something of `lane` becomes due, to sleep until
    /// then. For [`Lane::All`] that is a workable request, a request waiting
    /// for its batch or a proposal to post. Rows a step holds are left out:
    /// their step moves them on, and the rare lease that runs out (a
    /// crashed worker) is found by the poll interval.
    pub async fn next_due_at(&self, lane: Lane) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        match lane {
            Lane::All => {
                sqlx::query_scalar!(
                    "SELECT min(due) FROM (
                        (SELECT next_attempt_at AS due FROM replica_requests
                         WHERE status IN ('queued', 'preparing', 'committing')
                           AND (lease_expires_at IS NULL OR lease_expires_at <= now())
                         ORDER BY next_attempt_at, created_at LIMIT 1)
                        UNION ALL
                        SELECT next_attempt_at FROM replica_requests
                        WHERE status = 'awaiting_proposal' AND proposal_id IS NULL
                        UNION ALL
                        SELECT next_attempt_at FROM proposals WHERE status = 'proposed' AND submitted_at IS NULL
                     ) due"
                )
                .fetch_one(&self.pool)
                .await
            }
            Lane::Commits => {
                sqlx::query_scalar!(
                    "SELECT next_attempt_at FROM replica_requests
                     WHERE status = 'committing'
                       AND (lease_expires_at IS NULL OR lease_expires_at <= now())
                     ORDER BY next_attempt_at, created_at LIMIT 1"
                )
                .fetch_optional(&self.pool)
                .await
            }
        }
    }

    /// The commit token, read only by the step that sends it.
    pub async fn commit_token(&self, lease: &Lease) -> Result<Option<SecretString>, StoreError> {
        let token = sqlx::query_scalar!(
            "SELECT commit_token FROM replica_requests WHERE id = $1 AND lease_id = $2 AND lease_expires_at > now()",
            lease.request_id,
            lease.lease_id,
        )
        .fetch_optional(&self.pool)
        .await?;
        match token {
            None => Err(StoreError::LeaseLost(lease.request_id)),
            Some(token) => Ok(token.map(SecretString::from)),
        }
    }
}

/// The end of an update guarded by the lease: it must have changed the row.
fn fenced(lease: &Lease, updated: u64) -> Result<(), StoreError> {
    if updated == 0 {
        return Err(StoreError::LeaseLost(lease.request_id));
    }
    Ok(())
}

/// The end of a hold (a retry or an awaited outcome) whose guarded update
/// changed `updated` rows: the request stays in `status` with an event
/// saying why, all in the update's transaction.
async fn held(
    mut tx: Transaction<'_, Postgres>,
    lease: &Lease,
    updated: u64,
    now: DateTime<Utc>,
    status: Status,
    message: &str,
) -> Result<(), StoreError> {
    fenced(lease, updated)?;
    insert_event(
        &mut tx,
        lease.request_id,
        Some(status),
        status,
        &Actor::Worker,
        Some(message),
        now,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The one path behind every worker or follower status change: computes the
/// transition with [`transition`], writes it with its effects, records the
/// event, all in the caller's transaction.
/// `lease_id`: the worker's lease, or `None` for a request no worker holds.
#[allow(clippy::too_many_arguments)]
pub(super) async fn advance_in(
    tx: &mut Transaction<'_, Postgres>,
    request_id: Uuid,
    lease_id: Option<Uuid>,
    now: DateTime<Utc>,
    from: Status,
    event: Event,
    actor: &Actor,
    message: Option<&str>,
    changes: Changes,
) -> Result<Status, StoreError> {
    let to = transition(from, event)?;
    // Fenced: the status is still `from`, and the caller holds the lease (or
    // nobody does). Locks the row for the write below.
    let fenced = sqlx::query_scalar!(
        "SELECT id FROM replica_requests WHERE id = $1 AND status = $2 AND CASE
            WHEN $3::uuid IS NULL THEN lease_expires_at IS NULL OR lease_expires_at <= now()
            ELSE lease_id = $3 AND lease_expires_at > now() END
         FOR UPDATE",
        request_id,
        from.as_str(),
        lease_id,
    )
    .fetch_optional(&mut **tx)
    .await?;
    if fenced.is_none() {
        return Err(StoreError::LeaseLost(request_id));
    }
    write_transition(tx, request_id, to, &changes, now).await?;
    if let Some(prepared) = &changes.prepared {
        record_registrations(tx, request_id, prepared).await?;
        newest_token_of(tx, request_id).await?;
    }
    let message = message.or(changes.error.as_ref().map(|e| e.message.as_str()));
    insert_event(tx, request_id, Some(from), to.to, actor, message, now).await?;
    // The tracker wakes too when a replica starts provisioning.
    if WORKABLE.contains(&to.to) || to.to == Status::Provisioning {
        wake(tx).await?;
    }
    Ok(to.to)
}

/// Writes a transition's status, its effects and `changes`, and releases the
/// lease. Every status change ends here. Any pending-call marker goes too: a
/// request only moves on once the call's outcome is known.
async fn write_transition(
    tx: &mut Transaction<'_, Postgres>,
    request_id: Uuid,
    transition: Transition,
    changes: &Changes,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let Transition { to, effects } = transition;
    let prepared = changes.prepared.as_ref();
    let placed_on = prepared.and_then(|p| p.placed_on.as_ref());
    sqlx::query!(
        "UPDATE replica_requests SET
            status = $2,
            app_id = COALESCE($4, app_id),
            chain_id = COALESCE($5, chain_id),
            compose_hash = COALESCE($6, compose_hash),
            device_id = COALESCE($7, device_id),
            compose_hash_allowed = COALESCE($8, compose_hash_allowed),
            device_id_allowed = COALESCE($9, device_id_allowed),
            commit_token = CASE WHEN $10 THEN NULL ELSE COALESCE($11, commit_token) END,
            prepared_at = CASE WHEN $11::text IS NULL THEN prepared_at ELSE $3 END,
            replica_vm_uuid = COALESCE($12, replica_vm_uuid),
            replica_status = COALESCE($13, replica_status),
            call_sent_at = NULL,
            instances_before = NULL,
            outcome_unknown_since = NULL,
            settles_at = NULL,
            first_call_took_effect_at = NULL,
            extra_replicas = extra_replicas || $20,
            node_id = COALESCE($21, node_id),
            node_name = COALESCE($22, node_name),
            expected_device_id = COALESCE($23, expected_device_id),
            proposal_id = CASE WHEN $17 THEN NULL ELSE proposal_id END,
            commit_tx_hash = CASE WHEN $18 THEN NULL ELSE COALESCE($19, commit_tx_hash) END,
            last_error_code = $14,
            last_error_message = $15,
            last_error_suggestion = $16,
            attempts = 0,
            next_attempt_at = $3,
            lease_id = NULL,
            lease_expires_at = NULL,
            updated_at = $3
         WHERE id = $1",
        request_id,
        to.as_str(),
        now,
        prepared.map(|p| &p.app_id),
        prepared.and_then(|p| p.chain_id),
        prepared.map(|p| &p.compose_hash),
        prepared.and_then(|p| p.device_id.as_ref()),
        prepared.map(|p| p.compose_hash_allowed),
        prepared.map(|p| p.device_id_allowed),
        effects.clear_commit_token,
        prepared.map(|p| p.commit_token.expose_secret()),
        changes.replica_vm_uuid,
        changes.replica_status,
        changes.error.as_ref().map(|e| &e.code),
        changes.error.as_ref().map(|e| clean(&e.message)),
        changes.error.as_ref().and_then(|e| e.suggestion.as_ref()),
        effects.detach_proposal,
        effects.clear_commit_tx_hash,
        changes.commit_tx_hash,
        &changes.extra_replicas,
        placed_on.map(|n| n.id as i32),
        placed_on.map(|n| &n.name),
        placed_on.and_then(|n| n.device_id.as_ref()),
    )
    .execute(&mut **tx)
    .await?;
    // The team hears of it exactly when it is written.
    super::outbox::record(tx, request_id, to, now).await?;
    if effects.release_source_lock && release_source_lock(tx, request_id, now).await? {
        wake(tx).await?;
    }
    Ok(())
}

/// Keeps what the prepared replica needs allowed on the DstackApp (its
/// compose hash and, when known, its device), replacing earlier ones. All of
/// them, whatever Phala's `onchain_status` said: the planner and the follower
/// check each against the chain, and commit only once all are allowed at
/// confirmed depth.
async fn record_registrations(
    tx: &mut Transaction<'_, Postgres>,
    request_id: Uuid,
    prepared: &PreparedFields,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "DELETE FROM request_registrations WHERE request_id = $1",
        request_id
    )
    .execute(&mut **tx)
    .await?;
    let mut needed = vec![("compose_hash", prepared.compose_hash.clone())];
    if let Some(device) = &prepared.device_id {
        needed.push(("device", device.clone()));
    }
    for (kind, value) in needed {
        sqlx::query!(
            "INSERT INTO request_registrations (request_id, app_id, kind, value) VALUES ($1, $2, $3, $4)",
            request_id,
            prepared.app_id,
            kind,
            value,
        )
        .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

async fn insert_event(
    tx: &mut Transaction<'_, Postgres>,
    request_id: Uuid,
    from: Option<Status>,
    to: Status,
    actor: &Actor,
    message: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "INSERT INTO request_events (request_id, from_status, to_status, actor, message, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
        request_id,
        from.map(Status::as_str),
        to.as_str(),
        actor.label(),
        message.map(clean),
        now,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Delivered at commit, so a worker never wakes before the row is visible.
pub(super) async fn wake(tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
    sqlx::query!("SELECT pg_notify($1, '')", WAKE_CHANNEL)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_claim_queries_spell_out_the_workable_statuses() {
        // The claims, the idle wait and the claim-order index's predicate
        // name these statuses literally: change them together.
        assert_eq!(
            WORKABLE.map(Status::as_str),
            ["queued", "preparing", "committing"]
        );
    }
}
