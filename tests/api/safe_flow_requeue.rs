//! Queueing a replica again after its proposal ended, and proposals the
//! service never accepted: the same calls at the same nonce reuse the stored
//! proposal (same safeTxHash), an unsent proposal ends after the bound and
//! frees its nonce, and an ended proposal the owners execute after all is
//! noticed by the follower: the requests it failed are planned again and
//! commit, unless their replica was queued again meanwhile.

use serde_json::{Value, json};

use crate::commit_gate::CommitGate;
use crate::helpers::TestApp;
use crate::pg_waits::until_waiting_for_advisory_lock;
use crate::phala_mock::*;
use crate::safe_doubles::{OnPropose, ServiceDouble, bridge_behind};
use crate::safe_world::{
    SafeWorld, commits, execute, mine, mount_commit_and_run, proposal_call, proposed,
};

async fn queue_node(app: &TestApp, node: u32) -> String {
    app.queue(&json!({"source": ONCHAIN_NAME, "node": node}))
        .await
        .remove(0)
}

async fn proposals(app: &TestApp) -> Vec<(String, String, i64)> {
    sqlx::query_as("SELECT safe_tx_hash, status, nonce FROM proposals ORDER BY created_at")
        .fetch_all(&app.db)
        .await
        .unwrap()
}

fn error_code(request: &Value) -> &str {
    request["last_error"]["code"].as_str().unwrap_or_default()
}

