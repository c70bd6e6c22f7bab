//! The chain follower: finds the execution of open proposals in the logs,
//! waits for confirmations, and moves their requests on to committing.
//!
//! Decisions are made only at confirmed depth: with `confirmed` = head −
//! confirmations, an execution counts once its block is at or below
//! `confirmed`, a replacement once the Safe's nonce at `confirmed` is past
//! the proposal's, and app state is read at `confirmed`, and only for apps
//! with no log above it (a log above means the state at `confirmed` is
//! older than something the follower has seen, such as a recent
//! `removeDevice`: those requests wait).
//!
//! Every pass scans the unconfirmed blocks again and forgets what it saw
//! there before, so a shallow reorg simply reads differently on the next
//! pass; a reorg below the cursor shows as a changed hash there. A stale
//! cursor is caught up one log range per pass, with no decision until the
//! scan reaches the head.
//!
//! Each pass costs a fixed number of RPC calls, whatever the number of open
//! proposals: the chain id, the head block, the cursor block's hash, one
//! `eth_getLogs` per block range (every Safe and app in one filter), and two
//! Multicall3 reads of every Safe's nonce and version: at `confirmed` (for
//! decisions) and at the head (any doubt about the Safe's version holds
//! everything back at once).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use alloy::primitives::{Address, B256};
use alloy::rpc::types::Log;
use alloy::sol_types::SolEvent;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Worker;
use crate::chain::{ChainClient, Registration};
use crate::domain::{Event, Failure, ProposalEnd};
use crate::safe::SafeFlow;
use crate::store::{
    Changes, Cursor, JobLease, ProposalRow, ReplicaRequest, RequestMove, StoreError, StoredError,
};

/// How far back to rescan when the cursor's block was reorganised away.
const REORG_WINDOW: u64 = 64;

mod events {
    alloy::sol! {
        // topic0 is the same whether `txHash` is indexed (1.4.1+) or not (1.3.0).
        event ExecutionSuccess(bytes32 txHash, uint256 payment);
        event ExecutionFailure(bytes32 txHash, uint256 payment);
        // What can allow a registration without us.
        event ComposeHashAdded(bytes32 composeHash);
        event DeviceAdded(bytes32 deviceId);
        event AllowAnyDeviceSet(bool allowAny);
    }
}

/// An app log that may have allowed something by other means.
fn may_allow(log: &Log) -> bool {
    log.topics().first().is_some_and(|topic| {
        [
            events::ComposeHashAdded::SIGNATURE_HASH,
            events::DeviceAdded::SIGNATURE_HASH,
            events::AllowAnyDeviceSet::SIGNATURE_HASH,
        ]
        .contains(topic)
    })
}

/// One pass over every chain with open proposals, unfenced (tests drain
/// with this). `true` when something moved.
pub(super) async fn run(worker: &Worker) -> anyhow::Result<bool> {
    if worker.safe_flow.is_none() {
        return Ok(false);
    }
    let mut moved = false;
    for chain_id in worker.store.chains_to_follow().await? {
        moved |= run_chain(worker, chain_id, None).await?;
    }
    Ok(moved)
}

/// Waits for the follower's next pass: until a new block is known (the
/// `newHeads` subscription) or likely (polls timed by the block time); the
/// poll interval while there is nothing to follow.
pub(super) async fn wait_for_block(worker: &Worker, chain_id: i64) {
    let Some(flow) = worker.safe_flow.as_ref() else {
        return;
    };
    match flow.chain(chain_id as u64) {
        Some(chain) => match chain.followed_head() {
            Some(head) => chain.wait_for_block(head, flow.poll_interval).await,
            None => tokio::time::sleep(flow.poll_interval).await,
        },
        None => tokio::time::sleep(flow.poll_interval).await,
    }
}

