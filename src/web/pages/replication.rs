//! What the queue form shows beside each choice, as Phala's Scale dialog
//! does: each source's running instances and whether the bridge can
//! replicate it at all, each node's region and free slots, and, for each
//! source, whether a replica on a node needs the Safe and which call.
//!
//! Read from what the bridge reads anyway: Phala's CVM and node lists, one
//! Multicall3 read per chain of every app's owner and registrations, and the
//! kind of each owner that is not a configured Safe. The result is kept for
//! [`FRESH_FOR`] and shared by concurrent page loads, so opening the form
//! costs no RPC calls of its own most of the time.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256};
use tokio::sync::Mutex;

use crate::chain::{AppState as AppRead, Registration};
use crate::config::AllowedSafes;
use crate::domain::AppId;
use crate::phala::{AvailableNode, CvmInfo};
use crate::telemetry::redact;
use crate::web::AppState;
use crate::worker::usable_safe;

/// How long one read of the world serves the form.
pub const FRESH_FOR: Duration = Duration::from_secs(10);

/// A source CVM in the form's menu.
#[derive(Debug, Clone)]
pub struct SourceChoice {
    pub value: String,
    /// Name, KMS, running instances.
    pub label: String,
    /// Comma-separated, for the browser's check before submit.
    pub allowed_envs: String,
    /// Why the bridge cannot replicate it; such a source is not offered.
    pub refusal: Option<String>,
    /// What a replica on each node (in [`FormFacts::nodes`]' order) needs.
    pub needs: Vec<String>,
}

impl SourceChoice {
    /// What a replica on node `i` needs ("" when not known).
    pub fn need(&self, i: usize) -> &str {
        self.needs.get(i).map(String::as_str).unwrap_or_default()
    }
}

/// A node in the form's menu.
#[derive(Debug, Clone)]
pub struct NodeChoice {
    pub value: String,
    /// Name, region and free slots.
    pub label: String,
    pub full: bool,
}

/// Everything the form shows besides what the person typed.
#[derive(Debug, Clone, Default)]
pub struct FormFacts {
    pub sources: Vec<SourceChoice>,
    pub sources_error: Option<String>,
    pub nodes: Vec<NodeChoice>,
    pub nodes_error: Option<String>,
}

impl FormFacts {
    pub fn source(&self, value: &str) -> Option<&SourceChoice> {
        self.sources.iter().find(|s| s.value == value)
    }
}

/// A read and when it was made.
type Dated = (Instant, Arc<FormFacts>);

/// The last read, shared by the form's page loads.
#[derive(Debug, Clone, Default)]
pub struct FormFactsCache(Arc<Mutex<Option<Dated>>>);

/// What the chain says about one app: its state, with the refusal of its
/// owner if the bridge cannot propose to it; or why it could not be read.
#[derive(Debug, Clone)]
enum AppFacts {
    Read {
        state: AppRead,
        refusal: Option<String>,
    },
    Refused(String),
    Unknown(String),
}

/// The form's facts, read at most once per [`FRESH_FOR`]; a read that
/// failed in part is not kept.
pub async fn form_facts(state: &AppState) -> Arc<FormFacts> {
    let mut last = state.form_facts.0.lock().await;
    if let Some((at, facts)) = last.as_ref()
        && at.elapsed() < FRESH_FOR
    {
        return facts.clone();
    }
    let facts = Arc::new(read(state).await);
    if facts.sources_error.is_none() && facts.nodes_error.is_none() {
        *last = Some((Instant::now(), facts.clone()));
    }
    facts
}

fn app_of(cvm: &CvmInfo) -> Option<Address> {
    cvm.app_id
        .as_deref()
        .and_then(|id| id.parse::<AppId>().ok())
        .map(|a| a.0)
        .or_else(|| {
            cvm.kms_info
                .as_ref()
                .and_then(|k| k.dstack_app_address.as_deref())
                .and_then(|a| a.parse().ok())
        })
}

fn hash_of(text: Option<&str>) -> Option<B256> {
    text.and_then(|h| h.trim_start_matches("0x").parse::<B256>().ok())
}

