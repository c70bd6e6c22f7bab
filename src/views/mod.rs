//! Read models: the requests and proposals as the API, the team page and the
//! notifications show them. They are built from the store alone (showing
//! never calls out) and sit below `web` and `notify`, which both use them.

pub mod proposals;
pub mod requests;

/// The most rows one list shows.
pub const MAX_LIST_LIMIT: i64 = 500;
