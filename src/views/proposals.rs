//! The signers' view of a proposal: what each inner call does in human terms
//! (the app and its CVMs, the node and its region, the CVMs that run a
//! configuration, the requests it unblocks and who queued them), which
//! owners confirmed and which are still to sign, and where to sign.
//!
//! Everything comes from Postgres: the proposal, its calls, its requests,
//! the confirmations the planner reads from the Transaction Service, and the
//! facts Phala gave when it was planned. Showing a proposal never calls out.

use std::collections::HashMap;

use alloy::primitives::Address;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::MAX_LIST_LIMIT;
use super::explorer_tx_link;
use crate::domain::{
    Failure, Mark, ProposalStatus, Queued, Status, mark, serves_no_request_advice,
};
use crate::safe::safe_wallet_link;
use crate::store::{
    CvmFacts, ProposalFacts, ProposalRow, QueueEntry, Reach, ReplicaRequest, Store,
    StoredRegistration, same_hex,
};
use crate::telemetry::redact;

/// A proposal as the Safe's owners see it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProposalView {
    pub id: Uuid,
    pub chain_id: i64,
    /// Checksummed.
    pub safe: String,
    pub nonce: i64,
    pub safe_tx_hash: String,
    /// `proposed` (open), `executed`, `failed`, `replaced` or `superseded`.
    pub status: String,
    /// The Transaction Service accepted it: the owners can see it in Safe{Wallet}.
    pub submitted: bool,
    /// How many owners confirmed.
    pub confirmations: i32,
    pub threshold: Option<i32>,
    /// The owners who confirmed (checksummed).
    pub confirmed_by: Vec<String>,
    /// The Safe's owners (checksummed).
    pub owners: Vec<String>,
    /// While open and short of the threshold: the owners who have not
    /// confirmed; any `signatures_needed` of them complete it.
    pub owners_to_sign: Vec<String>,
    /// Confirmations still missing (0 once the threshold is met).
    pub signatures_needed: Option<i32>,
    /// When the confirmations were last read from the Transaction Service.
    pub confirmations_checked_at: Option<DateTime<Utc>>,
    /// "1 of 2 confirmations; waiting for one of 0x…, 0x…", or how it ended.
    pub summary: String,
    /// While open: where it stands in the Safe's queue, read from the Safe's
    /// nonce on chain.
    pub queue: Option<QueuePosition>,
    /// Some request it serves is neither cancelled nor failed.
    pub serves_request: bool,
    /// While open and serving no request: what happens to it, and how the
    /// owners clear it.
    pub advice: Option<String>,
    /// Safe{Wallet}, where the owners sign.
    pub link: Option<String>,
    pub execution_tx_hash: Option<String>,
    pub execution_tx_link: Option<String>,
    pub gas_estimate: Option<i64>,
    pub calls: Vec<CallView>,
    /// Every request the proposal serves.
    pub requests: Vec<ServedRequest>,
    pub last_error: Option<ProposalError>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// What `summary` is made of, so the page can word it with people's names.
    #[serde(skip)]
    pub summary_facts: SummaryFacts,
}

impl ProposalView {
    /// The summary with the owners still to sign named by `name` (the page
    /// names people; the API keeps their addresses).
    pub fn summary_naming(&self, name: impl Fn(&str) -> String) -> String {
        let to_sign: Vec<String> = self.owners_to_sign.iter().map(|o| name(o)).collect();
        summary(&self.summary_facts, &to_sign)
    }

    /// "1/2 signed", when the threshold is known.
    pub fn signed_badge(&self) -> Option<String> {
        self.threshold
            .map(|t| format!("{}/{t} signed", self.confirmations))
    }
}

/// The facts a proposal's summary is worded from.
#[derive(Debug, Clone)]
pub struct SummaryFacts {
    status: ProposalStatus,
    confirmations: i32,
    threshold: Option<i32>,
    needed: Option<i32>,
    executed: bool,
    submitted: bool,
    withdrawn: bool,
    nonce: i64,
    mark: Option<Mark>,
    serves_request: bool,
    signed_by_owner: bool,
}

