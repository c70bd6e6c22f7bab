//! The one mapping from errors to HTTP. Client errors get a precise JSON body
//! `{"error": {"code", "message"}}`; a server error gets a generic body and its
//! cause chain is logged once.

use axum::Json;
use axum::http::StatusCode;
use axum::http::header::RETRY_AFTER;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::telemetry::redact;

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
            } => (
                status,
                Json(json!({"error": {"code": code, "message": redact(&message)}})),
            )
                .into_response(),
            ApiError::RateLimited {
                message,
                retry_after_secs,
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                [(RETRY_AFTER, retry_after_secs.to_string())],
                Json(json!({"error": {"code": "quota_exceeded", "message": message}})),
            )
                .into_response(),
            ApiError::Internal(err) => {
                tracing::error!(error = %redact(&format!("{err:#}")), "internal error");
                let body = json!({"error": {"code": "internal", "message": "internal error; see the server log"}});
                (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
            }
        }
    }
}
