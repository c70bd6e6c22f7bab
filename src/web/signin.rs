//! Who is on the team page. Two ways in: Sign-In with Ethereum (EIP-4361),
//! which ends in a session cookie, and an SSO proxy's user header, trusted
//! only from the proxy's own addresses. Operators (by address or user name)
//! may queue and cancel; the owners of the configured Safes, and anyone the
//! proxy lets through, read.
//!
//! A session id lives only in its HttpOnly, SameSite=Strict cookie; the
//! database keeps its SHA-256 digest. Every state-changing page request also
//! carries a CSRF token equal to the `ab_csrf` cookie (double submit).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use alloy::primitives::Address;
use axum::Json;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::header::{COOKIE, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Duration, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;
use crate::chain::{Chains, OwnerKind};
use crate::config::{AllowedSafes, Operators, Settings};
use crate::domain::Actor;

const SESSION_COOKIE: &str = "ab_session";
const CSRF_COOKIE: &str = "ab_csrf";
/// The form field, and for `fetch` the header, that carries the CSRF token.
pub const CSRF_FIELD: &str = "csrf";
const CSRF_HEADER: &str = "x-csrf-token";
/// How long a sign-in message may wait for its signature.
const NONCE_TTL_MINUTES: i64 = 10;
const SESSION_TTL_HOURS: i64 = 8;
/// Sign-ins that may wait for their signature at once, from anyone.
const MAX_OPEN_NONCES: i64 = 10_000;
const STATEMENT: &str = "Sign in to approval-bridge.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// May queue and cancel.
    Operator,
    /// Reads everything.
    Viewer,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }
}

/// A signed-in person.
#[derive(Debug, Clone)]
pub struct PageUser {
    /// A checksummed address, or the proxy's user name.
    pub subject: String,
    pub role: Role,
}

impl PageUser {
    /// Recorded in the event log as `web:<subject>`.
    pub fn actor(&self) -> Actor {
        Actor::WebUser(self.subject.clone())
    }

    pub fn is_operator(&self) -> bool {
        self.role == Role::Operator
    }

    /// Refuses a viewer an operator's action.
    pub fn require_operator(&self) -> Result<(), ApiError> {
        if self.is_operator() {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "operators_only",
            format!(
                "only operators may queue and cancel; {} reads only",
                self.subject
            ),
        ))
    }
}

/// Sign-in settings, shared by every handler.
#[derive(Debug, Clone, Default)]
pub struct PageAuth(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    /// `host[:port]` of the public URL: the only domain a message may name.
    domain: Option<String>,
    public_url: Option<String>,
    secure_cookies: bool,
    operators: Operators,
    proxy_header: Option<HeaderName>,
    trusted_proxies: Vec<IpAddr>,
    safes: AllowedSafes,
    chains: Chains,
}

