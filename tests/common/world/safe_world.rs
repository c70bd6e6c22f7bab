//! The Safe world of the chain tests: anvil with the canonical Safe 1.4.1
//! contracts, a 2-of-3 Safe that owns a DstackApp, the sandbox's fake
//! Transaction Service, and the steps tests take in it (mine, execute, a
//! request driven to its proposal).

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::Provider;
use approval_bridge::chain::IDstackApp;
use approval_bridge::config::{AllowedSafes, RpcUrls};
use approval_bridge::safe::{Operation, SafeTx};
use approval_bridge::sandbox::LocalChain;
use approval_bridge::sandbox::safe_service::SafeServiceSim;
use reqwest::Url;
use serde_json::{Value, json};
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::common::helpers::{TestApp, spawn_app_with};
use crate::common::phala_mock::*;

/// The chain, a 2-of-3 Safe over accounts 0..2, a Safe-owned DstackApp and
/// the fake Transaction Service reading the same chain.
pub struct SafeWorld {
    pub chain: LocalChain,
    pub safe: Address,
    pub app: Address,
    pub service_url: Url,
    pub service: SafeServiceSim,
}

impl SafeWorld {
    pub async fn start() -> SafeWorld {
        let chain = LocalChain::start(None)
            .await
            .expect("anvil and the Safe contracts (run npm ci)");
        let owners = [chain.address(0), chain.address(1), chain.address(2)];
        let safe = chain.create_safe(&owners, 2, 1).await.unwrap();
        let app = chain
            .deploy_dstack_app(chain.address(4), false)
            .await
            .unwrap();
        chain
            .transfer_ownership(app, &chain.signer(4), safe)
            .await
            .unwrap();
        let (service_url, service) = SafeServiceSim::spawn(chain.rpc_url()).await.unwrap();
        SafeWorld {
            chain,
            safe,
            app,
            service_url,
            service,
        }
    }

    /// The bridge configured for this world; account 0 (an owner) proposes.
    pub async fn spawn_bridge(&self) -> TestApp {
        spawn_app_with(self.configure(self.chain.rpc_url())).await
    }

    /// The bridge reaching the chain through `rpc` (a proxy, say).
    pub async fn spawn_bridge_with_rpc(&self, rpc: Url) -> TestApp {
        spawn_app_with(self.configure(rpc)).await
    }

    /// A second bridge process on an existing database and Phala: a restart.
    pub async fn spawn_bridge_on(
        &self,
        database_url: &str,
        phala: &std::sync::Arc<wiremock::MockServer>,
    ) -> TestApp {
        crate::common::helpers::spawn_app_on(
            database_url.to_owned(),
            phala.clone(),
            self.configure(self.chain.rpc_url()),
        )
        .await
    }

    pub fn configure(
        &self,
        rpc: Url,
    ) -> impl FnOnce(&mut approval_bridge::config::Settings) + use<> {
        let service = self.service_url.clone();
        let safe = self.safe;
        let key = format!("0x{}", hex::encode(self.chain.private_key(0)));
        move |s| {
            s.safe.rpc_urls = RpcUrls(vec![(31337, rpc)]);
            s.safe.safe_service_urls = RpcUrls(vec![(31337, service)]);
            s.safe.safes = AllowedSafes(vec![(31337, safe)]);
            s.safe.proposer_key = Some(key.into());
        }
    }

    pub async fn allowed(&self, app: Address, compose: Option<B256>, device: Option<B256>) -> bool {
        let contract = IDstackApp::new(app, self.chain.provider());
        let compose_ok = match compose {
            Some(h) => contract.allowedComposeHashes(h).call().await.unwrap(),
            None => true,
        };
        let device_ok = match device {
            Some(d) => contract.allowedDeviceIds(d).call().await.unwrap(),
            None => true,
        };
        compose_ok && device_ok
    }
}

/// Posts a proposal of the owners' own (not the bridge's) to the fake service,
/// signed by owner 1, at `tx.nonce`.
pub async fn post_foreign_proposal(world: &SafeWorld, tx: &SafeTx) {
    use approval_bridge::safe::{Proposal, SafeVersion, TxServiceClient, TxServiceOptions};
    let proposal = Proposal::sign(
        tx.clone(),
        world.safe,
        31337,
        SafeVersion::V1_4_1,
        &world.chain.signer(1),
        None,
    )
    .unwrap();
    let client = TxServiceClient::new(&TxServiceOptions {
        base_url: Some(world.service_url.clone()),
        ..TxServiceOptions::for_chain(31337)
    })
    .unwrap();
    client
        .propose(world.safe, &proposal)
        .await
        .expect("the fake accepts the foreign proposal");
}

