//! What an operator watches: `/healthz`, `/readyz`, `/metrics`, the OpenAPI
//! description, request ids in server errors, and retention.

use std::collections::BTreeSet;

use approval_bridge::config::RpcUrls;
use serde_json::{Value, json};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{API_TOKEN, spawn_app, spawn_app_with};
use crate::phala_mock::{ONCHAIN_NAME, mount_nodes, mount_onchain_source, phala_error};

/// A JSON-RPC endpoint that answers `eth_chainId` with `chain_id`.
async fn rpc_for_chain(chain_id: u64) -> MockServer {
    let rpc = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(move |request: &wiremock::Request| {
            let call: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
            let answer = |call: &Value| {
                json!({"jsonrpc": "2.0", "id": call["id"], "result": format!("{chain_id:#x}")})
            };
            let body = match &call {
                Value::Array(calls) => Value::Array(calls.iter().map(answer).collect()),
                call => answer(call),
            };
            ResponseTemplate::new(200).set_body_json(body)
        })
        .mount(&rpc)
        .await;
    rpc
}

/// An on-chain source and node 3, `prod-3`.
async fn mount_phala(app: &crate::helpers::TestApp) {
    mount_onchain_source(&app.phala, &[]).await;
    mount_nodes(&app.phala, &[(3, "prod-3")]).await;
}

async fn get(app: &crate::helpers::TestApp, path: &str) -> reqwest::Response {
    app.http
        .get(format!("{}{path}", app.address))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn healthz_and_readyz_answer_when_everything_is_up() {
    let rpc = rpc_for_chain(8453).await;
    let app = spawn_app_with(|s| {
        s.safe.rpc_urls = RpcUrls(vec![(8453, rpc.uri().parse().unwrap())]);
    })
    .await;

    let healthz = get(&app, "/healthz").await;
    assert_eq!(healthz.status(), 200);
    assert_eq!(
        healthz.json::<Value>().await.unwrap(),
        json!({"status": "ok"})
    );

    let readyz = get(&app, "/readyz").await;
    assert_eq!(readyz.status(), 200);
    let body: Value = readyz.json().await.unwrap();
    assert_eq!(body["status"], "ok", "{body}");
    let names: Vec<&str> = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["database", "migrations", "chain:8453"], "{body}");

    // The old probe still answers.
    assert_eq!(get(&app, "/health").await.status(), 200);
}

#[tokio::test]
async fn readyz_fails_and_names_an_rpc_that_answers_for_another_chain() {
    let right = rpc_for_chain(8453).await;
    let wrong = rpc_for_chain(1).await;
    let app = spawn_app_with(|s| {
        s.safe.rpc_urls = RpcUrls(vec![
            (8453, right.uri().parse().unwrap()),
            (84532, wrong.uri().parse().unwrap()),
        ]);
    })
    .await;

    let readyz = get(&app, "/readyz").await;
    assert_eq!(readyz.status(), 503);
    let body: Value = readyz.json().await.unwrap();
    assert_eq!(body["status"], "unavailable");
    let failed: Vec<&Value> = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .collect();
    assert_eq!(failed.len(), 1, "{body}");
    assert_eq!(failed[0]["name"], "chain:84532");
    assert_eq!(
        failed[0]["message"],
        "the RPC configured for chain 84532 answers for chain 1"
    );
    // The process itself is fine.
    assert_eq!(get(&app, "/healthz").await.status(), 200);
}

#[tokio::test]
async fn readyz_fails_when_a_migration_is_missing() {
    let app = spawn_app().await;
    let latest: i64 = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations")
        .fetch_one(&app.db)
        .await
        .unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(latest)
        .execute(&app.db)
        .await
        .unwrap();

    let readyz = get(&app, "/readyz").await;
    assert_eq!(readyz.status(), 503);
    let body: Value = readyz.json().await.unwrap();
    let migrations = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "migrations")
        .unwrap()
        .clone();
    assert_eq!(migrations["ok"], false);
    assert!(
        migrations["message"]
            .as_str()
            .unwrap()
            .contains(&latest.to_string()),
        "{body}"
    );
}

