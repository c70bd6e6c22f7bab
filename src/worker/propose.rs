//! The propose step: group the requests awaiting a proposal per (chain,
//! Safe), drop what is already allowed or already proposed, simulate the
//! rest, and propose one Safe transaction per group.
//!
//! Unlike the per-request steps, this works on groups, so it does not claim
//! rows. Each Safe has one planner (a leased job, see `owner`), and its
//! writes are guarded as well: a request is linked to a proposal only while
//! it is still waiting and unlinked, and a nonce is allocated under a
//! per-Safe lock in Postgres, fenced by the planner's lease.

mod describe;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use alloy::primitives::{Address, B256};
use uuid::Uuid;

pub(super) use super::scope::PlanScope;
use super::signing::{refuse_to_sign, signable};
use super::{Worker, lower};
use crate::chain::{AppState, AtHead, ChainClient, OwnerKind, Registration, SafeInfo, Simulation};
use crate::config::AllowedSafes;
use crate::domain::{Event, Failure};
use crate::safe::{Call, Deployment, Proposal, SafeServiceError, build_safe_tx, gas};
use crate::safe::{SafeFlow, safe_wallet_link};
use crate::store::{
    Changes, JobLease, NewProposal, ProposalConflict, ProposalRow, ProposalStored, ReplicaRequest,
    StoreError, StoredError, StoredRegistration,
};

/// How long requests wait after a chain or service problem before planning again.
const CHAIN_RETRY: chrono::Duration = chrono::Duration::seconds(30);
/// How often the confirmations of an open proposal are read: owners see
/// each other's signatures within seconds.
const CHECK_EVERY: chrono::Duration = chrono::Duration::seconds(3);
/// A proposal that ended gets its last read of confirmations within this.
const FINAL_READ_WITHIN: chrono::Duration = chrono::Duration::days(1);
const ORIGIN: &str = r#"{"name":"approval-bridge","url":""}"#;

/// One pass of every scope, unfenced (tests drain with this). `true` when
/// something moved, so a drain runs again.
pub(super) async fn run(worker: &Worker) -> anyhow::Result<bool> {
    let Some(flow) = worker.safe_flow.as_ref() else {
        return Ok(false);
    };
    let mut moved = false;
    for scope in PlanScope::all(flow) {
        moved |= run_scope(worker, flow, &scope, None, Pace::EveryPass)
            .await?
            .moved;
    }
    Ok(moved)
}

/// How often a planner reads the chain's head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pace {
    /// At most once per new block, however often its passes run: `serve`'s
    /// planners, woken by every request that changes. A pass between two
    /// blocks plans with the head read of its block (the follower's poll
    /// carries the planners' interest); requests that read does not cover
    /// stay due, and the planner passes again when the next read of the
    /// head comes, or reads the head itself once no new block came within a
    /// block time (see [`ChainClient::apps_at_head`]). Nothing waits on the
    /// worker's clock for a block that may never come.
    PerBlock,
    /// On every pass: passes driven by hand (tests), where the test decides
    /// when blocks come.
    EveryPass,
}

/// What one planner pass did.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Pass {
    /// Something moved: the next pass runs at once.
    pub moved: bool,
    /// Due requests wait for a read of the chain ([`Pace::PerBlock`]): one
    /// of the head comes with the follower's next poll (see
    /// [`ChainClient::head_read`]), and the planner reads itself after this.
    pub read_in: Option<std::time::Duration>,
}

impl Pass {
    fn read_in(&mut self, wait: std::time::Duration) {
        self.read_in = Some(self.read_in.map_or(wait, |w| w.min(wait)));
    }
}

/// One pass of one planner: post its stored proposals, plan new ones,
/// refresh the confirmations of its proposals and describe the ones Phala
/// has not described yet. `fence`: the job's lease.
pub(super) async fn run_scope(
    worker: &Worker,
    flow: &SafeFlow,
    scope: &PlanScope,
    fence: Option<&JobLease>,
    pace: Pace,
) -> anyhow::Result<Pass> {
    let started = std::time::Instant::now();
    let pass = async {
        let mut pass = Pass {
            moved: super::queue::withdraw_unserving(worker, flow, scope, fence).await?,
            read_in: None,
        };
        pass.moved |= submit_stored(worker, flow, scope, fence).await?;
        plan(worker, flow, scope, fence, pace, &mut pass).await?;
        refresh_confirmations(worker, flow, scope, fence).await?;
        describe::fill_missing(worker, scope).await?;
        anyhow::Ok(pass)
    };
    let moved = pass.await;
    crate::metrics::record_planner_pass(scope.job(), started.elapsed());
    moved
}

async fn plan(
    worker: &Worker,
    flow: &SafeFlow,
    scope: &PlanScope,
    fence: Option<&JobLease>,
    pace: Pace,
    pass: &mut Pass,
) -> anyhow::Result<()> {
    let now = worker.clock.now();
    let mut requests = worker.store.requests_awaiting_proposal(now).await?;
    requests.retain(|r| scope.takes_chain(flow, r.chain_id));
    if requests.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = requests.iter().map(|r| r.id).collect();
    let mut needs: HashMap<Uuid, Vec<StoredRegistration>> = HashMap::new();
    for row in worker.store.registrations_of(&ids).await? {
        needs
            .entry(row.request_id)
            .or_default()
            .push(row.registration);
    }

    let mut by_chain: BTreeMap<i64, Vec<ReplicaRequest>> = BTreeMap::new();
    let mut moved = false;
    for request in requests {
        match request.chain_id {
            Some(chain_id) => by_chain.entry(chain_id).or_default().push(request),
            None => {
                fail(
                    worker,
                    fence,
                    &request,
                    StoredError::of(
                        Failure::NoChain,
                        "Phala reported no chain for this on-chain KMS app",
                    ),
                )
                .await?;
                moved = true;
            }
        }
    }
    for (chain_id, requests) in by_chain {
        moved |= plan_chain(
            worker, flow, scope, fence, pace, pass, chain_id, requests, &needs,
        )
        .await?;
    }
    pass.moved |= moved;
    Ok(())
}

