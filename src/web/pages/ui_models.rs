//! What the team page shows of a request, built from the API's own typed
//! views ([`ReplicaView`], [`ReplicaDetail`]), so the page and the API never
//! differ.

use chrono::{DateTime, Utc};

use crate::domain::{Event, next};
use crate::views::proposals::ProposalView;
use crate::views::requests::{ReplicaDetail, ReplicaView};
use crate::web::pages::ui_people::{
    Moment, People, Person, page_words, status_label, status_words,
};

/// One line of the replicas list.
#[derive(Debug, Clone)]
pub struct RowView {
    pub id: String,
    pub short_id: String,
    /// The machine name: the badge's class and the filter's value.
    pub status: String,
    pub status_label: &'static str,
    pub next_step: &'static str,
    pub error: Option<ErrorView>,
    pub source: String,
    pub node: String,
    pub app: String,
    /// What the request waits for, in words.
    pub approval: String,
    /// "1/2 signed", while a proposal with a known threshold serves it.
    pub signed: Option<String>,
    pub created_by: Person,
    pub created_at: Moment,
}

impl RowView {
    pub fn new(view: &ReplicaView, people: &People, now: DateTime<Utc>) -> RowView {
        let id = view.id.to_string();
        let words = status_words(view.status);
        RowView {
            short_id: id[id.len().saturating_sub(8)..].to_owned(),
            id,
            status: view.status.to_string(),
            status_label: words.label,
            next_step: words.next_step,
            error: view.last_error.as_ref().map(ErrorView::new),
            source: view
                .source_name
                .clone()
                .unwrap_or_else(|| view.source.clone()),
            node: view
                .node_name
                .clone()
                .or_else(|| view.node.clone())
                .unwrap_or_else(|| "Auto".to_owned()),
            app: view.app_id.clone().unwrap_or_else(|| "-".to_owned()),
            approval: match &view.proposal {
                Some(p) => named_summary(p, people),
                None => approval(view.onchain_kms),
            },
            signed: view.proposal.as_ref().and_then(ProposalView::signed_badge),
            created_by: people.actor(&view.created_by),
            created_at: Moment::new(view.created_at, now),
        }
    }
}

/// A proposal's summary with the owners named as the page names them.
fn named_summary(p: &ProposalView, people: &People) -> String {
    p.summary_naming(|owner| people.person(owner).word())
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

/// A stored error in the page's words.
#[derive(Debug, Clone)]
pub struct ErrorView {
    pub code: String,
    pub message: String,
    pub suggestion: Option<String>,
}

impl ErrorView {
    fn new(e: &crate::views::requests::ErrorView) -> ErrorView {
        ErrorView {
            code: e.code.clone(),
            message: page_words(e.message.as_deref().unwrap_or_default()),
            suggestion: e.suggestion.as_deref().map(page_words),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EventView {
    pub at: Moment,
    pub from: Option<String>,
    pub to: String,
    pub actor: Person,
    pub message: Option<String>,
}

/// A request a proposal serves, as the page shows it.
#[derive(Debug, Clone)]
pub struct ServedView {
    pub id: String,
    pub source: String,
    pub node: Option<String>,
    pub status: String,
    pub status_label: String,
    pub created_by: Person,
}

/// A Safe transaction as the page shows it: the API's view, with people
/// named and the summary worded with their names.
#[derive(Debug, Clone)]
pub struct ProposalPage {
    pub v: ProposalView,
    pub summary: String,
    pub signed: Option<String>,
    pub safe: Person,
    pub confirmed_by: Vec<Person>,
    pub to_sign: Vec<Person>,
    pub calls: Vec<CallPage>,
    pub requests: Vec<ServedView>,
}

/// One call of a Safe transaction, with who queued its requests named.
#[derive(Debug, Clone)]
pub struct CallPage {
    pub function: &'static str,
    pub description: String,
    pub checked: String,
}

impl ProposalPage {
    pub fn new(v: ProposalView, people: &People) -> ProposalPage {
        ProposalPage {
            summary: named_summary(&v, people),
            signed: v.signed_badge(),
            safe: people.person(&v.safe),
            confirmed_by: v.confirmed_by.iter().map(|o| people.person(o)).collect(),
            to_sign: v.owners_to_sign.iter().map(|o| people.person(o)).collect(),
            calls: v
                .calls
                .iter()
                .map(|c| CallPage {
                    function: c.function,
                    description: c.described_naming(|actor| people.actor(actor).word()),
                    checked: c.checked.clone(),
                })
                .collect(),
            requests: v
                .requests
                .iter()
                .map(|r| ServedView {
                    id: r.id.to_string(),
                    source: r.source.clone(),
                    node: r.node.clone(),
                    status: r.status.clone(),
                    status_label: status_label(&r.status),
                    created_by: people.actor(&r.created_by),
                })
                .collect(),
            v,
        }
    }
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
    pub proposal: Option<ProposalPage>,
    pub events: Vec<EventView>,
    /// Cancelling can still act: the commit has not started.
    pub cancellable: bool,
}

impl DetailView {
    pub fn new(detail: ReplicaDetail, people: &People, now: DateTime<Utc>) -> Self {
        let ReplicaDetail {
            replica: view,
            events,
        } = detail;
        let row = RowView::new(&view, people, now);
        DetailView {
            cancellable: next(view.status, Event::Cancel).is_ok(),
            error: row.error.clone(),
            row,
            compose_hash: view.compose_hash,
            env_names: view.env_names.join(", "),
            note: view.note,
            vm_uuid: view.vm_uuid,
            extra_replicas: view.extra_replicas,
            dashboard_link: view.dashboard_link,
            proposal: view.proposal.map(|p| ProposalPage::new(p, people)),
            events: events
                .into_iter()
                .map(|e| EventView {
                    at: Moment::new(e.at, now),
                    from: e.from.as_deref().map(status_label),
                    to: status_label(&e.to),
                    actor: people.actor(&e.actor),
                    message: e.message.as_deref().map(page_words),
                })
                .collect(),
        }
    }
}