/// The value of the sample `name{labels}` on the page, if any: every label
/// in `labels` must be on it.
fn sample(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.split(['{', ' ']).next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .reduce(|a, b| a + b)
}

#[tokio::test]
async fn metrics_count_requests_phala_calls_and_the_queue() {
    let app = spawn_app().await;
    mount_phala(&app).await;
    // A Phala error, counted by its code.
    Mock::given(method("GET"))
        .and(wiremock::matchers::path("/api/v1/cvms/missing-one"))
        .respond_with(ResponseTemplate::new(404).set_body_json(phala_error(
            "ERR-01-001",
            "CVM not found",
            true,
        )))
        .mount(&app.phala)
        .await;
    app.queue(&json!({"source": ONCHAIN_NAME, "node": "prod-3", "count": 2}))
        .await;
    let refused = app.post_replicas(&json!({"source": "missing-one"})).await;
    assert_eq!(refused.status(), 422);

    let page = get(&app, "/metrics").await;
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
    );
    let page = page.text().await.unwrap();
    let accepted = sample(
        &page,
        "approval_bridge_http_requests_total",
        &[("route", "/api/v1/replicas"), ("status", "202")],
    );
    assert!(accepted.unwrap_or(0.0) >= 1.0, "{page}");
    let phala_errors = sample(
        &page,
        "approval_bridge_call_errors_total",
        &[("service", "phala"), ("code", "ERR-01-001")],
    );
    assert!(phala_errors.unwrap_or(0.0) >= 1.0, "{page}");
    assert!(
        sample(
            &page,
            "approval_bridge_calls_total",
            &[("service", "phala"), ("outcome", "ok")]
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{page}"
    );
    // This app's database: exactly its two queued requests.
    assert_eq!(
        sample(
            &page,
            "approval_bridge_queue_depth",
            &[("status", "queued")]
        ),
        Some(2.0),
        "{page}"
    );
    assert_eq!(
        sample(
            &page,
            "approval_bridge_queue_depth",
            &[("status", "preparing")]
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&page, "approval_bridge_open_proposals", &[]),
        Some(0.0)
    );
    assert!(
        page.contains("# TYPE approval_bridge_http_requests_total counter"),
        "{page}"
    );
}

#[tokio::test]
async fn a_scrape_while_the_database_is_closed_still_answers() {
    // What a scrape sees during shutdown, once the pool is closed.
    let app = spawn_app().await;
    assert_eq!(get(&app, "/healthz").await.status(), 200);
    app.db.close().await;
    let page = get(&app, "/metrics").await;
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    assert!(
        page.contains("approval_bridge_http_requests_total"),
        "{page}"
    );
    // And readiness says why it is not ready, instead of failing.
    let readyz = get(&app, "/readyz").await;
    assert_eq!(readyz.status(), 503);
    let body: Value = readyz.json().await.unwrap();
    assert_eq!(body["checks"][0]["name"], "database", "{body}");
    assert_eq!(body["checks"][0]["ok"], false, "{body}");
}

