//! Who is on the team page. Two ways in: Sign-In with Ethereum (EIP-4361),
//! which ends in a session cookie, and an SSO proxy's user header, believed
//! only from the proxy's own addresses and with its shared secret. Operators
//! (by address or user name) may queue and cancel; the owners of the
//! configured Safes, and anyone the proxy lets through, read. The role is
//! decided again on every request, from the operators list and the Safes'
//! owners (read from the chain at most a minute earlier), so a session ends
//! when its person is no longer either.
//!
//! A session id lives only in its HttpOnly, SameSite=Strict cookie; the
//! database keeps its SHA-256 digest. Over https (the public URL says so, or
//! a trusted proxy's `X-Forwarded-Proto`) the cookies are `__Host-` ones,
//! which no sibling domain and no plain-http answer can set. Every
//! state-changing page request carries a CSRF token that is a MAC of the
//! session id (before sign-in: of the browser's `ab_csrf` cookie) under the
//! server's key, so a planted cookie is worth nothing; the `Origin` check in
//! `security` refuses cross-site requests before they get here.
//!
//! A signature counts when the message's address made it with its key
//! (EIP-191), or, for a wallet that is a contract (a Safe owning the Safe),
//! when that contract accepts it: `isValidSignature` (EIP-1271) asked on the
//! message's chain through the configured RPC, bounded in time. A chain that
//! cannot be asked is "retry later", never a yes.
//!
//! Sign-in nonces are stateless: random bytes, an expiry and a MAC. Asking
//! for one stores nothing; only used nonces are kept, until they expire, so a
//! signed message works once and no flood of requests fills a table.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};

use alloy::primitives::{Address, B256, Bytes};
use axum::Json;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::header::{COOKIE, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Duration, Utc};
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::chain::{Chains, OwnerKind};
use crate::config::{AllowedSafes, Operators, Settings};
use crate::domain::Actor;
use crate::web::AppState;
use crate::web::error::ApiError;

const SESSION_COOKIE: &str = "ab_session";
const CSRF_COOKIE: &str = "ab_csrf";
/// The form field, and for `fetch` the header, that carries the CSRF token.
pub const CSRF_FIELD: &str = "csrf";
const CSRF_HEADER: &str = "x-csrf-token";
/// The header in which the SSO proxy sends its shared secret.
pub const PROXY_SECRET_HEADER: &str = "x-proxy-secret";
/// How long a sign-in message may wait for its signature.
const NONCE_TTL_MINUTES: i64 = 10;
const SESSION_TTL_HOURS: i64 = 8;
/// How long a Safe's owners, once read from the chain, decide roles.
const OWNERS_TTL_SECS: i64 = 60;
const STATEMENT: &str = "Sign in to approval-bridge.";
/// How long a contract account's `isValidSignature` may take before sign-in
/// answers "retry later". Below the RPC transport's own retries (about 30 s
/// for a provider that never answers): a person is waiting.
const CONTRACT_SIGNATURE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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

/// The MAC key of CSRF tokens and nonces; never printed.
struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key([redacted])")
    }
}

