//! Intake's Phala lookups, cached for a short, configured time with one
//! fetch in flight per key (single-flight), so that a burst of orders for
//! one source costs one `GET /cvms/{id}` and one `GET /teepods/available`,
//! not two calls per order.
//!
//! The cache belongs to one client, and a client has one API key, that is
//! one Phala workspace: the keys need not name it. Only answers are cached.
//! A failure (an unknown source, an outage) is shared by the callers that
//! waited on the same fetch and then forgotten, so the next order asks
//! Phala again. A bad node name against a fresh list is refused without a
//! call, as it would be after one.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    AvailableNodes, PhalaClient, PhalaError, ResolveError, ResolvedNode, ResolvedSource, pick_node,
};
use crate::domain::{Bytes32, NodeRef};

/// Sources and the node list as Phala last told them, shared by every intake.
#[derive(Clone, Debug)]
pub struct Lookups {
    phala: PhalaClient,
    sources: SingleFlight<(String, Option<Bytes32>), ResolvedSource>,
    nodes: SingleFlight<(), AvailableNodes>,
}

impl Lookups {
    /// `fresh_for`: how long an answer is used again; zero caches nothing
    /// (concurrent lookups still share one call).
    pub fn new(phala: PhalaClient, fresh_for: Duration) -> Self {
        Lookups {
            phala,
            sources: SingleFlight::new(fresh_for),
            nodes: SingleFlight::new(fresh_for),
        }
    }

    /// [`PhalaClient::resolve_source`], cached.
    pub async fn resolve_source(
        &self,
        source: &str,
        compose_hash: Option<&Bytes32>,
    ) -> Result<ResolvedSource, ResolveError> {
        let phala = self.phala.clone();
        let (name, hash) = (source.to_owned(), compose_hash.copied());
        self.sources
            .get((name.clone(), hash), async move {
                phala.resolve_source(&name, hash.as_ref()).await
            })
            .await
    }

    /// The node as `GET /teepods/available` lists it, from a cached list.
    pub async fn resolve_node(&self, node: &NodeRef) -> Result<ResolvedNode, ResolveError> {
        let phala = self.phala.clone();
        let available = self
            .nodes
            .get((), async move {
                phala.available_nodes().await.map_err(ResolveError::Phala)
            })
            .await?;
        pick_node(&available, node)
    }
}

/// Answers kept for `fresh_for`, with at most one fetch in flight per key.
struct SingleFlight<K, V> {
    fresh_for: Duration,
    slots: Arc<Mutex<HashMap<K, Slot<V>>>>,
}

impl<K, V> Clone for SingleFlight<K, V> {
    fn clone(&self) -> Self {
        SingleFlight {
            fresh_for: self.fresh_for,
            slots: self.slots.clone(),
        }
    }
}

impl<K, V> std::fmt::Debug for SingleFlight<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFlight")
            .field("fresh_for", &self.fresh_for)
            .finish_non_exhaustive()
    }
}

type Answer<V> = Option<Result<V, ResolveError>>;

enum Slot<V> {
    Fresh {
        value: V,
        until: Instant,
    },
    /// A fetch under way; its answer arrives on the channel.
    Fetching(watch::Receiver<Answer<V>>),
}

impl<K, V> SingleFlight<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn new(fresh_for: Duration) -> Self {
        SingleFlight {
            fresh_for,
            slots: Arc::default(),
        }
    }

    fn lock(slots: &Mutex<HashMap<K, Slot<V>>>) -> MutexGuard<'_, HashMap<K, Slot<V>>> {
        slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The fresh answer for `key`, or the answer of the fetch under way, or
    /// that of `fetch`, started now. The fetch runs on its own task, so a
    /// caller that gives up (a client that hangs up) does not cancel it for
    /// the others.
    async fn get(
        &self,
        key: K,
        fetch: impl Future<Output = Result<V, ResolveError>> + Send + 'static,
    ) -> Result<V, ResolveError> {
        let mut answer = {
            let mut slots = Self::lock(&self.slots);
            match slots.get(&key) {
                Some(Slot::Fresh { value, until }) if Instant::now() < *until => {
                    return Ok(value.clone());
                }
                Some(Slot::Fetching(answer)) => answer.clone(),
                _ => {
                    let (send, answer) = watch::channel(None);
                    slots.insert(key.clone(), Slot::Fetching(answer.clone()));
                    let (slots, fresh_for) = (self.slots.clone(), self.fresh_for);
                    tokio::spawn(async move {
                        let result = fetch.await;
                        {
                            let mut slots = Self::lock(&slots);
                            match &result {
                                Ok(value) if !fresh_for.is_zero() => {
                                    let until = Instant::now() + fresh_for;
                                    let value = value.clone();
                                    slots.insert(key, Slot::Fresh { value, until });
                                }
                                _ => {
                                    slots.remove(&key);
                                }
                            }
                        }
                        send.send_replace(Some(result));
                    });
                    answer
                }
            }
        };
        let result = match answer.wait_for(Option::is_some).await {
            Ok(done) => done.clone(),
            // The fetch's task ended without an answer (it panicked).
            Err(_) => None,
        };
        result.unwrap_or_else(|| {
            Err(ResolveError::Phala(PhalaError::InvalidResponse(
                "the lookup ended without an answer".into(),
            )))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counted(
        calls: &Arc<AtomicUsize>,
        answer: Result<u32, ResolveError>,
    ) -> impl Future<Output = Result<u32, ResolveError>> + Send + 'static {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            answer
        }
    }

    #[tokio::test]
    async fn concurrent_lookups_share_one_fetch_and_reuse_it_while_fresh() {
        let cache = SingleFlight::<&str, u32>::new(Duration::from_secs(60));
        let calls = Arc::new(AtomicUsize::new(0));
        let lookups = (0..10).map(|_| cache.get("web", counted(&calls, Ok(7))));
        let answers = futures_util::future::join_all(lookups).await;
        assert!(answers.into_iter().all(|a| a.unwrap() == 7));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.get("web", counted(&calls, Ok(8))).await.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.get("api", counted(&calls, Ok(9))).await.unwrap(), 9);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn with_no_fresh_time_every_lookup_fetches() {
        let cache = SingleFlight::<(), u32>::new(Duration::ZERO);
        let calls = Arc::new(AtomicUsize::new(0));
        assert_eq!(cache.get((), counted(&calls, Ok(1))).await.unwrap(), 1);
        assert_eq!(cache.get((), counted(&calls, Ok(2))).await.unwrap(), 2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failure_is_shared_by_its_waiters_and_then_forgotten() {
        let cache = SingleFlight::<(), u32>::new(Duration::from_secs(60));
        let calls = Arc::new(AtomicUsize::new(0));
        let down = || Err(ResolveError::UnknownSource("web".into()));
        let lookups = (0..5).map(|_| cache.get((), counted(&calls, down())));
        let answers = futures_util::future::join_all(lookups).await;
        assert!(
            answers
                .iter()
                .all(|a| matches!(a, Err(ResolveError::UnknownSource(_))))
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.get((), counted(&calls, Ok(3))).await.unwrap(), 3);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
