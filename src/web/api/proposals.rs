//! `GET /api/v1/proposals` and `GET /api/v1/proposals/{id}`: the proposals
//! as the Safe's owners see them (the view is built in [`crate::views::proposals`]).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use crate::views::proposals::{ProposalList, ProposalView, seen, views_of};
use crate::web::AppState;
use crate::web::api::replicas::list_limit;
use crate::web::auth::tokens::ApiCaller;
use crate::web::error::{ApiError, ErrorBody};

/// The proposal statuses, plus `open` (= `proposed`) and `all`.
const STATUSES: [&str; 7] = [
    "open",
    "proposed",
    "executed",
    "failed",
    "replaced",
    "superseded",
    "all",
];

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// `open` (the default), `executed`, `failed`, `replaced`, `superseded` or `all`.
    status: Option<String>,
    /// At most this many, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
}

/// `GET /api/v1/proposals?status=open&limit=50`: open proposals by default, newest first.
#[utoipa::path(get, path = "/api/v1/proposals", tag = "proposals",
    params(ListParams),
    responses(
        (status = 200, description = "newest first", body = ProposalList),
        (status = "4XX", description = "a bad status or limit, or not authorised", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    ApiCaller(actor): ApiCaller,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<ProposalList>, ApiError> {
    let Query(params) = params
        .map_err(|rejection| ApiError::bad_request("invalid_query", rejection.body_text()))?;
    let status = params.status.as_deref().unwrap_or("open");
    let status = match status {
        "open" => Some("proposed"),
        "all" => None,
        s if STATUSES.contains(&s) => Some(s),
        s => {
            return Err(ApiError::bad_request(
                "invalid_status",
                format!(
                    "unknown proposal status `{s}`; one of {}",
                    STATUSES.join(", ")
                ),
            ));
        }
    };
    let limit = list_limit(params.limit)?;
    let reach = state.access.reach(&actor);
    let rows = state.store.list_proposals(status, limit, &reach).await?;
    Ok(Json(ProposalList {
        proposals: views_of(&state.store, rows, &reach).await?,
    }))
}

/// `GET /api/v1/proposals/{id}`: by the bridge's id or by the safeTxHash.
#[utoipa::path(get, path = "/api/v1/proposals/{id}", tag = "proposals",
    params(("id" = String, Path, description = "the proposal's id (a UUID) or its safeTxHash")),
    responses(
        (status = 200, description = "the proposal as the signers see it", body = ProposalView),
        (status = "4XX", description = "a bad id, no such proposal, or not authorised", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn show(
    State(state): State<AppState>,
    ApiCaller(actor): ApiCaller,
    Path(id): Path<String>,
) -> Result<Json<ProposalView>, ApiError> {
    let row = if let Ok(uuid) = Uuid::parse_str(&id) {
        state.store.proposals(&[uuid]).await?.pop()
    } else if id.len() == 66 && id.starts_with("0x") && hex::decode(&id[2..]).is_ok() {
        state.store.proposal_by_hash(&id.to_lowercase()).await?
    } else {
        return Err(ApiError::bad_request(
            "invalid_id",
            format!(
                "`{id}` is neither a proposal id (a UUID) nor a safeTxHash (0x and 64 hex digits)"
            ),
        ));
    };
    // One out of the caller's reach is not found, as if it did not exist.
    let not_found = || ApiError::not_found(format!("no proposal has id {id}"));
    let row = row.ok_or_else(not_found)?;
    let reach = state.access.reach(&actor);
    let view = views_of(&state.store, vec![row], &reach)
        .await?
        .pop()
        .expect("one row gives one view");
    if !seen(&view, &reach) {
        return Err(not_found());
    }
    Ok(Json(view))
}
