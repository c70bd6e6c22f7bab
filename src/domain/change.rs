//! A change: one Safe-gated change to a CVM of a Safe-owned app. Its kind
//! says what it changes; everything else about its life is shared.
//!
//! Every kind lives the same life: it is queued, prepared where Phala needs
//! it, batched into a proposal with the registrations it needs, followed on
//! chain, committed and followed until it runs. The status machine
//! ([`super::next`]), the queue, the leases, the source lock, the batching,
//! the proposal and the chain follower know nothing of the kind. Only the
//! worker's calls to Phala (prepare, commit, follow) are chosen by it, in
//! `worker::change`.
//!
//! Today there is one kind, the replica. Updates, device changes and
//! removals are to come: each adds a variant here, its name to the `kind`
//! column's check, and its calls in the worker.

use std::fmt;
use std::str::FromStr;

/// What a change changes. The names are stored in the `kind` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// A new replica of a source CVM, on a node (`/api/v1/replicas`).
    Replica,
}

impl ChangeKind {
    pub const ALL: [ChangeKind; 1] = [ChangeKind::Replica];

    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Replica => "replica",
        }
    }
}

impl fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind of change `{0}`")]
pub struct UnknownKind(pub String);

impl FromStr for ChangeKind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ChangeKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_back_from_its_stored_name() {
        for kind in ChangeKind::ALL {
            assert_eq!(kind.as_str().parse::<ChangeKind>(), Ok(kind));
        }
        // The migration's default and check name exactly these.
        assert_eq!(ChangeKind::ALL.map(ChangeKind::as_str), ["replica"]);
        assert_eq!(
            "update".parse::<ChangeKind>(),
            Err(UnknownKind("update".into()))
        );
    }
}
