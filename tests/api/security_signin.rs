//! Issue 18, findings 5, 7 and 9 (sign-in): a flood of sign-in messages
//! locks nobody out and the client cannot choose its CSRF pair; sessions
//! follow the configuration and the Safe's owners, and can be ended
//! everywhere (by the person, the CLI or an admin token); the SSO header
//! needs the proxy's secret; page errors are redacted.

use alloy::primitives::{Address, U256, address};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;
use approval_bridge::config::{Operators, SourcePattern, TrustedProxies, parse_named_secrets};
use approval_bridge::safe::{Call, ISafe};
use approval_bridge::sandbox::chain::ISafeMore;
use futures_util::StreamExt;
use proptest::prelude::*;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::command::bridge;
use crate::helpers::{API_TOKEN, TestApp, error_of, spawn_app_with};
use crate::page_app::{Browser, CHAIN, open_login, page_app, refusal, session_cookie};
use crate::phala_mock::{api, phala_error};
use crate::web::PROXY_SECRET;

/// `POST /login/message` for `key` from `browser`.
async fn message_from(app: &TestApp, browser: &Browser, key: Address) -> reqwest::Response {
    app.http
        .post(format!("{}/login/message", app.address))
        .header("cookie", &browser.cookie)
        .header("x-csrf-token", &browser.token)
        .json(&json!({"address": key.to_checksum(None), "chain_id": CHAIN}))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_sign_in_messages_from_one_client_lock_nobody_out() {
    let page = page_app(false).await;
    let flooder = PrivateKeySigner::random().address();
    let app = &page.app;
    let browser = &page.browser;
    let refused = futures_util::stream::iter(0..10_000)
        .map(|_| async move { message_from(app, browser, flooder).await.status() })
        .buffer_unordered(32)
        .filter(|status| std::future::ready(*status != 200))
        .count()
        .await;
    assert_eq!(refused, 0, "every message is handed out");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM web_nonces")
        .fetch_one(&page.app.db)
        .await
        .unwrap();
    assert_eq!(stored, 0, "asking for a message stores nothing");

    // A fresh client, in a fresh browser, still signs in.
    let fresh = open_login(&page.app).await;
    let answer = message_from(&page.app, &fresh, page.operator.address()).await;
    assert_eq!(answer.status(), 200);
    let message: Value = answer.json().await.unwrap();
    let message = message["message"].as_str().unwrap();
    let answer = page.sign_in(message, &page.operator).await;
    assert_eq!(answer.status(), 200);
    session_cookie(&answer);
    assert_eq!(page.sessions().await, 1);
}

#[tokio::test]
async fn the_client_cannot_choose_its_own_csrf_pair() {
    let page = page_app(false).await;
    // Any fresh value as both cookie and header: a bare double submit.
    let chosen = "a1".repeat(32);
    let chosen = Browser {
        cookie: format!("ab_csrf={chosen}"),
        token: chosen,
    };
    let answer = message_from(&page.app, &chosen, page.operator.address()).await;
    let text = refusal(answer, 403).await;
    assert!(text.contains("CSRF token"), "{text}");
    // Another browser's token with this browser's cookie.
    let other = open_login(&page.app).await;
    let mixed = Browser {
        cookie: page.browser.cookie.clone(),
        token: other.token,
    };
    let answer = message_from(&page.app, &mixed, page.operator.address()).await;
    refusal(answer, 403).await;
    // The pair the page handed out works.
    let answer = message_from(&page.app, &page.browser, page.operator.address()).await;
    assert_eq!(answer.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_owners_session_stops_working_within_a_minute() {
    let page = page_app(false).await;
    let owner = page.world.chain.signer(1);
    let cookie = page.session_for(&owner).await;
    assert_eq!(page.get_page("/replicas", &cookie).await.status(), 200);

    // The other owners replace owner 1 with account 5.
    let world = &page.world;
    let owners = ISafe::new(world.safe, world.chain.provider())
        .getOwners()
        .call()
        .await
        .unwrap();
    let at = owners.iter().position(|o| *o == owner.address()).unwrap();
    let swap = Call {
        to: world.safe,
        value: U256::ZERO,
        data: ISafeMore::swapOwnerCall {
            prevOwner: if at == 0 {
                address!("0000000000000000000000000000000000000001")
            } else {
                owners[at - 1]
            },
            oldOwner: owner.address(),
            newOwner: world.chain.address(5),
        }
        .abi_encode()
        .into(),
    };
    world
        .chain
        .exec_calls(
            world.safe,
            &[swap],
            &[world.chain.signer(0), world.chain.signer(2)],
            &world.chain.signer(3),
        )
        .await
        .unwrap();

    // The owners are read again after at most a minute.
    page.app.clock.advance(chrono::Duration::seconds(61));
    let answer = page.get_page("/replicas", &cookie).await;
    assert_eq!(answer.status(), 401);
    let html = answer.text().await.unwrap();
    assert!(html.contains("no longer an operator or an owner"), "{html}");
    assert_eq!(page.sessions().await, 0, "the session is ended");
    // Owner 0 is still an owner and still reads.
    let still = page.session_for(&world.chain.signer(0)).await;
    assert_eq!(page.get_page("/replicas", &still).await.status(), 200);
}

#[tokio::test]
async fn an_operator_taken_off_the_list_is_signed_out_at_restart() {
    let page = page_app(false).await;
    let cookie = page.session_for(&page.operator).await;
    assert_eq!(page.get_page("/replicas/new", &cookie).await.status(), 200);

    // The same database and chain, restarted without the operator.
    let configure = page.world.configure(page.world.chain.rpc_url());
    let restarted = crate::helpers::spawn_app_on(
        page.app.database_url.clone(),
        page.app.phala.clone(),
        move |s| {
            configure(s);
            s.web.public_url = Some(crate::page_app::PUBLIC_URL.parse().unwrap());
        },
    )
    .await;
    let answer = restarted
        .http
        .get(format!("{}/replicas", restarted.address))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    assert!(
        answer
            .text()
            .await
            .unwrap()
            .contains("no longer an operator or an owner")
    );
}

#[tokio::test]
async fn sign_out_everywhere_ends_every_session_of_the_person_and_no_one_elses() {
    let page = page_app(false).await;
    let laptop = page.session_for(&page.operator).await;
    let phone = page.session_for(&page.operator).await;
    let owner = page.session_for(&page.world.chain.signer(1)).await;
    assert_eq!(page.sessions().await, 3);

    let html = page
        .get_page("/replicas", &laptop)
        .await
        .text()
        .await
        .unwrap();
    assert!(html.contains("Sign out everywhere"), "{html}");
    let csrf = page.csrf_of(&laptop).await;
    let out = page
        .post_form(
            "/logout",
            &laptop,
            &[("csrf", csrf.as_str()), ("everywhere", "1")],
        )
        .await;
    assert_eq!(out.url().path(), "/login");
    for ended in [&laptop, &phone] {
        assert_eq!(page.get_page("/replicas", ended).await.status(), 401);
    }
    assert_eq!(page.get_page("/replicas", &owner).await.status(), 200);
    assert_eq!(page.sessions().await, 1);
}

#[tokio::test]
async fn the_sessions_command_signs_out_one_person_or_everyone() {
    let page = page_app(false).await;
    let operator = page.session_for(&page.operator).await;
    let owner_key = page.world.chain.signer(1);
    let owner = page.session_for(&owner_key).await;
    let run = |args: &[&str]| {
        let output = bridge()
            .args(["sessions", "sign-out"])
            .args(args)
            .env("DATABASE_URL", &page.app.database_url)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{stderr}");
        String::from_utf8(output.stdout).unwrap()
    };

    // One person, named in lower case as a wallet might show it.
    let lower = format!("{:#x}", owner_key.address());
    let out = run(&["--subject", &lower]);
    assert!(out.contains("1 session(s)"), "{out}");
    assert_eq!(page.get_page("/replicas", &owner).await.status(), 401);
    assert_eq!(page.get_page("/replicas", &operator).await.status(), 200);

    let out = run(&["--all"]);
    assert!(out.contains("1 session(s) ended"), "{out}");
    assert_eq!(page.get_page("/replicas", &operator).await.status(), 401);
    assert_eq!(page.sessions().await, 0);

    // Neither, or both: refused by the command line.
    for args in [&[][..], &["--all", "--subject", "x"][..]] {
        let output = bridge()
            .args(["sessions", "sign-out"])
            .args(args)
            .env("DATABASE_URL", &page.app.database_url)
            .output()
            .unwrap();
        assert!(!output.status.success());
    }
}

const ADMIN_TOKEN: &str = "test-admin-token-1";

/// `POST /api/v1/sessions/sign-out` with `token`, if any.
async fn api_sign_out(app: &TestApp, token: Option<&str>, body: &str) -> reqwest::Response {
    let mut request = app
        .http
        .post(format!("{}/api/v1/sessions/sign-out", app.address))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn an_admin_token_signs_out_one_person_or_everyone_over_the_api() {
    let page = crate::page_app::page_app_with(false, |s, _| {
        s.api_tokens =
            parse_named_secrets(&format!("ci-bot={API_TOKEN},audit={ADMIN_TOKEN}")).unwrap();
        s.trust
            .scopes
            .0
            .push(("api:audit".into(), vec![SourcePattern::Admin]));
    })
    .await;
    let app = &page.app;
    let operator = page.session_for(&page.operator).await;
    let owner_key = page.world.chain.signer(1);
    let owner = page.session_for(&owner_key).await;
    let both_work = || async {
        assert_eq!(page.get_page("/replicas", &operator).await.status(), 200);
        assert_eq!(page.get_page("/replicas", &owner).await.status(), 200);
        assert_eq!(page.sessions().await, 2);
    };

    // A token without `+admin` (even one whose scope is `*`), or none:
    // refused, and every session still works.
    let (code, message) = error_of(
        api_sign_out(app, Some(API_TOKEN), r#"{"all": true}"#).await,
        403,
    )
    .await;
    assert_eq!(code, "admin_only");
    assert!(message.contains("+admin"), "{message}");
    error_of(api_sign_out(app, None, r#"{"all": true}"#).await, 401).await;
    // Bad bodies from the admin: refused, nothing ends.
    for (body, status) in [
        ("{}", 422),
        (r#"{"all": false}"#, 422),
        (r#"{"subject": " ", "all": false}"#, 422),
        (r#"{"subject": "ops@example.com", "all": true}"#, 422),
        (r#"{"everyone": true}"#, 400),
        ("all", 400),
    ] {
        let answer = api_sign_out(app, Some(ADMIN_TOKEN), body).await;
        error_of(answer, status).await;
    }
    both_work().await;

    // One person, named in lower case as a wallet might show it.
    let lower = format!("{:#x}", owner_key.address());
    let answer = api_sign_out(
        app,
        Some(ADMIN_TOKEN),
        &json!({"subject": lower}).to_string(),
    )
    .await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.json::<Value>().await.unwrap(), json!({"ended": 1}));
    assert_eq!(page.get_page("/replicas", &owner).await.status(), 401);
    assert_eq!(page.get_page("/replicas", &operator).await.status(), 200);

    // Everyone.
    let answer = api_sign_out(app, Some(ADMIN_TOKEN), r#"{"all": true}"#).await;
    assert_eq!(answer.json::<Value>().await.unwrap(), json!({"ended": 1}));
    assert_eq!(page.get_page("/replicas", &operator).await.status(), 401);
    assert_eq!(page.sessions().await, 0);
}

/// The bridge behind an SSO proxy at 127.0.0.1, `ops@example.com` its operator.
async fn proxied_app() -> TestApp {
    spawn_app_with(|s| {
        s.web.operators = Operators {
            addresses: vec![],
            users: vec!["ops@example.com".into()],
        };
        s.web.proxy_user_header = Some("x-forwarded-email".parse().unwrap());
        s.web.trusted_proxies = TrustedProxies(vec!["127.0.0.1".parse().unwrap()]);
        s.web.proxy_secret = Some(PROXY_SECRET.to_owned().into());
    })
    .await
}

async fn as_proxy(app: &TestApp, path: &str, secret: Option<&str>) -> reqwest::Response {
    let mut request = app
        .http
        .get(format!("{}{path}", app.address))
        .header("x-forwarded-email", "ops@example.com");
    if let Some(secret) = secret {
        request = request.header("x-proxy-secret", secret);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn the_proxy_header_needs_the_proxys_secret_as_well_as_its_address() {
    let app = proxied_app().await;
    for secret in [None, Some("proxy-secret-guessed-wrong-000000")] {
        let answer = as_proxy(&app, "/replicas/new", secret).await;
        assert_eq!(answer.status(), 403);
        let html = answer.text().await.unwrap();
        assert!(html.contains("came without the proxy"), "{html}");
        assert!(html.contains("x-proxy-secret"), "{html}");
    }
    assert_eq!(
        as_proxy(&app, "/replicas/new", Some(PROXY_SECRET))
            .await
            .status(),
        200
    );

    // A proxy header without a secret is a configuration error.
    let mut settings = crate::helpers::test_settings(
        &crate::helpers::fresh_database().await,
        "http://127.0.0.1:9",
    );
    settings.web.proxy_user_header = Some("x-forwarded-email".parse().unwrap());
    settings.web.trusted_proxies = TrustedProxies(vec!["127.0.0.1".parse().unwrap()]);
    let err = approval_bridge::startup::Application::build(settings)
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{err:#}").contains("APPROVAL_BRIDGE_PROXY_SECRET"),
        "{err:#}"
    );
}

#[tokio::test]
async fn page_error_messages_are_redacted() {
    let app = proxied_app().await;
    // Phala quotes the API key back in its error (as a misconfigured
    // gateway might): the page shows it redacted, as the log would.
    let leak = format!(
        "the key {} is not allowed here",
        crate::helpers::PHALA_API_KEY
    );
    for endpoint in ["/cvms/paginated", "/teepods/available"] {
        Mock::given(method("GET"))
            .and(path(api(endpoint)))
            .respond_with(ResponseTemplate::new(403).set_body_json(phala_error(
                "ERR-01-003",
                &leak,
                false,
            )))
            .mount(&app.phala)
            .await;
    }
    let answer = as_proxy(&app, "/replicas/new", Some(PROXY_SECRET)).await;
    assert_eq!(answer.status(), 200);
    let html = answer.text().await.unwrap();
    assert!(html.contains("is not allowed here"), "{html}");
    assert!(!html.contains(crate::helpers::PHALA_API_KEY), "{html}");
    assert!(html.contains("[redacted]"), "{html}");
}

/// One sign-in request, often nearly right.
#[derive(Debug, Clone)]
enum SignInCase {
    Message {
        address: Value,
        chain_id: Value,
        extra: bool,
    },
    SignIn {
        /// Sign as the operator (else as a stranger).
        operator: bool,
        /// How the bridge's message is altered after signing, if at all.
        alter: Option<(String, String)>,
        /// A signature of junk instead of the real one.
        signature: Option<String>,
    },
    Raw(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Csrf {
    Page,
    Missing,
    Chosen(String),
}

fn sign_in_case() -> impl Strategy<Value = (SignInCase, Csrf)> {
    let json_leaf = prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        ".{0,50}".prop_map(Value::from),
    ];
    let message = (
        prop_oneof![
            4 => Just(json!("0x976EA74026E726554dB657fA54763abd0C3a0aa9")),
            1 => "0x[0-9a-fA-F]{0,44}".prop_map(Value::from),
            1 => json_leaf.clone(),
        ],
        prop_oneof![4 => Just(json!(CHAIN)), 1 => (0u64..100_000).prop_map(Value::from), 1 => json_leaf],
        prop::bool::weighted(0.1),
    )
        .prop_map(|(address, chain_id, extra)| SignInCase::Message {
            address,
            chain_id,
            extra,
        });
    let alter = prop_oneof![
        4 => Just(None),
        1 => Just(Some(("bridge.test:8080".to_owned(), "evil.test".to_owned()))),
        1 => Just(Some(("Chain ID: 31337".to_owned(), "Chain ID: 1".to_owned()))),
        1 => Just(Some(("Nonce: ".to_owned(), "Nonce: 00".to_owned()))),
        1 => (".{1,3}", ".{0,3}").prop_map(|(a, b)| Some((a, b))),
    ];
    let signature = prop_oneof![
        4 => Just(None),
        1 => "(0x)?[0-9a-f]{0,140}".prop_map(Some),
        1 => ".{0,40}".prop_map(Some),
    ];
    let sign_in =
        (prop::bool::weighted(0.8), alter, signature).prop_map(|(operator, alter, signature)| {
            SignInCase::SignIn {
                operator,
                alter,
                signature,
            }
        });
    let case = prop_oneof![
        3 => message,
        4 => sign_in,
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(SignInCase::Raw),
    ];
    let csrf = prop_oneof![
        8 => Just(Csrf::Page),
        1 => Just(Csrf::Missing),
        1 => "[0-9a-f]{64}".prop_map(Csrf::Chosen),
    ];
    (case, csrf)
}

async fn sign_in_counts(page: &crate::page_app::Page) -> (i64, i64) {
    sqlx::query_as("SELECT (SELECT count(*) FROM web_sessions), (SELECT count(*) FROM web_nonces)")
        .fetch_one(&page.app.db)
        .await
        .unwrap()
}

/// Whatever the body and the CSRF pair, `/login/message` and `/login` never
/// answer 5xx, a refusal is JSON with a code and stores nothing, and only a
/// good sign-in stores a session (and its used nonce).
#[test]
fn sign_in_bodies_and_csrf_pairs_never_cause_a_5xx_and_refusals_store_nothing() {
    use alloy::signers::SignerSync;
    use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let page = rt.block_on(page_app(false));
    let stranger = PrivateKeySigner::random();
    let seen = std::sync::Mutex::new(std::collections::BTreeMap::<u16, usize>::new());
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x5157_e000),
        cases: 128,
        ..Config::default()
    });
    runner
        .run(&sign_in_case(), |(case, csrf)| {
            rt.block_on(async {
                let (path, body) = match &case {
                    SignInCase::Message {
                        address,
                        chain_id,
                        extra,
                    } => {
                        let mut body = json!({"address": address, "chain_id": chain_id});
                        if *extra {
                            body["role"] = json!("operator");
                        }
                        ("/login/message", body.to_string().into_bytes())
                    }
                    SignInCase::SignIn {
                        operator,
                        alter,
                        signature,
                    } => {
                        let key = if *operator { &page.operator } else { &stranger };
                        let message = page.message(key).await;
                        let real = key.sign_message_sync(message.as_bytes()).unwrap();
                        let message = match alter {
                            Some((from, to)) => message.replacen(from.as_str(), to, 1),
                            None => message,
                        };
                        let signature = signature
                            .clone()
                            .unwrap_or_else(|| format!("0x{}", hex::encode(real.as_bytes())));
                        let body = json!({"message": message, "signature": signature});
                        ("/login", body.to_string().into_bytes())
                    }
                    SignInCase::Raw(bytes) => ("/login", bytes.clone()),
                };
                let mut request = page
                    .app
                    .http
                    .post(format!("{}{path}", page.app.address))
                    .header("content-type", "application/json")
                    .body(body);
                match &csrf {
                    Csrf::Page => {
                        request = request
                            .header("cookie", &page.browser.cookie)
                            .header("x-csrf-token", &page.browser.token)
                    }
                    Csrf::Missing => {}
                    Csrf::Chosen(token) => {
                        request = request
                            .header("cookie", format!("ab_csrf={token}"))
                            .header("x-csrf-token", token)
                    }
                }
                let before = sign_in_counts(&page).await;
                let answer = request.send().await.unwrap();
                let status = answer.status();
                *seen.lock().unwrap().entry(status.as_u16()).or_default() += 1;
                let text = answer.text().await.unwrap();
                let after = sign_in_counts(&page).await;
                prop_assert!(!status.is_server_error(), "{status} for {case:?}: {text}");
                if status == 200 && path == "/login" {
                    prop_assert_eq!(after, (before.0 + 1, before.1 + 1), "{:?}", case);
                } else {
                    prop_assert_eq!(before, after, "{} for {:?}: {}", status, case, text);
                }
                if status != 200 {
                    let body: Value = serde_json::from_str(&text)
                        .map_err(|_| TestCaseError::fail(format!("{status}: {text}")))?;
                    prop_assert!(body["error"]["code"].is_string(), "{status}: {text}");
                    if !matches!(csrf, Csrf::Page) {
                        prop_assert_eq!(status.as_u16(), 403, "{}", text);
                    }
                }
                Ok::<(), TestCaseError>(())
            })
        })
        .unwrap();
    let seen = seen.into_inner().unwrap();
    eprintln!("statuses: {seen:?}");
    for status in [200, 400, 401, 403, 422] {
        assert!(seen.contains_key(&status), "no case got {status}: {seen:?}");
    }
}