impl Key {
    /// HMAC-SHA256 under the server's key of `purpose` and `data`.
    fn mac(&self, purpose: &str, data: &[u8]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("any key length");
        mac.update(purpose.as_bytes());
        mac.update(&[0]);
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// A fresh sign-in nonce valid until `expires`: 16 random bytes, the
    /// expiry and a MAC of both, in hex (EIP-4361 wants alphanumerics).
    fn new_nonce(&self, expires: DateTime<Utc>) -> String {
        let mut body = [0u8; 24];
        rand::thread_rng().fill_bytes(&mut body[..16]);
        body[16..].copy_from_slice(&expires.timestamp().to_be_bytes());
        let mac = self.mac("siwe-nonce", &body);
        format!("{}{}", hex::encode(body), hex::encode(&mac[..16]))
    }

    /// When a nonce of this bridge expires; `None` for one it did not make.
    fn nonce_expiry(&self, nonce: &str) -> Option<DateTime<Utc>> {
        let bytes = hex::decode(nonce).ok().filter(|b| b.len() == 40)?;
        let (body, mac) = bytes.split_at(24);
        if !bool::from(self.mac("siwe-nonce", body)[..16].ct_eq(mac)) {
            return None;
        }
        let secs = i64::from_be_bytes(body[16..].try_into().expect("8 bytes"));
        DateTime::from_timestamp(secs, 0)
    }

    /// The CSRF token of a session, or of a browser not signed in.
    fn csrf_for(&self, binding: &Binding) -> String {
        let mac = match binding {
            Binding::Session(id) => self.mac("csrf-session", id.as_bytes()),
            Binding::Browser(id) => self.mac("csrf-browser", id.as_bytes()),
        };
        hex::encode(mac)
    }
}

/// A Safe's owners as last read, and when.
type OwnersCache = Mutex<HashMap<(u64, Address), (Arc<Vec<Address>>, DateTime<Utc>)>>;

/// Sign-in settings, shared by every handler.
#[derive(Debug, Clone)]
pub struct PageAuth(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    /// `host[:port]` of the public URL: the only domain a message may name.
    domain: Option<String>,
    public_url: Option<String>,
    /// `scheme://host[:port]` of the public URL.
    public_origin: Option<String>,
    /// The public URL is https: every answer is treated as sent over https.
    https_url: bool,
    operators: Operators,
    proxy_header: Option<HeaderName>,
    /// SHA-256 of the proxy's shared secret.
    proxy_secret: Option<[u8; 32]>,
    trusted_proxies: Vec<IpAddr>,
    safes: AllowedSafes,
    chains: Chains,
    key: Key,
    owners: OwnersCache,
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
        let key = match &web.session_secret {
            Some(secret) => Sha256::digest(secret.expose_secret().as_bytes()).into(),
            None => {
                if web.public_url.is_some() || web.proxy_user_header.is_some() {
                    tracing::info!(
                        "APPROVAL_BRIDGE_SESSION_SECRET is not set: this process draws its own \
                         key for CSRF tokens and sign-in nonces, which other processes and the \
                         next start do not share"
                    );
                }
                let mut key = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut key);
                key
            }
        };
        PageAuth(Arc::new(Inner {
            domain,
            public_url: web.public_url.as_ref().map(|u| u.as_str().to_owned()),
            public_origin: web
                .public_url
                .as_ref()
                .map(|u| u.origin().ascii_serialization()),
            https_url: web
                .public_url
                .as_ref()
                .is_some_and(|u| u.scheme() == "https"),
            operators: web.operators.clone(),
            proxy_header: web.proxy_user_header.clone(),
            proxy_secret: web
                .proxy_secret
                .as_ref()
                .map(|s| Sha256::digest(s.expose_secret().as_bytes()).into()),
            trusted_proxies: web.trusted_proxies.0.clone(),
            safes: settings.safe.safes.clone(),
            chains: Chains::new(&settings.safe.rpc_urls.0, settings.safe.eth_rpc_url.clone()),
            key: Key(key),
            owners: Mutex::default(),
        }))
    }

    /// `host[:port]` of the public URL, when Sign-In with Ethereum is on.
    pub fn domain(&self) -> Option<&str> {
        self.0.domain.as_deref()
    }

    /// `scheme://host[:port]` of the public URL: the origin of the page.
    pub fn public_origin(&self) -> Option<&str> {
        self.0.public_origin.as_deref()
    }

    pub fn siwe_enabled(&self) -> bool {
        self.0.domain.is_some()
    }

    pub fn proxy_header(&self) -> Option<&HeaderName> {
        self.0.proxy_header.as_ref()
    }

    /// Whether `peer` is a trusted proxy: its user header and its
    /// `X-Forwarded-Proto` count.
    pub fn trusts(&self, peer: Option<IpAddr>) -> bool {
        peer.is_some_and(|ip| self.0.trusted_proxies.contains(&ip))
    }

    /// Whether this request reached the bridge over https: the public URL
    /// is https, or a trusted proxy says so (`security::transport` drops
    /// `X-Forwarded-Proto` from anyone else).
    pub fn https(&self, headers: &HeaderMap) -> bool {
        self.0.https_url
            || headers
                .get("x-forwarded-proto")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
    }

    /// The chains a message may name: those of the configured Safes.
    fn chain_allowed(&self, chain_id: u64) -> bool {
        self.0.safes.0.iter().any(|(id, _)| *id == chain_id)
    }

    /// An address's role now: operator if listed, viewer if it owns a
    /// configured Safe (read from the chain at most a minute ago), else none.
    async fn role_of(
        &self,
        address: Address,
        now: DateTime<Utc>,
    ) -> Result<Option<Role>, ApiError> {
        if self.0.operators.addresses.contains(&address) {
            return Ok(Some(Role::Operator));
        }
        for (chain_id, safe) in &self.0.safes.0 {
            if self.owners(*chain_id, *safe, now).await?.contains(&address) {
                return Ok(Some(Role::Viewer));
            }
        }
        Ok(None)
    }

    /// A Safe's owners, from the cache while under a minute old.
    async fn owners(
        &self,
        chain_id: u64,
        safe: Address,
        now: DateTime<Utc>,
    ) -> Result<Arc<Vec<Address>>, ApiError> {
        let cached = self
            .0
            .owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(chain_id, safe))
            .cloned();
        if let Some((owners, read_at)) = cached
            && now >= read_at
            && now - read_at < Duration::seconds(OWNERS_TTL_SECS)
        {
            return Ok(owners);
        }
        let client = self.0.chains.get(chain_id).ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "chain_unavailable",
                format!("no RPC URL for chain {chain_id}, so the Safe's owners are unknown"),
            )
        })?;
        let owners = match client.owner_kind(safe).await {
            Ok(OwnerKind::Safe(info)) => Arc::new(info.owners),
            Ok(_) => Arc::new(Vec::new()),
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "sign-in: cannot read the Safe's owners");
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "chain_unavailable",
                    "cannot read the Safe's owners from the chain; retry later",
                ));
            }
        };
        self.0
            .owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((chain_id, safe), (owners.clone(), now));
        Ok(owners)
    }

    /// Whether `signature` signs `message` for the message's address: made
    /// by that address's key (EIP-191), or accepted by that address as a
    /// contract account (EIP-1271) on the message's chain. A key's signature
    /// needs no call: no one holds the key of a contract's address, and an
    /// account whose key signed is that key's (an EIP-7702 account too).
    async fn verify_signature(
        &self,
        message: &siwe::Message,
        signature: &[u8],
    ) -> Result<(), ApiError> {
        if let Ok(signature) = <&[u8; 65]>::try_from(signature)
            && message.verify_eip191(signature).is_ok()
        {
            return Ok(());
        }
        let address = Address::from(message.address);
        let subject = address.to_checksum(None);
        let chain_id = message.chain_id;
        let hash = B256::from(message.eip191_hash().map_err(anyhow::Error::from)?);
        let client = self.0.chains.get(chain_id).ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "chain_unavailable",
                format!(
                    "no RPC URL for chain {chain_id}, so a contract wallet's signature cannot be checked"
                ),
            )
        })?;
        let asked = tokio::time::timeout(
            CONTRACT_SIGNATURE_TIMEOUT,
            client.accepts_signature(address, hash, Bytes::copy_from_slice(signature)),
        )
        .await;
        let failure = match asked {
            Ok(Ok(true)) => return Ok(()),
            Ok(Ok(false)) => {
                return Err(ApiError::unauthorized(format!(
                    "the signature does not verify for {subject}: {subject}'s key did not make it, \
                     and {subject} does not accept it as a contract wallet (EIP-1271)"
                )));
            }
            Ok(Err(err)) => format!("{err:#}"),
            Err(_) => format!(
                "no answer within {} s",
                CONTRACT_SIGNATURE_TIMEOUT.as_secs()
            ),
        };
        tracing::warn!(subject = %subject, chain_id, error = %failure, "sign-in: cannot ask a contract wallet about its signature");
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "signature_unverifiable",
            format!(
                "cannot ask {subject} on chain {chain_id} whether it accepts the signature \
                 (EIP-1271): the chain does not answer; retry later"
            ),
        ))
    }

    fn cookie_name(&self, headers: &HeaderMap, name: &str) -> String {
        if self.https(headers) {
            format!("__Host-{name}")
        } else {
            name.to_owned()
        }
    }

    /// A cookie for the whole site: `__Host-` and `Secure` over https.
    fn set_cookie(
        &self,
        headers: &HeaderMap,
        name: &str,
        value: &str,
        max_age: Option<i64>,
    ) -> HeaderValue {
        let https = self.https(headers);
        let name = self.cookie_name(headers, name);
        let secure = if https { "; Secure" } else { "" };
        let max_age = max_age
            .map(|secs| format!("; Max-Age={secs}"))
            .unwrap_or_default();
        HeaderValue::from_str(&format!(
            "{name}={value}; Path=/; HttpOnly; SameSite=Strict{max_age}{secure}"
        ))
        .expect("hex and fixed text")
    }

    fn session_cookie(&self, headers: &HeaderMap, value: &str, max_age_secs: i64) -> HeaderValue {
        self.set_cookie(headers, SESSION_COOKIE, value, Some(max_age_secs))
    }

    /// The session id this request carries, if any.
    fn session_id<'a>(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        cookie(headers, &self.cookie_name(headers, SESSION_COOKIE)).filter(|v| !v.is_empty())
    }

    /// What this request's CSRF token is a MAC of.
    fn binding(&self, headers: &HeaderMap) -> Option<Binding> {
        if let Some(session) = self.session_id(headers) {
            return Some(Binding::Session(session.to_owned()));
        }
        cookie(headers, &self.cookie_name(headers, CSRF_COOKIE))
            .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(|v| Binding::Browser(v.to_owned()))
    }

    /// Whether the proxy's shared secret came with this request.
    fn proxy_secret_ok(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.0.proxy_secret else {
            return false;
        };
        let presented: [u8; 32] = match headers.get(PROXY_SECRET_HEADER) {
            Some(value) => Sha256::digest(value.as_bytes()).into(),
            None => return false,
        };
        bool::from(expected.ct_eq(&presented))
    }
}

