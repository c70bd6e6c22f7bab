//! The replica request state machine: pure, no I/O.
//!
//! Every status change in the service goes through [`next`], so an illegal
//! transition is an error at the one place that decides, never a silent no-op.
//!
//! `done`, `failed` and `cancelled` are final, with one deliberate exception:
//! a request that failed because its proposal expired, or because the bridge
//! gave up posting it, is planned again if the Safe owners execute that
//! proposal after all ([`Event::ExecutedLate`]). Its registrations are on
//! chain then, and a request must not stay `failed` while they are. It is
//! safe: such a request failed while it awaited the proposal or the owners,
//! so it never sent a commit with its token (a commit is only sent from
//! `committing`, and a request leaves `committing` for `awaiting_proposal`
//! only after a refused commit, which made nothing); the planner sends it on
//! to commit at confirmed depth, with a fresh prepare (failing cleared its
//! token). The follower does not revive it when a newer request for the same
//! replica is under way or done: that one makes the replica.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a replica request stands. The names are part of the public API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Accepted, waiting for a worker to prepare it.
    Queued,
    /// The Phala prepare call is being made (or retried).
    Preparing,
    /// Registrations are missing on the DstackApp; waiting for the next Safe batch.
    AwaitingProposal,
    /// Proposed to the Safe; waiting for the owners to sign and execute.
    AwaitingApproval,
    /// Everything is allowed on chain; committing the replica with Phala.
    Committing,
    /// Phala is creating the replica; waiting for it to run.
    Provisioning,
    Done,
    Failed,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 9] = [
        Status::Queued,
        Status::Preparing,
        Status::AwaitingProposal,
        Status::AwaitingApproval,
        Status::Committing,
        Status::Provisioning,
        Status::Done,
        Status::Failed,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Preparing => "preparing",
            Status::AwaitingProposal => "awaiting_proposal",
            Status::AwaitingApproval => "awaiting_approval",
            Status::Committing => "committing",
            Status::Provisioning => "provisioning",
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Done | Status::Failed | Status::Cancelled)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status `{0}`")]
pub struct UnknownStatus(pub String);

impl FromStr for Status {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// Something that happened to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// A worker starts the prepare step.
    StartPrepare,
    /// Prepare reported registrations missing on the DstackApp.
    RegistrationsMissing,
    /// Prepare (or a later check) found everything already allowed.
    RegistrationsAllowed,
    /// The source is not on on-chain KMS, so the replica was created directly.
    ReplicatedDirectly,
    /// The missing registrations were proposed to the Safe.
    Proposed,
    /// The proposal can no longer execute (execution failure, replaced nonce).
    ProposalDropped,
    /// The commit token was expired or superseded: prepare again.
    TokenExpired,
    /// Phala accepted the commit and is creating the replica.
    Committed,
    /// The replica runs.
    ReplicaRunning,
    /// A permanent error, or the attempts ran out.
    Fail,
    /// Someone cancelled the request.
    Cancel,
    /// The owners executed, after all, the proposal whose expiry (or whose
    /// giving up) failed the request: plan it again (see the module's note).
    ExecutedLate,
}

impl Event {
    pub const ALL: [Event; 12] = [
        Event::StartPrepare,
        Event::RegistrationsMissing,
        Event::RegistrationsAllowed,
        Event::ReplicatedDirectly,
        Event::Proposed,
        Event::ProposalDropped,
        Event::TokenExpired,
        Event::Committed,
        Event::ReplicaRunning,
        Event::Fail,
        Event::Cancel,
        Event::ExecutedLate,
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a request in `{from}` cannot take the event {event:?}")]
pub struct IllegalTransition {
    pub from: Status,
    pub event: Event,
}

/// What a transition does besides changing the status. The store carries
/// these out in the transaction that writes the new status, so a reader finds
/// every rule here rather than in SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effects {
    /// Forget the commit token: it was spent, or the request is finished.
    pub clear_commit_token: bool,
    /// Leave the current Safe proposal: the request needs a new plan.
    pub detach_proposal: bool,
    /// Forget the execution's transaction hash: a fresh prepare commits with
    /// `already-registered`.
    pub clear_commit_tx_hash: bool,
    /// Give up the source's prepare lock. Only a request that is preparing or
    /// committing holds it: a prepare of a sibling would supersede its token.
    pub release_source_lock: bool,
}

/// A legal move: the status it leads to and what comes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub to: Status,
    pub effects: Effects,
}

/// Whether a request in `status` holds its source's prepare lock.
pub fn holds_source_lock(status: Status) -> bool {
    matches!(status, Status::Preparing | Status::Committing)
}

/// [`next`] with the effects of the move.
pub fn transition(from: Status, event: Event) -> Result<Transition, IllegalTransition> {
    let to = next(from, event)?;
    Ok(Transition {
        to,
        effects: Effects {
            clear_commit_token: to.is_terminal() || event == Event::Committed,
            detach_proposal: to == Status::AwaitingProposal,
            clear_commit_tx_hash: to == Status::Preparing,
            release_source_lock: !holds_source_lock(to),
        },
    })
}

