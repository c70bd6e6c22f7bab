//! Postgres access. This module is the only place with SQL.

mod follower;
mod gauges;
mod idempotency;
mod job_leases;
mod orders;
mod outbox;
mod proposal_facts;
mod proposals;
mod request_filters;
mod requests;
mod retention;
mod source_locks;
mod tracking;
mod web_sessions;

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

pub use follower::{Cursor, ProposalEnd, RequestMove};
pub use gauges::QueueGauges;
pub use idempotency::{IdempotencyOutcome, StoredResponse};
pub use job_leases::{Acquired, JobLease};
pub use orders::{IdempotencyKey, Order, QUOTA_WINDOW, Stored};
pub use outbox::{DueDelivery, PendingNotification};
pub use proposal_facts::{AppFacts, CvmFacts, NodeFacts, ProposalFacts, same_hex};
pub use proposals::{
    NewProposal, ProposalConflict, ProposalRow, ProposalStored, RequestRegistration,
    StoredRegistration,
};
pub use request_filters::RequestFilter;
pub use requests::{
    AwaitedOutcome, Changes, Claimed, EventRow, Lane, Lease, NewRequest, PreparedFields,
    ReplicaRequest, StoredError, WORKABLE,
};
pub use retention::Purged;
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

pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(settings.connect_options())
        .await
        .context("cannot connect to Postgres (check DATABASE_URL and that the server is running)")
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("cannot apply the database migrations")
}

/// Expected store failures; anything else is an `anyhow` error with context.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The lease expired or another worker took the row: this worker must stop.
    #[error("the lease on request {0} was lost")]
    LeaseLost(uuid::Uuid),
    #[error(transparent)]
    Illegal(#[from] crate::domain::IllegalTransition),
    /// A create or commit for the request is on its way to Phala, or its
    /// answer was lost: the request cannot be cancelled until that is known.
    #[error("a create call for request {0} is in flight")]
    CallInFlight(uuid::Uuid),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
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

    /// The database answers a query (the health check).
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query!("SELECT 1 AS one")
            .fetch_one(&self.pool)
            .await?;
        Ok(())
    }
}
