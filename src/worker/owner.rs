//! One leased owner per Safe-flow task: the planner of each allowed Safe
//! (and one for requests elsewhere), the follower of each chain and the
//! replica tracker run on their own tasks, each as a job in `job_leases`.
//! Every process runs every job's task; only the holder of a job's lease
//! runs its passes. Request steps run on other tasks, so a backlog of them
//! cannot starve these.
//!
//! Why a lease table and not a session advisory lock: an advisory lock lives
//! as long as one connection, so it needs a connection kept aside per job,
//! is lost silently when that connection drops while the process works on
//! through others, and does not survive a transaction-mode pooler. A lease
//! row with the database's `now()` gives an explicit expiry the holder
//! renews by heartbeat, a fencing token that every write of a pass checks
//! in the same statement (see `store::job_leases`), and a takeover within
//! one lease when the holder dies. The heartbeat stops the passes of a
//! holder that notices its loss; the fence refuses the writes of one that
//! does not notice in time (a process paused past its lease, say).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span};

use super::Worker;
use super::propose::{self, PlanScope};
use super::{track, watch};
use crate::store::{Acquired, JobLease, StoreError};

/// A Safe-flow job.
#[derive(Debug, Clone)]
enum Job {
    Planner(PlanScope),
    Follower(i64),
    /// The replica tracker: one status poll for every provisioning replica.
    Tracker,
}

impl Job {
    fn name(&self) -> String {
        match self {
            Job::Planner(scope) => scope.job(),
            Job::Follower(chain_id) => format!("follower:{chain_id}"),
            Job::Tracker => "tracker".to_owned(),
        }
    }
}

/// Runs every Safe-flow job's task until `shutdown`; on shutdown each holder
/// gives its lease up, so another process takes over at once. A job's task
/// that ends before (a panic) ends this with an error naming it: a job
/// nobody runs must not go unnoticed (see [`Worker::run`]).
pub(super) async fn run(
    worker: Worker,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Some(flow) = worker.safe_flow.as_ref() else {
        return Ok(());
    };
    let mut jobs: Vec<Job> = PlanScope::all(flow).into_iter().map(Job::Planner).collect();
    // Chains of the allowed Safes, and any chain with proposals still open
    // (a Safe removed from the settings leaves its proposals to follow).
    let mut chains: Vec<i64> = flow.safes.0.iter().map(|(c, _)| *c as i64).collect();
    match worker.store.chains_to_follow().await {
        Ok(open) => chains.extend(open),
        Err(err) => tracing::warn!(error = %err, "cannot list the chains with open proposals"),
    }
    chains.sort_unstable();
    chains.dedup();
    jobs.extend(chains.into_iter().map(Job::Follower));
    jobs.push(Job::Tracker);

    let mut tasks = JoinSet::new();
    let mut names = HashMap::new();
    for job in jobs {
        let name = job.name();
        let span = info_span!("safe_flow_job", job = %name);
        let task = tasks
            .spawn(run_job(worker.clone(), job, wake.clone(), shutdown.clone()).instrument(span));
        names.insert(task.id(), name);
    }
    while let Some(ended) = tasks.join_next_with_id().await {
        if shutdown.is_cancelled() {
            continue;
        }
        let (id, why) = match ended {
            Ok((id, ())) => (id, "it returned".to_owned()),
            Err(err) => (err.id(), super::panic_message(err)),
        };
        let name = names.get(&id).map_or("?", String::as_str);
        anyhow::bail!("the Safe-flow job {name} stopped: {why}");
    }
    Ok(())
}

