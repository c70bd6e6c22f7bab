//! A JSON-RPC proxy in front of anvil, to see and shape what the bridge
//! asks the chain: it counts calls, can refuse wide `eth_getLogs` ranges as
//! hosted providers do, can answer `eth_chainId` for another chain, and can
//! fail every call (an outage).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::response::IntoResponse;
use reqwest::Url;
use serde_json::{Value, json};

pub struct RpcProxy {
    pub url: Url,
    /// While not 0, the chain id `eth_chainId` answers.
    pub wrong_chain: Arc<AtomicU64>,
    /// While set, every call gets an HTTP 502.
    pub outage: Arc<AtomicBool>,
    /// The methods called, in order (a batch counts each call).
    pub methods: Arc<Mutex<Vec<String>>>,
}

#[derive(Clone)]
struct Shared {
    upstream: Url,
    http: reqwest::Client,
    wrong_chain: Arc<AtomicU64>,
    outage: Arc<AtomicBool>,
    methods: Arc<Mutex<Vec<String>>>,
    max_log_range: Option<u64>,
}

impl RpcProxy {
    /// Proxies to `upstream`; with `max_log_range`, wider `eth_getLogs` calls are refused.
    pub async fn start(upstream: Url, max_log_range: Option<u64>) -> RpcProxy {
        let wrong_chain = Arc::new(AtomicU64::new(0));
        let outage = Arc::new(AtomicBool::new(false));
        let methods = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared {
            upstream,
            http: reqwest::Client::new(),
            wrong_chain: wrong_chain.clone(),
            outage: outage.clone(),
            methods: methods.clone(),
            max_log_range,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let app = axum::Router::new()
            .route("/", axum::routing::post(forward))
            .with_state(shared);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        RpcProxy {
            url,
            wrong_chain,
            outage,
            methods,
        }
    }
}

async fn forward(State(proxy): State<Shared>, body: axum::body::Bytes) -> axum::response::Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    {
        let mut methods = proxy.methods.lock().unwrap();
        let one = |call: &Value| call["method"].as_str().unwrap_or("?").to_owned();
        match request.as_array() {
            Some(batch) => methods.extend(batch.iter().map(one)),
            None => methods.push(one(&request)),
        }
    }
    if proxy.outage.load(Ordering::SeqCst) {
        return (axum::http::StatusCode::BAD_GATEWAY, "upstream down").into_response();
    }

    let wrong = proxy.wrong_chain.load(Ordering::SeqCst);
    if wrong != 0 && request["method"] == "eth_chainId" {
        return axum::Json(
            json!({"jsonrpc": "2.0", "id": request["id"], "result": format!("0x{wrong:x}")}),
        )
        .into_response();
    }
    if let (Some(max), Some("eth_getLogs")) = (proxy.max_log_range, request["method"].as_str()) {
        let block = |key: &str| {
            request["params"][0][key]
                .as_str()
                .and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok())
        };
        if let (Some(from), Some(to)) = (block("fromBlock"), block("toBlock"))
            && to - from + 1 > max
        {
            let refusal = json!({"jsonrpc": "2.0", "id": request["id"],
                "error": {"code": -32005, "message": format!("block range is too large: at most {max} blocks")}});
            return axum::Json(refusal).into_response();
        }
    }

    let answer = proxy
        .http
        .post(proxy.upstream.clone())
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let bytes = answer.bytes().await.unwrap();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        bytes,
    )
        .into_response()
}
