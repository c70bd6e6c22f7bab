//! Postgres access. This module is the only place with SQL.

mod decode;
mod follower;
mod gauges;
mod idempotency;
mod job_leases;
mod lease;
mod orders;
mod outbox;
mod proposal_facts;
mod proposals;
mod request_filters;
mod requests;
mod retention;
mod safe_queue;
mod source_locks;
mod tracking;
mod web_sessions;

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

/// How a proposal ends is a domain rule; `end_proposal` takes it here.
pub use crate::domain::ProposalEnd;
pub use follower::{Cursor, LateExecution, RequestMove};
pub use gauges::QueueGauges;
pub use idempotency::{IdempotencyOutcome, RequestHasher, StoredResponse};
pub use job_leases::{Acquired, JobLease};
pub use lease::Lease;
pub use orders::{IdempotencyKey, LostCommit, Order, QUOTA_WINDOW, QuotaUsed, Stored};
pub use outbox::{DueDelivery, PendingNotification};
pub use proposal_facts::{AppFacts, CvmFacts, NodeFacts, ProposalFacts};
pub use proposals::{
    NewProposal, ProposalConflict, ProposalRow, ProposalStored, RequestRegistration,
    StoredRegistration,
};
pub use request_filters::{Reach, RequestFilter, same_hex};
/// For tests elsewhere in the crate that build a [`ReplicaRequest`] by hand.
#[cfg(test)]
pub(crate) use requests::StatusColumn;
pub use requests::{
    AwaitedOutcome, Changes, Claimed, EventRow, Lane, NewRequest, PreparedFields, ReplicaRequest,
    StoredError, WORKABLE,
};
pub use retention::Purged;
pub use safe_queue::{QueueEntry, Withdrawn};
pub use tracking::Tracked;
pub use web_sessions::WebSession;

use crate::config::DatabaseSettings;

/// Stored text with credentials removed: error messages may quote a client
/// error, and client errors quote URLs that may carry API keys.
fn clean(text: &str) -> String {
    crate::telemetry::redact(text).into_owned()
}

/// The channel workers LISTEN on; a notification means "a request became due".
pub const WAKE_CHANNEL: &str = "approval_bridge_wake";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The pool. Every connection carries the bounds of [`DatabaseSettings`]
/// (statement, lock and idle-transaction timeouts, TCP keepalives), so one
/// stuck transaction cannot stall intake or the workers for longer.
pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(settings.connect_options())
        .await
        .context("cannot connect to Postgres (check DATABASE_URL and that the server is running)")
}

/// Applies the migrations on a connection of their own, without the pool's
/// statement and lock timeouts: a migration may rewrite a large table, and
/// waits its turn behind another process's migration.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    let unbounded = (*pool.connect_options())
        .clone()
        .options([("statement_timeout", "0"), ("lock_timeout", "0")]);
    let mut conn = PgConnection::connect_with(&unbounded)
        .await
        .context("cannot connect to Postgres to apply the migrations")?;
    let applied = MIGRATOR
        .run(&mut conn)
        .await
        .context("cannot apply the database migrations");
    let _ = conn.close().await;
    applied
}

/// Expected store failures; anything else is an `anyhow` error with context.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The lease expired or another worker took the row: this worker must stop.
    #[error("the lease on request {0} was lost")]
    LeaseLost(uuid::Uuid),
    /// A Safe-flow job's lease (see `job_leases`) ended, or another process
    /// took the job: the write changed nothing, and the pass must stop.
    #[error("the lease on the Safe-flow job {0} was lost; the write was refused")]
    JobLost(String),
    #[error(transparent)]
    Illegal(#[from] crate::domain::IllegalTransition),
    /// A create or commit for the request is on its way to Phala, or its
    /// answer was lost: the request cannot be cancelled until that is known.
    #[error("a create call for request {0} is in flight")]
    CallInFlight(uuid::Uuid),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A database failure that is no bug: a bound of the connection ran out, or
/// the database could not be reached. What the statement would have written
/// was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    /// `lock_timeout`: another transaction held a lock the statement needed.
    LockTimeout,
    /// `statement_timeout`: the statement ran past its time.
    StatementTimeout,
    /// No connection could be had, or it broke.
    Unavailable,
}

impl StoreError {
    /// The lost job, if `err` is (or was caused by) a write refused by its fence.
    pub fn job_lost(err: &anyhow::Error) -> Option<&str> {
        err.chain()
            .find_map(|cause| match cause.downcast_ref::<StoreError>() {
                Some(StoreError::JobLost(job)) => Some(job.as_str()),
                _ => match cause.downcast_ref::<proposals::ProposalConflict>() {
                    Some(proposals::ProposalConflict::LeaseLost(job)) => Some(job.as_str()),
                    _ => None,
                },
            })
    }
}

impl Trouble {
    /// The trouble anywhere in `err`'s chain, if it is one.
    pub fn of(err: &anyhow::Error) -> Option<Trouble> {
        err.chain().find_map(|cause| {
            let sqlx = cause.downcast_ref::<sqlx::Error>().or_else(|| {
                match cause.downcast_ref::<StoreError>() {
                    Some(StoreError::Database(err)) => Some(err),
                    _ => None,
                }
            })?;
            Trouble::of_sqlx(sqlx)
        })
    }

    pub fn of_sqlx(err: &sqlx::Error) -> Option<Trouble> {
        match err {
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("55P03") => Some(Trouble::LockTimeout),
                Some("57014") => Some(Trouble::StatementTimeout),
                // Shut down, starting up, too many connections, or the session
                // ended by `idle_in_transaction_session_timeout`.
                Some("57P01" | "57P02" | "57P03" | "53300" | "25P03") => Some(Trouble::Unavailable),
                _ => None,
            },
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::WorkerCrashed => Some(Trouble::Unavailable),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Store { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The database's clock, which every process shares (see [`crate::clock`]).
    pub async fn database_now(&self) -> Result<chrono::DateTime<chrono::Utc>, sqlx::Error> {
        sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
            .fetch_one(&self.pool)
            .await
    }

    /// The database answers a query (the health check).
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query!("SELECT 1 AS one")
            .fetch_one(&self.pool)
            .await?;
        Ok(())
    }
}
