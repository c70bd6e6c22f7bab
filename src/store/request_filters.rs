//! The replicas page's list: newest first, filtered by status, app and source;
//! and [`Reach`], what one caller may see of requests and proposals.

use super::Store;
use super::requests::query_requests;
use crate::domain::Status;
use crate::store::ReplicaRequest;

/// What a caller may see and cancel: every request, or those of some
/// sources (by the source CVM's name or the app id, as scopes name them).
/// A proposal is seen through its calls: a call on an app named here, or on
/// the app of a request the caller sees that the proposal serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    All,
    Sources {
        names: Vec<String>,
        /// Lowercase `0x` app ids.
        app_ids: Vec<String>,
    },
}

impl Reach {
    /// Nothing at all: a caller that has no scope yet.
    pub fn nothing() -> Reach {
        Reach::Sources {
            names: Vec::new(),
            app_ids: Vec::new(),
        }
    }

    pub fn is_all(&self) -> bool {
        matches!(self, Reach::All)
    }

    fn names(&self) -> &[String] {
        match self {
            Reach::All => &[],
            Reach::Sources { names, .. } => names,
        }
    }

    fn app_ids(&self) -> &[String] {
        match self {
            Reach::All => &[],
            Reach::Sources { app_ids, .. } => app_ids,
        }
    }

    fn names_app(&self, app_id: &str) -> bool {
        self.app_ids().iter().any(|a| same_hex(a, app_id))
    }

    /// Whether the caller sees (and may cancel) `request`. The SQL of
    /// [`Store::filtered_requests`] says the same.
    pub fn sees(&self, request: &ReplicaRequest) -> bool {
        match self {
            Reach::All => true,
            Reach::Sources { names, .. } => {
                request
                    .source_name
                    .as_ref()
                    .is_some_and(|n| names.contains(n))
                    || request.app_id.as_deref().is_some_and(|a| self.names_app(a))
            }
        }
    }

    /// Whether a proposal's call on `app_id` is seen, given the requests
    /// the proposal serves that the caller sees. The SQL of
    /// [`Store::list_proposals`] says the same.
    pub fn sees_call<'a>(
        &self,
        app_id: &str,
        seen_requests: impl IntoIterator<Item = &'a ReplicaRequest>,
    ) -> bool {
        self.is_all()
            || self.names_app(app_id)
            || seen_requests
                .into_iter()
                .any(|r| r.app_id.as_deref().is_some_and(|a| same_hex(a, app_id)))
    }

    /// `(all, names, app ids)` as the queries bind them.
    pub(super) fn binds(&self) -> (bool, Vec<String>, Vec<String>) {
        (
            self.is_all(),
            self.names().to_vec(),
            self.app_ids().iter().map(|a| a.to_lowercase()).collect(),
        )
    }
}

/// Hex values as Phala and the chain spell them differently (`0x`, `app_`, case).
pub fn same_hex(a: &str, b: &str) -> bool {
    fn bare(v: &str) -> &str {
        v.strip_prefix("0x")
            .or_else(|| v.strip_prefix("app_"))
            .unwrap_or(v)
    }
    bare(a).eq_ignore_ascii_case(bare(b))
}

/// What the list is narrowed to; `None` matches everything.
#[derive(Debug, Clone)]
pub struct RequestFilter {
    pub status: Option<Status>,
    /// An app id, compared without case.
    pub app_id: Option<String>,
    /// The source as asked for, or the source CVM's name.
    pub source: Option<String>,
    /// What the caller may see.
    pub reach: Reach,
}

impl Store {
    pub async fn filtered_requests(
        &self,
        filter: &RequestFilter,
        limit: i64,
    ) -> Result<Vec<ReplicaRequest>, sqlx::Error> {
        let (all, names, app_ids) = filter.reach.binds();
        query_requests!(
            "SELECT ",
            " FROM replica_requests
             WHERE ($1::text IS NULL OR status = $1)
               AND ($2::text IS NULL OR lower(app_id) = lower($2))
               AND ($3::text IS NULL OR source = $3 OR source_name = $3)
               AND ($5::bool OR source_name = ANY($6) OR lower(app_id) = ANY($7))
             ORDER BY created_at DESC, id DESC LIMIT $4",
            filter.status.map(Status::as_str),
            filter.app_id.as_deref(),
            filter.source.as_deref(),
            limit,
            all,
            &names,
            &app_ids,
        )
        .fetch_all(&self.pool)
        .await
    }

    /// The app ids and sources that the requests `reach` sees name, for the
    /// filter menus.
    pub async fn request_facets(
        &self,
        reach: &Reach,
    ) -> Result<(Vec<String>, Vec<String>), sqlx::Error> {
        let (all, names, app_ids) = reach.binds();
        let apps = sqlx::query_scalar!(
            r#"SELECT DISTINCT app_id AS "app_id!" FROM replica_requests
               WHERE app_id IS NOT NULL
                 AND ($1::bool OR source_name = ANY($2) OR lower(app_id) = ANY($3))
               ORDER BY 1"#,
            all,
            &names,
            &app_ids,
        )
        .fetch_all(&self.pool)
        .await?;
        let sources = sqlx::query_scalar!(
            r#"SELECT DISTINCT coalesce(source_name, source) AS "source!"
               FROM replica_requests
               WHERE ($1::bool OR source_name = ANY($2) OR lower(app_id) = ANY($3))
               ORDER BY 1"#,
            all,
            &names,
            &app_ids,
        )
        .fetch_all(&self.pool)
        .await?;
        Ok((apps, sources))
    }

    /// Newest first, optionally of one status, of those `reach` sees.
    pub async fn list_requests(
        &self,
        status: Option<Status>,
        limit: i64,
        reach: &Reach,
    ) -> Result<Vec<ReplicaRequest>, sqlx::Error> {
        self.filtered_requests(
            &RequestFilter {
                status,
                app_id: None,
                source: None,
                reach: reach.clone(),
            },
            limit,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reach_of_sources_sees_requests_by_name_or_app_and_calls_through_them() {
        let reach = Reach::Sources {
            names: vec!["web-prod".into()],
            app_ids: vec![format!("0x{}", "2e".repeat(20))],
        };
        let all_binds = Reach::All.binds();
        assert!(all_binds.0);
        let (all, names, apps) = reach.binds();
        assert!(!all);
        assert_eq!(names, vec!["web-prod".to_owned()]);
        assert_eq!(apps, vec![format!("0x{}", "2e".repeat(20))]);
        assert!(reach.sees_call(&format!("0x{}", "2E".repeat(20)), []));
        assert!(!reach.sees_call(&format!("0x{}", "1f".repeat(20)), []));
        assert!(!Reach::nothing().sees_call("0x00", []));
        assert!(Reach::All.sees_call("0x00", []));
    }
}
