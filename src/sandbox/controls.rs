//! Sandbox-only HTTP controls: act as the Safe owners (sign, execute), show
//! the world as JSON, and a page with buttons for both. They are served on
//! the sandbox's own port, the front door, which forwards every other path to
//! the bridge; `approval-bridge serve` never serves them. Like Safe{Wallet},
//! the owners read proposals from the Safe Transaction Service, not from the
//! bridge, so they work while the bridge is down or runs in another process.

use std::sync::Arc;

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::signers::local::PrivateKeySigner;
use askama::Template;
use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use reqwest::Url;
use serde::Deserialize;
use serde_json::{Value, json};

use super::chain::LocalChain;
use super::dev_login::DevAccount;
use super::phala_sim::PhalaSim;
use super::safe_service::SafeServiceSim;
use super::{SafeOwner, SandboxApps};
use crate::chain::{ChainClient, Registration, SafeInfo};
use crate::safe::{
    Operation, Proposal, SafeTx, TxServiceClient, TxServiceOptions, sign_safe_tx_hash,
};
use crate::web::check_same_origin;

/// The dev login's name for the Safe-owner.
const SAFE_OWNER_ACCOUNT: &str = "safe-owner";

/// Why the page offers the Safe-owner no Confirm button.
const SAFE_OWNER_CONFIRM: &str = "no Confirm button here: a Safe confirms with a contract signature or an \
     on-chain approveHash of its own owners, which this sandbox does not make; two of owners 0 to 2 \
     reach the threshold without it";

/// The largest body the front door forwards to the bridge.
const MAX_FORWARDED_BODY: usize = 4 * 1024 * 1024;

#[derive(Clone)]
pub(super) struct Controls {
    pub chain: Arc<LocalChain>,
    pub safe: Address,
    /// Keys of the Safe's owners, by owner index.
    pub owner_keys: Vec<PrivateKeySigner>,
    /// The Safe's owner that is itself a Safe.
    pub safe_owner: SafeOwner,
    /// How many owners the Safe needs.
    pub threshold: u64,
    /// A non-owner account that sends `execTransaction`.
    pub executor: PrivateKeySigner,
    pub safe_service: SafeServiceSim,
    pub safe_service_url: Url,
    pub phala: PhalaSim,
    pub apps: SandboxApps,
    /// Where the bridge listens (or, with `--world-only`, is told to).
    pub bridge_url: Url,
    /// The account the bridge lists as its operator (the dev login's fourth choice).
    pub operator_key: PrivateKeySigner,
    /// Follows no redirects: the front door hands them to the browser.
    pub http: reqwest::Client,
}

pub(super) fn router(controls: Controls) -> Router {
    Router::new()
        .route("/sandbox", get(page))
        .route("/sandbox/proposals", get(proposals_partial))
        .route("/sandbox/dev-login", post(dev_login))
        .route("/sandbox/world", get(world))
        .route("/sandbox/safe/{safe_tx_hash}/sign", post(sign))
        .route("/sandbox/safe/{safe_tx_hash}/execute", post(execute))
        .route("/sandbox/safe/{safe_tx_hash}/reject", post(reject_tx))
        // The controls sign in and act as the owners: only the page itself
        // may post to them. Forwarded paths are the bridge's to check.
        .route_layer(axum::middleware::from_fn(same_origin))
        .fallback(forward)
        .with_state(controls)
}

type Rejection = (StatusCode, Json<Value>);

/// Refuses a browser's cross-site POST to a control, as the bridge refuses
/// one to its page ([`check_same_origin`]).
async fn same_origin(request: Request, next: axum::middleware::Next) -> Response {
    match check_same_origin(request.method(), request.headers(), None) {
        Ok(()) => next.run(request).await,
        Err(message) => {
            reject(StatusCode::FORBIDDEN, "cross_site_request", message).into_response()
        }
    }
}

fn reject(status: StatusCode, code: &str, message: impl Into<String>) -> Rejection {
    (
        status,
        Json(json!({"error": {"code": code, "message": message.into()}})),
    )
}

