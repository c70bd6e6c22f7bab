//! The JSON shape of a replica request, shared by every endpoint that shows one.
//! The commit token and the encrypted env are never part of it.

use serde_json::{Value, json};

use std::collections::HashMap;

use uuid::Uuid;

use super::signers::ProposalView;
use crate::store::{EventRow, ReplicaRequest};
use crate::telemetry::redact;

/// Stored text that may quote a client error (and so a URL with a key).
fn clean(text: &Option<String>) -> Option<String> {
    text.as_deref().map(|t| redact(t).into_owned())
}

/// Proposals by id, as the signers see them, for the requests that point to them.
pub type Proposals = HashMap<Uuid, ProposalView>;

pub fn replica(r: &ReplicaRequest, proposals: &Proposals) -> Value {
    let last_error = r.last_error_code.as_ref().map(|code| {
        json!({
            "code": code,
            "message": clean(&r.last_error_message),
            "suggestion": clean(&r.last_error_suggestion),
        })
    });
    let replica = r
        .replica_vm_uuid
        .as_ref()
        .map(|vm_uuid| json!({"vm_uuid": vm_uuid, "status": r.replica_status}));
    json!({
        "id": r.id,
        "status": r.status(),
        "source": r.source,
        "source_vm_uuid": r.source_vm_uuid,
        "source_name": r.source_name,
        "node": r.node,
        "node_id": r.node_id,
        "node_name": r.node_name,
        "kms_type": r.kms_type,
        "onchain_kms": r.onchain_kms,
        "app_id": r.app_id,
        "chain_id": r.chain_id,
        "compose_hash": r.compose_hash.as_ref().or(r.requested_compose_hash.as_ref()),
        "device_id": r.device_id,
        "registrations": {
            "compose_hash_allowed": r.compose_hash_allowed,
            "device_id_allowed": r.device_id_allowed,
        },
        "proposal": r.proposal_id.and_then(|id| proposals.get(&id)),
        "replica": replica,
        "vm_uuid": r.replica_vm_uuid,
        "dashboard_link": dashboard_link(r),
        "env_names": r.env_names,
        "note": r.note,
        "created_by": r.created_by,
        "attempts": r.attempts,
        "next_attempt_at": r.next_attempt_at,
        "last_error": last_error,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
    })
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

/// A block explorer's page of a transaction, for the chains Phala's on-chain KMS uses.
pub fn explorer_tx_link(chain_id: u64, tx_hash: &str) -> Option<String> {
    let base = match chain_id {
        1 => "https://etherscan.io",
        11155111 => "https://sepolia.etherscan.io",
        8453 => "https://basescan.org",
        84532 => "https://sepolia.basescan.org",
        _ => return None,
    };
    Some(format!("{base}/tx/{tx_hash}"))
}

pub fn event(e: &EventRow) -> Value {
    json!({
        "from": e.from_status,
        "to": e.to_status,
        "actor": e.actor,
        "message": clean(&e.message),
        "at": e.created_at,
    })
}
