//! An HTTP proxy that injects faults between the bridge and a service it
//! calls (Phala Cloud, the Safe Transaction Service, the JSON-RPC node), as a
//! real network and real gateways do: answers that arrive slowly, errors after
//! the upstream already acted, gateway pages instead of JSON, timeouts,
//! resets and rate limits. And as an eventually consistent API does: a create
//! or commit that the gateway gave up on but that reaches Phala seconds later
//! ([`LatePlan`]), and instance lists that show a new CVM only some seconds
//! after it was created (`FaultPlan::list_lag`).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Url;
use serde_json::Value;

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
    /// A create or commit: a gateway's HTML 502 at once, and the very same
    /// request reaches the upstream later ([`LatePlan`]).
    LateCompletion,
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
    /// Creates and commits that complete after the client got its error.
    pub late: Option<LatePlan>,
    /// How long a CVM that a create or commit made stays out of the instance
    /// lists (`GET /apps/{app}/cvms`, `GET /cvms/paginated`) and the status
    /// batch, drawn per CVM. `None`: listed at once.
    pub list_lag: Option<Range<Duration>>,
    pub seed: u64,
}

/// Late completion: Phala's gateway times out, Phala goes on. A share of the
/// creates (`POST /cvms/{id}/replicas` without `X-Prepare-Only: true`) and
/// commits (`POST /cvms/{id}/commit-replica`) get an HTML 502 at once, and the
/// request exactly as the client sent it (method, path, query, headers, body,
/// so the commit token too) is forwarded after a delay; its answer is dropped.
/// Seen at Phala from outside: a call lands 1–30 s after the gateway gave
/// up, and a new CVM is listed 5–40 s after it was made.
#[derive(Debug, Clone)]
pub struct LatePlan {
    /// Share of the creates and commits that complete late, 0.0–1.0.
    pub rate: f64,
    pub create_delay: Range<Duration>,
    pub commit_delay: Range<Duration>,
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
            late: None,
            list_lag: None,
            seed,
        }
    }
}

/// What the proxy did, by fault.
#[derive(Debug, Default, Clone)]
pub struct FaultStats {
    pub calls: usize,
    pub faults: BTreeMap<Fault, usize>,
    /// Late creates and commits that reached the upstream, by the status it
    /// answered (2xx: the CVM was made late; 466: the token was spent or
    /// superseded by then; 0: the upstream could not be reached).
    pub late_landed: BTreeMap<u16, usize>,
    /// Late creates and commits still waiting to be forwarded.
    pub late_pending: usize,
    /// List and status-batch answers that left out at least one new CVM.
    pub lagged_lists: usize,
    /// CVMs left out, summed over those answers.
    pub hidden: usize,
    /// Every prepare, create and commit, and every late landing, in order.
    pub journal: Vec<Journaled>,
}

/// One prepare, create or commit as the proxy saw it, or the late landing
/// of one: what a reader needs to tell which call made which CVM.
#[derive(Debug, Clone)]
pub struct Journaled {
    /// Since the proxy started.
    pub at: Duration,
    pub path: String,
    /// A commit's token, or the one a prepare's 465 issued.
    pub token: Option<String>,
    /// What the client heard: a status, `timeout` or `reset`; `late landing`
    /// for a late call reaching the upstream (nobody hears its answer).
    pub client: String,
    /// What the upstream answered; `None` when the call did not reach it.
    pub upstream: Option<u16>,
    /// The CVM its answer names.
    pub created: Option<String>,
}

impl std::fmt::Display for Journaled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>7.2} s POST {} token {:?}: client {}, upstream {:?}, CVM {:?}",
            self.at.as_secs_f64(),
            self.path,
            self.token,
            self.client,
            self.upstream,
            self.created
        )
    }
}

impl FaultStats {
    pub fn injected(&self) -> usize {
        self.faults.values().sum()
    }
}

pub struct FaultProxy {
    pub url: Url,
    stats: Arc<Mutex<FaultStats>>,
    enabled: Arc<AtomicBool>,
    pending: Arc<AtomicUsize>,
    gate: Arc<Gate>,
}

