//! Pure rules: what the contract state and a commit's transaction prove,
//! token validity, and node scheduling. No I/O; the handlers feed them.

use std::collections::HashMap;

use alloy::primitives::{Address, B256};
use alloy::rpc::types::TransactionReceipt;
use alloy::sol_types::SolEvent;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::codes;
use super::errors::SimError;
use super::state::{IssuedToken, TokenState};
use super::world::SimNode;
use crate::chain::IDstackApp;

/// What the contract says about one replica's registrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Onchain {
    pub(super) compose_hash_allowed: bool,
    /// `allowedDeviceIds(device) || allowAnyDevice()`.
    pub(super) device_allowed: bool,
}

impl Onchain {
    pub(super) fn json(self) -> Value {
        json!({
            "compose_hash_allowed": self.compose_hash_allowed,
            "device_id_allowed": self.device_allowed,
            "is_allowed": self.compose_hash_allowed && self.device_allowed,
        })
    }
}

/// What the commit's `transaction_hash` proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TxEvidence {
    /// `already-registered` or no hash: state only.
    StateOnly,
    /// No receipt, a failed one, or no log from the app.
    Unrelated,
    /// Logs from the app, but not the expected `ComposeHashAdded(hash)` /
    /// `DeviceAdded(device)`.
    TouchedApp,
    /// A log of the expected change from the app.
    ExpectedChange,
}

/// Why a commit with a valid token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// 465 `ERR-01-005`.
    RegistrationRequired,
    /// 467 `ERR-01-007`.
    TxNotVerified,
    /// 468 `ERR-01-008`.
    HashNotAllowed,
}

/// The chain part of the commit checks, in the order of §6.
pub(super) fn commit_verdict(onchain: Onchain, evidence: TxEvidence) -> Result<(), Refusal> {
    let touched = matches!(
        evidence,
        TxEvidence::TouchedApp | TxEvidence::ExpectedChange
    );
    if !onchain.compose_hash_allowed {
        return Err(if touched {
            Refusal::HashNotAllowed
        } else {
            Refusal::RegistrationRequired
        });
    }
    if !onchain.device_allowed {
        return Err(Refusal::RegistrationRequired);
    }
    match evidence {
        TxEvidence::StateOnly | TxEvidence::ExpectedChange => Ok(()),
        TxEvidence::Unrelated | TxEvidence::TouchedApp => Err(Refusal::TxNotVerified),
    }
}

/// Reads a receipt for what it shows about `app`.
pub(super) fn receipt_evidence(
    receipt: Option<&TransactionReceipt>,
    app: Address,
    compose_hash: B256,
    device_id: B256,
) -> TxEvidence {
    let Some(receipt) = receipt.filter(|r| r.status()) else {
        return TxEvidence::Unrelated;
    };
    let app_logs: Vec<_> = receipt
        .logs()
        .iter()
        .filter(|log| log.address() == app)
        .collect();
    if app_logs.is_empty() {
        return TxEvidence::Unrelated;
    }
    let expected = app_logs.iter().any(|log| {
        let topic = log.topics().first().copied();
        let data = log.data().data.as_ref();
        (topic == Some(IDstackApp::ComposeHashAdded::SIGNATURE_HASH)
            && data == compose_hash.as_slice())
            || (topic == Some(IDstackApp::DeviceAdded::SIGNATURE_HASH)
                && data == device_id.as_slice())
    });
    if expected {
        TxEvidence::ExpectedChange
    } else {
        TxEvidence::TouchedApp
    }
}

/// Why a token does not commit, or `None` when it does.
pub(super) fn token_problem(
    token: &IssuedToken,
    source: Uuid,
    now: DateTime<Utc>,
) -> Option<&'static str> {
    if token.source_vm_uuid != source {
        Some("the token was issued for another CVM")
    } else if token.state == TokenState::Spent {
        Some("the token was already used")
    } else if token.state == TokenState::Superseded {
        Some("a newer prepare for this CVM superseded the token")
    } else if now >= token.expires_at {
        Some("the token has expired")
    } else {
        None
    }
}

