//! The one mapping from errors to HTTP. Client errors get a precise JSON body
//! `{"error": {"code", "message"}}`; a server error gets a generic body and its
//! cause chain is logged once.

use axum::Json;
use axum::http::StatusCode;
use axum::http::header::RETRY_AFTER;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::telemetry::redact;

/// Every error answer: `{"error": {"code", "message"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable, e.g. `invalid_field` or `quota_exceeded`.
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
    /// On a server error: the id under which the server log has the cause
    /// (also the `x-request-id` header).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl ErrorBody {
    pub fn new(code: &str, message: impl Into<String>) -> Json<Self> {
        Json(ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
                request_id: None,
            },
        })
    }
}

/// Marks a server-error answer, whose body [`super::request_id::scope`]
/// rewrites to name the request.
#[derive(Debug, Clone, Copy)]
pub(super) struct ServerError;

fn internal_response() -> Response {
    let mut response = (
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorBody::new("internal", INTERNAL_MESSAGE),
    )
        .into_response();
    response.extensions_mut().insert(ServerError);
    response
}

/// A handler that panicked (tower-http's `CatchPanicLayer`) answers as any
/// server error does, instead of dropping the connection. It runs inside the
/// request's span, so the log line carries the request id.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    tracing::error!(panic = %redact(message), "a handler panicked");
    internal_response()
}

/// What a server error shows: its cause is in the log, never in the answer.
pub const INTERNAL_MESSAGE: &str = "internal error; see the server log";

#[derive(Debug)]
pub enum ApiError {
    /// The caller's mistake, or an upstream problem we can describe.
    Client {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
    /// Over a quota: 429 with `Retry-After`.
    RateLimited {
        message: String,
        retry_after_secs: u64,
    },
    /// Our bug or an outage: logged, never shown.
    Internal(anyhow::Error),
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Client {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl<E: Into<anyhow::Error>> From<E> for ApiError {
    fn from(err: E) -> Self {
        ApiError::Internal(err.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Client {
                status,
                code,
                message,
            } => (status, ErrorBody::new(code, redact(&message))).into_response(),
            ApiError::RateLimited {
                message,
                retry_after_secs,
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                [(RETRY_AFTER, retry_after_secs.to_string())],
                ErrorBody::new("quota_exceeded", message),
            )
                .into_response(),
            ApiError::Internal(err) => {
                tracing::error!(error = %redact(&format!("{err:#}")), "internal error");
                internal_response()
            }
        }
    }
}