/// Closed, the proxy holds every call it receives (or only those whose body
/// holds `only`) until it opens again.
#[derive(Default)]
struct Gate {
    closed: AtomicBool,
    only: Mutex<Option<String>>,
    /// Calls waiting at the closed gate.
    held: AtomicUsize,
    opened: tokio::sync::Notify,
}

#[derive(Clone)]
struct Shared {
    upstream: Url,
    http: reqwest::Client,
    plan: Arc<FaultPlan>,
    rng: Arc<Mutex<StdRng>>,
    stats: Arc<Mutex<FaultStats>>,
    enabled: Arc<AtomicBool>,
    /// Late calls not yet forwarded.
    pending: Arc<AtomicUsize>,
    gate: Arc<Gate>,
    /// When each new CVM (normalized `vm_uuid`) shows in the lists.
    visible_at: Arc<Mutex<HashMap<String, Instant>>>,
    started: Instant,
}

impl FaultProxy {
    /// Proxies every path and method to `upstream` (its scheme, host and port;
    /// the path of each call is kept).
    pub async fn start(upstream: Url, plan: FaultPlan) -> FaultProxy {
        let stats = Arc::new(Mutex::new(FaultStats::default()));
        let enabled = Arc::new(AtomicBool::new(true));
        let pending = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Gate::default());
        let shared = Shared {
            gate: gate.clone(),
            upstream,
            http: reqwest::Client::new(),
            rng: Arc::new(Mutex::new(StdRng::seed_from_u64(plan.seed))),
            plan: Arc::new(plan),
            stats: stats.clone(),
            enabled: enabled.clone(),
            pending: pending.clone(),
            visible_at: Arc::default(),
            started: Instant::now(),
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
            pending,
            gate,
        }
    }

    pub fn stats(&self) -> FaultStats {
        let mut stats = self.stats.lock().unwrap().clone();
        stats.late_pending = self.pending.load(Ordering::SeqCst);
        stats
    }

    /// Turns faults, latency and list lag off (or back on), e.g. for the
    /// final check. Late calls already under way still land.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
    }

    /// Holds every call from now on until [`FaultProxy::open`]: a client
    /// caught at the gate waits for an answer.
    pub fn close(&self) {
        self.close_to(None);
    }

    /// [`FaultProxy::close`] to the calls whose body holds `only` (a JSON-RPC
    /// method, say); the others pass.
    pub fn close_to(&self, only: Option<&str>) {
        *self.gate.only.lock().unwrap() = only.map(str::to_owned);
        self.gate.closed.store(true, Ordering::SeqCst);
    }

    /// Lets the held calls and every later one through.
    pub fn open(&self) {
        self.gate.closed.store(false, Ordering::SeqCst);
        self.gate.opened.notify_waiters();
    }

    /// How many calls wait at the closed gate.
    pub fn held(&self) -> usize {
        self.gate.held.load(Ordering::SeqCst)
    }

    /// Waits until every late create and commit has reached the upstream
    /// (each does within the plan's longest delay), so that what the
    /// upstream holds afterwards is final.
    pub async fn late_calls_landed(&self) {
        while self.pending.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One call as the client sent it, kept whole so it can be sent again later.
#[derive(Clone)]
struct Call {
    method: Method,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Bytes,
}

/// The Phala calls the proxy treats apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A create: `POST /cvms/{id}/replicas` without `X-Prepare-Only: true`.
    Create,
    /// A prepare: the same with the header. Phala ignores the header for
    /// Cloud-KMS sources and creates, so its answer may name a new CVM too.
    Prepare,
    Commit,
    /// `GET /apps/{app}/cvms`: an array of CVMs.
    AppCvms,
    /// `GET /cvms/paginated`: `{items, total, ...}`.
    Paginated,
    /// `POST /status/batch`: a map from the ids as sent to their status.
    StatusBatch,
    Other,
}

