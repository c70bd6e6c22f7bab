//! A Transaction Service double for the Safe-flow tests: the fake service
//! behind it, with a proposal answer that can be lost or refused, slow
//! calls, and a count of the calls in flight across every bridge that uses it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use alloy::primitives::{Address, B256};
use approval_bridge::safe::service::BoxFuture;
use approval_bridge::safe::{
    DelegateRegistration, Delegation, Deletion, Proposal, SafeService, SafeServiceError, ServiceTx,
    TxServiceClient, TxServiceOptions,
};

use serde_json::json;

use super::safe_world::{SafeWorld, mount_commit_and_run, mount_source_on};
use crate::common::helpers::TestApp;
use crate::common::phala_mock::ONCHAIN_NAME;

/// What the double does with a proposal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPropose {
    /// Passes it on.
    Forward,
    /// Passes the first one on, then answers as if the connection timed out:
    /// the service has it, the bridge does not know.
    AnswerLostOnce,
    /// Answers the first one 503 without passing it on, then forwards.
    UnavailableOnce,
    /// Answers every one 503 without passing it on.
    UnavailableAlways,
    /// Passes every one on and answers as if the connection timed out;
    /// every lookup and list times out as well.
    AnswersLost,
    /// Refuses the first one with a 422 without passing it on, then forwards.
    RejectedOnce,
    /// Refuses every one, and every lookup of one, with this HTTP status
    /// (401, 403, 404...).
    Refuse(u16),
    /// Refuses every call with this HTTP status, as with a bad API key.
    RefuseAll(u16),
}

pub struct ServiceDouble {
    inner: TxServiceClient,
    on_propose: OnPropose,
    /// Every call waits this long first.
    delay: Duration,
    /// How many proposals the bridge tried to post.
    tried: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    calls: AtomicUsize,
}

impl ServiceDouble {
    pub fn new(world: &SafeWorld, on_propose: OnPropose, delay: Duration) -> ServiceDouble {
        let mut options = TxServiceOptions::for_chain(31337);
        options.base_url = Some(world.service_url.clone());
        options.requests_per_second = 1000.0;
        ServiceDouble {
            inner: TxServiceClient::new(&options).unwrap(),
            on_propose,
            delay,
            tried: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
        }
    }

    /// A double answering `on_propose` at once, put between `app` and the
    /// world's Transaction Service.
    pub fn install(app: &TestApp, world: &SafeWorld, on_propose: OnPropose) -> Arc<ServiceDouble> {
        let double = Arc::new(ServiceDouble::new(world, on_propose, Duration::ZERO));
        app.worker
            .safe_flow()
            .unwrap()
            .set_service(31337, double.clone());
        double
    }

    /// The most calls that were ever in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Runs `call` counted as in flight, after the delay.
    async fn counted<T>(&self, call: impl Future<Output = T>) -> T {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        let out = call.await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        out
    }
}

