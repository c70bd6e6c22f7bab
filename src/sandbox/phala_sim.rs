//! A Phala Cloud simulator for the sandbox and the end-to-end tests.
//!
//! It serves the Phala Cloud paths the bridge uses, under `/api/v1`, with
//! the shapes, statuses and error envelopes of `phala-cloud-api.md`, keeps
//! its world in memory, and reads the chain over JSON-RPC for every on-chain
//! decision, so a replica is committed only when its DstackApp really allows
//! it:
//!
//! - `GET /cvms/{id}` (a `vm_uuid` with or without dashes, `app_<hex>`, an
//!   instance id or a name), `GET /apps/{app_id}/cvms`, `POST /status/batch`;
//! - `GET /teepods/available`, `GET /kms/{kms_type}/pubkey/{app_id}`;
//! - `POST /cvms/{id}/replicas`: HTTP 465 with a commit token for on-chain
//!   KMS sources (whether or not `X-Prepare-Only` is sent), the replica at
//!   once for Cloud KMS sources (the header is ignored, §3.1);
//! - `POST /cvms/{id}/commit-replica`: token, hash, chain and receipt checks
//!   (§5, §6), then a replica that is `starting` and, after the world's boot
//!   delay, `running`.
//!
//! Every path but `commit-replica` needs `X-API-Key`; `commit-replica` is
//! "token-based, no auth required" (§5) and also takes `?token=`.
//! Errors use the structured envelope nested under `detail` (§7); malformed
//! bodies get FastAPI's 422 (`{"detail": [{loc, msg, type, input}]}`); an
//! unknown route gets FastAPI's `{"detail": "Not Found"}`.
//!
//! Where the reference does not pin a behaviour down, the choice is this
//! simulator's own:
//!
//! - Statuses: codes with no documented status answer 400 (§7: "unlisted
//!   errors default to HTTP 400"), except the not-found codes of a path
//!   resource (`ERR-03-001`, `ERR-02-011`), which answer 404.
//! - A missing or wrong API key: 401 with `ERR-05-003` (the reference lists
//!   no code for it; `ERR-05-*` is the Credentials module).
//! - A full node: `ERR-02-005` INSUFFICIENT_SLOTS, at prepare and at commit.
//!   Without `node_id` the replica goes to the source's node (§2), or to the
//!   first node (by id) with a free slot when that one is full.
//! - Commit checks, in the order of §6: the token (unknown, for another CVM,
//!   superseded, spent or expired → 466 `ERR-01-006`); the body's compose
//!   hash against the token's (→ 466); the contract. A compose hash the app
//!   does not allow → 465 `ERR-01-005`, or 468 `ERR-01-008` when the given
//!   transaction did touch the app but the hash is still not allowed. A
//!   device the app does not allow (and no `allowAnyDevice`) → 465
//!   `ERR-01-005` too: the reference has no device code, and that one
//!   "carries the on-chain action needed". Then a transaction hash other than
//!   `already-registered` must have a successful receipt with a
//!   `ComposeHashAdded(hash)` or `DeviceAdded(device)` log from the app
//!   (directly or inside a Safe execution) → else 467 `ERR-01-007`.
//! - A refused commit leaves the token usable; only a successful one spends it.
//! - `compose_hash` and `transaction_hash` are optional in the commit body
//!   (the commit "needs only the token"); no transaction hash means state-only.
//! - An unknown `compose_hash` in the replicas body: 400 `ERR-02-008`.
//!   `encrypted_env` must decrypt with the app's key (400 `ERR-02-008` if
//!   not); keys outside `allowed_envs` are kept, as the guest filters them.
//! - Compose hash: SHA-256 of the manifest as compact JSON with sorted keys
//!   (the dstack SDK's form). Env keys: X25519 secrets derived from the app
//!   id, so they are stable across runs and not secret.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use alloy::primitives::{Address, B256, keccak256};
use alloy::providers::Provider;
use alloy::rpc::types::TransactionReceipt;
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolEvent;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::Url;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::chain::{ChainClient, IDstackApp, Registration};
use crate::clock::Clock;

/// The API key of a world built with [`PhalaWorld::new`].
pub const DEFAULT_API_KEY: &str = "phak_sandbox_local_only";
/// The literal that asks for state-only verification at commit (§5).
pub const ALREADY_REGISTERED: &str = "already-registered";
/// Shapes of `GET /cvms/{id}`; anything else falls back to the default (§1).
pub const API_VERSION: &str = "2026-01-21";
const OLD_API_VERSION: &str = "2025-10-28";
/// The KMS every on-chain CVM of the world uses.
const KMS_SLUG: &str = "sandbox-onchain-kms";
const OS_VERSION: &str = "0.5.3";

/// The codes this simulator answers with (§7).
pub mod codes {
    pub const NODE_NOT_FOUND: &str = "ERR-01-001";
    pub const HASH_REGISTRATION_REQUIRED: &str = "ERR-01-005";
    pub const HASH_INVALID_OR_EXPIRED: &str = "ERR-01-006";
    pub const TX_VERIFICATION_FAILED: &str = "ERR-01-007";
    pub const HASH_NOT_ALLOWED: &str = "ERR-01-008";
    pub const INSUFFICIENT_SLOTS: &str = "ERR-02-005";
    pub const INVALID_REQUEST: &str = "ERR-02-008";
    pub const KMS_NOT_FOUND: &str = "ERR-02-011";
    pub const CVM_NOT_FOUND: &str = "ERR-03-001";
    pub const MULTIPLE_CVMS_SAME_NAME: &str = "ERR-03-002";
    pub const MULTIPLE_CVMS_MATCH: &str = "ERR-03-010";
    /// The simulator's pick for a missing or wrong API key (see the module doc).
    pub const INVALID_API_KEY: &str = "ERR-05-003";
}

// ---------------------------------------------------------------------------
// The world

/// Everything the simulator starts with. Fill it in, then [`PhalaSim::spawn`].
#[derive(Debug, Clone)]
pub struct PhalaWorld {
    /// The only `X-API-Key` accepted.
    pub api_key: String,
    /// Workspace name and slug, shown in CVMs and commit URLs.
    pub workspace: String,
    /// `kms_info.chain_id` of the on-chain CVMs; the RPC must serve this chain.
    pub chain_id: u64,
    /// `kms_info.dstack_kms_address`: the DstackKms stand-in whose root key is
    /// [`kms_root_key`], when one is deployed.
    pub kms_contract: Address,
    pub nodes: Vec<SimNode>,
    pub cvms: Vec<SimCvm>,
    /// Lifetime of a commit token (default 14 days, §12).
    pub token_ttl: chrono::Duration,
    /// How long a new replica stays `starting` (default 3 s).
    pub boot_delay: chrono::Duration,
    /// "Now" for token expiry and boot; a manual clock lets tests skip time.
    pub clock: Clock,
}

/// A node of `GET /teepods/available`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimNode {
    /// The teepod id, `node_id` in the replicas body.
    pub id: u32,
    pub name: String,
    pub region: String,
    /// The `addDevice` argument for replicas on this node.
    pub device_id: B256,
    /// Free CVM slots; each replica takes one. At 0 a replica on the node
    /// fails with `ERR-02-005`.
    pub free_slots: u32,
}

impl SimNode {
    /// A node with a device id derived from its name.
    pub fn new(id: u32, name: &str, free_slots: u32) -> SimNode {
        SimNode {
            id,
            name: name.to_owned(),
            region: "sandbox-1".to_owned(),
            device_id: device_id_for(name),
            free_slots,
        }
    }
}

/// How a CVM gets its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimKms {
    /// On-chain KMS: the app id is a DstackApp on the world's chain;
    /// `kms_type` is what `GET /cvms/{id}` reports (`base`, `ethereum`).
    Onchain { kms_type: String },
    /// Phala's Cloud KMS: no contract, no prepare.
    Cloud,
}

/// A live CVM of the world.
#[derive(Debug, Clone, PartialEq)]
pub struct SimCvm {
    pub name: String,
    pub vm_uuid: Uuid,
    /// The app id; for on-chain KMS the DstackApp address.
    pub app_id: Address,
    pub kms: SimKms,
    /// The teepod id it runs on.
    pub node_id: u32,
    pub status: String,
    /// The app-compose manifest; [`compose_hash`] of it is the CVM's hash.
    pub compose_file: Value,
}

impl SimCvm {
    /// An on-chain KMS CVM (`kms_type` `base`) of the DstackApp at `app`.
    pub fn onchain(name: &str, app: Address, node_id: u32) -> SimCvm {
        SimCvm {
            name: name.to_owned(),
            vm_uuid: uuid_for(name),
            app_id: app,
            kms: SimKms::Onchain {
                kms_type: "base".to_owned(),
            },
            node_id,
            status: "running".to_owned(),
            compose_file: manifest(name, "v1", &["API_URL", "LOG_LEVEL"]),
        }
    }

    /// A Cloud KMS CVM; its app id is derived from the name.
    pub fn cloud(name: &str, node_id: u32) -> SimCvm {
        let digest = Sha256::digest(format!("approval-bridge sim app {name}"));
        SimCvm {
            kms: SimKms::Cloud,
            ..SimCvm::onchain(name, Address::from_slice(&digest[..20]), node_id)
        }
    }

