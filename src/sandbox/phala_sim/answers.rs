//! The simulator's JSON answers, one struct per shape.
//!
//! Names, types and nullability follow the zod schemas of `@phala/cloud`
//! 0.2.9 named on each struct: the SDK parses every answer with them, and
//! so does the CLI, which bundles the same SDK. zod drops keys a schema does
//! not declare, so a key outside the schema is sent only where a client is
//! known to read it (`source_cvm_id`, `teepod_name` on the VM object).
//! `tests/api/conformance.rs` runs the schemas themselves on these answers.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::state::CvmRecord;
use super::world::{SimKms, SimNode};
use super::{KMS_SLUG, OS_VERSION, Shared, bare, env_public_key, timestamp};

const INSTANCE_TYPE: &str = "tdx.small";
const VCPU: u32 = 1;
const MEMORY_MB: u32 = 2048;
const DISK_GB: u32 = 20;
/// The account every CVM of the world belongs to.
const USER_ID: u64 = 1;
const USERNAME: &str = "sandbox";

/// `CvmInfoDetailV20260121Schema` (`GET /cvms/{id}`) and, without
/// `compose_file`, `CvmInfoV20260121Schema` (`GET /apps/{app_id}/cvms`).
/// This shape has no creation time: `progress.started_at` is the nearest,
/// while a CVM is starting.
#[derive(Debug, Serialize)]
pub(super) struct CvmInfoV20260121 {
    /// The hashed CVM id.
    id: String,
    name: String,
    app_id: String,
    vm_uuid: String,
    instance_id: String,
    resource: Resource,
    node_info: NodeRef,
    os: OsInfo,
    /// `phala`, `ethereum`, `base` or `legacy`.
    kms_type: String,
    kms_info: CvmKmsInfo,
    status: String,
    progress: Option<Progress>,
    compose_hash: String,
    gateway: Gateway,
    services: Vec<Value>,
    endpoints: Vec<Endpoint>,
    public_logs: bool,
    public_sysinfo: bool,
    public_tcbinfo: bool,
    gateway_enabled: bool,
    secure_time: bool,
    listed: bool,
    workspace: WorkspaceRef,
    creator: UserRef,
    /// The app-compose manifest, on the detail answer only.
    #[serde(skip_serializing_if = "Option::is_none")]
    compose_file: Option<Value>,
}

/// `CvmResourceInfoV20260121Schema`.
#[derive(Debug, Serialize)]
struct Resource {
    instance_type: &'static str,
    vcpu: u32,
    memory_in_gb: u32,
    disk_in_gb: u32,
    gpus: u32,
    compute_billing_price: Option<String>,
    /// `skip`, `hourly` or `monthly`.
    billing_period: &'static str,
}

/// `NodeRefSchema`.
#[derive(Debug, Serialize)]
struct NodeRef {
    object_type: &'static str,
    id: u32,
    name: String,
    region: String,
    device_id: String,
    ppid: Option<String>,
    status: &'static str,
    version: &'static str,
}

/// `CvmOsInfoV20260121Schema`.
#[derive(Debug, Serialize)]
struct OsInfo {
    name: String,
    version: &'static str,
    is_dev: bool,
    os_image_hash: Option<String>,
}

/// `CvmKmsInfoV20260121BaseSchema`.
#[derive(Debug, Serialize)]
struct CvmKmsInfo {
    chain_id: Option<u64>,
    dstack_kms_address: Option<String>,
    dstack_app_address: Option<String>,
    deployer_address: Option<String>,
    rpc_endpoint: Option<String>,
    encrypted_env_pubkey: Option<String>,
}

/// `CvmProgressInfoV20260121Schema`.
#[derive(Debug, Serialize)]
struct Progress {
    target: &'static str,
    started_at: String,
    correlation_id: Option<String>,
}

/// `CvmGatewayInfoV20260121Schema`.
#[derive(Debug, Serialize)]
struct Gateway {
    base_domain: Option<String>,
    cname: Option<String>,
}

/// `CvmNetworkUrlsV20251028Schema`.
#[derive(Debug, Serialize)]
struct Endpoint {
    app: String,
    instance: String,
}

/// `WorkspaceRefSchema`.
#[derive(Debug, Serialize)]
struct WorkspaceRef {
    object_type: &'static str,
    id: String,
    name: String,
    slug: String,
    avatar_url: Option<String>,
}