/// One pass over one chain: the follower job of that chain runs this.
/// `fence`: the job's lease; every write of the pass checks it, and a write
/// it refuses ends the pass with [`StoreError::JobLost`].
pub(super) async fn run_chain(
    worker: &Worker,
    chain_id: i64,
    fence: Option<&JobLease>,
) -> anyhow::Result<bool> {
    let Some(flow) = worker.safe_flow.as_ref() else {
        return Ok(false);
    };
    match follow(worker, flow, chain_id, fence).await {
        Ok(moved) => Ok(moved),
        // Another process follows the chain now: nothing more is written.
        Err(err) if StoreError::job_lost(&err).is_some() => Err(err),
        Err(err) => {
            // Keep waiting, with the cause visible on the requests.
            tracing::warn!(
                chain_id,
                error = format!("{err:#}"),
                "chain follower pass failed"
            );
            let err = StoredError::of(
                Failure::ChainFollower,
                &format!("watching chain {chain_id} failed: {err:#}"),
            );
            for proposal in worker.store.open_proposals(chain_id).await? {
                worker
                    .store
                    .note_on_requests(proposal.id, &err, fence)
                    .await?;
            }
            Ok(false)
        }
    }
}

async fn follow(
    worker: &Worker,
    flow: &SafeFlow,
    chain_id: i64,
    fence: Option<&JobLease>,
) -> anyhow::Result<bool> {
    let chain = flow
        .chain(chain_id as u64)
        .ok_or_else(|| anyhow::anyhow!("no RPC URL is configured for chain {chain_id}"))?;
    let open = worker.store.open_proposals(chain_id).await?;
    let ended = worker.store.proposals_watched_after_end(chain_id).await?;
    if open.is_empty() && ended.is_empty() {
        let lag = metrics::gauge!(crate::metrics::FOLLOWER_LAG, "chain_id" => chain_id.to_string());
        // Nothing to follow: the follower is as far as it needs to be.
        lag.set(0.0);
        chain.unfollow();
        return Ok(false);
    }
    let passed = scan(worker, flow, &chain, chain_id, &open, &ended, fence).await;
    if passed.is_err() {
        // Maybe another provider answers next time: trust nothing seen so far.
        chain.connection_changed();
    }
    passed
}