    /// Another configuration of the same app: a different compose hash.
    pub fn revision(mut self, revision: &str) -> SimCvm {
        self.compose_file["docker_compose_file"] = compose_yaml(&self.name, revision).into();
        self
    }

    pub fn allowed_envs(mut self, names: &[&str]) -> SimCvm {
        self.compose_file["allowed_envs"] = json!(names);
        self
    }

    pub fn compose_hash(&self) -> B256 {
        compose_hash(&self.compose_file)
    }
}

/// Names in the world [`PhalaWorld::standard`] builds.
pub mod standard {
    /// The nodes: `prod-1` hosts the sources, `prod-full` has no free slot.
    pub const NODES: [&str; 4] = ["prod-1", "prod-2", "prod-3", "prod-full"];
    /// On-chain KMS, one CVM.
    pub const WEB: &str = "web-prod";
    /// On-chain KMS, same app as [`API_CANARY`] with another compose hash.
    pub const API: &str = "api-prod";
    pub const API_CANARY: &str = "api-canary";
    /// Cloud KMS.
    pub const DOCS: &str = "docs-cloud";
}

impl PhalaWorld {
    /// The default nodes (see [`standard::NODES`]) and no CVMs.
    pub fn new(chain_id: u64) -> PhalaWorld {
        let nodes = standard::NODES
            .iter()
            .zip(1u32..)
            .map(|(name, id)| SimNode::new(id, name, if id == 4 { 0 } else { 8 }))
            .collect();
        PhalaWorld {
            api_key: DEFAULT_API_KEY.to_owned(),
            workspace: "sandbox".to_owned(),
            chain_id,
            kms_contract: Address::from_slice(&Sha256::digest(KMS_SLUG)[..20]),
            nodes,
            cvms: Vec::new(),
            token_ttl: chrono::Duration::days(14),
            boot_delay: chrono::Duration::seconds(3),
            clock: Clock::system(),
        }
    }

    /// The sandbox world: `web-prod` on `web_app`, `api-prod` and
    /// `api-canary` (two live compose hashes) on `api_app`, all on prod-1
    /// except the canary (prod-2), and `docs-cloud` on Cloud KMS.
    pub fn standard(chain_id: u64, web_app: Address, api_app: Address) -> PhalaWorld {
        PhalaWorld::new(chain_id)
            .with_cvm(SimCvm::onchain(standard::WEB, web_app, 1))
            .with_cvm(SimCvm::onchain(standard::API, api_app, 1))
            .with_cvm(
                SimCvm::onchain(standard::API_CANARY, api_app, 2)
                    .revision("v2")
                    // Same app, so the same manifest name as api-prod.
                    .named_like(standard::API),
            )
            .with_cvm(SimCvm::cloud(standard::DOCS, 1))
    }

    pub fn with_cvm(mut self, cvm: SimCvm) -> PhalaWorld {
        self.cvms.push(cvm);
        self
    }

    pub fn node(&self, name: &str) -> Option<&SimNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn cvm(&self, name: &str) -> Option<&SimCvm> {
        self.cvms.iter().find(|c| c.name == name)
    }

    /// Unique names, UUIDs and node ids; every CVM on a known node.
    fn check(&self) -> anyhow::Result<()> {
        for (i, cvm) in self.cvms.iter().enumerate() {
            let later = &self.cvms[i + 1..];
            anyhow::ensure!(
                !later.iter().any(|c| c.name == cvm.name),
                "two CVMs are named `{}`",
                cvm.name
            );
            anyhow::ensure!(
                !later.iter().any(|c| c.vm_uuid == cvm.vm_uuid),
                "two CVMs have vm_uuid {}",
                cvm.vm_uuid
            );
            anyhow::ensure!(
                self.nodes.iter().any(|n| n.id == cvm.node_id),
                "CVM `{}` runs on node {}, which the world does not have",
                cvm.name,
                cvm.node_id
            );
        }
        for (i, node) in self.nodes.iter().enumerate() {
            anyhow::ensure!(
                !self.nodes[i + 1..].iter().any(|n| n.id == node.id),
                "two nodes have id {}",
                node.id
            );
        }
        Ok(())
    }
}

impl SimCvm {
    /// Uses `app_name` as the manifest name (CVMs of one app share it).
    fn named_like(mut self, app_name: &str) -> SimCvm {
        self.compose_file["name"] = app_name.into();
        self
    }
}

fn compose_yaml(name: &str, revision: &str) -> String {
    format!("services:\n  {name}:\n    image: {name}:{revision}\n    restart: always\n")
}

fn manifest(name: &str, revision: &str, allowed_envs: &[&str]) -> Value {
    json!({
        "manifest_version": 2,
        "name": name,
        "runner": "docker-compose",
        "docker_compose_file": compose_yaml(name, revision),
        "allowed_envs": allowed_envs,
        "kms_enabled": true,
        "gateway_enabled": true,
        "public_logs": false,
        "public_sysinfo": false,
        "local_key_provider_enabled": false,
        "no_instance_id": false,
        "secure_time": false,
    })
}

/// SHA-256 of the manifest as compact JSON with sorted keys (`serde_json`
/// maps are sorted), as the dstack SDK's `getComposeHash` writes it.
pub fn compose_hash(manifest: &Value) -> B256 {
    let text = serde_json::to_vec(manifest).expect("a JSON value serializes");
    B256::from_slice(&Sha256::digest(text))
}

/// A stable device id for a node name.
pub fn device_id_for(node_name: &str) -> B256 {
    B256::from_slice(&Sha256::digest(format!(
        "approval-bridge sim device {node_name}"
    )))
}

/// A stable v4-shaped UUID for a seed.
fn uuid_for(seed: &str) -> Uuid {
    let digest = Sha256::digest(format!("approval-bridge sim vm {seed}"));
    let bytes: [u8; 16] = digest[..16].try_into().expect("16 bytes");
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// The X25519 secret that decrypts the env of `app` (derived, not secret).
fn env_secret(app: Address) -> StaticSecret {
    let digest =
        Sha256::digest([b"approval-bridge sim env key ".as_slice(), app.as_slice()].concat());
    StaticSecret::from(<[u8; 32]>::try_from(digest.as_slice()).expect("32 bytes"))
}

/// `GET /kms/.../pubkey` public key of `app`, bare hex.
pub fn env_public_key(app: Address) -> String {
    hex::encode(PublicKey::from(&env_secret(app)).as_bytes())
}

/// The secp256k1 key that signs env public keys (§10).
fn kms_signer() -> PrivateKeySigner {
    let digest = Sha256::digest(format!("approval-bridge sim kms {KMS_SLUG}"));
    PrivateKeySigner::from_slice(&digest).expect("a SHA-256 digest is a valid secp256k1 key")
}

/// The root key the DstackKms stand-in registers: the signer of env keys,
/// compressed SEC1, as the real KMS publishes its `k256Pubkey`.
pub fn kms_root_key() -> Vec<u8> {
    kms_signer()
        .credential()
        .verifying_key()
        .to_encoded_point(true)
        .as_bytes()
        .to_vec()
}

/// `keccak256("dstack-env-encrypt-pubkey" ‖ ":" ‖ app_id ‖ public_key)` (§10).
fn pubkey_message_hash(app: Address, public_key: &[u8; 32]) -> B256 {
    keccak256(
        [
            b"dstack-env-encrypt-pubkey:".as_slice(),
            app.as_slice(),
            public_key.as_slice(),
        ]
        .concat(),
    )
}

/// Reverses the dstack SDK's env encryption: `hex(ephemeral_pub ‖ iv ‖
/// ciphertext ‖ tag)`, the raw X25519 secret as the AES-256-GCM key, and
/// `{"env": [{"key", "value"}]}` inside.
fn decrypt_env(secret: &StaticSecret, encrypted: &str) -> Result<BTreeMap<String, String>, String> {
    let bytes = hex::decode(encrypted.trim().trim_start_matches("0x"))
        .map_err(|_| "encrypted_env is not hex".to_owned())?;
    if bytes.len() < 32 + 12 + 16 {
        return Err("encrypted_env is too short".to_owned());
    }
    let (ephemeral, rest) = bytes.split_at(32);
    let (iv, ciphertext) = rest.split_at(12);
    let ephemeral: [u8; 32] = ephemeral.try_into().expect("32 bytes");
    let shared = secret.diffie_hellman(&PublicKey::from(ephemeral));
    let plain = Aes256Gcm::new(shared.as_bytes().into())
        .decrypt(Nonce::from_slice(iv), ciphertext)
        .map_err(|_| "encrypted_env was not encrypted for this app's key".to_owned())?;
    let json: Value =
        serde_json::from_slice(&plain).map_err(|_| "encrypted_env is not JSON".to_owned())?;
    let entries = json
        .get("env")
        .and_then(Value::as_array)
        .ok_or_else(|| "encrypted_env has no `env` list".to_owned())?;
    entries
        .iter()
        .map(|entry| {
            let key = entry.get("key").and_then(Value::as_str);
            let value = entry.get("value").and_then(Value::as_str);
            match (key, value) {
                (Some(k), Some(v)) => Ok((k.to_owned(), v.to_owned())),
                _ => Err("an env entry lacks `key` or `value`".to_owned()),
            }
        })
        .collect()
}

/// 32 bytes of hex, `0x` optional, any case.
fn parse_hex32(text: &str) -> Option<B256> {
    let digits = text
        .trim()
        .trim_start_matches("0x")
        .trim_start_matches("0X");
    if digits.len() != 64 {
        return None;
    }
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(digits, &mut bytes).ok()?;
    Some(B256::from(bytes))
}

/// 20 bytes of hex after an optional `app_` or `0x`.
fn parse_app_id(text: &str) -> Option<Address> {
    let digits = text.strip_prefix("app_").unwrap_or(text);
    let digits = digits.strip_prefix("0x").unwrap_or(digits);
    if digits.len() != 40 {
        return None;
    }
    let mut bytes = [0u8; 20];
    hex::decode_to_slice(digits, &mut bytes).ok()?;
    Some(Address::from(bytes))
}

fn bare(app: Address) -> String {
    hex::encode(app)
}

fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

// ---------------------------------------------------------------------------
// Errors

/// An error answer.
#[derive(Debug)]
enum SimError {
    /// The structured envelope, nested under `detail` (§7).
    Envelope {
        status: StatusCode,
        code: &'static str,
        message: String,
        details: Vec<Value>,
        suggestions: Vec<String>,
    },
    /// FastAPI's request validation error.
    Validation(Vec<Value>),
    Internal(anyhow::Error),
}

fn custom_status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).expect("465-468 are valid status codes")
}

