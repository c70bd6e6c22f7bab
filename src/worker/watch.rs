//! The chain follower: finds the execution of open proposals in the logs,
//! waits for confirmations, and moves their requests on to committing.
//!
//! Each pass costs a fixed number of RPC calls, whatever the number of open
//! proposals: the chain id, the head, the cursor block's hash, one
//! `eth_getLogs` per block range (every Safe and app in one filter), the
//! range end's hash, and one Multicall3 read of every Safe's nonce and
//! version. A reorg shows as a changed hash at the cursor: block hashes
//! chain, so an unchanged cursor hash vouches for everything before it.

use std::collections::{BTreeSet, HashMap};

use alloy::primitives::{Address, B256};
use alloy::rpc::types::Log;
use alloy::sol_types::SolEvent;
use chrono::{DateTime, Utc};

use super::Worker;
use super::safe_flow::SafeFlow;
use crate::chain::{ChainClient, Registration};
use crate::domain::Event;
use crate::store::{Changes, ProposalEnd, ProposalRow, ReplicaRequest, StoredError};

/// How far back to rescan when the cursor's block was reorganised away.
const REORG_WINDOW: u64 = 64;

mod events {
    alloy::sol! {
        // topic0 is the same whether `txHash` is indexed (1.4.1+) or not (1.3.0).
        event ExecutionSuccess(bytes32 txHash, uint256 payment);
        event ExecutionFailure(bytes32 txHash, uint256 payment);
        event ComposeHashAdded(bytes32 composeHash);
        event DeviceAdded(bytes32 deviceId);
        event AllowAnyDeviceSet(bool allowAny);
    }
}

/// One pass over every chain with open proposals. `true` when something moved.
pub(super) async fn run(worker: &Worker) -> anyhow::Result<bool> {
    let Some(flow) = worker.safe_flow.as_ref() else {
        return Ok(false);
    };
    let mut moved = false;
    for chain_id in worker.store.chains_to_follow().await? {
        match follow(worker, flow, chain_id).await {
            Ok(m) => moved |= m,
            Err(err) => {
                // Keep waiting, with the cause visible on the requests.
                tracing::warn!(
                    chain_id,
                    error = format!("{err:#}"),
                    "chain follower pass failed"
                );
                let err = StoredError::new(
                    "CHAIN-FOLLOWER",
                    &format!("watching chain {chain_id} failed: {err:#}"),
                    Some(
                        "The bridge keeps watching; nothing is committed until the chain answers consistently.",
                    ),
                );
                for proposal in worker.store.open_proposals(chain_id).await? {
                    worker.store.note_on_requests(proposal.id, &err).await?;
                }
            }
        }
    }
    Ok(moved)
}