impl SafeService for ServiceDouble {
    fn propose<'a>(
        &'a self,
        safe: Address,
        proposal: &'a Proposal,
    ) -> BoxFuture<'a, Result<(), SafeServiceError>> {
        Box::pin(self.counted(async move {
            let first = self.tried.fetch_add(1, Ordering::SeqCst) == 0;
            match self.on_propose {
                OnPropose::Forward => self.inner.propose(safe, proposal).await,
                OnPropose::AnswerLostOnce if first => {
                    self.inner.propose(safe, proposal).await?;
                    Err(timed_out())
                }
                OnPropose::UnavailableOnce if first => Err(unavailable()),
                OnPropose::UnavailableAlways => Err(unavailable()),
                OnPropose::AnswersLost => {
                    self.inner.propose(safe, proposal).await?;
                    Err(timed_out())
                }
                OnPropose::RejectedOnce if first => Err(SafeServiceError::Rejected {
                    body: r#"{"nonFieldErrors":["Sender is not an owner or delegate"]}"#.into(),
                }),
                OnPropose::AnswerLostOnce
                | OnPropose::UnavailableOnce
                | OnPropose::RejectedOnce => self.inner.propose(safe, proposal).await,
                OnPropose::Refuse(status) | OnPropose::RefuseAll(status) => Err(refusal(status)),
            }
        }))
    }

    fn get_transaction(
        &self,
        safe_tx_hash: B256,
    ) -> BoxFuture<'_, Result<Option<ServiceTx>, SafeServiceError>> {
        Box::pin(self.counted(async move {
            match self.on_propose {
                OnPropose::Refuse(status) | OnPropose::RefuseAll(status) => Err(refusal(status)),
                OnPropose::AnswersLost => Err(timed_out()),
                _ => self.inner.get_transaction(safe_tx_hash).await,
            }
        }))
    }

    fn list_pending(
        &self,
        safe: Address,
        nonce_gte: u64,
    ) -> BoxFuture<'_, Result<Option<u64>, SafeServiceError>> {
        Box::pin(self.counted(async move {
            match self.on_propose {
                OnPropose::RefuseAll(status) => Err(refusal(status)),
                _ => self.inner.list_pending(safe, nonce_gte).await,
            }
        }))
    }

    fn list_transactions(
        &self,
        safe: Address,
        nonces: std::ops::RangeInclusive<u64>,
    ) -> BoxFuture<'_, Result<Vec<ServiceTx>, SafeServiceError>> {
        Box::pin(self.counted(async move {
            match self.on_propose {
                OnPropose::Refuse(status) | OnPropose::RefuseAll(status) => Err(refusal(status)),
                OnPropose::AnswersLost => Err(timed_out()),
                _ => self.inner.list_transactions(safe, nonces).await,
            }
        }))
    }

    fn register_delegate<'a>(
        &'a self,
        registration: &'a DelegateRegistration,
    ) -> BoxFuture<'a, Result<(), SafeServiceError>> {
        Box::pin(self.counted(self.inner.register_delegate(registration)))
    }

    fn delegates(
        &self,
        delegate: Address,
    ) -> BoxFuture<'_, Result<Vec<Delegation>, SafeServiceError>> {
        Box::pin(self.counted(self.inner.delegates(delegate)))
    }

    fn delete_transaction<'a>(
        &'a self,
        deletion: &'a Deletion,
    ) -> BoxFuture<'a, Result<bool, SafeServiceError>> {
        Box::pin(self.counted(self.inner.delete_transaction(deletion)))
    }
}

fn unavailable() -> SafeServiceError {
    SafeServiceError::Unavailable {
        status: 503,
        body: r#"{"exception":"Problem connecting to Ethereum network"}"#.into(),
    }
}

fn timed_out() -> SafeServiceError {
    SafeServiceError::Transport {
        message: "operation timed out".into(),
        timed_out: true,
    }
}

fn refusal(status: u16) -> SafeServiceError {
    SafeServiceError::Http {
        status,
        body: r#"{"detail":"Invalid API key"}"#.into(),
    }
}

/// The bridge of `world` with its Transaction Service behind a double
/// answering `on_propose`, and Phala's source, commit and replica mounted.
pub async fn bridge_behind(world: &SafeWorld, on_propose: OnPropose) -> TestApp {
    let app = world.spawn_bridge().await;
    ServiceDouble::install(&app, world, on_propose);
    mount_source_on(&app, world.app, false).await;
    mount_commit_and_run(&app).await;
    app
}

/// A bridge whose Transaction Service is `double`, with one request for
/// node 1 planned once: its proposal is stored, the answer to its post is
/// whatever the double gives.
pub async fn one_planned_request(world: &SafeWorld, on_propose: OnPropose) -> (TestApp, String) {
    let app = bridge_behind(world, on_propose).await;
    let id = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": 1}))
        .await
        .remove(0);
    app.drain().await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "awaiting_proposal", "{request}");
    assert_eq!(request["proposal"]["submitted"], false, "{request}");
    (app, id)
}
