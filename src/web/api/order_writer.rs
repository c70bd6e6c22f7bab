//! Intake's writer. Orders that arrive while a batch is being written wait
//! for the next batch, and each batch is one transaction
//! ([`Store::store_orders`]): under a burst the transaction's fixed cost is
//! shared by many orders, and a lone order is written at once, alone.
//!
//! Batches are written by a task of their own, so an order is stored (or
//! refused) whole even if the caller that sent it goes away meanwhile.
//!
//! A failure is a [`WriteError`]: the database's trouble (a lock or
//! statement timeout, no connection, a COMMIT whose answer was lost) is
//! named, so intake can answer it clearly; anything else is a bug.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::clock::Clock;
use crate::store::{LostCommit, Order, ReplicaRequest, Store, Stored, StoredResponse, Trouble};

/// The most orders one transaction stores.
const MAX_BATCH: usize = 64;

/// Makes an order's answer from its stored requests.
pub type Render = fn(&[ReplicaRequest]) -> anyhow::Result<StoredResponse>;

#[derive(Clone)]
pub struct OrderWriter {
    store: Store,
    clock: Clock,
    /// How long an idempotency key is kept.
    key_ttl: chrono::Duration,
    render: Render,
    queue: Arc<Mutex<Queue>>,
}

impl std::fmt::Debug for OrderWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderWriter").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// A task is writing batches; it takes the waiting orders when done.
    writing: bool,
}

struct Waiting {
    order: Order,
    answer: oneshot::Sender<Result<Stored, WriteError>>,
}

/// Why an order was not stored, or may not have been.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// The database did not do it in time, or could not be reached:
    /// nothing of the order was stored.
    #[error("{message}")]
    Database { trouble: Trouble, message: String },
    /// The connection broke as the order was committed.
    #[error(transparent)]
    LostCommit(#[from] LostCommit),
    /// Anything else: a bug, or a failure nobody planned for.
    #[error("{0}")]
    Other(String),
}

impl WriteError {
    fn from_anyhow(err: &anyhow::Error) -> Self {
        if let Some(lost) = err.chain().find_map(|e| e.downcast_ref::<LostCommit>()) {
            return WriteError::LostCommit(lost.clone());
        }
        let message = format!("{err:#}");
        match Trouble::of(err) {
            Some(trouble) => WriteError::Database { trouble, message },
            None => WriteError::Other(message),
        }
    }

    fn trouble(&self) -> Option<Trouble> {
        match self {
            WriteError::Database { trouble, .. } => Some(*trouble),
            _ => None,
        }
    }
}

impl OrderWriter {
    pub fn new(store: Store, clock: Clock, key_ttl: chrono::Duration, render: Render) -> Self {
        OrderWriter {
            store,
            clock,
            key_ttl,
            render,
            queue: Arc::default(),
        }
    }

    /// Stores `order` with the orders that arrive alongside it.
    pub async fn store(&self, order: Order) -> Result<Stored, WriteError> {
        let (answer, answered) = oneshot::channel();
        let start = {
            let mut queue = self.queue();
            queue.waiting.push(Waiting { order, answer });
            !std::mem::replace(&mut queue.writing, true)
        };
        if start {
            tokio::spawn(self.clone().write_batches());
        }
        answered.await.map_err(|_| {
            WriteError::Other("the order writer stopped before answering".to_owned())
        })?
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes batches until no order waits.
    async fn write_batches(self) {
        // Should a batch panic, its callers get an error and the next order
        // starts a new writer.
        let _stop = StopWriting(self.queue.clone());
        loop {
            let batch: Vec<Waiting> = {
                let mut queue = self.queue();
                if queue.waiting.is_empty() {
                    queue.writing = false;
                    return;
                }
                let take = queue.waiting.len().min(MAX_BATCH);
                queue.waiting.drain(..take).collect()
            };
            self.write(batch).await;
        }
    }

    async fn write(&self, batch: Vec<Waiting>) {
        let (orders, answers): (Vec<Order>, Vec<_>) =
            batch.into_iter().map(|w| (w.order, w.answer)).unzip();
        let err = match self.store_orders(&orders).await {
            Ok(outcomes) => {
                for (answer, outcome) in answers.into_iter().zip(outcomes) {
                    let _ = answer.send(Ok(outcome));
                }
                return;
            }
            Err(err) => WriteError::from_anyhow(&err),
        };
        // One order's trouble must not fail the others: each again, alone. A
        // quota lock held elsewhere is one caller's trouble; a timed-out
        // statement or no connection would be each order's too, and a lost
        // COMMIT's outcome is the whole batch's.
        let alone = orders.len() > 1
            && matches!(
                err,
                WriteError::Other(_)
                    | WriteError::Database {
                        trouble: Trouble::LockTimeout,
                        ..
                    }
            );
        if !alone {
            for answer in answers {
                let _ = answer.send(Err(err.clone()));
            }
            return;
        }
        tracing::warn!(
            error = %err,
            orders = orders.len(),
            "a batch of orders failed; storing each alone"
        );
        // A caller whose quota lock could not be had fails at once from then
        // on: the lock wait is paid once per caller, not once per order.
        let mut busy: Vec<String> = Vec::new();
        for (order, answer) in orders.into_iter().zip(answers) {
            let caller = order.actor.label();
            let outcome = if busy.contains(&caller) {
                Err(WriteError::Database {
                    trouble: Trouble::LockTimeout,
                    message: format!("`{caller}`'s quota lock could not be had"),
                })
            } else {
                self.store_orders(std::slice::from_ref(&order))
                    .await
                    .map(|mut o| o.remove(0))
                    .map_err(|err| WriteError::from_anyhow(&err))
            };
            if let Err(err) = &outcome
                && err.trouble() == Some(Trouble::LockTimeout)
            {
                busy.push(caller);
            }
            let _ = answer.send(outcome);
        }
    }

    async fn store_orders(&self, orders: &[Order]) -> anyhow::Result<Vec<Stored>> {
        let now = self.clock.now();
        self.store
            .store_orders(orders, now, now - self.key_ttl, &self.render)
            .await
    }
}

/// Marks the queue as not being written when the writer task ends, also
/// by a panic; then the orders it left get an error instead of no answer.
struct StopWriting(Arc<Mutex<Queue>>);

impl Drop for StopWriting {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut queue = self.0.lock().unwrap_or_else(|p| p.into_inner());
            queue.writing = false;
            queue.waiting.clear();
        }
    }
}
