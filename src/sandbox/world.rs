//! `approval-bridge sandbox`: the whole flow on one machine. It starts
//! anvil with the Safe contracts, a 2-of-3 Safe, three DstackApps, the Phala
//! Cloud and Safe Transaction Service simulators, and the bridge itself
//! (unless `--world-only`: then `serve` runs apart, with [`Sandbox::env`]).

use std::sync::Arc;
use std::time::Duration;

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::Provider;
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;
use anyhow::Context;
use reqwest::Url;
use tokio_util::sync::CancellationToken;

use super::chain::IDstackApp;
use super::chain::LocalChain;
use super::controls::{self, Controls};
use super::database::{DEFAULT_DATABASE_URL, SandboxDatabase};
use super::phala_sim::{PhalaSim, PhalaWorld, SimCvm, SimKms, kms_root_key, standard};
use super::safe_service::SafeServiceSim;
use super::serve_env::{SANDBOX_URL, ServeEnv};
use crate::config::parse_named_secrets;
use crate::safe::{Call, DelegateRegistration, TxServiceClient, TxServiceOptions};
use crate::startup::Application;

/// The CVM owned by an account, not a Safe: the bridge refuses it clearly.
pub const EOA_CVM: &str = "eoa-app";
/// Anvil accounts: 0..2 own the Safe, 3 executes, 4 and 5 deploy apps, 6 is
/// the team page's operator, 7 and 8 own the Safe's fourth owner (itself a
/// Safe), 9 proposes.
const OWNERS: [usize; 3] = [0, 1, 2];
/// The owners of the Safe-owner, both of whom must sign for it.
const SAFE_OWNER_OWNERS: [usize; 2] = [7, 8];
const SAFE_OWNER_THRESHOLD: u64 = 2;
/// The app's Safe needs two of its four owners.
const THRESHOLD: u64 = 2;
const EXECUTOR: usize = 3;
const DEPLOYER: usize = 4;
const EOA_OWNER: usize = 5;
const OPERATOR: usize = 6;
/// What the page calls the owners (in order) and the operator.
pub const OWNER_NAMES: [&str; 3] = ["Alice", "Bob", "Carol"];
pub const OPERATOR_NAME: &str = "Olivia";
/// The Safe-owner's ENS name, which forward-verifies.
pub const ENS_VERIFIED: &str = "treasury.eth";
/// The Safe's reverse ENS name, whose forward record is another account's.
pub const ENS_UNVERIFIED: &str = "not-the-safe.eth";
const PROPOSER: usize = 9;

#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// The bridge's port; 0 picks a free one.
    pub port: u16,
    /// Seconds between blocks on anvil.
    pub block_time: u64,
    pub api_token: String,
    pub webhook_secret: String,
    /// The sandbox's own database, emptied at start; its name must end in
    /// `_sandbox`. `None`: [`DEFAULT_DATABASE_URL`], or with `world_only` no
    /// database at all.
    pub database_url: Option<String>,
    pub batch_window_secs: u64,
    pub confirmations: u64,
    /// How long a new replica stays `starting`.
    pub boot_delay: Duration,
    /// Start the world without the bridge: run `serve` apart with [`Sandbox::env`].
    pub world_only: bool,
    /// Where the bridge listens; `None` picks a free port.
    pub bridge_port: Option<u16>,
    /// Nodes with free slots, `prod-1` to `prod-N` (at least 2: the
    /// sources run on prod-1 and prod-2); `prod-full` comes after them.
    pub nodes: u32,
    /// Free CVM slots on each of those nodes.
    pub slots: u32,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            port: 8080,
            block_time: 1,
            api_token: "sandbox-token".into(),
            webhook_secret: "sandbox-secret".into(),
            database_url: None,
            batch_window_secs: 10,
            confirmations: 2,
            boot_delay: Duration::from_secs(3),
            world_only: false,
            bridge_port: None,
            nodes: standard::NODES,
            slots: standard::SLOTS,
        }
    }
}

/// The DstackApps of the world.
#[derive(Debug, Clone, Copy)]
pub struct SandboxApps {
    /// One-step ownership, owned by the Safe (CVM `web-prod`).
    pub web: Address,
    /// Two-step ownership, accepted by the Safe (CVMs `api-prod`, `api-canary`).
    pub api: Address,
    /// Owned by an account (CVM `eoa-app`).
    pub eoa: Address,
}