/// The transition function. Cancelling is allowed until the commit starts,
/// because after that Phala may already be creating the replica.
pub fn next(from: Status, event: Event) -> Result<Status, IllegalTransition> {
    use Event as E;
    use Status as S;
    let to = match (from, event) {
        (S::Queued, E::StartPrepare) => S::Preparing,
        (S::Preparing, E::RegistrationsMissing) => S::AwaitingProposal,
        (S::Preparing, E::RegistrationsAllowed) => S::Committing,
        (S::Preparing, E::ReplicatedDirectly) => S::Provisioning,
        (S::AwaitingProposal, E::Proposed) => S::AwaitingApproval,
        (S::AwaitingProposal | S::AwaitingApproval, E::RegistrationsAllowed) => S::Committing,
        (S::AwaitingApproval, E::ProposalDropped) => S::AwaitingProposal,
        (S::Committing, E::TokenExpired) => S::Preparing,
        (S::Committing, E::Committed) => S::Provisioning,
        (S::Provisioning, E::ReplicaRunning) => S::Done,
        (s, E::Fail) if !s.is_terminal() => S::Failed,
        (S::Queued | S::Preparing | S::AwaitingProposal | S::AwaitingApproval, E::Cancel) => {
            S::Cancelled
        }
        // The one way out of a final status: see the module's note.
        (S::Failed, E::ExecutedLate) => S::AwaitingProposal,
        _ => return Err(IllegalTransition { from, event }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Event as E;
    use Status as S;

    /// The full table, written out so that a change to `next` must change it too.
    const LEGAL: &[(Status, Event, Status)] = &[
        (S::Queued, E::StartPrepare, S::Preparing),
        (S::Queued, E::Fail, S::Failed),
        (S::Queued, E::Cancel, S::Cancelled),
        (S::Preparing, E::RegistrationsMissing, S::AwaitingProposal),
        (S::Preparing, E::RegistrationsAllowed, S::Committing),
        (S::Preparing, E::ReplicatedDirectly, S::Provisioning),
        (S::Preparing, E::Fail, S::Failed),
        (S::Preparing, E::Cancel, S::Cancelled),
        (S::AwaitingProposal, E::Proposed, S::AwaitingApproval),
        (S::AwaitingProposal, E::RegistrationsAllowed, S::Committing),
        (S::AwaitingProposal, E::Fail, S::Failed),
        (S::AwaitingProposal, E::Cancel, S::Cancelled),
        (S::AwaitingApproval, E::RegistrationsAllowed, S::Committing),
        (S::AwaitingApproval, E::ProposalDropped, S::AwaitingProposal),
        (S::AwaitingApproval, E::Fail, S::Failed),
        (S::AwaitingApproval, E::Cancel, S::Cancelled),
        (S::Committing, E::TokenExpired, S::Preparing),
        (S::Committing, E::Committed, S::Provisioning),
        (S::Committing, E::Fail, S::Failed),
        (S::Provisioning, E::ReplicaRunning, S::Done),
        (S::Provisioning, E::Fail, S::Failed),
        (S::Failed, E::ExecutedLate, S::AwaitingProposal),
    ];

    #[test]
    fn every_state_event_pair_matches_the_table() {
        for from in Status::ALL {
            for event in Event::ALL {
                let expected = LEGAL
                    .iter()
                    .find(|(f, e, _)| *f == from && *e == event)
                    .map(|(_, _, to)| *to);
                match (next(from, event), expected) {
                    (Ok(to), Some(want)) => assert_eq!(to, want, "{from} + {event:?}"),
                    (Err(err), None) => assert_eq!(err, IllegalTransition { from, event }),
                    (got, want) => panic!("{from} + {event:?}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn terminal_states_accept_no_event_but_a_late_execution_of_a_failed_one() {
        for from in [S::Done, S::Failed, S::Cancelled] {
            assert!(from.is_terminal());
            for event in Event::ALL {
                if (from, event) == (S::Failed, E::ExecutedLate) {
                    continue;
                }
                assert!(next(from, event).is_err(), "{from} + {event:?}");
            }
        }
        // Revived, it is planned afresh: no proposal, no token, no lock.
        let t = transition(S::Failed, E::ExecutedLate).unwrap();
        assert_eq!(t.to, S::AwaitingProposal);
        assert!(t.effects.detach_proposal && t.effects.release_source_lock);
        assert!(!t.effects.clear_commit_token, "failing cleared it already");
    }

    #[test]
    fn cancel_is_refused_once_the_commit_has_started() {
        for from in [S::Committing, S::Provisioning] {
            assert!(next(from, E::Cancel).is_err());
        }
    }

    #[test]
    fn effects_follow_the_destination() {
        for (from, event, to) in LEGAL {
            let t = transition(*from, *event).unwrap();
            assert_eq!(t.to, *to);
            let e = t.effects;
            assert_eq!(
                e.release_source_lock,
                !matches!(to, S::Preparing | S::Committing),
                "{from} + {event:?}"
            );
            assert_eq!(e.detach_proposal, *to == S::AwaitingProposal);
            assert_eq!(e.clear_commit_tx_hash, *to == S::Preparing);
            assert_eq!(
                e.clear_commit_token,
                to.is_terminal() || *event == E::Committed
            );
        }
    }

    #[test]
    fn a_prepare_that_commits_at_once_keeps_the_source_lock() {
        let t = transition(S::Preparing, E::RegistrationsAllowed).unwrap();
        assert!(!t.effects.release_source_lock);
        let t = transition(S::Committing, E::TokenExpired).unwrap();
        assert!(!t.effects.release_source_lock, "re-prepare keeps it");
        let t = transition(S::Committing, E::Committed).unwrap();
        assert!(t.effects.release_source_lock && t.effects.clear_commit_token);
    }

    #[test]
    fn status_names_round_trip() {
        for status in Status::ALL {
            assert_eq!(status.as_str().parse::<Status>(), Ok(status));
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                serde_json::json!(status.as_str())
            );
        }
        assert!("running".parse::<Status>().is_err());
    }
}
