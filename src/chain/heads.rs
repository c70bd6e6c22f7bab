//! New blocks as they land: a `newHeads` subscription over WebSocket when
//! the chain has a `ws(s)://` URL, else polls of `eth_blockNumber` timed by
//! the chain's own block time, so the calls spent are a budget per new block
//! rather than per second.
//!
//! Also remembers that the RPC's chain id was checked: once per connection,
//! not once per pass. A failed call, or a WebSocket that reconnects, may
//! mean another provider answers now, so either makes the next pass check again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use alloy::providers::{Provider, ProviderBuilder, WsConnect};
use reqwest::Url;
use tokio::sync::watch;
use tokio::time::Instant;

/// Polls that find no new block, after the expected one, before the spacing
/// between polls starts to double (a stalled chain costs ever fewer calls).
const EMPTY_POLLS_BUDGET: u32 = 6;
/// Polls are spaced this fraction of a block time (a step) apart. The first
/// comes one block time after the poll that found the last block was sent:
/// that poll came at most a step after the block, so the next block is
/// there by then and most blocks cost one poll, found at most a step late.
/// A poll that finds none is followed by others a step apart, and the one
/// that finds the block sets the pace again.
const POLL_FRACTION: u32 = 8;
/// After this many blocks found at once in a row, the next first poll comes
/// a step earlier: a chain that runs early is caught up with (we may be up
/// to a step late), for one extra poll every few blocks at most.
const PROBE_EVERY: u32 = 4;
const MIN_POLL: Duration = Duration::from_millis(50);
/// Waits between attempts to open the WebSocket again.
const RECONNECT_MIN: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Shared by every clone of one chain's client.
#[derive(Debug)]
pub(super) struct Heads {
    chain_id_checked: AtomicBool,
    seen: Mutex<Seen>,
    /// The number of the latest header the subscription delivered, while
    /// it is connected; `None` while it is not (or there is no WebSocket).
    ws_head: watch::Sender<Option<u64>>,
    ws_url: Option<Url>,
    ws_started: AtomicBool,
    chain_id: u64,
    /// The head the chain follower last finished a pass at.
    followed: Mutex<Option<u64>>,
}

/// What the polls and the subscription have seen.
#[derive(Debug, Default)]
struct Seen {
    /// The highest block seen, and when it was first seen.
    head: Option<(u64, Instant)>,
    /// Average time between blocks, learnt from the heads seen.
    block_time: Option<Duration>,
    /// Polls since the last new block that found none.
    empty_polls: u32,
    /// The last time between blocks that was far from `block_time`: a
    /// second one like it means the chain's pace changed.
    outlier: Option<Duration>,
    /// Blocks found by the first poll in a row, since the last probe a step
    /// earlier (see [`PROBE_EVERY`]).
    at_once: u32,
    /// The head is the first one seen: its time is when it was seen, maybe
    /// long after it came, so the time to the next block measures nothing.
    first: bool,
}

impl Heads {
    pub(super) fn new(chain_id: u64, ws_url: Option<Url>) -> Arc<Heads> {
        Arc::new(Heads {
            chain_id_checked: AtomicBool::new(false),
            seen: Mutex::default(),
            ws_head: watch::Sender::new(None),
            ws_url,
            ws_started: AtomicBool::new(false),
            chain_id,
            followed: Mutex::new(None),
        })
    }

    pub(super) fn chain_id_checked(&self) -> bool {
        self.chain_id_checked.load(Ordering::SeqCst)
    }

    pub(super) fn set_chain_id_checked(&self, checked: bool) {
        self.chain_id_checked.store(checked, Ordering::SeqCst);
    }

    pub(super) fn followed(&self) -> Option<u64> {
        *self.followed.lock().expect("heads mutex")
    }

    pub(super) fn set_followed(&self, head: Option<u64>) {
        *self.followed.lock().expect("heads mutex") = head;
    }

    /// The subscription's head while it is connected.
    pub(super) fn subscribed_head(self: &Arc<Self>) -> Option<u64> {
        self.start_subscription();
        *self.ws_head.borrow()
    }

