//! Queuing replicas: the part shared by the JSON API, the CI webhook and the
//! page. An order is validated, resolved against Phala Cloud (source, node,
//! env), checked against the caller's scope and quota, and its env key
//! verified before anything is stored, so bad input changes nothing. The
//! quota is looked at before any call to Phala or the chain, so a caller
//! over it costs neither.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use uuid::Uuid;

use crate::domain::{Actor, Bytes32, InvalidOrder, NodeRef, ReplicaOrder};
use crate::phala::{EnvKeyError, PhalaError, ResolveError, ResolvedSource, encrypt_env};
use crate::store::{
    IdempotencyKey, IdempotencyOutcome, LostCommit, NewRequest, Order, QuotaUsed, ReplicaRequest,
    Stored, StoredResponse, Trouble,
};
use crate::views::requests as views;
use crate::web::AppState;
use crate::web::api::order_writer::WriteError;
use crate::web::error::ApiError;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// The raw body, refused with a JSON error when it is over [`MAX_BODY_BYTES`].
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        format!("the body is larger than {} KiB", MAX_BODY_BYTES / 1024),
                    )
                } else {
                    ApiError::bad_request("unreadable_body", rejection.body_text())
                }
            })
    }
}

/// The `Idempotency-Key` header, if any: 1–255 visible ASCII characters.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    let key = value.to_str().unwrap_or_default().trim();
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::bad_request(
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        ));
    }
    Ok(Some(key.to_owned()))
}

/// Validates, resolves and stores an order; answers 202 with the new requests.
pub async fn submit(
    state: &AppState,
    actor: Actor,
    idempotency_key: Option<String>,
    body: &[u8],
) -> Result<Response, ApiError> {
    queue(state, actor, idempotency_key, body)
        .await
        .map(stored_response)
}

/// [`submit`] for callers that render the answer themselves (the page).
pub async fn queue(
    state: &AppState,
    actor: Actor,
    idempotency_key: Option<String>,
    body: &[u8],
) -> Result<StoredResponse, ApiError> {
    let order = ReplicaOrder::from_json(body).map_err(invalid_order)?;
    let principal = actor.label();
    state.access.check_may_queue(&principal)?;
    // Same meaning, same hash: key order and whitespace do not matter. Keyed,
    // so the hash at rest reveals nothing of the env values.
    let canonical: Value = serde_json::from_slice(body).expect("parsed above");
    let request_hash = state.request_hasher.hash(canonical.to_string().as_bytes());

    let now = state.clock.now();
    let keys_expired_before = now - state.retention.idempotency_key_ttl();
    if let Some(key) = &idempotency_key
        && let Some(earlier) = state
            .store
            .idempotent_response(&principal, key, &request_hash, keys_expired_before)
            .await
            .map_err(database_error)?
    {
        return replay(earlier);
    }

    // The quota before any call out (Phala, the chain): an order that fits
    // no kind of KMS is refused before Phala is asked anything, and one that
    // does not fit its source's kind before the node, the env key and the
    // chain. A look without the caller's lock; the order writer's count
    // under it decides.
    let look = QuotaLook {
        principal: &principal,
        used: state
            .store
            .quota_used(&principal, now)
            .await
            .map_err(database_error)?,
        wanted: order.count,
        now,
    };
    look.check_any(state).await?;
    let rows = resolve(state, &principal, &order, &look).await?;
    let onchain_kms = rows[0].onchain_kms;
    let limit = state.access.quota(&principal, onchain_kms);
    let count = rows.len();
    let stored = state
        .orders
        .store(Order {
            actor,
            requests: rows,
            limit,
            idempotency: idempotency_key.map(|key| IdempotencyKey { key, request_hash }),
        })
        .await
        .map_err(write_error)?;
    match stored {
        Stored::Created(response) => {
            tracing::info!(actor = %principal, count, source = %order.source, "replicas queued");
            Ok(response)
        }
        Stored::Earlier(earlier) => replay(earlier),
        Stored::OverQuota { used, retry_after } => Err(quota_exceeded(
            &principal,
            onchain_kms,
            order.count,
            limit,
            used,
            retry_after,
        )),
    }
}

