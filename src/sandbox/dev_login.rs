//! The sandbox's "dev login": it signs in to the bridge as one of its
//! accounts with a real Sign-In with Ethereum round trip (the bridge's own
//! `/login/message` and `/login`, the account's anvil key signing), then
//! hands the session cookie to the browser. Nothing is skipped: the bridge
//! checks the message, nonce, chain and role as it would a wallet's.

use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, bail};
use axum::http::HeaderValue;
use reqwest::Url;
use serde_json::{Value, json};

/// Signs in at `bridge` as `key` on `chain_id`; answers the `Set-Cookie`
/// value of the session.
pub async fn sign_in(
    http: &reqwest::Client,
    bridge: &Url,
    key: &PrivateKeySigner,
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
        json!({"address": key.address().to_checksum(None), "chain_id": chain_id}),
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
    let signature = key.sign_message_sync(message.as_bytes())?;
    let signature = format!("0x{}", hex::encode(signature.as_bytes()));
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