async fn read(state: &AppState) -> FormFacts {
    let (cvms, nodes) = tokio::join!(state.phala.list_cvms(), state.phala.available_nodes());
    let (cvms, sources_error) = match cvms {
        Ok(cvms) => (cvms, None),
        Err(err) => (Vec::new(), Some(redact(&err.to_string()).into_owned())),
    };
    let (nodes, nodes_error) = match nodes {
        Ok(available) => (available.nodes, None),
        Err(err) => (Vec::new(), Some(redact(&err.to_string()).into_owned())),
    };
    let apps = read_apps(state, &cvms, &nodes).await;
    FormFacts {
        sources: sources(&cvms, &nodes, &apps),
        sources_error,
        nodes: nodes.iter().map(node_choice).collect(),
        nodes_error,
    }
}

/// One Multicall3 read per chain: every on-chain app's owner, and whether
/// it allows its sources' compose hashes and every node's device.
async fn read_apps(
    state: &AppState,
    cvms: &[CvmInfo],
    nodes: &[AvailableNode],
) -> HashMap<(u64, Address), AppFacts> {
    let devices: Vec<Registration> = nodes
        .iter()
        .filter_map(|n| hash_of(n.device_id.as_deref()))
        .map(Registration::Device)
        .collect();
    let mut wanted: BTreeMap<u64, BTreeMap<Address, Vec<Registration>>> = BTreeMap::new();
    for cvm in cvms.iter().filter(|c| c.is_onchain_kms()) {
        let (Some(chain_id), Some(app)) = (cvm.chain_id(), app_of(cvm)) else {
            continue;
        };
        let registrations = wanted
            .entry(chain_id)
            .or_default()
            .entry(app)
            .or_insert_with(|| devices.clone());
        if let Some(hash) = hash_of(cvm.compose_hash.as_deref()) {
            registrations.push(Registration::ComposeHash(hash));
        }
    }
    let mut out = HashMap::new();
    for (chain_id, apps) in wanted {
        let Some(chain) = state.chains.get(chain_id) else {
            for app in apps.keys() {
                out.insert(
                    (chain_id, *app),
                    AppFacts::Refused(format!(
                        "the bridge has no RPC for chain {chain_id} (APPROVAL_BRIDGE_RPC_URLS)"
                    )),
                );
            }
            continue;
        };
        let wanted: Vec<(Address, Vec<Registration>)> = apps.into_iter().collect();
        let (states, silent) = match chain.read_apps_each(&wanted).await {
            Ok((_, states, silent)) => (states, silent),
            Err(err) => {
                let reason = format!("chain {chain_id} could not be read: {err:#}");
                for (app, _) in &wanted {
                    out.insert((chain_id, *app), AppFacts::Unknown(reason.clone()));
                }
                continue;
            }
        };
        for app in silent {
            out.insert(
                (chain_id, app),
                AppFacts::Refused(format!(
                    "its app {} is not a DstackApp on chain {chain_id}",
                    app.to_checksum(None)
                )),
            );
        }
        for (app, read) in states {
            let facts = owner_facts(&state.safes, &chain, chain_id, app, read).await;
            out.insert((chain_id, app), facts);
        }
    }
    out
}

/// Whether the bridge may propose to the app's owner, in the planner's words.
async fn owner_facts(
    safes: &AllowedSafes,
    chain: &crate::chain::ChainClient,
    chain_id: u64,
    app: Address,
    read: AppRead,
) -> AppFacts {
    // A configured Safe needs no further read.
    if safes.contains(chain_id, read.owner) {
        return AppFacts::Read {
            state: read,
            refusal: None,
        };
    }
    match chain.owner_kind(read.owner).await {
        Ok(kind) => {
            let refusal = usable_safe(safes, chain_id, app, &read, kind)
                .err()
                .map(|e| e.message);
            AppFacts::Read {
                state: read,
                refusal,
            }
        }
        Err(err) => AppFacts::Unknown(format!(
            "the owner of its app could not be read on chain {chain_id}: {err:#}"
        )),
    }
}

fn node_choice(node: &AvailableNode) -> NodeChoice {
    let mut facts = Vec::new();
    if let Some(region) = &node.region_identifier {
        facts.push(format!("region {region}"));
    }
    if let Some(slots) = node.remaining_cvm_slots {
        facts.push(match slots {
            0 => "full".to_owned(),
            1 => "1 free slot".to_owned(),
            n => format!("{n} free slots"),
        });
    }
    NodeChoice {
        value: node.name.clone(),
        label: if facts.is_empty() {
            node.name.clone()
        } else {
            format!("{} ({})", node.name, facts.join(", "))
        },
        full: node.remaining_cvm_slots == Some(0),
    }
}

