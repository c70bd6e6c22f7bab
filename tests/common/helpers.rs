//! `spawn_app()`: the real application on port 0 with its own fresh database
//! (a clone of the migrated template, see `template`), wiremock standing in
//! for Phala Cloud, and a manual clock.

use std::sync::Arc;
use std::time::Duration;

use approval_bridge::clock::Clock;
use approval_bridge::config::{
    DatabaseSettings, LogFormat, NotifySettings, PhalaSettings, RetentionSettings, SafeSettings,
    Scopes, ServerSettings, Settings, SourcePattern, TrustSettings, WebSettings, WorkerSettings,
    parse_named_secrets,
};
use approval_bridge::startup::Application;
use approval_bridge::store::{Lane, Store};
use approval_bridge::web::webhook;
use approval_bridge::worker::Worker;
use reqwest::Response;
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;
use wiremock::MockServer;

pub const API_TOKEN: &str = "test-api-token-1";
pub const WEBHOOK_SECRET: &str = "test-webhook-secret";
pub const PHALA_API_KEY: &str = "test-phala-api-key";
pub const SERVER_SECRET: &str = "test-server-secret-of-32-characters";

/// `*` for each of the given callers: a scope that allows everything.
pub fn every_source_for(callers: &[&str]) -> Scopes {
    Scopes(
        callers
            .iter()
            .map(|caller| (caller.to_string(), vec![SourcePattern::Any]))
            .collect(),
    )
}

pub struct TestApp {
    pub address: String,
    /// `APPROVAL_BRIDGE_OPS_LISTEN`'s address, when the test set it.
    pub ops_address: Option<String>,
    pub http: reqwest::Client,
    /// Shared, so that a restarted app can talk to the same Phala.
    pub phala: Arc<MockServer>,
    pub db: PgPool,
    pub database_url: String,
    pub store: Store,
    pub worker: Worker,
    pub clock: Clock,
}

