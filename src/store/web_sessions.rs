//! Sign-in nonces and page sessions (`web_nonces`, `web_sessions`).

use chrono::{DateTime, Utc};

use super::Store;

/// A signed-in person, as a session row holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSession {
    pub subject: String,
    pub role: String,
    pub expires_at: DateTime<Utc>,
}

impl Store {
    /// Stores a fresh nonce until `expires_at`, unless `max` live nonces
    /// wait already (`false`): anyone may ask for one, so the table is
    /// bounded. Old ones are swept on the way.
    pub async fn insert_web_nonce(
        &self,
        nonce: &str,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
        max: i64,
    ) -> Result<bool, sqlx::Error> {
        sqlx::query!("DELETE FROM web_nonces WHERE expires_at <= $1", now)
            .execute(&self.pool)
            .await?;
        let inserted = sqlx::query!(
            "INSERT INTO web_nonces (nonce, expires_at)
             SELECT $1, $2 WHERE (SELECT count(*) FROM web_nonces) < $3",
            nonce,
            expires_at,
            max,
        )
        .execute(&self.pool)
        .await?;
        Ok(inserted.rows_affected() == 1)
    }

    /// Uses a nonce up. `false`: unknown, used already, or expired.
    pub async fn take_web_nonce(
        &self,
        nonce: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, sqlx::Error> {
        let taken = sqlx::query_scalar!(
            "DELETE FROM web_nonces WHERE nonce = $1 RETURNING expires_at",
            nonce
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(taken.is_some_and(|expires_at| expires_at > now))
    }

    pub async fn insert_web_session(
        &self,
        id_digest: &[u8],
        subject: &str,
        role: &str,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query!("DELETE FROM web_sessions WHERE expires_at <= $1", now)
            .execute(&self.pool)
            .await?;
        sqlx::query!(
            "INSERT INTO web_sessions (id_digest, subject, role, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5)",
            id_digest,
            subject,
            role,
            now,
            expires_at,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The live session with this digest, if any.
    pub async fn web_session(
        &self,
        id_digest: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Option<WebSession>, sqlx::Error> {
        sqlx::query_as!(
            WebSession,
            "SELECT subject, role, expires_at FROM web_sessions
             WHERE id_digest = $1 AND expires_at > $2",
            id_digest,
            now,
        )
        .fetch_optional(&self.pool)
        .await
    }

    pub async fn delete_web_session(&self, id_digest: &[u8]) -> Result<(), sqlx::Error> {
        sqlx::query!("DELETE FROM web_sessions WHERE id_digest = $1", id_digest)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
