//! The JSON API: queuing, reading, listing, cancelling, auth and bad input.

use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{API_TOKEN, error_of, spawn_app};
use crate::phala_mock::*;

#[tokio::test]
async fn queuing_creates_one_queued_request_per_replica() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    mount_nodes(&app.phala, &[(3, "prod-3"), (4, "prod-4")]).await;

    let response = app
        .post_replicas(
            &json!({"source": ONCHAIN_NAME, "node": "PROD-3", "count": 3, "note": "scale out"}),
        )
        .await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    let replicas = body["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 3);
    for r in replicas {
        assert_eq!(r["status"], "queued");
        assert_eq!(r["source_vm_uuid"], ONCHAIN_VM);
        assert_eq!(r["node_id"], 3);
        assert_eq!(r["node_name"], "prod-3");
        assert_eq!(r["app_id"], format!("0x{}", app_id()));
        assert_eq!(r["chain_id"], 8453);
        assert_eq!(r["created_by"], "api:ci-bot");
    }
    assert_eq!(app.request_count().await, 3);

    let shown = app.get_replica(replicas[0]["id"].as_str().unwrap()).await;
    assert_eq!(shown["status"], "queued");
    assert_eq!(shown["note"], "scale out");
    assert_eq!(shown["proposal"], Value::Null);
    assert_eq!(shown["last_error"], Value::Null);
    let events = shown["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["to"], "queued");
    assert_eq!(events[0]["actor"], "api:ci-bot");
}

#[tokio::test]
async fn sources_resolve_by_uuid_app_id_and_name() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    // The nodes an "Auto" order may land on.
    mount_nodes(&app.phala, &[(1, "prod-1"), (2, "prod-2"), (3, "prod-3")]).await;
    // The app id form goes to `/cvms/app_<hex>`, a dashed UUID loses its dashes.
    Mock::given(method("GET"))
        .and(path(api(&format!("/cvms/app_{}", app_id()))))
        .respond_with(ResponseTemplate::new(200).set_body_json(onchain_cvm(&[])))
        .mount(&app.phala)
        .await;
    let dashed = "0b9f6c1e-8a2d-4c3b-9e7f-1a2b3c4d5e6f";
    for source in [
        dashed.to_owned(),
        app_id(),
        format!("0x{}", app_id()),
        ONCHAIN_NAME.to_owned(),
    ] {
        let ids = app.queue(&json!({"source": source})).await;
        assert_eq!(
            app.get_replica(&ids[0]).await["source_vm_uuid"],
            ONCHAIN_VM,
            "{source}"
        );
    }
}

#[tokio::test]
async fn an_app_with_several_live_configurations_needs_a_compose_hash() {
    let app = spawn_app().await;
    let other_hash = "cd".repeat(32);
    Mock::given(method("GET"))
        .and(path(api(&format!("/cvms/app_{}", app_id()))))
        .respond_with(ResponseTemplate::new(400).set_body_json(phala_error(
            "ERR-03-010",
            "identifier matches multiple CVMs",
            true,
        )))
        .mount(&app.phala)
        .await;
    let mut second = onchain_cvm(&[]);
    second["vm_uuid"] = json!("11111111222233334444555566667777");
    second["compose_hash"] = json!(other_hash);
    Mock::given(method("GET"))
        .and(path(api(&format!("/apps/{}/cvms", app_id()))))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!([onchain_cvm(&[]), second.clone()])),
        )
        .mount(&app.phala)
        .await;
    Mock::given(method("GET"))
        .and(path(api("/cvms/11111111222233334444555566667777")))
        .respond_with(ResponseTemplate::new(200).set_body_json(second))
        .mount(&app.phala)
        .await;

    let (code, message) =
        error_of(app.post_replicas(&json!({"source": app_id()})).await, 422).await;
    assert_eq!(code, "ambiguous_source");
    assert!(message.contains("compose_hash"), "{message}");
    assert_eq!(app.request_count().await, 0);

    let ids = app
        .queue(&json!({"source": app_id(), "compose_hash": format!("0x{other_hash}")}))
        .await;
    assert_eq!(
        app.get_replica(&ids[0]).await["source_vm_uuid"],
        "11111111222233334444555566667777"
    );

    let (code, _) = error_of(
        app.post_replicas(&json!({"source": app_id(), "compose_hash": "ef".repeat(32)}))
            .await,
        422,
    )
    .await;
    assert_eq!(code, "ambiguous_source");
}