impl SimError {
    fn envelope(status: StatusCode, code: &'static str, message: impl Into<String>) -> SimError {
        SimError::Envelope {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
            suggestions: Vec::new(),
        }
    }

    fn suggest(mut self, suggestion: &str) -> SimError {
        if let SimError::Envelope { suggestions, .. } = &mut self {
            suggestions.push(suggestion.to_owned());
        }
        self
    }

    fn with_details(mut self, more: Vec<Value>) -> SimError {
        if let SimError::Envelope { details, .. } = &mut self {
            details.extend(more);
        }
        self
    }

    fn cvm_not_found(id: &str) -> SimError {
        SimError::envelope(
            StatusCode::NOT_FOUND,
            codes::CVM_NOT_FOUND,
            format!("CVM {id} not found"),
        )
        .suggest("Check the CVM id, app id or name.")
    }

    fn invalid_request(message: impl Into<String>) -> SimError {
        SimError::envelope(StatusCode::BAD_REQUEST, codes::INVALID_REQUEST, message)
    }

    fn token_invalid(why: &str) -> SimError {
        SimError::envelope(
            custom_status(466),
            codes::HASH_INVALID_OR_EXPIRED,
            format!("Commit token is invalid or expired: {why}"),
        )
        .suggest("Run the replica request with --prepare-only again to get a new token.")
    }

    fn unauthorized() -> SimError {
        SimError::envelope(
            StatusCode::UNAUTHORIZED,
            codes::INVALID_API_KEY,
            "Invalid or missing API key",
        )
        .suggest("Send a valid API key in the X-API-Key header.")
    }

    fn issue(kind: &str, loc: Value, msg: &str, input: &Value) -> Value {
        json!({"type": kind, "loc": loc, "msg": msg, "input": input})
    }
}

impl IntoResponse for SimError {
    fn into_response(self) -> Response {
        match self {
            SimError::Envelope {
                status,
                code,
                message,
                details,
                suggestions,
            } => {
                let body = json!({"detail": {
                    "error_code": code,
                    "message": message,
                    "details": details,
                    "suggestions": suggestions,
                    "links": [],
                }});
                (status, axum::Json(body)).into_response()
            }
            SimError::Validation(issues) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                axum::Json(json!({ "detail": issues })),
            )
                .into_response(),
            SimError::Internal(err) => {
                tracing::error!(error = format!("{err:#}"), "phala simulator failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    axum::Json(json!({"detail": "Internal Server Error"})),
                )
                    .into_response()
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Request bodies, validated the way pydantic v2 does in lax mode

#[derive(Clone, Copy)]
enum Kind {
    Int,
    Str,
    StrList,
}

/// Reads the fields of a JSON object body. An empty body is `{}`; every
/// field is optional unless `required`, and `null` counts as absent.
fn parse_model(body: &[u8], fields: &[(&str, Kind, bool)]) -> Result<Map<String, Value>, SimError> {
    let object = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => map,
            Ok(other) => {
                return Err(SimError::Validation(vec![SimError::issue(
                    "model_attributes_type",
                    json!(["body"]),
                    "Input should be a valid dictionary or object to extract fields from",
                    &other,
                )]));
            }
            Err(err) => {
                return Err(SimError::Validation(vec![json!({
                    "type": "json_invalid",
                    "loc": ["body", err.column().saturating_sub(1)],
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": err.to_string()},
                })]));
            }
        }
    };
    let mut issues = Vec::new();
    let mut out = Map::new();
    for (name, kind, required) in fields {
        let loc = json!(["body", name]);
        match object.get(*name) {
            None | Some(Value::Null) if *required => issues.push(SimError::issue(
                "missing",
                loc,
                "Field required",
                &Value::Object(object.clone()),
            )),
            None | Some(Value::Null) => {}
            Some(value) => match coerce(*kind, value) {
                Ok(v) => {
                    out.insert((*name).to_owned(), v);
                }
                Err((kind, msg)) => issues.push(SimError::issue(kind, loc, msg, value)),
            },
        }
    }
    if issues.is_empty() {
        Ok(out)
    } else {
        Err(SimError::Validation(issues))
    }
}

fn coerce(kind: Kind, value: &Value) -> Result<Value, (&'static str, &'static str)> {
    const NOT_STR: (&str, &str) = ("string_type", "Input should be a valid string");
    match kind {
        Kind::Str => value.as_str().map(Value::from).ok_or(NOT_STR),
        Kind::StrList => {
            let items = value
                .as_array()
                .ok_or(("list_type", "Input should be a valid list"))?;
            items
                .iter()
                .map(|item| item.as_str().map(Value::from).ok_or(NOT_STR))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array)
        }
        Kind::Int => match value {
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(value.clone()),
            Value::Number(n) => match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok((f as i64).into()),
                _ => Err((
                    "int_from_float",
                    "Input should be a valid integer, got a number with a fractional part",
                )),
            },
            Value::Bool(b) => Ok(i64::from(*b).into()),
            Value::String(s) => s.trim().parse::<i64>().map(Value::from).map_err(|_| {
                (
                    "int_parsing",
                    "Input should be a valid integer, unable to parse string as an integer",
                )
            }),
            _ => Err(("int_type", "Input should be a valid integer")),
        },
    }
}

// ---------------------------------------------------------------------------
// Pure rules

/// What the contract says about one replica's registrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Onchain {
    compose_hash_allowed: bool,
    /// `allowedDeviceIds(device) || allowAnyDevice()`.
    device_allowed: bool,
}

impl Onchain {
    fn json(self) -> Value {
        json!({
            "compose_hash_allowed": self.compose_hash_allowed,
            "device_id_allowed": self.device_allowed,
            "is_allowed": self.compose_hash_allowed && self.device_allowed,
        })
    }
}

/// What the commit's `transaction_hash` proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxEvidence {
    /// `already-registered` or no hash: state only.
    StateOnly,
    /// No receipt, a failed one, or no log from the app.
    Unrelated,
    /// Logs from the app, but not the expected `ComposeHashAdded(hash)` /
    /// `DeviceAdded(device)`.
    TouchedApp,
    /// A log of the expected change from the app.
    ExpectedChange,
}

/// Why a commit with a valid token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// 465 `ERR-01-005`.
    RegistrationRequired,
    /// 467 `ERR-01-007`.
    TxNotVerified,
    /// 468 `ERR-01-008`.
    HashNotAllowed,
}

/// The chain part of the commit checks, in the order of §6.
fn commit_verdict(onchain: Onchain, evidence: TxEvidence) -> Result<(), Refusal> {
    let touched = matches!(
        evidence,
        TxEvidence::TouchedApp | TxEvidence::ExpectedChange
    );
    if !onchain.compose_hash_allowed {
        return Err(if touched {
            Refusal::HashNotAllowed
        } else {
            Refusal::RegistrationRequired
        });
    }
    if !onchain.device_allowed {
        return Err(Refusal::RegistrationRequired);
    }
    match evidence {
        TxEvidence::StateOnly | TxEvidence::ExpectedChange => Ok(()),
        TxEvidence::Unrelated | TxEvidence::TouchedApp => Err(Refusal::TxNotVerified),
    }
}

/// Reads a receipt for what it shows about `app`.
fn receipt_evidence(
    receipt: Option<&TransactionReceipt>,
    app: Address,
    compose_hash: B256,
    device_id: B256,
) -> TxEvidence {
    let Some(receipt) = receipt.filter(|r| r.status()) else {
        return TxEvidence::Unrelated;
    };
    let app_logs: Vec<_> = receipt
        .logs()
        .iter()
        .filter(|log| log.address() == app)
        .collect();
    if app_logs.is_empty() {
        return TxEvidence::Unrelated;
    }
    let expected = app_logs.iter().any(|log| {
        let topic = log.topics().first().copied();
        let data = log.data().data.as_ref();
        (topic == Some(IDstackApp::ComposeHashAdded::SIGNATURE_HASH)
            && data == compose_hash.as_slice())
            || (topic == Some(IDstackApp::DeviceAdded::SIGNATURE_HASH)
                && data == device_id.as_slice())
    });
    if expected {
        TxEvidence::ExpectedChange
    } else {
        TxEvidence::TouchedApp
    }
}