fn parse_hash(text: &str) -> Result<B256, Rejection> {
    text.parse::<B256>().map_err(|_| {
        reject(
            StatusCode::BAD_REQUEST,
            "invalid_hash",
            format!("`{text}` is not a 32-byte 0x hash"),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignBody {
    owner: usize,
}

/// Whether a control was posted by the page's HTML form: it then answers
/// with a redirect back to the page, and JSON otherwise.
fn from_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"))
}

/// A control's answer: JSON to API callers; to the page's form, a redirect
/// back to the page, with the reason in words when it could not act.
fn answer_control(
    headers: &HeaderMap,
    answer: Result<Value, Rejection>,
) -> Result<Response, Rejection> {
    let form = from_form(headers);
    Ok(match answer {
        Ok(_) if form => back_to_page(),
        Ok(answer) => Json(answer).into_response(),
        Err(err) if form => back_with_notice(err),
        Err(err) => return Err(err),
    })
}

/// The key of owner `owner` (0, 1, 2…), as the controls' bodies name them.
fn owner_key(c: &Controls, owner: usize) -> Result<&PrivateKeySigner, Rejection> {
    c.owner_keys.get(owner).ok_or_else(|| {
        reject(
            StatusCode::BAD_REQUEST,
            "invalid_owner",
            format!("owner must be 0 to {}", c.owner_keys.len() - 1),
        )
    })
}

fn back_to_page() -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, "/sandbox")]).into_response()
}

/// A control posted by the page's form that could not act: back to the page,
/// which says why in words (not the JSON the API callers get).
fn back_with_notice((_, Json(body)): Rejection) -> Response {
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or("the control failed")
        .to_owned();
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("notice", &message)
        .finish();
    (
        StatusCode::SEE_OTHER,
        [(header::LOCATION, format!("/sandbox?{query}"))],
    )
        .into_response()
}

/// The parsed `owner` of a control's body: the page's form or JSON.
fn owner_of(headers: &HeaderMap, body: &[u8]) -> Result<usize, Rejection> {
    if from_form(headers) {
        form_urlencoded::parse(body)
            .find(|(name, _)| name == "owner")
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| {
                reject(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    "the form names no owner",
                )
            })
    } else {
        serde_json::from_slice::<SignBody>(body)
            .map(|b| b.owner)
            .map_err(|err| reject(StatusCode::BAD_REQUEST, "invalid_body", err.to_string()))
    }
}

