//! A per-client rate limit on what anyone may call without credentials:
//! sign-in, the login and static pages, the CI webhook before its signature
//! is checked, `/` and `/health`. A token bucket per client address refills
//! at `APPROVAL_BRIDGE_CLIENT_RATE_PER_MINUTE` and holds as many; a client
//! that runs dry gets 429 with `Retry-After` (a page for a browser, JSON for
//! anyone else) before any handler, database or outside call runs.
//!
//! Routes that need credentials (the JSON API, the signed-in pages) are not
//! charged for what succeeds, so an open page that polls costs nothing. A
//! credential they refuse (401) costs a token, and a client with none left is
//! refused before its credential is looked up: guessing tokens or session
//! ids is limited as sign-in is.
//!
//! The client is the peer's address, or, from a trusted proxy
//! (`APPROVAL_BRIDGE_TRUSTED_PROXIES`), the address its `X-Forwarded-For`
//! names. An IPv6 client counts by its /64, which one host usually holds.
//!
//! The buckets live in two generations of at most half of
//! `APPROVAL_BRIDGE_CLIENT_RATE_MAX_CLIENTS` each: when the current one is
//! full, the previous one is dropped, so a flood of addresses costs bounded
//! memory and forgets the clients seen longest ago (a forgotten client starts
//! again with a full bucket, as a new one does).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{ACCEPT, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};

use crate::config::ServerSettings;
use crate::web::AppState;
use crate::web::error::ErrorBody;

/// Clients refused by the limit.
const LIMITED: &str = "approval_bridge_rate_limited_total";
/// Client addresses the limit remembers now (set at each scrape).
pub const TRACKED_CLIENTS: &str = "approval_bridge_rate_limit_clients";

/// One client's bucket: tokens left when last seen.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: DateTime<Utc>,
}

#[derive(Debug)]
struct Buckets {
    current: HashMap<IpAddr, Bucket>,
    previous: HashMap<IpAddr, Bucket>,
}

/// The per-client token buckets, shared by every request of a listener.
#[derive(Debug, Clone)]
pub struct ClientLimiter {
    per_minute: u32,
    /// Most clients in one generation: half of all it may remember.
    generation: usize,
    buckets: Arc<Mutex<Buckets>>,
}

impl ClientLimiter {
    pub fn new(settings: &ServerSettings) -> Self {
        Self::with(
            settings.client_rate_per_minute,
            settings.client_rate_max_clients,
        )
    }

    fn with(per_minute: u32, max_clients: usize) -> Self {
        ClientLimiter {
            per_minute,
            generation: (max_clients / 2).max(1),
            buckets: Arc::new(Mutex::new(Buckets {
                current: HashMap::new(),
                previous: HashMap::new(),
            })),
        }
    }

    /// Whether the limit is on (`APPROVAL_BRIDGE_CLIENT_RATE_PER_MINUTE` > 0).
    pub fn enabled(&self) -> bool {
        self.per_minute > 0
    }

    /// How many client addresses it remembers.
    pub fn clients(&self) -> usize {
        let buckets = self.lock();
        buckets.current.len() + buckets.previous.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tokens per second.
    fn rate(&self) -> f64 {
        f64::from(self.per_minute) / 60.0
    }

    /// `client`'s bucket as of `now`, refilled, moved into the current
    /// generation (a new client gets a full one).
    fn bucket<'a>(
        &self,
        buckets: &'a mut Buckets,
        client: IpAddr,
        now: DateTime<Utc>,
    ) -> &'a mut Bucket {
        if !buckets.current.contains_key(&client) {
            let found = buckets.previous.remove(&client);
            if buckets.current.len() >= self.generation {
                buckets.previous = std::mem::take(&mut buckets.current);
            }
            let full = Bucket {
                tokens: f64::from(self.per_minute),
                at: now,
            };
            buckets.current.insert(client, found.unwrap_or(full));
        }
        let bucket = buckets.current.get_mut(&client).expect("inserted above");
        // A clock that stepped back refills nothing.
        let elapsed = (now - bucket.at).num_milliseconds().max(0) as f64 / 1000.0;
        bucket.tokens = (bucket.tokens + elapsed * self.rate()).min(f64::from(self.per_minute));
        bucket.at = bucket.at.max(now);
        bucket
    }

    /// Takes a token from `client`'s bucket; `Err` with the seconds until
    /// one is back when it is empty.
    fn take(&self, client: IpAddr, now: DateTime<Utc>) -> Result<(), u64> {
        let mut buckets = self.lock();
        let bucket = self.bucket(&mut buckets, client, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(((1.0 - bucket.tokens) / self.rate()).ceil().max(1.0) as u64)
    }

    /// Whether `client` has a token left, taking none; a client it does not
    /// remember has, and is not remembered for asking.
    fn check(&self, client: IpAddr, now: DateTime<Utc>) -> Result<(), u64> {
        let mut buckets = self.lock();
        if !buckets.current.contains_key(&client) && !buckets.previous.contains_key(&client) {
            return Ok(());
        }
        let bucket = self.bucket(&mut buckets, client, now);
        if bucket.tokens >= 1.0 {
            return Ok(());
        }
        Err(((1.0 - bucket.tokens) / self.rate()).ceil().max(1.0) as u64)
    }
}

