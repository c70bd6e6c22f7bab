//! Sandbox-only HTTP controls: act as the Safe owners (sign, execute), show
//! the world as JSON, and a page with buttons for both. Never served by
//! `approval-bridge serve`.

use std::sync::Arc;

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::signers::local::PrivateKeySigner;
use askama::Template;
use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use reqwest::Url;
use serde::Deserialize;
use serde_json::{Value, json};

use super::SandboxApps;
use super::chain::LocalChain;
use super::phala_sim::PhalaSim;
use super::safe_service::SafeServiceSim;
use crate::chain::{ChainClient, Registration};
use crate::safe::{Operation, SafeTx, sign_safe_tx_hash};
use crate::store::Store;

#[derive(Clone)]
pub(super) struct Controls {
    pub chain: Arc<LocalChain>,
    pub safe: Address,
    /// Keys of the Safe's owners, by owner index.
    pub owner_keys: Vec<PrivateKeySigner>,
    /// A non-owner account that sends `execTransaction`.
    pub executor: PrivateKeySigner,
    pub safe_service: SafeServiceSim,
    pub safe_service_url: Url,
    pub phala: PhalaSim,
    pub apps: SandboxApps,
    pub store: Store,
    /// Shown on the page so its buttons can call the API.
    pub api_token: String,
    pub http: reqwest::Client,
}

pub(super) fn router(controls: Controls) -> Router {
    Router::new()
        .route("/sandbox", get(page))
        .route("/sandbox/world", get(world))
        .route("/sandbox/safe/{safe_tx_hash}/sign", post(sign))
        .route("/sandbox/safe/{safe_tx_hash}/execute", post(execute))
        .with_state(controls)
}

type Rejection = (StatusCode, Json<Value>);

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

/// `POST /sandbox/safe/{hash}/sign` `{"owner": 0|1|2}`: the owner confirms
/// the proposal at the Safe Transaction Service, as Safe{Wallet} would.
async fn sign(
    State(c): State<Controls>,
    Path(hash): Path<String>,
    body: Result<Json<SignBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, Rejection> {
    let hash = parse_hash(&hash)?;
    let Json(body) =
        body.map_err(|err| reject(StatusCode::BAD_REQUEST, "invalid_body", err.body_text()))?;
    let key = c.owner_keys.get(body.owner).ok_or_else(|| {
        reject(
            StatusCode::BAD_REQUEST,
            "invalid_owner",
            format!("owner must be 0 to {}", c.owner_keys.len() - 1),
        )
    })?;
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
    Ok(Json(json!({
        "safe_tx_hash": hash,
        "owner": key.address().to_checksum(None),
        "confirmations": confirmations.len(),
    })))
}

/// `POST /sandbox/safe/{hash}/execute`: a non-owner account executes the
/// proposal with the confirmations collected so far.
async fn execute(
    State(c): State<Controls>,
    Path(hash): Path<String>,
) -> Result<Json<Value>, Rejection> {
    let hash = parse_hash(&hash)?;
    let proposal = c
        .store
        .proposal_by_hash(&hash.to_string())
        .await
        .map_err(|err| {
            reject(
                StatusCode::INTERNAL_SERVER_ERROR,
                "database",
                err.to_string(),
            )
        })?
        .ok_or_else(|| {
            reject(
                StatusCode::NOT_FOUND,
                "unknown_proposal",
                format!("the bridge has no proposal {hash}"),
            )
        })?;
    let confirmed = c.safe_service.confirmations(hash);
    let signers: Vec<PrivateKeySigner> = c
        .owner_keys
        .iter()
        .filter(|k| confirmed.contains(&k.address()))
        .cloned()
        .collect();
    let client = ChainClient::new(c.chain.chain_id(), c.chain.rpc_url());
    let info = match client.owner_kind(c.safe).await {
        Ok(crate::chain::OwnerKind::Safe(info)) => info,
        _ => {
            return Err(reject(
                StatusCode::BAD_GATEWAY,
                "chain",
                "cannot read the Safe",
            ));
        }
    };
    if (signers.len() as u64) < info.threshold {
        return Err(reject(
            StatusCode::CONFLICT,
            "not_enough_confirmations",
            format!(
                "{} of {} confirmations; sign first",
                signers.len(),
                info.threshold
            ),
        ));
    }
    if info.nonce != proposal.nonce as u64 {
        return Err(reject(
            StatusCode::CONFLICT,
            "not_next",
            format!(
                "the Safe is at nonce {}, the proposal has nonce {}",
                info.nonce, proposal.nonce
            ),
        ));
    }
    let call = SafeTx::new(
        proposal
            .to_address
            .parse()
            .map_err(|_| reject(StatusCode::INTERNAL_SERVER_ERROR, "stored", "to"))?,
        U256::ZERO,
        proposal
            .data
            .parse()
            .map_err(|_| reject(StatusCode::INTERNAL_SERVER_ERROR, "stored", "data"))?,
        if proposal.operation == 1 {
            Operation::DelegateCall
        } else {
            Operation::Call
        },
        proposal.nonce as u64,
    );
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
    Ok(Json(json!({
        "safe_tx_hash": hash,
        "transaction_hash": receipt.transaction_hash,
        "block": receipt.block_number,
    })))
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
            "threshold": 2,
            "owners": c.owner_keys.iter().enumerate().map(|(i, k)| json!({"index": i, "address": k.address().to_checksum(None)})).collect::<Vec<_>>(),
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

#[derive(Template)]
#[template(path = "sandbox.html")]
struct SandboxPage {
    api_token: String,
    cvms: Vec<String>,
    nodes: Vec<String>,
    safe: String,
    owners: Vec<String>,
}

/// `GET /sandbox`: queue replicas, watch them, and sign or execute proposals.
async fn page(State(c): State<Controls>) -> Response {
    let world = c.phala.world();
    let page = SandboxPage {
        api_token: c.api_token.clone(),
        cvms: world.cvms.iter().map(|cvm| cvm.name.clone()).collect(),
        nodes: world.nodes.iter().map(|n| n.name.clone()).collect(),
        safe: c.safe.to_checksum(None),
        owners: c
            .owner_keys
            .iter()
            .map(|k| k.address().to_checksum(None))
            .collect(),
    };
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(err) => reject(
            StatusCode::INTERNAL_SERVER_ERROR,
            "template",
            err.to_string(),
        )
        .into_response(),
    }
}

fn with_slash(url: &Url) -> String {
    let text = url.as_str();
    if text.ends_with('/') {
        text.to_owned()
    } else {
        format!("{text}/")
    }
}
