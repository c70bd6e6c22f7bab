//! Hourly quotas of replicas per caller, counted in Postgres so that every
//! process of the bridge agrees.

use chrono::{DateTime, Duration, Utc};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::Store;

/// The window a quota counts.
pub const QUOTA_WINDOW: Duration = Duration::hours(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaCheck {
    Within,
    /// Inserting would go over: `used` requests are in the window, and enough
    /// of them leave it after `retry_after` (never, if more were asked for
    /// than the whole quota: then it is the window's length).
    Exceeded {
        used: i64,
        retry_after: Duration,
    },
}

impl Store {
    /// Checks that `mine`, the caller's requests just inserted, fit in
    /// `limit` beside its other requests of one kind of KMS in the hour
    /// before `now`. Call it in the transaction that inserted `mine`, as its
    /// last statement before the commit: it takes the caller's lock, held
    /// until that transaction ends, so two processes never both spend the
    /// last slot, and taking it last keeps the caller's concurrent requests
    /// from waiting on each other's inserts.
    pub async fn check_quota(
        tx: &mut Transaction<'_, Postgres>,
        principal: &str,
        onchain_kms: bool,
        mine: &[Uuid],
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<QuotaCheck, sqlx::Error> {
        sqlx::query!(
            "SELECT pg_advisory_xact_lock(hashtextextended('quota:' || $1, 0))",
            principal
        )
        .execute(&mut **tx)
        .await?;
        // A statement of its own, after the lock: its snapshot sees what the
        // lock's previous holder committed.
        let since = now - QUOTA_WINDOW;
        let used: i64 = sqlx::query_scalar!(
            r#"SELECT count(*) AS "count!" FROM replica_requests
             WHERE created_by = $1 AND onchain_kms = $2 AND created_at > $3 AND id <> ALL($4)"#,
            principal,
            onchain_kms,
            since,
            mine,
        )
        .fetch_one(&mut **tx)
        .await?;
        let wanted = mine.len() as i64;
        let limit = i64::from(limit);
        if used + wanted <= limit {
            return Ok(QuotaCheck::Within);
        }
        if wanted > limit {
            return Ok(QuotaCheck::Exceeded {
                used,
                retry_after: QUOTA_WINDOW,
            });
        }
        // The request that must leave the window first is the (used + wanted - limit)th oldest.
        let must_leave = used + wanted - limit;
        let oldest: DateTime<Utc> = sqlx::query_scalar!(
            "SELECT created_at FROM replica_requests
             WHERE created_by = $1 AND onchain_kms = $2 AND created_at > $3 AND id <> ALL($5)
             ORDER BY created_at OFFSET $4 LIMIT 1",
            principal,
            onchain_kms,
            since,
            must_leave - 1,
            mine,
        )
        .fetch_one(&mut **tx)
        .await?;
        Ok(QuotaCheck::Exceeded {
            used,
            retry_after: oldest + QUOTA_WINDOW - now,
        })
    }
}
