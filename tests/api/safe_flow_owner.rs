//! One owner per Safe-flow task: the planner of each Safe and the follower
//! of each chain run as leased jobs on their own tasks. Two processes on one
//! database never run the same pass at once, the second takes over when the
//! first stops renewing, and a backlog of request steps does not starve them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{TestApp, spawn_app_on, spawn_app_with};
use crate::phala_mock::*;
use crate::safe_doubles::{OnPropose, ServiceDouble};
use crate::safe_world::{
    SafeWorld, execute, hex40, mine, mount_commit_and_run, mount_source_on, proposal_call, proposed,
};
use crate::wait::{self, Pace};

/// Polls `check` every 100 ms until it holds or `limit` passes.
async fn wait_for<F, Fut>(limit: Duration, what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let pace = Pace::every(Duration::from_millis(100), limit);
    wait::until_paced(pace, what, check, |done| *done).await;
}

/// Sets the earlier of two manual clocks to the other's time: what one
/// process makes due is then due for the other as well.
fn same_time(first: &TestApp, second: &TestApp) {
    let gap = second.clock.now() - first.clock.now();
    assert!(gap >= chrono::Duration::zero());
    first.clock.advance(gap);
}

/// Runs `app`'s workers (one request task) until the token is cancelled.
fn run_workers(app: &TestApp) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let worker = app.worker.clone();
    let token = stop.clone();
    let handle = tokio::spawn(async move { worker.run(1, token).await.unwrap() });
    (stop, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_never_run_the_same_safe_flow_pass_at_once() {
    let world = SafeWorld::start().await;
    let first = world.spawn_bridge().await;
    let second = world
        .spawn_bridge_on(&first.database_url, &first.phala)
        .await;
    same_time(&first, &second);
    // Both talk to the service through one double whose calls are slow, so
    // two planners at work would overlap there.
    let double = Arc::new(ServiceDouble::new(
        &world,
        OnPropose::Forward,
        Duration::from_millis(300),
    ));
    for app in [&first, &second] {
        app.worker
            .safe_flow()
            .unwrap()
            .set_service(31337, double.clone());
    }
    mount_source_on(&first, world.app, false).await;
    let (stop_first, run_first) = run_workers(&first);
    let (stop_second, run_second) = run_workers(&second);

    for node in 1..=3u32 {
        let id = first
            .queue(&json!({"source": ONCHAIN_NAME, "node": node}))
            .await
            .remove(0);
        wait_for(Duration::from_secs(30), "the proposal", || async {
            first.status_of(&id).await == "awaiting_approval"
        })
        .await;
    }
    assert!(double.calls() >= 6, "{} calls", double.calls());
    assert_eq!(double.max_in_flight(), 1, "two planners overlapped");
    let proposals: i64 = sqlx::query_scalar("SELECT count(*) FROM proposals")
        .fetch_one(&first.db)
        .await
        .unwrap();
    assert_eq!(proposals, 3);

    stop_first.cancel();
    stop_second.cancel();
    run_first.await.unwrap();
    run_second.await.unwrap();
}

/// Who holds `job` now, and with which token.
async fn holder_of(app: &TestApp, job: &str) -> Option<(uuid::Uuid, i64)> {
    sqlx::query_as("SELECT holder, token FROM job_leases WHERE job = $1")
        .bind(job)
        .fetch_optional(&app.db)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_process_takes_over_a_job_within_one_lease_of_its_holder_dying() {
    const LEASE: u64 = 3;
    let world = SafeWorld::start().await;
    let settings = |world: &SafeWorld| {
        let configure = world.configure(world.chain.rpc_url());
        move |s: &mut approval_bridge::config::Settings| {
            configure(s);
            s.safe.safe_flow_lease_secs = LEASE;
        }
    };
    let first = spawn_app_with(settings(&world)).await;
    let second = spawn_app_on(
        first.database_url.clone(),
        first.phala.clone(),
        settings(&world),
    )
    .await;
    same_time(&first, &second);
    mount_source_on(&first, world.app, false).await;
    let apps = [&first, &second];
    let runs = [run_workers(&first), run_workers(&second)];

    let job = format!("planner:31337:{:#x}", world.safe);
    wait_for(Duration::from_secs(10), "a planner", || async {
        holder_of(&first, &job).await.is_some()
    })
    .await;
    let (holder, token) = holder_of(&first, &job).await.unwrap();
    let dying = apps
        .iter()
        .position(|app| app.worker.safe_flow().unwrap().owner_id() == holder)
        .expect("one of the two holds it");
    let survivor = apps[1 - dying];
    // Killed: no shutdown, so the lease is neither renewed nor released.
    runs[dying].1.abort();
    let died = Instant::now();

    wait_for(Duration::from_secs(LEASE + 5), "the takeover", || async {
        holder_of(&first, &job).await.unwrap().0 != holder
    })
    .await;
    let took = died.elapsed();
    println!("the planner job was taken over {took:?} after its holder died (lease {LEASE} s)");
    assert!(
        took <= Duration::from_millis(LEASE * 1000 + 500),
        "{took:?}"
    );
    let (new_holder, new_token) = holder_of(&first, &job).await.unwrap();
    assert_eq!(new_holder, survivor.worker.safe_flow().unwrap().owner_id());
    assert!(new_token > token);

    // The survivor plans from now on.
    let id = survivor
        .queue(&json!({"source": ONCHAIN_NAME, "node": 1}))
        .await
        .remove(0);
    wait_for(Duration::from_secs(20), "the proposal", || async {
        survivor.status_of(&id).await == "awaiting_approval"
    })
    .await;
    runs[1 - dying].0.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_of_request_steps_does_not_starve_the_follower() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_and_run(&app).await;
    let ids = proposed(&world, &app, &[1]).await;
    let (call, _) = proposal_call(&app, &ids[0]).await;
    execute(&world, call).await;
    mine(&world, 3).await;

    // Twenty requests for node 2 whose prepares take 300 ms each.
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/replicas"))))
        .and(header("X-Prepare-Only", "true"))
        .and(body_partial_json(json!({"node_id": 2})))
        .respond_with(
            ResponseTemplate::new(465)
                .set_body_json(prepared_body_for(
                    &hex40(world.app),
                    31337,
                    "token-slow",
                    2,
                    false,
                    false,
                    true,
                ))
                .set_delay(Duration::from_millis(300)),
        )
        .with_priority(1)
        .mount(&app.phala)
        .await;
    let mut backlog = Vec::new();
    for _ in 0..20 {
        backlog.extend(app.queue(&json!({"source": ONCHAIN_NAME, "node": 2})).await);
    }

    let (stop, run) = run_workers(&app);
    wait_for(Duration::from_secs(30), "the follower", || async {
        app.status_of(&ids[0]).await != "awaiting_approval"
    })
    .await;
    let mut unprepared = 0;
    for id in &backlog {
        if matches!(app.status_of(id).await.as_str(), "queued" | "preparing") {
            unprepared += 1;
        }
    }
    println!("requests not yet prepared when the follower moved: {unprepared} of 20");
    assert!(
        unprepared >= 10,
        "the follower waited for the backlog: {unprepared} left"
    );
    stop.cancel();
    run.await.unwrap();
}
