//! The workers: prepare, commit and track against wiremock Phala, retries,
//! fencing, the two-worker race and the NOTIFY wake-up.

use std::collections::BTreeMap;
use std::time::Duration;

use approval_bridge::clock::Clock;
use approval_bridge::config::WorkerSettings;
use approval_bridge::phala::PhalaClient;
use approval_bridge::store::{Lane, Store};
use approval_bridge::worker::Worker;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{PHALA_API_KEY, TestApp, spawn_app, spawn_app_with, test_settings};
use crate::pg_waits::until_workers_idle_and_listening;
use crate::phala_mock::*;

async fn commit_token_in_db(app: &crate::helpers::TestApp, id: &str) -> Option<String> {
    sqlx::query_scalar("SELECT commit_token FROM replica_requests WHERE id = $1::uuid")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn missing_registrations_leave_the_request_awaiting_a_proposal() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    mount_nodes(&app.phala, &[(3, "prod-3")]).await;
    mount_prepare(
        &app.phala,
        ONCHAIN_VM,
        prepared_body("secret-token-1", 3, false, true, true),
    )
    .await;
    let id = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": 3}))
        .await
        .remove(0);

    app.drain().await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "awaiting_proposal");
    assert_eq!(request["compose_hash"], format!("0x{}", compose_hash()));
    assert_eq!(request["device_id"], format!("0x{}", device_id(3)));
    assert_eq!(request["app_id"], format!("0x{}", app_id()));
    assert_eq!(request["chain_id"], 8453);
    assert_eq!(
        request["registrations"],
        json!({"compose_hash_allowed": false, "device_id_allowed": true})
    );
    let statuses: Vec<&str> = request["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["to"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["queued", "preparing", "awaiting_proposal"]);
    assert!(
        request["events"][2]["message"]
            .as_str()
            .unwrap()
            .contains("compose hash")
    );
    assert_eq!(request["events"][2]["actor"], "worker");

    // The token is kept for the commit, and never shown.
    assert_eq!(
        commit_token_in_db(&app, &id).await.as_deref(),
        Some("secret-token-1")
    );
    assert!(!request.to_string().contains("secret-token-1"));
    let list = app.list_replicas("").await.text().await.unwrap();
    assert!(!list.contains("secret-token-1"));

    let prepares = app
        .phala_requests("POST", &api(&format!("/cvms/{ONCHAIN_VM}/replicas")))
        .await;
    assert_eq!(prepares.len(), 1);
    let prepare = &prepares[0];
    assert_eq!(prepare.headers.get("X-Prepare-Only").unwrap(), "true");
    assert_eq!(prepare.headers.get("X-API-Key").unwrap(), PHALA_API_KEY);
    assert_eq!(
        prepare.headers.get("X-Phala-Version").unwrap(),
        "2026-01-21"
    );
    // Only the keys that have values; the order pinned no compose hash, so
    // intake pinned the source's own.
    assert_eq!(
        prepare.body_json::<Value>().unwrap(),
        json!({"node_id": 3, "compose_hash": compose_hash()})
    );
}

