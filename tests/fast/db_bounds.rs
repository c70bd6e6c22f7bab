//! The database is bounded, and it is the clock: no statement, lock wait or
//! idle transaction outlives its setting, intake answers the database's
//! trouble clearly and in time, an order whose COMMIT answer was lost is
//! answered by what was stored, and a process whose clock is off computes
//! every time in the database's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use approval_bridge::clock::Clock;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;
use crate::pg_proxy::{PgFault, PgProxy};
use crate::phala_mock::*;

/// Far below the HTTP timeout (90 s): an answer within it is "prompt".
const PROMPT: Duration = Duration::from_secs(30);

fn ids_of(json: &Value) -> Vec<uuid::Uuid> {
    json["replicas"]
        .as_array()
        .unwrap_or_else(|| panic!("no replicas in {json}"))
        .iter()
        .map(|r| r["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

async fn stored(db: &PgPool, ids: &[uuid::Uuid]) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM replica_requests WHERE id = ANY($1)")
        .bind(ids)
        .fetch_one(db)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_order_whose_quota_lock_is_held_elsewhere_answers_503_promptly_and_stores_nothing() {
    let app = spawn_app_with(|s| s.database.db_lock_timeout_secs = 1).await;
    mount_onchain_source(&app.phala, &[]).await;
    // Another transaction, stuck with the caller's quota lock.
    let mut holder = PgConnection::connect(&app.database_url).await.unwrap();
    let mut stuck = holder.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('quota:' || $1, 0))")
        .bind("api:ci-bot")
        .execute(&mut *stuck)
        .await
        .unwrap();

    let started = Instant::now();
    let response = app.post_replicas(&json!({"source": ONCHAIN_NAME})).await;
    let (code, message) = error_of(response, 503).await;
    assert!(started.elapsed() < PROMPT, "{:?}", started.elapsed());
    assert_eq!(code, "database_busy");
    assert!(message.contains("quota lock"), "{message}");
    assert!(message.contains("nothing was stored"), "{message}");
    assert_eq!(app.request_count().await, 0);

    // Once the lock is free, the same order is stored.
    stuck.rollback().await.unwrap();
    assert_eq!(app.queue(&json!({"source": ONCHAIN_NAME})).await.len(), 1);
}

#[tokio::test]
async fn every_pooled_connection_is_bounded_and_a_long_statement_is_cut() {
    let app = spawn_app_with(|s| {
        s.database.db_statement_timeout_secs = 1;
        s.database.db_idle_in_transaction_timeout_secs = 7;
        s.database.db_keepalive_secs = 9;
    })
    .await;
    let started = Instant::now();
    let err = sqlx::query("SELECT pg_sleep(60)")
        .execute(&app.db)
        .await
        .unwrap_err();
    assert!(started.elapsed() < PROMPT, "{:?}", started.elapsed());
    let code = err.as_database_error().and_then(|e| e.code());
    assert_eq!(code.as_deref(), Some("57014"), "{err}"); // query_canceled

    let mut conn = app.db.acquire().await.unwrap();
    for (setting, value) in [
        ("statement_timeout", "1s"),
        ("lock_timeout", "5s"),
        ("idle_in_transaction_session_timeout", "7s"),
        ("tcp_keepalives_idle", "9"),
        ("tcp_keepalives_interval", "3"),
        ("tcp_keepalives_count", "3"),
    ] {
        let shown: String = sqlx::query_scalar(&format!("SHOW {setting}"))
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(shown, value, "{setting}");
    }
}

#[tokio::test]
async fn an_idle_transaction_is_ended_and_its_lock_released() {
    let app = spawn_app_with(|s| s.database.db_idle_in_transaction_timeout_secs = 1).await;
    mount_onchain_source(&app.phala, &[]).await;
    // A pooled connection whose holder forgot its transaction, with the quota lock.
    let mut forgotten = app.db.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('quota:' || $1, 0))")
        .bind("api:ci-bot")
        .execute(&mut *forgotten)
        .await
        .unwrap();
    // The server ends that session by itself; then the lock is free.
    let direct = PgPool::connect(&app.database_url).await.unwrap();
    let ended = async {
        loop {
            let idle: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND state = 'idle in transaction'",
            )
            .fetch_one(&direct)
            .await
            .unwrap();
            if idle == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(PROMPT, ended)
        .await
        .expect("the idle transaction is ended");
    assert_eq!(app.queue(&json!({"source": ONCHAIN_NAME})).await.len(), 1);
    drop(forgotten);
}

/// The app, on a fresh database reached through a [`PgProxy`].
async fn app_behind_proxy() -> (TestApp, PgProxy, PgPool) {
    let database_url = fresh_database().await;
    let proxy = PgProxy::start(&database_url).await;
    let app = spawn_app_on(
        proxy.url.clone(),
        Arc::new(MockServer::start().await),
        |_| {},
    )
    .await;
    mount_onchain_source(&app.phala, &[]).await;
    let direct = PgPool::connect(&database_url).await.unwrap();
    (app, proxy, direct)
}

#[tokio::test]
async fn an_order_whose_commit_answer_was_lost_is_answered_202_as_stored() {
    let (app, proxy, direct) = app_behind_proxy().await;
    proxy.arm(PgFault::CommitAnswerLost);

    let response = app
        .post_replicas(&json!({"source": ONCHAIN_NAME, "count": 2}))
        .await;
    assert_eq!(proxy.tripped(), 1, "the COMMIT's answer was lost");
    let status = response.status();
    let json: Value = response.json().await.unwrap();
    assert_eq!(status, 202, "{json}");
    let ids = ids_of(&json);
    assert_eq!(ids.len(), 2);
    assert_eq!(stored(&direct, &ids).await, 2);
    assert_eq!(app.request_count().await, 2, "stored once");
}

#[tokio::test]
async fn an_order_whose_commit_never_arrived_answers_503_and_stores_nothing() {
    let (app, proxy, direct) = app_behind_proxy().await;
    proxy.arm(PgFault::CommitLost);

    let response = app
        .post_replicas_with(json!({"source": ONCHAIN_NAME}).to_string(), Some("k-1"))
        .await;
    assert_eq!(proxy.tripped(), 1);
    let (code, message) = error_of(response, 503).await;
    assert_eq!(code, "database_unavailable");
    assert!(message.contains("not stored"), "{message}");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM replica_requests")
        .fetch_one(&direct)
        .await
        .unwrap();
    assert_eq!(count, 0);

    // Sent again, it is stored: the key was not used.
    let response = app
        .post_replicas_with(json!({"source": ONCHAIN_NAME}).to_string(), Some("k-1"))
        .await;
    assert_eq!(response.status(), 202);
    assert_eq!(app.request_count().await, 1);
}

async fn database_now(db: &PgPool) -> chrono::DateTime<chrono::Utc> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_process_whose_clock_is_an_hour_off_computes_due_times_in_database_time() {
    for skew in [chrono::Duration::hours(1), chrono::Duration::hours(-1)] {
        let app = spawn_app_with_clock(
            fresh_database().await,
            Arc::new(MockServer::start().await),
            Clock::skewed_system(skew),
            |_| {},
        )
        .await;
        mount_onchain_source(&app.phala, &[]).await;
        Mock::given(method("POST"))
            .and(path(api(&format!("/cvms/{ONCHAIN_VM}/replicas"))))
            .respond_with(ResponseTemplate::new(503).set_body_string("upstream busy"))
            .mount(&app.phala)
            .await;
        let near = |at: chrono::DateTime<chrono::Utc>, db: chrono::DateTime<chrono::Utc>| {
            (at - db).abs() < chrono::Duration::seconds(10)
        };
        assert!(near(app.clock.now(), database_now(&app.db).await), "{skew}");

        let id: uuid::Uuid = app.queue(&json!({"source": ONCHAIN_NAME})).await[0]
            .parse()
            .unwrap();
        let created: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar("SELECT created_at FROM replica_requests WHERE id = $1")
                .bind(id)
                .fetch_one(&app.db)
                .await
                .unwrap();
        assert!(
            near(created, database_now(&app.db).await),
            "{skew}: {created}"
        );

        // queued → preparing, then a prepare that fails: retried after the backoff.
        app.steps(2).await;
        let (attempts, due_in): (i32, f64) = sqlx::query_as(
            "SELECT attempts, extract(epoch FROM next_attempt_at - now())::float8
             FROM replica_requests WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap();
        assert_eq!(attempts, 1);
        // The backoff is 2 s with jitter, on the database's clock.
        assert!(
            (-10.0..60.0).contains(&due_in),
            "{skew}: due in {due_in} s of the database's time"
        );
    }
}
