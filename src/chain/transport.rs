//! The JSON-RPC transport: reqwest with timeouts, alloy's retry layer with
//! our rule for what is transient, and errors that name the provider's host
//! but never its path or query (an RPC URL often carries an API key there).

use std::task::{Context, Poll};
use std::time::Duration;

use alloy::rpc::client::{ClientBuilder, RpcClient};
use alloy::rpc::json_rpc::{RequestPacket, ResponsePacket};
use alloy::transports::layers::{RateLimitRetryPolicy, RetryBackoffLayer, RetryPolicy};
use alloy::transports::{RpcError, TransportError, TransportErrorKind, TransportFut};
use reqwest::Url;

/// How long one attempt may take, connection included. Without it a provider
/// that accepts and never answers would hold the Safe flow forever.
const TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Retries of a transient failure, and the wait before each (alloy's layer
/// waits this fixed time, or what the provider asks for). A black-holed
/// provider thus fails a call after about 32 s.
const RETRIES: u32 = 2;
const BACKOFF_MS: u64 = 1_000;
/// The retry layer spaces calls beyond this budget; high enough that it
/// never does for the bridge's few calls.
const COMPUTE_UNITS_PER_SECOND: u64 = 10_000;

pub(super) fn rpc_client(url: Url) -> RpcClient {
    let http = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .build()
        .expect("a reqwest client with timeouts builds");
    // Outermost first: retries see errors already stripped of the URL.
    ClientBuilder::default()
        .layer(RetryBackoffLayer::new_with_policy(
            RETRIES,
            BACKOFF_MS,
            COMPUTE_UNITS_PER_SECOND,
            TransientRpcErrors,
        ))
        .layer(WithoutUrl)
        .http_with_client(http, url)
}

/// Which failed calls are worth sending again: rate limits and overloaded
/// providers (alloy's own rule), gateway errors of any shape, timeouts and
/// broken connections. A refused log range is not: `ChainClient::logs`
/// halves the range instead.
#[derive(Debug, Clone, Copy)]
struct TransientRpcErrors;

impl RetryPolicy for TransientRpcErrors {
    fn should_retry(&self, error: &TransportError) -> bool {
        let message = error.to_string().to_lowercase();
        if super::is_range_limit(&message) && !message.contains("rate") {
            return false;
        }
        if RateLimitRetryPolicy::default().should_retry(error) {
            return true;
        }
        match error {
            RpcError::Transport(TransportErrorKind::HttpError(http)) => {
                http.status >= 500 || http.status == 408
            }
            RpcError::Transport(TransportErrorKind::Custom(err)) => err
                .downcast_ref::<HttpFailure>()
                .is_some_and(|err| !err.error.is_builder()),
            _ => false,
        }
    }

    fn backoff_hint(&self, error: &TransportError) -> Option<Duration> {
        RateLimitRetryPolicy::default().backoff_hint(error)
    }
}

/// Replaces reqwest's errors with [`HttpFailure`]: the same error with only
/// the scheme, host and port of its URL, so that no error, log line or
/// stored message shows a key in the path or query.
#[derive(Debug, Clone, Copy)]
struct WithoutUrl;

impl<S> tower::Layer<S> for WithoutUrl {
    type Service = WithoutUrlService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WithoutUrlService { inner }
    }
}

#[derive(Debug, Clone)]
struct WithoutUrlService<S> {
    inner: S,
}

impl<S> tower::Service<RequestPacket> for WithoutUrlService<S>
where
    S: tower::Service<RequestPacket, Response = ResponsePacket, Error = TransportError>,
    S::Future: Send + 'static,
{
    type Response = ResponsePacket;
    type Error = TransportError;
    type Future = TransportFut<'static>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: RequestPacket) -> Self::Future {
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await.map_err(strip_url);
            crate::metrics::record_call("rpc", rpc_outcome(&result));
            result
        })
    }
}

/// `Ok`, or the code a call failed with: the JSON-RPC error code, the HTTP
/// status, `timeout` or `transport`. Each attempt counts: retries are inside.
fn rpc_outcome(result: &Result<ResponsePacket, TransportError>) -> Result<(), String> {
    match result {
        Ok(response) => match response.first_error_code() {
            Some(code) => Err(code.to_string()),
            None => Ok(()),
        },
        Err(RpcError::Transport(TransportErrorKind::HttpError(http))) => {
            Err(http.status.to_string())
        }
        Err(RpcError::Transport(TransportErrorKind::Custom(err))) => {
            Err(match err.downcast_ref::<HttpFailure>() {
                Some(failure) if failure.error.is_timeout() => "timeout",
                _ => "transport",
            }
            .to_owned())
        }
        Err(_) => Err("transport".to_owned()),
    }
}

fn strip_url(error: TransportError) -> TransportError {
    match error {
        RpcError::Transport(TransportErrorKind::Custom(err)) => {
            match err.downcast::<reqwest::Error>() {
                Ok(err) => {
                    let host = err.url().map(|url| {
                        let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
                        format!("{}://{}{port}", url.scheme(), url.host_str().unwrap_or("?"))
                    });
                    TransportErrorKind::custom(HttpFailure {
                        host,
                        error: err.without_url(),
                    })
                }
                Err(err) => RpcError::Transport(TransportErrorKind::Custom(err)),
            }
        }
        other => other,
    }
}

/// A reqwest error without its URL's path and query, shown with its host
/// and causes ("http://host:8545: error sending request: operation timed
/// out"): alloy prints only the outer message.
#[derive(Debug)]
struct HttpFailure {
    host: Option<String>,
    error: reqwest::Error,
}

impl std::fmt::Display for HttpFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(host) = &self.host {
            write!(f, "{host}: ")?;
        }
        write!(f, "{}", self.error)?;
        let mut source = std::error::Error::source(&self.error);
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl std::error::Error for HttpFailure {}