async fn follow(worker: &Worker, flow: &SafeFlow, chain_id: i64) -> anyhow::Result<bool> {
    let chain = flow
        .chain(chain_id as u64)
        .ok_or_else(|| anyhow::anyhow!("no RPC URL is configured for chain {chain_id}"))?;
    // An RPC that answers for another chain must not be believed.
    chain.check_chain_id().await?;
    let open = worker.store.open_proposals(chain_id).await?;
    if open.is_empty() {
        return Ok(false);
    }
    let head = chain.head().await?;
    let confirmations = flow.confirmations.of(chain_id as u64);

    // Where to scan from: the stored cursor, unless a reorg took its block away.
    let earliest = open
        .iter()
        .filter_map(|p| p.proposed_block)
        .min()
        .unwrap_or(head as i64)
        .max(1) as u64;
    let mut from = match worker.store.cursor(chain_id).await? {
        Some((block, hash)) if (block as u64) <= head => {
            let now_hash = chain.block_hash(block as u64).await?;
            if now_hash.to_string() == hash {
                block as u64 + 1
            } else {
                let rewind = (block as u64)
                    .saturating_sub(REORG_WINDOW)
                    .max(earliest.saturating_sub(1))
                    .max(1);
                let forgotten = worker
                    .store
                    .forget_executions_from(chain_id, rewind as i64)
                    .await?;
                tracing::warn!(
                    chain_id,
                    block,
                    rewind,
                    forgotten,
                    "reorg: the cursor's block changed; scanning again"
                );
                rewind
            }
        }
        // A cursor above the head: the chain went back (a reorg to a shorter chain).
        Some((block, _)) => {
            let rewind = head
                .saturating_sub(REORG_WINDOW)
                .max(earliest.saturating_sub(1))
                .max(1);
            worker
                .store
                .forget_executions_from(chain_id, rewind as i64)
                .await?;
            tracing::warn!(
                chain_id,
                block,
                head,
                "reorg: the head is below the cursor; scanning again"
            );
            rewind
        }
        None => earliest,
    };
    from = from.min(earliest.max(from));

    let safes: BTreeSet<Address> = open.iter().filter_map(|p| p.safe.parse().ok()).collect();
    let apps: BTreeSet<Address> = worker
        .store
        .watched_apps(chain_id)
        .await?
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    let mut touched_apps = false;
    if from <= head {
        let addresses: Vec<Address> = safes.iter().chain(apps.iter()).copied().collect();
        let topics = [
            events::ExecutionSuccess::SIGNATURE_HASH,
            events::ExecutionFailure::SIGNATURE_HASH,
            events::ComposeHashAdded::SIGNATURE_HASH,
            events::DeviceAdded::SIGNATURE_HASH,
            events::AllowAnyDeviceSet::SIGNATURE_HASH,
        ];
        let logs = chain
            .logs(from, head, flow.log_range, &addresses, &topics)
            .await?;
        let seen = record_executions(worker, &open, &safes, &logs).await?;
        touched_apps = seen.touched_apps;
        // An odd log proves nothing about any proposal: report it on the
        // Safe's requests and move past it, so one log cannot stall the chain.
        for (safe, problem) in seen.anomalies {
            tracing::error!(chain_id, %safe, problem = %problem, "unexpected execution log; ignored");
            let err = StoredError::new(
                "CHAIN-FOLLOWER",
                &format!("chain {chain_id}: {problem}"),
                Some(
                    "The log was ignored; the bridge keeps waiting for an execution it can attribute.",
                ),
            );
            for proposal in open
                .iter()
                .filter(|p| p.safe.parse::<Address>().ok() == Some(safe))
            {
                worker.store.note_on_requests(proposal.id, &err).await?;
            }
        }
        let hash = chain.block_hash(head).await?;
        worker
            .store
            .set_cursor(chain_id, head as i64, &hash.to_string(), worker.clock.now())
            .await?;
    }

    // Decide on each open proposal with the chain as of the head.
    let states = chain
        .safe_states(&safes.iter().copied().collect::<Vec<_>>(), head)
        .await?;
    let now = worker.clock.now();
    let mut moved = false;
    // Read again: the scan may have recorded executions on them.
    let current = worker.store.open_proposals(chain_id).await?;
    for proposal in &current {
        moved |= decide(
            worker,
            flow,
            &chain,
            proposal,
            &states,
            head,
            confirmations,
            now,
        )
        .await?;
    }
    if touched_apps {
        // A Safe that changed its VERSION() is doubtful evidence: its requests wait.
        let doubtful: BTreeSet<String> = current
            .iter()
            .filter(|p| {
                let safe = p.safe.parse::<Address>().ok();
                safe.and_then(|s| states.get(&s))
                    .is_some_and(|(_, version)| *version != p.safe_version)
            })
            .map(|p| p.safe.clone())
            .collect();
        moved |= release_allowed_meanwhile(
            worker,
            &chain,
            chain_id,
            head.saturating_sub(confirmations),
            &doubtful,
        )
        .await?;
    }
    Ok(moved)
}

/// What one scan found.
struct Seen {
    /// A watched app registered something: someone may have done our job.
    touched_apps: bool,
    /// Execution logs that cannot be read, per Safe.
    anomalies: Vec<(Address, String)>,
}

/// Records `ExecutionSuccess`/`ExecutionFailure` of open proposals.
async fn record_executions(
    worker: &Worker,
    open: &[ProposalRow],
    safes: &BTreeSet<Address>,
    logs: &[Log],
) -> anyhow::Result<Seen> {
    let by_hash: HashMap<(Address, B256), &ProposalRow> = open
        .iter()
        .filter_map(|p| Some(((p.safe.parse().ok()?, p.safe_tx_hash.parse().ok()?), p)))
        .collect();
    let mut touched = false;
    let mut anomalies = Vec::new();
    for log in logs {
        let topic0 = log.topics().first().copied();
        let success = match topic0 {
            Some(t) if t == events::ExecutionSuccess::SIGNATURE_HASH => true,
            Some(t) if t == events::ExecutionFailure::SIGNATURE_HASH => false,
            Some(_) => {
                touched = true;
                continue;
            }
            None => continue,
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
            )
            .await?;
    }
    Ok(Seen {
        touched_apps: touched,
        anomalies,
    })
}

