//! Client of the Phala Cloud API (see the reference's phala-cloud-api.md).
//!
//! One concrete client: tests point it at wiremock or the sandbox simulator,
//! so no trait is needed to swap it.

mod envcrypt;
pub mod errors;
mod lookups;
mod resolve;
mod types;
pub mod verify;

use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use envcrypt::{EnvCryptError, encrypt_env};
pub use errors::{ApiError, PhalaError};
pub use lookups::Lookups;
pub use resolve::{
    EnvKey, EnvKeyIssuer, ResolveError, ResolvedNode, ResolvedSource, node_with_device, pick_node,
};
pub use types::{
    AvailableNode, AvailableNodes, CvmInfo, CvmPage, CvmStatus, EnvPubkey, KmsInfo, OnchainStatus,
    PrepareOutcome, PreparedReplica, ReplicaSpec, ReplicaVm,
};
pub use verify::{EnvKeyError, EnvKeyVerifier, ExpectedReplica, PrepareMismatch, check_prepared};

use crate::config::PhalaSettings;
use crate::domain::{AppId, Bytes32};

/// The status Phala uses for "prepared: registrations needed, here is the commit token".
const PREPARED_STATUS: u16 = 465;

#[derive(Clone)]
pub struct PhalaClient {
    http: reqwest::Client,
    base: Url,
    api_key: SecretString,
    api_version: String,
}

impl std::fmt::Debug for PhalaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhalaClient")
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

impl PhalaClient {
    pub fn new(settings: &PhalaSettings) -> anyhow::Result<Self> {
        Self::with_timeout(settings, settings.timeout())
    }

    pub fn with_timeout(settings: &PhalaSettings, timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("approval-bridge/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(PhalaClient {
            http,
            base: settings.phala_api_url.clone(),
            api_key: settings.phala_api_key.clone(),
            api_version: settings.phala_api_version.clone(),
        })
    }

    /// `GET /cvms/{id}`; `id` is a UUID without dashes, `app_<hex>` or a name.
    pub async fn get_cvm(&self, id: &str) -> Result<CvmInfo, PhalaError> {
        self.get_json(&["cvms", id]).await
    }

    /// `GET /apps/{app_id}/cvms`: every instance of an app.
    pub async fn app_cvms(&self, app_id: &str) -> Result<Vec<CvmInfo>, PhalaError> {
        self.get_json(&["apps", app_id, "cvms"]).await
    }

    /// `GET /cvms/paginated`: the workspace's CVMs, every page of 100 (at
    /// most [`Self::MAX_PAGES`] of them).
    pub async fn list_cvms(&self) -> Result<Vec<CvmInfo>, PhalaError> {
        let mut cvms = Vec::new();
        for number in 1..=Self::MAX_PAGES {
            let request = self.request_with_query(
                Method::GET,
                &["cvms", "paginated"],
                &[("page", &number.to_string()), ("page_size", "100")],
            );
            let page: CvmPage = self.expect_json(request).await?;
            let last = page.items.is_empty() || page.pages.is_none_or(|pages| number >= pages);
            cvms.extend(page.items);
            if last {
                break;
            }
        }
        Ok(cvms)
    }

    /// A bound on the pages one listing reads: 10,000 CVMs.
    const MAX_PAGES: u32 = 100;

    /// `POST /status/batch`: the status of many CVMs in one call, keyed by
    /// the ids as sent. A CVM Phala does not know is left out of the map.
    pub async fn status_batch(
        &self,
        vm_uuids: &[String],
    ) -> Result<std::collections::HashMap<String, CvmStatus>, PhalaError> {
        let request = self
            .request(Method::POST, &["status", "batch"])
            .json(&serde_json::json!({ "vm_uuids": vm_uuids }));
        self.expect_json(request).await
    }

    /// `GET /teepods/available`.
    pub async fn available_nodes(&self) -> Result<AvailableNodes, PhalaError> {
        self.get_json(&["teepods", "available"]).await
    }

    /// `GET /kms/{kms_type}/pubkey/{app_id}`: the key that encrypts env for an on-chain KMS app.
    pub async fn env_pubkey(
        &self,
        kms_type: &str,
        app_id: &AppId,
    ) -> Result<EnvPubkey, PhalaError> {
        let app = hex::encode(app_id.0);
        self.get_json(&["kms", kms_type, "pubkey", &app]).await
    }

    /// Prepare-only replica: Phala answers 465 with a commit token and the
    /// registrations the DstackApp must allow first.
    pub async fn prepare_replica(
        &self,
        source_vm_uuid: &str,
        spec: &ReplicaSpec,
    ) -> Result<PrepareOutcome, PhalaError> {
        let request = self
            .request(Method::POST, &["cvms", source_vm_uuid, "replicas"])
            .header("X-Prepare-Only", "true")
            .json(&spec.body());
        let (status, body) = self.send(request).await?;
        match status.as_u16() {
            PREPARED_STATUS => parse_prepared(&body).map(PrepareOutcome::Prepared),
            s if (200..300).contains(&s) => decode::<ReplicaVm>(&body).map(PrepareOutcome::Created),
            s => Err(PhalaError::Api(errors::parse_error(s, &body))),
        }
    }

    /// Creates the replica at once. Only for sources without on-chain KMS.
    /// Not idempotent: every successful call creates a CVM.
    pub async fn create_replica(
        &self,
        source_vm_uuid: &str,
        spec: &ReplicaSpec,
    ) -> Result<ReplicaVm, PhalaError> {
        let request = self
            .request(Method::POST, &["cvms", source_vm_uuid, "replicas"])
            .json(&spec.body());
        self.expect_json(request).await
    }

    /// `POST /cvms/{source}/commit-replica` with the token from the prepare.
    /// `transaction_hash` is the registering tx hash or `already-registered`.
    pub async fn commit_replica(
        &self,
        source_vm_uuid: &str,
        token: &SecretString,
        compose_hash: &Bytes32,
        transaction_hash: &str,
    ) -> Result<ReplicaVm, PhalaError> {
        let body = serde_json::json!({
            "token": token.expose_secret(),
            "compose_hash": compose_hash.bare_hex(),
            "transaction_hash": transaction_hash,
        });
        let request = self
            .request(Method::POST, &["cvms", source_vm_uuid, "commit-replica"])
            .json(&body);
        self.expect_json(request).await
    }

    fn request(&self, method: Method, segments: &[&str]) -> reqwest::RequestBuilder {
        self.request_with_query(method, segments, &[])
    }

    fn request_with_query(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> reqwest::RequestBuilder {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("an http(s) base URL has path segments")
            .pop_if_empty()
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        self.http
            .request(method, url)
            .header("X-API-Key", self.api_key.expose_secret())
            .header("X-Phala-Version", &self.api_version)
    }

    async fn get_json<T: DeserializeOwned>(&self, segments: &[&str]) -> Result<T, PhalaError> {
        self.expect_json(self.request(Method::GET, segments)).await
    }

    async fn expect_json<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, PhalaError> {
        let (status, body) = self.send(request).await?;
        if status.is_success() {
            decode(&body)
        } else {
            Err(PhalaError::Api(errors::parse_error(status.as_u16(), &body)))
        }
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Vec<u8>), PhalaError> {
        let result: Result<(StatusCode, Vec<u8>), PhalaError> = async {
            let response = request.send().await.map_err(transport_error)?;
            let status = response.status();
            let body = response.bytes().await.map_err(transport_error)?;
            Ok((status, body.to_vec()))
        }
        .await;
        crate::metrics::record_call(
            "phala",
            match &result {
                Ok((status, body))
                    if status.as_u16() >= 400 && status.as_u16() != PREPARED_STATUS =>
                {
                    Err(PhalaError::Api(errors::parse_error(status.as_u16(), body)).stored_code())
                }
                Ok(_) => Ok(()),
                Err(err) => Err(err.stored_code()),
            },
        );
        result
    }
}

