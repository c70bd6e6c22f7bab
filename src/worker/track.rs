//! Tracking: every provisioning replica is polled with one
//! `POST /status/batch` per pass, whatever their number, so a replica that
//! runs is `done` within one pass (see [`EVERY`]) instead of waiting for a
//! per-replica poll. The tracker is a leased job (see `owner`): one process
//! polls at a time.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::change::{Follow, follow};
use super::reconcile::normalize;
use super::{Worker, stored_phala_error};
use crate::domain::{Event, Failure};
use crate::phala::CvmStatus;
use crate::store::{Changes, JobLease, StoredError, Tracked};

/// How often the tracker polls while a replica is provisioning: a replica
/// that runs is seen within this time, at the cost of one call per pass.
pub(super) const EVERY: Duration = Duration::from_millis(500);
/// Statuses from which a CVM will not reach `running` by itself.
const FAILED_STATUSES: [&str; 5] = ["error", "failed", "stopped", "terminated", "deleted"];

/// What one pass did.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Pass {
    /// Some request moved on (done or failed).
    pub moved: bool,
    /// Some replica was provisioning: poll again after [`EVERY`].
    pub tracking: bool,
}

/// One pass: a single status call for every provisioning replica.
/// `fence`: the tracker's lease (`None` when tests drain by hand); a write
/// it refuses ends the pass before any further call.
pub(super) async fn run(worker: &Worker, fence: Option<&JobLease>) -> anyhow::Result<Pass> {
    // Each kind is followed by its own calls (see `super::change`).
    let mut replicas = Vec::new();
    for tracked in worker.store.provisioning().await? {
        match follow(tracked.request.kind) {
            Follow::ReplicaStatus => replicas.push(tracked),
        }
    }
    follow_replicas(worker, replicas, fence).await
}

/// The replicas' status batch: one call for all of them.
async fn follow_replicas(
    worker: &Worker,
    tracked: Vec<Tracked>,
    fence: Option<&JobLease>,
) -> anyhow::Result<Pass> {
    if tracked.is_empty() {
        return Ok(Pass::default());
    }
    let now = worker.clock.now();
    let vm_uuids: Vec<String> = tracked
        .iter()
        .filter_map(|t| t.request.replica_vm_uuid.clone())
        .collect();
    let answer = if vm_uuids.is_empty() {
        Ok(HashMap::new())
    } else {
        worker.phala.status_batch(&vm_uuids).await
    };
    let statuses: Option<HashMap<String, CvmStatus>> = match answer {
        Ok(map) => Some(map.into_iter().map(|(k, v)| (normalize(&k), v)).collect()),
        Err(err) => {
            tracing::warn!(error = %err, replicas = vm_uuids.len(), "replica status poll failed; polling again");
            let ids: Vec<uuid::Uuid> = tracked.iter().map(|t| t.request.id).collect();
            let mut error = stored_phala_error(&err);
            error.message = format!("cannot read the replica's status: {}", error.message);
            worker
                .store
                .note_tracking_error(&ids, &error, fence)
                .await?;
            None
        }
    };
    let bounds = Bounds {
        missing: chrono::Duration::seconds(worker.settings.replica_missing_timeout_secs as i64),
        boot: chrono::Duration::seconds(worker.settings.replica_boot_timeout_secs as i64),
    };
    let mut pass = Pass {
        moved: false,
        tracking: true,
    };
    for t in &tracked {
        let seen = t.request.replica_vm_uuid.as_deref().and_then(|vm| {
            statuses
                .as_ref()
                .map(|all| all.get(&normalize(vm)).cloned())
        });
        match verdict(t, seen, now, &bounds) {
            Verdict::Running(status) => {
                let vm = t.request.replica_vm_uuid.as_deref().unwrap_or_default();
                let changes = Changes {
                    replica_status: Some(status),
                    ..Changes::default()
                };
                pass.moved |= worker
                    .store
                    .move_waiting(
                        &t.request,
                        Event::ReplicaRunning,
                        now,
                        &format!("replica {vm} is running"),
                        changes,
                        fence,
                    )
                    .await?;
            }
            Verdict::Failed(error) => {
                tracing::warn!(replica_id = %t.request.id, code = %error.code, "replica failed");
                let message = error.message.clone();
                let changes = Changes {
                    error: Some(error),
                    ..Changes::default()
                };
                pass.moved |= worker
                    .store
                    .move_waiting(&t.request, Event::Fail, now, &message, changes, fence)
                    .await?;
            }
            Verdict::SlowBoot(warning) => {
                if t.request.last_error_code.as_deref() != Some(warning.code.as_str()) {
                    tracing::warn!(replica_id = %t.request.id, "replica slow to boot");
                    worker
                        .store
                        .note_tracking_error(&[t.request.id], &warning, fence)
                        .await?;
                }
            }
            Verdict::Waiting(Some(status))
                if t.request.replica_status.as_deref() != Some(status.as_str()) =>
            {
                worker
                    .store
                    .note_replica_status(t.request.id, &status, now, fence)
                    .await?;
            }
            Verdict::Waiting(_) => {}
        }
    }
    Ok(pass)
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Running(String),
    Failed(StoredError),
    /// Booting for longer than half its bound: said on the request, once.
    SlowBoot(StoredError),
    /// Still starting; the status seen, if any.
    Waiting(Option<String>),
}