#[tokio::test]
async fn missing_or_wrong_token_is_refused_with_401() {
    let app = spawn_app().await;
    let url = format!("{}/api/v1/replicas", app.address);
    let body = json!({"source": ONCHAIN_NAME}).to_string();
    for request in [
        app.http.post(&url).body(body.clone()),
        app.http
            .post(&url)
            .bearer_auth("not-the-token")
            .body(body.clone()),
        app.http
            .post(&url)
            .header("Authorization", format!("Basic {API_TOKEN}"))
            .body(body.clone()),
    ] {
        let (code, _) = error_of(request.send().await.unwrap(), 401).await;
        assert_eq!(code, "unauthorized");
    }
    let (code, _) = error_of(app.http.get(&url).send().await.unwrap(), 401).await;
    assert_eq!(code, "unauthorized");
    assert_eq!(app.request_count().await, 0);
    assert!(
        app.phala.received_requests().await.unwrap().is_empty(),
        "nothing reached Phala"
    );
}

#[tokio::test]
async fn bad_input_gets_a_4xx_naming_the_problem_and_stores_nothing() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &["API_KEY"]).await;
    mount_nodes(&app.phala, &[(3, "prod-3"), (4, "twin"), (5, "TWIN")]).await;

    let cases: Vec<(String, u16, &str, &str)> = vec![
        ("{not json".into(), 400, "malformed_json", "JSON"),
        (
            json!({"source": 5}).to_string(),
            422,
            "invalid_body",
            "source",
        ),
        (
            json!({"source": "a", "colour": "red"}).to_string(),
            422,
            "invalid_body",
            "colour",
        ),
        (
            json!({"source": "a", "count": "two"}).to_string(),
            422,
            "invalid_body",
            "count",
        ),
        (
            json!({"source": "a", "compose_hash": "0xnothex"}).to_string(),
            422,
            "invalid_field",
            "compose_hash",
        ),
        (
            json!({"source": "a", "count": 0}).to_string(),
            422,
            "invalid_field",
            "count",
        ),
        (
            json!({"source": ONCHAIN_NAME, "node": "nowhere"}).to_string(),
            422,
            "unknown_node",
            "nowhere",
        ),
        (
            json!({"source": ONCHAIN_NAME, "node": 99}).to_string(),
            422,
            "unknown_node",
            "99",
        ),
        (
            json!({"source": ONCHAIN_NAME, "node": "twin"}).to_string(),
            422,
            "ambiguous_node",
            "numeric node id",
        ),
        (
            json!({"source": ONCHAIN_NAME, "env": {"SECRET": "x"}}).to_string(),
            422,
            "env_not_allowed",
            "SECRET",
        ),
        (
            json!({"source": "no-such-cvm"}).to_string(),
            422,
            "unknown_source",
            "no-such-cvm",
        ),
        ("x".repeat(65 * 1024), 413, "body_too_large", "64 KiB"),
    ];
    for (body, status, code, mentions) in cases {
        let (got_code, message) =
            error_of(app.post_replicas_with(body.clone(), None).await, status).await;
        assert_eq!(got_code, code, "{}", &body[..body.len().min(80)]);
        assert!(
            message.contains(mentions),
            "{message:?} should mention {mentions}"
        );
    }
    assert_eq!(app.request_count().await, 0);
    // Nothing was prepared or encrypted for bad input.
    assert!(
        app.phala_requests("POST", &api(&format!("/cvms/{ONCHAIN_VM}/replicas")))
            .await
            .is_empty()
    );
    assert!(
        app.phala_requests("GET", &api(&format!("/kms/base/pubkey/{}", app_id())))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn phala_outage_during_intake_is_a_503_and_stores_nothing() {
    let app = spawn_app().await;
    Mock::given(method("GET"))
        .and(path(api(&format!("/cvms/{ONCHAIN_NAME}"))))
        .respond_with(ResponseTemplate::new(502))
        .mount(&app.phala)
        .await;
    let (code, message) = error_of(
        app.post_replicas(&json!({"source": ONCHAIN_NAME})).await,
        503,
    )
    .await;
    assert_eq!(code, "phala_unavailable");
    assert!(message.contains("retry"), "{message}");
    assert_eq!(app.request_count().await, 0);
}

#[tokio::test]
async fn idempotency_key_replays_the_first_answer_and_refuses_a_different_body() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    // The nodes an "Auto" order may land on.
    mount_nodes(&app.phala, &[(1, "prod-1"), (2, "prod-2"), (3, "prod-3")]).await;
    let body = r#"{"source": "web-prod", "count": 2}"#;
    let first = app.post_replicas_with(body, Some("run-42")).await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();

    // Same meaning, other key order and spacing: the same answer, nothing new.
    let again = app
        .post_replicas_with(r#"{"count":2,"source":"web-prod"}"#, Some("run-42"))
        .await;
    assert_eq!(again.status(), 202);
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    assert_eq!(app.request_count().await, 2);

    let (code, message) = error_of(
        app.post_replicas_with(r#"{"source": "web-prod", "count": 1}"#, Some("run-42"))
            .await,
        422,
    )
    .await;
    assert_eq!(code, "idempotency_key_reused");
    assert!(message.contains("different body"));
    assert_eq!(app.request_count().await, 2);

    // Another key is another order.
    assert_eq!(
        app.post_replicas_with(body, Some("run-43")).await.status(),
        202
    );
    assert_eq!(app.request_count().await, 4);
}

#[tokio::test]
async fn concurrent_retries_with_one_key_create_one_order() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    // The nodes an "Auto" order may land on.
    mount_nodes(&app.phala, &[(1, "prod-1"), (2, "prod-2"), (3, "prod-3")]).await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let request = app
            .http
            .post(format!("{}/api/v1/replicas", app.address))
            .bearer_auth(API_TOKEN)
            .header("Idempotency-Key", "same-key")
            .body(r#"{"source": "web-prod"}"#);
        calls.spawn(async move {
            let response = request.send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        });
    }
    let answers = calls.join_all().await;
    assert!(
        answers.iter().all(|(status, _)| *status == 202),
        "{answers:?}"
    );
    assert!(
        answers.windows(2).all(|w| w[0].1 == w[1].1),
        "every retry gets the same answer"
    );
    assert_eq!(app.request_count().await, 1);
}

#[tokio::test]
async fn list_is_newest_first_and_filters_by_status() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    // The nodes an "Auto" order may land on.
    mount_nodes(&app.phala, &[(1, "prod-1"), (2, "prod-2"), (3, "prod-3")]).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.extend(app.queue(&json!({"source": ONCHAIN_NAME})).await);
        app.clock.advance(chrono::Duration::seconds(1));
    }
    assert_eq!(app.cancel(&ids[0]).await.status(), 200);

    let all: Value = app.list_replicas("").await.json().await.unwrap();
    let listed: Vec<&str> = all["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        vec![ids[2].as_str(), ids[1].as_str(), ids[0].as_str()]
    );

    let queued: Value = app
        .list_replicas("?status=queued&limit=1")
        .await
        .json()
        .await
        .unwrap();
    let queued = queued["replicas"].as_array().unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0]["id"], ids[2].as_str());

    let cancelled: Value = app
        .list_replicas("?status=cancelled")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(cancelled["replicas"].as_array().unwrap().len(), 1);

    let (code, message) = error_of(app.list_replicas("?status=running").await, 400).await;
    assert_eq!(code, "invalid_status");
    assert!(message.contains("awaiting_proposal"));
    let (code, _) = error_of(app.list_replicas("?limit=0").await, 400).await;
    assert_eq!(code, "invalid_limit");
    let (code, _) = error_of(app.list_replicas("?colour=red").await, 400).await;
    assert_eq!(code, "invalid_query");
}