#[tokio::test]
async fn everything_allowed_commits_with_already_registered_and_tracks_until_running() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    // The nodes an "Auto" order may land on.
    mount_nodes(&app.phala, &[(1, "prod-1"), (2, "prod-2"), (3, "prod-3")]).await;
    // The 465 envelope at the top level this time.
    mount_prepare(
        &app.phala,
        ONCHAIN_VM,
        prepared_body("secret-token-2", 1, true, true, false),
    )
    .await;
    mount_commit_ok(&app.phala, ONCHAIN_VM).await;
    replica_status_mock("starting")
        .up_to_n_times(1)
        .mount(&app.phala)
        .await;
    let hash = format!("0x{}", compose_hash());
    let id = app
        .queue(&json!({"source": ONCHAIN_NAME, "compose_hash": hash}))
        .await
        .remove(0);

    app.drain().await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "provisioning");
    assert_eq!(request["vm_uuid"], REPLICA_VM);
    assert_eq!(request["replica"]["status"], "starting");

    let commits = app
        .phala_requests("POST", &api(&format!("/cvms/{ONCHAIN_VM}/commit-replica")))
        .await;
    assert_eq!(commits.len(), 1);
    assert_eq!(
        commits[0].body_json::<Value>().unwrap(),
        json!({"token": "secret-token-2", "compose_hash": compose_hash(), "transaction_hash": "already-registered"})
    );
    // The requested compose hash went to the prepare without `0x`.
    let prepare = &app
        .phala_requests("POST", &api(&format!("/cvms/{ONCHAIN_VM}/replicas")))
        .await[0];
    assert_eq!(
        prepare.body_json::<Value>().unwrap(),
        json!({"compose_hash": compose_hash()})
    );

    // Still starting: the worker polls again later without spending attempts.
    mount_replica_status(&app.phala, "running").await;
    app.drain_all(5).await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "done");
    assert_eq!(request["attempts"], 0);
    assert_eq!(request["replica"]["status"], "running");
    let statuses: Vec<&str> = request["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["to"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["queued", "preparing", "committing", "provisioning", "done"]
    );
    // A finished request keeps no bearer token.
    assert_eq!(commit_token_in_db(&app, &id).await, None);
}

#[tokio::test]
async fn a_cloud_kms_source_is_replicated_directly_without_a_prepare() {
    let app = spawn_app().await;
    let kms_secret = x25519_dalek::StaticSecret::random_from_rng(rand::rngs::OsRng);
    let kms_public = hex::encode(x25519_dalek::PublicKey::from(&kms_secret).as_bytes());
    mount_cloud_source(&app.phala, &kms_public).await;
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{CLOUD_VM}/replicas"))))
        .respond_with(ResponseTemplate::new(200).set_body_json(replica_vm("starting")))
        .mount(&app.phala)
        .await;
    mount_replica_status(&app.phala, "running").await;
    let id = app
        .queue(&json!({"source": CLOUD_NAME, "env": {"API_KEY": "very-secret-value"}}))
        .await
        .remove(0);

    app.drain_all(5).await;
    assert_eq!(app.status_of(&id).await, "done");
    let calls = app
        .phala_requests("POST", &api(&format!("/cvms/{CLOUD_VM}/replicas")))
        .await;
    assert_eq!(calls.len(), 1);
    assert!(
        calls[0].headers.get("X-Prepare-Only").is_none(),
        "a Cloud-KMS source never gets a prepare"
    );
    let encrypted = calls[0].body_json::<Value>().unwrap()["encrypted_env"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        decrypt(&kms_secret, &encrypted),
        r#"{"env":[{"key":"API_KEY","value":"very-secret-value"}]}"#
    );
    let statuses: Vec<String> = app.get_replica(&id).await["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["to"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(statuses, ["queued", "preparing", "provisioning", "done"]);
}

#[tokio::test]
async fn env_for_an_onchain_app_is_encrypted_to_its_kms_key() {
    // The key is signed by the KMS root key its DstackKms registers (see env_keys.rs).
    let kms = crate::kms_mock::MockKms::start(None).await;
    let app = spawn_app_with(kms.configure()).await;
    let kms_secret = kms.env_secret.clone();
    mount_onchain_source(&app.phala, &["DB_URL", "TOKEN"]).await;
    // The nodes an "Auto" order may land on.
    mount_nodes(&app.phala, &[(1, "prod-1"), (2, "prod-2"), (3, "prod-3")]).await;
    kms.mount_env_key(&app.phala, &kms.signer).await;
    mount_prepare(
        &app.phala,
        ONCHAIN_VM,
        prepared_body("t", 1, false, false, true),
    )
    .await;
    let env = json!({"TOKEN": "t0ps3cret", "DB_URL": "postgres://db"});
    let id = app
        .queue(&json!({"source": ONCHAIN_NAME, "env": env}))
        .await
        .remove(0);
    assert_eq!(
        app.get_replica(&id).await["env_names"],
        json!(["DB_URL", "TOKEN"])
    );
    // The plaintext is never stored.
    let stored: String = sqlx::query_scalar("SELECT row_to_json(r)::text FROM replica_requests r")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(!stored.contains("t0ps3cret"));

    app.drain().await;
    let prepare = &app
        .phala_requests("POST", &api(&format!("/cvms/{ONCHAIN_VM}/replicas")))
        .await[0];
    let encrypted = prepare.body_json::<Value>().unwrap()["encrypted_env"]
        .as_str()
        .unwrap()
        .to_owned();
    let plain: Value = serde_json::from_str(&decrypt(&kms_secret, &encrypted)).unwrap();
    let got: BTreeMap<String, String> = plain["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["key"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        BTreeMap::from([
            ("DB_URL".into(), "postgres://db".into()),
            ("TOKEN".into(), "t0ps3cret".into())
        ])
    );
}