/// A commit token's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    Live,
    /// A newer prepare of the same source CVM replaced it.
    Superseded,
    /// A commit succeeded with it.
    Spent,
}

/// Why a token does not commit, or `None` when it does.
fn token_problem(token: &IssuedToken, source: Uuid, now: DateTime<Utc>) -> Option<&'static str> {
    if token.source_vm_uuid != source {
        Some("the token was issued for another CVM")
    } else if token.state == TokenState::Spent {
        Some("the token was already used")
    } else if token.state == TokenState::Superseded {
        Some("a newer prepare for this CVM superseded the token")
    } else if now >= token.expires_at {
        Some("the token has expired")
    } else {
        None
    }
}

/// The node a replica goes to: the requested one, else the source's, else
/// the first (by id) with a free slot.
fn schedule(
    nodes: &[SimNode],
    slots: &HashMap<u32, u32>,
    requested: Option<i64>,
    source_node: u32,
) -> Result<u32, SimError> {
    let free = |id: u32| slots.get(&id).copied().unwrap_or(0) > 0;
    let full = |node: &SimNode| {
        SimError::envelope(
            StatusCode::BAD_REQUEST,
            codes::INSUFFICIENT_SLOTS,
            format!("Node {} ({}) has no free CVM slots", node.name, node.id),
        )
        .suggest("Choose another node.")
    };
    if let Some(id) = requested {
        let node = u32::try_from(id)
            .ok()
            .and_then(|id| nodes.iter().find(|n| n.id == id))
            .ok_or_else(|| {
                SimError::envelope(
                    StatusCode::BAD_REQUEST,
                    codes::NODE_NOT_FOUND,
                    format!("Node {id} not found"),
                )
                .suggest("List the available nodes with GET /teepods/available.")
            })?;
        return if free(node.id) {
            Ok(node.id)
        } else {
            Err(full(node))
        };
    }
    if free(source_node) {
        return Ok(source_node);
    }
    let mut ids: Vec<u32> = nodes.iter().map(|n| n.id).filter(|id| free(*id)).collect();
    ids.sort_unstable();
    match ids.first() {
        Some(id) => Ok(*id),
        None => Err(SimError::envelope(
            StatusCode::BAD_REQUEST,
            codes::INSUFFICIENT_SLOTS,
            "No node has a free CVM slot",
        )),
    }
}

// ---------------------------------------------------------------------------
// State

/// A commit token the simulator issued.
#[derive(Debug, Clone, PartialEq)]
pub struct IssuedToken {
    pub token: String,
    pub source_vm_uuid: Uuid,
    pub compose_hash: B256,
    pub node_id: u32,
    pub device_id: B256,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub state: TokenState,
    /// Decrypted `encrypted_env` of the prepare, for the replica.
    env: Option<BTreeMap<String, String>>,
}

/// A CVM as the simulator holds it: the world's and the replicas.
#[derive(Debug, Clone)]
struct CvmRecord {
    /// The numeric id of the legacy VM object.
    number: u64,
    spec: SimCvm,
    instance_id: String,
    created_at: DateTime<Utc>,
    /// When a replica is `running`; `None` keeps `spec.status`.
    ready_at: Option<DateTime<Utc>>,
    source: Option<Uuid>,
    env: Option<BTreeMap<String, String>>,
}

impl CvmRecord {
    fn status(&self, now: DateTime<Utc>) -> &str {
        match self.ready_at {
            Some(ready) if now < ready => "starting",
            Some(_) => "running",
            None => &self.spec.status,
        }
    }

    fn in_progress(&self, now: DateTime<Utc>) -> bool {
        self.ready_at.is_some_and(|ready| now < ready)
    }
}

/// A replica the simulator created.
#[derive(Debug, Clone, PartialEq)]
pub struct SimReplica {
    pub vm_uuid: Uuid,
    pub name: String,
    pub source_vm_uuid: Uuid,
    pub node_id: u32,
    pub compose_hash: B256,
    pub status: String,
    /// The env it got: decrypted `encrypted_env`, or the source's.
    pub env: Option<BTreeMap<String, String>>,
}

/// One HTTP request the simulator answered.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    pub method: String,
    /// The path, from `/api/v1/...`.
    pub path: String,
    pub query: Option<String>,
    /// `None` without `X-API-Key`, else whether it was the right key (the
    /// key itself is not kept).
    pub api_key_valid: Option<bool>,
    pub phala_version: Option<String>,
    pub prepare_only: Option<String>,
    pub body: String,
    pub status: u16,
}

#[derive(Default)]
struct SimState {
    cvms: Vec<CvmRecord>,
    free_slots: HashMap<u32, u32>,
    /// By token, in issue order per source through `issued_at`.
    tokens: Vec<IssuedToken>,
    prepare_calls: HashMap<Uuid, usize>,
    commit_calls: HashMap<Uuid, usize>,
    token_commit_calls: HashMap<String, usize>,
    requests: Vec<RecordedRequest>,
}

impl SimState {
    /// The CVM an id names: a UUID (dashes optional), `app_<hex>`, an
    /// instance id, or a name.
    fn resolve(&self, id: &str) -> Result<usize, SimError> {
        let found = |i: Option<usize>| i.ok_or_else(|| SimError::cvm_not_found(id));
        if matches!(id.len(), 32 | 36)
            && let Ok(uuid) = Uuid::try_parse(id)
        {
            return found(self.cvms.iter().position(|c| c.spec.vm_uuid == uuid));
        }
        if let Some(hex) = id.strip_prefix("app_") {
            let app = parse_app_id(hex).ok_or_else(|| SimError::cvm_not_found(id))?;
            let matches: Vec<usize> = (0..self.cvms.len())
                .filter(|i| self.cvms[*i].spec.app_id == app)
                .collect();
            return match matches.as_slice() {
                [] => Err(SimError::cvm_not_found(id)),
                [one] => Ok(*one),
                several => Err(SimError::envelope(
                    StatusCode::BAD_REQUEST,
                    codes::MULTIPLE_CVMS_MATCH,
                    format!("Identifier {id} matches {} CVMs", several.len()),
                )
                .with_details(
                    several
                        .iter()
                        .map(|i| json!({"field": "vm_uuid", "value": self.cvms[*i].spec.vm_uuid}))
                        .collect(),
                )
                .suggest(
                    "Use the CVM's vm_uuid, or list the app's CVMs with GET /apps/{app_id}/cvms.",
                )),
            };
        }
        if let Some(i) = self.cvms.iter().position(|c| c.instance_id == id) {
            return Ok(i);
        }
        let named: Vec<usize> = (0..self.cvms.len())
            .filter(|i| self.cvms[*i].spec.name == id)
            .collect();
        match named.as_slice() {
            [] => Err(SimError::cvm_not_found(id)),
            [one] => Ok(*one),
            _ => Err(SimError::envelope(
                StatusCode::BAD_REQUEST,
                codes::MULTIPLE_CVMS_SAME_NAME,
                format!("Several CVMs are named {id}"),
            )
            .suggest("Use the CVM's vm_uuid.")),
        }
    }

    /// The live CVM of `source`'s app that runs `wanted` (default: the
    /// source's own hash).
    fn configuration(&self, source: usize, wanted: Option<&str>) -> Result<usize, SimError> {
        let Some(text) = wanted else {
            return Ok(source);
        };
        let app = self.cvms[source].spec.app_id;
        let hash = parse_hex32(text).ok_or_else(|| {
            SimError::invalid_request(format!("compose_hash `{text}` is not 32 bytes of hex"))
        })?;
        if self.cvms[source].spec.compose_hash() == hash {
            return Ok(source);
        }
        self.cvms
            .iter()
            .position(|c| c.spec.app_id == app && c.spec.compose_hash() == hash)
            .ok_or_else(|| {
                SimError::invalid_request(format!(
                    "compose_hash {} is not a live configuration of app {}",
                    hex::encode(hash),
                    bare(app)
                ))
                .suggest("Pass the compose_hash of one of the app's running CVMs.")
            })
    }

    /// Creates a replica of `config` on `node`, taking one of its slots.
    fn create_replica(
        &mut self,
        source: Uuid,
        config: usize,
        node: u32,
        env: Option<BTreeMap<String, String>>,
        now: DateTime<Utc>,
        boot_delay: chrono::Duration,
    ) -> usize {
        let template = &self.cvms[config];
        let source_record = self
            .cvms
            .iter()
            .find(|c| c.spec.vm_uuid == source)
            .expect("the source exists");
        let vm_uuid = Uuid::new_v4();
        let name = format!(
            "{}-replica-{}",
            source_record.spec.name,
            &vm_uuid.simple().to_string()[..8]
        );
        let env = env.or_else(|| source_record.env.clone());
        let record = CvmRecord {
            number: self.cvms.len() as u64 + 1,
            spec: SimCvm {
                name,
                vm_uuid,
                node_id: node,
                status: "running".to_owned(),
                ..template.spec.clone()
            },
            instance_id: hex::encode(&Sha256::digest(vm_uuid.as_bytes())[..20]),
            created_at: now,
            ready_at: Some(now + boot_delay),
            source: Some(source),
            env,
        };
        if let Some(slots) = self.free_slots.get_mut(&node) {
            *slots = slots.saturating_sub(1);
        }
        self.cvms.push(record);
        self.cvms.len() - 1
    }
}

