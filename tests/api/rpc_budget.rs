//! Every JSON-RPC call of the Safe flow, counted at the RPC as an outside
//! proxy counts them: the planner's passes and the follower's together, as
//! `serve` runs them, with 1 and with 10 open proposals; a planner pass
//! while a batch window is open; and `serve` itself, on a chain that mines
//! on its own, while a backlog of requests drains.

use std::sync::Arc;
use std::time::Duration;

use alloy::providers::Provider;
use approval_bridge::clock::Clock;
use approval_bridge::safe::{Call, Deployment, SafeVersion, build_safe_tx};
use serde_json::json;
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{fresh_database, spawn_app_with, spawn_app_with_clock};
use crate::phala_mock::*;
use crate::rpc_proxy::RpcProxy;
use crate::safe_world::{
    SafeWorld, b256, execute, hex40, mine, mount_commit_and_run, mount_source_on,
};

/// New blocks counted at each number of open proposals.
const BLOCKS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_call_of_the_planner_and_follower_stays_within_budget_per_new_block() {
    let world = SafeWorld::start().await;
    let RpcProxy {
        url: proxy,
        methods,
        ..
    } = RpcProxy::start(world.chain.rpc_url(), None).await;
    let app = world.spawn_bridge_with_rpc(proxy).await;
    // Ten nodes, each a new device: one proposal per replica. Mounted
    // first, so that this node list wins over the three of `mount_source_on`.
    let names: Vec<String> = (1..=10).map(|n| format!("node-{n}")).collect();
    let nodes: Vec<(u32, &str)> = (1..=10u32).zip(names.iter().map(String::as_str)).collect();
    mount_nodes(&app.phala, &nodes).await;
    mount_source_on(&app, world.app, false).await;
    for node in 4..=10u32 {
        Mock::given(method("POST"))
            .and(path(api(&format!("/cvms/{ONCHAIN_VM}/replicas"))))
            .and(header("X-Prepare-Only", "true"))
            .and(body_partial_json(json!({"node_id": node})))
            .respond_with(ResponseTemplate::new(465).set_body_json(prepared_body_for(
                &hex40(world.app),
                31337,
                &format!("token-{node}"),
                node,
                false,
                false,
                true,
            )))
            .mount(&app.phala)
            .await;
    }
    let calls = || methods.lock().unwrap().len();
    // One round as `serve` runs its Safe-flow jobs: a planner pass (stored
    // proposals, new requests, confirmations) and a follower pass.
    let round = || async {
        app.worker.propose_once().await.unwrap();
        app.worker.watch_once().await.unwrap();
    };
    let mut queued = 0u32;
    for open in [1u32, 10] {
        while queued < open {
            queued += 1;
            app.queue(&json!({"source": ONCHAIN_NAME, "node": queued}))
                .await;
            app.drain_all(10).await;
        }
        let proposed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM proposals WHERE status = 'proposed'")
                .fetch_one(&app.db)
                .await
                .unwrap();
        assert_eq!(proposed, open as i64);
        round().await; // the follower catches up with the proposals' blocks

        let mut per_block = Vec::new();
        for _ in 0..BLOCKS {
            mine(&world, 1).await;
            let before = calls();
            round().await;
            per_block.push(methods.lock().unwrap()[before..].to_vec());
            // No new block: the planner reads nothing, the follower polls once.
            for _ in 0..2 {
                let before = calls();
                round().await;
                assert_eq!(
                    methods.lock().unwrap()[before..].to_vec(),
                    ["eth_call"],
                    "a round with no new block costs the poll only ({open} open)"
                );
            }
        }
        let total: usize = per_block.iter().map(Vec::len).sum();
        println!("{open} open: {total} calls over {BLOCKS} new blocks: {per_block:?}");
        assert!(
            total as f64 / BLOCKS as f64 <= 2.5,
            "{open} open: {total} calls over {BLOCKS} new blocks: {per_block:?}"
        );
    }
}