/// Where an open proposal stands in its Safe's queue (lowest nonce first).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct QueuePosition {
    /// `ready`, `next`, `blocked`, `used`, `executed` or `unknown`.
    pub kind: &'static str,
    /// "ready to execute", "next; needs 1 more signature", "blocked by nonce 4", …
    pub label: String,
    /// The Safe's nonce as the bridge last read it on chain.
    pub safe_nonce: Option<i64>,
}

/// One inner call of the Safe transaction.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CallView {
    /// `addDevice` or `addComposeHash`.
    pub function: &'static str,
    /// The DstackApp contract (the app id).
    pub app: String,
    /// The device id or compose hash it allows.
    pub value: String,
    /// One sentence: what allowing this means.
    pub description: String,
    /// How the bridge tied the value to the order: "hash of web-prod as
    /// queued at 12:03 UTC", "device of node prod-2 from the node list",
    /// "device of node prod-2, named by the order".
    pub checked: String,
    pub app_name: Option<String>,
    /// The app's CVMs, as Phala listed them when the proposal was planned
    /// (empty when Phala could not be asked).
    pub app_cvms: Vec<CvmView>,
    /// For `addDevice`: the node whose device it is.
    pub node: Option<NodeView>,
    /// For `addComposeHash`: the CVMs that run this configuration (`None`
    /// when Phala could not be asked).
    pub cvms_running_it: Option<Vec<CvmView>>,
    /// The requests that wait for this call.
    pub unblocks: Vec<ServedRequest>,
    /// The description without the requests it unblocks, for the page to
    /// name who queued them.
    #[serde(skip)]
    pub approves: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CvmView {
    pub name: Option<String>,
    pub vm_uuid: Option<String>,
    pub status: Option<String>,
    pub node: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NodeView {
    pub id: Option<i64>,
    pub name: Option<String>,
    pub region: Option<String>,
}

/// A replica request a proposal serves, and who queued it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ServedRequest {
    pub id: Uuid,
    pub status: String,
    /// The source CVM's name (or what the caller gave).
    pub source: String,
    pub node: Option<String>,
    pub created_by: String,
    pub note: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProposalError {
    pub code: String,
    pub message: Option<String>,
}

/// `GET /api/v1/proposals`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProposalList {
    pub proposals: Vec<ProposalView>,
}

/// The view of one proposal, by id, as `reach` sees it.
pub async fn proposal_view(
    store: &Store,
    id: Uuid,
    reach: &Reach,
) -> anyhow::Result<Option<ProposalView>> {
    let rows = store.proposals(&[id]).await?;
    Ok(views_of(store, rows, reach)
        .await?
        .pop()
        .filter(|view| seen(view, reach)))
}

/// The open proposals (proposed, not executed or ended yet) that `reach`
/// sees, as Safe{Wallet} queues them: by Safe, then nonce, lowest first.
pub async fn open_proposals(store: &Store, reach: &Reach) -> anyhow::Result<Vec<ProposalView>> {
    let mut rows = store
        .list_proposals(Some("proposed"), MAX_LIST_LIMIT, reach)
        .await?;
    rows.sort_by(|a, b| {
        (a.chain_id, &a.safe, a.nonce, a.created_at).cmp(&(
            b.chain_id,
            &b.safe,
            b.nonce,
            b.created_at,
        ))
    });
    views_of(store, rows, reach).await
}

/// The views of the given proposals by id (for the requests that point to
/// them), as `reach` sees them.
pub async fn views_by_id(
    store: &Store,
    ids: &[Uuid],
    reach: &Reach,
) -> anyhow::Result<HashMap<Uuid, ProposalView>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = store.proposals(ids).await?;
    Ok(views_of(store, rows, reach)
        .await?
        .into_iter()
        .map(|v| (v.id, v))
        .collect())
}

/// Whether `reach` sees a proposal whose view [`views_of`] cut down for it:
/// it sees at least one of its calls.
pub fn seen(view: &ProposalView, reach: &Reach) -> bool {
    reach.is_all() || !view.calls.is_empty()
}

