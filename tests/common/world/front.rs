//! The sandbox's public HTTP interface as the signers' tests use it: the
//! API with the sandbox's token, and the sandbox's Safe controls.

use std::time::Duration;

use approval_bridge::sandbox::{Sandbox, SandboxOptions};
use serde_json::Value;

use crate::common::helpers::sandbox_database;
use crate::common::wait;

const TOKEN: &str = "signers-token-123";

pub struct Front {
    pub sandbox: Sandbox,
    pub http: reqwest::Client,
}

impl Front {
    pub async fn start(world_only: bool) -> Front {
        let options = SandboxOptions {
            port: 0,
            block_time: 1,
            api_token: TOKEN.into(),
            database_url: Some(sandbox_database()),
            batch_window_secs: 1,
            confirmations: 1,
            boot_delay: Duration::ZERO,
            world_only,
            ..SandboxOptions::default()
        };
        Front {
            sandbox: Sandbox::start(options).await.expect("the sandbox starts"),
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.sandbox.url, path.trim_start_matches('/'))
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.get(path).await;
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }

    pub async fn queue(&self, body: Value) -> String {
        let response = self
            .http
            .post(self.url("/api/v1/replicas"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        body["replicas"][0]["id"].as_str().unwrap().to_owned()
    }

    /// Polls the replica until `status` (bounded: the test fails, it never hangs).
    pub async fn wait_for(&self, id: &str, status: &str) -> Value {
        let path = format!("/api/v1/replicas/{id}");
        let read = || self.get_json(&path);
        wait::until(status, read, |last| {
            assert!(
                last["status"] != "failed" || status == "failed",
                "the request failed: {last}"
            );
            last["status"] == status
        })
        .await
    }

    /// Polls the proposal until `done` says yes.
    pub async fn proposal_until(
        &self,
        id: &str,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let path = format!("/api/v1/proposals/{id}");
        let read = || self.get_json(&path);
        wait::until(what, read, done).await
    }

    pub async fn control(&self, hash: &str, action: &str, body: Value) {
        let response = self
            .http
            .post(self.url(&format!("/sandbox/safe/{hash}/{action}")))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{action}: {}",
            response.status()
        );
    }
}