impl PageAuth {
    pub fn new(settings: &Settings) -> Self {
        let web = &settings.web;
        let domain = web.public_url.as_ref().and_then(|url| {
            let host = url.host_str()?;
            Some(match url.port() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_owned(),
            })
        });
        PageAuth(Arc::new(Inner {
            domain,
            public_url: web.public_url.as_ref().map(|u| u.as_str().to_owned()),
            secure_cookies: web
                .public_url
                .as_ref()
                .is_some_and(|u| u.scheme() == "https"),
            operators: web.operators.clone(),
            proxy_header: web.proxy_user_header.clone(),
            trusted_proxies: web.trusted_proxies.0.clone(),
            safes: settings.safe.safes.clone(),
            chains: Chains::new(&settings.safe.rpc_urls.0, settings.safe.eth_rpc_url.clone()),
        }))
    }

    /// `host[:port]` of the public URL, when Sign-In with Ethereum is on.
    pub fn domain(&self) -> Option<&str> {
        self.0.domain.as_deref()
    }

    pub fn siwe_enabled(&self) -> bool {
        self.0.domain.is_some()
    }

    pub fn proxy_header(&self) -> Option<&HeaderName> {
        self.0.proxy_header.as_ref()
    }

    /// The chains a message may name: those of the configured Safes.
    fn chain_allowed(&self, chain_id: u64) -> bool {
        self.0.safes.0.iter().any(|(id, _)| *id == chain_id)
    }

    /// An address's role: operator if listed, viewer if it owns a configured
    /// Safe (read from the chain now), else none.
    async fn role_of(&self, address: Address) -> Result<Option<Role>, ApiError> {
        if self.0.operators.addresses.contains(&address) {
            return Ok(Some(Role::Operator));
        }
        for (chain_id, safe) in &self.0.safes.0 {
            let client = self.0.chains.get(*chain_id).ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "chain_unavailable",
                    format!("no RPC URL for chain {chain_id}, so the Safe's owners are unknown"),
                )
            })?;
            match client.owner_kind(*safe).await {
                Ok(OwnerKind::Safe(info)) if info.owners.contains(&address) => {
                    return Ok(Some(Role::Viewer));
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(error = %format!("{err:#}"), "sign-in: cannot read the Safe's owners");
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "chain_unavailable",
                        "cannot read the Safe's owners from the chain; retry later",
                    ));
                }
            }
        }
        Ok(None)
    }

    fn session_cookie(&self, value: &str, max_age_secs: i64) -> HeaderValue {
        let secure = if self.0.secure_cookies {
            "; Secure"
        } else {
            ""
        };
        HeaderValue::from_str(&format!(
            "{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}{secure}"
        ))
        .expect("hex and fixed text")
    }

    fn csrf_cookie(&self, value: &str) -> HeaderValue {
        let secure = if self.0.secure_cookies {
            "; Secure"
        } else {
            ""
        };
        HeaderValue::from_str(&format!(
            "{CSRF_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict{secure}"
        ))
        .expect("hex and fixed text")
    }
}

/// A cookie's value from the request.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn digest(session_id: &str) -> Vec<u8> {
    Sha256::digest(session_id.as_bytes()).to_vec()
}

/// Why a page request is not signed in, each with its own answer.
#[derive(Debug)]
pub enum SignInRequired {
    /// No session and no proxy: go sign in.
    Anonymous,
    /// A session cookie that matches no live session: tampered, ended or expired.
    InvalidSession,
    /// The proxy's user header from an address that is not a trusted proxy.
    UntrustedProxy(String),
    Internal(ApiError),
}

impl IntoResponse for SignInRequired {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            SignInRequired::Anonymous => {
                return (
                    StatusCode::SEE_OTHER,
                    [(axum::http::header::LOCATION, "/login")],
                )
                    .into_response();
            }
            SignInRequired::InvalidSession => (
                StatusCode::UNAUTHORIZED,
                "Your session is not valid (it ended, expired or was altered). Sign in again."
                    .to_owned(),
            ),
            SignInRequired::UntrustedProxy(header) => (
                StatusCode::FORBIDDEN,
                format!(
                    "The {header} header came from an address that is not a trusted proxy; it was ignored and nobody is signed in."
                ),
            ),
            SignInRequired::Internal(err) => return err.into_response(),
        };
        let mut response =
            super::ui::message_page(status, "Not signed in", &message, true).into_response();
        // Forget a cookie that signs nobody in.
        response.headers_mut().append(
            SET_COOKIE,
            HeaderValue::from_static("ab_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
        );
        response
    }
}

impl FromRequestParts<AppState> for PageUser {
    type Rejection = SignInRequired;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let auth = &state.page_auth;
        if let Some(header) = auth.proxy_header()
            && let Some(value) = parts.headers.get(header)
        {
            let peer = parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip());
            if !peer.is_some_and(|ip| auth.0.trusted_proxies.contains(&ip)) {
                tracing::warn!(peer = ?peer, header = %header, "proxy user header from an untrusted address");
                return Err(SignInRequired::UntrustedProxy(header.to_string()));
            }
            let user = value.to_str().unwrap_or_default().trim();
            if user.is_empty() {
                return Err(SignInRequired::UntrustedProxy(header.to_string()));
            }
            let role = if auth.0.operators.users.iter().any(|u| u == user) {
                Role::Operator
            } else {
                Role::Viewer
            };
            return Ok(PageUser {
                subject: user.to_owned(),
                role,
            });
        }
        let Some(session) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(SignInRequired::Anonymous);
        };
        let found = state
            .store
            .web_session(&digest(session), state.clock.now())
            .await
            .map_err(|err| SignInRequired::Internal(err.into()))?;
        let session = found.ok_or(SignInRequired::InvalidSession)?;
        let role = if session.role == Role::Operator.as_str() {
            Role::Operator
        } else {
            Role::Viewer
        };
        Ok(PageUser {
            subject: session.subject,
            role,
        })
    }
}

