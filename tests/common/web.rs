//! What the team page's forms and the SSO proxy carry, for the tests that
//! talk to the pages over HTTP.

/// What the SSO proxy sends in `X-Proxy-Secret`.
pub const PROXY_SECRET: &str = "proxy-secret-0123456789abcdef";

/// The CSRF token a page carries.
pub fn csrf_on_page(html: &str) -> String {
    html.split_once(r#"<meta name="csrf-token" content=""#)
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(token, _)| token.to_owned())
        .unwrap_or_else(|| panic!("no CSRF token in {html}"))
}
