//! How many inner calls one Safe transaction may carry: their estimated gas,
//! with what batching adds, against a share of the block gas limit. What
//! does not fit waits for the next transaction (the next nonce).

use std::collections::BTreeSet;

/// The base cost of a transaction. A call's own estimate includes it; as an
/// inner call of a batch it does not pay it again.
pub const TX_BASE_GAS: u64 = 21_000;
/// What MultiSendCallOnly adds per inner call (decoding it, the call itself
/// and its calldata inside the batch), rounded up.
pub const MULTISEND_PER_CALL_GAS: u64 = 5_000;
/// What `execTransaction` adds around the inner calls: the base cost, the
/// signature checks, the nonce and the events, rounded up.
pub const EXEC_OVERHEAD_GAS: u64 = 120_000;
/// One Safe transaction is planned to use at most half a block: room for
/// the block's other transactions and for error in the estimates.
pub const BLOCK_SHARE_DIVISOR: u64 = 2;

/// The gas a call adds to a batch, from its estimate as a transaction of its own.
pub fn inner_gas(own_estimate: u64) -> u64 {
    own_estimate.saturating_sub(TX_BASE_GAS) + MULTISEND_PER_CALL_GAS
}

/// The most gas one Safe transaction is planned to use on a chain.
pub fn batch_cap(block_gas_limit: u64) -> u64 {
    block_gas_limit / BLOCK_SHARE_DIVISOR
}

/// Fills one Safe transaction, request by request: a request's calls go in
/// together or not at all, and a call two requests share counts once.
#[derive(Debug)]
pub struct Batch<K> {
    cap: u64,
    planned: u64,
    calls: BTreeSet<K>,
}

impl<K: Ord + Clone> Batch<K> {
    pub fn new(cap: u64) -> Self {
        Batch {
            cap,
            planned: EXEC_OVERHEAD_GAS,
            calls: BTreeSet::new(),
        }
    }

    /// Adds the calls (each with its [`inner_gas`]) if they fit; the first
    /// request always does, so that no request waits forever.
    pub fn try_add(&mut self, calls: &[(K, u64)]) -> bool {
        let extra: u64 = calls
            .iter()
            .filter(|(key, _)| !self.calls.contains(key))
            .map(|(_, gas)| gas)
            .sum();
        if !self.calls.is_empty() && self.planned + extra > self.cap {
            return false;
        }
        self.planned += extra;
        self.calls.extend(calls.iter().map(|(key, _)| key.clone()));
        true
    }

    /// The gas planned so far: a fallback when the whole transaction cannot be estimated.
    pub fn planned_gas(&self) -> u64 {
        self.planned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_go_in_whole_until_the_cap_and_shared_calls_count_once() {
        let mut batch = Batch::new(EXEC_OVERHEAD_GAS + 100);
        assert!(batch.try_add(&[("a", 40), ("b", 40)]));
        assert!(batch.try_add(&[("b", 40)]), "already in: free");
        assert!(!batch.try_add(&[("c", 40)]), "over the cap");
        assert!(batch.try_add(&[("d", 20)]));
        assert_eq!(batch.planned_gas(), EXEC_OVERHEAD_GAS + 100);
    }

    #[test]
    fn the_first_request_goes_in_even_when_it_alone_is_over_the_cap() {
        let mut batch = Batch::new(10);
        assert!(batch.try_add(&[("a", 40)]));
        assert!(!batch.try_add(&[("b", 1)]));
    }

    #[test]
    fn an_inner_call_does_not_pay_the_transaction_base_again() {
        assert_eq!(inner_gas(50_000), 50_000 - 21_000 + MULTISEND_PER_CALL_GAS);
        assert_eq!(batch_cap(30_000_000), 15_000_000);
    }
}