/// The CSRF token of this browser: its `ab_csrf` cookie, or a new one with
/// the `Set-Cookie` that stores it.
pub fn csrf_token(auth: &PageAuth, headers: &HeaderMap) -> (String, Option<HeaderValue>) {
    match cookie(headers, CSRF_COOKIE).filter(|v| v.len() == 64) {
        Some(token) => (token.to_owned(), None),
        None => {
            let token = random_hex();
            let cookie = auth.csrf_cookie(&token);
            (token, Some(cookie))
        }
    }
}

/// Refuses a state-changing request whose token (form field or header) is
/// missing or is not the browser's `ab_csrf` cookie.
pub fn check_csrf(headers: &HeaderMap, form_token: Option<&str>) -> Result<(), ApiError> {
    let presented = form_token
        .or_else(|| headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()))
        .unwrap_or_default();
    let expected = cookie(headers, CSRF_COOKIE).unwrap_or_default();
    if presented.is_empty()
        || expected.is_empty()
        || !bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "csrf_token_invalid",
            "this form's CSRF token is missing or stale: reload the page and try again",
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageRequest {
    address: String,
    chain_id: u64,
}

#[derive(Debug, Serialize)]
pub struct MessageAnswer {
    message: String,
}

fn siwe_disabled() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "siwe_disabled",
        "Sign-In with Ethereum is off: set APPROVAL_BRIDGE_PUBLIC_URL",
    )
}

fn to_time(at: DateTime<Utc>) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(at.timestamp())
        .expect("a chrono time is in range")
        .replace_nanosecond(at.timestamp_subsec_nanos())
        .expect("under a second")
}

/// `POST /login/message` `{address, chain_id}`: the EIP-4361 message to sign,
/// with a fresh single-use nonce.
pub async fn message(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<MessageRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<MessageAnswer>, ApiError> {
    check_csrf(&headers, None)?;
    let Json(body) = body.map_err(|err| ApiError::bad_request("invalid_body", err.body_text()))?;
    let auth = &state.page_auth;
    let (Some(domain), Some(uri)) = (&auth.0.domain, &auth.0.public_url) else {
        return Err(siwe_disabled());
    };
    let address: Address = body.address.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_address",
            format!("`{}` is not an address", body.address),
        )
    })?;
    if !auth.chain_allowed(body.chain_id) {
        return Err(wrong_chain(auth, body.chain_id));
    }
    let now = state.clock.now();
    let expires = now + Duration::minutes(NONCE_TTL_MINUTES);
    let nonce = siwe::generate_nonce();
    if !state
        .store
        .insert_web_nonce(&nonce, now, expires, MAX_OPEN_NONCES)
        .await?
    {
        return Err(ApiError::RateLimited {
            message: "too many sign-ins are waiting for a signature; retry in a few minutes"
                .to_owned(),
            retry_after_secs: 60,
        });
    }
    let message = siwe::Message {
        domain: domain.parse().map_err(anyhow::Error::from)?,
        address: address.0.0,
        statement: Some(STATEMENT.to_owned()),
        uri: uri
            .parse()
            .map_err(|_| anyhow::anyhow!("the public URL is not a URI"))?,
        version: siwe::Version::V1,
        chain_id: body.chain_id,
        nonce,
        issued_at: to_time(now).into(),
        expiration_time: Some(to_time(expires).into()),
        not_before: None,
        request_id: None,
        resources: Vec::new(),
    };
    Ok(Json(MessageAnswer {
        message: message.to_string(),
    }))
}

