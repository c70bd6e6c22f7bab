//! The one catalogue of the failure codes users see: each with its code,
//! what it means, and what to do. Pure, no I/O.
//!
//! The message stored with a failure says what happened in that case; the
//! meaning here says what the code stands for. Phala's own codes
//! (`ERR-…`) are Phala's catalogue and are not repeated here. README's table
//! of failure codes is [`readme_table`], checked by a test.

/// A failure users see, on a request (`last_error`) or a proposal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    // Planning a proposal.
    NoChain,
    NoRpc,
    ChainUnavailable,
    AppUnreadable,
    OwnershipPending,
    SafeNotAllowed,
    OwnerIsEoa,
    OwnerNotSafe,
    InvalidRegistration,
    SimulationReverted,
    HashMismatch,
    ProposalConflict,
    // Posting a proposal.
    InvalidProposal,
    SafeService,
    ProposalUnverified,
    NoRequest,
    // The Safe Transaction Service's answers.
    SafeRejected,
    SafeRateLimited,
    SafeUnauthorized,
    SafeUnavailable,
    SafeHttp,
    SafeTimeout,
    SafeUnreachable,
    SafeInvalidResponse,
    // Following the chain.
    ChainFollower,
    SafeVersionChanged,
    SafeExecutionFailed,
    SafeNonceReplaced,
    ProposalExpired,
    ProposalExecutedLate,
    // Phala's answers, where Phala sent no code of its own.
    PhalaHttp,
    PhalaTimeout,
    PhalaUnreachable,
    PhalaInvalidResponse,
    PrepareAnswerMismatch,
    // Committing and creating.
    MissingComposeHash,
    ReplicaIdReused,
    CommitOutcomePending,
    ReplicateOutcomePending,
    CommitOutcomeUnknown,
    ReplicateOutcomeUnknown,
    CommitCreatedNotVisible,
    ReplicateCreatedNotVisible,
    // Following the replica.
    MissingReplica,
    ReplicaNotFound,
    ReplicaFailed,
    ReplicaSlowBoot,
    ReplicaTimeout,
}

/// A catalogue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureInfo {
    /// The stored code; `<status>` stands for an HTTP status.
    pub code: &'static str,
    /// What the code stands for.
    pub meaning: &'static str,
    /// What to do, as stored with it (some cases word it for the case).
    pub suggestion: Option<&'static str>,
}

const RETRIES_SAFE: &str =
    "The bridge retries with backoff; check the Safe service status if it persists.";
const RETRIES_PHALA: &str =
    "The bridge retries with backoff; check the Phala Cloud status if it persists.";
const REPORT: &str = "Report this to the bridge maintainers with the request id.";
const PROPOSES_AGAIN: &str = "The bridge proposes the registrations again.";

impl Failure {
    pub const ALL: [Failure; 48] = [
        Failure::NoChain,
        Failure::NoRpc,
        Failure::ChainUnavailable,
        Failure::AppUnreadable,
        Failure::OwnershipPending,
        Failure::SafeNotAllowed,
        Failure::OwnerIsEoa,
        Failure::OwnerNotSafe,
        Failure::InvalidRegistration,
        Failure::SimulationReverted,
        Failure::HashMismatch,
        Failure::ProposalConflict,
        Failure::InvalidProposal,
        Failure::SafeService,
        Failure::ProposalUnverified,
        Failure::NoRequest,
        Failure::SafeRejected,
        Failure::SafeRateLimited,
        Failure::SafeUnauthorized,
        Failure::SafeUnavailable,
        Failure::SafeHttp,
        Failure::SafeTimeout,
        Failure::SafeUnreachable,
        Failure::SafeInvalidResponse,
        Failure::ChainFollower,
        Failure::SafeVersionChanged,
        Failure::SafeExecutionFailed,
        Failure::SafeNonceReplaced,
        Failure::ProposalExpired,
        Failure::ProposalExecutedLate,
        Failure::PhalaHttp,
        Failure::PhalaTimeout,
        Failure::PhalaUnreachable,
        Failure::PhalaInvalidResponse,
        Failure::PrepareAnswerMismatch,
        Failure::MissingComposeHash,
        Failure::ReplicaIdReused,
        Failure::CommitOutcomePending,
        Failure::ReplicateOutcomePending,
        Failure::CommitOutcomeUnknown,
        Failure::ReplicateOutcomeUnknown,
        Failure::CommitCreatedNotVisible,
        Failure::ReplicateCreatedNotVisible,
        Failure::MissingReplica,
        Failure::ReplicaNotFound,
        Failure::ReplicaFailed,
        Failure::ReplicaSlowBoot,
        Failure::ReplicaTimeout,
    ];

