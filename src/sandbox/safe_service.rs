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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::Filter;
use alloy::sol_types::{SolEvent, SolValue};
use axum::Router;
use axum::body::Bytes as BodyBytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::Url;
use serde_json::{Map, Value, json};

use crate::safe::tx::SignatureKind;
use crate::safe::{
    ISafe, Operation, SafeTx, SafeVersion, delegate_hash, delegate_totp, recover_signer,
    split_signatures,
};

mod events {
    alloy::sol! {
        // topic0 is the same whether or not `txHash` is indexed (1.3.0 vs 1.4.1+).
        event ExecutionSuccess(bytes32 txHash, uint256 payment);
        event ExecutionFailure(bytes32 txHash, uint256 payment);
        // SafeL2 only; `additionalInfo = abi.encode(nonce, msg.sender, threshold)`.
        event SafeMultiSigTransaction(
            address to,
            uint256 value,
            bytes data,
            uint8 operation,
            uint256 safeTxGas,
            uint256 baseGas,
            uint256 gasPrice,
            address gasToken,
            address refundReceiver,
            bytes signatures,
            bytes additionalInfo
        );
    }
}

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
// Responses

/// An error answer: a status and a DRF-style JSON body.
#[derive(Debug, Clone, PartialEq)]
struct Rejection {
    status: StatusCode,
    body: Value,
}

impl Rejection {
    fn non_field(status: StatusCode, message: impl Into<String>) -> Rejection {
        Rejection {
            status,
            body: json!({ "nonFieldErrors": [message.into()] }),
        }
    }

    fn fields(status: StatusCode, errors: FieldErrors) -> Rejection {
        Rejection {
            status,
            body: serde_json::to_value(errors).expect("field errors serialize"),
        }
    }

    fn not_found(detail: &str) -> Rejection {
        Rejection {
            status: StatusCode::NOT_FOUND,
            body: json!({ "detail": detail }),
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

type FieldErrors = BTreeMap<String, Vec<String>>;

const UNPROCESSABLE: StatusCode = StatusCode::UNPROCESSABLE_ENTITY;

// ---------------------------------------------------------------------------
// Pure rules

/// An address field: EIP-55 only, as safe-eth-py's `EthereumAddressField`.
fn checksummed_address(text: &str) -> Result<Address, String> {
    match text.parse::<Address>() {
        Ok(address) if address.to_checksum(None) == text => Ok(address),
        Ok(_) => Err(format!("Address {text} is not checksumed")),
        Err(_) => Err(format!("Address {text} is not valid")),
    }
}

/// The Safe address in a URL path; the real service answers a wrong one with
/// its own error shape.
fn path_address(text: &str) -> Result<Address, Rejection> {
    checksummed_address(text).map_err(|_| Rejection {
        status: UNPROCESSABLE,
        body: json!({
            "code": 1,
            "message": "Checksum address validation failed",
            "arguments": [text],
        }),
    })
}

/// The JSON object of a request body. An empty body reads as `{}` (every
/// required field then reports itself missing); unparsable JSON is a 400,
/// as DRF's parser gives.
fn json_object(body: &[u8], invalid_status: StatusCode) -> Result<Map<String, Value>, Rejection> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => {
            let kind = match other {
                Value::Array(_) => "list",
                Value::String(_) => "str",
                Value::Number(_) => "int",
                Value::Bool(_) => "bool",
                _ => "NoneType",
            };
            Err(Rejection::non_field(
                invalid_status,
                format!("Invalid data. Expected a dictionary, but got {kind}."),
            ))
        }
        Err(err) => Err(Rejection {
            status: StatusCode::BAD_REQUEST,
            body: json!({ "detail": format!("JSON parse error - {err}") }),
        }),
    }
}

/// Reads the fields of one request body, collecting every field error as DRF
/// does before answering.
struct Fields<'a> {
    body: &'a Map<String, Value>,
    errors: FieldErrors,
}

impl<'a> Fields<'a> {
    fn new(body: &'a Map<String, Value>) -> Self {
        Fields {
            body,
            errors: FieldErrors::new(),
        }
    }

    fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.errors
            .entry(field.to_owned())
            .or_default()
            .push(message.into());
    }

    /// `None` for a missing or null field, with an error when it is required.
    fn present(&mut self, field: &str, required: bool) -> Option<&'a Value> {
        match self.body.get(field) {
            Some(Value::Null) => {
                if required {
                    self.fail(field, "This field may not be null.");
                }
                None
            }
            Some(value) => Some(value),
            None => {
                if required {
                    self.fail(field, "This field is required.");
                }
                None
            }
        }
    }

    fn address(&mut self, field: &str, required: bool) -> Option<Address> {
        let value = self.present(field, required)?;
        let Some(text) = value.as_str() else {
            self.fail(field, format!("Address {value} is not valid"));
            return None;
        };
        match checksummed_address(text) {
            Ok(address) => Some(address),
            Err(message) => {
                self.fail(field, message);
                None
            }
        }
    }

    /// A non-negative integer, as a JSON number or a decimal string.
    fn integer(&mut self, field: &str) -> Option<U256> {
        let value = self.present(field, true)?;
        let parsed = match value {
            Value::Number(n) if n.is_u64() => n.as_u64().map(U256::from),
            Value::Number(n) if n.is_i64() => {
                self.fail(field, "Ensure this value is greater than or equal to 0.");
                return None;
            }
            Value::String(s)
                if s.len() > 1
                    && s.starts_with('-')
                    && s[1..].bytes().all(|b| b.is_ascii_digit()) =>
            {
                self.fail(field, "Ensure this value is greater than or equal to 0.");
                return None;
            }
            Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                U256::from_str_radix(s, 10).ok()
            }
            _ => None,
        };
        if parsed.is_none() {
            self.fail(field, "A valid integer is required.");
        }
        parsed
    }

    /// `0x` hex; this fake also takes it without the prefix.
    fn hex(&mut self, field: &str, required: bool) -> Option<Bytes> {
        let value = self.present(field, required)?;
        let text = value.as_str().unwrap_or_default();
        let digits = text.strip_prefix("0x").unwrap_or(text);
        match hex::decode(digits) {
            Ok(bytes) if value.is_string() => Some(bytes.into()),
            // This fake's wording.
            _ => {
                self.fail(field, format!("{value} is not a valid hexadecimal value"));
                None
            }
        }
    }

    fn hash32(&mut self, field: &str) -> Option<B256> {
        let bytes = self.hex(field, true)?;
        if bytes.len() == 32 {
            Some(B256::from_slice(&bytes))
        } else {
            // This fake's wording.
            self.fail(field, format!("{bytes} is not a 32-byte hash"));
            None
        }
    }

    fn text(&mut self, field: &str, max_chars: usize, required: bool) -> Option<String> {
        let value = self.present(field, required)?;
        let Some(text) = value.as_str() else {
            self.fail(field, "Not a valid string.");
            return None;
        };
        if text.chars().count() > max_chars {
            self.fail(
                field,
                format!("Ensure this field has no more than {max_chars} characters."),
            );
            return None;
        }
        Some(text.to_owned())
    }

    fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, FieldErrors> {
        if self.errors.is_empty() {
            Ok(value())
        } else {
            Err(self.errors)
        }
    }
}

/// A proposal whose fields are well-formed.
#[derive(Debug, Clone, PartialEq)]
struct ParsedProposal {
    tx: SafeTx,
    contract_transaction_hash: B256,
    sender: Address,
    signature: Option<Bytes>,
    origin: Option<String>,
}

