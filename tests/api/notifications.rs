//! Notifications to the team's webhooks, in a sandbox flow: `serve` runs on
//! the sandbox's world with a wiremock target, and the owners confirm and
//! execute through the sandbox's controls.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use approval_bridge::config::parse_named_secrets;
use approval_bridge::sandbox::EOA_CVM;
use approval_bridge::startup::Application;
use approval_bridge::web::WebhookSecrets;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::front::Front;

const SECRET: &str = "notify-secret-789";

/// The sandbox's world with a bridge that notifies `target`; `tune` sets
/// more of its environment.
async fn start(target: &MockServer, tune: &[(&str, &str)]) -> (Front, CancellationToken) {
    let front = Front::start(true).await;
    let mut env = front.sandbox.env.clone();
    env.set(
        "APPROVAL_BRIDGE_NOTIFY_URLS",
        format!("team={}/hook", target.uri()),
    );
    env.set("APPROVAL_BRIDGE_NOTIFY_SECRET", SECRET);
    for (name, value) in tune {
        env.set(name, value);
    }
    let app = Application::build(env.settings().unwrap())
        .await
        .expect("the bridge starts");
    let shutdown = app.shutdown_token();
    tokio::spawn(app.run_until_stopped());
    (front, shutdown)
}

/// A target that answers `status` to the first `failures` posts (maybe none), then 200.
async fn failing_target(status: u16, failures: u64) -> MockServer {
    let target = MockServer::start().await;
    if failures > 0 {
        Mock::given(method("POST"))
            .and(path("/hook"))
            .respond_with(ResponseTemplate::new(status))
            .up_to_n_times(failures)
            .with_priority(1)
            .mount(&target)
            .await;
    }
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200))
        .with_priority(2)
        .mount(&target)
        .await;
    target
}

/// A target that answers 200 only after `delay`.
async fn hanging_target(delay: Duration) -> MockServer {
    let target = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200).set_delay(delay))
        .mount(&target)
        .await;
    target
}

/// What the target received, in order.
async fn received(target: &MockServer) -> Vec<wiremock::Request> {
    target.received_requests().await.unwrap_or_default()
}

/// Waits until the target has received `n` requests (bounded).
async fn wait_received(target: &MockServer, n: usize) -> Vec<wiremock::Request> {
    for _ in 0..240 {
        let got = received(target).await;
        if got.len() >= n {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "the target received {} requests, not {n}",
        received(target).await.len()
    );
}

fn header<'a>(request: &'a wiremock::Request, name: &str) -> &'a str {
    request
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} header"))
}

/// Checks the signature with the CI webhook's own verifier.
fn assert_signed(request: &wiremock::Request) {
    let secrets = WebhookSecrets::new(&parse_named_secrets(&format!("bridge={SECRET}")).unwrap());
    let key = header(request, "idempotency-key");
    assert_eq!(header(request, "x-bridge-delivery"), key);
    let now = chrono::Utc::now().timestamp();
    let verified = secrets.verify(&request.headers, Some(key), &request.body, now);
    assert!(verified.is_ok(), "{verified:?}");
    // Signed over this key and body only.
    assert!(
        secrets
            .verify(&request.headers, Some("another-key"), &request.body, now)
            .is_err()
    );
}

fn body(request: &wiremock::Request) -> Value {
    serde_json::from_slice(&request.body).expect("a JSON body")
}

/// The text of every block, joined.
fn blocks_text(message: &Value) -> String {
    let mut out = Vec::new();
    for block in message["blocks"].as_array().unwrap() {
        if let Some(text) = block["text"]["text"].as_str() {
            out.push(text.to_owned());
        }
        for element in block["elements"].as_array().into_iter().flatten() {
            out.push(element["text"].as_str().unwrap().to_owned());
        }
    }
    out.join("\n")
}

