//! What the service reads from the chain: a Safe's owners, version, nonce
//! and storage, and its executions from the Safe's own events and the
//! transactions that made them.

use std::collections::HashMap;

use alloy::consensus::Transaction;
use alloy::primitives::{Address, B256, Bytes, U256, address, keccak256};
use alloy::providers::Provider;
use alloy::rpc::types::Filter;
use alloy::sol_types::{SolCall, SolEvent, SolValue};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde_json::json;

use super::Shared;
use super::fields::{Rejection, UNPROCESSABLE};
use crate::safe::ISafe;

/// The start and end of a Safe's module list.
const SENTINEL: Address = address!("0000000000000000000000000000000000000001");
/// Modules listed in the Safe info; a DstackApp owner has none or a few.
const MODULES_PAGE: u64 = 50;

/// One execution of a Safe transaction, from the Safe's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Execution {
    /// The Ethereum transaction.
    pub(super) tx_hash: B256,
    pub(super) success: bool,
    pub(super) block_number: u64,
    /// The refund the Safe paid (`payment` of the event).
    pub(super) payment: U256,
    /// The signatures it ran with, from SafeL2's `SafeMultiSigTransaction`.
    pub(super) signatures: Option<Bytes>,
}

/// What the chain says about a Safe at `latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SafeFacts {
    pub(super) chain_id: u64,
    /// `VERSION()` as returned; parsed by the rules.
    pub(super) version: String,
    pub(super) owners: Vec<Address>,
    pub(super) threshold: u64,
    pub(super) nonce: u64,
}

/// Executions of one Safe found in its logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Executions {
    /// By safeTxHash.
    pub(super) by_hash: HashMap<B256, Execution>,
    /// Safe nonce → Ethereum tx hash (SafeL2 events only).
    pub(super) by_nonce: HashMap<u64, B256>,
}

/// The Ethereum transaction behind an [`Execution`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct EthereumTx {
    pub(super) executor: Address,
    pub(super) executed_at: DateTime<Utc>,
    pub(super) gas_used: u64,
    /// The effective gas price paid.
    pub(super) gas_price: u128,
    pub(super) max_fee_per_gas: Option<u128>,
    pub(super) max_priority_fee_per_gas: Option<u128>,
    pub(super) signatures: Option<Bytes>,
}

/// A Safe's configuration, read live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SafeInfo {
    pub(super) address: Address,
    pub(super) nonce: u64,
    pub(super) threshold: u64,
    pub(super) owners: Vec<Address>,
    pub(super) master_copy: Address,
    pub(super) modules: Vec<Address>,
    pub(super) fallback_handler: Address,
    pub(super) guard: Address,
    pub(super) module_guard: Address,
    pub(super) version: String,
}

