//! What wraps the routes: request ids, rate limits, security headers, the
//! transport check and the same-origin check of the page's forms.

pub mod ratelimit;
pub mod request_id;
pub mod security;

pub use ratelimit::ClientLimiter;
pub use security::check_same_origin;
