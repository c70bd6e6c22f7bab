//! What the replica tracker reads and writes: every provisioning request in
//! one query, and what each status poll saw. Moves go through
//! [`Store::move_waiting`], like the follower's: no worker holds these rows.
//! Every write is fenced by the tracker's job lease (see `job_leases`).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::job_leases::JobLease;
use super::requests::{ReplicaRequest, StoredError};
use super::{Store, StoreError, clean};

/// A provisioning request and when it entered `provisioning`.
#[derive(Debug, Clone)]
pub struct Tracked {
    pub request: ReplicaRequest,
    pub provisioning_since: Option<DateTime<Utc>>,
}

impl Store {
    /// Every request whose replica is being created, oldest first.
    pub async fn provisioning(&self) -> Result<Vec<Tracked>, sqlx::Error> {
        let since: Vec<(Uuid, Option<DateTime<Utc>>)> = sqlx::query!(
            r#"SELECT r.id, (
                SELECT max(e.created_at) FROM request_events e
                WHERE e.request_id = r.id AND e.to_status = 'provisioning'
                  AND e.from_status IS DISTINCT FROM e.to_status) AS "since?"
             FROM replica_requests r WHERE r.status = 'provisioning'
             ORDER BY r.updated_at, r.id"#,
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|row| (row.id, row.since))
        .collect();
        if since.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = since.iter().map(|(id, _)| *id).collect();
        let mut tx = self.pool.begin().await?;
        let mut requests = Store::requests_in(&mut tx, &ids).await?;
        tx.commit().await?;
        Ok(since
            .into_iter()
            .filter_map(|(id, provisioning_since)| {
                let at = requests.iter().position(|r| r.id == id)?;
                Some(Tracked {
                    request: requests.swap_remove(at),
                    provisioning_since,
                })
            })
            .collect())
    }

    /// The replica's status as the last poll saw it.
    pub async fn note_replica_status(
        &self,
        id: Uuid,
        status: &str,
        now: DateTime<Utc>,
        fence: Option<&JobLease>,
    ) -> Result<(), StoreError> {
        let (job, holder, token) = JobLease::binds(fence);
        let rows = sqlx::query!(
            "UPDATE replica_requests SET replica_status = $2, updated_at = $3
             WHERE id = $1 AND status = 'provisioning'
               AND ($4::text IS NULL OR EXISTS (SELECT 1 FROM job_leases
                 WHERE job = $4 AND holder = $5 AND token = $6 AND expires_at > now() FOR SHARE))",
            id,
            status,
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

    /// Keeps a failed poll visible on the requests it was for, without
    /// moving them: the next pass asks again.
    pub async fn note_tracking_error(
        &self,
        ids: &[Uuid],
        error: &StoredError,
        fence: Option<&JobLease>,
    ) -> Result<(), StoreError> {
        let (job, holder, token) = JobLease::binds(fence);
        let rows = sqlx::query!(
            "UPDATE replica_requests SET last_error_code = $2, last_error_message = $3, last_error_suggestion = $4
             WHERE id = ANY($1) AND status = 'provisioning'
               AND ($5::text IS NULL OR EXISTS (SELECT 1 FROM job_leases
                 WHERE job = $5 AND holder = $6 AND token = $7 AND expires_at > now() FOR SHARE))",
            ids,
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
}
