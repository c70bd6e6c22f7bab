//! A JSON-RPC proxy that counts what `serve` asks the chain: every call,
//! and the `eth_blockNumber` polls among them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use axum::extract::State;
use axum::response::IntoResponse;
use reqwest::Url;
use serde_json::Value;

pub struct RpcCounter {
    pub url: Url,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    calls: AtomicU64,
    polls: AtomicU64,
}

#[derive(Clone)]
struct Shared {
    upstream: Url,
    http: reqwest::Client,
    counts: Arc<Counts>,
}

impl RpcCounter {
    pub async fn start(upstream: Url) -> anyhow::Result<RpcCounter> {
        let counts = Arc::new(Counts::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/", listener.local_addr()?).parse()?;
        let app = axum::Router::new()
            .route("/", axum::routing::post(forward))
            .with_state(Shared {
                upstream,
                http: reqwest::Client::new(),
                counts: counts.clone(),
            });
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(RpcCounter { url, counts })
    }

    /// Calls so far, and `eth_blockNumber` calls among them.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.counts.calls.load(Ordering::SeqCst),
            self.counts.polls.load(Ordering::SeqCst),
        )
    }
}

async fn forward(State(proxy): State<Shared>, body: axum::body::Bytes) -> axum::response::Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let calls: Vec<&Value> = match request.as_array() {
        Some(batch) => batch.iter().collect(),
        None => vec![&request],
    };
    proxy
        .counts
        .calls
        .fetch_add(calls.len() as u64, Ordering::SeqCst);
    let polls = calls
        .iter()
        .filter(|c| c["method"] == "eth_blockNumber")
        .count();
    proxy.counts.polls.fetch_add(polls as u64, Ordering::SeqCst);
    let answer = async {
        let answer = proxy
            .http
            .post(proxy.upstream.clone())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .context("anvil")?;
        anyhow::Ok(answer.bytes().await?)
    };
    match answer.await {
        Ok(bytes) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            bytes,
        )
            .into_response(),
        Err(_) => axum::http::StatusCode::BAD_GATEWAY.into_response(),
    }
}