impl Kind {
    fn of(call: &Call) -> Kind {
        let segments: Vec<&str> = call.path.trim_end_matches('/').split('/').collect();
        let tail = |n: usize| {
            segments
                .get(segments.len().saturating_sub(n)..)
                .unwrap_or_default()
        };
        let post = call.method == Method::POST;
        let get = call.method == Method::GET;
        match tail(3) {
            ["cvms", _, "replicas"] if post => {
                let prepare = call
                    .headers
                    .get("x-prepare-only")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
                if prepare { Kind::Prepare } else { Kind::Create }
            }
            ["cvms", _, "commit-replica"] if post => Kind::Commit,
            ["apps", _, "cvms"] if get => Kind::AppCvms,
            [_, "cvms", "paginated"] if get => Kind::Paginated,
            [_, "status", "batch"] if post => Kind::StatusBatch,
            _ => Kind::Other,
        }
    }

    fn makes_cvms(self) -> bool {
        matches!(self, Kind::Create | Kind::Prepare | Kind::Commit)
    }
}

async fn forward(State(proxy): State<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 16 * 1024 * 1024).await else {
        return (StatusCode::BAD_REQUEST, "unreadable body").into_response();
    };
    let caught = proxy.gate.closed.load(Ordering::SeqCst)
        && match proxy.gate.only.lock().unwrap().as_deref() {
            Some(only) => String::from_utf8_lossy(&body).contains(only),
            None => true,
        };
    if caught {
        proxy.gate.held.fetch_add(1, Ordering::SeqCst);
        loop {
            let opened = proxy.gate.opened.notified();
            if !proxy.gate.closed.load(Ordering::SeqCst) {
                break;
            }
            opened.await;
        }
        proxy.gate.held.fetch_sub(1, Ordering::SeqCst);
    }
    let call = Call {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers,
        body,
    };
    let kind = Kind::of(&call);
    let enabled = proxy.enabled.load(Ordering::SeqCst);
    let (fault, latency, late) = {
        let mut rng = proxy.rng.lock().unwrap();
        let plan = &proxy.plan;
        let latency = if enabled && plan.latency.end > plan.latency.start {
            rng.gen_range(plan.latency.clone())
        } else {
            Duration::ZERO
        };
        // Drawn only when a late plan applies, so the other suites' draws
        // (and their seeds) stay as they were.
        let late = match (&plan.late, kind) {
            (Some(late), Kind::Create | Kind::Commit) if enabled && rng.gen_bool(late.rate) => {
                let delay = if kind == Kind::Create {
                    &late.create_delay
                } else {
                    &late.commit_delay
                };
                Some(draw(&mut rng, delay))
            }
            _ => None,
        };
        let fault = if late.is_some() {
            Some(Fault::LateCompletion)
        } else {
            (enabled && !plan.faults.is_empty() && rng.gen_bool(plan.rate))
                .then(|| plan.faults[rng.gen_range(0..plan.faults.len())])
        };
        (fault, latency, late)
    };
    {
        let mut stats = proxy.stats.lock().unwrap();
        stats.calls += 1;
        if let Some(fault) = fault {
            *stats.faults.entry(fault).or_default() += 1;
        }
    }
    if let Some(delay) = late {
        // Counted before the client hears anything, so a caller that waits
        // for the late calls never misses one.
        proxy.pending.fetch_add(1, Ordering::SeqCst);
        let late_proxy = proxy.clone();
        let late_call = call.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let landed = send_upstream(&late_proxy, &late_call).await;
            late_proxy.journal(kind, &late_call, "late landing", landed.as_ref().ok());
            {
                let mut stats = late_proxy.stats.lock().unwrap();
                let status = landed.as_ref().map_or(0, |u| u.0.as_u16());
                *stats.late_landed.entry(status).or_default() += 1;
            }
            if let Ok(upstream) = &landed {
                late_proxy.note_new_cvm(kind, upstream);
            }
            late_proxy.pending.fetch_sub(1, Ordering::SeqCst);
        });
        proxy.journal(kind, &call, "502 (late)", None);
        tokio::time::sleep(latency).await;
        return bad_gateway();
    }
    tokio::time::sleep(latency).await;

    match fault {
        Some(Fault::BadGatewayHtml) => {
            proxy.journal(kind, &call, "502", None);
            return bad_gateway();
        }
        Some(Fault::Timeout) => {
            proxy.journal(kind, &call, "timeout", None);
            tokio::time::sleep(proxy.plan.hold).await;
            return bad_gateway();
        }
        Some(Fault::RateLimited) => {
            proxy.journal(kind, &call, "429", None);
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("Retry-After", "1")],
                "rate limited",
            )
                .into_response();
        }
        _ => {}
    }
    let upstream = match send_upstream(&proxy, &call).await {
        Ok(upstream) => upstream,
        Err(err) => return (StatusCode::BAD_GATEWAY, err.to_string()).into_response(),
    };
    // The CVM exists whatever the client hears next.
    proxy.note_new_cvm(kind, &upstream);
    let heard = match fault {
        Some(Fault::ErrorAfterSuccess) => "502".to_owned(),
        Some(Fault::TimeoutAfterSuccess) => "timeout".to_owned(),
        Some(Fault::ResetAfterSuccess) => "reset".to_owned(),
        _ => upstream.0.as_u16().to_string(),
    };
    proxy.journal(kind, &call, &heard, Some(&upstream));
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
            rebuild(proxy.lag_lists(kind, upstream, enabled))
        }
        _ => rebuild(proxy.lag_lists(kind, upstream, enabled)),
    }
}

