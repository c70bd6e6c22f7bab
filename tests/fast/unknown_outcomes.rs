//! Calls whose answer never came: a create or commit is looked for in Phala's
//! instance list before anything is sent again, and a request never makes a
//! second replica.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use approval_bridge::store::Lane;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::helpers::{TestApp, spawn_app, spawn_app_with};
use crate::phala_mock::*;

const NODE: u32 = 3;

/// What Phala has really done, whatever its answers said, and how its
/// eventually consistent instance list shows it.
#[derive(Clone, Default)]
struct PhalaTruth {
    created: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    /// The list lags: it does not show the replica yet.
    unlisted: Arc<AtomicBool>,
    /// The list answers 404, as for an app it does not know (yet).
    list_404: Arc<AtomicBool>,
    /// The list shows the replica without its node or compose hash.
    sparse: Arc<AtomicBool>,
    /// The list shows a second new instance on the node ([`EXTRA_VM`]).
    extra: Arc<AtomicBool>,
}

impl PhalaTruth {
    fn created(&self) -> usize {
        self.created.load(Ordering::SeqCst)
    }

    fn set(flag: &AtomicBool, on: bool) {
        flag.store(on, Ordering::SeqCst);
    }
}

/// Another CVM on the replica's node and compose hash, that nobody asked for.
const EXTRA_VM: &str = "9e2b1c3d-0000-4000-8000-00000000e0e0";

/// `GET /apps/{app}/cvms`: the source, plus the replica once one was created.
struct InstanceList {
    truth: PhalaTruth,
    app: String,
    source: &'static str,
}

impl Respond for InstanceList {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let truth = &self.truth;
        if truth.list_404.load(Ordering::SeqCst) {
            return ResponseTemplate::new(404).set_body_json(phala_error(
                "ERR-03-001",
                "No CVM of this app in this workspace",
                true,
            ));
        }
        let mut cvms = vec![instance(&self.app, self.source, 1)];
        if !truth.unlisted.load(Ordering::SeqCst) {
            for n in 0..truth.created() {
                let mut replica = instance(&self.app, &nth_replica_vm(n), NODE);
                if truth.sparse.load(Ordering::SeqCst) {
                    let fields = replica.as_object_mut().unwrap();
                    fields.remove("node_info");
                    fields.remove("compose_hash");
                }
                cvms.push(replica);
            }
        }
        if truth.extra.load(Ordering::SeqCst) {
            cvms.push(instance(&self.app, EXTRA_VM, NODE));
        }
        ResponseTemplate::new(200).set_body_json(Value::Array(cvms))
    }
}

fn instance(app: &str, vm: &str, node: u32) -> Value {
    json!({"id": format!("h-{vm}"), "name": "web-prod", "status": "starting", "app_id": app,
           "vm_uuid": vm, "compose_hash": compose_hash(),
           "node_info": {"object_type": "node", "id": node, "name": format!("prod-{node}")}})
}

/// A create or commit: the n-th call (from 0) does what `script[n]` says.
struct Scripted {
    truth: PhalaTruth,
    script: Vec<Step>,
}

#[derive(Clone)]
enum Step {
    /// Creates the replica, then the gateway answers 502 with an HTML page.
    CreateThenBadGateway,
    /// Creates the replica, then answers too late for the client's timeout.
    CreateThenTimeout,
    /// Never reaches Phala: a 504 from the gateway.
    GatewayTimeout,
    /// Never reaches Phala: the client times out.
    Timeout,
    /// Creates the replica and answers.
    CreateOk,
    /// Creates a replica, but answers with the id of the first one.
    CreateAnsweringTheFirstId,
    /// The token is spent or superseded.
    TokenInvalid,
}

impl Respond for Scripted {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let n = self.truth.calls.fetch_add(1, Ordering::SeqCst);
        let step = self.script.get(n).cloned().unwrap_or(Step::TokenInvalid);
        let create = || nth_replica_vm(self.truth.created.fetch_add(1, Ordering::SeqCst));
        let made = |vm: String| {
            let mut answer = replica_vm("starting");
            answer["vm_uuid"] = json!(vm);
            answer
        };
        let html = |status| {
            ResponseTemplate::new(status)
                .set_body_raw("<html><body>Bad Gateway</body></html>", "text/html")
        };
        match step {
            Step::CreateThenBadGateway => {
                create();
                html(502)
            }
            Step::CreateThenTimeout => ResponseTemplate::new(200)
                .set_body_json(made(create()))
                .set_delay(Duration::from_secs(3)),
            Step::GatewayTimeout => html(504),
            Step::Timeout => ResponseTemplate::new(200)
                .set_body_json(replica_vm("starting"))
                .set_delay(Duration::from_secs(3)),
            Step::CreateOk => ResponseTemplate::new(200).set_body_json(made(create())),
            Step::CreateAnsweringTheFirstId => {
                create();
                ResponseTemplate::new(200).set_body_json(made(nth_replica_vm(0)))
            }
            Step::TokenInvalid => ResponseTemplate::new(466).set_body_json(phala_error(
                "ERR-01-006",
                "commit token invalid or expired",
                true,
            )),
        }
    }
}

