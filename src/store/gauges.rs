//! Figures read at each `/metrics` scrape and by `/readyz`: what the queue
//! and the proposals look like now, and whether the schema is current.

use super::{MIGRATOR, Store};

/// The queue as it stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueGauges {
    /// Requests that are not finished, by status.
    pub by_status: Vec<(String, i64)>,
    /// Proposals waiting for the Safe's owners.
    pub open_proposals: i64,
    /// Requests whose worker lease expired and that no worker took back yet.
    pub expired_leases: i64,
    /// Requests for which Phala lists more than one new CVM.
    pub with_extra_replicas: i64,
}

impl Store {
    pub async fn queue_gauges(&self) -> Result<QueueGauges, sqlx::Error> {
        let by_status = sqlx::query!(
            r#"SELECT status, count(*) AS "count!" FROM replica_requests
             WHERE status NOT IN ('done', 'failed', 'cancelled')
             GROUP BY status ORDER BY status"#,
        )
        .fetch_all(&self.pool)
        .await?;
        // Leases run on the database's clock.
        let counts = sqlx::query!(
            r#"SELECT (SELECT count(*) FROM proposals WHERE status = 'proposed') AS "open_proposals!",
                    (SELECT count(*) FROM replica_requests
                     WHERE lease_id IS NOT NULL AND lease_expires_at <= now()) AS "expired_leases!",
                    (SELECT count(*) FROM replica_requests
                     WHERE extra_replicas <> '{}') AS "with_extra_replicas!""#,
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(QueueGauges {
            by_status: by_status.into_iter().map(|r| (r.status, r.count)).collect(),
            open_proposals: counts.open_proposals,
            expired_leases: counts.expired_leases,
            with_extra_replicas: counts.with_extra_replicas,
        })
    }

    /// The migrations this binary has that the database has not applied.
    pub async fn pending_migrations(&self) -> Result<Vec<i64>, sqlx::Error> {
        let applied: Vec<i64> =
            sqlx::query_scalar!("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await?;
        Ok(MIGRATOR
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .map(|m| m.version)
            .filter(|v| !applied.contains(v))
            .collect())
    }
}
