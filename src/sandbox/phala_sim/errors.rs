//! The simulator's error answers: the structured envelope under `detail`,
//! FastAPI's validation list, and a bare 500.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::codes;

/// An error answer.
#[derive(Debug)]
pub(super) enum SimError {
    /// The structured envelope, nested under `detail` (§7).
    Envelope {
        status: StatusCode,
        code: &'static str,
        message: String,
        details: Vec<Value>,
        suggestions: Vec<String>,
    },
    /// FastAPI's request validation error.
    Validation(Vec<Value>),
    Internal(anyhow::Error),
}

pub(super) fn custom_status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).expect("465-468 are valid status codes")
}

impl SimError {
    pub(super) fn envelope(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> SimError {
        SimError::Envelope {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
            suggestions: Vec::new(),
        }
    }

    pub(super) fn suggest(mut self, suggestion: &str) -> SimError {
        if let SimError::Envelope { suggestions, .. } = &mut self {
            suggestions.push(suggestion.to_owned());
        }
        self
    }

    pub(super) fn with_details(mut self, more: Vec<Value>) -> SimError {
        if let SimError::Envelope { details, .. } = &mut self {
            details.extend(more);
        }
        self
    }

    pub(super) fn cvm_not_found(id: &str) -> SimError {
        SimError::envelope(
            StatusCode::NOT_FOUND,
            codes::CVM_NOT_FOUND,
            format!("CVM {id} not found"),
        )
        .suggest("Check the CVM id, app id or name.")
    }

    pub(super) fn invalid_request(message: impl Into<String>) -> SimError {
        SimError::envelope(StatusCode::BAD_REQUEST, codes::INVALID_REQUEST, message)
    }

    pub(super) fn token_invalid(why: &str) -> SimError {
        SimError::envelope(
            custom_status(466),
            codes::HASH_INVALID_OR_EXPIRED,
            format!("Commit token is invalid or expired: {why}"),
        )
        .suggest("Run the replica request with --prepare-only again to get a new token.")
    }

    pub(super) fn unauthorized() -> SimError {
        SimError::envelope(
            StatusCode::UNAUTHORIZED,
            codes::INVALID_API_KEY,
            "Invalid or missing API key",
        )
        .suggest("Send a valid API key in the X-API-Key header.")
    }

    pub(super) fn issue(kind: &str, loc: Value, msg: &str, input: &Value) -> Value {
        json!({"type": kind, "loc": loc, "msg": msg, "input": input})
    }
}

impl IntoResponse for SimError {
    fn into_response(self) -> Response {
        match self {
            SimError::Envelope {
                status,
                code,
                message,
                details,
                suggestions,
            } => {
                let body = json!({"detail": {
                    "error_code": code,
                    "message": message,
                    "details": details,
                    "suggestions": suggestions,
                    "links": [],
                }});
                (status, axum::Json(body)).into_response()
            }
            SimError::Validation(issues) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                axum::Json(json!({ "detail": issues })),
            )
                .into_response(),
            SimError::Internal(err) => {
                tracing::error!(error = format!("{err:#}"), "phala simulator failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    axum::Json(json!({"detail": "Internal Server Error"})),
                )
                    .into_response()
            }
        }
    }
}
