//! No silent stalls: a `serve` whose background work stops (here: its worker
//! pool cannot LISTEN) is not ready and exits non-zero, so a supervisor
//! restarts it instead of it answering 202 with nothing behind it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use wiremock::MockServer;

use crate::helpers::{API_TOKEN, PHALA_API_KEY, fresh_database};
use crate::pg_proxy::{PgFault, PgProxy};

#[tokio::test]
async fn serve_whose_workers_cannot_listen_is_not_ready_and_exits_non_zero() {
    let phala = MockServer::start().await;
    let proxy = PgProxy::start(&fresh_database().await).await;
    proxy.arm(PgFault::ListenBroken);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("serve-{}.log", uuid::Uuid::new_v4().simple()));
    let stderr = std::fs::File::create(&log).unwrap();
    let serve = Command::new(env!("CARGO_BIN_EXE_approval-bridge"))
        .arg("serve")
        .env_clear()
        .env("DATABASE_URL", &proxy.url)
        .env("APPROVAL_BRIDGE_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "APPROVAL_BRIDGE_PHALA_API_URL",
            format!("{}/api/v1", phala.uri()),
        )
        .env("APPROVAL_BRIDGE_PHALA_API_KEY", PHALA_API_KEY)
        .env("APPROVAL_BRIDGE_API_TOKENS", format!("ci-bot={API_TOKEN}"))
        .env("APPROVAL_BRIDGE_WORKERS", "1")
        // How long it stays up, not ready, once its work stopped.
        .env("APPROVAL_BRIDGE_SHUTDOWN_GRACE_SECS", "10")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut serve = Killed(serve);
    let serve = &mut serve.0;
    let log = move || std::fs::read_to_string(&log).unwrap_or_default();

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready: Value = loop {
        assert!(Instant::now() < deadline, "no 503 from /readyz: {}", log());
        if let Ok(response) = http
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            && response.status() == 503
        {
            break response.json().await.unwrap();
        }
        if let Some(status) = serve.try_wait().unwrap() {
            panic!(
                "serve exited with {status} before /readyz failed: {}",
                log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let tasks = ready["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tasks")
        .unwrap_or_else(|| panic!("no tasks check in {ready}"));
    assert_eq!(tasks["ok"], false);
    let message = tasks["message"].as_str().unwrap();
    assert!(
        message.contains("worker pool") && message.contains("LISTEN"),
        "{message}"
    );
    assert!(proxy.tripped() >= 1);

    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = serve.kill();
            panic!("serve did not exit: {}", log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(1), "{}", log());
    let log = log();
    let last = log.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.contains("worker pool stopped") && last.contains("LISTEN"),
        "{last}"
    );
}

/// Kills the child when the test ends, also by a failed assertion.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