/// An on-chain source whose replicas need nothing on chain: prepare, then commit
/// as `script` says. The prepare hands out `tok-1`, `tok-2`, ...
async fn onchain_world(app: &TestApp, script: Vec<Step>) -> PhalaTruth {
    let truth = PhalaTruth::default();
    mount_onchain_source(&app.phala, &[]).await;
    mount_nodes(&app.phala, &[(1, "prod-1"), (NODE, "prod-3")]).await;
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/replicas"))))
        .respond_with(Prepares::default())
        .mount(&app.phala)
        .await;
    mount_instances(&app.phala, &truth, &app_id(), ONCHAIN_VM).await;
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/commit-replica"))))
        .respond_with(Scripted {
            truth: truth.clone(),
            script,
        })
        .mount(&app.phala)
        .await;
    truth
}

#[derive(Default)]
struct Prepares(AtomicUsize);

impl Respond for Prepares {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        ResponseTemplate::new(465).set_body_json(prepared_body(
            &format!("tok-{n}"),
            NODE,
            true,
            true,
            true,
        ))
    }
}

async fn mount_instances(server: &MockServer, truth: &PhalaTruth, app: &str, source: &'static str) {
    Mock::given(method("GET"))
        .and(path(api(&format!("/apps/{app}/cvms"))))
        .respond_with(InstanceList {
            truth: truth.clone(),
            app: app.to_owned(),
            source,
        })
        .mount(server)
        .await;
}

async fn queue_onchain(app: &TestApp) -> String {
    app.queue(&json!({"source": ONCHAIN_NAME, "node": "prod-3"}))
        .await
        .remove(0)
}

