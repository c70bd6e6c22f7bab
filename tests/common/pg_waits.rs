//! Waits on what Postgres itself reports (`pg_locks`, `pg_stat_activity`),
//! so a test forces the interleaving it needs instead of sleeping and hoping
//! for it. Each polls on a connection of its own, so the pool under test is
//! left alone, and is bounded: a wait that never ends fails the test.

use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio::sync::Mutex;

use super::wait::{self, Pace};

/// Polls `sql` (one boolean, `$1` bound to `key`) until it is true.
async fn until(database_url: &str, what: &str, sql: &str, key: i64) {
    let db = Mutex::new(PgConnection::connect(database_url).await.unwrap());
    let pace = Pace::every(Duration::from_millis(5), Duration::from_secs(60));
    let read = || async {
        let mut db = db.lock().await;
        let done: bool = sqlx::query_scalar(sql)
            .bind(key)
            .fetch_one(&mut *db)
            .await
            .unwrap();
        done
    };
    wait::until_paced(pace, what, read, |done| *done).await;
}

/// Until another session of this database waits for the advisory lock `key`
/// (which the caller holds).
pub async fn until_waiting_for_advisory_lock(database_url: &str, key: i64) {
    until(
        database_url,
        "waiting for the advisory lock",
        "SELECT EXISTS (SELECT 1 FROM pg_locks
                        WHERE locktype = 'advisory' AND NOT granted
                          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                          AND ((classid::bigint << 32) | objid::bigint) = $1)",
        key,
    )
    .await
}

/// Until a session of this database waits for a row another transaction
/// holds (a row lock shows as a wait on that transaction's id, or on the
/// tuple).
pub async fn until_waiting_for_a_row(database_url: &str) {
    until(
        database_url,
        "waiting for a row lock",
        "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                        WHERE a.datname = current_database() AND NOT l.granted
                          AND l.locktype IN ('transactionid', 'tuple') AND $1 = $1)",
        0,
    )
    .await
}

/// Until the app's workers are parked: the LISTEN connection is open, and a
/// worker that takes queued requests has looked for one and found none (its
/// last statement, a claim or the look for the next due time, is the only
/// one that reads `next_attempt_at` of queued requests).
pub async fn until_workers_idle_and_listening(database_url: &str) {
    until(
        database_url,
        "listening",
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                        WHERE datname = current_database() AND pid <> pg_backend_pid()
                          AND query ILIKE 'LISTEN %' AND $1 = $1)",
        0,
    )
    .await;
    until(
        database_url,
        "past a worker's first look for queued requests",
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                        WHERE datname = current_database() AND pid <> pg_backend_pid()
                          AND state = 'idle' AND query LIKE '%''queued''%'
                          AND query LIKE '%next_attempt_at%' AND $1 = $1)",
        0,
    )
    .await;
}
