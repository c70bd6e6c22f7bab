//! A fake Safe Transaction Service for the tests and the sandbox.
//!
//! It keeps proposals, confirmations and delegates in memory and reads the
//! chain over JSON-RPC, so it enforces the rules the real service enforces
//! (safe.md §2.2, §2.4) instead of accepting anything:
//!
//! - EIP-55 addresses in the path and the body;
//! - `contractTransactionHash` recomputed from the Safe's on-chain
//!   `VERSION()` and the RPC's chain id;
//! - DELEGATECALL only to the pinned MultiSendCallOnly of the Safe's version;
//! - no proposal for a nonce the Safe has already used;
//! - `sender` an on-chain owner or a registered delegate of one, and every
//!   signature recovering to an owner or delegate, one of them `sender`;
//! - `get_or_create` on `safeTxHash`: a repeat POST is 201 again, no duplicate.
//!
//! Success is 201 with an empty body; a rejection is 422 with DRF-style
//! errors (`{"nonFieldErrors": [...]}` or `{field: [msg]}`). Where the
//! reference gives the real message it is used word for word; other
//! wordings are this fake's own and marked so.
//!
//! Unlike the real service, execution status is read from the chain on every
//! GET (there is no indexer to wait for), and only EOA signatures (v 27/28,
//! eth_sign 31/32) are understood.
//!
//! Layout: `fields` reads request bodies as DRF does, `rules` is the
//! validation (pure), `chain` the chain reads; this file holds the state and
//! the HTTP handlers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use alloy::primitives::{Address, B256, Bytes};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use axum::Router;
use axum::body::Bytes as BodyBytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::Url;
use serde_json::{Value, json};

use crate::safe::tx::SignatureKind;
use crate::safe::{SafeTx, recover_signer, split_signatures};

mod chain;
mod fields;
mod rules;

use fields::{
    FieldErrors, Fields, Rejection, UNPROCESSABLE, checksummed_address, json_object, path_address,
};
use rules::{check_delegate_signature, parse_delegate, parse_proposal, py_list, validate_proposal};

/// The fake service: cheap to clone, every clone shares one state. When the
/// last clone of a [`spawn`](Self::spawn)ed service is dropped, its server
/// stops.
#[derive(Clone)]
pub struct SafeServiceSim {
    shared: Arc<Shared>,
    server: Option<Arc<ServerTask>>,
}

struct Shared {
    rpc: DynProvider,
    state: Mutex<SimState>,
}

#[derive(Default)]
struct SimState {
    transactions: HashMap<B256, StoredTx>,
    /// Every POST naming a `contractTransactionHash`, accepted or not.
    posts: HashMap<B256, usize>,
    delegates: Vec<StoredDelegate>,
}

#[derive(Clone)]
struct StoredTx {
    safe: Address,
    tx: SafeTx,
    safe_tx_hash: B256,
    proposer: Address,
    proposed_by_delegate: Option<Address>,
    confirmations: Vec<StoredConfirmation>,
    trusted: bool,
    origin: Option<String>,
    submitted: DateTime<Utc>,
    modified: DateTime<Utc>,
}

#[derive(Clone)]
struct StoredConfirmation {
    owner: Address,
    signature: Bytes,
    kind: SignatureKind,
    submitted: DateTime<Utc>,
}

#[derive(Clone)]
struct StoredDelegate {
    safe: Option<Address>,
    delegate: Address,
    delegator: Address,
    label: String,
    expiry: Option<DateTime<Utc>>,
}

