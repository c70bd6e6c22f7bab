//! Every JSON-RPC call of the Safe flow, counted at the RPC as an outside
//! proxy counts them: the planner's passes and the follower's together, as
//! `serve` runs them, with 1 and with 10 open proposals; and a planner pass
//! while a batch window is open.

use serde_json::json;
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::spawn_app_with;
use crate::phala_mock::*;
use crate::rpc_proxy::RpcProxy;
use crate::safe_world::{SafeWorld, hex40, mine, mount_source_on};

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
