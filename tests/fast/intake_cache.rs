//! Intake's Phala lookups: cached for `APPROVAL_BRIDGE_LOOKUP_CACHE_SECS`,
//! one fetch in flight per key, bad input still refused at once, and an
//! outage on a miss a clear 503.

use std::time::Duration;

use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{TestApp, error_of, spawn_app_with};
use crate::phala_mock::*;

async fn cached_app() -> TestApp {
    spawn_app_with(|s| s.phala.lookup_cache_secs = 30).await
}

/// The source and the node list, each answered after `delay`, so that
/// concurrent intakes overlap.
async fn slow_world(app: &TestApp, delay: Duration) {
    Mock::given(method("GET"))
        .and(path(api(&format!("/cvms/{ONCHAIN_NAME}"))))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(onchain_cvm(&[]))
                .set_delay(delay),
        )
        .mount(&app.phala)
        .await;
    Mock::given(method("GET"))
        .and(path(api("/teepods/available")))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"tier": "pro", "kms_list": [], "nodes": [
                    {"teepod_id": 3, "name": "prod-3", "listed": true, "device_id": device_id(3), "images": []}
                ]}))
                .set_delay(delay),
        )
        .mount(&app.phala)
        .await;
}

async fn lookups(app: &TestApp) -> (usize, usize) {
    (
        app.phala_requests("GET", &api(&format!("/cvms/{ONCHAIN_NAME}")))
            .await
            .len(),
        app.phala_requests("GET", &api("/teepods/available"))
            .await
            .len(),
    )
}

#[tokio::test]
async fn concurrent_intakes_for_one_source_make_one_call_per_lookup() {
    let app = cached_app().await;
    slow_world(&app, Duration::from_millis(300)).await;
    let body = json!({"source": ONCHAIN_NAME, "node": "prod-3"});
    let posts = (0..20).map(|_| app.post_replicas(&body));
    for response in futures_util::future::join_all(posts).await {
        assert_eq!(response.status(), 202);
    }
    assert_eq!(app.request_count().await, 20);
    assert_eq!(lookups(&app).await, (1, 1));

    // While fresh, later orders ask Phala nothing either.
    app.queue(&body).await;
    assert_eq!(lookups(&app).await, (1, 1));
}

#[tokio::test]
async fn without_a_fresh_time_concurrent_intakes_still_share_their_calls() {
    let app = spawn_app_with(|s| s.phala.lookup_cache_secs = 0).await;
    slow_world(&app, Duration::from_millis(300)).await;
    let body = json!({"source": ONCHAIN_NAME, "node": "prod-3"});
    let posts = (0..10).map(|_| app.post_replicas(&body));
    for response in futures_util::future::join_all(posts).await {
        assert_eq!(response.status(), 202);
    }
    assert_eq!(lookups(&app).await, (1, 1));
    app.queue(&body).await;
    assert_eq!(lookups(&app).await, (2, 2), "nothing is kept");
}

#[tokio::test]
async fn bad_names_are_refused_at_once_against_fresh_lookups() {
    let app = cached_app().await;
    slow_world(&app, Duration::ZERO).await;
    app.queue(&json!({"source": ONCHAIN_NAME, "node": "prod-3"}))
        .await;
    assert_eq!(lookups(&app).await, (1, 1));

    let (code, _) = error_of(
        app.post_replicas(&json!({"source": ONCHAIN_NAME, "node": "prod-9"}))
            .await,
        422,
    )
    .await;
    assert_eq!(code, "unknown_node");
    let (code, message) = error_of(
        app.post_replicas(&json!({"source": ONCHAIN_NAME, "env": {"NOT_ALLOWED": "x"}}))
            .await,
        422,
    )
    .await;
    assert_eq!(code, "env_not_allowed", "{message}");
    assert_eq!(lookups(&app).await, (1, 1), "answered from the cache");

    // An unknown source is Phala's to say, and is not remembered.
    for _ in 0..2 {
        let (code, _) = error_of(
            app.post_replicas(&json!({"source": "no-such-cvm"})).await,
            422,
        )
        .await;
        assert_eq!(code, "unknown_source");
    }
    assert_eq!(
        app.phala_requests("GET", &api("/cvms/no-such-cvm"))
            .await
            .len(),
        2
    );
    assert_eq!(app.request_count().await, 1);
}

#[tokio::test]
async fn a_phala_outage_on_a_miss_is_a_503_and_the_next_order_asks_again() {
    let app = cached_app().await;
    Mock::given(method("GET"))
        .and(path(api(&format!("/cvms/{ONCHAIN_NAME}"))))
        .respond_with(ResponseTemplate::new(502).set_body_string("<html>bad gateway</html>"))
        .up_to_n_times(1)
        .mount(&app.phala)
        .await;
    Mock::given(method("GET"))
        .and(path(api("/teepods/available")))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&app.phala)
        .await;
    slow_world(&app, Duration::ZERO).await;
    let body = json!({"source": ONCHAIN_NAME, "node": "prod-3"});

    // The source lookup fails: 503, nothing stored.
    let (code, message) = error_of(app.post_replicas(&body).await, 503).await;
    assert_eq!(code, "phala_unavailable");
    assert!(message.contains("retry"), "{message}");
    // The failure is not kept: the source is fetched again, and now the
    // node list fails.
    let (code, _) = error_of(app.post_replicas(&body).await, 503).await;
    assert_eq!(code, "phala_unavailable");
    assert_eq!(app.request_count().await, 0);
    app.queue(&body).await;
    assert_eq!(lookups(&app).await, (2, 2));
}

#[tokio::test]
async fn an_unreachable_phala_on_a_miss_is_a_503() {
    let app = spawn_app_with(|s| {
        s.phala.lookup_cache_secs = 30;
        // Nothing listens on the discard port.
        s.phala.phala_api_url = "http://127.0.0.1:9/api/v1".parse().unwrap();
    })
    .await;
    let (code, _) = error_of(
        app.post_replicas(&json!({"source": ONCHAIN_NAME})).await,
        503,
    )
    .await;
    assert_eq!(code, "phala_unavailable");
    assert_eq!(app.request_count().await, 0);
}
