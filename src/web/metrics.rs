//! `GET /metrics` in the Prometheus text format, and the count of HTTP answers.

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::domain::Status;
use crate::metrics::{EXPIRED_LEASES, EXTRA_REPLICAS, HTTP_REQUESTS, OPEN_PROPOSALS, QUEUE_DEPTH};

/// The Prometheus text format, version 0.0.4.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics`. The database figures are read now; when the database does
/// not answer (it is down, or the process is shutting down and closed its
/// pool) the page still answers, without them.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn scrape(State(state): State<AppState>) -> Response {
    let handle = crate::metrics::handle();
    match state.store.queue_gauges().await {
        Ok(gauges) => {
            // Every unfinished status, so one that emptied shows 0, not its last count.
            for status in Status::ALL.iter().filter(|s| !s.is_terminal()) {
                let count = gauges
                    .by_status
                    .iter()
                    .find(|(name, _)| name == status.as_str())
                    .map_or(0, |(_, count)| *count);
                metrics::gauge!(QUEUE_DEPTH, "status" => status.as_str()).set(count as f64);
            }
            metrics::gauge!(OPEN_PROPOSALS).set(gauges.open_proposals as f64);
            metrics::gauge!(EXPIRED_LEASES).set(gauges.expired_leases as f64);
            metrics::gauge!(EXTRA_REPLICAS).set(gauges.with_extra_replicas as f64);
        }
        Err(err) => tracing::warn!(error = %err, "metrics: cannot read the queue figures"),
    }
    ([(CONTENT_TYPE, TEXT_FORMAT)], handle.render()).into_response()
}

/// Counts every answer by method, route (the pattern, never the raw path,
/// so ids do not make new series) and status.
pub async fn count_requests(request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    metrics::counter!(
        HTTP_REQUESTS,
        "method" => method,
        "route" => route,
        "status" => response.status().as_u16().to_string(),
    )
    .increment(1);
    response
}