fn commit_tokens(requests: &[wiremock::Request]) -> Vec<String> {
    requests
        .iter()
        .map(|r| {
            r.body_json::<Value>().unwrap()["token"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

async fn commit_calls(app: &TestApp) -> Vec<wiremock::Request> {
    app.phala_requests("POST", &api(&format!("/cvms/{ONCHAIN_VM}/commit-replica")))
        .await
}

async fn prepare_calls(app: &TestApp) -> usize {
    app.phala_requests("POST", &api(&format!("/cvms/{ONCHAIN_VM}/replicas")))
        .await
        .len()
}

async fn source_locks(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM source_locks")
        .fetch_one(&app.db)
        .await
        .unwrap()
}

/// Past the settle window, counted from the failure.
fn settle(app: &TestApp) {
    let window = approval_bridge::config::WorkerSettings::default().reconcile_settle_secs;
    app.clock
        .advance(chrono::Duration::seconds(window as i64 + 1));
}

#[tokio::test]
async fn a_commit_answered_by_a_gateway_error_after_success_is_found_not_repeated() {
    let app = spawn_app().await;
    let truth = onchain_world(&app, vec![Step::CreateThenBadGateway]).await;
    let id = queue_onchain(&app).await;
    app.drain().await;

    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "committing");
    assert_eq!(request["last_error"]["code"], "COMMIT-OUTCOME-PENDING");
    assert_eq!(
        request["attempts"], 0,
        "an unknown outcome spends no attempt"
    );
    assert_eq!(source_locks(&app).await, 1, "the source lock stays");

    settle(&app);
    app.drain().await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "provisioning", "{request}");
    assert_eq!(request["vm_uuid"], REPLICA_VM);
    assert_eq!(
        commit_calls(&app).await.len(),
        1,
        "the commit was not sent again"
    );
    assert_eq!(prepare_calls(&app).await, 1, "no fresh prepare");
    assert_eq!(truth.created(), 1);
    assert_eq!(source_locks(&app).await, 0);
}

#[tokio::test]
async fn a_commit_that_never_reached_phala_is_sent_again_with_the_same_token_after_the_settle_time()
{
    let app = spawn_app().await;
    let truth = onchain_world(&app, vec![Step::Timeout, Step::CreateOk]).await;
    let id = queue_onchain(&app).await;
    app.drain().await;
    assert_eq!(app.status_of(&id).await, "committing");

    // Within the settle time nothing is sent again.
    app.clock.advance(chrono::Duration::seconds(10));
    app.drain().await;
    assert_eq!(commit_calls(&app).await.len(), 1);

    settle(&app);
    app.drain().await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "provisioning", "{request}");
    assert_eq!(request["vm_uuid"], REPLICA_VM);
    assert_eq!(commit_tokens(&commit_calls(&app).await), ["tok-1", "tok-1"]);
    assert_eq!(prepare_calls(&app).await, 1);
    assert_eq!(truth.created(), 1);
}

#[tokio::test]
async fn a_late_commit_behind_a_lagging_list_is_found_not_made_again() {
    // The first commit reaches Phala, which creates the replica but answers
    // with a gateway error, and its list does not show the replica for a
    // long while: past the settle window. The resend of the same token is
    // refused as spent; a fresh prepare would make a second replica.
    let app = spawn_app().await;
    let truth = onchain_world(&app, vec![Step::CreateThenBadGateway]).await;
    PhalaTruth::set(&truth.unlisted, true);
    let id = queue_onchain(&app).await;
    app.drain().await;
    settle(&app);
    app.drain_all(10).await;

    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "committing", "{request}");
    assert_eq!(request["last_error"]["code"], "COMMIT-OUTCOME-PENDING");
    assert!(
        request["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("most likely created the replica"),
        "{request}"
    );
    assert_eq!(commit_tokens(&commit_calls(&app).await), ["tok-1", "tok-1"]);
    assert_eq!(prepare_calls(&app).await, 1, "no fresh token");

    // The list catches up: the replica is found, and it is the only one.
    app.clock.advance(chrono::Duration::seconds(40));
    app.drain().await;
    assert_eq!(prepare_calls(&app).await, 1);
    PhalaTruth::set(&truth.unlisted, false);
    app.clock.advance(chrono::Duration::seconds(40));
    app.drain().await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "provisioning", "{request}");
    assert_eq!(request["vm_uuid"], REPLICA_VM);
    assert_eq!(request["extra_replicas"], json!([]));
    assert_eq!(commit_calls(&app).await.len(), 2);
    assert_eq!(prepare_calls(&app).await, 1);
    assert_eq!(truth.created(), 1);
}

#[tokio::test]
async fn a_spent_token_whose_replica_never_shows_fails_as_created_but_not_visible() {
    let app = spawn_app_with(|s| s.worker.unknown_outcome_timeout_secs = 600).await;
    let truth = onchain_world(&app, vec![Step::GatewayTimeout, Step::TokenInvalid]).await;
    let id = queue_onchain(&app).await;
    app.drain().await;
    settle(&app);
    app.drain_all(10).await;
    assert_eq!(app.status_of(&id).await, "committing");

    app.clock.advance(chrono::Duration::seconds(600));
    app.drain_all(10).await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "failed", "{request}");
    assert_eq!(request["last_error"]["code"], "COMMIT-CREATED-NOT-VISIBLE");
    assert!(
        request["last_error"]["suggestion"]
            .as_str()
            .unwrap()
            .contains("before queueing it again")
    );
    assert_eq!(commit_calls(&app).await.len(), 2);
    assert_eq!(prepare_calls(&app).await, 1, "never a fresh token");
    assert_eq!(truth.created(), 0);
    assert_eq!(source_locks(&app).await, 0);
}

/// The commit went through, but the instance list proves nothing while
/// `doubt` is on: past the settle window nothing is sent again, the request
/// says why (`says`), and once the list shows the replica it is found.
async fn a_list_that_proves_nothing_holds_the_resend(
    doubt: fn(&PhalaTruth) -> &AtomicBool,
    says: &str,
) {
    let app = spawn_app().await;
    let truth = onchain_world(&app, vec![Step::CreateThenBadGateway]).await;
    let id = queue_onchain(&app).await;
    app.drain().await;
    PhalaTruth::set(doubt(&truth), true);
    settle(&app);
    app.drain().await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "committing");
    assert!(
        request["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains(says),
        "{request}"
    );
    assert_eq!(commit_calls(&app).await.len(), 1, "nothing sent again");

    PhalaTruth::set(doubt(&truth), false);
    app.clock.advance(chrono::Duration::seconds(31));
    app.drain().await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "provisioning", "{request}");
    assert_eq!(request["vm_uuid"], REPLICA_VM);
    assert_eq!(commit_calls(&app).await.len(), 1);
    assert_eq!(truth.created(), 1);
}

