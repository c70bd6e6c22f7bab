//! `POST /api/v1/sessions/sign-out`: an admin ends the team page's sessions
//! of one person, or of everyone, as `approval-bridge sessions sign-out`
//! does from the command line (a lost key, a stolen laptop, someone who left).

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::web::AppState;
use crate::web::auth::tokens::ApiCaller;
use crate::web::error::{ApiError, ErrorBody};

/// Whose sessions end: `{"subject": "0x…"}` or `{"all": true}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignOutRequest {
    /// The person: an address (any case) or an SSO proxy user name.
    subject: Option<String>,
    /// Everyone.
    #[serde(default)]
    all: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SignOutAnswer {
    /// How many sessions ended.
    pub ended: u64,
}

/// `POST /api/v1/sessions/sign-out`
#[utoipa::path(post, path = "/api/v1/sessions/sign-out", tag = "sessions",
    request_body = SignOutRequest,
    responses(
        (status = 200, description = "the sessions ended; the page asks their browsers to sign in again", body = SignOutAnswer),
        (status = 403, description = "the token lacks the `+admin` grant; nothing ended", body = ErrorBody),
        (status = "4XX", description = "neither or both of `subject` and `all`, or not authorised; nothing ended", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn sign_out(
    State(state): State<AppState>,
    ApiCaller(actor): ApiCaller,
    body: Result<Json<SignOutRequest>, JsonRejection>,
) -> Result<Json<SignOutAnswer>, ApiError> {
    let caller = actor.label();
    if !state.access.is_admin(&caller) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_only",
            format!(
                "`{caller}` may not end other people's sessions: that needs the `+admin` grant \
                 in APPROVAL_BRIDGE_SCOPES"
            ),
        ));
    }
    let Json(body) = body.map_err(|err| ApiError::bad_request("invalid_body", err.body_text()))?;
    let subject = body
        .subject
        .as_deref()
        .map(crate::domain::session_subject)
        .filter(|s| !s.is_empty());
    let ended = match (subject, body.all) {
        (Some(subject), false) => {
            let ended = state.store.delete_web_sessions_of(&subject).await?;
            tracing::info!(actor = %caller, %subject, sessions = ended, "page sessions of one person ended");
            ended
        }
        (None, true) => {
            let ended = state.store.delete_all_web_sessions().await?;
            tracing::info!(actor = %caller, sessions = ended, "every page session ended");
            ended
        }
        _ => {
            return Err(ApiError::unprocessable(
                "invalid_field",
                "give either `subject` (an address or a proxy user name) or `\"all\": true`",
            ));
        }
    };
    Ok(Json(SignOutAnswer { ended }))
}