/// The app's Safe's fourth owner: a wallet that is itself a Safe, as is
/// common for a team's owner. It signs in with contract signatures
/// (EIP-1271 through its CompatibilityFallbackHandler).
#[derive(Debug, Clone)]
pub struct SafeOwner {
    pub address: Address,
    pub threshold: u64,
    /// Its owners' keys (anvil accounts 7 and 8).
    pub keys: Vec<PrivateKeySigner>,
}

impl SafeOwner {
    /// Its signature of `hash`, as its `isValidSignature(bytes32,bytes)`
    /// accepts it.
    pub fn sign_hash(&self, chain_id: u64, hash: B256) -> anyhow::Result<Bytes> {
        super::chain::safe_message_signature(self.address, chain_id, hash, &self.keys)
    }
}

/// A running sandbox. Dropping it stops anvil; [`Sandbox::stop`] stops the
/// bridge and the sandbox's own server.
pub struct Sandbox {
    /// The front door: the controls, the world view, and the bridge behind them.
    pub url: Url,
    /// The bridge itself (with `world_only`, where `serve` is told to listen).
    pub bridge_url: Url,
    /// The environment of `serve` against this world (with `DATABASE_URL`
    /// only when the sandbox has a database).
    pub env: ServeEnv,
    pub chain: Arc<LocalChain>,
    pub safe: Address,
    /// The Safe's owners in its own order: accounts 0..2, then the Safe-owner.
    pub owners: Vec<Address>,
    pub safe_owner: SafeOwner,
    pub proposer: Address,
    pub apps: SandboxApps,
    pub phala: PhalaSim,
    pub safe_service: SafeServiceSim,
    pub safe_service_url: Url,
    pub options: SandboxOptions,
    /// Stops the front door and, with it, the bridge.
    shutdown: CancellationToken,
    front: tokio::task::JoinHandle<anyhow::Result<()>>,
    bridge: Option<Bridge>,
}