#[tokio::test]
async fn a_404_from_the_instance_list_is_no_proof_that_nothing_was_made() {
    a_list_that_proves_nothing_holds_the_resend(|t| &t.list_404, "cannot be read yet").await;
}

#[tokio::test]
async fn a_new_instance_listed_without_node_or_hash_is_waited_for_not_ignored() {
    a_list_that_proves_nothing_holds_the_resend(|t| &t.sparse, "without its node or compose hash")
        .await;
}

#[tokio::test]
async fn two_new_instances_for_one_request_are_reported_not_adopted_silently() {
    let app = spawn_app().await;
    let truth = onchain_world(&app, vec![Step::CreateThenBadGateway]).await;
    let id = queue_onchain(&app).await;
    app.drain().await;
    // Besides the replica, a second CVM appears on the node after the commit.
    PhalaTruth::set(&truth.extra, true);
    app.clock.advance(chrono::Duration::seconds(3));
    app.drain().await;

    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "provisioning", "{request}");
    assert_eq!(request["vm_uuid"], REPLICA_VM, "the oldest listed");
    assert_eq!(request["extra_replicas"], json!([EXTRA_VM]));
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("approval_bridge_requests_with_extra_replicas 1"),
        "{metrics}"
    );
    assert_eq!(commit_calls(&app).await.len(), 1);
}

#[tokio::test]
async fn a_replica_id_phala_already_gave_another_request_fails_with_a_clear_error() {
    let app = spawn_app().await;
    let truth = onchain_world(&app, vec![Step::CreateOk, Step::CreateAnsweringTheFirstId]).await;
    let first = queue_onchain(&app).await;
    app.drain().await;
    assert_eq!(app.get_replica(&first).await["vm_uuid"], REPLICA_VM);

    // Phala answers the next commit with the same replica id.
    let second = queue_onchain(&app).await;
    app.drain().await;
    let request = app.get_replica(&second).await;
    assert_eq!(request["status"], "failed", "{request}");
    assert_eq!(request["last_error"]["code"], "REPLICA-ID-REUSED");
    assert_eq!(request["vm_uuid"], Value::Null);
    assert_eq!(app.get_replica(&first).await["vm_uuid"], REPLICA_VM);
    assert_eq!(truth.created(), 2);
}

#[tokio::test]
async fn a_sibling_never_prepares_while_a_commit_outcome_is_unknown() {
    let app = spawn_app().await;
    let truth = onchain_world(
        &app,
        vec![Step::GatewayTimeout, Step::CreateOk, Step::CreateOk],
    )
    .await;
    let first = queue_onchain(&app).await;
    let sibling = queue_onchain(&app).await;
    app.drain().await;
    assert_eq!(app.status_of(&first).await, "committing");
    assert_eq!(prepare_calls(&app).await, 1);

    // The sibling keeps waiting for the lock, however often it looks.
    for _ in 0..3 {
        app.clock.advance(chrono::Duration::seconds(2));
        app.drain().await;
    }
    assert_eq!(
        prepare_calls(&app).await,
        1,
        "the unknown commit's token stays valid"
    );
    assert_eq!(app.status_of(&sibling).await, "preparing");
    assert_eq!(app.get_replica(&sibling).await["attempts"], 0);

    settle(&app);
    app.drain().await;
    let request = app.get_replica(&first).await;
    assert_eq!(request["status"], "provisioning", "{request}");
    assert_eq!(
        commit_tokens(&commit_calls(&app).await)[..2],
        ["tok-1", "tok-1"]
    );
    // The lock is handed on at once: the sibling prepares only now.
    assert_eq!(prepare_calls(&app).await, 2, "then the sibling prepares");
    assert_eq!(app.status_of(&sibling).await, "provisioning");
    assert_eq!(truth.created(), 2, "one replica per request");
}