pub(super) mod events {
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

alloy::sol! {
    /// Safe functions beyond the bridge's own `ISafe`.
    #[sol(rpc)]
    interface ISafeMore {
        function getModulesPaginated(address start, uint256 pageSize)
            external view returns (address[] memory array, address next);
    }
}

/// A chain read that failed: the node is unreachable (503, as the real
/// service) or the Safe cannot be read (422).
pub(super) fn chain_error(safe: Address, err: &alloy::contract::Error) -> Rejection {
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
    pub(super) async fn chain_id(&self) -> Result<u64, Rejection> {
        self.rpc.get_chain_id().await.map_err(unreachable)
    }

    pub(super) async fn safe_facts(&self, safe: Address) -> Result<SafeFacts, Rejection> {
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
    pub(super) async fn executions(&self, safe: Address) -> Result<Executions, Rejection> {
        let filter = Filter::new()
            .address(safe)
            .from_block(0)
            .event_signature(vec![
                events::ExecutionSuccess::SIGNATURE_HASH,
                events::ExecutionFailure::SIGNATURE_HASH,
                events::SafeMultiSigTransaction::SIGNATURE_HASH,
            ]);
        let logs = self.rpc.get_logs(&filter).await.map_err(unreachable)?;
        let mut found = Executions::default();
        // SafeL2 emits SafeMultiSigTransaction (with the signatures) just
        // before the ExecutionSuccess/Failure of the same execution.
        let mut last_signatures: Option<(B256, Bytes)> = None;
        for log in logs {
            let (Some(topic0), Some(tx_hash)) = (log.topic0().copied(), log.transaction_hash)
            else {
                continue;
            };
            let data = &log.data().data;
            if topic0 == events::SafeMultiSigTransaction::SIGNATURE_HASH {
                if let Ok(event) = events::SafeMultiSigTransaction::abi_decode_data(data) {
                    if let Ok((nonce, _, _)) = <(U256, Address, U256)>::abi_decode_params(&event.10)
                    {
                        found.by_nonce.insert(nonce.saturating_to(), tx_hash);
                    }
                    last_signatures = Some((tx_hash, event.9));
                }
                continue;
            }
            // 1.4.1+: txHash is topic1 and `payment` the data; 1.3.0: both are data.
            let (safe_tx_hash, payment) = match log.topics().get(1) {
                Some(topic) => (*topic, word(data, 0)),
                None => match word(data, 0) {
                    Some(first) => (B256::from(first), word(data, 1)),
                    None => continue,
                },
            };
            let signatures = last_signatures
                .take()
                .filter(|(in_tx, _)| *in_tx == tx_hash)
                .map(|(_, signatures)| signatures);
            found.by_hash.insert(
                safe_tx_hash,
                Execution {
                    tx_hash,
                    success: topic0 == events::ExecutionSuccess::SIGNATURE_HASH,
                    block_number: log.block_number.unwrap_or_default(),
                    payment: payment.unwrap_or_default(),
                    signatures,
                },
            );
        }
        Ok(found)
    }

    /// The Ethereum transaction of an execution, as the real service's
    /// indexer stores it: sender, block time, gas and fees, and the
    /// signatures from `execTransaction`'s input when no SafeL2 event had them.
    pub(super) async fn ethereum_tx(
        &self,
        safe: Address,
        execution: &Execution,
    ) -> Result<EthereumTx, Rejection> {
        let hash = execution.tx_hash;
        let (tx, receipt, block) = tokio::try_join!(
            self.rpc.get_transaction_by_hash(hash),
            self.rpc.get_transaction_receipt(hash),
            self.rpc.get_block_by_number(execution.block_number.into()),
        )
        .map_err(unreachable)?;
        let missing = || unreachable(format!("the node does not know transaction {hash}"));
        let (tx, receipt, block) = (
            tx.ok_or_else(missing)?,
            receipt.ok_or_else(missing)?,
            block.ok_or_else(missing)?,
        );
        let signatures = execution.signatures.clone().or_else(|| {
            (tx.to() == Some(safe))
                .then(|| ISafe::execTransactionCall::abi_decode(tx.input()).ok())
                .flatten()
                .map(|call| call.signatures)
        });
        let timestamp =
            DateTime::from_timestamp(block.header.timestamp as i64, 0).unwrap_or_default();
        Ok(EthereumTx {
            executor: tx.inner.signer(),
            executed_at: timestamp,
            gas_used: receipt.gas_used,
            gas_price: receipt.effective_gas_price,
            max_fee_per_gas: tx.is_dynamic_fee().then(|| tx.max_fee_per_gas()),
            max_priority_fee_per_gas: tx.max_priority_fee_per_gas(),
            signatures,
        })
    }

    /// `GET /api/v1/safes/{address}/`: live reads, as the real view makes
    /// them; `None` when `safe` is not a Safe (the real service answers 404
    /// for a Safe it has not indexed, and this one indexes every Safe).
    pub(super) async fn safe_info(&self, safe: Address) -> Result<Option<SafeInfo>, Rejection> {
        let facts = match self.safe_facts(safe).await {
            Ok(facts) => facts,
            Err(rejection) if rejection.status == StatusCode::SERVICE_UNAVAILABLE => {
                return Err(rejection);
            }
            Err(_) => return Ok(None),
        };
        let slot = |name: &str| U256::from_be_bytes(keccak256(name).0);
        let stored = |value: U256| Address::from_word(B256::from(value));
        let (master_copy, fallback_handler, guard, module_guard, modules) = tokio::try_join!(
            self.rpc.get_storage_at(safe, U256::ZERO).into_future(),
            self.rpc
                .get_storage_at(safe, slot("fallback_manager.handler.address"))
                .into_future(),
            self.rpc
                .get_storage_at(safe, slot("guard_manager.guard.address"))
                .into_future(),
            self.rpc
                .get_storage_at(safe, slot("module_manager.module_guard.address"))
                .into_future(),
            async {
                ISafeMore::new(safe, self.rpc.clone())
                    .getModulesPaginated(SENTINEL, U256::from(MODULES_PAGE))
                    .call()
                    .await
                    .map(|page| page.array)
                    .map_err(|err| {
                        alloy::transports::TransportErrorKind::custom_str(&err.to_string())
                    })
            },
        )
        .map_err(unreachable)?;
        Ok(Some(SafeInfo {
            address: safe,
            nonce: facts.nonce,
            threshold: facts.threshold,
            owners: facts.owners,
            master_copy: stored(master_copy),
            modules,
            fallback_handler: stored(fallback_handler),
            guard: stored(guard),
            // Only 1.5.0 has a module guard; the slot is empty before.
            module_guard: stored(module_guard),
            version: facts.version,
        }))
    }
}

/// The `index`-th 32-byte word of event data.
fn word(data: &[u8], index: usize) -> Option<U256> {
    data.get(index * 32..(index + 1) * 32)
        .map(U256::from_be_slice)
}

/// A 503 as the real service gives when its node fails.
fn unreachable(err: impl std::fmt::Display) -> Rejection {
    Rejection {
        status: StatusCode::SERVICE_UNAVAILABLE,
        body: json!({
            "exception": "Problem connecting to Ethereum network",
            "trace": err.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::b256;

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
