//! The owners' confirmations are read with one list call per Safe and
//! planner pass, so a pass costs the same with one open proposal as with many.

use std::sync::Arc;
use std::time::Duration;

use approval_bridge::safe::SafeTx;
use serde_json::json;

use crate::phala_mock::*;
use crate::safe_doubles::{OnPropose, ServiceDouble};
use crate::safe_world::{SafeWorld, mount_source_on, post_foreign_proposal, proposal_call};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planner_pass_reads_every_open_proposal_of_a_safe_with_one_call() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    let double = Arc::new(ServiceDouble::new(
        &world,
        OnPropose::Forward,
        Duration::ZERO,
    ));
    app.worker
        .safe_flow()
        .unwrap()
        .set_service(31337, double.clone());
    mount_source_on(&app, world.app, false).await;

    // One more open proposal (at the next nonce) per node; after each, a
    // planner pass with every open proposal due for a read.
    let mut ids = Vec::new();
    let mut calls_per_pass = Vec::new();
    for (nonce, node) in [1u32, 2, 3].into_iter().enumerate() {
        let id = app
            .queue(&json!({"source": ONCHAIN_NAME, "node": node}))
            .await
            .remove(0);
        app.drain_all(10).await;
        let request = app.get_replica(&id).await;
        assert_eq!(request["status"], "awaiting_approval", "{request}");
        assert_eq!(request["proposal"]["nonce"], nonce, "{request}");
        ids.push(id);

        app.clock.advance(chrono::Duration::seconds(4));
        let before = double.calls();
        app.worker.propose_once().await.unwrap();
        calls_per_pass.push(double.calls() - before);
    }
    assert_eq!(
        calls_per_pass,
        [1, 1, 1],
        "one list call, whatever the count"
    );

    // What the list says lands on the right proposal. The proposer (owner
    // 0) confirmed each when it posted; owner 1 confirms the one at nonce 1.
    let (call, hash) = proposal_call(&app, &ids[1]).await;
    post_foreign_proposal(&world, &SafeTx { nonce: 1, ..call }).await;
    assert_eq!(world.service.confirmations(hash.parse().unwrap()).len(), 2);
    app.clock.advance(chrono::Duration::seconds(4));
    app.worker.propose_once().await.unwrap();
    for (id, want) in ids.iter().zip([1, 2, 1]) {
        let proposal = app.get_replica(id).await["proposal"].clone();
        assert_eq!(proposal["confirmations"], want, "{proposal}");
    }
    let mut confirmed: Vec<String> =
        sqlx::query_scalar("SELECT unnest(confirmed_by) FROM proposals WHERE safe_tx_hash = $1")
            .bind(&hash)
            .fetch_all(&app.db)
            .await
            .unwrap();
    confirmed.sort();
    let mut owners: Vec<String> = [0, 1]
        .map(|i| format!("{:#x}", world.chain.address(i)))
        .to_vec();
    owners.sort();
    assert_eq!(confirmed, owners);
}