/// Step 1 of the real validation: the fields on their own.
fn parse_proposal(body: &Map<String, Value>) -> Result<ParsedProposal, FieldErrors> {
    let mut f = Fields::new(body);
    let to = f.address("to", true);
    let value = f.integer("value");
    let data = f.hex("data", false);
    let operation = match f.present("operation", true) {
        None => None,
        Some(v) => match v.as_u64().map(|n| u8::try_from(n).unwrap_or(u8::MAX)) {
            Some(n) => match Operation::try_from(n) {
                Ok(op) => Some(op),
                Err(_) => {
                    f.fail("operation", format!("\"{v}\" is not a valid choice."));
                    None
                }
            },
            None => {
                f.fail("operation", format!("\"{v}\" is not a valid choice."));
                None
            }
        },
    };
    let safe_tx_gas = f.integer("safeTxGas");
    let base_gas = f.integer("baseGas");
    let gas_price = f.integer("gasPrice");
    let gas_token = f.address("gasToken", false);
    let refund_receiver = f.address("refundReceiver", false);
    let nonce = f.integer("nonce").and_then(|n| {
        let fits = u64::try_from(n).ok();
        if fits.is_none() {
            f.fail("nonce", "A valid integer is required.");
        }
        fits
    });
    let contract_transaction_hash = f.hash32("contractTransactionHash");
    let sender = f.address("sender", true);
    if sender == Some(Address::ZERO) {
        // This fake's wording.
        f.fail("sender", "0x0 address is not allowed");
    }
    let signature = f.hex("signature", false).filter(|s| !s.is_empty());
    if let Some(sig) = &signature
        && sig.len() < 65
    {
        // This fake's wording.
        f.fail("signature", "Signature must be at least 65 bytes");
    }
    let origin = f.text("origin", 200, false);

    f.finish(|| ParsedProposal {
        tx: SafeTx {
            to: to.expect("checked"),
            value: value.expect("checked"),
            data: data.unwrap_or_default(),
            operation: operation.expect("checked"),
            safe_tx_gas: safe_tx_gas.expect("checked"),
            base_gas: base_gas.expect("checked"),
            gas_price: gas_price.expect("checked"),
            gas_token: gas_token.unwrap_or(Address::ZERO),
            refund_receiver: refund_receiver.unwrap_or(Address::ZERO),
            nonce: nonce.expect("checked"),
        },
        contract_transaction_hash: contract_transaction_hash.expect("checked"),
        sender: sender.expect("checked"),
        signature,
        origin,
    })
}

/// What the chain says about a Safe at `latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SafeFacts {
    chain_id: u64,
    /// `VERSION()` as returned; parsed by the rules.
    version: String,
    owners: Vec<Address>,
    threshold: u64,
    nonce: u64,
}

/// Executions of one Safe found in its logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Executions {
    /// safeTxHash → (Ethereum tx hash, success).
    by_hash: HashMap<B256, (B256, bool)>,
    /// Safe nonce → Ethereum tx hash (SafeL2 events only).
    by_nonce: HashMap<u64, B256>,
}

/// A proposal that passed every rule.
#[derive(Debug, Clone, PartialEq)]
struct Accepted {
    /// The owner behind the proposal: `sender`, or the delegator of a delegate.
    proposer: Address,
    proposed_by_delegate: Option<Address>,
    /// Owner signatures; a delegate's signature is proof of sender, not a confirmation.
    confirmations: Vec<(Address, Bytes, SignatureKind)>,
    trusted: bool,
}

/// Python's rendering of a list of addresses, as the real messages show it.
fn py_list(addresses: impl IntoIterator<Item = Address>) -> String {
    let items: Vec<String> = addresses
        .into_iter()
        .map(|a| format!("'{}'", a.to_checksum(None)))
        .collect();
    format!("[{}]", items.join(", "))
}

