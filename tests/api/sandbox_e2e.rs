//! End to end through the sandbox's public HTTP interface: the API, the CI
//! webhook and the sandbox controls, against anvil with the real Safe
//! contracts and the Phala Cloud and Safe Transaction Service simulators.

use std::time::Duration;

use approval_bridge::sandbox::{EOA_CVM, Sandbox, SandboxOptions};
use approval_bridge::web::webhook;
use serde_json::{Value, json};

use crate::helpers::sandbox_database;
use crate::wait;

const TOKEN: &str = "e2e-token-123";
const SECRET: &str = "e2e-secret-456";

struct Driver {
    sandbox: Sandbox,
    http: reqwest::Client,
}

impl Driver {
    async fn start() -> Driver {
        Driver::start_with(3).await
    }

    async fn start_with(nodes: u32) -> Driver {
        let options = SandboxOptions {
            port: 0,
            block_time: 1,
            api_token: TOKEN.into(),
            webhook_secret: SECRET.into(),
            database_url: Some(sandbox_database()),
            // Long enough for five intake calls on a loaded CI machine.
            batch_window_secs: 10,
            confirmations: 1,
            boot_delay: Duration::ZERO,
            nodes,
            ..SandboxOptions::default()
        };
        let sandbox = Sandbox::start(options).await.expect("the sandbox starts");
        Driver {
            sandbox,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.sandbox.url, path.trim_start_matches('/'))
    }