/// The bridge that the full sandbox runs inside its own process.
struct Bridge {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Sandbox {
    pub async fn start(options: SandboxOptions) -> anyhow::Result<Sandbox> {
        anyhow::ensure!(
            options.nodes >= 2,
            "the sandbox needs at least 2 nodes: its sources run on prod-1 and prod-2"
        );
        // Refuse early, before anything is started or dropped, with what to do.
        let database = match (&options.database_url, options.world_only) {
            (Some(url), _) => Some(SandboxDatabase::parse(url)?),
            (None, false) => Some(SandboxDatabase::parse(DEFAULT_DATABASE_URL)?),
            (None, true) => None,
        };
        let front = std::net::TcpListener::bind(("127.0.0.1", options.port)).map_err(|_| {
            anyhow::anyhow!(
                "port {} is in use: stop what listens there, or pass --port",
                options.port
            )
        })?;
        let bridge_port = match options.bridge_port {
            Some(port) => {
                drop(
                    std::net::TcpListener::bind(("127.0.0.1", port)).map_err(|_| {
                        anyhow::anyhow!(
                            "port {port} is in use: stop what listens there, or pass --bridge-port"
                        )
                    })?,
                );
                port
            }
            // Taken from the OS and released: `serve` binds it again.
            None => std::net::TcpListener::bind(("127.0.0.1", 0))?
                .local_addr()?
                .port(),
        };
        if let Some(database) = &database {
            database.reset().await?;
        }

        super::ensure_npm_packages()?;
        let chain = Arc::new(LocalChain::start(Some(options.block_time)).await?);
        let safe_owner_keys: Vec<PrivateKeySigner> =
            SAFE_OWNER_OWNERS.iter().map(|i| chain.signer(*i)).collect();
        let safe_owner_owners: Vec<Address> = safe_owner_keys
            .iter()
            .map(PrivateKeySigner::address)
            .collect();
        let safe_owner = SafeOwner {
            address: chain
                .create_safe(&safe_owner_owners, SAFE_OWNER_THRESHOLD, 2)
                .await
                .context("creating the Safe-owner")?,
            threshold: SAFE_OWNER_THRESHOLD,
            keys: safe_owner_keys,
        };
        let mut owners: Vec<Address> = OWNERS.iter().map(|i| chain.address(*i)).collect();
        owners.push(safe_owner.address);
        let safe = chain.create_safe(&owners, THRESHOLD, 1).await?;
        // ENS names, as on mainnet: the Safe-owner's verifies; the Safe's
        // points elsewhere, so the page must not show it; Bob's loses to
        // his configured name.
        chain
            .install_ens(&[
                (safe_owner.address, ENS_VERIFIED, safe_owner.address),
                (safe, ENS_UNVERIFIED, chain.address(EXECUTOR)),
                (
                    chain.address(OWNERS[1]),
                    "bob.eth",
                    chain.address(OWNERS[1]),
                ),
            ])
            .await
            .context("installing ENS")?;
        let owner_keys: Vec<PrivateKeySigner> = OWNERS.iter().map(|i| chain.signer(*i)).collect();
        let executor = chain.signer(EXECUTOR);

        let web = chain
            .deploy_dstack_app(chain.address(DEPLOYER), false)
            .await?;
        chain
            .transfer_ownership(web, &chain.signer(DEPLOYER), safe)
            .await?;
        let api = chain
            .deploy_dstack_app(chain.address(DEPLOYER), true)
            .await?;
        chain
            .transfer_app_to_safe(
                api,
                &chain.signer(DEPLOYER),
                safe,
                &owner_keys[..2],
                &executor,
            )
            .await?;
        let eoa = chain
            .deploy_dstack_app(chain.address(EOA_OWNER), false)
            .await?;
        let apps = SandboxApps { web, api, eoa };

        let mut world = PhalaWorld::with_nodes(chain.chain_id(), options.nodes, options.slots)
            .with_standard_cvms(web, api)
            .with_cvm(SimCvm::onchain(EOA_CVM, eoa, 1));
        world.boot_delay = chrono::Duration::from_std(options.boot_delay)?;
        // The KMS whose root key signs the simulator's env keys, as on Base.
        world.kms_contract = chain
            .deploy_dstack_kms(chain.address(DEPLOYER), &kms_root_key())
            .await?;
        let world_kms = world.kms_contract;
        register_running_cvms(&chain, &world, safe, &owner_keys[..2], &executor).await?;
        let (phala_url, phala) = PhalaSim::spawn(world, chain.rpc_url()).await?;
        let (safe_service_url, safe_service) = SafeServiceSim::spawn(chain.rpc_url()).await?;

        // A dedicated proposer key, registered by owner 0 as its delegate:
        // its proposals carry no owner's vote, so the owners sign twice.
        let proposer = chain.signer(PROPOSER);
        let unix_now = chrono::Utc::now().timestamp() as u64;
        let registration = DelegateRegistration::sign(
            &owner_keys[0],
            proposer.address(),
            Some(safe),
            "sandbox proposer",
            chain.chain_id(),
            unix_now,
        )?;
        let service = TxServiceClient::new(&TxServiceOptions {
            base_url: Some(safe_service_url.clone()),
            ..TxServiceOptions::for_chain(chain.chain_id())
        })?;
        service
            .register_delegate(&registration)
            .await
            .context("registering the sandbox proposer as a delegate")?;

        // What `serve` needs to run against this world; the full sandbox runs
        // its own bridge from exactly these variables.
        parse_named_secrets(&format!("sandbox={}", options.api_token))
            .map_err(|err| anyhow::anyhow!("--api-token: {err}"))?;
        parse_named_secrets(&format!("ci={}", options.webhook_secret))
            .map_err(|err| anyhow::anyhow!("--webhook-secret: {err}"))?;
        let chain_id = chain.chain_id();
        let bridge_url: Url = format!("http://127.0.0.1:{bridge_port}/").parse()?;
        let front = tokio::net::TcpListener::from_std({
            front.set_nonblocking(true)?;
            front
        })?;
        let url: Url = format!("http://127.0.0.1:{}/", front.local_addr()?.port()).parse()?;
        let mut env = ServeEnv::default();
        if let Some(database) = &database {
            env.set("DATABASE_URL", database.url());
        }
        env.set("APPROVAL_BRIDGE_LISTEN", format!("127.0.0.1:{bridge_port}"));
        env.set("APPROVAL_BRIDGE_PHALA_API_URL", &phala_url);
        env.set("APPROVAL_BRIDGE_PHALA_API_KEY", phala.api_key());
        env.set(
            "APPROVAL_BRIDGE_API_TOKENS",
            format!("sandbox={}", options.api_token),
        );
        env.set(
            "APPROVAL_BRIDGE_WEBHOOK_SECRETS",
            format!("ci={}", options.webhook_secret),
        );
        // The sandbox's token and CI client may do everything.
        env.set("APPROVAL_BRIDGE_SCOPES", "api:sandbox=*,ci:ci=*");
        env.set("APPROVAL_BRIDGE_SERVER_SECRET", {
            use rand::RngCore;
            let mut secret = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut secret);
            hex::encode(secret)
        });
        env.set("APPROVAL_BRIDGE_WORKERS", 2);
        // The browser, the controls and the scripts all come from 127.0.0.1.
        env.set("APPROVAL_BRIDGE_CLIENT_RATE_PER_MINUTE", 1200);
        env.set("APPROVAL_BRIDGE_POLL_INTERVAL_SECS", 1);
        env.set(
            "APPROVAL_BRIDGE_RPC_URLS",
            format!("{chain_id}={}", chain.rpc_url()),
        );
        env.set(
            "APPROVAL_BRIDGE_WS_URLS",
            format!("{chain_id}={}", chain.ws_url()),
        );
        env.set(
            "APPROVAL_BRIDGE_SAFES",
            format!("{chain_id}:{}", safe.to_checksum(None)),
        );
        env.set(
            "APPROVAL_BRIDGE_PROPOSER_KEY",
            format!("0x{}", hex::encode(chain.private_key(PROPOSER))),
        );
        env.set(
            "APPROVAL_BRIDGE_SAFE_SERVICE_URLS",
            format!("{chain_id}={safe_service_url}"),
        );
        env.set(
            "APPROVAL_BRIDGE_BATCH_WINDOW_SECS",
            options.batch_window_secs,
        );
        env.set(
            "APPROVAL_BRIDGE_CONFIRMATIONS",
            format!("{chain_id}={}", options.confirmations),
        );
        env.set("APPROVAL_BRIDGE_CHAIN_POLL_SECS", 1);
        env.set(
            "APPROVAL_BRIDGE_KMS_CONTRACTS",
            format!("{chain_id}={}", world_kms.to_checksum(None)),
        );
        // Room for benchmarks of many replicas.
        env.set("APPROVAL_BRIDGE_QUOTA_PER_HOUR", 10_000);
        env.set("APPROVAL_BRIDGE_CLOUD_QUOTA_PER_HOUR", 1_000);
        // The team page: signed in at the front door, with one operator;
        // the Safe's owners read.
        env.set(
            "APPROVAL_BRIDGE_PUBLIC_URL",
            url.as_str().trim_end_matches('/'),
        );
        env.set(
            "APPROVAL_BRIDGE_OPERATORS",
            chain.address(OPERATOR).to_checksum(None),
        );
        // Names for the page, as a team would configure them.
        env.set(
            "APPROVAL_BRIDGE_NAMES",
            OWNERS
                .iter()
                .zip(OWNER_NAMES)
                .map(|(i, name)| (*i, name))
                .chain([(OPERATOR, OPERATOR_NAME)])
                .map(|(i, name)| format!("{}={name}", chain.address(i).to_checksum(None)))
                .collect::<Vec<_>>()
                .join(","),
        );
        env.set(SANDBOX_URL, &url);