async fn scan(
    worker: &Worker,
    flow: &SafeFlow,
    chain: &ChainClient,
    chain_id: i64,
    open: &[ProposalRow],
    ended: &[ProposalRow],
    fence: Option<&JobLease>,
) -> anyhow::Result<bool> {
    // An RPC that answers for another chain must not be believed.
    chain.check_chain_id_once().await?;
    let followed = chain.followed_head();
    let subscribed = chain.subscribed_head();
    if followed.is_some() && followed == subscribed {
        // No block since the last pass: only the clock can have moved.
        return expire_overdue(worker, flow, open, fence).await;
    }
    let stored = worker.store.cursor(chain_id).await?;
    // Ended proposals the owners may still execute are watched as the open
    // ones are: their executions are in the same logs of the same Safes.
    let watched: Vec<ProposalRow> = open.iter().chain(ended).cloned().collect();
    let safes: BTreeSet<Address> = watched.iter().filter_map(|p| p.safe.parse().ok()).collect();
    let safe_list: Vec<Address> = safes.iter().copied().collect();
    let earliest_open = watched.iter().filter_map(|p| p.proposed_block).min();
    let cursor_block = stored.as_ref().map(|c| c.block_number as u64);
    let range = Range {
        earliest_open,
        cursor_block,
        confirmations: flow.confirmations.of(chain_id as u64),
        log_range: flow.log_range.max(1),
    };
    // The Safes' state at the head comes with the hashes of the cursor's
    // block and of the cursor this pass likely leaves, in one call.
    let (head, at_head, hashes) = match subscribed {
        Some(head) => {
            let (states, hashes) = chain
                .safe_states_and_hashes(&safe_list, head, &range.ancestors(head))
                .await?;
            (head, states, hashes)
        }
        // Polling: that one call is the poll too, at the latest block; the
        // likely head is the next one.
        None => {
            let likely = followed.map_or(cursor_block.unwrap_or(0) + 1, |f| f + 1);
            chain
                .poll_head(&safe_list, &range.ancestors(likely))
                .await?
        }
    };
    if followed == Some(head) {
        return expire_overdue(worker, flow, open, fence).await;
    }
    super::queue::record_nonces(worker, chain_id, &at_head, head, fence).await?;
    let confirmed = range.confirmed(head);
    // Where to scan from: past the stored cursor, unless a reorg took its
    // block away; never past the unconfirmed blocks, which are read again.
    let earliest = range.earliest(head);
    let mut apps_touched = stored.as_ref().is_some_and(|c| c.apps_touched);
    let range_end = |from: u64| range.end(head, from);
    let new_cursor = |to: u64| Range::new_cursor(head, to);
    let hash_of = |number: u64| {
        let known = hashes.get(&number).copied();
        async move {
            match known {
                Some(hash) => Ok(hash),
                // Deeper than BLOCKHASH reaches (a follower far behind): ask.
                None => chain.block_hash(number).await,
            }
        }
    };
    let from = match &stored {
        Some(cursor) if (cursor.block_number as u64) <= head => {
            let block = cursor.block_number as u64;
            let now_hash = hash_of(block).await?;
            if now_hash.to_string() == cursor.block_hash {
                // Nothing before the oldest open proposal concerns it.
                (block + 1).max(earliest)
            } else {
                let rewind = block
                    .saturating_sub(REORG_WINDOW)
                    .max(earliest.saturating_sub(1))
                    .max(1);
                tracing::warn!(
                    chain_id,
                    block,
                    rewind,
                    "reorg: the cursor's block changed; scanning again"
                );
                rewind
            }
        }
        // A cursor above the head: the chain went back (a reorg to a shorter chain).
        Some(cursor) => {
            let rewind = head
                .saturating_sub(REORG_WINDOW)
                .max(earliest.saturating_sub(1))
                .max(1);
            tracing::warn!(
                chain_id,
                block = cursor.block_number,
                head,
                "reorg: the head is below the cursor; scanning again"
            );
            rewind
        }
        None => earliest,
    }
    .min(confirmed + 1)
    .max(1);
    // One log range per pass: a stale cursor catches up over several passes.
    let to = range_end(from);
    let caught_up = to == head;
    metrics::gauge!(crate::metrics::FOLLOWER_LAG, "chain_id" => chain_id.to_string())
        .set(head.saturating_sub(to) as f64);

    // What was seen from `from` on is read again from the chain as it is now.
    let forgotten = worker
        .store
        .forget_executions_from(chain_id, from as i64, fence)
        .await?;
    if forgotten > 0 {
        tracing::info!(
            chain_id,
            from,
            forgotten,
            "unconfirmed executions are read again"
        );
    }
    let apps: BTreeSet<Address> = worker
        .store
        .watched_apps(chain_id)
        .await?
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    // Apps with a log above `confirmed`: their state at `confirmed` is stale.
    let mut unsettled: BTreeSet<Address> = BTreeSet::new();
    if from <= to {
        // Every log of the Safes and apps: any app log may change what is
        // allowed (added, removed, allowAnyDevice, a new owner...).
        let addresses: Vec<Address> = safes.iter().chain(apps.iter()).copied().collect();
        let logs = chain
            .logs(from, to, flow.log_range, &addresses, &[])
            .await?;
        for log in logs.iter().filter(|l| apps.contains(&l.address())) {
            apps_touched |= may_allow(log);
            if log.block_number.is_none_or(|b| b > confirmed) {
                unsettled.insert(log.address());
            }
        }
        let anomalies = record_executions(worker, &watched, &safes, &logs, fence).await?;
        // An odd log proves nothing about any proposal: report it on the
        // Safe's requests and move past it, so one log cannot stall the chain.
        for (safe, problem) in anomalies {
            tracing::error!(chain_id, %safe, problem = %problem, "unexpected execution log; ignored");
            let err = StoredError::suggesting(
                Failure::ChainFollower,
                &format!("chain {chain_id}: {problem}"),
                "The log was ignored; the bridge keeps waiting for an execution it can attribute.",
            );
            for proposal in open
                .iter()
                .filter(|p| p.safe.parse::<Address>().ok() == Some(safe))
            {
                worker
                    .store
                    .note_on_requests(proposal.id, &err, fence)
                    .await?;
            }
        }
    }
    let cursor_block = new_cursor(to);
    let cursor = Cursor {
        block_number: cursor_block as i64,
        block_hash: hash_of(cursor_block).await?.to_string(),
        apps_touched,
    };
    worker
        .store
        .set_cursor(chain_id, &cursor, worker.clock.now(), fence)
        .await?;
    if !caught_up {
        // Nothing is decided on a partial view; the next pass goes on.
        return Ok(true);
    }

    // Decide on each open proposal with the chain as of `confirmed`; doubt
    // the Safe's version as soon as the head shows it. The nonce at
    // `confirmed` matters only for a proposal that has no execution seen and
    // whose nonce the head shows used (replaced, or executed unseen): else
    // the state at the head decides alike, and costs no second call.
    // Read again: the scan may have recorded executions on them.
    let current = worker.store.open_proposals(chain_id).await?;
    let current_ended = worker.store.proposals_watched_after_end(chain_id).await?;
    let nonce_used = current.iter().chain(&current_ended).any(|p| {
        p.execution_block.is_none()
            && p.safe.parse::<Address>().ok().is_some_and(|safe| {
                at_head
                    .get(&safe)
                    .is_some_and(|(nonce, _)| *nonce > p.nonce as u64)
            })
    });
    let states = if nonce_used {
        chain.safe_states(&safe_list, confirmed).await?
    } else {
        at_head.clone()
    };
    let now = worker.clock.now();
    let mut moved = false;
    let view = View {
        chain,
        states: &states,
        at_head: &at_head,
        confirmed,
        unsettled: &unsettled,
    };
    for proposal in &current {
        moved |= decide(worker, flow, &view, proposal, now, fence).await?;
    }
    for proposal in &current_ended {
        moved |= settle_ended(worker, &view, proposal, now, fence).await?;
    }
    if apps_touched {
        // A Safe that changed its VERSION() is doubtful evidence: its requests wait.
        let doubtful: BTreeSet<String> = current
            .iter()
            .filter(|p| {
                let safe = p.safe.parse::<Address>().ok();
                safe.and_then(|s| at_head.get(&s))
                    .is_some_and(|(_, version)| *version != p.safe_version)
            })
            .map(|p| p.safe.clone())
            .collect();
        moved |= release_allowed_meanwhile(worker, &view, chain_id, &doubtful, fence).await?;
        worker.store.clear_apps_touched(chain_id, fence).await?;
    }
    chain.set_followed_head(head);
    Ok(moved)
}

