//! Everything the Safe flow needs, built once from the settings: the chains,
//! the Transaction Service per chain, the proposer key and the allowed Safes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alloy::signers::local::PrivateKeySigner;
use anyhow::Context;
use secrecy::ExposeSecret;

use crate::chain::{ChainClient, Chains, OwnerKind};
use crate::config::{AllowedSafes, Confirmations, RpcUrls, SafeSettings};
use crate::safe::{SafeService, TxServiceClient, TxServiceOptions};

#[derive(Clone)]
pub struct SafeFlow {
    pub chains: Chains,
    pub safes: AllowedSafes,
    pub batch_window: Duration,
    pub confirmations: Confirmations,
    pub proposal_timeout: Duration,
    pub max_reproposals: u32,
    pub log_range: u64,
    pub poll_interval: Duration,
    /// How long a stored proposal may keep being refused before its requests fail.
    pub propose_give_up: Duration,
    /// The lease of a Safe-flow job (see `owner`).
    pub job_lease: Duration,
    /// This process, as the holder of Safe-flow jobs.
    owner_id: uuid::Uuid,
    proposer: Option<PrivateKeySigner>,
    services: Services,
}

impl std::fmt::Debug for SafeFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafeFlow")
            .field("safes", &self.safes)
            .field("proposer", &self.proposer.as_ref().map(|p| p.address()))
            .finish_non_exhaustive()
    }
}

/// Transaction Service clients, made on first use per chain. Tests and the
/// sandbox may install another implementation for a chain.
#[derive(Clone, Default)]
struct Services {
    clients: Arc<Mutex<Clients>>,
    urls: RpcUrls,
    api_key: Option<secrecy::SecretString>,
    rate: f64,
}

#[derive(Default)]
struct Clients {
    by_chain: HashMap<u64, Arc<dyn SafeService>>,
    /// The first client made; the others derive from it, so that they share
    /// one request budget (the hosted gateway counts per API key, not per chain).
    first: Option<TxServiceClient>,
}

impl SafeFlow {
    pub fn from_settings(settings: &SafeSettings) -> anyhow::Result<Self> {
        let proposer = load_proposer(settings)?;
        if !settings.safes.is_empty() && proposer.is_none() {
            anyhow::bail!(
                "APPROVAL_BRIDGE_PROPOSER_KEY (or APPROVAL_BRIDGE_PROPOSER_KEY_FILE) is required when APPROVAL_BRIDGE_SAFES is set"
            );
        }
        Ok(SafeFlow {
            chains: Chains::with_ws(
                &settings.rpc_urls.0,
                settings.eth_rpc_url.clone(),
                &settings.ws_urls.0,
            ),
            safes: settings.safes.clone(),
            batch_window: Duration::from_secs(settings.batch_window_secs),
            confirmations: settings.confirmations.clone(),
            proposal_timeout: Duration::from_secs(settings.proposal_timeout_secs),
            max_reproposals: settings.max_reproposals,
            log_range: settings.log_range,
            poll_interval: Duration::from_secs(settings.chain_poll_secs),
            propose_give_up: Duration::from_secs(settings.propose_give_up_secs),
            job_lease: Duration::from_secs(settings.safe_flow_lease_secs),
            owner_id: uuid::Uuid::new_v4(),
            proposer,
            services: Services {
                clients: Arc::default(),
                urls: settings.safe_service_urls.clone(),
                api_key: settings.safe_api_key.clone(),
                rate: settings.safe_rate_limit,
            },
        })
    }

    /// This process's id in `job_leases`.
    pub fn owner_id(&self) -> uuid::Uuid {
        self.owner_id
    }

    pub fn proposer(&self) -> Option<&PrivateKeySigner> {
        self.proposer.as_ref()
    }

