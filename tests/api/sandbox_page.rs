//! The team page and the sandbox page in a real browser: headless Chromium
//! driven over WebDriver (chromedriver) with fantoccini. The person signs in
//! with a wallet the test injects (EIP-1193: it hands `personal_sign` to the
//! test, which signs in Rust with the anvil key, so the page's CSP stays as
//! it is), queues with the form, and follows the request live while the
//! sandbox's buttons sign and execute. Screenshots go to
//! `target/screenshots/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use approval_bridge::sandbox::{OWNER_NAMES, Sandbox, SandboxOptions};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::helpers::sandbox_database;

/// The wallet the page sees: accounts and chain from the test, and every
/// `personal_sign` parked in `window.__sign` until the test answers it.
const PROVIDER: &str = r#"
const [address, chainId] = arguments;
window.__sign = null;
window.ethereum = {
  request: ({method, params}) => {
    if (method === "eth_requestAccounts" || method === "eth_accounts") return Promise.resolve([address]);
    if (method === "eth_chainId") return Promise.resolve(chainId);
    if (method === "personal_sign") {
      return new Promise((resolve, reject) => { window.__sign = {message: params[0], resolve, reject}; });
    }
    return Promise.reject(new Error("unsupported " + method));
  },
};
"#;

pub(crate) struct Browser {
    pub(crate) client: Client,
    driver: Child,
    shots: PathBuf,
}

impl Browser {
    pub(crate) async fn start(name: &str) -> Browser {
        Browser::start_with(name, true).await
    }

