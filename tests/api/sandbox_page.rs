//! The sandbox page in a real browser: headless Chromium driven over the
//! W3C WebDriver protocol (chromedriver), clicking the page's own buttons.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use approval_bridge::sandbox::{Sandbox, SandboxOptions};
use serde_json::{Value, json};

use crate::helpers::sandbox_database;

/// The W3C key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Browser {
    async fn start() -> Browser {
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
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        for _ in 0..100 {
            if http.get(format!("{base}/status")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = std::env::temp_dir().join(format!("ab-chromium-{}", uuid::Uuid::new_v4()));
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let session: Value = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = session["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {session}"))
            .to_owned();
        Browser {
            driver,
            base,
            session,
            http,
        }
    }

    async fn command(&self, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        self.http
            .post(url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn open(&self, url: &str) {
        self.command("/url", json!({"url": url})).await;
    }

    /// Clicks the element at `xpath`, retrying while the page (which
    /// refreshes its table every 2 s) has not drawn it yet or redrew it.
    async fn click(&self, xpath: &str) {
        for _ in 0..60 {
            let found = self
                .command("/element", json!({"using": "xpath", "value": xpath}))
                .await;
            if let Some(id) = found["value"][ELEMENT].as_str() {
                let clicked = self
                    .command(&format!("/element/{id}/click"), json!({}))
                    .await;
                if clicked["value"].is_null() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("no clickable element at {xpath}");
    }

    async fn text_of(&self, xpath: &str) -> String {
        let found = self
            .command("/element", json!({"using": "xpath", "value": xpath}))
            .await;
        let id = found["value"][ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("nothing at {xpath}"))
            .to_owned();
        let url = format!("{}/session/{}/element/{id}/text", self.base, self.session);
        let text: Value = self
            .http
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        text["value"].as_str().unwrap_or_default().to_owned()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_queues_a_replica_and_its_buttons_sign_and_execute_it() {
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
    let browser = Browser::start().await;
    browser.open(&format!("{}sandbox", sandbox.url)).await;

    // Queue web-prod on prod-2 with the form.
    browser
        .click("//select[@name='source']/option[text()='web-prod']")
        .await;
    browser
        .click("//select[@name='node']/option[text()='prod-2']")
        .await;
    browser.click("//button[text()='Queue']").await;

    // Two owners sign with the buttons, then execute.
    browser.click("//button[text()='sign as 0']").await;
    browser.click("//button[text()='sign as 2']").await;
    browser.click("//button[text()='execute']").await;

    // The API says it reached done; the page shows it too.
    let http = reqwest::Client::new();
    let mut status = String::new();
    for _ in 0..120 {
        let list: Value = http
            .get(format!("{}api/v1/replicas", sandbox.url))
            .bearer_auth(&sandbox.options.api_token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        status = list["replicas"][0]["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if status == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(status, "done");
    tokio::time::sleep(Duration::from_millis(2500)).await; // one page refresh
    assert_eq!(
        browser.text_of("//tbody[@id='requests']/tr[1]/td[4]").await,
        "done"
    );
    drop(browser);
    sandbox.stop().await.unwrap();
}
