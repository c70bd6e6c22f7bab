//! `serve`'s log as an operator gets it in a file: plain text without colour
//! codes, or one JSON object per line; and one request id that finds the
//! HTTP request and every worker step of the replica it queued.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::fresh_database;
use crate::processes::{TOKEN, WorldProcess};

#[tokio::test]
async fn logs_to_a_file_have_no_colour_and_json_lines_carry_the_request_id_into_the_worker() {
    let world = WorldProcess::start(&[]);
    let http = reqwest::Client::new();

    // Text: no ANSI escape codes when the output is not a terminal.
    let text = world.serve(&fresh_database().await).await;
    let _ = http
        .get(format!("{}healthz", world.bridge_url))
        .send()
        .await;
    let log = text.log();
    assert!(log.contains("approval-bridge is serving"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file: {log:?}"
    );
    drop(text);

    let overrides = BTreeMap::from([
        ("APPROVAL_BRIDGE_LOG_FORMAT".to_owned(), "json".to_owned()),
        (
            "APPROVAL_BRIDGE_BATCH_WINDOW_SECS".to_owned(),
            "0".to_owned(),
        ),
    ]);
    let serve = world.serve_with(&fresh_database().await, &overrides).await;
    let queued = http
        .post(format!("{}api/v1/replicas", world.bridge_url))
        .bearer_auth(TOKEN)
        .header("x-request-id", "ops-log-trace-42")
        .json(&json!({"source": "web-prod", "node": "prod-2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(queued.status(), 202);

    // The worker prepares it and the planner proposes `addDevice` on their
    // own: wait for a step span with the id, and the proposal that names it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let lines: Vec<Value> = loop {
        let log = serve.log();
        let lines: Vec<Value> = log
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|_| panic!("not one JSON object per line: {line:?}"))
            })
            .collect();
        let in_step = lines.iter().any(|line| {
            line["spans"].as_array().is_some_and(|spans| {
                spans
                    .iter()
                    .any(|s| s["name"] == "step" && s["request_id"] == "ops-log-trace-42")
            })
        });
        if in_step {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "no step span with the request id: {log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let in_http = lines.iter().any(|line| {
        line["spans"].as_array().is_some_and(|spans| {
            spans
                .iter()
                .any(|s| s["name"] == "http" && s["request_id"] == "ops-log-trace-42")
        })
    });
    assert!(in_http, "no http span with the request id");
}
