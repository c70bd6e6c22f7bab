//! A Safe proposal's life: its status and the rules of its end. Pure, no I/O.
//!
//! A proposal is stored `proposed` (before it is posted), and stays so while
//! the Transaction Service and the owners have it. It ends once: executed,
//! failed (executed with `ExecutionFailure`, expired, refused, or withdrawn),
//! replaced (its nonce went to another transaction) or superseded (what it
//! would register got allowed some other way). Two ways lead back:
//! - the same calls at the same nonce hash alike, so a proposal that ended
//!   without executing and is still valid at the service is opened again
//!   instead of stored twice ([`ProposalStatus::may_reopen`]);
//! - the owners may execute one that ended without executing, while the
//!   follower watches for that ([`ProposalEnd::watch_after_end`]): it is
//!   recorded as executed then ([`ProposalStatus::may_execute_late`]).

use std::fmt;
use std::str::FromStr;

/// Where a proposal stands. The names are stored and shown by the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProposalStatus {
    /// Stored, posted or being posted; waiting for the owners.
    Proposed,
    Executed,
    Failed,
    Replaced,
    Superseded,
}

impl ProposalStatus {
    pub const ALL: [ProposalStatus; 5] = [
        ProposalStatus::Proposed,
        ProposalStatus::Executed,
        ProposalStatus::Failed,
        ProposalStatus::Replaced,
        ProposalStatus::Superseded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProposalStatus::Proposed => "proposed",
            ProposalStatus::Executed => "executed",
            ProposalStatus::Failed => "failed",
            ProposalStatus::Replaced => "replaced",
            ProposalStatus::Superseded => "superseded",
        }
    }

    /// Still open: it may be posted, signed and executed, and holds its nonce.
    pub fn is_open(self) -> bool {
        self == ProposalStatus::Proposed
    }

    /// Whether a proposal in this status, stored with the same safeTxHash as
    /// a new one, is opened again for it. Only one that ended without
    /// executing and whose nonce nothing used: the service still holds it as
    /// valid, owners' confirmations and all.
    pub fn may_reopen(self, executed: bool) -> bool {
        !executed && matches!(self, ProposalStatus::Failed | ProposalStatus::Superseded)
    }

    /// Whether the owners executing a proposal in this status, watched after
    /// its end, records it as executed: any ended one.
    pub fn may_execute_late(self, watched: bool) -> bool {
        watched && !self.is_open()
    }
}

impl fmt::Display for ProposalStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown proposal status `{0}`")]
pub struct UnknownProposalStatus(pub String);

impl FromStr for ProposalStatus {
    type Err = UnknownProposalStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProposalStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownProposalStatus(s.to_owned()))
    }
}

/// How an open proposal ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProposalEnd {
    Executed,
    /// Executed with `ExecutionFailure`: its nonce is used.
    Failed,
    /// Nobody executed it in time. It fails, yet the owners may still
    /// execute it: the follower keeps watching for that.
    Expired,
    /// Its nonce was used by another transaction.
    Replaced,
    /// Everything it would register got allowed some other way.
    Superseded,
}

impl ProposalEnd {
    pub const ALL: [ProposalEnd; 5] = [
        ProposalEnd::Executed,
        ProposalEnd::Failed,
        ProposalEnd::Expired,
        ProposalEnd::Replaced,
        ProposalEnd::Superseded,
    ];

    /// The status it ends in.
    pub fn status(self) -> ProposalStatus {
        match self {
            ProposalEnd::Executed => ProposalStatus::Executed,
            ProposalEnd::Failed | ProposalEnd::Expired => ProposalStatus::Failed,
            ProposalEnd::Replaced => ProposalStatus::Replaced,
            ProposalEnd::Superseded => ProposalStatus::Superseded,
        }
    }

    /// The owners may still execute it: the follower watches for that until
    /// the Safe uses its nonce.
    pub fn watch_after_end(self) -> bool {
        self == ProposalEnd::Expired
    }

    /// Requests it failed before (it was opened again after they were
    /// queued anew) are settled as after a late execution.
    pub fn settles_failed_requests(self) -> bool {
        self == ProposalEnd::Executed
    }
}

/// A proposal that is not open cannot end again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a proposal that is {from} cannot end as {end:?}")]
pub struct AlreadyEnded {
    pub from: ProposalStatus,
    pub end: ProposalEnd,
}

/// The status a proposal in `from` takes when it ends as `end`: only an open
/// one ends.
pub fn end_proposal(
    from: ProposalStatus,
    end: ProposalEnd,
) -> Result<ProposalStatus, AlreadyEnded> {
    if from.is_open() {
        Ok(end.status())
    } else {
        Err(AlreadyEnded { from, end })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProposalEnd as E;
    use ProposalStatus as S;

    /// The full table, written out so that a change to the rules must change it too:
    /// (end, status it ends in, watched after its end, settles failed requests).
    const ENDS: &[(ProposalEnd, ProposalStatus, bool, bool)] = &[
        (E::Executed, S::Executed, false, true),
        (E::Failed, S::Failed, false, false),
        (E::Expired, S::Failed, true, false),
        (E::Replaced, S::Replaced, false, false),
        (E::Superseded, S::Superseded, false, false),
    ];

    #[test]
    fn every_status_end_pair_matches_the_table() {
        for from in ProposalStatus::ALL {
            for end in ProposalEnd::ALL {
                let (_, to, _, _) = ENDS.iter().find(|(e, ..)| *e == end).unwrap();
                match end_proposal(from, end) {
                    Ok(got) => {
                        assert_eq!(from, S::Proposed, "{from} + {end:?}");
                        assert_eq!(got, *to, "{from} + {end:?}");
                    }
                    Err(err) => {
                        assert_ne!(from, S::Proposed, "{from} + {end:?}");
                        assert_eq!(err, AlreadyEnded { from, end });
                    }
                }
            }
        }
    }

    #[test]
    fn every_end_has_its_effects_as_the_table_says() {
        assert_eq!(ENDS.len(), ProposalEnd::ALL.len());
        for (end, status, watch, settles) in ENDS {
            assert_eq!(end.status(), *status, "{end:?}");
            assert_eq!(end.watch_after_end(), *watch, "{end:?}");
            assert_eq!(end.settles_failed_requests(), *settles, "{end:?}");
            assert!(!status.is_open(), "{end:?} leaves it open");
        }
    }

    #[test]
    fn only_an_unexecuted_failed_or_superseded_proposal_is_opened_again() {
        const REOPENS: &[ProposalStatus] = &[S::Failed, S::Superseded];
        for status in ProposalStatus::ALL {
            assert!(!status.may_reopen(true), "{status}, executed");
            assert_eq!(
                status.may_reopen(false),
                REOPENS.contains(&status),
                "{status}"
            );
        }
    }

    #[test]
    fn only_an_ended_watched_proposal_executes_late() {
        for status in ProposalStatus::ALL {
            assert!(!status.may_execute_late(false), "{status}, not watched");
            assert_eq!(
                status.may_execute_late(true),
                status != S::Proposed,
                "{status}"
            );
        }
    }

    #[test]
    fn the_stored_names_round_trip() {
        for status in ProposalStatus::ALL {
            assert_eq!(status.as_str().parse::<ProposalStatus>(), Ok(status));
            assert_eq!(status.to_string(), status.as_str());
        }
        assert_eq!(
            "open".parse::<ProposalStatus>(),
            Err(UnknownProposalStatus("open".to_owned()))
        );
    }
}
