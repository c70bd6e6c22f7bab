//! The JSON shape of a replica request, shared by every endpoint that shows one.
//! The commit token and the encrypted env are never part of it.

use serde_json::{Value, json};

use crate::store::{EventRow, ReplicaRequest};

pub fn replica(r: &ReplicaRequest) -> Value {
    let last_error = r.last_error_code.as_ref().map(|code| {
        json!({
            "code": code,
            "message": r.last_error_message,
            "suggestion": r.last_error_suggestion,
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
        "proposal": Value::Null,
        "replica": replica,
        "vm_uuid": r.replica_vm_uuid,
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

pub fn event(e: &EventRow) -> Value {
    json!({
        "from": e.from_status,
        "to": e.to_status,
        "actor": e.actor,
        "message": e.message,
        "at": e.created_at,
    })
}
