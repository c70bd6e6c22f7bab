//! Phala Cloud as wiremock, answering as phala-cloud-api.md describes.

use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::helpers::PHALA_API_KEY;

pub const ONCHAIN_VM: &str = "0b9f6c1e8a2d4c3b9e7f1a2b3c4d5e6f";
pub const ONCHAIN_NAME: &str = "web-prod";
pub const CLOUD_VM: &str = "9a8b7c6d5e4f40312a2b3c4d5e6f7081";
pub const CLOUD_NAME: &str = "cloud-app";
pub const REPLICA_VM: &str = "5e6f70814a2b4c3d9e8f7a6b5c4d3e2f";

pub fn app_id() -> String {
    "1f".repeat(20)
}

pub fn compose_hash() -> String {
    "ab".repeat(32)
}

pub fn device_id(node: u32) -> String {
    format!("{node:02x}").repeat(32)
}

pub fn api(p: &str) -> String {
    format!("/api/v1{p}")
}

/// `GET /cvms/{vm}` (and by name) for an on-chain KMS app on Base.
pub fn onchain_cvm(allowed_envs: &[&str]) -> Value {
    let mut cvm = onchain_cvm_on(&app_id(), 8453, ONCHAIN_VM, ONCHAIN_NAME);
    cvm["compose_file"] = json!({"allowed_envs": allowed_envs});
    cvm
}

/// An on-chain KMS source whose DstackApp is `app` (40 hex digits) on `chain_id`.
pub fn onchain_cvm_on(app: &str, chain_id: u64, vm: &str, name: &str) -> Value {
    json!({
        "id": "hashed-id",
        "name": name,
        "status": "running",
        "app_id": app,
        "vm_uuid": vm,
        "compose_hash": compose_hash(),
        "kms_type": if chain_id == 1 { "ethereum" } else { "base" },
        "kms_info": {"chain_id": chain_id, "dstack_app_address": format!("0x{app}")},
        "compose_file": {"allowed_envs": []},
        "node_info": {"object_type": "node", "id": 1, "name": "prod-1"},
    })
}

pub fn cloud_cvm(env_pubkey: &str) -> Value {
    json!({
        "name": CLOUD_NAME,
        "status": "running",
        "app_id": "2e".repeat(20),
        "vm_uuid": CLOUD_VM,
        "kms_type": "phala",
        "kms_info": {"encrypted_env_pubkey": env_pubkey},
        "compose_file": "{\"allowed_envs\": [\"API_KEY\"]}",
    })
}

pub async fn mount_onchain_source(server: &MockServer, allowed_envs: &[&str]) {
    for id in [ONCHAIN_VM, ONCHAIN_NAME] {
        Mock::given(method("GET"))
            .and(path(api(&format!("/cvms/{id}"))))
            .and(header("X-API-Key", PHALA_API_KEY))
            .and(header("X-Phala-Version", "2026-01-21"))
            .respond_with(ResponseTemplate::new(200).set_body_json(onchain_cvm(allowed_envs)))
            .mount(server)
            .await;
    }
}

pub async fn mount_cloud_source(server: &MockServer, env_pubkey: &str) {
    for id in [CLOUD_VM, CLOUD_NAME] {
        Mock::given(method("GET"))
            .and(path(api(&format!("/cvms/{id}"))))
            .respond_with(ResponseTemplate::new(200).set_body_json(cloud_cvm(env_pubkey)))
            .mount(server)
            .await;
    }
}

/// `GET /teepods/available` with `(id, name)` nodes.
pub async fn mount_nodes(server: &MockServer, nodes: &[(u32, &str)]) {
    let nodes: Vec<Value> = nodes
        .iter()
        .map(|(id, name)| {
            json!({"teepod_id": id, "name": name, "listed": true, "remaining_cvm_slots": 3,
                   "device_id": device_id(*id), "support_onchain_kms": true, "images": []})
        })
        .collect();
    Mock::given(method("GET"))
        .and(path(api("/teepods/available")))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"tier": "pro", "nodes": nodes, "kms_list": []})),
        )
        .mount(server)
        .await;
}

/// The 465 body of a prepare, nested under `detail` or at the top level.
pub fn prepared_body(
    token: &str,
    node: u32,
    compose_allowed: bool,
    device_allowed: bool,
    nested: bool,
) -> Value {
    prepared_body_for(
        &app_id(),
        8453,
        token,
        node,
        compose_allowed,
        device_allowed,
        nested,
    )
}

