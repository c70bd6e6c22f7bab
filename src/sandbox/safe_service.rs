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
//! Reads serve what the real service's v1 and v2 views serve: a transaction
//! by hash, a Safe's multisig list (filters, ordering, limit/offset pages,
//! `countUniqueNonce`), a transaction's confirmations, the Safe's info and
//! `about`, with every field of the real serializers (execution date, block,
//! executor, gas and fees, payment, the executed signatures, `dataDecoded`);
//! v1 writes `nonce`, `safeTxGas` and `baseGas` as numbers. A GET without the
//! trailing slash is redirected to it, as Django's `APPEND_SLASH` does.
//!
//! Unlike the real service, execution status is read from the chain on every
//! GET (there is no indexer to wait for), so every Safe counts as indexed,
//! and only EOA signatures (v 27/28, eth_sign 31/32) are understood.
//!
//! Layout: `fields` reads request bodies as DRF does, `rules` is the
//! validation (pure), `chain` the chain reads, `answers` and `decoded` the
//! typed JSON of the reads; this file holds the state and the HTTP handlers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use alloy::primitives::{Address, B256, Bytes};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use axum::Router;
use axum::body::Bytes as BodyBytes;
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use reqwest::Url;
use serde_json::{Value, json};

use crate::safe::tx::SignatureKind;
use crate::safe::{
    SafeTx, SafeVersion, delegate_totp, delete_request_hash, recover_signer, split_signatures,
};

mod answers;
mod chain;
mod decoded;
mod fields;
mod rules;

