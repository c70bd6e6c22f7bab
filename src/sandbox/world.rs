//! `approval-bridge sandbox`: the whole flow on one machine. It starts
//! anvil with the Safe contracts, a 2-of-3 Safe, three DstackApps, the Phala
//! Cloud and Safe Transaction Service simulators, and the bridge itself.

use std::sync::Arc;
use std::time::Duration;

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, U256};
use alloy::providers::Provider;
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;
use anyhow::Context;
use reqwest::Url;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use super::chain::IDstackApp;
use super::chain::LocalChain;
use super::controls::{self, Controls};
use super::phala_sim::{PhalaSim, PhalaWorld, SimCvm, SimKms, standard};
use super::safe_service::SafeServiceSim;
use crate::config::{
    AllowedSafes, Confirmations, DatabaseSettings, LogFormat, PhalaSettings, RpcUrls, SafeSettings,
    Settings, WorkerSettings, parse_named_secrets,
};
use crate::safe::{Call, DelegateRegistration, TxServiceClient, TxServiceOptions};
use crate::startup::Application;

/// The local Postgres of this machine kind, with the sandbox's own database.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/approval_bridge_sandbox";
/// The CVM owned by an account, not a Safe: the bridge refuses it clearly.
pub const EOA_CVM: &str = "eoa-app";
/// Anvil accounts: 0..2 own the Safe, 3 executes, 4 and 5 deploy apps, 9 proposes.
const OWNERS: [usize; 3] = [0, 1, 2];
const EXECUTOR: usize = 3;
const DEPLOYER: usize = 4;
const EOA_OWNER: usize = 5;
const PROPOSER: usize = 9;

#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// The bridge's port; 0 picks a free one.
    pub port: u16,
    /// Seconds between blocks on anvil.
    pub block_time: u64,
    pub api_token: String,
    pub webhook_secret: String,
    /// `None`: [`DEFAULT_DATABASE_URL`]. The database is emptied at start.
    pub database_url: Option<String>,
    pub batch_window_secs: u64,
    pub confirmations: u64,
    /// How long a new replica stays `starting`.
    pub boot_delay: Duration,
    /// Nodes with free slots, `prod-1` to `prod-N` (at least 2: the
    /// sources run on prod-1 and prod-2); `prod-full` comes after them.
    pub nodes: u32,
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
            nodes: standard::NODES,
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

