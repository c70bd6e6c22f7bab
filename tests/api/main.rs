//! Integration tests: one binary, the real app on port 0, a fresh Postgres
//! database per test, wiremock for Phala Cloud.

mod chain_world;
mod cli;
mod conformance;
mod delegate_cli;
mod helpers;
mod phala_mock;
mod phala_sim;
mod replicas_api;
mod rpc_proxy;
mod safe_flow;
mod safe_flow_errors;
mod safe_service;
mod sandbox_e2e;
mod sandbox_page;
mod secrets;
mod watch_commit;
mod watch_failures;
mod webhook;
mod worker;
