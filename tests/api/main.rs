//! The world tier of integration tests: the sandbox's anvil chain with the
//! real Safe contracts, the Phala Cloud and Safe Transaction Service
//! simulators, the sandbox as a process, and the page in a real browser. It
//! needs the `sandbox` feature, npm's packages and Chromium (`scripts/test`
//! installs them). The fast tier is `tests/fast`.

// Each binary uses only part of the shared fixtures.
#[allow(dead_code)]
#[path = "../common/mod.rs"]
mod common;

use common::{command, commit_gate, helpers, kms_mock, pg_waits, phala_mock, wait, web};

#[path = "../common/world/mod.rs"]
mod world;

use world::{browser, front, page_app, processes, rpc_proxy, safe_doubles, safe_world};

mod chain_world;
mod confirmed_depth;
mod conformance;
mod delegate_cli;
mod doctor;
mod env_keys;
mod exactly_once;
mod fault_proxy;
mod fencing;
mod logs;
mod notifications;
mod page_ens;
mod page_words;
mod phala_sim;
mod prepare_checks;
mod rpc_budget;
mod safe_flow;
mod safe_flow_atomic;
mod safe_flow_batches;
mod safe_flow_confirmations;
mod safe_flow_errors;
mod safe_flow_owner;
mod safe_flow_repost;
mod safe_flow_requeue;
mod safe_flow_stalls;
mod safe_service;
mod sandbox_a11y;
mod sandbox_e2e;
mod sandbox_page;
mod sandbox_process;
mod sandbox_queue;
mod secrets;
mod security_1271;
mod security_csrf;
mod security_prepare;
mod security_ratelimit;
mod security_scopes;
mod security_signin;
mod security_signing;
mod signers_view;
mod watch_commit;
mod watch_failures;
mod watch_heads;
mod watch_reorg;
mod web_signin;