/// A running sandbox. Dropping it stops anvil; [`Sandbox::stop`] stops the bridge.
pub struct Sandbox {
    pub url: Url,
    pub chain: Arc<LocalChain>,
    pub safe: Address,
    pub owners: Vec<Address>,
    pub proposer: Address,
    pub apps: SandboxApps,
    pub phala: PhalaSim,
    pub safe_service: SafeServiceSim,
    pub safe_service_url: Url,
    pub options: SandboxOptions,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Sandbox {
    pub async fn start(options: SandboxOptions) -> anyhow::Result<Sandbox> {
        anyhow::ensure!(
            options.nodes >= 2,
            "the sandbox needs at least 2 nodes: its sources run on prod-1 and prod-2"
        );
        // Refuse early, before anything is started, with what to do.
        let listener = std::net::TcpListener::bind(("127.0.0.1", options.port)).map_err(|_| {
            anyhow::anyhow!(
                "port {} is in use: stop what listens there, or pass --port",
                options.port
            )
        })?;
        drop(listener);
        let database_url = options
            .database_url
            .clone()
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
        reset_database(&database_url).await?;

        super::ensure_npm_packages()?;
        let chain = Arc::new(LocalChain::start(Some(options.block_time)).await?);
        let owners: Vec<Address> = OWNERS.iter().map(|i| chain.address(*i)).collect();
        let safe = chain.create_safe(&owners, 2, 1).await?;
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

        let mut world = PhalaWorld::with_nodes(chain.chain_id(), options.nodes)
            .with_standard_cvms(web, api)
            .with_cvm(SimCvm::onchain(EOA_CVM, eoa, 1));
        world.boot_delay = chrono::Duration::from_std(options.boot_delay)?;
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

        let settings = Settings {
            database: DatabaseSettings {
                database_url: database_url.clone().into(),
            },
            listen: ([127, 0, 0, 1], options.port).into(),
            phala: PhalaSettings {
                phala_api_url: phala_url.clone(),
                phala_api_key: phala.api_key().to_owned().into(),
                phala_api_version: crate::config::DEFAULT_PHALA_API_VERSION.into(),
                phala_timeout_secs: 30,
            },
            api_tokens: parse_named_secrets(&format!("sandbox={}", options.api_token))
                .map_err(|err| anyhow::anyhow!("--api-token: {err}"))?,
            webhook_secrets: parse_named_secrets(&format!("ci={}", options.webhook_secret))
                .map_err(|err| anyhow::anyhow!("--webhook-secret: {err}"))?,
            worker: WorkerSettings {
                workers: 2,
                poll_interval_secs: 1,
                ..WorkerSettings::default()
            },
            safe: SafeSettings {
                rpc_urls: RpcUrls(vec![(chain.chain_id(), chain.rpc_url())]),
                safes: AllowedSafes(vec![(chain.chain_id(), safe)]),
                proposer_key: Some(
                    format!("0x{}", hex::encode(chain.private_key(PROPOSER))).into(),
                ),
                safe_service_urls: RpcUrls(vec![(chain.chain_id(), safe_service_url.clone())]),
                batch_window_secs: options.batch_window_secs,
                confirmations: Confirmations(vec![(chain.chain_id(), options.confirmations)]),
                chain_poll_secs: 1,
                ..SafeSettings::default()
            },
            log_format: LogFormat::Text,
        };
        let app = Application::build(settings).await?;
        let url: Url = format!("http://127.0.0.1:{}", app.port()).parse()?;
        let controls = Controls {
            chain: chain.clone(),
            safe,
            owner_keys,
            executor,
            safe_service: safe_service.clone(),
            safe_service_url: safe_service_url.clone(),
            phala: phala.clone(),
            apps,
            store: app.store(),
            api_token: options.api_token.clone(),
            http: reqwest::Client::new(),
        };
        let shutdown = app.shutdown_token();
        let server = tokio::spawn(
            app.with_routes(controls::router(controls))
                .run_until_stopped(),
        );
        Ok(Sandbox {
            url,
            chain,
            safe,
            owners,
            proposer: proposer.address(),
            apps,
            phala,
            safe_service,
            safe_service_url,
            options,
            shutdown,
            server,
        })
    }

    /// What a newcomer needs to start: URLs, credentials, the Safe.
    pub fn banner(&self) -> String {
        let owners: Vec<String> = self.owners.iter().map(|o| o.to_checksum(None)).collect();
        format!(
            "approval-bridge sandbox is running\n\
             \n  web page        {url}sandbox\
             \n  JSON API        {url}api/v1/replicas   (Authorization: Bearer {token})\
             \n  CI webhook      {url}webhooks/ci       (HMAC secret: {secret})\
             \n  world           {url}sandbox/world\
             \n  chain           {rpc} (chain id {chain_id}, a block every {block}s)\
             \n  Phala sim       {phala}\
             \n  Safe service    {service}\
             \n  Safe            {safe} (2 of 3)\
             \n  owners          {owners}\
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
            owners = owners.join(", "),
        )
    }

    /// Stops the bridge; anvil stops when the sandbox is dropped.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.server.await.context("the bridge task panicked")?
    }

    /// Runs until Ctrl-C (or SIGTERM), then stops everything it started.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
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

/// Empties the sandbox database: drop and create it again.
async fn reset_database(url: &str) -> anyhow::Result<()> {
    let (server, name) = url
        .rsplit_once('/')
        .context("DATABASE_URL has no database name")?;
    let name = name.split('?').next().unwrap_or(name);
    anyhow::ensure!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "the sandbox database name `{name}` must be letters, digits and `_`"
    );
    let mut conn = PgConnection::connect(&format!("{server}/postgres")).await.map_err(|_| {
        anyhow::anyhow!(
            "cannot reach Postgres at {}: start it (pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start) or set DATABASE_URL",
            host_of(server)
        )
    })?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// `postgres://user:password@host:port` → `host:port`, never the password.
fn host_of(server: &str) -> String {
    server
        .rsplit('@')
        .next()
        .unwrap_or(server)
        .trim_start_matches("postgres://")
        .trim_start_matches("postgresql://")
        .to_owned()
}
