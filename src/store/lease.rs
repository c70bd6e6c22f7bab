//! A worker's hold on one request (see `requests::claim`).

use uuid::Uuid;

/// Proof that a worker holds a request. Writes that carry it are fenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub request_id: Uuid,
    pub lease_id: Uuid,
}