/// Plans every waiting request of one chain. One Multicall3 read at the
/// latest block tells what is missing, and each app's owner; the confirmed
/// block (what is allowed for good) and the owning Safe are read only when a
/// request needs them, so a pass within the batch window costs that one call.
#[allow(clippy::too_many_arguments)]
async fn plan_chain(
    worker: &Worker,
    flow: &SafeFlow,
    scope: &PlanScope,
    fence: Option<&JobLease>,
    pace: Pace,
    pass: &mut Pass,
    chain_id: i64,
    requests: Vec<ReplicaRequest>,
    needs: &HashMap<Uuid, Vec<StoredRegistration>>,
) -> anyhow::Result<bool> {
    let now = worker.clock.now();
    let Some(chain) = flow.chain(chain_id as u64) else {
        let err = StoredError::of(
            Failure::NoRpc,
            &format!("no RPC URL is configured for chain {chain_id}"),
        );
        defer(worker, fence, &requests, now + CHAIN_RETRY * 10, Some(&err)).await?;
        return Ok(false);
    };

    // Parse what Phala gave us; a malformed value fails its request only.
    let mut moved = false;
    let mut parsed: Vec<Member> = Vec::new();
    for request in requests {
        match parse_needs(
            &request,
            needs
                .get(&request.id)
                .map(Vec::as_slice)
                .unwrap_or_default(),
        ) {
            Ok((app, missing)) => parsed.push(Member {
                request,
                app,
                missing,
            }),
            Err(err) => {
                fail(worker, fence, &request, err).await?;
                moved = true;
            }
        }
    }
    let mut wanted: BTreeMap<Address, BTreeSet<Registration>> = BTreeMap::new();
    for Member {
        app,
        missing: registrations,
        ..
    } in &parsed
    {
        wanted
            .entry(*app)
            .or_default()
            .extend(registrations.iter().map(|(r, _)| *r));
    }
    let wanted: Vec<(Address, Vec<Registration>)> = wanted
        .into_iter()
        .map(|(app, regs)| (app, regs.into_iter().collect()))
        .collect();
    // One call (or none, see `Pace`): the head's number and what is allowed there.
    let read = match pace {
        Pace::EveryPass => chain.read_apps_each(&wanted).await.map(Ok),
        Pace::PerBlock => chain
            .apps_at_head(&scope.job(), &wanted, flow.poll_interval)
            .await
            .map(|read| match read {
                AtHead::Read {
                    head,
                    states,
                    silent,
                } => Ok((head, states, silent)),
                AtHead::NextBlockIn(wait) => Err(wait),
            }),
    };
    let (head, states, silent) = match read {
        Ok(Ok(read)) => read,
        Ok(Err(wait)) => {
            // Planned with the next read of the head: the requests stay as
            // they are, due, and the planner passes again when it comes (not
            // deferred by the clock: a block may never come).
            pass.read_in(wait);
            return Ok(moved);
        }
        Err(err) => {
            tracing::warn!(
                chain_id,
                error = format!("{err:#}"),
                "cannot read the DstackApps"
            );
            let requests: Vec<ReplicaRequest> = parsed.into_iter().map(|m| m.request).collect();
            let err = StoredError::of(
                Failure::ChainUnavailable,
                &format!("cannot read the DstackApp on chain {chain_id}: {err:#}"),
            );
            defer(worker, fence, &requests, now + CHAIN_RETRY, Some(&err)).await?;
            return Ok(moved);
        }
    };
    let confirmed_block = head.saturating_sub(flow.confirmations.of(chain_id as u64));

    // An app that does not answer owner() holds back its own requests only,
    // with the reason on them; the rest of the chain is planned.
    let (parsed, unreadable): (Vec<Member>, Vec<Member>) = parsed
        .into_iter()
        .partition(|m| states.contains_key(&m.app));
    for app in &silent {
        let requests: Vec<ReplicaRequest> = unreadable
            .iter()
            .filter(|m| m.app == *app)
            .map(|m| m.request.clone())
            .collect();
        if requests.is_empty() || !scope.takes_orphans() {
            continue;
        }
        let err = StoredError::of(
            Failure::AppUnreadable,
            &format!(
                "app {} did not answer owner() on chain {chain_id}: it is not a DstackApp there, or it reverts",
                app.to_checksum(None)
            ),
        );
        tracing::warn!(chain_id, %app, requests = requests.len(), "an app does not answer owner(); its requests wait");
        defer(worker, fence, &requests, now + CHAIN_RETRY, Some(&err)).await?;
    }

    // Sort the requests into Safe groups; settle the ones that need nothing.
    // Every other read waits until it is needed: the confirmed state for a
    // request allowed at the head, the owner's kind for a group whose batch
    // window has closed (or an owner that is none of the allowed Safes), so
    // a pass within the window costs the one read above.
    let mut settled: Option<HashMap<Address, AppState>> = None;
    let mut owners: HashMap<Address, OwnerKind> = HashMap::new();
    let mut groups: BTreeMap<Address, Vec<Member>> = BTreeMap::new();
    for Member {
        request,
        app,
        missing: registrations,
    } in parsed
    {
        let state = &states[&app];
        let missing: Vec<(Registration, StoredRegistration)> = registrations
            .iter()
            .filter(|(r, _)| !state.is_allowed(r))
            .cloned()
            .collect();
        if missing.is_empty() {
            if !scope.takes_orphans() {
                continue;
            }
            // Allowed at the head; it counts once it is allowed at confirmed depth.
            if settled.is_none() {
                let read = match pace {
                    Pace::EveryPass => chain.allowed_at(&wanted, confirmed_block).await.map(Ok),
                    Pace::PerBlock => {
                        chain
                            .allowed_at_paced(
                                &scope.job(),
                                &wanted,
                                confirmed_block,
                                flow.poll_interval,
                            )
                            .await
                    }
                };
                match read {
                    Ok(Ok(read)) => settled = Some(read),
                    // Read with the others that arrive meanwhile; the
                    // request stays due until then.
                    Ok(Err(wait)) => {
                        pass.read_in(wait);
                        continue;
                    }
                    Err(err) => {
                        let err = StoredError::of(
                            Failure::ChainUnavailable,
                            &format!("cannot read the DstackApp on chain {chain_id}: {err:#}"),
                        );
                        defer(
                            worker,
                            fence,
                            std::slice::from_ref(&request),
                            now + CHAIN_RETRY,
                            Some(&err),
                        )
                        .await?;
                        continue;
                    }
                }
            }
            let confirmed = &settled.as_ref().expect("read above")[&app];
            if registrations.iter().all(|(r, _)| confirmed.is_allowed(r)) {
                allowed_already(
                    worker,
                    fence,
                    &request,
                    "everything it needs is already allowed on chain",
                )
                .await?;
                moved = true;
            } else {
                defer(
                    worker,
                    fence,
                    std::slice::from_ref(&request),
                    now + chrono::Duration::seconds(5),
                    None,
                )
                .await?;
            }
            continue;
        }
        let member = Member {
            request,
            app,
            missing,
        };
        // An allowed Safe's requests are its own planner's; it reads the
        // Safe once their batch window has closed.
        if flow.safes.contains(chain_id as u64, state.owner) {
            if scope.takes_safe(state.owner) {
                groups.entry(state.owner).or_default().push(member);
            }
            continue;
        }
        // Any other owner: the request fails, with the reason its kind gives.
        if !scope.takes_orphans() {
            continue;
        }
        let Some(owner) =
            owner_kind(worker, fence, &chain, &mut owners, state.owner, &member).await?
        else {
            continue;
        };
        if let Err(err) = usable_safe(&flow.safes, chain_id as u64, app, state, owner) {
            fail(worker, fence, &member.request, err).await?;
            moved = true;
        }
    }

    for (address, members) in groups {
        // The batch window runs from the oldest request's queueing. Requests
        // queued within it may still be preparing (prepares of one source run
        // one at a time): wait for them too, but never past three windows.
        let window = chrono::Duration::from_std(flow.batch_window)?;
        let oldest = members
            .iter()
            .map(|m| m.request.created_at)
            .min()
            .unwrap_or(now);
        let requests_of = |members: Vec<Member>| -> Vec<ReplicaRequest> {
            members.into_iter().map(|m| m.request).collect()
        };
        if now < oldest + window {
            defer(worker, fence, &requests_of(members), oldest + window, None).await?;
            continue;
        }
        let preparing = worker
            .store
            .count_unprepared(chain_id, oldest + window)
            .await?;
        if preparing > 0 && now < oldest + window * 3 {
            defer(
                worker,
                fence,
                &requests_of(members),
                now + chrono::Duration::seconds(1),
                None,
            )
            .await?;
            continue;
        }
        let mut safe = None;
        let mut usable = Vec::with_capacity(members.len());
        for member in members {
            let Some(owner) =
                owner_kind(worker, fence, &chain, &mut owners, address, &member).await?
            else {
                continue;
            };
            match usable_safe(
                &flow.safes,
                chain_id as u64,
                member.app,
                &states[&member.app],
                owner,
            ) {
                Ok(info) => {
                    safe = Some(info);
                    usable.push(member);
                }
                Err(err) => {
                    fail(worker, fence, &member.request, err).await?;
                    moved = true;
                }
            }
        }
        if let Some(safe) = safe {
            moved |= propose_group(worker, flow, &chain, &safe, head, usable, fence).await?;
        }
    }
    Ok(moved)
}

