//! `job_leases`: who runs each Safe-flow job (a planner per Safe, a follower
//! per chain). A holder renews its lease by heartbeat; once it stops, the
//! lease expires and another process takes the job with a higher token.
//! Every time is the database's `now()`, never a process clock.
//!
//! Fencing: every write a holder makes carries its [`JobLease`] and checks
//! it in the same statement, so a holder that was paused past its lease (a
//! stopped process, a long GC-like stall, a lost network) and wakes up to
//! finish a pass changes nothing. A single-statement write adds
//!
//! ```sql
//! AND ($j::text IS NULL OR EXISTS (SELECT 1 FROM job_leases
//!      WHERE job = $j AND holder = $h AND token = $t AND expires_at > now() FOR SHARE))
//! ```
//!
//! (all three NULL for an unfenced write: tests that drain by hand). A
//! write of several statements starts its transaction with [`still_held`].
//! Either way the lease row stays share-locked until the write commits, so
//! a takeover (an UPDATE of that row) waits for the write, or the write
//! sees the takeover and changes nothing. A fenced write that changed
//! nothing is then told apart from one whose row had moved on with
//! [`Store::fenced`]; a lost lease is [`StoreError::JobLost`], and the
//! pass stops there (see `worker::owner`).

use std::time::Duration;

use uuid::Uuid;

use super::{Store, StoreError};

/// A held job: the proof to renew, release, or fence a write with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobLease {
    pub job: String,
    pub holder: Uuid,
    /// Grows at every change of holder.
    pub token: i64,
}

impl JobLease {
    /// The three binds of a fenced statement, all `None` without a fence.
    pub(super) fn binds(fence: Option<&JobLease>) -> (Option<&str>, Option<Uuid>, Option<i64>) {
        match fence {
            Some(lease) => (Some(&lease.job), Some(lease.holder), Some(lease.token)),
            None => (None, None, None),
        }
    }
}

/// The answer to [`Store::acquire_job`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    Held(JobLease),
    /// Another holder's lease runs for this long yet.
    Busy {
        expires_in: Duration,
    },
}

impl Store {
    /// Takes `job` for `holder` for `lease`, if it is free, expired, or
    /// already `holder`'s.
    pub async fn acquire_job(
        &self,
        job: &str,
        holder: Uuid,
        lease: Duration,
    ) -> Result<Acquired, sqlx::Error> {
        let token = sqlx::query_scalar!(
            "INSERT INTO job_leases AS l (job, holder, token, expires_at, updated_at)
             VALUES ($1, $2, 1, now() + make_interval(secs => $3), now())
             ON CONFLICT (job) DO UPDATE SET
                holder = EXCLUDED.holder,
                token = l.token + 1,
                expires_at = EXCLUDED.expires_at,
                updated_at = now()
             WHERE l.expires_at <= now() OR l.holder = EXCLUDED.holder
             RETURNING token",
            job,
            holder,
            lease.as_secs_f64(),
        )
        .fetch_optional(&self.pool)
        .await?;
        if let Some(token) = token {
            return Ok(Acquired::Held(JobLease {
                job: job.to_owned(),
                holder,
                token,
            }));
        }
        let seconds = sqlx::query_scalar!(
            r#"SELECT COALESCE(GREATEST(extract(epoch FROM expires_at - now())::float8, 0), 0) AS "seconds!"
             FROM job_leases WHERE job = $1"#,
            job,
        )
        .fetch_optional(&self.pool)
        .await?
        .unwrap_or(0.0);
        Ok(Acquired::Busy {
            expires_in: Duration::from_secs_f64(seconds),
        })
    }

    /// Extends the lease. `false`: another holder took the job.
    pub async fn renew_job(
        &self,
        lease: &JobLease,
        duration: Duration,
    ) -> Result<bool, sqlx::Error> {
        let renewed = sqlx::query!(
            "UPDATE job_leases SET expires_at = now() + make_interval(secs => $4), updated_at = now()
             WHERE job = $1 AND holder = $2 AND token = $3",
            lease.job,
            lease.holder,
            lease.token,
            duration.as_secs_f64(),
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(renewed == 1)
    }

    /// Gives the job up at once, so that another process need not wait for
    /// the lease to run out.
    pub async fn release_job(&self, lease: &JobLease) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "UPDATE job_leases SET expires_at = now(), updated_at = now()
             WHERE job = $1 AND holder = $2 AND token = $3",
            lease.job,
            lease.holder,
            lease.token,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

impl Store {
    /// `true` while `lease` still holds its job.
    pub async fn job_held(&self, lease: &JobLease) -> Result<bool, sqlx::Error> {
        let held = sqlx::query_scalar!(
            r#"SELECT 1 AS "held!" FROM job_leases
             WHERE job = $1 AND holder = $2 AND token = $3 AND expires_at > now()"#,
            lease.job,
            lease.holder,
            lease.token,
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(held.is_some())
    }

    /// After a fenced single-statement write that changed `rows` rows: a
    /// write that changed nothing because the lease is lost is
    /// [`StoreError::JobLost`]; one whose rows had moved on is `Ok(0)`.
    pub(super) async fn fenced(
        &self,
        fence: Option<&JobLease>,
        rows: u64,
    ) -> Result<u64, StoreError> {
        match fence {
            Some(lease) if rows == 0 && !self.job_held(lease).await? => {
                Err(StoreError::JobLost(lease.job.clone()))
            }
            _ => Ok(rows),
        }
    }
}

/// The first statement of a fenced transaction: [`StoreError::JobLost`]
/// unless `fence` still holds its job (nothing to check without one).
pub(super) async fn fence_tx(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    fence: Option<&JobLease>,
) -> Result<(), StoreError> {
    match fence {
        Some(lease) if !still_held(tx, lease).await? => Err(StoreError::JobLost(lease.job.clone())),
        _ => Ok(()),
    }
}

/// Inside a transaction: `true` while `lease` still holds its job. The row
/// stays share-locked until the transaction ends, so no takeover can slip
/// in before the transaction's writes are committed.
pub(super) async fn still_held(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    lease: &JobLease,
) -> Result<bool, sqlx::Error> {
    let held = sqlx::query_scalar!(
        r#"SELECT 1 AS "held!" FROM job_leases
         WHERE job = $1 AND holder = $2 AND token = $3 AND expires_at > now() FOR SHARE"#,
        lease.job,
        lease.holder,
        lease.token,
    )
    .fetch_optional(&mut **tx)
    .await?;
    Ok(held.is_some())
}
