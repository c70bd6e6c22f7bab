//! The Safe Transaction Service (safe.md §1-3) behind a small trait, and its
//! reqwest client.
//!
//! The trait exists because a second implementation is real: the documented
//! successor (the "Safe Queue Service") has other paths and bodies, and the
//! tests and the sandbox talk to a fake.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alloy::primitives::{Address, B256, Bytes};
use alloy::signers::local::PrivateKeySigner;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};

use super::tx::{SafeTx, SignatureError, sign_safe_tx_hash};
use super::{SafeVersion, delegate_hash, delegate_totp, delete_request_hash};
use crate::domain::Failure;

/// A boxed future, so that [`SafeService`] can be held as `Arc<dyn SafeService>`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the bridge asks of a Safe transaction service.
pub trait SafeService: Send + Sync {
    /// Proposes a signed transaction. Safe to retry: the service keys
    /// proposals on `safeTxHash`, so a repeat is accepted without a duplicate.
    fn propose<'a>(
        &'a self,
        safe: Address,
        proposal: &'a Proposal,
    ) -> BoxFuture<'a, Result<(), SafeServiceError>>;

    /// The service's view of a proposal; `None` when it does not know the hash.
    fn get_transaction(
        &self,
        safe_tx_hash: B256,
    ) -> BoxFuture<'_, Result<Option<ServiceTx>, SafeServiceError>>;

    /// The highest nonce among the Safe's unexecuted (trusted) proposals at
    /// or above `nonce_gte`; `None` when there are none. With the on-chain
    /// nonce as `nonce_gte`, the next free nonce is this plus one, or the
    /// on-chain nonce.
    fn list_pending(
        &self,
        safe: Address,
        nonce_gte: u64,
    ) -> BoxFuture<'_, Result<Option<u64>, SafeServiceError>>;

    /// The Safe's (trusted) proposals with a nonce in `nonces`, executed or
    /// not, every page of them: one list call per page (200 a page) instead
    /// of a call per proposal.
    fn list_transactions(
        &self,
        safe: Address,
        nonces: std::ops::RangeInclusive<u64>,
    ) -> BoxFuture<'_, Result<Vec<ServiceTx>, SafeServiceError>>;

    /// Registers a delegate: a non-owner key allowed to propose for the
    /// delegator's Safes.
    fn register_delegate<'a>(
        &'a self,
        registration: &'a DelegateRegistration,
    ) -> BoxFuture<'a, Result<(), SafeServiceError>>;

    /// The registrations of `delegate`: for which Safe (or all) and by whom.
    fn delegates(
        &self,
        delegate: Address,
    ) -> BoxFuture<'_, Result<Vec<Delegation>, SafeServiceError>>;

    /// Deletes an unexecuted proposal, as its proposer may: `true` when the
    /// service deleted it, `false` when it does not know the hash.
    fn delete_transaction<'a>(
        &'a self,
        deletion: &'a Deletion,
    ) -> BoxFuture<'a, Result<bool, SafeServiceError>>;
}

/// One delegate registration as the service lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delegation {
    /// `None`: every Safe the delegator owns.
    pub safe: Option<Address>,
    pub delegate: Address,
    pub delegator: Address,
}

/// A signed proposal, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub tx: SafeTx,
    /// The EIP-712 hash of `tx` for the target Safe (`contractTransactionHash`).
    pub safe_tx_hash: B256,
    /// The owner or delegate that signed; the service requires the
    /// signature to recover to it.
    pub sender: Address,
    /// 65-byte signature of `safe_tx_hash` by `sender`. Always sent: an
    /// unsigned proposal is stored untrusted and hidden from Safe{Wallet}.
    pub signature: Bytes,
    /// Free text shown by Safe{Wallet} (at most 200 characters).
    pub origin: Option<String>,
}

impl Proposal {
    /// Hashes `tx` for `safe` and signs it with `signer`, the proposer.
    pub fn sign(
        tx: SafeTx,
        safe: Address,
        chain_id: u64,
        version: SafeVersion,
        signer: &PrivateKeySigner,
        origin: Option<String>,
    ) -> Result<Proposal, SignatureError> {
        let safe_tx_hash = tx.hash(safe, chain_id, version);
        let signature = sign_safe_tx_hash(signer, safe_tx_hash)?;
        Ok(Proposal {
            tx,
            safe_tx_hash,
            sender: signer.address(),
            signature: Bytes::copy_from_slice(&signature),
            origin,
        })
    }

    /// The JSON body of `POST .../multisig-transactions/`: camelCase keys,
    /// EIP-55 addresses (the service rejects any other spelling), numbers as
    /// decimal strings, `0x` hex data.
    pub fn body(&self) -> Value {
        let tx = &self.tx;
        let mut body = json!({
            "to": tx.to.to_checksum(None),
            "value": tx.value.to_string(),
            "data": tx.data.to_string(),
            "operation": u8::from(tx.operation),
            "safeTxGas": tx.safe_tx_gas.to_string(),
            "baseGas": tx.base_gas.to_string(),
            "gasPrice": tx.gas_price.to_string(),
            "gasToken": tx.gas_token.to_checksum(None),
            "refundReceiver": tx.refund_receiver.to_checksum(None),
            "nonce": tx.nonce.to_string(),
            "contractTransactionHash": self.safe_tx_hash.to_string(),
            "sender": self.sender.to_checksum(None),
            "signature": self.signature.to_string(),
        });
        if let Some(origin) = &self.origin {
            body["origin"] = Value::String(origin.clone());
        }
        body
    }
}