async fn approve(front: &Front, waiting: &Value) {
    let hash = waiting["proposal"]["safe_tx_hash"].as_str().unwrap();
    front.control(hash, "sign", json!({"owner": 0})).await;
    front.control(hash, "sign", json!({"owner": 1})).await;
    front.control(hash, "execute", json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_receives_signed_messages_for_approval_done_and_failed() {
    let target = failing_target(503, 0).await;
    let (front, shutdown) = start(&target, &[]).await;

    let id = front
        .queue(json!({"source": "web-prod", "node": "prod-2"}))
        .await;
    let refused = front
        .queue(json!({"source": EOA_CVM, "node": "prod-2"}))
        .await;
    let waiting = front.wait_for(&id, "awaiting_approval").await;
    front.wait_for(&refused, "failed").await;
    // A message is rendered when it is sent: let the approval request go out
    // before anyone signs, so it names every owner as still to sign.
    wait_received(&target, 2).await;
    approve(&front, &waiting).await;
    front.wait_for(&id, "done").await;

    let got = wait_received(&target, 3).await;
    let mut by_event: BTreeMap<String, Value> = BTreeMap::new();
    for request in &got {
        assert_signed(request);
        assert_eq!(header(request, "content-type"), "application/json");
        by_event.insert(header(request, "x-bridge-event").to_owned(), body(request));
    }
    assert_eq!(
        by_event.keys().map(String::as_str).collect::<Vec<_>>(),
        ["awaiting_approval", "done", "failed"]
    );
    let keys: BTreeSet<&str> = got.iter().map(|r| header(r, "idempotency-key")).collect();
    assert_eq!(keys.len(), 3, "one delivery id per notification");

    // What to approve, in the signers' terms, and who is still to sign.
    let approval = &by_event["awaiting_approval"];
    assert!(
        approval["text"]
            .as_str()
            .unwrap()
            .starts_with("Safe approval needed"),
        "{approval}"
    );
    let text = blocks_text(approval);
    assert!(
        text.contains("Allow node prod-2 (region sandbox-1) to run app web-prod"),
        "{text}"
    );
    assert!(
        text.contains(&waiting["proposal"]["safe_tx_hash"].as_str().unwrap()[..10]),
        "{text}"
    );
    let owners: Vec<String> = front
        .sandbox
        .owners
        .iter()
        .map(|o| o.to_checksum(None))
        .collect();
    assert!(
        text.contains(&format!("Still to sign: {}", owners.join(", "))),
        "{text}"
    );
    let payload = &approval["metadata"]["event_payload"];
    assert_eq!(payload["request_id"], id.as_str());
    assert_eq!(payload["safe_tx_hash"], waiting["proposal"]["safe_tx_hash"]);
    assert_eq!(payload["owners_to_sign"], json!(owners));

    let done = &by_event["done"];
    assert!(
        done["text"]
            .as_str()
            .unwrap()
            .starts_with("Replica of web-prod on prod-2 is running"),
        "{done}"
    );
    let failed = &by_event["failed"];
    assert!(
        failed["text"].as_str().unwrap().contains("OWNER-IS-EOA"),
        "{failed}"
    );
    assert_eq!(
        failed["metadata"]["event_payload"]["request_id"],
        refused.as_str()
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_target_is_retried_with_the_same_delivery_and_the_flow_reaches_done() {
    let target = failing_target(503, 3).await;
    let (front, shutdown) = start(&target, &[("APPROVAL_BRIDGE_BACKOFF_BASE_SECS", "1")]).await;

    let id = front
        .queue(json!({"source": "web-prod", "node": "prod-2"}))
        .await;
    let waiting = front.wait_for(&id, "awaiting_approval").await;
    approve(&front, &waiting).await;
    front.wait_for(&id, "done").await;

    // Three refusals, then each of the two notifications once more: five
    // posts, and none after both were taken.
    let got = wait_received(&target, 5).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got_later = received(&target).await;
    assert_eq!(got_later.len(), 5, "nothing is sent again once delivered");
    let mut deliveries: BTreeMap<&str, Vec<&wiremock::Request>> = BTreeMap::new();
    for request in &got {
        assert_signed(request);
        deliveries
            .entry(header(request, "idempotency-key"))
            .or_default()
            .push(request);
    }
    assert_eq!(deliveries.len(), 2, "a retry keeps its delivery id");
    let events: BTreeSet<&str> = got.iter().map(|r| header(r, "x-bridge-event")).collect();
    assert_eq!(events, BTreeSet::from(["awaiting_approval", "done"]));
    for attempts in deliveries.values() {
        assert!(
            attempts.iter().all(|r| r.body == attempts[0].body),
            "a retry sends the same message"
        );
    }
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_hangs_does_not_hold_up_the_flow() {
    let target = hanging_target(Duration::from_secs(120)).await;
    let (front, shutdown) = start(&target, &[("APPROVAL_BRIDGE_NOTIFY_TIMEOUT_SECS", "60")]).await;

    let id = front
        .queue(json!({"source": "web-prod", "node": "prod-2"}))
        .await;
    let waiting = front.wait_for(&id, "awaiting_approval").await;
    // The approval notice is stuck at the target while the owners act.
    let got = wait_received(&target, 1).await;
    assert_eq!(header(&got[0], "x-bridge-event"), "awaiting_approval");
    approve(&front, &waiting).await;
    let done = front.wait_for(&id, "done").await;
    let events = done["events"].as_array().unwrap();
    assert_eq!(events.last().unwrap()["to"], "done");
    // The flow finished while the first notice still hangs: nothing else was sent.
    let got = received(&target).await;
    assert_eq!(got.len(), 1, "the done notice waits behind the hanging one");
    shutdown.cancel();
}

#[test]
fn a_target_that_is_not_http_or_has_no_secret_stops_start_up_in_one_line() {
    let serve = |urls: &str, secret: Option<&str>| {
        let mut command = crate::command::bridge();
        command
            .arg("serve")
            .env("DATABASE_URL", "postgres://localhost/x")
            .env("APPROVAL_BRIDGE_PHALA_API_KEY", "k")
            .env("APPROVAL_BRIDGE_NOTIFY_URLS", urls);
        if let Some(secret) = secret {
            command.env("APPROVAL_BRIDGE_NOTIFY_SECRET", secret);
        }
        crate::command::one_line_error(command.output().unwrap())
    };
    let line = serve("team=ftp://hooks.example/T0/token-123", Some(SECRET));
    assert_eq!(
        line,
        "approval-bridge: invalid setting APPROVAL_BRIDGE_NOTIFY_URLS (--notify-urls): \
         `team`: the URL must be an http:// or https:// URL"
    );
    let line = serve("team=https://hooks.example/T0/token-123", None);
    assert!(
        line.contains("missing setting APPROVAL_BRIDGE_NOTIFY_SECRET (--notify-secret)"),
        "{line}"
    );
    assert!(!line.contains("token-123"), "{line}");
}

/// A bridge on a manual clock that notifies `target` (`tune` sets more of
/// its notify settings), and the notify settings it runs with.
async fn notifying_app(
    target: &MockServer,
    tune: impl FnOnce(&mut approval_bridge::config::NotifySettings),
) -> (
    crate::helpers::TestApp,
    approval_bridge::config::NotifySettings,
) {
    let mut notify = approval_bridge::config::NotifySettings::default();
    let app = crate::helpers::spawn_app_with(|settings| {
        settings.notify.notify_urls =
            parse_named_secrets(&format!("team={}/hook", target.uri())).unwrap();
        settings.notify.notify_secret = Some(SECRET.to_owned().into());
        tune(&mut settings.notify);
        notify = settings.notify.clone();
    })
    .await;
    (app, notify)
}

/// A notifier process of `app`, driven by hand.
fn notifier(
    app: &crate::helpers::TestApp,
    notify: &approval_bridge::config::NotifySettings,
) -> approval_bridge::notify::Notifier {
    approval_bridge::notify::Notifier::from_settings(
        app.store.clone(),
        app.clock.clone(),
        notify,
        &approval_bridge::config::WorkerSettings::default(),
    )
    .unwrap()
    .expect("a target is configured")
}

/// The on-chain source, whose replica Phala refuses for lack of capacity:
/// a request for it fails.
async fn mount_no_capacity(app: &crate::helpers::TestApp) {
    use crate::phala_mock::*;
    mount_onchain_source(&app.phala, &[]).await;
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/replicas"))))
        .respond_with(ResponseTemplate::new(400).set_body_json(phala_error(
            "ERR-02-005",
            "no capacity",
            false,
        )))
        .mount(&app.phala)
        .await;
}

/// Driven by hand on a manual clock: a failure writes one notification, and
/// its delivery keeps its id and message across a crash-free retry.
#[tokio::test]
async fn a_failure_notifies_once_and_its_retry_keeps_the_delivery_id() {
    use crate::phala_mock::*;
    let target = failing_target(500, 1).await;
    let (app, notify) = notifying_app(&target, |_| {}).await;
    let notifier = notifier(&app, &notify);

    mount_no_capacity(&app).await;
    let failing = app.queue(&json!({"source": ONCHAIN_NAME})).await.remove(0);
    let cancelled = app.queue(&json!({"source": ONCHAIN_NAME})).await.remove(0);
    assert_eq!(app.cancel(&cancelled).await.status(), 200);
    app.drain_all(10).await;
    assert_eq!(app.status_of(&failing).await, "failed");

    // The first attempt fails; nothing is due again until the backoff passes.
    assert_eq!(notifier.drain().await.unwrap(), 1);
    assert_eq!(notifier.drain().await.unwrap(), 0);
    app.clock.advance(chrono::Duration::minutes(10));
    assert_eq!(notifier.drain().await.unwrap(), 1);
    app.clock.advance(chrono::Duration::hours(1));
    assert_eq!(
        notifier.drain().await.unwrap(),
        0,
        "delivered once, then done"
    );

    let got = received(&target).await;
    assert_eq!(got.len(), 2, "one failed attempt and its retry");
    assert_eq!(
        header(&got[0], "idempotency-key"),
        header(&got[1], "idempotency-key")
    );
    assert_eq!(got[0].body, got[1].body);
    assert_eq!(header(&got[1], "x-bridge-event"), "failed");
    assert_eq!(
        body(&got[1])["metadata"]["event_payload"]["request_id"],
        failing.as_str()
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(rows, 1, "the cancelled request notifies nothing");
}

/// A process that dies after posting and before recording the answer: once
/// its lease runs out the notification is sent again, with the same delivery
/// id and message, and then never again.
#[tokio::test]
async fn a_delivery_cut_off_by_a_crash_is_sent_again_with_the_same_id_once() {
    use crate::phala_mock::*;
    let target = hanging_target(Duration::from_secs(30)).await;
    let (app, notify) = notifying_app(&target, |notify| {
        // A lease of 2 × 1 s + 5 s.
        notify.notify_timeout_secs = 1;
    })
    .await;
    mount_no_capacity(&app).await;
    app.queue(&json!({"source": ONCHAIN_NAME})).await;
    app.drain_all(10).await;

    // The first process posts, then dies before the answer comes.
    let first = notifier(&app, &notify);
    let attempt = tokio::spawn(async move { first.drain().await });
    let cut_off = wait_received(&target, 1).await.remove(0);
    attempt.abort();
    let _ = attempt.await;

    // Another process: nothing while the dead one's lease holds, then the same delivery.
    target.reset().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&target)
        .await;
    let second = notifier(&app, &notify);
    assert_eq!(second.drain().await.unwrap(), 0, "the lease still holds");
    let mut sent = 0;
    for _ in 0..60 {
        sent = second.drain().await.unwrap();
        if sent > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(sent, 1, "sent again once the lease ran out");
    assert_eq!(second.drain().await.unwrap(), 0, "and then never again");
    let again = received(&target).await;
    assert_eq!(again.len(), 1);
    assert_signed(&again[0]);
    assert_eq!(
        header(&again[0], "idempotency-key"),
        header(&cut_off, "idempotency-key")
    );
    assert_eq!(again[0].body, cut_off.body);
    assert_eq!(header(&again[0], "x-bridge-event"), "failed");
}
