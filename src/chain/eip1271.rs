//! EIP-1271: asking a contract account whether it accepts a signature, as a
//! wallet that is a contract (a Safe owning a Safe, say) signs.

use alloy::primitives::{Address, B256, Bytes, FixedBytes, fixed_bytes};
use alloy::providers::Provider;
use alloy::rpc::types::TransactionRequest;
use alloy::sol_types::SolCall;

use super::{ChainClient, IERC1271};

/// What `isValidSignature(bytes32,bytes)` returns for a signature the
/// contract accepts: its own selector.
pub const EIP1271_MAGIC: FixedBytes<4> = fixed_bytes!("1626ba7e");

impl ChainClient {
    /// Whether `account` accepts `signature` of `hash`: `Ok(true)` only when
    /// its `isValidSignature(hash, signature)` returns exactly the magic
    /// value. An account without code, another answer, or a revert (a Safe
    /// reverts on a bad owner signature) is `Ok(false)`; a failed RPC is an
    /// error, never an answer.
    pub async fn accepts_signature(
        &self,
        account: Address,
        hash: B256,
        signature: Bytes,
    ) -> anyhow::Result<bool> {
        let data = IERC1271::isValidSignatureCall { hash, signature }.abi_encode();
        let request = TransactionRequest::default().to(account).input(data.into());
        match self.provider.call(request).await {
            Ok(answer) => Ok(is_magic(&answer)),
            Err(err) => match err.as_error_resp() {
                Some(payload)
                    if payload.as_revert_data().is_some()
                        || payload.message.to_lowercase().contains("revert") =>
                {
                    Ok(false)
                }
                _ => Err(anyhow::Error::new(err).context(format!(
                    "isValidSignature eth_call on {account} failed on chain {}",
                    self.chain_id
                ))),
            },
        }
    }
}

/// The ABI encoding of the magic `bytes4`: one word, the value left-aligned
/// and the rest zero. Anything else (an EOA's empty answer, a fallback that
/// echoes its input) is no.
fn is_magic(answer: &[u8]) -> bool {
    answer.len() == 32 && answer[..4] == EIP1271_MAGIC[..] && answer[4..].iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::keccak256;

    #[test]
    fn the_magic_value_is_the_selector_of_is_valid_signature() {
        assert_eq!(
            keccak256("isValidSignature(bytes32,bytes)")[..4],
            EIP1271_MAGIC[..]
        );
        assert_eq!(IERC1271::isValidSignatureCall::SELECTOR, EIP1271_MAGIC.0);
    }

    #[test]
    fn only_the_exact_magic_word_counts() {
        let mut word = [0u8; 32];
        word[..4].copy_from_slice(&EIP1271_MAGIC[..]);
        assert!(is_magic(&word));
        assert!(!is_magic(&[]), "an account without code answers nothing");
        assert!(!is_magic(&word[..4]), "not ABI-encoded");
        let mut dirty = word;
        dirty[31] = 1;
        assert!(!is_magic(&dirty));
        let mut longer = word.to_vec();
        longer.extend_from_slice(&[0; 32]);
        assert!(!is_magic(&longer));
        assert!(!is_magic(&[0u8; 32]), "the legacy or a refusing answer");
    }
}