/// `POST /sandbox/safe/{hash}/sign` `{"owner": 0|1|2}` (JSON, or the page's
/// form): the owner confirms the proposal at the Safe Transaction Service,
/// as Safe{Wallet} would.
async fn sign(
    State(c): State<Controls>,
    Path(hash): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, Rejection> {
    let answer = match owner_of(&headers, &body) {
        Ok(owner) => sign_as(&c, &hash, owner).await,
        Err(err) => Err(err),
    };
    answer_control(&headers, answer)
}

async fn sign_as(c: &Controls, hash: &str, owner: usize) -> Result<Value, Rejection> {
    let hash = parse_hash(hash)?;
    let key = owner_key(c, owner)?;
    let signature = sign_safe_tx_hash(key, hash).map_err(|err| {
        reject(
            StatusCode::INTERNAL_SERVER_ERROR,
            "signing_failed",
            err.to_string(),
        )
    })?;
    let url = format!(
        "{}api/v1/multisig-transactions/{hash}/confirmations/",
        with_slash(&c.safe_service_url)
    );
    let answer = c
        .http
        .post(url)
        .json(&json!({"signature": Bytes::copy_from_slice(&signature).to_string()}))
        .send()
        .await
        .map_err(|err| {
            reject(
                StatusCode::BAD_GATEWAY,
                "safe_service_unreachable",
                err.to_string(),
            )
        })?;
    let status = answer.status();
    if !status.is_success() {
        let text = answer.text().await.unwrap_or_default();
        let status = if status == StatusCode::NOT_FOUND {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        return Err(reject(status, "confirmation_refused", text));
    }
    let confirmations = c.safe_service.confirmations(hash);
    Ok(json!({
        "safe_tx_hash": hash,
        "owner": key.address().to_checksum(None),
        "confirmations": confirmations.len(),
    }))
}

/// `POST /sandbox/safe/{hash}/execute`: a non-owner account executes the
/// proposal with the confirmations collected so far.
async fn execute(
    State(c): State<Controls>,
    Path(hash): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Rejection> {
    answer_control(&headers, execute_now(&c, &hash).await)
}

/// `POST /sandbox/safe/{hash}/reject` `{"owner": 0|1|2}`: the owner rejects
/// the proposal as Safe{Wallet}'s Reject does: it proposes an on-chain
/// rejection at the same nonce (a call of the Safe to itself, value 0, no
/// data), signed by that owner. Once the owners sign and execute it, the
/// nonce is used and what stood behind it moves up.
async fn reject_tx(
    State(c): State<Controls>,
    Path(hash): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, Rejection> {
    let answer = match owner_of(&headers, &body) {
        Ok(owner) => reject_as(&c, &hash, owner).await,
        Err(err) => Err(err),
    };
    answer_control(&headers, answer)
}

async fn reject_as(c: &Controls, hash: &str, owner: usize) -> Result<Value, Rejection> {
    let hash = parse_hash(hash)?;
    let key = owner_key(c, owner)?;
    let rejected = proposed_tx(c, hash).await?;
    let info = safe_info(c).await?;
    let rejection = SafeTx::new(
        c.safe,
        U256::ZERO,
        Bytes::new(),
        Operation::Call,
        rejected.call.nonce,
    );
    let proposal = Proposal::sign(
        rejection,
        c.safe,
        c.chain.chain_id(),
        info.version,
        key,
        Some(r#"{"name":"Safe{Wallet} (sandbox)","url":""}"#.to_owned()),
    )
    .map_err(|err| {
        reject(
            StatusCode::INTERNAL_SERVER_ERROR,
            "signing_failed",
            err.to_string(),
        )
    })?;
    let mut options = TxServiceOptions::for_chain(c.chain.chain_id());
    options.base_url = Some(c.safe_service_url.clone());
    options.requests_per_second = 100.0;
    let service = TxServiceClient::new(&options).map_err(|err| {
        reject(
            StatusCode::INTERNAL_SERVER_ERROR,
            "safe_service",
            format!("{err:#}"),
        )
    })?;
    service.propose(c.safe, &proposal).await.map_err(|err| {
        reject(
            StatusCode::UNPROCESSABLE_ENTITY,
            "rejection_refused",
            err.to_string(),
        )
    })?;
    Ok(json!({
        "rejected": hash,
        "safe_tx_hash": proposal.safe_tx_hash,
        "nonce": rejected.call.nonce,
        "owner": key.address().to_checksum(None),
    }))
}

/// The Safe as the chain has it now.
async fn safe_info(c: &Controls) -> Result<SafeInfo, Rejection> {
    let client = ChainClient::new(c.chain.chain_id(), c.chain.rpc_url());
    match client.owner_kind(c.safe).await {
        Ok(crate::chain::OwnerKind::Safe(info)) => Ok(info),
        _ => Err(reject(
            StatusCode::BAD_GATEWAY,
            "chain",
            "cannot read the Safe",
        )),
    }
}

/// Why the executor cannot execute a proposal now, in the words of the page;
/// `None` when it can.
fn execute_blocker(
    nonce: u64,
    confirmed: usize,
    safe_nonce: u64,
    threshold: u64,
) -> Option<String> {
    if nonce > safe_nonce {
        Some(format!(
            "nonce {safe_nonce} must go first: the Safe is at nonce {safe_nonce}, this is nonce {nonce}"
        ))
    } else if nonce < safe_nonce {
        Some(format!("the Safe has used nonce {nonce} already"))
    } else if (confirmed as u64) < threshold {
        Some(format!(
            "not enough signatures: {confirmed} of {threshold}; an owner must confirm first"
        ))
    } else {
        None
    }
}

async fn execute_now(c: &Controls, hash: &str) -> Result<Value, Rejection> {
    let hash = parse_hash(hash)?;
    let tx = proposed_tx(c, hash).await?;
    let info = safe_info(c).await?;
    let signers: Vec<PrivateKeySigner> = c
        .owner_keys
        .iter()
        .filter(|k| tx.confirmations.contains(&k.address()))
        .cloned()
        .collect();
    if let Some(why) = execute_blocker(tx.call.nonce, signers.len(), info.nonce, info.threshold) {
        let code = if tx.call.nonce == info.nonce {
            "not_enough_confirmations"
        } else {
            "not_next"
        };
        return Err(reject(
            StatusCode::CONFLICT,
            code,
            format!("Not executed: {why}."),
        ));
    }
    let call = tx.call;
    let receipt = c
        .chain
        .exec_safe_tx(c.safe, &call, &signers, &c.executor)
        .await
        .map_err(|err| {
            reject(
                StatusCode::UNPROCESSABLE_ENTITY,
                "execution_failed",
                format!("{err:#}"),
            )
        })?;
    Ok(json!({
        "safe_tx_hash": hash,
        "transaction_hash": receipt.transaction_hash,
        "block": receipt.block_number,
    }))
}

/// A proposal as the Safe Transaction Service holds it, with the owners who
/// confirmed it.
struct ProposedTx {
    call: SafeTx,
    confirmations: Vec<Address>,
}

/// `GET /api/v2/multisig-transactions/{hash}/`, as Safe{Wallet} reads it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireTx {
    to: Address,
    value: Value,
    data: Option<Bytes>,
    operation: u8,
    safe_tx_gas: Value,
    base_gas: Value,
    gas_price: Value,
    gas_token: Address,
    refund_receiver: Address,
    nonce: Value,
    #[serde(default)]
    confirmations: Vec<WireConfirmation>,
}

#[derive(Deserialize)]
struct WireConfirmation {
    owner: Address,
}

/// The service sends numbers as decimal strings or as JSON numbers.
fn number(field: &str, value: &Value) -> Result<U256, Rejection> {
    let parsed = match value {
        Value::String(text) => text.parse::<U256>().ok(),
        Value::Number(n) => n.as_u64().map(U256::from),
        _ => None,
    };
    parsed.ok_or_else(|| {
        reject(
            StatusCode::BAD_GATEWAY,
            "safe_service_answer",
            format!("the service's `{field}` is `{value}`, not a number"),
        )
    })
}

/// Reads the proposal from the Safe Transaction Service and checks that its
/// fields hash to `hash` on the Safe itself.
async fn proposed_tx(c: &Controls, hash: B256) -> Result<ProposedTx, Rejection> {
    let url = format!(
        "{}api/v2/multisig-transactions/{hash}/",
        with_slash(&c.safe_service_url)
    );
    let answer = c.http.get(url).send().await.map_err(|err| {
        reject(
            StatusCode::BAD_GATEWAY,
            "safe_service_unreachable",
            err.to_string(),
        )
    })?;
    if answer.status() == StatusCode::NOT_FOUND {
        return Err(reject(
            StatusCode::NOT_FOUND,
            "unknown_proposal",
            format!("the Safe Transaction Service has no proposal {hash}"),
        ));
    }
    if !answer.status().is_success() {
        let status = answer.status();
        return Err(reject(
            StatusCode::BAD_GATEWAY,
            "safe_service_answer",
            format!("the Safe Transaction Service answered {status}"),
        ));
    }
    let wire: WireTx = answer.json().await.map_err(|err| {
        reject(
            StatusCode::BAD_GATEWAY,
            "safe_service_answer",
            format!("cannot read the service's proposal: {err}"),
        )
    })?;
    let operation = match wire.operation {
        0 => Operation::Call,
        1 => Operation::DelegateCall,
        other => {
            return Err(reject(
                StatusCode::BAD_GATEWAY,
                "safe_service_answer",
                format!("the service's operation is {other}"),
            ));
        }
    };
    let nonce = u64::try_from(number("nonce", &wire.nonce)?).map_err(|_| {
        reject(
            StatusCode::BAD_GATEWAY,
            "safe_service_answer",
            "the service's nonce is too large",
        )
    })?;
    let call = SafeTx {
        safe_tx_gas: number("safeTxGas", &wire.safe_tx_gas)?,
        base_gas: number("baseGas", &wire.base_gas)?,
        gas_price: number("gasPrice", &wire.gas_price)?,
        gas_token: wire.gas_token,
        refund_receiver: wire.refund_receiver,
        ..SafeTx::new(
            wire.to,
            number("value", &wire.value)?,
            wire.data.unwrap_or_default(),
            operation,
            nonce,
        )
    };
    let on_chain = c
        .chain
        .safe_tx_hash(c.safe, &call)
        .await
        .map_err(|err| reject(StatusCode::BAD_GATEWAY, "chain", format!("{err:#}")))?;
    if on_chain != hash {
        return Err(reject(
            StatusCode::UNPROCESSABLE_ENTITY,
            "hash_mismatch",
            format!("the service's proposal hashes to {on_chain} on the Safe, not {hash}"),
        ));
    }
    Ok(ProposedTx {
        call,
        confirmations: wire.confirmations.iter().map(|c| c.owner).collect(),
    })
}

/// Every path that is not a control goes to the bridge, so one address
/// serves the page, the API and the webhook. With `--world-only`, and while
/// `serve` is down, it answers 502 with what to do.
async fn forward(State(c): State<Controls>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let url = format!("{}{}", c.bridge_url.as_str().trim_end_matches('/'), path);
    let body = match axum::body::to_bytes(body, MAX_FORWARDED_BODY).await {
        Ok(body) => body,
        Err(_) => {
            return reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the sandbox forwards bodies up to {MAX_FORWARDED_BODY} bytes"),
            )
            .into_response();
        }
    };
    let mut headers = parts.headers;
    strip_hop_headers(&mut headers);
    let answer = c
        .http
        .request(parts.method, url)
        .headers(headers)
        .body(body)
        .send()
        .await;
    let answer = match answer {
        Ok(answer) => answer,
        Err(_) => {
            return reject(
                StatusCode::BAD_GATEWAY,
                "bridge_unavailable",
                format!(
                    "the bridge does not answer at {}: start `approval-bridge serve` with the sandbox's environment",
                    c.bridge_url
                ),
            )
            .into_response();
        }
    };
    let status = answer.status();
    let mut headers = answer.headers().clone();
    strip_hop_headers(&mut headers);
    match answer.bytes().await {
        Ok(bytes) => {
            let mut response = Response::new(Body::from(bytes));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            response
        }
        Err(_) => reject(
            StatusCode::BAD_GATEWAY,
            "bridge_unavailable",
            "the bridge closed the connection mid-answer",
        )
        .into_response(),
    }
}

/// Headers that describe one connection, not the message.
fn strip_hop_headers(headers: &mut HeaderMap) {
    for name in [
        header::HOST,
        header::CONNECTION,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// `GET /sandbox/world`: everything a test or a person needs to drive the sandbox.
async fn world(State(c): State<Controls>) -> Result<Json<Value>, Rejection> {
    Ok(Json(world_json(&c).await.map_err(|err| {
        reject(StatusCode::BAD_GATEWAY, "chain", format!("{err:#}"))
    })?))
}

async fn world_json(c: &Controls) -> anyhow::Result<Value> {
    let sim = c.phala.world();
    let client = ChainClient::new(c.chain.chain_id(), c.chain.rpc_url());
    let onchain_apps = [c.apps.web, c.apps.api, c.apps.eoa];
    let wanted: Vec<(Address, Vec<Registration>)> = onchain_apps
        .iter()
        .map(|app| {
            (
                *app,
                sim.nodes
                    .iter()
                    .map(|n| Registration::Device(n.device_id))
                    .collect(),
            )
        })
        .collect();
    let states = client.read_apps(&wanted).await?;
    let nodes: Vec<Value> = sim
        .nodes
        .iter()
        .map(|n| {
            let allowed: serde_json::Map<String, Value> = onchain_apps
                .iter()
                .map(|app| (app.to_checksum(None), states[app].is_allowed(&Registration::Device(n.device_id)).into()))
                .collect();
            json!({"id": n.id, "name": n.name, "device_id": n.device_id, "free_slots": n.free_slots, "allowed": allowed})
        })
        .collect();
    let cvms: Vec<Value> = sim
        .cvms
        .iter()
        .map(|cvm| {
            let kms_type = match &cvm.kms {
                super::phala_sim::SimKms::Onchain { kms_type } => kms_type.clone(),
                super::phala_sim::SimKms::Cloud => "phala".to_owned(),
            };
            json!({
                "name": cvm.name,
                "vm_uuid": cvm.vm_uuid.simple().to_string(),
                "app_id": cvm.app_id.to_checksum(None),
                "kms_type": kms_type,
                "compose_hash": cvm.compose_hash(),
                "node_id": cvm.node_id,
            })
        })
        .collect();
    let app = |address: Address, owner: Value, ownership: &str| json!({"address": address.to_checksum(None), "owner": owner, "ownership": ownership});
    Ok(json!({
        "chain_id": c.chain.chain_id(),
        "rpc_url": c.chain.rpc_url(),
        "phala_api_url": c.phala.base_url(),
        "phala_api_key": c.phala.api_key(),
        "safe_service_url": c.safe_service_url,
        "safe": {
            "address": c.safe.to_checksum(None),
            "threshold": c.threshold,
            "owners": c.owner_keys.iter().enumerate().map(|(i, k)| json!({"index": i, "address": k.address().to_checksum(None)})).collect::<Vec<_>>(),
            "safe_owner": {
                "address": c.safe_owner.address.to_checksum(None),
                "threshold": c.safe_owner.threshold,
                "owners": c.safe_owner.keys.iter().map(|k| k.address().to_checksum(None)).collect::<Vec<_>>(),
                "fallback_handler": super::chain::v1_4_1::COMPATIBILITY_FALLBACK_HANDLER.to_checksum(None),
                "dev_login": SAFE_OWNER_ACCOUNT,
                "confirm": SAFE_OWNER_CONFIRM,
            },
        },
        "apps": {
            "web": app(c.apps.web, c.safe.to_checksum(None).into(), "one-step"),
            "api": app(c.apps.api, c.safe.to_checksum(None).into(), "two-step"),
            "eoa": app(c.apps.eoa, states[&c.apps.eoa].owner.to_checksum(None).into(), "one-step"),
        },
        "cvms": cvms,
        "nodes": nodes,
    }))
}

/// An open proposal of the Safe, as Safe{Wallet} lists it.
struct OpenProposal {
    safe_tx_hash: String,
    nonce: String,
    confirmed: usize,
    required: String,
    /// Per owner, what Safe{Wallet} would offer that owner.
    actions: Vec<OwnerAction>,
    /// Why it cannot be executed now; `None` when it can.
    blocker: Option<String>,
    /// An on-chain rejection (the Safe calling itself with nothing).
    is_rejection: bool,
}

/// What Safe{Wallet} shows one owner for one queued transaction.
struct OwnerAction {
    index: usize,
    /// "Confirm", "Execute" or "Signed; waiting for …".
    label: String,
    /// The owner may still confirm.
    can_confirm: bool,
}

/// The Safe's unexecuted proposals from the Safe Transaction Service.
async fn open_proposals(c: &Controls) -> Result<Vec<OpenProposal>, String> {
    let url = format!(
        "{}api/v2/safes/{}/multisig-transactions/?executed=false&ordering=nonce",
        with_slash(&c.safe_service_url),
        c.safe.to_checksum(None)
    );
    let page: Value = async {
        c.http
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
    }
    .await
    .map_err(|err: reqwest::Error| err.to_string())?;
    let results = page["results"].as_array().cloned().unwrap_or_default();
    let info = safe_info(c)
        .await
        .map_err(|(_, Json(body))| body.to_string())?;
    Ok(results
        .iter()
        .filter(|tx| tx["isExecuted"].as_bool() != Some(true))
        .map(|tx| {
            let owners: Vec<Address> = tx["confirmations"]
                .as_array()
                .map(|all| {
                    all.iter()
                        .filter_map(|c| c["owner"].as_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            let nonce = tx["nonce"].to_string().trim_matches('"').to_owned();
            let blocker = execute_blocker(
                nonce.parse().unwrap_or(u64::MAX),
                owners.len(),
                info.nonce,
                info.threshold,
            );
            let signed: Vec<bool> = c
                .owner_keys
                .iter()
                .map(|k| owners.contains(&k.address()))
                .collect();
            let missing = (info.threshold as usize).saturating_sub(owners.len());
            let actions = signed
                .iter()
                .enumerate()
                .map(|(index, &signed)| OwnerAction {
                    index,
                    label: match (signed, &blocker) {
                        (false, _) => "Confirm".to_owned(),
                        (true, None) => "Execute".to_owned(),
                        (true, Some(_)) if missing > 0 => format!(
                            "Signed; waiting for {missing} more signature{}",
                            if missing == 1 { "" } else { "s" }
                        ),
                        (true, Some(why)) => format!("Signed; waiting: {why}"),
                    },
                    can_confirm: !signed,
                })
                .collect();
            let is_rejection = tx["to"].as_str().and_then(|t| t.parse::<Address>().ok())
                == Some(c.safe)
                && tx["data"].as_str().is_none_or(|d| d == "0x")
                && tx["value"].to_string().trim_matches('"') == "0";
            OpenProposal {
                safe_tx_hash: tx["safeTxHash"].as_str().unwrap_or_default().to_owned(),
                nonce,
                confirmed: owners.len(),
                required: tx["confirmationsRequired"]
                    .to_string()
                    .trim_matches('"')
                    .to_owned(),
                actions,
                blocker,
                is_rejection,
            }
        })
        .collect())
}

#[derive(Template)]
#[template(path = "sandbox.html")]
struct SandboxPage {
    safe: String,
    threshold: u64,
    owners: Vec<String>,
    safe_owner: SafeOwnerView,
    operator: String,
    proposals: Vec<OpenProposal>,
    error: Option<String>,
    /// What a control posted by the page could not do, and why.
    notice: Option<String>,
}

#[derive(Template)]
#[template(path = "sandbox_proposals.html")]
struct ProposalsPartial {
    proposals: Vec<OpenProposal>,
    error: Option<String>,
    safe_owner: SafeOwnerView,
}

/// The Safe-owner as the page shows it.
struct SafeOwnerView {
    address: String,
    threshold: u64,
    owners: Vec<String>,
    /// Why it has no Confirm button.
    confirm: &'static str,
}

impl SafeOwnerView {
    fn of(c: &Controls) -> SafeOwnerView {
        SafeOwnerView {
            address: c.safe_owner.address.to_checksum(None),
            threshold: c.safe_owner.threshold,
            owners: c
                .safe_owner
                .keys
                .iter()
                .map(|k| k.address().to_checksum(None))
                .collect(),
            confirm: SAFE_OWNER_CONFIRM,
        }
    }
}

fn render(body: Result<String, askama::Error>) -> Response {
    match body {
        Ok(html) => Html(html).into_response(),
        Err(err) => reject(
            StatusCode::INTERNAL_SERVER_ERROR,
            "template",
            err.to_string(),
        )
        .into_response(),
    }
}

/// `GET /sandbox`: sign in to the team page as one of the sandbox's
/// accounts, and sign or execute the Safe's proposals as its owners. It
/// holds no token: queuing happens on the team page, as the signed-in person.
async fn page(
    State(c): State<Controls>,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let (proposals, error) = match open_proposals(&c).await {
        Ok(p) => (p, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    render(
        SandboxPage {
            safe: c.safe.to_checksum(None),
            threshold: c.threshold,
            safe_owner: SafeOwnerView::of(&c),
            owners: c
                .owner_keys
                .iter()
                .map(|k| k.address().to_checksum(None))
                .collect(),
            operator: c.operator_key.address().to_checksum(None),
            proposals,
            error,
            notice: query.get("notice").cloned(),
        }
        .render(),
    )
}

/// `GET /sandbox/proposals`: the page's proposal rows alone, polled by it.
async fn proposals_partial(State(c): State<Controls>) -> Response {
    let (proposals, error) = match open_proposals(&c).await {
        Ok(p) => (p, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    render(
        ProposalsPartial {
            proposals,
            error,
            safe_owner: SafeOwnerView::of(&c),
        }
        .render(),
    )
}

/// `POST /sandbox/dev-login` `account=owner-0|owner-1|owner-2|safe-owner|operator`:
/// signs in to the bridge as that account (see [`super::dev_login`]; the
/// Safe-owner with a contract signature) and hands its session cookie to
/// the browser.
async fn dev_login(
    State(c): State<Controls>,
    body: axum::body::Bytes,
) -> Result<Response, Rejection> {
    let account = form_urlencoded::parse(&body)
        .find(|(name, _)| name == "account")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let account = match account.as_str() {
        "operator" => DevAccount::Key(&c.operator_key),
        SAFE_OWNER_ACCOUNT => DevAccount::Safe(&c.safe_owner),
        other => other
            .strip_prefix("owner-")
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| c.owner_keys.get(i))
            .map(DevAccount::Key)
            .ok_or_else(|| {
                reject(
                    StatusCode::BAD_REQUEST,
                    "invalid_account",
                    format!(
                        "`{other}` is none of owner-0, owner-1, owner-2, {SAFE_OWNER_ACCOUNT}, operator"
                    ),
                )
            })?,
    };
    let cookie = super::dev_login::sign_in(&c.http, &c.bridge_url, account, c.chain.chain_id())
        .await
        .map_err(|err| {
            reject(
                StatusCode::BAD_GATEWAY,
                "sign_in_failed",
                format!("{err:#}"),
            )
        })?;
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/replicas")]).into_response();
    response.headers_mut().append(header::SET_COOKIE, cookie);
    Ok(response)
}

fn with_slash(url: &Url) -> String {
    let text = url.as_str();
    if text.ends_with('/') {
        text.to_owned()
    } else {
        format!("{text}/")
    }
}
