//! Secrets never reach a log line or an API response.

use std::io::Write;
use std::sync::{Arc, Mutex};

use approval_bridge::config::{KmsContracts, RpcUrls};
use approval_bridge::sandbox::chain::LocalChain;
use approval_bridge::telemetry::Redacting;
use reqwest::Url;
use serde_json::json;
use tracing_subscriber::fmt::MakeWriter;
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{API_TOKEN, PHALA_API_KEY, TestApp, WEBHOOK_SECRET, spawn_app_with};
use crate::kms_mock::{MockKms, compressed};
use crate::phala_mock::*;
use crate::safe_flow::{SafeWorld, hex40};

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

const RPC_KEY: &str = "rpc-key-do-not-log-7311";
const SAFE_SERVICE_KEY: &str = "safe-url-key-do-not-log-7312";
const PHALA_URL_KEY: &str = "phala-url-key-do-not-log-7313";
const COMMIT_TOKEN: &str = "commit-token-do-not-log";
const ENV_VALUE: &str = "env-value-do-not-log";

/// `url` with `?apikey=key`, as hosted RPC and API providers hand them out.
fn keyed(url: &Url, key: &str) -> Url {
    let mut url = url.clone();
    url.query_pairs_mut().append_pair("apikey", key);
    url
}

/// Phala for a source on `dstack_app`: nodes 1–3, a prepare per node whose
/// commit token is a secret, an env key signed by `kms`, and the commit.
async fn mount_phala(app: &TestApp, dstack_app: &str, kms: &MockKms) {
    let mut cvm = onchain_cvm_on(dstack_app, 31337, ONCHAIN_VM, ONCHAIN_NAME);
    cvm["compose_file"] = json!({"allowed_envs": ["DB_PASSWORD"]});
    for id in [ONCHAIN_VM, ONCHAIN_NAME] {
        Mock::given(method("GET"))
            .and(path(api(&format!("/cvms/{id}"))))
            .and(header("X-API-Key", PHALA_API_KEY))
            .respond_with(ResponseTemplate::new(200).set_body_json(cvm.clone()))
            .mount(&app.phala)
            .await;
    }
    mount_nodes(&app.phala, &[(1, "node-a"), (2, "node-b"), (3, "node-c")]).await;
    for node in 1..=3u32 {
        Mock::given(method("POST"))
            .and(path(api(&format!("/cvms/{ONCHAIN_VM}/replicas"))))
            .and(body_partial_json(json!({"node_id": node})))
            .respond_with(ResponseTemplate::new(465).set_body_json(prepared_body_for(
                dstack_app,
                31337,
                COMMIT_TOKEN,
                node,
                false,
                false,
                true,
            )))
            .mount(&app.phala)
            .await;
    }
    kms.mount_env_key_for(&app.phala, dstack_app, &kms.signer)
        .await;
}

/// Every text column of every table, but the commit token (a stored bearer
/// secret by design) and the encrypted env.
async fn database_text(app: &TestApp) -> String {
    let mut text = String::new();
    for table in [
        "replica_requests",
        "request_events",
        "proposals",
        "proposal_calls",
        "idempotency_keys",
    ] {
        let rows: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT (to_jsonb(t) - 'commit_token' - 'encrypted_env')::text FROM {table} t"
        ))
        .fetch_all(&app.db)
        .await
        .unwrap();
        text.push_str(&rows.join("\n"));
    }
    text
}

