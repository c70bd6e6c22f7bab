//! Security headers on every answer: a CSP that allows no inline script and
//! no framing, no referrer leaving the site, and no MIME sniffing. Pages are
//! not stored by the browser or a proxy: they show who is signed in. Under
//! https, HSTS. And the same-origin rule of the page's state-changing
//! requests: a browser's cross-site POST is refused before any handler runs.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HOST, ORIGIN, REFERRER_POLICY,
    STRICT_TRANSPORT_SECURITY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::web::AppState;
use crate::web::error::ApiError;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
/// A year: browsers that saw the page over https never use plain http for it.
const HSTS: &str = "max-age=31536000";

pub async fn headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let html = headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/html"));
    if html {
        headers
            .entry(CACHE_CONTROL)
            .or_insert(HeaderValue::from_static("no-store"));
    }
    for (name, value) in [
        (CONTENT_SECURITY_POLICY, CSP),
        (REFERRER_POLICY, "same-origin"),
        (X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (X_FRAME_OPTIONS, "DENY"),
    ] {
        headers
            .entry(name)
            .or_insert(HeaderValue::from_static(value));
    }
    response
}

/// Whether the request came over https, decided once for everyone after it:
/// `X-Forwarded-Proto` is dropped unless a trusted proxy sent it, so cookies
/// and HSTS follow only the public URL and that proxy. Under https every
/// answer carries HSTS.
pub async fn transport(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    if !state.page_auth.trusts(peer) {
        request.headers_mut().remove("x-forwarded-proto");
    }
    let https = state.page_auth.https(request.headers());
    let mut response = next.run(request).await;
    if https {
        response
            .headers_mut()
            .entry(STRICT_TRANSPORT_SECURITY)
            .or_insert(HeaderValue::from_static(HSTS));
    }
    response
}

/// Refuses the page's state-changing requests that a browser sent from
/// another site (see [`check_same_origin`]).
pub async fn same_origin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match check_same_origin(
        request.method(),
        request.headers(),
        state.page_auth.public_origin(),
    ) {
        Ok(()) => next.run(request).await,
        Err(message) => {
            tracing::warn!(path = %request.uri().path(), reason = %message, "cross-site request refused");
            ApiError::new(StatusCode::FORBIDDEN, "cross_site_request", message).into_response()
        }
    }
}

/// Whether a request may change state: safe methods always; otherwise a
/// browser must say the request is same-origin (`Sec-Fetch-Site`), or send an
/// `Origin` that is the public URL's or the `Host` it was sent to. A request
/// with neither header is not from a browser (a script or CI), and its CSRF
/// token or credentials decide. `Err` says why, for a person.
pub fn check_same_origin(
    method: &Method,
    headers: &HeaderMap,
    public_origin: Option<&str>,
) -> Result<(), String> {
    if matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    ) {
        return Ok(());
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        return match site.as_bytes() {
            b"same-origin" | b"none" => Ok(()),
            other => Err(format!(
                "cross-site request refused: the browser sent it from another site \
                 (Sec-Fetch-Site: {}); use the page itself",
                String::from_utf8_lossy(other)
            )),
        };
    }
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("null");
    let authority = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    let host = headers.get(HOST).and_then(|h| h.to_str().ok());
    if public_origin == Some(origin) || (authority.is_some() && authority == host) {
        return Ok(());
    }
    Err(format!(
        "cross-site request refused: it came from a page of `{origin}`, not of this site; \
         use the page itself"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn only_same_origin_browsers_and_non_browsers_may_post() {
        let public = Some("https://bridge.example");
        let post = &Method::POST;
        for ok in [
            headers(&[]),
            headers(&[("sec-fetch-site", "same-origin")]),
            headers(&[("sec-fetch-site", "none")]),
            headers(&[("origin", "https://bridge.example")]),
            headers(&[
                ("origin", "http://10.0.0.5:8080"),
                ("host", "10.0.0.5:8080"),
            ]),
        ] {
            assert!(check_same_origin(post, &ok, public).is_ok(), "{ok:?}");
        }
        for refused in [
            headers(&[("sec-fetch-site", "cross-site")]),
            headers(&[("sec-fetch-site", "same-site")]),
            headers(&[
                ("sec-fetch-site", "same-site"),
                ("origin", "https://bridge.example"),
            ]),
            headers(&[("origin", "https://evil.bridge.example")]),
            headers(&[("origin", "null")]),
            headers(&[
                ("origin", "https://evil.example"),
                ("host", "bridge.example"),
            ]),
        ] {
            let err = check_same_origin(post, &refused, public).unwrap_err();
            assert!(err.contains("cross-site request refused"), "{err}");
        }
        let cross = headers(&[("sec-fetch-site", "cross-site")]);
        assert!(check_same_origin(&Method::GET, &cross, public).is_ok());
        assert!(check_same_origin(&Method::DELETE, &cross, public).is_err());
    }
}