/// What a CSRF token is tied to.
enum Binding {
    /// The session id, once signed in.
    Session(String),
    /// The browser's random `ab_csrf` cookie, before that.
    Browser(String),
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
    /// A session cookie that matches no live session: tampered, ended or
    /// expired. Carries the `Set-Cookie` that forgets it.
    InvalidSession(HeaderValue),
    /// A session whose person is no longer an operator or an owner: it is
    /// ended now.
    Revoked(String, HeaderValue),
    /// The proxy's user header from an address that is not a trusted proxy.
    UntrustedProxy(String),
    /// The proxy's user header without the proxy's shared secret.
    ProxySecretMissing(String),
    Internal(ApiError),
}

/// The signed-in person of a page request, once the [`PageUser`] extractor
/// knew them: the page layer puts an empty slot in the request, so that an
/// error page answered later keeps the person's header.
#[derive(Clone, Default)]
pub struct SignedIn(pub Arc<OnceLock<PageUser>>);

fn remember_signed_in(parts: &Parts, user: &PageUser) {
    if let Some(slot) = parts.extensions.get::<SignedIn>() {
        let _ = slot.0.set(user.clone());
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
            if !auth.trusts(peer) {
                tracing::warn!(peer = ?peer, header = %header, "proxy user header from an untrusted address");
                return Err(SignInRequired::UntrustedProxy(header.to_string()));
            }
            if !auth.proxy_secret_ok(&parts.headers) {
                tracing::warn!(peer = ?peer, header = %header, "proxy user header without the proxy's secret");
                return Err(SignInRequired::ProxySecretMissing(header.to_string()));
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
            let user = PageUser {
                subject: user.to_owned(),
                role,
            };
            remember_signed_in(parts, &user);
            return Ok(user);
        }
        let Some(session) = auth.session_id(&parts.headers) else {
            return Err(SignInRequired::Anonymous);
        };
        let id_digest = digest(session);
        let forget = auth.session_cookie(&parts.headers, "", 0);
        let now = state.clock.now();
        let found = state
            .store
            .web_session(&id_digest, now)
            .await
            .map_err(|err| SignInRequired::Internal(err.into()))?;
        let session = found.ok_or(SignInRequired::InvalidSession(forget.clone()))?;
        // The role is the configuration's and the chain's of now, not the
        // one at sign-in. Sessions are made only by Sign-In with Ethereum,
        // so the subject is an address.
        let role = match session.subject.parse::<Address>() {
            Ok(address) => auth
                .role_of(address, now)
                .await
                .map_err(SignInRequired::Internal)?,
            Err(_) => None,
        };
        let Some(role) = role else {
            state
                .store
                .delete_web_session(&id_digest)
                .await
                .map_err(|err| SignInRequired::Internal(err.into()))?;
            tracing::info!(subject = %session.subject, "session ended: no longer an operator or owner");
            return Err(SignInRequired::Revoked(session.subject, forget));
        };
        let user = PageUser {
            subject: session.subject,
            role,
        };
        remember_signed_in(parts, &user);
        Ok(user)
    }
}