/// An owner's registration of a delegate proposer (safe.md §3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegateRegistration {
    /// `None` registers the delegate for every Safe the delegator owns, and
    /// works before the service has indexed the Safe.
    pub safe: Option<Address>,
    pub delegate: Address,
    pub delegator: Address,
    /// At most 50 characters.
    pub label: String,
    /// The delegator's signature of [`delegate_hash`] for the current hour.
    pub signature: Bytes,
}

impl DelegateRegistration {
    /// Signs the registration of `delegate` with the owner key `delegator`,
    /// for the hour that contains `unix_now`.
    pub fn sign(
        delegator: &PrivateKeySigner,
        delegate: Address,
        safe: Option<Address>,
        label: impl Into<String>,
        chain_id: u64,
        unix_now: u64,
    ) -> Result<DelegateRegistration, SignatureError> {
        let digest = delegate_hash(delegate, delegate_totp(unix_now), Some(chain_id));
        let signature = sign_safe_tx_hash(delegator, digest)?;
        Ok(DelegateRegistration {
            safe,
            delegate,
            delegator: delegator.address(),
            label: label.into(),
            signature: Bytes::copy_from_slice(&signature),
        })
    }

    pub fn body(&self) -> Value {
        json!({
            "safe": self.safe.map(|s| s.to_checksum(None)),
            "delegate": self.delegate.to_checksum(None),
            "delegator": self.delegator.to_checksum(None),
            "label": self.label,
            "signature": self.signature.to_string(),
        })
    }
}

/// A proposer's request to delete its unexecuted proposal (safe.md §2.3):
/// `DELETE /api/v2/multisig-transactions/{safeTxHash}/` with the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    pub safe_tx_hash: B256,
    /// The proposer's (or proposing delegate's) signature of
    /// [`delete_request_hash`] for the current hour.
    pub signature: Bytes,
}

impl Deletion {
    /// Signs the deletion of `safe_tx_hash` of `safe` with `signer`, for the
    /// hour that contains `unix_now`.
    pub fn sign(
        signer: &PrivateKeySigner,
        safe: Address,
        chain_id: u64,
        safe_tx_hash: B256,
        unix_now: u64,
    ) -> Result<Deletion, SignatureError> {
        let digest = delete_request_hash(safe_tx_hash, delegate_totp(unix_now), chain_id, safe);
        let signature = sign_safe_tx_hash(signer, digest)?;
        Ok(Deletion {
            safe_tx_hash,
            signature: Bytes::copy_from_slice(&signature),
        })
    }

    pub fn body(&self) -> Value {
        json!({"signature": self.signature.to_string()})
    }
}

/// The service's view of a proposal (a subset of the v2 shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceTx {
    pub safe_tx_hash: B256,
    pub nonce: u64,
    /// Owners whose confirmation the service holds.
    pub confirmations: Vec<Address>,
    /// The Safe's threshold; `None` until the service has indexed the Safe.
    pub confirmations_required: Option<u64>,
    pub is_executed: bool,
    pub is_successful: Option<bool>,
    /// The Ethereum transaction that executed it, once indexed.
    pub transaction_hash: Option<B256>,
    pub trusted: bool,
}

impl ServiceTx {
    pub fn confirmation_count(&self) -> usize {
        self.confirmations.len()
    }
}

/// A failed call to the Transaction Service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SafeServiceError {
    /// The service refused the request as invalid (HTTP 422, or 400 for
    /// delegates). `body` is exactly what it sent: it names the rule.
    #[error("the Safe Transaction Service rejected the request: {body}")]
    Rejected { body: String },
    /// Over the plan's request rate (HTTP 429). Passes with time.
    #[error("the Safe Transaction Service is rate-limiting the bridge")]
    RateLimited { retry_after: Option<Duration> },
    /// A server-side failure (5xx), e.g. its node is down. Passes with time.
    #[error("the Safe Transaction Service failed with HTTP {status}: {body}")]
    Unavailable { status: u16, body: String },
    /// Any other unexpected status, such as 401/403 for a bad API key.
    #[error("the Safe Transaction Service answered HTTP {status}: {body}")]
    Http { status: u16, body: String },
    /// No usable answer: connection refused, reset, or timed out.
    #[error("the Safe Transaction Service could not be reached: {message}")]
    Transport { message: String, timed_out: bool },
    /// A success status with a body we cannot read.
    #[error("the Safe Transaction Service sent an unexpected response: {0}")]
    InvalidResponse(String),
}

impl SafeServiceError {
    /// Rate limits, server errors and transport failures are worth retrying;
    /// a rejection will be rejected again.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SafeServiceError::RateLimited { .. }
                | SafeServiceError::Unavailable { .. }
                | SafeServiceError::Transport { .. }
        )
    }

    /// The code stored with a failed request.
    pub fn stored_code(&self) -> String {
        let failure = self.failure();
        match self {
            SafeServiceError::Unavailable { status, .. }
            | SafeServiceError::Http { status, .. } => failure.code_for_status(*status),
            _ => failure.code().to_owned(),
        }
    }

    pub fn suggestion(&self) -> &'static str {
        self.failure()
            .suggestion()
            .expect("every failure of the Safe Transaction Service has a suggestion")
    }

    /// Its entry in the catalogue of failures.
    fn failure(&self) -> Failure {
        match self {
            SafeServiceError::Rejected { .. } => Failure::SafeRejected,
            SafeServiceError::RateLimited { .. } => Failure::SafeRateLimited,
            SafeServiceError::Unavailable { .. } => Failure::SafeUnavailable,
            SafeServiceError::Http {
                status: 401 | 403, ..
            } => Failure::SafeUnauthorized,
            SafeServiceError::Http { .. } => Failure::SafeHttp,
            SafeServiceError::Transport {
                timed_out: true, ..
            } => Failure::SafeTimeout,
            SafeServiceError::Transport { .. } => Failure::SafeUnreachable,
            SafeServiceError::InvalidResponse(_) => Failure::SafeInvalidResponse,
        }
    }
}