/// An order's answer: its stored requests, as the API shows them.
pub fn answer(created: &[ReplicaRequest]) -> anyhow::Result<StoredResponse> {
    Ok(StoredResponse {
        status: StatusCode::ACCEPTED.as_u16(),
        body: serde_json::to_value(views::ReplicaList {
            replicas: created
                .iter()
                .map(|r| views::replica(r, &views::Proposals::new()))
                .collect(),
        })?,
    })
}

fn replay(earlier: IdempotencyOutcome) -> Result<StoredResponse, ApiError> {
    match earlier {
        IdempotencyOutcome::Replay(response) => Ok(response),
        IdempotencyOutcome::Mismatch => Err(ApiError::unprocessable(
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different body",
        )),
    }
}

fn stored_response(response: StoredResponse) -> Response {
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::ACCEPTED);
    (status, Json(response.body)).into_response()
}

/// The database's trouble is named (503: retry later); anything else is ours.
fn write_error(err: WriteError) -> ApiError {
    match err {
        WriteError::Database { trouble, message } => {
            tracing::warn!(error = %message, "an order was not stored");
            database_trouble(trouble)
        }
        WriteError::LostCommit(lost @ LostCommit::NotStored) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            format!("{lost}; retry later"),
        ),
        WriteError::LostCommit(lost @ LostCommit::Unknown(_)) => {
            tracing::warn!(error = %lost, "an order's outcome is unknown");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "order_outcome_unknown",
                "the connection to the database broke while the order was committed, and \
                 whether it was stored is not known yet; send it again with the same \
                 Idempotency-Key, or look for its requests before queuing it again",
            )
        }
        WriteError::Other(message) => ApiError::Internal(anyhow::anyhow!(message)),
    }
}

fn database_error(err: sqlx::Error) -> ApiError {
    match Trouble::of_sqlx(&err) {
        Some(trouble) => database_trouble(trouble),
        None => err.into(),
    }
}

fn database_trouble(trouble: Trouble) -> ApiError {
    let (code, cause) = match trouble {
        Trouble::LockTimeout => (
            "database_busy",
            "another transaction held a lock this order needs (its caller's quota lock) \
             past the database's lock timeout",
        ),
        Trouble::StatementTimeout => (
            "database_timeout",
            "a database statement ran past the database's statement timeout",
        ),
        Trouble::Unavailable => ("database_unavailable", "the database cannot be reached"),
    };
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        code,
        format!("{cause}; nothing was stored; retry later"),
    )
}

fn invalid_order(err: InvalidOrder) -> ApiError {
    match err {
        InvalidOrder::Syntax(_) => ApiError::bad_request("malformed_json", err.to_string()),
        InvalidOrder::Shape(_) => ApiError::unprocessable("invalid_body", err.to_string()),
        InvalidOrder::Field { .. } => ApiError::unprocessable("invalid_field", err.to_string()),
    }
}

/// A caller's quota as intake sees it before calling out: its hour, read
/// once, and the order's size.
struct QuotaLook<'a> {
    principal: &'a str,
    used: QuotaUsed,
    wanted: u32,
    now: chrono::DateTime<chrono::Utc>,
}

