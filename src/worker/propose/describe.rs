//! What a proposal means in human terms, learned from Phala once, when it is
//! planned: every CVM of each app it touches (with the configuration each
//! runs), and the name and region of each node whose device it adds. Kept
//! in `proposal_facts`, so the signers' view and the notifications never
//! wait for Phala; a failure is tried again by the planner a minute later.

use std::collections::BTreeSet;
use std::time::Duration;

use uuid::Uuid;

use super::PlanScope;
use crate::phala::PhalaClient;
use crate::store::{AppFacts, CvmFacts, NodeFacts, ProposalFacts, StoredRegistration, same_hex};
use crate::worker::Worker;

/// How long the planner spends asking Phala about one proposal.
const BUDGET: Duration = Duration::from_secs(10);
/// How long after a failed attempt the planner asks again.
const TRY_AGAIN_AFTER: chrono::Duration = chrono::Duration::seconds(60);

/// Learns and stores the facts of one proposal; a failure is only logged.
pub(super) async fn learn(
    worker: &Worker,
    proposal_id: Uuid,
    calls: &[StoredRegistration],
) -> anyhow::Result<()> {
    let facts = match tokio::time::timeout(BUDGET, gather(&worker.phala, calls)).await {
        Ok(Ok(facts)) => Some(facts),
        Ok(Err(err)) => {
            tracing::warn!(%proposal_id, error = format!("{err:#}"), "cannot describe the proposal's apps and nodes; trying again later");
            None
        }
        Err(_) => {
            tracing::warn!(%proposal_id, "Phala is slow to describe the proposal's apps and nodes; trying again later");
            None
        }
    };
    worker
        .store
        .set_proposal_facts(proposal_id, worker.clock.now(), facts.as_ref())
        .await?;
    Ok(())
}

/// Describes the scope's open proposals that have no facts yet (stored
/// before a crash, or Phala failed the first time).
pub(super) async fn fill_missing(worker: &Worker, scope: &PlanScope) -> anyhow::Result<()> {
    let now = worker.clock.now();
    let lacking: Vec<_> = worker
        .store
        .proposals_lacking_facts(now - TRY_AGAIN_AFTER)
        .await?
        .into_iter()
        .filter(|p| scope.takes_proposal(p))
        .collect();
    if lacking.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = lacking.iter().map(|p| p.id).collect();
    let calls = worker.store.proposal_calls(&ids).await?;
    for id in ids {
        let mine: Vec<StoredRegistration> = calls
            .iter()
            .filter(|(p, _)| *p == id)
            .map(|(_, c)| c.clone())
            .collect();
        learn(worker, id, &mine).await?;
    }
    Ok(())
}

async fn gather(
    phala: &PhalaClient,
    calls: &[StoredRegistration],
) -> anyhow::Result<ProposalFacts> {
    let apps: BTreeSet<&str> = calls.iter().map(|c| c.app_id.as_str()).collect();
    let mut facts = ProposalFacts::default();
    for app_id in apps {
        let bare = app_id.trim_start_matches("0x").to_lowercase();
        let cvms = match phala.app_cvms(&bare).await {
            Ok(cvms) => cvms,
            // An app with no instance listed (Phala answers 404).
            Err(err) if err.status() == Some(404) => Vec::new(),
            Err(err) => return Err(err.into()),
        };
        facts.apps.push(AppFacts {
            app_id: app_id.to_owned(),
            cvms: cvms
                .into_iter()
                .map(|c| CvmFacts {
                    node: c.node_info.as_ref().and_then(|n| n.name.clone()),
                    name: c.name,
                    vm_uuid: c.vm_uuid,
                    status: c.status,
                    compose_hash: c.compose_hash,
                })
                .collect(),
        });
    }
    let devices: Vec<&str> = calls
        .iter()
        .filter(|c| c.kind == "device")
        .map(|c| c.value.as_str())
        .collect();
    if !devices.is_empty() {
        let nodes = phala.available_nodes().await?;
        facts.nodes = nodes
            .nodes
            .into_iter()
            .filter(|n| {
                n.device_id
                    .as_deref()
                    .is_some_and(|d| devices.iter().any(|v| same_hex(d, v)))
            })
            .map(|n| NodeFacts {
                id: n.teepod_id,
                name: n.name,
                region: n.region_identifier,
                device_id: n.device_id,
            })
            .collect();
    }
    Ok(facts)
}