    /// Records a head from the subscription; `true` when it is new.
    pub(super) fn record(&self, number: u64) -> bool {
        self.record_at(number, Instant::now())
    }

    /// Records a head a poll sent at `sent` found: the block was there when
    /// the poll was sent, so its answer's latency does not delay the pace.
    pub(super) fn record_polled(&self, number: u64, sent: Instant) -> bool {
        self.record_at(number, sent)
    }

    /// Records a head another read found (a planner's) while the follower
    /// follows nothing, so the block time is learnt then too. While it
    /// follows, its polls alone pace it: a head found by another read first
    /// would make its own poll that finds it count as an empty one.
    pub(super) fn note_head(&self, number: u64, sent: Instant) {
        if self.followed().is_some() {
            return;
        }
        let new = {
            let seen = self.seen.lock().expect("heads mutex");
            seen.head.is_none_or(|(last, _)| number > last)
        };
        if new {
            self.record_at(number, sent);
        }
    }

    /// The chain's block time, once learnt.
    pub(super) fn block_time(&self) -> Option<Duration> {
        self.seen.lock().expect("heads mutex").block_time
    }

    fn record_at(&self, number: u64, now: Instant) -> bool {
        let mut seen = self.seen.lock().expect("heads mutex");
        match seen.head {
            Some((last, _)) if number <= last => {
                seen.empty_polls += 1;
                false
            }
            Some(_) if seen.first && seen.block_time.is_none() => {
                // A block time from a partial interval (1 s for 12 s blocks)
                // costs dozens of polls until two alike intervals correct it.
                seen.first = false;
                seen.head = Some((number, now));
                seen.empty_polls = 0;
                true
            }
            Some((last, at)) => {
                let blocks = number - last;
                let per_block = now.duration_since(at) / blocks as u32;
                seen.block_time = Some(match seen.block_time {
                    // A slow-moving average: one late poll does not skew it.
                    Some(average) if near(per_block, average) => {
                        seen.outlier = None;
                        (average * 3 + per_block) / 4
                    }
                    // Several blocks where one was expected: the chain
                    // itself counted them, so a faster pace is taken at once.
                    Some(average) if blocks > 1 && per_block * 2 < average => {
                        seen.outlier = None;
                        per_block
                    }
                    // Twice in a row far off, and alike: a new pace (a chain
                    // whose blocks came every second now comes every 12 s),
                    // taken at once. A single stall is not.
                    Some(average) => match seen.outlier.replace(per_block) {
                        Some(previous) if near(previous, per_block) => {
                            seen.outlier = None;
                            per_block
                        }
                        _ => average,
                    },
                    None => per_block,
                });
                seen.head = Some((number, now));
                // Found by the first poll: count towards the next probe; the
                // probe itself, or a poll that found none first, starts over.
                seen.at_once = match seen.empty_polls {
                    0 if seen.at_once < PROBE_EVERY => seen.at_once + 1,
                    _ => 0,
                };
                seen.empty_polls = 0;
                true
            }
            None => {
                seen.head = Some((number, now));
                seen.first = true;
                true
            }
        }
    }

    /// How long to wait before polling again: until the next block is due
    /// (see [`POLL_FRACTION`] and [`PROBE_EVERY`]), then a step apart; after
    /// [`EMPTY_POLLS_BUDGET`] empty polls, twice as long each time, up to
    /// `longest` or a block time, whichever is longer.
    pub(super) fn next_poll_in(&self, longest: Duration) -> Duration {
        self.next_poll_at(longest, Instant::now())
    }

    fn next_poll_at(&self, longest: Duration, now: Instant) -> Duration {
        let seen = self.seen.lock().expect("heads mutex");
        let (Some((_, at)), Some(block_time)) = (seen.head, seen.block_time) else {
            return longest;
        };
        let step = step_of(block_time);
        let early = if seen.at_once >= PROBE_EVERY {
            step
        } else {
            Duration::ZERO
        };
        let due = at + block_time.saturating_sub(early);
        if now < due && seen.empty_polls == 0 {
            return due - now;
        }
        let over = seen.empty_polls.saturating_sub(EMPTY_POLLS_BUDGET).min(16);
        (step * 2u32.pow(over)).min(longest.max(block_time))
    }

