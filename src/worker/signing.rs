//! What the proposer key may sign: only a stored proposal that is exactly
//! what the bridge planned. The planner checks before it signs or posts, and
//! the queue keeping before it withdraws; a forged row fails instead.

use std::collections::BTreeSet;

use alloy::primitives::{Address, Bytes};

use super::Worker;
use crate::domain::Failure;
use crate::safe::{AppCall, Operation, SafeTx, SafeVersion, check_signable};
use crate::store::{JobLease, ProposalRow, StoredError};

/// The stored transaction, if the proposer key may sign it: its fields
/// parse, hash to its safeTxHash, and make exactly the calls stored with it
/// on the apps of its requests (`safe::verify`). Whoever can write the
/// database must not get anything else signed. `Err`: why not.
pub(super) async fn signable(
    worker: &Worker,
    stored: &ProposalRow,
) -> anyhow::Result<Result<(Address, SafeTx, SafeVersion), String>> {
    fn field<T: std::str::FromStr>(value: &str, name: &str) -> Result<T, String> {
        value
            .parse()
            .map_err(|_| format!("its {name} `{value}` does not parse"))
    }
    let parsed = || -> Result<(Address, SafeTx, SafeVersion), String> {
        let operation = Operation::try_from(stored.operation as u8)?;
        let tx = SafeTx::new(
            field(&stored.to_address, "to")?,
            field(&stored.value, "value")?,
            field::<Bytes>(&stored.data, "data")?,
            operation,
            stored.nonce as u64,
        );
        let safe = field(&stored.safe, "Safe")?;
        let version = field(&stored.safe_version, "Safe version")?;
        let hash = tx.hash(safe, stored.chain_id as u64, version);
        if hash.to_string() != stored.safe_tx_hash {
            return Err(format!("its fields hash to {hash}, not to its safeTxHash"));
        }
        Ok((safe, tx, version))
    };
    let (safe, tx, version) = match parsed() {
        Ok(parsed) => parsed,
        Err(why) => return Ok(Err(why)),
    };
    let mut planned = Vec::new();
    for (position, (_, call)) in worker
        .store
        .proposal_calls(&[stored.id])
        .await?
        .into_iter()
        .enumerate()
    {
        let app = call.app_id.parse().ok();
        let value = call.value.parse().ok();
        planned.push(match (app, value, call.kind.as_str()) {
            (Some(app), Some(compose_hash), "compose_hash") => {
                AppCall::AddComposeHash { app, compose_hash }
            }
            (Some(app), Some(device_id), "device") => AppCall::AddDevice { app, device_id },
            _ => return Ok(Err(format!("its stored call {position} does not parse"))),
        });
    }
    let apps: BTreeSet<Address> = worker
        .store
        .requests_served_by(&[stored.id])
        .await?
        .iter()
        .filter_map(|r| r.app_id.as_deref()?.parse().ok())
        .collect();
    Ok(
        check_signable(&tx, stored.chain_id as u64, version, &planned, &apps)
            .map(|()| (safe, tx, version))
            .map_err(|why| why.to_string()),
    )
}

/// A stored proposal that is not what the bridge planned fails, with its
/// requests, and nothing is signed or posted.
pub(super) async fn refuse_to_sign(
    worker: &Worker,
    stored: &ProposalRow,
    why: &str,
    fence: Option<&JobLease>,
) -> anyhow::Result<()> {
    tracing::error!(
        proposal_id = %stored.id,
        safe_tx_hash = %stored.safe_tx_hash,
        nonce = stored.nonce,
        reason = %why,
        "a stored proposal is not what the bridge planned: not signed, not posted"
    );
    metrics::counter!(crate::metrics::PROPOSALS_REFUSED).increment(1);
    let err = StoredError::of(
        Failure::ProposalUnverified,
        &format!(
            "the bridge refused to sign its stored proposal {}: {why}",
            stored.safe_tx_hash
        ),
    );
    worker
        .store
        .reject_proposal(stored.id, worker.clock.now(), &err, false, fence)
        .await?;
    Ok(())
}
