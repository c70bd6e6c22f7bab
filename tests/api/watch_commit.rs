//! Watching the chain and committing: from queued to done once the Safe
//! owners execute, with confirmations, reorgs, restarts, replaced and
//! expired proposals, and a bounded number of RPC calls per pass.

use alloy::primitives::{Bytes, U256};
use alloy::providers::Provider;
use approval_bridge::safe::{Call, Deployment, Operation, SafeTx, SafeVersion, build_safe_tx};
use serde_json::json;

use crate::phala_mock::*;
use crate::rpc_proxy::RpcProxy;
use crate::safe_world::{
    SafeWorld, commits, execute, execute_by, mine, mount_commit_and_run, mount_source_on,
    proposal_call, proposed,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_goes_from_queued_to_done_after_the_owners_execute() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_and_run(&app).await;
    let ids = proposed(&world, &app, &[1, 2]).await;
    let (call, _) = proposal_call(&app, &ids[0]).await;
    let execution = execute(&world, call).await;

    // Seen, but not yet buried under 3 blocks: nothing is committed.
    app.drain_all(5).await;
    assert_eq!(app.status_of(&ids[0]).await, "awaiting_approval");
    assert!(commits(&app).await.is_empty());

    mine(&world, 3).await;
    app.drain_all(10).await;
    for id in &ids {
        let request = app.get_replica(id).await;
        assert_eq!(request["status"], "done", "{request}");
        assert_eq!(request["proposal"]["status"], "executed");
        assert_eq!(request["proposal"]["execution_tx_hash"], execution.as_str());
        let statuses: Vec<&str> = request["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["to"].as_str().unwrap())
            .collect();
        assert_eq!(
            statuses,
            [
                "queued",
                "preparing",
                "awaiting_proposal",
                "awaiting_approval",
                "committing",
                "provisioning",
                "done"
            ]
        );
    }
    // Each replica committed exactly once, with the execution's transaction hash.
    let sent = commits(&app).await;
    assert_eq!(sent.len(), 2);
    let mut tokens: Vec<&str> = sent.iter().map(|c| c["token"].as_str().unwrap()).collect();
    tokens.sort();
    assert_eq!(tokens, ["token-1", "token-2"]);
    assert!(
        sent.iter()
            .all(|c| c["transaction_hash"] == execution.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_undone_by_a_reorg_is_never_committed() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_and_run(&app).await;
    let ids = proposed(&world, &app, &[1]).await;
    let (call, hash) = proposal_call(&app, &ids[0]).await;

    let snapshot: U256 = world
        .chain
        .provider()
        .raw_request("evm_snapshot".into(), ())
        .await
        .unwrap();
    execute(&world, call.clone()).await;
    mine(&world, 1).await;
    app.drain_all(5).await; // the follower sees the execution (1 of 3 confirmations)
    let seen: Option<i64> =
        sqlx::query_scalar("SELECT execution_block FROM proposals WHERE safe_tx_hash = $1")
            .bind(&hash)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(seen.is_some(), "the execution was observed");

    // The blocks with the execution are replaced by empty ones, longer than before.
    let reverted: bool = world
        .chain
        .provider()
        .raw_request("evm_revert".into(), (snapshot,))
        .await
        .unwrap();
    assert!(reverted);
    mine(&world, 6).await;
    app.drain_all(5).await;
    assert_eq!(app.status_of(&ids[0]).await, "awaiting_approval");
    assert!(
        commits(&app).await.is_empty(),
        "no commit on a block that is gone"
    );
    let seen: Option<i64> =
        sqlx::query_scalar("SELECT execution_block FROM proposals WHERE safe_tx_hash = $1")
            .bind(&hash)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(seen, None, "the reorged execution is forgotten");

    // Executed again on the new chain: committed once. (Another executor: the
    // first one's cached account nonce belongs to the chain that is gone.)
    execute_by(&world, call, 5).await;
    mine(&world, 3).await;
    app.drain_all(10).await;
    assert_eq!(app.status_of(&ids[0]).await, "done");
    assert_eq!(commits(&app).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_middle_resumes_and_commits_once() {
    let world = SafeWorld::start().await;
    let first = world.spawn_bridge().await;
    mount_commit_and_run(&first).await;
    let ids = proposed(&world, &first, &[1, 2]).await;
    let (call, _) = proposal_call(&first, &ids[0]).await;
    execute(&world, call).await;
    first.drain_all(3).await; // execution observed, not confirmed
    let cursor: i64 = sqlx::query_scalar("SELECT block_number FROM chain_cursors")
        .fetch_one(&first.db)
        .await
        .unwrap();
    assert!(cursor > 0);

    // A new process on the same database, pointing at the same Phala.
    let second = world
        .spawn_bridge_on(&first.database_url, &first.phala)
        .await;
    drop(first.worker.clone());
    mine(&world, 3).await;
    second.drain_all(10).await;
    for id in &ids {
        assert_eq!(second.status_of(id).await, "done");
    }
    assert_eq!(
        commits(&second).await.len(),
        2,
        "each replica committed exactly once"
    );
    // The cursor moved on from where the first process stopped.
    let resumed: i64 = sqlx::query_scalar("SELECT block_number FROM chain_cursors")
        .fetch_one(&second.db)
        .await
        .unwrap();
    assert!(resumed > cursor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonce_used_by_another_transaction_leads_to_a_fresh_proposal() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    let ids = proposed(&world, &app, &[1]).await;
    let (_, first_hash) = proposal_call(&app, &ids[0]).await;
    // The owners reject it: a no-op transaction at the same nonce.
    execute(
        &world,
        SafeTx::new(world.safe, U256::ZERO, Bytes::new(), Operation::Call, 0),
    )
    .await;
    mine(&world, 3).await;
    app.drain_all(10).await;

    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "awaiting_approval", "{request}");
    assert_ne!(request["proposal"]["safe_tx_hash"], first_hash.as_str());
    assert_eq!(request["proposal"]["nonce"], 1);
    let old: String = sqlx::query_scalar("SELECT status FROM proposals WHERE safe_tx_hash = $1")
        .bind(&first_hash)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(old, "replaced");
    let events = request["events"].as_array().unwrap();
    assert!(events.iter().any(|e| {
        e["message"]
            .as_str()
            .unwrap_or("")
            .contains("nonce 0 for another transaction")
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_after_too_many_replaced_proposals() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await; // at most 3 fresh proposals per request
    let ids = proposed(&world, &app, &[1]).await;
    for _ in 0..4 {
        assert_eq!(app.status_of(&ids[0]).await, "awaiting_approval");
        execute(
            &world,
            SafeTx::new(world.safe, U256::ZERO, Bytes::new(), Operation::Call, 0),
        )
        .await;
        mine(&world, 3).await;
        app.drain_all(10).await;
    }
    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "failed");
    assert_eq!(request["last_error"]["code"], "SAFE-NONCE-REPLACED");
    assert!(
        request["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("gave up after 4 proposals")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_nobody_executes_in_time_fails_its_requests() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    let ids = proposed(&world, &app, &[1]).await;
    app.clock.advance(chrono::Duration::days(6));
    app.drain_all(3).await;
    assert_eq!(app.status_of(&ids[0]).await, "awaiting_approval");
    app.clock
        .advance(chrono::Duration::days(1) + chrono::Duration::seconds(1));
    app.drain_all(3).await;
    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "failed");
    assert_eq!(request["last_error"]["code"], "PROPOSAL-EXPIRED");
    assert!(
        request["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("within 7 days")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_allowed_by_other_means_release_the_requests() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_and_run(&app).await;
    // A foreign proposal holds nonce 0, so the bridge's takes nonce 1.
    let foreign = [
        Call::add_device(world.app, crate::safe_world::b256(&device_id(1))),
        Call::add_compose_hash(world.app, crate::safe_world::b256(&compose_hash())),
    ];
    let foreign = build_safe_tx(&foreign, SafeVersion::V1_4_1, Deployment::Canonical, 0).unwrap();
    crate::safe_world::post_foreign_proposal(&world, &foreign).await;
    let ids = proposed(&world, &app, &[1]).await;
    assert_eq!(app.get_replica(&ids[0]).await["proposal"]["nonce"], 1);

    // The owners execute the foreign one, which registers what we needed.
    execute(&world, foreign).await;
    mine(&world, 3).await;
    app.drain_all(10).await;
    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "done", "{request}");
    assert_eq!(request["proposal"]["status"], "superseded");
    let sent = commits(&app).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["transaction_hash"], "already-registered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_calls_per_new_block_stay_within_budget_whatever_the_open_proposals() {
    let world = SafeWorld::start().await;
    let RpcProxy {
        url: proxy,
        methods,
        ..
    } = RpcProxy::start(world.chain.rpc_url(), None).await;
    let app = world.spawn_bridge_with_rpc(proxy).await;
    mount_source_on(&app, world.app, false).await;
    let mut per_new_block = Vec::new();
    for node in 1..=3u32 {
        // One more open proposal each round (a new device each time).
        app.queue(&json!({"source": ONCHAIN_NAME, "node": node}))
            .await;
        app.drain_all(10).await;
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM proposals WHERE status = 'proposed'")
                .fetch_one(&app.db)
                .await
                .unwrap();
        assert_eq!(open, node as i64);
        for _ in 0..2 {
            mine(&world, 1).await; // a new block to process
            let before = methods.lock().unwrap().len();
            app.worker.watch_once().await.unwrap();
            per_new_block.push(methods.lock().unwrap()[before..].to_vec());

            // The same head again: one call, the poll (which also reads
            // the head's state), nothing else.
            let before = methods.lock().unwrap().len();
            app.worker.watch_once().await.unwrap();
            assert_eq!(
                methods.lock().unwrap()[before..].to_vec(),
                ["eth_call"],
                "a poll that finds no new block"
            );
        }
    }
    println!("RPC calls per new block with 1..=3 open proposals: {per_new_block:?}");
    for calls in &per_new_block {
        // The poll that finds the block, and its logs.
        assert_eq!(calls, &["eth_call", "eth_getLogs"], "over budget");
        assert!(
            !calls
                .iter()
                .any(|m| m == "eth_chainId" || m == "eth_getBlockByNumber"),
            "the chain id is read once, and known hashes are not fetched again: {calls:?}"
        );
    }
    let chain_ids = methods
        .lock()
        .unwrap()
        .iter()
        .filter(|m| *m == "eth_chainId")
        .count();
    assert_eq!(chain_ids, 2, "start-up and the follower's first pass");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_ranges_are_split_when_the_provider_refuses_them() {
    let world = SafeWorld::start().await;
    // The provider takes at most 4 blocks per eth_getLogs; the bridge asks for 2000.
    let proxy = RpcProxy::start(world.chain.rpc_url(), Some(4)).await.url;
    let app = world.spawn_bridge_with_rpc(proxy).await;
    mount_commit_and_run(&app).await;
    let ids = proposed(&world, &app, &[1]).await;
    mine(&world, 20).await;
    let (call, _) = proposal_call(&app, &ids[0]).await;
    execute(&world, call).await;
    mine(&world, 3).await;
    app.drain_all(10).await;
    assert_eq!(app.status_of(&ids[0]).await, "done");
    assert_eq!(commits(&app).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_any_device_turned_on_elsewhere_releases_the_requests() {
    use alloy::sol_types::SolCall;
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_and_run(&app).await;
    // The owners' own proposal at nonce 0: any device, and the compose hash.
    let any_device =
        approval_bridge::sandbox::chain::IDstackApp::setAllowAnyDeviceCall { allowAny: true };
    let foreign = [
        Call {
            to: world.app,
            value: U256::ZERO,
            data: any_device.abi_encode().into(),
        },
        Call::add_compose_hash(world.app, crate::safe_world::b256(&compose_hash())),
    ];
    let foreign = build_safe_tx(&foreign, SafeVersion::V1_4_1, Deployment::Canonical, 0).unwrap();
    crate::safe_world::post_foreign_proposal(&world, &foreign).await;
    let ids = proposed(&world, &app, &[2, 3]).await;

    execute(&world, foreign).await;
    mine(&world, 3).await;
    app.drain_all(10).await;
    for id in &ids {
        let request = app.get_replica(id).await;
        assert_eq!(request["status"], "done", "{request}");
        assert_eq!(request["proposal"]["status"], "superseded");
    }
    assert_eq!(commits(&app).await.len(), 2);
}
