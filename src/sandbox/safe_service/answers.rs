//! The service's JSON answers, as its DRF serializers write them (camelCase
//! keys), one struct per shape. The field lists follow the real service's
//! `SafeMultisigTransactionResponseSerializer` (and its V2), which api-kit's
//! `SafeMultisigTransactionResponse` and safe-eth-py's client read.

use alloy::primitives::{Address, U256};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;

use super::chain::{EthereumTx, Execution, SafeInfo};
use super::decoded::{DataDecoded, decode};
use super::{StoredConfirmation, StoredDelegate, StoredTx};
use crate::safe::tx::SignatureKind;
use crate::safe::{Operation, SafeVersion};

/// The real service's version this simulator follows (safe.md R1).
pub(super) const SERVICE_VERSION: &str = "6.10.1";

/// v1 writes `nonce`, `safeTxGas` and `baseGas` as numbers, v2 as strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ApiVersion {
    V1,
    V2,
}

impl ApiVersion {
    fn number(self, value: U256) -> Value {
        match (self, u64::try_from(value)) {
            (ApiVersion::V1, Ok(small)) => small.into(),
            _ => value.to_string().into(),
        }
    }
}

pub(super) fn timestamp(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn checksum(address: Address) -> String {
    address.to_checksum(None)
}

/// `SafeMultisigTransactionResponseSerializer`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct MultisigTransaction {
    safe: String,
    to: String,
    value: String,
    data: Option<String>,
    operation: u8,
    gas_token: String,
    safe_tx_gas: Value,
    base_gas: Value,
    gas_price: String,
    refund_receiver: String,
    nonce: Value,
    execution_date: Option<String>,
    submission_date: String,
    modified: String,
    block_number: Option<u64>,
    transaction_hash: Option<String>,
    safe_tx_hash: String,
    proposer: String,
    proposed_by_delegate: Option<String>,
    executor: Option<String>,
    is_executed: bool,
    is_successful: Option<bool>,
    eth_gas_price: Option<String>,
    max_fee_per_gas: Option<String>,
    max_priority_fee_per_gas: Option<String>,
    gas_used: Option<u64>,
    fee: Option<String>,
    payment: Option<String>,
    origin: String,
    data_decoded: Option<DataDecoded>,
    confirmations_required: u64,
    confirmations: Vec<Confirmation>,
    trusted: bool,
    signatures: Option<String>,
}

/// `SafeMultisigConfirmationResponseSerializer`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Confirmation {
    owner: String,
    submission_date: String,
    /// Set only for confirmations made on chain (`approveHash`).
    transaction_hash: Option<String>,
    signature: String,
    signature_type: &'static str,
}

impl Confirmation {
    pub(super) fn of(c: &StoredConfirmation) -> Confirmation {
        Confirmation {
            owner: checksum(c.owner),
            submission_date: timestamp(&c.submitted),
            transaction_hash: None,
            signature: c.signature.to_string(),
            signature_type: match c.kind {
                SignatureKind::Ecdsa => "EOA",
                SignatureKind::EthSign => "ETH_SIGN",
            },
        }
    }
}

/// What the chain says about a stored proposal.
pub(super) struct Onchain<'a> {
    pub(super) version: SafeVersion,
    pub(super) threshold: u64,
    pub(super) execution: Option<(&'a Execution, &'a EthereumTx)>,
}

