//! Chain access over JSON-RPC (alloy): the DstackApp and Safe reads the
//! planner needs, batched through Multicall3, plus simulation and the Safe's
//! own hash for cross-checking.

mod bindings;
mod eip1271;
mod ens;
mod heads;
mod reads;
mod revert;
mod transport;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alloy::eips::{BlockId, BlockNumberOrTag};
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{Filter, Log, TransactionRequest};
use alloy::sol_types::{SolCall, SolValue};
use anyhow::Context;
use reqwest::Url;

pub use bindings::{IDstackApp, IERC1271, IMulticall3};
pub use eip1271::EIP1271_MAGIC;
pub use ens::{ENS_REGISTRY, EnsNames, namehash};
pub use revert::decode_revert;

use crate::safe::{ISafe, SafeTx, SafeVersion};

/// Multicall3's address: the same on every chain that has it.
pub const MULTICALL3: Address =
    alloy::primitives::address!("cA11bde05977b3631167028862bE2a173976CA11");

/// One registration a replica needs on its DstackApp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Registration {
    ComposeHash(B256),
    Device(B256),
}

impl Registration {
    pub fn kind(&self) -> &'static str {
        match self {
            Registration::ComposeHash(_) => "compose_hash",
            Registration::Device(_) => "device",
        }
    }

    pub fn value(&self) -> B256 {
        match self {
            Registration::ComposeHash(v) | Registration::Device(v) => *v,
        }
    }

    /// The inverse of [`Registration::kind`]: a stored kind and its value.
    pub fn from_kind(kind: &str, value: B256) -> Option<Registration> {
        match kind {
            "compose_hash" => Some(Registration::ComposeHash(value)),
            "device" => Some(Registration::Device(value)),
            _ => None,
        }
    }
}

/// What a DstackApp says about itself and some registrations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppState {
    pub owner: Address,
    /// `None` when the app has one-step ownership (`pendingOwner()` reverts).
    pub pending_owner: Option<Address>,
    pub allow_any_device: bool,
    /// The registrations asked about, and whether each is allowed now.
    pub allowed: HashMap<Registration, bool>,
}

impl AppState {
    /// Allowed directly, or covered by `allowAnyDevice`.
    pub fn is_allowed(&self, registration: &Registration) -> bool {
        match registration {
            Registration::Device(_) if self.allow_any_device => true,
            r => self.allowed.get(r).copied().unwrap_or(false),
        }
    }
}

/// What kind of account owns an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerKind {
    /// An externally owned account: no Safe flow.
    Eoa,
    /// A contract whose `VERSION()` is not a supported Safe.
    NotASafe {
        detail: String,
    },
    Safe(SafeInfo),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafeInfo {
    pub address: Address,
    pub version: SafeVersion,
    pub owners: Vec<Address>,
    pub threshold: u64,
    pub nonce: u64,
}

/// Each Safe's `nonce()` and `VERSION()` at one block.
pub type SafeStates = HashMap<Address, (u64, String)>;

/// What one Multicall3 call read at a block.
struct HeadRead {
    /// The block's number: asked for when the call ran at `latest`.
    number: Option<u64>,
    states: SafeStates,
    hashes: HashMap<u64, B256>,
}

/// What a planner gets from [`ChainClient::apps_at_head`].
#[derive(Debug)]
pub enum AtHead {
    /// The head's number, the states of the apps that answered `owner()`
    /// there, and the apps that did not.
    Read {
        head: u64,
        states: HashMap<Address, AppState>,
        silent: Vec<Address>,
    },
    /// The head was read lately without all that is wanted: the next read
    /// of the head carries it (see [`ChainClient::head_read`]); if none
    /// comes within this, the planner reads the head itself.
    NextBlockIn(Duration),
}

/// A client for one chain.
#[derive(Clone, Debug)]
pub struct ChainClient {
    chain_id: u64,
    provider: DynProvider,
    heads: Arc<heads::Heads>,
    /// App reads shared by every clone (see [`reads`]).
    reads: Arc<Mutex<reads::Reads>>,
    /// Notified when a read of the head is kept.
    head_read: Arc<tokio::sync::Notify>,
}

impl ChainClient {
    /// Every call times out and transient failures are retried (see
    /// [`transport`]), so no call waits without bound.
    pub fn new(chain_id: u64, rpc_url: Url) -> Self {
        Self::with_ws(chain_id, rpc_url, None)
    }

    /// A client that also learns of new blocks from a `newHeads`
    /// subscription at `ws_url` (calls still go to `rpc_url`).
    pub fn with_ws(chain_id: u64, rpc_url: Url, ws_url: Option<Url>) -> Self {
        let provider = ProviderBuilder::new()
            .connect_client(transport::rpc_client(rpc_url))
            .erased();
        ChainClient {
            chain_id,
            provider,
            heads: heads::Heads::new(chain_id, ws_url),
            reads: Arc::default(),
            head_read: Arc::default(),
        }
    }

    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    pub fn provider(&self) -> &DynProvider {
        &self.provider
    }

