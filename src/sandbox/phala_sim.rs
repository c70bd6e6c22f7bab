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
//!
//! Layout: `world` is what the simulator starts with, `state` what it
//! remembers, `rules` the pure chain and token checks, `answers` the typed
//! JSON of every success answer (after the SDK's zod schemas), `errors` and
//! `bodies` the error answers and request validation; this file holds the
//! env keys, the chain reads and the HTTP handlers.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use alloy::primitives::{Address, B256, keccak256};
use alloy::providers::Provider;
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::Url;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::chain::{ChainClient, Registration};

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

mod answers;
mod bodies;
mod errors;
mod rules;
mod state;
mod world;

pub use state::{IssuedToken, RecordedRequest, SimReplica, TokenState};
pub use world::{PhalaWorld, SimCvm, SimKms, SimNode, compose_hash, device_id_for, standard};

use bodies::{Kind, parse_model};
use errors::{SimError, custom_status};
use rules::{
    Onchain, Refusal, TxEvidence, commit_verdict, receipt_evidence, schedule, token_problem,
};
use state::{CvmRecord, SimState};

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
    /// Added before every answer, in milliseconds: a slow Phala for the bench.
    latency_ms: AtomicU64,
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
            latency_ms: AtomicU64::new(0),
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

    /// Holds every answer back by `latency` from now on.
    pub fn set_latency(&self, latency: std::time::Duration) {
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        self.shared.latency_ms.store(ms, Ordering::Relaxed);
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

    fn node(&self, id: u32) -> &SimNode {
        self.world
            .nodes
            .iter()
            .find(|n| n.id == id)
            .expect("records only name nodes of the world")
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
            field("kms_info", json!(self.kms_info())),
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
        .route("/cvms/paginated", get(list_cvms))
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

/// Keeps every request (without the API key) and the status it got, and
/// holds the answer back by the configured latency.
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
    let latency = shared.latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(latency)).await;
    }
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
) -> Result<Response, SimError> {
    shared.authorize(&headers)?;
    let now = shared.now();
    let state = shared.lock();
    let record = &state.cvms[state.resolve(&id)?];
    Ok(match api_version(&headers) {
        OLD_API_VERSION => axum::Json(shared.cvm_detail_v20251028(record, now)).into_response(),
        _ => axum::Json(shared.cvm_info(record, now, true)).into_response(),
    })
}

/// `page` and `page_size` of a paginated list (from 1; at most 100 a page).
#[derive(Debug, serde::Deserialize)]
struct PageQuery {
    page: Option<usize>,
    page_size: Option<usize>,
}

/// `GET /cvms/paginated`: the workspace's CVMs, oldest first, one page of
/// them, with its manifest (2026-01-21 shape only: the page's queue form
/// reads it).
async fn list_cvms(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<PageQuery>,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, SimError> {
    shared.authorize(&headers)?;
    let page = query.page.unwrap_or(1).max(1);
    let page_size = query.page_size.unwrap_or(100).clamp(1, 100);
    let now = shared.now();
    let state = shared.lock();
    let total = state.cvms.len();
    let items: Vec<_> = state
        .cvms
        .iter()
        .skip((page - 1) * page_size)
        .take(page_size)
        .map(|c| shared.cvm_info(c, now, true))
        .collect();
    Ok(axum::Json(json!({
        "items": items, "total": total, "page": page, "page_size": page_size,
        "pages": total.div_ceil(page_size).max(1),
    })))
}

/// `GET /apps/{app_id}/cvms`: every CVM of the app, the world's and the
/// replicas, oldest first.
async fn app_cvms(
    State(shared): State<Arc<Shared>>,
    Path(app_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, SimError> {
    shared.authorize(&headers)?;
    let now = shared.now();
    let not_found = || {
        SimError::envelope(
            StatusCode::NOT_FOUND,
            codes::CVM_NOT_FOUND,
            format!("No CVM of app {app_id} in this workspace"),
        )
    };
    let app = parse_app_id(&app_id).ok_or_else(not_found)?;
    let state = shared.lock();
    let records: Vec<&CvmRecord> = state.cvms.iter().filter(|c| c.spec.app_id == app).collect();
    if records.is_empty() {
        return Err(not_found());
    }
    Ok(match api_version(&headers) {
        OLD_API_VERSION => {
            let cvms: Vec<_> = records
                .iter()
                .map(|c| shared.cvm_info_v20251028(c, now))
                .collect();
            axum::Json(cvms).into_response()
        }
        _ => {
            let cvms: Vec<_> = records
                .iter()
                .map(|c| shared.cvm_info(c, now, false))
                .collect();
            axum::Json(cvms).into_response()
        }
    })
}

async fn available_nodes(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<axum::Json<answers::AvailableNodes>, SimError> {
    shared.authorize(&headers)?;
    let state = shared.lock();
    Ok(axum::Json(shared.available_nodes(&state.free_slots)))
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
) -> Result<axum::Json<BTreeMap<String, answers::CvmStatus>>, SimError> {
    shared.authorize(&headers)?;
    let body = parse_model(&body, &[("vm_uuids", Kind::StrList, true)])?;
    let now = shared.now();
    let state = shared.lock();
    let mut out = BTreeMap::new();
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
            out.insert(id.to_owned(), answers::CvmStatus::of(c, id, now));
        }
    }
    Ok(axum::Json(out))
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
        let vm = shared.vm(&state.cvms[replica], Some(&source), now);
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
) -> Result<axum::Json<answers::Vm>, SimError> {
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
    Ok(axum::Json(shared.vm(
        &state.cvms[replica],
        Some(&source),
        now,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

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
