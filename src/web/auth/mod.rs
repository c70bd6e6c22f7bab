//! Who is calling: API tokens, Sign-In with Ethereum and the proxy's users
//! for the page, CSRF, the API's sign-out of page sessions, and each
//! caller's scope and quota.

pub mod access;
pub mod sessions;
pub mod signin;
pub mod tokens;

pub use access::Access;
pub use signin::PageAuth;
pub use tokens::ApiTokens;