/// The kind of `owner` (read once per pass); `None` when it cannot be read,
/// and then `member` waits, with the reason on it.
async fn owner_kind(
    worker: &Worker,
    fence: Option<&JobLease>,
    chain: &ChainClient,
    owners: &mut HashMap<Address, OwnerKind>,
    owner: Address,
    member: &Member,
) -> anyhow::Result<Option<OwnerKind>> {
    if let Some(kind) = owners.get(&owner) {
        return Ok(Some(kind.clone()));
    }
    match chain.owner_kind(owner).await {
        Ok(kind) => {
            owners.insert(owner, kind.clone());
            Ok(Some(kind))
        }
        Err(err) => {
            let err = StoredError::of(
                Failure::ChainUnavailable,
                &format!("cannot read the app's owner: {err:#}"),
            );
            let until = worker.clock.now() + CHAIN_RETRY;
            defer(
                worker,
                fence,
                std::slice::from_ref(&member.request),
                until,
                Some(&err),
            )
            .await?;
            Ok(None)
        }
    }
}

struct Member {
    request: ReplicaRequest,
    app: Address,
    missing: Vec<(Registration, StoredRegistration)>,
}

/// The app's owner must be a Safe the bridge may propose to (the queue
/// form asks the same question to mark the sources it cannot replicate).
pub fn usable_safe(
    safes: &AllowedSafes,
    chain_id: u64,
    app: Address,
    state: &AppState,
    owner: OwnerKind,
) -> Result<SafeInfo, StoredError> {
    let app = app.to_checksum(None);
    let owner_address = state.owner.to_checksum(None);
    match owner {
        OwnerKind::Safe(info) if safes.contains(chain_id, info.address) => Ok(info),
        // Only one of our Safes staged as the next owner makes this the cause.
        _ if state
            .pending_owner
            .is_some_and(|p| safes.contains(chain_id, p)) =>
        {
            let pending = state.pending_owner.unwrap_or_default().to_checksum(None);
            Err(StoredError::suggesting(
                Failure::OwnershipPending,
                &format!(
                    "Safe {pending} is staged as the pendingOwner of app {app} but has not accepted ownership: \
                     it must call acceptOwnership()"
                ),
                &format!(
                    "The Safe {pending} must call acceptOwnership() on {app} (as a Safe transaction), then queue again."
                ),
            ))
        }
        OwnerKind::Safe(info) => Err(StoredError::of(
            Failure::SafeNotAllowed,
            &format!(
                "app {app} is owned by Safe {} on chain {chain_id}, which is not in the bridge's list of Safes",
                info.address.to_checksum(None)
            ),
        )),
        OwnerKind::Eoa => Err(StoredError::of(
            Failure::OwnerIsEoa,
            &format!(
                "app {app} is owned by the account {owner_address}, not a Safe: the Safe flow does not apply"
            ),
        )),
        OwnerKind::NotASafe { detail } => Err(StoredError::of(
            Failure::OwnerNotSafe,
            &format!(
                "app {app} is owned by the contract {owner_address}, which is not a Safe ({detail})"
            ),
        )),
    }
}

