//! A request commits with `already-registered` only once the chain itself
//! allows its compose hash and device at confirmed depth: the prepare's
//! `onchain_status` never decides (issue: "Confirmed depth everywhere").

use approval_bridge::config::Confirmations;
use approval_bridge::safe::{Call, Deployment, SafeVersion, build_safe_tx};
use serde_json::json;
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{TestApp, spawn_app_with};
use crate::phala_mock::*;
use crate::safe_world::{SafeWorld, b256, commits, execute, hex40, mine, mount_commit_and_run};

const CONFIRMATIONS: u64 = 3;

/// The bridge on the world, with a prepare for node 1 that says everything
/// is already allowed on chain, whatever the chain says.
async fn bridge_told_allowed(world: &SafeWorld) -> TestApp {
    let app = spawn_app_with({
        let configure = world.configure(world.chain.rpc_url());
        move |s| {
            configure(s);
            s.safe.confirmations = Confirmations(vec![(31337, CONFIRMATIONS)]);
        }
    })
    .await;
    crate::safe_world::mount_source_on(&app, world.app, false).await;
    // Mounted after the plain prepares, so it answers first for node 1.
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/replicas"))))
        .and(header("X-Prepare-Only", "true"))
        .and(body_partial_json(json!({"node_id": 1})))
        .respond_with(ResponseTemplate::new(465).set_body_json(prepared_body_for(
            &hex40(world.app),
            31337,
            "token-1",
            1,
            true,
            true,
            true,
        )))
        .with_priority(1)
        .mount(&app.phala)
        .await;
    mount_commit_and_run(&app).await;
    app
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phala_saying_allowed_does_not_commit_what_the_chain_does_not_allow() {
    let world = SafeWorld::start().await;
    let app = bridge_told_allowed(&world).await;
    let id = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": 1}))
        .await
        .remove(0);
    app.drain_all(10).await;

    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "awaiting_approval", "{request}");
    assert!(commits(&app).await.is_empty(), "nothing committed");
    let calls: Vec<String> = request["proposal"]["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["function"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        calls.iter().any(|f| f.contains("addComposeHash")),
        "{calls:?}"
    );
    assert!(calls.iter().any(|f| f.contains("addDevice")), "{calls:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_allowed_at_the_head_commit_only_once_confirmed() {
    let world = SafeWorld::start().await;
    let app = bridge_told_allowed(&world).await;
    // The owners register both themselves; the block is the head.
    let calls = [
        Call::add_device(world.app, b256(&device_id(1))),
        Call::add_compose_hash(world.app, b256(&compose_hash())),
    ];
    let tx = build_safe_tx(&calls, SafeVersion::V1_4_1, Deployment::Canonical, 0).unwrap();
    execute(&world, tx).await;

    let id = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": 1}))
        .await
        .remove(0);
    app.drain_all(3).await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "awaiting_proposal", "{request}");
    assert!(commits(&app).await.is_empty(), "not before confirmed depth");

    mine(&world, CONFIRMATIONS).await;
    app.clock.advance(chrono::Duration::seconds(6));
    app.drain_all(10).await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "done", "{request}");
    let sent = commits(&app).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["transaction_hash"], "already-registered");
}
