//! Response shapes of the Phala Cloud API. Deserialization is lenient: Phala
//! adds keys freely, and the shapes vary with `X-Phala-Version`.

use secrecy::SecretString;
use serde::Deserialize;
use serde_json::Value;

use crate::domain::{AppId, Bytes32};

/// `GET /cvms/{id}` (2026-01-21 shape, reading the 2025-10-28 names too).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CvmInfo {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub app_id: Option<String>,
    #[serde(default)]
    pub vm_uuid: Option<String>,
    #[serde(default)]
    pub compose_hash: Option<String>,
    #[serde(default)]
    pub kms_type: Option<String>,
    #[serde(default)]
    pub kms_info: Option<KmsInfo>,
    /// The app-compose manifest: an object, or a JSON string of it.
    #[serde(default)]
    pub compose_file: Option<Value>,
    /// Present in the 2025-10-28 shape only.
    #[serde(default)]
    pub in_progress: Option<bool>,
    #[serde(default)]
    pub encrypted_env_pubkey: Option<String>,
    /// The workspace the CVM belongs to; its slug is part of dashboard links.
    #[serde(default)]
    pub workspace: Option<Workspace>,
    /// The node it runs on (2026-01-21).
    #[serde(default)]
    pub node_info: Option<NodeInfo>,
    /// The node it runs on (2025-10-28).
    #[serde(default)]
    pub teepod_id: Option<i64>,
}

impl CvmInfo {
    /// The id of the node the CVM runs on, in either API version's shape.
    pub fn node_id(&self) -> Option<i64> {
        self.node_info
            .as_ref()
            .and_then(|n| n.id)
            .or(self.teepod_id)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct NodeInfo {
    #[serde(default)]
    pub id: Option<i64>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Workspace {
    #[serde(default)]
    pub slug: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct KmsInfo {
    #[serde(default)]
    pub chain_id: Option<u64>,
    #[serde(default)]
    pub dstack_app_address: Option<String>,
    #[serde(default)]
    pub encrypted_env_pubkey: Option<String>,
}

impl CvmInfo {
    /// On-chain KMS: a chain id in `kms_info`, or an on-chain `kms_type`.
    /// Only these get a prepare; anything else would create the replica at once.
    pub fn is_onchain_kms(&self) -> bool {
        self.kms_info.as_ref().and_then(|k| k.chain_id).is_some()
            || matches!(self.kms_type.as_deref(), Some("ethereum" | "base"))
    }

    pub fn chain_id(&self) -> Option<u64> {
        self.kms_info.as_ref().and_then(|k| k.chain_id)
    }

    /// `allowed_envs` of the app-compose manifest; `None` when Phala sent no manifest.
    pub fn allowed_envs(&self) -> Option<Vec<String>> {
        let manifest = match self.compose_file.as_ref()? {
            Value::String(text) => serde_json::from_str::<Value>(text).ok()?,
            other => other.clone(),
        };
        let names = manifest.get("allowed_envs")?.as_array()?;
        Some(
            names
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
        )
    }

    /// The key that encrypts env for a Cloud-KMS app.
    pub fn cloud_env_pubkey(&self) -> Option<&str> {
        self.kms_info
            .as_ref()
            .and_then(|k| k.encrypted_env_pubkey.as_deref())
            .or(self.encrypted_env_pubkey.as_deref())
    }
}

/// `GET /teepods/available`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AvailableNodes {
    #[serde(default)]
    pub nodes: Vec<AvailableNode>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AvailableNode {
    pub teepod_id: u32,
    pub name: String,
    #[serde(default)]
    pub device_id: Option<String>,
    /// Free capacity, in CVMs.
    #[serde(default)]
    pub remaining_cvm_slots: Option<i64>,
    #[serde(default)]
    pub region_identifier: Option<String>,
}

/// `GET /cvms/paginated`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CvmPage {
    #[serde(default)]
    pub items: Vec<CvmInfo>,
    /// How many pages there are (`pages`).
    #[serde(default)]
    pub pages: Option<u32>,
}

/// `GET /kms/{kms_type}/pubkey/{app_id}`.
#[derive(Debug, Clone, Deserialize)]
pub struct EnvPubkey {
    pub public_key: String,
    /// The KMS root key's signature over the public key (phala-cloud-api.md §10).
    #[serde(default)]
    pub signature: Option<String>,
}

/// The VM object of a created replica (prepare 2xx, direct create, commit).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ReplicaVm {
    #[serde(default)]
    pub vm_uuid: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub app_id: Option<String>,
}

/// One value of `POST /status/batch` (the SDK's `CvmStatusSchema`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CvmStatus {
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub in_progress: Option<bool>,
    #[serde(default)]
    pub boot_error: Option<String>,
}

/// What `POST /cvms/{id}/replicas` with `X-Prepare-Only: true` gave back.
#[derive(Debug)]
pub enum PrepareOutcome {
    /// HTTP 465: the replica waits for its registrations and a commit.
    Prepared(PreparedReplica),
    /// 2xx: Phala ignored the prepare header and created the replica.
    Created(ReplicaVm),
}

/// The HTTP 465 details, checked: hashes are 32 bytes and the app id is an address.
#[derive(Debug)]
pub struct PreparedReplica {
    pub compose_hash: Bytes32,
    pub app_id: AppId,
    pub device_id: Option<Bytes32>,
    pub commit_token: SecretString,
    pub onchain: OnchainStatus,
    pub chain_id: Option<u64>,
}

/// Phala's own read of the contract, from `onchain_status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct OnchainStatus {
    #[serde(default)]
    pub compose_hash_allowed: bool,
    #[serde(default)]
    pub device_id_allowed: bool,
    #[serde(default)]
    pub is_allowed: bool,
}

