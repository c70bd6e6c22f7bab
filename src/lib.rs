//! approval-bridge: Safe multisig approvals for Phala Cloud replicas.
//!
//! Data flows one way: `web` → `store` → `worker` → clients (`phala`).
//! `domain` holds the pure rules and imports nothing of the outside world.

/// `approval-bridge bench`: the performance figures against the sandbox's
/// world; compiled only with the `sandbox` feature.
#[cfg(feature = "sandbox")]
pub mod bench;
pub mod chain;
pub mod cli;
pub mod clock;
pub mod config;
pub mod domain;
pub mod metrics;
pub mod notify;
pub mod phala;
pub mod safe;
/// The local world (anvil, simulators, `approval-bridge sandbox`): a test
/// double, compiled only with the `sandbox` feature.
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod web;
pub mod worker;
