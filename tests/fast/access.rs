//! Callers get only what they are allowed: the sources in their scope, and
//! an hourly quota of replicas counted in Postgres (so every process agrees).

use approval_bridge::config::{Quota, Quotas, Scopes, SourcePattern};
use serde_json::{Value, json};

use crate::helpers::{
    API_TOKEN, TestApp, WEBHOOK_SECRET, error_of, spawn_app, spawn_app_on, spawn_app_with,
};
use crate::phala_mock::*;

async fn rows(app: &TestApp) -> (i64, i64) {
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&app.db)
        .await
        .unwrap();
    (app.request_count().await, keys)
}

#[tokio::test]
async fn a_caller_outside_its_scope_is_refused_and_nothing_is_stored() {
    let app = spawn_app_with(|s| {
        s.trust.scopes = Scopes(vec![
            (
                "ci:github".into(),
                vec![SourcePattern::Name("api-prod".into())],
            ),
            (
                "api:ci-bot".into(),
                vec![SourcePattern::App(app_id().parse().unwrap())],
            ),
            ("ci:gitlab".into(), vec![SourcePattern::Any]),
        ])
    })
    .await;
    mount_onchain_source(&app.phala, &[]).await;
    mount_cloud_source(&app.phala, &"11".repeat(32)).await;

    let now = app.clock.now().timestamp();
    let body = r#"{"source": "web-prod"}"#;
    let (code, message) = error_of(
        app.post_webhook(body, WEBHOOK_SECRET, now, Some("run-1"))
            .await,
        403,
    )
    .await;
    assert_eq!(code, "source_out_of_scope");
    assert!(
        message.contains("ci:github")
            && message.contains("web-prod")
            && message.contains("api-prod"),
        "{message}"
    );
    // The other CI client's scope is `*`: any source.
    let other = app
        .post_webhook(body, "another-secret-123", now, None)
        .await;
    assert_eq!(other.status(), 202);

    // The API token may replicate its app, by name or app id, and nothing else.
    assert_eq!(app.queue(&json!({"source": ONCHAIN_NAME})).await.len(), 1);
    let (code, _) = error_of(app.post_replicas(&json!({"source": CLOUD_NAME})).await, 403).await;
    assert_eq!(code, "source_out_of_scope");
    // The keyless delivery is keyed by its signature.
    assert_eq!(rows(&app).await, (2, 1));
    // Refused orders reached no prepare and no env key.
    assert!(
        app.phala_requests("POST", &api(&format!("/cvms/{CLOUD_VM}/replicas")))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn over_the_hourly_quota_is_a_429_with_retry_after_and_stores_nothing() {
    let app = spawn_app_with(|s| s.trust.quota_per_hour = 3).await;
    mount_onchain_source(&app.phala, &[]).await;
    assert_eq!(
        app.queue(&json!({"source": ONCHAIN_NAME, "count": 2}))
            .await
            .len(),
        2
    );
    app.clock.advance(chrono::Duration::minutes(20));
    assert_eq!(app.queue(&json!({"source": ONCHAIN_NAME})).await.len(), 1);

    let response = app
        .post_replicas_with(json!({"source": ONCHAIN_NAME}).to_string(), Some("k-1"))
        .await;
    assert_eq!(response.status(), 429);
    // The first two leave the window 40 minutes from now.
    let retry_after: i64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(retry_after, 40 * 60);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("3 of its 3"),
        "{body}"
    );
    assert_eq!(rows(&app).await, (3, 0));

    // More than the whole quota at once can never fit.
    let (code, message) = error_of(
        app.post_replicas(&json!({"source": ONCHAIN_NAME, "count": 4}))
            .await,
        429,
    )
    .await;
    assert_eq!(code, "quota_exceeded");
    assert!(message.contains("ask for fewer"), "{message}");

    // An hour after the first two, there is room again; the same key now succeeds.
    app.clock.advance(chrono::Duration::minutes(40));
    let response = app
        .post_replicas_with(json!({"source": ONCHAIN_NAME}).to_string(), Some("k-1"))
        .await;
    assert_eq!(response.status(), 202);
    assert_eq!(rows(&app).await, (4, 1));
}

#[tokio::test]
async fn cloud_kms_sources_have_a_small_quota_of_their_own() {
    let app = spawn_app_with(|s| {
        s.trust.quotas = Quotas(vec![(
            "api:ci-bot".into(),
            Quota {
                onchain: 100,
                cloud: 2,
            },
        )])
    })
    .await;
    mount_onchain_source(&app.phala, &[]).await;
    mount_cloud_source(&app.phala, &"11".repeat(32)).await;
    assert_eq!(
        app.queue(&json!({"source": CLOUD_NAME, "count": 2}))
            .await
            .len(),
        2
    );
    let (code, message) =
        error_of(app.post_replicas(&json!({"source": CLOUD_NAME})).await, 429).await;
    assert_eq!(code, "quota_exceeded");
    assert!(message.contains("Cloud-KMS"), "{message}");
    // On-chain sources are counted apart.
    assert_eq!(
        app.queue(&json!({"source": ONCHAIN_NAME, "count": 5}))
            .await
            .len(),
        5
    );
    assert_eq!(rows(&app).await, (7, 0));

    // The default Cloud-KMS quota is small.
    assert_eq!(Quota::DEFAULT.cloud, 5);
    let defaults = spawn_app_with(|_| {}).await;
    mount_cloud_source(&defaults.phala, &"11".repeat(32)).await;
    assert_eq!(
        defaults
            .queue(&json!({"source": CLOUD_NAME, "count": 5}))
            .await
            .len(),
        5
    );
    error_of(
        defaults.post_replicas(&json!({"source": CLOUD_NAME})).await,
        429,
    )
    .await;
}

/// Two processes on one database, racing for the last slots: the quota
/// holds, because the count and the insert share a transaction and a lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_sharing_a_database_share_the_quota() {
    let first = spawn_app_with(|s| s.trust.quota_per_hour = 4).await;
    mount_onchain_source(&first.phala, &[]).await;
    let second = spawn_app_on(first.database_url.clone(), first.phala.clone(), |s| {
        s.trust.quota_per_hour = 4
    })
    .await;

    let post = |app: &TestApp| {
        app.http
            .post(format!("{}/api/v1/replicas", app.address))
            .bearer_auth(API_TOKEN)
            .body(json!({"source": ONCHAIN_NAME}).to_string())
            .send()
    };
    let mut attempts = Vec::new();
    for _ in 0..5 {
        attempts.push(tokio::spawn(post(&first)));
        attempts.push(tokio::spawn(post(&second)));
    }
    let mut answers = Vec::new();
    for attempt in attempts {
        answers.push(attempt.await.unwrap().unwrap().status().as_u16());
    }
    let accepted = answers.iter().filter(|s| **s == 202).count();
    let refused = answers.iter().filter(|s| **s == 429).count();
    assert_eq!((accepted, refused), (4, 6), "{answers:?}");
    assert_eq!(first.request_count().await, 4);
}

