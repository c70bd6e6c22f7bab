//! The replica's prepare step: ask Phala for a commit token and learn which
//! registrations the DstackApp still needs. Sources without on-chain KMS take
//! the simple workflow and are replicated directly. `super::change` chooses
//! between the two and holds the source lock around them.

use super::reconcile::{self, Reconciled};
use super::{Outcome, Worker};
use crate::domain::{Bytes32, Event, Failure};
use crate::phala::errors::codes;
use crate::phala::{
    ExpectedReplica, PrepareMismatch, PrepareOutcome, PreparedReplica, ReplicaSpec, ReplicaVm,
    ResolvedNode, check_prepared, node_with_device,
};
use crate::store::{Changes, Claimed, PreparedFields, StoredError};

pub(super) fn spec(claimed: &Claimed) -> ReplicaSpec {
    let request = &claimed.request;
    ReplicaSpec {
        node_id: request.node_id.map(|id| id as u32),
        compose_hash: request
            .requested_compose_hash
            .as_deref()
            .and_then(|h| h.parse::<Bytes32>().ok()),
        encrypted_env: request.encrypted_env.clone(),
    }
}

/// What a prepare call gave, checked.
pub(super) enum Prepared {
    /// A commit token, for what intake resolved; with the node Phala chose
    /// when the order left it to Phala ("Auto").
    Token(PreparedReplica, Option<ResolvedNode>),
    /// Phala ignored the prepare header and created the replica.
    Created(ReplicaVm),
    /// Refused, failed or mismatched: the step ends with this.
    Stop(Outcome),
}

/// Asks Phala for a commit token; the caller holds the source lock. Every
/// prepare supersedes the source's older tokens, so the source's newest
/// token is marked unknown before the call is sent, and only the answered
/// prepare's transition names its request the holder (see
/// [`crate::store::Store::holds_newest_token`]): a prepare whose answer
/// never came leaves every stored token of the source in doubt.
pub(super) async fn call_prepare(worker: &Worker, claimed: &Claimed) -> anyhow::Result<Prepared> {
    let request = &claimed.request;
    worker
        .store
        .prepare_outstanding(&claimed.lease, &request.source_vm_uuid)
        .await?;
    let answer = worker
        .phala
        .prepare_replica(&request.source_vm_uuid, &spec(claimed))
        .await;
    Ok(match answer {
        Ok(PrepareOutcome::Prepared(prepared)) => {
            // Act only on an answer that names what intake resolved itself.
            let expected = ExpectedReplica::from_stored(
                request.app_id.as_deref(),
                request.expected_device_id.as_deref(),
                request.requested_compose_hash.as_deref(),
                request.chain_id,
            );
            let mismatch = |mismatch: PrepareMismatch| {
                Prepared::Stop(Outcome::Fail(StoredError::of(
                    Failure::PrepareAnswerMismatch,
                    &mismatch.to_string(),
                )))
            };
            if let Err(err) = check_prepared(&expected, &prepared) {
                return Ok(mismatch(err));
            }
            // "Auto": Phala chose the node; its device must be one of a node
            // the workspace lists, and that node is recorded.
            if request.node_id.is_some() {
                return Ok(Prepared::Token(prepared, None));
            }
            match worker.phala.available_nodes().await {
                Ok(available) => match prepared
                    .device_id
                    .and_then(|device| node_with_device(&available, &device))
                {
                    Some(node) => Prepared::Token(prepared, Some(node)),
                    None => mismatch(PrepareMismatch::UnlistedDevice {
                        got: prepared.device_id,
                    }),
                },
                Err(err) => Prepared::Stop(Outcome::from_phala(&err)),
            }
        }
        Ok(PrepareOutcome::Created(vm)) => Prepared::Created(vm),
        Err(err) => Prepared::Stop(Outcome::from_phala(&err)),
    })
}

pub(super) async fn prepare(worker: &Worker, claimed: &Claimed) -> anyhow::Result<Outcome> {
    Ok(match call_prepare(worker, claimed).await? {
        Prepared::Token(prepared, placed_on) => {
            // Where the bridge can read the app's chain, Phala's word that
            // everything is allowed only sends the request to the planner,
            // which commits it once the chain allows it at confirmed depth.
            let chain = claimed
                .request
                .chain_id
                .or(prepared.chain_id.map(|c| c as i64));
            let reads_chain = match (&worker.safe_flow, chain) {
                (Some(flow), Some(chain_id)) => flow.chain(chain_id as u64).is_some(),
                _ => false,
            };
            prepared_outcome(claimed.request.chain_id, prepared, placed_on, !reads_chain)
        }
        Prepared::Created(vm) => created(vm),
        Prepared::Stop(outcome) => outcome,
    })
}

