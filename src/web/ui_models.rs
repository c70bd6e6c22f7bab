//! What the team page shows of a request, built from the API's own JSON
//! (`views::replica`, `views::event`), so the page and the API never differ.

use serde_json::Value;

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
        RowView::from_json(&json)
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
            approval: approval(&json["proposal"], json["onchain_kms"].as_bool()),
            created_by: text(json, "created_by").unwrap_or_default(),
            created_at: short(text(json, "created_at")),
        }
    }
}

/// "1 of 2 confirmations" for a proposal; what no proposal means otherwise.
fn approval(proposal: &Value, onchain_kms: Option<bool>) -> String {
    if proposal.is_null() {
        return match onchain_kms {
            Some(false) => "none needed (Cloud KMS)".to_owned(),
            _ => "-".to_owned(),
        };
    }
    let confirmations = proposal["confirmations"].as_i64().unwrap_or(0);
    let status = text(proposal, "status").unwrap_or_default();
    match proposal["threshold"].as_i64() {
        Some(threshold) => format!("{confirmations} of {threshold} confirmations ({status})"),
        None => format!("{confirmations} confirmations ({status})"),
    }
}

#[derive(Debug, Clone)]
pub struct ErrorView {
    pub code: String,
    pub message: String,
    pub suggestion: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ProposalView {
    pub safe: String,
    pub nonce: String,
    pub safe_tx_hash: String,
    pub status: String,
    pub link: Option<String>,
    pub execution_tx_hash: Option<String>,
    pub execution_tx_link: Option<String>,
    pub calls: Vec<String>,
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
        let proposal = &json["proposal"];
        DetailView {
            row: RowView::from_json(&json),
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
            proposal: (!proposal.is_null()).then(|| ProposalView {
                safe: text(proposal, "safe").unwrap_or_default(),
                nonce: text(proposal, "nonce").unwrap_or_default(),
                safe_tx_hash: text(proposal, "safe_tx_hash").unwrap_or_default(),
                status: text(proposal, "status").unwrap_or_default(),
                link: text(proposal, "link"),
                execution_tx_hash: text(proposal, "execution_tx_hash"),
                execution_tx_link: text(proposal, "execution_tx_link"),
                calls: proposal["calls"]
                    .as_array()
                    .map(|calls| {
                        calls
                            .iter()
                            .map(|c| {
                                format!(
                                    "{}({}) on app {}",
                                    text(c, "function").unwrap_or_default(),
                                    text(c, "value").unwrap_or_default(),
                                    text(c, "app").unwrap_or_default()
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            }),
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
