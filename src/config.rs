//! Typed settings. Each comes from an `APPROVAL_BRIDGE_*` environment variable
//! (or `DATABASE_URL`) and has a `--flag` of the same name.
//!
//! Secrets are [`SecretString`]s: their `Debug` output is redacted, so a
//! settings dump in a log line cannot leak them.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Args, ValueEnum};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgConnectOptions;

pub const DEFAULT_PHALA_API_URL: &str = "https://cloud-api.phala.com/api/v1";
/// The newest API version the Phala SDK supports; it fixes the shape of `GET /cvms/{id}`.
pub const DEFAULT_PHALA_API_VERSION: &str = "2026-01-21";

#[derive(Debug, Clone, Args)]
pub struct DatabaseSettings {
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL", value_parser = parse_database_url, hide_env_values = true)]
    pub database_url: SecretString,

    /// Longest statement on the bridge's connections, in seconds
    /// (Postgres `statement_timeout`).
    #[arg(long, env = "APPROVAL_BRIDGE_DB_STATEMENT_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub db_statement_timeout_secs: u64,

    /// Longest wait for a lock (a row, or a caller's quota lock), in seconds
    /// (Postgres `lock_timeout`).
    #[arg(long, env = "APPROVAL_BRIDGE_DB_LOCK_TIMEOUT_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub db_lock_timeout_secs: u64,

    /// Longest a transaction may sit idle before Postgres ends its session,
    /// in seconds (Postgres `idle_in_transaction_session_timeout`).
    #[arg(long, env = "APPROVAL_BRIDGE_DB_IDLE_IN_TRANSACTION_TIMEOUT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub db_idle_in_transaction_timeout_secs: u64,

    /// After this many idle seconds Postgres probes a connection with TCP
    /// keepalives, and drops it after three unanswered probes a third of it
    /// apart (Postgres `tcp_keepalives_*`).
    #[arg(long, env = "APPROVAL_BRIDGE_DB_KEEPALIVE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(3..=3600))]
    pub db_keepalive_secs: u64,
}

impl DatabaseSettings {
    /// The URL with the default bounds, as `serve` has them without flags.
    pub fn new(database_url: impl Into<String>) -> Self {
        DatabaseSettings {
            database_url: SecretString::from(database_url.into()),
            db_statement_timeout_secs: 30,
            db_lock_timeout_secs: 5,
            db_idle_in_transaction_timeout_secs: 60,
            db_keepalive_secs: 30,
        }
    }

    /// The URL's options, with the bounds every pooled connection gets: no
    /// statement, lock wait or idle transaction outlives them, and the server
    /// drops (and unlocks) a connection whose client has vanished.
    pub fn connect_options(&self) -> PgConnectOptions {
        let ms = |secs: u64| (secs * 1000).to_string();
        let keepalive = self.db_keepalive_secs;
        PgConnectOptions::from_str(self.database_url.expose_secret())
            .expect("validated when the settings were parsed")
            .options([
                ("statement_timeout", ms(self.db_statement_timeout_secs)),
                ("lock_timeout", ms(self.db_lock_timeout_secs)),
                (
                    "idle_in_transaction_session_timeout",
                    ms(self.db_idle_in_transaction_timeout_secs),
                ),
                ("tcp_keepalives_idle", keepalive.to_string()),
                ("tcp_keepalives_interval", (keepalive / 3).to_string()),
                ("tcp_keepalives_count", "3".to_owned()),
                // Unacknowledged data (a write to a vanished client) fails as soon.
                ("tcp_user_timeout", ms(keepalive * 2)),
            ])
    }

    pub fn lock_timeout(&self) -> Duration {
        Duration::from_secs(self.db_lock_timeout_secs)
    }

    pub fn statement_timeout(&self) -> Duration {
        Duration::from_secs(self.db_statement_timeout_secs)
    }
}

#[derive(Debug, Clone, Args)]
pub struct Settings {
    #[command(flatten)]
    pub database: DatabaseSettings,

    /// Address the HTTP server listens on.
    #[arg(long, env = "APPROVAL_BRIDGE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub phala: PhalaSettings,

    /// API tokens for the JSON API, as `name=token` pairs separated by commas.
    /// The name is recorded as the actor of what the token does.
    #[arg(long, env = "APPROVAL_BRIDGE_API_TOKENS", value_parser = parse_named_secrets,
          default_value = "", hide_default_value = true, hide_env_values = true)]
    pub api_tokens: NamedSecrets,

    /// Webhook secrets, one per CI client, as `name=secret` pairs separated by commas.
    #[arg(long, env = "APPROVAL_BRIDGE_WEBHOOK_SECRETS", value_parser = parse_named_secrets,
          default_value = "", hide_default_value = true, hide_env_values = true)]
    pub webhook_secrets: NamedSecrets,

    #[command(flatten)]
    pub worker: WorkerSettings,

    #[command(flatten)]
    pub safe: SafeSettings,

    #[command(flatten)]
    pub trust: TrustSettings,

    #[command(flatten)]
    pub web: WebSettings,

    #[command(flatten)]
    pub notify: NotifySettings,

    #[command(flatten)]
    pub retention: RetentionSettings,

    #[command(flatten)]
    pub server: ServerSettings,

    /// Log format: human-readable `text` or `json`.
    #[arg(long, env = "APPROVAL_BRIDGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Settings {
    /// Rules that span several settings; clap checks each one alone.
    pub fn check(&self) -> anyhow::Result<()> {
        let (lease, call) = (self.worker.lease_secs, self.phala.phala_timeout_secs);
        anyhow::ensure!(
            lease > call,
            "invalid setting APPROVAL_BRIDGE_LEASE_SECS (--lease-secs): {lease} s must be longer \
             than one Phala call (APPROVAL_BRIDGE_PHALA_TIMEOUT_SECS is {call} s)"
        );
        anyhow::ensure!(
            self.notify.notify_urls.is_empty() || self.notify.notify_secret.is_some(),
            "missing setting APPROVAL_BRIDGE_NOTIFY_SECRET (--notify-secret): notifications to \
             APPROVAL_BRIDGE_NOTIFY_URLS are signed with it"
        );
        self.web.check()?;
        anyhow::ensure!(
            self.server
                .ops_listen
                .is_none_or(|ops| ops != self.listen || ops.port() == 0),
            "invalid setting APPROVAL_BRIDGE_OPS_LISTEN (--ops-listen): it must differ from \
             APPROVAL_BRIDGE_LISTEN"
        );
        Ok(())
    }
}

