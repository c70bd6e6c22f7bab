//! Pure types and rules of the service. Nothing here talks to the outside world.

mod change;
mod failures;
mod ids;
mod order;
mod proposal;
mod queue;
pub mod signature;
mod state;

pub use change::{ChangeKind, UnknownKind};
pub use failures::{Failure, FailureInfo, readme_table};
pub use ids::{AppId, Bytes32, InvalidId};
pub use order::{InvalidOrder, MAX_REPLICAS_PER_ORDER, NodeRef, OrderBody, ReplicaOrder};
pub use proposal::{
    AlreadyEnded, ProposalEnd, ProposalStatus, UnknownProposalStatus, end_proposal,
};
pub use queue::{Mark, Queued, Stuck, mark, serves_no_request_advice};
pub use state::{
    Effects, Event, IllegalTransition, Status, Transition, UnknownStatus, holds_source_lock, next,
    transition,
};

/// Who caused a change, as recorded in the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A caller of the JSON API, named after its API token.
    ApiClient(String),
    /// A CI system, named after its webhook secret.
    CiClient(String),
    /// A person on the team web page.
    WebUser(String),
    /// The background worker.
    Worker,
}

impl Actor {
    /// The form stored in the event log and shown by the API: `kind:name`.
    pub fn label(&self) -> String {
        match self {
            Actor::ApiClient(name) => format!("api:{name}"),
            Actor::CiClient(name) => format!("ci:{name}"),
            Actor::WebUser(name) => format!("web:{name}"),
            Actor::Worker => "worker".to_owned(),
        }
    }
}

/// A person as page sessions name them: an address checksummed (however a
/// wallet or a person wrote it), or a proxy user name as given.
pub fn session_subject(raw: &str) -> String {
    let raw = raw.trim();
    match raw.parse::<alloy::primitives::Address>() {
        Ok(address) => address.to_checksum(None),
        Err(_) => raw.to_owned(),
    }
}

#[cfg(test)]
mod session_subject_tests {
    use super::session_subject;

    #[test]
    fn an_address_is_checksummed_and_a_user_name_kept() {
        let checksummed = "0x976EA74026E726554dB657fA54763abd0C3a0aa9";
        assert_eq!(session_subject(&checksummed.to_lowercase()), checksummed);
        assert_eq!(session_subject(&format!(" {checksummed} ")), checksummed);
        assert_eq!(session_subject("ops@example.com"), "ops@example.com");
    }
}
