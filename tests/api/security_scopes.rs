//! Issue 18, finding 3: least privilege for every caller. Scopes apply to
//! reading, listing and cancelling requests and to proposals, not only to
//! queueing; a caller with no scope entry gets nothing; `+admin` sees and
//! cancels everything; `*` is every source. Out of scope is a 404.

use approval_bridge::config::{NamedSecrets, Scopes, SourcePattern, parse_named_secrets};
use reqwest::{Method, Response};
use serde_json::{Value, json};

use crate::helpers::{API_TOKEN, TestApp, error_of, spawn_app_with};
use crate::phala_mock::*;
use crate::safe_world::{SafeWorld, mount_source_on};
use crate::web::PROXY_SECRET;

const DOCS: &str = "docs-token-12345";
const WEB: &str = "web-token-123456";
const AUDIT: &str = "audit-token-1234";
const NOBODY: &str = "nobody-token-123";

/// `ci-bot` may replicate anything; `docs` only the Cloud-KMS source;
/// `web` only web-prod (by name); `audit` holds `+admin` and no source;
/// `nobody` has no scope entry at all.
fn callers() -> (NamedSecrets, Scopes) {
    let tokens = parse_named_secrets(&format!(
        "ci-bot={API_TOKEN},docs={DOCS},web={WEB},audit={AUDIT},nobody={NOBODY}"
    ))
    .unwrap();
    let scopes = Scopes(vec![
        ("api:ci-bot".into(), vec![SourcePattern::Any]),
        (
            "api:docs".into(),
            vec![SourcePattern::Name(CLOUD_NAME.into())],
        ),
        (
            "api:web".into(),
            vec![SourcePattern::Name(ONCHAIN_NAME.into())],
        ),
        ("api:audit".into(), vec![SourcePattern::Admin]),
    ]);
    (tokens, scopes)
}

