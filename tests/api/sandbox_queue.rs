//! The Safe's queue, end to end through the sandbox: proposals marked by
//! nonce ("next", "blocked by nonce N", "ready to execute" only at the Safe's
//! nonce with its threshold), and a proposal whose requests were all
//! cancelled: withdrawn from the Safe Transaction Service with its nonce
//! reused when nobody signed it, kept with the way to reject it when an owner
//! did, with the batches behind it saying so.

use std::time::Duration;

use alloy::primitives::B256;
use approval_bridge::sandbox::{Sandbox, SandboxOptions};
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use serde_json::{Value, json};

use crate::helpers::sandbox_database;
use crate::wait;

const TOKEN: &str = "queue-token-123";

pub(crate) struct QueueDriver {
    pub sandbox: Sandbox,
    http: reqwest::Client,
}

impl QueueDriver {
    pub async fn start() -> QueueDriver {
        let sandbox = Sandbox::start(SandboxOptions {
            port: 0,
            api_token: TOKEN.into(),
            database_url: Some(sandbox_database()),
            batch_window_secs: 1,
            confirmations: 1,
            boot_delay: Duration::ZERO,
            ..SandboxOptions::default()
        })
        .await
        .expect("the sandbox starts");
        QueueDriver {
            sandbox,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.sandbox.url, path.trim_start_matches('/'))
    }

    async fn get(&self, path: &str) -> Value {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.json().await.unwrap()
    }

