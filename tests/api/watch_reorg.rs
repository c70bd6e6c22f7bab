//! The follower decides only at confirmed depth, from state at least as new
//! as every event it has seen: a replacement at the head waits, a recent
//! `removeDevice` is not read as still allowed, and a stale cursor is caught
//! up one log range per pass.

use alloy::primitives::{Bytes, U256};
use alloy::sol_types::SolCall;
use approval_bridge::safe::{Call, Operation, SafeTx};
use approval_bridge::sandbox::chain::IDstackApp;
use serde_json::json;

use crate::helpers::{TestApp, spawn_app_with};
use crate::phala_mock::*;
use crate::safe_world::{
    SafeWorld, b256, commits, execute, mine, mount_commit_and_run, mount_source_on, proposal_call,
    proposed,
};

async fn proposal_status(app: &TestApp, safe_tx_hash: &str) -> String {
    sqlx::query_scalar("SELECT status FROM proposals WHERE safe_tx_hash = $1")
        .bind(safe_tx_hash)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

async fn cursor(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT block_number FROM chain_cursors")
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_at_the_head_is_decided_only_once_confirmed() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    let ids = proposed(&world, &app, &[1]).await;
    let (_, first) = proposal_call(&app, &ids[0]).await;
    execute(
        &world,
        SafeTx::new(world.safe, U256::ZERO, Bytes::new(), Operation::Call, 0),
    )
    .await;

    // The replacement is in the head block only: a reorg could still undo it.
    app.drain_all(5).await;
    assert_eq!(proposal_status(&app, &first).await, "proposed");
    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "awaiting_approval", "{request}");
    assert_eq!(request["proposal"]["safe_tx_hash"], first.as_str());

    mine(&world, 3).await;
    app.drain_all(10).await;
    assert_eq!(proposal_status(&app, &first).await, "replaced");
    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "awaiting_approval", "{request}");
    assert_eq!(request["proposal"]["nonce"], 1);
}

/// The device was allowed, then removed a block ago; the bridge proposed it
/// again and the owners executed. The state three blocks back still shows
/// the old allowance: it must not count as "allowed by other means".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recent_remove_device_is_not_read_as_still_allowed() {
    let world = SafeWorld::start().await;
    let device = b256(&device_id(1));
    let owners = [world.chain.signer(1), world.chain.signer(2)];
    let executor = world.chain.signer(3);
    world
        .chain
        .exec_calls(
            world.safe,
            &[Call::add_device(world.app, device)],
            &owners,
            &executor,
        )
        .await
        .unwrap();
    mine(&world, 2).await;
    let remove = Call {
        to: world.app,
        value: U256::ZERO,
        data: IDstackApp::removeDeviceCall { deviceId: device }
            .abi_encode()
            .into(),
    };
    world
        .chain
        .exec_calls(world.safe, &[remove], &owners, &executor)
        .await
        .unwrap();

    // The compose hash is allowed: the request needs the device only.
    let app = world.spawn_bridge().await;
    mount_source_on(&app, world.app, true).await;
    mount_commit_and_run(&app).await;
    let id = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": 1}))
        .await
        .remove(0);
    app.drain_all(10).await;
    assert_eq!(app.status_of(&id).await, "awaiting_approval");
    let (call, hash) = proposal_call(&app, &id).await;
    let execution = execute(&world, call).await;

    app.drain_all(5).await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "awaiting_approval", "{request}");
    assert!(commits(&app).await.is_empty(), "nothing committed yet");
    assert_eq!(proposal_status(&app, &hash).await, "proposed");

    mine(&world, 3).await;
    app.drain_all(10).await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "done", "{request}");
    assert_eq!(proposal_status(&app, &hash).await, "executed");
    let sent = commits(&app).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["transaction_hash"], execution.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cursor_is_caught_up_one_log_range_per_pass() {
    let world = SafeWorld::start().await;
    let configure = world.configure(world.chain.rpc_url());
    let app = spawn_app_with(move |s| {
        configure(s);
        s.safe.log_range = 10;
    })
    .await;
    mount_commit_and_run(&app).await;
    let ids = proposed(&world, &app, &[1]).await;
    app.worker.watch_once().await.unwrap();
    let before = cursor(&app).await;

    mine(&world, 100).await;
    app.worker.watch_once().await.unwrap();
    let after = cursor(&app).await;
    assert!(
        after > before && after - before <= 10,
        "the cursor moved from {before} to {after}"
    );

    // It catches up, and the execution after the gap is committed.
    let (call, _) = proposal_call(&app, &ids[0]).await;
    let execution = execute(&world, call).await;
    mine(&world, 3).await;
    app.drain_all(20).await;
    assert_eq!(app.status_of(&ids[0]).await, "done");
    let sent = commits(&app).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["transaction_hash"], execution.as_str());
}
