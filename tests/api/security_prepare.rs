//! Issue "The Safe approves exactly what was asked": every call proposed to
//! the Safe is tied to the order, whatever Phala's 465 says. An order that
//! pins no compose hash is pinned to the source's own at intake; an "Auto"
//! node must be one the workspace lists; the chain is compared, never
//! overwritten.

use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::TestApp;
use crate::phala_mock::*;
use crate::safe_world::{SafeWorld, hex40};

/// The source on the world's app, three listed nodes, and a prepare that
/// answers `body` to every ask.
async fn source_answering(world: &SafeWorld, app: &TestApp, body: Value) {
    let cvm = onchain_cvm_on(&hex40(world.app), 31337, ONCHAIN_VM, ONCHAIN_NAME);
    for id in [ONCHAIN_VM, ONCHAIN_NAME] {
        Mock::given(method("GET"))
            .and(path(api(&format!("/cvms/{id}"))))
            .respond_with(ResponseTemplate::new(200).set_body_json(cvm.clone()))
            .mount(&app.phala)
            .await;
    }
    mount_nodes(&app.phala, &[(1, "node-a"), (2, "node-b"), (3, "node-c")]).await;
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/replicas"))))
        .and(header("X-Prepare-Only", "true"))
        .respond_with(ResponseTemplate::new(465).set_body_json(body))
        .mount(&app.phala)
        .await;
}

fn answer(world: &SafeWorld, chain_id: u64, node: u32) -> Value {
    prepared_body_for(
        &hex40(world.app),
        chain_id,
        "token",
        node,
        false,
        false,
        true,
    )
}

fn with_detail(mut body: Value, field: &str, value: &str) -> Value {
    let details = body["detail"]["details"].as_array_mut().unwrap();
    let entry = details.iter_mut().find(|d| d["field"] == field).unwrap();
    entry["value"] = json!(value);
    body
}

async fn refused(world: &SafeWorld, app: &TestApp, order: Value, mentions: &str) {
    let id = app.queue(&order).await.remove(0);
    app.drain_all(10).await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "failed", "{request}");
    assert_eq!(request["last_error"]["code"], "PREPARE-ANSWER-MISMATCH");
    let message = request["last_error"]["message"].as_str().unwrap();
    assert!(
        message.contains(mentions),
        "{message} should name {mentions}"
    );
    assert!(request["proposal"].is_null());
    assert_eq!(world.service.proposal_posts_total(), 0, "nothing proposed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpinned_order_is_pinned_to_the_source_hash_and_a_rewritten_465_is_refused() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    let forged = "cd".repeat(32);
    source_answering(
        &world,
        &app,
        with_detail(answer(&world, 31337, 2), "compose_hash", &forged),
    )
    .await;
    refused(
        &world,
        &app,
        json!({"source": ONCHAIN_NAME, "node": 2}),
        &format!("compose hash 0x{forged}"),
    )
    .await;
    // The prepare asked for the source's own compose hash.
    let prepares = app
        .phala_requests("POST", &api(&format!("/cvms/{ONCHAIN_VM}/replicas")))
        .await;
    let body: Value = prepares[0].body_json().unwrap();
    let asked = body["compose_hash"].as_str().unwrap_or_default();
    assert_eq!(asked.trim_start_matches("0x"), compose_hash(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_order_takes_only_a_device_of_a_listed_node_and_records_the_node() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    let stranger = "5a".repeat(32);
    source_answering(
        &world,
        &app,
        with_detail(answer(&world, 31337, 2), "device_id", &stranger),
    )
    .await;
    refused(
        &world,
        &app,
        json!({"source": ONCHAIN_NAME}),
        &format!("device 0x{stranger}, which is the device of no node"),
    )
    .await;

    // A listed node's device: the request records the node Phala chose.
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    source_answering(&world, &app, answer(&world, 31337, 2)).await;
    let id = app.queue(&json!({"source": ONCHAIN_NAME})).await.remove(0);
    app.drain_all(10).await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "awaiting_approval", "{request}");
    assert_eq!(request["node_id"], 2);
    assert_eq!(request["node_name"], "node-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_465_on_another_chain_is_refused_not_believed() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    source_answering(&world, &app, answer(&world, 8453, 2)).await;
    refused(
        &world,
        &app,
        json!({"source": ONCHAIN_NAME, "node": 2}),
        "chain 8453, but the source's app is on chain 31337",
    )
    .await;
}