    pub const fn info(self) -> FailureInfo {
        let (code, meaning, suggestion) = match self {
            Failure::NoChain => (
                "NO-CHAIN",
                "Phala reported no chain for an app with on-chain KMS",
                None,
            ),
            Failure::NoRpc => (
                "NO-RPC",
                "no RPC URL is configured for the app's chain; the requests wait",
                Some("Set APPROVAL_BRIDGE_RPC_URLS (or ETH_RPC_URL) and restart the bridge."),
            ),
            Failure::ChainUnavailable => (
                "CHAIN-UNAVAILABLE",
                "the chain could not be read (the app, its owner, the Safe, a simulation); the bridge reads it again",
                None,
            ),
            Failure::AppUnreadable => (
                "APP-UNREADABLE",
                "the app does not answer `owner()` on its chain: it is not a DstackApp there, or it reverts",
                Some(
                    "Check the app id Phala reports for the source; the bridge reads the app again shortly.",
                ),
            ),
            Failure::OwnershipPending => (
                "OWNERSHIP-PENDING",
                "a Safe is staged as the app's pending owner but has not accepted ownership",
                Some(
                    "The Safe must call acceptOwnership() on the app (as a Safe transaction), then queue again.",
                ),
            ),
            Failure::SafeNotAllowed => (
                "SAFE-NOT-ALLOWED",
                "the app is owned by a Safe that is not in the bridge's list of Safes",
                Some(
                    "Add it to APPROVAL_BRIDGE_SAFES as chain_id:address if the bridge should propose to it.",
                ),
            ),
            Failure::OwnerIsEoa => (
                "OWNER-IS-EOA",
                "the app is owned by an account, not a Safe: the Safe flow does not apply",
                Some(
                    "The owner can register the hash and device itself: the Phala CLI's `phala cvms replicate` does this automatically for EOA owners.",
                ),
            ),
            Failure::OwnerNotSafe => (
                "OWNER-NOT-SAFE",
                "the app is owned by a contract that is not a Safe",
                Some(
                    "Transfer the app's ownership to a Safe, or register the hash and device through the owning contract.",
                ),
            ),
            Failure::InvalidRegistration => (
                "INVALID-REGISTRATION",
                "Phala sent an app id, compose hash or device id that is not a valid value",
                Some("Phala sent an unusable value; queue again."),
            ),
            Failure::SimulationReverted => (
                "SIMULATION-REVERTED",
                "a registration reverts when the Safe calls it: nothing was proposed",
                Some(
                    "Nothing was proposed. Check that the Safe owns the app and the values are right, then queue again.",
                ),
            ),
            Failure::HashMismatch => (
                "HASH-MISMATCH",
                "the Safe computes another safeTxHash for the transaction than the bridge",
                Some(
                    "Nothing was proposed. Report this to the bridge maintainers with the Safe's address and version.",
                ),
            ),
            Failure::ProposalConflict => (
                "PROPOSAL-CONFLICT",
                "the planned Safe transaction is stored already as a proposal that cannot be opened again",
                Some("The bridge plans again shortly; report this if it persists."),
            ),
            Failure::InvalidProposal => (
                "INVALID-PROPOSAL",
                "a stored proposal holds a value that is not valid (its Safe, its safeTxHash)",
                None,
            ),
            Failure::SafeService => (
                "SAFE-SERVICE",
                "no Safe Transaction Service is configured for the chain",
                None,
            ),
            Failure::ProposalUnverified => (
                "PROPOSAL-UNVERIFIED",
                "the bridge refused to sign its stored proposal: the row is not what it planned",
                Some(
                    "Nothing was posted. The proposal's row in the database is not what the bridge planned \
                     for its requests: find out who changed it, then queue the requests again.",
                ),
            ),
            Failure::NoRequest => (
                "NO-REQUEST",
                "the proposal served no request any more and was withdrawn; its nonce went to the next batch",
                None,
            ),
            Failure::SafeRejected => (
                "SAFE-REJECTED",
                "the Safe Transaction Service refused the proposal; its answer is kept verbatim",
                Some("Read the service's message: it names the rule the proposal broke."),
            ),
            Failure::SafeRateLimited => (
                "SAFE-RATE-LIMITED",
                "the Safe Transaction Service answered 429; the bridge retries",
                Some(
                    "The bridge retries later; lower the request rate or raise the API key's plan if it persists.",
                ),
            ),
            Failure::SafeUnauthorized => (
                "SAFE-HTTP-<401/403>",
                "the Safe Transaction Service refused the bridge's credentials",
                Some("Check the Safe Transaction Service API key."),
            ),
            Failure::SafeUnavailable => (
                "SAFE-HTTP-<5xx>",
                "the Safe Transaction Service failed; the bridge retries",
                Some(RETRIES_SAFE),
            ),
            Failure::SafeHttp => (
                "SAFE-HTTP-<status>",
                "the Safe Transaction Service answered with another unexpected status",
                Some(REPORT),
            ),
            Failure::SafeTimeout => (
                "SAFE-TIMEOUT",
                "a call to the Safe Transaction Service timed out; the bridge retries",
                Some(RETRIES_SAFE),
            ),
            Failure::SafeUnreachable => (
                "SAFE-UNREACHABLE",
                "the Safe Transaction Service could not be reached; the bridge retries",
                Some(RETRIES_SAFE),
            ),
            Failure::SafeInvalidResponse => (
                "SAFE-INVALID-RESPONSE",
                "the Safe Transaction Service sent an answer the bridge cannot read",
                Some(REPORT),
            ),
            Failure::ChainFollower => (
                "CHAIN-FOLLOWER",
                "following the chain failed, or it showed something the bridge cannot attribute; nothing is committed meanwhile",
                Some(
                    "The bridge keeps watching; nothing is committed until the chain answers consistently.",
                ),
            ),
            Failure::SafeVersionChanged => (
                "SAFE-VERSION-CHANGED",
                "the Safe reports another `VERSION()` than when the proposal was made",
                Some(
                    "The bridge does not commit on doubtful evidence; check the Safe, then cancel and queue again if needed.",
                ),
            ),
            Failure::SafeExecutionFailed => (
                "SAFE-EXECUTION-FAILED",
                "the Safe executed the proposal with `ExecutionFailure`: its nonce is used",
                Some(PROPOSES_AGAIN),
            ),
            Failure::SafeNonceReplaced => (
                "SAFE-NONCE-REPLACED",
                "the Safe used the proposal's nonce for another transaction (a rejection or replacement)",
                Some(PROPOSES_AGAIN),
            ),
            Failure::ProposalExpired => (
                "PROPOSAL-EXPIRED",
                "nobody executed the proposal within `APPROVAL_BRIDGE_PROPOSAL_TIMEOUT_SECS`",
                Some("Ask the Safe owners, then queue the replica again."),
            ),
            Failure::ProposalExecutedLate => (
                "PROPOSAL-EXECUTED-LATE",
                "the owners executed a proposal after the bridge gave up on it, and a newer request makes the replica",
                Some("Follow the newer request."),
            ),
            Failure::PhalaHttp => (
                "PHALA-HTTP-<status>",
                "Phala answered with an error status and no code of its own",
                None,
            ),
            Failure::PhalaTimeout => (
                "PHALA-TIMEOUT",
                "a call to Phala Cloud timed out",
                Some(RETRIES_PHALA),
            ),
            Failure::PhalaUnreachable => (
                "PHALA-UNREACHABLE",
                "Phala Cloud could not be reached",
                Some(RETRIES_PHALA),
            ),
            Failure::PhalaInvalidResponse => (
                "PHALA-INVALID-RESPONSE",
                "Phala sent an answer the bridge cannot read",
                Some(REPORT),
            ),
            Failure::PrepareAnswerMismatch => (
                "PREPARE-ANSWER-MISMATCH",
                "Phala's prepare answer does not match the source or node the request names",
                Some(
                    "Nothing was proposed. Check the source CVM and the node on the Phala dashboard, then queue the replica again.",
                ),
            ),
            Failure::MissingComposeHash => (
                "MISSING-COMPOSE-HASH",
                "the request reached committing without a compose hash",
                Some("Queue the replica again."),
            ),
            Failure::ReplicaIdReused => (
                "REPLICA-ID-REUSED",
                "Phala answered with a replica another request of this bridge already owns",
                Some(
                    "Look at the source's instances on the Phala dashboard: this request's replica may exist under another id.",
                ),
            ),
            Failure::CommitOutcomePending => (
                "COMMIT-OUTCOME-PENDING",
                "the commit got no answer; the bridge looks for its replica before sending anything again",
                Some(OUTCOME_PENDING),
            ),
            Failure::ReplicateOutcomePending => (
                "REPLICATE-OUTCOME-PENDING",
                "the direct create got no answer; the bridge looks for its replica before sending anything again",
                Some(OUTCOME_PENDING),
            ),
            Failure::CommitOutcomeUnknown => (
                "COMMIT-OUTCOME-UNKNOWN",
                "the commit got no answer, and the instance list stayed unreadable past its bound",
                Some(OUTCOME_UNKNOWN),
            ),
            Failure::ReplicateOutcomeUnknown => (
                "REPLICATE-OUTCOME-UNKNOWN",
                "the direct create got no answer, and the instance list stayed unreadable past its bound",
                Some(OUTCOME_UNKNOWN),
            ),
            Failure::CommitCreatedNotVisible => (
                "COMMIT-CREATED-NOT-VISIBLE",
                "Phala refused the resent commit as if the first had taken effect, but no replica appeared",
                Some(CREATED_NOT_VISIBLE),
            ),
            Failure::ReplicateCreatedNotVisible => (
                "REPLICATE-CREATED-NOT-VISIBLE",
                "Phala refused the resent create as if the first had taken effect, but no replica appeared",
                Some(CREATED_NOT_VISIBLE),
            ),
            Failure::MissingReplica => (
                "MISSING-REPLICA",
                "Phala accepted the replica but sent no `vm_uuid` to follow",
                Some("Check the source's instances on the Phala dashboard."),
            ),
            Failure::ReplicaNotFound => (
                "REPLICA-NOT-FOUND",
                "the replica stayed unknown to Phala (404) past `APPROVAL_BRIDGE_REPLICA_MISSING_TIMEOUT_SECS`",
                Some("Look at the source's instances on the Phala dashboard."),
            ),
            Failure::ReplicaFailed => (
                "REPLICA-FAILED",
                "the replica stopped in a failed status",
                Some("Look at the replica's logs on the Phala dashboard."),
            ),
            Failure::ReplicaSlowBoot => (
                "REPLICA-SLOW-BOOT",
                "a warning: the replica has booted for over half of `APPROVAL_BRIDGE_REPLICA_BOOT_TIMEOUT_SECS`",
                Some("Look at the replica's boot progress on the Phala dashboard."),
            ),
            Failure::ReplicaTimeout => (
                "REPLICA-TIMEOUT",
                "the replica did not run within `APPROVAL_BRIDGE_REPLICA_BOOT_TIMEOUT_SECS`",
                Some("Look at the replica on the Phala dashboard."),
            ),
        };
        FailureInfo {
            code,
            meaning,
            suggestion,
        }
    }

