//! `POST /webhooks/ci`: CI systems queue replicas with a signed request.
//!
//! `X-Bridge-Signature: sha256=<hex HMAC-SHA256(secret, "{timestamp}.{raw body}")>`
//! with `X-Bridge-Timestamp: <unix seconds>`. Each CI client has its own secret;
//! the one that verifies names the caller.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use super::AppState;
use super::error::ApiError;
use super::intake::{self, RawBody};
use crate::config::NamedSecrets;
use crate::domain::Actor;

pub const TIMESTAMP_HEADER: &str = "x-bridge-timestamp";
pub const SIGNATURE_HEADER: &str = "x-bridge-signature";
/// Signed requests older (or further in the future) than this are refused.
pub const MAX_SKEW_SECS: i64 = 300;

#[derive(Clone, Debug, Default)]
pub struct WebhookSecrets {
    clients: Vec<(String, SecretString)>,
}

impl WebhookSecrets {
    pub fn new(secrets: &NamedSecrets) -> Self {
        WebhookSecrets {
            clients: secrets.0.clone(),
        }
    }

    /// Checks the timestamp window and the signature; returns the CI client's name.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now_unix: i64,
    ) -> Result<String, ApiError> {
        let timestamp = header(headers, TIMESTAMP_HEADER)?;
        let unix: i64 = timestamp
            .parse()
            .map_err(|_| ApiError::unauthorized("X-Bridge-Timestamp must be unix seconds"))?;
        if (now_unix - unix).abs() > MAX_SKEW_SECS {
            return Err(ApiError::unauthorized(
                "X-Bridge-Timestamp is more than 5 minutes away from the server's clock; sign the request again",
            ));
        }
        let signature = header(headers, SIGNATURE_HEADER)?;
        let signature = signature
            .strip_prefix("sha256=")
            .and_then(|hex_sig| hex::decode(hex_sig).ok())
            .ok_or_else(|| ApiError::unauthorized("X-Bridge-Signature must be `sha256=<hex>`"))?;

        let mut matched = None;
        for (name, secret) in &self.clients {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
                .expect("HMAC takes keys of any length");
            mac.update(timestamp.as_bytes());
            mac.update(b".");
            mac.update(body);
            // `verify_slice` compares in constant time.
            if mac.verify_slice(&signature).is_ok() {
                matched = Some(name.clone());
            }
        }
        matched
            .ok_or_else(|| ApiError::unauthorized("the signature matches no configured CI client"))
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .ok_or_else(|| ApiError::unauthorized(format!("missing {name} header")))
}

/// Same body and answer as `POST /api/v1/replicas`. Without an
/// `Idempotency-Key`, the signature serves as one: a replayed delivery gets the
/// first answer and creates nothing.
pub async fn ci_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let client = state
        .webhook_secrets
        .verify(&headers, &body, state.clock.now().timestamp())?;
    let key = match intake::idempotency_key(&headers)? {
        Some(key) => Some(key),
        None => Some(format!("signature:{}", header(&headers, SIGNATURE_HEADER)?)),
    };
    intake::submit(&state, Actor::CiClient(client), key, &body).await
}

/// Signs a body as a CI client would (for tests, the sandbox and docs).
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_named_secrets;

    fn secrets() -> WebhookSecrets {
        WebhookSecrets::new(
            &parse_named_secrets("github=first-secret,gitlab=second-secret").unwrap(),
        )
    }

    fn headers(timestamp: i64, signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(TIMESTAMP_HEADER, timestamp.to_string().parse().unwrap());
        headers.insert(SIGNATURE_HEADER, signature.parse().unwrap());
        headers
    }

    #[test]
    fn each_client_is_recognised_by_its_own_secret() {
        let body = br#"{"source":"a"}"#;
        let now = 1_800_000_000;
        assert_eq!(
            secrets()
                .verify(&headers(now, &sign("first-secret", now, body)), body, now)
                .unwrap(),
            "github"
        );
        assert_eq!(
            secrets()
                .verify(&headers(now, &sign("second-secret", now, body)), body, now)
                .unwrap(),
            "gitlab"
        );
    }

    #[test]
    fn a_changed_body_or_timestamp_breaks_the_signature() {
        let now = 1_800_000_000;
        let signature = sign("first-secret", now, b"{}");
        assert!(
            secrets()
                .verify(&headers(now, &signature), b"{ }", now)
                .is_err()
        );
        assert!(
            secrets()
                .verify(&headers(now + 1, &signature), b"{}", now)
                .is_err()
        );
    }

    #[test]
    fn timestamps_outside_five_minutes_are_refused() {
        let now = 1_800_000_000;
        for ts in [now - 301, now + 301] {
            let err = secrets()
                .verify(&headers(ts, &sign("first-secret", ts, b"{}")), b"{}", now)
                .unwrap_err();
            assert!(format!("{err:?}").contains("5 minutes"));
        }
        let ts = now - 299;
        assert!(
            secrets()
                .verify(&headers(ts, &sign("first-secret", ts, b"{}")), b"{}", now)
                .is_ok()
        );
    }
}
