//! A gate at the end of a transaction: a deferred trigger makes the commit
//! of chosen `replica_requests` writes wait for an advisory lock the test
//! holds, so that transaction stays open, with every lock it took, until the
//! test lets go. Another writer can then be run in the middle of it.

use sqlx::{Connection, PgConnection, PgPool};

use super::pg_waits::until_waiting_for_advisory_lock;

pub struct CommitGate {
    key: i64,
    database_url: String,
    holder: PgConnection,
}

impl CommitGate {
    /// Takes the lock `key`, then adds the constraint trigger `name`, which
    /// fires on `event` (`AFTER INSERT ON replica_requests`, say) for the
    /// rows that match `when`, and waits for the lock at commit.
    pub async fn hold(
        db: &PgPool,
        database_url: &str,
        key: i64,
        name: &str,
        event: &str,
        when: Option<&str>,
    ) -> Self {
        let mut holder = PgConnection::connect(database_url).await.unwrap();
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(key)
            .execute(&mut holder)
            .await
            .unwrap();
        for statement in [
            format!(
                "CREATE FUNCTION test_held_commit() RETURNS trigger AS $$
                 BEGIN PERFORM pg_advisory_xact_lock({key}); RETURN NULL; END $$ LANGUAGE plpgsql"
            ),
            format!(
                "CREATE CONSTRAINT TRIGGER {name} {event}
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW {}
                 EXECUTE FUNCTION test_held_commit()",
                when.map(|when| format!("WHEN ({when})"))
                    .unwrap_or_default()
            ),
        ] {
            sqlx::query(&statement).execute(db).await.unwrap();
        }
        CommitGate {
            key,
            database_url: database_url.to_owned(),
            holder,
        }
    }

    /// Until a transaction is committing and waits at the gate.
    pub async fn until_held(&self) {
        until_waiting_for_advisory_lock(&self.database_url, self.key).await;
    }

    /// Lets the held commits go on.
    pub async fn open(&mut self) {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(self.key)
            .execute(&mut self.holder)
            .await
            .unwrap();
    }
}