/// The HTTP server's limits, where `/metrics` and `/readyz` are served, and
/// the server's own secret.
#[derive(Debug, Clone, Args)]
pub struct ServerSettings {
    /// A second listen address that alone serves `/metrics` and `/readyz`
    /// (and `/healthz`); the public listener then answers them with 404.
    #[arg(long, env = "APPROVAL_BRIDGE_OPS_LISTEN")]
    pub ops_listen: Option<SocketAddr>,

    /// A bearer token that `/metrics` and `/readyz` require, wherever they
    /// are served (secret).
    #[arg(long, env = "APPROVAL_BRIDGE_OPS_TOKEN", value_parser = parse_token, hide_env_values = true)]
    pub ops_token: Option<SecretString>,

    /// How long a client may take to send a request's headers, in seconds;
    /// then the connection is closed.
    #[arg(long, env = "APPROVAL_BRIDGE_HEADER_READ_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub header_read_timeout_secs: u64,

    /// Requests per minute one client address may make to what needs no
    /// credentials (sign-in, the login and static pages, the CI webhook
    /// before its signature is checked), in bursts of as many; refused
    /// credentials count too. 0 turns the limit off. Behind a proxy, list it
    /// in APPROVAL_BRIDGE_TRUSTED_PROXIES so that its X-Forwarded-For names
    /// the client.
    #[arg(
        long,
        env = "APPROVAL_BRIDGE_CLIENT_RATE_PER_MINUTE",
        default_value_t = 120
    )]
    pub client_rate_per_minute: u32,

    /// How many client addresses the rate limit remembers at most; a flood
    /// of addresses makes it forget those seen longest ago.
    #[arg(long, env = "APPROVAL_BRIDGE_CLIENT_RATE_MAX_CLIENTS", default_value_t = 100_000,
          value_parser = parse_max_clients)]
    pub client_rate_max_clients: usize,

    /// The server's own secret, at least 32 characters: it keys the hashes
    /// the database keeps of idempotent orders. Without it they are keyed
    /// with a key derived from APPROVAL_BRIDGE_PHALA_API_KEY (secret).
    #[arg(long, env = "APPROVAL_BRIDGE_SERVER_SECRET", value_parser = parse_server_secret,
          hide_env_values = true)]
    pub server_secret: Option<SecretString>,
}

impl ServerSettings {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs)
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            ops_listen: None,
            ops_token: None,
            header_read_timeout_secs: 10,
            client_rate_per_minute: 120,
            client_rate_max_clients: 100_000,
            server_secret: None,
        }
    }
}

fn parse_max_clients(value: &str) -> Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(n) if (2..=10_000_000).contains(&n) => Ok(n),
        _ => Err("must be a whole number from 2 to 10000000".into()),
    }
}

fn parse_token(value: &str) -> Result<SecretString, String> {
    if value.trim().chars().count() < 8 {
        return Err("must be at least 8 characters".into());
    }
    Ok(SecretString::from(value.trim().to_owned()))
}

fn parse_server_secret(value: &str) -> Result<SecretString, String> {
    if value.trim().chars().count() < 32 {
        return Err("must be at least 32 characters (e.g. `openssl rand -hex 32`)".into());
    }
    Ok(SecretString::from(value.trim().to_owned()))
}

/// Who may use the team page, and how they sign in.
#[derive(Debug, Clone, Default, Args)]
pub struct WebSettings {
    /// The address people open the page at, e.g. `https://bridge.example.com`.
    /// Sign-In with Ethereum messages must name its host as their domain; an
    /// `https` URL makes the page's cookies `__Host-` and `Secure` and turns on
    /// HSTS. Without it, only the proxy signs in.
    #[arg(long, env = "APPROVAL_BRIDGE_PUBLIC_URL")]
    pub public_url: Option<Url>,

    /// Who may queue and cancel on the page: addresses (Sign-In with
    /// Ethereum) or user names as the SSO proxy sends them, separated by
    /// commas. The owners of the configured Safes may sign in and read.
    #[arg(long, env = "APPROVAL_BRIDGE_OPERATORS", value_parser = parse_operators,
          default_value = "", hide_default_value = true)]
    pub operators: Operators,

    /// What the page calls people: `address=Name` or `user=Name` pairs
    /// separated by commas, e.g. `0x976E…0aa9=Alice,ops@example.com=Ops`.
    /// Anyone not named is shown by a short address.
    #[arg(long, env = "APPROVAL_BRIDGE_NAMES", value_parser = parse_names,
          default_value = "", hide_default_value = true)]
    pub names: Names,

    /// The header in which an SSO proxy names the signed-in user, e.g.
    /// `X-Forwarded-Email`; trusted only from APPROVAL_BRIDGE_TRUSTED_PROXIES.
    #[arg(long, env = "APPROVAL_BRIDGE_PROXY_USER_HEADER", value_parser = parse_header_name)]
    pub proxy_user_header: Option<axum::http::HeaderName>,

    /// The IP addresses of the SSO proxy (or of a TLS proxy whose
    /// `X-Forwarded-Proto` and `X-Forwarded-For` count), separated by commas.
    #[arg(long, env = "APPROVAL_BRIDGE_TRUSTED_PROXIES", value_parser = parse_ips,
          default_value = "", hide_default_value = true)]
    pub trusted_proxies: TrustedProxies,

    /// The secret the SSO proxy sends in `X-Proxy-Secret` with every request:
    /// the user header counts only with it, and only from a trusted address.
    #[arg(long, env = "APPROVAL_BRIDGE_PROXY_SECRET", value_parser = parse_secret, hide_env_values = true)]
    pub proxy_secret: Option<SecretString>,

    /// The key of the page's CSRF tokens and sign-in nonces (at least 32
    /// characters). Every process of one deployment needs the same one; without
    /// it each process draws its own at start, so a restart asks open forms to
    /// reload and sign-ins in flight to start again.
    #[arg(long, env = "APPROVAL_BRIDGE_SESSION_SECRET", value_parser = parse_session_secret,
          hide_env_values = true)]
    pub session_secret: Option<SecretString>,
}

fn parse_session_secret(value: &str) -> Result<SecretString, String> {
    if value.trim().len() < 32 {
        return Err("must be at least 32 characters".into());
    }
    Ok(SecretString::from(value.trim().to_owned()))
}