async fn propose_group(
    worker: &Worker,
    flow: &SafeFlow,
    chain: &ChainClient,
    safe: &SafeInfo,
    head: u64,
    members: Vec<Member>,
    fence: Option<&JobLease>,
) -> anyhow::Result<bool> {
    let now = worker.clock.now();
    let chain_id = chain.chain_id();
    let safe_key = lower(safe.address);
    let mut moved = false;

    // A registration already in an open proposal is not proposed again: the
    // request waits for that proposal instead.
    let open: HashMap<StoredRegistration, Uuid> = worker
        .store
        .open_registrations(chain_id as i64)
        .await?
        .into_iter()
        .map(|(id, reg)| (reg, id))
        .collect();
    // One transaction takes what fits in a share of a block, in queue
    // order; the rest waits for the next pass, and so the next nonce.
    let block_gas_limit = match chain.block_gas_limit().await {
        Ok(limit) => limit,
        Err(err) => {
            let requests: Vec<ReplicaRequest> = members.into_iter().map(|m| m.request).collect();
            let err = StoredError::of(Failure::ChainUnavailable, &format!("{err:#}"));
            defer(worker, fence, &requests, now + CHAIN_RETRY, Some(&err)).await?;
            return Ok(moved);
        }
    };
    let mut batch = gas::Batch::new(gas::batch_cap(block_gas_limit));
    let mut estimates: HashMap<(Address, Registration), u64> = HashMap::new();
    let mut calls: BTreeMap<(Address, Registration), StoredRegistration> = BTreeMap::new();
    let mut proposing = Vec::new();
    let mut left_for_next = 0usize;
    for member in members {
        let new: Vec<_> = member
            .missing
            .iter()
            .filter(|(_, s)| !open.contains_key(s))
            .collect();
        if new.is_empty() {
            let proposal = open[&member.missing[0].1];
            worker
                .store
                .join_open_proposal(member.request.id, proposal, &safe_key, now, fence)
                .await?;
            moved = true;
            continue;
        }
        if left_for_next > 0 {
            left_for_next += 1;
            continue;
        }
        // Simulate each new inner call from the Safe; a revert refuses the proposal.
        let mut sized = Vec::with_capacity(new.len());
        for (registration, _) in &new {
            let key = (member.app, *registration);
            let estimate = match estimates.get(&key) {
                Some(estimate) => *estimate,
                None => {
                    let call = match registration {
                        Registration::ComposeHash(h) => Call::add_compose_hash(member.app, *h),
                        Registration::Device(d) => Call::add_device(member.app, *d),
                    };
                    match chain.simulate(safe.address, member.app, call.data).await {
                        Ok(used) => used,
                        Err(Simulation::Reverted(reason)) => {
                            let what = match registration {
                                Registration::ComposeHash(h) => format!("addComposeHash({h})"),
                                Registration::Device(d) => format!("addDevice({d})"),
                            };
                            let err = StoredError::of(
                                Failure::SimulationReverted,
                                &format!(
                                    "{what} on app {} reverts when Safe {} calls it: {reason}",
                                    member.app.to_checksum(None),
                                    safe.address.to_checksum(None)
                                ),
                            );
                            proposing.push(member.request);
                            for request in &proposing {
                                fail(worker, fence, request, err.clone()).await?;
                            }
                            return Ok(true);
                        }
                        Err(Simulation::Rpc(message)) => {
                            let err = StoredError::of(
                                Failure::ChainUnavailable,
                                &format!("cannot simulate the proposal: {message}"),
                            );
                            proposing.push(member.request);
                            defer(worker, fence, &proposing, now + CHAIN_RETRY, Some(&err)).await?;
                            return Ok(moved);
                        }
                    }
                }
            };
            estimates.insert(key, estimate);
            sized.push((key, gas::inner_gas(estimate)));
        }
        if !batch.try_add(&sized) {
            left_for_next = 1;
            continue;
        }
        for (registration, stored) in new {
            calls.insert((member.app, *registration), stored.clone());
        }
        proposing.push(member.request);
    }
    if calls.is_empty() {
        return Ok(moved);
    }
    if left_for_next > 0 {
        tracing::info!(
            chain_id,
            left_for_next,
            block_gas_limit,
            "batch full: the remaining requests go into the next Safe transaction"
        );
        moved = true;
    }

    // Devices first, then compose hashes, as Phala's CLI registers them.
    let mut ordered: Vec<(&(Address, Registration), &StoredRegistration)> = calls.iter().collect();
    ordered
        .sort_by_key(|((app, r), _)| (matches!(r, Registration::ComposeHash(_)), *app, r.value()));
    let safe_calls: Vec<Call> = ordered
        .iter()
        .map(|((app, r), _)| match r {
            Registration::ComposeHash(h) => Call::add_compose_hash(*app, *h),
            Registration::Device(d) => Call::add_device(*app, *d),
        })
        .collect();

    // The nonce: a dead one of ours first (it blocks the queue until some
    // transaction uses it), else past the chain's, the service's pending
    // ones and ours.
    let nonce = match worker
        .store
        .reusable_nonce(chain_id as i64, &safe_key, safe.nonce as i64)
        .await?
    {
        Some(dead) => dead as u64,
        None => {
            let service = flow.service(chain_id)?;
            let pending = match service.list_pending(safe.address, safe.nonce).await {
                Ok(pending) => pending,
                Err(err) => {
                    // A refusal that outlasts the bound will not pass by itself.
                    let give_up = chrono::Duration::from_std(flow.propose_give_up)?;
                    let waited = |r: &ReplicaRequest| now - r.prepared_at.unwrap_or(r.created_at);
                    if !err.is_transient() && proposing.iter().all(|r| waited(r) >= give_up) {
                        let minutes = give_up.num_minutes();
                        let err = StoredError::new(
                            &err.stored_code(),
                            &format!(
                                "the Safe Transaction Service refused the bridge for over {minutes} minutes; last answer: {err}"
                            ),
                            Some(err.suggestion()),
                        );
                        for request in &proposing {
                            fail(worker, fence, request, err.clone()).await?;
                        }
                        return Ok(true);
                    }
                    let err = StoredError::new(
                        &err.stored_code(),
                        &err.to_string(),
                        Some(err.suggestion()),
                    );
                    defer(worker, fence, &proposing, now + CHAIN_RETRY, Some(&err)).await?;
                    return Ok(moved);
                }
            };
            let ours = worker
                .store
                .highest_open_nonce(chain_id as i64, &safe_key)
                .await?
                .map(|n| n as u64 + 1);
            [Some(safe.nonce), pending.map(|n| n + 1), ours]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(safe.nonce)
        }
    };

    // The follower scans for the execution from here on: the head the pass
    // read, no later than the proposal.
    let proposed_block = head as i64;
    let deployment = Deployment::preferred_for_chain(chain_id);
    let tx = build_safe_tx(&safe_calls, safe.version, deployment, nonce)?;
    let safe_tx_hash = tx.hash(safe.address, chain_id, safe.version);
    let onchain_hash = chain.safe_tx_hash(safe.address, &tx).await?;
    // What the signers see: the whole transaction, estimated as one.
    let gas = match chain.estimate_execution(safe, &tx).await {
        Ok(gas) => gas,
        Err(err) => {
            tracing::warn!(
                error = format!("{err:#}"),
                "cannot estimate the whole Safe transaction; showing the sum of its calls"
            );
            batch.planned_gas()
        }
    };
    if onchain_hash != safe_tx_hash {
        tracing::error!(%safe_tx_hash, %onchain_hash, safe = %safe.address, "our safeTxHash differs from the Safe's getTransactionHash; not proposing");
        let err = StoredError::of(
            Failure::HashMismatch,
            &format!(
                "the Safe computes {onchain_hash} for the transaction, the bridge {safe_tx_hash}"
            ),
        );
        for request in &proposing {
            fail(worker, fence, request, err.clone()).await?;
        }
        return Ok(true);
    }

    let proposer = flow
        .proposer()
        .expect("checked at start-up: a proposer exists when Safes are configured");
    let new = NewProposal {
        proposed_block,
        id: Uuid::now_v7(),
        chain_id: chain_id as i64,
        safe: safe_key,
        safe_version: safe.version.to_string(),
        nonce: nonce as i64,
        safe_tx_hash: safe_tx_hash.to_string(),
        to_address: lower(tx.to),
        value: tx.value.to_string(),
        data: tx.data.to_string(),
        operation: u8::from(tx.operation) as i16,
        proposer: lower(proposer.address()),
        gas_estimate: Some(gas as i64),
        owners: safe.owners.iter().map(|o| lower(*o)).collect(),
        threshold: safe.threshold as i32,
        calls: ordered
            .iter()
            .map(|(_, stored)| (*stored).clone())
            .collect(),
        request_ids: proposing.iter().map(|r| r.id).collect(),
    };
    let stored = match worker.store.insert_proposal(&new, now, fence).await {
        Ok(stored) => stored,
        // Another worker planned these requests or took the nonce: plan
        // again next pass (not at once, so a conflict cannot spin a drain).
        Err(ProposalConflict::NonceTaken { .. } | ProposalConflict::RequestsTaken) => {
            return Ok(moved);
        }
        // Cannot happen while the nonce is past the chain's; say so rather
        // than wait in silence.
        Err(ProposalConflict::HashTaken { status }) => {
            let err = StoredError::of(
                Failure::ProposalConflict,
                &format!(
                    "the Safe transaction {safe_tx_hash} (nonce {nonce}) is stored already as a proposal that is {status}"
                ),
            );
            tracing::error!(%safe_tx_hash, nonce, %status, "the planned transaction is stored already");
            defer(worker, fence, &proposing, now + CHAIN_RETRY, Some(&err)).await?;
            return Ok(moved);
        }
        Err(err @ ProposalConflict::LeaseLost(_)) => return Err(err.into()),
        Err(ProposalConflict::Database(err)) => return Err(err.into()),
    };
    if let ProposalStored::Reopened(id) = stored {
        // The same calls at the same nonce: the proposal that expired (or
        // was refused) is still valid at the service, with any confirmations
        // the owners gave it. Look it up there, and post it if it is not.
        tracing::info!(%safe_tx_hash, nonce, requests = proposing.len(), "a stored proposal with the same calls and nonce is opened again");
        let stored = worker.store.proposals(&[id]).await?.remove(0);
        post_stored(worker, flow, &stored, fence).await?;
        return Ok(true);
    }
    // The HTTP request ids that queued them: each finds the proposal that batches it.
    let http_request_ids: Vec<&str> = proposing
        .iter()
        .filter_map(|r| r.http_request_id.as_deref())
        .collect();
    tracing::info!(safe_tx_hash = %safe_tx_hash, nonce, calls = new.calls.len(), requests = new.request_ids.len(), ?http_request_ids, "proposal stored");
    // Before the post, so the owners' first notification has the human terms.
    describe::learn(worker, new.id, &new.calls).await?;
    let stored = worker.store.proposals(&[new.id]).await?.remove(0);
    submit(worker, flow, &stored, fence).await?;
    Ok(true)
}

