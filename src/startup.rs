//! Building and running the service: `Application::build(settings)`, then
//! `port()`, then `run_until_stopped()`. Tests run the real app on port 0.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::chain::Chains;
use crate::clock::{self, Clock};
use crate::config::Settings;
use crate::notify::Notifier;
use crate::phala::{EnvKeyVerifier, Lookups, PhalaClient};
use crate::safe::SafeFlow;
use crate::store::{self, Store};
use crate::web::{self, Access, ApiTokens, AppState, OrderWriter, WebhookSecrets};
use crate::worker::Worker;

pub struct Application {
    listener: TcpListener,
    /// `APPROVAL_BRIDGE_OPS_LISTEN`: `/metrics` and `/readyz` apart.
    ops_listener: Option<TcpListener>,
    header_read_timeout: Duration,
    state: AppState,
    worker: Worker,
    notifier: Option<Notifier>,
    workers: usize,
    /// How long a process whose background task stopped stays up, not ready.
    grace: Duration,
    shutdown: CancellationToken,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_with_clock(settings, Clock::system()).await
    }

    pub async fn build_with_clock(settings: Settings, clock: Clock) -> anyhow::Result<Self> {
        settings.check()?;
        crate::telemetry::register_settings(&settings);
        let access = Access::new(
            &settings.trust,
            &settings.api_tokens,
            &settings.webhook_secrets,
        )?;
        let pool = store::connect(&settings.database).await?;
        store::migrate(&pool).await?;
        let store = Store::new(pool);
        // Every time is the database's, from the first one on.
        clock
            .sync(store.database_now())
            .await
            .context("cannot read the database's clock")?;
        let phala = PhalaClient::new(&settings.phala)?;
        if settings.api_tokens.is_empty() {
            tracing::warn!(
                "APPROVAL_BRIDGE_API_TOKENS is empty: every JSON API call will be refused"
            );
        }
        let listener = TcpListener::bind(settings.listen).await.with_context(|| {
            format!(
                "cannot listen on {} (APPROVAL_BRIDGE_LISTEN)",
                settings.listen
            )
        })?;
        let ops_listener = match settings.server.ops_listen {
            Some(address) => Some(TcpListener::bind(address).await.with_context(|| {
                format!("cannot listen on {address} (APPROVAL_BRIDGE_OPS_LISTEN)")
            })?),
            None => None,
        };
        if settings.server.server_secret.is_none() {
            tracing::warn!(
                "APPROVAL_BRIDGE_SERVER_SECRET is not set: the hashes of idempotent orders are \
                 keyed with a key derived from the Phala API key (rotating that key forgets the \
                 Idempotency-Keys in flight)"
            );
        }
        crate::metrics::handle();
        let shutdown = CancellationToken::new();
        let chains = Chains::new(&settings.safe.rpc_urls.0, settings.safe.eth_rpc_url.clone());
        let state = AppState {
            store: store.clone(),
            phala: phala.clone(),
            lookups: Lookups::new(phala.clone(), settings.phala.lookup_cache()),
            clock: clock.clone(),
            api_tokens: ApiTokens::new(&settings.api_tokens),
            webhook_secrets: WebhookSecrets::new(&settings.webhook_secrets),
            access,
            env_keys: EnvKeyVerifier::new(chains.clone(), &settings.trust),
            chains,
            ens: Default::default(),
            safes: settings.safe.safes.clone(),
            form_facts: Default::default(),
            page_auth: web::PageAuth::new(&settings),
            names: settings.web.names.clone(),
            readiness: web::health::Readiness::new(&settings.safe, shutdown.clone()),
            retention: settings.retention.clone(),
            orders: OrderWriter::new(
                store.clone(),
                clock.clone(),
                settings.retention.idempotency_key_ttl(),
                web::intake::answer,
            ),
            request_hasher: store::RequestHasher::new(
                settings.server.server_secret.as_ref(),
                &settings.phala.phala_api_key,
            ),
            ops_token: settings.server.ops_token.as_ref().map(|token| {
                ApiTokens::new(&crate::config::NamedSecrets(vec![(
                    "ops".to_owned(),
                    token.clone(),
                )]))
            }),
            client_limiter: web::ClientLimiter::new(&settings.server),
        };
        let safe_flow = SafeFlow::from_settings(&settings.safe)?;
        safe_flow.check_proposer().await?;
        let notifier = Notifier::from_settings(
            store.clone(),
            clock.clone(),
            &settings.notify,
            &settings.worker,
        )?;
        let worker = Worker::new(store, phala, clock, settings.worker.clone())
            .with_safe_flow(safe_flow)
            .with_retention(settings.retention.clone());
        Ok(Application {
            listener,
            ops_listener,
            header_read_timeout: settings.server.header_read_timeout(),
            state,
            worker,
            notifier,
            workers: settings.worker.workers,
            grace: Duration::from_secs(settings.worker.shutdown_grace_secs),
            shutdown,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
            .port()
    }

    /// The port of `APPROVAL_BRIDGE_OPS_LISTEN`, when it is set.
    pub fn ops_port(&self) -> Option<u16> {
        self.ops_listener.as_ref().map(|listener| {
            listener
                .local_addr()
                .expect("a bound listener has an address")
                .port()
        })
    }

    /// A worker over the same database and clients, for driving steps by hand.
    pub fn worker(&self) -> Worker {
        self.worker.clone()
    }

    /// The notifier (when targets are configured), for driving deliveries by hand.
    pub fn notifier(&self) -> Option<Notifier> {
        self.notifier.clone()
    }

    pub fn store(&self) -> Store {
        self.state.store.clone()
    }

    /// Cancelling it stops the server and the workers gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves HTTP and runs the workers until Ctrl-C, SIGTERM or the shutdown token.
    ///
    /// Should a background task (the worker pool with the Safe flow's jobs,
    /// the notifier) stop while the process is not shutting down, `/readyz`
    /// fails from then on, HTTP stays up for the shutdown grace period (so
    /// probes and load balancers see it go), and this returns an error: the
    /// process exits non-zero and its supervisor starts it again.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let shutdown = self.shutdown.clone();
        tokio::spawn(cancel_on_signal(listen_for_stop(), shutdown.clone()));
        tracing::info!(address = %self.listener.local_addr()?, workers = self.workers, "approval-bridge is serving");
        tokio::spawn(sync_clock(
            self.state.clock.clone(),
            self.state.store.clone(),
            shutdown.clone(),
        ));

        let mut background = JoinSet::new();
        let mut names = HashMap::new();
        if self.workers > 0 {
            let task = background.spawn(self.worker.run(self.workers, shutdown.clone()));
            names.insert(task.id(), "the worker pool");
        }
        // Delivered on tasks of their own: a slow target never holds up a step.
        if let Some(notifier) = self.notifier.filter(|_| self.workers > 0) {
            let stop = shutdown.clone();
            let task = background.spawn(async move {
                notifier.run(stop).await;
                Ok(())
            });
            names.insert(task.id(), "the notifier");
        }
        let readiness = self.state.readiness.clone();
        let grace = self.grace;
        let timeout = self.header_read_timeout;
        let ops = self.ops_listener.map(|listener| {
            tracing::info!(address = ?listener.local_addr().ok(), "serving /metrics and /readyz apart");
            web::server::serve(
                listener,
                web::ops_router(self.state.clone()),
                timeout,
                shutdown.clone(),
            )
        });
        let router = web::router(self.state, ops.is_some());
        let public = web::server::serve(self.listener, router, timeout, shutdown.clone());
        let server = async move {
            match ops {
                Some(ops) => tokio::try_join!(public, ops).map(|_| ()),
                None => public.await,
            }
        };
        let mut server = std::pin::pin!(server);

        let mut failure = None;
        let mut stopped = Ok(());
        let served = loop {
            tokio::select! {
                served = &mut server => break served,
                Some(ended) = background.join_next_with_id(), if failure.is_none() => {
                    // A task that ends on a shutdown is no failure: its result counts below.
                    if shutdown.is_cancelled() {
                        stopped = stopped.and(match ended {
                            Ok((_, result)) => result,
                            Err(err) => Err(anyhow::anyhow!(crate::worker::panic_message(err))),
                        });
                        continue;
                    }
                    let (id, why) = match ended {
                        Ok((id, Ok(()))) => (id, "it returned".to_owned()),
                        Ok((id, Err(err))) => (id, format!("{err:#}")),
                        Err(err) => (err.id(), crate::worker::panic_message(err)),
                    };
                    let name = names.get(&id).copied().unwrap_or("a background task");
                    let why = format!("{name} stopped: {why}");
                    tracing::error!(reason = %why, grace = ?grace, "a background task stopped; not ready, and exiting after the grace period");
                    readiness.task_stopped(why.clone());
                    failure = Some(why);
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = tokio::time::sleep(grace) => shutdown.cancel(),
                        }
                    });
                }
            }
        };
        let served = served.context("the HTTP server failed");
        shutdown.cancel();
        while let Some(ended) = background.join_next().await {
            let result = ended
                .context("a background task panicked")
                .and_then(|result| result);
            stopped = stopped.and(result);
        }
        if let Some(why) = failure {
            anyhow::bail!("{why}");
        }
        served?;
        stopped
    }
}

/// Learns the database's time again every [`clock::SYNC_EVERY`]; a failed
/// read keeps the offset learnt last.
async fn sync_clock(clock: Clock, store: Store, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(clock::SYNC_EVERY) => {}
        }
        if let Err(err) = clock.sync(store.database_now()).await {
            tracing::warn!(error = %err, "cannot read the database's clock; keeping the last offset");
        }
    }
}

/// Ctrl-C or SIGTERM, listened for from the moment this is called. Call it
/// before the process announces itself: a stop sent as soon as the
/// announcement is read would otherwise meet the default action and kill
/// the process before anything it started is stopped.
pub fn listen_for_stop() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (terminate, interrupt) {
                (Ok(mut terminate), Ok(mut interrupt)) => {
                    tokio::select! {
                        _ = terminate.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                _ => std::future::pending().await,
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn cancel_on_signal(stop: impl Future<Output = ()>, shutdown: CancellationToken) {
    tokio::select! {
        _ = stop => {}
        _ = shutdown.cancelled() => return,
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
