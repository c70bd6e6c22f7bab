//! Integration tests: one binary, the real app on port 0, a fresh Postgres
//! database per test, wiremock for Phala Cloud.

mod access;
mod chain_rpc;
mod chain_world;
mod cli;
mod conformance;
mod delegate_cli;
mod env_keys;
mod exactly_once;
mod fault_proxy;
mod helpers;
mod kms_mock;
mod phala_mock;
mod phala_sim;
mod prepare_checks;
mod properties;
mod readme;
mod replicas_api;
mod rpc_proxy;
mod safe_doubles;
mod safe_flow;
mod safe_flow_atomic;
mod safe_flow_errors;
mod safe_flow_owner;
mod safe_flow_repost;
mod safe_service;
mod sandbox_e2e;
mod sandbox_page;
mod sandbox_process;
mod secrets;
mod unknown_outcomes;
mod watch_commit;
mod watch_failures;
mod watch_reorg;
mod webhook;
mod worker;
