//! `POST /webhooks/ci`: CI systems queue replicas with a signed request.
//!
//! `X-Bridge-Signature: sha256=<hex HMAC-SHA256(secret, "{timestamp}.{key}.{raw body}")>`
//! with `X-Bridge-Timestamp: <unix seconds>`, where `key` is the
//! `Idempotency-Key` header (empty without one). Each CI client has its own
//! secret; the one that verifies names the caller. Signing the key means a
//! captured delivery cannot be replayed under a fresh key.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use crate::config::NamedSecrets;
use crate::domain::Actor;
pub use crate::domain::signature::{SIGNATURE_HEADER, TIMESTAMP_HEADER, sign};
use crate::web::AppState;
use crate::web::api::intake::{self, RawBody};
use crate::web::error::ApiError;

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

    /// Checks the timestamp window and the signature over the timestamp, the
    /// idempotency key (`""` without one) and the body; returns the CI client's name.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        idempotency_key: Option<&str>,
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
        let signature = signature_bytes(headers)?;

        let mut matched = None;
        for (name, secret) in &self.clients {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
                .expect("HMAC takes keys of any length");
            mac.update(timestamp.as_bytes());
            mac.update(b".");
            mac.update(idempotency_key.unwrap_or_default().as_bytes());
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

/// The 32 bytes of `X-Bridge-Signature: sha256=<hex>` (prefix and hex in any case).
fn signature_bytes(headers: &HeaderMap) -> Result<Vec<u8>, ApiError> {
    let value = header(headers, SIGNATURE_HEADER)?;
    value
        .get(..7)
        .filter(|prefix| prefix.eq_ignore_ascii_case("sha256="))
        .and_then(|_| hex::decode(&value[7..]).ok())
        .filter(|bytes| bytes.len() == 32)
        .ok_or_else(|| {
            ApiError::unauthorized("X-Bridge-Signature must be `sha256=<64 hex digits>`")
        })
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .ok_or_else(|| ApiError::unauthorized(format!("missing {name} header")))
}

/// Same body and answer as `POST /api/v1/replicas`. Without an
/// `Idempotency-Key`, the signature serves as one, in its normalized form
/// (lowercase hex, no prefix): a replayed delivery, however its signature is
/// cased, gets the first answer and creates nothing.
#[utoipa::path(post, path = "/webhooks/ci", tag = "webhook",
    request_body = crate::domain::OrderBody,
    params(
        ("X-Bridge-Timestamp" = i64, Header, description = "unix seconds; more than 5 minutes off is refused"),
        ("X-Bridge-Signature" = String, Header,
         description = "`sha256=` and the hex HMAC-SHA256 of `timestamp.idempotency key.raw body` with the client's secret"),
        ("Idempotency-Key" = Option<String>, Header, description = "signed with the body; without it the signature is the key"),
    ),
    responses(
        (status = 202, description = "queued, as `POST /api/v1/replicas`", body = crate::views::requests::ReplicaList),
        (status = "4XX", description = "a bad signature or timestamp, bad input, or over a quota", body = crate::web::error::ErrorBody),
        (status = "5XX", description = "Phala or the chain is unavailable, or an internal error", body = crate::web::error::ErrorBody),
    ))]
pub async fn ci_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let explicit = intake::idempotency_key(&headers)?;
    let client = state.webhook_secrets.verify(
        &headers,
        explicit.as_deref(),
        &body,
        state.clock.now().timestamp(),
    )?;
    let key = match explicit {
        Some(key) => key,
        None => format!("signature:{}", hex::encode(signature_bytes(&headers)?)),
    };
    intake::submit(&state, Actor::CiClient(client), Some(key), &body).await
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
                .verify(
                    &headers(now, &sign("first-secret", now, None, body)),
                    None,
                    body,
                    now
                )
                .unwrap(),
            "github"
        );
        assert_eq!(
            secrets()
                .verify(
                    &headers(now, &sign("second-secret", now, None, body)),
                    None,
                    body,
                    now
                )
                .unwrap(),
            "gitlab"
        );
    }

    #[test]
    fn a_changed_body_or_timestamp_breaks_the_signature() {
        let now = 1_800_000_000;
        let signature = sign("first-secret", now, None, b"{}");
        assert!(
            secrets()
                .verify(&headers(now, &signature), None, b"{ }", now)
                .is_err()
        );
        assert!(
            secrets()
                .verify(&headers(now + 1, &signature), None, b"{}", now)
                .is_err()
        );
    }

    #[test]
    fn the_signature_covers_the_idempotency_key() {
        let now = 1_800_000_000;
        let signature = sign("first-secret", now, Some("gh-981"), b"{}");
        let verify =
            |key: Option<&str>| secrets().verify(&headers(now, &signature), key, b"{}", now);
        assert_eq!(verify(Some("gh-981")).unwrap(), "github");
        for other in [None, Some("gh-982"), Some("")] {
            assert!(verify(other).is_err(), "{other:?}");
        }
        // A signature made without a key does not carry one.
        let keyless = sign("first-secret", now, None, b"{}");
        assert!(
            secrets()
                .verify(&headers(now, &keyless), Some("fresh"), b"{}", now)
                .is_err()
        );
    }

    #[test]
    fn signatures_verify_in_any_case_and_must_be_32_bytes() {
        let now = 1_800_000_000;
        let signature = sign("first-secret", now, None, b"{}");
        let upper = signature.to_uppercase();
        assert!(
            secrets()
                .verify(&headers(now, &upper), None, b"{}", now)
                .is_ok()
        );
        for bad in ["sha256=abcd", "md5=00", "sha256", ""] {
            assert!(
                secrets()
                    .verify(&headers(now, bad), None, b"{}", now)
                    .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn timestamps_outside_five_minutes_are_refused() {
        let now = 1_800_000_000;
        for ts in [now - 301, now + 301] {
            let err = secrets()
                .verify(
                    &headers(ts, &sign("first-secret", ts, None, b"{}")),
                    None,
                    b"{}",
                    now,
                )
                .unwrap_err();
            assert!(format!("{err:?}").contains("5 minutes"));
        }
        let ts = now - 299;
        assert!(
            secrets()
                .verify(
                    &headers(ts, &sign("first-secret", ts, None, b"{}")),
                    None,
                    b"{}",
                    now
                )
                .is_ok()
        );
    }
}
