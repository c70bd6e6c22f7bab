//! The replica tracker: one `POST /status/batch` per pass for every
//! provisioning replica, never a `GET /cvms/{id}` per replica.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, Request, Respond, ResponseTemplate};

use crate::helpers::{TestApp, spawn_app};
use crate::phala_mock::*;

/// Each commit creates a replica of its own: `replica-0`, `replica-1`, …
struct NumberedReplicas(Arc<AtomicUsize>);

impl Respond for NumberedReplicas {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let n = self.0.fetch_add(1, Ordering::SeqCst);
        let mut vm = replica_vm("starting");
        vm["vm_uuid"] = json!(replica_uuid(n));
        ResponseTemplate::new(200).set_body_json(vm)
    }
}

fn replica_uuid(n: usize) -> String {
    format!("{n:032x}")
}

/// Every CVM asked about is in `status`.
struct AllIn(&'static str);

impl Respond for AllIn {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = request.body_json().unwrap();
        let answer: serde_json::Map<String, Value> = body["vm_uuids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| {
                let id = id.as_str().unwrap().to_owned();
                let status =
                    json!({"vm_uuid": id, "status": self.0, "in_progress": self.0 != "running"});
                (id, status)
            })
            .collect();
        ResponseTemplate::new(200).set_body_json(answer)
    }
}

/// Three replicas of an on-chain source that is allowed everywhere: they
/// commit at once and start provisioning.
async fn three_provisioning(app: &TestApp) -> Vec<String> {
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
        .respond_with(NumberedReplicas(Arc::default()))
        .mount(&app.phala)
        .await;
    let ids = app
        .queue(&json!({"source": ONCHAIN_NAME, "count": 3}))
        .await;
    while app.worker.run_once().await.unwrap() {}
    for id in &ids {
        assert_eq!(app.status_of(id).await, "provisioning");
    }
    ids
}

async fn status_polls(app: &TestApp) -> Vec<Value> {
    app.phala_requests("POST", &api("/status/batch"))
        .await
        .iter()
        .map(|r| r.body_json::<Value>().unwrap())
        .collect()
}

#[tokio::test]
async fn every_provisioning_replica_is_polled_in_one_status_call_per_pass() {
    let app = spawn_app().await;
    let ids = three_provisioning(&app).await;
    Mock::given(method("POST"))
        .and(path(api("/status/batch")))
        .respond_with(AllIn("starting"))
        .up_to_n_times(1)
        .mount(&app.phala)
        .await;

    // Still starting: one call for all three, and they keep what it said.
    assert!(!app.worker.track_once().await.unwrap());
    let polls = status_polls(&app).await;
    assert_eq!(polls.len(), 1);
    let mut asked: Vec<String> = polls[0]["vm_uuids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    asked.sort();
    assert_eq!(asked, (0..3).map(replica_uuid).collect::<Vec<_>>());
    for id in &ids {
        let request = app.get_replica(id).await;
        assert_eq!(request["status"], "provisioning");
        assert_eq!(request["replica"]["status"], "starting");
    }

    // Running: the next pass moves all three to done, again with one call.
    Mock::given(method("POST"))
        .and(path(api("/status/batch")))
        .respond_with(AllIn("running"))
        .mount(&app.phala)
        .await;
    assert!(app.worker.track_once().await.unwrap());
    assert_eq!(status_polls(&app).await.len(), 2);
    for id in &ids {
        let request = app.get_replica(id).await;
        assert_eq!(request["status"], "done");
        assert_eq!(request["attempts"], 0);
        assert_eq!(
            request["events"].as_array().unwrap().last().unwrap()["actor"],
            "worker"
        );
    }
    // Nothing is left to poll, and no replica was read one by one.
    assert!(!app.worker.track_once().await.unwrap());
    assert_eq!(status_polls(&app).await.len(), 2);
    let received = app.phala.received_requests().await.unwrap();
    assert!(
        !received
            .iter()
            .any(|r| r.method.as_str() == "GET" && r.url.path().contains("/cvms/0000")),
        "a replica was polled on its own"
    );
}

#[tokio::test]
async fn a_failed_status_poll_is_shown_and_asked_again_without_spending_attempts() {
    let app = spawn_app().await;
    let ids = three_provisioning(&app).await;
    Mock::given(method("POST"))
        .and(path(api("/status/batch")))
        .respond_with(ResponseTemplate::new(503).set_body_string("<html>bad gateway</html>"))
        .up_to_n_times(1)
        .mount(&app.phala)
        .await;
    assert!(!app.worker.track_once().await.unwrap());
    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "provisioning");
    assert_eq!(request["attempts"], 0);
    assert!(
        request["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot read the replica's status"),
        "{request}"
    );

    Mock::given(method("POST"))
        .and(path(api("/status/batch")))
        .respond_with(AllIn("running"))
        .mount(&app.phala)
        .await;
    app.drain().await;
    for id in &ids {
        let request = app.get_replica(id).await;
        assert_eq!(request["status"], "done");
        assert_eq!(request["last_error"], Value::Null);
    }
}

