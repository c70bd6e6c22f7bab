//! One odd app or Safe never stalls the rest: an app that does not answer
//! `owner()` holds back only its own requests, with the reason on them.

use alloy::primitives::Address;
use serde_json::json;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::TestApp;
use crate::phala_mock::*;
use crate::safe_world::{SafeWorld, hex40, mount_source_on};

const ODD_VM: &str = "1d2e3f40516273849a0b1c2d3e4f5a6b";
const ODD_NAME: &str = "odd-app";

/// A second source whose app id is `app` on the local chain, prepared for node 1.
async fn mount_odd_source(test: &TestApp, app: Address) {
    let cvm = onchain_cvm_on(&hex40(app), 31337, ODD_VM, ODD_NAME);
    for id in [ODD_VM, ODD_NAME] {
        Mock::given(method("GET"))
            .and(path(api(&format!("/cvms/{id}"))))
            .respond_with(ResponseTemplate::new(200).set_body_json(cvm.clone()))
            .mount(&test.phala)
            .await;
    }
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ODD_VM}/replicas"))))
        .and(header("X-Prepare-Only", "true"))
        .respond_with(ResponseTemplate::new(465).set_body_json(prepared_body_for(
            &hex40(app),
            31337,
            "token-odd",
            1,
            false,
            false,
            true,
        )))
        .mount(&test.phala)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_does_not_answer_owner_holds_back_only_its_own_requests() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_source_on(&app, world.app, false).await;
    // No contract at this address: owner() returns nothing.
    let odd = Address::repeat_byte(0x42);
    mount_odd_source(&app, odd).await;

    let good = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": 1}))
        .await
        .remove(0);
    let stuck = app
        .queue(&json!({"source": ODD_NAME, "node": 1}))
        .await
        .remove(0);
    app.drain_all(10).await;

    let request = app.get_replica(&good).await;
    assert_eq!(request["status"], "awaiting_approval", "{request}");
    let request = app.get_replica(&stuck).await;
    assert_eq!(request["status"], "awaiting_proposal", "{request}");
    assert_eq!(request["last_error"]["code"], "APP-UNREADABLE", "{request}");
    let message = request["last_error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&odd.to_checksum(None)) && message.contains("owner()"),
        "{message}"
    );
}