// ---------------------------------------------------------------------------
// The simulator

/// The running simulator: cheap to clone, every clone shares one state. When
/// the last clone is dropped, its server stops.
#[derive(Clone)]
pub struct PhalaSim {
    shared: Arc<Shared>,
    _server: Arc<ServerTask>,
}

struct Shared {
    world: PhalaWorld,
    chain: ChainClient,
    rpc_url: Url,
    /// `http://127.0.0.1:port/api/v1`
    base: Url,
    state: Mutex<SimState>,
}

struct ServerTask(tokio::task::JoinHandle<()>);

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::fmt::Debug for PhalaSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhalaSim")
            .field("base", &self.shared.base.as_str())
            .finish_non_exhaustive()
    }
}

impl PhalaSim {
    /// Serves `world` on `127.0.0.1:0`, reading the chain at `rpc_url`.
    /// Returns the API base URL (ending in `/api/v1`) and the handle.
    pub async fn spawn(world: PhalaWorld, rpc_url: Url) -> anyhow::Result<(Url, PhalaSim)> {
        world.check()?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let base = Url::parse(&format!("http://{}/api/v1", listener.local_addr()?))?;
        let now = world.clock.now();
        let state = SimState {
            cvms: world
                .cvms
                .iter()
                .zip(1u64..)
                .map(|(spec, number)| CvmRecord {
                    number,
                    spec: spec.clone(),
                    instance_id: hex::encode(&Sha256::digest(spec.vm_uuid.as_bytes())[..20]),
                    created_at: now,
                    ready_at: None,
                    source: None,
                    env: None,
                })
                .collect(),
            free_slots: world.nodes.iter().map(|n| (n.id, n.free_slots)).collect(),
            ..SimState::default()
        };
        let shared = Arc::new(Shared {
            chain: ChainClient::new(world.chain_id, rpc_url.clone()),
            rpc_url,
            world,
            base: base.clone(),
            state: Mutex::new(state),
        });
        let app = router(shared.clone());
        let task = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::error!(error = %err, "phala simulator stopped");
            }
        });
        let sim = PhalaSim {
            shared,
            _server: Arc::new(ServerTask(task)),
        };
        Ok((base, sim))
    }

    pub fn base_url(&self) -> &Url {
        &self.shared.base
    }

    pub fn world(&self) -> &PhalaWorld {
        &self.shared.world
    }

    pub fn api_key(&self) -> &str {
        &self.shared.world.api_key
    }

    /// The address whose signature `GET /kms/.../pubkey` returns.
    pub fn kms_signer_address(&self) -> Address {
        kms_signer().address()
    }

    /// `POST .../commit-replica` calls naming this source CVM (a UUID with or
    /// without dashes), accepted or refused.
    pub fn commit_calls(&self, source_vm_uuid: &str) -> usize {
        let Ok(uuid) = Uuid::try_parse(source_vm_uuid) else {
            return 0;
        };
        self.shared
            .lock()
            .commit_calls
            .get(&uuid)
            .copied()
            .unwrap_or(0)
    }

    /// Commit calls that carried this token, accepted or refused.
    pub fn token_commit_calls(&self, token: &str) -> usize {
        let state = self.shared.lock();
        state.token_commit_calls.get(token).copied().unwrap_or(0)
    }

    /// `POST .../replicas` calls on this source CVM that got past validation.
    pub fn prepare_calls(&self, source_vm_uuid: &str) -> usize {
        let Ok(uuid) = Uuid::try_parse(source_vm_uuid) else {
            return 0;
        };
        self.shared
            .lock()
            .prepare_calls
            .get(&uuid)
            .copied()
            .unwrap_or(0)
    }

    /// The commit tokens issued for a source CVM, oldest first.
    pub fn tokens(&self, source_vm_uuid: &str) -> Vec<IssuedToken> {
        let Ok(uuid) = Uuid::try_parse(source_vm_uuid) else {
            return Vec::new();
        };
        let state = self.shared.lock();
        state
            .tokens
            .iter()
            .filter(|t| t.source_vm_uuid == uuid)
            .cloned()
            .collect()
    }

    /// The replicas created from a source CVM, oldest first.
    pub fn replicas(&self, source_vm_uuid: &str) -> Vec<SimReplica> {
        let Ok(uuid) = Uuid::try_parse(source_vm_uuid) else {
            return Vec::new();
        };
        let now = self.shared.now();
        let state = self.shared.lock();
        state
            .cvms
            .iter()
            .filter(|c| c.source == Some(uuid))
            .map(|c| SimReplica {
                vm_uuid: c.spec.vm_uuid,
                name: c.spec.name.clone(),
                source_vm_uuid: uuid,
                node_id: c.spec.node_id,
                compose_hash: c.spec.compose_hash(),
                status: c.status(now).to_owned(),
                env: c.env.clone(),
            })
            .collect()
    }

    /// Free CVM slots of a node now.
    pub fn free_slots(&self, node_id: u32) -> Option<u32> {
        self.shared.lock().free_slots.get(&node_id).copied()
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().expect("phala sim state poisoned")
    }

    fn now(&self) -> DateTime<Utc> {
        self.world.clock.now()
    }

    fn key_status(&self, headers: &HeaderMap) -> Option<bool> {
        headers
            .get("x-api-key")
            .map(|key| key.as_bytes() == self.world.api_key.as_bytes())
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), SimError> {
        match self.key_status(headers) {
            Some(true) => Ok(()),
            _ => Err(SimError::unauthorized()),
        }
    }

    fn origin(&self) -> String {
        self.base.origin().ascii_serialization()
    }

    /// One `eth_call` (Multicall3) for the compose hash, the device and
    /// `allowAnyDevice`.
    async fn read_onchain(
        &self,
        app: Address,
        compose_hash: B256,
        device_id: B256,
    ) -> Result<Onchain, SimError> {
        let compose = Registration::ComposeHash(compose_hash);
        let device = Registration::Device(device_id);
        let states = self
            .chain
            .read_apps(&[(app, vec![compose, device])])
            .await
            .map_err(SimError::Internal)?;
        let state = states
            .get(&app)
            .ok_or_else(|| SimError::Internal(anyhow::anyhow!("no state read for {app}")))?;
        Ok(Onchain {
            compose_hash_allowed: state.is_allowed(&compose),
            device_allowed: state.is_allowed(&device),
        })
    }

    async fn tx_evidence(
        &self,
        tx_hash: &str,
        app: Address,
        compose_hash: B256,
        device_id: B256,
    ) -> Result<TxEvidence, SimError> {
        let Some(hash) = parse_hex32(tx_hash) else {
            return Ok(TxEvidence::Unrelated);
        };
        let receipt = self
            .chain
            .provider()
            .get_transaction_receipt(hash)
            .await
            .map_err(|err| SimError::Internal(err.into()))?;
        Ok(receipt_evidence(
            receipt.as_ref(),
            app,
            compose_hash,
            device_id,
        ))
    }

    fn kms_info(&self) -> Value {
        json!({
            "id": KMS_SLUG,
            "slug": KMS_SLUG,
            "url": format!("{}/kms/{KMS_SLUG}", self.origin()),
            "version": "v0.5.3",
            "chain_id": self.world.chain_id,
            "kms_contract_address": self.world.kms_contract.to_string().to_lowercase(),
            "gateway_app_id": null,
        })
    }

    fn node(&self, id: u32) -> &SimNode {
        self.world
            .nodes
            .iter()
            .find(|n| n.id == id)
            .expect("records only name nodes of the world")
    }

    /// `GET /cvms/{id}` in the shape `version` asks for.
    fn cvm_json(
        &self,
        record: &CvmRecord,
        now: DateTime<Utc>,
        version: &str,
        detail: bool,
    ) -> Value {
        let spec = &record.spec;
        let node = self.node(spec.node_id);
        let onchain = matches!(spec.kms, SimKms::Onchain { .. });
        let pubkey = (!onchain).then(|| env_public_key(spec.app_id));
        let status = record.status(now);
        let mut cvm = if version == OLD_API_VERSION {
            json!({
                "id": record.number,
                "name": spec.name,
                "status": status,
                "in_progress": record.in_progress(now),
                "teepod_id": node.id,
                "teepod": {"id": node.id, "name": node.name},
                "app_id": bare(spec.app_id),
                "vm_uuid": spec.vm_uuid.to_string(),
                "instance_id": record.instance_id,
                "compose_hash": hex::encode(spec.compose_hash()),
                "kms_info": if onchain { self.kms_info() } else { Value::Null },
                "contract_address": onchain.then(|| spec.app_id.to_string().to_lowercase()),
                "deployer_address": null,
                "encrypted_env_pubkey": pubkey,
                "created_at": timestamp(record.created_at),
            })
        } else {
            let kms_type = match &spec.kms {
                SimKms::Onchain { kms_type } => kms_type.as_str(),
                SimKms::Cloud => "phala",
            };
            json!({
                "id": hex::encode(&Sha256::digest(spec.vm_uuid.as_bytes())[..8]),
                "name": spec.name,
                "status": status,
                "app_id": bare(spec.app_id),
                "vm_uuid": spec.vm_uuid.to_string(),
                "instance_id": record.instance_id,
                "compose_hash": hex::encode(spec.compose_hash()),
                "resource": {"instance_type": "tdx.small", "vcpu": 1, "memory_in_gb": 2, "disk_in_gb": 20, "gpus": 0},
                "node_info": {
                    "object_type": "node", "id": node.id, "name": node.name, "region": node.region,
                    "device_id": hex::encode(node.device_id), "status": "online", "version": OS_VERSION,
                },
                "os": {"name": format!("dstack-{OS_VERSION}"), "version": OS_VERSION, "is_dev": false},
                "kms_type": kms_type,
                "kms_info": if onchain {
                    json!({
                        "chain_id": self.world.chain_id,
                        "dstack_kms_address": self.world.kms_contract.to_string().to_lowercase(),
                        "dstack_app_address": spec.app_id.to_string().to_lowercase(),
                        "deployer_address": null,
                        "rpc_endpoint": self.rpc_url.as_str(),
                        "encrypted_env_pubkey": null,
                    })
                } else {
                    json!({"chain_id": null, "encrypted_env_pubkey": pubkey})
                },
                "progress": if record.in_progress(now) {
                    json!({"target": "running", "started_at": timestamp(record.created_at), "correlation_id": null})
                } else {
                    Value::Null
                },
                "gateway": {"base_domain": null, "cname": null},
                "services": [],
                "endpoints": [],
                "public_logs": false,
                "public_sysinfo": false,
                "gateway_enabled": true,
                "secure_time": false,
                "listed": false,
                "workspace": {"id": self.world.workspace, "name": self.world.workspace, "slug": self.world.workspace},
                "created_at": timestamp(record.created_at),
            })
        };
        if detail {
            cvm["compose_file"] = spec.compose_file.clone();
        }
        cvm
    }

    /// The legacy VM object of §2, for created replicas.
    fn vm_json(&self, record: &CvmRecord, source: Option<&CvmRecord>, now: DateTime<Utc>) -> Value {
        let spec = &record.spec;
        let node = self.node(spec.node_id);
        let compose = &spec.compose_file;
        json!({
            "id": record.number,
            "name": spec.name,
            "status": record.status(now),
            "teepod_id": node.id,
            "teepod": {"id": node.id, "name": node.name, "region_identifier": node.region},
            "teepod_name": node.name,
            "user_id": 1,
            "app_id": bare(spec.app_id),
            "vm_uuid": spec.vm_uuid.to_string(),
            "instance_id": record.instance_id,
            "app_url": null,
            "base_image": format!("dstack-{OS_VERSION}"),
            "vcpu": 1,
            "memory": 2048,
            "disk_size": 20,
            "manifest_version": compose.get("manifest_version"),
            "version": OS_VERSION,
            "runner": compose.get("runner"),
            "docker_compose_file": compose.get("docker_compose_file"),
            "features": null,
            "created_at": timestamp(record.created_at),
            "encrypted_env_pubkey": matches!(spec.kms, SimKms::Cloud).then(|| env_public_key(spec.app_id)),
            "source_cvm_id": source.map(|s| s.number),
        })
    }

    /// The `details` of a 465 (§3).
    fn registration_details(
        &self,
        source: &CvmRecord,
        token: &IssuedToken,
        onchain: Onchain,
    ) -> Vec<Value> {
        let uuid = source.spec.vm_uuid;
        let commit_url = format!(
            "{}/{}/apps/{}/instances/{}/confirm-replica?token={}",
            self.origin(),
            self.world.workspace,
            bare(source.spec.app_id),
            uuid.simple(),
            token.token
        );
        let api_commit_url = format!(
            "{}/cvms/{uuid}/commit-replica?token={}",
            self.base, token.token
        );
        let field = |name: &str, value: Value| json!({"field": name, "value": value});
        vec![
            field("compose_hash", hex::encode(token.compose_hash).into()),
            field("app_id", bare(source.spec.app_id).into()),
            field("device_id", hex::encode(token.device_id).into()),
            field("kms_info", self.kms_info()),
            field("commit_token", token.token.clone().into()),
            field("commit_url", commit_url.into()),
            field("api_commit_url", api_commit_url.into()),
            field("onchain_status", onchain.json()),
        ]
    }

    fn registration_required(
        &self,
        source: &CvmRecord,
        token: &IssuedToken,
        onchain: Onchain,
    ) -> SimError {
        let mut needed = Vec::new();
        if !onchain.device_allowed {
            needed.push(format!("addDevice(0x{})", hex::encode(token.device_id)));
        }
        if !onchain.compose_hash_allowed {
            needed.push(format!(
                "addComposeHash(0x{})",
                hex::encode(token.compose_hash)
            ));
        }
        let message = if needed.is_empty() {
            "On-chain prerequisites are met; commit the replica with the token".to_owned()
        } else {
            format!(
                "Compose hash registration required on app 0x{}: {}",
                bare(source.spec.app_id),
                needed.join(", ")
            )
        };
        SimError::envelope(
            custom_status(465),
            codes::HASH_REGISTRATION_REQUIRED,
            message,
        )
        .with_details(self.registration_details(source, token, onchain))
        .suggest(
            "Execute the listed calls on the app's DstackApp contract, then commit with the token.",
        )
    }
}

