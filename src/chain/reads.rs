//! DstackApp reads kept per block, so that the planner's passes and the
//! follower's share them instead of asking the chain again.
//!
//! - A read at a fixed block at confirmed depth does not change (that is
//!   what the confirmations are for): it is kept by block number and
//!   answers every later read of the same block that asks for no more.
//! - The head's state is read once per new block by whoever reads the head
//!   first: the follower's poll carries what the planners want (their
//!   interest), and a planner reads it itself only when no new block came
//!   within a block time (or the poll interval, if longer) of the last one;
//!   then at most once per poll interval until one comes. So a chain that
//!   mines only when a transaction arrives (anvil's automine, some L2s), or
//!   one that stalled, delays a request by that much at most, never until a
//!   block that may not come.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use alloy::primitives::Address;
use tokio::time::Instant;

use super::{AppState, Registration};

/// How long a planner's interest is read at the head after it last asked.
const INTEREST_KEPT: std::time::Duration = std::time::Duration::from_secs(120);
/// Fixed blocks kept: the confirmed block moves by one per new block, so a
/// few cover every reader of the last blocks.
const FIXED_BLOCKS_KEPT: usize = 8;

/// One app as read at one block; `answered`: it answered `owner()`.
#[derive(Debug, Clone)]
pub(super) struct AppRead {
    pub state: AppState,
    pub answered: bool,
}

/// Apps and the registrations wanted of each.
type Wanted = Vec<(Address, Vec<Registration>)>;

/// What several reads at one block found, merged.
pub(super) type BlockApps = HashMap<Address, AppRead>;

/// The app states at one head, and when calls that read it were sent.
#[derive(Debug)]
pub(super) struct HeadApps {
    pub number: u64,
    /// The first read that found this head: the next block is due a block
    /// time later.
    pub first_sent: Instant,
    /// The last read that found it still the head (a block that is late).
    pub last_sent: Instant,
    pub apps: BlockApps,
}

impl HeadApps {
    /// Until when this is taken as the head's state, and a planner it does
    /// not cover waits for the next read rather than reading itself: until
    /// the next block is due and the follower's poll for it had time to come
    /// (a block time, or `poll` if longer, and two of the follower's steps,
    /// an eighth of a block time each), or a `poll` after the last read that
    /// found this block still the head. Past that, no new block came: the
    /// chain mines on demand or stalled, and the planner reads itself.
    pub fn current_until(
        &self,
        block_time: std::time::Duration,
        poll: std::time::Duration,
    ) -> Instant {
        let step = (block_time / 8).max(std::time::Duration::from_millis(50));
        (self.first_sent + block_time.max(poll) + step * 2).max(self.last_sent + poll)
    }
}

#[derive(Debug, Default)]
pub(super) struct Reads {
    fixed: BTreeMap<u64, BlockApps>,
    head: Option<HeadApps>,
    /// What each planner (by job name) wants read at the head, and since
    /// when: a planner whose requests all wait (deferred) asks for nothing
    /// for a while, yet still wants it read for when they are due.
    interest: BTreeMap<String, (Instant, Wanted)>,
    /// When each planner last read at confirmed depth.
    fixed_read: HashMap<String, Instant>,
}

/// The wanted part of `apps`, if they hold all of it: each app's state
/// with only the wanted registrations, and whether it answered `owner()`.
pub(super) fn covered(
    apps: &BlockApps,
    wanted: &[(Address, Vec<Registration>)],
) -> Option<(HashMap<Address, AppState>, HashMap<Address, bool>)> {
    let mut states = HashMap::new();
    let mut answered = HashMap::new();
    for (app, registrations) in wanted {
        let read = apps.get(app)?;
        let mut state = read.state.clone();
        state.allowed = registrations
            .iter()
            .map(|r| Some((*r, *read.state.allowed.get(r)?)))
            .collect::<Option<HashMap<_, _>>>()?;
        states.insert(*app, state);
        answered.insert(*app, read.answered);
    }
    Some((states, answered))
}

pub(super) fn merge(
    into: &mut BlockApps,
    states: &HashMap<Address, AppState>,
    answered: &HashMap<Address, bool>,
) {
    for (app, state) in states {
        let answered = answered.get(app).copied().unwrap_or(false);
        match into.get_mut(app) {
            Some(read) => {
                read.state.allowed.extend(state.allowed.iter());
            }
            None => {
                into.insert(
                    *app,
                    AppRead {
                        state: state.clone(),
                        answered,
                    },
                );
            }
        }
    }
}

impl Reads {
    pub(super) fn fixed(
        &self,
        block: u64,
        wanted: &[(Address, Vec<Registration>)],
    ) -> Option<(HashMap<Address, AppState>, HashMap<Address, bool>)> {
        covered(self.fixed.get(&block)?, wanted)
    }

    pub(super) fn keep_fixed(
        &mut self,
        block: u64,
        states: &HashMap<Address, AppState>,
        answered: &HashMap<Address, bool>,
    ) {
        merge(self.fixed.entry(block).or_default(), states, answered);
        while self.fixed.len() > FIXED_BLOCKS_KEPT {
            self.fixed.pop_first();
        }
    }

