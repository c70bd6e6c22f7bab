//! Secrets never reach a log line, the database or an API answer: the real
//! `serve` process, logging at TRACE, with keyed RPC, Safe service and Phala
//! URLs, a proposer key, env overrides and an RPC outage.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::response::IntoResponse;
use reqwest::Url;
use serde_json::{Value, json};
use sqlx::PgPool;
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{API_TOKEN, PHALA_API_KEY, WEBHOOK_SECRET, fresh_database};
use crate::kms_mock::{MockKms, compressed};
use crate::phala_mock::*;
use crate::safe_world::{SafeWorld, hex40};
use crate::wait;

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

/// A JSON-RPC proxy that can go away: then connections are refused, and
/// the bridge's chain client fails with an error that quotes its URL.
struct Outage {
    url: Url,
    server: tokio::task::JoinHandle<()>,
}

impl Outage {
    async fn start(upstream: Url) -> Outage {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let app = axum::Router::new()
            .fallback(forward)
            .with_state((reqwest::Client::new(), upstream));
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Outage { url, server }
    }

    fn begin(&self) {
        self.server.abort();
    }
}

/// Forwards a call and closes the connection, so none outlives an outage.
async fn forward(
    State((http, upstream)): State<(reqwest::Client, Url)>,
    body: Bytes,
) -> axum::response::Response {
    let answer = http
        .post(upstream)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let bytes = answer.bytes().await.unwrap();
    (
        [
            (axum::http::header::CONTENT_TYPE, "application/json"),
            (axum::http::header::CONNECTION, "close"),
        ],
        bytes,
    )
        .into_response()
}

/// Phala for a source on `dstack_app`: nodes 1–3, a prepare per node whose
/// commit token is a secret, and an env key signed by `kms`.
async fn mount_phala(phala: &MockServer, dstack_app: &str, kms: &MockKms) {
    let mut cvm = onchain_cvm_on(dstack_app, 31337, ONCHAIN_VM, ONCHAIN_NAME);
    cvm["compose_file"] = json!({"allowed_envs": ["DB_PASSWORD"]});
    for id in [ONCHAIN_VM, ONCHAIN_NAME] {
        Mock::given(method("GET"))
            .and(path(api(&format!("/cvms/{id}"))))
            .and(header("X-API-Key", PHALA_API_KEY))
            .respond_with(ResponseTemplate::new(200).set_body_json(cvm.clone()))
            .mount(phala)
            .await;
    }
    mount_nodes(phala, &[(1, "node-a"), (2, "node-b"), (3, "node-c")]).await;
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
            .mount(phala)
            .await;
    }
    kms.mount_env_key_for(phala, dstack_app, &kms.signer).await;
}

/// Every text column of every table, but the commit token (a stored bearer
/// secret by design) and the encrypted env.
async fn database_text(db: &PgPool) -> String {
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
        .fetch_all(db)
        .await
        .unwrap();
        text.push_str(&rows.join("\n"));
    }
    text
}

/// `approval-bridge serve`, its stdout and stderr in a file; killed on drop.
struct Serve {
    child: std::process::Child,
    log: std::path::PathBuf,
    url: String,
}