#[tokio::test]
async fn cancel_works_before_committing_only() {
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &[]).await;
    // The nodes an "Auto" order may land on.
    mount_nodes(&app.phala, &[(1, "prod-1"), (2, "prod-2"), (3, "prod-3")]).await;
    mount_prepare(
        &app.phala,
        ONCHAIN_VM,
        prepared_body("tok-1", 1, true, true, true),
    )
    .await;
    let ids = app
        .queue(&json!({"source": ONCHAIN_NAME, "count": 2}))
        .await;

    let response = app.cancel(&ids[0]).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap()["status"],
        "cancelled"
    );
    let events = app.get_replica(&ids[0]).await["events"].clone();
    assert_eq!(events[1]["from"], "queued");
    assert_eq!(events[1]["to"], "cancelled");
    assert_eq!(events[1]["actor"], "api:ci-bot");

    // Cancelling twice is refused, and so is cancelling once committing.
    let (code, _) = error_of(app.cancel(&ids[0]).await, 409).await;
    assert_eq!(code, "not_cancellable");
    app.steps(2).await; // queued → preparing → committing
    assert_eq!(app.status_of(&ids[1]).await, "committing");
    let (code, message) = error_of(app.cancel(&ids[1]).await, 409).await;
    assert_eq!(code, "not_cancellable");
    assert!(message.contains("committing"));

    let (code, _) = error_of(
        app.cancel("0195f0c4-0000-7000-8000-000000000000").await,
        404,
    )
    .await;
    assert_eq!(code, "not_found");
    let (code, _) = error_of(app.cancel("not-a-uuid").await, 400).await;
    assert_eq!(code, "invalid_id");
}

#[tokio::test]
async fn unknown_paths_and_health_answer_in_json() {
    let app = spawn_app().await;
    let health = app
        .http
        .get(format!("{}/health", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "ok");
    let (code, _) = error_of(
        app.http
            .get(format!("{}/nope", app.address))
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    assert_eq!(code, "not_found");
    let page = app.http.get(&app.address).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("approval-bridge"));
}