/// Orders that arrive together are stored in one transaction, each checked
/// in its turn as if it had come alone: the caller's quota counts the
/// orders before it, and a key used twice answers as it did the first time.
#[tokio::test]
async fn a_batch_of_orders_is_checked_order_by_order() {
    use approval_bridge::domain::Actor;
    use approval_bridge::store::{IdempotencyKey, IdempotencyOutcome, NewRequest, Order, Stored};

    let app = spawn_app().await;
    let base = NewRequest {
        id: uuid::Uuid::nil(),
        source: ONCHAIN_NAME.into(),
        node: None,
        requested_compose_hash: None,
        env_names: Vec::new(),
        note: Some("batched".into()),
        encrypted_env: None,
        source_vm_uuid: ONCHAIN_VM.into(),
        source_name: Some(ONCHAIN_NAME.into()),
        node_id: None,
        node_name: None,
        kms_type: Some("base".into()),
        onchain_kms: true,
        app_id: Some(app_id()),
        chain_id: Some(8453),
        workspace_slug: None,
        expected_device_id: None,
        http_request_id: None,
    };
    let order = |caller: &str, count: usize, key: Option<&str>, body: &str| Order {
        actor: Actor::ApiClient(caller.into()),
        requests: (0..count)
            .map(|_| NewRequest {
                id: uuid::Uuid::now_v7(),
                ..base.clone()
            })
            .collect(),
        limit: 3,
        idempotency: key.map(|key| IdempotencyKey {
            key: key.into(),
            request_hash: body.as_bytes().to_vec(),
        }),
    };
    let orders = [
        order("ci", 2, None, "a"),
        order("ci", 2, None, "b"),       // 2 + 2 > 3
        order("ops", 2, Some("k"), "c"), // another caller's quota
        order("ops", 2, Some("k"), "c"), // the same key and body
        order("ops", 1, Some("k"), "d"), // the same key, another body
        order("ci", 1, None, "e"),       // 2 + 1 = 3
    ];
    let now = app.clock.now();
    let outcomes = app
        .store
        .store_orders(
            &orders,
            now,
            now - chrono::Duration::days(7),
            &approval_bridge::web::intake::answer,
        )
        .await
        .unwrap();

    let created = |outcome: &Stored| match outcome {
        Stored::Created(answer) => answer.clone(),
        other => panic!("not stored: {other:?}"),
    };
    let ids = |answer: &approval_bridge::store::StoredResponse| -> Vec<String> {
        answer.body["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let first = created(&outcomes[0]);
    assert_eq!(
        ids(&first),
        orders[0]
            .requests
            .iter()
            .map(|r| r.id.to_string())
            .collect::<Vec<_>>(),
        "each answer names its own order's requests"
    );
    assert!(
        matches!(outcomes[1], Stored::OverQuota { used: 2, .. }),
        "{:?}",
        outcomes[1]
    );
    let keyed = created(&outcomes[2]);
    assert_eq!(ids(&keyed).len(), 2);
    assert_eq!(
        outcomes[3],
        Stored::Earlier(IdempotencyOutcome::Replay(keyed))
    );
    assert_eq!(outcomes[4], Stored::Earlier(IdempotencyOutcome::Mismatch));
    assert_eq!(ids(&created(&outcomes[5])).len(), 1);
    assert_eq!(app.request_count().await, 2 + 2 + 1);
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(keys, 1);
}
