//! The commit step: hand Phala the commit token once the DstackApp allows
//! everything. The token is one-time, so a commit whose answer was lost is
//! never followed by a fresh prepare and a second commit.

use super::{Outcome, Worker};
use crate::domain::{Bytes32, Event, Status};
use crate::phala::errors::codes;
use crate::store::{Changes, Claimed, StoredError};

/// Sent instead of a transaction hash: Phala then checks the contract state only.
pub const ALREADY_REGISTERED: &str = "already-registered";
/// Fresh prepares after expired tokens before the request gives up.
const MAX_REPREPARES: i64 = 3;

/// How long to wait when another request of the source is preparing.
const SOURCE_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

pub(super) async fn run(worker: &Worker, claimed: &Claimed) -> anyhow::Result<Outcome> {
    // No prepare of the same source may run between this request's token and
    // its commit: it would supersede the token.
    let request = &claimed.request;
    let now = worker.clock.now();
    let locked = worker
        .store
        .try_lock_source(
            &request.source_vm_uuid,
            request.id,
            now,
            now + worker.lease_duration(),
        )
        .await?;
    if !locked {
        return Ok(Outcome::Snooze(SOURCE_BUSY_WAIT));
    }
    let outcome = commit(worker, claimed).await;
    worker
        .store
        .unlock_source(&request.source_vm_uuid, request.id)
        .await?;
    outcome
}

async fn commit(worker: &Worker, claimed: &Claimed) -> anyhow::Result<Outcome> {
    let request = &claimed.request;
    let now = worker.clock.now();
    let Some(token) = worker.store.commit_token(&claimed.lease, now).await? else {
        return reprepare(worker, claimed, "no commit token is stored").await;
    };
    let Some(compose_hash) = request
        .compose_hash
        .as_deref()
        .and_then(|h| h.parse::<Bytes32>().ok())
    else {
        return Ok(Outcome::Fail(StoredError {
            code: "MISSING-COMPOSE-HASH".into(),
            message: "the request reached committing without a compose hash".into(),
            suggestion: Some("Queue the replica again.".into()),
        }));
    };
    let tx_hash = request
        .commit_tx_hash
        .as_deref()
        .unwrap_or(ALREADY_REGISTERED);
    let earlier_call_unanswered = request.call_sent_at.is_some();

    worker.store.mark_call_sent(&claimed.lease, now).await?;
    match worker
        .phala
        .commit_replica(&request.source_vm_uuid, &token, &compose_hash, tx_hash)
        .await
    {
        Ok(vm) => Ok(Outcome::Advance {
            event: Event::Committed,
            message: Some(format!(
                "committed; replica {}",
                vm.vm_uuid.as_deref().unwrap_or("(no vm_uuid yet)")
            )),
            changes: Changes {
                replica_vm_uuid: vm.vm_uuid,
                replica_status: vm.status,
                ..Changes::default()
            },
        }),
        Err(err)
            if err.code() == Some(codes::HASH_INVALID_OR_EXPIRED) && earlier_call_unanswered =>
        {
            // The token was probably spent by the commit whose answer we lost.
            Ok(Outcome::Fail(StoredError {
                code: "COMMIT-OUTCOME-UNKNOWN".into(),
                message: "an earlier commit got no answer and the token is now spent, so the replica may exist".into(),
                suggestion: Some("Check the source's instances on the Phala dashboard; queue again only if none was created.".into()),
            }))
        }
        Err(err) if err.code() == Some(codes::HASH_INVALID_OR_EXPIRED) => {
            worker
                .store
                .clear_call_sent(&claimed.lease, worker.clock.now())
                .await?;
            reprepare(worker, claimed, &err.to_string()).await
        }
        Err(err)
            if err.code() == Some(codes::TX_VERIFICATION_FAILED)
                && tx_hash != ALREADY_REGISTERED =>
        {
            // Phala could not tie the transaction to the change; rely on state instead.
            let now = worker.clock.now();
            worker.store.clear_call_sent(&claimed.lease, now).await?;
            worker
                .store
                .set_commit_tx_hash(&claimed.lease, now, ALREADY_REGISTERED)
                .await?;
            Ok(Outcome::Snooze(std::time::Duration::ZERO))
        }
        Err(err @ crate::phala::PhalaError::Api(_)) => {
            worker
                .store
                .clear_call_sent(&claimed.lease, worker.clock.now())
                .await?;
            Ok(Outcome::from_phala(&err))
        }
        // No answer: retry with the same token. If the lost call went
        // through, the retry gets ERR-01-006 and stops above.
        Err(err) => Ok(Outcome::from_phala(&err)),
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