/// `UserRefSchema`.
#[derive(Debug, Serialize)]
struct UserRef {
    object_type: &'static str,
    id: String,
    username: &'static str,
    avatar_url: Option<String>,
}

/// `CvmDetailV20251028Schema`: `GET /cvms/{id}` with `X-Phala-Version: 2025-10-28`.
#[derive(Debug, Serialize)]
pub(super) struct CvmDetailV20251028 {
    id: u64,
    name: String,
    status: String,
    in_progress: bool,
    teepod_id: u32,
    teepod: Teepod,
    app_id: String,
    vm_uuid: String,
    instance_id: String,
    vcpu: u32,
    memory: u32,
    disk_size: u32,
    base_image: String,
    encrypted_env_pubkey: Option<String>,
    listed: bool,
    project_id: Option<String>,
    project_type: Option<String>,
    instance_type: &'static str,
    public_sysinfo: bool,
    public_logs: bool,
    dapp_dashboard_url: Option<String>,
    syslog_endpoint: Option<String>,
    kms_info: Option<KmsInfo>,
    contract_address: Option<String>,
    deployer_address: Option<String>,
    scheduled_delete_at: Option<String>,
    public_urls: Vec<Endpoint>,
    gateway_domain: Option<String>,
    machine_info: MachineInfo,
    updated_at: String,
}

/// `CvmInfoV20251028Schema`: an item of `GET /apps/{app_id}/cvms` with
/// `X-Phala-Version: 2025-10-28`.
#[derive(Debug, Serialize)]
pub(super) struct CvmInfoV20251028 {
    hosted: HostedVm,
    name: String,
    managed_user: ManagedUser,
    node: Teepod,
    listed: bool,
    status: String,
    in_progress: bool,
    dapp_dashboard_url: Option<String>,
    syslog_endpoint: Option<String>,
    allow_upgrade: bool,
    project_id: Option<String>,
    project_type: Option<String>,
    billing_period: Option<String>,
    kms_info: Option<KmsInfo>,
    vcpu: u32,
    memory: u32,
    disk_size: u32,
    gateway_domain: Option<String>,
    public_urls: Vec<Endpoint>,
    machine_info: MachineInfo,
    updated_at: String,
}

/// `VmInfoV20251028Schema`.
#[derive(Debug, Serialize)]
struct HostedVm {
    /// The VM's UUID, as dstack's VMM names it.
    id: String,
    name: String,
    status: String,
    uptime: String,
    app_url: Option<String>,
    app_id: String,
    instance_id: String,
    exited_at: Option<String>,
    boot_progress: Option<String>,
    boot_error: Option<String>,
    shutdown_progress: Option<String>,
    image_version: String,
}

/// `ManagedUserV20251028Schema`.
#[derive(Debug, Serialize)]
struct ManagedUser {
    id: u64,
    username: &'static str,
}

/// `CvmNodeV20251028Schema`, and the `teepod` of `VMSchema`.
#[derive(Debug, Serialize)]
struct Teepod {
    id: u32,
    name: String,
    region_identifier: String,
}

/// `MachineInfoV20251028Schema`.
#[derive(Debug, Serialize)]
struct MachineInfo {
    vcpu: u32,
    memory: u32,
    disk_size: u32,
    gpu_count: u32,
}

/// `KmsInfoSchema`: `kms_info` of the 2025-10-28 shapes, of the 465
/// details and of `/teepods/available`.
#[derive(Debug, Clone, Serialize)]
pub(super) struct KmsInfo {
    id: &'static str,
    slug: Option<&'static str>,
    url: String,
    version: &'static str,
    chain_id: Option<u64>,
    kms_contract_address: Option<String>,
    gateway_app_id: Option<String>,
}

/// `VMSchema`: the legacy VM object of a created replica (§2), plus the
/// two keys the CLI's replica printer reads.
#[derive(Debug, Serialize)]
pub(super) struct Vm {
    id: u64,
    name: String,
    status: String,
    teepod_id: u32,
    teepod: Teepod,
    teepod_name: String,
    user_id: u64,
    app_id: String,
    vm_uuid: String,
    instance_id: String,
    app_url: Option<String>,
    base_image: String,
    vcpu: u32,
    /// MB.
    memory: u32,
    /// GB.
    disk_size: u32,
    manifest_version: Option<u64>,
    version: &'static str,
    runner: Option<String>,
    docker_compose_file: Option<String>,
    features: Option<Vec<String>>,
    created_at: String,
    encrypted_env_pubkey: Option<String>,
    source_cvm_id: Option<u64>,
}

