//! Probes for orchestrators: `/healthz` (the process answers) and `/readyz`
//! (it can do its work: the database answers with the current schema, every
//! configured chain's RPC answers for the chain it is configured for, and
//! none of its background tasks stopped).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::chain::{ChainClient, Chains};
use crate::config::SafeSettings;
use crate::telemetry::redact;
use crate::web::AppState;
use crate::web::error::ApiError;

/// One probe may not hold the answer longer than this: an RPC that does not
/// answer fails readiness rather than hanging the orchestrator's probe.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// What `/readyz` checks besides the database.
#[derive(Clone, Debug)]
pub struct Readiness {
    chains: Vec<ChainClient>,
    shutdown: CancellationToken,
    /// Why a background task (workers, planners, followers, tracker,
    /// notifier) stopped while the process was not shutting down.
    stopped: Arc<Mutex<Option<String>>>,
}

impl Readiness {
    /// Every chain with its own RPC URL, and every Safe's chain (which may use
    /// `ETH_RPC_URL`). Once `shutdown` is cancelled the process is not ready.
    pub fn new(safe: &SafeSettings, shutdown: CancellationToken) -> Self {
        let all = Chains::new(&safe.rpc_urls.0, safe.eth_rpc_url.clone());
        Readiness {
            chains: safe
                .configured_chain_ids()
                .into_iter()
                .filter_map(|id| all.get(id))
                .collect(),
            shutdown,
            stopped: Arc::default(),
        }
    }

    /// A background task stopped: the process no longer does its work, so it
    /// is not ready from now on (the process then exits; see `startup`).
    pub fn task_stopped(&self, why: impl Into<String>) {
        let mut stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        stopped.get_or_insert_with(|| why.into());
    }

    fn stopped(&self) -> Option<String> {
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Lets a request through to `/metrics` or `/readyz` only with
/// `Authorization: Bearer <APPROVAL_BRIDGE_OPS_TOKEN>`, when that is set.
pub async fn require_ops_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = &state.ops_token {
        let presented = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if presented.and_then(|p| token.verify(p)).is_none() {
            return ApiError::unauthorized(
                "this endpoint needs `Authorization: Bearer <APPROVAL_BRIDGE_OPS_TOKEN>`",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// `/healthz`: `{"status": "ok"}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
}

/// `/readyz`: `ok` or `unavailable`, with every check.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    pub status: String,
    pub checks: Vec<Check>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Check {
    /// `database`, `migrations`, `chain:<id>`, `tasks` or `shutdown`.
    pub name: String,
    pub ok: bool,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Check {
    fn new(name: impl Into<String>, result: Result<(), String>) -> Check {
        let (ok, message) = match result {
            Ok(()) => (true, None),
            Err(message) => (false, Some(redact(&message).into_owned())),
        };
        Check {
            name: name.into(),
            ok,
            message,
        }
    }
}

/// `GET /healthz`: the process is up and serving HTTP.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "the process is up", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// `GET /health`, kept for older probes: `/healthz` and a database that answers.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses(
        (status = 200, description = "up, and the database answers", body = Health),
        (status = 503, description = "the database does not answer", body = Health),
    ))]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    match state.store.ping().await {
        Ok(_) => (
            StatusCode::OK,
            Json(Health {
                status: "ok".into(),
            }),
        ),
        Err(err) => {
            tracing::warn!(error = %err, "health check: database unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(Health {
                    status: "database unreachable".into(),
                }),
            )
        }
    }
}

/// `GET /readyz`: 200 when every check passes, else 503 naming the failures.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "ready: every check passed", body = Ready),
        (status = 503, description = "not ready; the failed checks say why", body = Ready),
    ))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Ready>) {
    let readiness = &state.readiness;
    let mut checks = Vec::new();
    if let Some(why) = readiness.stopped() {
        checks.push(Check::new("tasks", Err(why)));
    }
    if readiness.shutdown.is_cancelled() {
        checks.push(Check::new(
            "shutdown",
            Err("the process is shutting down".into()),
        ));
    }
    let database = bounded(async {
        state
            .store
            .ping()
            .await
            .map_err(|err| format!("the database does not answer: {err}"))
    })
    .await;
    let database_ok = database.is_ok();
    checks.push(Check::new("database", database));
    if database_ok {
        let migrations = bounded(async {
            match state.store.pending_migrations().await {
                Ok(pending) if pending.is_empty() => Ok(()),
                Ok(pending) => Err(format!(
                    "migrations not applied: {pending:?}; run `approval-bridge migrate`"
                )),
                Err(err) => Err(format!("cannot read the applied migrations: {err}")),
            }
        })
        .await;
        checks.push(Check::new("migrations", migrations));
    }
    for chain in &readiness.chains {
        let result = bounded(async {
            chain
                .check_chain_id()
                .await
                .map_err(|err| format!("{err:#}"))
        })
        .await;
        checks.push(Check::new(format!("chain:{}", chain.chain_id()), result));
    }
    let ready = checks.iter().all(|c| c.ok);
    for failed in checks.iter().filter(|c| !c.ok) {
        tracing::warn!(check = %failed.name, message = failed.message.as_deref().unwrap_or(""), "not ready");
    }
    let (status, word) = if ready {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    (
        status,
        Json(Ready {
            status: word.into(),
            checks,
        }),
    )
}

async fn bounded(check: impl Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())))
}