/// `/api/v1/openapi.json` is valid OpenAPI 3.1, describes every route the
/// router serves, and every path it describes is routed.
#[tokio::test]
async fn the_openapi_description_and_the_routes_agree() {
    let app = spawn_app().await;
    let response = get(&app, "/api/v1/openapi.json").await;
    assert_eq!(response.status(), 200);
    let doc: Value = response.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{doc}");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));

    let described: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |m| (path.clone(), m.to_uppercase()))
        })
        .collect();
    let routed: BTreeSet<(String, String)> = routes_in_source()
        .into_iter()
        .filter(|(path, _)| !UNDESCRIBED.contains(&path.as_str()))
        .collect();
    assert_eq!(
        described, routed,
        "the OpenAPI description and the router differ: describe the new route with \
         #[utoipa::path] and list it in web/openapi.rs (or add a page to UNDESCRIBED)"
    );

    // Every described operation is served: the router answers something
    // other than its fallback 404 or a 405.
    for (path, method) in &described {
        let url = format!(
            "{}{}",
            app.address,
            path.replace("{id}", &uuid::Uuid::nil().to_string())
        );
        let response = app
            .http
            .request(method.parse().unwrap(), url)
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap();
        assert_ne!(response.status(), 405, "{method} {path}");
        if response.status() == 404 {
            let body: Value = response.json().await.unwrap();
            assert_ne!(
                body["error"]["message"], "no such endpoint",
                "{method} {path}"
            );
        }
    }

    // The answer types are described, not free-form.
    let replica = &doc["components"]["schemas"]["ReplicaView"];
    assert_eq!(
        replica["properties"]["status"]["$ref"], "#/components/schemas/Status",
        "{replica}"
    );
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    assert!(doc["components"]["schemas"]["OrderBody"]["properties"]["source"].is_object());
}

/// Pages, not part of the JSON API.
const UNDESCRIBED: &[&str] = &["/", "/static/style.css"];

/// `(path, METHOD)` of every `.route(…)` in the router's source, with the
/// prefixes of `.nest(…)` applied.
fn routes_in_source() -> BTreeSet<(String, String)> {
    let source =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/web/mod.rs")).unwrap();
    // The router, not its unit tests.
    let source = source.split("#[cfg(test)]").next().unwrap();
    let source: String = source.split_whitespace().collect::<Vec<_>>().join(" ");
    // `let NAME = Router::new()…;` bodies nested under a prefix.
    let mut nested: Vec<(String, String)> = Vec::new();
    for nest in source.split(".nest(\"").skip(1) {
        let (prefix, rest) = nest.split_once('"').unwrap();
        let name = rest
            .trim_start_matches([',', ' '])
            .split(')')
            .next()
            .unwrap()
            .trim();
        nested.push((name.to_owned(), prefix.to_owned()));
    }
    let mut routes = BTreeSet::new();
    for statement in source.split(';') {
        let prefix = nested
            .iter()
            .find(|(name, _)| statement.contains(&format!("let {name} =")))
            .map(|(_, prefix)| prefix.as_str())
            .unwrap_or("");
        for route in statement.split(".route(\"").skip(1) {
            let (path, rest) = route.split_once('"').unwrap();
            let handler = rest.split(".route(").next().unwrap();
            for method in ["get", "post", "put", "patch", "delete"] {
                if handler.contains(&format!("{method}(")) {
                    routes.insert((format!("{prefix}{path}"), method.to_uppercase()));
                }
            }
        }
    }
    assert!(routes.len() > 5, "{routes:?}");
    routes
}