    async fn world(&self) -> Value {
        self.http
            .get(self.url("/sandbox/world"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn queue(&self, body: Value) -> Vec<String> {
        let response = self
            .http
            .post(self.url("/api/v1/replicas"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        ids(response.json().await.unwrap())
    }

    async fn queue_by_webhook(&self, body: Value) -> Vec<String> {
        let body = body.to_string();
        let now = chrono::Utc::now().timestamp();
        let response = self
            .http
            .post(self.url("/webhooks/ci"))
            .header("X-Bridge-Timestamp", now.to_string())
            .header(
                "X-Bridge-Signature",
                webhook::sign(SECRET, now, None, body.as_bytes()),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        ids(response.json().await.unwrap())
    }

    async fn replica(&self, id: &str) -> Value {
        self.http
            .get(self.url(&format!("/api/v1/replicas/{id}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Polls until every request is in `status` (bounded: the test fails, it never hangs).
    async fn wait_for(&self, ids: &[String], status: &str) -> Vec<Value> {
        let read = || async {
            let mut all = Vec::new();
            for id in ids {
                all.push(self.replica(id).await);
            }
            all
        };
        wait::until(format!("all {status}"), read, |all: &Vec<Value>| {
            if let Some(failed) = all
                .iter()
                .find(|r| r["status"] == "failed" && status != "failed")
            {
                panic!("a request failed: {failed}");
            }
            all.iter().all(|r| r["status"] == status)
        })
        .await
    }

    async fn control(&self, hash: &str, action: &str, body: Value) -> Value {
        let response = self
            .http
            .post(self.url(&format!("/sandbox/safe/{hash}/{action}")))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert!(status.is_success(), "{action}: {status} {body}");
        body
    }
}

fn ids(body: Value) -> Vec<String> {
    body["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

impl Driver {
    /// Signs the proposal as owners 0 and 1 (as in Safe{Wallet}) and executes it.
    async fn approve(&self, hash: &str) {
        assert_eq!(
            self.control(hash, "sign", json!({"owner": 0})).await["confirmations"],
            1
        );
        assert_eq!(
            self.control(hash, "sign", json!({"owner": 1})).await["confirmations"],
            2
        );
        self.control(hash, "execute", json!({})).await;
    }

    fn node<'a>(world: &'a Value, name: &str) -> &'a Value {
        world["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap_or_else(|| panic!("no node {name} in {world}"))
    }
}

/// The one proposal of `waiting`, and how many of each call it makes.
fn one_proposal(waiting: &[Value]) -> (String, Vec<Value>) {
    let hashes: std::collections::BTreeSet<&str> = waiting
        .iter()
        .map(|r| r["proposal"]["safe_tx_hash"].as_str().unwrap())
        .collect();
    assert_eq!(hashes.len(), 1, "{hashes:?}");
    let calls = waiting[0]["proposal"]["calls"].as_array().unwrap().clone();
    (hashes.into_iter().next().unwrap().to_owned(), calls)
}

fn count(calls: &[Value], function: &str) -> usize {
    calls.iter().filter(|c| c["function"] == function).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_running_sources_need_only_their_devices_and_a_revoked_hash_is_added_again() {
    let driver = Driver::start().await;
    let world = driver.world().await;
    let web_app = world["apps"]["web"]["address"].as_str().unwrap().to_owned();
    let api_app = world["apps"]["api"]["address"].as_str().unwrap().to_owned();
    // The sources run, so their nodes' devices are allowed on their apps.
    let prod1 = Driver::node(&world, "prod-1");
    assert_eq!(prod1["allowed"][&web_app], true, "{prod1}");
    assert_eq!(prod1["allowed"][&api_app], true, "{prod1}");
    let prod2 = Driver::node(&world, "prod-2");
    assert_eq!(
        prod2["allowed"][&api_app], true,
        "the canary runs there: {prod2}"
    );
    assert_eq!(prod2["allowed"][&web_app], false, "{prod2}");

    // A replica where everything is allowed is committed without a proposal.
    let direct = driver
        .queue(json!({"source": "web-prod", "node": "prod-1"}))
        .await;
    // Four within one batch window: two by the API, two by the webhook.
    let mut ids = Vec::new();
    for node in ["prod-2", "prod-3"] {
        ids.extend(
            driver
                .queue(json!({"source": "web-prod", "node": node}))
                .await,
        );
    }
    for source in ["api-prod", "api-canary"] {
        ids.extend(
            driver
                .queue_by_webhook(json!({"source": source, "node": "prod-3"}))
                .await,
        );
    }
    let done = driver.wait_for(&direct, "done").await;
    assert_eq!(done[0]["proposal"], Value::Null);
    assert!(
        done[0]["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["to"] != "awaiting_approval"),
        "{}",
        done[0]
    );
    let waiting = driver.wait_for(&ids, "awaiting_approval").await;

    // One Safe transaction with exactly what is missing: the web app's
    // prod-2 and prod-3 devices, the api app's prod-3 device (once, for two
    // requests), and the canary's revoked compose hash.
    let (hash, calls) = one_proposal(&waiting);
    assert_eq!(count(&calls, "addDevice"), 3, "{calls:?}");
    assert_eq!(count(&calls, "addComposeHash"), 1, "{calls:?}");
    let canary_hash = world["cvms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "api-canary")
        .unwrap()["compose_hash"]
        .clone();
    let added = calls
        .iter()
        .find(|c| c["function"] == "addComposeHash")
        .unwrap();
    assert_eq!(added["value"], canary_hash, "{calls:?}");

    driver.approve(&hash).await;
    let done = driver.wait_for(&ids, "done").await;
    for request in &done {
        // Committed exactly once each.
        let commits = request["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["from"] == "committing" && e["to"] == "provisioning")
            .count();
        assert_eq!(commits, 1, "{request}");
        assert!(request["vm_uuid"].is_string());
    }
    // At the simulator: one replica per request.
    let phala = &driver.sandbox.phala;
    let replicas = |name: &str| {
        let uuid = phala
            .world()
            .cvm(name)
            .unwrap()
            .vm_uuid
            .simple()
            .to_string();
        phala.replicas(&uuid).len()
    };
    assert_eq!(replicas("web-prod"), 3);
    assert_eq!(replicas("api-prod"), 1);
    assert_eq!(replicas("api-canary"), 1);
    driver.sandbox.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_world_of_many_nodes_replicates_onto_ten_new_nodes_in_one_safe_transaction() {
    let driver = Driver::start_with(12).await;
    let world = driver.world().await;
    let nodes = world["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 13, "prod-1 to prod-12 and prod-full");
    assert!(
        nodes
            .iter()
            .filter(|n| n["name"] != "prod-full")
            .all(|n| n["free_slots"].as_u64() >= Some(10)),
        "{nodes:?}"
    );

    let mut ids = Vec::new();
    for node in 3..=12 {
        ids.extend(
            driver
                .queue(json!({"source": "web-prod", "node": format!("prod-{node}")}))
                .await,
        );
    }
    let waiting = driver.wait_for(&ids, "awaiting_approval").await;
    let (hash, calls) = one_proposal(&waiting);
    assert_eq!(count(&calls, "addDevice"), 10, "{calls:?}");
    assert_eq!(count(&calls, "addComposeHash"), 0, "{calls:?}");
    driver.approve(&hash).await;
    driver.wait_for(&ids, "done").await;
    let phala = &driver.sandbox.phala;
    let web = phala.world().cvm("web-prod").unwrap().vm_uuid.to_string();
    let mut on: Vec<u32> = phala.replicas(&web).iter().map(|r| r.node_id).collect();
    on.sort_unstable();
    assert_eq!(on, (3..=12).collect::<Vec<u32>>());
    driver.sandbox.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_kms_app_is_replicated_without_any_approval() {
    let driver = Driver::start().await;
    let ids = driver
        .queue(json!({"source": "docs-cloud", "node": "prod-2"}))
        .await;
    let done = driver.wait_for(&ids, "done").await;
    assert_eq!(done[0]["proposal"], Value::Null);
    let statuses: Vec<&str> = done[0]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["to"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["queued", "preparing", "provisioning", "done"]);
    driver.sandbox.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_owned_by_an_account_fails_with_a_clear_error() {
    let driver = Driver::start().await;
    let ids = driver
        .queue(json!({"source": EOA_CVM, "node": "prod-2"}))
        .await;
    let failed = driver.wait_for(&ids, "failed").await;
    let error = &failed[0]["last_error"];
    assert_eq!(error["code"], "OWNER-IS-EOA");
    assert!(error["message"].as_str().unwrap().contains("not a Safe"));
    assert!(
        error["suggestion"]
            .as_str()
            .unwrap()
            .contains("phala cvms replicate")
    );
    driver.sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn the_sandbox_refuses_a_port_in_use_too_few_nodes_and_an_unreachable_database() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = Sandbox::start(SandboxOptions {
        port,
        ..SandboxOptions::default()
    })
    .await
    .err()
    .expect("refused");
    assert_eq!(
        err.to_string(),
        format!("port {port} is in use: stop what listens there, or pass --port")
    );

    let err = Sandbox::start(SandboxOptions {
        port: 0,
        nodes: 1,
        ..SandboxOptions::default()
    })
    .await
    .err()
    .expect("refused");
    assert!(err.to_string().contains("at least 2 nodes"), "{err}");

    let options = SandboxOptions {
        port: 0,
        database_url: Some("postgres://postgres@127.0.0.1:1/approval_bridge_sandbox".into()),
        ..SandboxOptions::default()
    };
    let err = Sandbox::start(options).await.err().expect("refused");
    let line = format!("{err:#}");
    assert!(
        line.starts_with("cannot reach Postgres at 127.0.0.1:1"),
        "{line}"
    );
    assert!(
        line.contains("pg_ctlcluster") && line.contains("APPROVAL_BRIDGE_SANDBOX_DATABASE_URL"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_four_batched_replicas_of_one_source_commit_once_each_and_never_meet_a_466() {
    let driver = Driver::start_with(4).await;
    let mut ids = Vec::new();
    for node in ["prod-3", "prod-4"] {
        ids.extend(
            driver
                .queue(json!({"source": "web-prod", "node": node, "count": 12}))
                .await,
        );
    }
    let waiting = driver.wait_for(&ids, "awaiting_approval").await;
    let (hash, calls) = one_proposal(&waiting);
    assert_eq!(count(&calls, "addDevice"), 2, "{calls:?}");
    let phala = &driver.sandbox.phala;
    let web = phala.world().cvm("web-prod").unwrap().vm_uuid.to_string();
    let planned = phala.prepare_calls(&web);
    assert_eq!(planned, 24, "one prepare each to plan");

    driver.approve(&hash).await;
    driver.wait_for(&ids, "done").await;
    assert_eq!(phala.replicas(&web).len(), 24);
    assert_eq!(phala.commit_calls(&web), 24, "one commit each");
    let refused: Vec<u16> = phala
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/commit-replica") && r.status != 200)
        .map(|r| r.status)
        .collect();
    assert_eq!(
        refused,
        Vec::<u16>::new(),
        "no commit met a superseded token"
    );
    // After the execution, at most one prepare each, right before its commit.
    let after = phala.prepare_calls(&web) - planned;
    assert!(after <= 24, "{after} prepares after the execution");
    driver.sandbox.stop().await.unwrap();
}
