//! The tracking step: poll the new replica until it runs or fails.

use std::time::Duration;

use super::{Outcome, Worker};
use crate::domain::{Event, Status};
use crate::store::{Changes, Claimed, StoredError};

const POLL_EVERY: Duration = Duration::from_secs(5);
/// A replica that does not run within this time is reported failed.
const GIVE_UP_AFTER: chrono::Duration = chrono::Duration::minutes(30);
/// Statuses from which a CVM will not reach `running` by itself.
const FAILED_STATUSES: [&str; 5] = ["error", "failed", "stopped", "terminated", "deleted"];

pub(super) async fn run(worker: &Worker, claimed: &Claimed) -> anyhow::Result<Outcome> {
    let request = &claimed.request;
    let Some(vm_uuid) = request.replica_vm_uuid.as_deref() else {
        return Ok(Outcome::Fail(StoredError {
            code: "MISSING-REPLICA".into(),
            message: "Phala accepted the replica but sent no vm_uuid to follow".into(),
            suggestion: Some("Check the source's instances on the Phala dashboard.".into()),
        }));
    };
    let now = worker.clock.now();
    let since = worker
        .store
        .entered_status_at(request.id, Status::Provisioning)
        .await?
        .unwrap_or(now);
    let cvm = match worker.phala.get_cvm(vm_uuid).await {
        Ok(cvm) => cvm,
        // A replica can take a moment to appear, but not forever.
        Err(err) if err.status() == Some(404) => {
            let bound = worker.settings.replica_missing_timeout_secs;
            if now - since > chrono::Duration::seconds(bound as i64) {
                return Ok(Outcome::Fail(StoredError {
                    code: "REPLICA-NOT-FOUND".into(),
                    message: format!(
                        "Phala accepted replica {vm_uuid}, but it has not been found for {bound} s"
                    ),
                    suggestion: Some(
                        "Look at the source's instances on the Phala dashboard.".into(),
                    ),
                }));
            }
            return Ok(Outcome::Snooze(POLL_EVERY));
        }
        Err(err) => return Ok(Outcome::from_phala(&err)),
    };
    let status = cvm.status.unwrap_or_default().to_lowercase();
    if status == "running" && cvm.in_progress != Some(true) {
        return Ok(Outcome::Advance {
            event: Event::ReplicaRunning,
            changes: Changes {
                replica_status: Some(status),
                ..Changes::default()
            },
            message: Some(format!("replica {vm_uuid} is running")),
        });
    }
    if FAILED_STATUSES.contains(&status.as_str()) {
        return Ok(Outcome::Fail(StoredError {
            code: "REPLICA-FAILED".into(),
            message: format!("replica {vm_uuid} stopped in status `{status}`"),
            suggestion: Some("Look at the replica's logs on the Phala dashboard.".into()),
        }));
    }
    if now - since > GIVE_UP_AFTER {
        return Ok(Outcome::Fail(StoredError {
            code: "REPLICA-TIMEOUT".into(),
            message: format!(
                "replica {vm_uuid} did not reach `running` within 30 minutes (last status `{status}`)"
            ),
            suggestion: Some("Look at the replica on the Phala dashboard.".into()),
        }));
    }
    if request.replica_status.as_deref() != Some(status.as_str()) && !status.is_empty() {
        worker
            .store
            .set_replica_status(&claimed.lease, now, &status)
            .await?;
    }
    Ok(Outcome::Snooze(POLL_EVERY))
}