impl WebSettings {
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.proxy_user_header.is_none() || !self.trusted_proxies.0.is_empty(),
            "invalid setting APPROVAL_BRIDGE_PROXY_USER_HEADER (--proxy-user-header): \
             set APPROVAL_BRIDGE_TRUSTED_PROXIES to the proxy's addresses as well"
        );
        anyhow::ensure!(
            self.proxy_user_header.is_none() || self.proxy_secret.is_some(),
            "missing setting APPROVAL_BRIDGE_PROXY_SECRET (--proxy-secret): the SSO proxy \
             must send it in X-Proxy-Secret, or its user header is not believed"
        );
        if let Some(url) = &self.public_url {
            anyhow::ensure!(
                matches!(url.scheme(), "http" | "https") && url.host_str().is_some(),
                "invalid setting APPROVAL_BRIDGE_PUBLIC_URL (--public-url): \
                 it must be an http(s) URL with a host"
            );
        }
        Ok(())
    }
}

/// Operators: addresses, or user names from the SSO proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operators {
    pub addresses: Vec<alloy::primitives::Address>,
    pub users: Vec<String>,
}

fn parse_operators(value: &str) -> Result<Operators, String> {
    let mut out = Operators::default();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if entry.starts_with("0x") {
            out.addresses.push(
                entry
                    .parse()
                    .map_err(|_| format!("`{entry}` is not an address"))?,
            );
        } else if entry.chars().any(char::is_whitespace) {
            return Err(format!("`{entry}` is not a user name"));
        } else {
            out.users.push(entry.to_owned());
        }
    }
    Ok(out)
}

/// People's names for the page: by address (any case) or by the SSO proxy's
/// user name. Shared, since every page render reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names(std::sync::Arc<std::collections::HashMap<String, String>>);

/// The longest name the page shows.
const MAX_NAME_CHARS: usize = 40;

impl Names {
    /// The key of an address or user name: addresses in lower case, so a
    /// checksummed and a lower-case spelling find the same person.
    fn key(who: &str) -> String {
        match who.parse::<alloy::primitives::Address>() {
            Ok(address) => format!("{address:#x}"),
            Err(_) => who.to_owned(),
        }
    }

    pub fn of(&self, who: &str) -> Option<&str> {
        self.0.get(&Self::key(who)).map(String::as_str)
    }
}

fn parse_names(value: &str) -> Result<Names, String> {
    let mut names = std::collections::HashMap::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (who, name) = entry
            .split_once('=')
            .ok_or_else(|| format!("`{entry}` is not `address=Name`"))?;
        let (who, name) = (who.trim(), name.trim());
        if who.starts_with("0x") && who.parse::<alloy::primitives::Address>().is_err() {
            return Err(format!("`{who}` is not an address"));
        }
        if who.is_empty() || who.chars().any(char::is_whitespace) {
            return Err(format!("`{who}` is neither an address nor a user name"));
        }
        if name.is_empty()
            || name.chars().count() > MAX_NAME_CHARS
            || name.chars().any(char::is_control)
        {
            return Err(format!(
                "the name of `{who}` must be 1 to {MAX_NAME_CHARS} printable characters"
            ));
        }
        if names.insert(Names::key(who), name.to_owned()).is_some() {
            return Err(format!("`{who}` is named twice"));
        }
    }
    Ok(Names(std::sync::Arc::new(names)))
}

/// The SSO proxy's addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(pub Vec<std::net::IpAddr>);

fn parse_ips(value: &str) -> Result<TrustedProxies, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|ip| {
            ip.parse()
                .map_err(|_| format!("`{ip}` is not an IP address"))
        })
        .collect::<Result<_, _>>()
        .map(TrustedProxies)
}

fn parse_header_name(value: &str) -> Result<axum::http::HeaderName, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("`{value}` is not a header name"))
}

#[derive(Debug, Clone, Args)]
pub struct PhalaSettings {
    /// Base URL of the Phala Cloud API.
    #[arg(long, env = "APPROVAL_BRIDGE_PHALA_API_URL", default_value = DEFAULT_PHALA_API_URL,
          hide_env_values = true)]
    pub phala_api_url: Url,

    /// Phala Cloud API key (sent as `X-API-Key`).
    #[arg(long, env = "APPROVAL_BRIDGE_PHALA_API_KEY", value_parser = parse_secret, hide_env_values = true)]
    pub phala_api_key: SecretString,

    /// Value of the `X-Phala-Version` header.
    #[arg(long, env = "APPROVAL_BRIDGE_PHALA_API_VERSION", default_value = DEFAULT_PHALA_API_VERSION)]
    pub phala_api_version: String,

    /// Timeout of one Phala Cloud request, in seconds.
    #[arg(long, env = "APPROVAL_BRIDGE_PHALA_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub phala_timeout_secs: u64,

    /// How long intake reuses a resolved source and the node list, in
    /// seconds (0: every order asks Phala; concurrent ones still share a call).
    #[arg(long, env = "APPROVAL_BRIDGE_LOOKUP_CACHE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub lookup_cache_secs: u64,
}

impl PhalaSettings {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.phala_timeout_secs)
    }

    pub fn lookup_cache(&self) -> Duration {
        Duration::from_secs(self.lookup_cache_secs)
    }
}

#[derive(Debug, Clone, Args)]
pub struct WorkerSettings {
    /// Concurrent worker tasks in this process, besides the one that only
    /// commits (0 runs none, that one included: HTTP only).
    #[arg(long, env = "APPROVAL_BRIDGE_WORKERS", default_value_t = 4)]
    pub workers: usize,

    /// Attempts of one step before the request fails.
    #[arg(long, env = "APPROVAL_BRIDGE_MAX_ATTEMPTS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,

    /// How long a claimed request stays leased to one worker, in seconds, on
    /// the database's clock. A running step renews it every third of this, and
    /// it must be longer than one Phala call (APPROVAL_BRIDGE_PHALA_TIMEOUT_SECS).
    #[arg(long, env = "APPROVAL_BRIDGE_LEASE_SECS", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(5..=3600))]
    pub lease_secs: u64,

    /// After a create or commit got no answer: how long, from the failure, a
    /// replica may take to appear in Phala's instance list before the call is
    /// sent again, in seconds. It must cover a call that Phala completes late
    /// plus the list's lag: for a direct create (Cloud KMS), which has no
    /// one-time token, it is the only guard against a second replica.
    #[arg(long, env = "APPROVAL_BRIDGE_RECONCILE_SETTLE_SECS", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub reconcile_settle_secs: u64,

