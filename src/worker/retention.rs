//! The retention job: every interval, one process (the holder of the
//! `retention` job lease) deletes expired idempotency keys and, when a
//! retention time is configured, the requests that finished before it.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Worker;
use crate::store::{Acquired, Purged};

const JOB: &str = "retention";

impl Worker {
    /// One purge with the worker's clock. Tests drive it by hand.
    pub async fn purge_once(&self) -> anyhow::Result<Purged> {
        let now = self.clock.now();
        let mut purged = Purged {
            idempotency_keys: self
                .store
                .purge_idempotency_keys(now - self.retention.idempotency_key_ttl())
                .await?,
            ..Purged::default()
        };
        if let Some(secs) = self.retention.retain_finished_secs {
            let finished = self
                .store
                .purge_finished(now - chrono::Duration::seconds(secs as i64))
                .await?;
            purged = Purged {
                idempotency_keys: purged.idempotency_keys,
                ..finished
            };
        }
        for (kind, count) in [
            ("idempotency_keys", purged.idempotency_keys),
            ("requests", purged.requests),
            ("events", purged.events),
            ("proposals", purged.proposals),
        ] {
            metrics::counter!(crate::metrics::RETENTION_DELETED, "kind" => kind).increment(count);
        }
        if purged != Purged::default() {
            tracing::info!(?purged, "retention: deleted what is past its time");
        }
        Ok(purged)
    }

    /// Runs [`Worker::purge_once`] once per interval across every process
    /// that shares the database: the job's lease lasts one interval and is
    /// never given back early.
    pub(super) async fn run_retention(self, shutdown: CancellationToken) {
        let interval = Duration::from_secs(self.retention.retention_interval_secs);
        let holder = uuid::Uuid::new_v4();
        while !shutdown.is_cancelled() {
            let wait = match self.store.acquire_job(JOB, holder, interval).await {
                Ok(Acquired::Held(_)) => {
                    if let Err(err) = self.purge_once().await {
                        tracing::warn!(error = format!("{err:#}"), "retention pass failed");
                    }
                    interval
                }
                Ok(Acquired::Busy { expires_in }) => expires_in,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot take the retention job");
                    interval
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait.max(Duration::from_secs(1))) => {}
            }
        }
    }
}