pub fn hex40(address: Address) -> String {
    hex::encode(address)
}

pub fn b256(hex_digits: &str) -> B256 {
    hex_digits.parse().unwrap()
}

/// Phala for one source on `app`: the CVM, three nodes, and a prepare that
/// answers with the device of the node asked for.
pub async fn mount_source_on(app: &TestApp, dstack_app: Address, compose_allowed: bool) {
    let vm = ONCHAIN_VM;
    let cvm = onchain_cvm_on(&hex40(dstack_app), 31337, vm, ONCHAIN_NAME);
    for id in [vm, ONCHAIN_NAME] {
        Mock::given(method("GET"))
            .and(path(api(&format!("/cvms/{id}"))))
            .respond_with(ResponseTemplate::new(200).set_body_json(cvm.clone()))
            .mount(&app.phala)
            .await;
    }
    mount_nodes(&app.phala, &[(1, "node-a"), (2, "node-b"), (3, "node-c")]).await;
    for node in 1..=3u32 {
        Mock::given(method("POST"))
            .and(path(api(&format!("/cvms/{vm}/replicas"))))
            .and(header("X-Prepare-Only", "true"))
            .and(body_partial_json(json!({"node_id": node})))
            .respond_with(ResponseTemplate::new(465).set_body_json(prepared_body_for(
                &hex40(dstack_app),
                31337,
                &format!("token-{node}"),
                node,
                compose_allowed,
                false,
                true,
            )))
            .mount(&app.phala)
            .await;
    }
}

/// Mines `blocks` empty blocks on anvil.
pub async fn mine(world: &SafeWorld, blocks: u64) {
    let _: Value = world
        .chain
        .provider()
        .raw_request("anvil_mine".into(), (U256::from(blocks),))
        .await
        .unwrap();
}

/// Phala's commit and the replica's status.
pub async fn mount_commit_and_run(app: &TestApp) {
    mount_commit_ok(&app.phala, ONCHAIN_VM).await;
    mount_replica_status(&app.phala, "running").await;
}

pub async fn commits(app: &TestApp) -> Vec<Value> {
    app.phala_requests("POST", &api(&format!("/cvms/{ONCHAIN_VM}/commit-replica")))
        .await
        .iter()
        .map(|r| r.body_json::<Value>().unwrap())
        .collect()
}

/// The stored Safe transaction of a request's proposal, ready to execute.
pub async fn proposal_call(app: &TestApp, id: &str) -> (SafeTx, String) {
    let hash = app.get_replica(id).await["proposal"]["safe_tx_hash"]
        .as_str()
        .expect("a proposal")
        .to_owned();
    let (to, data, operation): (String, String, i16) =
        sqlx::query_as("SELECT to_address, data, operation FROM proposals WHERE safe_tx_hash = $1")
            .bind(&hash)
            .fetch_one(&app.db)
            .await
            .unwrap();
    let call = SafeTx::new(
        to.parse().unwrap(),
        U256::ZERO,
        data.parse::<Bytes>().unwrap(),
        Operation::try_from(operation as u8).unwrap(),
        0,
    );
    (call, hash)
}

pub async fn execute(world: &SafeWorld, call: SafeTx) -> String {
    execute_by(world, call, 3).await
}

/// Executes at the Safe's current nonce with owners 0 and 2 signing, sent by
/// dev account `executor`.
pub async fn execute_by(world: &SafeWorld, call: SafeTx, executor: usize) -> String {
    let signers = [world.chain.signer(0), world.chain.signer(2)];
    let call = SafeTx {
        nonce: world.chain.safe_nonce(world.safe).await.unwrap(),
        ..call
    };
    let receipt = world
        .chain
        .exec_safe_tx(world.safe, &call, &signers, &world.chain.signer(executor))
        .await
        .unwrap();
    receipt.transaction_hash.to_string()
}

/// Queues one replica per node and drives them to awaiting_approval.
pub async fn proposed(world: &SafeWorld, app: &TestApp, nodes: &[u32]) -> Vec<String> {
    mount_source_on(app, world.app, false).await;
    let mut ids = Vec::new();
    for node in nodes {
        ids.extend(
            app.queue(&json!({"source": ONCHAIN_NAME, "node": node}))
                .await,
        );
    }
    app.drain_all(10).await;
    for id in &ids {
        let request = app.get_replica(id).await;
        assert_eq!(request["status"], "awaiting_approval", "{request}");
    }
    ids
}
