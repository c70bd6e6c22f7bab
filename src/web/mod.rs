//! HTTP, split by audience: `api` (the JSON API, the CI webhook, the OpenAPI
//! description), `pages` (the team page), `auth` (API tokens, Sign-In with
//! Ethereum, the proxy's users, CSRF, scopes and quotas), `middleware` (request
//! ids, rate limits, security headers and same-origin checks) and `ops`
//! (health, readiness and metrics). Handlers stay thin and call into the
//! read models (`views`), the domain and the store.

pub mod api;
pub mod auth;
pub mod error;
pub mod middleware;
pub mod ops;
mod pages;
pub mod server;

use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::Request;
use axum::routing::{get, post};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use api::{OrderWriter, WebhookSecrets, intake, openapi, webhook};
pub use auth::{Access, ApiTokens, PageAuth, access, signin};
pub use middleware::{ClientLimiter, check_same_origin};
pub use ops::health;

use crate::clock::Clock;
use crate::phala::{EnvKeyVerifier, Lookups, PhalaClient};
use crate::store::Store;

/// Everything a handler may use.
#[derive(Clone, Debug)]
pub struct AppState {
    pub store: Store,
    pub phala: PhalaClient,
    /// Intake's source and node lookups, cached briefly.
    pub lookups: Lookups,
    pub clock: Clock,
    pub api_tokens: ApiTokens,
    pub webhook_secrets: WebhookSecrets,
    /// Each caller's scope and quota.
    pub access: Access,
    /// Checks an app's env key against its KMS root key on chain.
    pub env_keys: EnvKeyVerifier,
    /// Who may use the team page.
    pub page_auth: PageAuth,
    /// What the page calls people (`APPROVAL_BRIDGE_NAMES`).
    pub names: crate::config::Names,
    /// What `/readyz` checks besides the database.
    pub readiness: health::Readiness,
    /// How long idempotency keys last.
    pub retention: crate::config::RetentionSettings,
    /// Stores intake's orders, in batches under load.
    pub orders: OrderWriter,
    /// Keys the hashes of idempotent orders' bodies.
    pub request_hasher: crate::store::RequestHasher,
    /// The bearer token `/metrics` and `/readyz` require, if any.
    pub ops_token: Option<ApiTokens>,
    /// The chains, for the queue form's reads of the apps.
    pub chains: crate::chain::Chains,
    /// The page's ENS names, cached.
    pub ens: crate::chain::EnsNames,
    /// The Safes the bridge may propose to.
    pub safes: crate::config::AllowedSafes,
    /// The queue form's last read of Phala and the chains.
    pub form_facts: pages::replication::FormFactsCache,
    /// Each client address's rate limit on what needs no credentials.
    pub client_limiter: ClientLimiter,
}

use api::{proposals, replicas};
use auth::sessions;
use middleware::{ratelimit, request_id, security};
use ops::metrics;
use pages::ui;
use request_id::REQUEST_ID;

