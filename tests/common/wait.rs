//! One way to wait for something a test cannot drive by hand (a process, a
//! browser, the sandbox's own workers): poll, and fail the test with the
//! last thing seen once a bound passes. Nothing here decides a test by the
//! clock; the bound only turns a hang into a failure.

use std::fmt::{Debug, Display};
use std::time::Duration;

/// How often to look, and for how long at most.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub every: Duration,
    pub limit: Duration,
}

impl Pace {
    /// What the API and page waits use: every 250 ms, for a minute's worth
    /// of looks.
    pub const DEFAULT: Pace = Pace {
        every: Duration::from_millis(250),
        limit: Duration::from_secs(60),
    };

    pub const fn every(every: Duration, limit: Duration) -> Pace {
        Pace { every, limit }
    }
}

/// Reads with `read` until `done` holds for what it read, and returns that.
/// After [`Pace::DEFAULT`]'s 240 looks (a minute and more) the test fails,
/// naming `what` and the last value read.
pub async fn until<T, F, Fut>(what: impl Display, read: F, done: impl Fn(&T) -> bool) -> T
where
    T: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    until_paced(Pace::DEFAULT, what, read, done).await
}

/// [`until`] at a pace of the caller's choice.
pub async fn until_paced<T, F, Fut>(
    pace: Pace,
    what: impl Display,
    mut read: F,
    done: impl Fn(&T) -> bool,
) -> T
where
    T: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    // The bound counts looks rather than seconds, so a loaded machine, whose
    // every look is slower, gets more time and not fewer looks.
    let looks = (pace.limit.as_millis() / pace.every.as_millis().max(1)).max(1);
    let mut last = read().await;
    for _ in 1..looks {
        if done(&last) {
            return last;
        }
        tokio::time::sleep(pace.every).await;
        last = read().await;
    }
    assert!(
        done(&last),
        "gave up on {what} after {looks} looks {:?} apart; last: {last:?}",
        pace.every
    );
    last
}

/// A description written only if the wait fails: to attach a process's log
/// as it is then, say.
pub struct Later<F>(pub F);

impl<F: Fn() -> String> Display for Later<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&(self.0)())
    }
}