/// Where a pass reads logs, as a function of the head it finds.
struct Range {
    /// The block the oldest open proposal was posted at.
    earliest_open: Option<i64>,
    /// The stored cursor's block.
    cursor_block: Option<u64>,
    confirmations: u64,
    /// The most blocks one `eth_getLogs` asks for (at least 1).
    log_range: u64,
}

impl Range {
    fn confirmed(&self, head: u64) -> u64 {
        head.saturating_sub(self.confirmations)
    }

    /// Nothing before the oldest open proposal concerns the follower.
    fn earliest(&self, head: u64) -> u64 {
        self.earliest_open.unwrap_or(head as i64).max(1) as u64
    }

    /// The end of one pass's log range from `from`.
    fn end(&self, head: u64, from: u64) -> u64 {
        head.min(from.saturating_add(self.log_range - 1))
    }

    /// The cursor a pass that read up to `to` leaves. The head's own hash is
    /// not known (BLOCKHASH stops below it): the cursor stays one block
    /// short of it, which the next pass reads again anyway.
    fn new_cursor(head: u64, to: u64) -> u64 {
        if to == head {
            head.saturating_sub(1)
        } else {
            to
        }
    }

    /// The blocks whose hashes a pass at `head` likely needs, if the cursor
    /// stands: the cursor's, and the one the pass leaves. Only those the
    /// EVM's BLOCKHASH has at `head` (the 256 below it).
    fn ancestors(&self, head: u64) -> Vec<u64> {
        let earliest = self.earliest(head);
        let likely_from = self
            .cursor_block
            .map_or(earliest, |b| (b + 1).max(earliest));
        let likely_to = self.end(head, likely_from.min(self.confirmed(head) + 1).max(1));
        self.cursor_block
            .into_iter()
            .chain([Self::new_cursor(head, likely_to)])
            .filter(|a| *a < head && head - a <= 256)
            .collect()
    }
}