#[tokio::test]
async fn the_request_id_of_intake_is_stored_with_the_request() {
    let app = spawn_app().await;
    mount_phala(&app).await;
    let response = app
        .http
        .post(format!("{}/api/v1/replicas", app.address))
        .bearer_auth(API_TOKEN)
        .header("x-request-id", "trace-me-0001")
        .json(&json!({"source": ONCHAIN_NAME, "node": "prod-3"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(response.headers()["x-request-id"], "trace-me-0001");
    let body: Value = response.json().await.unwrap();
    let id: uuid::Uuid = body["replicas"][0]["id"].as_str().unwrap().parse().unwrap();
    let stored = app.store.get_request(id).await.unwrap().unwrap();
    assert_eq!(stored.http_request_id.as_deref(), Some("trace-me-0001"));
}

#[tokio::test]
async fn an_expired_idempotency_key_counts_as_new_and_is_purged() {
    let app = spawn_app().await;
    mount_phala(&app).await;
    let body = json!({"source": ONCHAIN_NAME, "node": "prod-3"}).to_string();
    let first: Value = app
        .post_replicas_with(body.clone(), Some("deploy-1"))
        .await
        .json()
        .await
        .unwrap();
    let again: Value = app
        .post_replicas_with(body.clone(), Some("deploy-1"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first, again, "within the TTL the first answer comes back");

    // Seven days (the default) and a second later the key is forgotten.
    app.clock
        .advance(chrono::Duration::days(7) + chrono::Duration::seconds(1));
    let later = app.post_replicas_with(body.clone(), Some("deploy-1")).await;
    assert_eq!(later.status(), 202);
    let later: Value = later.json().await.unwrap();
    assert_ne!(later["replicas"][0]["id"], first["replicas"][0]["id"]);

    // The purge removes keys past their time and keeps the fresh one.
    let keys = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM idempotency_keys")
            .fetch_one(&app.db)
            .await
            .unwrap()
    };
    assert_eq!(keys().await, 1);
    app.clock.advance(chrono::Duration::days(8));
    let purged = app.worker.purge_once().await.unwrap();
    assert_eq!(purged.idempotency_keys, 1);
    assert_eq!(keys().await, 0);
}

#[tokio::test]
async fn finished_requests_are_kept_by_default_and_deleted_after_the_retention_time() {
    let keep = spawn_app().await;
    let prune = spawn_app_with(|s| s.retention.retain_finished_secs = Some(24 * 3600)).await;
    for app in [&keep, &prune] {
        mount_phala(app).await;
    }
    let order = json!({"source": ONCHAIN_NAME, "node": "prod-3", "count": 2});
    for app in [&keep, &prune] {
        let ids = app.queue(&order).await;
        // One finishes (cancelled), one stays open.
        let cancelled = app
            .http
            .post(format!("{}/api/v1/replicas/{}/cancel", app.address, ids[0]))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(cancelled.status(), 200);
        app.clock.advance(chrono::Duration::days(2));
    }
    let count = |app: &crate::helpers::TestApp, table: &'static str| {
        let db = app.db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}"))
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };

    let kept = keep.worker.purge_once().await.unwrap();
    assert_eq!((kept.requests, kept.events), (0, 0));
    assert_eq!(count(&keep, "replica_requests").await, 2);

    // The cancel was two days ago; the retention time is one day.
    let purged = prune.worker.purge_once().await.unwrap();
    assert_eq!(purged.requests, 1, "{purged:?}");
    assert_eq!(purged.events, 2, "queued and cancelled: {purged:?}");
    assert_eq!(count(&prune, "replica_requests").await, 1);
    assert_eq!(count(&prune, "request_events").await, 1);

    // The event log stays append-only for everyone else.
    let refused = sqlx::query("DELETE FROM request_events")
        .execute(&prune.db)
        .await;
    assert!(refused.is_err());
}

#[tokio::test]
async fn api_answers_are_typed_and_unchanged_in_shape() {
    let app = spawn_app().await;
    mount_phala(&app).await;
    let ids = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": "prod-3"}))
        .await;
    let shown = app.get_replica(&ids[0]).await;
    let mut keys: Vec<&str> = shown
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "app_id",
            "attempts",
            "chain_id",
            "compose_hash",
            "created_at",
            "created_by",
            "dashboard_link",
            "device_id",
            "env_names",
            "events",
            "extra_replicas",
            "id",
            "kms_type",
            "last_error",
            "next_attempt_at",
            "node",
            "node_id",
            "node_name",
            "note",
            "onchain_kms",
            "proposal",
            "registrations",
            "replica",
            "source",
            "source_name",
            "source_vm_uuid",
            "status",
            "updated_at",
            "vm_uuid",
        ]
    );
    assert_eq!(shown["events"][0]["to"], "queued");
    assert_eq!(shown["events"][0]["from"], Value::Null);
}