/// Steps 2-6 of the real validation, in its order.
///
/// `delegates` holds (delegate, delegator) pairs already limited to this
/// Safe (or any Safe), unexpired, with a delegator among the current owners.
fn validate_proposal(
    p: &ParsedProposal,
    safe: Address,
    facts: &SafeFacts,
    delegates: &[(Address, Address)],
    executions: &Executions,
) -> Result<Accepted, String> {
    // The fake cannot hash for a version it does not know. This fake's wording.
    let version: SafeVersion = facts
        .version
        .parse()
        .map_err(|err: crate::safe::UnsupportedVersion| err.to_string())?;

    if p.tx.operation == Operation::DelegateCall && !version.allows_delegatecall_to(p.tx.to) {
        return Err("Operation DELEGATE_CALL is not allowed".to_owned());
    }

    let computed = p.tx.hash(safe, facts.chain_id, version);
    if computed != p.contract_transaction_hash {
        return Err(format!(
            "Contract-transaction-hash={computed} does not match provided contract-tx-hash={}",
            p.contract_transaction_hash
        ));
    }

    if let Some((tx_hash, _)) = executions.by_hash.get(&computed) {
        return Err(format!(
            "Tx with safe-tx-hash={computed} was already executed in tx-hash={tx_hash}"
        ));
    }
    if p.tx.nonce < facts.nonce {
        // Without a SafeL2 event the executing transaction is unknown here.
        let tx_hash = executions
            .by_nonce
            .get(&p.tx.nonce)
            .map(ToString::to_string)
            .unwrap_or_else(|| "unknown".to_owned());
        return Err(format!(
            "Tx with nonce={} for safe={} already executed in tx-hash={tx_hash}",
            p.tx.nonce,
            safe.to_checksum(None)
        ));
    }

    let delegator_of = |address: Address| {
        delegates
            .iter()
            .find(|(delegate, _)| *delegate == address)
            .map(|(_, delegator)| *delegator)
    };
    let is_owner = |address: Address| facts.owners.contains(&address);
    let not_allowed = |who: &str, address: Address| {
        format!(
            "{who}={} is not an owner or delegate. Current owners={}. Delegates={}",
            address.to_checksum(None),
            py_list(facts.owners.iter().copied()),
            py_list(delegates.iter().map(|(d, _)| *d)),
        )
    };
    if !is_owner(p.sender) && delegator_of(p.sender).is_none() {
        return Err(not_allowed("Sender", p.sender));
    }

    let mut confirmations = Vec::new();
    let mut signers = Vec::new();
    if let Some(blob) = &p.signature {
        let parts = split_signatures(blob).map_err(|err| err.to_string())?;
        for part in parts {
            let (signer, kind) = recover_signer(computed, part).map_err(|err| {
                // This fake's wording.
                format!(
                    "Signature={} is not valid: {err}",
                    Bytes::copy_from_slice(part)
                )
            })?;
            if signers.contains(&signer) {
                return Err(format!(
                    "Signature for owner={} is duplicated",
                    signer.to_checksum(None)
                ));
            }
            if is_owner(signer) {
                confirmations.push((signer, Bytes::copy_from_slice(part), kind));
            } else if delegator_of(signer).is_none() {
                return Err(not_allowed("Signer", signer));
            }
            signers.push(signer);
        }
        let by_delegate = signers.iter().any(|s| !is_owner(*s));
        if by_delegate && signers.len() > 1 {
            return Err("Just one signature is expected if using delegates".to_owned());
        }
        if !signers.contains(&p.sender) {
            return Err(format!(
                "Signature does not match sender={}. Calculated owners={}",
                p.sender.to_checksum(None),
                py_list(signers.iter().copied())
            ));
        }
    }

    let (proposer, proposed_by_delegate) = if is_owner(p.sender) {
        (p.sender, None)
    } else {
        (
            delegator_of(p.sender).expect("checked above"),
            Some(p.sender),
        )
    };
    Ok(Accepted {
        proposer,
        proposed_by_delegate,
        confirmations,
        trusted: !signers.is_empty(),
    })
}

/// A delegate registration whose fields are well-formed.
#[derive(Debug, Clone, PartialEq)]
struct ParsedDelegate {
    safe: Option<Address>,
    delegate: Address,
    delegator: Address,
    label: String,
    signature: Bytes,
    expiry: Option<DateTime<Utc>>,
}

fn parse_delegate(body: &Map<String, Value>) -> Result<ParsedDelegate, FieldErrors> {
    let mut f = Fields::new(body);
    let safe = f.address("safe", false);
    let delegate = f.address("delegate", true);
    let delegator = f.address("delegator", true);
    let label = f.text("label", 50, true);
    let signature = f.hex("signature", true);
    let expiry = match f.present("expiryDate", false) {
        None => None,
        Some(v) => match v.as_str().map(DateTime::parse_from_rfc3339) {
            Some(Ok(date)) => Some(date.with_timezone(&Utc)),
            _ => {
                f.fail(
                    "expiryDate",
                    "Datetime has wrong format. Use one of these formats instead: \
                     YYYY-MM-DDThh:mm[:ss[.uuuuuu]][+HH:MM|-HH:MM|Z].",
                );
                None
            }
        },
    };
    f.finish(|| ParsedDelegate {
        safe,
        delegate: delegate.expect("checked"),
        delegator: delegator.expect("checked"),
        label: label.expect("checked"),
        signature: signature.expect("checked"),
        expiry,
    })
}

