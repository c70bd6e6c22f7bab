//! The `approval-bridge` binary: settings errors are one clear line.

use std::process::Command;

use crate::helpers::fresh_database;

pub(crate) fn bridge() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_approval-bridge"));
    // Start from a clean slate: the developer's environment must not leak in.
    for (key, _) in std::env::vars() {
        if key.starts_with("APPROVAL_BRIDGE_") || key == "DATABASE_URL" {
            command.env_remove(key);
        }
    }
    command
}

pub(crate) fn one_line_error(output: std::process::Output) -> String {
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    stderr.trim_end().to_owned()
}

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
