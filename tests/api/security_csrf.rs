//! Issue 18, findings 4 and 9 (CSRF): `__Host-` cookies and HSTS under
//! https, from the public URL or a trusted proxy; CSRF tokens tied to the
//! session, so a planted cookie forges nothing; cross-site requests refused
//! on the page (sign-in included) and on the sandbox's controls.

use std::time::Duration;

use approval_bridge::config::TrustedProxies;
use approval_bridge::sandbox::{Sandbox, SandboxOptions};
use serde_json::json;

use crate::helpers::{TestApp, error_of, sandbox_database, spawn_app_with};
use crate::page_app::{Browser, PUBLIC_URL, open_login, page_app, page_app_with};

fn set_cookies(answer: &reqwest::Response) -> Vec<String> {
    answer
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

async fn get_login(app: &TestApp, forwarded_proto: Option<&str>) -> reqwest::Response {
    let mut request = app.http.get(format!("{}/login", app.address));
    if let Some(proto) = forwarded_proto {
        request = request.header("x-forwarded-proto", proto);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn over_https_the_cookies_are_host_prefixed_and_hsts_is_sent() {
    // Known from a trusted proxy: 127.0.0.1, where the test connects from.
    let app = spawn_app_with(|s| {
        s.web.public_url = Some("http://bridge.test:8080".parse().unwrap());
        s.web.trusted_proxies = TrustedProxies(vec!["127.0.0.1".parse().unwrap()]);
    })
    .await;
    let https = get_login(&app, Some("https")).await;
    let hsts = https.headers()["strict-transport-security"]
        .to_str()
        .unwrap();
    assert!(hsts.starts_with("max-age="), "{hsts}");
    let cookie = set_cookies(&https).concat();
    assert!(cookie.starts_with("__Host-ab_csrf="), "{cookie}");
    assert!(
        cookie.contains("; Secure") && cookie.contains("Path=/"),
        "{cookie}"
    );
    assert!(!cookie.contains("Domain"), "{cookie}");
    // Plain http: plain cookies, no HSTS.
    let http = get_login(&app, None).await;
    assert!(!http.headers().contains_key("strict-transport-security"));
    assert!(set_cookies(&http).concat().starts_with("ab_csrf="));

    // From an address that is not a trusted proxy, the header counts for nothing.
    let untrusted = spawn_app_with(|s| {
        s.web.public_url = Some("http://bridge.test:8080".parse().unwrap());
        s.web.trusted_proxies = TrustedProxies(vec!["10.9.8.7".parse().unwrap()]);
    })
    .await;
    let spoofed = get_login(&untrusted, Some("https")).await;
    assert!(!spoofed.headers().contains_key("strict-transport-security"));
    assert!(set_cookies(&spoofed).concat().starts_with("ab_csrf="));
}

#[tokio::test]
async fn an_https_public_url_signs_in_with_host_cookies_only() {
    let page = page_app_with(false, |s, _| {
        s.web.public_url = Some("https://bridge.test".parse().unwrap());
    })
    .await;
    assert!(page.browser.cookie.starts_with("__Host-ab_csrf="));
    let message = page.message(&page.operator).await;
    let answer = page.sign_in(&message, &page.operator).await;
    assert_eq!(answer.status(), 200);
    assert!(answer.headers().contains_key("strict-transport-security"));
    let set = set_cookies(&answer).concat();
    assert!(set.starts_with("__Host-ab_session="), "{set}");
    assert!(
        set.contains("; Secure") && set.contains("HttpOnly"),
        "{set}"
    );
    let session = set.split(';').next().unwrap().to_owned();
    assert_eq!(page.get_page("/replicas", &session).await.status(), 200);
    // The same value without the prefix, as a sibling domain or a plain-http
    // answer could set it, signs nobody in.
    let plain = session.trim_start_matches("__Host-");
    let answer = page.get_page("/replicas", plain).await;
    assert_eq!(answer.url().path(), "/login");
    // Nor does a CSRF cookie without the prefix pass.
    let (_, value) = page.browser.cookie.split_once('=').unwrap();
    let planted = Browser {
        cookie: format!("ab_csrf={value}"),
        token: page.browser.token.clone(),
    };
    let answer = page
        .app
        .http
        .post(format!("{}/login/message", page.app.address))
        .header("cookie", &planted.cookie)
        .header("x-csrf-token", &planted.token)
        .json(&json!({"address": page.operator.address().to_checksum(None), "chain_id": 31337}))
        .send()
        .await
        .unwrap();
    let (code, _) = error_of(answer, 403).await;
    assert_eq!(code, "csrf_token_invalid");
}

#[tokio::test]
async fn a_csrf_token_is_tied_to_the_session_and_a_planted_cookie_forges_nothing() {
    let page = page_app(false).await;
    let victim = page.session_for(&page.operator).await;
    // The attacker's own browser: a cookie and the token the page made of it.
    let attacker = open_login(&page.app).await;
    // Planted next to the victim's session, with the attacker's token.
    let forged = page
        .app
        .http
        .post(format!("{}/logout", page.app.address))
        .header("cookie", format!("{}; {victim}", attacker.cookie))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={}", attacker.token))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    assert!(forged.text().await.unwrap().contains("CSRF token"));
    // Another session's token does not fit either.
    let other = page.session_for(&page.world.chain.signer(1)).await;
    let other_token = page.csrf_of(&other).await;
    let answer = page
        .post_form("/logout", &victim, &[("csrf", other_token.as_str())])
        .await;
    assert_eq!(answer.status(), 403);
    assert_eq!(page.get_page("/replicas", &victim).await.status(), 200);
    // The session's own token does.
    let token = page.csrf_of(&victim).await;
    assert_ne!(token, page.browser.token, "a new token once signed in");
    let out = page
        .post_form("/logout", &victim, &[("csrf", token.as_str())])
        .await;
    assert_eq!(out.url().path(), "/login");
    assert_eq!(page.get_page("/replicas", &victim).await.status(), 401);
}

#[tokio::test]
async fn cross_site_requests_to_the_page_are_refused_before_anything_changes() {
    let page = page_app(false).await;
    let session = page.session_for(&page.operator).await;
    let token = page.csrf_of(&session).await;
    let post = |path: &'static str, headers: Vec<(&'static str, &'static str)>| {
        let mut request = page
            .app
            .http
            .post(format!("{}{path}", page.app.address))
            .header("cookie", format!("{}; {session}", page.browser.cookie))
            .header("x-csrf-token", &token)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("csrf={token}&source=web-prod"));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.send()
    };
    for headers in [
        vec![("origin", "https://evil.example")],
        vec![("origin", "http://sub.bridge.test:8080")],
        vec![("origin", "null")],
        vec![("sec-fetch-site", "cross-site")],
        vec![("sec-fetch-site", "same-site"), ("origin", PUBLIC_URL)],
    ] {
        for path in ["/logout", "/replicas", "/login/message", "/login"] {
            let answer = post(path, headers.clone()).await.unwrap();
            let (code, message) = error_of(answer, 403).await;
            assert_eq!(code, "cross_site_request", "{path} {headers:?}");
            assert!(message.contains("cross-site request refused"), "{message}");
        }
    }
    assert_eq!(page.app.request_count().await, 0);
    assert_eq!(page.get_page("/replicas", &session).await.status(), 200);
    // From the page itself, it goes through.
    let out = post(
        "/logout",
        vec![("origin", PUBLIC_URL), ("sec-fetch-site", "same-origin")],
    )
    .await
    .unwrap();
    assert_eq!(out.url().path(), "/login");
    assert_eq!(page.get_page("/replicas", &session).await.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_controls_refuse_cross_site_posts() {
    let sandbox = Sandbox::start(SandboxOptions {
        port: 0,
        database_url: Some(sandbox_database()),
        batch_window_secs: 1,
        confirmations: 1,
        boot_delay: Duration::ZERO,
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let base = sandbox.url.as_str().trim_end_matches('/').to_owned();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let hash = format!("0x{}", "ab".repeat(32));
    let controls = [
        ("/sandbox/dev-login".to_owned(), "account=operator"),
        (format!("/sandbox/safe/{hash}/sign"), "owner=0"),
        (format!("/sandbox/safe/{hash}/execute"), ""),
    ];
    for (path, form) in &controls {
        for (name, value) in [
            ("origin", "https://evil.example"),
            ("sec-fetch-site", "cross-site"),
        ] {
            let answer = http
                .post(format!("{base}{path}"))
                .header(name, value)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(*form)
                .send()
                .await
                .unwrap();
            assert!(answer.headers().get("set-cookie").is_none(), "{path}");
            let (code, _) = error_of(answer, 403).await;
            assert_eq!(code, "cross_site_request", "{path}");
        }
    }
    // The page's own dev login still signs in, through the bridge's CSRF.
    let answer = http
        .post(format!("{base}/sandbox/dev-login"))
        .header("origin", &base)
        .header("sec-fetch-site", "same-origin")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("account=operator")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 303);
    let cookie = answer.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("ab_session="), "{cookie}");
    let session = cookie.split(';').next().unwrap();
    let page = http
        .get(format!("{base}/replicas/new"))
        .header("cookie", session)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    sandbox.stop().await.unwrap();
}
