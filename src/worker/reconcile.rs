//! Calls that must not repeat: a direct create and a commit each make a CVM.
//!
//! Before such a call the step records the app's instances and sets a marker.
//! A refusal from Phala clears the marker. An answer that never came (a
//! timeout, a reset, a 5xx of any shape) leaves it set, and the source lock
//! stays with the request. Phala is eventually consistent: a call can take
//! effect after its gateway answered, and a new CVM can be missing from the
//! instance list for a while. So the step looks until it knows:
//! - it looks at the instance list soon after the failure, then again with
//!   growing waits (see [`next_look`]);
//! - a new instance of the app on the requested node and compose hash, that no
//!   other request owns: that call created it, and the request moves on. Any
//!   further such instance is reported as an extra replica, never adopted
//!   silently;
//! - nothing yet, or an instance too sparsely listed to tell, or a list that
//!   cannot be read (a 404 included): look again;
//! - nothing once the settle window, counted from the failure, has passed:
//!   the call did not take effect, so it is sent again (the same commit
//!   token; a direct create has no token, so its window is its only guard);
//! - a resend that Phala refuses as if the first call had taken effect (a
//!   spent token, a full node) is never followed by a fresh prepare or
//!   create: the request only looks, up to the unknown-outcome bound, then
//!   fails with "created but not visible".

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Outcome, Worker};
use crate::domain::Failure;
use crate::phala::{CvmInfo, PhalaError};
use crate::store::{AwaitedOutcome, Claimed, ReplicaRequest, StoredError};

/// The first look after a call went unanswered: a CVM that was made is
/// often listed within seconds.
const FIRST_LOOK: Duration = Duration::from_secs(2);
/// The longest wait between two looks.
const LONGEST_WAIT: Duration = Duration::from_secs(30);

/// What the instance list says about the unanswered call.
#[derive(Debug)]
pub(super) enum Reconciled {
    /// The call created this replica. `extra`: further new instances that only
    /// this request's calls can explain.
    Found {
        vm_uuid: String,
        status: Option<String>,
        extra: Vec<String>,
    },
    /// Not known yet: wait and look again.
    LookAgain(AwaitedOutcome),
    /// Nothing appeared within the settle window: the call did not take effect.
    NotCreated,
    /// The outcome stayed unknown for too long.
    GiveUp(StoredError),
}

/// The answer never came: keep the marker and look for the replica, first
/// soon, and send nothing again before the settle window has passed.
pub(super) fn outcome_unknown(call: &str, worker: &Worker, err: &PhalaError) -> Outcome {
    let now = worker.clock.now();
    Outcome::AwaitOutcome(AwaitedOutcome {
        check_at: now + FIRST_LOOK,
        error: pending(
            call,
            format!(
                "the {call} call got no usable answer ({err}); looking for the replica before sending anything again"
            ),
        ),
        settles_at: Some(now + secs(worker.settings.reconcile_settle_secs)),
        first_call_took_effect: false,
    })
}

/// A resend was refused in a way that the first call having taken effect
/// explains: look for its replica, never send or prepare again.
pub(super) fn first_call_took_effect(call: &str, worker: &Worker, err: &PhalaError) -> Outcome {
    let now = worker.clock.now();
    Outcome::AwaitOutcome(AwaitedOutcome {
        check_at: now + FIRST_LOOK,
        error: pending(
            call,
            format!(
                "Phala refused the resent {call} ({err}): the first {call}, whose answer was lost, most likely created the replica; looking for it in Phala's instance list"
            ),
        ),
        settles_at: None,
        first_call_took_effect: true,
    })
}

fn pending(call: &str, message: String) -> StoredError {
    StoredError::of(Failure::of_unanswered_call(call).0, &message)
}

fn secs(secs: u64) -> chrono::Duration {
    chrono::Duration::seconds(secs as i64)
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
        // An app with no instance listed yet (the simulator and Phala answer
        // 404): nothing existed that could be mistaken for the new replica.
        Err(err) if err.status() == Some(404) => Ok(Vec::new()),
        Err(err) => Err(err),
    }
}

