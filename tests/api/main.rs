//! Integration tests: one binary, the real app on port 0, a fresh Postgres
//! database per test, wiremock for Phala Cloud.

mod chain_world;
mod cli;
mod helpers;
mod phala_mock;
mod replicas_api;
mod secrets;
mod webhook;
mod worker;
mod safe_service;