    /// Refuses an RPC that answers for another chain than configured.
    pub async fn check_chain_id(&self) -> anyhow::Result<()> {
        let actual = self
            .provider
            .get_chain_id()
            .await
            .context("eth_chainId failed")?;
        anyhow::ensure!(
            actual == self.chain_id,
            "the RPC configured for chain {} answers for chain {actual}",
            self.chain_id
        );
        Ok(())
    }

    /// [`ChainClient::check_chain_id`] once per connection: again only after
    /// [`ChainClient::connection_changed`] (or a WebSocket reconnect).
    pub async fn check_chain_id_once(&self) -> anyhow::Result<()> {
        if self.heads.chain_id_checked() {
            return Ok(());
        }
        self.check_chain_id().await?;
        self.heads.set_chain_id_checked(true);
        Ok(())
    }

    /// A call failed: the next answer may come from another provider, so
    /// its chain id is checked again and nothing seen before is trusted.
    pub fn connection_changed(&self) {
        self.heads.set_chain_id_checked(false);
        self.heads.set_followed(None);
        self.reads().forget_head();
    }

    fn reads(&self) -> std::sync::MutexGuard<'_, reads::Reads> {
        self.reads.lock().expect("reads mutex")
    }

    /// What the planner `reader` needs at the head, read at most once per
    /// new block however often it asks: the head read of this block (the
    /// follower's poll carries each planner's last `wanted`, see
    /// [`reads`]) when it holds all of `wanted`; else the caller waits for
    /// the next read, which [`ChainClient::head_read`] announces. Only when
    /// no new block came within a block time (`poll` until the chain's is
    /// learnt, and `poll` if that is longer) does this read the head itself,
    /// and then at most once per `poll` while none comes: one call at the
    /// latest block, with every planner's interest.
    pub async fn apps_at_head(
        &self,
        reader: &str,
        wanted: &[(Address, Vec<Registration>)],
        poll: Duration,
    ) -> anyhow::Result<AtHead> {
        let block_time = self.heads.block_time().unwrap_or(poll);
        let all = {
            let mut reads = self.reads();
            reads.set_interest(reader, wanted);
            if let Some(head) = reads.head() {
                let until = head.current_until(block_time, poll);
                let now = tokio::time::Instant::now();
                if now < until {
                    return Ok(match reads::covered(&head.apps, wanted) {
                        Some((states, answered)) => each(head.number, states, answered),
                        None => AtHead::NextBlockIn(until - now),
                    });
                }
            }
            reads.interest_with(wanted)
        };
        tracing::debug!(
            chain_id = self.chain_id,
            reader,
            "no new block read within a block time holds what the planner wants: reading the head"
        );
        let (number, states, answered) = self.read_app_states(&all, None).await?;
        let head = number.context("Multicall3 getBlockNumber() failed")?;
        let mut apps = reads::BlockApps::new();
        reads::merge(&mut apps, &states, &answered);
        let (states, answered) =
            reads::covered(&apps, wanted).context("a read answers what it asked")?;
        Ok(each(head, states, answered))
    }

    /// Notified whenever a read of the head is kept (the follower's poll
    /// carries the planners' interest): a planner told to wait by
    /// [`ChainClient::apps_at_head`] plans again then.
    pub fn head_read(&self) -> Arc<tokio::sync::Notify> {
        self.head_read.clone()
    }

    /// Keeps a read of the head, and tells the planners waiting for one.
    fn keep_head(
        &self,
        head: u64,
        sent: tokio::time::Instant,
        states: &HashMap<Address, AppState>,
        answered: &HashMap<Address, bool>,
    ) {
        self.reads().keep_head(head, sent, states, answered);
        self.head_read.notify_waiters();
    }

    /// [`ChainClient::allowed_at`] for the planner `reader` while requests
    /// arrive one after another, each needing its own registrations read:
    /// what a read of `block` holds answers at once; else one read per three
    /// block times (`block_time_unknown` until the chain's is learnt) takes
    /// what every request waiting then needs, and until it is due this says
    /// how long to wait. Three, not two: with the follower's two calls per
    /// block, one read per two blocks would sit exactly on the budget of 2.5
    /// calls per new block.
    pub async fn allowed_at_paced(
        &self,
        reader: &str,
        wanted: &[(Address, Vec<Registration>)],
        block: u64,
        block_time_unknown: Duration,
    ) -> anyhow::Result<Result<HashMap<Address, AppState>, Duration>> {
        let period = self.heads.block_time().unwrap_or(block_time_unknown) * 3;
        {
            let mut reads = self.reads();
            if let Some((states, _)) = reads.fixed(block, wanted) {
                return Ok(Ok(states));
            }
            let now = tokio::time::Instant::now();
            if let Some(wait) = reads.fixed_read_due(reader, now, period) {
                return Ok(Err(wait));
            }
            reads.fixed_read_at(reader, now);
        }
        Ok(Ok(self.allowed_at(wanted, block).await?))
    }

    /// The head at which the chain follower last finished a pass: with no
    /// block since, a pass has nothing new to read.
    pub fn followed_head(&self) -> Option<u64> {
        self.heads.followed()
    }

    /// Nothing to follow: the next pass reads the chain afresh.
    pub fn unfollow(&self) {
        self.heads.set_followed(None);
    }

    pub fn set_followed_head(&self, head: u64) {
        self.heads.set_followed(Some(head));
    }

    /// The latest block number while the `newHeads` subscription is live
    /// (no call); `None` without one: then [`ChainClient::poll_head`] asks.
    pub fn subscribed_head(&self) -> Option<u64> {
        self.heads.subscribed_head()
    }

    /// Waits for a block above `after`: until the subscription delivers one,
    /// or, without a live subscription, until the next poll is due (at most
    /// `longest`, or a block time when that is longer).
    pub async fn wait_for_block(&self, after: u64, longest: Duration) {
        let poll = self.heads.next_poll_in(longest);
        if self.heads.subscribed_head().is_some() {
            // Also wakes when the subscription drops, to poll instead.
            self.heads.wait_above(after, longest.max(poll)).await;
        } else {
            tokio::time::sleep(poll).await;
        }
    }

    /// Reads every app's ownership and the given registrations in ONE
    /// `eth_call` to Multicall3. A failed sub-call counts as "not allowed",
    /// except `pendingOwner()`, whose revert means one-step ownership.
    pub async fn read_apps(
        &self,
        wanted: &[(Address, Vec<Registration>)],
    ) -> anyhow::Result<HashMap<Address, AppState>> {
        self.read_apps_at(wanted, None).await
    }

    /// [`ChainClient::read_apps`] as of `block` (`None`: the latest block).
    pub async fn read_apps_at(
        &self,
        wanted: &[(Address, Vec<Registration>)],
        block: Option<u64>,
    ) -> anyhow::Result<HashMap<Address, AppState>> {
        let (_, states, owners_read) = self.read_app_states(wanted, block).await?;
        if let Some((app, _)) = owners_read.iter().find(|(_, read)| !**read) {
            anyhow::bail!(
                "{app} did not answer owner(): it is not a DstackApp on chain {}",
                self.chain_id
            );
        }
        Ok(states)
    }

    /// [`ChainClient::read_apps`] app by app, with the number of the block
    /// read, all in one call: that block's number, the states of the apps
    /// that answered `owner()`, and the apps that did not (not a DstackApp on
    /// this chain, or one that reverts), so one odd app holds back only the
    /// requests on it.
    pub async fn read_apps_each(
        &self,
        wanted: &[(Address, Vec<Registration>)],
    ) -> anyhow::Result<(u64, HashMap<Address, AppState>, Vec<Address>)> {
        let (number, states, owners_read) = self.read_app_states(wanted, None).await?;
        let head = number.context("Multicall3 getBlockNumber() failed")?;
        match each(head, states, owners_read) {
            AtHead::Read {
                head,
                states,
                silent,
            } => Ok((head, states, silent)),
            AtHead::NextBlockIn(_) => unreachable!("`each` reads"),
        }
    }

    /// What is allowed as of `block`: like [`ChainClient::read_apps_at`],
    /// except that an app that does not answer there (not deployed yet at
    /// that block, say) allows nothing.
    pub async fn allowed_at(
        &self,
        wanted: &[(Address, Vec<Registration>)],
        block: u64,
    ) -> anyhow::Result<HashMap<Address, AppState>> {
        Ok(self.read_app_states(wanted, Some(block)).await?.1)
    }

    /// The states, and whether each app answered `owner()`; at the latest
    /// block (`block` `None`), first that block's number, read in the same
    /// call (`None` if Multicall3 did not answer it). A block read before
    /// with all of `wanted` answers from what was kept, with no call: the
    /// callers read fixed blocks at confirmed depth only, which do not change.
    #[allow(clippy::type_complexity)]
    async fn read_app_states(
        &self,
        wanted: &[(Address, Vec<Registration>)],
        block: Option<u64>,
    ) -> anyhow::Result<(
        Option<u64>,
        HashMap<Address, AppState>,
        HashMap<Address, bool>,
    )> {
        if let Some(block) = block
            && let Some((states, answered)) = self.reads().fixed(block, wanted)
        {
            return Ok((Some(block), states, answered));
        }
        tracing::debug!(
            chain_id = self.chain_id,
            ?block,
            apps = wanted.len(),
            "reading DstackApps"
        );
        let number_call = block.is_none().then(|| IMulticall3::Call3 {
            target: MULTICALL3,
            allowFailure: true,
            callData: IMulticall3::getBlockNumberCall {}.abi_encode().into(),
        });
        let (calls, slots) = app_calls(wanted);
        let sent = tokio::time::Instant::now();
        let mut results = self
            .aggregate_at(number_call.into_iter().chain(calls).collect(), block)
            .await?;
        let number = match block {
            Some(block) => Some(block),
            None => decode_number(&results.remove(0)),
        };
        let (states, owners_read) = decode_apps(slots, &results);
        match (block, number) {
            (Some(block), _) => self.reads().keep_fixed(block, &states, &owners_read),
            (None, Some(head)) => {
                self.keep_head(head, sent, &states, &owners_read);
                self.heads.note_head(head, sent);
            }
            (None, None) => {}
        }
        Ok((number, states, owners_read))
    }

    /// The Safe's `nonce()` at the latest block.
    pub async fn safe_nonce(&self, safe: Address) -> anyhow::Result<u64> {
        let request = TransactionRequest::default()
            .to(safe)
            .input(ISafe::nonceCall {}.abi_encode().into());
        let data = self
            .provider
            .call(request)
            .await
            .with_context(|| format!("nonce() of Safe {safe} failed"))?;
        let nonce = ISafe::nonceCall::abi_decode_returns(&data)?;
        u64::try_from(nonce).with_context(|| format!("Safe {safe} reports nonce {nonce}"))
    }

    /// The latest block number.
    pub async fn head(&self) -> anyhow::Result<u64> {
        self.provider
            .get_block_number()
            .await
            .context("eth_blockNumber failed")
    }

    /// The latest block's number and hash, in one call.
    pub async fn head_block(&self) -> anyhow::Result<(u64, B256)> {
        let block = self
            .provider
            .get_block_by_number(BlockNumberOrTag::Latest)
            .await
            .context("eth_getBlockByNumber(latest) failed")?
            .with_context(|| format!("chain {} has no latest block", self.chain_id))?;
        Ok((block.header.number, block.header.hash))
    }

    /// The hash of block `number` on the chain as it is now.
    pub async fn block_hash(&self, number: u64) -> anyhow::Result<B256> {
        let block = self
            .provider
            .get_block_by_number(BlockNumberOrTag::Number(number))
            .await
            .context("eth_getBlockByNumber failed")?
            .with_context(|| format!("block {number} is not on chain {}", self.chain_id))?;
        Ok(block.header.hash)
    }

    /// Logs of `addresses` with one of `topics0` (any log when empty) in `from..=to`: one
    /// `eth_getLogs` per range, halving the range when the provider refuses
    /// it as too large.
    pub async fn logs(
        &self,
        from: u64,
        to: u64,
        max_range: u64,
        addresses: &[Address],
        topics0: &[B256],
    ) -> anyhow::Result<Vec<Log>> {
        let mut out = Vec::new();
        let mut start = from;
        let mut range = max_range.max(1);
        while start <= to {
            let end = to.min(start + range - 1);
            let mut filter = Filter::new()
                .from_block(start)
                .to_block(end)
                .address(addresses.to_vec());
            if !topics0.is_empty() {
                filter = filter.event_signature(topics0.to_vec());
            }
            match self.provider.get_logs(&filter).await {
                Ok(logs) => {
                    out.extend(logs);
                    start = end + 1;
                }
                Err(err) if range > 1 && is_range_limit(&err.to_string()) => {
                    range = (range / 2).max(1);
                    tracing::debug!(
                        chain_id = self.chain_id,
                        range,
                        "provider refused the log range; halving"
                    );
                }
                Err(err) => return Err(err).context("eth_getLogs failed"),
            }
        }
        Ok(out)
    }

    /// `nonce()` and `VERSION()` of each Safe at `block`, in one Multicall3
    /// call. A Safe that does not answer `nonce()` there (not created yet at
    /// that block) is left out.
    pub async fn safe_states(&self, safes: &[Address], block: u64) -> anyhow::Result<SafeStates> {
        Ok(self.read_head(safes, Some(block), &[], false).await?.states)
    }

    /// [`ChainClient::safe_states`] at `block`, and in the same call the
    /// hashes of `ancestors` of that block, as the EVM's BLOCKHASH sees them
    /// (only the 256 blocks below `block` have one; the others are left out).
    /// One call instead of one `eth_getBlockByNumber` per hash. `block` is
    /// the head (the subscription's): the call also reads what the planners
    /// want there.
    pub async fn safe_states_and_hashes(
        &self,
        safes: &[Address],
        block: u64,
        ancestors: &[u64],
    ) -> anyhow::Result<(SafeStates, HashMap<u64, B256>)> {
        let ancestors: Vec<u64> = ancestors
            .iter()
            .copied()
            .filter(|a| *a < block && block - a <= 256)
            .collect();
        let read = self.read_head(safes, Some(block), &ancestors, true).await?;
        Ok((read.states, read.hashes))
    }

    /// A poll that is also the head's state: the latest block's number, and
    /// in the same `eth_call` the Safes' state there and the hashes of
    /// `ancestors` (those the head has one for). Feeds the block-time
    /// estimate that times the polls, as [`ChainClient::latest_block`] does.
    /// The call also reads what the planners want at the head.
    pub async fn poll_head(
        &self,
        safes: &[Address],
        ancestors: &[u64],
    ) -> anyhow::Result<(u64, SafeStates, HashMap<u64, B256>)> {
        let sent = tokio::time::Instant::now();
        let read = self.read_head(safes, None, ancestors, true).await?;
        let head = read.number.context("Multicall3 getBlockNumber() failed")?;
        self.heads.record_polled(head, sent);
        Ok((head, read.states, read.hashes))
    }

    /// One Multicall3 call at `block` (the latest when `None`, then with its
    /// number first): each Safe's `nonce()` and `VERSION()`, and the hashes
    /// of `ancestors`; with `at_head` (`block` is the head), also each
    /// planner's interest, kept for them (see [`reads`]).
    async fn read_head(
        &self,
        safes: &[Address],
        block: Option<u64>,
        ancestors: &[u64],
        at_head: bool,
    ) -> anyhow::Result<HeadRead> {
        let interest = match at_head {
            true => self.reads().interest_with(&[]),
            false => Vec::new(),
        };
        let (app_calls, app_slots) = app_calls(&interest);
        let own = |data: Vec<u8>| IMulticall3::Call3 {
            target: MULTICALL3,
            allowFailure: true,
            callData: data.into(),
        };
        let number_call = block
            .is_none()
            .then(|| own(IMulticall3::getBlockNumberCall {}.abi_encode()));
        let hash_calls = ancestors.iter().map(|a| {
            own(IMulticall3::getBlockHashCall {
                blockNumber: U256::from(*a),
            }
            .abi_encode())
        });
        let safe_calls = safes.iter().flat_map(|safe| {
            [
                ISafe::nonceCall {}.abi_encode(),
                ISafe::VERSIONCall {}.abi_encode(),
            ]
            .map(|data| IMulticall3::Call3 {
                target: *safe,
                allowFailure: true,
                callData: data.into(),
            })
        });
        let hash_count = ancestors.len();
        let calls = number_call
            .into_iter()
            .chain(safe_calls)
            .chain(hash_calls)
            .chain(app_calls)
            .collect();
        let sent = tokio::time::Instant::now();
        let mut results = self.aggregate_at(calls, block).await?;
        let number = match block {
            Some(block) => Some(block),
            None => decode_number(&results.remove(0)),
        };
        let (states, rest) = results.split_at(safes.len() * 2);
        let (hashes, apps) = rest.split_at(hash_count.min(rest.len()));
        if let (true, Some(head)) = (at_head, number) {
            // Kept even with no interest: a planner then knows the head is
            // current, and waits for the next poll rather than reading.
            let (app_states, answered) = decode_apps(app_slots, apps);
            self.keep_head(head, sent, &app_states, &answered);
        }
        let hashes = ancestors
            .iter()
            .zip(hashes)
            .filter_map(|(number, result)| {
                let hash = IMulticall3::getBlockHashCall::abi_decode_returns(&result.returnData)
                    .ok()
                    .filter(|h| result.success && !h.is_zero())?;
                Some((*number, hash))
            })
            .collect();
        let mut out = HashMap::new();
        for (safe, pair) in safes.iter().zip(states.chunks(2)) {
            let Some(nonce) = pair[0]
                .success
                .then(|| ISafe::nonceCall::abi_decode_returns(&pair[0].returnData).ok())
                .flatten()
                .and_then(|n| u64::try_from(n).ok())
            else {
                continue;
            };
            let version = pair[1]
                .success
                .then(|| ISafe::VERSIONCall::abi_decode_returns(&pair[1].returnData).ok())
                .flatten()
                .unwrap_or_default();
            out.insert(*safe, (nonce, version));
        }
        Ok(HeadRead {
            number,
            states: out,
            hashes,
        })
    }

    /// Tells an EOA from a contract, and a Safe from other contracts, and
    /// reads the Safe's version, owners, threshold and nonce in one Multicall3 call.
    pub async fn owner_kind(&self, owner: Address) -> anyhow::Result<OwnerKind> {
        let code = self
            .provider
            .get_code_at(owner)
            .await
            .context("eth_getCode failed")?;
        if code.is_empty() {
            return Ok(OwnerKind::Eoa);
        }
        let calls = [
            ISafe::VERSIONCall {}.abi_encode(),
            ISafe::getOwnersCall {}.abi_encode(),
            ISafe::getThresholdCall {}.abi_encode(),
            ISafe::nonceCall {}.abi_encode(),
        ]
        .into_iter()
        .map(|data| IMulticall3::Call3 {
            target: owner,
            allowFailure: true,
            callData: data.into(),
        })
        .collect();
        let r = self.aggregate(calls).await?;
        let version = match r[0]
            .success
            .then(|| ISafe::VERSIONCall::abi_decode_returns(&r[0].returnData).ok())
            .flatten()
        {
            Some(version) => version,
            None => {
                return Ok(OwnerKind::NotASafe {
                    detail: "it has no VERSION()".into(),
                });
            }
        };
        let version = match version.parse::<SafeVersion>() {
            Ok(v) => v,
            Err(_) => {
                return Ok(OwnerKind::NotASafe {
                    detail: format!("its VERSION() is `{version}`, not a supported Safe"),
                });
            }
        };
        let decoded = (|| -> Option<SafeInfo> {
            let owners = ISafe::getOwnersCall::abi_decode_returns(&r[1].returnData)
                .ok()
                .filter(|_| r[1].success)?;
            let threshold = ISafe::getThresholdCall::abi_decode_returns(&r[2].returnData)
                .ok()
                .filter(|_| r[2].success)?;
            let nonce = ISafe::nonceCall::abi_decode_returns(&r[3].returnData)
                .ok()
                .filter(|_| r[3].success)?;
            Some(SafeInfo {
                address: owner,
                version,
                owners,
                threshold: threshold.try_into().ok()?,
                nonce: nonce.try_into().ok()?,
            })
        })();
        Ok(match decoded {
            Some(info) => OwnerKind::Safe(info),
            None => OwnerKind::NotASafe {
                detail: "it answers VERSION() but not the Safe owner functions".into(),
            },
        })
    }

    /// Runs `data` against `to` from `from` (the Safe) with `eth_call`, and
    /// estimates its gas. A revert comes back decoded.
    pub async fn simulate(
        &self,
        from: Address,
        to: Address,
        data: Bytes,
    ) -> Result<u64, Simulation> {
        let request = TransactionRequest::default()
            .from(from)
            .to(to)
            .input(data.into());
        if let Err(err) = self.provider.call(request.clone()).await {
            return Err(match err.as_error_resp().and_then(|e| e.as_revert_data()) {
                Some(revert) => Simulation::Reverted(decode_revert(&revert)),
                None => Simulation::Rpc(err.to_string()),
            });
        }
        self.provider
            .estimate_gas(request)
            .await
            .map_err(|err| Simulation::Rpc(err.to_string()))
    }

    /// The gas limit of the latest block.
    pub async fn block_gas_limit(&self) -> anyhow::Result<u64> {
        let block = self
            .provider
            .get_block_by_number(BlockNumberOrTag::Latest)
            .await
            .context("eth_getBlockByNumber(latest) failed")?
            .with_context(|| format!("chain {} has no latest block", self.chain_id))?;
        Ok(block.header.gas_limit)
    }

    /// Estimates the gas of executing `tx` on `safe`, whole: `execTransaction`
    /// as the owners would send it, signature checks and all, at the
    /// transaction's nonce. No owner signs here: the estimate runs with the
    /// Safe's storage overridden so that the lowest `threshold` owners have
    /// approved the hash (Safe's "approved hash" signatures, `v = 1`), and
    /// is sent from the first of them.
    pub async fn estimate_execution(&self, safe: &SafeInfo, tx: &SafeTx) -> anyhow::Result<u64> {
        let mut signers = safe.owners.clone();
        signers.sort();
        signers.truncate(safe.threshold.max(1) as usize);
        anyhow::ensure!(!signers.is_empty(), "Safe {} has no owners", safe.address);
        let hash = tx.hash(safe.address, self.chain_id, safe.version);
        let mut signatures = Vec::with_capacity(65 * signers.len());
        let mut slots = alloy::primitives::map::B256HashMap::default();
        for owner in &signers {
            signatures.extend_from_slice(owner.into_word().as_slice());
            signatures.extend_from_slice(&[0u8; 32]);
            signatures.push(1);
            // approvedHashes[owner][hash] = 1: the mapping is at slot 8 of
            // every Safe from 1.3.0 on (singleton, modules, owners,
            // ownerCount, threshold, nonce, domain separator, signedMessages).
            let inner = alloy::primitives::keccak256((*owner, U256::from(8)).abi_encode());
            let slot = alloy::primitives::keccak256((hash, inner).abi_encode());
            slots.insert(slot, B256::from(U256::from(1)));
        }
        // The nonce (slot 5): a proposal queued behind others estimates as
        // if they had executed.
        slots.insert(B256::from(U256::from(5)), B256::from(U256::from(tx.nonce)));
        let call = ISafe::execTransactionCall {
            to: tx.to,
            value: tx.value,
            data: tx.data.clone(),
            operation: tx.operation.into(),
            safeTxGas: tx.safe_tx_gas,
            baseGas: tx.base_gas,
            gasPrice: tx.gas_price,
            gasToken: tx.gas_token,
            refundReceiver: tx.refund_receiver,
            signatures: signatures.into(),
        };
        let request = TransactionRequest::default()
            .from(signers[0])
            .to(safe.address)
            .input(call.abi_encode().into());
        let overrides = alloy::rpc::types::state::StateOverridesBuilder::default()
            .append(
                safe.address,
                alloy::rpc::types::state::AccountOverride {
                    state_diff: Some(slots),
                    ..Default::default()
                },
            )
            .build();
        self.provider
            .estimate_gas(request)
            .overrides(overrides)
            .await
            .context("eth_estimateGas of execTransaction failed")
    }

    /// The Safe's own `getTransactionHash` for `tx`, to cross-check ours.
    pub async fn safe_tx_hash(&self, safe: Address, tx: &SafeTx) -> anyhow::Result<B256> {
        let call = ISafe::getTransactionHashCall {
            to: tx.to,
            value: tx.value,
            data: tx.data.clone(),
            operation: tx.operation.into(),
            safeTxGas: tx.safe_tx_gas,
            baseGas: tx.base_gas,
            gasPrice: tx.gas_price,
            gasToken: tx.gas_token,
            refundReceiver: tx.refund_receiver,
            _nonce: U256::from(tx.nonce),
        };
        let request = TransactionRequest::default()
            .to(safe)
            .input(call.abi_encode().into());
        let data = self
            .provider
            .call(request)
            .await
            .context("getTransactionHash eth_call failed")?;
        Ok(ISafe::getTransactionHashCall::abi_decode_returns(&data)?)
    }

    async fn aggregate(
        &self,
        calls: Vec<IMulticall3::Call3>,
    ) -> anyhow::Result<Vec<IMulticall3::Result>> {
        self.aggregate_at(calls, None).await
    }

    async fn aggregate_at(
        &self,
        calls: Vec<IMulticall3::Call3>,
        block: Option<u64>,
    ) -> anyhow::Result<Vec<IMulticall3::Result>> {
        let data = IMulticall3::aggregate3Call { calls }.abi_encode();
        let request = TransactionRequest::default()
            .to(MULTICALL3)
            .input(data.into());
        let block = block.map(BlockId::number).unwrap_or_else(BlockId::latest);
        let raw = self
            .provider
            .call(request)
            .block(block)
            .await
            .with_context(|| format!("Multicall3 eth_call failed on chain {}", self.chain_id))?;
        Ok(IMulticall3::aggregate3Call::abi_decode_returns(&raw)?)
    }
}