    /// How long the outcome of such a call may stay unknown (Phala's instance
    /// list cannot be read) before the request fails, in seconds.
    #[arg(long, env = "APPROVAL_BRIDGE_UNKNOWN_OUTCOME_TIMEOUT_SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub unknown_outcome_timeout_secs: u64,

    /// How long a committed replica may stay missing from Phala (404) before
    /// the request fails, in seconds.
    #[arg(long, env = "APPROVAL_BRIDGE_REPLICA_MISSING_TIMEOUT_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub replica_missing_timeout_secs: u64,

    /// How long a committed replica may boot before the request fails, in
    /// seconds; past half of it the request carries a warning. Only an answer
    /// from Phala fails a request: while Phala cannot be asked, it waits.
    #[arg(long, env = "APPROVAL_BRIDGE_REPLICA_BOOT_TIMEOUT_SECS", default_value_t = 1800,
          value_parser = clap::value_parser!(u64).range(60..=86_400))]
    pub replica_boot_timeout_secs: u64,

    /// How long `serve` waits for running steps after SIGTERM before it gives
    /// their leases back and exits, in seconds.
    #[arg(long, env = "APPROVAL_BRIDGE_SHUTDOWN_GRACE_SECS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(0..=600))]
    pub shutdown_grace_secs: u64,

    /// Fallback polling interval when no notification arrives, in seconds.
    #[arg(long, env = "APPROVAL_BRIDGE_POLL_INTERVAL_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub poll_interval_secs: u64,

    /// First retry delay after a transient error, in seconds; it doubles each attempt.
    #[arg(long, env = "APPROVAL_BRIDGE_BACKOFF_BASE_SECS", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub backoff_base_secs: u64,

    /// Longest retry delay, in seconds.
    #[arg(long, env = "APPROVAL_BRIDGE_BACKOFF_MAX_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub backoff_max_secs: u64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            workers: 4,
            max_attempts: 8,
            lease_secs: 120,
            reconcile_settle_secs: 120,
            unknown_outcome_timeout_secs: 3600,
            replica_missing_timeout_secs: 600,
            replica_boot_timeout_secs: 1800,
            shutdown_grace_secs: 20,
            poll_interval_secs: 5,
            backoff_base_secs: 2,
            backoff_max_secs: 600,
        }
    }
}

/// The chains, the Safes the bridge may propose to, and how it proposes.
#[derive(Debug, Clone, Args)]
pub struct SafeSettings {
    /// JSON-RPC URL per chain, as `chain_id=url` pairs separated by commas.
    #[arg(long, env = "APPROVAL_BRIDGE_RPC_URLS", value_parser = parse_rpc_urls,
          default_value = "", hide_default_value = true, hide_env_values = true)]
    pub rpc_urls: RpcUrls,

    /// WebSocket URL per chain (`chain_id=wss://…`): the chain follower
    /// subscribes to `newHeads` there, and polls when it is down.
    #[arg(long, env = "APPROVAL_BRIDGE_WS_URLS", value_parser = parse_ws_urls,
          default_value = "", hide_default_value = true, hide_env_values = true)]
    pub ws_urls: RpcUrls,

    /// JSON-RPC URL for any chain not in APPROVAL_BRIDGE_RPC_URLS.
    #[arg(long, env = "ETH_RPC_URL", hide_env_values = true)]
    pub eth_rpc_url: Option<Url>,

    /// The Safes the bridge may propose to, as `chain_id:address` separated by commas.
    /// Empty disables the Safe flow: requests that need registrations then fail.
    #[arg(long, env = "APPROVAL_BRIDGE_SAFES", value_parser = parse_safes,
          default_value = "", hide_default_value = true)]
    pub safes: AllowedSafes,

    /// The proposer's secp256k1 private key (hex). It must be a Safe owner or
    /// a delegate registered with the Transaction Service.
    #[arg(long, env = "APPROVAL_BRIDGE_PROPOSER_KEY", value_parser = parse_secret, hide_env_values = true,
          conflicts_with = "proposer_key_file")]
    pub proposer_key: Option<SecretString>,

    /// A file holding the proposer's private key (hex), instead of APPROVAL_BRIDGE_PROPOSER_KEY.
    #[arg(long, env = "APPROVAL_BRIDGE_PROPOSER_KEY_FILE")]
    pub proposer_key_file: Option<std::path::PathBuf>,

    /// Safe Transaction Service URL per chain, as `chain_id=url`; the hosted
    /// service is used for Ethereum, Sepolia, Base and Base Sepolia otherwise.
    #[arg(long, env = "APPROVAL_BRIDGE_SAFE_SERVICE_URLS", value_parser = parse_rpc_urls,
          default_value = "", hide_default_value = true, hide_env_values = true)]
    pub safe_service_urls: RpcUrls,

    /// API key of the hosted Safe Transaction Service (sent as a bearer token).
    #[arg(long, env = "APPROVAL_BRIDGE_SAFE_API_KEY", value_parser = parse_secret, hide_env_values = true)]
    pub safe_api_key: Option<SecretString>,

    /// Most requests per second to the Safe Transaction Service.
    #[arg(long, env = "APPROVAL_BRIDGE_SAFE_RATE_LIMIT", default_value_t = 5.0, value_parser = parse_rate)]
    pub safe_rate_limit: f64,

    /// How long requests collect before their Safe transaction is proposed, in
    /// seconds (0 proposes at once).
    #[arg(long, env = "APPROVAL_BRIDGE_BATCH_WINDOW_SECS", default_value_t = 60)]
    pub batch_window_secs: u64,

    /// Blocks on top of a Safe execution before it counts, per chain as
    /// `chain_id=N`; chains not listed use 3.
    #[arg(long, env = "APPROVAL_BRIDGE_CONFIRMATIONS", value_parser = parse_confirmations,
          default_value = "", hide_default_value = true)]
    pub confirmations: Confirmations,

    /// How often the chain follower polls for new blocks, in seconds.
    #[arg(long, env = "APPROVAL_BRIDGE_CHAIN_POLL_SECS", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub chain_poll_secs: u64,

    /// How long a proposal may wait for execution before its requests fail, in seconds.
    #[arg(long, env = "APPROVAL_BRIDGE_PROPOSAL_TIMEOUT_SECS", default_value_t = 7 * 24 * 3600,
          value_parser = clap::value_parser!(u64).range(60..))]
    pub proposal_timeout_secs: u64,

    /// Fresh proposals for one request after its proposal could not execute
    /// (execution failure, nonce replaced) before the request fails.
    #[arg(long, env = "APPROVAL_BRIDGE_MAX_REPROPOSALS", default_value_t = 3)]
    pub max_reproposals: u32,

    /// Largest block range of one eth_getLogs call; halved when the provider refuses.
    #[arg(long, env = "APPROVAL_BRIDGE_LOG_RANGE", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub log_range: u64,

    /// How long the Transaction Service may keep refusing a stored proposal,
    /// or the nonce lookup for a new one (HTTP 401, 403, 404...), before the
    /// requests fail, in seconds.
    #[arg(long, env = "APPROVAL_BRIDGE_PROPOSE_GIVE_UP_SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(60..))]
    pub propose_give_up_secs: u64,

    /// How long a process holds a Safe-flow job (the planner of a Safe, the
    /// follower of a chain) without renewing it, in seconds: another process
    /// takes the job over within this time once the holder dies.
    #[arg(long, env = "APPROVAL_BRIDGE_SAFE_FLOW_LEASE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(3..=3600))]
    pub safe_flow_lease_secs: u64,
}

