//! Fixtures shared by both tiers of integration tests: the app on port 0
//! with its own database (`helpers`), wiremock doubles of Phala Cloud and
//! the KMS, a Postgres proxy, waits on what Postgres reports, the binary as
//! a process, and what the pages' forms carry.
//!
//! Each test binary mounts this directory with
//! `#[path = "../common/mod.rs"] mod common;` and names the modules it uses
//! at its root, so a test reaches them as `crate::helpers`, `crate::phala_mock`.

pub mod command;
pub mod commit_gate;
pub mod helpers;
pub mod kms_mock;
pub mod pg_proxy;
pub mod pg_waits;
pub mod phala_mock;
pub mod template;
pub mod wait;
pub mod web;