/// `AvailableNodesSchema`: `GET /teepods/available`.
#[derive(Debug, Serialize)]
pub(super) struct AvailableNodes {
    tier: &'static str,
    capacity: Capacity,
    nodes: Vec<TeepodCapacity>,
    kms_list: Vec<KmsInfo>,
}

/// `ResourceThresholdSchema`.
#[derive(Debug, Serialize)]
struct Capacity {
    max_instances: Option<u64>,
    max_vcpu: Option<u64>,
    max_memory: Option<u64>,
    max_disk: Option<u64>,
}

/// `TeepodCapacitySchema`.
#[derive(Debug, Serialize)]
struct TeepodCapacity {
    teepod_id: u32,
    name: String,
    listed: bool,
    resource_score: u32,
    remaining_vcpu: u32,
    remaining_memory: u64,
    remaining_cvm_slots: u32,
    images: Vec<OsImage>,
    support_onchain_kms: bool,
    fmspc: Option<String>,
    device_id: String,
    region_identifier: String,
    default_kms: &'static str,
    kms_list: Vec<&'static str>,
}

/// `AvailableOSImageSchema`.
#[derive(Debug, Serialize)]
struct OsImage {
    name: String,
    is_dev: bool,
    version: [u32; 3],
    os_image_hash: Option<String>,
}

/// `CvmStatusSchema`: a value of `POST /status/batch`.
#[derive(Debug, Serialize)]
pub(super) struct CvmStatus {
    vm_uuid: String,
    status: String,
    uptime: Option<String>,
    in_progress: bool,
    boot_progress: Option<&'static str>,
    boot_error: Option<String>,
    operation_type: Option<&'static str>,
    operation_started_at: Option<String>,
    correlation_id: Option<String>,
}

fn image_name() -> String {
    format!("dstack-{OS_VERSION}")
}

fn lower(address: alloy::primitives::Address) -> String {
    address.to_string().to_lowercase()
}

impl CvmRecord {
    /// The short hashed id of the 2026-01-21 shapes.
    fn hashed_id(&self) -> String {
        hex::encode(&Sha256::digest(self.spec.vm_uuid.as_bytes())[..8])
    }

    fn is_onchain(&self) -> bool {
        matches!(self.spec.kms, SimKms::Onchain { .. })
    }

    /// Cloud KMS CVMs publish their env key; on-chain ones use `/kms/.../pubkey`.
    fn cloud_env_pubkey(&self) -> Option<String> {
        (!self.is_onchain()).then(|| env_public_key(self.spec.app_id))
    }

    /// Seconds since boot, as dstack prints it, or `None` while starting.
    fn uptime(&self, now: DateTime<Utc>) -> Option<String> {
        let booted = self.ready_at.unwrap_or(self.created_at);
        (now >= booted).then(|| format!("{}s", (now - booted).num_seconds()))
    }
}

impl Teepod {
    fn of(node: &SimNode) -> Teepod {
        Teepod {
            id: node.id,
            name: node.name.clone(),
            region_identifier: node.region.clone(),
        }
    }
}

impl Shared {
    pub(super) fn kms_info(&self) -> KmsInfo {
        KmsInfo {
            id: KMS_SLUG,
            slug: Some(KMS_SLUG),
            url: format!("{}/kms/{KMS_SLUG}", self.origin()),
            version: "v0.5.3",
            chain_id: Some(self.world.chain_id),
            kms_contract_address: Some(lower(self.world.kms_contract)),
            gateway_app_id: None,
        }
    }

    fn workspace_ref(&self) -> WorkspaceRef {
        WorkspaceRef {
            object_type: "workspace",
            id: self.world.workspace.clone(),
            name: self.world.workspace.clone(),
            slug: self.world.workspace.clone(),
            avatar_url: None,
        }
    }