/// Posts stored proposals the service has not accepted yet (after a crash,
/// a lost answer or a failure): the same transaction, so the same hash and
/// nonce. Each is looked up first: a post whose answer was lost may have
/// reached the service, and the owners may have executed it since, or used
/// its nonce for something else; then posting again would only earn a 422.
async fn submit_stored(
    worker: &Worker,
    flow: &SafeFlow,
    scope: &PlanScope,
    fence: Option<&JobLease>,
) -> anyhow::Result<bool> {
    let mut moved = false;
    for proposal in worker.store.proposals_to_submit(worker.clock.now()).await? {
        if !scope.takes_proposal(&proposal) {
            continue;
        }
        moved |= post_stored(worker, flow, &proposal, fence).await?;
    }
    Ok(moved)
}

/// Looks a stored proposal up, then posts it if it is not out yet.
async fn post_stored(
    worker: &Worker,
    flow: &SafeFlow,
    proposal: &ProposalRow,
    fence: Option<&JobLease>,
) -> anyhow::Result<bool> {
    Ok(match already_out(flow, proposal).await {
        Ok(Some(message)) => {
            tracing::info!(safe_tx_hash = %proposal.safe_tx_hash, message = %message, "stored proposal is out already; following the chain");
            worker
                .store
                .mark_submitted(proposal.id, worker.clock.now(), &message, fence)
                .await?;
            true
        }
        Ok(None) => submit(worker, flow, proposal, fence).await?,
        Err(err) => {
            let now = worker.clock.now();
            if give_up_if_overdue(worker, flow, proposal, &err, false, fence).await? {
                return Ok(true);
            }
            tracing::warn!(safe_tx_hash = %proposal.safe_tx_hash, code = %err.code, message = %err.message, "cannot look up the stored proposal; retrying later");
            worker
                .store
                .proposal_retry_later(proposal.id, now, now + CHAIN_RETRY, &err, fence)
                .await?;
            false
        }
    })
}