impl SafeSettings {
    /// The chains the bridge works on: each with its own RPC URL, and each
    /// allowed Safe's (which may use `ETH_RPC_URL`).
    pub fn configured_chain_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.rpc_urls.0.iter().map(|(id, _)| *id).collect();
        ids.extend(self.safes.0.iter().map(|(id, _)| *id));
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// `chain_id=N` confirmations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confirmations(pub Vec<(u64, u64)>);

impl Confirmations {
    pub const DEFAULT: u64 = 3;

    pub fn of(&self, chain_id: u64) -> u64 {
        self.0
            .iter()
            .find(|(id, _)| *id == chain_id)
            .map(|(_, n)| *n)
            .unwrap_or(Self::DEFAULT)
    }
}

fn parse_confirmations(value: &str) -> Result<Confirmations, String> {
    let mut out = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (chain, n) = entry
            .split_once('=')
            .ok_or_else(|| format!("`{entry}` is not of the form chain_id=N"))?;
        let chain: u64 = chain
            .trim()
            .parse()
            .map_err(|_| format!("`{chain}` is not a chain id"))?;
        let n: u64 = n
            .trim()
            .parse()
            .map_err(|_| format!("`{n}` is not a number of blocks"))?;
        out.push((chain, n));
    }
    Ok(Confirmations(out))
}

impl Default for SafeSettings {
    /// The documented defaults, with no chain, Safe or key configured.
    fn default() -> Self {
        SafeSettings {
            rpc_urls: RpcUrls::default(),
            ws_urls: RpcUrls::default(),
            eth_rpc_url: None,
            safes: AllowedSafes::default(),
            proposer_key: None,
            proposer_key_file: None,
            safe_service_urls: RpcUrls::default(),
            safe_api_key: None,
            safe_rate_limit: 5.0,
            batch_window_secs: 60,
            confirmations: Confirmations::default(),
            chain_poll_secs: 2,
            proposal_timeout_secs: 7 * 24 * 3600,
            max_reproposals: 3,
            log_range: 2000,
            propose_give_up_secs: 3600,
            safe_flow_lease_secs: 30,
        }
    }
}

/// What the bridge checks before acting: who may replicate which sources and
/// how many, and whose env encryption keys it believes.
#[derive(Debug, Clone, Args)]
pub struct TrustSettings {
    /// The sources each caller may replicate, and see and cancel requests
    /// of, as `caller=source|source` separated by commas. A caller is
    /// `api:<token name>`, `ci:<webhook client name>` or
    /// `web:<address or proxy user>`; a source is a CVM name or an app id;
    /// `*` allows any source, and the grant `+admin` lets the caller see and
    /// cancel every request and proposal. An API token or CI client not
    /// listed may do nothing; a person on the page not listed keeps their
    /// role (an operator queues any source, everyone reads everything).
    #[arg(long, env = "APPROVAL_BRIDGE_SCOPES", value_parser = parse_scopes,
          default_value = "", hide_default_value = true)]
    pub scopes: Scopes,

    /// Replicas each caller may queue per hour, as `caller=ONCHAIN/CLOUD`
    /// separated by commas: ONCHAIN for sources on on-chain KMS, CLOUD for
    /// Cloud-KMS sources. Callers not listed get the defaults below.
    #[arg(long, env = "APPROVAL_BRIDGE_QUOTAS", value_parser = parse_quotas,
          default_value = "", hide_default_value = true)]
    pub quotas: Quotas,

    /// Default hourly quota of replicas of on-chain KMS sources per caller.
    #[arg(long, env = "APPROVAL_BRIDGE_QUOTA_PER_HOUR", default_value_t = Quota::DEFAULT.onchain)]
    pub quota_per_hour: u32,

    /// Default hourly quota of replicas of Cloud-KMS sources per caller. These
    /// create billable CVMs with no approval, so the default is small.
    #[arg(long, env = "APPROVAL_BRIDGE_CLOUD_QUOTA_PER_HOUR", default_value_t = Quota::DEFAULT.cloud)]
    pub cloud_quota_per_hour: u32,

    /// The DstackKms contract per chain, as `chain_id=address`; its `kmsInfo()`
    /// root key must have signed an app's env encryption key. Ethereum and Base
    /// have Phala's contracts built in.
    #[arg(long, env = "APPROVAL_BRIDGE_KMS_CONTRACTS", value_parser = parse_kms_contracts,
          default_value = "", hide_default_value = true)]
    pub kms_contracts: KmsContracts,

    /// Encrypt env overrides even when the key's signature cannot be verified
    /// against the KMS root key on chain (logged as a warning). Off by default.
    #[arg(
        long,
        env = "APPROVAL_BRIDGE_ALLOW_UNVERIFIED_ENV_KEYS",
        default_value_t = false
    )]
    pub allow_unverified_env_keys: bool,
}

impl Default for TrustSettings {
    fn default() -> Self {
        TrustSettings {
            scopes: Scopes::default(),
            quotas: Quotas::default(),
            quota_per_hour: Quota::DEFAULT.onchain,
            cloud_quota_per_hour: Quota::DEFAULT.cloud,
            kms_contracts: KmsContracts::default(),
            allow_unverified_env_keys: false,
        }
    }
}

/// One caller's allowance of replicas per hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Sources on on-chain KMS: every replica waits for the Safe's owners.
    pub onchain: u32,
    /// Cloud-KMS sources: replicated at once, billed at once.
    pub cloud: u32,
}

impl Quota {
    pub const DEFAULT: Quota = Quota {
        onchain: 60,
        cloud: 5,
    };

