//! The fast tier of integration tests: the real app on port 0 with a
//! database cloned from a migrated template, wiremock for Phala Cloud and the
//! KMS. It needs Postgres and nothing else (no feature, npm, anvil or
//! browser): `cargo test` runs it. The world tier is `tests/api`.

// Each binary uses only part of the shared fixtures.
#[allow(dead_code)]
#[path = "../common/mod.rs"]
mod common;

use common::{command, helpers, kms_mock, pg_proxy, pg_waits, phala_mock, web};

mod access;
mod chain_rpc;
mod cli;
mod db_bounds;
mod intake_cache;
mod operations;
mod properties;
mod readme;
mod replicas_api;
mod security_at_rest;
mod security_metrics;
mod security_ops;
mod security_quota;
mod supervision;
mod tracking;
mod unknown_outcomes;
mod webhook;
mod worker;
