//! Idempotency keys: a retried call with the same key gets the first answer.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sha2::Sha256;
use sqlx::{Postgres, Transaction};

use super::Store;

/// Hashes an order's body for its idempotency key: HMAC-SHA256 under a key
/// of the server's, so the hash in the database gives nobody a way to test
/// guesses of the env values the body carried.
///
/// Why a key and not the body with its env replaced by the ciphertext: the
/// env is encrypted with a fresh ephemeral key and nonce every time, so the
/// same body would never hash the same twice, and a retry could not be told
/// from a new order.
#[derive(Clone)]
pub struct RequestHasher {
    key: [u8; 32],
}

impl std::fmt::Debug for RequestHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestHasher([redacted])")
    }
}

impl RequestHasher {
    /// The key is derived from `APPROVAL_BRIDGE_SERVER_SECRET`, or else from
    /// the Phala API key: either way a secret the database never holds, and
    /// the same in every process that shares it. The label keeps it apart
    /// from any other use of the same secret.
    pub fn new(server_secret: Option<&SecretString>, phala_api_key: &SecretString) -> Self {
        let (secret, label): (&str, &[u8]) = match server_secret {
            Some(secret) => (secret.expose_secret(), b"approval-bridge idempotency v1"),
            None => (
                phala_api_key.expose_secret(),
                b"approval-bridge idempotency v1 from the Phala API key",
            ),
        };
        let mut mac =
            Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
        mac.update(label);
        RequestHasher {
            key: mac.finalize().into_bytes().into(),
        }
    }

    /// The hash stored with a key: HMAC-SHA256 of the canonical body.
    pub fn hash(&self, canonical_body: &[u8]) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(canonical_body);
        mac.finalize().into_bytes().to_vec()
    }
}

/// The response saved under a key.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum IdempotencyOutcome {
    /// The same key and body came before: answer this again.
    Replay(StoredResponse),
    /// The key was used with a different body.
    Mismatch,
}

impl Store {
    /// The earlier outcome for `(principal, key)`, if it was saved at or
    /// after `expired_before`; an older key has expired and counts as new.
    pub async fn idempotent_response(
        &self,
        principal: &str,
        key: &str,
        request_hash: &[u8],
        expired_before: DateTime<Utc>,
    ) -> Result<Option<IdempotencyOutcome>, sqlx::Error> {
        answer_under_key(&self.pool, principal, key, request_hash, expired_before).await
    }

    /// Saves the response in the transaction that created what it describes,
    /// replacing an expired use of the key (saved before `expired_before`).
    /// Call it under the caller's lock, after the same transaction found no
    /// live use of the key.
    pub async fn save_idempotent_response(
        tx: &mut Transaction<'_, Postgres>,
        principal: &str,
        key: &str,
        request_hash: &[u8],
        response: &StoredResponse,
        now: DateTime<Utc>,
        expired_before: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "INSERT INTO idempotency_keys AS k (principal, key, request_hash, response_status, response_body, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (principal, key) DO UPDATE SET
                request_hash = EXCLUDED.request_hash, response_status = EXCLUDED.response_status,
                response_body = EXCLUDED.response_body, created_at = EXCLUDED.created_at
             WHERE k.created_at < $7",
            principal,
            key,
            request_hash,
            response.status as i16,
            response.body,
            now,
            expired_before,
        )
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// [`Store::idempotent_response`], on the pool or inside a transaction.
pub(super) async fn answer_under_key<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    principal: &str,
    key: &str,
    request_hash: &[u8],
    expired_before: DateTime<Utc>,
) -> Result<Option<IdempotencyOutcome>, sqlx::Error> {
    let row = sqlx::query!(
        "SELECT request_hash, response_status, response_body FROM idempotency_keys
         WHERE principal = $1 AND key = $2 AND created_at >= $3",
        principal,
        key,
        expired_before,
    )
    .fetch_optional(executor)
    .await?;
    Ok(row.map(|row| {
        if row.request_hash == request_hash {
            IdempotencyOutcome::Replay(StoredResponse {
                status: row.response_status as u16,
                body: row.response_body,
            })
        } else {
            IdempotencyOutcome::Mismatch
        }
    }))
}

#[cfg(test)]
mod tests {
    use sha2::Digest;

    use super::*;

    #[test]
    fn the_hash_is_keyed_by_the_server_secret_or_else_the_phala_key() {
        let phala = SecretString::from("phak_one-key".to_owned());
        let secret = SecretString::from("s".repeat(32));
        let body = br#"{"env":{"DB_URL":"postgres://u:hunter2@db/x"},"source":"web-prod"}"#;
        let keyed = RequestHasher::new(Some(&secret), &phala).hash(body);
        assert_ne!(keyed, sha2::Sha256::digest(body).to_vec());
        assert_eq!(keyed, RequestHasher::new(Some(&secret), &phala).hash(body));
        let other = SecretString::from("t".repeat(32));
        assert_ne!(keyed, RequestHasher::new(Some(&other), &phala).hash(body));
        let derived = RequestHasher::new(None, &phala).hash(body);
        assert_ne!(derived, keyed);
        assert_ne!(derived, sha2::Sha256::digest(body).to_vec());
        assert!(!format!("{:?}", RequestHasher::new(Some(&secret), &phala)).contains("sss"));
    }
}