/// Splits a read into the apps that answered `owner()` and the others.
fn each(
    head: u64,
    mut states: HashMap<Address, AppState>,
    answered: HashMap<Address, bool>,
) -> AtHead {
    let silent: Vec<Address> = answered
        .into_iter()
        .filter(|(_, read)| !read)
        .map(|(app, _)| app)
        .collect();
    states.retain(|app, _| !silent.contains(app));
    AtHead::Read {
        head,
        states,
        silent,
    }
}

/// Multicall3's `getBlockNumber()` answer.
fn decode_number(result: &IMulticall3::Result) -> Option<u64> {
    result
        .success
        .then(|| IMulticall3::getBlockNumberCall::abi_decode_returns(&result.returnData).ok())
        .flatten()
        .and_then(|n| u64::try_from(n).ok())
}

/// What one app sub-call asks.
enum AppSlot {
    Owner(Address),
    Pending(Address),
    AnyDevice(Address),
    Registration(Address, Registration),
}

/// The Multicall3 sub-calls that read each app's ownership and `wanted` registrations.
fn app_calls(wanted: &[(Address, Vec<Registration>)]) -> (Vec<IMulticall3::Call3>, Vec<AppSlot>) {
    let mut calls = Vec::new();
    let mut slots = Vec::new();
    let mut push = |target: Address, data: Vec<u8>, slot: AppSlot| {
        calls.push(IMulticall3::Call3 {
            target,
            allowFailure: true,
            callData: data.into(),
        });
        slots.push(slot);
    };
    for (app, registrations) in wanted {
        push(
            *app,
            IDstackApp::ownerCall {}.abi_encode(),
            AppSlot::Owner(*app),
        );
        push(
            *app,
            IDstackApp::pendingOwnerCall {}.abi_encode(),
            AppSlot::Pending(*app),
        );
        push(
            *app,
            IDstackApp::allowAnyDeviceCall {}.abi_encode(),
            AppSlot::AnyDevice(*app),
        );
        for r in registrations {
            let data = match r {
                Registration::ComposeHash(h) => {
                    IDstackApp::allowedComposeHashesCall { composeHash: *h }.abi_encode()
                }
                Registration::Device(d) => {
                    IDstackApp::allowedDeviceIdsCall { deviceId: *d }.abi_encode()
                }
            };
            push(*app, data, AppSlot::Registration(*app, *r));
        }
    }
    (calls, slots)
}