struct ServerTask(tokio::task::JoinHandle<()>);

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl SafeServiceSim {
    /// A service reading the chain at `rpc_url`, not yet listening: mount
    /// [`router`](Self::router) yourself, or use [`spawn`](Self::spawn).
    pub fn new(rpc_url: Url) -> SafeServiceSim {
        let rpc = ProviderBuilder::new()
            .disable_recommended_fillers()
            .connect_http(rpc_url)
            .erased();
        SafeServiceSim {
            shared: Arc::new(Shared {
                rpc,
                state: Mutex::new(SimState::default()),
            }),
            server: None,
        }
    }

    /// Serves the fake on `127.0.0.1:0`; returns its base URL (the service
    /// root: paths start with `/api/`) and the handle.
    pub async fn spawn(rpc_url: Url) -> anyhow::Result<(Url, SafeServiceSim)> {
        let mut sim = SafeServiceSim::new(rpc_url);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let base = Url::parse(&format!("http://{}/", listener.local_addr()?))?;
        let app = sim.router();
        let task = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::error!(error = %err, "safe service simulator stopped");
            }
        });
        sim.server = Some(Arc::new(ServerTask(task)));
        Ok((base, sim))
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/api/v2/safes/{address}/multisig-transactions/",
                post(propose).get(list_transactions),
            )
            .route(
                "/api/v2/multisig-transactions/{safe_tx_hash}/",
                get(get_transaction),
            )
            .route(
                "/api/v1/multisig-transactions/{safe_tx_hash}/confirmations/",
                post(add_confirmation),
            )
            .route("/api/v2/delegates/", post(add_delegate).get(list_delegates))
            .fallback(|| async {
                (
                    StatusCode::NOT_FOUND,
                    axum::Json(json!({"detail": "Not found."})),
                )
            })
            .with_state(self.shared.clone())
    }

    /// How many POSTs named this `safeTxHash` as `contractTransactionHash`,
    /// accepted or rejected. With [`stored_transactions`](Self::stored_transactions)
    /// it shows that a retried proposal reached the service twice and was
    /// stored once.
    pub fn proposal_posts(&self, safe_tx_hash: B256) -> usize {
        let state = self.shared.state.lock().expect("sim state poisoned");
        state.posts.get(&safe_tx_hash).copied().unwrap_or(0)
    }

    /// How many proposal POSTs reached the service in all, accepted or
    /// rejected: 0 shows that nothing was proposed.
    pub fn proposal_posts_total(&self) -> usize {
        let state = self.shared.state.lock().expect("sim state poisoned");
        state.posts.values().sum()
    }

    /// How many distinct proposals the service holds.
    pub fn stored_transactions(&self) -> usize {
        let state = self.shared.state.lock().expect("sim state poisoned");
        state.transactions.len()
    }

    /// The owners whose confirmation the service holds for a proposal.
    pub fn confirmations(&self, safe_tx_hash: B256) -> Vec<Address> {
        let state = self.shared.state.lock().expect("sim state poisoned");
        state
            .transactions
            .get(&safe_tx_hash)
            .map(|t| t.confirmations.iter().map(|c| c.owner).collect())
            .unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------
// Handlers

type Sim = State<Arc<Shared>>;

fn unix_now() -> u64 {
    u64::try_from(Utc::now().timestamp()).unwrap_or_default()
}

fn timestamp(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The (delegate, delegator) pairs that may propose for `safe` now.
fn valid_delegates(state: &SimState, safe: Address, owners: &[Address]) -> Vec<(Address, Address)> {
    let now = Utc::now();
    state
        .delegates
        .iter()
        .filter(|d| d.safe.is_none_or(|s| s == safe))
        .filter(|d| d.expiry.is_none_or(|e| e > now))
        .filter(|d| owners.contains(&d.delegator))
        .map(|d| (d.delegate, d.delegator))
        .collect()
}

async fn propose(
    State(shared): Sim,
    Path(address): Path<String>,
    body: BodyBytes,
) -> Result<StatusCode, Rejection> {
    let safe = path_address(&address)?;
    let json = json_object(&body, UNPROCESSABLE)?;
    if let Some(hash) = json
        .get("contractTransactionHash")
        .and_then(Value::as_str)
        .and_then(|h| h.parse::<B256>().ok())
    {
        let mut state = shared.state.lock().expect("sim state poisoned");
        *state.posts.entry(hash).or_default() += 1;
    }
    let proposal = parse_proposal(&json).map_err(|e| Rejection::fields(UNPROCESSABLE, e))?;

    let facts = shared.safe_facts(safe).await?;
    let executions = shared.executions(safe).await?;
    let delegates = {
        let state = shared.state.lock().expect("sim state poisoned");
        valid_delegates(&state, safe, &facts.owners)
    };
    let accepted = validate_proposal(&proposal, safe, &facts, &delegates, &executions)
        .map_err(|message| Rejection::non_field(UNPROCESSABLE, message))?;

    let now = Utc::now();
    let hash = proposal.contract_transaction_hash;
    let mut state = shared.state.lock().expect("sim state poisoned");
    let stored = state.transactions.entry(hash).or_insert_with(|| StoredTx {
        safe,
        tx: proposal.tx.clone(),
        safe_tx_hash: hash,
        proposer: accepted.proposer,
        proposed_by_delegate: accepted.proposed_by_delegate,
        confirmations: Vec::new(),
        trusted: false,
        origin: proposal.origin.clone(),
        submitted: now,
        modified: now,
    });
    // A repeat adds the owner confirmations it brings; nothing else changes.
    for (owner, signature, kind) in accepted.confirmations {
        if !stored.confirmations.iter().any(|c| c.owner == owner) {
            stored.confirmations.push(StoredConfirmation {
                owner,
                signature,
                kind,
                submitted: now,
            });
            stored.modified = now;
        }
    }
    stored.trusted |= accepted.trusted;
    Ok(StatusCode::CREATED)
}

fn transaction_json(stored: &StoredTx, threshold: u64, execution: Option<(B256, bool)>) -> Value {
    let tx = &stored.tx;
    let confirmations: Vec<Value> = stored
        .confirmations
        .iter()
        .map(|c| {
            json!({
                "owner": c.owner.to_checksum(None),
                "submissionDate": timestamp(&c.submitted),
                "transactionHash": null,
                "signature": c.signature.to_string(),
                "signatureType": match c.kind {
                    SignatureKind::Ecdsa => "EOA",
                    SignatureKind::EthSign => "ETH_SIGN",
                },
            })
        })
        .collect();
    json!({
        "safe": stored.safe.to_checksum(None),
        "to": tx.to.to_checksum(None),
        "value": tx.value.to_string(),
        "data": if tx.data.is_empty() { Value::Null } else { Value::String(tx.data.to_string()) },
        "operation": u8::from(tx.operation),
        "gasToken": tx.gas_token.to_checksum(None),
        "safeTxGas": tx.safe_tx_gas.to_string(),
        "baseGas": tx.base_gas.to_string(),
        "gasPrice": tx.gas_price.to_string(),
        "refundReceiver": tx.refund_receiver.to_checksum(None),
        "nonce": tx.nonce.to_string(),
        "submissionDate": timestamp(&stored.submitted),
        "modified": timestamp(&stored.modified),
        "transactionHash": execution.map(|(hash, _)| hash.to_string()),
        "safeTxHash": stored.safe_tx_hash.to_string(),
        "proposer": stored.proposer.to_checksum(None),
        "proposedByDelegate": stored.proposed_by_delegate.map(|d| d.to_checksum(None)),
        "isExecuted": execution.is_some(),
        "isSuccessful": execution.map(|(_, success)| success),
        "origin": stored.origin,
        "confirmationsRequired": threshold,
        "confirmations": confirmations,
        "trusted": stored.trusted,
    })
}

async fn get_transaction(
    State(shared): Sim,
    Path(hash): Path<String>,
) -> Result<axum::Json<Value>, Rejection> {
    const MISSING: &str = "No MultisigTransaction matches the given query.";
    let hash: B256 = hash.parse().map_err(|_| Rejection::not_found(MISSING))?;
    let stored = {
        let state = shared.state.lock().expect("sim state poisoned");
        state.transactions.get(&hash).cloned()
    }
    .ok_or_else(|| Rejection::not_found(MISSING))?;
    let facts = shared.safe_facts(stored.safe).await?;
    let executions = shared.executions(stored.safe).await?;
    Ok(axum::Json(transaction_json(
        &stored,
        facts.threshold,
        executions.by_hash.get(&hash).copied(),
    )))
}

async fn list_transactions(
    State(shared): Sim,
    Path(address): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<axum::Json<Value>, Rejection> {
    let safe = path_address(&address)?;
    let number = |key: &str| query.get(key).and_then(|v| v.parse::<u64>().ok());
    let flag = |key: &str| match query.get(key).map(String::as_str) {
        Some("true" | "True" | "1") => Some(true),
        Some("false" | "False" | "0") => Some(false),
        _ => None,
    };
    let mut rows: Vec<StoredTx> = {
        let state = shared.state.lock().expect("sim state poisoned");
        state
            .transactions
            .values()
            .filter(|t| t.safe == safe)
            .cloned()
            .collect()
    };
    let facts = shared.safe_facts(safe).await?;
    let executions = shared.executions(safe).await?;

    // Untrusted (unsigned) proposals are hidden unless asked for, as in the real list.
    let trusted = flag("trusted").unwrap_or(true);
    rows.retain(|t| !trusted || t.trusted);
    if let Some(executed) = flag("executed") {
        rows.retain(|t| executions.by_hash.contains_key(&t.safe_tx_hash) == executed);
    }
    if let Some(n) = number("nonce") {
        rows.retain(|t| t.tx.nonce == n);
    }
    if let Some(n) = number("nonce__gte") {
        rows.retain(|t| t.tx.nonce >= n);
    }
    if let Some(n) = number("nonce__lte") {
        rows.retain(|t| t.tx.nonce <= n);
    }
    rows.sort_by_key(|t| (t.tx.nonce, t.modified));
    if query.get("ordering").map(String::as_str) != Some("nonce") {
        rows.reverse();
    }
    let count = rows.len();
    let offset = number("offset").unwrap_or(0) as usize;
    let limit = number("limit").map_or(usize::MAX, |l| l as usize);
    let results: Vec<Value> = rows
        .iter()
        .skip(offset)
        .take(limit)
        .map(|t| {
            transaction_json(
                t,
                facts.threshold,
                executions.by_hash.get(&t.safe_tx_hash).copied(),
            )
        })
        .collect();
    Ok(axum::Json(json!({
        "count": count,
        "next": null,
        "previous": null,
        "results": results,
    })))
}

async fn add_confirmation(
    State(shared): Sim,
    Path(hash): Path<String>,
    body: BodyBytes,
) -> Result<(StatusCode, axum::Json<Value>), Rejection> {
    const MISSING: &str = "No MultisigTransaction matches the given query.";
    let hash: B256 = hash.parse().map_err(|_| Rejection::not_found(MISSING))?;
    let json = json_object(&body, StatusCode::BAD_REQUEST)?;
    let mut f = Fields::new(&json);
    let signature = f.hex("signature", true);
    let signature = f
        .finish(|| signature.expect("checked"))
        .map_err(|e| Rejection::fields(StatusCode::BAD_REQUEST, e))?;

    let safe = {
        let state = shared.state.lock().expect("sim state poisoned");
        state.transactions.get(&hash).map(|t| t.safe)
    }
    .ok_or_else(|| Rejection::not_found(MISSING))?;
    let facts = shared.safe_facts(safe).await?;
    let executions = shared.executions(safe).await?;
    let bad = |message: String| Rejection::non_field(StatusCode::BAD_REQUEST, message);
    if executions.by_hash.contains_key(&hash) {
        // This fake's wording.
        return Err(bad(format!(
            "Transaction with safe-tx-hash={hash} was already executed"
        )));
    }
    let mut added = Vec::new();
    for part in split_signatures(&signature).map_err(|e| bad(e.to_string()))? {
        let (owner, kind) = recover_signer(hash, part).map_err(|e| bad(e.to_string()))?;
        if !facts.owners.contains(&owner) {
            // This fake's wording.
            return Err(bad(format!(
                "Signer={} is not an owner. Current owners={}",
                owner.to_checksum(None),
                py_list(facts.owners.iter().copied())
            )));
        }
        added.push((owner, Bytes::copy_from_slice(part), kind));
    }

    let now = Utc::now();
    let mut state = shared.state.lock().expect("sim state poisoned");
    let stored = state
        .transactions
        .get_mut(&hash)
        .expect("transactions are never removed");
    for (owner, signature, kind) in added {
        if !stored.confirmations.iter().any(|c| c.owner == owner) {
            stored.confirmations.push(StoredConfirmation {
                owner,
                signature,
                kind,
                submitted: now,
            });
            stored.modified = now;
        }
    }
    stored.trusted = true;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "signature": signature.to_string() })),
    ))
}