#[allow(clippy::too_many_arguments)]
async fn decide(
    worker: &Worker,
    flow: &SafeFlow,
    chain: &ChainClient,
    proposal: &ProposalRow,
    states: &HashMap<Address, (u64, String)>,
    head: u64,
    confirmations: u64,
    now: DateTime<Utc>,
) -> anyhow::Result<bool> {
    let safe: Address = proposal.safe.parse()?;
    let Some((nonce, version)) = states.get(&safe) else {
        return Ok(false);
    };
    if *version != proposal.safe_version {
        let err = StoredError::new(
            "SAFE-VERSION-CHANGED",
            &format!(
                "Safe {} now reports VERSION() `{version}`, not `{}` as when proposed",
                safe.to_checksum(None),
                proposal.safe_version
            ),
            Some(
                "The bridge does not commit on doubtful evidence; check the Safe, then cancel and queue again if needed.",
            ),
        );
        tracing::error!(safe_tx_hash = %proposal.safe_tx_hash, message = %err.message, "Safe version changed");
        worker.store.note_on_requests(proposal.id, &err).await?;
        return Ok(false);
    }

    match (proposal.execution_block, proposal.execution_success) {
        (Some(block), Some(success)) => {
            if head < block as u64 + confirmations {
                return Ok(false); // Seen, not final yet.
            }
            if success {
                executed(worker, chain, proposal, now).await
            } else {
                let err = StoredError::new(
                    "SAFE-EXECUTION-FAILED",
                    &format!(
                        "the Safe executed the proposal with ExecutionFailure in {}; its nonce is used",
                        proposal.execution_tx_hash.as_deref().unwrap_or("?")
                    ),
                    Some("The bridge proposes the registrations again."),
                );
                lost(worker, flow, proposal, ProposalEnd::Failed, err, now).await
            }
        }
        // The Safe moved past our nonce without executing us: replaced or rejected.
        _ if *nonce > proposal.nonce as u64 => {
            let err = StoredError::new(
                "SAFE-NONCE-REPLACED",
                &format!(
                    "the Safe used nonce {} for another transaction (a rejection or replacement)",
                    proposal.nonce
                ),
                Some("The bridge proposes the registrations again."),
            );
            lost(worker, flow, proposal, ProposalEnd::Replaced, err, now).await
        }
        _ => {
            let submitted = proposal.submitted_at.unwrap_or(proposal.created_at);
            let timeout = chrono::Duration::seconds(flow.proposal_timeout.as_secs() as i64);
            if now - submitted > timeout {
                let err = StoredError::new(
                    "PROPOSAL-EXPIRED",
                    &format!(
                        "nobody executed Safe proposal {} within {} days",
                        proposal.safe_tx_hash,
                        timeout.num_days().max(1)
                    ),
                    Some("Ask the Safe owners, then queue the replica again."),
                );
                worker
                    .store
                    .end_proposal(proposal.id, ProposalEnd::Failed, now, Some(&err))
                    .await?;
                for request in worker.store.requests_of_proposal(proposal.id).await? {
                    let changes = Changes {
                        error: Some(err.clone()),
                        ..Changes::default()
                    };
                    worker
                        .store
                        .move_waiting(&request, Event::Fail, now, &err.message, changes)
                        .await?;
                }
                return Ok(true);
            }
            // Not executed yet (or an execution reverted without an event, GS013):
            // the proposal is still executable, keep waiting.
            Ok(false)
        }
    }
}

