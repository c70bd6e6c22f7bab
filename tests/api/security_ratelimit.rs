//! Issue 18, finding 9 (per-client limits): what anyone may call without
//! credentials is rate-limited per client address, as a trusted proxy names
//! it, before any handler runs; one client over the limit locks nobody else
//! out; signed-in pages and good tokens are never charged; and a flood of
//! addresses keeps the limiter's memory bounded.

use std::time::Instant;

use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use approval_bridge::config::{Settings, TrustedProxies};
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{Value, json};

use crate::helpers::{API_TOKEN, TestApp, WEBHOOK_SECRET, error_of, spawn_app_with};
use crate::page_app::{CHAIN, page_app_with, session_cookie};
use crate::web::csrf_on_page;

/// The limit on, at `per_minute`, with 127.0.0.1 (every test client) as
/// the trusted proxy, so `X-Forwarded-For` names the client.
fn limited(settings: &mut Settings, per_minute: u32) {
    settings.server.client_rate_per_minute = per_minute;
    settings.web.trusted_proxies = TrustedProxies(vec!["127.0.0.1".parse().unwrap()]);
}

/// A browser at `address`, behind the trusted proxy: its requests carry
/// the proxy's `X-Forwarded-For`, with its CSRF pair once it opened `/login`.
struct Client {
    http: reqwest::Client,
    base: String,
    cookie: String,
    token: String,
}