/// The 465 body for the DstackApp `app` (40 hex digits) on `chain_id`, for node `node`'s device.
pub fn prepared_body_for(
    app: &str,
    chain_id: u64,
    token: &str,
    node: u32,
    compose_allowed: bool,
    device_allowed: bool,
    nested: bool,
) -> Value {
    let envelope = json!({
        "error_code": "ERR-01-005",
        "message": "Compose hash registration required",
        "suggestions": ["Register the compose hash on chain"],
        "details": [
            {"field": "compose_hash", "value": compose_hash()},
            {"field": "app_id", "value": app},
            {"field": "device_id", "value": device_id(node)},
            {"field": "kms_info", "value": {"id": "kms-base", "url": "https://kms", "version": "v1", "chain_id": chain_id}},
            {"field": "commit_token", "value": token},
            {"field": "commit_url", "value": format!("https://cloud.phala.com/team/cvms/x/confirm?token={token}")},
            {"field": "api_commit_url", "value": format!("https://cloud-api.phala.com/api/v1/cvms/x/commit-replica?token={token}")},
            {"field": "onchain_status", "value": {
                "compose_hash_allowed": compose_allowed,
                "device_id_allowed": device_allowed,
                "is_allowed": compose_allowed && device_allowed,
            }},
        ],
    });
    if nested {
        json!({"detail": envelope})
    } else {
        envelope
    }
}

pub async fn mount_prepare(server: &MockServer, vm: &str, body: Value) {
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{vm}/replicas"))))
        .and(header("X-Prepare-Only", "true"))
        .respond_with(ResponseTemplate::new(465).set_body_json(body))
        .mount(server)
        .await;
}

pub fn replica_vm(status: &str) -> Value {
    json!({"id": 77, "name": "web-prod-replica", "status": status, "teepod_id": 3, "app_id": app_id(),
           "vm_uuid": REPLICA_VM, "vcpu": 2, "memory": 4096, "disk_size": 40,
           "created_at": "2026-11-29T12:00:00Z", "source_cvm_id": 12, "teepod_name": "prod-3"})
}

/// The id of the n-th CVM a mocked Phala creates (from 0): the first is
/// [`REPLICA_VM`], each later one an id of its own, as Phala gives.
pub fn nth_replica_vm(n: usize) -> String {
    match n {
        0 => REPLICA_VM.to_owned(),
        n => format!("5e1f0000-0000-4000-8000-{n:012x}"),
    }
}

/// Each commit creates a CVM of its own: [`nth_replica_vm`] in order.
#[derive(Default)]
pub struct NewReplicaEachCall(std::sync::atomic::AtomicUsize);

impl wiremock::Respond for NewReplicaEachCall {
    fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut vm = replica_vm("starting");
        vm["vm_uuid"] = json!(nth_replica_vm(n));
        ResponseTemplate::new(200).set_body_json(vm)
    }
}

pub async fn mount_commit_ok(server: &MockServer, vm: &str) {
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{vm}/commit-replica"))))
        .respond_with(NewReplicaEachCall::default())
        .mount(server)
        .await;
}

/// `POST /status/batch` answering for the replica with `status`.
pub async fn mount_replica_status(server: &MockServer, status: &str) {
    replica_status_mock(status).mount(server).await;
}

/// `POST /status/batch` as the tracker polls it: every replica asked about
/// in `status` (`in_progress` until it runs).
pub fn replica_status_mock(status: &str) -> Mock {
    Mock::given(method("POST"))
        .and(path(api("/status/batch")))
        .respond_with(EveryAskedIn(status.to_owned()))
}

/// Answers a status poll with every CVM asked about in one status.
pub struct EveryAskedIn(pub String);

impl wiremock::Respond for EveryAskedIn {
    fn respond(&self, request: &wiremock::Request) -> ResponseTemplate {
        let asked: Value = request.body_json().unwrap_or(Value::Null);
        let status = &self.0;
        let answer: serde_json::Map<String, Value> = asked["vm_uuids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|id| {
                let state =
                    json!({"vm_uuid": id, "status": status, "in_progress": status != "running"});
                (id.to_owned(), state)
            })
            .collect();
        ResponseTemplate::new(200).set_body_json(answer)
    }
}

/// The structured error envelope Phala sends, nested or at the top level.
pub fn phala_error(code: &str, message: &str, nested: bool) -> Value {
    let envelope = json!({"error_code": code, "message": message, "details": [], "suggestions": ["server suggestion"]});
    if nested {
        json!({"detail": envelope})
    } else {
        envelope
    }
}
