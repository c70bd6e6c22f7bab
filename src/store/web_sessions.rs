//! Used sign-in nonces and page sessions (`web_nonces`, `web_sessions`).

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
    /// Marks a sign-in nonce used until it expires. `false`: used already.
    /// Nonces are stateless (`web::signin`), so this table holds only used
    /// ones, and only of people who may sign in. Expired ones are swept on
    /// the way.
    pub async fn use_web_nonce(
        &self,
        nonce: &str,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<bool, sqlx::Error> {
        sqlx::query!("DELETE FROM web_nonces WHERE expires_at <= $1", now)
            .execute(&self.pool)
            .await?;
        let inserted = sqlx::query!(
            "INSERT INTO web_nonces (nonce, expires_at) VALUES ($1, $2)
             ON CONFLICT (nonce) DO NOTHING",
            nonce,
            expires_at,
        )
        .execute(&self.pool)
        .await?;
        Ok(inserted.rows_affected() == 1)
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

    /// Ends every session of one person ("sign out everywhere"); how many.
    pub async fn delete_web_sessions_of(&self, subject: &str) -> Result<u64, sqlx::Error> {
        let ended = sqlx::query!("DELETE FROM web_sessions WHERE subject = $1", subject)
            .execute(&self.pool)
            .await?;
        Ok(ended.rows_affected())
    }

    /// Ends every session of everyone; how many.
    pub async fn delete_all_web_sessions(&self) -> Result<u64, sqlx::Error> {
        let ended = sqlx::query!("DELETE FROM web_sessions")
            .execute(&self.pool)
            .await?;
        Ok(ended.rows_affected())
    }
}
