//! Secrets never reach a log line or an API response.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::json;
use tracing_subscriber::fmt::MakeWriter;

use crate::helpers::{API_TOKEN, PHALA_API_KEY, WEBHOOK_SECRET, spawn_app};
use crate::phala_mock::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The whole flow at TRACE level, every library included, then a search of
/// the log for each secret.
#[tokio::test]
async fn no_secret_reaches_the_log_or_the_api() {
    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(log.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let app = spawn_app().await;
    let kms_secret = x25519_dalek::StaticSecret::random_from_rng(rand::rngs::OsRng);
    let kms_public = hex::encode(x25519_dalek::PublicKey::from(&kms_secret).as_bytes());
    mount_onchain_source(&app.phala, &["DB_PASSWORD"]).await;
    wiremock::Mock::given(wiremock::matchers::path(api(&format!(
        "/kms/base/pubkey/{}",
        app_id()
    ))))
    .respond_with(
        wiremock::ResponseTemplate::new(200).set_body_json(json!({"public_key": kms_public})),
    )
    .mount(&app.phala)
    .await;
    mount_prepare(
        &app.phala,
        ONCHAIN_VM,
        prepared_body("commit-token-do-not-log", 1, true, true, true),
    )
    .await;
    mount_commit_ok(&app.phala, ONCHAIN_VM).await;
    mount_replica_status(&app.phala, "running").await;

    let env = json!({"DB_PASSWORD": "env-value-do-not-log"});
    let ids = app
        .queue(&json!({"source": ONCHAIN_NAME, "env": env}))
        .await;
    let now = app.clock.now().timestamp();
    let hooked = app
        .post_webhook(r#"{"source": "web-prod"}"#, WEBHOOK_SECRET, now, None)
        .await;
    assert_eq!(hooked.status(), 202);
    app.drain_all(5).await;
    let shown = app.get_replica(&ids[0]).await;
    assert_eq!(shown["status"], "done");
    let listed = app.list_replicas("").await.text().await.unwrap();

    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("replicas queued"), "the capture works");
    for secret in [
        PHALA_API_KEY,
        API_TOKEN,
        WEBHOOK_SECRET,
        "commit-token-do-not-log",
        "env-value-do-not-log",
    ] {
        assert!(!log.contains(secret), "`{secret}` leaked into the log");
        assert!(
            !shown.to_string().contains(secret),
            "`{secret}` leaked into the API"
        );
        assert!(!listed.contains(secret), "`{secret}` leaked into the list");
    }
}