/// Queues node 1 again once its first request failed with `code`: the new
/// request reuses the stored proposal, and is done once the owners execute it.
async fn queued_again_reuses_the_proposal(world: &SafeWorld, app: &TestApp, hash: &str) {
    let again = queue_node(app, 1).await;
    app.drain_all(10).await;
    let request = app.get_replica(&again).await;
    assert_eq!(request["status"], "awaiting_approval", "{request}");
    assert_eq!(request["proposal"]["safe_tx_hash"], hash, "{request}");
    assert_eq!(request["proposal"]["nonce"], 0, "{request}");
    assert_eq!(request["proposal"]["status"], "proposed", "{request}");
    assert_eq!(proposals(app).await.len(), 1, "stored once");
    assert_eq!(world.service.stored_transactions(), 1);

    let (call, _) = proposal_call(app, &again).await;
    let execution = execute(world, call).await;
    mine(world, 3).await;
    app.drain_all(10).await;
    let request = app.get_replica(&again).await;
    assert_eq!(request["status"], "done", "{request}");
    assert_eq!(request["proposal"]["execution_tx_hash"], execution.as_str());
    assert_eq!(commits(app).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_replica_queued_again_after_its_proposal_expired_reuses_it_and_is_done() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_and_run(&app).await;
    let first = proposed(&world, &app, &[1]).await.remove(0);
    let (_, hash) = proposal_call(&app, &first).await;
    app.clock
        .advance(chrono::Duration::days(7) + chrono::Duration::seconds(1));
    app.drain_all(3).await;
    let request = app.get_replica(&first).await;
    assert_eq!(request["status"], "failed", "{request}");
    assert_eq!(error_code(&request), "PROPOSAL-EXPIRED", "{request}");

    // Its advice: queue the replica again. Same calls, same (freed) nonce,
    // so the same safeTxHash as the stored proposal.
    queued_again_reuses_the_proposal(&world, &app, &hash).await;
    assert_eq!(
        world.service.proposal_posts(hash.parse().unwrap()),
        1,
        "the service had it already: not posted again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_replica_queued_again_after_a_refusal_reuses_the_proposal_and_is_done() {
    let world = SafeWorld::start().await;
    let app = bridge_behind(&world, OnPropose::RejectedOnce).await;
    let first = queue_node(&app, 1).await;
    app.drain_all(10).await;
    let request = app.get_replica(&first).await;
    assert_eq!(request["status"], "failed", "{request}");
    assert_eq!(error_code(&request), "SAFE-REJECTED", "{request}");
    let hash = request["proposal"]["safe_tx_hash"]
        .as_str()
        .unwrap()
        .to_owned();

    queued_again_reuses_the_proposal(&world, &app, &hash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_the_service_never_accepts_ends_after_the_bound_and_frees_its_nonce() {
    let world = SafeWorld::start().await;
    let app = bridge_behind(&world, OnPropose::UnavailableAlways).await;
    let first = queue_node(&app, 1).await;
    app.drain().await;
    // Tried again every 10 s while the service answers 503.
    for _ in 0..5 {
        app.clock.advance(chrono::Duration::seconds(11));
        app.drain().await;
        assert_eq!(app.status_of(&first).await, "awaiting_proposal");
    }
    app.clock.advance(chrono::Duration::minutes(60));
    app.drain().await;
    let request = app.get_replica(&first).await;
    assert_eq!(request["status"], "failed", "{request}");
    assert_eq!(error_code(&request), "SAFE-HTTP-503", "{request}");
    let message = request["last_error"]["message"].as_str().unwrap();
    assert!(
        message.contains("did not accept the proposal for 60 minutes"),
        "{message}"
    );
    assert_eq!(request["proposal"]["status"], "failed", "{request}");

    // The service is back: the next batch takes nonce 0, which the owners
    // can execute, rather than 1 behind a proposal nobody can see.
    ServiceDouble::install(&app, &world, OnPropose::Forward);
    let next = queue_node(&app, 2).await;
    app.drain_all(10).await;
    let request = app.get_replica(&next).await;
    assert_eq!(request["status"], "awaiting_approval", "{request}");
    assert_eq!(request["proposal"]["nonce"], 0, "{request}");
    let (call, _) = proposal_call(&app, &next).await;
    execute(&world, call).await;
    mine(&world, 3).await;
    app.drain_all(10).await;
    assert_eq!(app.status_of(&next).await, "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsent_proposal_the_owners_execute_after_the_bridge_gave_up_is_noticed() {
    let world = SafeWorld::start().await;
    // Every post reaches the service, and no answer comes back.
    let app = bridge_behind(&world, OnPropose::AnswersLost).await;
    let first = queue_node(&app, 1).await;
    app.drain().await;
    app.clock.advance(chrono::Duration::minutes(61));
    app.drain().await;
    let request = app.get_replica(&first).await;
    assert_eq!(request["status"], "failed", "{request}");
    assert_eq!(error_code(&request), "SAFE-TIMEOUT", "{request}");
    let hash = request["proposal"]["safe_tx_hash"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(world.service.stored_transactions(), 1, "the service has it");

    // The owners find it in Safe{Wallet} and execute it.
    let (call, _) = proposal_call(&app, &first).await;
    let execution = execute(&world, call).await;
    mine(&world, 3).await;
    app.drain_all(10).await;
    assert_revived_and_done(&app, &first, &hash, &execution).await;
    let executed: Vec<(String, String)> =
        sqlx::query_as("SELECT safe_tx_hash, status FROM proposals")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(executed, [(hash, "executed".to_owned())]);
}

/// The request that failed with an ended proposal the owners then executed:
/// planned again (an event says why), it commits once, with one replica and
/// no new proposal.
async fn assert_revived_and_done(app: &TestApp, id: &str, hash: &str, execution: &str) {
    let request = app.get_replica(id).await;
    assert_eq!(request["status"], "done", "{request}");
    let events = request["events"].as_array().unwrap();
    let revived = events
        .iter()
        .find(|e| e["from"] == "failed")
        .unwrap_or_else(|| panic!("no event out of `failed`: {request}"));
    assert_eq!(revived["to"], "awaiting_proposal", "{request}");
    let message = revived["message"].as_str().unwrap();
    assert!(
        message.contains(hash) && message.contains(execution),
        "{message}"
    );
    assert_eq!(commits(app).await.len(), 1, "one commit, one replica");
    assert_eq!(proposals(app).await.len(), 1, "no new proposal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_proposal_the_owners_execute_later_is_noticed() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_and_run(&app).await;
    let first = proposed(&world, &app, &[1]).await.remove(0);
    let (call, hash) = proposal_call(&app, &first).await;
    app.clock
        .advance(chrono::Duration::days(7) + chrono::Duration::seconds(1));
    app.drain_all(3).await;
    assert_eq!(app.status_of(&first).await, "failed");

    // Still in Safe{Wallet}: the owners execute it a day late.
    let execution = execute(&world, call).await;
    mine(&world, 3).await;
    app.drain_all(10).await;
    assert_revived_and_done(&app, &first, &hash, &execution).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_proposal_executed_after_its_replica_was_queued_again_leaves_the_old_request_failed()
 {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_and_run(&app).await;
    let first = proposed(&world, &app, &[1]).await.remove(0);
    let (call, hash) = proposal_call(&app, &first).await;
    app.clock
        .advance(chrono::Duration::days(7) + chrono::Duration::seconds(1));
    app.drain_all(3).await;
    assert_eq!(app.status_of(&first).await, "failed");

    // The caller follows the advice and queues the replica again; before
    // the bridge gets to it, the owners execute the expired proposal.
    let again = queue_node(&app, 1).await;
    let execution = execute(&world, call).await;
    mine(&world, 3).await;
    app.drain_all(10).await;

    // The newer request makes the replica; the old one stays failed and
    // names it, rather than making a second one.
    let newer = app.get_replica(&again).await;
    assert_eq!(newer["status"], "done", "{newer}");
    let old = app.get_replica(&first).await;
    assert_eq!(old["status"], "failed", "{old}");
    assert_eq!(old["proposal"]["status"], "executed", "{old}");
    assert_eq!(error_code(&old), "PROPOSAL-EXECUTED-LATE", "{old}");
    let message = old["last_error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&hash) && message.contains(&execution) && message.contains(&again),
        "{message}"
    );
    assert!(
        old["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["from"] != "failed"),
        "{old}"
    );
    assert_eq!(commits(&app).await.len(), 1, "one commit, one replica");
    assert_eq!(proposals(&app).await.len(), 1);
}

/// The late execution of an expired proposal is noticed while the replica's
/// newer request is being stored (its transaction is committing): the
/// follower waits for it, sees it, and leaves the old request failed, so
/// one replica is made, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_execution_noticed_while_the_replica_is_queued_again_revives_nothing() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_and_run(&app).await;
    let first = proposed(&world, &app, &[1]).await.remove(0);
    let (call, _) = proposal_call(&app, &first).await;
    app.clock
        .advance(chrono::Duration::days(7) + chrono::Duration::seconds(1));
    app.drain_all(3).await;
    assert_eq!(app.status_of(&first).await, "failed");
    execute(&world, call).await;
    mine(&world, 3).await;

    // The newer request's commit waits, in a deferred trigger, for an
    // advisory lock the test holds: its transaction stays open until the
    // test lets go, with every lock it took.
    const GATE: i64 = 0x1a7e_9a7e;
    let mut gate = CommitGate::hold(
        &app.db,
        &app.database_url,
        GATE,
        "test_held_insert",
        "AFTER INSERT ON replica_requests",
        None,
    )
    .await;
    let source_lock: i64 = sqlx::query_scalar(
        "SELECT hashtextextended('replica-source:' || source_vm_uuid, 0) FROM replica_requests WHERE id = $1",
    )
    .bind(first.parse::<uuid::Uuid>().unwrap())
    .fetch_one(&app.db)
    .await
    .unwrap();

    let queued_again = queue_node(&app, 1);
    let followed = async {
        gate.until_held().await;
        // The follower notices the execution while the new request commits.
        let follow = app.worker.watch_once();
        tokio::pin!(follow);
        let done = tokio::select! {
            _ = until_waiting_for_advisory_lock(&app.database_url, source_lock) => None,
            done = &mut follow => Some(done),
        };
        gate.open().await;
        match done {
            Some(done) => done,
            None => follow.await,
        }
    };
    let (again, followed) = tokio::join!(queued_again, followed);
    followed.unwrap();
    app.drain_all(10).await;

    let old = app.get_replica(&first).await;
    assert_eq!(old["status"], "failed", "{old}");
    assert_eq!(error_code(&old), "PROPOSAL-EXECUTED-LATE", "{old}");
    assert_eq!(app.status_of(&again).await, "done");
    assert_eq!(commits(&app).await.len(), 1, "one commit, one replica");
}