/// The whole flow at TRACE level, every library included: intake with env,
/// the webhook, a Safe proposal signed with the proposer key, then an RPC
/// outage whose errors quote the RPC URL. Then a search of the log, the
/// database and the API answers for each secret.
#[tokio::test]
async fn no_secret_reaches_the_log_the_database_or_the_api() {
    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(Redacting(log.clone()))
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let world = SafeWorld::start().await;
    let kms = MockKms::start(None).await;
    let dstack_kms = world
        .chain
        .deploy_dstack_kms(world.chain.address(4), &compressed(&kms.signer))
        .await
        .unwrap();
    let proposer_key = hex::encode(world.chain.private_key(0));
    let rpc = keyed(&world.chain.rpc_url(), RPC_KEY);
    let service = keyed(&world.service_url, SAFE_SERVICE_KEY);
    let configure_safe = world.configure(rpc.clone());
    let app = spawn_app_with(move |s| {
        configure_safe(s);
        s.safe.safe_service_urls = RpcUrls(vec![(31337, service)]);
        s.trust.kms_contracts = KmsContracts(vec![(31337, dstack_kms)]);
        let phala = s.phala.phala_api_url.clone();
        s.phala.phala_api_url = keyed(&phala, PHALA_URL_KEY);
    })
    .await;
    let dstack_app = hex40(world.app);
    mount_phala(&app, &dstack_app, &kms).await;

    let ids = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": 2, "env": {"DB_PASSWORD": ENV_VALUE}}))
        .await;
    let now = app.clock.now().timestamp();
    let hooked = app
        .post_webhook(
            r#"{"source": "web-prod", "node": 1}"#,
            WEBHOOK_SECRET,
            now,
            None,
        )
        .await;
    assert_eq!(hooked.status(), 202);
    app.drain_all(10).await;
    let proposed = app.get_replica(&ids[0]).await;
    assert_eq!(proposed["status"], "awaiting_approval", "{proposed}");

    // The chain goes away: what the bridge stores and logs now quotes the RPC URL.
    let SafeWorld { chain, .. } = world;
    let chain: LocalChain = chain;
    drop(chain);
    let failing = app.queue(&json!({"source": ONCHAIN_NAME, "node": 3})).await;
    app.drain().await;
    let outage = app.get_replica(&failing[0]).await;
    let shown_outage = outage.to_string();
    assert!(
        outage["last_error"].is_object() || shown_outage.contains("[redacted]"),
        "the outage was recorded: {outage}"
    );

    let mut answers = vec![proposed.to_string(), shown_outage];
    for id in ids.iter().chain(&failing) {
        answers.push(app.get_replica(id).await.to_string());
    }
    answers.push(app.list_replicas("").await.text().await.unwrap());
    let stored = database_text(&app).await;
    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("replicas queued"), "the capture works");

    for secret in [
        PHALA_API_KEY,
        API_TOKEN,
        WEBHOOK_SECRET,
        COMMIT_TOKEN,
        ENV_VALUE,
        &proposer_key,
        RPC_KEY,
        SAFE_SERVICE_KEY,
        PHALA_URL_KEY,
    ] {
        assert!(!log.contains(secret), "`{secret}` leaked into the log");
        assert!(
            !stored.contains(secret),
            "`{secret}` leaked into the database"
        );
        for answer in &answers {
            assert!(
                !answer.contains(secret),
                "`{secret}` leaked into the API: {answer}"
            );
        }
    }
}

/// `serve --help` shows which variables are set, never their values.
#[test]
fn help_hides_the_values_of_urls_and_secrets() {
    let values = [
        (
            "APPROVAL_BRIDGE_RPC_URLS",
            format!("8453=https://rpc.example/v2/{RPC_KEY}"),
        ),
        (
            "ETH_RPC_URL",
            format!("https://eth.example/?apikey={RPC_KEY}"),
        ),
        (
            "APPROVAL_BRIDGE_SAFE_SERVICE_URLS",
            format!("8453=https://safe.example/?apikey={SAFE_SERVICE_KEY}"),
        ),
        (
            "APPROVAL_BRIDGE_PHALA_API_URL",
            format!("https://phala.example/api/v1?apikey={PHALA_URL_KEY}"),
        ),
        ("APPROVAL_BRIDGE_PHALA_API_KEY", PHALA_API_KEY.to_owned()),
        (
            "APPROVAL_BRIDGE_PROPOSER_KEY",
            "0x".to_owned() + &"ab".repeat(32),
        ),
        (
            "DATABASE_URL",
            "postgres://u:db-password-do-not-log@127.0.0.1/x".to_owned(),
        ),
    ];
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_approval-bridge"));
    command.args(["serve", "--help"]);
    for (name, value) in &values {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    assert!(help.contains("APPROVAL_BRIDGE_RPC_URLS"), "{help}");
    for (name, value) in &values {
        assert!(
            !help.contains(value.as_str()),
            "{name}'s value is shown: {help}"
        );
    }
    for secret in [
        RPC_KEY,
        SAFE_SERVICE_KEY,
        PHALA_URL_KEY,
        "db-password-do-not-log",
        &"ab".repeat(32),
    ] {
        assert!(!help.contains(secret), "`{secret}` is shown: {help}");
    }
}

/// A start-up that fails on the chain prints one line, without the RPC key.
#[tokio::test]
async fn a_failed_start_up_names_no_url_key() {
    let database_url = crate::helpers::fresh_database().await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_approval-bridge"))
        .arg("serve")
        .env("DATABASE_URL", database_url)
        .env("APPROVAL_BRIDGE_LISTEN", "127.0.0.1:0")
        .env("APPROVAL_BRIDGE_PHALA_API_KEY", PHALA_API_KEY)
        .env(
            "APPROVAL_BRIDGE_RPC_URLS",
            format!("31337=http://127.0.0.1:9/?apikey={RPC_KEY}"),
        )
        .env(
            "APPROVAL_BRIDGE_SAFES",
            format!("31337:0x{}", "5a".repeat(20)),
        )
        .env(
            "APPROVAL_BRIDGE_PROPOSER_KEY",
            format!("0x{}", "ab".repeat(32)),
        )
        .env("APPROVAL_BRIDGE_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stderr.contains("127.0.0.1:9"),
        "the line says where: {stderr}"
    );
    for secret in [RPC_KEY, &"ab".repeat(32)] {
        assert!(!stderr.contains(secret), "{stderr}");
        assert!(!stdout.contains(secret), "{stdout}");
    }
}
