//! `approval-bridge sandbox`: the whole flow on one machine. It starts
//! anvil with the Safe contracts, a 2-of-3 Safe, three DstackApps, the Phala
//! Cloud and Safe Transaction Service simulators, and the bridge itself.

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use anyhow::Context;
use reqwest::Url;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use super::chain::LocalChain;
use super::controls::{self, Controls};
use super::phala_sim::{PhalaSim, PhalaWorld, SimCvm, kms_root_key, standard};
use super::safe_service::SafeServiceSim;
use crate::config::{
    AllowedSafes, Confirmations, DatabaseSettings, KmsContracts, LogFormat, PhalaSettings, RpcUrls,
    SafeSettings, Settings, TrustSettings, WorkerSettings, parse_named_secrets,
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

        let mut world = PhalaWorld::standard(chain.chain_id(), web, api)
            .with_cvm(SimCvm::onchain(EOA_CVM, eoa, 1));
        world.boot_delay = chrono::Duration::from_std(options.boot_delay)?;
        // The KMS whose root key signs the simulator's env keys, as on Base.
        world.kms_contract = chain
            .deploy_dstack_kms(chain.address(DEPLOYER), &kms_root_key())
            .await?;
        // prod-1 is already allowed on both Safe-owned apps; the other nodes are not.
        let allowed = world
            .node(standard::NODES[0])
            .context("the standard world has prod-1")?
            .device_id;
        let register = [
            Call::add_device(web, allowed),
            Call::add_device(api, allowed),
        ];
        chain
            .exec_calls(safe, &register, &owner_keys[..2], &executor)
            .await?;

        let world_kms = world.kms_contract;
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
            trust: TrustSettings {
                kms_contracts: KmsContracts(vec![(chain.chain_id(), world_kms)]),
                // Room for benchmarks of many replicas.
                quota_per_hour: 10_000,
                cloud_quota_per_hour: 1_000,
                ..TrustSettings::default()
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
