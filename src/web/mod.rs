//! HTTP: the JSON API, the CI webhook and the pages. Handlers stay thin and
//! call into the domain and the store.

pub mod access;
mod auth;
pub mod error;
pub mod intake;
mod pages;
mod replicas;
pub mod signers;
mod views;
pub mod webhook;

use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request};
use axum::routing::{get, post};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use access::Access;
pub use auth::ApiTokens;
pub use webhook::WebhookSecrets;

use crate::clock::Clock;
use crate::phala::{EnvKeyVerifier, PhalaClient};
use crate::store::Store;

/// Everything a handler may use.
#[derive(Clone, Debug)]
pub struct AppState {
    pub store: Store,
    pub phala: PhalaClient,
    pub clock: Clock,
    pub api_tokens: ApiTokens,
    pub webhook_secrets: WebhookSecrets,
    /// Each caller's scope and quota.
    pub access: Access,
    /// Checks an app's env key against its KMS root key on chain.
    pub env_keys: EnvKeyVerifier,
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/replicas", post(replicas::create).get(replicas::list))
        .route("/replicas/{id}", get(replicas::show))
        .route("/replicas/{id}/cancel", post(replicas::cancel))
        .route("/proposals", get(signers::list))
        .route("/proposals/{id}", get(signers::show));

    Router::new()
        .route("/", get(pages::index))
        .route("/health", get(pages::health))
        .nest("/api/v1", api)
        .route("/webhooks/ci", post(webhook::ci_webhook))
        .route("/static/style.css", get(pages::stylesheet))
        .fallback(pages::not_found)
        .layer(DefaultBodyLimit::max(intake::MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(axum::http::StatusCode::GATEWAY_TIMEOUT, Duration::from_secs(90)))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
            let request_id = request.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("");
            tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), request_id)
        }))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}