    /// The stored code (for a code with `<…>` in it, see [`Failure::code_for_status`]).
    pub const fn code(self) -> &'static str {
        self.info().code
    }

    pub const fn suggestion(self) -> Option<&'static str> {
        self.info().suggestion
    }

    /// The code of a failure named after an HTTP status: `SAFE-HTTP-503`.
    pub fn code_for_status(self, status: u16) -> String {
        let code = self.code();
        match code.find('<') {
            Some(at) => format!("{}{status}", &code[..at]),
            None => code.to_owned(),
        }
    }

    /// The failures of an unanswered Phala call, `commit` or `replicate`:
    /// (pending, unknown, created but not visible).
    pub fn of_unanswered_call(call: &str) -> (Failure, Failure, Failure) {
        if call == "commit" {
            (
                Failure::CommitOutcomePending,
                Failure::CommitOutcomeUnknown,
                Failure::CommitCreatedNotVisible,
            )
        } else {
            (
                Failure::ReplicateOutcomePending,
                Failure::ReplicateOutcomeUnknown,
                Failure::ReplicateCreatedNotVisible,
            )
        }
    }
}

const OUTCOME_PENDING: &str =
    "Nothing to do: the bridge checks Phala's instance list and goes on by itself.";
const OUTCOME_UNKNOWN: &str = "Check the source's instances on the Phala dashboard; queue again only if no replica was created.";
const CREATED_NOT_VISIBLE: &str = "The replica most likely exists: look at the source's instances on the Phala dashboard before queueing it again.";

