//! Sign-in to the team page over HTTP: Sign-In with Ethereum against a real
//! Safe on anvil (its owners read, a listed operator queues), the SSO proxy
//! header, CSRF and the security headers. Every bad input is refused with a
//! clear answer and creates no session.

use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use approval_bridge::config::{Operators, TrustedProxies};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::spawn_app_with;
use crate::page_app::{CHAIN, page_app, page_app_with, refusal, session_cookie};
use crate::safe_world::SafeWorld;
use crate::web::PROXY_SECRET;

#[tokio::test]
async fn an_operator_signs_in_with_ethereum_and_an_owner_reads_only() {
    let page = page_app(false).await;
    let message = page.message(&page.operator).await;
    assert!(
        message.starts_with("bridge.test:8080 wants you to sign in"),
        "{message}"
    );
    let answer = page.sign_in(&message, &page.operator).await;
    assert_eq!(answer.status(), 200);
    let cookie = session_cookie(&answer);
    let json: Value = answer.json().await.unwrap();
    assert_eq!(json["role"], "operator");
    // Only the digest is stored.
    let stored: Vec<u8> = sqlx::query_scalar("SELECT id_digest FROM web_sessions")
        .fetch_one(&page.app.db)
        .await
        .unwrap();
    assert_ne!(stored, cookie.trim_start_matches("ab_session=").as_bytes());

    let list = page.get_page("/replicas", &cookie).await;
    assert_eq!(list.status(), 200);
    let headers = list.headers().clone();
    let html = list.text().await.unwrap();
    assert!(
        html.contains(&page.operator.address().to_checksum(None)),
        "{html}"
    );
    assert!(html.contains("href=\"/replicas/new\""));
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(headers["referrer-policy"], "same-origin");
    assert_eq!(headers["cache-control"], "no-store");

    // Owner 1 of the Safe (read from the chain) reads, and may not queue.
    let owner = page.world.chain.signer(1);
    let message = page.message(&owner).await;
    let answer = page.sign_in(&message, &owner).await;
    assert_eq!(answer.status(), 200);
    let owner_cookie = session_cookie(&answer);
    let form = page.get_page("/replicas/new", &owner_cookie).await;
    assert_eq!(form.status(), 403);
    assert!(
        form.text()
            .await
            .unwrap()
            .contains("only operators may queue")
    );
    let owner_csrf = page.csrf_of(&owner_cookie).await;
    let queue = page
        .post_form(
            "/replicas",
            &owner_cookie,
            &[("csrf", owner_csrf.as_str()), ("source", "web-prod")],
        )
        .await;
    assert_eq!(queue.status(), 403);
    assert_eq!(page.app.request_count().await, 0);

    // Signing out ends the session: the same cookie no longer signs in.
    let csrf = page.csrf_of(&cookie).await;
    let out = page
        .post_form("/logout", &cookie, &[("csrf", csrf.as_str())])
        .await;
    assert_eq!(out.url().path(), "/login", "redirected to sign in");
    assert_eq!(page.get_page("/replicas", &cookie).await.status(), 401);
}

