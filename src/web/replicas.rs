//! JSON API v1 handlers. They stay thin: parse, call the store or intake, render.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::AppState;
use super::auth::ApiCaller;
use super::error::ApiError;
use super::intake::{self, RawBody};
use super::views;
use crate::domain::{IllegalTransition, Status};
use crate::store::StoreError;

const DEFAULT_LIST_LIMIT: i64 = 50;
const MAX_LIST_LIMIT: i64 = 500;

/// `POST /api/v1/replicas`
pub async fn create(
    State(state): State<AppState>,
    ApiCaller(actor): ApiCaller,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let key = intake::idempotency_key(&headers)?;
    intake::submit(&state, actor, key, &body).await
}

/// `GET /api/v1/replicas/{id}`: the request with its events.
pub async fn show(
    State(state): State<AppState>,
    _caller: ApiCaller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    let request = state
        .store
        .get_request(id)
        .await?
        .ok_or_else(|| not_found(id))?;
    let events = state.store.events(id).await?;
    let proposals = proposals_of(&state, std::slice::from_ref(&request)).await?;
    let mut body = views::replica(&request, &proposals);
    body["events"] = events.iter().map(views::event).collect();
    Ok(Json(body))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    status: Option<String>,
    limit: Option<i64>,
}

/// `GET /api/v1/replicas?status=…&limit=…`, newest first.
pub async fn list(
    State(state): State<AppState>,
    _caller: ApiCaller,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) = params
        .map_err(|rejection| ApiError::bad_request("invalid_query", rejection.body_text()))?;
    let status = params
        .status
        .map(|s| {
            s.parse::<Status>().map_err(|_| {
                let names: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
                ApiError::bad_request(
                    "invalid_status",
                    format!("unknown status `{s}`; one of {}", names.join(", ")),
                )
            })
        })
        .transpose()?;
    let limit = params.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if !(1..=MAX_LIST_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit must be between 1 and {MAX_LIST_LIMIT}"),
        ));
    }
    let requests = state.store.list_requests(status, limit).await?;
    let proposals = proposals_of(&state, &requests).await?;
    let replicas: Vec<Value> = requests
        .iter()
        .map(|r| views::replica(r, &proposals))
        .collect();
    Ok(Json(json!({ "replicas": replicas })))
}

/// `POST /api/v1/replicas/{id}/cancel`: allowed until the commit starts.
pub async fn cancel(
    State(state): State<AppState>,
    ApiCaller(actor): ApiCaller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    match state
        .store
        .cancel_request(id, &actor, state.clock.now())
        .await
    {
        Ok(Some(request)) => {
            let proposals = proposals_of(&state, std::slice::from_ref(&request)).await?;
            Ok(Json(views::replica(&request, &proposals)))
        }
        Ok(None) => Err(not_found(id)),
        Err(StoreError::Illegal(IllegalTransition { from, .. })) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_cancellable",
            format!(
                "the request is `{from}`; only requests that have not started committing can be cancelled"
            ),
        )),
        Err(StoreError::CallInFlight(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_cancellable",
            "the replica is being created right now (or Phala's answer is being confirmed); \
             try again once the request has moved on",
        )),
        Err(err) => Err(err.into()),
    }
}

/// The proposals the given requests point to, as the signers see them.
async fn proposals_of(
    state: &AppState,
    requests: &[crate::store::ReplicaRequest],
) -> Result<views::Proposals, ApiError> {
    let mut ids: Vec<Uuid> = requests.iter().filter_map(|r| r.proposal_id).collect();
    ids.sort_unstable();
    ids.dedup();
    Ok(super::signers::views_by_id(&state.store, &ids).await?)
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| {
        ApiError::bad_request("invalid_id", format!("`{id}` is not a request id (a UUID)"))
    })
}

fn not_found(id: Uuid) -> ApiError {
    ApiError::not_found(format!("no replica request has id {id}"))
}