/// Builds the views of `rows`, in their order, with four batched reads. A
/// caller of limited reach sees only the calls and requests within it
/// ([`Reach::sees_call`], [`Reach::sees`]).
pub async fn views_of(
    store: &Store,
    rows: Vec<ProposalRow>,
    reach: &Reach,
) -> anyhow::Result<Vec<ProposalView>> {
    let ids: Vec<Uuid> = rows.iter().map(|p| p.id).collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut calls: HashMap<Uuid, Vec<StoredRegistration>> = HashMap::new();
    for (id, call) in store.proposal_calls(&ids).await? {
        calls.entry(id).or_default().push(call);
    }
    let mut facts = store.proposal_facts(&ids).await?;
    let every_request = store.requests_served_by(&ids).await?;
    let mut every_served: HashMap<Uuid, Vec<&ReplicaRequest>> = HashMap::new();
    for request in &every_request {
        if let Some(p) = request.proposal_id {
            every_served.entry(p).or_default().push(request);
        }
    }
    let requests: Vec<&ReplicaRequest> = every_request.iter().filter(|r| reach.sees(r)).collect();
    let request_ids: Vec<Uuid> = requests.iter().map(|r| r.id).collect();
    let mut needs: HashMap<Uuid, Vec<StoredRegistration>> = HashMap::new();
    for row in store.registrations_of(&request_ids).await? {
        needs
            .entry(row.request_id)
            .or_default()
            .push(row.registration);
    }
    let mut served: HashMap<Uuid, Vec<&ReplicaRequest>> = HashMap::new();
    for &request in &requests {
        if let Some(p) = request.proposal_id {
            served.entry(p).or_default().push(request);
        }
    }
    let queues = if rows.iter().any(|p| p.status.is_open()) {
        Some((store.open_queue().await?, store.safe_nonces().await?))
    } else {
        None
    };
    Ok(rows
        .into_iter()
        .map(|p| {
            let id = p.id;
            let requests = served.remove(&id).unwrap_or_default();
            // Whether it serves a request is the proposal's own fact, out of
            // the caller's reach or not.
            let all = every_served.remove(&id).unwrap_or_default();
            let position = match &queues {
                Some((queue, nonces)) if p.status.is_open() => position(&p, &all, queue, nonces),
                _ => Position::ended(&p, &all),
            };
            let mut calls = calls.remove(&id).unwrap_or_default();
            calls.retain(|c| reach.sees_call(&c.app_id, requests.iter().copied()));
            build(p, calls, facts.remove(&id), requests, &needs, &position)
        })
        .collect())
}

/// Where a proposal stands: its queue mark (while open), and whether it
/// still serves a request.
#[derive(Debug, Clone)]
struct Position {
    mark: Option<Mark>,
    safe_nonce: Option<i64>,
    serves_request: bool,
    signed_by_owner: bool,
}

impl Position {
    fn ended(p: &ProposalRow, requests: &[&ReplicaRequest]) -> Position {
        Position {
            mark: None,
            safe_nonce: None,
            serves_request: serves_a_request(requests),
            signed_by_owner: signed_by_owner(&p.proposer, p.confirmed_by.as_deref()),
        }
    }
}

fn serves_a_request(requests: &[&ReplicaRequest]) -> bool {
    requests
        .iter()
        .any(|r| !matches!(r.status(), Status::Cancelled | Status::Failed))
}

/// An owner other than the bridge's proposer confirmed.
fn signed_by_owner(proposer: &str, confirmed_by: Option<&[String]>) -> bool {
    confirmed_by
        .unwrap_or_default()
        .iter()
        .any(|o| !same_hex(o, proposer))
}

fn queued(entry: &QueueEntry) -> Queued {
    Queued {
        nonce: entry.nonce as u64,
        confirmations: entry.confirmations.unwrap_or(0).max(0) as u32,
        threshold: entry.threshold.map(|t| t.max(0) as u32),
        serves_request: entry.live_requests > 0,
        signed_by_owner: signed_by_owner(&entry.proposer, entry.confirmed_by.as_deref()),
        executed: entry.executed,
    }
}

