//! Phala Cloud errors: the structured envelope, the documented codes, and
//! which failures are worth retrying.

use serde_json::Value;

use crate::domain::Failure;

/// A failed Phala Cloud call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PhalaError {
    /// Phala answered with an error status.
    #[error("{}", .0.message)]
    Api(ApiError),
    /// No usable answer: connection refused, reset, or timed out.
    #[error("Phala Cloud could not be reached: {message}")]
    Transport { message: String, timed_out: bool },
    /// Phala answered 2xx (or 465) with a body we cannot use.
    #[error("Phala Cloud sent an unexpected response: {0}")]
    InvalidResponse(String),
}

/// An error answer, with our explanation of the code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// `ERR-xx-yyy` when Phala sent the structured envelope.
    pub code: Option<String>,
    /// What went wrong, in our words, followed by Phala's own message.
    pub message: String,
    /// What to do about it.
    pub suggestion: Option<String>,
}

impl PhalaError {
    /// 5xx, 429, rate-limit codes and transport failures pass with time;
    /// every other 4xx is permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            PhalaError::Transport { .. } => true,
            PhalaError::InvalidResponse(_) => false,
            PhalaError::Api(api) => {
                api.status >= 500
                    || api.status == 429
                    || api.code.as_deref() == Some(codes::TOKEN_RATE_LIMIT)
            }
        }
    }

    /// Whether a call that must not repeat may have taken effect although
    /// this error came back: no answer at all, a timeout, a 5xx of any shape
    /// (a gateway's 502 says nothing of what the server behind it did), or a
    /// success we could not read. Every other answer is Phala's own refusal.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            PhalaError::Transport { .. } | PhalaError::InvalidResponse(_) => true,
            PhalaError::Api(api) => api.status >= 500 || api.status == 408,
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            PhalaError::Api(api) => api.code.as_deref(),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            PhalaError::Api(api) => Some(api.status),
            _ => None,
        }
    }

    pub fn suggestion(&self) -> Option<&str> {
        match self {
            PhalaError::Api(api) => api.suggestion.as_deref(),
            PhalaError::Transport { .. } => Failure::PhalaUnreachable.suggestion(),
            PhalaError::InvalidResponse(_) => Failure::PhalaInvalidResponse.suggestion(),
        }
    }

    /// The stored error code: Phala's `ERR-…` code, or one of ours.
    pub fn stored_code(&self) -> String {
        match self {
            PhalaError::Api(ApiError {
                code: Some(code), ..
            }) => code.clone(),
            PhalaError::Api(ApiError { status, .. }) => Failure::PhalaHttp.code_for_status(*status),
            PhalaError::Transport {
                timed_out: true, ..
            } => Failure::PhalaTimeout.code().to_owned(),
            PhalaError::Transport { .. } => Failure::PhalaUnreachable.code().to_owned(),
            PhalaError::InvalidResponse(_) => Failure::PhalaInvalidResponse.code().to_owned(),
        }
    }
}

/// The documented codes the service acts on.
pub mod codes {
    pub const CVM_NOT_FOUND: &str = "ERR-03-001";
    pub const HASH_REGISTRATION_REQUIRED: &str = "ERR-01-005";
    pub const HASH_INVALID_OR_EXPIRED: &str = "ERR-01-006";
    pub const TX_VERIFICATION_FAILED: &str = "ERR-01-007";
    pub const HASH_NOT_ALLOWED: &str = "ERR-01-008";
    pub const INSUFFICIENT_SLOTS: &str = "ERR-02-005";
    pub const MULTIPLE_CVMS_MATCH: &str = "ERR-03-010";
    pub const TOKEN_RATE_LIMIT: &str = "ERR-05-002";
}