/// The client a request counts against: the peer, or the address a trusted
/// proxy names. `X-Forwarded-For` is read from the right, past the trusted
/// proxies, since every hop appends and only what they appended is theirs;
/// whatever the client wrote itself is further left.
fn client_of(peer: IpAddr, headers: &HeaderMap, trusted: impl Fn(IpAddr) -> bool) -> IpAddr {
    if !trusted(peer) {
        return key_of(peer);
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) if trusted(ip) => continue,
            Ok(ip) => return key_of(ip),
            // Not what a proxy of ours appends: nothing left of it counts.
            Err(_) => break,
        }
    }
    key_of(peer)
}

/// IPv4 as it is (also when mapped into IPv6); IPv6 by its /64.
fn key_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

fn client_of_request(state: &AppState, request: &Request) -> Option<IpAddr> {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()?
        .0
        .ip();
    let auth = &state.page_auth;
    Some(client_of(peer, request.headers(), |ip| {
        auth.trusts(Some(ip))
    }))
}

/// On the routes that need no credentials: every request takes a token.
pub async fn limit_anonymous(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let limiter = &state.client_limiter;
    if limiter.enabled()
        && let Some(client) = client_of_request(&state, &request)
        && let Err(retry_after) = limiter.take(client, state.clock.now())
    {
        return too_many_requests(&request, client, retry_after);
    }
    next.run(request).await
}

/// On the routes that need credentials: a client with no token left is
/// refused before its credential is looked up, and a refused credential
/// (401) takes a token.
pub async fn limit_refused_credentials(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let limiter = &state.client_limiter;
    let client = client_of_request(&state, &request).filter(|_| limiter.enabled());
    let Some(client) = client else {
        return next.run(request).await;
    };
    if let Err(retry_after) = limiter.check(client, state.clock.now()) {
        return too_many_requests(&request, client, retry_after);
    }
    let response = next.run(request).await;
    if response.status() == StatusCode::UNAUTHORIZED {
        // Empty already or not, the answer stands: the next one is refused.
        let _ = limiter.take(client, state.clock.now());
    }
    response
}