fn position(
    p: &ProposalRow,
    requests: &[&ReplicaRequest],
    queue: &[QueueEntry],
    nonces: &HashMap<(i64, String), i64>,
) -> Position {
    let of_safe: Vec<Queued> = queue
        .iter()
        .filter(|q| q.chain_id == p.chain_id && q.safe == p.safe)
        .map(queued)
        .collect();
    let safe_nonce = nonces.get(&(p.chain_id, p.safe.clone())).copied();
    let this = Queued {
        nonce: p.nonce as u64,
        confirmations: p.confirmations.unwrap_or(0).max(0) as u32,
        threshold: p.threshold.map(|t| t.max(0) as u32),
        serves_request: serves_a_request(requests),
        signed_by_owner: signed_by_owner(&p.proposer, p.confirmed_by.as_deref()),
        executed: p.execution_tx_hash.is_some(),
    };
    Position {
        mark: Some(mark(&this, safe_nonce.map(|n| n as u64), &of_safe)),
        safe_nonce,
        serves_request: this.serves_request,
        signed_by_owner: this.signed_by_owner,
    }
}

fn build(
    p: ProposalRow,
    calls: Vec<StoredRegistration>,
    facts: Option<ProposalFacts>,
    requests: Vec<&ReplicaRequest>,
    needs: &HashMap<Uuid, Vec<StoredRegistration>>,
    position: &Position,
) -> ProposalView {
    let safe: Option<Address> = p.safe.parse().ok();
    let owners: Vec<String> = p
        .owners
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|o| checksum(o))
        .collect();
    let confirmed_by: Vec<String> = p
        .confirmed_by
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|o| checksum(o))
        .collect();
    let confirmations = p.confirmations.unwrap_or(confirmed_by.len() as i32);
    let signatures_needed = p.threshold.map(|t| (t - confirmations).max(0));
    let open = p.status.is_open();
    let owners_to_sign: Vec<String> = if open && signatures_needed.unwrap_or(1) > 0 {
        owners
            .iter()
            .filter(|o| !confirmed_by.contains(o))
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let summary_facts = SummaryFacts {
        status: p.status,
        confirmations,
        threshold: p.threshold,
        needed: signatures_needed,
        executed: p.execution_tx_hash.is_some(),
        submitted: p.submitted_at.is_some(),
        withdrawn: p.last_error_code.as_deref() == Some(Failure::NoRequest.code()),
        nonce: p.nonce,
        mark: position.mark,
        serves_request: position.serves_request,
        signed_by_owner: position.signed_by_owner,
    };
    let summary = summary(&summary_facts, &owners_to_sign);
    let advice = (open && !position.serves_request && p.execution_tx_hash.is_none())
        .then(|| serves_no_request_advice(p.nonce as u64, position.signed_by_owner));
    let call_views = calls
        .iter()
        .map(|c| call_view(c, facts.as_ref(), &requests, needs))
        .collect();
    ProposalView {
        id: p.id,
        chain_id: p.chain_id,
        safe: safe
            .map(|s| s.to_checksum(None))
            .unwrap_or_else(|| p.safe.clone()),
        nonce: p.nonce,
        link: safe.and_then(|s| safe_wallet_link(p.chain_id as u64, s, &p.safe_tx_hash)),
        execution_tx_link: p
            .execution_tx_hash
            .as_ref()
            .and_then(|tx| explorer_tx_link(p.chain_id as u64, tx)),
        safe_tx_hash: p.safe_tx_hash,
        submitted: p.submitted_at.is_some(),
        confirmations,
        threshold: p.threshold,
        confirmed_by,
        owners,
        owners_to_sign,
        signatures_needed,
        confirmations_checked_at: p.checked_at,
        summary,
        queue: position.mark.map(|m| QueuePosition {
            kind: m.kind(),
            label: m.label(),
            safe_nonce: position.safe_nonce,
        }),
        serves_request: position.serves_request,
        advice,
        execution_tx_hash: p.execution_tx_hash,
        gas_estimate: p.gas_estimate,
        calls: call_views,
        requests: requests.iter().map(|r| served(r)).collect(),
        last_error: p.last_error_code.map(|code| ProposalError {
            code,
            message: p.last_error_message.map(|m| redact(&m).into_owned()),
        }),
        created_at: p.created_at,
        updated_at: p.updated_at,
        status: p.status.to_string(),
        summary_facts,
    }
}