fn decrypt(secret: &x25519_dalek::StaticSecret, encrypted_hex: &str) -> String {
    use aes_gcm::aead::{Aead, KeyInit};
    let bytes = hex::decode(encrypted_hex).unwrap();
    let ephemeral: [u8; 32] = bytes[..32].try_into().unwrap();
    let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(ephemeral));
    let plain = aes_gcm::Aes256Gcm::new(shared.as_bytes().into())
        .decrypt(aes_gcm::Nonce::from_slice(&bytes[32..44]), &bytes[44..])
        .unwrap();
    String::from_utf8(plain).unwrap()
}

#[tokio::test]
async fn transient_errors_back_off_then_succeed() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    // The nodes an "Auto" order may land on.
    mount_nodes(&app.phala, &[(1, "prod-1"), (2, "prod-2"), (3, "prod-3")]).await;
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/replicas"))))
        .respond_with(ResponseTemplate::new(503).set_body_string("upstream busy"))
        .up_to_n_times(1)
        .mount(&app.phala)
        .await;
    let id = app.queue(&json!({"source": ONCHAIN_NAME})).await.remove(0);
    app.drain().await;

    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "preparing");
    assert_eq!(request["attempts"], 1);
    assert_eq!(request["last_error"]["code"], "PHALA-HTTP-503");
    assert!(
        request["last_error"]["suggestion"]
            .as_str()
            .unwrap()
            .contains("retries")
    );
    // Not due before its backoff (2 s base, jitter down to half).
    assert!(!app.worker.run_once().await.unwrap());
    app.clock.advance(chrono::Duration::milliseconds(999));
    assert!(!app.worker.run_once().await.unwrap());

    mount_prepare(
        &app.phala,
        ONCHAIN_VM,
        prepared_body("t", 1, false, false, true),
    )
    .await;
    app.clock.advance(chrono::Duration::seconds(2));
    app.steps(1).await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "awaiting_proposal");
    assert_eq!(request["last_error"], Value::Null);
    assert_eq!(request["attempts"], 0);
    assert!(
        request["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["message"].as_str().unwrap_or("").contains("retrying at"))
    );
}

#[tokio::test]
async fn timeouts_and_rate_limits_are_retried() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    // The nodes an "Auto" order may land on.
    mount_nodes(&app.phala, &[(1, "prod-1"), (2, "prod-2"), (3, "prod-3")]).await;
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/replicas"))))
        .respond_with(ResponseTemplate::new(465).set_delay(Duration::from_secs(3)))
        .up_to_n_times(1)
        .mount(&app.phala)
        .await;
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/replicas"))))
        .respond_with(ResponseTemplate::new(429).set_body_json(phala_error(
            "ERR-05-002",
            "slow down",
            true,
        )))
        .up_to_n_times(1)
        .mount(&app.phala)
        .await;
    let id = app.queue(&json!({"source": ONCHAIN_NAME})).await.remove(0);
    app.drain().await; // queued → preparing → timeout
    assert_eq!(
        app.get_replica(&id).await["last_error"]["code"],
        "PHALA-TIMEOUT"
    );
    app.clock.advance(chrono::Duration::minutes(1));
    app.drain().await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "preparing");
    assert_eq!(request["attempts"], 2);
    assert_eq!(request["last_error"]["code"], "ERR-05-002");
}

