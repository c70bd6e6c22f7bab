//! Where a change's kind meets the worker: the one place that chooses the
//! Phala calls a change makes.
//!
//! A change of any kind (see [`crate::domain::ChangeKind`]) lives the same
//! life, and everything in it but the calls to Phala is shared:
//! - the status machine (`domain::state`) takes no kind;
//! - the claim, the lease and its heartbeat, the backoff and the fenced
//!   writes ([`super::Worker`], `store::requests`) never read it;
//! - the source lock (`store::source_locks`): one outstanding prepare or
//!   commit per source CVM, whatever the kind, taken here before the kind's
//!   step runs;
//! - the planner, the batching into one proposal, and the chain follower
//!   (`propose`, `watch`) work on the registrations a prepare recorded, not
//!   on the kind.
//!
//! The kind chooses three things, each in one exhaustive `match` below:
//! which call prepares it ([`calls`] at [`Stage::Prepare`]), which commits
//! it ([`calls`] at [`Stage::Commit`]), and how the tracker follows it once
//! Phala carries it out ([`follow`]). A new kind adds its variant to
//! `ChangeKind`, its arms here (the compiler lists them) and its step files;
//! the rest of the worker stays as it is.

use super::{Outcome, Worker, commit, prepare};
use crate::domain::ChangeKind;
use crate::store::Claimed;

/// The steps a worker runs on a claimed change, under its source lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// `preparing`: ask Phala for what the change needs approved.
    Prepare,
    /// `committing`: everything is allowed on chain; carry it out.
    Commit,
}

/// The Phala calls one step sends, as the change's kind chooses them.
// Every variant ends in `Replica` only while the replica is the one kind.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Calls {
    /// A replica's prepare: the prepare-only replicate, answered with a
    /// commit token and the registrations the DstackApp lacks.
    PrepareReplica,
    /// A replica of a source without on-chain KMS: created at once, with no
    /// approval to wait for.
    CreateReplica,
    /// A replica's commit, with its token.
    CommitReplica,
}

// Only the tests ask: the dispatch itself is the `match` in [`step`].
#[cfg(test)]
impl Calls {
    /// The kind whose calls these are.
    pub(super) fn kind(self) -> ChangeKind {
        match self {
            Calls::PrepareReplica | Calls::CreateReplica | Calls::CommitReplica => {
                ChangeKind::Replica
            }
        }
    }
}

/// How the tracker follows a change that Phala is carrying out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Follow {
    /// One status batch for every provisioning replica, until it runs.
    ReplicaStatus,
}

/// The calls a change of `kind` makes at `stage`. `onchain_kms`: whether the
/// app's KMS is on chain, so that the change needs the Safe at all.
pub(super) fn calls(kind: ChangeKind, stage: Stage, onchain_kms: bool) -> Calls {
    match (kind, stage) {
        (ChangeKind::Replica, Stage::Prepare) if onchain_kms => Calls::PrepareReplica,
        (ChangeKind::Replica, Stage::Prepare) => Calls::CreateReplica,
        (ChangeKind::Replica, Stage::Commit) => Calls::CommitReplica,
    }
}

/// How a change of `kind` is followed once Phala carries it out.
pub(super) fn follow(kind: ChangeKind) -> Follow {
    match kind {
        ChangeKind::Replica => Follow::ReplicaStatus,
    }
}

/// Runs `stage` for the claimed change: the shared source lock, then the
/// calls its kind chooses.
pub(super) async fn step(
    worker: &Worker,
    claimed: &Claimed,
    stage: Stage,
) -> anyhow::Result<Outcome> {
    let change = &claimed.request;
    // A newer prepare for the same CVM supersedes the older token, so the
    // prepares and commits of one source never overlap, whatever their kind.
    // The lock is held by the change, not the worker: it stays while the
    // change prepares or commits, and the transition out of those releases
    // it (a commit whose answer was lost keeps it until its outcome is known).
    if !worker
        .store
        .try_lock_source(&change.source_vm_uuid, change.id)
        .await?
    {
        return Ok(Outcome::Snooze(super::SOURCE_BUSY_WAIT));
    }
    match calls(change.kind, stage, change.onchain_kms) {
        Calls::PrepareReplica => prepare::prepare(worker, claimed).await,
        Calls::CreateReplica => prepare::replicate_directly(worker, claimed).await,
        Calls::CommitReplica => commit::run(worker, claimed).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_routes_to_the_replica_calls() {
        use Calls::*;
        let kind = ChangeKind::Replica;
        assert_eq!(calls(kind, Stage::Prepare, true), PrepareReplica);
        assert_eq!(calls(kind, Stage::Prepare, false), CreateReplica);
        assert_eq!(calls(kind, Stage::Commit, true), CommitReplica);
        assert_eq!(calls(kind, Stage::Commit, false), CommitReplica);
        assert_eq!(follow(kind), Follow::ReplicaStatus);
    }

    #[test]
    fn every_kind_routes_only_to_its_own_calls() {
        for kind in ChangeKind::ALL {
            for stage in [Stage::Prepare, Stage::Commit] {
                for onchain_kms in [true, false] {
                    assert_eq!(calls(kind, stage, onchain_kms).kind(), kind);
                }
            }
        }
    }

    /// The shared parts of a change's life, as source: none of them may
    /// name the kind. The kind reaches the worker only through this module.
    const SHARED: [(&str, &str); 15] = [
        ("domain/state.rs", include_str!("../domain/state.rs")),
        ("domain/queue.rs", include_str!("../domain/queue.rs")),
        (
            "store/source_locks.rs",
            include_str!("../store/source_locks.rs"),
        ),
        (
            "store/job_leases.rs",
            include_str!("../store/job_leases.rs"),
        ),
        ("store/follower.rs", include_str!("../store/follower.rs")),
        ("store/proposals.rs", include_str!("../store/proposals.rs")),
        (
            "store/safe_queue.rs",
            include_str!("../store/safe_queue.rs"),
        ),
        ("worker/mod.rs", include_str!("mod.rs")),
        ("worker/owner.rs", include_str!("owner.rs")),
        ("worker/backoff.rs", include_str!("backoff.rs")),
        ("worker/propose.rs", include_str!("propose.rs")),
        ("worker/watch.rs", include_str!("watch.rs")),
        ("worker/queue.rs", include_str!("queue.rs")),
        ("worker/scope.rs", include_str!("scope.rs")),
        ("worker/signing.rs", include_str!("signing.rs")),
    ];

    #[test]
    fn the_shared_parts_never_look_at_the_kind() {
        for (file, source) in SHARED {
            for word in ["ChangeKind", "request.kind", "change.kind", "r.kind"] {
                assert!(
                    !source.contains(word),
                    "{file} names `{word}`: a change's kind is for `worker::change` to route"
                );
            }
        }
        // The claim, the lease, the idle wait and the fenced writes: no query
        // of theirs reads the kind (only the column list returns it).
        let requests = include_str!("../store/requests.rs");
        for function in [
            "claim_due",
            "renew_lease",
            "release_lease",
            "advance",
            "retry_later",
            "snooze",
            "await_outcome",
            "next_due_at",
        ] {
            let start = requests
                .find(&format!("pub async fn {function}("))
                .unwrap_or_else(|| panic!("store/requests.rs has no `{function}`"));
            let body = &requests[start..];
            let end = body[1..]
                .find("pub async fn ")
                .map_or(body.len(), |e| e + 1);
            assert!(
                !body[..end].contains("kind"),
                "store/requests.rs `{function}` reads the kind"
            );
        }
    }
}