/// How long a replica may take: to be known to Phala at all, and to boot.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    missing: chrono::Duration,
    boot: chrono::Duration,
}

/// What one request's poll means. `seen`: `None` when the poll failed,
/// `Some(None)` when Phala does not know the replica. Only an answer from
/// Phala fails a request: a replica the tracker could not ask about may
/// well be running, so a failed poll only waits (its error is noted on the
/// request), however long Phala stays unreachable.
fn verdict(
    t: &Tracked,
    seen: Option<Option<CvmStatus>>,
    now: DateTime<Utc>,
    bounds: &Bounds,
) -> Verdict {
    let request = &t.request;
    let Some(vm_uuid) = request.replica_vm_uuid.as_deref() else {
        return Verdict::Failed(StoredError::of(
            Failure::MissingReplica,
            "Phala accepted the replica but sent no vm_uuid to follow",
        ));
    };
    let since = t.provisioning_since.unwrap_or(now);
    let answer = match seen {
        None => return Verdict::Waiting(None),
        // A replica can take a moment to appear, but not forever.
        Some(None) if now - since > bounds.missing => {
            return Verdict::Failed(StoredError::of(
                Failure::ReplicaNotFound,
                &format!(
                    "Phala accepted replica {vm_uuid}, but it has not been found for {} s",
                    bounds.missing.num_seconds()
                ),
            ));
        }
        Some(None) => return Verdict::Waiting(None),
        Some(Some(answer)) => answer,
    };
    let in_progress = answer.in_progress == Some(true);
    let status = answer.status.unwrap_or_default().to_lowercase();
    if status == "running" && !in_progress {
        return Verdict::Running(status);
    }
    if FAILED_STATUSES.contains(&status.as_str()) {
        return Verdict::Failed(StoredError::of(
            Failure::ReplicaFailed,
            &format!("replica {vm_uuid} stopped in status `{status}`"),
        ));
    }
    let booting = now - since;
    let shown = if status.is_empty() {
        request.replica_status.as_deref().unwrap_or("unknown")
    } else {
        &status
    };
    if booting > bounds.boot {
        return Verdict::Failed(StoredError::of(
            Failure::ReplicaTimeout,
            &format!(
                "replica {vm_uuid} did not reach `running` within {} minutes (Phala says `{shown}`)",
                bounds.boot.num_minutes()
            ),
        ));
    }
    if booting > bounds.boot / 2 {
        return Verdict::SlowBoot(StoredError::of(
            Failure::ReplicaSlowBoot,
            &format!(
                "replica {vm_uuid} has been booting for {} minutes (Phala says `{shown}`); the request fails if it does not run within {} minutes",
                booting.num_minutes(),
                bounds.boot.num_minutes()
            ),
        ));
    }
    Verdict::Waiting((!status.is_empty()).then_some(status))
}