    /// The Transaction Service for `chain_id`.
    pub fn service(&self, chain_id: u64) -> anyhow::Result<Arc<dyn SafeService>> {
        let mut clients = self.services.clients.lock().expect("services mutex");
        if let Some(client) = clients.by_chain.get(&chain_id) {
            return Ok(client.clone());
        }
        let url = self.services.urls.get(chain_id);
        let hint = || format!("set APPROVAL_BRIDGE_SAFE_SERVICE_URLS for chain {chain_id}");
        let client = match &clients.first {
            Some(first) => first.for_chain(chain_id, url).with_context(hint)?,
            None => {
                let options = TxServiceOptions {
                    base_url: url.cloned(),
                    api_key: self.services.api_key.clone(),
                    requests_per_second: self.services.rate,
                    ..TxServiceOptions::for_chain(chain_id)
                };
                let client = TxServiceClient::new(&options).with_context(hint)?;
                clients.first = Some(client.clone());
                client
            }
        };
        let client: Arc<dyn SafeService> = Arc::new(client);
        clients.by_chain.insert(chain_id, client.clone());
        Ok(client)
    }

    pub fn chain(&self, chain_id: u64) -> Option<ChainClient> {
        self.chains.get(chain_id)
    }

    /// Start-up check: every allowed Safe is a Safe on its chain, and the
    /// proposer is one of its owners or a delegate the service knows.
    pub async fn check_proposer(&self) -> anyhow::Result<()> {
        let Some(proposer) = self.proposer() else {
            return Ok(());
        };
        let proposer = proposer.address();
        for &(chain_id, safe) in &self.safes.0 {
            let chain = self.chain(chain_id).with_context(|| {
                format!(
                    "no RPC URL for chain {chain_id} (set APPROVAL_BRIDGE_RPC_URLS or ETH_RPC_URL)"
                )
            })?;
            chain.check_chain_id().await?;
            let info = match chain.owner_kind(safe).await? {
                OwnerKind::Safe(info) => info,
                OwnerKind::Eoa => anyhow::bail!(
                    "APPROVAL_BRIDGE_SAFES: {safe} on chain {chain_id} is not a contract"
                ),
                OwnerKind::NotASafe { detail } => {
                    anyhow::bail!(
                        "APPROVAL_BRIDGE_SAFES: {safe} on chain {chain_id} is not a Safe: {detail}"
                    )
                }
            };
            if info.owners.contains(&proposer) {
                continue;
            }
            let delegates = self
                .service(chain_id)?
                .delegates(proposer)
                .await
                .with_context(|| {
                    format!(
                        "cannot ask the Safe Transaction Service whether {proposer} is a delegate"
                    )
                })?;
            let delegated = delegates
                .iter()
                .any(|d| info.owners.contains(&d.delegator) && d.safe.is_none_or(|s| s == safe));
            if !delegated {
                anyhow::bail!(
                    "the proposer {} is neither an owner of Safe {} on chain {chain_id} nor a delegate of one of its owners; \
                     register it with `approval-bridge delegate register --safe {}`",
                    proposer.to_checksum(None),
                    safe.to_checksum(None),
                    safe.to_checksum(None)
                );
            }
        }
        Ok(())
    }

    /// Replaces the Transaction Service of a chain (tests, the sandbox).
    pub fn set_service(&self, chain_id: u64, service: Arc<dyn SafeService>) {
        self.services
            .clients
            .lock()
            .expect("services mutex")
            .by_chain
            .insert(chain_id, service);
    }
}

fn load_proposer(settings: &SafeSettings) -> anyhow::Result<Option<PrivateKeySigner>> {
    let text = match (&settings.proposer_key, &settings.proposer_key_file) {
        (Some(key), _) => key.expose_secret().to_owned(),
        (None, Some(path)) => std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read APPROVAL_BRIDGE_PROPOSER_KEY_FILE {}",
                path.display()
            )
        })?,
        (None, None) => return Ok(None),
    };
    // Never echo the key, even a malformed one.
    let signer: PrivateKeySigner = text.trim().parse().map_err(|_| {
        anyhow::anyhow!("the proposer key is not a 32-byte hex secp256k1 private key")
    })?;
    Ok(Some(signer))
}