/// When to look next: soon after the call, then less often, but never after
/// the settle window ends.
fn next_look(
    now: DateTime<Utc>,
    sent_at: DateTime<Utc>,
    settles_at: Option<DateTime<Utc>>,
) -> DateTime<Utc> {
    let elapsed = (now - sent_at).to_std().unwrap_or_default();
    let wait = (elapsed / 2).clamp(FIRST_LOOK, LONGEST_WAIT);
    let at = now + chrono::Duration::from_std(wait).unwrap_or_default();
    match settles_at {
        Some(settles) if now < settles => at.min(settles),
        _ => at,
    }
}

/// Looks for the replica the request's unanswered call may have created.
pub(super) async fn reconcile(
    worker: &Worker,
    claimed: &Claimed,
    call: &str,
) -> anyhow::Result<Reconciled> {
    let request = &claimed.request;
    let settings = &worker.settings;
    let now = worker.clock.now();
    let sent_at = request.call_sent_at.unwrap_or(now);
    let unknown_since = request.outcome_unknown_since.unwrap_or(sent_at);
    let settles_at = request
        .settles_at
        .unwrap_or(sent_at + secs(settings.reconcile_settle_secs));
    let past_bound = now - unknown_since > secs(settings.unknown_outcome_timeout_secs);
    let look_again = |message: String| {
        Reconciled::LookAgain(AwaitedOutcome {
            check_at: next_look(now, sent_at, Some(settles_at)),
            error: pending(call, message),
            settles_at: None,
            first_call_took_effect: false,
        })
    };

    let listed = match app_path(request) {
        Some(app) => worker.phala.app_cvms(&app).await,
        None => Err(PhalaError::InvalidResponse(
            "the request has no app id to list instances of".into(),
        )),
    };
    // A 404 is no proof that nothing was made: the list may lag behind.
    let cvms = match listed {
        Ok(cvms) => cvms,
        Err(err) if past_bound => {
            return Ok(Reconciled::GiveUp(StoredError::of(
                Failure::of_unanswered_call(call).1,
                &format!(
                    "the {call} call got no answer, and Phala's instance list could not be read for {} s since: {err}",
                    settings.unknown_outcome_timeout_secs
                ),
            )));
        }
        Err(err) => {
            return Ok(look_again(format!(
                "the {call} call got no answer; Phala's instance list cannot be read yet: {err}"
            )));
        }
    };

    let seen = NewInstances::of(request, &cvms);
    let uuids: Vec<String> = seen
        .matching
        .iter()
        .chain(&seen.unsure)
        .filter_map(|c| c.vm_uuid.as_deref().map(normalize))
        .collect();
    let owned: Vec<String> = worker
        .store
        .replicas_owned_by_others(request.id, &uuids)
        .await?
        .iter()
        .map(|o| normalize(o))
        .collect();
    let free = |cvms: &[&CvmInfo]| -> Vec<(String, Option<String>)> {
        cvms.iter()
            .filter_map(|c| Some((c.vm_uuid.clone()?, c.status.clone())))
            .filter(|(vm, _)| !owned.contains(&normalize(vm)))
            .collect()
    };
    let matching = free(&seen.matching);
    let unsure = free(&seen.unsure);

    if !matching.is_empty() {
        // Requests whose calls on the same app and node went unanswered
        // compete for the same new instances: the earliest call takes the
        // oldest listed, and only a lone request can call the rest extras.
        let contenders = match request.app_id.as_deref() {
            Some(app) => {
                worker
                    .store
                    .unanswered_calls_on(app, request.node_id)
                    .await?
            }
            None => Vec::new(),
        };
        let rank = contenders
            .iter()
            .position(|id| *id == request.id)
            .unwrap_or(0);
        if contenders.len() <= 1 {
            let mut found = matching.into_iter();
            let (vm_uuid, status) = found.next().expect("not empty");
            return Ok(Reconciled::Found {
                vm_uuid,
                status,
                extra: found.map(|(vm, _)| vm).collect(),
            });
        }
        if let Some((vm_uuid, status)) = matching.into_iter().nth(rank) {
            return Ok(Reconciled::Found {
                vm_uuid,
                status,
                extra: Vec::new(),
            });
        }
    }

    if request.first_call_took_effect_at.is_some() {
        if past_bound {
            return Ok(Reconciled::GiveUp(StoredError::of(
                Failure::of_unanswered_call(call).2,
                &format!(
                    "Phala refused the resent {call} as if the first had taken effect, but its replica has not appeared in Phala's instance list for {} s",
                    settings.unknown_outcome_timeout_secs
                ),
            )));
        }
        return Ok(look_again(format!(
            "the first {call} most likely created the replica; waiting for Phala's instance list to show it"
        )));
    }
    if !unsure.is_empty() {
        if past_bound {
            return Ok(Reconciled::GiveUp(StoredError::suggesting(
                Failure::of_unanswered_call(call).1,
                &format!(
                    "the {call} call got no answer, and Phala's instance list shows a new instance ({}) without the node or compose hash to tell whether it is this replica",
                    unsure[0].0
                ),
                "Look at the instance on the Phala dashboard; queue again only if it is not this replica.",
            )));
        }
        return Ok(look_again(format!(
            "the {call} call got no answer; Phala lists a new instance ({}) without its node or compose hash yet",
            unsure[0].0
        )));
    }
    if now < settles_at {
        return Ok(look_again(format!(
            "the {call} call got no answer; nothing is sent again until Phala's instance list shows whether it was created"
        )));
    }
    Ok(Reconciled::NotCreated)
}