fn summary(p: &SummaryFacts, to_sign: &[String]) -> String {
    let confirmations = p.confirmations;
    let of = match p.threshold {
        Some(t) => format!("{confirmations} of {t} confirmations"),
        None => format!("{confirmations} confirmations"),
    };
    // "Ready" only when it is the Safe's next nonce, as read on chain.
    let turn = match p.mark {
        Some(Mark::Ready | Mark::Next { .. }) | None => None,
        Some(other) => Some(other.label()),
    };
    let with_turn = |text: String| match &turn {
        Some(turn) => format!("{text}; {turn}"),
        None => text,
    };
    match p.status {
        ProposalStatus::Proposed if p.executed => {
            format!("{of}; executed, waiting for the block confirmations")
        }
        ProposalStatus::Proposed if !p.serves_request => {
            let what = if p.signed_by_owner {
                "an owner must reject it in Safe{Wallet}"
            } else {
                "the bridge withdraws it"
            };
            format!("serves no request; {of}; {what}")
        }
        ProposalStatus::Proposed if !p.submitted => {
            "stored; not yet accepted by the Safe Transaction Service".to_owned()
        }
        ProposalStatus::Proposed => match p.needed {
            Some(0) if matches!(p.mark, Some(Mark::Ready)) => {
                format!("{of}; ready to execute")
            }
            Some(0) => with_turn(of),
            Some(n) if !to_sign.is_empty() => {
                let who = if n == 1 && to_sign.len() == 1 {
                    to_sign[0].clone()
                } else if n == 1 {
                    format!("one of {}", to_sign.join(", "))
                } else {
                    format!("{n} of {}", to_sign.join(", "))
                };
                with_turn(format!("{of}; waiting for {who}"))
            }
            _ => with_turn(format!("{of}; waiting for the owners")),
        },
        ProposalStatus::Executed => format!("executed with {of}"),
        ProposalStatus::Failed if p.withdrawn => format!(
            "withdrawn: it served no request, and nonce {} went to the next batch",
            p.nonce
        ),
        other => format!("{other} ({of})"),
    }
}

fn call_view(
    call: &StoredRegistration,
    facts: Option<&ProposalFacts>,
    requests: &[&ReplicaRequest],
    needs: &HashMap<Uuid, Vec<StoredRegistration>>,
) -> CallView {
    let app_facts = facts.and_then(|f| f.app(&call.app_id));
    let unblocks: Vec<&ReplicaRequest> = requests
        .iter()
        .copied()
        .filter(|r| needs.get(&r.id).is_some_and(|n| n.contains(call)))
        .collect();
    let of_app: Vec<&ReplicaRequest> = requests
        .iter()
        .copied()
        .filter(|r| {
            r.app_id
                .as_deref()
                .is_some_and(|a| same_hex(a, &call.app_id))
        })
        .collect();
    let app_name = of_app
        .iter()
        .find_map(|r| r.source_name.clone())
        .or_else(|| app_facts.and_then(|a| a.cvms.iter().find_map(|c| c.name.clone())));
    let app_cvms: Vec<CvmView> = app_facts
        .map(|a| a.cvms.iter().map(cvm_view).collect())
        .unwrap_or_default();
    let app_label = match &app_name {
        Some(name) => format!("app {name} ({})", call.app_id),
        None => format!("app {}", call.app_id),
    };
    let serves = match app_cvms
        .iter()
        .filter_map(|c| c.name.as_deref())
        .collect::<Vec<_>>()
    {
        names if names.is_empty() => String::new(),
        names => format!(", which serves {}", names.join(", ")),
    };
    let (function, node, cvms_running_it, description) = if call.kind == "device" {
        let node = node_view(call, facts, requests);
        let where_ = match &node {
            Some(NodeView {
                name: Some(name),
                region,
                ..
            }) => match region {
                Some(region) => format!("node {name} (region {region})"),
                None => format!("node {name}"),
            },
            _ => format!("the node with device {}", call.value),
        };
        let description = format!("Allow {where_} to run {app_label}{serves}");
        ("addDevice", node, None, description)
    } else {
        let running: Option<Vec<CvmView>> = app_facts.map(|a| {
            a.cvms
                .iter()
                .filter(|c| {
                    c.compose_hash
                        .as_deref()
                        .is_some_and(|h| same_hex(h, &call.value))
                })
                .map(cvm_view)
                .collect()
        });
        let which = match running.as_deref() {
            Some([]) => ", which no CVM of the app runs today".to_owned(),
            Some(cvms) => {
                let names: Vec<&str> = cvms.iter().filter_map(|c| c.name.as_deref()).collect();
                format!(", the configuration {} runs", names.join(", "))
            }
            None => String::new(),
        };
        let description = format!(
            "Allow {app_label}{serves} to run configuration {}{which}",
            call.value
        );
        ("addComposeHash", None, running, description)
    };
    let checked = checked(call, app_facts.map(|a| a.cvms.as_slice()), &unblocks);
    let mut view = CallView {
        function,
        app: call.app_id.clone(),
        value: call.value.clone(),
        description: String::new(),
        checked,
        app_name,
        app_cvms,
        node,
        cvms_running_it,
        unblocks: unblocks.iter().map(|r| served(r)).collect(),
        approves: description,
    };
    view.description = view.described_naming(|actor| actor.to_owned());
    view
}

