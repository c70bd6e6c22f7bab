//! The request id (`x-request-id`, made up when the caller sends none)
//! follows an HTTP request everywhere: its log span, the rows it stores (so
//! the worker's spans carry it too), and the body of a server error.

use axum::Json;
use axum::extract::Request;
use axum::http::HeaderName;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::web::error::{ErrorBody, ErrorDetail, INTERNAL_MESSAGE, ServerError};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

tokio::task_local! {
    static CURRENT: Option<String>;
}

/// The id of the HTTP request being handled, if any.
pub fn current() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok().flatten()
}

/// Makes the id available to the handler ([`current`]) and writes it into
/// the body of every server error, so whoever got one can quote the id that
/// finds its log lines.
pub async fn scope(request: Request, next: Next) -> Response {
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let response = CURRENT.scope(request_id.clone(), next.run(request)).await;
    if response.extensions().get::<ServerError>().is_none() {
        return response;
    }
    let (parts, _) = response.into_parts();
    let body = Json(ErrorBody {
        error: ErrorDetail {
            code: "internal".into(),
            message: INTERNAL_MESSAGE.into(),
            request_id,
        },
    });
    let mut response = (parts.status, body).into_response();
    *response.extensions_mut() = parts.extensions;
    response
}