#[tokio::test]
async fn an_unreadable_instance_list_keeps_looking_then_fails_after_its_bound() {
    let app = spawn_app_with(|s| s.worker.unknown_outcome_timeout_secs = 300).await;
    let truth = PhalaTruth::default();
    mount_onchain_source(&app.phala, &[]).await;
    mount_nodes(&app.phala, &[(NODE, "prod-3")]).await;
    mount_prepare(
        &app.phala,
        ONCHAIN_VM,
        prepared_body("tok-1", NODE, true, true, true),
    )
    .await;
    // The list answers once (before the commit), then never again.
    Mock::given(method("GET"))
        .and(path(api(&format!("/apps/{}/cvms", app_id()))))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([instance(
            &app_id(),
            ONCHAIN_VM,
            1
        )])))
        .up_to_n_times(1)
        .mount(&app.phala)
        .await;
    Mock::given(method("GET"))
        .and(path(api(&format!("/apps/{}/cvms", app_id()))))
        .respond_with(ResponseTemplate::new(503).set_body_string("unavailable"))
        .mount(&app.phala)
        .await;
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/commit-replica"))))
        .respond_with(Scripted {
            truth: truth.clone(),
            script: vec![Step::CreateThenBadGateway],
        })
        .mount(&app.phala)
        .await;
    let id = queue_onchain(&app).await;
    app.drain().await;
    settle(&app);
    app.drain().await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "committing");
    assert_eq!(request["last_error"]["code"], "COMMIT-OUTCOME-PENDING");
    assert!(
        request["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("instance list cannot be read")
    );

    app.clock.advance(chrono::Duration::seconds(180));
    app.drain_all(5).await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "failed");
    assert_eq!(request["last_error"]["code"], "COMMIT-OUTCOME-UNKNOWN");
    assert!(
        request["last_error"]["suggestion"]
            .as_str()
            .unwrap()
            .contains("dashboard")
    );
    assert_eq!(commit_calls(&app).await.len(), 1, "never sent twice");
    assert_eq!(source_locks(&app).await, 0, "failing releases the lock");
}

async fn cloud_world(app: &TestApp, script: Vec<Step>) -> PhalaTruth {
    let truth = PhalaTruth::default();
    mount_cloud_source(&app.phala, &"11".repeat(32)).await;
    mount_instances(&app.phala, &truth, &"2e".repeat(20), CLOUD_VM).await;
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{CLOUD_VM}/replicas"))))
        .respond_with(Scripted {
            truth: truth.clone(),
            script,
        })
        .mount(&app.phala)
        .await;
    truth
}

async fn creates(app: &TestApp) -> usize {
    app.phala_requests("POST", &api(&format!("/cvms/{CLOUD_VM}/replicas")))
        .await
        .len()
}

#[tokio::test]
async fn a_direct_create_whose_answer_was_lost_is_found_in_the_instance_list() {
    let app = spawn_app().await;
    let truth = cloud_world(&app, vec![Step::CreateThenTimeout]).await;
    let id = app.queue(&json!({"source": CLOUD_NAME})).await.remove(0);
    app.drain().await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "preparing");
    assert_eq!(request["last_error"]["code"], "REPLICATE-OUTCOME-PENDING");

    // Cancelling now could leave a replica nobody tracks.
    let (code, message) = crate::helpers::error_of(app.cancel(&id).await, 409).await;
    assert_eq!(code, "not_cancellable");
    assert!(message.contains("being created"), "{message}");
    assert_eq!(app.status_of(&id).await, "preparing");

    settle(&app);
    app.drain().await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "provisioning", "{request}");
    assert_eq!(request["vm_uuid"], REPLICA_VM);
    assert_eq!(creates(&app).await, 1);
    assert_eq!(truth.created(), 1);
}

#[tokio::test]
async fn a_direct_create_that_never_reached_phala_is_sent_again_after_the_settle_time() {
    let app = spawn_app().await;
    let truth = cloud_world(&app, vec![Step::GatewayTimeout, Step::CreateOk]).await;
    let id = app.queue(&json!({"source": CLOUD_NAME})).await.remove(0);
    app.drain().await;
    assert_eq!(creates(&app).await, 1);
    settle(&app);
    app.drain().await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "provisioning", "{request}");
    assert_eq!(creates(&app).await, 2);
    assert_eq!(truth.created(), 1);
}

#[tokio::test]
async fn a_refused_create_is_a_plain_failure_and_frees_the_request() {
    let app = spawn_app().await;
    mount_cloud_source(&app.phala, &"11".repeat(32)).await;
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{CLOUD_VM}/replicas"))))
        .respond_with(ResponseTemplate::new(400).set_body_json(phala_error(
            "ERR-02-005",
            "no slots",
            true,
        )))
        .mount(&app.phala)
        .await;
    let id = app.queue(&json!({"source": CLOUD_NAME})).await.remove(0);
    app.drain().await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "failed");
    assert_eq!(request["last_error"]["code"], "ERR-02-005");
    assert_eq!(source_locks(&app).await, 0);
}

