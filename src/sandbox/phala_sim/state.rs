//! What the simulator remembers: CVM records (the world's and the
//! replicas), commit tokens, call counts and the request log.

use std::collections::{BTreeMap, HashMap};

use alloy::primitives::B256;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::errors::SimError;
use super::world::SimCvm;
use super::{bare, codes, parse_app_id, parse_hex32};

/// A commit token's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    Live,
    /// A newer prepare of the same source CVM replaced it.
    Superseded,
    /// A commit succeeded with it.
    Spent,
}

/// A commit token the simulator issued.
#[derive(Debug, Clone, PartialEq)]
pub struct IssuedToken {
    pub token: String,
    pub source_vm_uuid: Uuid,
    pub compose_hash: B256,
    pub node_id: u32,
    pub device_id: B256,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub state: TokenState,
    /// Decrypted `encrypted_env` of the prepare, for the replica.
    pub(super) env: Option<BTreeMap<String, String>>,
}

/// A CVM as the simulator holds it: the world's and the replicas.
#[derive(Debug, Clone)]
pub(super) struct CvmRecord {
    /// The numeric id of the legacy VM object.
    pub(super) number: u64,
    pub(super) spec: SimCvm,
    pub(super) instance_id: String,
    pub(super) created_at: DateTime<Utc>,
    /// When a replica is `running`; `None` keeps `spec.status`.
    pub(super) ready_at: Option<DateTime<Utc>>,
    pub(super) source: Option<Uuid>,
    pub(super) env: Option<BTreeMap<String, String>>,
}

impl CvmRecord {
    pub(super) fn status(&self, now: DateTime<Utc>) -> &str {
        match self.ready_at {
            Some(ready) if now < ready => "starting",
            Some(_) => "running",
            None => &self.spec.status,
        }
    }

    pub(super) fn in_progress(&self, now: DateTime<Utc>) -> bool {
        self.ready_at.is_some_and(|ready| now < ready)
    }
}

/// A replica the simulator created.
#[derive(Debug, Clone, PartialEq)]
pub struct SimReplica {
    pub vm_uuid: Uuid,
    pub name: String,
    pub source_vm_uuid: Uuid,
    pub node_id: u32,
    pub compose_hash: B256,
    pub status: String,
    /// The env it got: decrypted `encrypted_env`, or the source's.
    pub env: Option<BTreeMap<String, String>>,
}

/// One HTTP request the simulator answered.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    pub method: String,
    /// The path, from `/api/v1/...`.
    pub path: String,
    pub query: Option<String>,
    /// `None` without `X-API-Key`, else whether it was the right key (the
    /// key itself is not kept).
    pub api_key_valid: Option<bool>,
    pub phala_version: Option<String>,
    pub prepare_only: Option<String>,
    pub body: String,
    pub status: u16,
}

#[derive(Default)]
pub(super) struct SimState {
    pub(super) cvms: Vec<CvmRecord>,
    pub(super) free_slots: HashMap<u32, u32>,
    /// By token, in issue order per source through `issued_at`.
    pub(super) tokens: Vec<IssuedToken>,
    pub(super) prepare_calls: HashMap<Uuid, usize>,
    pub(super) commit_calls: HashMap<Uuid, usize>,
    pub(super) token_commit_calls: HashMap<String, usize>,
    pub(super) requests: Vec<RecordedRequest>,
}