    /// Waits until the subscription delivers a head above `after`, or
    /// `timeout` passes; `false` on timeout or without a live subscription.
    pub(super) async fn wait_above(self: &Arc<Self>, after: u64, timeout: Duration) -> bool {
        self.start_subscription();
        let mut heads = self.ws_head.subscribe();
        let wait = heads.wait_for(|head| head.is_none_or(|h| h > after));
        matches!(
            tokio::time::timeout(timeout, wait).await,
            Ok(Ok(head)) if head.is_some()
        )
    }

    /// Starts the subscription task once, when there is a WebSocket URL.
    fn start_subscription(self: &Arc<Self>) {
        let Some(url) = self.ws_url.clone() else {
            return;
        };
        if self.ws_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.ws_started.store(false, Ordering::SeqCst);
            return;
        };
        runtime.spawn(subscribe(Arc::downgrade(self), self.chain_id, url));
    }
}

/// Keeps a `newHeads` subscription open while any client of the chain
/// lives, opening it again (with backoff) whenever it drops.
async fn subscribe(heads: Weak<Heads>, chain_id: u64, url: Url) {
    let mut wait = RECONNECT_MIN;
    loop {
        let Some(strong) = heads.upgrade() else {
            return;
        };
        let ws_head = strong.ws_head.clone();
        drop(strong);
        // alloy's own reconnects would hide a changed connection: none.
        let connect = WsConnect::new(url.as_str()).with_max_retries(0);
        match ProviderBuilder::new().connect_ws(connect).await {
            // A WebSocket of another chain would report heads this chain
            // has not reached: never believe one.
            Ok(provider) if !provider.get_chain_id().await.is_ok_and(|id| id == chain_id) => {
                tracing::error!(
                    chain_id,
                    host = url.host_str().unwrap_or("?"),
                    "the WebSocket does not answer for this chain; polling"
                );
            }
            Ok(provider) => match provider.subscribe_blocks().await {
                Ok(subscription) => {
                    tracing::info!(
                        host = url.host_str().unwrap_or("?"),
                        "newHeads subscription open"
                    );
                    wait = RECONNECT_MIN;
                    let mut subscription = subscription;
                    loop {
                        let header = match subscription.recv().await {
                            Ok(header) => header,
                            // Missed some: the next header still tells the head.
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                        };
                        let Some(strong) = heads.upgrade() else {
                            return;
                        };
                        strong.record(header.number);
                        ws_head.send_replace(Some(header.number));
                    }
                    tracing::warn!(
                        host = url.host_str().unwrap_or("?"),
                        "newHeads subscription closed; polling until it is back"
                    );
                }
                Err(err) => tracing::warn!(error = %err, "cannot subscribe to newHeads; polling"),
            },
            Err(err) => tracing::warn!(error = %err, "cannot open the WebSocket; polling"),
        }
        ws_head.send_replace(None);
        // Another connection may reach another provider: check it again.
        if let Some(strong) = heads.upgrade() {
            strong.set_chain_id_checked(false);
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RECONNECT_MAX);
    }
}

/// The time between polls while a block is due.
fn step_of(block_time: Duration) -> Duration {
    (block_time / POLL_FRACTION).max(MIN_POLL)
}