impl MultisigTransaction {
    pub(super) fn of(stored: &StoredTx, chain: &Onchain<'_>, api: ApiVersion) -> Self {
        let tx = &stored.tx;
        let execution = chain.execution.map(|(e, _)| e);
        let ethereum = chain.execution.map(|(_, t)| t);
        // A DELEGATECALL is decoded only into a contract trusted for it.
        let decodable =
            tx.operation == Operation::Call || chain.version.allows_delegatecall_to(tx.to);
        MultisigTransaction {
            safe: checksum(stored.safe),
            to: checksum(tx.to),
            value: tx.value.to_string(),
            data: (!tx.data.is_empty()).then(|| tx.data.to_string()),
            operation: u8::from(tx.operation),
            gas_token: checksum(tx.gas_token),
            safe_tx_gas: api.number(tx.safe_tx_gas),
            base_gas: api.number(tx.base_gas),
            gas_price: tx.gas_price.to_string(),
            refund_receiver: checksum(tx.refund_receiver),
            nonce: api.number(U256::from(tx.nonce)),
            execution_date: ethereum.map(|t| timestamp(&t.executed_at)),
            submission_date: timestamp(&stored.submitted),
            modified: timestamp(&stored.modified),
            block_number: execution.map(|e| e.block_number),
            transaction_hash: execution.map(|e| e.tx_hash.to_string()),
            safe_tx_hash: stored.safe_tx_hash.to_string(),
            proposer: checksum(stored.proposer),
            proposed_by_delegate: stored.proposed_by_delegate.map(checksum),
            executor: ethereum.map(|t| checksum(t.executor)),
            is_executed: execution.is_some(),
            is_successful: execution.map(|e| e.success),
            eth_gas_price: ethereum.map(|t| t.gas_price.to_string()),
            max_fee_per_gas: ethereum
                .and_then(|t| t.max_fee_per_gas)
                .map(|f| f.to_string()),
            max_priority_fee_per_gas: ethereum
                .and_then(|t| t.max_priority_fee_per_gas)
                .map(|f| f.to_string()),
            gas_used: ethereum.map(|t| t.gas_used),
            fee: ethereum.map(|t| (u128::from(t.gas_used) * t.gas_price).to_string()),
            payment: execution.map(|e| e.payment.to_string()),
            origin: origin_answer(stored.origin.as_deref()),
            data_decoded: decodable.then(|| decode(&tx.data)).flatten(),
            // From the indexed Safe: its threshold now.
            confirmations_required: chain.threshold,
            confirmations: stored.confirmations.iter().map(Confirmation::of).collect(),
            trusted: stored.trusted,
            signatures: ethereum
                .and_then(|t| t.signatures.as_ref())
                .map(ToString::to_string),
        }
    }
}

/// `origin` as stored (a JSON field: the posted text parsed when it is
/// JSON, `{}` when absent) and answered (a string as is, anything else
/// through Python's `json.dumps`).
fn origin_answer(posted: Option<&str>) -> String {
    match posted.filter(|text| !text.is_empty()) {
        None => "{}".to_owned(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::String(inner)) => inner,
            Ok(other) => python_dumps(&other),
            Err(_) => text.to_owned(),
        },
    }
}

