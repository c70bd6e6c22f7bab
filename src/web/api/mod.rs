//! The JSON API v1, the CI webhook and the OpenAPI description: what CI
//! systems and scripts call with a token or a signature.

pub mod intake;
pub mod openapi;
mod order_writer;
pub mod proposals;
pub mod replicas;
pub mod webhook;

pub use order_writer::OrderWriter;
pub use webhook::WebhookSecrets;