/// An unsent proposal holds its nonce: every later batch takes the next
/// one, which the owners cannot execute before it. So a proposal the
/// service has not accepted within the bound ends, whatever kept it out (a
/// refusal, an outage, rate limits, timeouts), failing its requests with the
/// last answer and freeing its nonce for the next batch. An answer may have
/// been lost on the way back, so the service may hold it after all: the
/// follower watches for the owners executing it. `refused`: the last answer
/// was a refusal, not an outage. `true` when it ended.
async fn give_up_if_overdue(
    worker: &Worker,
    flow: &SafeFlow,
    proposal: &ProposalRow,
    last: &StoredError,
    refused: bool,
    fence: Option<&JobLease>,
) -> anyhow::Result<bool> {
    let now = worker.clock.now();
    let waited = now - proposal.opened_at;
    if waited < chrono::Duration::from_std(flow.propose_give_up)? {
        return Ok(false);
    }
    let minutes = waited.num_minutes();
    let what = if refused { "refused" } else { "did not accept" };
    let err = StoredError {
        message: format!(
            "the Safe Transaction Service {what} the proposal for {minutes} minutes; last answer: {}",
            last.message
        ),
        ..last.clone()
    };
    tracing::warn!(safe_tx_hash = %proposal.safe_tx_hash, code = %err.code, "giving up on an unsent proposal; its nonce is free for the next batch");
    worker
        .store
        .reject_proposal(proposal.id, now, &err, true, fence)
        .await?;
    Ok(true)
}

