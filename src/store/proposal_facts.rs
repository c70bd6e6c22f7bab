//! What the signers' view of a proposal reads besides the proposal row: the
//! facts Phala gave when it was planned (`proposal_facts`), and the requests
//! the proposal serves.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use uuid::Uuid;

use super::proposals::{ProposalRow, query_proposals};
use super::requests::{ReplicaRequest, query_requests};
use super::{Reach, Store, same_hex};

/// What Phala said about a proposal's apps and nodes when it was planned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposalFacts {
    pub apps: Vec<AppFacts>,
    /// The nodes whose device the proposal adds.
    pub nodes: Vec<NodeFacts>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppFacts {
    pub app_id: String,
    /// Every instance of the app, as `GET /apps/{app_id}/cvms` listed them.
    pub cvms: Vec<CvmFacts>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CvmFacts {
    pub name: Option<String>,
    pub vm_uuid: Option<String>,
    pub status: Option<String>,
    pub compose_hash: Option<String>,
    pub node: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFacts {
    pub id: u32,
    pub name: String,
    pub region: Option<String>,
    pub device_id: Option<String>,
}

impl ProposalFacts {
    pub fn app(&self, app_id: &str) -> Option<&AppFacts> {
        self.apps.iter().find(|a| same_hex(&a.app_id, app_id))
    }

    pub fn node_with_device(&self, device_id: &str) -> Option<&NodeFacts> {
        self.nodes.iter().find(|n| {
            n.device_id
                .as_deref()
                .is_some_and(|d| same_hex(d, device_id))
        })
    }
}

impl Store {
    /// Records what was learned (or, with `None`, only that it was tried:
    /// facts learned before are kept).
    pub async fn set_proposal_facts(
        &self,
        proposal_id: Uuid,
        now: DateTime<Utc>,
        facts: Option<&ProposalFacts>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "INSERT INTO proposal_facts (proposal_id, facts, tried_at, learned_at)
             VALUES ($1, $2, $3, CASE WHEN $2::jsonb IS NULL THEN NULL ELSE $3::timestamptz END)
             ON CONFLICT (proposal_id) DO UPDATE SET tried_at = EXCLUDED.tried_at,
                facts = COALESCE(EXCLUDED.facts, proposal_facts.facts),
                learned_at = COALESCE(EXCLUDED.learned_at, proposal_facts.learned_at)",
            proposal_id,
            facts.map(Json) as _,
            now,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The facts of the given proposals that have any.
    pub async fn proposal_facts(
        &self,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, ProposalFacts>, sqlx::Error> {
        let rows = sqlx::query!(
            r#"SELECT proposal_id, facts AS "facts!: Json<ProposalFacts>" FROM proposal_facts WHERE proposal_id = ANY($1) AND facts IS NOT NULL"#,
            ids,
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| (row.proposal_id, row.facts.0))
            .collect())
    }

    /// Open proposals with no facts yet, not tried since `tried_before`.
    pub async fn proposals_lacking_facts(
        &self,
        tried_before: DateTime<Utc>,
    ) -> Result<Vec<ProposalRow>, sqlx::Error> {
        query_proposals!(
            "SELECT ",
            " FROM proposals p
             WHERE status = 'proposed' AND NOT EXISTS (
                SELECT 1 FROM proposal_facts f
                WHERE f.proposal_id = p.id AND (f.facts IS NOT NULL OR f.tried_at >= $1))
             ORDER BY created_at",
            tried_before,
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Proposals newest first, optionally of one status.
    pub async fn list_proposals(
        &self,
        status: Option<&str>,
        limit: i64,
        reach: &Reach,
    ) -> Result<Vec<ProposalRow>, sqlx::Error> {
        // A call is seen when its app is named, or when the proposal serves
        // a request of that app which the caller sees (`Reach::sees_call`).
        let (all, names, app_ids) = reach.binds();
        query_proposals!(
            "SELECT ",
            " FROM proposals WHERE ($1::text IS NULL OR status = $1)
               AND ($3::bool OR EXISTS (
                   SELECT 1 FROM proposal_calls c WHERE c.proposal_id = proposals.id
                      AND (lower(c.app_id) = ANY($5) OR EXISTS (
                          SELECT 1 FROM replica_requests r
                           WHERE r.proposal_id = proposals.id
                             AND lower(r.app_id) = lower(c.app_id)
                             AND r.source_name = ANY($4)))))
             ORDER BY created_at DESC, id DESC LIMIT $2",
            status,
            limit,
            all,
            &names,
            &app_ids,
        )
        .fetch_all(&self.pool)
        .await
    }

    /// The requests linked to the given proposals, oldest first.
    pub async fn requests_served_by(
        &self,
        proposal_ids: &[Uuid],
    ) -> Result<Vec<ReplicaRequest>, sqlx::Error> {
        query_requests!(
            "SELECT ",
            " FROM replica_requests WHERE proposal_id = ANY($1)
             ORDER BY created_at, id",
            proposal_ids,
        )
        .fetch_all(&self.pool)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_values_match_whatever_their_prefix_and_case() {
        assert!(same_hex("0xABcd", "abcd"));
        assert!(same_hex("app_abcd", "0xABCD"));
        assert!(!same_hex("0xabcd", "0xabce"));
    }
}