/// The public listener's routes. With `ops_apart` (a listener of their own
/// serves them, see [`ops_router`]) it leaves out `/metrics` and `/readyz`.
pub fn router(state: AppState, ops_apart: bool) -> Router {
    let api = Router::new()
        .route("/replicas", post(replicas::create).get(replicas::list))
        .route("/replicas/{id}", get(replicas::show))
        .route("/replicas/{id}/cancel", post(replicas::cancel))
        .route("/proposals", get(proposals::list))
        .route("/proposals/{id}", get(proposals::show))
        .route("/sessions/sign-out", post(sessions::sign_out));

    // The page's forms and sign-in refuse cross-site requests; the API and
    // the webhook carry credentials a browser does not add by itself.
    let same_origin = axum::middleware::from_fn_with_state(state.clone(), security::same_origin);
    // An error page of someone signed in keeps their header.
    let keep_header = axum::middleware::from_fn_with_state(state.clone(), ui::keep_header);
    let limit_anonymous =
        axum::middleware::from_fn_with_state(state.clone(), ratelimit::limit_anonymous);
    let limit_refused =
        axum::middleware::from_fn_with_state(state.clone(), ratelimit::limit_refused_credentials);
    // What anyone may call costs a token of the client's rate limit.
    let open = Router::new()
        .merge(ui::open_routes().layer(same_origin.clone()))
        .route("/", get(pages::index))
        .route("/health", get(health::health))
        .route("/api/v1/openapi.json", get(openapi::openapi_json))
        .route("/webhooks/ci", post(webhook::ci_webhook))
        .route("/static/style.css", get(pages::stylesheet))
        .route_layer(limit_anonymous.clone());
    // What needs a token or a session costs one only when refused.
    let signed_in = Router::new()
        .merge(ui::signed_in_routes().layer(same_origin).layer(keep_header))
        .nest("/api/v1", api)
        .route_layer(limit_refused.clone());
    let mut routes = Router::new()
        .merge(open)
        .merge(signed_in)
        .route("/healthz", get(health::healthz))
        .fallback(ui::not_found);
    if !ops_apart {
        let ops = ops_routes(&state);
        routes = routes.merge(if state.ops_token.is_some() {
            ops.route_layer(limit_refused)
        } else {
            ops.route_layer(limit_anonymous)
        });
    }
    let routes = routes.layer(axum::middleware::from_fn_with_state(
        state.clone(),
        security::transport,
    ));
    with_layers(routes).with_state(state)
}

/// The routes of `APPROVAL_BRIDGE_OPS_LISTEN`: `/metrics`, `/readyz` and
/// `/healthz`, and nothing else.
pub fn ops_router(state: AppState) -> Router {
    let routes = ops_routes(&state)
        .route("/healthz", get(health::healthz))
        .fallback(pages::not_found);
    with_layers(routes).with_state(state)
}

/// `/metrics` and `/readyz`, behind `APPROVAL_BRIDGE_OPS_TOKEN` when it is set.
fn ops_routes(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::scrape))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            health::require_ops_token,
        ))
}

/// What every route gets: a request id and its span, a count, a timeout, a
/// body limit, and a 500 instead of a dropped connection when a handler panics.
fn with_layers<S: Clone + Send + Sync + 'static>(routes: Router<S>) -> Router<S> {
    routes
        .layer(DefaultBodyLimit::max(intake::MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(security::headers))
        .layer(CatchPanicLayer::custom(error::panic_response))
        .layer(axum::middleware::from_fn(request_id::scope))
        .layer(TimeoutLayer::with_status_code(axum::http::StatusCode::GATEWAY_TIMEOUT, Duration::from_secs(90)))
        .layer(axum::middleware::from_fn(metrics::count_requests))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
            let request_id = request.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("");
            tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), request_id)
        }))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;

    async fn json_body(response: axum::response::Response) -> serde_json::Value {
        let body = axum::body::to_bytes(response.into_body(), 10_000)
            .await
            .unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_json_with_the_request_id() {
        async fn buggy() -> &'static str {
            panic!("handler bug")
        }
        let app = with_layers(Router::new().route("/boom", get(buggy)));
        let request = Request::get("/boom")
            .header(REQUEST_ID, "req-4711")
            .body(Body::empty())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), 500);
        assert_eq!(response.headers()[REQUEST_ID], "req-4711");
        assert_eq!(
            json_body(response).await,
            serde_json::json!({"error": {
                "code": "internal",
                "message": error::INTERNAL_MESSAGE,
                "request_id": "req-4711",
            }})
        );
    }

    #[tokio::test]
    async fn client_errors_carry_no_request_id_in_their_body() {
        let app = with_layers(Router::<()>::new().fallback(pages::not_found));
        let response = app
            .oneshot(Request::get("/nope").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 404);
        assert!(response.headers().contains_key(REQUEST_ID));
        let body = json_body(response).await;
        assert_eq!(body["error"]["code"], "not_found");
        assert!(body["error"].get("request_id").is_none(), "{body}");
    }
}