/// The answers to [`app_calls`]: each app's state, and whether it answered
/// `owner()`. A failed sub-call counts as "not allowed", except
/// `pendingOwner()`, whose revert means one-step ownership.
fn decode_apps(
    slots: Vec<AppSlot>,
    results: &[IMulticall3::Result],
) -> (HashMap<Address, AppState>, HashMap<Address, bool>) {
    let mut states: HashMap<Address, AppState> = HashMap::new();
    let mut owners_read: HashMap<Address, bool> = HashMap::new();
    for (slot, result) in slots.into_iter().zip(results) {
        let ok = result.success;
        let data = &result.returnData;
        match slot {
            AppSlot::Owner(app) => {
                let owner = ok
                    .then(|| IDstackApp::ownerCall::abi_decode_returns(data).ok())
                    .flatten();
                owners_read.insert(app, owner.is_some());
                state_of(&mut states, app).owner = owner.unwrap_or_default();
            }
            AppSlot::Pending(app) => {
                state_of(&mut states, app).pending_owner = ok
                    .then(|| IDstackApp::pendingOwnerCall::abi_decode_returns(data).ok())
                    .flatten();
            }
            AppSlot::AnyDevice(app) => {
                state_of(&mut states, app).allow_any_device =
                    ok && IDstackApp::allowAnyDeviceCall::abi_decode_returns(data).unwrap_or(false);
            }
            AppSlot::Registration(app, r) => {
                let allowed = ok
                    && match r {
                        Registration::ComposeHash(_) => {
                            IDstackApp::allowedComposeHashesCall::abi_decode_returns(data)
                        }
                        Registration::Device(_) => {
                            IDstackApp::allowedDeviceIdsCall::abi_decode_returns(data)
                        }
                    }
                    .unwrap_or(false);
                state_of(&mut states, app).allowed.insert(r, allowed);
            }
        }
    }
    (states, owners_read)
}

