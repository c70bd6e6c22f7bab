//! Calls that must not repeat: a direct create and a commit each make a CVM.
//!
//! Before such a call the step records the app's instances and sets a marker.
//! A refusal from Phala clears the marker. An answer that never came (a
//! timeout, a reset, a 5xx of any shape) leaves it set, and the source lock
//! stays with the request. The next run of the step then asks Phala's
//! instance list what happened instead of guessing:
//! - a new instance of the app on the requested node and compose hash, that no
//!   other request owns: that call created it, and the request moves on;
//! - nothing yet, within the settle time: look again later;
//! - nothing after the settle time: the call did not take effect, so it is
//!   sent again (the same commit token);
//! - the list cannot be read: keep asking, up to a bound, then fail with a
//!   clear error.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Outcome, Worker};
use crate::phala::{CvmInfo, PhalaError};
use crate::store::{Claimed, ReplicaRequest, StoredError};

/// How often to ask again while Phala's instance list cannot be read.
const UNREADABLE_RETRY: Duration = Duration::from_secs(10);

/// What the instance list says about the unanswered call.
#[derive(Debug)]
pub(super) enum Reconciled {
    /// The call created this replica.
    Found {
        vm_uuid: String,
        status: Option<String>,
    },
    /// Nothing yet; look again at this time.
    LookAgainAt(DateTime<Utc>, StoredError),
    /// Nothing appeared within the settle time: the call did not take effect.
    NotCreated,
    /// The outcome stayed unknown for too long.
    GiveUp(StoredError),
}

/// The answer never came: keep the marker and look for the replica once the
/// settle time has passed.
pub(super) fn outcome_unknown(call: &str, worker: &Worker, err: &PhalaError) -> Outcome {
    let at = worker.clock.now()
        + chrono::Duration::seconds(worker.settings.reconcile_settle_secs as i64);
    Outcome::AwaitOutcome {
        at,
        error: StoredError {
            code: format!("{}-OUTCOME-PENDING", call.to_uppercase()),
            message: format!(
                "the {call} call got no usable answer ({}); looking for the replica before sending anything again",
                err
            ),
            suggestion: Some(
                "Nothing to do: the bridge checks Phala's instance list and goes on by itself."
                    .into(),
            ),
        },
    }
}

/// The app's instances before the call, to compare with after an unanswered
/// one. Normalized so that dashes and case never hide a match. A call sent
/// again after reconciliation keeps the list taken before the first one, so
/// Phala is asked only when there is none yet.
pub(super) async fn instances_before_call(
    worker: &Worker,
    request: &ReplicaRequest,
) -> Result<Vec<String>, PhalaError> {
    if let Some(before) = &request.instances_before {
        return Ok(before.clone());
    }
    let Some(app) = app_path(request) else {
        return Ok(Vec::new());
    };
    match worker.phala.app_cvms(&app).await {
        Ok(cvms) => Ok(cvms
            .iter()
            .filter_map(|c| c.vm_uuid.as_deref().map(normalize))
            .collect()),
        // An app with no instance listed yet (the simulator and Phala answer 404).
        Err(err) if err.status() == Some(404) => Ok(Vec::new()),
        Err(err) => Err(err),
    }
}

