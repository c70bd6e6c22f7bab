//! The replica's commit step: hand Phala the commit token once the DstackApp allows
//! everything. A commit creates the replica, so it is sent under the rules of
//! [`super::reconcile`]: a commit whose answer was lost is looked for in
//! Phala's instance list before anything is sent again.
//!
//! Replicas of one source commit one after another, each under the source
//! lock. The token from planning is used while it is the source's newest;
//! otherwise (a sibling prepared after it) the step prepares once more right
//! before the commit, still under the lock, so no commit meets a token that
//! a sibling's prepare superseded.

use secrecy::SecretString;

use super::prepare::{Prepared, call_prepare};
use super::reconcile::{self, Reconciled};
use super::{Outcome, Worker};
use crate::domain::{Bytes32, Event, Failure, Status};
use crate::phala::ReplicaVm;
use crate::phala::errors::codes;
use crate::store::{Changes, Claimed, ReplicaRequest, StoredError};

/// Sent instead of a transaction hash: Phala then checks the contract state only.
pub const ALREADY_REGISTERED: &str = "already-registered";
/// How long Phala keeps a commit token (its documented 14-day lifetime).
const TOKEN_LIFETIME: chrono::Duration = chrono::Duration::days(14);
/// Fresh prepares after expired tokens before the request gives up.
const MAX_REPREPARES: i64 = 3;

/// The caller ([`super::change::step`]) holds the source lock: no prepare of
/// the same source may run between this request's token and its commit, as
/// it would supersede the token. The lock stays with the request until it
/// leaves `committing` (or `preparing` after it).
pub(super) async fn run(worker: &Worker, claimed: &Claimed) -> anyhow::Result<Outcome> {
    let request = &claimed.request;
    if request.call_sent_at.is_some() {
        match reconcile::reconcile(worker, claimed, "commit").await? {
            Reconciled::Found {
                vm_uuid,
                status,
                extra,
            } => {
                return Ok(committed(
                    ReplicaVm {
                        vm_uuid: Some(vm_uuid),
                        status,
                        ..ReplicaVm::default()
                    },
                    "the commit whose answer was lost created replica",
                )
                .with_extra_replicas(extra));
            }
            Reconciled::LookAgain(wait) => return Ok(Outcome::AwaitOutcome(wait)),
            Reconciled::GiveUp(error) => return Ok(Outcome::Fail(error)),
            // The lost call did not take effect: send it again, with the
            // same token (spent, were it to have taken effect after all).
            Reconciled::NotCreated => return commit(worker, claimed, Resend::SameToken).await,
        }
    }
    commit(worker, claimed, Resend::No).await
}

/// Whether the commit repeats one whose answer was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resend {
    No,
    SameToken,
}

fn committed(vm: ReplicaVm, what: &str) -> Outcome {
    Outcome::Advance {
        event: Event::Committed,
        message: Some(format!(
            "{what} {}",
            vm.vm_uuid.as_deref().unwrap_or("(no vm_uuid yet)")
        )),
        changes: Changes {
            replica_vm_uuid: vm.vm_uuid,
            replica_status: vm.status,
            ..Changes::default()
        },
    }
}

async fn commit(worker: &Worker, claimed: &Claimed, resend: Resend) -> anyhow::Result<Outcome> {
    let request = &claimed.request;
    let Some(compose_hash) = request
        .compose_hash
        .as_deref()
        .and_then(|h| h.parse::<Bytes32>().ok())
    else {
        return Ok(Outcome::Fail(StoredError::of(
            Failure::MissingComposeHash,
            "the request reached committing without a compose hash",
        )));
    };
    // The token, and what exists before the call (to recognise what the
    // call made if its answer is lost), asked for side by side: siblings
    // commit one after another, so each round trip saved here is saved per
    // replica.
    let (token, before) = tokio::join!(
        token_for_commit(worker, claimed, &compose_hash, resend),
        reconcile::instances_before_call(worker, request),
    );
    let token = match token? {
        Ok(token) => token,
        Err(outcome) => return Ok(outcome),
    };
    let before = match before {
        Ok(before) => before,
        Err(err) => return Ok(Outcome::from_phala(&err)),
    };
    let tx_hash = request
        .commit_tx_hash
        .as_deref()
        .unwrap_or(ALREADY_REGISTERED);

    worker
        .store
        .mark_call_sent(&claimed.lease, worker.clock.now(), &before)
        .await?;
    let answer = worker
        .phala
        .commit_replica(&request.source_vm_uuid, &token, &compose_hash, tx_hash)
        .await;
    match answer {
        Ok(vm) => Ok(committed(vm, "committed; replica")),
        Err(err) if err.outcome_unknown() => Ok(reconcile::outcome_unknown("commit", worker, &err)),
        Err(err)
            if resend == Resend::SameToken
                && first_commit_explains(worker, request, err.code()).await? =>
        {
            Ok(reconcile::first_call_took_effect("commit", worker, &err))
        }
        // Phala refused: nothing was created.
        Err(err) => {
            let now = worker.clock.now();
            worker.store.clear_call_sent(&claimed.lease, now).await?;
            if err.code() == Some(codes::HASH_INVALID_OR_EXPIRED) {
                return reprepare(worker, claimed, &err.to_string()).await;
            }
            if err.code() == Some(codes::TX_VERIFICATION_FAILED) && tx_hash != ALREADY_REGISTERED {
                // Phala could not tie the transaction to the change; rely on state instead.
                worker
                    .store
                    .set_commit_tx_hash(&claimed.lease, now, ALREADY_REGISTERED)
                    .await?;
                return Ok(Outcome::Snooze(std::time::Duration::ZERO));
            }
            Ok(Outcome::from_phala(&err))
        }
    }
}