fn transport_error(err: reqwest::Error) -> PhalaError {
    // `without_url`: the URL is safe, but keep messages short and uniform.
    PhalaError::Transport {
        timed_out: err.is_timeout(),
        message: err.without_url().to_string(),
    }
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, PhalaError> {
    serde_json::from_slice(body).map_err(|err| PhalaError::InvalidResponse(err.to_string()))
}

/// Reads the 465 envelope (nested under `detail` or at the top level) into a
/// checked [`PreparedReplica`].
fn parse_prepared(body: &[u8]) -> Result<PreparedReplica, PhalaError> {
    let json: Value = decode(body)?;
    let envelope = errors::structured_envelope(&json)
        .ok_or_else(|| PhalaError::InvalidResponse("HTTP 465 without the error envelope".into()))?;
    let details = envelope
        .get("details")
        .and_then(Value::as_array)
        .ok_or_else(|| PhalaError::InvalidResponse("HTTP 465 without `details`".into()))?;
    let field = |name: &str| {
        details
            .iter()
            .find(|d| d.get("field").and_then(Value::as_str) == Some(name))
            .and_then(|d| d.get("value"))
            .filter(|v| !v.is_null())
    };
    let text = |name: &str| -> Result<&str, PhalaError> {
        field(name)
            .and_then(Value::as_str)
            .ok_or_else(|| PhalaError::InvalidResponse(format!("HTTP 465 without `{name}`")))
    };

    let compose_hash = text("compose_hash")?
        .parse::<Bytes32>()
        .map_err(|err| PhalaError::InvalidResponse(format!("compose_hash: {err}")))?;
    let app_id = text("app_id")?
        .parse::<AppId>()
        .map_err(|err| PhalaError::InvalidResponse(format!("app_id: {err}")))?;
    let device_id = field("device_id")
        .map(|v| {
            v.as_str()
                .ok_or_else(|| PhalaError::InvalidResponse("device_id is not a string".into()))?
                .parse::<Bytes32>()
                .map_err(|err| PhalaError::InvalidResponse(format!("device_id: {err}")))
        })
        .transpose()?;
    let commit_token = SecretString::from(text("commit_token")?.to_owned());
    let onchain = field("onchain_status")
        .map(|v| serde_json::from_value::<OnchainStatus>(v.clone()))
        .transpose()
        .map_err(|err| PhalaError::InvalidResponse(format!("onchain_status: {err}")))?
        .unwrap_or_default();
    let chain_id = field("kms_info")
        .and_then(|k| k.get("chain_id"))
        .and_then(Value::as_u64);

    Ok(PreparedReplica {
        compose_hash,
        app_id,
        device_id,
        commit_token,
        onchain,
        chain_id,
    })
}