// ---------------------------------------------------------------------------
// HTTP

fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/cvms/{id}", get(get_cvm))
        .route("/cvms/{id}/replicas", post(replicate))
        .route("/cvms/{id}/commit-replica", post(commit_replica))
        .route("/apps/{app_id}/cvms", get(app_cvms))
        .route("/teepods/available", get(available_nodes))
        .route("/kms/{kms_type}/pubkey/{app_id}", get(env_pubkey))
        .route("/status/batch", post(status_batch));
    Router::new()
        .nest("/api/v1", api)
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"detail": "Not Found"})),
            )
        })
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                axum::Json(json!({"detail": "Method Not Allowed"})),
            )
        })
        .layer(middleware::from_fn_with_state(shared.clone(), record))
        .with_state(shared)
}

/// Keeps every request (without the API key) and the status it got.
async fn record(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut entry = RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        api_key_valid: shared.key_status(&parts.headers),
        phala_version: header("x-phala-version"),
        prepare_only: header("x-prepare-only"),
        body: String::from_utf8_lossy(&body).into_owned(),
        status: 0,
    };
    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    entry.status = response.status().as_u16();
    shared.lock().requests.push(entry);
    response
}

/// `X-Phala-Version`; an unsupported value silently becomes the default (§1).
fn api_version(headers: &HeaderMap) -> &'static str {
    match headers.get("x-phala-version").and_then(|v| v.to_str().ok()) {
        Some(OLD_API_VERSION) => OLD_API_VERSION,
        _ => API_VERSION,
    }
}