/// A confirmed `ExecutionSuccess`: re-read the registrations and release the
/// requests that now have everything, with the execution's transaction hash.
async fn executed(
    worker: &Worker,
    chain: &ChainClient,
    proposal: &ProposalRow,
    now: DateTime<Utc>,
) -> anyhow::Result<bool> {
    let requests = worker.store.requests_of_proposal(proposal.id).await?;
    let allowed = allowed_requests(worker, chain, &requests, None).await?;
    let tx_hash = proposal.execution_tx_hash.clone();
    for request in &requests {
        if allowed.contains(&request.id) {
            let changes = Changes {
                commit_tx_hash: tx_hash.clone(),
                ..Changes::default()
            };
            let message = format!(
                "Safe executed the proposal in {}",
                tx_hash.as_deref().unwrap_or("?")
            );
            worker
                .store
                .move_waiting(request, Event::RegistrationsAllowed, now, &message, changes)
                .await?;
        } else {
            // Executed, yet not allowed (removed again?): plan afresh.
            let err = StoredError::new(
                "NOT-ALLOWED-AFTER-EXECUTION",
                "the proposal executed but the app does not allow everything the replica needs",
                None,
            );
            worker
                .store
                .move_waiting(
                    request,
                    Event::ProposalDropped,
                    now,
                    &err.message,
                    Changes::default(),
                )
                .await?;
        }
    }
    worker
        .store
        .end_proposal(proposal.id, ProposalEnd::Executed, now, None)
        .await?;
    tracing::info!(safe_tx_hash = %proposal.safe_tx_hash, requests = requests.len(), "proposal executed and confirmed");
    Ok(true)
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
) -> anyhow::Result<bool> {
    worker
        .store
        .end_proposal(proposal.id, end, now, Some(&err))
        .await?;
    for request in worker.store.requests_of_proposal(proposal.id).await? {
        let lost_before = worker.store.proposals_lost(request.id).await?;
        if lost_before + 1 > flow.max_reproposals as i64 {
            let err = StoredError {
                message: format!(
                    "{} (gave up after {} proposals)",
                    err.message,
                    lost_before + 1
                ),
                ..err.clone()
            };
            let changes = Changes {
                error: Some(err.clone()),
                ..Changes::default()
            };
            worker
                .store
                .move_waiting(&request, Event::Fail, now, &err.message, changes)
                .await?;
        } else {
            let changes = Changes {
                error: Some(err.clone()),
                ..Changes::default()
            };
            worker
                .store
                .move_waiting(&request, Event::ProposalDropped, now, &err.message, changes)
                .await?;
        }
    }
    tracing::warn!(safe_tx_hash = %proposal.safe_tx_hash, code = %err.code, "proposal lost");
    Ok(true)
}

/// Registrations can be allowed without us (someone executed them, or turned
/// on `allowAnyDevice`): release the waiting requests, and mark proposals
/// left with nothing to do superseded. Reads state at a confirmed block.
async fn release_allowed_meanwhile(
    worker: &Worker,
    chain: &ChainClient,
    chain_id: i64,
    block: u64,
    doubtful_safes: &BTreeSet<String>,
) -> anyhow::Result<bool> {
    let mut waiting = worker.store.requests_awaiting_approval(chain_id).await?;
    waiting.retain(|r| {
        r.safe
            .as_ref()
            .is_none_or(|safe| !doubtful_safes.contains(safe))
    });
    let allowed = allowed_requests(worker, chain, &waiting, Some(block)).await?;
    let now = worker.clock.now();
    let mut moved = false;
    let mut proposals = BTreeSet::new();
    for request in waiting.iter().filter(|r| allowed.contains(&r.id)) {
        let message = "everything it needs was allowed on chain by other means";
        moved |= worker
            .store
            .move_waiting(
                request,
                Event::RegistrationsAllowed,
                now,
                message,
                Changes::default(),
            )
            .await?;
        proposals.extend(request.proposal_id);
    }
    for proposal in proposals {
        if worker
            .store
            .requests_of_proposal(proposal)
            .await?
            .is_empty()
        {
            worker
                .store
                .end_proposal(proposal, ProposalEnd::Superseded, now, None)
                .await?;
            tracing::info!(%proposal, "proposal superseded: nothing left in it");
        }
    }
    Ok(moved)
}

/// The requests whose registrations are all allowed (one Multicall3 read).
async fn allowed_requests(
    worker: &Worker,
    chain: &ChainClient,
    requests: &[ReplicaRequest],
    block: Option<u64>,
) -> anyhow::Result<BTreeSet<uuid::Uuid>> {
    if requests.is_empty() {
        return Ok(BTreeSet::new());
    }
    let ids: Vec<uuid::Uuid> = requests.iter().map(|r| r.id).collect();
    let mut needs: HashMap<uuid::Uuid, Vec<(Address, Registration)>> = HashMap::new();
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
    let wanted: Vec<(Address, Vec<Registration>)> = wanted
        .into_iter()
        .map(|(a, r)| (a, r.into_iter().collect()))
        .collect();
    let states = chain.read_apps_at(&wanted, block).await?;
    Ok(requests
        .iter()
        .filter(|r| {
            needs.get(&r.id).is_some_and(|regs| {
                regs.iter()
                    .all(|(app, reg)| states.get(app).is_some_and(|s| s.is_allowed(reg)))
            })
        })
        .map(|r| r.id)
        .collect())
}