fn delegate_json(d: &StoredDelegate) -> Value {
    json!({
        "safe": d.safe.map(|s| s.to_checksum(None)),
        "delegate": d.delegate.to_checksum(None),
        "delegator": d.delegator.to_checksum(None),
        "label": d.label,
        "expiryDate": d.expiry.as_ref().map(timestamp),
    })
}

async fn add_delegate(
    State(shared): Sim,
    body: BodyBytes,
) -> Result<(StatusCode, axum::Json<Value>), Rejection> {
    // This view answers validation errors with 400, not 422.
    let bad = StatusCode::BAD_REQUEST;
    let json = json_object(&body, bad)?;
    let parsed = parse_delegate(&json).map_err(|e| Rejection::fields(bad, e))?;
    let chain_id = shared.chain_id().await?;
    check_delegate_signature(&parsed, chain_id, unix_now())
        .map_err(|m| Rejection::non_field(bad, m))?;
    if let Some(safe) = parsed.safe {
        // The real service needs the Safe indexed; here it must exist on chain.
        let facts = shared.safe_facts(safe).await.map_err(|_| {
            Rejection::non_field(
                bad,
                format!(
                    "Safe={} does not exist or it's still not indexed",
                    safe.to_checksum(None)
                ),
            )
        })?;
        if !facts.owners.contains(&parsed.delegator) {
            return Err(Rejection::non_field(
                bad,
                "Signing owner is not an owner of the Safe",
            ));
        }
    }

    let stored = StoredDelegate {
        safe: parsed.safe,
        delegate: parsed.delegate,
        delegator: parsed.delegator,
        label: parsed.label,
        expiry: parsed.expiry,
    };
    let mut state = shared.state.lock().expect("sim state poisoned");
    // A repeat updates label and expiry (`update_or_create`).
    match state.delegates.iter_mut().find(|d| {
        d.safe == stored.safe && d.delegate == stored.delegate && d.delegator == stored.delegator
    }) {
        Some(existing) => *existing = stored.clone(),
        None => state.delegates.push(stored.clone()),
    }
    Ok((StatusCode::CREATED, axum::Json(delegate_json(&stored))))
}

async fn list_delegates(
    State(shared): Sim,
    Query(query): Query<HashMap<String, String>>,
) -> Result<axum::Json<Value>, Rejection> {
    let mut errors = FieldErrors::new();
    let mut filter = |key: &str| -> Option<Address> {
        let text = query.get(key)?;
        checksummed_address(text)
            .map_err(|m| errors.entry(key.to_owned()).or_default().push(m))
            .ok()
    };
    let (safe, delegate, delegator) = (filter("safe"), filter("delegate"), filter("delegator"));
    if !errors.is_empty() {
        return Err(Rejection::fields(StatusCode::BAD_REQUEST, errors));
    }
    let label = query.get("label");
    let state = shared.state.lock().expect("sim state poisoned");
    let results: Vec<Value> = state
        .delegates
        .iter()
        .filter(|d| safe.is_none_or(|s| d.safe == Some(s)))
        .filter(|d| delegate.is_none_or(|a| d.delegate == a))
        .filter(|d| delegator.is_none_or(|a| d.delegator == a))
        .filter(|d| label.is_none_or(|l| &d.label == l))
        .map(delegate_json)
        .collect();
    Ok(axum::Json(json!({
        "count": results.len(),
        "next": null,
        "previous": null,
        "results": results,
    })))
}