#[tokio::test]
async fn a_committed_replica_missing_for_too_long_fails_instead_of_being_polled_forever() {
    let app = spawn_app_with(|s| s.worker.replica_missing_timeout_secs = 60).await;
    onchain_world(&app, vec![Step::CreateOk]).await;
    // Phala's status poll leaves out a CVM it does not know.
    Mock::given(method("POST"))
        .and(path(api("/status/batch")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .mount(&app.phala)
        .await;
    let id = queue_onchain(&app).await;
    app.drain().await;
    assert_eq!(app.status_of(&id).await, "provisioning");
    app.clock.advance(chrono::Duration::seconds(59));
    app.drain().await;
    assert_eq!(app.status_of(&id).await, "provisioning");
    app.clock.advance(chrono::Duration::seconds(2));
    app.drain().await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "failed");
    assert_eq!(request["last_error"]["code"], "REPLICA-NOT-FOUND");
}

#[tokio::test]
async fn a_step_longer_than_its_lease_keeps_it_by_heartbeat() {
    // A 3 s lease; the commit step makes two calls of 1.8 s each.
    let app = spawn_app_with(|s| s.worker.lease_secs = 3).await;
    mount_onchain_source(&app.phala, &[]).await;
    mount_nodes(&app.phala, &[(NODE, "prod-3")]).await;
    mount_prepare(
        &app.phala,
        ONCHAIN_VM,
        prepared_body("tok-1", NODE, true, true, true),
    )
    .await;
    let slow = Duration::from_millis(1800);
    Mock::given(method("GET"))
        .and(path(api(&format!("/apps/{}/cvms", app_id()))))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!([]))
                .set_delay(slow),
        )
        .mount(&app.phala)
        .await;
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/commit-replica"))))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(replica_vm("starting"))
                .set_delay(slow),
        )
        .mount(&app.phala)
        .await;
    let id = queue_onchain(&app).await;
    app.steps(2).await; // queued → preparing → committing
    assert_eq!(app.status_of(&id).await, "committing");

    let worker = app.worker.clone();
    let step = tokio::spawn(async move { worker.run_once().await });
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let rival = app
        .store
        .claim_due(app.clock.now(), Duration::from_secs(3), Lane::All)
        .await
        .unwrap();
    assert!(rival.is_none(), "the lease was renewed while the step ran");
    assert!(step.await.unwrap().unwrap());
    assert_eq!(app.status_of(&id).await, "provisioning");
    assert_eq!(commit_calls(&app).await.len(), 1);
}

#[tokio::test]
async fn a_lease_no_longer_than_one_phala_call_is_refused_at_start_up() {
    let phala = Arc::new(MockServer::start().await);
    let database_url = crate::helpers::fresh_database().await;
    let mut settings =
        crate::helpers::test_settings(&database_url, &format!("{}/api/v1", phala.uri()));
    settings.worker.lease_secs = 30;
    settings.phala.phala_timeout_secs = 30;
    let err = approval_bridge::startup::Application::build(settings)
        .await
        .err()
        .expect("refused");
    let line = format!("{err:#}");
    assert!(line.contains("APPROVAL_BRIDGE_LEASE_SECS"), "{line}");
    assert!(
        line.contains("APPROVAL_BRIDGE_PHALA_TIMEOUT_SECS"),
        "{line}"
    );
}

#[tokio::test]
async fn a_worker_that_lost_its_lease_sends_no_prepare() {
    let app = spawn_app().await;
    onchain_world(&app, vec![]).await;
    let id = queue_onchain(&app).await;
    app.steps(1).await; // queued → preparing
    let claimed = app
        .store
        .claim_due(app.clock.now(), Duration::from_secs(60), Lane::All)
        .await
        .unwrap()
        .expect("the prepare is due");
    // The holder stalls (a SIGSTOP, a long pause) past its lease.
    sqlx::query(
        "UPDATE replica_requests SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(claimed.lease.request_id)
    .execute(&app.db)
    .await
    .unwrap();
    let err = app
        .store
        .prepare_outstanding(&claimed.lease, ONCHAIN_VM)
        .await
        .unwrap_err();
    assert!(
        matches!(err, approval_bridge::store::StoreError::LeaseLost(_)),
        "{err}"
    );
    let marked: i64 = sqlx::query_scalar("SELECT count(*) FROM source_tokens")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(marked, 0, "nothing written for a lost lease");
    assert_eq!(prepare_calls(&app).await, 0);
    assert_eq!(app.status_of(&id).await, "preparing");
}
