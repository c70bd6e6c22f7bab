//! The CI webhook: HMAC signatures, the replay window and idempotency.

use serde_json::Value;

use crate::helpers::{WEBHOOK_SECRET, error_of, spawn_app};
use crate::phala_mock::*;

const BODY: &str = r#"{"source": "web-prod", "count": 2, "note": "deploy 1.2.3"}"#;

#[tokio::test]
async fn a_signed_delivery_queues_replicas_as_the_ci_client() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    let now = app.clock.now().timestamp();
    let response = app.post_webhook(BODY, WEBHOOK_SECRET, now, None).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    let replicas = body["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 2);
    assert_eq!(replicas[0]["created_by"], "ci:github");
    let events = app.get_replica(replicas[0]["id"].as_str().unwrap()).await["events"].clone();
    assert_eq!(events[0]["actor"], "ci:github");

    // The second client's secret identifies the second client.
    let response = app
        .post_webhook(BODY, "another-secret-123", now, Some("other"))
        .await;
    assert_eq!(
        response.json::<Value>().await.unwrap()["replicas"][0]["created_by"],
        "ci:gitlab"
    );
}

#[tokio::test]
async fn a_wrong_signature_is_rejected_and_stores_nothing() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    let now = app.clock.now().timestamp();

    let (_, message) = error_of(
        app.post_webhook(BODY, "not-the-secret", now, None).await,
        401,
    )
    .await;
    assert!(message.contains("no configured CI client"), "{message}");

    // Signed for one body, sent with another.
    let signature = approval_bridge::web::webhook::sign(WEBHOOK_SECRET, now, None, BODY.as_bytes());
    let tampered = BODY.replace("2", "9");
    error_of(
        app.post_webhook_raw(&tampered, &now.to_string(), &signature, None)
            .await,
        401,
    )
    .await;

    for (timestamp, signature) in [
        ("yesterday", signature.as_str()),
        (&*now.to_string(), "md5=abc"),
        (&*now.to_string(), "sha256=zz"),
    ] {
        error_of(
            app.post_webhook_raw(BODY, timestamp, signature, None).await,
            401,
        )
        .await;
    }
    let missing = app
        .http
        .post(format!("{}/webhooks/ci", app.address))
        .body(BODY)
        .send()
        .await
        .unwrap();
    let (_, message) = error_of(missing, 401).await;
    assert!(message.contains("x-bridge-timestamp"), "{message}");

    assert_eq!(app.request_count().await, 0);
    assert!(app.phala.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn webhook_replay_with_old_timestamp_is_rejected() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    let old = app.clock.now().timestamp() - 301;
    let (_, message) = error_of(app.post_webhook(BODY, WEBHOOK_SECRET, old, None).await, 401).await;
    assert!(message.contains("5 minutes"), "{message}");
    let future = app.clock.now().timestamp() + 301;
    error_of(
        app.post_webhook(BODY, WEBHOOK_SECRET, future, None).await,
        401,
    )
    .await;
    assert_eq!(app.request_count().await, 0);
}

#[tokio::test]
async fn a_replayed_delivery_within_the_window_creates_nothing_new() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    let now = app.clock.now().timestamp();
    let first: Value = app
        .post_webhook(BODY, WEBHOOK_SECRET, now, None)
        .await
        .json()
        .await
        .unwrap();
    app.clock.advance(chrono::Duration::seconds(60));
    let replay = app.post_webhook(BODY, WEBHOOK_SECRET, now, None).await;
    assert_eq!(replay.status(), 202);
    assert_eq!(replay.json::<Value>().await.unwrap(), first);
    assert_eq!(app.request_count().await, 2);
}

#[tokio::test]
async fn idempotency_key_spans_re_signed_deliveries() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    let now = app.clock.now().timestamp();
    let first: Value = app
        .post_webhook(BODY, WEBHOOK_SECRET, now, Some("gh-run-981"))
        .await
        .json()
        .await
        .unwrap();
    // CI retries a minute later: a new timestamp and signature, the same run id.
    app.clock.advance(chrono::Duration::seconds(60));
    let retry = app
        .post_webhook(BODY, WEBHOOK_SECRET, now + 60, Some("gh-run-981"))
        .await;
    assert_eq!(retry.status(), 202);
    assert_eq!(retry.json::<Value>().await.unwrap(), first);
    assert_eq!(app.request_count().await, 2);

    let other = r#"{"source": "web-prod"}"#;
    let (code, _) = error_of(
        app.post_webhook(other, WEBHOOK_SECRET, now + 60, Some("gh-run-981"))
            .await,
        422,
    )
    .await;
    assert_eq!(code, "idempotency_key_reused");
    assert_eq!(app.request_count().await, 2);
}

