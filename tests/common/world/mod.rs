//! Fixtures of the world tier only (`tests/api`, with the `sandbox`
//! feature): the Safe world on anvil, doubles of the Transaction Service, an
//! RPC proxy, the pages over HTTP and in a browser, the sandbox's public
//! interface, and the sandbox and `serve` as processes. `tests/api/main.rs`
//! mounts this directory; the fast tier never compiles it.

pub mod browser;
pub mod front;
pub mod page_app;
pub mod processes;
pub mod rpc_proxy;
pub mod safe_doubles;
pub mod safe_world;