#[tokio::test]
async fn attempts_run_out_and_the_request_fails_keeping_the_last_error() {
    let app = spawn_app().await; // max_attempts = 3
    mount_onchain_source(&app.phala, &[]).await;
    // The nodes an "Auto" order may land on.
    mount_nodes(&app.phala, &[(1, "prod-1"), (2, "prod-2"), (3, "prod-3")]).await;
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/replicas"))))
        .respond_with(ResponseTemplate::new(500).set_body_json(json!({"detail": "boom"})))
        .mount(&app.phala)
        .await;
    let id = app.queue(&json!({"source": ONCHAIN_NAME})).await.remove(0);
    app.drain_all(10).await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "failed");
    assert_eq!(request["last_error"]["code"], "PHALA-HTTP-500");
    assert!(
        request["last_error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("gave up after 3 attempts")
    );
    assert!(
        request["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("boom")
    );
    assert_eq!(
        app.phala_requests("POST", &api(&format!("/cvms/{ONCHAIN_VM}/replicas")))
            .await
            .len(),
        3
    );
}

#[tokio::test]
async fn every_documented_phala_error_fails_the_request_with_a_message_and_suggestion() {
    let app = spawn_app().await;
    let cases = [
        ("ERR-02-003", 400, "vCPUs"),
        ("ERR-02-004", 400, "memory"),
        ("ERR-02-005", 400, "CVM slots"),
        ("ERR-03-006", 400, "image"),
        ("ERR-03-008", 400, "undocumented"),
        ("ERR-03-009", 400, "undocumented"),
        ("ERR-04-001", 402, "balance"),
        ("ERR-05-001", 403, "usage limit"),
    ];
    for (index, (code, status, meaning)) in cases.into_iter().enumerate() {
        app.phala.reset().await;
        mount_onchain_source(&app.phala, &[]).await;
        // The nodes an "Auto" order may land on.
        mount_nodes(&app.phala, &[(1, "prod-1"), (2, "prod-2"), (3, "prod-3")]).await;
        Mock::given(method("POST"))
            .and(path(api(&format!("/cvms/{ONCHAIN_VM}/replicas"))))
            .respond_with(ResponseTemplate::new(status).set_body_json(phala_error(
                code,
                "phala says no",
                index % 2 == 0,
            )))
            .mount(&app.phala)
            .await;
        let id = app.queue(&json!({"source": ONCHAIN_NAME})).await.remove(0);
        app.drain().await;
        let request = app.get_replica(&id).await;
        assert_eq!(request["status"], "failed", "{code}");
        let error = &request["last_error"];
        assert_eq!(error["code"], code);
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains(meaning) && message.contains("phala says no"),
            "{code}: {message}"
        );
        assert!(!error["suggestion"].as_str().unwrap().is_empty(), "{code}");
        assert_eq!(
            app.phala_requests("POST", &api(&format!("/cvms/{ONCHAIN_VM}/replicas")))
                .await
                .len(),
            1,
            "{code}: not retried"
        );
    }
}

