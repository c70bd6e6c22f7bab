//! Turning what a user typed into Phala objects: the source CVM (by UUID, app
//! id or name), the target node (by id or name), and the env encryption key.

use std::collections::BTreeMap;

use super::errors::codes;
use super::{AvailableNode, AvailableNodes, CvmInfo, PhalaClient, PhalaError};
use crate::domain::{AppId, Bytes32, NodeRef};

/// The source CVM, resolved to the `vm_uuid` every later call uses.
#[derive(Debug, Clone)]
pub struct ResolvedSource {
    pub vm_uuid: String,
    pub cvm: CvmInfo,
}

impl ResolvedSource {
    pub fn app_id(&self) -> Option<AppId> {
        self.cvm.app_id.as_deref().and_then(|id| id.parse().ok())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedNode {
    pub id: u32,
    pub name: String,
    pub device_id: Option<String>,
}

/// Why a source, node or env could not be resolved. All but `Phala` are the
/// caller's to fix.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    #[error("source `{0}` matches no CVM in this Phala workspace")]
    UnknownSource(String),
    #[error("{0}")]
    AmbiguousSource(String),
    #[error("{0}")]
    UnknownNode(String),
    #[error("node name `{name}` matches several nodes (ids {ids}); pass the numeric node id")]
    AmbiguousNode { name: String, ids: String },
    #[error("env variable `{name}` is not in the app's allowed_envs ({allowed})")]
    EnvNotAllowed { name: String, allowed: String },
    #[error(transparent)]
    Phala(#[from] PhalaError),
}

/// The id form `GET /cvms/{id}` expects, as the Phala CLI normalizes it:
/// a UUID loses its dashes, 40 hex digits become `app_<hex>`, the rest passes.
pub fn normalize_cvm_id(source: &str) -> String {
    let is_hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    let undashed: String = source.chars().filter(|c| *c != '-').collect();
    let dashes_at_uuid_places = source.len() == 36
        && source
            .char_indices()
            .all(|(i, c)| matches!(i, 8 | 13 | 18 | 23) == (c == '-'));
    if (source.len() == 32 || dashes_at_uuid_places) && undashed.len() == 32 && is_hex(&undashed) {
        return undashed;
    }
    let bare = source.strip_prefix("0x").unwrap_or(source);
    if bare.len() == 40 && is_hex(bare) {
        return format!("app_{bare}");
    }
    source.to_owned()
}

impl PhalaClient {
    /// Resolves a source, picking by `compose_hash` when an app id matches several CVMs.
    pub async fn resolve_source(
        &self,
        source: &str,
        compose_hash: Option<&Bytes32>,
    ) -> Result<ResolvedSource, ResolveError> {
        let id = normalize_cvm_id(source);
        let cvm = match self.get_cvm(&id).await {
            Ok(cvm) => cvm,
            Err(err) if is_not_found(&err) => {
                return Err(ResolveError::UnknownSource(source.to_owned()));
            }
            Err(err) if err.code() == Some(codes::MULTIPLE_CVMS_MATCH) => {
                let vm_uuid = self.pick_instance(source, &id, compose_hash).await?;
                self.get_cvm(&vm_uuid).await?
            }
            Err(err) => return Err(err.into()),
        };
        let vm_uuid = cvm
            .vm_uuid
            .clone()
            .ok_or_else(|| PhalaError::InvalidResponse(format!("CVM `{source}` has no vm_uuid")))?;
        Ok(ResolvedSource { vm_uuid, cvm })
    }

    /// Several live CVMs share the app id: choose the one running `compose_hash`.
    async fn pick_instance(
        &self,
        source: &str,
        normalized: &str,
        compose_hash: Option<&Bytes32>,
    ) -> Result<String, ResolveError> {
        let app_id = normalized
            .trim_start_matches("app_")
            .trim_start_matches("0x")
            .to_lowercase();
        let instances = self.app_cvms(&app_id).await?;
        let hash_of = |cvm: &CvmInfo| {
            cvm.compose_hash
                .as_deref()
                .and_then(|h| h.parse::<Bytes32>().ok())
        };

        let chosen = match compose_hash {
            Some(wanted) => instances
                .iter()
                .find(|cvm| hash_of(cvm).as_ref() == Some(wanted)),
            None => {
                let mut hashes: Vec<String> = instances
                    .iter()
                    .filter_map(hash_of)
                    .map(|h| h.to_string())
                    .collect();
                hashes.sort();
                hashes.dedup();
                if hashes.len() > 1 {
                    return Err(ResolveError::AmbiguousSource(format!(
                        "source `{source}` has several live configurations (compose hashes {}); pass `compose_hash` to choose one",
                        hashes.join(", ")
                    )));
                }
                instances.first()
            }
        };
        let chosen = chosen.ok_or_else(|| {
            ResolveError::AmbiguousSource(format!(
                "no live CVM of `{source}` runs compose hash {}",
                compose_hash.map(ToString::to_string).unwrap_or_default()
            ))
        })?;
        chosen.vm_uuid.clone().ok_or_else(|| {
            PhalaError::InvalidResponse(format!("a CVM of `{source}` has no vm_uuid")).into()
        })
    }

    /// Resolves a node id or name against `GET /teepods/available`.
    pub async fn resolve_node(&self, node: &NodeRef) -> Result<ResolvedNode, ResolveError> {
        pick_node(&self.available_nodes().await?, node)
    }

    /// Checks env names against the app's `allowed_envs`, then fetches the
    /// key that encrypts env for the app. Nothing is sent before the names
    /// pass. The caller verifies the key ([`super::EnvKeyVerifier`]) before
    /// encrypting with it.
    pub async fn env_key_for(
        &self,
        source: &ResolvedSource,
        env: &BTreeMap<String, String>,
    ) -> Result<EnvKey, ResolveError> {
        let allowed = source.cvm.allowed_envs().unwrap_or_default();
        if let Some(name) = env.keys().find(|name| !allowed.contains(name)) {
            return Err(ResolveError::EnvNotAllowed {
                name: name.clone(),
                allowed: if allowed.is_empty() {
                    "none".to_owned()
                } else {
                    allowed.join(", ")
                },
            });
        }
        if source.cvm.is_onchain_kms() {
            let app_id = source.app_id().ok_or_else(|| {
                PhalaError::InvalidResponse("an on-chain KMS CVM without an app id".into())
            })?;
            let chain_id = source.cvm.chain_id().ok_or_else(|| {
                PhalaError::InvalidResponse("an on-chain KMS CVM without kms_info.chain_id".into())
            })?;
            let kms_type = source.cvm.kms_type.as_deref().unwrap_or("base");
            let answer = self.env_pubkey(kms_type, &app_id).await?;
            Ok(EnvKey {
                public_key: answer.public_key,
                issuer: EnvKeyIssuer::Onchain {
                    chain_id,
                    app_id,
                    signature: answer.signature,
                },
            })
        } else {
            let public_key = source
                .cvm
                .cloud_env_pubkey()
                .ok_or_else(|| {
                    PhalaError::InvalidResponse("the CVM has no env encryption key".into())
                })?
                .to_owned();
            Ok(EnvKey {
                public_key,
                issuer: EnvKeyIssuer::Cloud,
            })
        }
    }
}

/// Finds a node id or name in the nodes available to the workspace.
/// The listed node whose device is `device`, if any.
pub fn node_with_device(available: &AvailableNodes, device: &Bytes32) -> Option<ResolvedNode> {
    available
        .nodes
        .iter()
        .find(|n| {
            n.device_id
                .as_deref()
                .and_then(|d| d.parse::<Bytes32>().ok())
                .is_some_and(|d| d == *device)
        })
        .map(|n| ResolvedNode {
            id: n.teepod_id,
            name: n.name.clone(),
            device_id: n.device_id.clone(),
        })
}

pub fn pick_node(available: &AvailableNodes, node: &NodeRef) -> Result<ResolvedNode, ResolveError> {
    let to_resolved = |n: &AvailableNode| ResolvedNode {
        id: n.teepod_id,
        name: n.name.clone(),
        device_id: n.device_id.clone(),
    };
    match node {
        NodeRef::Id(id) => available
            .nodes
            .iter()
            .find(|n| n.teepod_id == *id)
            .map(to_resolved)
            .ok_or_else(|| {
                ResolveError::UnknownNode(format!(
                    "node {id} is not among the nodes available to this workspace"
                ))
            }),
        NodeRef::Name(name) => {
            let matches: Vec<_> = available
                .nodes
                .iter()
                .filter(|n| n.name.eq_ignore_ascii_case(name))
                .collect();
            match matches.as_slice() {
                [] => Err(ResolveError::UnknownNode(format!(
                    "no available node is named `{name}`"
                ))),
                [one] => Ok(to_resolved(one)),
                several => Err(ResolveError::AmbiguousNode {
                    name: name.clone(),
                    ids: several
                        .iter()
                        .map(|n| n.teepod_id.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
            }
        }
    }
}

/// The X25519 key that encrypts env for an app, and who vouches for it.
#[derive(Debug, Clone)]
pub struct EnvKey {
    /// Hex, `0x` optional.
    pub public_key: String,
    pub issuer: EnvKeyIssuer,
}

#[derive(Debug, Clone)]
pub enum EnvKeyIssuer {
    /// The app's on-chain KMS, which signs the key with its root key.
    Onchain {
        chain_id: u64,
        app_id: AppId,
        /// Hex `r‖s‖v`, as `GET /kms/.../pubkey` returns it.
        signature: Option<String>,
    },
    /// Phala's Cloud KMS: Phala runs that KMS, so its word is the key.
    Cloud,
}

fn is_not_found(err: &PhalaError) -> bool {
    err.status() == Some(404) || err.code() == Some(codes::CVM_NOT_FOUND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_normalized_like_the_phala_cli() {
        assert_eq!(
            normalize_cvm_id("0b9f6c1e-8a2d-4c3b-9e7f-1a2b3c4d5e6f"),
            "0b9f6c1e8a2d4c3b9e7f1a2b3c4d5e6f"
        );
        assert_eq!(
            normalize_cvm_id("0b9f6c1e8a2d4c3b9e7f1a2b3c4d5e6f"),
            "0b9f6c1e8a2d4c3b9e7f1a2b3c4d5e6f"
        );
        let hex40 = "ab".repeat(20);
        assert_eq!(normalize_cvm_id(&hex40), format!("app_{hex40}"));
        assert_eq!(
            normalize_cvm_id(&format!("0x{hex40}")),
            format!("app_{hex40}")
        );
        assert_eq!(
            normalize_cvm_id(&format!("app_{hex40}")),
            format!("app_{hex40}")
        );
        assert_eq!(normalize_cvm_id("my-web-app"), "my-web-app");
        // A name that merely has 36 characters with dashes elsewhere stays a name.
        assert_eq!(
            normalize_cvm_id("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-bbb"),
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-bbb"
        );
    }
}
