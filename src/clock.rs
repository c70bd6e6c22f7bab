//! Time as the service sees it. Workers read "now" from a [`Clock`] so tests
//! can move time forward to check backoff, leases and timeouts without sleeping.
//!
//! The database is the clock: every process that shares it must agree on
//! when a request is due, a settle window over or a proposal expired, and
//! leases already run on the database's `now()`. So the production clock
//! reads this machine's clock plus an offset it learns from the database
//! ([`Clock::sync`], at start and then every [`SYNC_EVERY`]); a machine whose
//! clock is off still computes every time in the database's.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};

/// How often the production clock learns its offset again: clocks drift,
/// and an NTP step on either machine moves the offset at once.
pub const SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// A difference larger than this between the two clocks is logged.
const NOTABLE_OFFSET: Duration = Duration::seconds(1);

#[derive(Clone, Debug)]
pub struct Clock {
    source: Source,
}

#[derive(Clone, Debug)]
enum Source {
    /// This machine's clock, off by `skew` (zero but in tests of a skewed
    /// host), corrected by the learnt offset (microseconds).
    System {
        skew: Duration,
        offset: Arc<AtomicI64>,
    },
    Manual(Arc<Mutex<DateTime<Utc>>>),
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl Clock {
    /// This machine's clock, until [`Clock::sync`] learns the database's.
    pub fn system() -> Self {
        Clock::skewed_system(Duration::zero())
    }

    /// A system clock on a machine whose clock is `skew` ahead (behind, if
    /// negative): what a host with a wrong clock reads, for tests.
    pub fn skewed_system(skew: Duration) -> Self {
        Clock {
            source: Source::System {
                skew,
                offset: Arc::default(),
            },
        }
    }

    /// A clock that stands still until [`Clock::advance`] moves it.
    pub fn manual(start: DateTime<Utc>) -> Self {
        Clock {
            source: Source::Manual(Arc::new(Mutex::new(start))),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match &self.source {
            Source::Manual(time) => *time.lock().expect("clock mutex"),
            Source::System { skew, offset } => {
                Utc::now() + *skew + Duration::microseconds(offset.load(Ordering::Relaxed))
            }
        }
    }

    /// How far the database's clock is ahead of this machine's, as last learnt.
    pub fn offset(&self) -> Duration {
        match &self.source {
            Source::Manual(_) => Duration::zero(),
            Source::System { offset, .. } => Duration::microseconds(offset.load(Ordering::Relaxed)),
        }
    }

    /// Learns the offset from `database_now` (the database's `now()`), taken
    /// to be the middle of the round trip. A manual clock keeps its time:
    /// tests move it themselves.
    pub async fn sync<E>(
        &self,
        database_now: impl Future<Output = Result<DateTime<Utc>, E>>,
    ) -> Result<(), E> {
        let Source::System { skew, offset } = &self.source else {
            return Ok(());
        };
        let local = || Utc::now() + *skew;
        let sent = local();
        let database = database_now.await?;
        let received = local();
        let learnt = database - (sent + (received - sent) / 2);
        let micros = learnt.num_microseconds().unwrap_or(i64::MAX);
        let before = offset.swap(micros, Ordering::Relaxed);
        if (learnt - Duration::microseconds(before)).abs() > NOTABLE_OFFSET {
            tracing::warn!(
                offset_ms = learnt.num_milliseconds(),
                "this machine's clock is off the database's; every time is taken from the database's"
            );
        }
        Ok(())
    }

    /// Moves a manual clock forward. Panics on the system clock: a test bug.
    pub fn advance(&self, by: Duration) {
        let Source::Manual(time) = &self.source else {
            panic!("only a manual clock can be advanced");
        };
        *time.lock().expect("clock mutex") += by;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_skewed_system_clock_reads_the_database_time_once_synced() {
        let clock = Clock::skewed_system(Duration::hours(-3));
        assert!((clock.now() - Utc::now() + Duration::hours(3)).abs() < Duration::seconds(5));
        clock
            .sync(async { Ok::<_, ()>(Utc::now() + Duration::minutes(10)) })
            .await
            .unwrap();
        let off = clock.now() - (Utc::now() + Duration::minutes(10));
        assert!(off.abs() < Duration::seconds(5), "{off}");
        assert!((clock.offset() - Duration::minutes(190)).abs() < Duration::seconds(5));
    }

    #[tokio::test]
    async fn a_failed_sync_keeps_the_offset_and_a_manual_clock_ignores_it() {
        let clock = Clock::system();
        clock
            .sync(async { Ok::<_, ()>(Utc::now() + Duration::minutes(1)) })
            .await
            .unwrap();
        assert!(
            clock
                .sync(async { Err::<DateTime<Utc>, _>("down") })
                .await
                .is_err()
        );
        assert!((clock.offset() - Duration::minutes(1)).abs() < Duration::seconds(5));

        let start = Utc::now() - Duration::days(1);
        let manual = Clock::manual(start);
        manual
            .sync(async { Ok::<_, ()>(Utc::now()) })
            .await
            .unwrap();
        assert_eq!(manual.now(), start);
    }
}
