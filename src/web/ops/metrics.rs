//! `GET /metrics` in the Prometheus text format, and the count of HTTP answers.

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::domain::Status;
use crate::metrics::{EXPIRED_LEASES, EXTRA_REPLICAS, HTTP_REQUESTS, OPEN_PROPOSALS, QUEUE_DEPTH};
use crate::web::AppState;

/// The Prometheus text format, version 0.0.4.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics`. The database figures are read now; when the database does
/// not answer (it is down, or the process is shutting down and closed its
/// pool) the page still answers, without them.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn scrape(State(state): State<AppState>) -> Response {
    let handle = crate::metrics::handle();
    if state.client_limiter.enabled() {
        metrics::gauge!(crate::web::middleware::ratelimit::TRACKED_CLIENTS)
            .set(state.client_limiter.clients() as f64);
    }
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
/// so ids do not make new series) and status. Every label has a bounded set
/// of values: anyone may send any method, and each new value would be a
/// series kept for the life of the process.
pub async fn count_requests(request: Request, next: Next) -> Response {
    let method = method_label(request.method());
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

/// The method as a label: the standard ones by name, any other as `other`.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    const KNOWN: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::PATCH, "PATCH"),
        (Method::DELETE, "DELETE"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    KNOWN
        .iter()
        .find(|(known, _)| known == method)
        .map_or("other", |(_, label)| label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_method_outside_the_standard_ones_is_one_label() {
        assert_eq!(method_label(&axum::http::Method::GET), "GET");
        let junk = axum::http::Method::from_bytes(b"X-JUNK-1234").unwrap();
        assert_eq!(method_label(&junk), "other");
    }
}
