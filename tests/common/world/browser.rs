//! The pages in a real browser: headless Chromium driven over WebDriver
//! (chromedriver) with fantoccini, a wallet the test injects, and the
//! sandbox the page tests run against. Screenshots go to
//! `target/screenshots/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use approval_bridge::sandbox::{Sandbox, SandboxOptions};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::common::helpers::sandbox_database;
use crate::common::wait::{self, Pace};

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

pub struct Browser {
    pub client: Client,
    driver: Child,
    shots: PathBuf,
}

impl Browser {
    pub async fn start(name: &str) -> Browser {
        Browser::start_with(name, true).await
    }

    /// With `javascript` false, the page's script does not run (the
    /// WebDriver's own scripts still do).
    pub async fn start_with(name: &str, javascript: bool) -> Browser {
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

    pub async fn open(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.unwrap();
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    pub async fn click(&self, css: &str) {
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

    pub async fn text(&self, css: &str) -> String {
        match self.client.find(Locator::Css(css)).await {
            Ok(element) => element.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Waits until the text at `css` contains `wanted`, without touching the page.
    pub async fn wait_for_text(&self, css: &str, wanted: &str, secs: u64) -> String {
        let pace = Pace::every(Duration::from_millis(250), Duration::from_secs(secs));
        let what = format!("`{css}` to show `{wanted}`");
        wait::until_paced(pace, what, || self.text(css), |text| text.contains(wanted)).await
    }

    pub async fn body(&self) -> String {
        self.text("body").await
    }

    /// Signs in on `/login` with the injected wallet of `key`.
    pub async fn sign_in_with_wallet(&self, base: &str, key: &PrivateKeySigner, chain_id: u64) {
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
    pub async fn mark(&self) {
        self.client
            .execute("window.__not_reloaded = true", vec![])
            .await
            .unwrap();
    }

    pub async fn same_page(&self) -> bool {
        self.client
            .execute("return window.__not_reloaded === true", vec![])
            .await
            .unwrap()
            == json!(true)
    }
}

impl Browser {
    /// The end of a page test: the WebDriver session closes, chromedriver
    /// stops, then the sandbox.
    pub async fn finish(self, sandbox: Sandbox) {
        self.client.clone().close().await.ok();
        drop(self);
        sandbox.stop().await.unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

pub async fn start_sandbox() -> Sandbox {
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
pub fn operator(sandbox: &Sandbox) -> PrivateKeySigner {
    sandbox.chain.signer(6)
}

/// Queues web-prod on `node` through the API; the request's id.
pub async fn queue_api(sandbox: &Sandbox, node: &str) -> String {
    queue_source(sandbox, "web-prod", node).await
}

/// Queues `source` on `node` through the API; the request's id.
pub async fn queue_source(sandbox: &Sandbox, source: &str, node: &str) -> String {
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
pub async fn request_until(sandbox: &Sandbox, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let read = || async {
        reqwest::Client::new()
            .get(format!("{}api/v1/replicas/{id}", sandbox.url))
            .bearer_auth(&sandbox.options.api_token)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    wait::until(format!("request {id}"), read, done).await
}

impl Browser {
    /// The sandbox's dev login as `account` (`operator`, `owner-0`…).
    pub async fn dev_login(&self, base: &str, account: &str) {
        self.open(&format!("{base}sandbox")).await;
        let select = self.client.find(Locator::Css("#account")).await.unwrap();
        select.select_by_value(account).await.unwrap();
        self.click("form[action='/sandbox/dev-login'] button").await;
        self.wait_for_text("header", "Sign out", 20).await;
    }

    pub async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    /// Waits until the page has refreshed its live parts `n` more times
    /// (its own counter, `<html data-live-refreshes>`).
    pub async fn wait_for_refreshes(&self, n: u64) {
        let count = || async {
            self.js("return Number(document.documentElement.dataset.liveRefreshes || 0)")
                .await
                .as_u64()
                .unwrap()
        };
        let start = count().await;
        let pace = Pace::every(Duration::from_millis(100), Duration::from_secs(20));
        let what = format!("the page to refresh {n} times");
        wait::until_paced(pace, what, count, |now| *now >= start + n).await;
    }
}