/// `Some(why)` when a stored proposal must not be posted again: the service
/// has it already (executed or not), or the Safe used its nonce. The chain
/// follower then tells what became of it.
async fn already_out(flow: &SafeFlow, stored: &ProposalRow) -> Result<Option<String>, StoredError> {
    let hash: B256 = stored.safe_tx_hash.parse().map_err(|_| {
        StoredError::of(
            Failure::InvalidProposal,
            "stored safeTxHash is not 32 bytes",
        )
    })?;
    let service = flow
        .service(stored.chain_id as u64)
        .map_err(|err| StoredError::of(Failure::SafeService, &format!("{err:#}")))?;
    match service.get_transaction(hash).await {
        Ok(Some(tx)) if tx.is_executed => {
            return Ok(Some(format!(
                "the Safe Transaction Service knows proposal {} as executed (nonce {})",
                stored.safe_tx_hash, stored.nonce
            )));
        }
        Ok(Some(_)) => {
            return Ok(Some(format!(
                "proposed to Safe {} as nonce {} (the service had it already)",
                stored.safe, stored.nonce
            )));
        }
        Ok(None) => {}
        Err(err) if err.is_transient() => {
            return Err(StoredError::new(
                &err.stored_code(),
                &err.to_string(),
                Some(err.suggestion()),
            ));
        }
        // Refused (a bad API key, say): the post will be refused as well,
        // and a refusal that lasts is bounded there.
        Err(err) => {
            tracing::warn!(safe_tx_hash = %stored.safe_tx_hash, error = %err, "the Safe Transaction Service refused the lookup");
        }
    }
    let chain = flow.chain(stored.chain_id as u64).ok_or_else(|| {
        StoredError::without_suggestion(
            Failure::NoRpc,
            &format!("no RPC URL is configured for chain {}", stored.chain_id),
        )
    })?;
    let safe: Address = stored
        .safe
        .parse()
        .map_err(|_| StoredError::of(Failure::InvalidProposal, "stored Safe is not an address"))?;
    match chain.safe_nonce(safe).await {
        Ok(onchain) if onchain > stored.nonce as u64 => Ok(Some(format!(
            "Safe {} used nonce {} before the proposal reached the service; watching the chain",
            stored.safe, stored.nonce
        ))),
        Ok(_) => Ok(None),
        Err(err) => Err(StoredError::of(
            Failure::ChainUnavailable,
            &format!("cannot read the Safe's nonce: {err:#}"),
        )),
    }
}

async fn submit(
    worker: &Worker,
    flow: &SafeFlow,
    stored: &ProposalRow,
    fence: Option<&JobLease>,
) -> anyhow::Result<bool> {
    let chain_id = stored.chain_id as u64;
    let (safe, tx, version) = match signable(worker, stored).await? {
        Ok(checked) => checked,
        Err(why) => {
            refuse_to_sign(worker, stored, &why, fence).await?;
            return Ok(true);
        }
    };
    let proposer = flow
        .proposer()
        .expect("checked at start-up: a proposer exists when Safes are configured");
    let proposal = Proposal::sign(
        tx,
        safe,
        chain_id,
        version,
        proposer,
        Some(ORIGIN.to_owned()),
    )?;
    anyhow::ensure!(
        proposal.safe_tx_hash.to_string() == stored.safe_tx_hash,
        "stored proposal {} does not hash to its safeTxHash",
        stored.id
    );

    let now = worker.clock.now();
    let result = flow.service(chain_id)?.propose(safe, &proposal).await;
    match result {
        Ok(()) => {
            let link = safe_wallet_link(chain_id, safe, &stored.safe_tx_hash);
            let message = format!(
                "proposed to Safe {} as nonce {}{}",
                safe.to_checksum(None),
                stored.nonce,
                link.map(|l| format!(": {l}")).unwrap_or_default()
            );
            worker
                .store
                .mark_submitted(stored.id, now, &message, fence)
                .await?;
            tracing::info!(safe_tx_hash = %stored.safe_tx_hash, "proposal accepted by the Safe Transaction Service");
            Ok(true)
        }
        Err(SafeServiceError::Rejected { body }) => {
            tracing::warn!(safe_tx_hash = %stored.safe_tx_hash, body = %body, "the Safe Transaction Service rejected the proposal");
            let err = StoredError::suggesting(
                Failure::SafeRejected,
                &body,
                "The Safe Transaction Service refused the proposal; its message names the rule.",
            );
            worker
                .store
                .reject_proposal(stored.id, now, &err, false, fence)
                .await?;
            Ok(true)
        }
        Err(err) => {
            let stored_err =
                StoredError::new(&err.stored_code(), &err.to_string(), Some(err.suggestion()));
            // Refusals and outages alike are bounded: see `give_up_if_overdue`.
            if give_up_if_overdue(
                worker,
                flow,
                stored,
                &stored_err,
                !err.is_transient(),
                fence,
            )
            .await?
            {
                return Ok(true);
            }
            // Rate limits, outages and configuration trouble pass with time or a restart.
            let wait = match &err {
                SafeServiceError::RateLimited {
                    retry_after: Some(after),
                } => *after,
                e if e.is_transient() => Duration::from_secs(10),
                _ => Duration::from_secs(300),
            };
            tracing::warn!(safe_tx_hash = %stored.safe_tx_hash, error = %err, retry_in = ?wait, "proposal not accepted yet");
            worker
                .store
                .proposal_retry_later(
                    stored.id,
                    now,
                    now + chrono::Duration::from_std(wait)?,
                    &stored_err,
                    fence,
                )
                .await?;
            Ok(false)
        }
    }
}

