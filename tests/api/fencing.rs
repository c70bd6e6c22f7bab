//! Fencing of the Safe-flow jobs' writes (`store::job_leases`): a holder
//! whose lease ran out, or was taken over, changes nothing with any write
//! it still makes, whichever job it ran (follower, tracker, planner and
//! poster), and is told so with `StoreError::JobLost`.

use std::time::Duration;

use approval_bridge::domain::Event;
use approval_bridge::store::{
    Acquired, Changes, Cursor, JobLease, ProposalEnd, RequestMove, StoreError, StoredError,
};
use uuid::Uuid;

use crate::helpers::TestApp;
use crate::safe_world::{SafeWorld, mount_commit_and_run, proposed};

async fn hold(app: &TestApp, job: &str, holder: Uuid) -> JobLease {
    match app
        .store
        .acquire_job(job, holder, Duration::from_secs(60))
        .await
        .unwrap()
    {
        Acquired::Held(lease) => lease,
        busy => panic!("{job} is busy: {busy:?}"),
    }
}

/// Every row a job holder writes, as text.
async fn snapshot(app: &TestApp) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT t FROM (
            SELECT to_jsonb(c)::text AS t FROM chain_cursors c
            UNION ALL SELECT to_jsonb(p)::text FROM proposals p
            UNION ALL SELECT to_jsonb(r)::text FROM replica_requests r
            UNION ALL SELECT to_jsonb(e)::text FROM request_events e
         ) rows ORDER BY t",
    )
    .fetch_all(&app.db)
    .await
    .unwrap()
}

fn refused<T: std::fmt::Debug>(what: &str, result: Result<T, StoreError>, job: &str) {
    match result {
        Err(StoreError::JobLost(lost)) => assert_eq!(lost, job, "{what}"),
        other => panic!("{what}: a stale lease's write gave {other:?}"),
    }
}

/// A proposed request, a cursor, and `job` held first by a holder that was
/// paused past its lease and then taken over: the stale lease and the live one.
async fn taken_over(
    world: &SafeWorld,
    app: &TestApp,
    job: &str,
) -> (String, Uuid, JobLease, JobLease) {
    mount_commit_and_run(app).await;
    let request = proposed(world, app, &[1]).await.remove(0);
    let proposal: Uuid = app.get_replica(&request).await["proposal"]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let stale = hold(app, job, Uuid::new_v4()).await;
    let cursor = Cursor {
        block_number: 5,
        block_hash: "0x05".into(),
        apps_touched: true,
    };
    app.store
        .set_cursor(31337, &cursor, app.clock.now(), Some(&stale))
        .await
        .expect("the holder writes while it holds the job");
    // Paused past its lease; another process takes the job.
    sqlx::query("UPDATE job_leases SET expires_at = now() - interval '1 second' WHERE job = $1")
        .bind(job)
        .execute(&app.db)
        .await
        .unwrap();
    let live = hold(app, job, Uuid::new_v4()).await;
    assert!(live.token > stale.token);
    (request, proposal, stale, live)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_lease_was_taken_over_changes_nothing() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    let job = "follower:31337";
    let (request, proposal, stale, live) = taken_over(&world, &app, job).await;
    let request: Uuid = request.parse().unwrap();
    let store = &app.store;
    let now = app.clock.now();
    let err = StoredError::new("CHAIN-FOLLOWER", "stale", None);
    let before = snapshot(&app).await;
    let s = Some(&stale);

    let back = Cursor {
        block_number: 1,
        block_hash: "0x01".into(),
        apps_touched: false,
    };
    refused(
        "set_cursor",
        store.set_cursor(31337, &back, now, s).await,
        job,
    );
    refused(
        "clear_apps_touched",
        store.clear_apps_touched(31337, s).await,
        job,
    );
    refused(
        "observe_execution",
        store
            .observe_execution(proposal, "0xab", 9, "0xcd", true, s)
            .await,
        job,
    );
    refused(
        "forget_executions_from",
        store.forget_executions_from(31337, 0, s).await,
        job,
    );
    refused(
        "note_on_requests",
        store.note_on_requests(proposal, &err, s).await,
        job,
    );
    refused("stop_watching", store.stop_watching(proposal, s).await, job);
    refused(
        "end_proposal",
        store
            .end_proposal(
                proposal,
                ProposalEnd::Expired,
                now,
                Some(&err),
                s,
                |_, _| RequestMove {
                    event: Event::Fail,
                    message: "stale".into(),
                    changes: Changes::default(),
                },
            )
            .await,
        job,
    );
    refused(
        "release_allowed",
        store
            .release_allowed(proposal, &[request], now, "stale", s)
            .await,
        job,
    );
    refused(
        "executed_after_end",
        store.executed_after_end(proposal, now, s).await,
        job,
    );
    assert_eq!(snapshot(&app).await, before, "a stale lease changed rows");

    // The same write with the live lease goes through: the check above
    // would have seen a change.
    store
        .set_cursor(31337, &back, now, Some(&live))
        .await
        .unwrap();
    assert_ne!(snapshot(&app).await, before);
    // A lease that merely ran out, with nobody taking over, fences too.
    sqlx::query("UPDATE job_leases SET expires_at = now() WHERE job = $1")
        .bind(job)
        .execute(&app.db)
        .await
        .unwrap();
    let after = snapshot(&app).await;
    refused(
        "set_cursor after expiry",
        store.set_cursor(31337, &back, now, Some(&live)).await,
        job,
    );
    assert_eq!(snapshot(&app).await, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracker_or_planner_whose_lease_was_taken_over_changes_nothing() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    let job = "planner:31337:stale";
    let (request_id, proposal, stale, _live) = taken_over(&world, &app, job).await;
    let request = app
        .store
        .get_request(request_id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    let store = &app.store;
    let now = app.clock.now();
    let err = StoredError::new("SAFE-HTTP-503", "stale", None);
    let before = snapshot(&app).await;
    let s = Some(&stale);

    // The tracker's writes.
    refused(
        "note_replica_status",
        store
            .note_replica_status(request.id, "running", now, s)
            .await,
        job,
    );
    refused(
        "note_tracking_error",
        store.note_tracking_error(&[request.id], &err, s).await,
        job,
    );
    refused(
        "move_waiting",
        store
            .move_waiting(&request, Event::Fail, now, "stale", Changes::default(), s)
            .await,
        job,
    );
    // The poster's and the planner's.
    refused(
        "mark_submitted",
        store.mark_submitted(proposal, now, "stale", s).await,
        job,
    );
    refused(
        "proposal_retry_later",
        store
            .proposal_retry_later(proposal, now, now + chrono::Duration::hours(1), &err, s)
            .await,
        job,
    );
    refused(
        "reject_proposal",
        store.reject_proposal(proposal, now, &err, true, s).await,
        job,
    );
    refused(
        "set_confirmations",
        store
            .set_confirmations(proposal, now, &["0x01".to_owned()], Some(1), None, s)
            .await,
        job,
    );
    refused(
        "defer_requests",
        store
            .defer_requests(
                &[request.id],
                now + chrono::Duration::hours(1),
                Some(&err),
                s,
            )
            .await,
        job,
    );
    refused(
        "join_open_proposal",
        store
            .join_open_proposal(request.id, proposal, "0x00", now, s)
            .await,
        job,
    );
    assert_eq!(snapshot(&app).await, before, "a stale lease changed rows");
    assert_eq!(app.status_of(&request_id).await, "awaiting_approval");
}