        let bridge = if options.world_only {
            None
        } else {
            let app = Application::build(env.settings()?).await?;
            let shutdown = app.shutdown_token();
            let task = tokio::spawn(app.run_until_stopped());
            Some(Bridge { shutdown, task })
        };
        let controls = Controls {
            chain: chain.clone(),
            safe,
            owner_keys,
            safe_owner: safe_owner.clone(),
            threshold: THRESHOLD,
            executor,
            safe_service: safe_service.clone(),
            safe_service_url: safe_service_url.clone(),
            phala: phala.clone(),
            apps,
            bridge_url: bridge_url.clone(),
            operator_key: chain.signer(OPERATOR),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
        };
        let shutdown = CancellationToken::new();
        let front = tokio::spawn({
            let stopped = shutdown.clone().cancelled_owned();
            async move {
                axum::serve(front, controls::router(controls))
                    .with_graceful_shutdown(stopped)
                    .await
                    .context("the sandbox's server failed")
            }
        });
        Ok(Sandbox {
            url,
            bridge_url,
            env,
            chain,
            safe,
            owners,
            safe_owner,
            proposer: proposer.address(),
            apps,
            phala,
            safe_service,
            safe_service_url,
            options,
            shutdown,
            front,
            bridge,
        })
    }

    /// What a newcomer needs to start: URLs, credentials, the Safe.
    pub fn banner(&self) -> String {
        let owners: Vec<String> = self.owners.iter().map(|o| o.to_checksum(None)).collect();
        let bridge = if self.options.world_only {
            format!(
                "\n  bridge          not started (--world-only): run `approval-bridge serve` with the\
                 \n                  printed environment; it listens on {} and this address forwards to it",
                self.bridge_url
            )
        } else {
            String::new()
        };
        format!(
            "approval-bridge sandbox is running\n\
             \n  team page       {url}replicas   (sign in at {url}sandbox: dev login)\
             \n  sandbox page    {url}sandbox\
             \n  JSON API        {url}api/v1/replicas   (Authorization: Bearer {token})\
             \n  CI webhook      {url}webhooks/ci       (HMAC secret: {secret})\
             \n  world           {url}sandbox/world{bridge}\
             \n  chain           {rpc} (chain id {chain_id}, a block every {block}s)\
             \n  Phala sim       {phala}\
             \n  Safe service    {service}\
             \n  Safe            {safe} ({threshold} of {count})\
             \n  owners          {owners}\
             \n                  (the last is a Safe of {inner}, {inner_threshold} of {inner_count};\
             \n                  the dev login signs in as it with a contract signature)\
             \n\nPress Ctrl-C to stop everything.",
            url = self.url,
            token = self.options.api_token,
            secret = self.options.webhook_secret,
            rpc = self.chain.rpc_url(),
            chain_id = self.chain.chain_id(),
            block = self.options.block_time,
            phala = self.phala.base_url(),
            service = self.safe_service_url,
            safe = self.safe.to_checksum(None),
            threshold = THRESHOLD,
            count = self.owners.len(),
            owners = owners.join(", "),
            inner = self
                .safe_owner
                .keys
                .iter()
                .map(|k| k.address().to_checksum(None))
                .collect::<Vec<_>>()
                .join(", "),
            inner_threshold = self.safe_owner.threshold,
            inner_count = self.safe_owner.keys.len(),
        )
    }

