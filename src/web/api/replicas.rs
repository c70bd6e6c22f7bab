//! JSON API v1 handlers. They stay thin: parse, call the store or intake, render.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use crate::domain::{IllegalTransition, OrderBody, Status};
use crate::store::{Reach, StoreError};
use crate::views::requests as views;
use crate::web::AppState;
use crate::web::api::intake::{self, RawBody};
use crate::web::auth::tokens::ApiCaller;
use crate::web::error::{ApiError, ErrorBody};

const DEFAULT_LIST_LIMIT: i64 = 50;
pub(in crate::web) const MAX_LIST_LIMIT: i64 = 500;

/// `POST /api/v1/replicas`
#[utoipa::path(post, path = "/api/v1/replicas", tag = "replicas",
    request_body = OrderBody,
    params(("Idempotency-Key" = Option<String>, Header,
            description = "the same key and body answer as the first time and create nothing")),
    responses(
        (status = 202, description = "queued: one request per replica", body = views::ReplicaList),
        (status = "4XX", description = "bad input, a refused source, or over a quota; nothing was stored", body = ErrorBody),
        (status = "5XX", description = "Phala or the chain is unavailable, or an internal error", body = ErrorBody),
    ),
    security(("bearer" = [])))]
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
#[utoipa::path(get, path = "/api/v1/replicas/{id}", tag = "replicas",
    params(("id" = Uuid, Path, description = "the request's id")),
    responses(
        (status = 200, description = "the request and its event log", body = views::ReplicaDetail),
        (status = "4XX", description = "not a UUID, no such request, or not authorised", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn show(
    State(state): State<AppState>,
    ApiCaller(actor): ApiCaller,
    Path(id): Path<String>,
) -> Result<Json<views::ReplicaDetail>, ApiError> {
    let reach = state.access.reach(&actor);
    Ok(Json(detail_of(&state, &reach, parse_id(&id)?).await?))
}

/// Request `id` with its events, if `reach` sees it: the API's and the page's
/// detail. One out of reach is not found, as if it did not exist.
pub(in crate::web) async fn detail_of(
    state: &AppState,
    reach: &Reach,
    id: Uuid,
) -> Result<views::ReplicaDetail, ApiError> {
    let request = visible_request(state, reach, id).await?;
    let events = state.store.events(id).await?;
    let proposals = proposals_of(state, reach, std::slice::from_ref(&request)).await?;
    Ok(views::ReplicaDetail {
        replica: views::replica(&request, &proposals),
        events: events.iter().map(views::event).collect(),
    })
}

async fn visible_request(
    state: &AppState,
    reach: &Reach,
    id: Uuid,
) -> Result<crate::store::ReplicaRequest, ApiError> {
    state
        .store
        .get_request(id)
        .await?
        .filter(|request| reach.sees(request))
        .ok_or_else(|| not_found(id))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only requests in this status.
    #[param(value_type = Option<Status>)]
    status: Option<String>,
    /// At most this many, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
}

/// A list's `limit`, 1 to 500 (default 50).
pub(in crate::web) fn list_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if !(1..=MAX_LIST_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit must be between 1 and {MAX_LIST_LIMIT}"),
        ));
    }
    Ok(limit)
}

/// `GET /api/v1/replicas?status=…&limit=…`, newest first.
#[utoipa::path(get, path = "/api/v1/replicas", tag = "replicas",
    params(ListParams),
    responses(
        (status = 200, description = "newest first", body = views::ReplicaList),
        (status = "4XX", description = "a bad status or limit, or not authorised", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    ApiCaller(actor): ApiCaller,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<views::ReplicaList>, ApiError> {
    let Query(params) = params
        .map_err(|rejection| ApiError::bad_request("invalid_query", rejection.body_text()))?;
    let limit = list_limit(params.limit)?;
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
    let reach = state.access.reach(&actor);
    let requests = state.store.list_requests(status, limit, &reach).await?;
    let proposals = proposals_of(&state, &reach, &requests).await?;
    let replicas = requests
        .iter()
        .map(|r| views::replica(r, &proposals))
        .collect();
    Ok(Json(views::ReplicaList { replicas }))
}

/// `POST /api/v1/replicas/{id}/cancel`: allowed until the commit starts.
#[utoipa::path(post, path = "/api/v1/replicas/{id}/cancel", tag = "replicas",
    params(("id" = Uuid, Path, description = "the request's id")),
    responses(
        (status = 200, description = "cancelled", body = views::ReplicaView),
        (status = 409, description = "too late: the request is committing or done", body = ErrorBody),
        (status = "4XX", description = "not a UUID, no such request, or not authorised", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    ApiCaller(actor): ApiCaller,
    Path(id): Path<String>,
) -> Result<Json<views::ReplicaView>, ApiError> {
    let reach = state.access.reach(&actor);
    let request = cancel_as(&state, &actor, &reach, parse_id(&id)?).await?;
    let proposals = proposals_of(&state, &reach, std::slice::from_ref(&request)).await?;
    Ok(Json(views::replica(&request, &proposals)))
}

/// Cancels request `id` on behalf of `actor`, if `reach` sees it: the API's
/// and the page's path. Which sources a request is of never changes after
/// intake, so the check need not be in the cancelling transaction.
pub(in crate::web) async fn cancel_as(
    state: &AppState,
    actor: &crate::domain::Actor,
    reach: &Reach,
    id: Uuid,
) -> Result<crate::store::ReplicaRequest, ApiError> {
    visible_request(state, reach, id).await?;
    match state
        .store
        .cancel_request(id, actor, state.clock.now())
        .await
    {
        Ok(Some(request)) => Ok(request),
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

/// The proposals the given requests point to, as the signers see them, cut
/// down to what `reach` sees.
pub(in crate::web) async fn proposals_of(
    state: &AppState,
    reach: &Reach,
    requests: &[crate::store::ReplicaRequest],
) -> Result<views::Proposals, ApiError> {
    let mut ids: Vec<Uuid> = requests.iter().filter_map(|r| r.proposal_id).collect();
    ids.sort_unstable();
    ids.dedup();
    Ok(crate::views::proposals::views_by_id(&state.store, &ids, reach).await?)
}

pub(in crate::web) fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| {
        ApiError::bad_request("invalid_id", format!("`{id}` is not a request id (a UUID)"))
    })
}

fn not_found(id: Uuid) -> ApiError {
    ApiError::not_found(format!("no replica request has id {id}"))
}
