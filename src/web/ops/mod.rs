//! What operators and orchestrators call: `/healthz`, `/readyz`, `/health`
//! and `/metrics`.

pub mod health;
pub mod metrics;