    /// The 2026-01-21 shape; `detail` adds the manifest.
    pub(super) fn cvm_info(
        &self,
        record: &CvmRecord,
        now: DateTime<Utc>,
        detail: bool,
    ) -> CvmInfoV20260121 {
        let spec = &record.spec;
        let node = self.node(spec.node_id);
        let kms_info = if record.is_onchain() {
            CvmKmsInfo {
                chain_id: Some(self.world.chain_id),
                dstack_kms_address: Some(lower(self.world.kms_contract)),
                dstack_app_address: Some(lower(spec.app_id)),
                deployer_address: None,
                rpc_endpoint: Some(self.rpc_url.to_string()),
                encrypted_env_pubkey: None,
            }
        } else {
            CvmKmsInfo {
                chain_id: None,
                dstack_kms_address: None,
                dstack_app_address: None,
                deployer_address: None,
                rpc_endpoint: None,
                encrypted_env_pubkey: record.cloud_env_pubkey(),
            }
        };
        CvmInfoV20260121 {
            id: record.hashed_id(),
            name: spec.name.clone(),
            app_id: bare(spec.app_id),
            vm_uuid: spec.vm_uuid.to_string(),
            instance_id: record.instance_id.clone(),
            resource: Resource {
                instance_type: INSTANCE_TYPE,
                vcpu: VCPU,
                memory_in_gb: MEMORY_MB / 1024,
                disk_in_gb: DISK_GB,
                gpus: 0,
                compute_billing_price: None,
                billing_period: "hourly",
            },
            node_info: NodeRef {
                object_type: "node",
                id: node.id,
                name: node.name.clone(),
                region: node.region.clone(),
                device_id: hex::encode(node.device_id),
                ppid: None,
                status: "online",
                version: OS_VERSION,
            },
            os: OsInfo {
                name: image_name(),
                version: OS_VERSION,
                is_dev: false,
                os_image_hash: None,
            },
            kms_type: match &spec.kms {
                SimKms::Onchain { kms_type } => kms_type.clone(),
                SimKms::Cloud => "phala".to_owned(),
            },
            kms_info,
            status: record.status(now).to_owned(),
            progress: record.in_progress(now).then(|| Progress {
                target: "running",
                started_at: timestamp(record.created_at),
                correlation_id: None,
            }),
            compose_hash: hex::encode(spec.compose_hash()),
            gateway: Gateway {
                base_domain: None,
                cname: None,
            },
            services: Vec::new(),
            endpoints: Vec::new(),
            public_logs: false,
            public_sysinfo: false,
            public_tcbinfo: false,
            gateway_enabled: true,
            secure_time: false,
            listed: false,
            workspace: self.workspace_ref(),
            creator: UserRef {
                object_type: "user",
                id: USER_ID.to_string(),
                username: USERNAME,
                avatar_url: None,
            },
            compose_file: detail.then(|| spec.compose_file.clone()),
        }
    }

    /// The 2025-10-28 detail shape.
    pub(super) fn cvm_detail_v20251028(
        &self,
        record: &CvmRecord,
        now: DateTime<Utc>,
    ) -> CvmDetailV20251028 {
        let spec = &record.spec;
        let node = self.node(spec.node_id);
        let onchain = record.is_onchain();
        CvmDetailV20251028 {
            id: record.number,
            name: spec.name.clone(),
            status: record.status(now).to_owned(),
            in_progress: record.in_progress(now),
            teepod_id: node.id,
            teepod: Teepod::of(node),
            app_id: bare(spec.app_id),
            vm_uuid: spec.vm_uuid.to_string(),
            instance_id: record.instance_id.clone(),
            vcpu: VCPU,
            memory: MEMORY_MB,
            disk_size: DISK_GB,
            base_image: image_name(),
            encrypted_env_pubkey: record.cloud_env_pubkey(),
            listed: false,
            project_id: None,
            project_type: None,
            instance_type: INSTANCE_TYPE,
            public_sysinfo: false,
            public_logs: false,
            dapp_dashboard_url: None,
            syslog_endpoint: None,
            kms_info: onchain.then(|| self.kms_info()),
            contract_address: onchain.then(|| lower(spec.app_id)),
            deployer_address: None,
            scheduled_delete_at: None,
            public_urls: Vec::new(),
            gateway_domain: None,
            machine_info: machine_info(),
            updated_at: timestamp(record.created_at),
        }
    }