fn draw(rng: &mut StdRng, range: &Range<Duration>) -> Duration {
    if range.end > range.start {
        rng.gen_range(range.clone())
    } else {
        range.start
    }
}

/// A `vm_uuid` as Phala may write it: with or without dashes, in any case.
fn normalize(vm_uuid: &str) -> String {
    vm_uuid.replace('-', "").to_lowercase()
}

impl Shared {
    /// Notes a prepare, create or commit in the journal.
    fn journal(&self, kind: Kind, call: &Call, client: &str, upstream: Option<&Upstream>) {
        if !kind.makes_cvms() {
            return;
        }
        let answer = upstream.and_then(|u| serde_json::from_slice::<Value>(&u.2).ok());
        // A commit names its token in the body (or the query); a prepare's
        // 465 issues one in its details.
        let token = serde_json::from_slice::<Value>(&call.body)
            .ok()
            .and_then(|b| b["token"].as_str().map(str::to_owned))
            .or_else(|| {
                answer.as_ref().and_then(|a| {
                    a["detail"]["details"]
                        .as_array()?
                        .iter()
                        .find(|d| d["field"] == "commit_token")?["value"]
                        .as_str()
                        .map(str::to_owned)
                })
            });
        let created = answer
            .as_ref()
            .filter(|_| upstream.is_some_and(|u| u.0.is_success()))
            .and_then(|a| a["vm_uuid"].as_str().map(str::to_owned));
        let entry = Journaled {
            at: self.started.elapsed(),
            path: call.path.clone(),
            token,
            client: client.to_owned(),
            upstream: upstream.map(|u| u.0.as_u16()),
            created,
        };
        self.stats.lock().unwrap().journal.push(entry);
    }