    /// Queues one replica of web-prod on `node`; its id.
    pub async fn queue(&self, node: &str) -> String {
        let response = self
            .http
            .post(self.url("/api/v1/replicas"))
            .bearer_auth(TOKEN)
            .json(&json!({"source": "web-prod", "node": node}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        body["replicas"][0]["id"].as_str().unwrap().to_owned()
    }

    async fn cancel(&self, id: &str) {
        let response = self
            .http
            .post(self.url(&format!("/api/v1/replicas/{id}/cancel")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    }

    /// Polls `path` until `done` holds (bounded: the test fails, it never hangs).
    async fn until(&self, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        wait::until(format!("{path} to show {what}"), || self.get(path), done).await
    }

    /// Waits until the request awaits the owners; its proposal.
    pub async fn proposal_of(&self, id: &str) -> Value {
        let request = self
            .until(
                &format!("/api/v1/replicas/{id}"),
                "awaiting_approval",
                |r| {
                    assert_ne!(r["status"], "failed", "{r}");
                    r["status"] == "awaiting_approval"
                },
            )
            .await;
        request["proposal"].clone()
    }

    async fn proposal(&self, hash: &str) -> Value {
        self.get(&format!("/api/v1/proposals/{hash}")).await
    }

    /// A sandbox control, with its HTTP status.
    pub async fn control(&self, hash: &str, action: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(&format!("/sandbox/safe/{hash}/{action}")))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// The team page's proposal list, as the sandbox's operator sees it.
    async fn queue_page(&self) -> String {
        let login = self
            .http
            .post(self.url("/sandbox/dev-login"))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("account=operator")
            .send()
            .await
            .unwrap();
        assert_eq!(login.status(), 303);
        assert_eq!(login.headers()[LOCATION], "/replicas");
        let cookie = login.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        self.http
            .get(self.url("/proposals"))
            .header(COOKIE, cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

fn hash_of(proposal: &Value) -> String {
    proposal["safe_tx_hash"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_proposal_nobody_signed_is_deleted_and_its_nonce_reused() {
    let d = QueueDriver::start().await;
    let first = d.queue("prod-2").await;
    let proposal = d.proposal_of(&first).await;
    let (hash, nonce) = (hash_of(&proposal), proposal["nonce"].as_i64().unwrap());
    // Once the follower has read the Safe's nonce: the Safe's next, unsigned.
    let view = d
        .until(&format!("/api/v1/proposals/{hash}"), "next", |p| {
            p["queue"]["kind"] == "next"
        })
        .await;
    assert_eq!(view["queue"]["label"], "next; needs 2 more signatures");
    assert_eq!(view["queue"]["safe_nonce"], nonce);
    assert!(d.sandbox.safe_service.holds(hash.parse::<B256>().unwrap()));

    d.cancel(&first).await;
    // The bridge, its proposer, deletes it from the service and ends it.
    let ended = d
        .until(&format!("/api/v1/proposals/{hash}"), "withdrawn", |p| {
            p["status"] == "failed"
        })
        .await;
    assert_eq!(ended["last_error"]["code"], "NO-REQUEST", "{ended}");
    assert!(!ended["serves_request"].as_bool().unwrap());
    assert!(
        ended["summary"]
            .as_str()
            .unwrap()
            .starts_with("withdrawn: it served no request"),
        "{ended}"
    );
    assert!(!d.sandbox.safe_service.holds(hash.parse::<B256>().unwrap()));

    // The next batch takes the freed nonce, and the owners can execute it.
    let second = d.queue("prod-3").await;
    let next = d.proposal_of(&second).await;
    assert_eq!(next["nonce"].as_i64(), Some(nonce), "{next}");
    let next_hash = hash_of(&next);
    assert_ne!(next_hash, hash);
    for owner in [0, 1] {
        let (status, body) = d.control(&next_hash, "sign", json!({"owner": owner})).await;
        assert_eq!(status, 200, "{body}");
    }
    d.until(&format!("/api/v1/proposals/{next_hash}"), "ready", |p| {
        p["queue"]["kind"] == "ready"
    })
    .await;
    let (status, body) = d.control(&next_hash, "execute", json!({})).await;
    assert_eq!(status, 200, "{body}");
    d.until(&format!("/api/v1/replicas/{second}"), "done", |r| {
        r["status"] == "done"
    })
    .await;
    d.sandbox.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_proposal_an_owner_signed_waits_for_a_rejection_and_what_stacks_behind_says_so()
{
    let d = QueueDriver::start().await;
    let first = d.queue("prod-2").await;
    let proposal = d.proposal_of(&first).await;
    let (hash, nonce) = (hash_of(&proposal), proposal["nonce"].as_i64().unwrap());
    let (status, body) = d.control(&hash, "sign", json!({"owner": 0})).await;
    assert_eq!(status, 200, "{body}");
    d.until(
        &format!("/api/v1/proposals/{hash}"),
        "one confirmation",
        |p| p["confirmations"] == 1,
    )
    .await;

    d.cancel(&first).await;
    // At once: it serves no request, and the owners read how to reject it.
    let orphan = d.proposal(&hash).await;
    assert!(!orphan["serves_request"].as_bool().unwrap(), "{orphan}");
    assert!(
        orphan["summary"]
            .as_str()
            .unwrap()
            .starts_with("serves no request"),
        "{orphan}"
    );
    assert!(
        orphan["advice"]
            .as_str()
            .unwrap()
            .contains("chooses Reject"),
        "{orphan}"
    );

    // A new batch stacks behind it, and says what blocks it.
    let second = d.queue("prod-3").await;
    let behind = d.proposal_of(&second).await;
    assert_eq!(behind["nonce"].as_i64(), Some(nonce + 1), "{behind}");
    let behind_hash = hash_of(&behind);
    for owner in [0, 1] {
        let (status, body) = d
            .control(&behind_hash, "sign", json!({"owner": owner}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let blocked = d
        .until(
            &format!("/api/v1/proposals/{behind_hash}"),
            "blocked with 2 of 2",
            |p| p["confirmations"] == 2 && p["queue"]["kind"] == "blocked",
        )
        .await;
    let label = blocked["queue"]["label"].as_str().unwrap();
    assert_eq!(
        label,
        format!(
            "blocked by nonce {nonce}: nonce {nonce} serves no request, and an owner must reject it in Safe{{Wallet}} first"
        )
    );
    assert!(
        !blocked["summary"].as_str().unwrap().contains("ready"),
        "{blocked}"
    );
    // The signed one was kept: the service still holds it.
    assert_eq!(d.proposal(&hash).await["status"], "proposed");
    assert!(d.sandbox.safe_service.holds(hash.parse::<B256>().unwrap()));
    // The team page lists them lowest nonce first, with the same words.
    let page = d.queue_page().await;
    let (at_first, at_behind) = (page.find(&hash).unwrap(), page.find(&behind_hash).unwrap());
    assert!(at_first < at_behind, "lowest nonce first");
    assert!(page.contains("serves no request"), "{page}");
    assert!(
        page.contains(&format!("blocked by nonce {nonce}")),
        "{page}"
    );
    // The sandbox's executor refuses in words.
    let (status, refused) = d.control(&behind_hash, "execute", json!({})).await;
    assert_eq!(status, 409);
    assert_eq!(refused["error"]["code"], "not_next");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("nonce {nonce} must go first")),
        "{refused}"
    );

    // Owner 1 rejects it as Safe{Wallet} does; owner 0 signs the rejection
    // and it executes: the nonce is used, and the batch behind is ready.
    let (status, rejection) = d.control(&hash, "reject", json!({"owner": 1})).await;
    assert_eq!(status, 200, "{rejection}");
    assert_eq!(rejection["nonce"].as_i64(), Some(nonce));
    let rejection_hash = rejection["safe_tx_hash"].as_str().unwrap().to_owned();
    let (status, body) = d
        .control(&rejection_hash, "sign", json!({"owner": 0}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = d.control(&rejection_hash, "execute", json!({})).await;
    assert_eq!(status, 200, "{body}");
    d.until(&format!("/api/v1/proposals/{behind_hash}"), "ready", |p| {
        p["queue"]["kind"] == "ready"
    })
    .await;
    // At confirmed depth, the follower sees its nonce used by the rejection.
    d.until(&format!("/api/v1/proposals/{hash}"), "replaced", |p| {
        p["status"] == "replaced"
    })
    .await;
    let (status, body) = d.control(&behind_hash, "execute", json!({})).await;
    assert_eq!(status, 200, "{body}");
    d.until(&format!("/api/v1/replicas/{second}"), "done", |r| {
        r["status"] == "done"
    })
    .await;
    d.sandbox.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_call_says_how_the_bridge_tied_it_to_the_order() {
    let d = QueueDriver::start().await;
    // A node named by the order.
    let named = d.queue("prod-3").await;
    let proposal = d.proposal_of(&named).await;
    assert_eq!(proposal["calls"][0]["function"], "addDevice");
    assert_eq!(
        proposal["calls"][0]["checked"],
        "device of node prod-3, named by the order"
    );
    // "Auto" for the canary, whose compose hash the app no longer allows:
    // the hash intake pinned from the source. (The simulator places it on
    // its source's node, whose device the app allows: no addDevice here.)
    let response = d
        .http
        .post(d.url("/api/v1/replicas"))
        .bearer_auth(TOKEN)
        .json(&json!({"source": "api-canary"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let queued: Value = response.json().await.unwrap();
    let auto = queued["replicas"][0]["id"].as_str().unwrap().to_owned();
    let proposal = d.proposal_of(&auto).await;
    let request = d.get(&format!("/api/v1/replicas/{auto}")).await;
    let queued_at: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(request["created_at"].clone()).unwrap();
    let calls = proposal["calls"].as_array().unwrap();
    let hash = calls
        .iter()
        .find(|c| c["function"] == "addComposeHash")
        .unwrap_or_else(|| panic!("{proposal}"));
    assert_eq!(
        hash["checked"],
        format!(
            "hash of api-canary as queued at {}",
            queued_at.format("%H:%M UTC")
        )
    );
    d.sandbox.stop().await.unwrap();
}
