//! The OpenAPI 3.1 description of the JSON API, the CI webhook and the
//! operations endpoints, generated from the handlers' annotations and the
//! answer types, and served at `/api/v1/openapi.json`. A test keeps it and
//! the router in step.

use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{proposals, replicas, webhook};
use crate::web::auth::sessions;
use crate::web::ops::{health, metrics};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "approval-bridge",
        description = "Safe multisig approvals for Phala Cloud replicas: queue replica requests, follow them through preparation, the Safe's approval and the commit."
    ),
    paths(
        replicas::create,
        replicas::list,
        replicas::show,
        replicas::cancel,
        proposals::list,
        proposals::show,
        sessions::sign_out,
        webhook::ci_webhook,
        health::healthz,
        health::readyz,
        health::health,
        metrics::scrape,
        openapi_json,
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "replicas", description = "the JSON API; every call needs `Authorization: Bearer <token>`"),
        (name = "proposals", description = "the Safe proposals as the owners see them; bearer token as above"),
        (name = "sessions", description = "the team page's sessions; needs a token with the `+admin` grant"),
        (name = "webhook", description = "CI deliveries, authenticated by HMAC-SHA256"),
        (name = "operations", description = "probes, metrics and this description"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The description, with this build's version.
pub fn description() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

/// `GET /api/v1/openapi.json`: this description.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "the OpenAPI 3.1 description of this API", content_type = "application/json")))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(description())
}