impl Client {
    fn at(app: &TestApp, forwarded_for: &str) -> Client {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_str(forwarded_for).unwrap(),
        );
        Client {
            http: reqwest::Client::builder()
                .default_headers(headers)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            base: app.address.clone(),
            cookie: String::new(),
            token: String::new(),
        }
    }

    /// Opens `/login` as a browser does: keeps the CSRF cookie and token.
    async fn open_login(&mut self) -> reqwest::Response {
        let answer = self.get("/login").await;
        if answer.status() == 200 {
            let cookie = answer.headers()["set-cookie"].to_str().unwrap();
            self.cookie = cookie.split(';').next().unwrap().to_owned();
        }
        answer
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .header("accept", "text/html,application/xhtml+xml")
            .send()
            .await
            .unwrap()
    }

    async fn post_json(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .header("x-csrf-token", &self.token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn message(&self, key: &PrivateKeySigner) -> reqwest::Response {
        self.post_json(
            "/login/message",
            json!({"address": key.address().to_checksum(None), "chain_id": CHAIN}),
        )
        .await
    }

    /// The whole sign-in: `/login`, a message, its signature.
    async fn sign_in(&mut self, key: &PrivateKeySigner) -> reqwest::Response {
        let page = self.open_login().await;
        assert_eq!(page.status(), 200);
        self.token = csrf_on_page(&page.text().await.unwrap());
        let answer = self.message(key).await;
        assert_eq!(answer.status(), 200);
        let message: Value = answer.json().await.unwrap();
        let message = message["message"].as_str().unwrap();
        let signature = key.sign_message_sync(message.as_bytes()).unwrap();
        self.post_json(
            "/login",
            json!({"message": message, "signature": format!("0x{}", hex::encode(signature.as_bytes()))}),
        )
        .await
    }
}

/// A 429 of the limiter: JSON `rate_limited` with a `Retry-After` in seconds.
async fn assert_rate_limited(answer: reqwest::Response) -> u64 {
    let retry_after: u64 = answer.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let (code, message) = error_of(answer, 429).await;
    assert_eq!(code, "rate_limited");
    assert!(message.contains("try again in"), "{message}");
    retry_after
}

#[tokio::test]
async fn one_client_over_the_limit_gets_429_and_a_fresh_client_still_signs_in() {
    let page = page_app_with(false, |s, _| limited(s, 10)).await;
    let app = &page.app;
    let mut flooder = Client::at(app, "198.51.100.7");
    let page_answer = flooder.open_login().await;
    flooder.token = csrf_on_page(&page_answer.text().await.unwrap());
    let mut handed_out = 0;
    let retry_after = loop {
        let answer = flooder.message(&page.operator).await;
        if answer.status() == 429 {
            break assert_rate_limited(answer).await;
        }
        assert_eq!(answer.status(), 200);
        handed_out += 1;
        assert!(handed_out < 100, "never limited");
    };
    // The burst is the minute's worth, `/login` took one of them.
    assert_eq!(handed_out, 9);
    // A browser gets a page that says so.
    let answer = flooder.get("/login").await;
    assert_eq!(answer.status(), 429);
    assert!(answer.headers().contains_key("retry-after"));
    let html = answer.text().await.unwrap();
    assert!(html.contains("Too many requests"), "{html}");
    // The webhook refuses before its signature is checked: a good one
    // queues nothing.
    let body = json!({"source": "web-prod"}).to_string();
    let ts = app.clock.now().timestamp();
    let signature = approval_bridge::web::webhook::sign(WEBHOOK_SECRET, ts, None, body.as_bytes());
    let answer = flooder
        .http
        .post(format!("{}/webhooks/ci", app.address))
        .header("X-Bridge-Timestamp", ts.to_string())
        .header("X-Bridge-Signature", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_rate_limited(answer).await;
    assert_eq!(app.request_count().await, 0);
    // An address the flooder writes itself, left of what the proxy
    // appended, changes nothing.
    let spoofing = Client::at(app, "203.0.113.1, 198.51.100.7");
    assert_rate_limited(spoofing.message(&page.operator).await).await;

    // A fresh client, another address through the same proxy, signs in.
    let mut fresh = Client::at(app, "198.51.100.8");
    let answer = fresh.sign_in(&page.operator).await;
    assert_eq!(answer.status(), 200);
    session_cookie(&answer);
    assert_eq!(page.sessions().await, 1);

    // Once `Retry-After` has passed, the flooder may ask again.
    app.clock
        .advance(chrono::Duration::seconds(retry_after as i64));
    assert_eq!(flooder.message(&page.operator).await.status(), 200);
    assert_eq!(flooder.message(&page.operator).await.status(), 429);
}

#[tokio::test]
async fn signed_in_pages_and_good_tokens_are_not_charged_but_refused_ones_are() {
    let page = page_app_with(false, |s, _| limited(s, 5)).await;
    let app = &page.app;
    let mut person = Client::at(app, "198.51.100.20");
    let session = session_cookie(&person.sign_in(&page.operator).await);
    // The page polls far more often than the anonymous limit allows.
    for _ in 0..30 {
        let answer = person
            .http
            .get(format!("{}/replicas/rows", app.address))
            .header("cookie", &session)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    let script = Client::at(app, "198.51.100.21");
    for _ in 0..30 {
        let answer = script
            .http
            .get(format!("{}/api/v1/replicas", app.address))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }

    // Guessing tokens: each refusal costs one, then the guesser is refused
    // before its token is looked at, even a good one.
    let guesser = Client::at(app, "198.51.100.22");
    let guess = |token: &'static str| {
        guesser
            .http
            .get(format!("{}/api/v1/replicas", app.address))
            .bearer_auth(token)
            .send()
    };
    for _ in 0..5 {
        let (code, _) = error_of(guess("guessed-token-0000").await.unwrap(), 401).await;
        assert_eq!(code, "unauthorized");
    }
    assert_rate_limited(guess("guessed-token-0000").await.unwrap()).await;
    assert_rate_limited(guess(API_TOKEN).await.unwrap()).await;
    // Guessing session ids likewise.
    let cookie_guesser = Client::at(app, "198.51.100.23");
    for expected in [401, 401, 401, 401, 401, 429] {
        let answer = cookie_guesser
            .http
            .get(format!("{}/replicas", app.address))
            .header("cookie", format!("ab_session={}", "ab".repeat(32)))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), expected);
    }
    // The person and the script are not touched by either.
    assert_eq!(
        script
            .http
            .get(format!("{}/api/v1/replicas", app.address))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // `/healthz` is never limited.
    for _ in 0..20 {
        assert_eq!(guesser.get("/healthz").await.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_addresses_keeps_the_limiter_bounded() {
    const MAX_CLIENTS: usize = 200;
    const FLOOD: u32 = 5_000;
    let app = spawn_app_with(|s| {
        limited(s, 2);
        s.server.client_rate_max_clients = MAX_CLIENTS;
    })
    .await;
    let first = Client::at(&app, "198.51.100.1");
    for expected in [200, 200, 429] {
        assert_eq!(first.get("/static/style.css").await.status(), expected);
    }

    let started = Instant::now();
    let app = &app;
    let refused = futures_util::stream::iter(0..FLOOD)
        .map(|n| async move {
            let address = std::net::Ipv4Addr::from(0x0a00_0000 + n);
            app.http
                .get(format!("{}/static/style.css", app.address))
                .header("x-forwarded-for", address.to_string())
                .send()
                .await
                .unwrap()
                .status()
        })
        .buffer_unordered(32)
        .filter(|status| std::future::ready(*status != 200))
        .count()
        .await;
    let elapsed = started.elapsed();
    eprintln!(
        "flood: {FLOOD} distinct addresses in {:.2} s ({:.0} requests/s)",
        elapsed.as_secs_f64(),
        f64::from(FLOOD) / elapsed.as_secs_f64()
    );
    assert_eq!(refused, 0, "every new address has a full bucket");

    let metrics = app.metrics().await;
    let remembered: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("approval_bridge_rate_limit_clients "))
        .unwrap_or_else(|| panic!("no gauge in {metrics}"))
        .parse()
        .unwrap();
    eprintln!("the limiter remembers {remembered} of {FLOOD} addresses");
    assert!(
        remembered > 0.0 && remembered <= MAX_CLIENTS as f64,
        "{remembered}"
    );
    // The oldest were forgotten: the first client starts again.
    assert_eq!(first.get("/static/style.css").await.status(), 200);
}