/// Keeps the confirmations shown with each proposal current: which owners
/// confirmed, read from the Transaction Service every few seconds while it
/// is open, and once more after it ended (owners may confirm and execute
/// between two reads; the final tally must still show who signed). One list
/// call per Safe covers all of its due proposals, so a pass costs the same
/// with one open proposal as with a hundred.
async fn refresh_confirmations(
    worker: &Worker,
    flow: &SafeFlow,
    scope: &PlanScope,
    fence: Option<&JobLease>,
) -> anyhow::Result<()> {
    let now = worker.clock.now();
    let due = worker
        .store
        .proposals_to_check(now - CHECK_EVERY, now - FINAL_READ_WITHIN)
        .await?;
    let mut by_safe: BTreeMap<(i64, String), Vec<ProposalRow>> = BTreeMap::new();
    for proposal in due.into_iter().filter(|p| scope.takes_proposal(p)) {
        by_safe
            .entry((proposal.chain_id, proposal.safe.clone()))
            .or_default()
            .push(proposal);
    }
    for ((chain_id, safe), proposals) in by_safe {
        let safe: Address = safe.parse()?;
        let lowest = proposals.iter().map(|p| p.nonce).min().unwrap_or(0) as u64;
        let highest = proposals.iter().map(|p| p.nonce).max().unwrap_or(0) as u64;
        let listed = match flow
            .service(chain_id as u64)?
            .list_transactions(safe, lowest..=highest)
            .await
        {
            Ok(listed) => listed,
            Err(err) => {
                tracing::debug!(error = %err, "cannot refresh confirmations");
                continue;
            }
        };
        let by_hash: HashMap<String, _> = listed
            .into_iter()
            .map(|tx| (tx.safe_tx_hash.to_string(), tx))
            .collect();
        // Most reads change nothing: those are marked read together, in one
        // statement, so the pass's writes do not grow with the proposals.
        let mut unchanged = Vec::new();
        for proposal in proposals {
            let (confirmed, threshold, owners) = match by_hash.get(&proposal.safe_tx_hash) {
                Some(tx) => {
                    let confirmed: Vec<String> =
                        tx.confirmations.iter().map(|o| lower(*o)).collect();
                    let threshold = tx.confirmations_required.map(|t| t as i32);
                    // Proposals stored before owners were kept learn them once.
                    let owners = match &proposal.owners {
                        Some(_) => None,
                        None => safe_owners(flow, &proposal).await,
                    };
                    (confirmed, threshold, owners)
                }
                // Not (or no longer) known to the service: the last tally stands.
                None => (
                    proposal.confirmed_by.clone().unwrap_or_default(),
                    None,
                    None,
                ),
            };
            let same = proposal.confirmed_by.as_ref() == Some(&confirmed)
                && proposal.confirmations == Some(confirmed.len() as i32)
                && threshold.is_none_or(|t| proposal.threshold == Some(t))
                && owners.is_none();
            if same {
                unchanged.push(proposal.id);
                continue;
            }
            worker
                .store
                .set_confirmations(
                    proposal.id,
                    now,
                    &confirmed,
                    threshold,
                    owners.as_deref(),
                    fence,
                )
                .await?;
        }
        worker.store.mark_checked(&unchanged, now, fence).await?;
    }
    Ok(())
}

/// The Safe's owners (lowercase), read on chain.
async fn safe_owners(flow: &SafeFlow, proposal: &ProposalRow) -> Option<Vec<String>> {
    let chain = flow.chain(proposal.chain_id as u64)?;
    let safe: Address = proposal.safe.parse().ok()?;
    match chain.owner_kind(safe).await {
        Ok(OwnerKind::Safe(info)) => Some(info.owners.iter().map(|o| lower(*o)).collect()),
        _ => None,
    }
}

fn parse_needs(
    request: &ReplicaRequest,
    needs: &[StoredRegistration],
) -> Result<(Address, Vec<(Registration, StoredRegistration)>), StoredError> {
    let bad = |what: String| StoredError::of(Failure::InvalidRegistration, &what);
    let app: Address = request
        .app_id
        .as_deref()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| bad(format!("app id {:?} is not an address", request.app_id)))?;
    let mut out = Vec::new();
    for need in needs {
        let value: B256 = need
            .value
            .parse()
            .map_err(|_| bad(format!("{} `{}` is not 32 bytes", need.kind, need.value)))?;
        let registration = Registration::from_kind(&need.kind, value)
            .ok_or_else(|| bad(format!("unknown registration kind `{}`", need.kind)))?;
        out.push((registration, need.clone()));
    }
    Ok((app, out))
}

/// A request that changed meanwhile (cancelled, or planned by another worker) is left alone.
async fn fail(
    worker: &Worker,
    fence: Option<&JobLease>,
    request: &ReplicaRequest,
    err: StoredError,
) -> Result<(), StoreError> {
    tracing::warn!(replica_id = %request.id, code = %err.code, message = %err.message, "request failed");
    let message = err.message.clone();
    let changes = Changes {
        error: Some(err),
        ..Changes::default()
    };
    worker
        .store
        .move_waiting(
            request,
            Event::Fail,
            worker.clock.now(),
            &message,
            changes,
            fence,
        )
        .await?;
    Ok(())
}

async fn allowed_already(
    worker: &Worker,
    fence: Option<&JobLease>,
    request: &ReplicaRequest,
    why: &str,
) -> Result<(), StoreError> {
    let now = worker.clock.now();
    worker
        .store
        .move_waiting(
            request,
            Event::RegistrationsAllowed,
            now,
            why,
            Changes::default(),
            fence,
        )
        .await?;
    Ok(())
}

async fn defer(
    worker: &Worker,
    fence: Option<&JobLease>,
    requests: &[ReplicaRequest],
    until: chrono::DateTime<chrono::Utc>,
    err: Option<&StoredError>,
) -> Result<(), StoreError> {
    let ids: Vec<Uuid> = requests.iter().map(|r| r.id).collect();
    worker.store.defer_requests(&ids, until, err, fence).await
}