#[tokio::test]
async fn a_signed_but_malformed_body_gets_the_same_errors_as_the_api() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    let now = app.clock.now().timestamp();
    let (code, message) = error_of(
        app.post_webhook(
            r#"{"source": "web-prod", "nodes": 3}"#,
            WEBHOOK_SECRET,
            now,
            None,
        )
        .await,
        422,
    )
    .await;
    assert_eq!(code, "invalid_body");
    assert!(message.contains("nodes"));
    assert_eq!(app.request_count().await, 0);
}

/// Runs the README's GitHub Actions step (bash, openssl, curl) against the app.
#[tokio::test]
async fn the_readme_github_actions_step_is_accepted() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    mount_nodes(&app.phala, &[(3, "prod-3")]).await;
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let step = readme
        .split("  run: |\n")
        .nth(1)
        .expect("the step's run block")
        .split("```")
        .next()
        .unwrap();
    let script: String = step
        .lines()
        .map(|line| line.strip_prefix("    ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("${{ github.sha }}", "abc123")
        .replace("${{ github.run_id }}", "981")
        .replace("${{ github.run_attempt }}", "1");
    let address = app.address.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .env("BRIDGE_URL", address)
            .env("BRIDGE_WEBHOOK_SECRET", WEBHOOK_SECRET)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let body: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(body["replicas"][0]["created_by"], "ci:github");
    assert_eq!(body["replicas"][0]["node_name"], "prod-3");
    assert_eq!(body["replicas"][0]["note"], "deploy abc123");
}

#[tokio::test]
async fn a_replay_under_a_fresh_idempotency_key_is_refused() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    let now = app.clock.now().timestamp();
    let ts = now.to_string();
    let signed =
        approval_bridge::web::webhook::sign(WEBHOOK_SECRET, now, Some("gh-1"), BODY.as_bytes());
    let response = app.post_webhook_raw(BODY, &ts, &signed, Some("gh-1")).await;
    assert_eq!(response.status(), 202);
    assert_eq!(app.request_count().await, 2);

    // The captured delivery, sent again under another key or none.
    for key in [Some("gh-2"), Some("GH-1"), None] {
        let (code, message) =
            error_of(app.post_webhook_raw(BODY, &ts, &signed, key).await, 401).await;
        assert_eq!(code, "unauthorized");
        assert!(message.contains("no configured CI client"), "{message}");
    }
    // A delivery signed without a key cannot take one on either.
    let keyless = approval_bridge::web::webhook::sign(WEBHOOK_SECRET, now, None, BODY.as_bytes());
    error_of(
        app.post_webhook_raw(BODY, &ts, &keyless, Some("fresh"))
            .await,
        401,
    )
    .await;
    assert_eq!(app.request_count().await, 2);
}

#[tokio::test]
async fn a_replay_with_a_re_cased_signature_creates_nothing() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    let now = app.clock.now().timestamp();
    let ts = now.to_string();
    let signed = approval_bridge::web::webhook::sign(WEBHOOK_SECRET, now, None, BODY.as_bytes());
    let first: Value = app
        .post_webhook_raw(BODY, &ts, &signed, None)
        .await
        .json()
        .await
        .unwrap();
    let hex = signed.strip_prefix("sha256=").unwrap();
    for variant in [
        signed.to_uppercase(),
        format!("SHA256={hex}"),
        format!("sha256={}", hex.to_uppercase()),
    ] {
        let replay = app.post_webhook_raw(BODY, &ts, &variant, None).await;
        assert_eq!(replay.status(), 202, "{variant}");
        assert_eq!(replay.json::<Value>().await.unwrap(), first);
    }
    assert_eq!(app.request_count().await, 2);
}