pub fn base_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh, empty database for one test. (`spawn_app` starts on a clone of
/// the migrated template instead: see `template`.)
pub async fn fresh_database() -> String {
    let base = base_database_url();
    let name = format!("ab_test_{}", Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(&base)
        .await
        .expect("Postgres must run on TEST_DATABASE_URL (scripts/test starts it)");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let (prefix, _) = base.rsplit_once('/').expect("database URL has a path");
    format!("{prefix}/{name}")
}

/// A URL for a sandbox's own database: not created (the sandbox creates it),
/// named `…_sandbox` as the sandbox demands, and `ab_test_…` so that
/// `scripts/test` clears it after an interrupted run.
pub fn sandbox_database() -> String {
    let base = base_database_url();
    let (prefix, _) = base.rsplit_once('/').expect("database URL has a path");
    format!("{prefix}/ab_test_{}_sandbox", Uuid::new_v4().simple())
}

pub fn test_settings(database_url: &str, phala_url: &str) -> Settings {
    Settings {
        database: DatabaseSettings::new(database_url),
        listen: "127.0.0.1:0".parse().unwrap(),
        phala: PhalaSettings {
            phala_api_url: phala_url.parse().unwrap(),
            phala_api_key: PHALA_API_KEY.to_owned().into(),
            phala_api_version: "2026-01-21".into(),
            phala_timeout_secs: 2,
            lookup_cache_secs: 0,
        },
        api_tokens: parse_named_secrets(&format!("ci-bot={API_TOKEN}")).unwrap(),
        webhook_secrets: parse_named_secrets(&format!(
            "github={WEBHOOK_SECRET},gitlab=another-secret-123"
        ))
        .unwrap(),
        worker: WorkerSettings {
            workers: 0,
            max_attempts: 3,
            lease_secs: 60,
            ..WorkerSettings::default()
        },
        safe: SafeSettings {
            batch_window_secs: 0,
            safe_rate_limit: 50.0,
            ..SafeSettings::default()
        },
        trust: TrustSettings {
            scopes: every_source_for(&["api:ci-bot", "ci:github", "ci:gitlab"]),
            ..TrustSettings::default()
        },
        web: WebSettings::default(),
        notify: NotifySettings::default(),
        retention: RetentionSettings::default(),
        server: ServerSettings {
            server_secret: Some(SERVER_SECRET.to_owned().into()),
            // Every test client is 127.0.0.1 on a clock that stands still, so
            // the per-client rate limit is on only where a test says so.
            client_rate_per_minute: 0,
            ..ServerSettings::default()
        },
        log_format: LogFormat::Text,
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Spawns the app after `adjust` has changed the test settings. Workers do not
/// run by themselves unless `adjust` asks for them: tests drive them by hand.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let phala = Arc::new(MockServer::start().await);
    let database_url = super::template::migrated_database().await;
    spawn_app_on(database_url, phala, adjust).await
}

/// Spawns an app on an existing database and Phala mock: a restart.
pub async fn spawn_app_on(
    database_url: String,
    phala: Arc<MockServer>,
    adjust: impl FnOnce(&mut Settings),
) -> TestApp {
    spawn_app_with_clock(
        database_url,
        phala,
        Clock::manual(chrono::Utc::now()),
        adjust,
    )
    .await
}

/// [`spawn_app_on`] with a clock of the test's choice.
pub async fn spawn_app_with_clock(
    database_url: String,
    phala: Arc<MockServer>,
    clock: Clock,
    adjust: impl FnOnce(&mut Settings),
) -> TestApp {
    let mut settings = test_settings(&database_url, &format!("{}/api/v1", phala.uri()));
    adjust(&mut settings);
    let app = Application::build_with_clock(settings, clock.clone())
        .await
        .expect("build app");
    let address = format!("http://127.0.0.1:{}", app.port());
    let ops_address = app
        .ops_port()
        .map(|port| format!("http://127.0.0.1:{port}"));
    let worker = app.worker();
    let store = app.store();
    let db = store.pool().clone();
    tokio::spawn(app.run_until_stopped());
    TestApp {
        address,
        ops_address,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        phala,
        db,
        database_url,
        store,
        worker,
        clock,
    }
}

impl TestApp {
    pub async fn post_replicas(&self, body: &Value) -> Response {
        self.post_replicas_with(body.to_string(), None).await
    }

    pub async fn post_replicas_with(
        &self,
        body: impl Into<reqwest::Body>,
        idempotency_key: Option<&str>,
    ) -> Response {
        let mut request = self
            .http
            .post(format!("{}/api/v1/replicas", self.address))
            .bearer_auth(API_TOKEN)
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        request.send().await.unwrap()
    }

    /// Queues and returns the ids, asserting a 202.
    pub async fn queue(&self, body: &Value) -> Vec<String> {
        let response = self.post_replicas(body).await;
        let status = response.status();
        let json: Value = response.json().await.unwrap();
        assert_eq!(status, 202, "{json}");
        json["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    }

    pub async fn get_replica(&self, id: &str) -> Value {
        let response = self
            .http
            .get(format!("{}/api/v1/replicas/{id}", self.address))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    pub async fn status_of(&self, id: &str) -> String {
        self.get_replica(id).await["status"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Waits until every request in `ids` has `status` (the workers run by
    /// themselves); fails after `secs`, showing where each one stands.
    pub async fn wait_for_status(&self, ids: &[String], status: &str, secs: u64) {
        let pace = super::wait::Pace::every(Duration::from_millis(200), Duration::from_secs(secs));
        super::wait::until_paced(
            pace,
            format_args!("every request {status}"),
            || async {
                let mut statuses = Vec::new();
                for id in ids {
                    statuses.push(self.status_of(id).await);
                }
                statuses
            },
            |statuses| statuses.iter().all(|s| s == status),
        )
        .await;
    }

    pub async fn list_replicas(&self, query: &str) -> Response {
        self.http
            .get(format!("{}/api/v1/replicas{query}", self.address))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap()
    }

    pub async fn cancel(&self, id: &str) -> Response {
        self.http
            .post(format!("{}/api/v1/replicas/{id}/cancel", self.address))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap()
    }

    /// Posts to the CI webhook signed with `secret` at `timestamp`.
    pub async fn post_webhook(
        &self,
        body: &str,
        secret: &str,
        timestamp: i64,
        idempotency_key: Option<&str>,
    ) -> Response {
        let signature = webhook::sign(secret, timestamp, idempotency_key, body.as_bytes());
        self.post_webhook_raw(body, &timestamp.to_string(), &signature, idempotency_key)
            .await
    }

    pub async fn post_webhook_raw(
        &self,
        body: &str,
        timestamp: &str,
        signature: &str,
        key: Option<&str>,
    ) -> Response {
        let mut request = self
            .http
            .post(format!("{}/webhooks/ci", self.address))
            .header("X-Bridge-Timestamp", timestamp)
            .header("X-Bridge-Signature", signature)
            .body(body.to_owned());
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send().await.unwrap()
    }

    /// `GET /metrics`, as a scraper reads it.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.address))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn request_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM replica_requests")
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// Runs exactly `n` worker steps, each of which must find a due request.
    pub async fn steps(&self, n: usize) {
        for _ in 0..n {
            assert!(
                self.worker.run_once().await.expect("worker step"),
                "a step was due"
            );
        }
    }

    pub async fn drain(&self) -> usize {
        self.worker.drain().await.expect("worker step")
    }

    /// Drains, moving the clock past every backoff and snooze, until no
    /// workable request is left or `rounds` run out.
    pub async fn drain_all(&self, rounds: usize) {
        for _ in 0..rounds {
            self.drain().await;
            match self.store.next_due_at(Lane::All).await.unwrap() {
                Some(due) => {
                    let wait = due - self.clock.now();
                    if wait > chrono::Duration::zero() {
                        self.clock.advance(wait + chrono::Duration::milliseconds(1));
                    }
                }
                None => return,
            }
        }
    }

    /// Requests Phala received at `path` with `method`.
    pub async fn phala_requests(&self, method: &str, path: &str) -> Vec<wiremock::Request> {
        self.phala
            .received_requests()
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.method.as_str() == method && r.url.path() == path)
            .collect()
    }
}

/// Asserts the `{"error": {"code", "message"}}` shape and returns the code and message.
pub async fn error_of(response: Response, status: u16) -> (String, String) {
    assert_eq!(response.status().as_u16(), status);
    let json: Value = response.json().await.expect("a JSON error body");
    let code = json["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.code in {json}"))
        .to_owned();
    let message = json["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message in {json}"))
        .to_owned();
    (code, message)
}
