//! An HTTP proxy that injects faults between the bridge and a service it
//! calls (Phala Cloud, the Safe Transaction Service, the JSON-RPC node), as a
//! real network and real gateways do: answers that arrive slowly, errors after
//! the upstream already acted, gateway pages instead of JSON, timeouts,
//! resets and rate limits.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Url;

/// A fault, and whether the upstream saw the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// Forwarded; the upstream acted; the client gets a 502 anyway.
    ErrorAfterSuccess,
    /// Not forwarded; a gateway's HTML 502 page.
    BadGatewayHtml,
    /// Forwarded; the answer is held past the client's timeout.
    TimeoutAfterSuccess,
    /// Not forwarded; no answer until the client gives up.
    Timeout,
    /// Forwarded; the connection breaks before the body is complete.
    ResetAfterSuccess,
    /// Not forwarded; 429 with `Retry-After`.
    RateLimited,
    /// Forwarded; answered, but late (within the client's timeout).
    Slow,
}

pub const ALL_FAULTS: [Fault; 7] = [
    Fault::ErrorAfterSuccess,
    Fault::BadGatewayHtml,
    Fault::TimeoutAfterSuccess,
    Fault::Timeout,
    Fault::ResetAfterSuccess,
    Fault::RateLimited,
    Fault::Slow,
];

#[derive(Debug, Clone)]
pub struct FaultPlan {
    /// Share of calls that get a fault, 0.0–1.0.
    pub rate: f64,
    /// The faults to pick from, evenly.
    pub faults: Vec<Fault>,
    /// Latency added to every call.
    pub latency: Range<Duration>,
    /// How long a `Timeout` holds the answer: longer than the client waits.
    pub hold: Duration,
    /// Extra delay of a `Slow` answer.
    pub slow: Duration,
    pub seed: u64,
}

impl FaultPlan {
    /// Only the latency of a real API, no faults.
    pub fn latency(latency: Range<Duration>, seed: u64) -> FaultPlan {
        FaultPlan {
            rate: 0.0,
            faults: Vec::new(),
            latency,
            hold: Duration::from_secs(5),
            slow: Duration::from_millis(800),
            seed,
        }
    }
}

/// What the proxy did, by fault.
#[derive(Debug, Default, Clone)]
pub struct FaultStats {
    pub calls: usize,
    pub faults: BTreeMap<Fault, usize>,
}

impl FaultStats {
    pub fn injected(&self) -> usize {
        self.faults.values().sum()
    }
}

pub struct FaultProxy {
    pub url: Url,
    stats: Arc<Mutex<FaultStats>>,
    enabled: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Clone)]
struct Shared {
    upstream: Url,
    http: reqwest::Client,
    plan: Arc<FaultPlan>,
    rng: Arc<Mutex<StdRng>>,
    stats: Arc<Mutex<FaultStats>>,
    enabled: Arc<std::sync::atomic::AtomicBool>,
}

impl FaultProxy {
    /// Proxies every path and method to `upstream` (its scheme, host and port;
    /// the path of each call is kept).
    pub async fn start(upstream: Url, plan: FaultPlan) -> FaultProxy {
        let stats = Arc::new(Mutex::new(FaultStats::default()));
        let enabled = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let shared = Shared {
            upstream,
            http: reqwest::Client::new(),
            rng: Arc::new(Mutex::new(StdRng::seed_from_u64(plan.seed))),
            plan: Arc::new(plan),
            stats: stats.clone(),
            enabled: enabled.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let app = axum::Router::new().fallback(forward).with_state(shared);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FaultProxy {
            url,
            stats,
            enabled,
        }
    }

    pub fn stats(&self) -> FaultStats {
        self.stats.lock().unwrap().clone()
    }

    /// Turns faults and latency off (or back on), e.g. for the final check.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn forward(State(proxy): State<Shared>, request: Request) -> Response {
    let enabled = proxy.enabled.load(std::sync::atomic::Ordering::SeqCst);
    let (fault, latency) = {
        let mut rng = proxy.rng.lock().unwrap();
        let plan = &proxy.plan;
        let latency = if enabled && plan.latency.end > plan.latency.start {
            rng.gen_range(plan.latency.clone())
        } else {
            Duration::ZERO
        };
        let fault = (enabled && !plan.faults.is_empty() && rng.gen_bool(plan.rate))
            .then(|| plan.faults[rng.gen_range(0..plan.faults.len())]);
        (fault, latency)
    };
    {
        let mut stats = proxy.stats.lock().unwrap();
        stats.calls += 1;
        if let Some(fault) = fault {
            *stats.faults.entry(fault).or_default() += 1;
        }
    }
    tokio::time::sleep(latency).await;

    match fault {
        Some(Fault::BadGatewayHtml) => return bad_gateway(),
        Some(Fault::Timeout) => {
            tokio::time::sleep(proxy.plan.hold).await;
            return bad_gateway();
        }
        Some(Fault::RateLimited) => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("Retry-After", "1")],
                "rate limited",
            )
                .into_response();
        }
        _ => {}
    }
    let upstream = match send_upstream(&proxy, request).await {
        Ok(upstream) => upstream,
        Err(err) => return (StatusCode::BAD_GATEWAY, err.to_string()).into_response(),
    };
    match fault {
        Some(Fault::ErrorAfterSuccess) => bad_gateway(),
        Some(Fault::TimeoutAfterSuccess) => {
            tokio::time::sleep(proxy.plan.hold).await;
            bad_gateway()
        }
        Some(Fault::ResetAfterSuccess) => {
            // Headers go out, then the body breaks: the client sees the
            // connection end mid-answer.
            let broken = futures_util::stream::iter([
                Ok::<Bytes, std::io::Error>(Bytes::from_static(b"{\"partial\": ")),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "reset",
                )),
            ]);
            Response::builder()
                .status(upstream.0)
                .header("content-type", "application/json")
                .header("content-length", "4096")
                .body(Body::from_stream(broken))
                .unwrap()
        }
        Some(Fault::Slow) => {
            tokio::time::sleep(proxy.plan.slow).await;
            rebuild(upstream)
        }
        _ => rebuild(upstream),
    }
}