#[tokio::test]
async fn an_expired_token_at_commit_is_prepared_again_then_committed() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    // The nodes an "Auto" order may land on.
    mount_nodes(&app.phala, &[(1, "prod-1"), (2, "prod-2"), (3, "prod-3")]).await;
    mount_prepare(
        &app.phala,
        ONCHAIN_VM,
        prepared_body("old-token", 1, true, true, true),
    )
    .await;
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/commit-replica"))))
        .respond_with(ResponseTemplate::new(466).set_body_json(phala_error(
            "ERR-01-006",
            "token superseded",
            true,
        )))
        .up_to_n_times(1)
        .mount(&app.phala)
        .await;
    let id = app.queue(&json!({"source": ONCHAIN_NAME})).await.remove(0);
    app.steps(3).await; // queued → preparing → committing → (466) preparing
    assert_eq!(app.status_of(&id).await, "preparing");

    app.phala.reset().await;
    mount_onchain_source(&app.phala, &[]).await;
    mount_prepare(
        &app.phala,
        ONCHAIN_VM,
        prepared_body("new-token", 1, true, true, true),
    )
    .await;
    mount_commit_ok(&app.phala, ONCHAIN_VM).await;
    app.drain().await;
    assert_eq!(app.status_of(&id).await, "provisioning");
    let commits = app
        .phala_requests("POST", &api(&format!("/cvms/{ONCHAIN_VM}/commit-replica")))
        .await;
    assert_eq!(commits.len(), 1);
    assert_eq!(
        commits[0].body_json::<Value>().unwrap()["token"],
        "new-token"
    );
}

#[tokio::test]
async fn a_failed_transaction_verification_is_retried_with_already_registered() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    // The nodes an "Auto" order may land on.
    mount_nodes(&app.phala, &[(1, "prod-1"), (2, "prod-2"), (3, "prod-3")]).await;
    mount_prepare(
        &app.phala,
        ONCHAIN_VM,
        prepared_body("tok", 1, true, true, true),
    )
    .await;
    let id = app.queue(&json!({"source": ONCHAIN_NAME})).await.remove(0);
    app.steps(2).await;
    assert_eq!(app.status_of(&id).await, "committing");
    // The watch-and-commit flow stores the Safe execution's hash for the commit.
    sqlx::query("UPDATE replica_requests SET commit_tx_hash = '0xfeed' WHERE id = $1::uuid")
        .bind(&id)
        .execute(&app.db)
        .await
        .unwrap();
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/commit-replica"))))
        .respond_with(ResponseTemplate::new(467).set_body_json(phala_error(
            "ERR-01-007",
            "cannot verify tx",
            false,
        )))
        .up_to_n_times(1)
        .mount(&app.phala)
        .await;
    mount_commit_ok(&app.phala, ONCHAIN_VM).await;
    app.steps(2).await;
    assert_eq!(app.status_of(&id).await, "provisioning");
    let commits = app
        .phala_requests("POST", &api(&format!("/cvms/{ONCHAIN_VM}/commit-replica")))
        .await;
    let sent: Vec<Value> = commits
        .iter()
        .map(|c| c.body_json::<Value>().unwrap()["transaction_hash"].clone())
        .collect();
    assert_eq!(sent, [json!("0xfeed"), json!("already-registered")]);
}

#[tokio::test]
async fn a_hash_not_allowed_at_commit_fails_with_advice() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    // The nodes an "Auto" order may land on.
    mount_nodes(&app.phala, &[(1, "prod-1"), (2, "prod-2"), (3, "prod-3")]).await;
    mount_prepare(
        &app.phala,
        ONCHAIN_VM,
        prepared_body("tok", 1, true, true, true),
    )
    .await;
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/commit-replica"))))
        .respond_with(ResponseTemplate::new(468).set_body_json(phala_error(
            "ERR-01-008",
            "hash not allowed",
            true,
        )))
        .mount(&app.phala)
        .await;
    let id = app.queue(&json!({"source": ONCHAIN_NAME})).await.remove(0);
    app.drain().await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "failed");
    assert_eq!(request["last_error"]["code"], "ERR-01-008");
    assert!(
        request["last_error"]["suggestion"]
            .as_str()
            .unwrap()
            .contains("addComposeHash")
    );
}