    pub fn for_kms(&self, onchain_kms: bool) -> u32 {
        if onchain_kms {
            self.onchain
        } else {
            self.cloud
        }
    }
}

/// `caller=ONCHAIN/CLOUD` pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quotas(pub Vec<(String, Quota)>);

/// A source a caller may replicate, or the `+admin` grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourcePattern {
    Any,
    /// A CVM name, compared exactly.
    Name(String),
    App(crate::domain::AppId),
    /// `+admin`: no source to queue, but every request and proposal to see
    /// and cancel. Written with a `+` so that no CVM name can mean it.
    Admin,
}

/// `caller=source|source` entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes(pub Vec<(String, Vec<SourcePattern>)>);

/// `chain_id=address` of the DstackKms contract whose root key signs env keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KmsContracts(pub Vec<(u64, alloy::primitives::Address)>);

impl KmsContracts {
    /// Phala's DstackKms proxies (dstack-app.md §3.1): Ethereum and Base.
    pub const BUILT_IN: [(u64, alloy::primitives::Address); 2] = [
        (
            1,
            alloy::primitives::address!("d343a3f5593b93D8056aB5D60c433622d7D65a80"),
        ),
        (
            8453,
            alloy::primitives::address!("2f83172A49584C017F2B256F0FB2Dca14126Ba9C"),
        ),
    ];

    /// The configured contract for `chain_id`, else the built-in one.
    pub fn get(&self, chain_id: u64) -> Option<alloy::primitives::Address> {
        self.0
            .iter()
            .chain(Self::BUILT_IN.iter())
            .find(|(id, _)| *id == chain_id)
            .map(|(_, address)| *address)
    }
}

/// A caller label as the event log writes it: `api:<name>`, `ci:<name>`, or
/// `web:<address or user name>` for a person on the team page (an address in
/// its checksummed form, as sign-in records it).
fn parse_caller(caller: &str) -> Result<String, String> {
    let caller = caller.trim();
    let valid_name = |name: &str, extra: &[char]| {
        !name.is_empty()
            && name.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || extra.contains(&c)
            })
    };
    match caller.split_once(':') {
        Some(("api" | "ci", name)) if valid_name(name, &[]) => Ok(caller.to_owned()),
        Some(("web", name)) if name.starts_with("0x") => name
            .parse::<alloy::primitives::Address>()
            .map(|a| format!("web:{}", a.to_checksum(None)))
            .map_err(|_| format!("`{caller}`: `{name}` is not an address")),
        Some(("web", name)) if valid_name(name, &['@', '+']) => Ok(caller.to_owned()),
        _ => Err(format!(
            "`{caller}` is not a caller: write api:<token name>, ci:<webhook client name> or web:<address or user>"
        )),
    }
}

fn parse_scopes(value: &str) -> Result<Scopes, String> {
    let mut out: Vec<(String, Vec<SourcePattern>)> = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (caller, sources) = entry
            .split_once('=')
            .ok_or_else(|| format!("`{entry}` is not of the form caller=source|source"))?;
        let caller = parse_caller(caller)?;
        if out.iter().any(|(existing, _)| *existing == caller) {
            return Err(format!("`{caller}` is listed twice"));
        }
        let patterns = sources
            .split('|')
            .map(str::trim)
            .map(|source| {
                if source == "*" {
                    return Ok(SourcePattern::Any);
                }
                if source == "+admin" {
                    return Ok(SourcePattern::Admin);
                }
                if let Ok(app) = source.parse() {
                    return Ok(SourcePattern::App(app));
                }
                let is_name = !source.is_empty()
                    && source
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                if is_name {
                    Ok(SourcePattern::Name(source.to_owned()))
                } else {
                    Err(format!(
                        "`{caller}`: `{source}` is neither a CVM name, an app id, `*` nor `+admin`"
                    ))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.push((caller, patterns));
    }
    Ok(Scopes(out))
}

fn parse_quotas(value: &str) -> Result<Quotas, String> {
    let mut out: Vec<(String, Quota)> = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let form = || format!("`{entry}` is not of the form caller=ONCHAIN/CLOUD");
        let (caller, limits) = entry.split_once('=').ok_or_else(form)?;
        let caller = parse_caller(caller)?;
        if out.iter().any(|(existing, _)| *existing == caller) {
            return Err(format!("`{caller}` is listed twice"));
        }
        let (onchain, cloud) = limits.split_once('/').ok_or_else(form)?;
        let onchain = onchain.trim().parse().map_err(|_| form())?;
        let cloud = cloud.trim().parse().map_err(|_| form())?;
        out.push((caller, Quota { onchain, cloud }));
    }
    Ok(Quotas(out))
}

fn parse_kms_contracts(value: &str) -> Result<KmsContracts, String> {
    let mut out = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (chain, address) = entry
            .split_once('=')
            .ok_or_else(|| format!("`{entry}` is not of the form chain_id=address"))?;
        let chain: u64 = chain
            .trim()
            .parse()
            .map_err(|_| format!("`{}` is not a chain id", chain.trim()))?;
        let address = address
            .trim()
            .parse()
            .map_err(|_| format!("`{}` is not an address", address.trim()))?;
        out.push((chain, address));
    }
    Ok(KmsContracts(out))
}

/// `chain_id=url` pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RpcUrls(pub Vec<(u64, Url)>);

impl RpcUrls {
    pub fn get(&self, chain_id: u64) -> Option<&Url> {
        self.0
            .iter()
            .find(|(id, _)| *id == chain_id)
            .map(|(_, url)| url)
    }
}

/// `chain_id:address` pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedSafes(pub Vec<(u64, alloy::primitives::Address)>);