/// Providers word range limits differently ("block range is too large",
/// "query returned more than 10000 results", "exceed maximum block range"...).
pub(crate) fn is_range_limit(message: &str) -> bool {
    let message = message.to_lowercase();
    [
        "range",
        "too many",
        "more than",
        "limit exceeded",
        "too large",
    ]
    .iter()
    .any(|m| message.contains(m))
}

fn state_of(states: &mut HashMap<Address, AppState>, app: Address) -> &mut AppState {
    states.entry(app).or_insert_with(|| AppState {
        owner: Address::ZERO,
        pending_owner: None,
        allow_any_device: false,
        allowed: HashMap::new(),
    })
}

/// Why a simulated call did not pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Simulation {
    #[error("the call reverts: {0}")]
    Reverted(String),
    #[error("the RPC failed: {0}")]
    Rpc(String),
}

/// One client per configured chain.
#[derive(Clone, Debug, Default)]
pub struct Chains {
    clients: HashMap<u64, ChainClient>,
    fallback: Option<Url>,
    /// Clients of chains reached through `fallback`, made on first use and
    /// kept, so that what they learn (chain id checked, block time) lasts.
    fallback_clients: Arc<Mutex<HashMap<u64, ChainClient>>>,
    ws_urls: Vec<(u64, Url)>,
}