/// The messages of a DRF error body: every string under any key
/// (`nonFieldErrors`, a field name, `detail`, `message`), prefixed by the
/// field it belongs to. For display only; the body itself stays verbatim.
pub fn rejection_messages(body: &str) -> Vec<String> {
    fn collect(prefix: Option<&str>, value: &Value, out: &mut Vec<String>) {
        match value {
            Value::String(text) => out.push(match prefix {
                Some(field) if field != "nonFieldErrors" && field != "detail" => {
                    format!("{field}: {text}")
                }
                _ => text.clone(),
            }),
            Value::Array(items) => items.iter().for_each(|i| collect(prefix, i, out)),
            Value::Object(map) => map
                .iter()
                .filter(|(key, _)| !matches!(key.as_str(), "code" | "arguments"))
                .for_each(|(key, v)| collect(Some(key), v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    match serde_json::from_str::<Value>(body) {
        Ok(json) => collect(None, &json, &mut out),
        Err(_) if !body.trim().is_empty() => out.push(body.trim().to_owned()),
        Err(_) => {}
    }
    out
}

/// Where and how to reach the service.
#[derive(Clone)]
pub struct TxServiceOptions {
    pub chain_id: u64,
    /// Overrides the hosted URL for `chain_id`; needed for local chains and
    /// self-hosted services. With or without a trailing `/api`.
    pub base_url: Option<Url>,
    /// Sent as `Authorization: Bearer <key>`; the hosted service needs one.
    pub api_key: Option<SecretString>,
    /// Client-side cap, shared by every clone of the client. The free plan
    /// allows 5 requests per second.
    pub requests_per_second: f64,
    pub timeout: Duration,
}

impl TxServiceOptions {
    pub const DEFAULT_REQUESTS_PER_SECOND: f64 = 5.0;

    pub fn for_chain(chain_id: u64) -> Self {
        TxServiceOptions {
            chain_id,
            base_url: None,
            api_key: None,
            requests_per_second: Self::DEFAULT_REQUESTS_PER_SECOND,
            timeout: Duration::from_secs(30),
        }
    }
}

/// The hosted service's URL for a chain (safe.md §1), for the chains the
/// bridge is meant for.
pub fn hosted_url(chain_id: u64) -> Option<Url> {
    let short = match chain_id {
        1 => "eth",
        11155111 => "sep",
        8453 => "base",
        84532 => "basesep",
        _ => return None,
    };
    Url::parse(&format!("https://api.safe.global/tx-service/{short}")).ok()
}

/// The service root (without `/api`) for a chain: the configured URL, else
/// the hosted one.
fn service_root(chain_id: u64, configured: Option<&Url>) -> anyhow::Result<Url> {
    let mut base = match configured {
        Some(url) => url.clone(),
        None => hosted_url(chain_id).ok_or_else(|| {
            anyhow::anyhow!(
                "no hosted Safe Transaction Service is known for chain {chain_id}; configure its URL"
            )
        })?,
    };
    // Paths below add `/api/v…` themselves; accept a URL that already has it.
    let trimmed = base.path().trim_end_matches('/');
    let root = trimmed.strip_suffix("/api").unwrap_or(trimmed).to_owned();
    base.set_path(&root);
    Ok(base)
}

/// The reqwest client of the Transaction Service.
#[derive(Clone)]
pub struct TxServiceClient {
    http: reqwest::Client,
    /// The service root, without `/api`.
    base: Url,
    authorization: Option<HeaderValue>,
    limiter: RateLimiter,
}

impl std::fmt::Debug for TxServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxServiceClient")
            .field("base", &self.base.as_str())
            .field(
                "api_key",
                &self.authorization.as_ref().map(|_| "[redacted]"),
            )
            .finish_non_exhaustive()
    }
}

impl TxServiceClient {
    pub fn new(options: &TxServiceOptions) -> anyhow::Result<Self> {
        let base = service_root(options.chain_id, options.base_url.as_ref())?;

        let authorization = options
            .api_key
            .as_ref()
            .map(|key| {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose_secret()))
                    .map_err(|_| {
                    anyhow::anyhow!("the Safe API key is not a valid header value")
                })?;
                // Redacted from reqwest's own Debug output.
                value.set_sensitive(true);
                anyhow::Ok(value)
            })
            .transpose()?;

        let http = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("approval-bridge/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(TxServiceClient {
            http,
            base,
            authorization,
            limiter: RateLimiter::new(options.requests_per_second)?,
        })
    }

    /// A client of another chain's service that shares this one's API key
    /// and request budget: the hosted gateway counts requests per key, not
    /// per chain.
    pub fn for_chain(&self, chain_id: u64, base_url: Option<&Url>) -> anyhow::Result<Self> {
        Ok(TxServiceClient {
            base: service_root(chain_id, base_url)?,
            ..self.clone()
        })
    }

    /// Builds the URL of `segments` below the service root, with a trailing
    /// slash: the tx-service routes all end in one.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("an http(s) base URL has path segments")
            .pop_if_empty()
            .extend(segments)
            .push("");
        url
    }

    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
    ) -> Result<(StatusCode, String), SafeServiceError> {
        self.limiter.acquire().await;
        let mut request = self
            .http
            .request(method.clone(), url.clone())
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(auth) = &self.authorization {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(record_transport_error)?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let text = response.text().await.map_err(record_transport_error)?;
        // A 404 answers a lookup ("no such transaction"); writes judge it themselves.
        crate::metrics::record_call(
            "safe_service",
            match status.as_u16() {
                s if s >= 400 && s != 404 => Err(s.to_string()),
                _ => Ok(()),
            },
        );
        // Method and path only: never headers, which carry the API key.
        tracing::debug!(%method, path = url.path(), status = status.as_u16(), "safe tx service");

        match status.as_u16() {
            200..=299 => Ok((status, text)),
            400 | 422 => Err(SafeServiceError::Rejected { body: text }),
            429 => Err(SafeServiceError::RateLimited { retry_after }),
            404 => Ok((status, text)),
            s if s >= 500 => Err(SafeServiceError::Unavailable {
                status: s,
                body: text,
            }),
            s => Err(SafeServiceError::Http {
                status: s,
                body: text,
            }),
        }
    }

    /// Like [`send`](Self::send), with 404 as an error: for writes, a 404
    /// means a wrong base URL, not a missing record.
    async fn write(&self, url: Url, body: &Value) -> Result<(), SafeServiceError> {
        match self.send(Method::POST, url, Some(body)).await? {
            (status, body) if status == StatusCode::NOT_FOUND => Err(SafeServiceError::Http {
                status: status.as_u16(),
                body,
            }),
            _ => Ok(()),
        }
    }

    pub async fn propose(
        &self,
        safe: Address,
        proposal: &Proposal,
    ) -> Result<(), SafeServiceError> {
        let safe = safe.to_checksum(None);
        let url = self.url(&["api", "v2", "safes", &safe, "multisig-transactions"]);
        self.write(url, &proposal.body()).await
    }

    pub async fn get_transaction(
        &self,
        safe_tx_hash: B256,
    ) -> Result<Option<ServiceTx>, SafeServiceError> {
        let hash = safe_tx_hash.to_string();
        let url = self.url(&["api", "v2", "multisig-transactions", &hash]);
        let (status, body) = self.send(Method::GET, url, None).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let wire: WireTx = decode(&body)?;
        wire.into_service_tx().map(Some)
    }

    pub async fn list_pending(
        &self,
        safe: Address,
        nonce_gte: u64,
    ) -> Result<Option<u64>, SafeServiceError> {
        let safe = safe.to_checksum(None);
        let mut url = self.url(&["api", "v2", "safes", &safe, "multisig-transactions"]);
        url.query_pairs_mut()
            .append_pair("executed", "false")
            .append_pair("nonce__gte", &nonce_gte.to_string())
            .append_pair("ordering", "-nonce")
            .append_pair("limit", "1");
        let (status, body) = self.send(Method::GET, url, None).await?;
        if status == StatusCode::NOT_FOUND {
            return Err(SafeServiceError::Http {
                status: status.as_u16(),
                body,
            });
        }
        let page: WirePage = decode(&body)?;
        // Ordered by nonce descending, but do not rely on it: take the max.
        let mut highest: Option<u64> = None;
        for listed in &page.results {
            let nonce = parse_u64(&listed.nonce)?;
            highest = Some(highest.map_or(nonce, |h| h.max(nonce)));
        }
        Ok(highest)
    }

    pub async fn list_transactions(
        &self,
        safe: Address,
        nonces: std::ops::RangeInclusive<u64>,
    ) -> Result<Vec<ServiceTx>, SafeServiceError> {
        let safe = safe.to_checksum(None);
        let mut out = Vec::new();
        // Paged by offset rather than by the `next` link, whose host is the
        // service's own idea of its address (not always the gateway's).
        for number in 0..MAX_LIST_PAGES {
            let mut url = self.url(&["api", "v2", "safes", &safe, "multisig-transactions"]);
            url.query_pairs_mut()
                .append_pair("nonce__gte", &nonces.start().to_string())
                .append_pair("nonce__lte", &nonces.end().to_string())
                .append_pair("ordering", "nonce")
                .append_pair("limit", &LIST_PAGE.to_string())
                .append_pair("offset", &(number * LIST_PAGE).to_string());
            let (status, body) = self.send(Method::GET, url, None).await?;
            if status == StatusCode::NOT_FOUND {
                return Err(SafeServiceError::Http {
                    status: status.as_u16(),
                    body,
                });
            }
            let page: WireTxPage = decode(&body)?;
            let listed = page.results.len();
            for wire in page.results {
                out.push(wire.into_service_tx()?);
            }
            if listed < LIST_PAGE || out.len() >= page.count {
                return Ok(out);
            }
        }
        Err(SafeServiceError::InvalidResponse(format!(
            "more than {} proposals listed for nonces {}..={}",
            MAX_LIST_PAGES * LIST_PAGE,
            nonces.start(),
            nonces.end()
        )))
    }

    pub async fn register_delegate(
        &self,
        registration: &DelegateRegistration,
    ) -> Result<(), SafeServiceError> {
        let url = self.url(&["api", "v2", "delegates"]);
        self.write(url, &registration.body()).await
    }

    /// `DELETE /api/v2/multisig-transactions/{safeTxHash}/`: 204 deleted,
    /// 404 unknown (`false`), 400 refused.
    pub async fn delete_transaction(&self, deletion: &Deletion) -> Result<bool, SafeServiceError> {
        let hash = deletion.safe_tx_hash.to_string();
        let url = self.url(&["api", "v2", "multisig-transactions", &hash]);
        let (status, _) = self
            .send(Method::DELETE, url, Some(&deletion.body()))
            .await?;
        Ok(status != StatusCode::NOT_FOUND)
    }
}