/// 429 with `Retry-After`: a page for a browser, JSON for anyone else.
fn too_many_requests(request: &Request, client: IpAddr, retry_after: u64) -> Response {
    metrics::counter!(LIMITED).increment(1);
    tracing::warn!(%client, path = %request.uri().path(), retry_after, "client over the rate limit");
    let message = format!("too many requests from your address; try again in {retry_after} s");
    let wants_html = request
        .headers()
        .get(ACCEPT)
        .is_some_and(|v| v.as_bytes().windows(9).any(|w| w == b"text/html"));
    let mut response = if wants_html {
        crate::web::pages::ui::message_page(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many requests",
            &format!(
                "Too many requests came from your address. Wait {retry_after} s, then reload."
            ),
            false,
        )
    } else {
        (
            StatusCode::TOO_MANY_REQUESTS,
            ErrorBody::new("rate_limited", message),
        )
            .into_response()
    };
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_900_000_000 + secs, 0).unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_bucket_holds_a_minutes_worth_and_refills_at_that_rate() {
        let limiter = ClientLimiter::with(60, 100);
        let client = ip("192.0.2.1");
        for _ in 0..60 {
            assert_eq!(limiter.take(client, at(0)), Ok(()));
        }
        assert_eq!(limiter.take(client, at(0)), Err(1));
        assert_eq!(limiter.check(client, at(0)), Err(1));
        // Another client is not touched.
        assert_eq!(limiter.take(ip("192.0.2.2"), at(0)), Ok(()));
        // One token a second.
        assert_eq!(limiter.take(client, at(1)), Ok(()));
        assert_eq!(limiter.take(client, at(1)), Err(1));
        // A clock that steps back refills nothing, and takes nothing away.
        assert_eq!(limiter.take(client, at(-30)), Err(1));
        assert_eq!(limiter.check(client, at(2)), Ok(()));
        // Never more than the burst.
        for _ in 0..60 {
            assert_eq!(limiter.take(client, at(3600)), Ok(()));
        }
        assert!(limiter.take(client, at(3600)).is_err());
    }

    #[test]
    fn retry_after_says_when_a_token_is_back() {
        let limiter = ClientLimiter::with(6, 100);
        let client = ip("192.0.2.1");
        for _ in 0..6 {
            limiter.take(client, at(0)).unwrap();
        }
        assert_eq!(limiter.take(client, at(0)), Err(10));
        assert_eq!(limiter.take(client, at(4)), Err(6));
        assert_eq!(limiter.take(client, at(10)), Ok(()));
    }

    #[test]
    fn the_limiter_remembers_a_bounded_number_of_clients_newest_first() {
        let limiter = ClientLimiter::with(1, 10);
        let first = ip("198.51.100.1");
        limiter.take(first, at(0)).unwrap();
        assert!(limiter.take(first, at(0)).is_err());
        // Checking does not remember a client.
        assert_eq!(limiter.check(ip("198.51.100.2"), at(0)), Ok(()));
        assert_eq!(limiter.clients(), 1);
        for n in 0..1000u32 {
            let flood = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            limiter.take(flood, at(0)).unwrap();
            assert!(limiter.clients() <= 10, "{}", limiter.clients());
        }
        // The first client was forgotten: it starts again.
        assert_eq!(limiter.take(first, at(0)), Ok(()));
        // A client seen recently moves from the previous generation on.
        let recent = ip("198.51.100.3");
        limiter.take(recent, at(0)).unwrap();
        for n in 0..4u32 {
            limiter
                .take(
                    IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + n)),
                    at(0),
                )
                .unwrap();
        }
        assert!(limiter.take(recent, at(0)).is_err(), "still remembered");
    }

    #[test]
    fn the_client_is_the_peer_unless_a_trusted_proxy_names_it() {
        let proxy = ip("10.0.0.5");
        let cdn = ip("10.0.0.6");
        let trusted = |ip: IpAddr| ip == proxy || ip == cdn;
        let headers = |value: &'static str| {
            let mut map = HeaderMap::new();
            map.insert("x-forwarded-for", HeaderValue::from_static(value));
            map
        };
        // An untrusted peer's header counts for nothing.
        let stranger = ip("203.0.113.9");
        assert_eq!(
            client_of(stranger, &headers("198.51.100.1"), trusted),
            stranger
        );
        // The proxy's: the rightmost hop that is not a trusted proxy, so a
        // client's own entries (left of it) are ignored.
        assert_eq!(
            client_of(proxy, &headers("1.2.3.4, 198.51.100.1"), trusted),
            ip("198.51.100.1")
        );
        assert_eq!(
            client_of(proxy, &headers("1.2.3.4, 198.51.100.1, 10.0.0.6"), trusted),
            ip("198.51.100.1")
        );
        // No header, or junk: the proxy itself.
        assert_eq!(client_of(proxy, &HeaderMap::new(), trusted), proxy);
        assert_eq!(client_of(proxy, &headers("not-an-ip"), trusted), proxy);
        assert_eq!(
            client_of(proxy, &headers("not-an-ip, 198.51.100.1"), trusted),
            ip("198.51.100.1")
        );
        // IPv6 by its /64; IPv4 mapped into IPv6 as IPv4.
        assert_eq!(
            client_of(proxy, &headers("2001:db8:1:2:aaaa::1"), trusted),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            client_of(ip("2001:db8:1:2:ffff::9"), &HeaderMap::new(), trusted),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            client_of(ip("::ffff:198.51.100.7"), &HeaderMap::new(), trusted),
            ip("198.51.100.7")
        );
    }
}