    /// The 2025-10-28 list item shape.
    pub(super) fn cvm_info_v20251028(
        &self,
        record: &CvmRecord,
        now: DateTime<Utc>,
    ) -> CvmInfoV20251028 {
        let spec = &record.spec;
        let node = self.node(spec.node_id);
        let status = record.status(now).to_owned();
        CvmInfoV20251028 {
            hosted: HostedVm {
                id: spec.vm_uuid.to_string(),
                name: spec.name.clone(),
                status: status.clone(),
                uptime: record.uptime(now).unwrap_or_default(),
                app_url: None,
                app_id: bare(spec.app_id),
                instance_id: record.instance_id.clone(),
                exited_at: None,
                boot_progress: record.in_progress(now).then(|| "booting".to_owned()),
                boot_error: None,
                shutdown_progress: None,
                image_version: OS_VERSION.to_owned(),
            },
            name: spec.name.clone(),
            managed_user: ManagedUser {
                id: USER_ID,
                username: USERNAME,
            },
            node: Teepod::of(node),
            listed: false,
            status,
            in_progress: record.in_progress(now),
            dapp_dashboard_url: None,
            syslog_endpoint: None,
            allow_upgrade: false,
            project_id: None,
            project_type: None,
            billing_period: None,
            kms_info: record.is_onchain().then(|| self.kms_info()),
            vcpu: VCPU,
            memory: MEMORY_MB,
            disk_size: DISK_GB,
            gateway_domain: None,
            public_urls: Vec::new(),
            machine_info: machine_info(),
            updated_at: timestamp(record.created_at),
        }
    }

    /// The legacy VM object of §2, for created replicas.
    pub(super) fn vm(
        &self,
        record: &CvmRecord,
        source: Option<&CvmRecord>,
        now: DateTime<Utc>,
    ) -> Vm {
        let spec = &record.spec;
        let node = self.node(spec.node_id);
        let compose = &spec.compose_file;
        let text = |key: &str| compose.get(key).and_then(Value::as_str).map(str::to_owned);
        Vm {
            id: record.number,
            name: spec.name.clone(),
            status: record.status(now).to_owned(),
            teepod_id: node.id,
            teepod: Teepod::of(node),
            teepod_name: node.name.clone(),
            user_id: USER_ID,
            app_id: bare(spec.app_id),
            vm_uuid: spec.vm_uuid.to_string(),
            instance_id: record.instance_id.clone(),
            app_url: None,
            base_image: image_name(),
            vcpu: VCPU,
            memory: MEMORY_MB,
            disk_size: DISK_GB,
            manifest_version: compose.get("manifest_version").and_then(Value::as_u64),
            version: OS_VERSION,
            runner: text("runner"),
            docker_compose_file: text("docker_compose_file"),
            features: None,
            created_at: timestamp(record.created_at),
            encrypted_env_pubkey: record.cloud_env_pubkey(),
            source_cvm_id: source.map(|s| s.number),
        }
    }

    /// `GET /teepods/available`, with each node's free slots now.
    pub(super) fn available_nodes(
        &self,
        free_slots: &std::collections::HashMap<u32, u32>,
    ) -> AvailableNodes {
        let nodes = self
            .world
            .nodes
            .iter()
            .map(|node| {
                let slots = free_slots.get(&node.id).copied().unwrap_or(0);
                TeepodCapacity {
                    teepod_id: node.id,
                    name: node.name.clone(),
                    listed: true,
                    resource_score: slots,
                    remaining_vcpu: slots * VCPU,
                    remaining_memory: u64::from(slots) * u64::from(MEMORY_MB),
                    remaining_cvm_slots: slots,
                    images: vec![OsImage {
                        name: image_name(),
                        is_dev: false,
                        version: [0, 5, 3],
                        os_image_hash: None,
                    }],
                    support_onchain_kms: true,
                    fmspc: None,
                    device_id: hex::encode(node.device_id),
                    region_identifier: node.region.clone(),
                    default_kms: KMS_SLUG,
                    kms_list: vec![KMS_SLUG],
                }
            })
            .collect();
        AvailableNodes {
            tier: "sandbox",
            capacity: Capacity {
                max_instances: None,
                max_vcpu: None,
                max_memory: None,
                max_disk: None,
            },
            nodes,
            kms_list: vec![self.kms_info()],
        }
    }
}

impl CvmStatus {
    /// `requested` is the id as the caller sent it; it names the entry.
    pub(super) fn of(record: &CvmRecord, requested: &str, now: DateTime<Utc>) -> CvmStatus {
        let starting = record.in_progress(now);
        CvmStatus {
            vm_uuid: requested.to_owned(),
            status: record.status(now).to_owned(),
            uptime: record.uptime(now),
            in_progress: starting,
            boot_progress: Some(if starting { "booting" } else { "done" }),
            boot_error: None,
            operation_type: starting.then_some("create"),
            operation_started_at: starting.then(|| timestamp(record.created_at)),
            correlation_id: None,
        }
    }
}

fn machine_info() -> MachineInfo {
    MachineInfo {
        vcpu: VCPU,
        memory: MEMORY_MB,
        disk_size: DISK_GB,
        gpu_count: 0,
    }
}