/// The node a replica goes to: the requested one, else the source's, else
/// the first (by id) with a free slot.
pub(super) fn schedule(
    nodes: &[SimNode],
    slots: &HashMap<u32, u32>,
    requested: Option<i64>,
    source_node: u32,
) -> Result<u32, SimError> {
    let free = |id: u32| slots.get(&id).copied().unwrap_or(0) > 0;
    let full = |node: &SimNode| {
        SimError::envelope(
            StatusCode::BAD_REQUEST,
            codes::INSUFFICIENT_SLOTS,
            format!("Node {} ({}) has no free CVM slots", node.name, node.id),
        )
        .suggest("Choose another node.")
    };
    if let Some(id) = requested {
        let node = u32::try_from(id)
            .ok()
            .and_then(|id| nodes.iter().find(|n| n.id == id))
            .ok_or_else(|| {
                SimError::envelope(
                    StatusCode::BAD_REQUEST,
                    codes::NODE_NOT_FOUND,
                    format!("Node {id} not found"),
                )
                .suggest("List the available nodes with GET /teepods/available.")
            })?;
        return if free(node.id) {
            Ok(node.id)
        } else {
            Err(full(node))
        };
    }
    if free(source_node) {
        return Ok(source_node);
    }
    let mut ids: Vec<u32> = nodes.iter().map(|n| n.id).filter(|id| free(*id)).collect();
    ids.sort_unstable();
    match ids.first() {
        Some(id) => Ok(*id),
        None => Err(SimError::envelope(
            StatusCode::BAD_REQUEST,
            codes::INSUFFICIENT_SLOTS,
            "No node has a free CVM slot",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::phala_sim::world::{PhalaWorld, uuid_for};

    #[test]
    fn commit_verdict_follows_the_documented_order() {
        let allowed = Onchain {
            compose_hash_allowed: true,
            device_allowed: true,
        };
        let no_hash = Onchain {
            compose_hash_allowed: false,
            device_allowed: true,
        };
        let no_device = Onchain {
            compose_hash_allowed: true,
            device_allowed: false,
        };
        use Refusal::*;
        use TxEvidence::*;
        assert_eq!(commit_verdict(allowed, StateOnly), Ok(()));
        assert_eq!(commit_verdict(allowed, ExpectedChange), Ok(()));
        assert_eq!(commit_verdict(allowed, Unrelated), Err(TxNotVerified));
        assert_eq!(commit_verdict(allowed, TouchedApp), Err(TxNotVerified));
        assert_eq!(
            commit_verdict(no_hash, StateOnly),
            Err(RegistrationRequired)
        );
        assert_eq!(
            commit_verdict(no_hash, Unrelated),
            Err(RegistrationRequired)
        );
        assert_eq!(commit_verdict(no_hash, TouchedApp), Err(HashNotAllowed));
        assert_eq!(commit_verdict(no_hash, ExpectedChange), Err(HashNotAllowed));
        assert_eq!(
            commit_verdict(no_device, StateOnly),
            Err(RegistrationRequired)
        );
        assert_eq!(
            commit_verdict(no_device, ExpectedChange),
            Err(RegistrationRequired)
        );
    }

    #[test]
    fn token_problems() {
        let now = Utc::now();
        let source = uuid_for("s");
        let token = IssuedToken {
            token: "t".into(),
            source_vm_uuid: source,
            compose_hash: B256::ZERO,
            node_id: 1,
            device_id: B256::ZERO,
            issued_at: now,
            expires_at: now + chrono::Duration::days(14),
            state: TokenState::Live,
            env: None,
        };
        assert_eq!(token_problem(&token, source, now), None);
        assert!(token_problem(&token, uuid_for("other"), now).is_some());
        assert!(
            token_problem(&token, source, token.expires_at)
                .unwrap()
                .contains("expired")
        );
        let spent = IssuedToken {
            state: TokenState::Spent,
            ..token.clone()
        };
        assert!(token_problem(&spent, source, now).unwrap().contains("used"));
        let old = IssuedToken {
            state: TokenState::Superseded,
            ..token
        };
        assert!(
            token_problem(&old, source, now)
                .unwrap()
                .contains("newer prepare")
        );
    }

    #[test]
    fn scheduling_prefers_the_request_then_the_source_node() {
        let nodes = PhalaWorld::new(1).nodes;
        let slots: HashMap<u32, u32> = nodes.iter().map(|n| (n.id, n.free_slots)).collect();
        assert_eq!(schedule(&nodes, &slots, Some(3), 1).unwrap(), 3);
        assert_eq!(schedule(&nodes, &slots, None, 2).unwrap(), 2);
        assert_eq!(schedule(&nodes, &slots, None, 4).unwrap(), 1);
        let code = |err: SimError| match err {
            SimError::Envelope { code, .. } => code,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            code(schedule(&nodes, &slots, Some(4), 1).unwrap_err()),
            codes::INSUFFICIENT_SLOTS
        );
        assert_eq!(
            code(schedule(&nodes, &slots, Some(99), 1).unwrap_err()),
            codes::NODE_NOT_FOUND
        );
        let none: HashMap<u32, u32> = nodes.iter().map(|n| (n.id, 0)).collect();
        assert_eq!(
            code(schedule(&nodes, &none, None, 1).unwrap_err()),
            codes::INSUFFICIENT_SLOTS
        );
    }
}
