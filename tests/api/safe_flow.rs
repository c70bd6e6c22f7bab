//! The Safe flow on a real local chain: anvil with the canonical Safe 1.4.1
//! contracts, our DstackApp, the fake Safe Transaction Service, and the
//! bridge planning and proposing one Safe transaction per Safe.

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::Provider;
use alloy::sol_types::SolEvent;
use approval_bridge::chain::IDstackApp;
use approval_bridge::safe::{Call, Operation, SafeTx};
use serde_json::{Value, json};

use crate::helpers::TestApp;
use crate::phala_mock::*;
use crate::safe_world::{SafeWorld, b256, mount_source_on};

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
    crate::safe_world::execute(&world, allow_hash).await;
    crate::safe_world::mine(&world, 3).await;
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
    crate::safe_world::mine(&world, 3).await;
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
