//! Proposal endings are atomic: a proposal ends together with the moves of
//! its requests, or not at all, and joining an open proposal cannot miss
//! its submission. Failures are injected with Postgres triggers, so a
//! "crash" lands exactly between two writes.

use std::time::Duration;

use alloy::primitives::{Bytes, U256};
use approval_bridge::safe::{Operation, SafeTx};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::commit_gate::CommitGate;
use crate::helpers::TestApp;
use crate::pg_waits::until_waiting_for_a_row;
use crate::phala_mock::*;
use crate::safe_doubles::{OnPropose, ServiceDouble};
use crate::safe_world::{SafeWorld, execute, mine, mount_source_on, proposal_call, proposed};

/// From now on, any change of a request's status fails its transaction, as
/// if the process died right there. `disarm_crash` ends it.
pub async fn arm_crash_on_request_moves(app: &TestApp) {
    for statement in [
        "CREATE TABLE test_crash (armed boolean NOT NULL)",
        "INSERT INTO test_crash VALUES (true)",
        "CREATE FUNCTION test_crash_on_move() RETURNS trigger AS $$
         BEGIN
             IF NEW.status IS DISTINCT FROM OLD.status AND (SELECT armed FROM test_crash) THEN
                 RAISE EXCEPTION 'injected crash before moving request %', OLD.id;
             END IF;
             RETURN NEW;
         END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER test_crash_on_move BEFORE UPDATE ON replica_requests
         FOR EACH ROW EXECUTE FUNCTION test_crash_on_move()",
    ] {
        sqlx::query(statement).execute(&app.db).await.unwrap();
    }
}

pub async fn disarm_crash(app: &TestApp) {
    sqlx::query("UPDATE test_crash SET armed = false")
        .execute(&app.db)
        .await
        .unwrap();
}

async fn proposal_status(app: &TestApp, safe_tx_hash: &str) -> String {
    sqlx::query_scalar("SELECT status FROM proposals WHERE safe_tx_hash = $1")
        .bind(safe_tx_hash)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_expiring_a_proposal_leaves_it_open_for_the_next_pass() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    let ids = proposed(&world, &app, &[1, 2]).await;
    let (_, hash) = proposal_call(&app, &ids[0]).await;

    app.clock
        .advance(chrono::Duration::days(7) + chrono::Duration::seconds(1));
    arm_crash_on_request_moves(&app).await;
    let _ = app.worker.watch_once().await;
    // Nothing half done: the proposal is still open with its requests.
    assert_eq!(proposal_status(&app, &hash).await, "proposed");
    for id in &ids {
        assert_eq!(app.status_of(id).await, "awaiting_approval");
    }

    disarm_crash(&app).await;
    app.drain_all(5).await;
    assert_eq!(proposal_status(&app, &hash).await, "failed");
    for id in &ids {
        let request = app.get_replica(id).await;
        assert_eq!(request["status"], "failed", "{request}");
        assert_eq!(request["last_error"]["code"], "PROPOSAL-EXPIRED");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_ending_a_replaced_proposal_leaves_it_open_for_the_next_pass() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    let ids = proposed(&world, &app, &[1]).await;
    let (_, first_hash) = proposal_call(&app, &ids[0]).await;
    // The owners use nonce 0 for something else.
    execute(
        &world,
        SafeTx::new(world.safe, U256::ZERO, Bytes::new(), Operation::Call, 0),
    )
    .await;
    mine(&world, 3).await;

    arm_crash_on_request_moves(&app).await;
    let _ = app.worker.watch_once().await;
    assert_eq!(proposal_status(&app, &first_hash).await, "proposed");
    assert_eq!(app.status_of(&ids[0]).await, "awaiting_approval");

    disarm_crash(&app).await;
    app.drain_all(10).await;
    assert_eq!(proposal_status(&app, &first_hash).await, "replaced");
    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "awaiting_approval", "{request}");
    assert_ne!(request["proposal"]["safe_tx_hash"], first_hash.as_str());
    assert_eq!(request["proposal"]["nonce"], 1);
}

/// A request that joins a stored proposal while the proposal's submission
/// is being recorded ends up awaiting approval with the others. The join's
/// commit is held by a deferred trigger until the submission has started,
/// so the submission runs in the middle of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_joining_a_proposal_being_submitted_awaits_approval() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    ServiceDouble::install(&app, &world, OnPropose::UnavailableOnce);
    mount_source_on(&app, world.app, false).await;
    let first = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": 1}))
        .await
        .remove(0);
    app.drain().await;
    assert_eq!(app.status_of(&first).await, "awaiting_proposal");
    let (proposal, safe): (Uuid, String) = sqlx::query_as("SELECT id, safe FROM proposals")
        .fetch_one(&app.db)
        .await
        .unwrap();

    // A second request for the same node needs exactly what the proposal registers.
    let second = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": 1}))
        .await
        .remove(0);
    app.steps(2).await;
    assert_eq!(app.status_of(&second).await, "awaiting_proposal");

    // The join's commit waits, in a deferred trigger, for an advisory lock
    // the test holds: the join's own locks stay held until the test lets go.
    const GATE: i64 = 0x5afe_f10e;
    let mut gate = CommitGate::hold(
        &app.db,
        &app.database_url,
        GATE,
        "test_held_link",
        "AFTER UPDATE ON replica_requests",
        Some("OLD.proposal_id IS NULL AND NEW.proposal_id IS NOT NULL"),
    )
    .await;
    let now = app.clock.now();
    let second_id: Uuid = second.parse().unwrap();
    let join = {
        let store = app.store.clone();
        let safe = safe.clone();
        tokio::spawn(async move {
            store
                .join_open_proposal(second_id, proposal, &safe, now, None)
                .await
        })
    };
    // The join is committing, with its locks held.
    gate.until_held().await;
    let submit = {
        let store = app.store.clone();
        tokio::spawn(async move {
            store
                .mark_submitted(proposal, now, "proposed to the Safe", None)
                .await
        })
    };
    // The submission runs in the middle of the join's commit: it waits for
    // the rows the join holds (unless it needs none of them).
    tokio::select! {
        _ = until_waiting_for_a_row(&app.database_url) => {}
        _ = async { while !submit.is_finished() { tokio::time::sleep(Duration::from_millis(5)).await } } => {}
    }
    gate.open().await;
    join.await.unwrap().unwrap();
    submit.await.unwrap().unwrap();

    for id in [&first, &second] {
        let request: Value = app.get_replica(id).await;
        assert_eq!(request["status"], "awaiting_approval", "{request}");
        assert_eq!(request["proposal"]["submitted"], true, "{request}");
    }
}