impl TxServiceClient {
    pub async fn delegates(&self, delegate: Address) -> Result<Vec<Delegation>, SafeServiceError> {
        let mut url = self.url(&["api", "v2", "delegates"]);
        url.query_pairs_mut()
            .append_pair("delegate", &delegate.to_checksum(None));
        let (status, body) = self.send(Method::GET, url, None).await?;
        if !status.is_success() {
            return Err(SafeServiceError::Http {
                status: status.as_u16(),
                body,
            });
        }
        let page: WireDelegates = decode(&body)?;
        Ok(page
            .results
            .into_iter()
            .map(|d| Delegation {
                safe: d.safe,
                delegate: d.delegate,
                delegator: d.delegator,
            })
            .collect())
    }
}

#[derive(Deserialize)]
struct WireDelegates {
    #[serde(default)]
    results: Vec<WireDelegate>,
}

#[derive(Deserialize)]
struct WireDelegate {
    #[serde(default)]
    safe: Option<Address>,
    delegate: Address,
    delegator: Address,
}

impl SafeService for TxServiceClient {
    fn propose<'a>(
        &'a self,
        safe: Address,
        proposal: &'a Proposal,
    ) -> BoxFuture<'a, Result<(), SafeServiceError>> {
        Box::pin(TxServiceClient::propose(self, safe, proposal))
    }

    fn get_transaction(
        &self,
        safe_tx_hash: B256,
    ) -> BoxFuture<'_, Result<Option<ServiceTx>, SafeServiceError>> {
        Box::pin(TxServiceClient::get_transaction(self, safe_tx_hash))
    }

    fn list_pending(
        &self,
        safe: Address,
        nonce_gte: u64,
    ) -> BoxFuture<'_, Result<Option<u64>, SafeServiceError>> {
        Box::pin(TxServiceClient::list_pending(self, safe, nonce_gte))
    }

    fn list_transactions(
        &self,
        safe: Address,
        nonces: std::ops::RangeInclusive<u64>,
    ) -> BoxFuture<'_, Result<Vec<ServiceTx>, SafeServiceError>> {
        Box::pin(TxServiceClient::list_transactions(self, safe, nonces))
    }

    fn register_delegate<'a>(
        &'a self,
        registration: &'a DelegateRegistration,
    ) -> BoxFuture<'a, Result<(), SafeServiceError>> {
        Box::pin(TxServiceClient::register_delegate(self, registration))
    }

    fn delegates(
        &self,
        delegate: Address,
    ) -> BoxFuture<'_, Result<Vec<Delegation>, SafeServiceError>> {
        Box::pin(TxServiceClient::delegates(self, delegate))
    }

    fn delete_transaction<'a>(
        &'a self,
        deletion: &'a Deletion,
    ) -> BoxFuture<'a, Result<bool, SafeServiceError>> {
        Box::pin(TxServiceClient::delete_transaction(self, deletion))
    }
}

