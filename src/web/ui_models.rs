//! What the team page shows of a request, built from the API's own JSON
//! (`views::replica`, `views::event`), so the page and the API never differ.

use serde_json::Value;

use super::signers::ProposalView;
use super::views;
use crate::store::{EventRow, ReplicaRequest};

fn text(value: &Value, key: &str) -> Option<String> {
    match &value[key] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn short(at: Option<String>) -> String {
    // RFC 3339 to "2026-11-30 10:27:02".
    at.map(|t| t.replace('T', " ").chars().take(19).collect())
        .unwrap_or_default()
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
    pub fn new(r: &ReplicaRequest, proposals: &views::Proposals) -> RowView {
        let json = serde_json::to_value(views::replica(r, proposals)).unwrap_or_default();
        let mut row = RowView::from_json(&json);
        if let Some(p) = r.proposal_id.and_then(|id| proposals.get(&id)) {
            row.approval = p.summary.clone();
        }
        row
    }

    fn from_json(json: &Value) -> RowView {
        let id = text(json, "id").unwrap_or_default();
        RowView {
            short_id: id
                .chars()
                .rev()
                .take(8)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect(),
            id,
            status: text(json, "status").unwrap_or_default(),
            error_code: text(&json["last_error"], "code"),
            source: text(json, "source_name")
                .or_else(|| text(json, "source"))
                .unwrap_or_default(),
            node: text(json, "node_name")
                .or_else(|| text(json, "node"))
                .unwrap_or_else(|| "auto".to_owned()),
            app: text(json, "app_id").unwrap_or_else(|| "-".to_owned()),
            approval: approval(json["onchain_kms"].as_bool()),
            created_by: text(json, "created_by").unwrap_or_default(),
            created_at: short(text(json, "created_at")),
        }
    }
}

/// What a request without a proposal waits for (a proposal's own summary
/// replaces it: see [`RowView::new`]).
fn approval(onchain_kms: Option<bool>) -> String {
    match onchain_kms {
        Some(false) => "none needed (Cloud KMS)".to_owned(),
        _ => "-".to_owned(),
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
    pub dashboard_link: Option<String>,
    pub error: Option<ErrorView>,
    pub proposal: Option<ProposalView>,
    pub events: Vec<EventView>,
}

impl DetailView {
    pub fn new(r: &ReplicaRequest, proposals: &views::Proposals, events: &[EventRow]) -> Self {
        let json = serde_json::to_value(views::replica(r, proposals)).unwrap_or_default();
        let error = &json["last_error"];
        DetailView {
            row: RowView::new(r, proposals),
            compose_hash: text(&json, "compose_hash"),
            env_names: json["env_names"]
                .as_array()
                .map(|names| {
                    names
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default(),
            note: text(&json, "note"),
            vm_uuid: text(&json, "vm_uuid"),
            dashboard_link: text(&json, "dashboard_link"),
            error: text(error, "code").map(|code| ErrorView {
                code,
                message: text(error, "message").unwrap_or_default(),
                suggestion: text(error, "suggestion"),
            }),
            proposal: r.proposal_id.and_then(|id| proposals.get(&id)).cloned(),
            events: events
                .iter()
                .map(|e| {
                    let json = serde_json::to_value(views::event(e)).unwrap_or_default();
                    EventView {
                        at: short(text(&json, "at")),
                        from: text(&json, "from"),
                        to: text(&json, "to").unwrap_or_default(),
                        actor: text(&json, "actor").unwrap_or_default(),
                        message: text(&json, "message"),
                    }
                })
                .collect(),
        }
    }
}
