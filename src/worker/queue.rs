//! Keeps the Safe's queue honest: the follower records each watched Safe's
//! nonce as it reads it at the head (the team page marks proposals "next",
//! "blocked by nonce N" or "ready to execute" from it), and the planner
//! withdraws a proposal whose requests were all cancelled or failed.
//!
//! Such a proposal holds its nonce: every later batch stacks behind it, and
//! the owners cannot execute those first. If no owner has signed it, the
//! bridge (its proposer) deletes it from the Transaction Service and ends it,
//! and the next batch takes its nonce (`Store::reusable_nonce`). If an owner
//! has signed, deleting it would not undo the signature (anyone holding it
//! could still execute), so it stays: the page says it serves no request and
//! how to reject it in Safe{Wallet}, with an on-chain rejection at its nonce.

use std::collections::HashMap;

use alloy::primitives::{Address, B256};

use super::Worker;
use super::scope::PlanScope;
use super::signing::{refuse_to_sign, signable};
use crate::safe::Deletion;
use crate::safe::SafeFlow;
use crate::store::{JobLease, ProposalRow, Withdrawn};

/// Records the Safes' nonces the follower read at `head`, under its lease.
pub(super) async fn record_nonces(
    worker: &Worker,
    chain_id: i64,
    at_head: &HashMap<Address, (u64, String)>,
    head: u64,
    fence: Option<&JobLease>,
) -> anyhow::Result<()> {
    let nonces: Vec<(String, i64)> = at_head
        .iter()
        .map(|(safe, (nonce, _))| (super::lower(*safe), *nonce as i64))
        .collect();
    worker
        .store
        .record_safe_nonces(chain_id, &nonces, head as i64, worker.clock.now(), fence)
        .await?;
    Ok(())
}

/// Withdraws the scope's open proposals that serve no request and that no
/// owner has signed. `true` when one ended.
pub(super) async fn withdraw_unserving(
    worker: &Worker,
    flow: &SafeFlow,
    scope: &PlanScope,
    fence: Option<&JobLease>,
) -> anyhow::Result<bool> {
    let mut moved = false;
    for proposal in worker.store.proposals_serving_nothing().await? {
        if scope.takes_proposal(&proposal) {
            moved |= withdraw(worker, flow, &proposal, fence).await?;
        }
    }
    Ok(moved)
}

/// Whether an owner other than the proposer confirmed: the proposer's own
/// signature (when it is an owner) is the bridge's, which it may take back.
fn signed_by_owner<'a>(
    mut confirmed: impl Iterator<Item = &'a Address>,
    proposer: Address,
) -> bool {
    confirmed.any(|owner| *owner != proposer)
}

async fn withdraw(
    worker: &Worker,
    flow: &SafeFlow,
    proposal: &ProposalRow,
    fence: Option<&JobLease>,
) -> anyhow::Result<bool> {
    // The proposer key acts (signs, posts, deletes) only for a row that is
    // what the bridge planned; a forged one is refused, not withdrawn.
    if let Err(why) = signable(worker, proposal).await? {
        refuse_to_sign(worker, proposal, &why, fence).await?;
        return Ok(true);
    }
    let hash: B256 = proposal.safe_tx_hash.parse()?;
    let safe: Address = proposal.safe.parse()?;
    let chain_id = proposal.chain_id as u64;
    let proposer = flow
        .proposer()
        .expect("checked at start-up: a proposer exists when Safes are configured");
    let stored: Vec<Address> = proposal
        .confirmed_by
        .iter()
        .flatten()
        .filter_map(|o| o.parse().ok())
        .collect();
    if signed_by_owner(stored.iter(), proposer.address()) {
        return Ok(false);
    }
    // The stored tally is seconds old: ask the service before deleting.
    let service = flow.service(chain_id)?;
    let held = match service.get_transaction(hash).await {
        // The follower settles an execution.
        Ok(Some(tx)) if tx.is_executed => return Ok(false),
        Ok(Some(tx)) if signed_by_owner(tx.confirmations.iter(), proposer.address()) => {
            return Ok(false);
        }
        Ok(Some(_)) => true,
        Ok(None) => false,
        Err(err) => {
            tracing::debug!(safe_tx_hash = %proposal.safe_tx_hash, error = %err, "cannot look up a proposal that serves no request");
            return Ok(false);
        }
    };
    if held {
        // The service checks the signature against its own clock: wall time.
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let deletion = Deletion::sign(proposer, safe, chain_id, hash, unix_now)?;
        if let Err(err) = service.delete_transaction(&deletion).await {
            tracing::warn!(safe_tx_hash = %proposal.safe_tx_hash, error = %err, "cannot delete a proposal that serves no request; trying again next pass");
            return Ok(false);
        }
    }
    let how = if held {
        "the bridge deleted it from the Safe Transaction Service"
    } else {
        "the Safe Transaction Service did not hold it"
    };
    let message = format!(
        "every request it served was cancelled or failed and no owner had signed: {how}; nonce {} goes to the next batch",
        proposal.nonce
    );
    let now = worker.clock.now();
    Ok(
        match worker
            .store
            .withdraw_proposal(proposal.id, now, &message, fence)
            .await?
        {
            Withdrawn::Ended => {
                tracing::info!(safe_tx_hash = %proposal.safe_tx_hash, nonce = proposal.nonce, "withdrew a proposal that serves no request; its nonce is free");
                true
            }
            Withdrawn::Revived => {
                tracing::warn!(safe_tx_hash = %proposal.safe_tx_hash, "a request joined a proposal while it was deleted; posting it again");
                true
            }
            Withdrawn::NotOpen => false,
        },
    )
}