    /// Keeps what a read of the head found. A read of an older head (a
    /// provider behind the others) changes nothing; a newer one replaces.
    pub(super) fn keep_head(
        &mut self,
        number: u64,
        sent: Instant,
        states: &HashMap<Address, AppState>,
        answered: &HashMap<Address, bool>,
    ) {
        match &mut self.head {
            Some(head) if head.number > number => {}
            Some(head) if head.number == number => {
                merge(&mut head.apps, states, answered);
                head.last_sent = head.last_sent.max(sent);
            }
            _ => {
                let mut apps = BlockApps::new();
                merge(&mut apps, states, answered);
                self.head = Some(HeadApps {
                    number,
                    first_sent: sent,
                    last_sent: sent,
                    apps,
                });
            }
        }
    }

    pub(super) fn head(&self) -> Option<&HeadApps> {
        self.head.as_ref()
    }

    /// The head is read again by the next reader: after a failed call,
    /// nothing seen before is trusted.
    pub(super) fn forget_head(&mut self) {
        self.head = None;
    }

    /// How long until `reader` may read a fixed block again, if it read one
    /// within `period`.
    pub(super) fn fixed_read_due(
        &self,
        reader: &str,
        now: Instant,
        period: std::time::Duration,
    ) -> Option<std::time::Duration> {
        let next = *self.fixed_read.get(reader)? + period;
        (now < next).then(|| next - now)
    }

    pub(super) fn fixed_read_at(&mut self, reader: &str, now: Instant) {
        self.fixed_read.insert(reader.to_owned(), now);
    }

    pub(super) fn set_interest(&mut self, reader: &str, wanted: &[(Address, Vec<Registration>)]) {
        self.interest
            .insert(reader.to_owned(), (Instant::now(), wanted.to_vec()));
    }

    /// Every planner's interest of the last [`INTEREST_KEPT`] together, with `also`.
    pub(super) fn interest_with(
        &self,
        also: &[(Address, Vec<Registration>)],
    ) -> Vec<(Address, Vec<Registration>)> {
        let mut all: BTreeMap<Address, BTreeSet<Registration>> = BTreeMap::new();
        let recent = self
            .interest
            .values()
            .filter(|(since, _)| since.elapsed() < INTEREST_KEPT)
            .flat_map(|(_, wanted)| wanted);
        for (app, registrations) in recent.chain(also) {
            all.entry(*app)
                .or_default()
                .extend(registrations.iter().copied());
        }
        all.into_iter()
            .map(|(app, registrations)| (app, registrations.into_iter().collect()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::B256;

    fn state(allowed: &[(Registration, bool)]) -> AppState {
        AppState {
            owner: Address::repeat_byte(1),
            pending_owner: None,
            allow_any_device: false,
            allowed: allowed.iter().copied().collect(),
        }
    }

    #[test]
    fn a_block_read_answers_what_it_covers_and_no_more() {
        let app = Address::repeat_byte(9);
        let a = Registration::Device(B256::repeat_byte(1));
        let b = Registration::Device(B256::repeat_byte(2));
        let mut reads = Reads::default();
        reads.keep_fixed(
            10,
            &HashMap::from([(app, state(&[(a, true)]))]),
            &HashMap::from([(app, true)]),
        );
        let (states, answered) = reads.fixed(10, &[(app, vec![a])]).expect("covered");
        assert!(states[&app].is_allowed(&a));
        assert!(answered[&app]);
        assert!(
            reads.fixed(10, &[(app, vec![a, b])]).is_none(),
            "b was not read"
        );
        assert!(
            reads.fixed(11, &[(app, vec![a])]).is_none(),
            "another block"
        );
        reads.keep_fixed(
            10,
            &HashMap::from([(app, state(&[(b, false)]))]),
            &HashMap::from([(app, true)]),
        );
        let (states, _) = reads.fixed(10, &[(app, vec![a, b])]).expect("merged");
        assert!(states[&app].is_allowed(&a) && !states[&app].is_allowed(&b));
        for block in 11..30 {
            reads.keep_fixed(block, &HashMap::new(), &HashMap::new());
        }
        assert!(
            reads.fixed(10, &[(app, vec![a])]).is_none(),
            "old blocks go"
        );
    }

    #[test]
    fn a_newer_head_replaces_and_an_older_one_is_ignored() {
        let app = Address::repeat_byte(9);
        let a = Registration::ComposeHash(B256::repeat_byte(1));
        let now = Instant::now();
        let mut reads = Reads::default();
        let answered = HashMap::from([(app, true)]);
        reads.keep_head(
            5,
            now,
            &HashMap::from([(app, state(&[(a, false)]))]),
            &answered,
        );
        reads.keep_head(
            4,
            now,
            &HashMap::from([(app, state(&[(a, true)]))]),
            &answered,
        );
        let head = reads.head().unwrap();
        assert_eq!(head.number, 5);
        assert!(!head.apps[&app].state.is_allowed(&a));
        reads.keep_head(
            6,
            now,
            &HashMap::from([(app, state(&[(a, true)]))]),
            &answered,
        );
        assert!(reads.head().unwrap().apps[&app].state.is_allowed(&a));
    }
}
