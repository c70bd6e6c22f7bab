//! Posting a stored proposal again, refusals that do not pass, and dead
//! nonces: a proposal whose answer was lost is looked up before it is posted
//! again, a refusal that lasts fails the requests with a clear error, and
//! the nonce of the bridge's own expired proposal is used again.

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{B256, Bytes, U256};
use approval_bridge::safe::{Operation, SafeTx};
use serde_json::json;

use crate::helpers::TestApp;
use crate::phala_mock::*;
use crate::safe_doubles::{OnPropose, ServiceDouble, one_planned_request};
use crate::safe_world::{
    SafeWorld, commits, execute, mine, mount_commit_and_run, mount_source_on, proposal_call,
    proposed,
};

async fn stored_hash(app: &TestApp) -> String {
    sqlx::query_scalar("SELECT safe_tx_hash FROM proposals")
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_whose_answer_was_lost_and_that_the_owners_executed_is_committed() {
    let world = SafeWorld::start().await;
    let (app, id) = one_planned_request(&world, OnPropose::AnswerLostOnce).await;
    let hash = stored_hash(&app).await;
    let safe_tx_hash: B256 = hash.parse().unwrap();
    assert_eq!(world.service.proposal_posts(safe_tx_hash), 1);

    // The owners saw it in Safe{Wallet} and executed it.
    let (call, _) = proposal_call(&app, &id).await;
    let execution = execute(&world, call).await;
    mine(&world, 3).await;

    app.clock.advance(chrono::Duration::seconds(11));
    app.drain_all(10).await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "done", "{request}");
    assert_eq!(request["proposal"]["status"], "executed");
    let sent = commits(&app).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["transaction_hash"], execution.as_str());
    assert_eq!(
        world.service.proposal_posts(safe_tx_hash),
        1,
        "not posted again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_proposal_whose_nonce_was_used_meanwhile_is_proposed_afresh() {
    let world = SafeWorld::start().await;
    let (app, id) = one_planned_request(&world, OnPropose::UnavailableOnce).await;
    let first = stored_hash(&app).await;

    // Before the bridge could post it, the owners used nonce 0 for something else.
    execute(
        &world,
        SafeTx::new(world.safe, U256::ZERO, Bytes::new(), Operation::Call, 0),
    )
    .await;
    mine(&world, 3).await;

    app.clock.advance(chrono::Duration::seconds(11));
    app.drain_all(10).await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "awaiting_approval", "{request}");
    assert_ne!(request["proposal"]["safe_tx_hash"], first.as_str());
    assert_eq!(request["proposal"]["nonce"], 1);
    let old: String = sqlx::query_scalar("SELECT status FROM proposals WHERE safe_tx_hash = $1")
        .bind(&first)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(old, "replaced");
    assert_eq!(world.service.proposal_posts(first.parse().unwrap()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_the_service_keeps_refusing_fails_its_requests_after_the_bound() {
    let world = SafeWorld::start().await;
    let (app, id) = one_planned_request(&world, OnPropose::Refuse(403)).await;

    // Retried every 5 minutes; the default bound is an hour.
    for _ in 0..11 {
        app.clock.advance(chrono::Duration::seconds(301));
        app.drain().await;
        assert_eq!(app.status_of(&id).await, "awaiting_proposal");
    }
    for _ in 0..3 {
        app.clock.advance(chrono::Duration::seconds(301));
        app.drain().await;
    }
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "failed", "{request}");
    assert_eq!(request["last_error"]["code"], "SAFE-HTTP-403");
    let message = request["last_error"]["message"].as_str().unwrap();
    assert!(
        message.contains("refused") && message.contains("HTTP 403"),
        "{message}"
    );
    assert!(
        request["last_error"]["suggestion"]
            .as_str()
            .unwrap()
            .contains("API key"),
        "{request}"
    );
    assert_eq!(request["proposal"]["status"], "failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_service_refuses_to_plan_for_fail_after_the_bound() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    let double = Arc::new(ServiceDouble::new(
        &world,
        OnPropose::RefuseAll(401),
        Duration::ZERO,
    ));
    app.worker.safe_flow().unwrap().set_service(31337, double);
    mount_source_on(&app, world.app, false).await;
    let id = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": 1}))
        .await
        .remove(0);
    app.drain().await;
    assert_eq!(app.status_of(&id).await, "awaiting_proposal");

    // Tried again every 30 s; nothing is stored, and after an hour it fails.
    for _ in 0..130 {
        app.clock.advance(chrono::Duration::seconds(31));
        app.drain().await;
    }
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "failed", "{request}");
    assert_eq!(request["last_error"]["code"], "SAFE-HTTP-401");
    assert!(
        request["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("refused the bridge for over 60 minutes"),
        "{request}"
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM proposals")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stored, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_batch_reuses_the_nonce_of_an_expired_proposal() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_and_run(&app).await;
    let expired = proposed(&world, &app, &[1]).await;
    let (_, dead) = proposal_call(&app, &expired[0]).await;
    app.clock
        .advance(chrono::Duration::days(7) + chrono::Duration::seconds(1));
    app.drain_all(3).await;
    assert_eq!(app.status_of(&expired[0]).await, "failed");
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM proposals WHERE status = 'proposed'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(pending, 0, "the expired proposal is no longer pending");

    // The next batch takes nonce 0 again: the expired one can no longer block it.
    let id = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": 2}))
        .await
        .remove(0);
    app.drain_all(10).await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "awaiting_approval", "{request}");
    assert_eq!(request["proposal"]["nonce"], 0, "{request}");
    assert_ne!(request["proposal"]["safe_tx_hash"], dead.as_str());

    let (call, _) = proposal_call(&app, &id).await;
    execute(&world, call).await;
    mine(&world, 3).await;
    app.drain_all(10).await;
    assert_eq!(app.status_of(&id).await, "done");
}
