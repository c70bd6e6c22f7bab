//! Batches that always fit: a thousand distinct registrations are split
//! into Safe transactions of consecutive nonces, each planned within half a
//! block's gas, each estimated whole, and each executes on anvil.

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::Provider;
use approval_bridge::safe::{Operation, SafeTx};
use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, Request, ResponseTemplate};

use crate::phala_mock::*;
use crate::safe_world::SafeWorld;

const NODES: u32 = 1_000;

/// A device per node, distinct for any number of nodes.
fn device(node: u32) -> String {
    format!("{:064x}", 0xde00_0000u64 + node as u64)
}

/// Phala with `NODES` nodes, and a prepare that answers with the device
/// of the node asked for (the compose hash is allowed already).
async fn mount_many_nodes(phala: &wiremock::MockServer, dstack_app: Address) {
    let app = format!("{dstack_app:#x}");
    let cvm = onchain_cvm_on(&app, 31337, ONCHAIN_VM, ONCHAIN_NAME);
    for id in [ONCHAIN_VM, ONCHAIN_NAME] {
        Mock::given(method("GET"))
            .and(path(api(&format!("/cvms/{id}"))))
            .respond_with(ResponseTemplate::new(200).set_body_json(cvm.clone()))
            .mount(phala)
            .await;
    }
    let nodes: Vec<Value> = (1..=NODES)
        .map(|id| {
            json!({"teepod_id": id, "name": format!("node-{id}"), "listed": true,
                   "remaining_cvm_slots": 3, "device_id": device(id),
                   "support_onchain_kms": true, "images": []})
        })
        .collect();
    Mock::given(method("GET"))
        .and(path(api("/teepods/available")))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"tier": "pro", "nodes": nodes, "kms_list": []})),
        )
        .mount(phala)
        .await;
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/replicas"))))
        .and(header("X-Prepare-Only", "true"))
        .respond_with(move |request: &Request| {
            let body: Value = serde_json::from_slice(&request.body).unwrap();
            let node = body["node_id"].as_u64().unwrap() as u32;
            let mut prepared = prepared_body_for(
                &app,
                31337,
                &format!("token-{node}"),
                node,
                true,
                false,
                true,
            );
            for detail in prepared["detail"]["details"].as_array_mut().unwrap() {
                if detail["field"] == "device_id" {
                    detail["value"] = json!(device(node));
                }
            }
            ResponseTemplate::new(465).set_body_json(prepared)
        })
        .mount(phala)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_registrations_are_split_into_safe_transactions_that_each_fit_a_block() {
    let world = SafeWorld::start().await;
    let configure = world.configure(world.chain.rpc_url());
    let app = crate::helpers::spawn_app_with(move |s| {
        configure(s);
        s.trust.quota_per_hour = NODES;
    })
    .await;
    mount_many_nodes(&app.phala, world.app).await;
    for node in 1..=NODES {
        app.queue(&json!({"source": ONCHAIN_NAME, "node": node}))
            .await;
    }
    app.drain_all(30).await;

    let proposals: Vec<(i64, String, String, i16, i64, String)> = sqlx::query_as(
        "SELECT nonce, to_address, data, operation, gas_estimate, safe_tx_hash FROM proposals
         WHERE status = 'proposed' ORDER BY nonce",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    let nonces: Vec<i64> = proposals.iter().map(|p| p.0).collect();
    assert!(
        nonces.len() >= 2,
        "one block cannot take them all: {nonces:?}"
    );
    assert_eq!(
        nonces,
        (0..nonces.len() as i64).collect::<Vec<_>>(),
        "consecutive nonces"
    );
    let (calls, requests): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(DISTINCT value) FROM proposal_calls),
                (SELECT count(*) FROM replica_requests WHERE status = 'awaiting_approval' AND proposal_id IS NOT NULL)",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    // Every device, and the compose hash: the prepare says it is allowed,
    // but the chain, which decides, does not allow it yet.
    assert_eq!((calls, requests), (NODES as i64 + 1, NODES as i64));

    let gas_limit = world
        .chain
        .provider()
        .get_block_by_number(alloy::eips::BlockNumberOrTag::Latest)
        .await
        .unwrap()
        .unwrap()
        .header
        .gas_limit;
    let mut figures = Vec::new();
    for (nonce, to, data, operation, estimate, hash) in proposals {
        assert!(
            (estimate as u64) <= gas_limit / 2 + gas_limit / 20,
            "nonce {nonce}: {estimate} planned against a block of {gas_limit}"
        );
        let tx = SafeTx::new(
            to.parse().unwrap(),
            U256::ZERO,
            data.parse::<Bytes>().unwrap(),
            Operation::try_from(operation as u8).unwrap(),
            nonce as u64,
        );
        let signers = [world.chain.signer(0), world.chain.signer(2)];
        let receipt = world
            .chain
            .exec_safe_tx(world.safe, &tx, &signers, &world.chain.signer(3))
            .await
            .unwrap_or_else(|err| panic!("nonce {nonce} ({hash}) does not execute: {err:#}"));
        let used = receipt.gas_used;
        figures.push((nonce, estimate, used));
        let off = (estimate as f64 - used as f64).abs() / used as f64;
        assert!(
            off <= 0.10,
            "nonce {nonce}: estimated {estimate}, used {used}"
        );
    }
    println!("(nonce, gas estimate, gas used) per Safe transaction: {figures:?}");
    for node in [1, NODES / 2, NODES] {
        let device: B256 = device(node).parse().unwrap();
        assert!(
            world.allowed(world.app, None, Some(device)).await,
            "node {node}"
        );
    }
}