    /// A create or commit that made a CVM: from now on the lists leave it
    /// out for a while.
    fn note_new_cvm(&self, kind: Kind, (status, _, body): &Upstream) {
        let Some(lag) = &self.plan.list_lag else {
            return;
        };
        if !kind.makes_cvms() || !status.is_success() {
            return;
        }
        let Some(vm_uuid) = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v["vm_uuid"].as_str().map(normalize))
        else {
            return;
        };
        let lag = draw(&mut self.rng.lock().unwrap(), lag);
        self.visible_at
            .lock()
            .unwrap()
            .entry(vm_uuid)
            .or_insert_with(|| Instant::now() + lag);
    }

    fn hidden_now(&self, vm_uuid: &str) -> bool {
        self.visible_at
            .lock()
            .unwrap()
            .get(&normalize(vm_uuid))
            .is_some_and(|at| Instant::now() < *at)
    }

    /// Leaves the CVMs not yet listed out of a list or status-batch answer.
    fn lag_lists(&self, kind: Kind, upstream: Upstream, enabled: bool) -> Upstream {
        let (status, headers, body) = upstream;
        if !enabled || self.plan.list_lag.is_none() || !status.is_success() {
            return (status, headers, body);
        }
        let Ok(mut json) = serde_json::from_slice::<Value>(&body) else {
            return (status, headers, body);
        };
        let listed = |cvm: &Value| !cvm["vm_uuid"].as_str().is_some_and(|v| self.hidden_now(v));
        let hidden = match (kind, &mut json) {
            (Kind::AppCvms, Value::Array(cvms)) => {
                let before = cvms.len();
                cvms.retain(listed);
                before - cvms.len()
            }
            (Kind::Paginated, Value::Object(page)) => {
                let Some(Value::Array(items)) = page.get_mut("items") else {
                    return (status, headers, body);
                };
                let before = items.len();
                items.retain(listed);
                let hidden = before - items.len();
                if let Some(total) = page.get("total").and_then(Value::as_u64) {
                    page.insert("total".into(), (total - hidden as u64).into());
                }
                hidden
            }
            (Kind::StatusBatch, Value::Object(map)) => {
                let before = map.len();
                map.retain(|id, _| !self.hidden_now(id));
                before - map.len()
            }
            _ => 0,
        };
        if hidden == 0 {
            return (status, headers, body);
        }
        {
            let mut stats = self.stats.lock().unwrap();
            stats.lagged_lists += 1;
            stats.hidden += hidden;
        }
        (status, headers, Bytes::from(json.to_string()))
    }
}

type Upstream = (StatusCode, Vec<(String, String)>, Bytes);