/// The delegator must have signed `Delegate{delegate, totp}` for this hour or
/// the previous one, with or without `chainId` in the domain.
fn check_delegate_signature(
    d: &ParsedDelegate,
    chain_id: u64,
    unix_now: u64,
) -> Result<(), String> {
    let totp = delegate_totp(unix_now);
    let matches = [totp, totp.saturating_sub(1)].iter().any(|&totp| {
        [Some(chain_id), None].iter().any(|&chain| {
            let digest = delegate_hash(d.delegate, totp, chain);
            recover_signer(digest, &d.signature).is_ok_and(|(signer, _)| signer == d.delegator)
        })
    });
    if matches {
        Ok(())
    } else {
        // This fake's wording.
        Err("Signature does not match provided delegator".to_owned())
    }
}

// ---------------------------------------------------------------------------
// Chain reads

/// A chain read that failed: the node is unreachable (503, as the real
/// service) or the Safe cannot be read (422).
fn chain_error(safe: Address, err: &alloy::contract::Error) -> Rejection {
    match err {
        alloy::contract::Error::TransportError(e) if !e.is_error_resp() => Rejection {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: json!({
                "exception": "Problem connecting to Ethereum network",
                "trace": e.to_string(),
            }),
        },
        _ => Rejection::non_field(
            UNPROCESSABLE,
            format!(
                "Could not get Safe {} owners from blockchain",
                safe.to_checksum(None)
            ),
        ),
    }
}

impl Shared {
    async fn chain_id(&self) -> Result<u64, Rejection> {
        self.rpc.get_chain_id().await.map_err(|e| Rejection {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: json!({
                "exception": "Problem connecting to Ethereum network",
                "trace": e.to_string(),
            }),
        })
    }

    async fn safe_facts(&self, safe: Address) -> Result<SafeFacts, Rejection> {
        let contract = ISafe::new(safe, self.rpc.clone());
        let version = contract.VERSION();
        let owners = contract.getOwners();
        let threshold = contract.getThreshold();
        let nonce = contract.nonce();
        let (version, owners, threshold, nonce) = tokio::try_join!(
            version.call(),
            owners.call(),
            threshold.call(),
            nonce.call()
        )
        .map_err(|err| chain_error(safe, &err))?;
        Ok(SafeFacts {
            chain_id: self.chain_id().await?,
            version,
            owners,
            threshold: threshold.saturating_to(),
            nonce: nonce.saturating_to(),
        })
    }

