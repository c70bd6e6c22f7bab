//! ENS reverse names for the page (EIP-137, EIP-181): an address's primary
//! name, shown only when its forward record points back at the address.
//!
//! Pages never wait on RPC: they read what is cached, and a missing or
//! stale entry is looked up in the background (at most [`MAX_LOOKUPS`] at
//! once, one per address), so the name appears on a later render. Answers,
//! "no name" too, last [`TTL`]; so does a chain's "no ENS registry here",
//! which costs one `eth_getCode` per chain per TTL and nothing per page.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, address, keccak256};
use alloy::providers::Provider;
use alloy::rpc::types::TransactionRequest;
use alloy::sol_types::SolCall;
use tokio::sync::Semaphore;

use super::ChainClient;

/// The ENS registry: the same address on every chain that has ENS.
pub const ENS_REGISTRY: Address = address!("00000000000C2E074eC69A0dFb2997BA6C7d2e1e");
/// How long an answer (a name, no name, no registry) is used.
pub const TTL: Duration = Duration::from_secs(15 * 60);
/// Background lookups running at once, across chains.
const MAX_LOOKUPS: usize = 4;
/// One lookup's bound: a slow RPC leaves the entry missing, tried again later.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a failed lookup waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// Cached names at most: past it, expired entries go, then all.
const MAX_ENTRIES: usize = 10_000;
/// Longer names are not shown (DNS names stop at 253).
const MAX_NAME_LEN: usize = 253;

alloy::sol! {
    interface IEnsRegistry {
        function resolver(bytes32 node) external view returns (address);
    }
    interface IEnsResolver {
        function name(bytes32 node) external view returns (string);
        function addr(bytes32 node) external view returns (address);
    }
}

/// EIP-137's namehash: labels hashed right to left into the root's zero node.
pub fn namehash(name: &str) -> B256 {
    let mut node = B256::ZERO;
    if name.is_empty() {
        return node;
    }
    for label in name.rsplit('.') {
        let mut both = [0u8; 64];
        both[..32].copy_from_slice(node.as_slice());
        both[32..].copy_from_slice(keccak256(label.as_bytes()).as_slice());
        node = keccak256(both);
    }
    node
}

/// The reverse node of an address (EIP-181): `<hex without 0x>.addr.reverse`.
pub fn reverse_node(address: Address) -> B256 {
    namehash(&format!("{}.addr.reverse", hex::encode(address)))
}

#[derive(Debug, Clone)]
struct Entry<T> {
    /// When the entry is to be read again.
    until: Instant,
    value: T,
}

impl<T> Entry<T> {
    fn new(value: T) -> Entry<T> {
        Entry {
            until: Instant::now() + TTL,
            value,
        }
    }

    fn fresh(&self) -> bool {
        Instant::now() < self.until
    }
}

#[derive(Debug, Default)]
struct Cache {
    names: HashMap<(u64, Address), Entry<Option<String>>>,
    /// Whether the chain has code at [`ENS_REGISTRY`].
    registries: HashMap<u64, Entry<bool>>,
    running: HashSet<(u64, Address)>,
}

impl Cache {
    fn insert(&mut self, key: (u64, Address), entry: Entry<Option<String>>) {
        if self.names.len() >= MAX_ENTRIES {
            self.names.retain(|_, e| e.fresh());
            if self.names.len() >= MAX_ENTRIES {
                self.names.clear();
            }
        }
        self.names.insert(key, entry);
    }
}

/// The cached ENS names of every chain, shared by all pages.
#[derive(Debug, Clone)]
pub struct EnsNames {
    cache: Arc<Mutex<Cache>>,
    lookups: Arc<Semaphore>,
    /// One registry probe at a time, so the page's first lookups probe once.
    probing: Arc<tokio::sync::Mutex<()>>,
}

impl Default for EnsNames {
    fn default() -> Self {
        EnsNames {
            cache: Arc::default(),
            lookups: Arc::new(Semaphore::new(MAX_LOOKUPS)),
            probing: Arc::default(),
        }
    }
}

impl EnsNames {
    /// The verified name of `address` on `chain` if cached; a missing or
    /// stale entry starts a background lookup (the stale name is still
    /// shown meanwhile). Needs a Tokio runtime.
    pub fn name(&self, chain: &ChainClient, address: Address) -> Option<String> {
        let key = (chain.chain_id, address);
        let mut cache = self.cache.lock().expect("ens cache");
        if cache
            .registries
            .get(&key.0)
            .is_some_and(|e| e.fresh() && !e.value)
        {
            return None;
        }
        let entry = cache.names.get(&key).cloned();
        if !entry.as_ref().is_some_and(Entry::fresh) && cache.running.insert(key) {
            let (names, chain) = (self.clone(), chain.clone());
            tokio::spawn(async move { names.look_up(&chain, address).await });
        }
        entry.and_then(|e| e.value)
    }