/// Python's `json.dumps` with its default separators and `ensure_ascii`.
/// (Object keys come out sorted, where Python keeps the posted order.)
fn python_dumps(value: &Value) -> String {
    match value {
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(python_dumps).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(map) => {
            let items: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", python_string(k), python_dumps(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::String(text) => python_string(text),
        other => other.to_string(),
    }
}

fn python_string(text: &str) -> String {
    let mut out = String::from("\"");
    for unit in text.encode_utf16() {
        match unit {
            0x22 => out.push_str("\\\""),
            0x5c => out.push_str("\\\\"),
            0x0a => out.push_str("\\n"),
            0x0d => out.push_str("\\r"),
            0x09 => out.push_str("\\t"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            0x20..=0x7f => out.push(char::from(unit as u8)),
            _ => out.push_str(&format!("\\u{unit:04x}")),
        }
    }
    out.push('"');
    out
}

/// `SafeInfoResponseSerializer`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SafeInfoAnswer {
    address: String,
    nonce: String,
    threshold: u64,
    owners: Vec<String>,
    master_copy: String,
    modules: Vec<String>,
    fallback_handler: String,
    guard: String,
    module_guard: String,
    version: String,
}

impl SafeInfoAnswer {
    pub(super) fn of(info: SafeInfo) -> SafeInfoAnswer {
        SafeInfoAnswer {
            address: checksum(info.address),
            nonce: info.nonce.to_string(),
            threshold: info.threshold,
            owners: info.owners.into_iter().map(checksum).collect(),
            master_copy: checksum(info.master_copy),
            modules: info.modules.into_iter().map(checksum).collect(),
            fallback_handler: checksum(info.fallback_handler),
            guard: checksum(info.guard),
            module_guard: checksum(info.module_guard),
            version: info.version,
        }
    }
}

/// `GET /api/v1/about/` (rendered without camelCase, as the real view).
#[derive(Debug, Serialize)]
pub(super) struct About {
    name: &'static str,
    version: &'static str,
    api_version: &'static str,
    secure: bool,
    host: String,
    headers: Vec<String>,
    settings: AboutSettings,
}

#[derive(Debug, Serialize)]
#[allow(non_snake_case)]
struct AboutSettings {
    AWS_CONFIGURED: bool,
    AWS_S3_PUBLIC_URL: Option<String>,
    ETHEREUM_NODE_URL: String,
    ETHEREUM_TRACING_NODE_URL: Option<String>,
    ETH_EVENTS_BLOCK_PROCESS_LIMIT: u64,
    ETH_EVENTS_BLOCK_PROCESS_LIMIT_MAX: u64,
    ETH_EVENTS_QUERY_CHUNK_SIZE: u64,
    ETH_EVENTS_UPDATED_BLOCK_BEHIND: u64,
    ETH_INTERNAL_NO_FILTER: bool,
    ETH_INTERNAL_TRACE_TXS_BATCH_SIZE: u64,
    ETH_INTERNAL_TXS_BLOCK_PROCESS_LIMIT: u64,
    ETH_L2_NETWORK: bool,
    ETH_REORG_BLOCKS: u64,
    SSO_ENABLED: bool,
    TOKENS_LOGO_BASE_URI: String,
    TOKENS_LOGO_EXTENSION: &'static str,
}

impl About {
    /// `node` is shown by origin only: a node URL may carry a key.
    pub(super) fn new(host: String, node: &reqwest::Url) -> About {
        About {
            name: "Safe Transaction Service",
            version: SERVICE_VERSION,
            api_version: "v1",
            secure: false,
            host,
            headers: Vec::new(),
            settings: AboutSettings {
                AWS_CONFIGURED: false,
                AWS_S3_PUBLIC_URL: None,
                ETHEREUM_NODE_URL: node.origin().ascii_serialization(),
                ETHEREUM_TRACING_NODE_URL: None,
                ETH_EVENTS_BLOCK_PROCESS_LIMIT: 50,
                ETH_EVENTS_BLOCK_PROCESS_LIMIT_MAX: 0,
                ETH_EVENTS_QUERY_CHUNK_SIZE: 1000,
                ETH_EVENTS_UPDATED_BLOCK_BEHIND: 24 * 60 * 60 / 15,
                ETH_INTERNAL_NO_FILTER: false,
                ETH_INTERNAL_TRACE_TXS_BATCH_SIZE: 0,
                ETH_INTERNAL_TXS_BLOCK_PROCESS_LIMIT: 10_000,
                ETH_L2_NETWORK: true,
                ETH_REORG_BLOCKS: 200,
                SSO_ENABLED: false,
                TOKENS_LOGO_BASE_URI: String::new(),
                TOKENS_LOGO_EXTENSION: ".png",
            },
        }
    }
}

/// `DelegateSerializerV2` as answered.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Delegate {
    safe: Option<String>,
    delegate: String,
    delegator: String,
    label: String,
    expiry_date: Option<String>,
}

impl Delegate {
    pub(super) fn of(d: &StoredDelegate) -> Delegate {
        Delegate {
            safe: d.safe.map(checksum),
            delegate: checksum(d.delegate),
            delegator: checksum(d.delegator),
            label: d.label.clone(),
            expiry_date: d.expiry.as_ref().map(timestamp),
        }
    }
}

