//! What the service reads from the chain: a Safe's owners, version and
//! nonce, and its executions from the Safe's own events.

use alloy::primitives::{Address, B256, U256};
use alloy::providers::Provider;
use alloy::rpc::types::Filter;
use alloy::sol_types::{SolEvent, SolValue};
use axum::http::StatusCode;
use serde_json::json;

use super::Shared;
use super::fields::{Rejection, UNPROCESSABLE};
use super::rules::{Executions, SafeFacts};
use crate::safe::ISafe;

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
        self.rpc.get_chain_id().await.map_err(|e| Rejection {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: json!({
                "exception": "Problem connecting to Ethereum network",
                "trace": e.to_string(),
            }),
        })
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
