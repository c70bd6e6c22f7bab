//! The JSON shape of a replica request, shared by every endpoint that shows one.
//! The commit token and the encrypted env are never part of it.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::domain::Status;
use crate::store::{EventRow, ReplicaRequest};
use crate::telemetry::redact;
use crate::views::proposals::ProposalView;

/// Stored text that may quote a client error (and so a URL with a key).
fn clean(text: &Option<String>) -> Option<String> {
    text.as_deref().map(|t| redact(t).into_owned())
}

/// Proposals by id, as the signers see them, for the requests that point to them.
pub type Proposals = HashMap<Uuid, ProposalView>;

/// A replica request as every endpoint shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplicaView {
    pub id: Uuid,
    pub status: Status,
    /// The source as the caller named it.
    pub source: String,
    pub source_vm_uuid: String,
    pub source_name: Option<String>,
    /// The node as the caller named it.
    pub node: Option<String>,
    pub node_id: Option<i32>,
    pub node_name: Option<String>,
    pub kms_type: Option<String>,
    pub onchain_kms: bool,
    pub app_id: Option<String>,
    pub chain_id: Option<i64>,
    /// The prepared compose hash, or the requested one until then.
    pub compose_hash: Option<String>,
    pub device_id: Option<String>,
    pub registrations: RegistrationsView,
    /// The Safe proposal that registers what the request needs.
    pub proposal: Option<ProposalView>,
    pub replica: Option<ReplicaVmView>,
    pub vm_uuid: Option<String>,
    /// Other CVMs that this request's calls may have created besides its
    /// replica (Phala lists more than one new instance for it). Empty
    /// normally; otherwise someone should look and remove the unwanted one.
    pub extra_replicas: Vec<String>,
    /// The replica on the Phala dashboard.
    pub dashboard_link: Option<String>,
    /// Names of the env overrides (their values are never shown).
    pub env_names: Vec<String>,
    pub note: Option<String>,
    pub created_by: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<ErrorView>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Whether the DstackApp allows the request's compose hash and device (once prepared).
#[derive(Debug, Serialize, ToSchema)]
pub struct RegistrationsView {
    pub compose_hash_allowed: Option<bool>,
    pub device_id_allowed: Option<bool>,
}

/// The replica Phala created.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplicaVmView {
    pub vm_uuid: String,
    pub status: Option<String>,
}

/// A Phala, Safe or bridge error stored with a request, with what to do about it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorView {
    pub code: String,
    pub message: Option<String>,
    pub suggestion: Option<String>,
}

/// `GET /api/v1/replicas/{id}`: the request and its event log.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplicaDetail {
    #[serde(flatten)]
    pub replica: ReplicaView,
    pub events: Vec<EventView>,
}

/// The answer of queuing and of listing: several requests.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplicaList {
    pub replicas: Vec<ReplicaView>,
}

/// One transition of a request and who caused it.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    /// Absent for the first event.
    pub from: Option<String>,
    pub to: String,
    /// `api:<token name>`, `ci:<client>`, `worker`, …
    pub actor: String,
    pub message: Option<String>,
    pub at: DateTime<Utc>,
}

pub fn replica(r: &ReplicaRequest, proposals: &Proposals) -> ReplicaView {
    ReplicaView {
        id: r.id,
        status: r.status(),
        source: r.source.clone(),
        source_vm_uuid: r.source_vm_uuid.clone(),
        source_name: r.source_name.clone(),
        node: r.node.clone(),
        node_id: r.node_id,
        node_name: r.node_name.clone(),
        kms_type: r.kms_type.clone(),
        onchain_kms: r.onchain_kms,
        app_id: r.app_id.clone(),
        chain_id: r.chain_id,
        compose_hash: r
            .compose_hash
            .clone()
            .or_else(|| r.requested_compose_hash.clone()),
        device_id: r.device_id.clone(),
        registrations: RegistrationsView {
            compose_hash_allowed: r.compose_hash_allowed,
            device_id_allowed: r.device_id_allowed,
        },
        proposal: r.proposal_id.and_then(|id| proposals.get(&id)).cloned(),
        replica: r.replica_vm_uuid.as_ref().map(|vm_uuid| ReplicaVmView {
            vm_uuid: vm_uuid.clone(),
            status: r.replica_status.clone(),
        }),
        vm_uuid: r.replica_vm_uuid.clone(),
        extra_replicas: r.extra_replicas.clone(),
        dashboard_link: dashboard_link(r),
        env_names: r.env_names.clone(),
        note: r.note.clone(),
        created_by: r.created_by.clone(),
        attempts: r.attempts,
        next_attempt_at: r.next_attempt_at,
        last_error: r.last_error_code.as_ref().map(|code| ErrorView {
            code: code.clone(),
            message: clean(&r.last_error_message),
            suggestion: clean(&r.last_error_suggestion),
        }),
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

/// Phala's dashboard has no API-configurable host: this is the public one.
const PHALA_DASHBOARD: &str = "https://cloud.phala.com";

/// The replica on the Phala dashboard: `{dashboard}/{workspace}/apps/{app}/instances/{vm}`.
fn dashboard_link(r: &ReplicaRequest) -> Option<String> {
    let (slug, app, vm) = (
        r.workspace_slug.as_ref()?,
        r.app_id.as_ref()?,
        r.replica_vm_uuid.as_ref()?,
    );
    let app = app.trim_start_matches("0x");
    Some(format!(
        "{PHALA_DASHBOARD}/{slug}/apps/{app}/instances/{}",
        vm.replace('-', "")
    ))
}

pub fn event(e: &EventRow) -> EventView {
    EventView {
        from: e.from_status.clone(),
        to: e.to_status.clone(),
        actor: e.actor.clone(),
        message: clean(&e.message),
        at: e.created_at,
    }
}