/// DRF's `LimitOffsetPagination` page; the multisig lists add `countUniqueNonce`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Page<T> {
    count: usize,
    next: Option<String>,
    previous: Option<String>,
    results: Vec<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count_unique_nonce: Option<usize>,
}

/// `limit`/`offset` of a list request, bounded as the real pagination is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Window {
    pub(super) limit: usize,
    pub(super) offset: usize,
}

impl Window {
    /// `DefaultPagination`: 100 by default, at most 200.
    pub(super) fn from_query(limit: Option<&str>, offset: Option<&str>) -> Window {
        let limit = limit
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0)
            .map_or(100, |l| l.min(200));
        let offset = offset.and_then(|o| o.parse().ok()).unwrap_or(0);
        Window { limit, offset }
    }
}

impl Window {
    /// The rows of `all` this window shows.
    pub(super) fn take<T>(self, all: Vec<T>) -> Vec<T> {
        all.into_iter().skip(self.offset).take(self.limit).collect()
    }
}

impl<T> Page<T> {
    /// The page of `count` rows that `window` shows as `results`; `url` is
    /// the request URL, for `next` and `previous`.
    pub(super) fn new(
        count: usize,
        window: Window,
        url: &reqwest::Url,
        results: Vec<T>,
    ) -> Page<T> {
        let link = |offset: usize| {
            let mut url = url.clone();
            let kept: Vec<(String, String)> = url
                .query_pairs()
                .filter(|(k, _)| k != "limit" && k != "offset")
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            url.query_pairs_mut()
                .clear()
                .extend_pairs(kept)
                .append_pair("limit", &window.limit.to_string());
            if offset > 0 {
                url.query_pairs_mut()
                    .append_pair("offset", &offset.to_string());
            }
            url.to_string()
        };
        let next =
            (window.offset + window.limit < count).then(|| link(window.offset + window.limit));
        let previous =
            (window.offset > 0).then(|| link(window.offset.saturating_sub(window.limit)));
        Page {
            count,
            next,
            previous,
            results,
            count_unique_nonce: None,
        }
    }

    pub(super) fn with_unique_nonces(mut self, count: usize) -> Page<T> {
        self.count_unique_nonce = Some(count);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_is_answered_as_the_real_serializer_does() {
        assert_eq!(origin_answer(None), "{}");
        assert_eq!(origin_answer(Some("")), "{}");
        assert_eq!(origin_answer(Some("approval-bridge")), "approval-bridge");
        assert_eq!(origin_answer(Some("\"quoted\"")), "quoted");
        assert_eq!(
            origin_answer(Some(r#"{"url":"https://x","name":"é"}"#)),
            r#"{"name": "\u00e9", "url": "https://x"}"#
        );
        assert_eq!(origin_answer(Some("[1,true,null]")), "[1, true, null]");
    }

    #[test]
    fn pages_link_to_their_neighbours() {
        let url: reqwest::Url =
            "http://s/api/v2/safes/0xS/multisig-transactions/?executed=false&limit=2&offset=2"
                .parse()
                .unwrap();
        let window = Window::from_query(Some("2"), Some("2"));
        let page = Page::new(5, window, &url, window.take((0..5).collect::<Vec<_>>()));
        assert_eq!(page.results, [2, 3]);
        assert_eq!(page.count, 5);
        assert!(
            page.next
                .as_deref()
                .unwrap()
                .ends_with("?executed=false&limit=2&offset=4")
        );
        assert!(
            page.previous
                .as_deref()
                .unwrap()
                .ends_with("?executed=false&limit=2")
        );
        assert_eq!(Window::from_query(None, None).limit, 100);
        assert_eq!(Window::from_query(Some("1000"), None).limit, 200);
    }
}