/// The CSRF token of this browser: the MAC of its session, or of its
/// `ab_csrf` cookie, or of a new one with the `Set-Cookie` that stores it.
pub fn csrf_token(auth: &PageAuth, headers: &HeaderMap) -> (String, Option<HeaderValue>) {
    match auth.binding(headers) {
        Some(binding) => (auth.0.key.csrf_for(&binding), None),
        None => {
            let id = random_hex();
            let cookie = auth.set_cookie(headers, CSRF_COOKIE, &id, None);
            (auth.0.key.csrf_for(&Binding::Browser(id)), Some(cookie))
        }
    }
}

/// Refuses a state-changing request whose token (form field or header) is
/// missing or is not the MAC of this browser's session (or, before sign-in,
/// of its `ab_csrf` cookie).
pub fn check_csrf(
    auth: &PageAuth,
    headers: &HeaderMap,
    form_token: Option<&str>,
) -> Result<(), ApiError> {
    let presented = form_token
        .or_else(|| headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()))
        .unwrap_or_default();
    let expected = auth
        .binding(headers)
        .map(|b| auth.0.key.csrf_for(&b))
        .unwrap_or_default();
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
/// with a fresh single-use nonce. It stores nothing, so asking many times
/// costs the bridge nothing and locks nobody out.
pub async fn message(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<MessageRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<MessageAnswer>, ApiError> {
    let auth = &state.page_auth;
    check_csrf(auth, &headers, None)?;
    let Json(body) = body.map_err(|err| ApiError::bad_request("invalid_body", err.body_text()))?;
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
    // Stateless: nothing is stored until the nonce is used.
    let nonce = auth.0.key.new_nonce(expires);
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
/// chain, times, nonce and signature (a key's, or a contract wallet's), then
/// uses its nonce up, then starts a session. Any failure creates nothing.
pub async fn sign_in(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<SignInRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let auth = &state.page_auth;
    check_csrf(auth, &headers, None)?;
    let Json(body) = body.map_err(|err| ApiError::bad_request("invalid_body", err.body_text()))?;
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
    if !message.valid_at(&to_time(now)) {
        return Err(ApiError::unprocessable(
            "message_expired",
            "the message has expired (or is not valid yet): sign in again",
        ));
    }
    let stale_nonce = || {
        ApiError::unauthorized(
            "the message's nonce is unknown, used already or expired: sign in again",
        )
    };
    // Before the signature: checking a contract wallet's signature calls the
    // chain, which only a fresh message of this bridge's may cost.
    let nonce_expires = auth
        .0
        .key
        .nonce_expiry(&message.nonce)
        .filter(|expires| *expires > now)
        .ok_or_else(stale_nonce)?;
    auth.verify_signature(&message, &signature).await?;
    let address = Address::from(message.address);
    let subject = address.to_checksum(None);
    let role = auth.role_of(address, now).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "not_allowed",
            format!("{subject} is neither an operator nor an owner of a configured Safe"),
        )
    })?;
    // Only now is the nonce stored, as used: a flood of messages stores
    // nothing, and only people who may sign in store anything.
    if !state
        .store
        .use_web_nonce(&message.nonce, now, nonce_expires)
        .await?
    {
        return Err(stale_nonce());
    }
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
        auth.session_cookie(&headers, &session, SESSION_TTL_HOURS * 3600),
    );
    Ok(response)
}

