//! The bridge's pages over HTTP on a real Safe: `page_app` starts the app
//! with an operator and, when asked, an SSO proxy; a `Browser` is a CSRF
//! cookie and its token before sign-in; `Page` signs in with Ethereum.

use alloy::primitives::Address;
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use approval_bridge::config::{Operators, TrustedProxies};
use serde_json::{Value, json};

use super::safe_world::SafeWorld;
use crate::common::helpers::{TestApp, spawn_app_with};
use crate::common::web::{PROXY_SECRET, csrf_on_page};

pub const PUBLIC_URL: &str = "http://bridge.test:8080";
pub const CHAIN: u64 = 31337;

pub struct Page {
    pub app: TestApp,
    pub world: SafeWorld,
    pub operator: PrivateKeySigner,
    /// This browser's CSRF cookie and the token the sign-in page made of it.
    pub browser: Browser,
}

/// A browser before sign-in: its `ab_csrf` cookie (`name=value`) and token.
#[derive(Clone)]
pub struct Browser {
    pub cookie: String,
    pub token: String,
}

/// Opens `/login` as a new browser would: the CSRF cookie it sets, and the
/// token on the page.
pub async fn open_login(app: &TestApp) -> Browser {
    let answer = app
        .http
        .get(format!("{}/login", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let cookie = answer
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|v| v.contains("ab_csrf="))
        .expect("a CSRF cookie");
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let token = csrf_on_page(&answer.text().await.unwrap());
    Browser { cookie, token }
}

/// The bridge on a real Safe (owners: anvil accounts 0..2), with account 6
/// as its operator and, when asked, an SSO proxy at 127.0.0.1.
pub async fn page_app(proxy: bool) -> Page {
    page_app_with(proxy, |_, _| {}).await
}

pub async fn page_app_with(
    proxy: bool,
    adjust: impl FnOnce(&mut approval_bridge::config::Settings, Address),
) -> Page {
    page_app_on(SafeWorld::start().await, proxy, adjust).await
}

/// [`page_app_with`] on a world started by the caller (to put an RPC proxy
/// in front of its chain, say).
pub async fn page_app_on(
    world: SafeWorld,
    proxy: bool,
    adjust: impl FnOnce(&mut approval_bridge::config::Settings, Address),
) -> Page {
    let operator = world.chain.signer(6);
    let configure = world.configure(world.chain.rpc_url());
    let operator_address = operator.address();
    let app = spawn_app_with(move |s| {
        configure(s);
        s.web.public_url = Some(PUBLIC_URL.parse().unwrap());
        s.web.operators = Operators {
            addresses: vec![operator_address],
            users: vec!["ops@example.com".into()],
        };
        if proxy {
            s.web.proxy_user_header = Some("x-forwarded-email".parse().unwrap());
            s.web.trusted_proxies = TrustedProxies(vec!["10.9.8.7".parse().unwrap()]);
            s.web.proxy_secret = Some(PROXY_SECRET.to_owned().into());
        }
        adjust(s, operator_address);
    })
    .await;
    let browser = open_login(&app).await;
    Page {
        app,
        world,
        operator,
        browser,
    }
}

impl Page {
    /// Posts JSON from this browser before sign-in, with its CSRF pair.
    pub async fn post_json(&self, path: &str, body: Value, cookies: &str) -> reqwest::Response {
        self.app
            .http
            .post(format!("{}{path}", self.app.address))
            .header("cookie", format!("{}; {cookies}", self.browser.cookie))
            .header("x-csrf-token", &self.browser.token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// The CSRF token of the pages the browser holding `cookies` sees.
    pub async fn csrf_of(&self, cookies: &str) -> String {
        let answer = self.get_page("/login", cookies).await;
        csrf_on_page(&answer.text().await.unwrap())
    }

    pub async fn message_for(&self, address: Address, chain_id: u64) -> reqwest::Response {
        self.post_json(
            "/login/message",
            json!({"address": address.to_checksum(None), "chain_id": chain_id}),
            "",
        )
        .await
    }

    /// A fresh message from the bridge for `key`.
    pub async fn message(&self, key: &PrivateKeySigner) -> String {
        self.message_of(key.address()).await
    }

    /// A fresh message from the bridge for `address`, whatever signs for it.
    pub async fn message_of(&self, address: Address) -> String {
        let answer = self.message_for(address, CHAIN).await;
        assert_eq!(answer.status(), 200);
        let json: Value = answer.json().await.unwrap();
        json["message"].as_str().unwrap().to_owned()
    }

    pub async fn sign_in(&self, message: &str, key: &PrivateKeySigner) -> reqwest::Response {
        let signature = key.sign_message_sync(message.as_bytes()).unwrap();
        self.send_signed(message, &signature).await
    }

    /// `POST /login` with `message` and `signature`, whoever signed what.
    pub async fn send_signed(
        &self,
        message: &str,
        signature: &alloy::primitives::Signature,
    ) -> reqwest::Response {
        self.send_signature(message, &signature.as_bytes()).await
    }

    /// `POST /login` with `message` and any signature bytes (a contract
    /// wallet's are longer than a key's).
    pub async fn send_signature(&self, message: &str, signature: &[u8]) -> reqwest::Response {
        self.post_json(
            "/login",
            json!({"message": message, "signature": format!("0x{}", hex::encode(signature))}),
            "",
        )
        .await
    }

    /// Signs `key` in with a fresh message; its session cookie.
    pub async fn session_for(&self, key: &PrivateKeySigner) -> String {
        let message = self.message(key).await;
        session_cookie(&self.sign_in(&message, key).await)
    }

    /// A page form posted by the browser holding `cookies`, with the CSRF
    /// cookie (the form carries its token, or not, in `form`).
    pub async fn post_form(
        &self,
        path: &str,
        cookies: &str,
        form: &[(&str, &str)],
    ) -> reqwest::Response {
        self.app
            .http
            .post(format!("{}{path}", self.app.address))
            .header("cookie", format!("{}; {cookies}", self.browser.cookie))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_body(form))
            .send()
            .await
            .unwrap()
    }

    pub async fn sessions(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM web_sessions")
            .fetch_one(&self.app.db)
            .await
            .unwrap()
    }

    pub async fn get_page(&self, path: &str, cookies: &str) -> reqwest::Response {
        self.app
            .http
            .get(format!("{}{path}", self.app.address))
            .header("cookie", cookies)
            .send()
            .await
            .unwrap()
    }
}

/// A form body, as a browser sends it.
pub fn form_body(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

pub fn session_cookie(answer: &reqwest::Response) -> String {
    let set = answer
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|v| v.starts_with("ab_session="))
        .expect("a session cookie");
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("SameSite=Strict"), "{set}");
    set.split(';').next().unwrap().to_owned()
}

pub async fn refusal(answer: reqwest::Response, status: u16) -> String {
    let got = answer.status();
    let body: Value = answer.json().await.unwrap();
    assert_eq!(got.as_u16(), status, "{body}");
    body["error"]["message"].as_str().unwrap().to_owned()
}