    /// The background lookup [`EnsNames::name`] starts.
    async fn look_up(&self, chain: &ChainClient, address: Address) {
        let answer = {
            // The semaphore is never closed.
            let _permit = self.lookups.acquire().await;
            tokio::time::timeout(LOOKUP_TIMEOUT, self.lookup(chain, address)).await
        };
        let key = (chain.chain_id, address);
        let mut cache = self.cache.lock().expect("ens cache");
        cache.running.remove(&key);
        let failure = match answer {
            Ok(Ok(_)) => return,
            Ok(Err(err)) => format!("{err:#}"),
            Err(_) => "timed out".to_owned(),
        };
        tracing::debug!(%address, chain = key.0, "ENS lookup failed: {failure}");
        // Pages keep what they had and ask again after a while, so a chain
        // that is down is not asked on every page.
        let value = cache.names.get(&key).and_then(|e| e.value.clone());
        let until = Instant::now() + RETRY_AFTER;
        cache.insert(key, Entry { until, value });
    }

    /// Reads the verified name of `address` from the chain now (or "no
    /// ENS here" from the cache) and caches the answer.
    pub async fn lookup(
        &self,
        chain: &ChainClient,
        address: Address,
    ) -> anyhow::Result<Option<String>> {
        let name = self.resolve(chain, address).await?;
        self.cache
            .lock()
            .expect("ens cache")
            .insert((chain.chain_id, address), Entry::new(name.clone()));
        Ok(name)
    }

    /// Whether the chain has ENS, probed once per [`TTL`].
    async fn has_registry(&self, chain: &ChainClient) -> anyhow::Result<bool> {
        let _probing = self.probing.lock().await;
        let known = self
            .cache
            .lock()
            .expect("ens cache")
            .registries
            .get(&chain.chain_id)
            .filter(|e| e.fresh())
            .map(|e| e.value);
        if let Some(known) = known {
            return Ok(known);
        }
        let code = chain.provider.get_code_at(ENS_REGISTRY).await?;
        let has = !code.is_empty();
        self.cache
            .lock()
            .expect("ens cache")
            .registries
            .insert(chain.chain_id, Entry::new(has));
        Ok(has)
    }

    /// The address's reverse name if its forward record points back at it.
    async fn resolve(
        &self,
        chain: &ChainClient,
        address: Address,
    ) -> anyhow::Result<Option<String>> {
        if !self.has_registry(chain).await? {
            return Ok(None);
        }
        let reverse = reverse_node(address);
        let Some(resolver) = resolver_of(chain, reverse).await? else {
            return Ok(None);
        };
        let Some(name) = call::<IEnsResolver::nameCall>(
            chain,
            resolver,
            IEnsResolver::nameCall { node: reverse },
        )
        .await?
        else {
            return Ok(None);
        };
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
            return Ok(None);
        }
        let node = namehash(&name);
        let Some(forward) = resolver_of(chain, node).await? else {
            return Ok(None);
        };
        let points_to =
            call::<IEnsResolver::addrCall>(chain, forward, IEnsResolver::addrCall { node }).await?;
        Ok((points_to == Some(address)).then_some(name))
    }
}

async fn resolver_of(chain: &ChainClient, node: B256) -> anyhow::Result<Option<Address>> {
    let resolver = call::<IEnsRegistry::resolverCall>(
        chain,
        ENS_REGISTRY,
        IEnsRegistry::resolverCall { node },
    )
    .await?;
    Ok(resolver.filter(|r| !r.is_zero()))
}

/// An `eth_call`; a revert or an answer of another shape is "no answer".
async fn call<C: SolCall>(
    chain: &ChainClient,
    to: Address,
    call: C,
) -> anyhow::Result<Option<C::Return>> {
    let request = TransactionRequest::default()
        .to(to)
        .input(call.abi_encode().into());
    match chain.provider.call(request).await {
        Ok(data) => Ok(C::abi_decode_returns(&data).ok()),
        Err(err) if err.as_error_resp().is_some() => Ok(None),
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use alloy::primitives::b256;

    use super::*;

    #[test]
    fn namehash_follows_eip_137() {
        assert_eq!(namehash(""), B256::ZERO);
        assert_eq!(
            namehash("eth"),
            b256!("93cdeb708b7545dc668eb9280176169d1c33cfd8ed6f04690a0bcc88a93fc4ae")
        );
        assert_eq!(
            namehash("foo.eth"),
            b256!("de9b09fd7c5f901e23a3f19fecc54828e9c848539801e86591bd9801b019f84f")
        );
        // The reverse node of an address hashes its lower-case hex.
        let address = address!("314159265dD8dbb310642f98f50C066173C1259b");
        assert_eq!(
            reverse_node(address),
            namehash("314159265dd8dbb310642f98f50c066173c1259b.addr.reverse")
        );
    }
}