/// Within a factor of two of each other.
fn near(a: Duration, b: Duration) -> bool {
    a < b * 2 && b < a * 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_cluster_around_the_expected_block_and_back_off_when_it_stalls() {
        let heads = Heads::new(1, None);
        let longest = Duration::from_secs(2);
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        assert_eq!(
            heads.next_poll_at(longest, at(0)),
            longest,
            "no block time yet"
        );
        assert!(heads.record_at(9, at(0)));
        assert!(
            heads.record_at(10, at(0)),
            "not a block time: 9 was seen late"
        );
        assert!(heads.record_at(11, at(8)));
        // The next block is due at 16 s: one block time after the last find.
        assert_eq!(heads.next_poll_at(longest, at(8)), Duration::from_secs(8));
        for _ in 0..EMPTY_POLLS_BUDGET {
            assert!(!heads.record_at(11, at(15)));
            assert_eq!(heads.next_poll_at(longest, at(15)), Duration::from_secs(1));
        }
        assert!(!heads.record_at(11, at(16)));
        assert_eq!(heads.next_poll_at(longest, at(16)), Duration::from_secs(2));
        assert!(!heads.record_at(11, at(18)));
        assert_eq!(heads.next_poll_at(longest, at(18)), Duration::from_secs(4));
        for _ in 0..10 {
            heads.record_at(11, at(20));
        }
        assert_eq!(
            heads.next_poll_at(longest, at(20)),
            Duration::from_secs(8),
            "capped at a block time"
        );
        // A new block resets the budget: the next poll is most of a block away.
        assert!(heads.record_at(12, at(24)));
        assert!(heads.next_poll_at(longest, at(24)) > Duration::from_secs(5));
    }

    #[test]
    fn a_single_stall_leaves_the_block_time_but_a_new_pace_is_learnt_soon() {
        let heads = Heads::new(1, None);
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        let block_time = || heads.seen.lock().unwrap().block_time.unwrap();
        for n in 0..=4 {
            heads.record_at(n, at(n * 1000));
        }
        assert_eq!(block_time(), Duration::from_secs(1));
        // One block 30 s late, then the old pace again.
        heads.record_at(5, at(34_000));
        assert_eq!(block_time(), Duration::from_secs(1), "one stall");
        heads.record_at(6, at(35_000));
        assert_eq!(block_time(), Duration::from_secs(1));
        // Blocks every 12 s from now on: the second such gap sets the pace.
        heads.record_at(7, at(47_000));
        assert_eq!(block_time(), Duration::from_secs(1));
        heads.record_at(8, at(59_500));
        assert_eq!(block_time(), Duration::from_millis(12_500));
        heads.record_at(9, at(71_500));
        assert!(block_time() > Duration::from_secs(12));
        // The next first poll comes a block time after the last find.
        let wait = heads.next_poll_at(Duration::from_secs(2), at(71_500));
        assert_eq!(wait, block_time());
        // Back to 1 s blocks: the first poll finds 11 at once. It is the
        // fourth block in a row found at once, so the next first poll is the
        // probe, a step (an eighth of a block time) early.
        heads.record_at(20, at(82_500));
        assert_eq!(block_time(), Duration::from_secs(1));
        let wait = heads.next_poll_at(Duration::from_secs(2), at(82_500));
        assert_eq!(wait, Duration::from_millis(875));
    }

    #[test]
    fn most_blocks_cost_one_poll_and_a_probe_a_step_early_comes_every_few_blocks() {
        let heads = Heads::new(1, None);
        let longest = Duration::from_secs(2);
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        // 8 s blocks: a step is 1 s.
        heads.record_at(0, at(0));
        heads.record_at(1, at(0));
        assert!(heads.record_at(2, at(8_000)));
        let mut now = 8_000;
        for n in 3..=PROBE_EVERY as u64 + 1 {
            assert_eq!(
                heads.next_poll_at(longest, at(now)),
                Duration::from_secs(8),
                "block {n}: one block time after the last find"
            );
            now += 8_000;
            assert!(heads.record_at(n, at(now)), "found by the first poll");
        }
        // Found at once every time: the next first poll is the probe, a step early.
        assert_eq!(heads.next_poll_at(longest, at(now)), Duration::from_secs(7));
        now += 7_000;
        // Not there yet: polls a step apart until it is.
        assert!(!heads.record_at(PROBE_EVERY as u64 + 1, at(now)));
        assert_eq!(heads.next_poll_at(longest, at(now)), Duration::from_secs(1));
        now += 1_000;
        assert!(heads.record_at(PROBE_EVERY as u64 + 2, at(now)));
        // In step again, and no probe for the next few blocks.
        assert_eq!(heads.next_poll_at(longest, at(now)), Duration::from_secs(8));
    }
}
