//! Issue 18, finding 8: nothing guessable at rest. The hash the database
//! keeps of an idempotent order is keyed with the server's secret, so a
//! dump does not let anyone test guesses of the env values it carried.
//! And finding 9's all-zero shared secret: env values are never encrypted
//! under a key anyone knows.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::helpers::{error_of, spawn_app};
use crate::phala_mock::*;

#[tokio::test]
async fn the_stored_hash_is_keyed_and_the_same_body_and_key_still_get_the_first_answer() {
    let app = spawn_app().await;
    mount_cloud_source(&app.phala, &"11".repeat(32)).await;
    let body = json!({"source": CLOUD_NAME, "env": {"API_KEY": "hunter2-guessable"}}).to_string();

    let first = app.post_replicas_with(body.clone(), Some("deploy-7")).await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();

    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT request_hash FROM idempotency_keys WHERE key = 'deploy-7'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    // Neither the body as sent nor its canonical form hashes to it.
    let canonical = serde_json::from_str::<Value>(&body).unwrap().to_string();
    assert_ne!(stored, Sha256::digest(body.as_bytes()).to_vec());
    assert_ne!(stored, Sha256::digest(canonical.as_bytes()).to_vec());
    assert_eq!(stored.len(), 32);

    // The same key and body: the first answer, nothing new.
    let again = app.post_replicas_with(body.clone(), Some("deploy-7")).await;
    assert_eq!(again.status(), 202);
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    assert_eq!(app.request_count().await, 1);
    // Another env value under the same key is another body.
    let other = json!({"source": CLOUD_NAME, "env": {"API_KEY": "another-guess"}}).to_string();
    let refused = app.post_replicas_with(other, Some("deploy-7")).await;
    assert_eq!(refused.status(), 422);
    assert_eq!(app.request_count().await, 1);
}

/// An env public key that is a low-order point (all zeros here) gives an
/// all-zero X25519 shared secret, so the AES key would be one anyone
/// knows: the order is refused, and nothing is encrypted, stored or sent.
#[tokio::test]
async fn an_all_zero_env_key_is_refused_and_nothing_is_stored_or_sent() {
    let app = spawn_app().await;
    mount_cloud_source(&app.phala, &"00".repeat(32)).await;
    let order = json!({"source": CLOUD_NAME, "env": {"API_KEY": "hunter2-guessable"}});
    let (code, message) = error_of(app.post_replicas(&order).await, 502).await;
    assert_eq!(code, "phala_error");
    assert!(message.contains("low-order point"), "{message}");
    assert_eq!(app.request_count().await, 0);
    let sent = app
        .phala_requests("POST", &api(&format!("/cvms/{CLOUD_VM}/replicas")))
        .await;
    assert!(sent.is_empty(), "{sent:?}");
}