impl CallView {
    /// What it approves and the requests it unblocks, with who queued them
    /// named by `name`.
    pub fn described_naming(&self, name: impl Fn(&str) -> String) -> String {
        match unblocks_sentence(&self.unblocks, name) {
            Some(unblocking) => format!("{}; {unblocking}", self.approves),
            None => self.approves.clone(),
        }
    }
}

/// "unblocks 2 requests: web-prod on prod-2 queued by api:ops; …", with
/// who queued each named by `name` (the API gives the actor, the page a
/// person's name).
fn unblocks_sentence(unblocks: &[ServedRequest], name: impl Fn(&str) -> String) -> Option<String> {
    let who: Vec<String> = unblocks
        .iter()
        .map(|r| {
            format!(
                "{}{} queued by {}",
                r.source,
                r.node
                    .as_deref()
                    .map(|n| format!(" on {n}"))
                    .unwrap_or_default(),
                name(&r.created_by)
            )
        })
        .collect();
    let requests = match who.len() {
        0 => return None,
        1 => "request",
        _ => "requests",
    };
    Some(format!(
        "unblocks {} {requests}: {}",
        who.len(),
        who.join("; ")
    ))
}

/// How the bridge tied a call's value to the orders it serves (see
/// `web::intake`): a compose hash to the one pinned at intake (the order's,
/// or the source's own as queued), a device to the node the order named or,
/// for "Auto", to the node of the workspace's list whose device it is.
fn checked(
    call: &StoredRegistration,
    app_cvms: Option<&[CvmFacts]>,
    requests: &[&ReplicaRequest],
) -> String {
    let at = |r: &ReplicaRequest| r.created_at.format("%H:%M UTC").to_string();
    let source = |r: &ReplicaRequest| r.source_name.clone().unwrap_or_else(|| r.source.clone());
    if call.kind == "device" {
        let tied = requests.iter().find(|r| {
            r.device_id
                .as_deref()
                .or(r.expected_device_id.as_deref())
                .is_some_and(|d| same_hex(d, &call.value))
                && r.node_name.is_some()
        });
        return match tied {
            Some(r) if r.node.is_some() && r.expected_device_id.is_some() => format!(
                "device of node {}, named by the order",
                r.node_name.as_deref().unwrap_or_default()
            ),
            Some(r) => format!(
                "device of node {} from the node list",
                r.node_name.as_deref().unwrap_or_default()
            ),
            None => "device as Phala's answer named it; no order named a node".to_owned(),
        };
    }
    let pinned = requests.iter().find(|r| {
        r.requested_compose_hash
            .as_deref()
            .is_some_and(|h| same_hex(h, &call.value))
    });
    let Some(r) = pinned else {
        return "compose hash as Phala's answer named it; no order pinned one".to_owned();
    };
    // The source's own hash, as Phala listed the app's CVMs when planning.
    let runs_it = app_cvms.map(|cvms| {
        cvms.iter().any(|c| {
            let same_cvm = c.name.as_deref() == r.source_name.as_deref()
                || c.vm_uuid
                    .as_deref()
                    .is_some_and(|v| v.replace('-', "") == r.source_vm_uuid.replace('-', ""));
            same_cvm
                && c.compose_hash
                    .as_deref()
                    .is_some_and(|h| same_hex(h, &call.value))
        })
    });
    match runs_it {
        Some(false) => format!("hash named by the order (queued at {})", at(r)),
        _ => format!("hash of {} as queued at {}", source(r), at(r)),
    }
}