#[tokio::test]
async fn a_prepare_answer_with_a_malformed_compose_hash_fails_the_request() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    // The nodes an "Auto" order may land on.
    mount_nodes(&app.phala, &[(1, "prod-1"), (2, "prod-2"), (3, "prod-3")]).await;
    let mut body = prepared_body("tok", 1, false, false, true);
    body["detail"]["details"][0]["value"] = json!("abcd");
    mount_prepare(&app.phala, ONCHAIN_VM, body).await;
    let id = app.queue(&json!({"source": ONCHAIN_NAME})).await.remove(0);
    app.drain().await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "failed");
    assert_eq!(request["last_error"]["code"], "PHALA-INVALID-RESPONSE");
    assert!(
        request["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("compose_hash")
    );
    assert_eq!(commit_token_in_db(&app, &id).await, None);
}

#[tokio::test]
async fn prepares_of_one_source_never_overlap_and_waiting_spends_no_attempt() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    // The nodes an "Auto" order may land on.
    mount_nodes(&app.phala, &[(1, "prod-1"), (2, "prod-2"), (3, "prod-3")]).await;
    mount_prepare(
        &app.phala,
        ONCHAIN_VM,
        prepared_body("t", 1, false, false, true),
    )
    .await;
    let id = app.queue(&json!({"source": ONCHAIN_NAME})).await.remove(0);
    let sibling = app.queue(&json!({"source": ONCHAIN_NAME})).await.remove(0);
    app.steps(2).await; // both queued → preparing
    // The sibling is mid-prepare on the same source: it holds the lock.
    let sibling_id: uuid::Uuid = sibling.parse().unwrap();
    assert!(
        app.store
            .try_lock_source(ONCHAIN_VM, sibling_id)
            .await
            .unwrap()
    );
    let mine: uuid::Uuid = id.parse().unwrap();
    assert!(
        !app.store.try_lock_source(ONCHAIN_VM, mine).await.unwrap(),
        "a lock whose holder is preparing is not taken over"
    );
    // Make the sibling's step not due, so the next step is ours.
    app.clock.advance(chrono::Duration::milliseconds(1));
    sqlx::query(
        "UPDATE replica_requests SET next_attempt_at = now() + interval '1 hour' WHERE id = $1",
    )
    .bind(sibling_id)
    .execute(&app.db)
    .await
    .unwrap();
    app.steps(1).await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "preparing");
    assert_eq!(request["attempts"], 0);
    assert!(
        app.phala_requests("POST", &api(&format!("/cvms/{ONCHAIN_VM}/replicas")))
            .await
            .is_empty()
    );

    // Cancelling the sibling releases its lock in the same transaction.
    assert_eq!(app.cancel(&sibling).await.status().as_u16(), 200);
    app.clock.advance(chrono::Duration::seconds(3));
    app.drain().await;
    assert_eq!(app.status_of(&id).await, "awaiting_proposal");
}