/// While a Safe's batch window is open, a planner pass reads the chain once
/// (what each app allows at the head, with the head's number), however many
/// requests wait in the window; the Safe and the confirmed block are read
/// when the window closes, and the proposal then carries every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planner_pass_within_the_batch_window_reads_the_chain_once() {
    let world = SafeWorld::start().await;
    let RpcProxy {
        url: proxy,
        methods,
        ..
    } = RpcProxy::start(world.chain.rpc_url(), None).await;
    let configure = world.configure(proxy);
    let app = spawn_app_with(|s| {
        configure(s);
        s.safe.batch_window_secs = 60;
    })
    .await;
    mount_source_on(&app, world.app, false).await;

    // A request every 10 s; each is prepared (the request steps alone), then
    // the planner passes.
    let mut ids = Vec::new();
    let mut passes = Vec::new();
    for node in 1..=3u32 {
        let id = app
            .queue(&json!({"source": ONCHAIN_NAME, "node": node}))
            .await
            .remove(0);
        while app.worker.run_once().await.unwrap() {}
        assert_eq!(app.status_of(&id).await, "awaiting_proposal");
        ids.push(id);
        let before = methods.lock().unwrap().len();
        app.worker.propose_once().await.unwrap();
        passes.push(methods.lock().unwrap()[before..].to_vec());
        app.clock.advance(chrono::Duration::seconds(10));
    }
    assert_eq!(
        passes,
        vec![vec!["eth_call".to_owned()]; 3],
        "a pass within the batch window reads the chain once"
    );
    for id in &ids {
        assert_eq!(app.status_of(id).await, "awaiting_proposal");
    }

    // t+61 s: the window is closed; one Safe transaction takes all three.
    app.clock.advance(chrono::Duration::seconds(31));
    app.drain().await;
    let mut hashes = Vec::new();
    for id in &ids {
        let request = app.get_replica(id).await;
        assert_eq!(request["status"], "awaiting_approval", "{request}");
        hashes.push(request["proposal"]["safe_tx_hash"].clone());
    }
    hashes.dedup();
    assert_eq!(hashes.len(), 1, "one proposal: {hashes:?}");
}

