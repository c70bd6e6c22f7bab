//! The Safe flow on a real local chain: anvil with the canonical Safe 1.4.1
//! contracts, our DstackApp, the fake Safe Transaction Service, and the
//! bridge planning and proposing one Safe transaction per Safe.

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::Provider;
use alloy::sol_types::SolEvent;
use approval_bridge::chain::IDstackApp;
use approval_bridge::config::{AllowedSafes, RpcUrls};
use approval_bridge::safe::{Call, Operation, SafeTx};
use approval_bridge::sandbox::LocalChain;
use approval_bridge::sandbox::safe_service::SafeServiceSim;
use reqwest::Url;
use serde_json::{Value, json};
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{TestApp, spawn_app_with};
use crate::phala_mock::*;

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
        crate::helpers::spawn_app_on(
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

async fn proposal_of(app: &TestApp, id: &str) -> Value {
    app.get_replica(id).await["proposal"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_safe_transaction_registers_exactly_the_missing_hashes_and_devices() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_source_on(&app, world.app, false).await;

    // Three replicas on two nodes, all with the same compose hash.
    let mut ids = Vec::new();
    for node in [1, 2, 1] {
        ids.extend(
            app.queue(&json!({"source": ONCHAIN_NAME, "node": node}))
                .await,
        );
    }
    app.drain_all(10).await;

    let mut hashes = Vec::new();
    for id in &ids {
        let request = app.get_replica(id).await;
        assert_eq!(request["status"], "awaiting_approval", "{request}");
        let proposal = &request["proposal"];
        assert_eq!(proposal["safe"], world.safe.to_checksum(None));
        assert_eq!(proposal["nonce"], 0);
        assert_eq!(proposal["threshold"], 2);
        hashes.push(proposal["safe_tx_hash"].as_str().unwrap().to_owned());
    }
    assert!(
        hashes.windows(2).all(|w| w[0] == w[1]),
        "one Safe transaction for all: {hashes:?}"
    );
    let safe_tx_hash: B256 = hashes[0].parse().unwrap();
    assert_eq!(world.service.proposal_posts(safe_tx_hash), 1);

    // The stored transaction: a DELEGATECALL batch through MultiSendCallOnly,
    // whose hash the Safe itself computes the same way.
    let (to, data, operation, nonce): (String, String, i16, i64) = sqlx::query_as(
        "SELECT to_address, data, operation, nonce FROM proposals WHERE safe_tx_hash = $1",
    )
    .bind(&hashes[0])
    .fetch_one(&app.db)
    .await
    .unwrap();
    let tx = SafeTx::new(
        to.parse().unwrap(),
        U256::ZERO,
        data.parse::<Bytes>().unwrap(),
        Operation::try_from(operation as u8).unwrap(),
        nonce as u64,
    );
    assert_eq!(
        tx.to,
        approval_bridge::sandbox::chain::v1_4_1::MULTI_SEND_CALL_ONLY
    );
    assert_eq!(tx.operation, Operation::DelegateCall);
    let onchain = world.chain.safe_tx_hash(world.safe, &tx).await.unwrap();
    assert_eq!(onchain, safe_tx_hash);

    // Two owners sign, a third account executes.
    let signers = [world.chain.signer(0), world.chain.signer(1)];
    let receipt = world
        .chain
        .exec_safe_tx(world.safe, &tx, &signers, &world.chain.signer(3))
        .await
        .unwrap();

    // Exactly the missing registrations: one compose hash, two devices.
    let mut composes = Vec::new();
    let mut devices = Vec::new();
    for log in receipt.inner.logs() {
        if log.address() != world.app {
            continue;
        }
        if let Ok(e) = IDstackApp::ComposeHashAdded::decode_log_data(log.data()) {
            composes.push(e.composeHash);
        } else if let Ok(e) = IDstackApp::DeviceAdded::decode_log_data(log.data()) {
            devices.push(e.deviceId);
        }
    }
    devices.sort();
    assert_eq!(composes, vec![b256(&compose_hash())]);
    assert_eq!(devices, vec![b256(&device_id(1)), b256(&device_id(2))]);
    assert!(
        world
            .allowed(
                world.app,
                Some(b256(&compose_hash())),
                Some(b256(&device_id(2)))
            )
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_missing_registration_is_a_direct_call() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    // The compose hash is allowed already; only the device is missing.
    let allow_hash = [Call::add_compose_hash(world.app, b256(&compose_hash()))];
    let allow_hash = approval_bridge::safe::build_safe_tx(
        &allow_hash,
        approval_bridge::safe::SafeVersion::V1_4_1,
        approval_bridge::safe::Deployment::Canonical,
        0,
    )
    .unwrap();
    crate::watch_commit::execute(&world, allow_hash).await;
    crate::watch_commit::mine(&world, 3).await;
    mount_source_on(&app, world.app, true).await;
    let id = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": 3}))
        .await
        .remove(0);
    app.drain_all(10).await;
    let proposal = proposal_of(&app, &id).await;
    assert_eq!(app.status_of(&id).await, "awaiting_approval");
    let (to, operation): (String, i16) =
        sqlx::query_as("SELECT to_address, operation FROM proposals WHERE safe_tx_hash = $1")
            .bind(proposal["safe_tx_hash"].as_str().unwrap())
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(to.parse::<Address>().unwrap(), world.app);
    assert_eq!(operation, 0);
    assert!(proposal["gas_estimate"].as_u64().unwrap() > 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_allowed_meanwhile_skip_the_proposal() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_source_on(&app, world.app, false).await;
    let id = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": 2}))
        .await
        .remove(0);
    app.steps(2).await; // queued → preparing → awaiting_proposal
    assert_eq!(app.status_of(&id).await, "awaiting_proposal");

    // Someone registers both through the Safe by hand before the bridge proposes.
    let calls = [
        Call::add_device(world.app, b256(&device_id(2))),
        Call::add_compose_hash(world.app, b256(&compose_hash())),
    ];
    let signers = [world.chain.signer(1), world.chain.signer(2)];
    world
        .chain
        .exec_calls(world.safe, &calls, &signers, &world.chain.signer(3))
        .await
        .unwrap();

    // Allowed in the head block only: nothing is proposed, nothing committed yet.
    app.worker.propose_once().await.unwrap();
    assert_eq!(app.status_of(&id).await, "awaiting_proposal");

    // Once confirmed, the request goes on to commit without a proposal.
    crate::watch_commit::mine(&world, 3).await;
    app.clock.advance(chrono::Duration::seconds(6));
    app.worker.propose_once().await.unwrap();
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "committing");
    assert_eq!(request["proposal"], Value::Null);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM proposals")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    assert_eq!(world.chain.provider().get_chain_id().await.unwrap(), 31337);
}