async fn send_upstream(proxy: &Shared, call: &Call) -> anyhow::Result<Upstream> {
    let mut url = proxy.upstream.clone();
    url.set_path(&call.path);
    url.set_query(call.query.as_deref());
    let mut outgoing = proxy
        .http
        .request(call.method.clone(), url)
        .body(call.body.clone());
    for (name, value) in &call.headers {
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

    #[tokio::test]
    async fn a_late_commit_answers_502_at_once_and_reaches_the_upstream_unchanged_later() {
        let upstream = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_string("{\"vm_uuid\": \"v\"}"))
            .mount(&upstream)
            .await;
        let plan = FaultPlan {
            late: Some(LatePlan {
                rate: 1.0,
                create_delay: Duration::from_secs(3)..Duration::from_secs(4),
                commit_delay: Duration::from_secs(3)..Duration::from_secs(4),
            }),
            ..FaultPlan::latency(Duration::ZERO..Duration::ZERO, 1)
        };
        let proxy = FaultProxy::start(upstream.uri().parse().unwrap(), plan).await;
        let client = reqwest::Client::new();
        let body = "{\"token\": \"tok-1\", \"compose_hash\": \"ab\"}";
        let answer = client
            .post(
                proxy
                    .url
                    .join("/api/v1/cvms/x/commit-replica?token=tok-1")
                    .unwrap(),
            )
            .header("X-API-Key", "key")
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 502);
        assert!(answer.text().await.unwrap().contains("<html>"));
        assert_eq!(proxy.stats().late_pending, 1);
        // A prepare is never late: it makes no CVM.
        let prepare = client
            .post(proxy.url.join("/api/v1/cvms/x/replicas").unwrap())
            .header("X-Prepare-Only", "true")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(prepare.status(), 200);

        proxy.late_calls_landed().await;
        let seen = upstream.received_requests().await.unwrap();
        let commits: Vec<_> = seen
            .iter()
            .filter(|r| r.url.path().ends_with("/commit-replica"))
            .collect();
        assert_eq!(commits.len(), 1, "forwarded once");
        let commit = commits[0];
        assert_eq!(
            commit.body,
            body.as_bytes(),
            "the same body, token included"
        );
        assert_eq!(commit.url.query(), Some("token=tok-1"));
        assert_eq!(commit.headers.get("x-api-key").unwrap(), "key");
        assert_eq!(
            commit.headers.get("content-type").unwrap(),
            "application/json"
        );
        let stats = proxy.stats();
        assert_eq!(stats.faults.get(&Fault::LateCompletion), Some(&1));
        assert_eq!(stats.late_landed.get(&200), Some(&1));
        assert_eq!(stats.late_pending, 0);
        // The journal tells the 502 the client heard from the late landing.
        let commits: Vec<_> = stats
            .journal
            .iter()
            .filter(|j| j.path.ends_with("/commit-replica"))
            .map(|j| {
                (
                    j.client.as_str(),
                    j.upstream,
                    j.token.as_deref(),
                    j.created.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            commits,
            [
                ("502 (late)", None, Some("tok-1"), None),
                ("late landing", Some(200), Some("tok-1"), Some("v")),
            ]
        );
    }

    #[tokio::test]
    async fn a_new_cvm_stays_out_of_the_lists_until_its_lag_has_passed() {
        let upstream = MockServer::start().await;
        let new = "0d0a6e1c-7c1b-4c57-9d7e-2d1f0e5b9a01";
        let old = "11111111-2222-3333-4444-555555555555";
        Mock::given(method("POST"))
            .and(wiremock::matchers::path("/api/v1/cvms/src/replicas"))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(serde_json::json!({"vm_uuid": new})),
            )
            .mount(&upstream)
            .await;
        Mock::given(method("GET"))
            .and(wiremock::matchers::path("/api/v1/apps/ab/cvms"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(serde_json::json!([{"vm_uuid": old}, {"vm_uuid": new}])),
            )
            .mount(&upstream)
            .await;
        Mock::given(method("GET"))
            .and(wiremock::matchers::path("/api/v1/cvms/paginated"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "items": [{"vm_uuid": old}, {"vm_uuid": new}], "total": 2, "page": 1
            })))
            .mount(&upstream)
            .await;
        Mock::given(method("POST"))
            .and(wiremock::matchers::path("/api/v1/status/batch"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                new.replace('-', ""): {"status": "starting"}, old: {"status": "running"}
            })))
            .mount(&upstream)
            .await;
        let plan = FaultPlan {
            list_lag: Some(Duration::from_secs(3)..Duration::from_secs(4)),
            ..FaultPlan::latency(Duration::ZERO..Duration::ZERO, 1)
        };
        let proxy = FaultProxy::start(upstream.uri().parse().unwrap(), plan).await;
        let client = reqwest::Client::new();
        let get = |path: &'static str| {
            let client = client.clone();
            let url = proxy.url.join(path).unwrap();
            async move {
                let answer = client.get(url).send().await.unwrap();
                answer.json::<Value>().await.unwrap()
            }
        };
        let batch = || async {
            let answer = client
                .post(proxy.url.join("/api/v1/status/batch").unwrap())
                .body("{}")
                .send()
                .await
                .unwrap();
            answer.json::<Value>().await.unwrap()
        };
        // Listed before it exists at the upstream's: nothing to hide yet.
        assert_eq!(
            get("/api/v1/apps/ab/cvms").await.as_array().unwrap().len(),
            2
        );

        let created = client
            .post(proxy.url.join("/api/v1/cvms/src/replicas").unwrap())
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 200, "the create's own answer names it");
        assert_eq!(
            get("/api/v1/apps/ab/cvms").await,
            serde_json::json!([{"vm_uuid": old}])
        );
        let page = get("/api/v1/cvms/paginated").await;
        assert_eq!(
            (page["items"].as_array().unwrap().len(), &page["total"]),
            (1, &Value::from(1))
        );
        assert_eq!(batch().await.as_object().unwrap().len(), 1);
        let stats = proxy.stats();
        assert_eq!((stats.lagged_lists, stats.hidden), (3, 3));

        // Listed once its lag has passed.
        let mut listed = 0;
        for _ in 0..100 {
            listed = get("/api/v1/apps/ab/cvms").await.as_array().unwrap().len();
            if listed == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(listed, 2);
        assert_eq!(batch().await.as_object().unwrap().len(), 2);
    }
}
