//! Issue 18, finding 9: quotas before any external call. Intake looks at the
//! caller's hour before it asks Phala (or the chain) anything, so a caller
//! over its quota cannot spend the bridge's Phala key or RPC budget.

use approval_bridge::config::{Quota, Quotas};
use serde_json::json;

use crate::helpers::{TestApp, error_of, spawn_app_with};
use crate::phala_mock::*;

async fn bridge_with_quota(onchain: u32, cloud: u32) -> TestApp {
    let app = spawn_app_with(|s| {
        s.trust.quotas = Quotas(vec![("api:ci-bot".into(), Quota { onchain, cloud })])
    })
    .await;
    mount_onchain_source(&app.phala, &[]).await;
    mount_cloud_source(&app.phala, &"11".repeat(32)).await;
    mount_nodes(&app.phala, &[(1, "node-a")]).await;
    app
}

/// Every request Phala's mock received, as `METHOD path`.
async fn phala_calls(app: &TestApp) -> Vec<String> {
    app.phala
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| format!("{} {}", r.method, r.url.path()))
        .collect()
}

#[tokio::test]
async fn a_caller_over_every_quota_costs_no_phala_call() {
    let app = bridge_with_quota(2, 0).await;
    let queued = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": 1, "count": 2}))
        .await;
    assert_eq!(queued.len(), 2);
    let before = phala_calls(&app).await;
    assert!(before.len() >= 2, "the order was resolved: {before:?}");

    for order in [
        json!({"source": ONCHAIN_NAME, "node": 1}),
        json!({"source": CLOUD_NAME}),
        json!({"source": "no-such-source", "node": "node-a"}),
    ] {
        let (code, message) = error_of(app.post_replicas(&order).await, 429).await;
        assert_eq!(code, "quota_exceeded", "{order}");
        assert!(
            message.contains("2 of its 2") && message.contains("0 of its 0"),
            "{message}"
        );
    }
    assert_eq!(phala_calls(&app).await, before, "no call reached Phala");
    assert_eq!(app.request_count().await, 2);
}

#[tokio::test]
async fn an_order_over_its_kinds_quota_costs_only_the_source_lookup() {
    let app = bridge_with_quota(1, 5).await;
    assert_eq!(
        app.queue(&json!({"source": ONCHAIN_NAME, "node": 1}))
            .await
            .len(),
        1
    );
    let before = phala_calls(&app).await.len();

    // Room is left for Cloud-KMS sources only: the source must be looked up
    // to know its kind, and nothing after that.
    let (code, message) = error_of(
        app.post_replicas(&json!({"source": ONCHAIN_NAME, "node": 1}))
            .await,
        429,
    )
    .await;
    assert_eq!(code, "quota_exceeded");
    assert!(message.contains("1 of its 1"), "{message}");
    let after = phala_calls(&app).await;
    assert_eq!(
        after[before..],
        [format!("GET {}", api(&format!("/cvms/{ONCHAIN_NAME}")))],
        "only the source was looked up"
    );
    assert_eq!(app.request_count().await, 1);
}