impl AllowedSafes {
    pub fn contains(&self, chain_id: u64, safe: alloy::primitives::Address) -> bool {
        self.0.contains(&(chain_id, safe))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn parse_rpc_urls(value: &str) -> Result<RpcUrls, String> {
    let mut out = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (chain, url) = entry
            .split_once('=')
            .ok_or_else(|| format!("`{entry}` is not of the form chain_id=url"))?;
        let chain: u64 = chain
            .trim()
            .parse()
            .map_err(|_| format!("`{chain}` is not a chain id"))?;
        // Say which entry is wrong without echoing a URL that may carry an API key.
        let url = Url::parse(url.trim())
            .map_err(|err| format!("the URL for chain {chain} is invalid: {err}"))?;
        out.push((chain, url));
    }
    Ok(RpcUrls(out))
}

fn parse_ws_urls(value: &str) -> Result<RpcUrls, String> {
    let urls = parse_rpc_urls(value)?;
    if let Some((chain, _)) = urls
        .0
        .iter()
        .find(|(_, url)| !matches!(url.scheme(), "ws" | "wss"))
    {
        return Err(format!(
            "the URL for chain {chain} is not a ws:// or wss:// URL"
        ));
    }
    Ok(urls)
}

fn parse_safes(value: &str) -> Result<AllowedSafes, String> {
    let mut out = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (chain, address) = entry
            .split_once(':')
            .ok_or_else(|| format!("`{entry}` is not of the form chain_id:address"))?;
        let chain: u64 = chain
            .trim()
            .parse()
            .map_err(|_| format!("`{chain}` is not a chain id"))?;
        let address = address
            .trim()
            .parse()
            .map_err(|_| format!("`{}` is not an address", address.trim()))?;
        out.push((chain, address));
    }
    Ok(AllowedSafes(out))
}

fn parse_rate(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate <= 1000.0 => Ok(rate),
        _ => Err("must be a number of requests per second above 0".into()),
    }
}

/// How long the bridge keeps what it no longer needs.
#[derive(Debug, Clone, Args)]
pub struct RetentionSettings {
    /// How long an Idempotency-Key is remembered, in seconds; a key used
    /// again after this counts as new.
    #[arg(long, env = "APPROVAL_BRIDGE_IDEMPOTENCY_KEY_TTL_SECS", default_value_t = 7 * 24 * 3600,
          value_parser = clap::value_parser!(u64).range(60..=10 * 365 * 24 * 3600))]
    pub idempotency_key_ttl_secs: u64,

    /// How long finished requests (done, failed, cancelled) and their events
    /// are kept after they finished, in seconds; then they are deleted. At
    /// least an hour, the quota window. Unset keeps everything.
    #[arg(long, env = "APPROVAL_BRIDGE_RETAIN_FINISHED_SECS",
          value_parser = clap::value_parser!(u64).range(3600..=100 * 365 * 24 * 3600))]
    pub retain_finished_secs: Option<u64>,

    /// How often the retention job runs (across all processes), in seconds.
    #[arg(long, env = "APPROVAL_BRIDGE_RETENTION_INTERVAL_SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub retention_interval_secs: u64,
}

impl RetentionSettings {
    pub fn idempotency_key_ttl(&self) -> chrono::Duration {
        chrono::Duration::seconds(self.idempotency_key_ttl_secs as i64)
    }
}

impl Default for RetentionSettings {
    /// Keys for 7 days; requests forever.
    fn default() -> Self {
        RetentionSettings {
            idempotency_key_ttl_secs: 7 * 24 * 3600,
            retain_finished_secs: None,
            retention_interval_secs: 3600,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the team hears about approvals to give and replicas done or failed.
#[derive(Debug, Clone, Args)]
pub struct NotifySettings {
    /// Webhook targets of notifications (Slack-compatible JSON), as `name=url`
    /// pairs separated by commas; each URL must be http(s). Secret: a Slack
    /// webhook URL carries its token.
    #[arg(long, env = "APPROVAL_BRIDGE_NOTIFY_URLS", value_parser = parse_notify_urls,
          default_value = "", hide_default_value = true, hide_env_values = true)]
    pub notify_urls: NamedSecrets,

    /// HMAC-SHA256 secret that signs every notification, as the CI webhook's
    /// requests are signed. Required with APPROVAL_BRIDGE_NOTIFY_URLS.
    #[arg(long, env = "APPROVAL_BRIDGE_NOTIFY_SECRET", value_parser = parse_secret, hide_env_values = true)]
    pub notify_secret: Option<SecretString>,

    /// Attempts of one notification to one target before it is given up.
    #[arg(long, env = "APPROVAL_BRIDGE_NOTIFY_MAX_ATTEMPTS", default_value_t = 12,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub notify_max_attempts: u32,

    /// Timeout of one notification request, in seconds.
    #[arg(long, env = "APPROVAL_BRIDGE_NOTIFY_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=120))]
    pub notify_timeout_secs: u64,
}

impl Default for NotifySettings {
    fn default() -> Self {
        NotifySettings {
            notify_urls: NamedSecrets::default(),
            notify_secret: None,
            notify_max_attempts: 12,
            notify_timeout_secs: 10,
        }
    }
}

/// `name=url` targets; an entry whose URL is not http(s) is refused, naming
/// the entry but never the URL (it may carry a token).
pub fn parse_notify_urls(value: &str) -> Result<NamedSecrets, String> {
    let targets = parse_named_secrets(value)?;
    for (name, url) in &targets.0 {
        match Url::parse(url.expose_secret()) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
            _ => {
                return Err(format!(
                    "`{name}`: the URL must be an http:// or https:// URL"
                ));
            }
        }
    }
    Ok(targets)
}

/// Named secrets from a `name=secret,name=secret` list.
#[derive(Debug, Clone, Default)]
pub struct NamedSecrets(pub Vec<(String, SecretString)>);

impl NamedSecrets {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn parse_secret(value: &str) -> Result<SecretString, String> {
    if value.trim().is_empty() {
        return Err("must not be empty".into());
    }
    Ok(SecretString::from(value.to_owned()))
}

fn parse_database_url(value: &str) -> Result<SecretString, String> {
    // Never echo the URL: it may hold a password.
    if !(value.starts_with("postgres://") || value.starts_with("postgresql://")) {
        return Err("must start with postgres:// or postgresql://".to_owned());
    }
    PgConnectOptions::from_str(value).map_err(|_| "not a valid postgres:// URL".to_owned())?;
    Ok(SecretString::from(value.to_owned()))
}

/// Parses `name=secret` pairs. Error messages name the entry, never the secret.
pub fn parse_named_secrets(value: &str) -> Result<NamedSecrets, String> {
    let mut out: Vec<(String, SecretString)> = Vec::new();
    for (index, entry) in value.split(',').map(str::trim).enumerate() {
        if entry.is_empty() {
            continue;
        }
        let Some((name, secret)) = entry.split_once('=') else {
            return Err(format!(
                "entry {} is not of the form name=secret",
                index + 1
            ));
        };
        let name = name.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "entry {}: the name must be letters, digits, `-`, `_` or `.`",
                index + 1
            ));
        }
        if secret.trim().len() < 8 {
            return Err(format!(
                "`{name}`: the secret must be at least 8 characters"
            ));
        }
        if out.iter().any(|(existing, _)| existing == name) {
            return Err(format!("`{name}` is listed twice"));
        }
        out.push((
            name.to_owned(),
            SecretString::from(secret.trim().to_owned()),
        ));
    }
    Ok(NamedSecrets(out))
}