/// The node of an `addDevice`: Phala's node list when the proposal was
/// planned, else what the requests for that device recorded at intake.
fn node_view(
    call: &StoredRegistration,
    facts: Option<&ProposalFacts>,
    requests: &[&ReplicaRequest],
) -> Option<NodeView> {
    if let Some(node) = facts.and_then(|f| f.node_with_device(&call.value)) {
        return Some(NodeView {
            id: Some(node.id.into()),
            name: Some(node.name.clone()),
            region: node.region.clone(),
        });
    }
    requests
        .iter()
        .find(|r| {
            r.device_id
                .as_deref()
                .is_some_and(|d| same_hex(d, &call.value))
                && r.node_name.is_some()
        })
        .map(|r| NodeView {
            id: r.node_id.map(i64::from),
            name: r.node_name.clone(),
            region: None,
        })
}

fn cvm_view(c: &CvmFacts) -> CvmView {
    CvmView {
        name: c.name.clone(),
        vm_uuid: c.vm_uuid.clone(),
        status: c.status.clone(),
        node: c.node.clone(),
    }
}

fn served(r: &ReplicaRequest) -> ServedRequest {
    ServedRequest {
        id: r.id,
        status: r.status().to_string(),
        source: r.source_name.clone().unwrap_or_else(|| r.source.clone()),
        node: r.node_name.clone().or_else(|| r.node.clone()),
        created_by: r.created_by.clone(),
        note: r.note.clone(),
        created_at: r.created_at,
    }
}

