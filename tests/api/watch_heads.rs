//! How the follower learns of new blocks: from a `newHeads` subscription
//! when the chain has a WebSocket URL, by polling when it has none or the
//! WebSocket is down.

use std::time::Duration;

use approval_bridge::config::RpcUrls;
use reqwest::Url;

use crate::helpers::{TestApp, spawn_app_with};
use crate::rpc_proxy::RpcProxy;
use crate::safe_world::{
    SafeWorld, commits, execute, mine, mount_commit_and_run, proposal_call, proposed,
};

async fn bridge_with_ws(world: &SafeWorld, rpc: Url, ws: Url) -> TestApp {
    let configure = world.configure(rpc);
    spawn_app_with(move |s| {
        configure(s);
        s.safe.ws_urls = RpcUrls(vec![(31337, ws)]);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_websocket_new_blocks_cost_no_eth_block_number() {
    let world = SafeWorld::start().await;
    let RpcProxy {
        url: proxy,
        methods,
        ..
    } = RpcProxy::start(world.chain.rpc_url(), None).await;
    let app = bridge_with_ws(&world, proxy, world.chain.ws_url()).await;
    mount_commit_and_run(&app).await;
    let ids = proposed(&world, &app, &[1]).await;

    // The subscription opens at the follower's first pass; once a header
    // came through it, a pass with no new block asks the RPC nothing (a
    // poll would ask once).
    let mut subscribed = None;
    for _ in 0..50 {
        mine(&world, 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = methods.lock().unwrap().len();
        app.worker.watch_once().await.unwrap();
        let pass = methods.lock().unwrap()[before..].to_vec();
        let before = methods.lock().unwrap().len();
        app.worker.watch_once().await.unwrap();
        if methods.lock().unwrap()[before..].is_empty() {
            subscribed = Some(pass);
            break;
        }
    }
    let pass = subscribed.expect("a pass that learnt the head from newHeads");
    assert!(pass.len() <= 2, "{pass:?}");
    assert!(!pass.iter().any(|m| m == "eth_blockNumber"), "{pass:?}");

    let (call, _) = proposal_call(&app, &ids[0]).await;
    execute(&world, call).await;
    mine(&world, 3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.drain_all(10).await;
    assert_eq!(app.status_of(&ids[0]).await, "done");
    assert_eq!(commits(&app).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_that_is_down_falls_back_to_polling() {
    let world = SafeWorld::start().await;
    let dead: Url = "ws://127.0.0.1:9/".parse().unwrap();
    let app = bridge_with_ws(&world, world.chain.rpc_url(), dead).await;
    mount_commit_and_run(&app).await;
    let ids = proposed(&world, &app, &[1]).await;
    let (call, _) = proposal_call(&app, &ids[0]).await;
    execute(&world, call).await;
    mine(&world, 3).await;
    app.drain_all(10).await;
    assert_eq!(app.status_of(&ids[0]).await, "done");
    assert_eq!(commits(&app).await.len(), 1);
}
