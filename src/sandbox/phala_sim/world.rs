//! The simulator's world: nodes, the CVMs that run on them, and the names
//! of the standard sandbox world.

use alloy::primitives::{Address, B256};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{DEFAULT_API_KEY, KMS_SLUG};
use crate::clock::Clock;

/// Everything the simulator starts with. Fill it in, then [`PhalaSim::spawn`](super::PhalaSim::spawn).
#[derive(Debug, Clone)]
pub struct PhalaWorld {
    /// The only `X-API-Key` accepted.
    pub api_key: String,
    /// Workspace name and slug, shown in CVMs and commit URLs.
    pub workspace: String,
    /// `kms_info.chain_id` of the on-chain CVMs; the RPC must serve this chain.
    pub chain_id: u64,
    /// `kms_info.dstack_kms_address`: the DstackKms stand-in whose root key is
    /// [`super::kms_root_key`], when one is deployed.
    pub kms_contract: Address,
    pub nodes: Vec<SimNode>,
    pub cvms: Vec<SimCvm>,
    /// Lifetime of a commit token (default 14 days, §12).
    pub token_ttl: chrono::Duration,
    /// How long a new replica stays `starting` (default 3 s).
    pub boot_delay: chrono::Duration,
    /// "Now" for token expiry and boot; a manual clock lets tests skip time.
    pub clock: Clock,
}

/// A node of `GET /teepods/available`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimNode {
    /// The teepod id, `node_id` in the replicas body.
    pub id: u32,
    pub name: String,
    pub region: String,
    /// The `addDevice` argument for replicas on this node.
    pub device_id: B256,
    /// Free CVM slots; each replica takes one. At 0 a replica on the node
    /// fails with `ERR-02-005`.
    pub free_slots: u32,
}

impl SimNode {
    /// A node with a device id derived from its name.
    pub fn new(id: u32, name: &str, free_slots: u32) -> SimNode {
        SimNode {
            id,
            name: name.to_owned(),
            region: "sandbox-1".to_owned(),
            device_id: device_id_for(name),
            free_slots,
        }
    }
}

/// How a CVM gets its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimKms {
    /// On-chain KMS: the app id is a DstackApp on the world's chain;
    /// `kms_type` is what `GET /cvms/{id}` reports (`base`, `ethereum`).
    Onchain { kms_type: String },
    /// Phala's Cloud KMS: no contract, no prepare.
    Cloud,
}

/// A live CVM of the world.
#[derive(Debug, Clone, PartialEq)]
pub struct SimCvm {
    pub name: String,
    pub vm_uuid: Uuid,
    /// The app id; for on-chain KMS the DstackApp address.
    pub app_id: Address,
    pub kms: SimKms,
    /// The teepod id it runs on.
    pub node_id: u32,
    pub status: String,
    /// The app-compose manifest; [`compose_hash`] of it is the CVM's hash.
    pub compose_file: Value,
}

impl SimCvm {
    /// An on-chain KMS CVM (`kms_type` `base`) of the DstackApp at `app`.
    pub fn onchain(name: &str, app: Address, node_id: u32) -> SimCvm {
        SimCvm {
            name: name.to_owned(),
            vm_uuid: uuid_for(name),
            app_id: app,
            kms: SimKms::Onchain {
                kms_type: "base".to_owned(),
            },
            node_id,
            status: "running".to_owned(),
            compose_file: manifest(name, "v1", &["API_URL", "LOG_LEVEL"]),
        }
    }

    /// A Cloud KMS CVM; its app id is derived from the name.
    pub fn cloud(name: &str, node_id: u32) -> SimCvm {
        let digest = Sha256::digest(format!("approval-bridge sim app {name}"));
        SimCvm {
            kms: SimKms::Cloud,
            ..SimCvm::onchain(name, Address::from_slice(&digest[..20]), node_id)
        }
    }

    /// Another configuration of the same app: a different compose hash.
    pub fn revision(mut self, revision: &str) -> SimCvm {
        self.compose_file["docker_compose_file"] = compose_yaml(&self.name, revision).into();
        self
    }

    pub fn allowed_envs(mut self, names: &[&str]) -> SimCvm {
        self.compose_file["allowed_envs"] = json!(names);
        self
    }

    pub fn compose_hash(&self) -> B256 {
        compose_hash(&self.compose_file)
    }
}

/// Names in the world [`PhalaWorld::standard`] builds.
pub mod standard {
    /// Nodes with free slots in a default world: `prod-1` to `prod-3`.
    pub const NODES: u32 = 3;
    /// Free CVM slots of each of them.
    pub const SLOTS: u32 = 32;
    /// Where the sources run, but for the canary.
    pub const SOURCE_NODE: &str = "prod-1";
    /// Where `api-canary` runs.
    pub const CANARY_NODE: &str = "prod-2";
    /// The node after the others, with no free slot.
    pub const FULL_NODE: &str = "prod-full";

