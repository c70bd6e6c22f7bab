//! The replicas page's list: newest first, filtered by status, app and source.

use super::Store;
use super::requests::query_requests;
use crate::domain::Status;
use crate::store::ReplicaRequest;

/// What the list is narrowed to; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct RequestFilter {
    pub status: Option<Status>,
    /// An app id, compared without case.
    pub app_id: Option<String>,
    /// The source as asked for, or the source CVM's name.
    pub source: Option<String>,
}

impl Store {
    pub async fn filtered_requests(
        &self,
        filter: &RequestFilter,
        limit: i64,
    ) -> Result<Vec<ReplicaRequest>, sqlx::Error> {
        query_requests!(
            "SELECT ",
            " FROM replica_requests
             WHERE ($1::text IS NULL OR status = $1)
               AND ($2::text IS NULL OR lower(app_id) = lower($2))
               AND ($3::text IS NULL OR source = $3 OR source_name = $3)
             ORDER BY created_at DESC, id DESC LIMIT $4",
            filter.status.map(Status::as_str),
            filter.app_id.as_deref(),
            filter.source.as_deref(),
            limit,
        )
        .fetch_all(&self.pool)
        .await
    }

    /// The app ids and sources that requests name, for the filter menus.
    pub async fn request_facets(&self) -> Result<(Vec<String>, Vec<String>), sqlx::Error> {
        let apps = sqlx::query_scalar!(
            r#"SELECT DISTINCT app_id AS "app_id!" FROM replica_requests
               WHERE app_id IS NOT NULL ORDER BY 1"#
        )
        .fetch_all(&self.pool)
        .await?;
        let sources = sqlx::query_scalar!(
            r#"SELECT DISTINCT coalesce(source_name, source) AS "source!"
               FROM replica_requests ORDER BY 1"#
        )
        .fetch_all(&self.pool)
        .await?;
        Ok((apps, sources))
    }
}