/// Our meaning and advice for a code: `(what happened, what to do)`.
pub fn explain(code: &str) -> Option<(&'static str, &'static str)> {
    let entry = match code {
        "ERR-01-001" => (
            "The node was not found",
            "Check the node id or name against the available nodes.",
        ),
        "ERR-01-005" => (
            "The compose hash or device must be registered on the app's DstackApp contract first",
            "Approve and execute the Safe proposal that registers it.",
        ),
        "ERR-01-006" => (
            "The commit token is invalid, expired (14-day lifetime) or superseded by a newer prepare for the same CVM",
            "Prepare the replica again to get a fresh token.",
        ),
        "ERR-01-007" => (
            "Phala could not verify the transaction against the expected addComposeHash change",
            "Commit with `already-registered` once the contract allows the compose hash.",
        ),
        "ERR-01-008" => (
            "The compose hash is not allowed by the app's DstackApp contract",
            "Register it with addComposeHash through the Safe, then commit again.",
        ),
        "ERR-02-003" => (
            "The node does not have enough free vCPUs for the replica",
            "Choose another node, or leave `node` out to let Phala schedule.",
        ),
        "ERR-02-004" => (
            "The node does not have enough free memory for the replica",
            "Choose another node, or leave `node` out to let Phala schedule.",
        ),
        "ERR-02-005" => (
            "The node has no free CVM slots",
            "Choose another node, or leave `node` out to let Phala schedule.",
        ),
        "ERR-03-001" => (
            "The CVM was not found",
            "Check the CVM UUID, app id or name.",
        ),
        "ERR-03-002" => (
            "Several CVMs have this name",
            "Use the CVM UUID or app id instead of the name.",
        ),
        "ERR-03-006" => (
            "The source CVM's OS image is not available on the target node",
            "Choose a node that offers the source's image.",
        ),
        "ERR-03-008" | "ERR-03-009" => (
            "Phala rejected the replica with an undocumented error",
            "Read Phala's message; contact Phala support if it is unclear.",
        ),
        "ERR-03-010" => (
            "The identifier matches several CVMs of the app",
            "Pass `compose_hash` to choose the configuration, or use a CVM UUID.",
        ),
        "ERR-04-001" => (
            "The Phala Cloud workspace balance is too low to create the replica",
            "Top up the workspace, then queue the replica again.",
        ),
        "ERR-05-001" => (
            "The Phala API key has reached its usage limit",
            "Raise the key's limit or configure another APPROVAL_BRIDGE_PHALA_API_KEY.",
        ),
        "ERR-05-002" => (
            "The Phala API key is rate-limited",
            "The bridge retries later; lower the request rate if it persists.",
        ),
        c if c.starts_with("ERR-05-") => (
            "Phala rejected the bridge's API credentials",
            "Check APPROVAL_BRIDGE_PHALA_API_KEY.",
        ),
        _ => return None,
    };
    Some(entry)
}

/// Builds an [`ApiError`] from a status and body, reading the structured
/// envelope whether it sits under `detail` (FastAPI style) or at the top level.
pub fn parse_error(status: u16, body: &[u8]) -> ApiError {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let envelope = json.as_ref().and_then(structured_envelope);

    let (code, server_message, server_suggestion) = match envelope {
        Some(env) => (
            env.get("error_code")
                .and_then(Value::as_str)
                .map(str::to_owned),
            env.get("message")
                .and_then(Value::as_str)
                .map(str::to_owned),
            env.get("suggestions")
                .and_then(Value::as_array)
                .and_then(|s| s.first())
                .and_then(Value::as_str)
                .map(str::to_owned),
        ),
        None => (None, json.as_ref().and_then(unstructured_message), None),
    };

    let (meaning, advice) = match code.as_deref().and_then(explain) {
        Some((meaning, advice)) => (Some(meaning), Some(advice)),
        None => match status {
            401 | 403 => (
                Some("Phala Cloud rejected the bridge's API key"),
                Some("Check APPROVAL_BRIDGE_PHALA_API_KEY."),
            ),
            429 => (
                Some("Phala Cloud is rate-limiting the bridge"),
                Some("The bridge retries later."),
            ),
            s if s >= 500 => (
                Some("Phala Cloud had an internal error"),
                Some("The bridge retries with backoff."),
            ),
            _ => (None, None),
        },
    };

    let message = match (meaning, server_message) {
        (Some(meaning), Some(server)) if !server.is_empty() => {
            format!("{meaning} (Phala: {server})")
        }
        (Some(meaning), _) => meaning.to_owned(),
        (None, Some(server)) if !server.is_empty() => {
            format!("Phala Cloud answered HTTP {status}: {server}")
        }
        (None, _) => format!("Phala Cloud answered HTTP {status}"),
    };

    ApiError {
        status,
        code,
        message,
        suggestion: advice.map(str::to_owned).or(server_suggestion),
    }
}