impl Serve {
    async fn start(env: &[(&str, String)]) -> Serve {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("secrets-{}.log", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).unwrap();
        let mut command = crate::command::bridge();
        command
            .arg("serve")
            .env("APPROVAL_BRIDGE_LISTEN", format!("127.0.0.1:{port}"))
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        for (name, value) in env {
            command.env(name, value);
        }
        let mut serve = Serve {
            child: command.spawn().unwrap(),
            log,
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let health = http.get(format!("{}/health", serve.url)).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return serve;
            }
            if let Some(status) = serve.child.try_wait().unwrap() {
                panic!("serve exited with {status}: {}", serve.log());
            }
            assert!(
                Instant::now() < deadline,
                "serve did not start: {}",
                serve.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET {path}` of the API as the CI bot.
    async fn get(&self, http: &reqwest::Client, path: &str) -> reqwest::Response {
        http.get(format!("{}{path}", self.url))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap()
    }

    /// Queues `body` as the CI bot; the first request's id.
    async fn queue(&self, http: &reqwest::Client, body: Value) -> String {
        let queued: Value = http
            .post(format!("{}/api/v1/replicas", self.url))
            .bearer_auth(API_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        queued["replicas"][0]["id"]
            .as_str()
            .expect("queued")
            .to_owned()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls a request until `done` says so (bounded: fails, never hangs).
async fn wait_for(
    http: &reqwest::Client,
    serve: &Serve,
    id: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let read = || async {
        let path = format!("/api/v1/replicas/{id}");
        serve.get(http, &path).await.json().await.unwrap()
    };
    let what = wait::Later(|| format!("request {id} to get there\n{}", serve.log()));
    wait::until(what, read, done).await
}

/// The whole flow in a real `serve` at TRACE level, every library included:
/// intake with env, the webhook, a Safe proposal signed with the proposer
/// key, then an RPC outage whose errors quote the RPC URL. Then a search of
/// the log, the database and the API answers for each secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log_the_database_or_the_api() {
    let world = SafeWorld::start().await;
    let kms = MockKms::start(None).await;
    let dstack_kms = world
        .chain
        .deploy_dstack_kms(world.chain.address(4), &compressed(&kms.signer))
        .await
        .unwrap();
    let phala = MockServer::start().await;
    mount_phala(&phala, &hex40(world.app), &kms).await;
    let rpc = Outage::start(world.chain.rpc_url()).await;
    let proposer_key = hex::encode(world.chain.private_key(0));
    let database_url = fresh_database().await;
    let phala_url: Url = format!("{}/api/v1", phala.uri()).parse().unwrap();
    let serve = Serve::start(&[
        ("DATABASE_URL", database_url.clone()),
        ("RUST_LOG", "trace".into()),
        (
            "APPROVAL_BRIDGE_PHALA_API_URL",
            keyed(&phala_url, PHALA_URL_KEY).to_string(),
        ),
        ("APPROVAL_BRIDGE_PHALA_API_KEY", PHALA_API_KEY.into()),
        ("APPROVAL_BRIDGE_API_TOKENS", format!("ci-bot={API_TOKEN}")),
        ("APPROVAL_BRIDGE_SCOPES", "api:ci-bot=*,ci:github=*".into()),
        (
            "APPROVAL_BRIDGE_SERVER_SECRET",
            crate::helpers::SERVER_SECRET.into(),
        ),
        (
            "APPROVAL_BRIDGE_WEBHOOK_SECRETS",
            format!("github={WEBHOOK_SECRET}"),
        ),
        ("APPROVAL_BRIDGE_WORKERS", "1".into()),
        ("APPROVAL_BRIDGE_POLL_INTERVAL_SECS", "1".into()),
        ("APPROVAL_BRIDGE_BACKOFF_BASE_SECS", "1".into()),
        ("APPROVAL_BRIDGE_BATCH_WINDOW_SECS", "0".into()),
        ("APPROVAL_BRIDGE_CHAIN_POLL_SECS", "1".into()),
        (
            "APPROVAL_BRIDGE_RPC_URLS",
            format!("31337={}", keyed(&rpc.url, RPC_KEY)),
        ),
        ("APPROVAL_BRIDGE_SAFES", format!("31337:{}", world.safe)),
        ("APPROVAL_BRIDGE_PROPOSER_KEY", format!("0x{proposer_key}")),
        (
            "APPROVAL_BRIDGE_SAFE_SERVICE_URLS",
            format!("31337={}", keyed(&world.service_url, SAFE_SERVICE_KEY)),
        ),
        (
            "APPROVAL_BRIDGE_KMS_CONTRACTS",
            format!("31337={dstack_kms}"),
        ),
    ])
    .await;
    let http = reqwest::Client::new();

    let id = serve
        .queue(
            &http,
            json!({"source": ONCHAIN_NAME, "node": 2, "env": {"DB_PASSWORD": ENV_VALUE}}),
        )
        .await;
    let body = r#"{"source": "web-prod", "node": 1}"#;
    let now = chrono::Utc::now().timestamp();
    let hooked = http
        .post(format!("{}/webhooks/ci", serve.url))
        .header("X-Bridge-Timestamp", now.to_string())
        .header(
            "X-Bridge-Signature",
            approval_bridge::web::webhook::sign(WEBHOOK_SECRET, now, None, body.as_bytes()),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(hooked.status(), 202);
    let proposed = wait_for(&http, &serve, &id, |r| r["status"] == "awaiting_approval").await;

    // The RPC goes away: what the bridge stores and logs now quotes its URL.
    rpc.begin();
    let failing = serve
        .queue(&http, json!({"source": ONCHAIN_NAME, "node": 3}))
        .await;
    let outage = wait_for(&http, &serve, &failing, |r| r["last_error"].is_object()).await;

    let mut answers = vec![proposed.to_string(), outage.to_string()];
    answers.push(
        serve
            .get(&http, "/api/v1/replicas")
            .await
            .text()
            .await
            .unwrap(),
    );
    let stored = database_text(&PgPool::connect(&database_url).await.unwrap()).await;
    let log = serve.log();
    assert!(log.contains("replicas queued"), "the capture works: {log}");
    assert!(
        log.contains("[redacted]"),
        "the outage quoted the RPC URL, redacted"
    );

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
        crate::helpers::SERVER_SECRET,
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
