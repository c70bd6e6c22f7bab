//! Prometheus metrics: the names the bridge records, and the one recorder
//! that `/metrics` renders.
//!
//! Code records through the `metrics` facade (`counter!`, `histogram!`,
//! `gauge!`), so the clients and the worker need no handle passed around.
//! Gauges that describe the database (queue depth, open proposals, expired
//! leases) are read at scrape time instead, so every process that shares the
//! database reports the same figures and none goes stale.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// HTTP answers by route and status (`method`, `route`, `status`).
pub const HTTP_REQUESTS: &str = "approval_bridge_http_requests_total";
/// Seconds one worker step took, by the request's `state` and its `outcome`.
pub const STEP_SECONDS: &str = "approval_bridge_step_duration_seconds";
/// Calls to an outside service (`service`: phala, safe_service, rpc), by `outcome`: `ok`, or an error code.
pub const CALLS: &str = "approval_bridge_calls_total";
/// Failed calls to an outside service by `service` and `code` (an HTTP status, a Phala error code, `timeout`, `transport`).
pub const CALL_ERRORS: &str = "approval_bridge_call_errors_total";
/// Seconds one planner pass took (`planner`: its job, one per allowed Safe).
pub const PLANNER_PASS_SECONDS: &str = "approval_bridge_planner_pass_duration_seconds";
/// Blocks between a chain's head and the follower's scan (`chain_id`).
pub const FOLLOWER_LAG: &str = "approval_bridge_follower_lag_blocks";
/// Seconds from a Safe execution seen at confirmed depth to the replica's commit.
pub const EXECUTION_TO_COMMIT: &str = "approval_bridge_execution_to_commit_seconds";
/// Leases a step lost while it ran (the step's writes were void).
pub const LEASES_LOST: &str = "approval_bridge_leases_lost_total";
/// Stored proposals the bridge refused to sign: not what it planned (`safe::verify`).
pub const PROPOSALS_REFUSED: &str = "approval_bridge_proposals_refused_total";
/// Rows removed by the retention job, by `kind`.
pub const RETENTION_DELETED: &str = "approval_bridge_retention_deleted_total";

/// Read from the database at each scrape.
pub const QUEUE_DEPTH: &str = "approval_bridge_queue_depth";
pub const OPEN_PROPOSALS: &str = "approval_bridge_open_proposals";
pub const EXPIRED_LEASES: &str = "approval_bridge_expired_leases";
pub const EXTRA_REPLICAS: &str = "approval_bridge_requests_with_extra_replicas";

/// Histogram buckets, in seconds: steps take milliseconds to a Phala timeout;
/// an execution waits for a commit from seconds to hours of retries.
const STEP_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// A planner pass takes milliseconds, more with the Safe service's answers.
const PASS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
const COMMIT_BUCKETS: &[f64] = &[1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use. Tests build several apps
/// in one process; they share it, as the facade has one global recorder.
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(STEP_SECONDS.into()), STEP_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(EXECUTION_TO_COMMIT.into()),
                        COMMIT_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(PLANNER_PASS_SECONDS.into()),
                        PASS_BUCKETS,
                    )
                })
                .expect("the bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (a test harness's):
            // the bridge then renders an empty page rather than failing.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "a metrics recorder was installed already; /metrics shows none of the bridge's"
                );
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(HTTP_REQUESTS, "HTTP answers by method, route and status");
    describe_histogram!(
        STEP_SECONDS,
        Unit::Seconds,
        "duration of one worker step, by state and outcome"
    );
    describe_histogram!(
        PLANNER_PASS_SECONDS,
        Unit::Seconds,
        "duration of one planner pass (post, plan, read confirmations), by planner job"
    );
    describe_counter!(
        CALLS,
        "calls to Phala Cloud, the Safe Transaction Service and the RPCs"
    );
    describe_counter!(
        CALL_ERRORS,
        "failed calls to outside services, by service and error code"
    );
    describe_gauge!(
        FOLLOWER_LAG,
        "blocks between the chain head and the follower's scan"
    );
    describe_histogram!(
        EXECUTION_TO_COMMIT,
        Unit::Seconds,
        "time from a Safe execution at confirmed depth to the replica's commit"
    );
    describe_counter!(LEASES_LOST, "request leases lost while their step ran");
    describe_counter!(
        PROPOSALS_REFUSED,
        "stored proposals not signed because they are not what the bridge planned"
    );
    describe_counter!(RETENTION_DELETED, "rows deleted by the retention job");
    describe_gauge!(QUEUE_DEPTH, "requests by status that are not finished");
    describe_gauge!(OPEN_PROPOSALS, "Safe proposals waiting for execution");
    describe_gauge!(
        EXTRA_REPLICAS,
        "requests for which Phala lists more than one new CVM (see the request's extra_replicas)"
    );
    describe_gauge!(
        EXPIRED_LEASES,
        "requests whose lease expired and that no worker took back yet"
    );
}

/// Counts one call to an outside service and, if it failed, its error code.
pub fn record_call(service: &'static str, result: Result<(), String>) {
    match result {
        Ok(()) => metrics::counter!(CALLS, "service" => service, "outcome" => "ok").increment(1),
        Err(code) => {
            metrics::counter!(CALLS, "service" => service, "outcome" => "error").increment(1);
            metrics::counter!(CALL_ERRORS, "service" => service, "code" => code).increment(1);
        }
    }
}

pub fn record_planner_pass(job: String, took: Duration) {
    metrics::histogram!(PLANNER_PASS_SECONDS, "planner" => job).record(took.as_secs_f64());
}

pub fn record_step(state: &'static str, outcome: &'static str, took: Duration) {
    metrics::histogram!(STEP_SECONDS, "state" => state, "outcome" => outcome)
        .record(took.as_secs_f64());
}
