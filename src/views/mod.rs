//! Read models: the requests and proposals as the API, the team page and the
//! notifications show them. They are built from the store alone (showing
//! never calls out) and sit below `web` and `notify`, which both use them.

pub mod proposals;
pub mod requests;

/// The most rows one list shows.
pub const MAX_LIST_LIMIT: i64 = 500;

/// A block explorer's page of a transaction, for the chains Phala's on-chain KMS uses.
pub fn explorer_tx_link(chain_id: u64, tx_hash: &str) -> Option<String> {
    let base = match chain_id {
        1 => "https://etherscan.io",
        11155111 => "https://sepolia.etherscan.io",
        8453 => "https://basescan.org",
        84532 => "https://sepolia.basescan.org",
        _ => return None,
    };
    Some(format!("{base}/tx/{tx_hash}"))
}
