//! The `approval-bridge` binary: settings errors are one clear line.

use std::process::Command;

use crate::command::{bridge, one_line_error};
use crate::helpers::fresh_database;

#[test]
fn a_missing_setting_stops_start_up_naming_the_variable() {
    let line = one_line_error(bridge().arg("migrate").output().unwrap());
    assert_eq!(
        line,
        "approval-bridge: missing setting DATABASE_URL (--database-url)"
    );

    let line = one_line_error(
        bridge()
            .arg("serve")
            .env("DATABASE_URL", "postgres://localhost/x")
            .output()
            .unwrap(),
    );
    assert_eq!(
        line,
        "approval-bridge: missing setting APPROVAL_BRIDGE_PHALA_API_KEY (--phala-api-key)"
    );
}

#[test]
fn an_invalid_setting_names_the_variable_and_never_echoes_a_secret() {
    let line = one_line_error(
        bridge()
            .arg("serve")
            .env("DATABASE_URL", "mysql://root:hunter2@db/x")
            .env("APPROVAL_BRIDGE_PHALA_API_KEY", "k")
            .output()
            .unwrap(),
    );
    assert!(
        line.starts_with("approval-bridge: invalid setting DATABASE_URL (--database-url): "),
        "{line}"
    );
    assert!(!line.contains("hunter2"));

    let line = one_line_error(
        bridge()
            .arg("serve")
            .env("DATABASE_URL", "postgres://localhost/x")
            .env("APPROVAL_BRIDGE_PHALA_API_KEY", "k")
            .env("APPROVAL_BRIDGE_LISTEN", "everywhere")
            .output()
            .unwrap(),
    );
    assert!(
        line.starts_with("approval-bridge: invalid setting APPROVAL_BRIDGE_LISTEN (--listen): "),
        "{line}"
    );

    let line = one_line_error(
        bridge()
            .args([
                "serve",
                "--database-url",
                "postgres://localhost/x",
                "--phala-api-key",
                "k",
            ])
            .args(["--webhook-secrets", "github:no-equals-sign"])
            .output()
            .unwrap(),
    );
    assert!(
        line.contains("APPROVAL_BRIDGE_WEBHOOK_SECRETS (--webhook-secrets)"),
        "{line}"
    );
    assert!(!line.contains("no-equals-sign"));
}

#[tokio::test]
async fn migrate_applies_the_schema_and_is_repeatable() {
    let url = fresh_database().await;
    for _ in 0..2 {
        let output = bridge()
            .arg("migrate")
            .env("DATABASE_URL", &url)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            String::from_utf8(output.stdout).unwrap().trim(),
            "migrations applied"
        );
    }
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for table in [
        "idempotency_keys",
        "replica_requests",
        "request_events",
        "source_locks",
    ] {
        assert!(tables.iter().any(|t| t == table), "{table} in {tables:?}");
    }
}

#[test]
fn serve_refuses_an_unreachable_database_in_one_line() {
    let line = one_line_error(
        bridge()
            .arg("serve")
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
            .env("APPROVAL_BRIDGE_PHALA_API_KEY", "k")
            .output()
            .unwrap(),
    );
    assert!(line.contains("cannot connect to Postgres"), "{line}");
}

#[tokio::test]
async fn serve_refuses_a_port_in_use_in_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let url = fresh_database().await;
    let line = one_line_error(
        bridge()
            .arg("serve")
            .env("DATABASE_URL", &url)
            .env("APPROVAL_BRIDGE_PHALA_API_KEY", "k")
            .env("APPROVAL_BRIDGE_LISTEN", &address)
            .output()
            .unwrap(),
    );
    assert!(
        line.contains(&format!("cannot listen on {address}")),
        "{line}"
    );
}

/// SIGTERM while a step waits on a slow Phala call: `serve` stops claiming,
/// gives the step's lease back once the grace period is over, and exits 0.
#[tokio::test]
async fn sigterm_mid_step_exits_cleanly_and_gives_the_lease_back() {
    use crate::helpers::{API_TOKEN, PHALA_API_KEY};
    use crate::phala_mock::*;
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let phala = MockServer::start().await;
    mount_onchain_source(&phala, &[]).await;
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/replicas"))))
        .respond_with(
            ResponseTemplate::new(465)
                .set_body_json(prepared_body("t", 1, false, false, true))
                .set_delay(std::time::Duration::from_secs(8)),
        )
        .mount(&phala)
        .await;
    let database_url = fresh_database().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_approval-bridge"))
        .arg("serve")
        .env_clear()
        .env("DATABASE_URL", &database_url)
        .env("APPROVAL_BRIDGE_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "APPROVAL_BRIDGE_PHALA_API_URL",
            format!("{}/api/v1", phala.uri()),
        )
        .env("APPROVAL_BRIDGE_PHALA_API_KEY", PHALA_API_KEY)
        .env("APPROVAL_BRIDGE_PHALA_TIMEOUT_SECS", "20")
        .env("APPROVAL_BRIDGE_API_TOKENS", format!("ci-bot={API_TOKEN}"))
        .env("APPROVAL_BRIDGE_SCOPES", "api:ci-bot=*")
        .env("APPROVAL_BRIDGE_WORKERS", "2")
        .env("APPROVAL_BRIDGE_SHUTDOWN_GRACE_SECS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let mut up = false;
    for _ in 0..100 {
        if http.get(format!("{base}/health")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(up, "serve did not come up");
    let queued = http
        .post(format!("{base}/api/v1/replicas"))
        .bearer_auth(API_TOKEN)
        .json(&serde_json::json!({"source": ONCHAIN_NAME}))
        .send()
        .await
        .unwrap();
    assert_eq!(queued.status(), 202);
    let db = sqlx::PgPool::connect(&database_url).await.unwrap();
    // Wait until the prepare call is under way.
    for _ in 0..100 {
        let sent = phala
            .received_requests()
            .await
            .unwrap()
            .iter()
            .any(|r| r.url.path().ends_with("/replicas"));
        if sent {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let leased: i64 =
        sqlx::query_scalar("SELECT count(*) FROM replica_requests WHERE lease_id IS NOT NULL")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(leased, 1, "the prepare step holds the request");

    let started = std::time::Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "serve exits within its deadline"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(7),
        "it did not wait for the 8 s call: {:?}",
        started.elapsed()
    );
    let (status, leased): (String, bool) =
        sqlx::query_as("SELECT status, lease_id IS NOT NULL FROM replica_requests")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(status, "preparing");
    assert!(!leased, "the lease was given back");
}
