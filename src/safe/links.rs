//! Links to the Safe's own app, where the owners sign.

use alloy::primitives::Address;

/// Safe{Wallet}'s short chain names, for links.
pub fn short_chain_name(chain_id: u64) -> Option<&'static str> {
    Some(match chain_id {
        1 => "eth",
        10 => "oeth",
        100 => "gno",
        137 => "pol",
        8453 => "base",
        42161 => "arb1",
        84532 => "basesep",
        11155111 => "sep",
        _ => return None,
    })
}

/// The proposal in Safe{Wallet}, where the owners sign it.
pub fn safe_wallet_link(chain_id: u64, safe: Address, safe_tx_hash: &str) -> Option<String> {
    let short = short_chain_name(chain_id)?;
    let safe = safe.to_checksum(None);
    Some(format!(
        "https://app.safe.global/transactions/tx?safe={short}:{safe}&id=multisig_{safe}_{safe_tx_hash}"
    ))
}