    /// Stops the bridge and the sandbox's server; anvil stops when the
    /// sandbox is dropped.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let bridge = match self.bridge {
            Some(bridge) => {
                bridge.shutdown.cancel();
                bridge.task.await.context("the bridge task panicked")?
            }
            None => Ok(()),
        };
        self.front
            .await
            .context("the sandbox's server panicked")??;
        bridge
    }

    /// Runs until `stop` (see [`crate::startup::listen_for_stop`]) or a shutdown from the
    /// controls, then stops everything it started.
    pub async fn run_until(self, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::select! {
            _ = stop => {}
            _ = self.shutdown.cancelled() => {}
        }
        self.stop().await
    }
}

/// A CVM on on-chain KMS boots only where its app allows its compose hash
/// and its node's device, so every running source's are allowed, as they
/// would be on Phala Cloud: a replica of it on a new node then needs only
/// `addDevice`. The canary's hash was removed after it booted (a revoked
/// revision), so a replica of the canary needs `addComposeHash` again.
async fn register_running_cvms(
    chain: &LocalChain,
    world: &PhalaWorld,
    safe: Address,
    owner_keys: &[PrivateKeySigner],
    executor: &PrivateKeySigner,
) -> anyhow::Result<()> {
    let mut by_owner: Vec<(Address, Vec<Call>)> = Vec::new();
    for cvm in world.cvms.iter().filter(|c| c.kms != SimKms::Cloud) {
        let device = world
            .nodes
            .iter()
            .find(|n| n.id == cvm.node_id)
            .context("a CVM of the world runs on a node of the world")?
            .device_id;
        let calls = [
            Call::add_compose_hash(cvm.app_id, cvm.compose_hash()),
            Call::add_device(cvm.app_id, device),
        ];
        let owner = IDstackApp::new(cvm.app_id, chain.provider())
            .owner()
            .call()
            .await
            .with_context(|| format!("owner() of the app of {}", cvm.name))?;
        match by_owner.iter_mut().find(|(o, _)| *o == owner) {
            Some((_, all)) => all.extend(calls),
            None => by_owner.push((owner, calls.to_vec())),
        }
    }
    for (owner, all) in by_owner {
        let mut calls: Vec<Call> = Vec::new();
        for call in all {
            if !calls.contains(&call) {
                calls.push(call);
            }
        }
        if owner == safe {
            chain
                .exec_calls(safe, &calls, owner_keys, executor)
                .await
                .context("allowing the running CVMs on the Safe's apps")?;
        } else {
            for call in calls {
                let request = TransactionRequest::default()
                    .with_from(owner)
                    .with_to(call.to)
                    .with_input(call.data);
                chain
                    .provider()
                    .send_transaction(request)
                    .await?
                    .get_receipt()
                    .await
                    .with_context(|| format!("allowing a running CVM on an app of {owner}"))?;
            }
        }
    }
    let canary = world
        .cvm(standard::API_CANARY)
        .context("the standard world has the canary")?;
    let revoke = Call {
        to: canary.app_id,
        value: U256::ZERO,
        data: IDstackApp::removeComposeHashCall {
            composeHash: canary.compose_hash(),
        }
        .abi_encode()
        .into(),
    };
    chain
        .exec_calls(safe, &[revoke], owner_keys, executor)
        .await
        .context("removing the canary's compose hash")?;
    Ok(())
}
