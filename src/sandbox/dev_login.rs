//! The sandbox's "dev login": it signs in to the bridge as one of its
//! accounts with a real Sign-In with Ethereum round trip (the bridge's own
//! `/login/message` and `/login`, the account's anvil key signing), then
//! hands the session cookie to the browser. Nothing is skipped: the bridge
//! checks the message, nonce, chain and role as it would a wallet's. The
//! Safe-owner signs as Safe{Wallet} signs for a Safe: its owners sign the
//! Safe's `SafeMessage` hash, and the bridge asks the Safe (EIP-1271).

use alloy::primitives::{Address, Bytes, eip191_hash_message};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, bail};
use axum::http::HeaderValue;
use reqwest::Url;
use serde_json::{Value, json};

use super::SafeOwner;

/// An account the dev login signs in as.
pub enum DevAccount<'a> {
    /// An account with its own key.
    Key(&'a PrivateKeySigner),
    /// A Safe, signing through its owners' keys.
    Safe(&'a SafeOwner),
}

impl DevAccount<'_> {
    fn address(&self) -> Address {
        match self {
            DevAccount::Key(key) => key.address(),
            DevAccount::Safe(safe) => safe.address,
        }
    }

    /// Its signature of `message` (EIP-191 personal message).
    fn sign(&self, message: &str, chain_id: u64) -> anyhow::Result<Bytes> {
        match self {
            DevAccount::Key(key) => Ok(key
                .sign_message_sync(message.as_bytes())?
                .as_bytes()
                .to_vec()
                .into()),
            DevAccount::Safe(safe) => safe.sign_hash(chain_id, eip191_hash_message(message)),
        }
    }
}

/// Signs in at `bridge` as `account` on `chain_id`; answers the `Set-Cookie`
/// value of the session.
pub async fn sign_in(
    http: &reqwest::Client,
    bridge: &Url,
    account: DevAccount<'_>,
    chain_id: u64,
) -> anyhow::Result<HeaderValue> {
    // As a browser: the sign-in page sets the CSRF cookie and carries the
    // token made from it, which only the bridge can make.
    let login = http
        .get(bridge.join("login").expect("a fixed path"))
        .send()
        .await
        .context("opening the bridge's sign-in page")?;
    let cookie = login
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.contains("ab_csrf="))
        .and_then(|v| v.split(';').next())
        .context("the sign-in page set no CSRF cookie")?
        .to_owned();
    let page = login.text().await?;
    let csrf = page
        .split_once(r#"<meta name="csrf-token" content=""#)
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(token, _)| token.to_owned())
        .context("the sign-in page carries no CSRF token")?;
    let post = |path: &str, body: Value| {
        http.post(bridge.join(path).expect("a fixed path"))
            .header("cookie", &cookie)
            .header("x-csrf-token", &csrf)
            .json(&body)
            .send()
    };
    let answer = post(
        "login/message",
        json!({"address": account.address().to_checksum(None), "chain_id": chain_id}),
    )
    .await
    .context("asking the bridge for a sign-in message")?;
    if !answer.status().is_success() {
        bail!(
            "the bridge refused a sign-in message: {}",
            answer.text().await?
        );
    }
    let message: Value = answer.json().await?;
    let message = message["message"]
        .as_str()
        .context("the bridge's answer has no message")?
        .to_owned();
    let signature = account.sign(&message, chain_id)?.to_string();
    let answer = post("login", json!({"message": message, "signature": signature}))
        .await
        .context("signing in to the bridge")?;
    if !answer.status().is_success() {
        bail!("the bridge refused the sign-in: {}", answer.text().await?);
    }
    answer
        .headers()
        .get("set-cookie")
        .cloned()
        .context("the bridge set no session cookie")
}
