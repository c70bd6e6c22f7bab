//! `approval-bridge sandbox` as a process: `--world-only` keeps anvil, the
//! Safe and the simulators up while `serve` runs, dies and restarts apart;
//! and the sandbox never touches a database that is not its own.
//!
//! [`WorldProcess`] and [`ServeProcess`] are meant for the crash and fault
//! suites too: start the world once, then kill and restart `serve` at will.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use crate::command::{bridge, one_line_error};
use crate::helpers::{base_database_url, fresh_database};
use crate::processes::{TOKEN, WorldProcess, log_file, terminate};
use crate::wait;

/// The token and secret the sandbox's environment carries.
async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.expect("an answer");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Polls a request until its status is `status` (bounded: fails, never hangs).
async fn wait_for(http: &reqwest::Client, base: &str, id: &str, status: &str) -> Value {
    let read = || async {
        let url = format!("{base}api/v1/replicas/{id}");
        send(http.get(url).bearer_auth(TOKEN)).await.1
    };
    wait::until(status, read, |request| {
        assert_ne!(request["status"], "failed", "{request}");
        request["status"] == status
    })
    .await
}

fn node_allowed(world: &Value, node: &str) -> bool {
    let web = world["apps"]["web"]["address"].as_str().unwrap();
    let node = world["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .unwrap();
    node["allowed"][web] == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_against_a_world_only_sandbox_and_restarts_while_the_world_stays_up() {
    let world = WorldProcess::start(&["--batch-window-secs", "1", "--confirmations", "1"]);
    assert!(
        !world.env.contains_key("DATABASE_URL"),
        "the database is serve's own: {:?}",
        world.env.keys()
    );
    for name in [
        "APPROVAL_BRIDGE_PHALA_API_URL",
        "APPROVAL_BRIDGE_RPC_URLS",
        "APPROVAL_BRIDGE_WS_URLS",
        "APPROVAL_BRIDGE_SAFES",
        "APPROVAL_BRIDGE_SAFE_SERVICE_URLS",
        "APPROVAL_BRIDGE_PROPOSER_KEY",
    ] {
        assert!(
            world.env.contains_key(name),
            "{name} in {:?}",
            world.env.keys()
        );
    }
    let http = reqwest::Client::new();
    let database_url = fresh_database().await;
    let mut serve = world.serve(&database_url).await;

    // Queue at the bridge itself; the owners sign and execute at the sandbox.
    let (status, body) = send(
        http.post(format!("{}api/v1/replicas", world.bridge_url))
            .bearer_auth(TOKEN)
            .json(&json!({"source": "web-prod", "node": "prod-2"})),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = body["replicas"][0]["id"].as_str().unwrap().to_owned();
    let waiting = wait_for(&http, &world.bridge_url, &id, "awaiting_approval").await;
    let hash = waiting["proposal"]["safe_tx_hash"].as_str().unwrap();
    for (action, body) in [
        ("sign", json!({"owner": 0})),
        ("sign", json!({"owner": 1})),
        ("execute", json!({})),
    ] {
        let (status, answer) = send(
            http.post(format!("{}sandbox/safe/{hash}/{action}", world.url))
                .json(&body),
        )
        .await;
        assert_eq!(status, 200, "{action}: {answer}\n{}", world.log());
    }
    let done = wait_for(&http, &world.bridge_url, &id, "done").await;
    assert!(done["vm_uuid"].is_string(), "{done}");

    // The bridge dies; the world stays up and says where the bridge went.
    serve.kill();
    let (status, view) = send(http.get(format!("{}sandbox/world", world.url))).await;
    assert_eq!(status, 200, "{view}");
    assert!(
        node_allowed(&view, "prod-2"),
        "the execution stayed: {view}"
    );
    let (status, answer) = send(
        http.get(format!("{}api/v1/replicas", world.url))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(status, 502, "{answer}");
    assert_eq!(answer["error"]["code"], "bridge_unavailable");

    // Started again on the same database and world: the request is still
    // done, and a second replica on prod-2 (allowed by the first execution)
    // goes through the sandbox's address with no proposal at all.
    let _serve = world.serve(&database_url).await;
    let (_, again) = send(
        http.get(format!("{}api/v1/replicas/{id}", world.url))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(again["status"], "done", "{again}");
    let (status, body) = send(
        http.post(format!("{}api/v1/replicas", world.url))
            .bearer_auth(TOKEN)
            .json(&json!({"source": "web-prod", "node": "prod-2"})),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let second = body["replicas"][0]["id"].as_str().unwrap().to_owned();
    let second = wait_for(&http, &world.url, &second, "done").await;
    assert_eq!(second["proposal"], Value::Null, "{second}");
    assert_ne!(second["vm_uuid"], done["vm_uuid"]);

    // SIGTERM stops the world, anvil included.
    let rpc = world.env["APPROVAL_BRIDGE_RPC_URLS"]
        .split_once('=')
        .unwrap()
        .1
        .to_owned();
    let status = world.stop();
    assert!(status.success(), "{status}");
    let probe = http
        .post(&rpc)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}))
        .send()
        .await;
    assert!(probe.is_err(), "anvil still answers at {rpc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_world_only_sandbox_prints_shell_lines_by_default() {
    let (log, stderr) = log_file("world-shell");
    let mut child = bridge()
        .args(["sandbox", "--world-only", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let last = line.starts_with("export APPROVAL_BRIDGE_SANDBOX_URL=");
            let _ = lines.send(line);
            if last {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    while let Ok(line) = received.recv_timeout(Duration::from_secs(240)) {
        let last = line.starts_with("export APPROVAL_BRIDGE_SANDBOX_URL=");
        printed.push(line);
        if last {
            break;
        }
    }
    let status = terminate(&mut child);
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{status}: {log}");
    assert!(
        printed.iter().all(|l| l.starts_with("export ")),
        "stdout holds export lines only: {printed:?}"
    );
    assert!(
        printed
            .iter()
            .any(|l| l.starts_with("export APPROVAL_BRIDGE_LISTEN='127.0.0.1:")),
        "{printed:?}"
    );
    assert!(!printed.iter().any(|l| l.contains("DATABASE_URL")));
    assert!(log.contains("not started (--world-only)"), "{log}");
}

/// Creates `name` with a marker table; `true` later means nothing dropped it.
async fn marked_database(name: &str) -> String {
    let base = base_database_url();
    let mut conn = PgConnection::connect(&base).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let (prefix, _) = base.rsplit_once('/').unwrap();
    let url = format!("{prefix}/{name}");
    let mut db = PgConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE precious (id int)")
        .execute(&mut db)
        .await
        .unwrap();
    url
}

async fn still_marked(url: &str) -> bool {
    match PgConnection::connect(url).await {
        Ok(mut db) => sqlx::query("SELECT 1 FROM precious")
            .execute(&mut db)
            .await
            .is_ok(),
        Err(_) => false,
    }
}

#[tokio::test]
async fn the_sandbox_refuses_a_database_not_named_sandbox_and_drops_nothing() {
    let name = format!("ab_test_{}", uuid::Uuid::new_v4().simple());
    let url = marked_database(&name).await;
    let expected = format!(
        "approval-bridge: refusing database `{name}`: the sandbox empties its database at every start, \
         so the name must end in `_sandbox` (set APPROVAL_BRIDGE_SANDBOX_DATABASE_URL or --database-url)"
    );
    for world_only in [false, true] {
        let mut command = bridge();
        command.args(["sandbox", "--port", "0", "--database-url", &url]);
        if world_only {
            command.arg("--world-only");
        }
        let output = command.output().unwrap();
        assert_eq!(output.status.code(), Some(1));
        assert_eq!(one_line_error(output), expected);
    }
    let output = bridge()
        .args(["sandbox", "--port", "0"])
        .env("APPROVAL_BRIDGE_SANDBOX_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert_eq!(one_line_error(output), expected);
    assert!(still_marked(&url).await, "{name} was dropped");
}

#[tokio::test]
async fn the_sandbox_never_reads_database_url() {
    // Even a DATABASE_URL that the sandbox would accept is left alone: the
    // sandbox reads only its own setting (here unreachable, so it stops).
    let name = format!("ab_test_{}_sandbox", uuid::Uuid::new_v4().simple());
    let url = marked_database(&name).await;
    let output = bridge()
        .args(["sandbox", "--port", "0"])
        .env("DATABASE_URL", &url)
        .env(
            "APPROVAL_BRIDGE_SANDBOX_DATABASE_URL",
            "postgres://postgres@127.0.0.1:1/unreachable_sandbox",
        )
        .output()
        .unwrap();
    let line = one_line_error(output);
    assert!(
        line.starts_with("approval-bridge: cannot reach Postgres at 127.0.0.1:1"),
        "{line}"
    );
    assert!(still_marked(&url).await, "{name} was dropped");

    // A production DATABASE_URL is not even looked at: the sandbox goes on
    // with its own default and stops at the next check (the port).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let output = bridge()
        .args(["sandbox", "--port", &port])
        .env(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/production",
        )
        .output()
        .unwrap();
    assert_eq!(
        one_line_error(output),
        format!("approval-bridge: port {port} is in use: stop what listens there, or pass --port")
    );

    let help = bridge().args(["sandbox", "--help"]).output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(
        help.contains("[env: APPROVAL_BRIDGE_SANDBOX_DATABASE_URL"),
        "{help}"
    );
    assert!(!help.contains("[env: DATABASE_URL"), "{help}");
}
