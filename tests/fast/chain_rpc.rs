//! The JSON-RPC client's own limits: every call times out, and transient
//! errors are retried with backoff, so a black-holed provider cannot freeze
//! the Safe flow.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use approval_bridge::chain::ChainClient;
use axum::extract::State;
use axum::response::IntoResponse;
use serde_json::{Value, json};

/// A server that accepts connections and never answers.
async fn black_hole() -> reqwest::Url {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    url.parse().unwrap()
}

#[tokio::test]
async fn an_rpc_that_never_answers_times_out() {
    let base = black_hole().await;
    let key = "rpc-key-do-not-show";
    let url: reqwest::Url = format!("{base}v2/{key}?apikey={key}").parse().unwrap();
    let client = ChainClient::new(31337, url.clone());
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(90), client.head())
        .await
        .expect("the call gives up by itself");
    let err = answer.expect_err("nothing answered");
    println!(
        "a black-holed eth_blockNumber gave up after {:?}: {err:#}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    // An RPC URL often carries the provider's key: errors name the host only.
    let shown = format!("{err:#}");
    assert!(!shown.contains(key), "{shown}");
    assert!(
        shown.contains(&format!("127.0.0.1:{}", url.port().unwrap())),
        "{shown}"
    );
}

/// Answers `failures` calls with a gateway error, then the block number 16.
async fn flaky(failures: usize) -> (reqwest::Url, Arc<AtomicUsize>) {
    async fn answer(
        State((failures, seen)): State<(usize, Arc<AtomicUsize>)>,
        body: axum::body::Bytes,
    ) -> axum::response::Response {
        let request: Value = serde_json::from_slice(&body).unwrap();
        if seen.fetch_add(1, Ordering::SeqCst) < failures {
            return (
                axum::http::StatusCode::BAD_GATEWAY,
                "<html><body>502 Bad Gateway</body></html>",
            )
                .into_response();
        }
        axum::Json(json!({"jsonrpc": "2.0", "id": request["id"], "result": "0x10"})).into_response()
    }
    let seen = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/", axum::routing::post(answer))
        .with_state((failures, seen.clone()));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url.parse().unwrap(), seen)
}

#[tokio::test]
async fn a_transient_rpc_error_is_retried() {
    let (url, seen) = flaky(2).await;
    let client = ChainClient::new(31337, url);
    assert_eq!(client.head().await.unwrap(), 16);
    assert_eq!(seen.load(Ordering::SeqCst), 3);
}