use answers::{
    About, ApiVersion, Confirmation, Delegate, MultisigTransaction, Onchain, Page, SafeInfoAnswer,
    Window,
};

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
    rpc_url: Url,
    state: Mutex<SimState>,
    /// Every request received, of any kind.
    calls: AtomicUsize,
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
            .connect_http(rpc_url.clone())
            .erased();
        SafeServiceSim {
            shared: Arc::new(Shared {
                rpc,
                rpc_url,
                state: Mutex::new(SimState::default()),
                calls: AtomicUsize::new(0),
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
            .route("/api/v1/about/", get(about))
            .route("/api/v1/safes/{address}/", get(safe_info))
            .route(
                "/api/v1/safes/{address}/multisig-transactions/",
                post(propose).get(list_v1),
            )
            .route(
                "/api/v2/safes/{address}/multisig-transactions/",
                post(propose).get(list_v2),
            )
            .route("/api/v1/multisig-transactions/{safe_tx_hash}/", get(get_v1))
            .route(
                "/api/v2/multisig-transactions/{safe_tx_hash}/",
                get(get_v2).delete(delete_v2),
            )
            .route(
                "/api/v1/multisig-transactions/{safe_tx_hash}/confirmations/",
                post(add_confirmation).get(list_confirmations),
            )
            .route("/api/v2/delegates/", post(add_delegate).get(list_delegates))
            .fallback(not_found)
            .layer(axum::middleware::from_fn_with_state(
                self.shared.clone(),
                count_call,
            ))
            .with_state(self.shared.clone())
    }

    /// How many requests of any kind the service received: what a client
    /// costs it, counted as its operator would.
    pub fn calls(&self) -> usize {
        self.shared.calls.load(Ordering::SeqCst)
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

    /// Whether the service holds a proposal (its proposer may delete it).
    pub fn holds(&self, safe_tx_hash: B256) -> bool {
        let state = self.shared.state.lock().expect("sim state poisoned");
        state.transactions.contains_key(&safe_tx_hash)
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

async fn count_call(
    State(shared): Sim,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    shared.calls.fetch_add(1, Ordering::SeqCst);
    next.run(request).await
}

fn unix_now() -> u64 {
    u64::try_from(Utc::now().timestamp()).unwrap_or_default()
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

/// What the chain says of `rows`, all of one Safe: its version and
/// threshold, and each executed row's execution and Ethereum transaction.
async fn answers(
    shared: &Shared,
    safe: Address,
    rows: &[StoredTx],
    api: ApiVersion,
) -> Result<Vec<MultisigTransaction>, Rejection> {
    let facts = shared.safe_facts(safe).await?;
    let version: SafeVersion =
        facts
            .version
            .parse()
            .map_err(|err: crate::safe::UnsupportedVersion| {
                Rejection::non_field(UNPROCESSABLE, err.to_string())
            })?;
    let executions = shared.executions(safe).await?;
    let mut out = Vec::with_capacity(rows.len());
    for stored in rows {
        let execution = executions.by_hash.get(&stored.safe_tx_hash);
        let ethereum = match execution {
            Some(execution) => Some(shared.ethereum_tx(safe, execution).await?),
            None => None,
        };
        let chain = Onchain {
            version,
            threshold: facts.threshold,
            execution: execution.zip(ethereum.as_ref()),
        };
        out.push(MultisigTransaction::of(stored, &chain, api));
    }
    Ok(out)
}

const NO_TRANSACTION: &str = "No MultisigTransaction matches the given query.";

async fn get_v1(
    State(shared): Sim,
    Path(hash): Path<String>,
) -> Result<axum::Json<MultisigTransaction>, Rejection> {
    get_transaction(shared, hash, ApiVersion::V1).await
}

async fn get_v2(
    State(shared): Sim,
    Path(hash): Path<String>,
) -> Result<axum::Json<MultisigTransaction>, Rejection> {
    get_transaction(shared, hash, ApiVersion::V2).await
}

async fn list_v1(
    State(shared): Sim,
    Path(address): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Result<axum::Json<Page<MultisigTransaction>>, Rejection> {
    let url = request_url(&headers, &uri);
    list_transactions(shared, address, query, url, ApiVersion::V1).await
}

async fn list_v2(
    State(shared): Sim,
    Path(address): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Result<axum::Json<Page<MultisigTransaction>>, Rejection> {
    let url = request_url(&headers, &uri);
    list_transactions(shared, address, query, url, ApiVersion::V2).await
}

/// `GET /api/v{1,2}/multisig-transactions/{safeTxHash}/`.
async fn get_transaction(
    shared: Arc<Shared>,
    hash: String,
    api: ApiVersion,
) -> Result<axum::Json<MultisigTransaction>, Rejection> {
    let hash: B256 = hash
        .parse()
        .map_err(|_| Rejection::not_found(NO_TRANSACTION))?;
    let stored = {
        let state = shared.state.lock().expect("sim state poisoned");
        state.transactions.get(&hash).cloned()
    }
    .ok_or_else(|| Rejection::not_found(NO_TRANSACTION))?;
    let mut answer = answers(&shared, stored.safe, &[stored], api).await?;
    Ok(axum::Json(answer.remove(0)))
}

/// `GET /api/v{1,2}/safes/{address}/multisig-transactions/`, with the real
/// filters the clients use and `DefaultPagination`.
async fn list_transactions(
    shared: Arc<Shared>,
    address: String,
    query: HashMap<String, String>,
    url: Url,
    api: ApiVersion,
) -> Result<axum::Json<Page<MultisigTransaction>>, Rejection> {
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
    let executions = shared.executions(safe).await?;

    // Untrusted (unsigned) proposals are hidden unless asked for, as in the real list.
    let trusted = flag("trusted").unwrap_or(true);
    rows.retain(|t| !trusted || t.trusted);
    let unique_nonces = rows
        .iter()
        .map(|t| t.tx.nonce)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    if let Some(executed) = flag("executed") {
        rows.retain(|t| executions.by_hash.contains_key(&t.safe_tx_hash) == executed);
    }
    if let Some(confirmed) = flag("has_confirmations") {
        rows.retain(|t| t.confirmations.is_empty() != confirmed);
    }
    type NonceTest = fn(u64, u64) -> bool;
    let nonce_filters: [(&str, NonceTest); 5] = [
        ("nonce", |n, x| n == x),
        ("nonce__gte", |n, x| n >= x),
        ("nonce__gt", |n, x| n > x),
        ("nonce__lte", |n, x| n <= x),
        ("nonce__lt", |n, x| n < x),
    ];
    for (key, test) in nonce_filters {
        if let Some(x) = number(key) {
            rows.retain(|t| test(t.tx.nonce, x));
        }
    }
    if let Some(hash) = query.get("safe_tx_hash") {
        rows.retain(|t| hash.parse::<B256>().is_ok_and(|h| h == t.safe_tx_hash));
    }
    if let Some(to) = query.get("to") {
        rows.retain(|t| to.parse::<Address>().is_ok_and(|a| a == t.tx.to));
    }
    if let Some(hash) = query.get("transaction_hash") {
        rows.retain(|t| {
            executions
                .by_hash
                .get(&t.safe_tx_hash)
                .is_some_and(|e| hash.parse::<B256>().is_ok_and(|h| h == e.tx_hash))
        });
    }
    order(&mut rows, query.get("ordering").map(String::as_str));

    let window = Window::from_query(
        query.get("limit").map(String::as_str),
        query.get("offset").map(String::as_str),
    );
    let count = rows.len();
    let results = answers(&shared, safe, &window.take(rows), api).await?;
    Ok(axum::Json(
        Page::new(count, window, &url, results).with_unique_nonces(unique_nonces),
    ))
}

/// `ordering`: `nonce`, `created` or `modified`, `-` for descending, comma
/// separated; the default is `-nonce,-created`.
fn order(rows: &mut [StoredTx], ordering: Option<&str>) {
    let keys: Vec<(&str, bool)> = ordering
        .unwrap_or("-nonce,-created")
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(|k| match k.strip_prefix('-') {
            Some(name) => (name, true),
            None => (k, false),
        })
        .collect();
    rows.sort_by(|a, b| {
        keys.iter()
            .map(|(key, descending)| {
                let ord = match *key {
                    "nonce" => a.tx.nonce.cmp(&b.tx.nonce),
                    "created" => a.submitted.cmp(&b.submitted),
                    "modified" => a.modified.cmp(&b.modified),
                    _ => std::cmp::Ordering::Equal,
                };
                if *descending { ord.reverse() } else { ord }
            })
            .find(|ord| ord.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
}

/// `GET /api/v1/multisig-transactions/{safeTxHash}/confirmations/`.
async fn list_confirmations(
    State(shared): Sim,
    Path(hash): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<axum::Json<Page<Confirmation>>, Rejection> {
    let hash: B256 = hash
        .parse()
        .map_err(|_| Rejection::not_found(NO_TRANSACTION))?;
    let confirmations: Vec<Confirmation> = {
        let state = shared.state.lock().expect("sim state poisoned");
        let stored = state
            .transactions
            .get(&hash)
            .ok_or_else(|| Rejection::not_found(NO_TRANSACTION))?;
        stored.confirmations.iter().map(Confirmation::of).collect()
    };
    let window = Window::from_query(
        query.get("limit").map(String::as_str),
        query.get("offset").map(String::as_str),
    );
    let count = confirmations.len();
    Ok(axum::Json(Page::new(
        count,
        window,
        &request_url(&headers, &uri),
        window.take(confirmations),
    )))
}

/// `GET /api/v1/safes/{address}/`: 404 with no body for an address that is
/// not a Safe.
async fn safe_info(State(shared): Sim, Path(address): Path<String>) -> Result<Response, Rejection> {
    let safe = path_address(&address)?;
    Ok(match shared.safe_info(safe).await? {
        Some(info) => axum::Json(SafeInfoAnswer::of(info)).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    })
}

/// `GET /api/v1/about/`.
async fn about(State(shared): Sim, headers: HeaderMap) -> axum::Json<About> {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    axum::Json(About::new(host, &shared.rpc_url))
}

/// Django's `APPEND_SLASH`: a GET without the trailing slash is redirected
/// to the path with it (api-kit asks for `/v1/about` so); anything else is
/// DRF's 404.
async fn not_found(method: axum::http::Method, OriginalUri(uri): OriginalUri) -> Response {
    let path = uri.path();
    if matches!(method, axum::http::Method::GET | axum::http::Method::HEAD) && !path.ends_with('/')
    {
        let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        let location = format!("{path}/{query}");
        return (
            StatusCode::MOVED_PERMANENTLY,
            [(axum::http::header::LOCATION, location)],
        )
            .into_response();
    }
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"detail": "Not found."})),
    )
        .into_response()
}

/// The absolute URL of a request, for a page's `next` and `previous`.
fn request_url(headers: &HeaderMap, uri: &axum::http::Uri) -> Url {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    Url::parse(&format!("http://{host}{uri}"))
        .unwrap_or_else(|_| Url::parse("http://localhost/").expect("a valid URL"))
}

async fn add_confirmation(
    State(shared): Sim,
    Path(text): Path<String>,
    body: BodyBytes,
) -> Result<(StatusCode, axum::Json<Value>), Rejection> {
    // The real view checks these in the serializer's `validate_signature`,
    // so its refusals are field errors of `signature` (400).
    let missing = Rejection::not_found(&format!(
        "Multisig transaction with safe-tx-hash={text} was not found"
    ));
    let hash: B256 = text.parse().map_err(|_| missing.clone())?;
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
    .ok_or_else(|| missing.clone())?;
    let facts = shared.safe_facts(safe).await?;
    let executions = shared.executions(safe).await?;
    let bad = |message: String| {
        Rejection::fields(
            StatusCode::BAD_REQUEST,
            FieldErrors::from([("signature".to_owned(), vec![message])]),
        )
    };
    if executions.by_hash.contains_key(&hash) {
        return Err(bad(format!(
            "Transaction with safe-tx-hash={text} was already executed"
        )));
    }
    let mut added = Vec::new();
    for part in split_signatures(&signature).map_err(|e| bad(e.to_string()))? {
        let (owner, kind) = recover_signer(hash, part).map_err(|e| bad(e.to_string()))?;
        if !facts.owners.contains(&owner) {
            return Err(bad(format!(
                "Signer={} is not an owner. Current owners={}",
                owner.to_checksum(None),
                py_list(facts.owners.iter().copied())
            )));
        }
        if added.iter().any(|(o, _, _)| *o == owner) {
            return Err(bad(format!(
                "Signature for owner={} is duplicated",
                owner.to_checksum(None)
            )));
        }
        added.push((owner, Bytes::copy_from_slice(part), kind));
    }

    let now = Utc::now();
    let mut state = shared.state.lock().expect("sim state poisoned");
    // Deleted by its proposer meanwhile.
    let stored = state.transactions.get_mut(&hash).ok_or(missing)?;
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

/// `DELETE /api/v2/multisig-transactions/{safeTxHash}/` `{"signature"}`: the
/// proposer, or the still valid delegate that proposed it, deletes an
/// unexecuted proposal (safe.md §2.3). The signature is of `DeleteRequest`
/// for the current or the previous hour. 204, or 400 with the reason (this
/// view raises instead of answering 422); 404 for an unknown hash. The
/// refusal wordings are this fake's own.
async fn delete_v2(
    State(shared): Sim,
    Path(text): Path<String>,
    body: BodyBytes,
) -> Result<StatusCode, Rejection> {
    let hash: B256 = text
        .parse()
        .map_err(|_| Rejection::not_found(NO_TRANSACTION))?;
    let bad = StatusCode::BAD_REQUEST;
    let json = json_object(&body, bad)?;
    let mut f = Fields::new(&json);
    let signature = f.hex("signature", true);
    let signature = f
        .finish(|| signature.expect("checked"))
        .map_err(|e| Rejection::fields(bad, e))?;
    let stored = {
        let state = shared.state.lock().expect("sim state poisoned");
        state.transactions.get(&hash).cloned()
    }
    .ok_or_else(|| Rejection::not_found(NO_TRANSACTION))?;
    let executions = shared.executions(stored.safe).await?;
    if executions.by_hash.contains_key(&hash) {
        return Err(Rejection::non_field(
            bad,
            "Executed transactions cannot be deleted",
        ));
    }
    let chain_id = shared.chain_id().await?;
    let totp = delegate_totp(unix_now());
    let signer = [totp, totp.saturating_sub(1)].iter().find_map(|&totp| {
        let digest = delete_request_hash(hash, totp, chain_id, stored.safe);
        recover_signer(digest, &signature)
            .ok()
            .map(|(signer, _)| signer)
            .filter(|signer| {
                *signer == stored.proposer || Some(*signer) == stored.proposed_by_delegate
            })
    });
    let Some(signer) = signer else {
        return Err(Rejection::non_field(
            bad,
            "Provided signer is not the proposer or the delegate user who proposed the transaction",
        ));
    };
    if Some(signer) == stored.proposed_by_delegate && signer != stored.proposer {
        let facts = shared.safe_facts(stored.safe).await?;
        let state = shared.state.lock().expect("sim state poisoned");
        let still = valid_delegates(&state, stored.safe, &facts.owners)
            .iter()
            .any(|(delegate, delegator)| *delegate == signer && *delegator == stored.proposer);
        if !still {
            return Err(Rejection::non_field(
                bad,
                "The delegate that proposed the transaction is no longer valid",
            ));
        }
    }
    let mut state = shared.state.lock().expect("sim state poisoned");
    state.transactions.remove(&hash);
    Ok(StatusCode::NO_CONTENT)
}

async fn add_delegate(
    State(shared): Sim,
    body: BodyBytes,
) -> Result<(StatusCode, axum::Json<Delegate>), Rejection> {
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
    Ok((StatusCode::CREATED, axum::Json(Delegate::of(&stored))))
}

async fn list_delegates(
    State(shared): Sim,
    Query(query): Query<HashMap<String, String>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Result<axum::Json<Page<Delegate>>, Rejection> {
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
    let results: Vec<Delegate> = state
        .delegates
        .iter()
        .filter(|d| safe.is_none_or(|s| d.safe == Some(s)))
        .filter(|d| delegate.is_none_or(|a| d.delegate == a))
        .filter(|d| delegator.is_none_or(|a| d.delegator == a))
        .filter(|d| label.is_none_or(|l| &d.label == l))
        .map(Delegate::of)
        .collect();
    let window = Window::from_query(
        query.get("limit").map(String::as_str),
        query.get("offset").map(String::as_str),
    );
    let count = results.len();
    Ok(axum::Json(Page::new(
        count,
        window,
        &request_url(&headers, &uri),
        window.take(results),
    )))
}