type Upstream = (StatusCode, Vec<(String, String)>, Bytes);

async fn send_upstream(proxy: &Shared, request: Request) -> anyhow::Result<Upstream> {
    let (parts, body) = request.into_parts();
    let mut url = proxy.upstream.clone();
    url.set_path(parts.uri.path());
    url.set_query(parts.uri.query());
    let body = axum::body::to_bytes(body, 16 * 1024 * 1024).await?;
    let mut outgoing = proxy.http.request(parts.method.clone(), url).body(body);
    for (name, value) in &parts.headers {
        if name != "host" && name != "content-length" {
            outgoing = outgoing.header(name, value);
        }
    }
    let answer = outgoing.send().await?;
    let status = answer.status();
    let headers = answer
        .headers()
        .iter()
        .filter(|(n, _)| *n != "content-length" && *n != "transfer-encoding")
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    let body = answer.bytes().await?;
    Ok((status, headers, body))
}

fn rebuild((status, headers, body): Upstream) -> Response {
    let mut response = Response::builder().status(status);
    for (name, value) in headers {
        response = response.header(name, value);
    }
    response.body(Body::from(body)).unwrap()
}

fn bad_gateway() -> Response {
    (
        StatusCode::BAD_GATEWAY,
        [("content-type", "text/html")],
        "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    async fn through(fault: Fault) -> (Result<(u16, String), reqwest::Error>, usize) {
        let upstream = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_string("{\"ok\": true}"))
            .mount(&upstream)
            .await;
        let plan = FaultPlan {
            rate: 1.0,
            faults: vec![fault],
            hold: Duration::from_millis(600),
            slow: Duration::from_millis(100),
            ..FaultPlan::latency(Duration::ZERO..Duration::ZERO, 1)
        };
        let proxy = FaultProxy::start(upstream.uri().parse().unwrap(), plan).await;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let answer = async {
            let response = client
                .post(proxy.url.join("/api/v1/cvms/x/commit-replica").unwrap())
                .body("{}")
                .send()
                .await?;
            let status = response.status().as_u16();
            Ok((status, response.text().await?))
        }
        .await;
        let seen = upstream.received_requests().await.unwrap().len();
        assert_eq!(proxy.stats().faults.get(&fault), Some(&1));
        (answer, seen)
    }

    #[tokio::test]
    async fn each_fault_reaches_the_client_as_a_real_network_would() {
        let (answer, seen) = through(Fault::ErrorAfterSuccess).await;
        assert_eq!(answer.unwrap().0, 502);
        assert_eq!(seen, 1, "the upstream acted");

        let (answer, seen) = through(Fault::BadGatewayHtml).await;
        let (status, body) = answer.unwrap();
        assert_eq!((status, seen), (502, 0));
        assert!(body.contains("<html>"));

        let (answer, seen) = through(Fault::TimeoutAfterSuccess).await;
        assert!(answer.unwrap_err().is_timeout());
        assert_eq!(seen, 1);

        let (answer, seen) = through(Fault::Timeout).await;
        assert!(answer.unwrap_err().is_timeout());
        assert_eq!(seen, 0);

        let (answer, seen) = through(Fault::ResetAfterSuccess).await;
        assert!(answer.is_err(), "{answer:?}");
        assert_eq!(seen, 1);

        let (answer, seen) = through(Fault::RateLimited).await;
        assert_eq!((answer.unwrap().0, seen), (429, 0));

        let (answer, seen) = through(Fault::Slow).await;
        assert_eq!(answer.unwrap(), (200, "{\"ok\": true}".to_owned()));
        assert_eq!(seen, 1);
    }
}
