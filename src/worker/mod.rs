//! The background workers: claim a due request, run the step its status
//! calls for, and record the outcome, fenced by the claim's lease.
//!
//! A claim is a short transaction; the step's network calls run with no
//! transaction open. Several processes can share one database: `SKIP LOCKED`
//! and the lease keep two workers from running the same step.
//!
//! All of this is shared by every kind of change; the kind chooses only the
//! Phala calls of a step, in [`change`].

pub(crate) mod backoff;
mod change;
mod commit;
mod owner;
mod prepare;
mod propose;
mod queue;
mod reconcile;
mod retention;
mod scope;
mod signing;
mod track;
mod watch;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span};

use crate::clock::Clock;
use crate::config::{RetentionSettings, WorkerSettings};
use crate::domain::{Actor, Event, Failure, Status};
use crate::phala::{PhalaClient, PhalaError};
use crate::safe::SafeFlow;
use crate::store::{
    AwaitedOutcome, Changes, Claimed, Lane, Lease, Store, StoreError, StoredError, WAKE_CHANNEL,
};

pub use propose::usable_safe;

/// How long a request waits while another request of its source holds the
/// source's lock. The holder's release wakes the next waiter at once (see
/// `store::source_locks`): this only bounds a wake that found no waiter to
/// take, and keeps a long queue of one source from churning through claims.
const SOURCE_BUSY_WAIT: Duration = Duration::from_secs(5);

/// What a step decided. [`Worker::apply`] writes it.
// One value per step, moved once: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Outcome {
    /// Move on by `event`, setting `changes`.
    Advance {
        event: Event,
        changes: Changes,
        message: Option<String>,
    },
    /// A transient failure: spend an attempt, retry with backoff.
    Retry(StoredError),
    /// A permanent failure.
    Fail(StoredError),
    /// Wait without spending an attempt.
    Snooze(Duration),
    /// A create or commit got no answer: keep its marker and the source lock,
    /// and look for the replica later (see [`reconcile`]).
    AwaitOutcome(AwaitedOutcome),
}

impl Outcome {
    fn advance(event: Event) -> Self {
        Outcome::Advance {
            event,
            changes: Changes::default(),
            message: None,
        }
    }

    /// The same advance, also recording CVMs that only this request's calls
    /// can explain besides its replica (see [`reconcile`]).
    fn with_extra_replicas(mut self, extra: Vec<String>) -> Self {
        if let Outcome::Advance { changes, .. } = &mut self {
            changes.extra_replicas = extra;
        }
        self
    }

    /// What happened, as the step-duration metric names it.
    fn label(&self) -> &'static str {
        match self {
            Outcome::Advance { .. } => "advance",
            Outcome::Retry(_) => "retry",
            Outcome::Fail(_) => "fail",
            Outcome::Snooze(_) => "snooze",
            Outcome::AwaitOutcome(_) => "await_outcome",
        }
    }

    /// A Phala failure: retried if transient, final otherwise.
    fn from_phala(err: &PhalaError) -> Self {
        let stored = stored_phala_error(err);
        if err.is_transient() {
            Outcome::Retry(stored)
        } else {
            Outcome::Fail(stored)
        }
    }
}

/// What a task that panicked said.
pub(crate) fn panic_message(err: tokio::task::JoinError) -> String {
    if err.is_cancelled() {
        return "it was cancelled".to_owned();
    }
    let panic = err.into_panic();
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    format!("it panicked: {message}")
}

pub fn stored_phala_error(err: &PhalaError) -> StoredError {
    StoredError {
        code: err.stored_code(),
        message: err.to_string(),
        suggestion: err.suggestion().map(str::to_owned),
    }
}

#[derive(Clone, Debug)]
pub struct Worker {
    store: Store,
    phala: PhalaClient,
    clock: Clock,
    settings: WorkerSettings,
    /// `None` when no Safe is configured: nothing is proposed.
    safe_flow: Option<SafeFlow>,
    retention: RetentionSettings,
    /// The leases this process's steps hold right now, given back when a
    /// shutdown cannot wait for the steps to finish.
    held: Arc<std::sync::Mutex<HashMap<uuid::Uuid, Lease>>>,
}

impl Worker {
    pub fn new(store: Store, phala: PhalaClient, clock: Clock, settings: WorkerSettings) -> Self {
        Worker {
            store,
            phala,
            clock,
            settings,
            safe_flow: None,
            retention: RetentionSettings::default(),
            held: Arc::default(),
        }
    }

    pub fn with_safe_flow(mut self, flow: SafeFlow) -> Self {
        self.safe_flow = Some(flow);
        self
    }

    pub fn with_retention(mut self, retention: RetentionSettings) -> Self {
        self.retention = retention;
        self
    }