#[tokio::test]
async fn forged_replayed_stale_and_foreign_messages_create_no_session() {
    let page = page_app(false).await;
    let stranger = PrivateKeySigner::random();

    // Anonymous: sent to sign in.
    let anonymous = page.get_page("/replicas", "").await;
    assert_eq!(anonymous.url().path(), "/login");
    assert!(
        anonymous
            .text()
            .await
            .unwrap()
            .contains("Sign in with Ethereum")
    );

    // Forged: the operator's message signed by another key.
    let message = page.message(&page.operator).await;
    let text = refusal(page.sign_in(&message, &stranger).await, 401).await;
    assert!(text.contains("signature does not verify"), "{text}");
    // A message altered after signing.
    let signature = page.operator.sign_message_sync(message.as_bytes()).unwrap();
    let altered = message.replace("Sign in to approval-bridge.", "Sign in to approval-bridge!");
    refusal(page.send_signed(&altered, &signature).await, 401).await;

    // Replayed: the first use signs in, the second is refused.
    let message = page.message(&page.operator).await;
    assert_eq!(page.sign_in(&message, &page.operator).await.status(), 200);
    assert_eq!(page.sessions().await, 1);
    let text = refusal(page.sign_in(&message, &page.operator).await, 401).await;
    assert!(text.contains("nonce"), "{text}");

    // Stale: the message's nonce and expiry are ten minutes old.
    let message = page.message(&page.operator).await;
    page.app.clock.advance(chrono::Duration::minutes(11));
    let text = refusal(page.sign_in(&message, &page.operator).await, 422).await;
    assert!(text.contains("expired"), "{text}");

    // Another domain, another chain: a message the bridge did not write,
    // made from one it did.
    let message = page.message(&page.operator).await;
    let other_domain = message.replacen("bridge.test:8080", "evil.test", 1);
    let text = refusal(page.sign_in(&other_domain, &page.operator).await, 422).await;
    assert!(text.contains("evil.test"), "{text}");
    let other_chain = message.replace("Chain ID: 31337", "Chain ID: 1");
    let text = refusal(page.sign_in(&other_chain, &page.operator).await, 422).await;
    assert!(text.contains("chain 1"), "{text}");
    let text = refusal(page.message_for(page.operator.address(), 1).await, 422).await;
    assert!(text.contains("chain 1"), "{text}");

    // Someone who is neither operator nor owner.
    let message = page.message(&stranger).await;
    let text = refusal(page.sign_in(&message, &stranger).await, 403).await;
    assert!(text.contains("neither an operator nor an owner"), "{text}");

    // Without the CSRF header.
    let answer = page
        .app
        .http
        .post(format!("{}/login/message", page.app.address))
        .json(&json!({"address": page.operator.address().to_checksum(None), "chain_id": CHAIN}))
        .send()
        .await
        .unwrap();
    refusal(answer, 403).await;

    assert_eq!(page.sessions().await, 1, "only the one good sign-in");

    // A tampered cookie signs nobody in, and says so.
    let tampered = page
        .get_page("/replicas", &format!("ab_session={}", "0f".repeat(32)))
        .await;
    assert_eq!(tampered.status(), 401);
    assert!(tampered.text().await.unwrap().contains("Sign in again"));
}

#[tokio::test]
async fn the_proxy_header_counts_only_from_a_trusted_proxy() {
    let page = page_app(true).await;
    // The test connects from 127.0.0.1, which is not the trusted proxy.
    let answer = page
        .app
        .http
        .get(format!("{}/replicas", page.app.address))
        .header("x-forwarded-email", "ops@example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 403);
    assert!(answer.text().await.unwrap().contains("not a trusted proxy"));
    assert_eq!(page.sessions().await, 0);
}

#[tokio::test]
async fn a_trusted_proxy_signs_in_its_user() {
    let world = SafeWorld::start().await;
    let configure = world.configure(world.chain.rpc_url());
    let page = spawn_app_with(move |s| {
        configure(s);
        s.web.operators = Operators {
            addresses: vec![],
            users: vec!["ops@example.com".into()],
        };
        s.web.proxy_user_header = Some("x-forwarded-email".parse().unwrap());
        s.web.trusted_proxies = TrustedProxies(vec!["127.0.0.1".parse().unwrap()]);
        s.web.proxy_secret = Some(PROXY_SECRET.to_owned().into());
    })
    .await;
    let get = |user: &'static str| {
        page.http
            .get(format!("{}/replicas/new", page.address))
            .header("x-forwarded-email", user)
            .header("x-proxy-secret", PROXY_SECRET)
            .send()
    };
    let operator = get("ops@example.com").await.unwrap();
    assert_eq!(operator.status(), 200);
    let viewer = get("someone@example.com").await.unwrap();
    assert_eq!(viewer.status(), StatusCode::FORBIDDEN);
    assert!(
        viewer
            .text()
            .await
            .unwrap()
            .contains("someone@example.com reads only")
    );
}