/// What a replica asks of Phala: the body of the replicas call.
#[derive(Debug, Clone, Default)]
pub struct ReplicaSpec {
    pub node_id: Option<u32>,
    pub compose_hash: Option<Bytes32>,
    pub encrypted_env: Option<String>,
}

impl ReplicaSpec {
    /// Only the keys that have values, as the Phala CLI sends them.
    pub fn body(&self) -> Value {
        let mut body = serde_json::Map::new();
        if let Some(node_id) = self.node_id {
            body.insert("node_id".into(), node_id.into());
        }
        if let Some(hash) = &self.compose_hash {
            body.insert("compose_hash".into(), hash.bare_hex().into());
        }
        if let Some(env) = &self.encrypted_env {
            body.insert("encrypted_env".into(), env.clone().into());
        }
        Value::Object(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_body_sends_only_keys_with_values() {
        assert_eq!(ReplicaSpec::default().body(), serde_json::json!({}));
        let spec = ReplicaSpec {
            node_id: Some(3),
            compose_hash: Some(format!("0x{}", "11".repeat(32)).parse().unwrap()),
            encrypted_env: None,
        };
        assert_eq!(
            spec.body(),
            serde_json::json!({"node_id": 3, "compose_hash": "11".repeat(32)})
        );
    }

    #[test]
    fn allowed_envs_read_from_object_or_string_manifest() {
        let object: CvmInfo = serde_json::from_value(serde_json::json!({
            "compose_file": {"allowed_envs": ["A", "B"]}
        }))
        .unwrap();
        assert_eq!(object.allowed_envs(), Some(vec!["A".into(), "B".into()]));
        let string: CvmInfo = serde_json::from_value(serde_json::json!({
            "compose_file": "{\"allowed_envs\": [\"C\"]}"
        }))
        .unwrap();
        assert_eq!(string.allowed_envs(), Some(vec!["C".into()]));
        assert_eq!(CvmInfo::default().allowed_envs(), None);
    }

    #[test]
    fn onchain_kms_is_detected_by_chain_id_or_kms_type() {
        let by_chain: CvmInfo =
            serde_json::from_value(serde_json::json!({"kms_info": {"chain_id": 8453}})).unwrap();
        assert!(by_chain.is_onchain_kms());
        let by_type: CvmInfo =
            serde_json::from_value(serde_json::json!({"kms_type": "base"})).unwrap();
        assert!(by_type.is_onchain_kms());
        let cloud: CvmInfo =
            serde_json::from_value(serde_json::json!({"kms_type": "phala", "kms_info": {}}))
                .unwrap();
        assert!(!cloud.is_onchain_kms());
    }
}