/// With no new block, only proposals nobody executed in time can end; what
/// the chain said at the last pass still holds.
async fn expire_overdue(
    worker: &Worker,
    flow: &SafeFlow,
    open: &[ProposalRow],
    fence: Option<&JobLease>,
) -> anyhow::Result<bool> {
    let now = worker.clock.now();
    let mut moved = false;
    for proposal in open.iter().filter(|p| p.execution_block.is_none()) {
        moved |= expire_if_overdue(worker, flow, proposal, now, fence).await?;
    }
    Ok(moved)
}

/// The chain as the follower decides on it.
struct View<'a> {
    chain: &'a ChainClient,
    /// Each Safe's nonce (and VERSION()) at `confirmed`.
    states: &'a HashMap<Address, (u64, String)>,
    /// The same at the head, where a changed VERSION() shows first.
    at_head: &'a HashMap<Address, (u64, String)>,
    confirmed: u64,
    /// Apps with logs above `confirmed`.
    unsettled: &'a BTreeSet<Address>,
}

/// Records `ExecutionSuccess`/`ExecutionFailure` of open proposals; returns
/// the execution logs that cannot be read, per Safe.
async fn record_executions(
    worker: &Worker,
    open: &[ProposalRow],
    safes: &BTreeSet<Address>,
    logs: &[Log],
    fence: Option<&JobLease>,
) -> anyhow::Result<Vec<(Address, String)>> {
    let by_hash: HashMap<(Address, B256), &ProposalRow> = open
        .iter()
        .filter_map(|p| Some(((p.safe.parse().ok()?, p.safe_tx_hash.parse().ok()?), p)))
        .collect();
    let mut anomalies = Vec::new();
    for log in logs {
        let success = match log.topics().first().copied() {
            Some(t) if t == events::ExecutionSuccess::SIGNATURE_HASH => true,
            Some(t) if t == events::ExecutionFailure::SIGNATURE_HASH => false,
            _ => continue,
        };
        if !safes.contains(&log.address()) {
            continue;
        }
        // txHash is topic1 on Safe 1.4.1+ and the first data word on 1.3.0.
        let tx_hash = match (log.topics().get(1), log.data().data.get(..32)) {
            (Some(topic), _) => *topic,
            (None, Some(word)) => B256::from_slice(word),
            (None, None) => {
                let tx = log
                    .transaction_hash
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "?".into());
                anomalies.push((
                    log.address(),
                    format!("an execution log of Safe {} in tx {tx} has neither a txHash topic nor data", log.address()),
                ));
                continue;
            }
        };
        let Some(proposal) = by_hash.get(&(log.address(), tx_hash)) else {
            continue;
        };
        let (Some(block), Some(block_hash), Some(tx)) =
            (log.block_number, log.block_hash, log.transaction_hash)
        else {
            anomalies.push((
                log.address(),
                format!(
                    "an execution log of Safe {} lacks its block or transaction",
                    log.address()
                ),
            ));
            continue;
        };
        tracing::info!(safe_tx_hash = %proposal.safe_tx_hash, block, success, "execution seen; waiting for confirmations");
        worker
            .store
            .observe_execution(
                proposal.id,
                &tx.to_string(),
                block as i64,
                &block_hash.to_string(),
                success,
                fence,
            )
            .await?;
    }
    Ok(anomalies)
}