/// Looks for the replica the request's unanswered call may have created.
pub(super) async fn reconcile(
    worker: &Worker,
    claimed: &Claimed,
    call: &str,
) -> anyhow::Result<Reconciled> {
    let request = &claimed.request;
    let now = worker.clock.now();
    let sent_at = request.call_sent_at.unwrap_or(now);
    let unknown_since = request.outcome_unknown_since.unwrap_or(sent_at);
    let settings = &worker.settings;
    let bound = chrono::Duration::seconds(settings.unknown_outcome_timeout_secs as i64);

    let listed = match app_path(request) {
        Some(app) => worker.phala.app_cvms(&app).await,
        None => Err(PhalaError::InvalidResponse(
            "the request has no app id to list instances of".into(),
        )),
    };
    let cvms = match listed {
        Ok(cvms) => cvms,
        Err(err) if err.status() == Some(404) => Vec::new(),
        Err(err) => {
            if now - unknown_since > bound {
                return Ok(Reconciled::GiveUp(StoredError {
                    code: format!("{}-OUTCOME-UNKNOWN", call.to_uppercase()),
                    message: format!(
                        "the {call} call got no answer, and Phala's instance list could not be read for {} s since: {err}",
                        settings.unknown_outcome_timeout_secs
                    ),
                    suggestion: Some(
                        "Check the source's instances on the Phala dashboard; queue again only if no replica was created."
                            .into(),
                    ),
                }));
            }
            let error = StoredError {
                code: format!("{}-OUTCOME-PENDING", call.to_uppercase()),
                message: format!(
                    "the {call} call got no answer; Phala's instance list cannot be read yet: {err}"
                ),
                suggestion: Some(
                    "The bridge keeps looking for the replica before it sends anything again."
                        .into(),
                ),
            };
            return Ok(Reconciled::LookAgainAt(
                now + chrono::Duration::from_std(UNREADABLE_RETRY)?,
                error,
            ));
        }
    };

    let candidates: Vec<&CvmInfo> = cvms
        .iter()
        .filter(|cvm| created_by_this_request(request, cvm))
        .collect();
    let uuids: Vec<String> = candidates
        .iter()
        .filter_map(|c| c.vm_uuid.as_deref().map(normalize))
        .collect();
    let owned = worker
        .store
        .replicas_owned_by_others(request.id, &uuids)
        .await?;
    if let Some(cvm) = candidates.into_iter().find(|c| {
        c.vm_uuid
            .as_deref()
            .is_some_and(|v| !owned.iter().any(|o| normalize(o) == normalize(v)))
    }) {
        return Ok(Reconciled::Found {
            vm_uuid: cvm.vm_uuid.clone().unwrap_or_default(),
            status: cvm.status.clone(),
        });
    }

    let settle_until = sent_at + chrono::Duration::seconds(settings.reconcile_settle_secs as i64);
    if now < settle_until {
        return Ok(Reconciled::LookAgainAt(
            settle_until,
            StoredError {
                code: format!("{}-OUTCOME-PENDING", call.to_uppercase()),
                message: format!(
                    "the {call} call got no answer; looking for the replica in Phala's instance list"
                ),
                suggestion: Some(
                    "Nothing is sent again until the instance list shows whether it was created."
                        .into(),
                ),
            },
        ));
    }
    Ok(Reconciled::NotCreated)
}

/// A listed instance that the request's unanswered call may have created: new
/// since the call, not the source itself, on the requested node (if one was
/// asked for) and with the request's compose hash (if known).
fn created_by_this_request(request: &ReplicaRequest, cvm: &CvmInfo) -> bool {
    let Some(vm_uuid) = cvm.vm_uuid.as_deref().map(normalize) else {
        return false;
    };
    let before = request.instances_before.as_deref().unwrap_or_default();
    if before.iter().any(|b| normalize(b) == vm_uuid) {
        return false;
    }
    if vm_uuid == normalize(&request.source_vm_uuid) {
        return false;
    }
    if let Some(node) = request.node_id
        && cvm.node_id() != Some(i64::from(node))
    {
        return false;
    }
    let wanted = request
        .compose_hash
        .as_deref()
        .or(request.requested_compose_hash.as_deref());
    if let (Some(wanted), Some(has)) = (wanted, cvm.compose_hash.as_deref())
        && bare_hex(wanted) != bare_hex(has)
    {
        return false;
    }
    true
}

fn app_path(request: &ReplicaRequest) -> Option<String> {
    request.app_id.as_deref().map(bare_hex)
}

fn bare_hex(value: &str) -> String {
    value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("app_"))
        .unwrap_or(value)
        .to_lowercase()
}

/// A `vm_uuid` as Phala may write it: with or without dashes, in any case.
pub(super) fn normalize(vm_uuid: &str) -> String {
    vm_uuid.replace('-', "").to_lowercase()
}