    /// Scans the Safe's whole log history: fine for a local chain.
    async fn executions(&self, safe: Address) -> Result<Executions, Rejection> {
        let filter = Filter::new()
            .address(safe)
            .from_block(0)
            .event_signature(vec![
                events::ExecutionSuccess::SIGNATURE_HASH,
                events::ExecutionFailure::SIGNATURE_HASH,
                events::SafeMultiSigTransaction::SIGNATURE_HASH,
            ]);
        let logs = self.rpc.get_logs(&filter).await.map_err(|e| Rejection {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: json!({
                "exception": "Problem connecting to Ethereum network",
                "trace": e.to_string(),
            }),
        })?;
        let mut found = Executions::default();
        for log in logs {
            let (Some(topic0), Some(tx_hash)) = (log.topic0().copied(), log.transaction_hash)
            else {
                continue;
            };
            let data = &log.data().data;
            if topic0 == events::SafeMultiSigTransaction::SIGNATURE_HASH {
                if let Ok(event) = events::SafeMultiSigTransaction::abi_decode_data(data)
                    && let Ok((nonce, _, _)) = <(U256, Address, U256)>::abi_decode_params(&event.10)
                {
                    found.by_nonce.insert(nonce.saturating_to(), tx_hash);
                }
                continue;
            }
            // 1.4.1+: txHash is topic1; 1.3.0: it is the first data word.
            let safe_tx_hash = match log.topics().get(1) {
                Some(topic) => *topic,
                None if data.len() >= 32 => B256::from_slice(&data[..32]),
                None => continue,
            };
            let success = topic0 == events::ExecutionSuccess::SIGNATURE_HASH;
            found.by_hash.insert(safe_tx_hash, (tx_hash, success));
        }
        Ok(found)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safe::tx::sign_safe_tx_hash;
    use crate::safe::{Call, Deployment, build_safe_tx};
    use alloy::primitives::{address, b256};
    use alloy::signers::SignerSync;
    use alloy::signers::local::PrivateKeySigner;

    const SAFE: Address = address!("1f9090aaE28b8a3dCeaDf281B0F12828e676c326");
    const APP: Address = address!("5FbDB2315678afecb367f032d93F642f64180aa3");
    const CHAIN: u64 = 31337;

    struct World {
        owners: Vec<PrivateKeySigner>,
        facts: SafeFacts,
    }

    fn world() -> World {
        let owners: Vec<PrivateKeySigner> = (0..3).map(|_| PrivateKeySigner::random()).collect();
        let facts = SafeFacts {
            chain_id: CHAIN,
            version: "1.4.1".into(),
            owners: owners.iter().map(|o| o.address()).collect(),
            threshold: 2,
            nonce: 5,
        };
        World { owners, facts }
    }

    fn batch(nonce: u64) -> SafeTx {
        let calls = [
            Call::add_compose_hash(APP, B256::repeat_byte(1)),
            Call::add_device(APP, B256::repeat_byte(2)),
        ];
        build_safe_tx(&calls, SafeVersion::V1_4_1, Deployment::Canonical, nonce).unwrap()
    }

    fn signed(tx: SafeTx, by: &[&PrivateKeySigner], sender: Address) -> ParsedProposal {
        let hash = tx.hash(SAFE, CHAIN, SafeVersion::V1_4_1);
        let mut blob = Vec::new();
        for signer in by {
            blob.extend_from_slice(&sign_safe_tx_hash(signer, hash).unwrap());
        }
        ParsedProposal {
            tx,
            contract_transaction_hash: hash,
            sender,
            signature: (!blob.is_empty()).then(|| blob.into()),
            origin: None,
        }
    }

    fn check(
        w: &World,
        p: &ParsedProposal,
        delegates: &[(Address, Address)],
    ) -> Result<Accepted, String> {
        validate_proposal(p, SAFE, &w.facts, delegates, &Executions::default())
    }

    #[test]
    fn addresses_must_be_checksummed() {
        let good = "0x5FbDB2315678afecb367f032d93F642f64180aa3";
        assert_eq!(checksummed_address(good), Ok(APP));
        let lower = good.to_lowercase();
        assert_eq!(
            checksummed_address(&lower),
            Err(format!("Address {lower} is not checksumed"))
        );
        assert_eq!(
            checksummed_address("0x12"),
            Err("Address 0x12 is not valid".into())
        );
        let path = path_address(&lower).unwrap_err();
        assert_eq!(path.status, UNPROCESSABLE);
        assert_eq!(path.body["message"], "Checksum address validation failed");
        assert_eq!(path.body["arguments"][0], lower.as_str());
    }

    #[test]
    fn bodies_parse_like_drf() {
        assert_eq!(json_object(b"", UNPROCESSABLE).unwrap(), Map::new());
        let garbled = json_object(b"{not json", UNPROCESSABLE).unwrap_err();
        assert_eq!(garbled.status, StatusCode::BAD_REQUEST);
        assert!(
            garbled.body["detail"]
                .as_str()
                .unwrap()
                .starts_with("JSON parse error")
        );
        let list = json_object(b"[1]", UNPROCESSABLE).unwrap_err();
        assert_eq!(list.status, UNPROCESSABLE);
        assert_eq!(
            list.body["nonFieldErrors"][0],
            "Invalid data. Expected a dictionary, but got list."
        );
        let missing = parse_proposal(&Map::new()).unwrap_err();
        for field in [
            "to",
            "value",
            "operation",
            "nonce",
            "contractTransactionHash",
            "sender",
        ] {
            assert_eq!(missing[field], vec!["This field is required."], "{field}");
        }
        assert!(!missing.contains_key("data") && !missing.contains_key("signature"));
    }

    #[test]
    fn proposal_fields_are_checked_together() {
        let w = world();
        let p = signed(batch(5), &[&w.owners[0]], w.owners[0].address());
        let mut body = crate::safe::Proposal {
            tx: p.tx.clone(),
            safe_tx_hash: p.contract_transaction_hash,
            sender: p.sender,
            signature: p.signature.clone().unwrap(),
            origin: Some("o".into()),
        }
        .body();
        let round_trip = parse_proposal(body.as_object().unwrap()).unwrap();
        assert_eq!(round_trip.tx, p.tx);
        assert_eq!(round_trip.origin.as_deref(), Some("o"));

        // Numbers are accepted as JSON numbers too.
        body["nonce"] = json!(5);
        assert_eq!(
            parse_proposal(body.as_object().unwrap()).unwrap().tx.nonce,
            5
        );

        body["to"] = json!(p.tx.to.to_string().to_lowercase());
        body["operation"] = json!(2);
        body["value"] = json!("-1");
        body["sender"] = json!(Address::ZERO.to_checksum(None));
        let errors = parse_proposal(body.as_object().unwrap()).unwrap_err();
        assert!(errors["to"][0].ends_with("is not checksumed"));
        assert_eq!(errors["operation"], vec!["\"2\" is not a valid choice."]);
        assert_eq!(
            errors["value"],
            vec!["Ensure this value is greater than or equal to 0."]
        );
        assert!(errors.contains_key("sender"));
    }

    #[test]
    fn an_owner_signed_proposal_is_accepted_with_its_confirmation() {
        let w = world();
        let owner = &w.owners[1];
        let accepted = check(&w, &signed(batch(5), &[owner], owner.address()), &[]).unwrap();
        assert_eq!(accepted.proposer, owner.address());
        assert_eq!(accepted.proposed_by_delegate, None);
        assert_eq!(accepted.confirmations.len(), 1);
        assert!(accepted.trusted);

        // Unsigned: accepted but untrusted, with no confirmation.
        let unsigned = check(&w, &signed(batch(6), &[], owner.address()), &[]).unwrap();
        assert!(!unsigned.trusted && unsigned.confirmations.is_empty());
    }

    #[test]
    fn delegatecall_only_to_the_versions_multisend_call_only() {
        let w = world();
        let owner = &w.owners[0];
        let mut tx = batch(5);
        tx.to = address!("38869bf66a61cF6bDB996A6aE40D5853Fd43B526"); // MultiSend 1.4.1
        let err = check(&w, &signed(tx, &[owner], owner.address()), &[]).unwrap_err();
        assert_eq!(err, "Operation DELEGATE_CALL is not allowed");

        let mut old = w.facts.clone();
        old.version = "1.2.0".into();
        let p = signed(batch(5), &[owner], owner.address());
        let err = validate_proposal(&p, SAFE, &old, &[], &Executions::default()).unwrap_err();
        assert!(err.contains("1.2.0"), "{err}");
    }

    #[test]
    fn the_hash_is_recomputed_for_the_chain() {
        let w = world();
        let owner = &w.owners[0];
        let mut p = signed(batch(5), &[owner], owner.address());
        p.contract_transaction_hash = batch(5).hash(SAFE, 1, SafeVersion::V1_4_1);
        let err = check(&w, &p, &[]).unwrap_err();
        assert!(err.starts_with("Contract-transaction-hash=0x"), "{err}");
        assert!(err.contains("does not match provided contract-tx-hash="));
    }

    #[test]
    fn a_used_nonce_is_rejected() {
        let w = world();
        let owner = &w.owners[0];
        let p = signed(batch(4), &[owner], owner.address());
        let err = check(&w, &p, &[]).unwrap_err();
        assert_eq!(
            err,
            format!(
                "Tx with nonce=4 for safe={} already executed in tx-hash=unknown",
                SAFE.to_checksum(None)
            )
        );
        let executed_in = b256!("00000000000000000000000000000000000000000000000000000000000000aa");
        let mut executions = Executions::default();
        executions.by_nonce.insert(4, executed_in);
        let err = validate_proposal(&p, SAFE, &w.facts, &[], &executions).unwrap_err();
        assert!(err.ends_with(&format!("tx-hash={executed_in}")));

        let current = signed(batch(5), &[owner], owner.address());
        executions
            .by_hash
            .insert(current.contract_transaction_hash, (executed_in, true));
        let err = validate_proposal(&current, SAFE, &w.facts, &[], &executions).unwrap_err();
        assert!(err.starts_with("Tx with safe-tx-hash="), "{err}");
    }

    #[test]
    fn sender_must_be_an_owner_or_delegate_and_sign() {
        let w = world();
        let stranger = PrivateKeySigner::random();
        let p = signed(batch(5), &[&stranger], stranger.address());
        let err = check(&w, &p, &[]).unwrap_err();
        assert!(
            err.starts_with(&format!(
                "Sender={} is not an owner or delegate. Current owners=['",
                stranger.address().to_checksum(None)
            )),
            "{err}"
        );
        assert!(err.ends_with("Delegates=[]"));

        // Owner 0 sends, owner 1 signed.
        let p = signed(batch(5), &[&w.owners[1]], w.owners[0].address());
        let err = check(&w, &p, &[]).unwrap_err();
        assert!(err.starts_with("Signature does not match sender="), "{err}");

        // A stranger's extra signature.
        let p = signed(batch(5), &[&w.owners[0], &stranger], w.owners[0].address());
        assert!(check(&w, &p, &[]).unwrap_err().starts_with("Signer="));

        // The same owner twice.
        let p = signed(
            batch(5),
            &[&w.owners[0], &w.owners[0]],
            w.owners[0].address(),
        );
        assert!(check(&w, &p, &[]).unwrap_err().contains("duplicated"));

        // Two owners: both confirm.
        let p = signed(
            batch(5),
            &[&w.owners[0], &w.owners[2]],
            w.owners[2].address(),
        );
        assert_eq!(check(&w, &p, &[]).unwrap().confirmations.len(), 2);
    }

    #[test]
    fn a_delegate_proposes_for_its_delegator_without_confirming() {
        let w = world();
        let delegate = PrivateKeySigner::random();
        let delegates = [(delegate.address(), w.owners[2].address())];
        let p = signed(batch(5), &[&delegate], delegate.address());
        let accepted = check(&w, &p, &delegates).unwrap();
        assert_eq!(accepted.proposer, w.owners[2].address());
        assert_eq!(accepted.proposed_by_delegate, Some(delegate.address()));
        assert!(accepted.confirmations.is_empty());
        assert!(accepted.trusted);

        let p = signed(batch(5), &[&delegate, &w.owners[0]], delegate.address());
        assert_eq!(
            check(&w, &p, &delegates).unwrap_err(),
            "Just one signature is expected if using delegates"
        );
    }

    #[test]
    fn eth_sign_signatures_are_understood() {
        let w = world();
        let owner = &w.owners[0];
        let mut p = signed(batch(5), &[], owner.address());
        let mut sig = owner
            .sign_message_sync(p.contract_transaction_hash.as_slice())
            .unwrap()
            .as_bytes();
        sig[64] += 4;
        p.signature = Some(Bytes::copy_from_slice(&sig));
        let accepted = check(&w, &p, &[]).unwrap();
        assert_eq!(accepted.confirmations[0].2, SignatureKind::EthSign);
    }

    #[test]
    fn delegate_registrations_need_the_delegators_signature_for_this_hour() {
        let owner = PrivateKeySigner::random();
        let delegate = PrivateKeySigner::random().address();
        let now = 1_700_000_000;
        let registration =
            crate::safe::DelegateRegistration::sign(&owner, delegate, None, "bridge", CHAIN, now)
                .unwrap();
        let body = registration.body();
        let parsed = parse_delegate(body.as_object().unwrap()).unwrap();
        assert_eq!(parsed.delegator, owner.address());
        assert_eq!(check_delegate_signature(&parsed, CHAIN, now), Ok(()));
        // The previous hour is still accepted, two hours later is not.
        assert_eq!(check_delegate_signature(&parsed, CHAIN, now + 3600), Ok(()));
        assert!(check_delegate_signature(&parsed, CHAIN, now + 7200).is_err());
        assert!(check_delegate_signature(&parsed, 1, now).is_err());

        let mut long = body.clone();
        long["label"] = json!("x".repeat(51));
        long["delegate"] = json!(delegate.to_string().to_lowercase());
        let errors = parse_delegate(long.as_object().unwrap()).unwrap_err();
        assert_eq!(
            errors["label"],
            vec!["Ensure this field has no more than 50 characters."]
        );
        assert!(errors["delegate"][0].ends_with("is not checksumed"));
    }

    #[test]
    fn execution_event_topics_match_the_reference() {
        assert_eq!(
            events::ExecutionSuccess::SIGNATURE_HASH,
            b256!("442e715f626346e8c54381002da614f62bee8d27386535b2521ec8540898556e")
        );
        assert_eq!(
            events::ExecutionFailure::SIGNATURE_HASH,
            b256!("23428b18acfb3ea64b08dc0c1d296ea9c09702c09083ca5272e64d115b687d23")
        );
        assert_eq!(
            events::SafeMultiSigTransaction::SIGNATURE_HASH,
            b256!("66753cd2356569ee081232e3be8909b950e0a76c1f8460c3a5e3c2be32b11bed")
        );
    }
}
