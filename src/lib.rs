//! approval-bridge: Safe multisig approvals for Phala Cloud replicas.
//!
//! # Layers
//!
//! A module may use its own layer and the layers below it, never one above:
//!
//! 1. `clock`, `metrics`, `domain`: the pure rules and the process's clock
//!    and counters; `domain` imports nothing of the outside world.
//! 2. `config`, `telemetry`: typed settings and logging.
//! 3. `chain`, `safe`, `phala`: the clients of the outside world (`safe`
//!    also holds the bundle of them the Safe flow uses, and its links).
//! 4. `store`: every SQL query.
//! 5. `views`: the read models the API, the page and the notifications share.
//! 6. `worker`: the steps that move requests and proposals along.
//! 7. `notify`: the outgoing webhooks.
//! 8. `web`: the API, the pages, auth, the middleware and the ops endpoints.
//! 9. `startup`: builds the application from the settings.
//! 10. `sandbox`, `bench`: the local world, a test double compiled only with
//!     the `sandbox` feature. No product module names them; the one exception
//!     is `cli.rs`, the command line, which offers their subcommands when the
//!     feature is on.
//! 11. `cli`: the command line and its product subcommands.
//!
//! There is no circle between files either. The unit test in `layering.rs`
//! reads `src/` and fails on an import against this rule, naming it.

/// `approval-bridge bench`: the performance figures against the sandbox's
/// world; compiled only with the `sandbox` feature.
#[cfg(feature = "sandbox")]
pub mod bench;
pub mod chain;
pub mod cli;
pub mod clock;
pub mod config;
pub mod domain;
#[cfg(test)]
mod layering;
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
pub mod views;
pub mod web;
pub mod worker;
