//! A migrated template database, cloned for each test.
//!
//! Running the migrations for every test costs more than the test itself in
//! much of the fast tier. So the first test of a run migrates a template
//! once, and every test gets `CREATE DATABASE … TEMPLATE` of it: a copy of a
//! few megabytes, made by Postgres without replaying a migration. (crates.io's
//! test database crate works the same way.)
//!
//! The template's name carries a hash of `migrations/`: a run whose
//! migrations differ (another branch, a new migration) makes and uses its own
//! template, and a run with the same migrations reuses the one that exists.
//! Several test binaries or processes may start at once: an advisory lock on
//! the server's base database lets one of them build the template while the
//! others wait, and the template is marked `IS_TEMPLATE` only once it is
//! complete, so a build that died half-way is dropped and made again.
//! `scripts/test` drops the templates with the test databases.

use std::path::Path;

use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::OnceCell;
use uuid::Uuid;

use super::helpers::base_database_url;

/// The advisory lock that serializes building a template ("abtmpl").
const TEMPLATE_LOCK: i64 = 0x6162_746d_706c;

/// This process's template, once it is known to be ready.
static TEMPLATE: OnceCell<String> = OnceCell::const_new();

/// A fresh database for one test, with every migration applied.
pub async fn migrated_database() -> String {
    let template = TEMPLATE.get_or_init(ready_template).await;
    let name = format!("ab_test_{}", Uuid::new_v4().simple());
    let mut conn = connect_base().await;
    sqlx::query(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
        .execute(&mut conn)
        .await
        .expect("clone the template database");
    let _ = conn.close().await;
    url_of(&name)
}

/// `ab_template_` and the first 16 hex digits of a hash of the migrations'
/// names and contents.
fn template_name() -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("the migrations directory")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "sql"))
        .collect();
    files.sort();
    let mut hash = Sha256::new();
    for file in files {
        hash.update(file.file_name().unwrap().as_encoded_bytes());
        hash.update([0]);
        hash.update(std::fs::read(&file).unwrap());
        hash.update([0]);
    }
    format!("ab_template_{}", &hex::encode(hash.finalize())[..16])
}

/// Builds the template unless a complete one exists, under the lock.
async fn ready_template() -> String {
    let name = template_name();
    let mut conn = connect_base().await;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(TEMPLATE_LOCK)
        .execute(&mut conn)
        .await
        .unwrap();
    let complete: Option<bool> =
        sqlx::query_scalar("SELECT datistemplate FROM pg_database WHERE datname = $1")
            .bind(&name)
            .fetch_optional(&mut conn)
            .await
            .unwrap();
    match complete {
        Some(true) => {}
        Some(false) => {
            // A build that stopped half-way: start again.
            sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
                .execute(&mut conn)
                .await
                .expect("drop an incomplete template");
            build(&mut conn, &name).await;
        }
        None => build(&mut conn, &name).await,
    }
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(TEMPLATE_LOCK)
        .execute(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;
    name
}

/// Creates `name`, applies the migrations as the app does, and marks it a
/// template that takes no connections (a clone fails while any is open).
async fn build(conn: &mut PgConnection, name: &str) {
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut *conn)
        .await
        .expect("create the template database");
    let pool = PgPool::connect(&url_of(name)).await.unwrap();
    approval_bridge::store::migrate(&pool)
        .await
        .expect("migrate the template database");
    pool.close().await;
    sqlx::query(&format!(
        "ALTER DATABASE {name} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"
    ))
    .execute(&mut *conn)
    .await
    .expect("mark the template complete");
}

async fn connect_base() -> PgConnection {
    PgConnection::connect(&base_database_url())
        .await
        .expect("Postgres must run on TEST_DATABASE_URL (scripts/test starts it)")
}

fn url_of(name: &str) -> String {
    let base = base_database_url();
    let (prefix, _) = base.rsplit_once('/').expect("database URL has a path");
    format!("{prefix}/{name}")
}