    /// The name of node `id` (1-based) among those with free slots.
    pub fn node_name(id: u32) -> String {
        format!("prod-{id}")
    }

    /// On-chain KMS, one CVM.
    pub const WEB: &str = "web-prod";
    /// On-chain KMS, same app as [`API_CANARY`] with another compose hash.
    pub const API: &str = "api-prod";
    pub const API_CANARY: &str = "api-canary";
    /// Cloud KMS.
    pub const DOCS: &str = "docs-cloud";
}

impl PhalaWorld {
    /// The default nodes (see [`standard::NODES`]) and no CVMs.
    pub fn new(chain_id: u64) -> PhalaWorld {
        PhalaWorld::with_nodes(chain_id, standard::NODES, standard::SLOTS)
    }

    /// `prod-1` to `prod-{nodes}` (ids 1 to `nodes`) with `slots` free
    /// slots each, then `prod-full` with none; no CVMs.
    pub fn with_nodes(chain_id: u64, nodes: u32, slots: u32) -> PhalaWorld {
        let nodes = (1..=nodes)
            .map(|id| SimNode::new(id, &standard::node_name(id), slots))
            .chain(std::iter::once(SimNode::new(
                nodes + 1,
                standard::FULL_NODE,
                0,
            )))
            .collect();
        PhalaWorld {
            api_key: DEFAULT_API_KEY.to_owned(),
            workspace: "sandbox".to_owned(),
            chain_id,
            kms_contract: Address::from_slice(&Sha256::digest(KMS_SLUG)[..20]),
            nodes,
            cvms: Vec::new(),
            token_ttl: chrono::Duration::days(14),
            boot_delay: chrono::Duration::seconds(3),
            clock: Clock::system(),
        }
    }

    /// The sandbox world on the default nodes: see [`with_standard_cvms`](Self::with_standard_cvms).
    pub fn standard(chain_id: u64, web_app: Address, api_app: Address) -> PhalaWorld {
        PhalaWorld::new(chain_id).with_standard_cvms(web_app, api_app)
    }

    /// Adds the sandbox's CVMs: `web-prod` on `web_app`, `api-prod` and
    /// `api-canary` (two live compose hashes) on `api_app`, all on prod-1
    /// except the canary (prod-2), and `docs-cloud` on Cloud KMS.
    pub fn with_standard_cvms(self, web_app: Address, api_app: Address) -> PhalaWorld {
        let source = 1;
        let canary = 2;
        self.with_cvm(SimCvm::onchain(standard::WEB, web_app, source))
            .with_cvm(SimCvm::onchain(standard::API, api_app, source))
            .with_cvm(
                SimCvm::onchain(standard::API_CANARY, api_app, canary)
                    .revision("v2")
                    // Same app, so the same manifest name as api-prod.
                    .named_like(standard::API),
            )
            .with_cvm(SimCvm::cloud(standard::DOCS, source))
    }

    pub fn with_cvm(mut self, cvm: SimCvm) -> PhalaWorld {
        self.cvms.push(cvm);
        self
    }

    pub fn node(&self, name: &str) -> Option<&SimNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn cvm(&self, name: &str) -> Option<&SimCvm> {
        self.cvms.iter().find(|c| c.name == name)
    }

    /// Unique names, UUIDs and node ids; every CVM on a known node.
    pub(super) fn check(&self) -> anyhow::Result<()> {
        for (i, cvm) in self.cvms.iter().enumerate() {
            let later = &self.cvms[i + 1..];
            anyhow::ensure!(
                !later.iter().any(|c| c.name == cvm.name),
                "two CVMs are named `{}`",
                cvm.name
            );
            anyhow::ensure!(
                !later.iter().any(|c| c.vm_uuid == cvm.vm_uuid),
                "two CVMs have vm_uuid {}",
                cvm.vm_uuid
            );
            anyhow::ensure!(
                self.nodes.iter().any(|n| n.id == cvm.node_id),
                "CVM `{}` runs on node {}, which the world does not have",
                cvm.name,
                cvm.node_id
            );
        }
        for (i, node) in self.nodes.iter().enumerate() {
            anyhow::ensure!(
                !self.nodes[i + 1..].iter().any(|n| n.id == node.id),
                "two nodes have id {}",
                node.id
            );
        }
        Ok(())
    }
}

impl SimCvm {
    /// Uses `app_name` as the manifest name (CVMs of one app share it).
    fn named_like(mut self, app_name: &str) -> SimCvm {
        self.compose_file["name"] = app_name.into();
        self
    }
}

