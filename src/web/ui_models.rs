//! What the team page shows of a request, built from the API's own typed
//! views ([`ReplicaView`], [`ReplicaDetail`]), so the page and the API never
//! differ.

use chrono::{DateTime, Utc};

use super::signers::ProposalView;
use super::views::{ReplicaDetail, ReplicaView};
use crate::domain::{Event, next};

fn short(at: DateTime<Utc>) -> String {
    // As the API's RFC 3339 cut to "2026-11-30 10:27:02".
    at.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// One line of the replicas list.
#[derive(Debug, Clone)]
pub struct RowView {
    pub id: String,
    pub short_id: String,
    pub status: String,
    pub error_code: Option<String>,
    pub source: String,
    pub node: String,
    pub app: String,
    pub approval: String,
    pub created_by: String,
    pub created_at: String,
}

impl RowView {
    pub fn new(view: &ReplicaView) -> RowView {
        let id = view.id.to_string();
        RowView {
            short_id: id[id.len().saturating_sub(8)..].to_owned(),
            id,
            status: view.status.to_string(),
            error_code: view.last_error.as_ref().map(|e| e.code.clone()),
            source: view
                .source_name
                .clone()
                .unwrap_or_else(|| view.source.clone()),
            node: view
                .node_name
                .clone()
                .or_else(|| view.node.clone())
                .unwrap_or_else(|| "auto".to_owned()),
            app: view.app_id.clone().unwrap_or_else(|| "-".to_owned()),
            approval: match &view.proposal {
                Some(p) => p.summary.clone(),
                None => approval(view.onchain_kms),
            },
            created_by: view.created_by.clone(),
            created_at: short(view.created_at),
        }
    }
}

/// What a request without a proposal waits for (a proposal's own summary
/// replaces it: see [`RowView::new`]).
fn approval(onchain_kms: bool) -> String {
    if onchain_kms {
        "-".to_owned()
    } else {
        "none needed (Cloud KMS)".to_owned()
    }
}

#[derive(Debug, Clone)]
pub struct ErrorView {
    pub code: String,
    pub message: String,
    pub suggestion: Option<String>,
}

#[derive(Debug, Clone)]
pub struct EventView {
    pub at: String,
    pub from: Option<String>,
    pub to: String,
    pub actor: String,
    pub message: Option<String>,
}

/// The request detail.
#[derive(Debug, Clone)]
pub struct DetailView {
    pub row: RowView,
    pub compose_hash: Option<String>,
    pub env_names: String,
    pub note: Option<String>,
    pub vm_uuid: Option<String>,
    /// Other CVMs the request's calls may have created: shown as a warning.
    pub extra_replicas: Vec<String>,
    pub dashboard_link: Option<String>,
    pub error: Option<ErrorView>,
    pub proposal: Option<ProposalView>,
    pub events: Vec<EventView>,
    /// Cancelling can still act: the commit has not started.
    pub cancellable: bool,
}

impl DetailView {
    pub fn new(detail: ReplicaDetail) -> Self {
        let ReplicaDetail {
            replica: view,
            events,
        } = detail;
        DetailView {
            cancellable: next(view.status, Event::Cancel).is_ok(),
            row: RowView::new(&view),
            compose_hash: view.compose_hash,
            env_names: view.env_names.join(", "),
            note: view.note,
            vm_uuid: view.vm_uuid,
            extra_replicas: view.extra_replicas,
            dashboard_link: view.dashboard_link,
            error: view.last_error.map(|e| ErrorView {
                code: e.code,
                message: e.message.unwrap_or_default(),
                suggestion: e.suggestion,
            }),
            proposal: view.proposal,
            events: events
                .into_iter()
                .map(|e| EventView {
                    at: short(e.at),
                    from: e.from,
                    to: e.to,
                    actor: e.actor,
                    message: e.message,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn short_time_is_the_api_time_cut_to_the_second() {
        let at = Utc.timestamp_micros(1_796_034_422_123_456).unwrap();
        let api = serde_json::to_value(at).unwrap();
        let api: String = api
            .as_str()
            .unwrap()
            .replace('T', " ")
            .chars()
            .take(19)
            .collect();
        assert_eq!(short(at), api);
        assert_eq!(short(at), "2026-11-30 10:27:02");
    }
}