async fn decide(
    worker: &Worker,
    flow: &SafeFlow,
    view: &View<'_>,
    proposal: &ProposalRow,
    now: DateTime<Utc>,
    fence: Option<&JobLease>,
) -> anyhow::Result<bool> {
    let safe: Address = proposal.safe.parse()?;
    // `None`: the Safe did not exist yet at the confirmed block.
    let state = view.states.get(&safe);
    if let Some((_, version)) = view.at_head.get(&safe)
        && *version != proposal.safe_version
    {
        let err = StoredError::of(
            Failure::SafeVersionChanged,
            &format!(
                "Safe {} now reports VERSION() `{version}`, not `{}` as when proposed",
                safe.to_checksum(None),
                proposal.safe_version
            ),
        );
        tracing::error!(safe_tx_hash = %proposal.safe_tx_hash, message = %err.message, "Safe version changed");
        worker
            .store
            .note_on_requests(proposal.id, &err, fence)
            .await?;
        // Nothing is committed on this evidence, but time-based expiry needs
        // none: a proposal nobody executed still ends on time.
        if proposal.execution_block.is_none() {
            return expire_if_overdue(worker, flow, proposal, now, fence).await;
        }
        return Ok(false);
    }

    match (proposal.execution_block, proposal.execution_success) {
        (Some(block), Some(success)) => {
            if block as u64 > view.confirmed || state.is_none() {
                return Ok(false); // Seen, not final yet.
            }
            if success {
                executed(worker, view, proposal, now, fence).await
            } else {
                let err = StoredError::of(
                    Failure::SafeExecutionFailed,
                    &format!(
                        "the Safe executed the proposal with ExecutionFailure in {}; its nonce is used",
                        proposal.execution_tx_hash.as_deref().unwrap_or("?")
                    ),
                );
                lost(worker, flow, proposal, ProposalEnd::Failed, err, now, fence).await
            }
        }
        // The Safe moved past our nonce at a confirmed block, and no
        // execution of ours up to there: replaced or rejected.
        _ if state.is_some_and(|(nonce, _)| *nonce > proposal.nonce as u64) => {
            let err = StoredError::of(
                Failure::SafeNonceReplaced,
                &format!(
                    "the Safe used nonce {} for another transaction (a rejection or replacement)",
                    proposal.nonce
                ),
            );
            lost(
                worker,
                flow,
                proposal,
                ProposalEnd::Replaced,
                err,
                now,
                fence,
            )
            .await
        }
        (Some(_), _) => Ok(false),
        (None, _) => expire_if_overdue(worker, flow, proposal, now, fence).await,
    }
}

/// Fails the requests of a proposal nobody executed within the timeout.
async fn expire_if_overdue(
    worker: &Worker,
    flow: &SafeFlow,
    proposal: &ProposalRow,
    now: DateTime<Utc>,
    fence: Option<&JobLease>,
) -> anyhow::Result<bool> {
    let submitted = proposal.submitted_at.unwrap_or(proposal.opened_at);
    let timeout = chrono::Duration::seconds(flow.proposal_timeout.as_secs() as i64);
    if now - submitted <= timeout {
        // Not executed yet (or an execution reverted without an event,
        // GS013): the proposal is still executable, keep waiting.
        return Ok(false);
    }
    let err = StoredError::of(
        Failure::ProposalExpired,
        &format!(
            "nobody executed Safe proposal {} within {} days",
            proposal.safe_tx_hash,
            timeout.num_days().max(1)
        ),
    );
    let ended = worker
        .store
        .end_proposal(
            proposal.id,
            ProposalEnd::Expired,
            now,
            Some(&err),
            fence,
            |_, _| RequestMove {
                event: Event::Fail,
                message: err.message.clone(),
                changes: Changes {
                    error: Some(err.clone()),
                    ..Changes::default()
                },
            },
        )
        .await?;
    if ended {
        tracing::warn!(safe_tx_hash = %proposal.safe_tx_hash, "proposal expired; its nonce is free for the next batch");
    }
    Ok(ended)
}