fn prepared_outcome(
    known_chain: Option<i64>,
    prepared: PreparedReplica,
    placed_on: Option<ResolvedNode>,
    trust_phala: bool,
) -> Outcome {
    let onchain = prepared.onchain;
    let allowed = onchain.is_allowed || (onchain.compose_hash_allowed && onchain.device_id_allowed);
    let (event, message) = if allowed && trust_phala {
        (
            Event::RegistrationsAllowed,
            "prepared; everything is already allowed on chain".to_owned(),
        )
    } else if allowed {
        (
            Event::RegistrationsMissing,
            "prepared; Phala says everything is allowed on chain: committing once the chain shows it at confirmed depth".to_owned(),
        )
    } else {
        let missing: Vec<&str> = [
            (!onchain.compose_hash_allowed).then_some("compose hash"),
            (!onchain.device_id_allowed).then_some("device"),
        ]
        .into_iter()
        .flatten()
        .collect();
        (
            Event::RegistrationsMissing,
            format!(
                "prepared; the DstackApp must allow the {}",
                missing.join(" and ")
            ),
        )
    };
    let changes = Changes {
        prepared: Some(PreparedFields {
            placed_on,
            ..prepared_fields(known_chain, prepared)
        }),
        ..Changes::default()
    };
    Outcome::Advance {
        event,
        changes,
        message: Some(message),
    }
}

/// What a prepare's answer stores on the request.
pub(super) fn prepared_fields(
    known_chain: Option<i64>,
    prepared: PreparedReplica,
) -> PreparedFields {
    let onchain = prepared.onchain;
    PreparedFields {
        app_id: prepared.app_id.to_string(),
        // Intake's chain stands: the 465's may only fill a gap (and a
        // different one was refused by `check_prepared`).
        chain_id: known_chain.or(prepared.chain_id.map(|c| c as i64)),
        compose_hash: prepared.compose_hash.to_string(),
        device_id: prepared.device_id.map(|d| d.to_string()),
        compose_hash_allowed: onchain.compose_hash_allowed,
        device_id_allowed: onchain.device_id_allowed,
        commit_token: prepared.commit_token,
        placed_on: None,
    }
}

fn created(vm: ReplicaVm) -> Outcome {
    let message = format!(
        "replica {} created",
        vm.vm_uuid.as_deref().unwrap_or("(no vm_uuid yet)")
    );
    Outcome::Advance {
        event: Event::ReplicatedDirectly,
        changes: Changes {
            replica_vm_uuid: vm.vm_uuid,
            replica_status: vm.status,
            ..Changes::default()
        },
        message: Some(message),
    }
}

/// Cloud KMS (or no KMS): no prepare, no approval. The call creates a CVM,
/// so it follows [`super::reconcile`]: an unanswered call is looked for in
/// Phala's instance list, never simply sent again.
pub(super) async fn replicate_directly(
    worker: &Worker,
    claimed: &Claimed,
) -> anyhow::Result<Outcome> {
    let request = &claimed.request;
    if request.call_sent_at.is_some() {
        match reconcile::reconcile(worker, claimed, "replicate").await? {
            Reconciled::Found {
                vm_uuid,
                status,
                extra,
            } => {
                return Ok(created(ReplicaVm {
                    vm_uuid: Some(vm_uuid),
                    status,
                    ..ReplicaVm::default()
                })
                .with_extra_replicas(extra));
            }
            Reconciled::LookAgain(wait) => return Ok(Outcome::AwaitOutcome(wait)),
            Reconciled::GiveUp(error) => return Ok(Outcome::Fail(error)),
            Reconciled::NotCreated => {}
        }
    }
    let before = match reconcile::instances_before_call(worker, request).await {
        Ok(before) => before,
        Err(err) => return Ok(Outcome::from_phala(&err)),
    };
    worker
        .store
        .mark_call_sent(&claimed.lease, worker.clock.now(), &before)
        .await?;
    match worker
        .phala
        .create_replica(&request.source_vm_uuid, &spec(claimed))
        .await
    {
        Ok(vm) => Ok(created(vm)),
        Err(err) if err.outcome_unknown() => {
            Ok(reconcile::outcome_unknown("replicate", worker, &err))
        }
        // A resent create refused for want of room: the first create, whose
        // answer was lost, most likely took the node's last slot.
        Err(err)
            if request.call_sent_at.is_some() && err.code() == Some(codes::INSUFFICIENT_SLOTS) =>
        {
            Ok(reconcile::first_call_took_effect("replicate", worker, &err))
        }
        Err(err) => {
            // Phala refused: nothing was created.
            worker
                .store
                .clear_call_sent(&claimed.lease, worker.clock.now())
                .await?;
            Ok(Outcome::from_phala(&err))
        }
    }
}