/// Takes the job whenever it is free, and runs its passes while it holds it.
async fn run_job(worker: Worker, job: Job, wake: Arc<Notify>, shutdown: CancellationToken) {
    let flow = worker.safe_flow.clone().expect("jobs run with a Safe flow");
    let name = job.name();
    let lease = flow.job_lease;
    while !shutdown.is_cancelled() {
        let wait = match worker
            .store
            .acquire_job(&name, flow.owner_id(), lease)
            .await
        {
            Ok(Acquired::Held(held)) => {
                tracing::info!(job = %name, token = held.token, "holding the Safe-flow job");
                hold(&worker, &job, &held, &wake, &shutdown).await;
                Duration::ZERO
            }
            // Wake when the other holder's lease runs out.
            Ok(Acquired::Busy { expires_in }) => {
                (expires_in + Duration::from_millis(50)).min(lease)
            }
            Err(err) => {
                tracing::warn!(job = %name, error = %err, "cannot take the Safe-flow job");
                Duration::from_secs(1).min(lease)
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Runs the job's passes until the lease is lost or `shutdown`, whichever
/// comes first; the pass under way is dropped at that moment (an open
/// transaction rolls back; every write is also guarded by row state).
async fn hold(
    worker: &Worker,
    job: &Job,
    held: &JobLease,
    wake: &Notify,
    shutdown: &CancellationToken,
) {
    let lease = worker
        .safe_flow
        .as_ref()
        .expect("jobs run with a Safe flow")
        .job_lease;
    tokio::select! {
        _ = shutdown.cancelled() => {
            if let Err(err) = worker.store.release_job(held).await {
                tracing::warn!(job = %held.job, error = %err, "cannot release the Safe-flow job; it expires by itself");
            }
        }
        _ = keep(worker, held, lease) => {
            tracing::warn!(job = %held.job, token = held.token, "lost the Safe-flow job; stopping its passes");
        }
        _ = passes(worker, job, held, wake) => {
            tracing::warn!(job = %held.job, token = held.token, "lost the Safe-flow job: a write was refused by its fencing token; stopping its passes");
        }
    }
}

/// Renews the lease every third of it; returns once it is lost, or once it
/// can no longer be proven held: two thirds of a lease after the last
/// renewal that got through, safely before it can expire in the database.
async fn keep(worker: &Worker, held: &JobLease, lease: Duration) {
    let mut last_renewed = Instant::now();
    loop {
        tokio::time::sleep(lease / 3).await;
        let sent = Instant::now();
        match tokio::time::timeout(lease / 3, worker.store.renew_job(held, lease)).await {
            Ok(Ok(true)) => last_renewed = sent,
            Ok(Ok(false)) => return,
            Ok(Err(err)) => {
                tracing::warn!(job = %held.job, error = %err, "cannot renew the Safe-flow job")
            }
            Err(_) => tracing::warn!(job = %held.job, "renewing the Safe-flow job timed out"),
        }
        if last_renewed.elapsed() >= lease * 2 / 3 {
            return;
        }
    }
}

/// The job's passes, back to back while they move things, else at the
/// planner's next due time or poll interval, or the follower's next block.
/// Returns once a write was refused because the lease is lost: that pass
/// stopped at the refused write, before any further call.
async fn passes(worker: &Worker, job: &Job, held: &JobLease, wake: &Notify) {
    let flow = worker
        .safe_flow
        .as_ref()
        .expect("jobs run with a Safe flow");
    let poll = flow
        .poll_interval
        .min(Duration::from_secs(worker.settings.poll_interval_secs));
    // A planner whose requests wait for a read of the head also wakes when
    // one is kept (the follower's poll).
    let head_read = match job {
        Job::Planner(PlanScope::Safe { chain_id, .. }) => flow.chain(*chain_id as u64),
        _ => None,
    }
    .map(|chain| chain.head_read());
    loop {
        let notified = wake.notified();
        let read = head_read.as_ref().map(|n| n.notified());
        let mut read_in = None;
        // The tracker polls every `track::EVERY` while replicas provision;
        // idle, it waits for one to start (a notification) or the poll.
        let mut tracker_idle = false;
        let (moved, wait) = match job {
            Job::Planner(scope) => {
                let pass =
                    propose::run_scope(worker, flow, scope, Some(held), propose::Pace::PerBlock)
                        .await;
                let due = match worker.store.next_plan_due_at().await {
                    Ok(Some(due)) => (due - worker.clock.now()).to_std().unwrap_or_default(),
                    _ => poll,
                };
                read_in = pass.as_ref().ok().and_then(|p| p.read_in);
                // Requests due now that wait for a read of the chain are
                // planned once it comes, not at once again.
                let wait = match read_in {
                    Some(read_in) if due.is_zero() => read_in,
                    Some(read_in) => read_in.min(due),
                    None => due,
                };
                (pass.map(|p| p.moved), wait.min(poll))
            }
            Job::Follower(chain_id) => {
                (watch::run_chain(worker, *chain_id, Some(held)).await, poll)
            }
            Job::Tracker => match track::run(worker, Some(held)).await {
                Ok(pass) => {
                    tracker_idle = !pass.tracking;
                    let wait = if pass.tracking { track::EVERY } else { poll };
                    (Ok(false), wait)
                }
                Err(err) => (Err(err), poll),
            },
        };
        let (wait, idle) = match moved {
            Ok(true) => (Duration::ZERO, false),
            Ok(false) => (wait, true),
            Err(err) if StoreError::job_lost(&err).is_some() => return,
            Err(err) => {
                tracing::error!(job = %held.job, error = format!("{err:#}"), "Safe-flow pass failed");
                (poll, false)
            }
        };
        match job {
            // Planners also wake when a request changes, and so does an idle
            // tracker.
            Job::Planner(_) | Job::Tracker => tokio::select! {
                _ = notified, if matches!(job, Job::Planner(_)) || tracker_idle => {}
                _ = async {
                    match read {
                        Some(read) => read.await,
                        None => std::future::pending().await,
                    }
                }, if read_in.is_some() => {}
                _ = tokio::time::sleep(wait.max(Duration::from_millis(50))) => {}
            },
            // Followers wait for the next block.
            Job::Follower(chain_id) if idle => watch::wait_for_block(worker, *chain_id).await,
            Job::Follower(_) => tokio::time::sleep(wait.max(Duration::from_millis(50))).await,
        }
    }
}