/// The README's table of failure codes, in catalogue order.
pub fn readme_table() -> String {
    let mut table = String::from("| code | what it means | what to do |\n|---|---|---|\n");
    for failure in Failure::ALL {
        let info = failure.info();
        table.push_str(&format!(
            "| `{}` | {} | {} |\n",
            info.code,
            info.meaning,
            info.suggestion.unwrap_or("—")
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_code_is_listed_once_and_is_distinct() {
        let listed: HashSet<Failure> = Failure::ALL.into_iter().collect();
        assert_eq!(listed.len(), Failure::ALL.len());
        let codes: HashSet<&str> = Failure::ALL.iter().map(|f| f.code()).collect();
        assert_eq!(codes.len(), Failure::ALL.len());
        for failure in Failure::ALL {
            let code = failure.code();
            // An uppercase name, then perhaps `<…>` for an HTTP status.
            let (name, status) = code.split_once('<').unwrap_or((code, ">"));
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-'),
                "{code}"
            );
            assert!(status.ends_with('>') && !status.contains('|'), "{code}");
            assert!(!failure.info().meaning.is_empty(), "{code}");
            // They are cells of README's table.
            assert!(!failure.info().meaning.contains('|'), "{code}");
            assert!(
                !failure.suggestion().unwrap_or_default().contains('|'),
                "{code}"
            );
        }
    }

    #[test]
    fn codes_named_after_a_status_carry_it() {
        assert_eq!(
            Failure::SafeUnavailable.code_for_status(503),
            "SAFE-HTTP-503"
        );
        assert_eq!(
            Failure::SafeUnauthorized.code_for_status(401),
            "SAFE-HTTP-401"
        );
        assert_eq!(Failure::PhalaHttp.code_for_status(502), "PHALA-HTTP-502");
        assert_eq!(Failure::NoRpc.code_for_status(500), "NO-RPC");
    }

    #[test]
    fn readme_lists_every_failure_code_as_the_catalogue_says() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let table = readme_table();
        assert!(
            readme.contains(&table),
            "README.md's table of failure codes differs from the catalogue in src/domain/failures.rs; \
             it should read:\n{table}"
        );
    }
}