impl QuotaLook<'_> {
    /// `None` when the order fits the caller's quota for the kind of KMS;
    /// else the quota and how long until it would fit.
    async fn wait(
        &self,
        state: &AppState,
        onchain_kms: bool,
    ) -> Result<Option<(u32, chrono::Duration)>, ApiError> {
        let limit = state.access.quota(self.principal, onchain_kms);
        let used = self.used.of(onchain_kms);
        if used + i64::from(self.wanted) <= i64::from(limit) {
            return Ok(None);
        }
        let wait = state
            .store
            .quota_wait(
                self.principal,
                onchain_kms,
                used,
                self.wanted,
                limit,
                self.now,
            )
            .await
            .map_err(database_error)?;
        Ok(wait.map(|wait| (limit, wait)))
    }

    /// Refuses the order if it fits neither kind of KMS: whatever its source,
    /// it would be refused.
    async fn check_any(&self, state: &AppState) -> Result<(), ApiError> {
        let Some((onchain_limit, onchain_wait)) = self.wait(state, true).await? else {
            return Ok(());
        };
        let Some((cloud_limit, cloud_wait)) = self.wait(state, false).await? else {
            return Ok(());
        };
        let (principal, wanted) = (self.principal, self.wanted);
        let retry_after_secs = whole_seconds(onchain_wait.min(cloud_wait));
        let message = if wanted > onchain_limit && wanted > cloud_limit {
            format!(
                "`{principal}` may queue {onchain_limit} replicas of sources on on-chain KMS and \
                 {cloud_limit} of Cloud-KMS sources per hour, and this asks for {wanted}; ask for fewer"
            )
        } else {
            format!(
                "`{principal}` has queued {} of its {onchain_limit} replicas of sources on on-chain \
                 KMS and {} of its {cloud_limit} of Cloud-KMS sources in the last hour; {wanted} more \
                 fit in {retry_after_secs} s at the earliest",
                self.used.onchain, self.used.cloud
            )
        };
        Err(ApiError::RateLimited {
            message,
            retry_after_secs,
        })
    }

    /// Refuses the order if it does not fit the quota of its source's kind.
    async fn check(&self, state: &AppState, onchain_kms: bool) -> Result<(), ApiError> {
        match self.wait(state, onchain_kms).await? {
            None => Ok(()),
            Some((limit, wait)) => Err(quota_exceeded(
                self.principal,
                onchain_kms,
                self.wanted,
                limit,
                self.used.of(onchain_kms),
                wait,
            )),
        }
    }
}

/// Whole seconds, rounded up: retrying at once after them must succeed.
fn whole_seconds(wait: chrono::Duration) -> u64 {
    let whole = wait.num_seconds();
    let rounded = if wait > chrono::Duration::seconds(whole) {
        whole + 1
    } else {
        whole
    };
    rounded.max(1) as u64
}

fn quota_exceeded(
    principal: &str,
    onchain_kms: bool,
    wanted: u32,
    limit: u32,
    used: i64,
    retry_after: chrono::Duration,
) -> ApiError {
    let kind = if onchain_kms {
        "sources on on-chain KMS"
    } else {
        "Cloud-KMS sources"
    };
    let retry_after_secs = whole_seconds(retry_after);
    let message = if i64::from(wanted) > i64::from(limit) {
        format!(
            "`{principal}` may queue {limit} replicas of {kind} per hour, and this asks for {wanted}; ask for fewer"
        )
    } else {
        format!(
            "`{principal}` has queued {used} of its {limit} replicas of {kind} in the last hour; {wanted} more fit in {retry_after_secs} s"
        )
    };
    ApiError::RateLimited {
        message,
        retry_after_secs,
    }
}

/// Resolves the source, node and env with Phala, checks the source against
/// the caller's scope and the quota of its kind of KMS, and builds one row
/// per replica.
async fn resolve(
    state: &AppState,
    principal: &str,
    order: &ReplicaOrder,
    quota: &QuotaLook<'_>,
) -> Result<Vec<NewRequest>, ApiError> {
    let source = state
        .lookups
        .resolve_source(&order.source, order.compose_hash.as_ref())
        .await
        .map_err(resolve_error)?;
    state.access.check_scope(principal, &source)?;
    quota.check(state, source.cvm.is_onchain_kms()).await?;
    let node = match &order.node {
        Some(node) => Some(
            state
                .lookups
                .resolve_node(node)
                .await
                .map_err(resolve_error)?,
        ),
        None => None,
    };
    let encrypted_env = if order.env.is_empty() {
        None
    } else {
        Some(encrypt_env_for(state, &source, &order.env).await?)
    };
    // The device the prepare's answer must name; a malformed one cannot be compared.
    let expected_device_id = node
        .as_ref()
        .and_then(|n| n.device_id.as_deref())
        .and_then(|d| d.parse::<Bytes32>().ok())
        .map(|d| d.to_string());
    let node_label = order.node.as_ref().map(|n| match n {
        NodeRef::Id(id) => id.to_string(),
        NodeRef::Name(name) => name.clone(),
    });
    let row = NewRequest {
        id: Uuid::nil(),
        source: order.source.clone(),
        node: node_label,
        requested_compose_hash: pinned_compose_hash(order, &source),
        env_names: order.env.keys().cloned().collect(),
        note: order.note.clone(),
        encrypted_env,
        source_vm_uuid: source.vm_uuid.clone(),
        source_name: source.cvm.name.clone(),
        node_id: node.as_ref().map(|n| n.id as i32),
        node_name: node.as_ref().map(|n| n.name.clone()),
        kms_type: source.cvm.kms_type.clone(),
        onchain_kms: source.cvm.is_onchain_kms(),
        app_id: source.app_id().map(|a| a.to_string()),
        chain_id: source.cvm.chain_id().map(|c| c as i64),
        workspace_slug: source.cvm.workspace.as_ref().and_then(|w| w.slug.clone()),
        expected_device_id,
        http_request_id: crate::web::middleware::request_id::current(),
    };
    Ok((0..order.count)
        .map(|_| NewRequest {
            id: Uuid::now_v7(),
            ..row.clone()
        })
        .collect())
}

