//! The prepare's 465 must name what the bridge resolved itself: the source's
//! app, the target node's device and the requested compose hash. An answer
//! that disagrees fails the request, and nothing is proposed to the Safe.

use serde_json::{Value, json};
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::TestApp;
use crate::phala_mock::*;
use crate::safe_world::{SafeWorld, b256, hex40, mount_source_on};

async fn mount_prepare_for_node(app: &TestApp, node: u32, body: Value) {
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/replicas"))))
        .and(header("X-Prepare-Only", "true"))
        .and(body_partial_json(json!({"node_id": node})))
        .respond_with(ResponseTemplate::new(465).set_body_json(body))
        .mount(&app.phala)
        .await;
}

/// Replaces the value of one `details` field of a 465 body.
fn with_detail(mut body: Value, field: &str, value: &str) -> Value {
    let details = body["detail"]["details"].as_array_mut().unwrap();
    let entry = details.iter_mut().find(|d| d["field"] == field).unwrap();
    entry["value"] = json!(value);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_465_that_disagrees_with_intake_fails_and_proposes_nothing() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    let app_hex = hex40(world.app);
    let cvm = onchain_cvm_on(&app_hex, 31337, ONCHAIN_VM, ONCHAIN_NAME);
    for id in [ONCHAIN_VM, ONCHAIN_NAME] {
        Mock::given(method("GET"))
            .and(path(api(&format!("/cvms/{id}"))))
            .respond_with(ResponseTemplate::new(200).set_body_json(cvm.clone()))
            .mount(&app.phala)
            .await;
    }
    mount_nodes(&app.phala, &[(1, "node-a"), (2, "node-b"), (3, "node-c")]).await;
    let answer = |node| prepared_body_for(&app_hex, 31337, "token", node, false, false, true);
    let other_app = "77".repeat(20);
    let other_hash = "cd".repeat(32);
    // Node 1: another app. Node 2: node 3's device. Node 3: another compose hash.
    mount_prepare_for_node(&app, 1, with_detail(answer(1), "app_id", &other_app)).await;
    mount_prepare_for_node(&app, 2, answer(3)).await;
    mount_prepare_for_node(&app, 3, with_detail(answer(3), "compose_hash", &other_hash)).await;

    let wrong_app = app.queue(&json!({"source": ONCHAIN_NAME, "node": 1})).await;
    let wrong_device = app.queue(&json!({"source": ONCHAIN_NAME, "node": 2})).await;
    let wrong_hash = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": 3, "compose_hash": compose_hash()}))
        .await;
    app.drain_all(10).await;

    for (ids, mentions) in [
        (&wrong_app, format!("app 0x{other_app}")),
        (&wrong_device, format!("device 0x{}", device_id(3))),
        (&wrong_hash, format!("compose hash 0x{other_hash}")),
    ] {
        let request = app.get_replica(&ids[0]).await;
        assert_eq!(request["status"], "failed", "{request}");
        assert_eq!(request["last_error"]["code"], "PREPARE-ANSWER-MISMATCH");
        let message = request["last_error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&mentions),
            "{message} should name {mentions}"
        );
        assert!(request["proposal"].is_null());
        // Nothing of Phala's answer was taken as the request's own.
        assert!(request["device_id"].is_null(), "{request}");
    }
    assert_eq!(world.service.proposal_posts_total(), 0);
    assert!(
        !world
            .allowed(world.app, None, Some(b256(&device_id(2))))
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_465_that_agrees_goes_on_to_the_safe() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_source_on(&app, world.app, false).await;
    let ids = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": 2, "compose_hash": compose_hash()}))
        .await;
    app.drain_all(10).await;
    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "awaiting_approval", "{request}");
    assert_eq!(request["device_id"], format!("0x{}", device_id(2)));
    assert_eq!(world.service.proposal_posts_total(), 1);
}