impl Chains {
    /// `rpc_urls` per chain id, and `fallback` (`ETH_RPC_URL`) for any other chain.
    pub fn new(rpc_urls: &[(u64, Url)], fallback: Option<Url>) -> Self {
        Self::with_ws(rpc_urls, fallback, &[])
    }

    /// The same, with a WebSocket URL for the `newHeads` of some chains.
    pub fn with_ws(rpc_urls: &[(u64, Url)], fallback: Option<Url>, ws_urls: &[(u64, Url)]) -> Self {
        let ws = |id: u64| ws_url(ws_urls, id);
        let clients = rpc_urls
            .iter()
            .map(|(id, url)| (*id, ChainClient::with_ws(*id, url.clone(), ws(*id))))
            .collect();
        Chains {
            clients,
            fallback,
            fallback_clients: Arc::default(),
            ws_urls: ws_urls.to_vec(),
        }
    }

    /// The clients of the chains configured by id (not the fallback's), by id.
    pub fn configured(&self) -> Vec<ChainClient> {
        let mut clients: Vec<ChainClient> = self.clients.values().cloned().collect();
        clients.sort_by_key(|c| c.chain_id);
        clients
    }

    pub fn get(&self, chain_id: u64) -> Option<ChainClient> {
        if let Some(client) = self.clients.get(&chain_id) {
            return Some(client.clone());
        }
        let url = self.fallback.clone()?;
        let mut made = self.fallback_clients.lock().expect("chains mutex");
        Some(
            made.entry(chain_id)
                .or_insert_with(|| {
                    ChainClient::with_ws(chain_id, url, ws_url(&self.ws_urls, chain_id))
                })
                .clone(),
        )
    }
}

fn ws_url(ws_urls: &[(u64, Url)], chain_id: u64) -> Option<Url> {
    ws_urls
        .iter()
        .find(|(chain, _)| *chain == chain_id)
        .map(|(_, url)| url.clone())
}