/// The compose hash the prepare asks for and its answer must name: the
/// caller's, or else the source's own as intake reads it now. Otherwise
/// Phala's answer (or whoever updates the source during the batch window)
/// would choose what the Safe's owners are asked to allow.
fn pinned_compose_hash(order: &ReplicaOrder, source: &ResolvedSource) -> Option<String> {
    let own = || {
        source
            .cvm
            .compose_hash
            .as_deref()
            .and_then(|h| h.parse::<Bytes32>().ok())
    };
    order
        .compose_hash
        .or_else(|| source.cvm.is_onchain_kms().then(own).flatten())
        .map(|h| h.to_string())
}

/// Encrypts the env for the app's key once the key is verified (see
/// [`crate::phala::EnvKeyVerifier`]); a key that fails is refused.
async fn encrypt_env_for(
    state: &AppState,
    source: &ResolvedSource,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<String, ApiError> {
    let key = state
        .phala
        .env_key_for(source, env)
        .await
        .map_err(resolve_error)?;
    state.env_keys.check(&key).await.map_err(|err| match err {
        EnvKeyError::Chain { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "chain_unavailable",
            format!("{err}; retry later"),
        ),
        err => ApiError::unprocessable(
            "env_key_unverified",
            format!("{err}; the env was not encrypted and nothing was stored"),
        ),
    })?;
    encrypt_env(&key.public_key, env)
        .map_err(|err| phala_unavailable(PhalaError::InvalidResponse(err.to_string())))
}

fn resolve_error(err: ResolveError) -> ApiError {
    match err {
        ResolveError::UnknownSource(_) => {
            ApiError::unprocessable("unknown_source", err.to_string())
        }
        ResolveError::AmbiguousSource(_) => {
            ApiError::unprocessable("ambiguous_source", err.to_string())
        }
        ResolveError::UnknownNode(_) => ApiError::unprocessable("unknown_node", err.to_string()),
        ResolveError::AmbiguousNode { .. } => {
            ApiError::unprocessable("ambiguous_node", err.to_string())
        }
        ResolveError::EnvNotAllowed { .. } => {
            ApiError::unprocessable("env_not_allowed", err.to_string())
        }
        ResolveError::Phala(err) => phala_unavailable(err),
    }
}

/// Phala's answer during intake: a 4xx about the order is the caller's to fix
/// (422); 503 when the trouble may pass (retry the call); 502 when Phala
/// refuses the bridge itself or answers nonsense.
fn phala_unavailable(err: PhalaError) -> ApiError {
    let status = err.status().unwrap_or(0);
    if err.is_transient() {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "phala_unavailable",
            format!("{err}; retry later"),
        )
    } else if (400..500).contains(&status) && status != 401 && status != 403 {
        let suggestion = err
            .suggestion()
            .map(|s| format!(" {s}"))
            .unwrap_or_default();
        ApiError::unprocessable("phala_rejected", format!("{err}.{suggestion}"))
    } else {
        ApiError::new(StatusCode::BAD_GATEWAY, "phala_error", err.to_string())
    }
}