/// Whether a refusal of the resent commit is explained by the first one,
/// whose answer was lost, having created the replica: its token is spent, or
/// it took the node's last slot. A fresh token would then make a second
/// replica, so a refused token is prepared again only when it is known to be
/// dead anyway: older than Phala keeps tokens, or superseded by a newer
/// prepare of the source that this bridge made.
async fn first_commit_explains(
    worker: &Worker,
    request: &ReplicaRequest,
    code: Option<&str>,
) -> anyhow::Result<bool> {
    match code {
        Some(codes::INSUFFICIENT_SLOTS) => Ok(true),
        Some(codes::HASH_INVALID_OR_EXPIRED) => {
            let expired = request
                .prepared_at
                .is_some_and(|at| worker.clock.now() - at > TOKEN_LIFETIME);
            Ok(!expired
                && worker
                    .store
                    .holds_newest_token(&request.source_vm_uuid, request.id)
                    .await?)
        }
        _ => Ok(false),
    }
}

/// The token to commit with: the stored one while it is the source's newest
/// (or when resending a lost commit), else a fresh prepare's. The caller
/// holds the source lock, so no sibling prepares in between.
async fn token_for_commit(
    worker: &Worker,
    claimed: &Claimed,
    compose_hash: &Bytes32,
    resend: Resend,
) -> anyhow::Result<Result<SecretString, Outcome>> {
    let request = &claimed.request;
    let stored = worker.store.commit_token(&claimed.lease).await?;
    if let Some(token) = stored {
        let newest = resend == Resend::SameToken
            || worker
                .store
                .holds_newest_token(&request.source_vm_uuid, request.id)
                .await?;
        if newest {
            return Ok(Ok(token));
        }
    }
    match call_prepare(worker, claimed).await? {
        Prepared::Token(prepared, _) if prepared.compose_hash == *compose_hash => {
            worker
                .store
                .store_fresh_token(&claimed.lease, worker.clock.now(), &prepared.commit_token)
                .await?;
            Ok(Ok(prepared.commit_token))
        }
        // The source changed since planning: plan again.
        Prepared::Token(prepared, _) => Ok(Err(Outcome::Advance {
            event: Event::TokenExpired,
            changes: Changes::default(),
            message: Some(format!(
                "preparing again: the source now runs compose hash {}, not {compose_hash}",
                prepared.compose_hash
            )),
        })),
        Prepared::Created(vm) => Ok(Err(committed(
            vm,
            "Phala ignored the prepare header and created replica",
        ))),
        Prepared::Stop(outcome) => Ok(Err(outcome)),
    }
}

async fn reprepare(worker: &Worker, claimed: &Claimed, why: &str) -> anyhow::Result<Outcome> {
    let done = worker
        .store
        .count_transitions(claimed.request.id, Status::Committing, Status::Preparing)
        .await?;
    if done >= MAX_REPREPARES {
        return Ok(Outcome::Fail(StoredError {
            code: codes::HASH_INVALID_OR_EXPIRED.into(),
            message: format!("the commit token was refused after {done} fresh prepares: {why}"),
            suggestion: Some("Another prepare for the same CVM may keep superseding the token; queue again later.".into()),
        }));
    }
    Ok(Outcome::Advance {
        event: Event::TokenExpired,
        changes: Changes::default(),
        message: Some(format!("preparing again: {why}")),
    })
}