/// The instances listed since the call: those that match the request, and
/// those listed too sparsely (no node, no compose hash) to tell.
struct NewInstances<'a> {
    matching: Vec<&'a CvmInfo>,
    unsure: Vec<&'a CvmInfo>,
}

impl<'a> NewInstances<'a> {
    fn of(request: &ReplicaRequest, cvms: &'a [CvmInfo]) -> Self {
        let mut seen = NewInstances {
            matching: Vec::new(),
            unsure: Vec::new(),
        };
        for cvm in cvms {
            match fits(request, cvm) {
                Some(true) => seen.matching.push(cvm),
                None => seen.unsure.push(cvm),
                Some(false) => {}
            }
        }
        seen
    }
}

/// Whether a listed instance may be the one the request's unanswered call
/// created: new since the call, not the source itself, on the requested
/// node and with the request's compose hash. `None`: the list leaves out
/// what would tell.
fn fits(request: &ReplicaRequest, cvm: &CvmInfo) -> Option<bool> {
    let Some(vm_uuid) = cvm.vm_uuid.as_deref().map(normalize) else {
        return Some(false);
    };
    let before = request.instances_before.as_deref().unwrap_or_default();
    if before.iter().any(|b| normalize(b) == vm_uuid)
        || vm_uuid == normalize(&request.source_vm_uuid)
    {
        return Some(false);
    }
    let node = match (request.node_id, cvm.node_id()) {
        (Some(wanted), Some(has)) => Some(i64::from(wanted) == has),
        (Some(_), None) => None,
        (None, _) => Some(true),
    };
    let wanted = request
        .compose_hash
        .as_deref()
        .or(request.requested_compose_hash.as_deref());
    let hash = match (wanted, cvm.compose_hash.as_deref()) {
        (Some(wanted), Some(has)) => Some(bare_hex(wanted) == bare_hex(has)),
        (Some(_), None) => None,
        (None, _) => Some(true),
    };
    match (node, hash) {
        (Some(false), _) | (_, Some(false)) => Some(false),
        (Some(true), Some(true)) => Some(true),
        _ => None,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn looks_soon_after_the_call_then_less_often() {
        let sent = at(0);
        assert_eq!(next_look(at(1), sent, None), at(3));
        assert_eq!(next_look(at(20), sent, None), at(30));
        assert_eq!(next_look(at(600), sent, None), at(630));
    }

    #[test]
    fn never_looks_after_the_settle_window_ends() {
        assert_eq!(next_look(at(100), at(0), Some(at(110))), at(110));
        // Past the window, the waits grow again.
        assert_eq!(next_look(at(120), at(0), Some(at(110))), at(150));
    }
}