    pub fn safe_flow(&self) -> Option<&SafeFlow> {
        self.safe_flow.as_ref()
    }

    /// One pass of the Safe flow: post stored proposals, plan new ones.
    /// `true` when something moved.
    pub async fn propose_once(&self) -> anyhow::Result<bool> {
        propose::run(self).await
    }

    /// One pass of the chain follower: executions, confirmations, replaced
    /// and expired proposals. `true` when something moved.
    pub async fn watch_once(&self) -> anyhow::Result<bool> {
        watch::run(self).await
    }

    /// One pass of the replica tracker: one status call for every
    /// provisioning replica. `true` when a request moved on.
    pub async fn track_once(&self) -> anyhow::Result<bool> {
        Ok(track::run(self, None).await?.moved)
    }

    fn lease_duration(&self) -> Duration {
        Duration::from_secs(self.settings.lease_secs)
    }

    /// Claims one due request and runs its step. `false` when nothing was due.
    pub async fn run_once(&self) -> anyhow::Result<bool> {
        self.run_once_in(Lane::All).await
    }

    /// [`Self::run_once`], for a request of `lane` only.
    pub async fn run_once_in(&self, lane: Lane) -> anyhow::Result<bool> {
        let now = self.clock.now();
        let Some(claimed) = self
            .store
            .claim_due(now, self.lease_duration(), lane)
            .await?
        else {
            return Ok(false);
        };
        let lease = claimed.lease;
        self.held_leases().insert(lease.request_id, lease);
        let result = tokio::select! {
            biased;
            result = self.step(&claimed) => result,
            never = self.heartbeat(&lease) => match never {},
        };
        self.held_leases().remove(&lease.request_id);
        result
    }