fn checksum(address: &str) -> String {
    address
        .parse::<Address>()
        .map(|a| a.to_checksum(None))
        .unwrap_or_else(|_| address.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        status: &str,
        threshold: Option<i32>,
        confirmed: &[&str],
        owners: &[&str],
    ) -> ProposalRow {
        let now = Utc::now();
        ProposalRow {
            id: Uuid::nil(),
            chain_id: 8453,
            safe: "0x1f9090aae28b8a3dceadf281b0f12828e676c326".into(),
            safe_version: "1.4.1".into(),
            nonce: 4,
            safe_tx_hash: format!("0x{}", "ab".repeat(32)),
            to_address: "0x5fbdb2315678afecb367f032d93f642f64180aa3".into(),
            value: "0".into(),
            data: "0x".into(),
            operation: 0,
            status: status.parse().unwrap(),
            proposer: "0x0000000000000000000000000000000000000009".into(),
            gas_estimate: None,
            submitted_at: Some(now),
            next_attempt_at: now,
            confirmations: Some(confirmed.len() as i32),
            threshold,
            checked_at: Some(now),
            execution_tx_hash: None,
            execution_block: None,
            last_error_code: None,
            last_error_message: None,
            created_at: now,
            updated_at: now,
            proposed_block: None,
            execution_block_hash: None,
            execution_success: None,
            owners: Some(owners.iter().map(|s| s.to_string()).collect()),
            confirmed_by: Some(confirmed.iter().map(|s| s.to_string()).collect()),
            opened_at: now,
            watch_after_end: false,
        }
    }

    /// Open, serving a live request, at this mark.
    fn at(mark: Mark) -> Position {
        Position {
            mark: Some(mark),
            safe_nonce: Some(4),
            serves_request: true,
            signed_by_owner: false,
        }
    }

    const A: &str = "0x0000000000000000000000000000000000000001";
    const B: &str = "0x0000000000000000000000000000000000000002";
    const C: &str = "0x0000000000000000000000000000000000000003";

    #[test]
    fn an_open_proposal_names_the_owners_still_to_sign() {
        let view = build(
            row("proposed", Some(2), &[A], &[A, B, C]),
            vec![],
            None,
            vec![],
            &HashMap::new(),
            &at(Mark::Next { missing: Some(1) }),
        );
        assert_eq!(view.confirmations, 1);
        assert_eq!(view.signatures_needed, Some(1));
        assert_eq!(view.owners_to_sign, vec![checksum(B), checksum(C)]);
        assert_eq!(
            view.summary,
            format!(
                "1 of 2 confirmations; waiting for one of {}, {}",
                checksum(B),
                checksum(C)
            )
        );
        assert!(view.link.is_some(), "Base has a Safe{{Wallet}} link");
    }

    #[test]
    fn nobody_is_still_to_sign_once_the_threshold_is_met_or_it_ended() {
        let ready = build(
            row("proposed", Some(2), &[A, B], &[A, B, C]),
            vec![],
            None,
            vec![],
            &HashMap::new(),
            &at(Mark::Ready),
        );
        assert!(ready.owners_to_sign.is_empty());
        assert_eq!(ready.signatures_needed, Some(0));
        assert_eq!(ready.summary, "2 of 2 confirmations; ready to execute");
        assert_eq!(ready.queue.as_ref().unwrap().kind, "ready");
        // Its threshold met, yet a lower nonce must go first: not "ready".
        let blocked = build(
            row("proposed", Some(2), &[A, B], &[A, B, C]),
            vec![],
            None,
            vec![],
            &HashMap::new(),
            &at(Mark::Blocked { by: 3, stuck: None }),
        );
        assert_eq!(blocked.summary, "2 of 2 confirmations; blocked by nonce 3");
        // Serving no request, unsigned: the bridge withdraws it.
        let orphan = build(
            row("proposed", Some(2), &[], &[A, B, C]),
            vec![],
            None,
            vec![],
            &HashMap::new(),
            &Position {
                serves_request: false,
                ..at(Mark::Next { missing: Some(2) })
            },
        );
        assert!(
            orphan.summary.starts_with("serves no request"),
            "{}",
            orphan.summary
        );
        assert!(orphan.advice.unwrap().contains("deletes it"));
        let executed = build(
            row("executed", Some(2), &[A, C], &[A, B, C]),
            vec![],
            None,
            vec![],
            &HashMap::new(),
            &Position {
                mark: None,
                ..at(Mark::Ready)
            },
        );
        assert!(executed.owners_to_sign.is_empty());
        assert_eq!(executed.confirmed_by, vec![checksum(A), checksum(C)]);
        assert_eq!(executed.summary, "executed with 2 of 2 confirmations");
    }

    #[test]
    fn calls_read_in_human_terms_from_the_facts_phala_gave() {
        let device = StoredRegistration {
            app_id: "0x5fbdb2315678afecb367f032d93f642f64180aa3".into(),
            kind: "device".into(),
            value: format!("0x{}", "11".repeat(32)),
        };
        let compose = StoredRegistration {
            kind: "compose_hash".into(),
            value: format!("0x{}", "22".repeat(32)),
            ..device.clone()
        };
        let facts = ProposalFacts {
            apps: vec![crate::store::AppFacts {
                app_id: "5fbdb2315678afecb367f032d93f642f64180aa3".into(),
                cvms: vec![CvmFacts {
                    name: Some("api-canary".into()),
                    compose_hash: Some("22".repeat(32)),
                    ..CvmFacts::default()
                }],
            }],
            nodes: vec![crate::store::NodeFacts {
                id: 7,
                name: "prod-3".into(),
                region: Some("eu-1".into()),
                device_id: Some("11".repeat(32)),
            }],
        };
        let view = build(
            row("proposed", Some(2), &[], &[A, B, C]),
            vec![device, compose],
            Some(facts),
            vec![],
            &HashMap::new(),
            &at(Mark::Next { missing: Some(2) }),
        );
        let add_device = &view.calls[0];
        assert_eq!(add_device.function, "addDevice");
        assert_eq!(
            add_device.node.as_ref().unwrap().region.as_deref(),
            Some("eu-1")
        );
        assert!(
            add_device
                .description
                .starts_with("Allow node prod-3 (region eu-1) to run app api-canary"),
            "{}",
            add_device.description
        );
        let add_hash = &view.calls[1];
        assert_eq!(add_hash.function, "addComposeHash");
        assert_eq!(
            add_hash.cvms_running_it.as_ref().unwrap()[0]
                .name
                .as_deref(),
            Some("api-canary")
        );
        assert!(
            add_hash
                .description
                .ends_with("the configuration api-canary runs"),
            "{}",
            add_hash.description
        );
    }
}