/// Requests in the backlog: one per node, each node's device (and the
/// compose hash) allowed on chain before they are queued.
const BACKLOG: u32 = 20;
/// New blocks over which the backlog's calls are counted, at the least.
const BACKLOG_BLOCKS: u64 = 8;
/// How long the follower learns the block time before the count.
const WARM_UP_SECS: u64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_allowed_requests_drains_within_budget_at_1_s_blocks() {
    backlog_drains_within_budget(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_allowed_requests_drains_within_budget_at_12_s_blocks() {
    backlog_drains_within_budget(12).await;
}

/// `serve` (request workers, planner, follower and tracker on their own
/// tasks) with one proposal open, on a chain mining a block every
/// `block_secs`: a backlog of requests whose registrations the chain allows
/// already commits at confirmed depth and ends `done`, and every call the
/// bridge made meanwhile, counted at the RPC over at least
/// [`BACKLOG_BLOCKS`] new blocks, is within 2.5 per new block.
async fn backlog_drains_within_budget(block_secs: u64) {
    let world = SafeWorld::start().await;
    let mut calls = vec![Call::add_compose_hash(world.app, b256(&compose_hash()))];
    calls.extend((1..=BACKLOG).map(|node| Call::add_device(world.app, b256(&device_id(node)))));
    let tx = build_safe_tx(&calls, SafeVersion::V1_4_1, Deployment::Canonical, 0).unwrap();
    execute(&world, tx).await;

    let RpcProxy {
        url: proxy,
        methods,
        ..
    } = RpcProxy::start(world.chain.rpc_url(), None).await;
    let configure = world.configure(proxy);
    let app = spawn_app_with_clock(
        fresh_database().await,
        Arc::new(MockServer::start().await),
        Clock::system(),
        move |s| {
            configure(s);
            s.worker.workers = 2;
            s.trust.quota_per_hour = 1000;
        },
    )
    .await;
    let open_node = BACKLOG + 1;
    let names: Vec<String> = (1..=open_node).map(|n| format!("node-{n}")).collect();
    let nodes: Vec<(u32, &str)> = (1..=open_node)
        .zip(names.iter().map(String::as_str))
        .collect();
    mount_nodes(&app.phala, &nodes).await;
    mount_source_on(&app, world.app, true).await;
    for node in 4..=open_node {
        Mock::given(method("POST"))
            .and(path(api(&format!("/cvms/{ONCHAIN_VM}/replicas"))))
            .and(header("X-Prepare-Only", "true"))
            .and(body_partial_json(json!({"node_id": node})))
            .respond_with(ResponseTemplate::new(465).set_body_json(prepared_body_for(
                &hex40(world.app),
                31337,
                &format!("token-{node}"),
                node,
                true,
                node != open_node,
                true,
            )))
            .mount(&app.phala)
            .await;
    }
    mount_commit_and_run(&app).await;
    let _: bool = world
        .chain
        .provider()
        .raw_request("evm_setIntervalMining".into(), (block_secs,))
        .await
        .unwrap_or(true);

    // One proposal open (the last node's device is not allowed): the
    // follower polls and reads the logs every block.
    let open = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": open_node}))
        .await
        .remove(0);
    app.wait_for_status(std::slice::from_ref(&open), "awaiting_approval", 60)
        .await;

    let marks = mark_blocks(&world, &methods, block_secs);
    // The first mark at or above `block` (a block the watcher missed has none).
    let mark_from = |block: u64| {
        let marks = marks.clone();
        async move {
            loop {
                if let Some((&at, &count)) = marks.lock().unwrap().range(block..).next() {
                    return (at, count);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let proposed_at = world.chain.provider().get_block_number().await.unwrap();
    // The follower learns the block time before the count: from polls a
    // poll interval (2 s) apart, its first estimate at 1 s blocks can be 30%
    // short, and it then polls early, once more per block, until its
    // average has settled (about ten blocks; three at 12 s blocks).
    let (first, start) = mark_from(proposed_at + WARM_UP_SECS.div_ceil(block_secs).max(3)).await;
    let mut ids = Vec::new();
    for node in 1..=BACKLOG {
        ids.extend(
            app.queue(&json!({"source": ONCHAIN_NAME, "node": node}))
                .await,
        );
    }
    app.wait_for_status(&ids, "done", 60 + 12 * block_secs)
        .await;
    let drained = world.chain.provider().get_block_number().await.unwrap();
    let (last, end) = mark_from((drained + 1).max(first + BACKLOG_BLOCKS)).await;
    let blocks = last - first;
    let made = methods.lock().unwrap()[start..end].to_vec();
    let mut by_method = std::collections::BTreeMap::<&str, usize>::new();
    for m in &made {
        *by_method.entry(m.as_str()).or_default() += 1;
    }
    let per_block = made.len() as f64 / blocks as f64;
    println!(
        "{block_secs} s blocks: {BACKLOG} requests drained by block {drained}, {} calls over the \
         {blocks} new blocks {first}..{last} ({per_block:.2} per block): {by_method:?}",
        made.len()
    );
    assert!(
        per_block <= 2.5,
        "{block_secs} s blocks: {} calls over {blocks} new blocks: {by_method:?}",
        made.len()
    );
    assert_eq!(app.status_of(&open).await, "awaiting_approval");
}

/// Where each new block's count starts: the number of calls the proxy had
/// seen half a block after the block arrived (watched on the chain itself,
/// not through the proxy). Calls between two marks are those of whole
/// blocks: the follower's poll and logs for a block come soon after it, so
/// a bound half a block later never splits them, even on a loaded machine
/// where they come a few hundred milliseconds late.
fn mark_blocks(
    world: &SafeWorld,
    methods: &Arc<std::sync::Mutex<Vec<String>>>,
    block_secs: u64,
) -> Arc<std::sync::Mutex<std::collections::BTreeMap<u64, usize>>> {
    let marks = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let provider = world.chain.provider().clone();
    let (methods, kept) = (methods.clone(), marks.clone());
    tokio::spawn(async move {
        let mut seen = provider.get_block_number().await.unwrap();
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let Ok(head) = provider.get_block_number().await else {
                return;
            };
            if head > seen {
                seen = head;
                tokio::time::sleep(Duration::from_millis(block_secs * 500)).await;
                let count = methods.lock().unwrap().len();
                kept.lock().unwrap().insert(head, count);
            }
        }
    });
    marks
}
