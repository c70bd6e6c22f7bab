//! How the bridge signs a webhook delivery, both ways: CI systems sign what
//! they send to `POST /webhooks/ci`, and the bridge signs its notifications
//! the same way (see `web::api::webhook` for the format).

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const TIMESTAMP_HEADER: &str = "x-bridge-timestamp";
pub const SIGNATURE_HEADER: &str = "x-bridge-signature";

/// Signs a delivery as a CI client would (for tests, the sandbox and docs):
/// `idempotency_key` is the `Idempotency-Key` header it will carry, if any.
pub fn sign(secret: &str, timestamp: i64, idempotency_key: Option<&str>, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(format!("{timestamp}.{}.", idempotency_key.unwrap_or_default()).as_bytes());
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}