/// An ended proposal the owners may still execute. Executed (at confirmed
/// depth): it is recorded so, and the requests that failed with it are
/// planned again (the planner finds their registrations allowed, and they
/// commit), unless a newer request makes the same replica (see
/// `Store::executed_after_end`). Its nonce used by another transaction, or
/// executed with `ExecutionFailure`: nothing more can come of it.
async fn settle_ended(
    worker: &Worker,
    view: &View<'_>,
    proposal: &ProposalRow,
    now: DateTime<Utc>,
    fence: Option<&JobLease>,
) -> anyhow::Result<bool> {
    let safe: Address = proposal.safe.parse()?;
    let state = view.states.get(&safe);
    match (proposal.execution_block, proposal.execution_success) {
        (Some(block), Some(success)) => {
            if block as u64 > view.confirmed || state.is_none() {
                return Ok(false);
            }
            if !success {
                worker.store.stop_watching(proposal.id, fence).await?;
                return Ok(true);
            }
            let tx = proposal.execution_tx_hash.as_deref().unwrap_or("?");
            let settled = worker
                .store
                .executed_after_end(proposal.id, now, fence)
                .await?;
            tracing::warn!(
                safe_tx_hash = %proposal.safe_tx_hash,
                execution = tx,
                revived = settled.revived,
                superseded = settled.superseded,
                "an ended proposal was executed after all; its failed requests are planned again"
            );
            Ok(true)
        }
        _ if state.is_some_and(|(nonce, _)| *nonce > proposal.nonce as u64) => {
            worker.store.stop_watching(proposal.id, fence).await?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// A confirmed `ExecutionSuccess`: re-read the registrations at the
/// confirmed block and release the requests that now have everything, with
/// the execution's transaction hash. Waits while an app involved has a log
/// above the confirmed block.
async fn executed(
    worker: &Worker,
    view: &View<'_>,
    proposal: &ProposalRow,
    now: DateTime<Utc>,
    fence: Option<&JobLease>,
) -> anyhow::Result<bool> {
    let requests = worker.store.requests_of_proposal(proposal.id).await?;
    let Some(allowed) = allowed_requests(worker, view, &requests, Settled::All).await? else {
        return Ok(false);
    };
    let tx_hash = proposal.execution_tx_hash.clone();
    let ended = worker
        .store
        .end_proposal(proposal.id, ProposalEnd::Executed, now, None, fence, |request, _| {
            if allowed.contains(&request.id) {
                RequestMove {
                    event: Event::RegistrationsAllowed,
                    message: format!(
                        "Safe executed the proposal in {}",
                        tx_hash.as_deref().unwrap_or("?")
                    ),
                    changes: Changes {
                        commit_tx_hash: tx_hash.clone(),
                        ..Changes::default()
                    },
                }
            } else {
                // Executed, yet not allowed (removed again?): plan afresh.
                RequestMove {
                    event: Event::ProposalDropped,
                    message: "the proposal executed but the app does not allow everything the replica needs".into(),
                    changes: Changes::default(),
                }
            }
        })
        .await?;
    if ended {
        tracing::info!(safe_tx_hash = %proposal.safe_tx_hash, requests = requests.len(), "proposal executed and confirmed");
    }
    Ok(ended)
}

/// The proposal can no longer execute: its requests wait for a fresh one,
/// until they have lost too many.
async fn lost(
    worker: &Worker,
    flow: &SafeFlow,
    proposal: &ProposalRow,
    end: ProposalEnd,
    err: StoredError,
    now: DateTime<Utc>,
    fence: Option<&JobLease>,
) -> anyhow::Result<bool> {
    let max = flow.max_reproposals as i64;
    let ended = worker
        .store
        .end_proposal(
            proposal.id,
            end,
            now,
            Some(&err),
            fence,
            |_, lost_before| {
                if lost_before + 1 > max {
                    let err = StoredError {
                        message: format!(
                            "{} (gave up after {} proposals)",
                            err.message,
                            lost_before + 1
                        ),
                        ..err.clone()
                    };
                    RequestMove {
                        event: Event::Fail,
                        message: err.message.clone(),
                        changes: Changes {
                            error: Some(err),
                            ..Changes::default()
                        },
                    }
                } else {
                    RequestMove {
                        event: Event::ProposalDropped,
                        message: err.message.clone(),
                        changes: Changes {
                            error: Some(err.clone()),
                            ..Changes::default()
                        },
                    }
                }
            },
        )
        .await?;
    if ended {
        tracing::warn!(safe_tx_hash = %proposal.safe_tx_hash, code = %err.code, "proposal lost");
    }
    Ok(ended)
}

/// Registrations can be allowed without us (someone executed them, or turned
/// on `allowAnyDevice`): release the waiting requests, and mark proposals
/// left with nothing to do superseded. Reads state at the confirmed block,
/// and only for apps with no newer log.
async fn release_allowed_meanwhile(
    worker: &Worker,
    view: &View<'_>,
    chain_id: i64,
    doubtful_safes: &BTreeSet<String>,
    fence: Option<&JobLease>,
) -> anyhow::Result<bool> {
    let mut waiting = worker.store.requests_awaiting_approval(chain_id).await?;
    waiting.retain(|r| {
        r.safe
            .as_ref()
            .is_none_or(|safe| !doubtful_safes.contains(safe))
    });
    let Some(allowed) = allowed_requests(worker, view, &waiting, Settled::Some).await? else {
        return Ok(false);
    };
    let mut by_proposal: BTreeMap<Uuid, Vec<Uuid>> = BTreeMap::new();
    for request in waiting.iter().filter(|r| allowed.contains(&r.id)) {
        if let Some(proposal) = request.proposal_id {
            by_proposal.entry(proposal).or_default().push(request.id);
        }
    }
    let now = worker.clock.now();
    let mut moved = false;
    for (proposal, ids) in by_proposal {
        let released = worker
            .store
            .release_allowed(
                proposal,
                &ids,
                now,
                "everything it needs was allowed on chain by other means",
                fence,
            )
            .await?;
        moved |= released > 0;
    }
    Ok(moved)
}

/// Which requests [`allowed_requests`] needs to be settled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// All of them, or it answers `None` (a proposal is decided whole).
    All,
    /// Some of them: the others are left out (`None` when there is none).
    Some,
}

/// The requests whose registrations are all allowed at the confirmed block
/// (one Multicall3 read). A request on an app with a log above the
/// confirmed block is unsettled: the state there is older than what was
/// seen, so it is not read as allowed.
async fn allowed_requests(
    worker: &Worker,
    view: &View<'_>,
    requests: &[ReplicaRequest],
    settled_needed: Settled,
) -> anyhow::Result<Option<BTreeSet<Uuid>>> {
    if requests.is_empty() {
        return Ok(Some(BTreeSet::new()));
    }
    let ids: Vec<Uuid> = requests.iter().map(|r| r.id).collect();
    let mut needs: HashMap<Uuid, Vec<(Address, Registration)>> = HashMap::new();
    let mut wanted: HashMap<Address, BTreeSet<Registration>> = HashMap::new();
    for row in worker.store.registrations_of(&ids).await? {
        let (Ok(app), Ok(value)) = (
            row.registration.app_id.parse::<Address>(),
            row.registration.value.parse::<B256>(),
        ) else {
            continue;
        };
        let Some(registration) = Registration::from_kind(&row.registration.kind, value) else {
            continue;
        };
        needs
            .entry(row.request_id)
            .or_default()
            .push((app, registration));
        wanted.entry(app).or_default().insert(registration);
    }
    let settled = |id: &Uuid| {
        needs
            .get(id)
            .is_none_or(|regs| regs.iter().all(|(app, _)| !view.unsettled.contains(app)))
    };
    let enough = match settled_needed {
        Settled::All => requests.iter().all(|r| settled(&r.id)),
        Settled::Some => requests.iter().any(|r| settled(&r.id)),
    };
    if !enough {
        return Ok(None);
    }
    let wanted: Vec<(Address, Vec<Registration>)> = wanted
        .into_iter()
        .filter(|(app, _)| !view.unsettled.contains(app))
        .map(|(a, r)| (a, r.into_iter().collect()))
        .collect();
    let states = view.chain.allowed_at(&wanted, view.confirmed).await?;
    Ok(Some(
        requests
            .iter()
            .filter(|r| settled(&r.id))
            .filter(|r| {
                needs.get(&r.id).is_some_and(|regs| {
                    regs.iter()
                        .all(|(app, reg)| states.get(app).is_some_and(|s| s.is_allowed(reg)))
                })
            })
            .map(|r| r.id)
            .collect(),
    ))
}