fn compose_yaml(name: &str, revision: &str) -> String {
    format!("services:\n  {name}:\n    image: {name}:{revision}\n    restart: always\n")
}

fn manifest(name: &str, revision: &str, allowed_envs: &[&str]) -> Value {
    json!({
        "manifest_version": 2,
        "name": name,
        "runner": "docker-compose",
        "docker_compose_file": compose_yaml(name, revision),
        "allowed_envs": allowed_envs,
        "kms_enabled": true,
        "gateway_enabled": true,
        "public_logs": false,
        "public_sysinfo": false,
        "local_key_provider_enabled": false,
        "no_instance_id": false,
        "secure_time": false,
    })
}

/// SHA-256 of the manifest as compact JSON with sorted keys (`serde_json`
/// maps are sorted), as the dstack SDK's `getComposeHash` writes it.
pub fn compose_hash(manifest: &Value) -> B256 {
    let text = serde_json::to_vec(manifest).expect("a JSON value serializes");
    B256::from_slice(&Sha256::digest(text))
}

/// A stable device id for a node name.
pub fn device_id_for(node_name: &str) -> B256 {
    B256::from_slice(&Sha256::digest(format!(
        "approval-bridge sim device {node_name}"
    )))
}

/// A stable v4-shaped UUID for a seed.
pub(super) fn uuid_for(seed: &str) -> Uuid {
    let digest = Sha256::digest(format!("approval-bridge sim vm {seed}"));
    let bytes: [u8; 16] = digest[..16].try_into().expect("16 bytes");
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compose_hash_is_sha256_of_sorted_compact_json() {
        let manifest = json!({"b": 1, "a": "x"});
        let expected = Sha256::digest(br#"{"a":"x","b":1}"#);
        assert_eq!(compose_hash(&manifest).as_slice(), expected.as_slice());
        let cvm = SimCvm::onchain("web", Address::ZERO, 1);
        assert_ne!(
            cvm.compose_hash(),
            cvm.clone().revision("v2").compose_hash()
        );
        assert_eq!(
            cvm.compose_hash(),
            SimCvm::onchain("web", Address::ZERO, 1).compose_hash()
        );
    }

    #[test]
    fn standard_world_has_two_configurations_of_one_app_and_a_full_node() {
        let web = Address::repeat_byte(1);
        let api = Address::repeat_byte(2);
        let world = PhalaWorld::standard(31337, web, api);
        world.check().unwrap();
        let prod = world.cvm(standard::API).unwrap();
        let canary = world.cvm(standard::API_CANARY).unwrap();
        assert_eq!(prod.app_id, canary.app_id);
        assert_ne!(prod.compose_hash(), canary.compose_hash());
        assert_eq!(world.node(standard::FULL_NODE).unwrap().free_slots, 0);
        assert_eq!(world.node(standard::FULL_NODE).unwrap().id, 4);
        assert_eq!(
            world.cvm(standard::WEB).unwrap().node_id,
            world.node(standard::SOURCE_NODE).unwrap().id
        );
        assert_eq!(
            world.cvm(standard::API_CANARY).unwrap().node_id,
            world.node(standard::CANARY_NODE).unwrap().id
        );
        assert_eq!(world.cvm(standard::DOCS).unwrap().kms, SimKms::Cloud);
        let devices: std::collections::HashSet<_> =
            world.nodes.iter().map(|n| n.device_id).collect();
        assert_eq!(devices.len(), world.nodes.len());
    }

    #[test]
    fn a_world_of_many_nodes_has_distinct_devices_and_slots_on_each() {
        let world = PhalaWorld::with_nodes(1, 12, standard::SLOTS)
            .with_standard_cvms(Address::ZERO, Address::ZERO);
        world.check().unwrap();
        assert_eq!(world.nodes.len(), 13);
        assert_eq!(world.node("prod-12").unwrap().id, 12);
        assert_eq!(world.node(standard::FULL_NODE).unwrap().id, 13);
        let free: u32 = world.nodes.iter().map(|n| n.free_slots).sum();
        assert_eq!(free, 12 * standard::SLOTS);
        let devices: std::collections::HashSet<_> =
            world.nodes.iter().map(|n| n.device_id).collect();
        assert_eq!(devices.len(), 13);
    }

    #[test]
    fn world_check_refuses_duplicates_and_unknown_nodes() {
        let twice = PhalaWorld::new(1)
            .with_cvm(SimCvm::cloud("a", 1))
            .with_cvm(SimCvm::cloud("a", 2));
        assert!(twice.check().is_err());
        let nowhere = PhalaWorld::new(1).with_cvm(SimCvm::cloud("a", 99));
        assert!(nowhere.check().is_err());
    }
}