#[tokio::test]
async fn a_worker_whose_lease_expired_cannot_write() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    // The nodes an "Auto" order may land on.
    mount_nodes(&app.phala, &[(1, "prod-1"), (2, "prod-2"), (3, "prod-3")]).await;
    let id = app.queue(&json!({"source": ONCHAIN_NAME})).await.remove(0);
    let lease = Duration::from_secs(60);
    let first = app
        .store
        .claim_due(app.clock.now(), lease, Lane::All)
        .await
        .unwrap()
        .expect("due");
    assert!(
        app.store
            .claim_due(app.clock.now(), lease, Lane::All)
            .await
            .unwrap()
            .is_none(),
        "held rows are skipped"
    );
    // The process clock does not end a lease: the database's does.
    app.clock.advance(chrono::Duration::seconds(61));
    assert!(
        app.store
            .claim_due(app.clock.now(), lease, Lane::All)
            .await
            .unwrap()
            .is_none(),
        "a lease runs on the database clock"
    );
    expire_leases(&app).await;
    let second = app
        .store
        .claim_due(app.clock.now(), lease, Lane::All)
        .await
        .unwrap()
        .expect("expired lease is taken over");
    assert_eq!(second.request.id, first.request.id);

    let stale = app
        .store
        .advance(
            &first.lease,
            app.clock.now(),
            approval_bridge::domain::Status::Queued,
            approval_bridge::domain::Event::StartPrepare,
            &approval_bridge::domain::Actor::Worker,
            None,
            Default::default(),
        )
        .await;
    assert!(
        matches!(stale, Err(approval_bridge::store::StoreError::LeaseLost(_))),
        "{stale:?}"
    );
    let snooze = app
        .store
        .snooze(&first.lease, app.clock.now(), app.clock.now())
        .await;
    assert!(matches!(
        snooze,
        Err(approval_bridge::store::StoreError::LeaseLost(_))
    ));
    assert!(
        !app.store.renew_lease(&first.lease, lease).await.unwrap(),
        "a lost lease cannot be renewed"
    );
    assert!(app.store.renew_lease(&second.lease, lease).await.unwrap());

    let events = app.get_replica(&id).await["events"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(events, 1, "the stale worker wrote nothing");
}

/// Ends every lease now, as if their workers had died long ago.
async fn expire_leases(app: &TestApp) {
    sqlx::query("UPDATE replica_requests SET lease_expires_at = now() - interval '1 second' WHERE lease_id IS NOT NULL")
        .execute(&app.db)
        .await
        .unwrap();
}

/// Two worker processes (separate pools) race over one database.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_racing_never_run_the_same_step_twice() {
    let app = spawn_app().await;
    const SOURCES: usize = 12;
    // The node an "Auto" order's prepare lands on must be listed.
    mount_nodes(&app.phala, &[(1, "prod-1")]).await;
    let mut ids = Vec::new();
    for n in 0..SOURCES {
        let vm = format!("{:032x}", n + 1);
        let mut cvm = onchain_cvm(&[]);
        cvm["vm_uuid"] = json!(vm);
        cvm["name"] = json!(format!("app-{n}"));
        Mock::given(method("GET"))
            .and(path(api(&format!("/cvms/app-{n}"))))
            .respond_with(ResponseTemplate::new(200).set_body_json(cvm))
            .mount(&app.phala)
            .await;
        Mock::given(method("POST"))
            .and(path(api(&format!("/cvms/{vm}/replicas"))))
            .respond_with(
                ResponseTemplate::new(465)
                    .set_body_json(prepared_body(&format!("tok-{n}"), 1, false, false, true))
                    .set_delay(Duration::from_millis(50)),
            )
            .mount(&app.phala)
            .await;
        ids.extend(app.queue(&json!({"source": format!("app-{n}")})).await);
    }

    let worker = |clock: Clock| {
        let database_url = app.database_url.clone();
        let phala_url = format!("{}/api/v1", app.phala.uri());
        async move {
            let settings = test_settings(&database_url, &phala_url);
            let pool = approval_bridge::store::connect(&settings.database)
                .await
                .unwrap();
            Worker::new(
                Store::new(pool),
                PhalaClient::new(&settings.phala).unwrap(),
                clock,
                WorkerSettings::default(),
            )
        }
    };
    let a = worker(app.clock.clone()).await;
    let b = worker(app.clock.clone()).await;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let run = |w: Worker, barrier: std::sync::Arc<tokio::sync::Barrier>| async move {
        barrier.wait().await;
        w.drain().await.unwrap()
    };
    let (steps_a, steps_b) = tokio::join!(
        tokio::spawn(run(a, barrier.clone())),
        tokio::spawn(run(b, barrier))
    );
    let (steps_a, steps_b) = (steps_a.unwrap(), steps_b.unwrap());
    assert_eq!(
        steps_a + steps_b,
        2 * SOURCES,
        "each request: start prepare, then prepare"
    );
    assert!(
        steps_a > 0 && steps_b > 0,
        "both workers took part ({steps_a} / {steps_b})"
    );

    let prepares = app
        .phala
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.method.as_str() == "POST")
        .count();
    assert_eq!(prepares, SOURCES, "exactly one prepare per request");
    for id in ids {
        let request = app.get_replica(&id).await;
        assert_eq!(request["status"], "awaiting_proposal");
        let transitions = request["events"].as_array().unwrap().len();
        assert_eq!(
            transitions, 3,
            "queued, preparing, awaiting_proposal once each"
        );
    }
}