    fn held_leases(&self) -> std::sync::MutexGuard<'_, HashMap<uuid::Uuid, Lease>> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Renews the lease every third of its length while the step runs, so a
    /// slow Phala answer never hands the request to a second worker. Once the
    /// lease is lost the step's fenced writes fail by themselves.
    async fn heartbeat(&self, lease: &Lease) -> std::convert::Infallible {
        let every = self.lease_duration() / 3;
        loop {
            tokio::time::sleep(every).await;
            match self.store.renew_lease(lease, self.lease_duration()).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(err) => tracing::warn!(error = %err, "cannot renew a lease; retrying"),
            }
        }
        tracing::warn!(replica_id = %lease.request_id, "lease lost while the step runs");
        std::future::pending().await
    }

    async fn step(&self, claimed: &Claimed) -> anyhow::Result<bool> {
        let request = &claimed.request;
        // `request_id` is the HTTP request that queued it: one id finds intake and every step.
        let span = info_span!(
            "step",
            replica_id = %request.id,
            request_id = request.http_request_id.as_deref().unwrap_or(""),
            state = %request.status(),
            attempt = request.attempts + 1,
        );
        async {
            let started = std::time::Instant::now();
            let outcome = match request.status() {
                Status::Queued => Ok(Outcome::advance(Event::StartPrepare)),
                Status::Preparing => change::step(self, claimed, change::Stage::Prepare).await,
                Status::Committing => change::step(self, claimed, change::Stage::Commit).await,
                other => unreachable!("claimed a request in `{other}`, which is not workable"),
            };
            let outcome = match outcome {
                Ok(outcome) => {
                    self.refuse_a_replica_owned_elsewhere(request, outcome)
                        .await
                }
                Err(err) => Err(err),
            };
            let label = match &outcome {
                Ok(outcome) => outcome.label(),
                Err(_) => "error",
            };
            let committed_after_execution = match &outcome {
                Ok(Outcome::Advance {
                    event: Event::Committed,
                    ..
                }) if request.proposal_id.is_some() => self
                    .store
                    .entered_status_at(request.id, Status::Committing)
                    .await
                    .ok()
                    .flatten(),
                _ => None,
            };
            let result = match outcome {
                Ok(outcome) => self.apply(claimed, outcome).await,
                Err(err) => Err(err),
            };
            let lease_lost = matches!(
                result
                    .as_ref()
                    .err()
                    .and_then(|e| e.downcast_ref::<StoreError>()),
                Some(StoreError::LeaseLost(_))
            );
            crate::metrics::record_step(
                request.status().as_str(),
                if lease_lost { "lease_lost" } else { label },
                started.elapsed(),
            );
            if result.is_ok()
                && let Some(entered) = committed_after_execution
            {
                let waited = (self.clock.now() - entered).to_std().unwrap_or_default();
                metrics::histogram!(crate::metrics::EXECUTION_TO_COMMIT)
                    .record(waited.as_secs_f64());
            }
            match result {
                Ok(()) => Ok(true),
                // Another worker owns the row now; what this one did is void.
                Err(_) if lease_lost => {
                    metrics::counter!(crate::metrics::LEASES_LOST).increment(1);
                    tracing::warn!("lease lost; leaving the request to its new holder");
                    Ok(true)
                }
                Err(err) => Err(err),
            }
        }
        .instrument(span)
        .await
    }

    /// One CVM is one request's replica. A step that would record a replica
    /// another request already owns (Phala answered with an id it gave
    /// before) fails its request with a clear error instead of wedging on
    /// the database's uniqueness check.
    async fn refuse_a_replica_owned_elsewhere(
        &self,
        request: &crate::store::ReplicaRequest,
        outcome: Outcome,
    ) -> anyhow::Result<Outcome> {
        let Outcome::Advance { changes, .. } = &outcome else {
            return Ok(outcome);
        };
        let Some(vm_uuid) = changes.replica_vm_uuid.as_deref() else {
            return Ok(outcome);
        };
        let owners = self
            .store
            .replicas_owned_by_others(request.id, &[reconcile::normalize(vm_uuid)])
            .await?;
        if owners.is_empty() {
            return Ok(outcome);
        }
        Ok(Outcome::Fail(StoredError::of(
            Failure::ReplicaIdReused,
            &format!(
                "Phala answered with replica {vm_uuid}, which another request of this bridge already owns"
            ),
        )))
    }

    /// Runs steps, Safe-flow and tracker passes until nothing is due. Tests drive the
    /// workers with this.
    pub async fn drain(&self) -> anyhow::Result<usize> {
        let mut steps = 0;
        loop {
            while self.run_once().await? {
                steps += 1;
            }
            let proposed = self.propose_once().await?;
            let watched = self.watch_once().await?;
            let tracked = self.track_once().await?;
            if !proposed && !watched && !tracked {
                return Ok(steps);
            }
        }
    }

    async fn apply(&self, claimed: &Claimed, outcome: Outcome) -> anyhow::Result<()> {
        let request = &claimed.request;
        let lease = &claimed.lease;
        let now = self.clock.now();
        let status = request.status();
        match outcome {
            Outcome::Advance {
                event,
                changes,
                message,
            } => {
                let to = self
                    .store
                    .advance(
                        lease,
                        now,
                        status,
                        event,
                        &Actor::Worker,
                        message.as_deref(),
                        changes,
                    )
                    .await?;
                tracing::info!(to = %to, "request moved on");
            }
            Outcome::Snooze(wait) => {
                self.store
                    .snooze(lease, now, now + chrono::Duration::from_std(wait)?)
                    .await?;
            }
            Outcome::AwaitOutcome(wait) => {
                tracing::warn!(code = %wait.error.code, check_at = %wait.check_at, "call outcome unknown; reconciling");
                self.store.await_outcome(lease, now, status, &wait).await?;
            }
            Outcome::Fail(error) => {
                tracing::warn!(code = %error.code, message = %error.message, "request failed");
                self.fail(claimed, error).await?;
            }
            Outcome::Retry(error) => {
                let attempts = request.attempts as u32 + 1;
                if attempts >= self.settings.max_attempts {
                    let error = StoredError {
                        message: format!("gave up after {attempts} attempts: {}", error.message),
                        ..error
                    };
                    tracing::warn!(code = %error.code, "attempts exhausted");
                    self.fail(claimed, error).await?;
                } else {
                    let wait = backoff::delay(
                        request.attempts as u32,
                        Duration::from_secs(self.settings.backoff_base_secs),
                        Duration::from_secs(self.settings.backoff_max_secs),
                    );
                    tracing::info!(code = %error.code, retry_in = ?wait, "transient error; retrying later");
                    self.store
                        .retry_later(
                            lease,
                            now,
                            status,
                            &error,
                            now + chrono::Duration::from_std(wait)?,
                        )
                        .await?;
                }
            }
        }
        Ok(())
    }

    async fn fail(&self, claimed: &Claimed, error: StoredError) -> anyhow::Result<()> {
        let changes = Changes {
            error: Some(error),
            ..Changes::default()
        };
        self.store
            .advance(
                &claimed.lease,
                self.clock.now(),
                claimed.request.status(),
                Event::Fail,
                &Actor::Worker,
                None,
                changes,
            )
            .await?;
        Ok(())
    }

    /// Runs `count` worker tasks, and one more that only commits, until
    /// `shutdown`. One LISTEN connection wakes them; polling at the configured
    /// interval covers lost notifications.
    ///
    /// Returns an error when the LISTEN connection cannot be had, or when one
    /// of its tasks (a worker, the Safe flow's jobs, the retention job) ends
    /// while `shutdown` is not cancelled: the others are then stopped as on a
    /// shutdown, and the caller makes the process exit, so a supervisor
    /// restarts it instead of it answering with nothing behind it.
    pub async fn run(self, count: usize, shutdown: CancellationToken) -> anyhow::Result<()> {
        let wake = Arc::new(Notify::new());
        let mut listener = PgListener::connect_with(self.store.pool())
            .await
            .context("cannot open the LISTEN connection")?;
        listener
            .listen(WAKE_CHANNEL)
            .await
            .context("cannot LISTEN on the wake-up channel")?;

        // Stops the tasks on a shutdown, or once one of them has ended.
        let stop = shutdown.child_token();
        let mut tasks = tokio::task::JoinSet::new();
        let mut names = HashMap::new();
        // The Safe flow's planners and followers, each on its own leased task.
        if self.safe_flow.is_some() {
            let task = tasks.spawn(owner::run(self.clone(), wake.clone(), stop.clone()));
            names.insert(task.id(), "the Safe flow".to_owned());
        }
        let retention = self.clone();
        let task = tasks.spawn({
            let stop = stop.clone();
            async move {
                retention.run_retention(stop).await;
                Ok(())
            }
        });
        names.insert(task.id(), "the retention job".to_owned());
        // The commit lane: once a Safe transaction executes, its commits
        // start at once, however many requests the other workers have queued.
        let lanes = std::iter::once(Lane::Commits).chain(std::iter::repeat_n(Lane::All, count));
        for (index, lane) in lanes.enumerate() {
            let worker = self.clone();
            let wake = wake.clone();
            let stop = stop.clone();
            let task = tasks.spawn(async move {
                worker.work_loop(index, lane, wake, stop).await;
                Ok(())
            });
            names.insert(task.id(), format!("worker {index} ({lane:?})"));
        }

        let stopped = loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break None,
                Some(ended) = tasks.join_next_with_id() => {
                    if stop.is_cancelled() {
                        break None;
                    }
                    let (id, why) = match ended {
                        Ok((id, Ok(()))) => (id, "it returned".to_owned()),
                        Ok((id, Err(err))) => (id, format!("{err:#}")),
                        Err(err) => (err.id(), panic_message(err)),
                    };
                    let name = names.get(&id).map_or("a worker task", String::as_str);
                    let why = format!("{name} stopped: {why}");
                    tracing::error!(reason = %why, "a background task stopped; stopping the others");
                    break Some(why);
                }
                notification = listener.try_recv() => match notification {
                    Ok(_) => wake.notify_waiters(),
                    // The connection dropped; sqlx reconnects on the next call. Wake
                    // everyone in case a notification was lost in between.
                    Err(err) => {
                        tracing::warn!(error = %err, "LISTEN connection error; polling until it is back");
                        wake.notify_waiters();
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
            }
        };
        stop.cancel();
        // Steps under way finish (each call has a timeout); past the grace
        // period they are dropped and their leases given back. Dropping a step
        // is safe at any point: a create or commit is marked before it is sent.
        let grace = Duration::from_secs(self.settings.shutdown_grace_secs);
        let finished =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if finished.is_err() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            let held: Vec<Lease> = self.held_leases().drain().map(|(_, l)| l).collect();
            tracing::warn!(
                steps = held.len(),
                "shutdown grace period over; giving the unfinished steps' leases back"
            );
            for lease in held {
                if let Err(err) = self.store.release_lease(&lease).await {
                    tracing::warn!(error = %err, "cannot give a lease back; it expires by itself");
                }
            }
        }
        match stopped {
            Some(why) => Err(anyhow::anyhow!(why)),
            None => Ok(()),
        }
    }

    async fn work_loop(
        &self,
        index: usize,
        lane: Lane,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
    ) {
        let poll = Duration::from_secs(self.settings.poll_interval_secs);
        while !shutdown.is_cancelled() {
            let notified = wake.notified();
            match self.run_once_in(lane).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(err) => tracing::error!(
                    worker = index,
                    lane = ?lane,
                    error = format!("{err:#}"),
                    "worker step failed"
                ),
            }
            let wait = match self.store.next_due_at(lane).await {
                Ok(Some(due)) => (due - self.clock.now())
                    .to_std()
                    .unwrap_or_default()
                    .min(poll),
                _ => poll,
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = notified => {}
                _ = tokio::time::sleep(wait.max(Duration::from_millis(50))) => {}
            }
        }
    }
}

/// An address as the store keeps it: lowercase hex with `0x`.
fn lower(address: alloy::primitives::Address) -> String {
    format!("{address:#x}")
}