/// Each source with its instances (the CVMs of its app, and where they run),
/// why it cannot be replicated if so, and what a replica on each node needs.
fn sources(
    cvms: &[CvmInfo],
    nodes: &[AvailableNode],
    apps: &HashMap<(u64, Address), AppFacts>,
) -> Vec<SourceChoice> {
    let node_name = |cvm: &CvmInfo| {
        cvm.node_info
            .as_ref()
            .and_then(|n| n.name.clone())
            .or_else(|| {
                let id = cvm.node_id()?;
                nodes
                    .iter()
                    .find(|n| i64::from(n.teepod_id) == id)
                    .map(|n| n.name.clone())
            })
            .unwrap_or_else(|| "an unknown node".to_owned())
    };
    cvms.iter()
        .filter_map(|cvm| {
            let value = cvm.name.clone().or_else(|| cvm.vm_uuid.clone())?;
            let app = app_of(cvm);
            let siblings: Vec<&CvmInfo> = cvms
                .iter()
                .filter(|c| match app {
                    Some(app) => app_of(c) == Some(app),
                    None => std::ptr::eq(*c, cvm),
                })
                .filter(|c| c.status.as_deref() == Some("running"))
                .collect();
            let instances = match siblings.len() {
                0 => "none running".to_owned(),
                n => format!(
                    "{n} running: {}",
                    siblings
                        .iter()
                        .map(|c| node_name(c))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            let kms = if cvm.is_onchain_kms() {
                format!(
                    "on-chain KMS{}",
                    cvm.chain_id()
                        .map(|c| format!(", chain {c}"))
                        .unwrap_or_default()
                )
            } else {
                format!("{} KMS", cvm.kms_type.as_deref().unwrap_or("Cloud"))
            };
            let (refusal, needs) = approvals(cvm, app, nodes, apps);
            let label = match &refusal {
                Some(reason) => {
                    format!("{value} ({kms}; {instances}): cannot be replicated, {reason}")
                }
                None => format!("{value} ({kms}; {instances})"),
            };
            Some(SourceChoice {
                label,
                allowed_envs: cvm.allowed_envs().unwrap_or_default().join(","),
                refusal,
                needs,
                value,
            })
        })
        .collect()
}

/// Why the source cannot be replicated, or what a replica on each node needs
/// from the Safe.
fn approvals(
    cvm: &CvmInfo,
    app: Option<Address>,
    nodes: &[AvailableNode],
    apps: &HashMap<(u64, Address), AppFacts>,
) -> (Option<String>, Vec<String>) {
    if !cvm.is_onchain_kms() {
        return (
            None,
            vec!["no approval (Cloud KMS)".to_owned(); nodes.len()],
        );
    }
    let (Some(chain_id), Some(app)) = (cvm.chain_id(), app) else {
        return (
            Some("Phala names no chain or app for its on-chain KMS".to_owned()),
            Vec::new(),
        );
    };
    let read = match apps.get(&(chain_id, app)) {
        Some(AppFacts::Read {
            refusal: Some(reason),
            ..
        })
        | Some(AppFacts::Refused(reason)) => return (Some(reason.clone()), Vec::new()),
        Some(AppFacts::Read { state, .. }) => state,
        Some(AppFacts::Unknown(reason)) => {
            return (None, vec![format!("unknown: {reason}"); nodes.len()]);
        }
        None => return (None, vec!["unknown".to_owned(); nodes.len()]),
    };
    let hash_allowed = hash_of(cvm.compose_hash.as_deref())
        .is_some_and(|h| read.is_allowed(&Registration::ComposeHash(h)));
    let needs = nodes
        .iter()
        .map(|node| {
            let device_allowed = hash_of(node.device_id.as_deref())
                .is_some_and(|d| read.is_allowed(&Registration::Device(d)));
            match (device_allowed, hash_allowed) {
                (true, true) => "already allowed: no Safe transaction".to_owned(),
                (false, true) => "needs the Safe: addDevice".to_owned(),
                (true, false) => "needs the Safe: addComposeHash".to_owned(),
                (false, false) => "needs the Safe: addDevice and addComposeHash".to_owned(),
            }
        })
        .collect();
    (None, needs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phala::KmsInfo;

    const APP: &str = "0x1111111111111111111111111111111111111111";
    const HASH: &str = "0x2222222222222222222222222222222222222222222222222222222222222222";
    const DEVICE_1: &str = "0x3333333333333333333333333333333333333333333333333333333333333333";
    const DEVICE_2: &str = "0x4444444444444444444444444444444444444444444444444444444444444444";

    fn node(id: u32, device: &str, slots: i64) -> AvailableNode {
        AvailableNode {
            teepod_id: id,
            name: format!("prod-{id}"),
            device_id: Some(device.to_owned()),
            remaining_cvm_slots: Some(slots),
            region_identifier: Some("eu-1".to_owned()),
        }
    }

    fn cvm(name: &str, node: i64) -> CvmInfo {
        CvmInfo {
            name: Some(name.to_owned()),
            status: Some("running".to_owned()),
            app_id: Some(APP.to_owned()),
            compose_hash: Some(HASH.to_owned()),
            kms_type: Some("base".to_owned()),
            kms_info: Some(KmsInfo {
                chain_id: Some(8453),
                ..KmsInfo::default()
            }),
            teepod_id: Some(node),
            ..CvmInfo::default()
        }
    }

    fn app(hash: bool, device_1: bool, device_2: bool) -> AppRead {
        let mut allowed = HashMap::new();
        allowed.insert(Registration::ComposeHash(HASH.parse().unwrap()), hash);
        allowed.insert(Registration::Device(DEVICE_1.parse().unwrap()), device_1);
        allowed.insert(Registration::Device(DEVICE_2.parse().unwrap()), device_2);
        AppRead {
            owner: Address::ZERO,
            pending_owner: None,
            allow_any_device: false,
            allowed,
        }
    }

    fn read(hash: bool, device_1: bool, device_2: bool) -> AppFacts {
        AppFacts::Read {
            state: app(hash, device_1, device_2),
            refusal: None,
        }
    }

    fn facts(app: AppFacts) -> HashMap<(u64, Address), AppFacts> {
        HashMap::from([((8453, APP.parse().unwrap()), app)])
    }

    #[test]
    fn each_node_says_which_call_a_replica_there_needs() {
        let nodes = [node(1, DEVICE_1, 3), node(2, DEVICE_2, 0)];
        let cvms = [cvm("web", 1), cvm("web-2", 2)];
        let sources = sources(&cvms, &nodes, &facts(read(true, true, false)));
        assert_eq!(
            sources[0].needs,
            [
                "already allowed: no Safe transaction",
                "needs the Safe: addDevice"
            ]
        );
        assert_eq!(
            sources[0].label,
            "web (on-chain KMS, chain 8453; 2 running: prod-1, prod-2)"
        );
        assert!(sources[0].refusal.is_none());
        let sources = super::sources(&cvms, &nodes, &facts(read(false, true, false)));
        assert_eq!(
            sources[0].needs,
            [
                "needs the Safe: addComposeHash",
                "needs the Safe: addDevice and addComposeHash"
            ]
        );
        let labels: Vec<String> = nodes.iter().map(|n| node_choice(n).label).collect();
        assert_eq!(
            labels,
            [
                "prod-1 (region eu-1, 3 free slots)",
                "prod-2 (region eu-1, full)"
            ]
        );
        assert!(node_choice(&nodes[1]).full);
    }

    #[test]
    fn a_source_the_bridge_cannot_replicate_says_why() {
        let nodes = [node(1, DEVICE_1, 3)];
        let refused = AppFacts::Read {
            state: app(true, true, true),
            refusal: Some("app 0x11 is owned by the account 0x55, not a Safe".to_owned()),
        };
        let sources = sources(&[cvm("eoa", 1)], &nodes, &facts(refused));
        assert_eq!(
            sources[0].refusal.as_deref(),
            Some("app 0x11 is owned by the account 0x55, not a Safe")
        );
        assert!(sources[0].label.contains("cannot be replicated"));
        assert!(sources[0].needs.is_empty());

        let no_rpc = AppFacts::Refused("the bridge has no RPC for chain 8453".to_owned());
        let sources = super::sources(&[cvm("far", 1)], &nodes, &facts(no_rpc));
        assert!(sources[0].refusal.as_deref().unwrap().contains("no RPC"));

        // A chain that could not be read refuses nothing: intake decides.
        let unknown = AppFacts::Unknown("timeout".to_owned());
        let sources = super::sources(&[cvm("slow", 1)], &nodes, &facts(unknown));
        assert!(sources[0].refusal.is_none());
        assert_eq!(sources[0].needs, ["unknown: timeout"]);
    }
}