async fn call(app: &TestApp, method: Method, path: &str, token: &str) -> Response {
    app.http
        .request(method, format!("{}{path}", app.address))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn json_of(response: Response) -> Value {
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn listed(app: &TestApp, path: &str, field: &str, token: &str) -> Vec<String> {
    json_of(call(app, Method::GET, path, token).await).await[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn queue_as(app: &TestApp, token: &str, body: Value) -> String {
    let response = app
        .http
        .post(format!("{}/api/v1/replicas", app.address))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 202, "{body}");
    body["replicas"][0]["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_scoped_token_sees_and_cancels_only_its_sources_and_admin_sees_all() {
    let app = spawn_app_with(|s| {
        (s.api_tokens, s.trust.scopes) = callers();
    })
    .await;
    mount_onchain_source(&app.phala, &[]).await;
    mount_cloud_source(&app.phala, &"11".repeat(32)).await;
    let web_prod = queue_as(
        &app,
        API_TOKEN,
        json!({"source": ONCHAIN_NAME, "note": "ci"}),
    )
    .await;
    let docs = queue_as(&app, DOCS, json!({"source": CLOUD_NAME})).await;

    // `docs` lists, reads and cancels its own source's request only.
    assert_eq!(
        listed(&app, "/api/v1/replicas", "replicas", DOCS).await,
        vec![docs.clone()]
    );
    let path = format!("/api/v1/replicas/{web_prod}");
    let (code, message) = error_of(call(&app, Method::GET, &path, DOCS).await, 404).await;
    assert_eq!(code, "not_found");
    assert!(!message.contains(ONCHAIN_NAME), "{message}");
    let cancel = format!("/api/v1/replicas/{web_prod}/cancel");
    error_of(call(&app, Method::POST, &cancel, DOCS).await, 404).await;
    assert_eq!(app.status_of(&web_prod).await, "queued");
    let own =
        json_of(call(&app, Method::GET, &format!("/api/v1/replicas/{docs}"), DOCS).await).await;
    assert_eq!(own["source"], CLOUD_NAME);

    // `web` (by name) sees web-prod's request, and not the Cloud-KMS one.
    assert_eq!(
        listed(&app, "/api/v1/replicas", "replicas", WEB).await,
        vec![web_prod.clone()]
    );
    error_of(
        call(&app, Method::GET, &format!("/api/v1/replicas/{docs}"), WEB).await,
        404,
    )
    .await;

    // A token without a scope entry is refused intake and sees nothing.
    let count = app.request_count().await;
    let refused = app
        .http
        .post(format!("{}/api/v1/replicas", app.address))
        .bearer_auth(NOBODY)
        .json(&json!({"source": CLOUD_NAME}))
        .send()
        .await
        .unwrap();
    let (code, message) = error_of(refused, 403).await;
    assert_eq!(code, "no_scope");
    assert!(message.contains("api:nobody"), "{message}");
    assert_eq!(app.request_count().await, count);
    assert!(
        listed(&app, "/api/v1/replicas", "replicas", NOBODY)
            .await
            .is_empty()
    );
    error_of(
        call(
            &app,
            Method::GET,
            &format!("/api/v1/replicas/{docs}"),
            NOBODY,
        )
        .await,
        404,
    )
    .await;
    assert!(
        listed(&app, "/api/v1/proposals?status=all", "proposals", NOBODY)
            .await
            .is_empty()
    );

    // `*` sees both; `+admin` sees and cancels both, and may queue nothing.
    let mut both = vec![web_prod.clone(), docs.clone()];
    both.sort();
    for token in [API_TOKEN, AUDIT] {
        let mut seen = listed(&app, "/api/v1/replicas", "replicas", token).await;
        seen.sort();
        assert_eq!(seen, both);
    }
    let cancelled = json_of(call(&app, Method::POST, &cancel, AUDIT).await).await;
    assert_eq!(cancelled["status"], "cancelled");
    let refused = app
        .http
        .post(format!("{}/api/v1/replicas", app.address))
        .bearer_auth(AUDIT)
        .json(&json!({"source": CLOUD_NAME}))
        .send()
        .await
        .unwrap();
    let (code, _) = error_of(refused, 403).await;
    assert_eq!(code, "source_out_of_scope");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_are_shown_only_to_callers_whose_scope_holds_their_app() {
    let world = SafeWorld::start().await;
    let configure = world.configure(world.chain.rpc_url());
    let app = spawn_app_with(move |s| {
        configure(s);
        (s.api_tokens, s.trust.scopes) = callers();
    })
    .await;
    mount_source_on(&app, world.app, false).await;
    let id = queue_as(&app, API_TOKEN, json!({"source": ONCHAIN_NAME, "node": 2})).await;
    app.drain_all(10).await;
    assert_eq!(app.status_of(&id).await, "awaiting_approval");
    let proposal = app.get_replica(&id).await["proposal"].clone();
    let proposal_id = proposal["id"].as_str().unwrap().to_owned();
    let hash = proposal["safe_tx_hash"].as_str().unwrap().to_owned();

    // Another caller's proposal, for an app outside `docs`'s scope: not listed,
    // and not found by id or by hash.
    assert!(
        listed(&app, "/api/v1/proposals?status=all", "proposals", DOCS)
            .await
            .is_empty()
    );
    for key in [&proposal_id, &hash] {
        let path = format!("/api/v1/proposals/{key}");
        let (code, _) = error_of(call(&app, Method::GET, &path, DOCS).await, 404).await;
        assert_eq!(code, "not_found");
        error_of(call(&app, Method::GET, &path, NOBODY).await, 404).await;
    }

    // The app's source by name, `*` and `+admin` see it, with its calls.
    for token in [WEB, API_TOKEN, AUDIT] {
        assert_eq!(
            listed(&app, "/api/v1/proposals", "proposals", token).await,
            vec![proposal_id.clone()]
        );
        let shown = json_of(
            call(
                &app,
                Method::GET,
                &format!("/api/v1/proposals/{hash}"),
                token,
            )
            .await,
        )
        .await;
        assert_eq!(shown["calls"].as_array().unwrap().len(), 2, "{shown}");
        assert_eq!(shown["requests"][0]["id"], id.as_str());
    }
}

#[tokio::test]
async fn a_person_with_a_scope_sees_only_its_sources_on_the_page() {
    let app = spawn_app_with(|s| {
        (s.api_tokens, s.trust.scopes) = callers();
        s.trust.scopes.0.push((
            "web:docs@example.com".into(),
            vec![SourcePattern::Name(CLOUD_NAME.into())],
        ));
        s.web.proxy_user_header = Some("x-forwarded-email".parse().unwrap());
        s.web.proxy_secret = Some(PROXY_SECRET.to_owned().into());
        s.web.trusted_proxies =
            approval_bridge::config::TrustedProxies(vec!["127.0.0.1".parse().unwrap()]);
    })
    .await;
    mount_onchain_source(&app.phala, &[]).await;
    mount_cloud_source(&app.phala, &"11".repeat(32)).await;
    let web_prod = queue_as(&app, API_TOKEN, json!({"source": ONCHAIN_NAME})).await;
    let docs = queue_as(&app, DOCS, json!({"source": CLOUD_NAME})).await;

    let page = |user: &'static str, path: String| {
        let request = app
            .http
            .get(format!("{}{path}", app.address))
            .header("x-forwarded-email", user)
            .header("x-proxy-secret", PROXY_SECRET);
        async move { request.send().await.unwrap() }
    };
    // Scoped: the list and the detail stop at the scope.
    let list = page("docs@example.com", "/replicas".into()).await;
    assert_eq!(list.status(), 200);
    let html = list.text().await.unwrap();
    assert!(html.contains(&docs) && !html.contains(&web_prod), "{html}");
    assert!(!html.contains(ONCHAIN_NAME), "the filter menus too: {html}");
    let rows = page("docs@example.com", "/replicas/rows".into()).await;
    assert!(!rows.text().await.unwrap().contains(&web_prod));
    for path in [
        format!("/replicas/{web_prod}"),
        format!("/replicas/{web_prod}/live"),
    ] {
        assert_eq!(page("docs@example.com", path).await.status(), 404);
    }
    // Unscoped: a reader sees everything, as before.
    let html = page("someone@example.com", "/replicas".into())
        .await
        .text()
        .await
        .unwrap();
    assert!(html.contains(&docs) && html.contains(&web_prod), "{html}");
    assert_eq!(
        page("someone@example.com", format!("/replicas/{web_prod}"))
            .await
            .status(),
        200
    );
}
