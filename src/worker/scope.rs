//! What one planner owns: a Safe's proposals and the requests it can take,
//! or the requests no allowed Safe can. Shared by the planner and by the
//! queue keeping, which withdraws within the same scope.

use std::collections::BTreeSet;

use alloy::primitives::Address;

use crate::safe::SafeFlow;
use crate::store::ProposalRow;

/// What one planner owns. Each scope is planned by its own leased job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PlanScope {
    /// The proposals of one allowed Safe, and the requests on its chain whose
    /// app that Safe owns. `orphans`: also settles the chain's requests that
    /// need no Safe or that no allowed Safe can take (the first allowed Safe
    /// of each chain does this).
    Safe {
        chain_id: i64,
        safe: Address,
        orphans: bool,
    },
    /// Requests on chains without an allowed Safe, or with no chain: they
    /// fail with the reason, or wait for an RPC URL.
    Elsewhere,
}

impl PlanScope {
    /// Every scope of the configured Safes, plus [`PlanScope::Elsewhere`].
    pub(super) fn all(flow: &SafeFlow) -> Vec<PlanScope> {
        let mut scopes = Vec::new();
        let mut chains = BTreeSet::new();
        for &(chain_id, safe) in &flow.safes.0 {
            scopes.push(PlanScope::Safe {
                chain_id: chain_id as i64,
                safe,
                orphans: chains.insert(chain_id),
            });
        }
        scopes.push(PlanScope::Elsewhere);
        scopes
    }

    /// The scope's job in `job_leases`.
    pub(super) fn job(&self) -> String {
        match self {
            PlanScope::Safe { chain_id, safe, .. } => {
                format!("planner:{chain_id}:{}", super::lower(*safe))
            }
            PlanScope::Elsewhere => "planner:elsewhere".to_owned(),
        }
    }

    pub(super) fn takes_chain(&self, flow: &SafeFlow, chain_id: Option<i64>) -> bool {
        match self {
            PlanScope::Safe { chain_id: own, .. } => chain_id == Some(*own),
            PlanScope::Elsewhere => {
                chain_id.is_none_or(|id| !flow.safes.0.iter().any(|(chain, _)| *chain as i64 == id))
            }
        }
    }

    pub(super) fn takes_safe(&self, address: Address) -> bool {
        matches!(self, PlanScope::Safe { safe, .. } if *safe == address)
    }

    pub(super) fn takes_orphans(&self) -> bool {
        matches!(
            self,
            PlanScope::Safe { orphans: true, .. } | PlanScope::Elsewhere
        )
    }

    pub(super) fn takes_proposal(&self, proposal: &ProposalRow) -> bool {
        match self {
            PlanScope::Safe { chain_id, safe, .. } => {
                proposal.chain_id == *chain_id && proposal.safe == super::lower(*safe)
            }
            PlanScope::Elsewhere => false,
        }
    }
}