#[tokio::test]
async fn a_replica_that_stops_fails_with_its_status() {
    let app = spawn_app().await;
    let ids = three_provisioning(&app).await;
    Mock::given(method("POST"))
        .and(path(api("/status/batch")))
        .respond_with(AllIn("stopped"))
        .mount(&app.phala)
        .await;
    assert!(app.worker.track_once().await.unwrap());
    for id in &ids {
        let request = app.get_replica(id).await;
        assert_eq!(request["status"], "failed");
        assert_eq!(request["last_error"]["code"], "REPLICA-FAILED");
    }
}

#[tokio::test]
async fn a_replica_phala_cannot_be_asked_about_is_never_failed_for_it() {
    let app = spawn_app().await;
    let ids = three_provisioning(&app).await;
    Mock::given(method("POST"))
        .and(path(api("/status/batch")))
        .respond_with(ResponseTemplate::new(502).set_body_string("<html>bad gateway</html>"))
        .up_to_n_times(3)
        .mount(&app.phala)
        .await;
    // Phala stays unreachable past the boot bound.
    for _ in 0..3 {
        app.clock.advance(chrono::Duration::minutes(20));
        assert!(!app.worker.track_once().await.unwrap());
    }
    for id in &ids {
        let request = app.get_replica(id).await;
        assert_eq!(request["status"], "provisioning", "{request}");
        assert!(
            request["last_error"]["message"]
                .as_str()
                .unwrap()
                .contains("cannot read the replica's status")
        );
    }
    // Once Phala answers, a running replica is done, an hour late or not.
    Mock::given(method("POST"))
        .and(path(api("/status/batch")))
        .respond_with(AllIn("running"))
        .mount(&app.phala)
        .await;
    assert!(app.worker.track_once().await.unwrap());
    for id in &ids {
        assert_eq!(app.status_of(id).await, "done");
    }
}

#[tokio::test]
async fn a_slow_boot_warns_before_it_fails() {
    let app = spawn_app().await;
    let ids = three_provisioning(&app).await;
    Mock::given(method("POST"))
        .and(path(api("/status/batch")))
        .respond_with(AllIn("starting"))
        .mount(&app.phala)
        .await;
    app.clock.advance(chrono::Duration::minutes(16));
    assert!(!app.worker.track_once().await.unwrap());
    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "provisioning");
    assert_eq!(
        request["last_error"]["code"], "REPLICA-SLOW-BOOT",
        "{request}"
    );
    assert!(
        request["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("fails if it does not run within 30 minutes")
    );

    app.clock.advance(chrono::Duration::minutes(15));
    assert!(app.worker.track_once().await.unwrap());
    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "failed");
    assert_eq!(request["last_error"]["code"], "REPLICA-TIMEOUT");
    assert!(
        request["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("Phala says `starting`"),
        "{request}"
    );
}