/// One line for a missing or invalid setting; `None` for other clap outcomes
/// (help, version, unknown subcommand), which clap prints itself. `command`
/// is what was parsed, for the settings' environment variables.
pub fn setting_error_line(err: &clap::Error, command: &clap::Command) -> Option<String> {
    let args = match err.get(ContextKind::InvalidArg)? {
        ContextValue::String(arg) => vec![arg.clone()],
        ContextValue::Strings(args) => args.clone(),
        _ => return None,
    };
    let names: Vec<String> = args.iter().map(|arg| describe_arg(command, arg)).collect();
    match err.kind() {
        ErrorKind::MissingRequiredArgument => Some(format!("missing setting {}", names.join(", "))),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue => {
            // The cause names the problem; the value itself is never echoed (it may be a secret).
            let reason = std::error::Error::source(err)
                .map(|cause| cause.to_string())
                .unwrap_or_else(|| match err.get(ContextKind::ValidValue) {
                    Some(ContextValue::Strings(valid)) => {
                        format!("expected one of {}", valid.join(", "))
                    }
                    _ => "invalid value".to_owned(),
                });
            Some(format!("invalid setting {}: {reason}", names.join(", ")))
        }
        _ => None,
    }
}

/// `--phala-api-key <PHALA_API_KEY>` → `APPROVAL_BRIDGE_PHALA_API_KEY (--phala-api-key)`.
fn describe_arg(command: &clap::Command, arg: &str) -> String {
    let flag = arg.split_whitespace().next().unwrap_or(arg);
    let long = flag.trim_start_matches('-');
    let env = find_env(command, long);
    match env {
        Some(env) => format!("{env} ({flag})"),
        None => flag.to_owned(),
    }
}

fn find_env(command: &clap::Command, long: &str) -> Option<String> {
    command
        .get_arguments()
        .find(|arg| arg.get_long() == Some(long))
        .and_then(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .or_else(|| {
            command
                .get_subcommands()
                .find_map(|sub| find_env(sub, long))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_found_by_any_spelling_of_the_address_or_by_user_name() {
        let names = parse_names(
            "0x976EA74026E726554dB657fA54763abd0C3a0aa9=Alice, ops@example.com = Ops team",
        )
        .unwrap();
        assert_eq!(
            names.of("0x976ea74026e726554db657fa54763abd0c3a0aa9"),
            Some("Alice")
        );
        assert_eq!(
            names.of("0x976EA74026E726554dB657fA54763abd0C3a0aa9"),
            Some("Alice")
        );
        assert_eq!(names.of("ops@example.com"), Some("Ops team"));
        assert_eq!(names.of("0x0000000000000000000000000000000000000001"), None);
        assert_eq!(parse_names("").unwrap(), Names::default());
    }

    #[test]
    fn bad_names_are_refused_with_the_entry() {
        for (bad, says) in [
            ("0x976E=Alice", "not an address"),
            ("Alice", "not `address=Name`"),
            ("ops@example.com=", "printable"),
            ("a b=Alice", "neither an address"),
            (
                "0x976EA74026E726554dB657fA54763abd0C3a0aa9=A,0x976ea74026e726554db657fa54763abd0c3a0aa9=B",
                "named twice",
            ),
        ] {
            let err = parse_names(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn named_secrets_parse_and_never_show_in_debug() {
        let parsed = parse_named_secrets("ci=supersecret1, deploy = supersecret2").unwrap();
        assert_eq!(parsed.0.len(), 2);
        assert_eq!(parsed.0[1].0, "deploy");
        assert_eq!(parsed.0[1].1.expose_secret(), "supersecret2");
        let debug = format!("{parsed:?}");
        assert!(!debug.contains("supersecret"), "{debug}");
    }

    #[test]
    fn named_secret_errors_do_not_echo_the_secret() {
        for bad in [
            "nosecret",
            "a=short",
            "bad name=longenough1",
            "x=longenough1,x=longenough2",
        ] {
            let err = parse_named_secrets(bad).unwrap_err();
            assert!(!err.contains("longenough"), "{err}");
        }
        assert!(parse_named_secrets("").unwrap().is_empty());
    }

    #[test]
    fn page_callers_are_named_by_checksummed_address_or_user() {
        let scopes = parse_scopes(
            "web:0x976ea74026e726554db657fa54763abd0c3a0aa9=web-prod,web:ops@example.com=*",
        )
        .unwrap();
        assert_eq!(
            scopes.0[0].0,
            "web:0x976EA74026E726554dB657fA54763abd0C3a0aa9"
        );
        assert_eq!(scopes.0[1].0, "web:ops@example.com");
        assert!(parse_scopes("web:0x12=*").is_err());
    }

    #[test]
    fn the_admin_grant_is_written_with_a_plus_and_nothing_else_is() {
        let scopes = parse_scopes("api:ops=web-prod|+admin,api:audit=+admin").unwrap();
        assert_eq!(
            scopes.0[0].1,
            vec![SourcePattern::Name("web-prod".into()), SourcePattern::Admin]
        );
        assert_eq!(scopes.0[1].1, vec![SourcePattern::Admin]);
        // A CVM may be called `admin`: that is a name, not the grant.
        assert_eq!(
            parse_scopes("api:ops=admin").unwrap().0[0].1,
            vec![SourcePattern::Name("admin".into())]
        );
        let err = parse_scopes("api:ops=+root").unwrap_err();
        assert!(err.contains("+admin"), "{err}");
    }

    #[test]
    fn notify_urls_must_be_http_and_errors_do_not_echo_them() {
        let ok = parse_notify_urls(
            "slack=https://hooks.example/T0/B0/secret1, ops=http://10.0.0.2:9000/in",
        )
        .unwrap();
        assert_eq!(ok.0.len(), 2);
        for bad in [
            "slack=ftp://hooks.example/secret1",
            "slack=hooks.example/secret12345",
            "slack=javascript:alert(1)//secret1",
        ] {
            let err = parse_notify_urls(bad).unwrap_err();
            assert_eq!(err, "`slack`: the URL must be an http:// or https:// URL");
        }
    }

    #[test]
    fn database_url_errors_do_not_echo_the_url() {
        let err = parse_database_url("mysql://user:hunter2@host/db").unwrap_err();
        assert!(!err.contains("hunter2"));
    }
}