/// Spaces requests at least `1 / rate` apart across every clone: each call
/// books the next free slot, then sleeps until it. No bursts, so N calls
/// always take at least (N-1)/rate.
#[derive(Clone)]
struct RateLimiter {
    interval: Duration,
    next_slot: Arc<Mutex<tokio::time::Instant>>,
}

impl RateLimiter {
    fn new(requests_per_second: f64) -> anyhow::Result<Self> {
        if !(requests_per_second.is_finite() && requests_per_second > 0.0) {
            anyhow::bail!("the Safe service request rate must be a positive number");
        }
        Ok(RateLimiter {
            interval: Duration::from_secs_f64(1.0 / requests_per_second),
            next_slot: Arc::new(Mutex::new(tokio::time::Instant::now())),
        })
    }

    async fn acquire(&self) {
        let slot = {
            let mut next = self.next_slot.lock().expect("rate limiter lock poisoned");
            let slot = (*next).max(tokio::time::Instant::now());
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// Also counted: the call got no answer.
fn record_transport_error(err: reqwest::Error) -> SafeServiceError {
    let code = if err.is_timeout() {
        "timeout"
    } else {
        "transport"
    };
    crate::metrics::record_call("safe_service", Err(code.to_owned()));
    SafeServiceError::Transport {
        timed_out: err.is_timeout(),
        message: err.without_url().to_string(),
    }
}

/// `Retry-After` (seconds), else the gateway's `X-RateLimit-Reset` (seconds).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    ["retry-after", "x-ratelimit-reset"]
        .iter()
        .filter_map(|name| {
            headers
                .get(*name)?
                .to_str()
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(Duration::from_secs)
        .next()
}

fn decode<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, SafeServiceError> {
    serde_json::from_str(body).map_err(|err| SafeServiceError::InvalidResponse(err.to_string()))
}

/// v1 sends some numbers as JSON numbers, v2 as strings; accept both.
fn parse_u64(value: &Value) -> Result<u64, SafeServiceError> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| SafeServiceError::InvalidResponse(format!("`{value}` is not a nonce")))
}

#[derive(Deserialize)]
struct WirePage {
    #[serde(default)]
    results: Vec<WireListed>,
}

/// The most a list page holds: the service's `DefaultPagination.max_limit`.
const LIST_PAGE: usize = 200;
/// A bound on one listing, so a runaway service cannot keep the planner.
const MAX_LIST_PAGES: usize = 10;

#[derive(Deserialize)]
struct WireTxPage {
    #[serde(default)]
    count: usize,
    #[serde(default)]
    results: Vec<WireTx>,
}

#[derive(Deserialize)]
struct WireListed {
    nonce: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireTx {
    safe_tx_hash: B256,
    nonce: Value,
    #[serde(default)]
    confirmations: Option<Vec<WireConfirmation>>,
    #[serde(default)]
    confirmations_required: Option<Value>,
    #[serde(default)]
    is_executed: bool,
    #[serde(default)]
    is_successful: Option<bool>,
    #[serde(default)]
    transaction_hash: Option<B256>,
    #[serde(default)]
    trusted: bool,
}

#[derive(Deserialize)]
struct WireConfirmation {
    owner: Address,
}

impl WireTx {
    fn into_service_tx(self) -> Result<ServiceTx, SafeServiceError> {
        let confirmations_required = match &self.confirmations_required {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_u64(v)?),
        };
        Ok(ServiceTx {
            safe_tx_hash: self.safe_tx_hash,
            nonce: parse_u64(&self.nonce)?,
            confirmations: self
                .confirmations
                .unwrap_or_default()
                .into_iter()
                .map(|c| c.owner)
                .collect(),
            confirmations_required,
            is_executed: self.is_executed,
            is_successful: self.is_successful,
            transaction_hash: self.transaction_hash,
            trusted: self.trusted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safe::tx::{Call, build_safe_tx, recover_signer};
    use crate::safe::{Deployment, SafeVersion};
    use alloy::primitives::address;
    use std::time::Instant;
    use wiremock::matchers::{body_json, header, method, path, query_param};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const SAFE: Address = address!("1f9090aaE28b8a3dCeaDf281B0F12828e676c326");
    const APP: Address = address!("5FbDB2315678afecb367f032d93F642f64180aa3");
    const SAFE_PATH: &str =
        "/api/v2/safes/0x1f9090aaE28b8a3dCeaDf281B0F12828e676c326/multisig-transactions/";

    fn client(server: &MockServer, key: Option<&str>, rate: f64) -> TxServiceClient {
        let mut options = TxServiceOptions::for_chain(31337);
        options.base_url = Some(Url::parse(&server.uri()).unwrap());
        options.api_key = key.map(|k| SecretString::from(k.to_owned()));
        options.requests_per_second = rate;
        options.timeout = Duration::from_millis(500);
        TxServiceClient::new(&options).unwrap()
    }

    fn proposal() -> Proposal {
        let calls = [
            Call::add_compose_hash(APP, B256::repeat_byte(0xaa)),
            Call::add_device(APP, B256::repeat_byte(0xbb)),
        ];
        let tx = build_safe_tx(&calls, SafeVersion::V1_4_1, Deployment::Canonical, 3).unwrap();
        let signer = PrivateKeySigner::random();
        Proposal::sign(
            tx,
            SAFE,
            31337,
            SafeVersion::V1_4_1,
            &signer,
            Some("approval-bridge".into()),
        )
        .unwrap()
    }

    #[test]
    fn hosted_urls_follow_the_short_names() {
        assert_eq!(
            hosted_url(1).unwrap().as_str(),
            "https://api.safe.global/tx-service/eth"
        );
        assert!(hosted_url(11155111).unwrap().as_str().ends_with("/sep"));
        assert!(hosted_url(8453).unwrap().as_str().ends_with("/base"));
        assert!(hosted_url(84532).unwrap().as_str().ends_with("/basesep"));
        assert!(hosted_url(31337).is_none());
        assert!(TxServiceClient::new(&TxServiceOptions::for_chain(31337)).is_err());
    }

    #[test]
    fn a_configured_url_may_end_in_api() {
        for given in [
            "http://h:1/x",
            "http://h:1/x/",
            "http://h:1/x/api",
            "http://h:1/x/api/",
        ] {
            let mut options = TxServiceOptions::for_chain(1);
            options.base_url = Some(Url::parse(given).unwrap());
            let client = TxServiceClient::new(&options).unwrap();
            assert_eq!(
                client.url(&["api", "v2", "delegates"]).as_str(),
                "http://h:1/x/api/v2/delegates/"
            );
        }
    }

    #[test]
    fn proposal_body_has_checksums_decimal_strings_and_hex() {
        let p = proposal();
        let body = p.body();
        assert_eq!(body["to"], "0x9641d764fc13c8B624c04430C7356C1C7C8102e2");
        assert_eq!(body["operation"], 1);
        assert_eq!(body["value"], "0");
        assert_eq!(body["safeTxGas"], "0");
        assert_eq!(body["nonce"], "3");
        assert_eq!(
            body["gasToken"],
            "0x0000000000000000000000000000000000000000"
        );
        assert_eq!(body["sender"], p.sender.to_checksum(None));
        assert!(body["data"].as_str().unwrap().starts_with("0x8d80ff0a"));
        assert_eq!(
            body["contractTransactionHash"],
            p.safe_tx_hash.to_string().as_str()
        );
        assert_eq!(body["origin"], "approval-bridge");
        let sig = hex::decode(&body["signature"].as_str().unwrap()[2..]).unwrap();
        assert_eq!(recover_signer(p.safe_tx_hash, &sig).unwrap().0, p.sender);
    }

    #[test]
    fn rejection_messages_read_drf_bodies() {
        assert_eq!(
            rejection_messages(r#"{"nonFieldErrors": ["Operation DELEGATE_CALL is not allowed"]}"#),
            vec!["Operation DELEGATE_CALL is not allowed"]
        );
        assert_eq!(
            rejection_messages(r#"{"to": ["Address 0xab is not checksumed"]}"#),
            vec!["to: Address 0xab is not checksumed"]
        );
        assert_eq!(
            rejection_messages(
                r#"{"code": 1, "message": "Checksum address validation failed", "arguments": ["0xab"]}"#
            ),
            vec!["message: Checksum address validation failed"]
        );
        assert_eq!(rejection_messages("<html>"), vec!["<html>"]);
    }

    #[tokio::test]
    async fn propose_posts_the_documented_body_to_the_checksummed_path() {
        let server = MockServer::start().await;
        let p = proposal();
        Mock::given(method("POST"))
            .and(path(SAFE_PATH))
            .and(header("content-type", "application/json"))
            .and(body_json(p.body()))
            .respond_with(ResponseTemplate::new(201))
            .expect(1)
            .mount(&server)
            .await;
        client(&server, None, 100.0)
            .propose(SAFE, &p)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_422_keeps_the_body_verbatim_and_is_permanent() {
        let server = MockServer::start().await;
        let body = r#"{"nonFieldErrors":["Sender=0xAb is not an owner or delegate. Current owners=[]. Delegates=[]"]}"#;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(422).set_body_string(body))
            .mount(&server)
            .await;
        let err = client(&server, None, 100.0)
            .propose(SAFE, &proposal())
            .await
            .unwrap_err();
        assert_eq!(
            err,
            SafeServiceError::Rejected {
                body: body.to_owned()
            }
        );
        assert!(!err.is_transient());
        assert_eq!(err.stored_code(), "SAFE-REJECTED");
    }

    #[tokio::test]
    async fn rate_limits_server_errors_and_timeouts_are_transient() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "2"))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(503).set_body_string("down"))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(201).set_delay(Duration::from_secs(2)))
            .mount(&server)
            .await;
        let client = client(&server, None, 100.0);
        let p = proposal();

        let limited = client.propose(SAFE, &p).await.unwrap_err();
        assert_eq!(
            limited,
            SafeServiceError::RateLimited {
                retry_after: Some(Duration::from_secs(2))
            }
        );
        let down = client.propose(SAFE, &p).await.unwrap_err();
        assert!(matches!(
            down,
            SafeServiceError::Unavailable { status: 503, .. }
        ));
        let slow = client.propose(SAFE, &p).await.unwrap_err();
        assert!(matches!(
            slow,
            SafeServiceError::Transport {
                timed_out: true,
                ..
            }
        ));
        for err in [limited, down, slow] {
            assert!(err.is_transient(), "{err:?}");
        }
    }

    #[tokio::test]
    async fn requests_are_spaced_by_the_configured_rate_across_clients() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(404))
            .mount(&server)
            .await;
        let rate = 10.0;
        let first = client(&server, None, rate);
        // A clone, and a client of "another chain" derived from it, share the budget.
        let base = Url::parse(&server.uri()).unwrap();
        let second = first.for_chain(1, Some(&base)).unwrap();
        let calls = 4;
        let started = Instant::now();
        for i in 0..calls {
            let c = if i % 2 == 0 { &first } else { &second };
            assert_eq!(c.get_transaction(B256::ZERO).await.unwrap(), None);
        }
        let min = Duration::from_secs_f64((calls - 1) as f64 / rate);
        assert!(
            started.elapsed() >= min,
            "{:?} < {min:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn the_api_key_is_sent_as_bearer_and_never_logged() {
        use std::io::Write;

        #[derive(Clone, Default)]
        struct Capture(Arc<Mutex<Vec<u8>>>);
        impl Write for Capture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let key = "sk-test-7f3a9c";
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(header("authorization", format!("Bearer {key}").as_str()))
            .respond_with(ResponseTemplate::new(201))
            .expect(2)
            .mount(&server)
            .await;
        let client = client(&server, Some(key), 100.0);
        // One call before the subscriber exists, so that this module's
        // callsites are registered by now: a first registration racing on
        // another test's thread could otherwise store "disabled" after the
        // rebuild below.
        client.propose(SAFE, &proposal()).await.unwrap();

        let logs = Capture::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        // The callsites were cached as disabled while no subscriber existed.
        tracing::callsite::rebuild_interest_cache();
        client.propose(SAFE, &proposal()).await.unwrap();

        let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert!(
            logged.contains("safe tx service"),
            "nothing logged: {logged}"
        );
        assert!(!logged.contains(key));
        assert!(!format!("{client:?}").contains(key));
    }

    #[tokio::test]
    async fn get_transaction_reads_the_v2_shape_and_404_is_none() {
        let server = MockServer::start().await;
        let hash = B256::repeat_byte(0x5a);
        let owner = address!("f39Fd6e51aad88F6F4ce6aB8827279cffFb92266");
        Mock::given(method("GET"))
            .and(path(format!("/api/v2/multisig-transactions/{hash}/")))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "safe": SAFE.to_checksum(None),
                "safeTxHash": hash.to_string(),
                "nonce": "7",
                "confirmations": [{"owner": owner.to_checksum(None), "signature": "0x"}],
                "confirmationsRequired": 2,
                "isExecuted": false,
                "isSuccessful": null,
                "transactionHash": null,
                "trusted": true,
            })))
            .mount(&server)
            .await;
        let client = client(&server, None, 100.0);
        let tx = client.get_transaction(hash).await.unwrap().unwrap();
        assert_eq!(tx.nonce, 7);
        assert_eq!(tx.confirmations, vec![owner]);
        assert_eq!(tx.confirmation_count(), 1);
        assert_eq!(tx.confirmations_required, Some(2));
        assert!(!tx.is_executed && tx.trusted);
        assert_eq!(client.get_transaction(B256::ZERO).await.unwrap(), None);
    }

    #[tokio::test]
    async fn delete_sends_the_proposers_signature_to_the_v2_path() {
        let server = MockServer::start().await;
        let signer = PrivateKeySigner::random();
        let hash = B256::repeat_byte(0x5a);
        let deletion = Deletion::sign(&signer, SAFE, 8453, hash, 1_700_000_000).unwrap();
        let digest = delete_request_hash(hash, delegate_totp(1_700_000_000), 8453, SAFE);
        assert_eq!(
            recover_signer(digest, &deletion.signature).unwrap().0,
            signer.address()
        );
        Mock::given(method("DELETE"))
            .and(path(format!("/api/v2/multisig-transactions/{hash}/")))
            .and(body_json(
                json!({"signature": deletion.signature.to_string()}),
            ))
            .respond_with(ResponseTemplate::new(204))
            .expect(1)
            .mount(&server)
            .await;
        let client = client(&server, None, 100.0);
        assert!(client.delete_transaction(&deletion).await.unwrap());
        let unknown = Deletion {
            safe_tx_hash: B256::ZERO,
            ..deletion
        };
        assert!(!client.delete_transaction(&unknown).await.unwrap());
    }

    #[tokio::test]
    async fn list_pending_asks_for_unexecuted_from_a_nonce() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(SAFE_PATH))
            .and(query_param("executed", "false"))
            .and(query_param("nonce__gte", "4"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "count": 2, "next": null, "previous": null,
                "results": [{"nonce": "6"}, {"nonce": 5}],
            })))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(SAFE_PATH))
            .and(query_param("nonce__gte", "9"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "count": 0, "next": null, "previous": null, "results": [],
            })))
            .mount(&server)
            .await;
        let client = client(&server, None, 100.0);
        // The trait object works as well as the concrete client.
        let service: Arc<dyn SafeService> = Arc::new(client);
        assert_eq!(service.list_pending(SAFE, 4).await.unwrap(), Some(6));
        assert_eq!(service.list_pending(SAFE, 9).await.unwrap(), None);
    }

    #[tokio::test]
    async fn list_transactions_asks_for_a_nonce_range_and_reads_every_page() {
        let server = MockServer::start().await;
        let listed = |n: u64| {
            json!({
                "safe": SAFE.to_checksum(None),
                "safeTxHash": B256::left_padding_from(&n.to_be_bytes()).to_string(),
                "nonce": n.to_string(),
                "confirmations": [],
                "confirmationsRequired": 2,
                "isExecuted": false,
                "trusted": true,
            })
        };
        // 201 rows: a full first page, then one more.
        let page = |offset: &str, rows: std::ops::Range<u64>| {
            Mock::given(method("GET"))
                .and(path(SAFE_PATH))
                .and(query_param("nonce__gte", "3"))
                .and(query_param("nonce__lte", "5"))
                .and(query_param("ordering", "nonce"))
                .and(query_param("limit", "200"))
                .and(query_param("offset", offset))
                .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                    "count": 201, "next": null, "previous": null,
                    "results": rows.map(listed).collect::<Vec<_>>(),
                })))
                .expect(1)
        };
        page("0", 0..200).mount(&server).await;
        page("200", 200..201).mount(&server).await;
        let client = client(&server, None, 1000.0);
        let all = client.list_transactions(SAFE, 3..=5).await.unwrap();
        assert_eq!(all.len(), 201);
        assert_eq!(all[200].nonce, 200);
        assert_eq!(all[0].confirmations_required, Some(2));
    }

    #[tokio::test]
    async fn register_delegate_posts_a_signed_registration() {
        let server = MockServer::start().await;
        let owner = PrivateKeySigner::random();
        let delegate = address!("70997970C51812dc3A010C7d01b50e0d17dc79C8");
        let registration =
            DelegateRegistration::sign(&owner, delegate, None, "bridge", 31337, 1_700_000_000)
                .unwrap();
        Mock::given(method("POST"))
            .and(path("/api/v2/delegates/"))
            .and(body_json(json!({
                "safe": null,
                "delegate": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
                "delegator": owner.address().to_checksum(None),
                "label": "bridge",
                "signature": registration.signature.to_string(),
            })))
            .respond_with(ResponseTemplate::new(201))
            .mount(&server)
            .await;
        client(&server, None, 100.0)
            .register_delegate(&registration)
            .await
            .unwrap();

        let digest = delegate_hash(delegate, delegate_totp(1_700_000_000), Some(31337));
        assert_eq!(
            recover_signer(digest, &registration.signature).unwrap().0,
            owner.address()
        );
    }
}