/// The envelope object: `body.detail` when it has `error_code` and `message`,
/// else the body itself when it has them.
pub fn structured_envelope(body: &Value) -> Option<&Value> {
    let is_envelope = |v: &Value| {
        v.get("error_code").is_some_and(Value::is_string)
            && v.get("message").is_some_and(Value::is_string)
    };
    match body.get("detail") {
        Some(detail) if is_envelope(detail) => Some(detail),
        _ if is_envelope(body) => Some(body),
        _ => None,
    }
}

/// A plain-string `detail`, or the messages of a FastAPI validation error.
fn unstructured_message(body: &Value) -> Option<String> {
    match body.get("detail")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => {
            let msgs: Vec<&str> = items
                .iter()
                .filter_map(|i| i.get("msg").and_then(Value::as_str))
                .collect();
            (!msgs.is_empty()).then(|| msgs.join("; "))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_is_read_nested_or_top_level() {
        let nested = br#"{"detail": {"error_code": "ERR-02-005", "message": "no slots", "suggestions": ["pick another"]}}"#;
        let top = br#"{"error_code": "ERR-02-005", "message": "no slots"}"#;
        for body in [&nested[..], &top[..]] {
            let err = parse_error(400, body);
            assert_eq!(err.code.as_deref(), Some("ERR-02-005"));
            assert_eq!(
                err.message,
                "The node has no free CVM slots (Phala: no slots)"
            );
            assert!(err.suggestion.unwrap().contains("another node"));
        }
    }

    #[test]
    fn every_documented_code_has_an_explanation() {
        for code in [
            "ERR-01-005",
            "ERR-01-006",
            "ERR-01-007",
            "ERR-01-008",
            "ERR-02-003",
            "ERR-02-004",
            "ERR-02-005",
            "ERR-03-006",
            "ERR-03-008",
            "ERR-03-009",
            "ERR-03-010",
            "ERR-04-001",
            "ERR-05-001",
            "ERR-05-002",
            "ERR-05-003",
        ] {
            let (meaning, advice) = explain(code).unwrap_or_else(|| panic!("{code} unexplained"));
            assert!(!meaning.is_empty() && !advice.is_empty());
        }
    }

    #[test]
    fn transient_classification() {
        let api = |status, code: Option<&str>| {
            PhalaError::Api(ApiError {
                status,
                code: code.map(str::to_owned),
                message: String::new(),
                suggestion: None,
            })
        };
        assert!(api(500, None).is_transient());
        assert!(api(503, None).is_transient());
        assert!(api(429, None).is_transient());
        assert!(api(400, Some("ERR-05-002")).is_transient());
        assert!(!api(400, Some("ERR-02-005")).is_transient());
        assert!(!api(466, Some("ERR-01-006")).is_transient());
        assert!(!api(404, None).is_transient());
        assert!(
            PhalaError::Transport {
                message: "x".into(),
                timed_out: true
            }
            .is_transient()
        );
    }

    #[test]
    fn unstructured_bodies_still_give_a_message() {
        assert_eq!(
            parse_error(404, br#"{"detail": "Not Found"}"#).message,
            "Phala Cloud answered HTTP 404: Not Found"
        );
        let validation = br#"{"detail": [{"loc": ["body", "node_id"], "msg": "value is not a valid integer", "type": "x"}]}"#;
        assert!(
            parse_error(422, validation)
                .message
                .contains("not a valid integer")
        );
        assert_eq!(
            parse_error(502, b"<html>").message,
            "Phala Cloud had an internal error"
        );
    }
}