/// Ends the session of this request, if any, or with `everywhere` every
/// session of its person; answers the cookie that forgets it.
pub async fn sign_out(
    state: &AppState,
    headers: &HeaderMap,
    everywhere: bool,
) -> Result<HeaderValue, ApiError> {
    let auth = &state.page_auth;
    if let Some(session) = auth.session_id(headers) {
        let id_digest = digest(session);
        match state
            .store
            .web_session(&id_digest, state.clock.now())
            .await?
        {
            Some(found) if everywhere => {
                let ended = state.store.delete_web_sessions_of(&found.subject).await?;
                tracing::info!(subject = %found.subject, sessions = ended, "signed out everywhere");
            }
            _ => state.store.delete_web_session(&id_digest).await?,
        }
    }
    Ok(auth.session_cookie(headers, "", 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_counts_only_unaltered_and_under_the_key_that_made_it() {
        let key = Key([7; 32]);
        let expires = DateTime::from_timestamp(1_900_000_000, 0).unwrap();
        let nonce = key.new_nonce(expires);
        assert_eq!(nonce.len(), 80);
        assert!(
            nonce.chars().all(|c| c.is_ascii_alphanumeric()),
            "EIP-4361 wants alphanumerics"
        );
        assert_eq!(key.nonce_expiry(&nonce), Some(expires));
        assert_ne!(key.new_nonce(expires), nonce, "random");
        // A later expiry written into it, a flipped MAC, another key, junk.
        let later = format!(
            "{}{}{}",
            &nonce[..32],
            hex::encode(2_000_000_000i64.to_be_bytes()),
            &nonce[48..]
        );
        let mut flipped = nonce.clone().into_bytes();
        flipped[79] = if flipped[79] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        for forged in [later.as_str(), flipped.as_str(), "kEWepMt9knR6lWJ6A", ""] {
            assert_eq!(key.nonce_expiry(forged), None, "{forged}");
        }
        assert_eq!(Key([8; 32]).nonce_expiry(&nonce), None);
    }

    #[test]
    fn csrf_tokens_differ_by_session_browser_and_key() {
        let key = Key([7; 32]);
        let session = key.csrf_for(&Binding::Session("a".repeat(64)));
        let browser = key.csrf_for(&Binding::Browser("a".repeat(64)));
        assert_ne!(session, browser, "a browser id is no session id");
        assert_ne!(session, key.csrf_for(&Binding::Session("b".repeat(64))));
        assert_ne!(
            session,
            Key([8; 32]).csrf_for(&Binding::Session("a".repeat(64)))
        );
        assert_eq!(session, key.csrf_for(&Binding::Session("a".repeat(64))));
    }
}