#[tokio::test]
async fn a_notification_wakes_a_sleeping_worker() {
    // Polling once an hour: only NOTIFY can explain a prompt pick-up.
    let app = spawn_app_with(|s| {
        s.worker.workers = 1;
        s.worker.poll_interval_secs = 3600;
    })
    .await;
    mount_onchain_source(&app.phala, &[]).await;
    // The nodes an "Auto" order may land on.
    mount_nodes(&app.phala, &[(1, "prod-1"), (2, "prod-2"), (3, "prod-3")]).await;
    mount_prepare(
        &app.phala,
        ONCHAIN_VM,
        prepared_body("t", 1, false, false, true),
    )
    .await;
    // The worker has found nothing to do and waits, listening.
    until_workers_idle_and_listening(&app.database_url).await;
    let id = app.queue(&json!({"source": ONCHAIN_NAME})).await.remove(0);
    for _ in 0..100 {
        if app.status_of(&id).await == "awaiting_proposal" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the worker did not wake up; status {}",
        app.status_of(&id).await
    );
}

#[tokio::test]
async fn the_commit_lane_commits_at_once_behind_a_backlog_of_overdue_requests() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    mount_nodes(&app.phala, &[(3, "prod-3")]).await;
    mount_prepare(
        &app.phala,
        ONCHAIN_VM,
        prepared_body("tok-1", 3, true, true, true),
    )
    .await;
    Mock::given(method("GET"))
        .and(path(api(&format!("/apps/{}/cvms", app_id()))))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
        .mount(&app.phala)
        .await;
    mount_commit_ok(&app.phala, ONCHAIN_VM).await;
    let id = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": "prod-3"}))
        .await
        .remove(0);
    app.steps(2).await;
    assert_eq!(app.status_of(&id).await, "committing");
    // A backlog queued after it, but overdue long before it.
    let backlog = app
        .queue(&json!({"source": ONCHAIN_NAME, "count": 5}))
        .await;
    sqlx::query(
        "UPDATE replica_requests SET next_attempt_at = next_attempt_at - interval '1 hour'
         WHERE status = 'queued'",
    )
    .execute(&app.db)
    .await
    .unwrap();

    // Any worker takes the most overdue request first: the backlog's.
    let lease = Duration::from_secs(60);
    let first = app
        .store
        .claim_due(app.clock.now(), lease, Lane::All)
        .await
        .unwrap()
        .expect("due");
    assert_ne!(first.request.id.to_string(), id);
    app.store.release_lease(&first.lease).await.unwrap();

    // The commit lane alone, with no other worker: the commit goes out at
    // once and the backlog is left to the others.
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = app.worker.clone();
    let token = stop.clone();
    let lanes = tokio::spawn(async move { worker.run(0, token).await.unwrap() });
    let mut status = String::new();
    for _ in 0..100 {
        status = app.status_of(&id).await;
        if status == "provisioning" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    lanes.await.unwrap();
    assert_eq!(status, "provisioning", "the commit lane committed");
    for queued in &backlog {
        assert_eq!(app.status_of(queued).await, "queued");
    }
    let commits = app
        .phala_requests("POST", &api(&format!("/cvms/{ONCHAIN_VM}/commit-replica")))
        .await;
    assert_eq!(commits.len(), 1);
}