    /// With `javascript` false, the page's script does not run (the
    /// WebDriver's own scripts still do).
    pub(crate) async fn start_with(name: &str, javascript: bool) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (scripts/test installs chromium and chromium-driver)");
        let profile = std::env::temp_dir().join(format!("ab-chromium-{}", uuid::Uuid::new_v4()));
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--window-size=1100,900", format!("--user-data-dir={}", profile.display())],
                "prefs": {"profile.managed_default_content_settings.javascript": if javascript { 1 } else { 2 }},
            },
        });
        let capabilities = capabilities.as_object().unwrap().clone();
        let mut client = None;
        for _ in 0..100 {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(c) => {
                    client = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        println!("{name}: screenshots in {}", shots.display());
        Browser {
            client: client.expect("a WebDriver session"),
            driver,
            shots,
        }
    }

    pub(crate) async fn open(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    pub(crate) async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.unwrap();
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    pub(crate) async fn click(&self, css: &str) {
        self.client
            .wait()
            .at_most(Duration::from_secs(30))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|err| panic!("no {css}: {err}"))
            .click()
            .await
            .unwrap();
    }

    pub(crate) async fn text(&self, css: &str) -> String {
        match self.client.find(Locator::Css(css)).await {
            Ok(element) => element.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Waits until the text at `css` contains `wanted`, without touching the page.
    pub(crate) async fn wait_for_text(&self, css: &str, wanted: &str, secs: u64) -> String {
        let mut text = String::new();
        for _ in 0..secs * 4 {
            text = self.text(css).await;
            if text.contains(wanted) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("`{css}` never showed `{wanted}`; last: `{text}`");
    }

    pub(crate) async fn body(&self) -> String {
        self.text("body").await
    }

    /// Signs in on `/login` with the injected wallet of `key`.
    async fn sign_in_with_wallet(&self, base: &str, key: &PrivateKeySigner, chain_id: u64) {
        self.open(&format!("{base}login")).await;
        self.client
            .execute(
                PROVIDER,
                vec![
                    json!(key.address().to_checksum(None)),
                    json!(format!("0x{chain_id:x}")),
                ],
            )
            .await
            .unwrap();
        self.click("#siwe").await;
        let mut message = Value::Null;
        for _ in 0..80 {
            message = self
                .client
                .execute("return window.__sign && window.__sign.message", vec![])
                .await
                .unwrap();
            if message.is_string() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let hex_message = message.as_str().expect("the page asked the wallet to sign");
        let bytes = hex::decode(hex_message.trim_start_matches("0x")).unwrap();
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.contains("wants you to sign in with your Ethereum account"),
            "{text}"
        );
        let signature = key.sign_message_sync(text.as_bytes()).unwrap();
        self.client
            .execute(
                "window.__sign.resolve(arguments[0])",
                vec![json!(format!("0x{}", hex::encode(signature.as_bytes())))],
            )
            .await
            .unwrap();
        for _ in 0..80 {
            if self.client.current_url().await.unwrap().path() == "/replicas" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("not signed in: {}", self.body().await);
    }

    /// Marks the page; [`Self::same_page`] then tells whether it was reloaded.
    async fn mark(&self) {
        self.client
            .execute("window.__not_reloaded = true", vec![])
            .await
            .unwrap();
    }

    async fn same_page(&self) -> bool {
        self.client
            .execute("return window.__not_reloaded === true", vec![])
            .await
            .unwrap()
            == json!(true)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

pub(crate) async fn start_sandbox() -> Sandbox {
    Sandbox::start(SandboxOptions {
        port: 0,
        database_url: Some(sandbox_database()),
        batch_window_secs: 1,
        confirmations: 1,
        boot_delay: Duration::ZERO,
        ..SandboxOptions::default()
    })
    .await
    .unwrap()
}

/// The operator of the sandbox's bridge: anvil account 6.
pub(crate) fn operator(sandbox: &Sandbox) -> PrivateKeySigner {
    sandbox.chain.signer(6)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_in_queues_and_follows_a_replica_to_done_in_the_browser() {
    let sandbox = start_sandbox().await;
    let base = sandbox.url.to_string();
    let browser = Browser::start("queue_and_follow").await;

    browser
        .sign_in_with_wallet(&base, &operator(&sandbox), sandbox.chain.chain_id())
        .await;
    assert!(
        browser.body().await.contains("operator"),
        "{}",
        browser.body().await
    );

    // Queue web-prod on prod-2 with the form: the request's page opens.
    browser.open(&format!("{base}replicas/new")).await;
    let form = browser.client.find(Locator::Css("#source")).await.unwrap();
    form.select_by_value("web-prod").await.unwrap();
    let node = browser.client.find(Locator::Css("#node")).await.unwrap();
    node.select_by_value("prod-2").await.unwrap();
    browser
        .client
        .find(Locator::Css("#note"))
        .await
        .unwrap()
        .send_keys("from the browser test")
        .await
        .unwrap();
    // A name outside the app's allowed_envs is refused before the form is sent.
    let env_name = browser
        .client
        .find(Locator::Css("#env-name-0"))
        .await
        .unwrap();
    env_name.send_keys("NOT_ALLOWED").await.unwrap();
    browser.click("#queue button[type=submit]").await;
    browser
        .wait_for_text(
            "#form-error",
            "Not in the app's allowed_envs: NOT_ALLOWED",
            10,
        )
        .await;
    assert!(
        browser
            .client
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/replicas/new")
    );
    env_name.clear().await.unwrap();
    browser.screenshot("queue-form").await;
    browser.click("#queue button[type=submit]").await;
    // The form posts, then redirects to the new request's page.
    let mut url = browser.client.current_url().await.unwrap();
    for _ in 0..300 {
        if !url.path().ends_with("/replicas/new") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        url = browser.client.current_url().await.unwrap();
    }
    let id = url.path().trim_start_matches("/replicas/").to_owned();
    assert_eq!(id.len(), 36, "{url}");

    // The detail updates by itself to awaiting_approval.
    browser.mark().await;
    browser
        .wait_for_text("#status", "Waiting for the owners", 60)
        .await;
    assert!(browser.same_page().await, "the page was reloaded");
    browser.screenshot("awaiting-approval").await;
    let timeline = browser.text(".timeline").await;
    assert!(
        timeline.contains("Queued") && timeline.contains("by you"),
        "{timeline}"
    );

    // Owner 0 signs with the sandbox's button, in a second tab.
    let detail = browser.client.window().await.unwrap();
    let tab = browser.client.new_window(true).await.unwrap();
    browser.client.switch_to_window(tab.handle).await.unwrap();
    browser.open(&format!("{base}sandbox")).await;
    browser.click("form[action$='/sign'] button").await;
    browser.wait_for_text("#proposals", "1 of 2", 20).await;
    browser.screenshot("sandbox-one-signed").await;

    // The proposals page: what it approves, for whom, and who still signs.
    let waiting = format!(
        "1 of 2 confirmations; waiting for one of {}, {}",
        OWNER_NAMES[1], OWNER_NAMES[2]
    );
    browser.open(&format!("{base}proposals")).await;
    let proposals = browser.wait_for_text("#proposals", &waiting, 60).await;
    assert!(
        proposals.contains("addDevice") && proposals.contains("web-prod"),
        "{proposals}"
    );
    assert!(proposals.contains(OWNER_NAMES[0]), "{proposals}");
    browser.screenshot("proposals").await;
    browser.open(&format!("{base}sandbox")).await;

    // Back on the request: 1 of 2, waiting for the other owners, live.
    browser
        .client
        .switch_to_window(detail.clone())
        .await
        .unwrap();
    browser.wait_for_text("#live .approval", &waiting, 60).await;
    assert!(browser.same_page().await);
    browser.screenshot("one-of-two").await;

    // Owner 1 signs and the executor executes: the request reaches done.
    let tabs = browser.client.windows().await.unwrap();
    let sandbox_tab = tabs.into_iter().find(|w| *w != detail).unwrap();
    browser.client.switch_to_window(sandbox_tab).await.unwrap();
    browser.click("form[action$='/sign'] button").await;
    browser.wait_for_text("#proposals", "2 of 2", 20).await;
    browser.click("form[action$='/execute'] button").await;
    browser.client.switch_to_window(detail).await.unwrap();
    browser.wait_for_text("#status", "Done", 120).await;
    assert!(browser.same_page().await);
    let shot = browser.screenshot("done").await;
    println!("the request, done: {}", shot.display());

    // The list shows it too, with the operator as its author.
    browser.open(&format!("{base}replicas?status=done")).await;
    let rows = browser.text("#rows").await;
    assert!(
        rows.contains(&id[id.len() - 8..]) && rows.contains("Done"),
        "{rows}"
    );
    browser.client.set_window_size(390, 844).await.unwrap();
    browser.screenshot("replicas-phone").await;

    browser.client.clone().close().await.ok();
    drop(browser);
    sandbox.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_refuses_a_form_without_csrf_and_an_owner_cancelling() {
    let sandbox = start_sandbox().await;
    let base = sandbox.url.to_string();
    let http = reqwest::Client::new();
    let queued: Value = http
        .post(format!("{base}api/v1/replicas"))
        .bearer_auth(&sandbox.options.api_token)
        .json(&json!({"source": "web-prod", "node": "prod-3"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = queued["replicas"][0]["id"].as_str().unwrap().to_owned();
    let browser = Browser::start("refusals").await;

    // The sandbox's dev login, as owner 0: it reads, and may not cancel.
    browser.open(&format!("{base}sandbox")).await;
    let account = browser.client.find(Locator::Css("#account")).await.unwrap();
    account.select_by_value("owner-0").await.unwrap();
    browser
        .click("form[action='/sandbox/dev-login'] button")
        .await;
    browser.wait_for_text("header", OWNER_NAMES[0], 20).await;
    assert!(browser.text("header").await.contains("read-only"));
    browser.open(&format!("{base}replicas/{id}")).await;
    assert!(
        browser
            .client
            .find(Locator::Css("form.cancel"))
            .await
            .is_err()
    );
    // The cancel form, made by hand with this page's own CSRF token.
    browser
        .client
        .execute(
            r#"const form = document.createElement("form");
               form.method = "post"; form.action = arguments[0];
               const csrf = document.createElement("input");
               csrf.type = "hidden"; csrf.name = "csrf";
               csrf.value = document.querySelector('meta[name="csrf-token"]').content;
               form.append(csrf); document.body.append(form); form.submit();"#,
            vec![json!(format!("/replicas/{id}/cancel"))],
        )
        .await
        .unwrap();
    browser
        .wait_for_text("body", "only operators may queue and cancel", 20)
        .await;
    browser.screenshot("owner-refused").await;

    // As the operator, the cancel form without its CSRF token is refused.
    browser.open(&format!("{base}sandbox")).await;
    let account = browser.client.find(Locator::Css("#account")).await.unwrap();
    account.select_by_value("operator").await.unwrap();
    browser
        .click("form[action='/sandbox/dev-login'] button")
        .await;
    browser.wait_for_text("header", "operator", 20).await;
    browser.open(&format!("{base}replicas/{id}")).await;
    // In one script, so no live refresh comes in between; the confirmation
    // is answered "yes" (it has its own test).
    browser
        .client
        .execute(
            "window.confirm = () => true;
             document.querySelector('form.cancel input[name=csrf]').remove();
             document.querySelector('form.cancel').requestSubmit()",
            vec![],
        )
        .await
        .unwrap();
    browser
        .wait_for_text("body", "CSRF token is missing", 20)
        .await;
    browser.screenshot("csrf-refused").await;

    // Neither changed anything.
    let request: Value = http
        .get(format!("{base}api/v1/replicas/{id}"))
        .bearer_auth(&sandbox.options.api_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(request["status"], "cancelled");
    let actors: Vec<&str> = request["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["actor"].as_str())
        .collect();
    assert!(actors.iter().all(|a| !a.starts_with("web:")), "{actors:?}");

    // With its token, the operator's cancel goes through, recorded as theirs.
    browser.open(&format!("{base}replicas/{id}")).await;
    browser.click("form.cancel button").await;
    browser.client.accept_alert().await.unwrap();
    browser.wait_for_text("#status", "Cancelled", 20).await;
    let timeline = browser.text(".timeline").await;
    assert!(timeline.contains("Cancelled by you"), "{timeline}");

    browser.client.clone().close().await.ok();
    drop(browser);
    sandbox.stop().await.unwrap();
}

/// Queues web-prod on `node` through the API; the request's id.
pub(crate) async fn queue_api(sandbox: &Sandbox, node: &str) -> String {
    queue_source(sandbox, "web-prod", node).await
}

/// Queues `source` on `node` through the API; the request's id.
pub(crate) async fn queue_source(sandbox: &Sandbox, source: &str, node: &str) -> String {
    let queued: Value = reqwest::Client::new()
        .post(format!("{}api/v1/replicas", sandbox.url))
        .bearer_auth(&sandbox.options.api_token)
        .json(&json!({"source": source, "node": node}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    queued["replicas"][0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("not queued: {queued}"))
        .to_owned()
}

/// The request through the API, once `done` holds (bounded).
pub(crate) async fn request_until(
    sandbox: &Sandbox,
    id: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    for _ in 0..240 {
        last = reqwest::Client::new()
            .get(format!("{}api/v1/replicas/{id}", sandbox.url))
            .bearer_auth(&sandbox.options.api_token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if done(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("never: {last}");
}

impl Browser {
    /// The sandbox's dev login as `account` (`operator`, `owner-0`…).
    pub(crate) async fn dev_login(&self, base: &str, account: &str) {
        self.open(&format!("{base}sandbox")).await;
        let select = self.client.find(Locator::Css("#account")).await.unwrap();
        select.select_by_value(account).await.unwrap();
        self.click("form[action='/sandbox/dev-login'] button").await;
        self.wait_for_text("header", "Sign out", 20).await;
    }

    pub(crate) async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    /// Waits until the page has refreshed its live parts `n` more times
    /// (its own counter, `<html data-live-refreshes>`).
    pub(crate) async fn wait_for_refreshes(&self, n: u64) {
        let count = || async {
            self.js("return Number(document.documentElement.dataset.liveRefreshes || 0)")
                .await
                .as_u64()
                .unwrap()
        };
        let start = count().await;
        for _ in 0..200 {
            if count().await >= start + n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the page did not refresh {n} times");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_updates_keep_focus_and_selection_and_cancel_asks_first() {
    let sandbox = start_sandbox().await;
    let base = sandbox.url.to_string();
    let browser = Browser::start("live_focus").await;
    browser.client.set_window_size(1366, 900).await.unwrap();
    browser.dev_login(&base, "operator").await;
    let first = queue_api(&sandbox, "prod-2").await;

    // Focus the cancel button while the request is on its way.
    browser.open(&format!("{base}replicas/{first}")).await;
    browser
        .js("window.__cancel = document.querySelector('#cancel-form button'); window.__cancel.focus();")
        .await;
    browser
        .wait_for_text("#status", "Waiting for the owners", 60)
        .await;
    assert_eq!(
        browser
            .js("return document.activeElement === window.__cancel && window.__cancel.isConnected")
            .await,
        json!(true),
        "the focus left the cancel button"
    );

    // Select the safeTxHash and focus the button; then owner 0 signs, so
    // the proposal's part of the page changes under them.
    let hash = browser
        .js("const code = document.querySelector('#live .proposal code.hash');
             const range = document.createRange(); range.selectNodeContents(code);
             const selection = window.getSelection(); selection.removeAllRanges(); selection.addRange(range);
             window.__hash = code; window.__cancel.focus();
             return code.textContent;")
        .await;
    let hash = hash.as_str().unwrap().to_owned();
    assert!(hash.starts_with("0x") && hash.len() == 66, "{hash}");
    let signed = reqwest::Client::new()
        .post(format!("{base}sandbox/safe/{hash}/sign"))
        .json(&json!({"owner": 0}))
        .send()
        .await
        .unwrap();
    assert!(signed.status().is_success());
    browser
        .wait_for_text("#live .approval", "1 of 2 confirmations", 30)
        .await;
    // And nothing more changes for several refreshes.
    browser.wait_for_refreshes(3).await;
    let kept = browser
        .js("return [document.activeElement === window.__cancel, window.getSelection().toString(), window.__hash.isConnected]")
        .await;
    assert_eq!(kept, json!([true, hash, true]), "focus or selection lost");
    // The change was read out to screen readers.
    let announced = browser
        .js("return document.getElementById('announce').textContent")
        .await;
    assert!(
        announced.as_str().unwrap().contains("1 of 2 confirmations"),
        "{announced}"
    );

    // A second batch stacks behind the first: the queue shows both, by nonce.
    let second = queue_api(&sandbox, "prod-3").await;
    let behind = request_until(&sandbox, &second, |r| r["status"] == "awaiting_approval").await;
    let behind_hash = behind["proposal"]["safe_tx_hash"]
        .as_str()
        .unwrap()
        .to_owned();
    let nonce = behind["proposal"]["nonce"].as_i64().unwrap() - 1;
    browser.open(&format!("{base}proposals")).await;
    let queue = browser
        .wait_for_text("#proposals", &format!("blocked by nonce {nonce}"), 60)
        .await;
    assert!(queue.contains("next; needs 1 more signature"), "{queue}");
    assert!(
        queue.find(&hash).unwrap() < queue.find(&behind_hash).unwrap(),
        "lowest nonce first: {queue}"
    );
    assert!(
        queue.contains("Checked: device of node prod-2, named by the order"),
        "{queue}"
    );
    let shot = browser.screenshot("proposal-queue").await;
    println!("the queue: {}", shot.display());
    browser.open(&format!("{base}replicas")).await;
    browser.screenshot("replicas-list").await;

    // The sandbox says, per owner, what Safe{Wallet} offers, and why a
    // proposal cannot execute yet, in words.
    browser.open(&format!("{base}sandbox")).await;
    let row = format!("tr[data-id='{behind_hash}']");
    let text = browser
        .wait_for_text(&row, &format!("nonce {nonce} must go first"), 20)
        .await;
    assert!(text.contains("Confirm as 0"), "{text}");
    assert!(
        browser
            .text(&format!("tr[data-id='{hash}']"))
            .await
            .contains("not enough signatures: 1 of 2"),
    );
    browser
        .click(&format!("{row} form[action$='/execute'] button"))
        .await;
    let notice = browser.wait_for_text("#notice", "Not executed", 20).await;
    assert!(
        notice.contains(&format!("nonce {nonce} must go first")),
        "{notice}"
    );
    assert!(
        !browser.body().await.contains("\"error\""),
        "raw JSON on the page"
    );
    browser.screenshot("sandbox-queue").await;

    // Cancel asks first: "no" keeps the request, "yes" cancels it, and the
    // button goes with the state that allowed it.
    browser.open(&format!("{base}replicas/{first}")).await;
    browser.click("#cancel-form button").await;
    let question = browser.client.get_alert_text().await.unwrap();
    assert!(question.starts_with("Cancel this request?"), "{question}");
    browser.client.dismiss_alert().await.unwrap();
    browser.wait_for_refreshes(1).await;
    let request = request_until(&sandbox, &first, |_| true).await;
    assert_eq!(request["status"], "awaiting_approval");
    browser.click("#cancel-form button").await;
    browser.client.accept_alert().await.unwrap();
    browser.wait_for_text("#status", "Cancelled", 20).await;
    assert!(
        browser
            .client
            .find(Locator::Css("#cancel-form"))
            .await
            .is_err(),
        "cancel is offered on a cancelled request"
    );

    // On a phone.
    browser.open(&format!("{base}proposals")).await;
    browser.client.set_window_size(390, 844).await.unwrap();
    browser
        .wait_for_text("#proposals", "blocked by nonce", 30)
        .await;
    browser.screenshot("proposal-queue-phone").await;

    browser.client.clone().close().await.ok();
    drop(browser);
    sandbox.stop().await.unwrap();
}