#[tokio::test]
async fn a_page_form_without_its_csrf_token_is_refused_and_changes_nothing() {
    let page = page_app(false).await;
    let cookie = page.session_for(&page.operator).await;
    for form in [
        vec![("source", "web-prod")],
        vec![("source", "web-prod"), ("csrf", "0000")],
    ] {
        let answer = page.post_form("/replicas", &cookie, &form).await;
        assert_eq!(answer.status(), 403);
        assert!(answer.text().await.unwrap().contains("CSRF token"));
    }
    assert_eq!(page.app.request_count().await, 0);
}

#[tokio::test]
async fn the_page_queues_through_intake_as_the_person_and_within_their_scope() {
    let page = page_app_with(false, |s, operator| {
        s.trust.scopes.0.push((
            format!("web:{}", operator.to_checksum(None)),
            vec![approval_bridge::config::SourcePattern::Name(
                "other-cvm".into(),
            )],
        ));
    })
    .await;
    crate::safe_world::mount_source_on(&page.app, page.world.app, true).await;
    let cookie = page.session_for(&page.operator).await;
    let csrf = page.csrf_of(&cookie).await;
    let answer = page
        .post_form(
            "/replicas",
            &cookie,
            &[
                ("csrf", csrf.as_str()),
                ("source", crate::phala_mock::ONCHAIN_NAME),
                ("node", "node-b"),
                ("count", "1"),
                ("note", "from the page"),
            ],
        )
        .await;
    assert_eq!(answer.status(), 403);
    let html = answer.text().await.unwrap();
    let operator = format!("web:{}", page.operator.address().to_checksum(None));
    assert!(html.contains("may not replicate"), "{html}");
    assert!(html.contains(&operator), "{html}");
    // The form comes back with what was typed.
    assert!(html.contains("from the page"), "{html}");
    assert_eq!(page.app.request_count().await, 0);
}

#[tokio::test]
async fn env_from_the_page_reaches_the_bridges_allowed_envs_check() {
    let page = page_app(false).await;
    crate::safe_world::mount_source_on(&page.app, page.world.app, true).await;
    let cookie = page.session_for(&page.operator).await;
    let csrf = page.csrf_of(&cookie).await;
    // From the .env text and from a name/value row: both are checked.
    for form in [
        vec![
            ("csrf", csrf.as_str()),
            ("source", "web-prod"),
            ("env", "# comment\nDB_URL=postgres://x\n"),
        ],
        vec![
            ("csrf", csrf.as_str()),
            ("source", "web-prod"),
            ("env_name", "DB_URL"),
            ("env_value", "x"),
        ],
    ] {
        let answer = page.post_form("/replicas", &cookie, &form).await;
        assert_eq!(answer.status(), 422);
        let html = answer.text().await.unwrap();
        assert!(
            html.contains("DB_URL") && html.contains("allowed_envs"),
            "{html}"
        );
    }
    // A .env text that does not parse is refused by the page itself.
    let answer = page
        .post_form(
            "/replicas",
            &cookie,
            &[
                ("csrf", csrf.as_str()),
                ("source", "web-prod"),
                ("env", "NOT A LINE"),
            ],
        )
        .await;
    assert_eq!(answer.status(), 422);
    assert!(
        answer
            .text()
            .await
            .unwrap()
            .contains(".env text does not parse")
    );
    assert_eq!(page.app.request_count().await, 0);
}

#[tokio::test]
async fn a_used_nonce_is_kept_until_it_expires_then_swept() {
    let app = crate::helpers::spawn_app().await;
    let now = app.clock.now();
    let expires = now + chrono::Duration::minutes(10);
    let store = &app.store;
    assert!(store.use_web_nonce("nonce-1", now, expires).await.unwrap());
    assert!(
        !store.use_web_nonce("nonce-1", now, expires).await.unwrap(),
        "single use"
    );
    let later = expires + chrono::Duration::seconds(1);
    assert!(store.use_web_nonce("nonce-2", later, later).await.unwrap());
    let kept: Vec<String> = sqlx::query_scalar("SELECT nonce FROM web_nonces")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(kept, ["nonce-2"], "the expired one is swept");
}