fn wrong_chain(auth: &PageAuth, chain_id: u64) -> ApiError {
    let chains: Vec<String> = auth
        .0
        .safes
        .0
        .iter()
        .map(|(id, _)| id.to_string())
        .collect();
    ApiError::unprocessable(
        "wrong_chain",
        format!(
            "the message is for chain {chain_id}; sign in on the chain of a configured Safe ({})",
            if chains.is_empty() {
                "none configured".to_owned()
            } else {
                chains.join(", ")
            }
        ),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignInRequest {
    message: String,
    signature: String,
}

#[derive(Debug, Serialize)]
pub struct SignInAnswer {
    subject: String,
    role: &'static str,
    redirect: &'static str,
}

/// `POST /login` `{message, signature}`: checks the message's domain, URI,
/// chain, times and signature, then uses its nonce up, then starts a
/// session. Any failure creates nothing.
pub async fn sign_in(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<SignInRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    check_csrf(&headers, None)?;
    let Json(body) = body.map_err(|err| ApiError::bad_request("invalid_body", err.body_text()))?;
    let auth = &state.page_auth;
    let (Some(domain), Some(uri)) = (&auth.0.domain, &auth.0.public_url) else {
        return Err(siwe_disabled());
    };
    let message: siwe::Message = body.message.parse().map_err(|err: siwe::ParseError| {
        ApiError::bad_request(
            "invalid_message",
            format!("not a Sign-In with Ethereum message: {err}"),
        )
    })?;
    if message.domain.as_str() != domain {
        return Err(ApiError::unprocessable(
            "wrong_domain",
            format!("the message is for `{}`, not `{domain}`", message.domain),
        ));
    }
    if message.uri.as_str() != uri {
        return Err(ApiError::unprocessable(
            "wrong_uri",
            format!("the message's URI is `{}`, not `{uri}`", message.uri),
        ));
    }
    if !auth.chain_allowed(message.chain_id) {
        return Err(wrong_chain(auth, message.chain_id));
    }
    let signature = hex::decode(body.signature.trim().trim_start_matches("0x"))
        .map_err(|_| ApiError::bad_request("invalid_signature", "the signature is not hex"))?;
    let now = state.clock.now();
    let options = siwe::VerificationOpts {
        timestamp: Some(to_time(now)),
        ..Default::default()
    };
    message
        .verify(&signature, &options)
        .await
        .map_err(|err| match err {
            siwe::VerificationError::Time => ApiError::unprocessable(
                "message_expired",
                "the message has expired (or is not valid yet): sign in again",
            ),
            _ => ApiError::unauthorized(format!(
                "the signature does not verify for {}: {err}",
                Address::from(message.address).to_checksum(None)
            )),
        })?;
    if !state.store.take_web_nonce(&message.nonce, now).await? {
        return Err(ApiError::unauthorized(
            "the message's nonce is unknown, used already or expired: sign in again",
        ));
    }
    let address = Address::from(message.address);
    let subject = address.to_checksum(None);
    let role = auth.role_of(address).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "not_allowed",
            format!("{subject} is neither an operator nor an owner of a configured Safe"),
        )
    })?;
    let session = random_hex();
    let expires = now + Duration::hours(SESSION_TTL_HOURS);
    state
        .store
        .insert_web_session(&digest(&session), &subject, role.as_str(), now, expires)
        .await?;
    tracing::info!(subject = %subject, role = role.as_str(), "signed in with Ethereum");
    let mut response = Json(SignInAnswer {
        subject,
        role: role.as_str(),
        redirect: "/replicas",
    })
    .into_response();
    response.headers_mut().append(
        SET_COOKIE,
        auth.session_cookie(&session, SESSION_TTL_HOURS * 3600),
    );
    Ok(response)
}

/// Ends the session of this request, if any; answers the cookie that forgets it.
pub async fn sign_out(state: &AppState, headers: &HeaderMap) -> Result<HeaderValue, ApiError> {
    if let Some(session) = cookie(headers, SESSION_COOKIE) {
        state.store.delete_web_session(&digest(session)).await?;
    }
    Ok(state.page_auth.session_cookie("", 0))
}
