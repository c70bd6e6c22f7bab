//! Hourly quotas of replicas per caller, counted in Postgres so that every
//! process of the bridge agrees.

use chrono::{DateTime, Duration, Utc};
use sqlx::{Postgres, Transaction};

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
    /// Counts the caller's requests of one kind of KMS in the hour before
    /// `now`, to insert `wanted` more within `limit`. Call it inside the
    /// transaction that inserts: it holds the caller's lock until that
    /// transaction ends, so two processes never both spend the last slot.
    pub async fn check_quota(
        tx: &mut Transaction<'_, Postgres>,
        principal: &str,
        onchain_kms: bool,
        wanted: u32,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<QuotaCheck, sqlx::Error> {
        sqlx::query!(
            "SELECT pg_advisory_xact_lock(hashtextextended('quota:' || $1, 0))",
            principal
        )
        .execute(&mut **tx)
        .await?;
        let since = now - QUOTA_WINDOW;
        let used: i64 = sqlx::query_scalar!(
            r#"SELECT count(*) AS "count!" FROM replica_requests
             WHERE created_by = $1 AND onchain_kms = $2 AND created_at > $3"#,
            principal,
            onchain_kms,
            since,
        )
        .fetch_one(&mut **tx)
        .await?;
        let (wanted, limit) = (i64::from(wanted), i64::from(limit));
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
             WHERE created_by = $1 AND onchain_kms = $2 AND created_at > $3
             ORDER BY created_at OFFSET $4 LIMIT 1",
            principal,
            onchain_kms,
            since,
            must_leave - 1,
        )
        .fetch_one(&mut **tx)
        .await?;
        Ok(QuotaCheck::Exceeded {
            used,
            retry_after: oldest + QUOTA_WINDOW - now,
        })
    }
}