async fn get_cvm(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, SimError> {
    shared.authorize(&headers)?;
    let now = shared.now();
    let state = shared.lock();
    let i = state.resolve(&id)?;
    Ok(axum::Json(shared.cvm_json(
        &state.cvms[i],
        now,
        api_version(&headers),
        true,
    )))
}

async fn app_cvms(
    State(shared): State<Arc<Shared>>,
    Path(app_id): Path<String>,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, SimError> {
    shared.authorize(&headers)?;
    let now = shared.now();
    let version = api_version(&headers);
    let not_found = || {
        SimError::envelope(
            StatusCode::NOT_FOUND,
            codes::CVM_NOT_FOUND,
            format!("No CVM of app {app_id} in this workspace"),
        )
    };
    let app = parse_app_id(&app_id).ok_or_else(not_found)?;
    let state = shared.lock();
    let cvms: Vec<Value> = state
        .cvms
        .iter()
        .filter(|c| c.spec.app_id == app)
        .map(|c| shared.cvm_json(c, now, version, false))
        .collect();
    if cvms.is_empty() {
        return Err(not_found());
    }
    Ok(axum::Json(Value::Array(cvms)))
}

async fn available_nodes(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, SimError> {
    shared.authorize(&headers)?;
    let state = shared.lock();
    let nodes: Vec<Value> = shared
        .world
        .nodes
        .iter()
        .map(|node| {
            let slots = state.free_slots.get(&node.id).copied().unwrap_or(0);
            json!({
                "teepod_id": node.id,
                "name": node.name,
                "listed": true,
                "resource_score": slots,
                "remaining_vcpu": slots,
                "remaining_memory": u64::from(slots) * 2048,
                "remaining_cvm_slots": slots,
                "images": [{"name": format!("dstack-{OS_VERSION}"), "is_dev": false, "version": [0, 5, 3]}],
                "support_onchain_kms": true,
                "fmspc": null,
                "device_id": hex::encode(node.device_id),
                "region_identifier": node.region,
                "default_kms": KMS_SLUG,
                "kms_list": [KMS_SLUG],
            })
        })
        .collect();
    Ok(axum::Json(json!({
        "tier": "sandbox",
        "capacity": {"max_instances": null, "max_vcpu": null, "max_memory": null, "max_disk": null},
        "nodes": nodes,
        "kms_list": [shared.kms_info()],
    })))
}

async fn env_pubkey(
    State(shared): State<Arc<Shared>>,
    Path((kms_type, app_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, SimError> {
    shared.authorize(&headers)?;
    if !matches!(kms_type.as_str(), "base" | "ethereum" | KMS_SLUG) {
        return Err(SimError::envelope(
            StatusCode::NOT_FOUND,
            codes::KMS_NOT_FOUND,
            format!("KMS {kms_type} not found"),
        ));
    }
    let app = parse_app_id(&app_id)
        .filter(|_| !app_id.starts_with("app_"))
        .ok_or_else(|| {
            SimError::invalid_request(format!("app_id `{app_id}` is not 40 hex digits"))
        })?;
    let public = PublicKey::from(&env_secret(app));
    let signature = kms_signer()
        .sign_hash_sync(&pubkey_message_hash(app, public.as_bytes()))
        .map_err(|err| SimError::Internal(err.into()))?;
    let mut rsv = signature.as_bytes();
    rsv[64] = u8::from(signature.v());
    Ok(axum::Json(json!({
        "public_key": hex::encode(public.as_bytes()),
        "signature": hex::encode(rsv),
    })))
}

async fn status_batch(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<axum::Json<Value>, SimError> {
    shared.authorize(&headers)?;
    let body = parse_model(&body, &[("vm_uuids", Kind::StrList, true)])?;
    let now = shared.now();
    let state = shared.lock();
    let mut out = Map::new();
    for id in body["vm_uuids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        let Ok(uuid) = Uuid::try_parse(id) else {
            continue;
        };
        if let Some(c) = state.cvms.iter().find(|c| c.spec.vm_uuid == uuid) {
            out.insert(
                id.to_owned(),
                json!({
                    "vm_uuid": id,
                    "status": c.status(now),
                    "uptime": null,
                    "in_progress": c.in_progress(now),
                    "boot_progress": if c.in_progress(now) { "booting" } else { "done" },
                    "boot_error": null,
                    "operation_type": c.in_progress(now).then_some("create"),
                    "operation_started_at": c.in_progress(now).then(|| timestamp(c.created_at)),
                    "correlation_id": null,
                }),
            );
        }
    }
    Ok(axum::Json(Value::Object(out)))
}

/// `POST /cvms/{id}/replicas`.
async fn replicate(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, SimError> {
    shared.authorize(&headers)?;
    let body = parse_model(
        &body,
        &[
            ("node_id", Kind::Int, false),
            ("teepod_id", Kind::Int, false),
            ("compose_hash", Kind::Str, false),
            ("encrypted_env", Kind::Str, false),
        ],
    )?;
    let requested_node = body
        .get("node_id")
        .or_else(|| body.get("teepod_id"))
        .and_then(Value::as_i64);
    let now = shared.now();

    let (source, config, node) = {
        let mut state = shared.lock();
        let source = state.resolve(&id)?;
        let uuid = state.cvms[source].spec.vm_uuid;
        *state.prepare_calls.entry(uuid).or_default() += 1;
        let config =
            state.configuration(source, body.get("compose_hash").and_then(Value::as_str))?;
        let node = schedule(
            &shared.world.nodes,
            &state.free_slots,
            requested_node,
            state.cvms[source].spec.node_id,
        )?;
        (state.cvms[source].clone(), state.cvms[config].clone(), node)
    };
    let env = match body.get("encrypted_env").and_then(Value::as_str) {
        Some(encrypted) => Some(
            decrypt_env(&env_secret(source.spec.app_id), encrypted)
                .map_err(SimError::invalid_request)?,
        ),
        None => None,
    };

    if source.spec.kms == SimKms::Cloud {
        // X-Prepare-Only has no effect without on-chain KMS (§3.1).
        let mut state = shared.lock();
        let config = state
            .cvms
            .iter()
            .position(|c| c.spec.vm_uuid == config.spec.vm_uuid)
            .expect("CVMs are never removed");
        let replica = state.create_replica(
            source.spec.vm_uuid,
            config,
            node,
            env,
            now,
            shared.world.boot_delay,
        );
        let vm = shared.vm_json(&state.cvms[replica], Some(&source), now);
        return Ok((StatusCode::OK, axum::Json(vm)).into_response());
    }

    let compose_hash = config.spec.compose_hash();
    let device_id = shared.node(node).device_id;
    let onchain = shared
        .read_onchain(source.spec.app_id, compose_hash, device_id)
        .await?;
    let token = IssuedToken {
        token: Uuid::new_v4().to_string(),
        source_vm_uuid: source.spec.vm_uuid,
        compose_hash,
        node_id: node,
        device_id,
        issued_at: now,
        expires_at: now + shared.world.token_ttl,
        state: TokenState::Live,
        env,
    };
    {
        let mut state = shared.lock();
        for older in state
            .tokens
            .iter_mut()
            .filter(|t| t.source_vm_uuid == source.spec.vm_uuid && t.state == TokenState::Live)
        {
            older.state = TokenState::Superseded;
        }
        state.tokens.push(token.clone());
    }
    Err(shared.registration_required(&source, &token, onchain))
}

/// `POST /cvms/{id}/commit-replica`: no API key needed (§5).
async fn commit_replica(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<axum::Json<Value>, SimError> {
    let token_required = !query.contains_key("token");
    let body = parse_model(
        &body,
        &[
            ("token", Kind::Str, token_required),
            ("compose_hash", Kind::Str, false),
            ("transaction_hash", Kind::Str, false),
        ],
    )?;
    let token_text = body
        .get("token")
        .and_then(Value::as_str)
        .or(query.get("token").map(String::as_str))
        .unwrap_or_default()
        .to_owned();
    let now = shared.now();

    let (source, token) = {
        let mut state = shared.lock();
        let source = state.resolve(&id)?;
        let source = state.cvms[source].clone();
        *state.commit_calls.entry(source.spec.vm_uuid).or_default() += 1;
        *state
            .token_commit_calls
            .entry(token_text.clone())
            .or_default() += 1;
        let token = state
            .tokens
            .iter()
            .find(|t| t.token == token_text)
            .cloned()
            .ok_or_else(|| SimError::token_invalid("unknown token"))?;
        if let Some(why) = token_problem(&token, source.spec.vm_uuid, now) {
            return Err(SimError::token_invalid(why));
        }
        if let Some(text) = body.get("compose_hash").and_then(Value::as_str)
            && parse_hex32(text) != Some(token.compose_hash)
        {
            return Err(SimError::token_invalid(
                "the compose hash does not match the one the token was issued for",
            ));
        }
        (source, token)
    };

    let app = source.spec.app_id;
    let onchain = shared
        .read_onchain(app, token.compose_hash, token.device_id)
        .await?;
    let evidence = match body.get("transaction_hash").and_then(Value::as_str) {
        None | Some(ALREADY_REGISTERED) => TxEvidence::StateOnly,
        Some(tx) => {
            shared
                .tx_evidence(tx, app, token.compose_hash, token.device_id)
                .await?
        }
    };
    match commit_verdict(onchain, evidence) {
        Ok(()) => {}
        Err(Refusal::RegistrationRequired) => {
            return Err(shared.registration_required(&source, &token, onchain));
        }
        Err(Refusal::HashNotAllowed) => {
            return Err(SimError::envelope(
                custom_status(468),
                codes::HASH_NOT_ALLOWED,
                format!(
                    "Compose hash {} is not allowed by app 0x{}",
                    hex::encode(token.compose_hash),
                    bare(app)
                ),
            )
            .suggest("Call addComposeHash on the app's DstackApp contract, then commit again."));
        }
        Err(Refusal::TxNotVerified) => {
            return Err(SimError::envelope(
                custom_status(467),
                codes::TX_VERIFICATION_FAILED,
                format!(
                    "Transaction {} does not show the expected change on app 0x{}",
                    body.get("transaction_hash").and_then(Value::as_str).unwrap_or_default(),
                    bare(app)
                ),
            )
            .suggest("Commit with transaction_hash `already-registered` to verify the contract state only."));
        }
    }

    let mut state = shared.lock();
    // Re-checked under the lock: of two concurrent commits, one wins.
    let index = state
        .tokens
        .iter()
        .position(|t| t.token == token.token)
        .expect("tokens are never removed");
    if let Some(why) = token_problem(&state.tokens[index], source.spec.vm_uuid, now) {
        return Err(SimError::token_invalid(why));
    }
    if state.free_slots.get(&token.node_id).copied().unwrap_or(0) == 0 {
        let node = shared.node(token.node_id);
        return Err(SimError::envelope(
            StatusCode::BAD_REQUEST,
            codes::INSUFFICIENT_SLOTS,
            format!("Node {} ({}) has no free CVM slots", node.name, node.id),
        ));
    }
    state.tokens[index].state = TokenState::Spent;
    let config = state
        .cvms
        .iter()
        .position(|c| c.spec.app_id == app && c.spec.compose_hash() == token.compose_hash)
        .unwrap_or_else(|| {
            state
                .cvms
                .iter()
                .position(|c| c.spec.vm_uuid == source.spec.vm_uuid)
                .expect("the source exists")
        });
    let replica = state.create_replica(
        source.spec.vm_uuid,
        config,
        token.node_id,
        token.env.clone(),
        now,
        shared.world.boot_delay,
    );
    Ok(axum::Json(shared.vm_json(
        &state.cvms[replica],
        Some(&source),
        now,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compose_hash_is_sha256_of_sorted_compact_json() {
        let manifest = json!({"b": 1, "a": "x"});
        let expected = Sha256::digest(br#"{"a":"x","b":1}"#);
        assert_eq!(compose_hash(&manifest).as_slice(), expected.as_slice());
        let cvm = SimCvm::onchain("web", Address::ZERO, 1);
        assert_ne!(
            cvm.compose_hash(),
            cvm.clone().revision("v2").compose_hash()
        );
        assert_eq!(
            cvm.compose_hash(),
            SimCvm::onchain("web", Address::ZERO, 1).compose_hash()
        );
    }

    #[test]
    fn standard_world_has_two_configurations_of_one_app_and_a_full_node() {
        let web = Address::repeat_byte(1);
        let api = Address::repeat_byte(2);
        let world = PhalaWorld::standard(31337, web, api);
        world.check().unwrap();
        let prod = world.cvm(standard::API).unwrap();
        let canary = world.cvm(standard::API_CANARY).unwrap();
        assert_eq!(prod.app_id, canary.app_id);
        assert_ne!(prod.compose_hash(), canary.compose_hash());
        assert_eq!(world.node("prod-full").unwrap().free_slots, 0);
        assert_eq!(world.cvm(standard::DOCS).unwrap().kms, SimKms::Cloud);
        let devices: std::collections::HashSet<_> =
            world.nodes.iter().map(|n| n.device_id).collect();
        assert_eq!(devices.len(), world.nodes.len());
    }

    #[test]
    fn world_check_refuses_duplicates_and_unknown_nodes() {
        let twice = PhalaWorld::new(1)
            .with_cvm(SimCvm::cloud("a", 1))
            .with_cvm(SimCvm::cloud("a", 2));
        assert!(twice.check().is_err());
        let nowhere = PhalaWorld::new(1).with_cvm(SimCvm::cloud("a", 99));
        assert!(nowhere.check().is_err());
    }

    fn issue_of(err: SimError) -> Vec<Value> {
        match err {
            SimError::Validation(issues) => issues,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn bodies_are_validated_like_pydantic() {
        let fields = [
            ("node_id", Kind::Int, false),
            ("compose_hash", Kind::Str, false),
        ];
        let ok = parse_model(
            br#"{"node_id": "3", "compose_hash": "ab", "extra": 1}"#,
            &fields,
        )
        .unwrap();
        assert_eq!(ok["node_id"], json!(3));
        assert!(!ok.contains_key("extra"));
        assert!(parse_model(b"", &fields).unwrap().is_empty());
        assert!(
            parse_model(br#"{"node_id": null}"#, &fields)
                .unwrap()
                .is_empty()
        );

        let issues = issue_of(
            parse_model(br#"{"node_id": "prod-2", "compose_hash": 5}"#, &fields).unwrap_err(),
        );
        assert_eq!(issues.len(), 2);
        assert_eq!(issues[0]["type"], "int_parsing");
        assert_eq!(issues[0]["loc"], json!(["body", "node_id"]));
        assert_eq!(issues[0]["input"], "prod-2");
        assert_eq!(issues[1]["type"], "string_type");

        let issues = issue_of(parse_model(br#"{"node_id": 2.5}"#, &fields).unwrap_err());
        assert_eq!(issues[0]["type"], "int_from_float");
        let issues = issue_of(parse_model(b"[1]", &fields).unwrap_err());
        assert_eq!(issues[0]["type"], "model_attributes_type");
        let issues = issue_of(parse_model(b"{nope", &fields).unwrap_err());
        assert_eq!(issues[0]["type"], "json_invalid");
        let issues = issue_of(parse_model(b"{}", &[("token", Kind::Str, true)]).unwrap_err());
        assert_eq!(issues[0]["type"], "missing");
        assert_eq!(issues[0]["msg"], "Field required");
    }

    #[test]
    fn commit_verdict_follows_the_documented_order() {
        let allowed = Onchain {
            compose_hash_allowed: true,
            device_allowed: true,
        };
        let no_hash = Onchain {
            compose_hash_allowed: false,
            device_allowed: true,
        };
        let no_device = Onchain {
            compose_hash_allowed: true,
            device_allowed: false,
        };
        use Refusal::*;
        use TxEvidence::*;
        assert_eq!(commit_verdict(allowed, StateOnly), Ok(()));
        assert_eq!(commit_verdict(allowed, ExpectedChange), Ok(()));
        assert_eq!(commit_verdict(allowed, Unrelated), Err(TxNotVerified));
        assert_eq!(commit_verdict(allowed, TouchedApp), Err(TxNotVerified));
        assert_eq!(
            commit_verdict(no_hash, StateOnly),
            Err(RegistrationRequired)
        );
        assert_eq!(
            commit_verdict(no_hash, Unrelated),
            Err(RegistrationRequired)
        );
        assert_eq!(commit_verdict(no_hash, TouchedApp), Err(HashNotAllowed));
        assert_eq!(commit_verdict(no_hash, ExpectedChange), Err(HashNotAllowed));
        assert_eq!(
            commit_verdict(no_device, StateOnly),
            Err(RegistrationRequired)
        );
        assert_eq!(
            commit_verdict(no_device, ExpectedChange),
            Err(RegistrationRequired)
        );
    }

    #[test]
    fn token_problems() {
        let now = Utc::now();
        let source = uuid_for("s");
        let token = IssuedToken {
            token: "t".into(),
            source_vm_uuid: source,
            compose_hash: B256::ZERO,
            node_id: 1,
            device_id: B256::ZERO,
            issued_at: now,
            expires_at: now + chrono::Duration::days(14),
            state: TokenState::Live,
            env: None,
        };
        assert_eq!(token_problem(&token, source, now), None);
        assert!(token_problem(&token, uuid_for("other"), now).is_some());
        assert!(
            token_problem(&token, source, token.expires_at)
                .unwrap()
                .contains("expired")
        );
        let spent = IssuedToken {
            state: TokenState::Spent,
            ..token.clone()
        };
        assert!(token_problem(&spent, source, now).unwrap().contains("used"));
        let old = IssuedToken {
            state: TokenState::Superseded,
            ..token
        };
        assert!(
            token_problem(&old, source, now)
                .unwrap()
                .contains("newer prepare")
        );
    }

    #[test]
    fn scheduling_prefers_the_request_then_the_source_node() {
        let nodes = PhalaWorld::new(1).nodes;
        let slots: HashMap<u32, u32> = nodes.iter().map(|n| (n.id, n.free_slots)).collect();
        assert_eq!(schedule(&nodes, &slots, Some(3), 1).unwrap(), 3);
        assert_eq!(schedule(&nodes, &slots, None, 2).unwrap(), 2);
        assert_eq!(schedule(&nodes, &slots, None, 4).unwrap(), 1);
        let code = |err: SimError| match err {
            SimError::Envelope { code, .. } => code,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            code(schedule(&nodes, &slots, Some(4), 1).unwrap_err()),
            codes::INSUFFICIENT_SLOTS
        );
        assert_eq!(
            code(schedule(&nodes, &slots, Some(99), 1).unwrap_err()),
            codes::NODE_NOT_FOUND
        );
        let none: HashMap<u32, u32> = nodes.iter().map(|n| (n.id, 0)).collect();
        assert_eq!(
            code(schedule(&nodes, &none, None, 1).unwrap_err()),
            codes::INSUFFICIENT_SLOTS
        );
    }

    #[test]
    fn env_encrypted_by_the_bridge_decrypts_with_the_app_key() {
        let app = Address::repeat_byte(7);
        let env = BTreeMap::from([("API_URL".to_owned(), "http://x".to_owned())]);
        let encrypted = crate::phala::encrypt_env(&env_public_key(app), &env).unwrap();
        assert_eq!(decrypt_env(&env_secret(app), &encrypted).unwrap(), env);
        assert!(decrypt_env(&env_secret(Address::repeat_byte(8)), &encrypted).is_err());
        assert!(decrypt_env(&env_secret(app), "zz").is_err());
    }

    #[test]
    fn env_pubkey_signature_recovers_to_the_kms_signer() {
        let app = Address::repeat_byte(9);
        let public = PublicKey::from(&env_secret(app));
        let hash = pubkey_message_hash(app, public.as_bytes());
        let signature = kms_signer().sign_hash_sync(&hash).unwrap();
        assert_eq!(
            signature.recover_address_from_prehash(&hash).unwrap(),
            kms_signer().address()
        );
    }

    #[test]
    fn ids_parse_with_or_without_prefixes() {
        let app = Address::repeat_byte(0xab);
        let hex40 = "ab".repeat(20);
        assert_eq!(parse_app_id(&hex40), Some(app));
        assert_eq!(parse_app_id(&format!("app_{hex40}")), Some(app));
        assert_eq!(parse_app_id(&format!("0x{hex40}")), Some(app));
        assert_eq!(parse_app_id("app_12"), None);
        let hash = B256::repeat_byte(0x11);
        assert_eq!(parse_hex32(&"11".repeat(32)), Some(hash));
        assert_eq!(parse_hex32(&format!("0x{}", "11".repeat(32))), Some(hash));
        assert_eq!(parse_hex32("0x11"), None);
    }
}