impl SimState {
    /// The CVM an id names: a UUID (dashes optional), `app_<hex>`, an
    /// instance id, or a name.
    pub(super) fn resolve(&self, id: &str) -> Result<usize, SimError> {
        let found = |i: Option<usize>| i.ok_or_else(|| SimError::cvm_not_found(id));
        if matches!(id.len(), 32 | 36)
            && let Ok(uuid) = Uuid::try_parse(id)
        {
            return found(self.cvms.iter().position(|c| c.spec.vm_uuid == uuid));
        }
        if let Some(hex) = id.strip_prefix("app_") {
            let app = parse_app_id(hex).ok_or_else(|| SimError::cvm_not_found(id))?;
            let matches: Vec<usize> = (0..self.cvms.len())
                .filter(|i| self.cvms[*i].spec.app_id == app)
                .collect();
            return match matches.as_slice() {
                [] => Err(SimError::cvm_not_found(id)),
                [one] => Ok(*one),
                several => Err(SimError::envelope(
                    StatusCode::BAD_REQUEST,
                    codes::MULTIPLE_CVMS_MATCH,
                    format!("Identifier {id} matches {} CVMs", several.len()),
                )
                .with_details(
                    several
                        .iter()
                        .map(|i| json!({"field": "vm_uuid", "value": self.cvms[*i].spec.vm_uuid}))
                        .collect(),
                )
                .suggest(
                    "Use the CVM's vm_uuid, or list the app's CVMs with GET /apps/{app_id}/cvms.",
                )),
            };
        }
        if let Some(i) = self.cvms.iter().position(|c| c.instance_id == id) {
            return Ok(i);
        }
        let named: Vec<usize> = (0..self.cvms.len())
            .filter(|i| self.cvms[*i].spec.name == id)
            .collect();
        match named.as_slice() {
            [] => Err(SimError::cvm_not_found(id)),
            [one] => Ok(*one),
            _ => Err(SimError::envelope(
                StatusCode::BAD_REQUEST,
                codes::MULTIPLE_CVMS_SAME_NAME,
                format!("Several CVMs are named {id}"),
            )
            .suggest("Use the CVM's vm_uuid.")),
        }
    }

    /// The live CVM of `source`'s app that runs `wanted` (default: the
    /// source's own hash).
    pub(super) fn configuration(
        &self,
        source: usize,
        wanted: Option<&str>,
    ) -> Result<usize, SimError> {
        let Some(text) = wanted else {
            return Ok(source);
        };
        let app = self.cvms[source].spec.app_id;
        let hash = parse_hex32(text).ok_or_else(|| {
            SimError::invalid_request(format!("compose_hash `{text}` is not 32 bytes of hex"))
        })?;
        if self.cvms[source].spec.compose_hash() == hash {
            return Ok(source);
        }
        self.cvms
            .iter()
            .position(|c| c.spec.app_id == app && c.spec.compose_hash() == hash)
            .ok_or_else(|| {
                SimError::invalid_request(format!(
                    "compose_hash {} is not a live configuration of app {}",
                    hex::encode(hash),
                    bare(app)
                ))
                .suggest("Pass the compose_hash of one of the app's running CVMs.")
            })
    }

    /// Creates a replica of `config` on `node`, taking one of its slots.
    pub(super) fn create_replica(
        &mut self,
        source: Uuid,
        config: usize,
        node: u32,
        env: Option<BTreeMap<String, String>>,
        now: DateTime<Utc>,
        boot_delay: chrono::Duration,
    ) -> usize {
        let template = &self.cvms[config];
        let source_record = self
            .cvms
            .iter()
            .find(|c| c.spec.vm_uuid == source)
            .expect("the source exists");
        let vm_uuid = Uuid::new_v4();
        let name = format!(
            "{}-replica-{}",
            source_record.spec.name,
            &vm_uuid.simple().to_string()[..8]
        );
        let env = env.or_else(|| source_record.env.clone());
        let record = CvmRecord {
            number: self.cvms.len() as u64 + 1,
            spec: SimCvm {
                name,
                vm_uuid,
                node_id: node,
                status: "running".to_owned(),
                ..template.spec.clone()
            },
            instance_id: hex::encode(&Sha256::digest(vm_uuid.as_bytes())[..20]),
            created_at: now,
            ready_at: Some(now + boot_delay),
            source: Some(source),
            env,
        };
        if let Some(slots) = self.free_slots.get_mut(&node) {
            *slots = slots.saturating_sub(1);
        }
        self.cvms.push(record);
        self.cvms.len() - 1
    }
}
