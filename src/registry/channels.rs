//! The table of channels: each channel's epoch, offset counter, subscriber counts and history.
//!
//! Striped by the channel name's hash so that publishes to different channels rarely share a
//! lock. A publish holds its channel's stripe while it takes the next offset, stores the frame
//! in the history and hands it to every shard; a subscriber is attached under the same lock.
//! That is what keeps each channel's offsets in order on every connection, and what makes the
//! switch from a replay to live messages exact.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use super::history::{Epoch, History, HistoryBudget};

/// How long a channel nobody subscribes to, with nothing in its history, keeps its epoch and
/// offset counter after its last publish, so that a subscriber joining soon after sees offsets
/// continue instead of a new epoch.
pub const RETENTION_MS: u64 = 5 * 60 * 1000;

const STRIPES: usize = 64;

/// One channel's state.
#[derive(Debug)]
pub struct ChannelState {
    /// The stream's identity, chosen when the channel was first seen (or seen again after it
    /// was forgotten).
    pub epoch: Epoch,
    /// The offset of the last publish; the next one gets `offset + 1`.
    pub offset: u64,
    /// Connections subscribed, over all shards.
    pub subscribers: u64,
    /// How many of those take `format=raw` frames.
    pub raw_subscribers: u64,
    /// When the channel was last published to or last lost a subscriber (registry clock, ms).
    pub touched_ms: u64,
    /// The last messages, for recovery (memory mode; in cluster mode they live in Redis).
    pub history: History,
    /// The epoch and offset are the stream's own. Always in memory mode, where this node is
    /// the stream; in cluster mode once Redis has said where the stream stands (a message
    /// relayed, or a subscriber's read), and no longer once the node stops listening.
    pub confirmed: bool,
}

impl ChannelState {
    /// A channel seen for the first time: a new epoch, nothing published.
    pub fn new(confirmed: bool) -> Self {
        Self {
            epoch: Epoch::random(),
            offset: 0,
            subscribers: 0,
            raw_subscribers: 0,
            touched_ms: 0,
            history: History::default(),
            confirmed,
        }
    }
}

/// One stripe of the table: the channels whose name hashes to it.
type Stripe = Mutex<HashMap<Arc<str>, ChannelState>>;

/// All channels, striped.
#[derive(Debug)]
pub struct ChannelTable {
    stripes: Box<[Stripe]>,
    hasher: RandomState,
    /// This node is each stream (memory mode), rather than following streams kept in Redis.
    local: bool,
}

impl ChannelTable {
    /// An empty table; `local` when this node is the only one (memory mode).
    pub fn new(local: bool) -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            local,
        }
    }

    /// Locks the stripe holding `channel`. The guard must not be held across an `.await`.
    pub fn lock(&self, channel: &str) -> MutexGuard<'_, HashMap<Arc<str>, ChannelState>> {
        let stripe = self.hasher.hash_one(channel) as usize % STRIPES;
        self.stripes[stripe].lock()
    }

    /// The state of `channel` in a locked stripe, made (with a new epoch) if the channel is new,
    /// with the table's own copy of its name.
    pub fn entry<'a>(
        &self,
        stripe: &'a mut HashMap<Arc<str>, ChannelState>,
        channel: &str,
    ) -> (Arc<str>, &'a mut ChannelState) {
        let name = match stripe.get_key_value(channel) {
            Some((name, _)) => Arc::clone(name),
            None => {
                let name: Arc<str> = Arc::from(channel);
                stripe.insert(Arc::clone(&name), ChannelState::new(self.local));
                name
            }
        };
        let state = stripe.get_mut(channel).expect("present or just inserted");
        (name, state)
    }

    /// Adds (`delta` = 1) or removes (-1) one subscriber of `channel`; returns whether the
    /// channel gained its first subscriber or lost its last.
    pub fn count_subscriber(&self, channel: &Arc<str>, raw: bool, delta: i64, now_ms: u64) -> bool {
        let mut stripe = self.lock(channel);
        let state = stripe
            .entry(Arc::clone(channel))
            .or_insert_with(|| ChannelState::new(self.local));
        let before = state.subscribers;
        state.subscribers = state.subscribers.saturating_add_signed(delta);
        if raw {
            state.raw_subscribers = state.raw_subscribers.saturating_add_signed(delta);
        }
        if delta < 0 {
            state.touched_ms = now_ms;
        }
        if state.subscribers == 0 && !self.local {
            // The node stops listening to the stream: what it knew of it goes stale.
            state.confirmed = false;
        }
        (before == 0) != (state.subscribers == 0)
    }

    /// Whether `channel` has at least one subscriber, and whether one of them is raw.
    pub fn subscribed(&self, channel: &str) -> (bool, bool) {
        self.lock(channel)
            .get(channel)
            .map_or((false, false), |state| {
                (state.subscribers > 0, state.raw_subscribers > 0)
            })
    }

    /// Every channel with at least one subscriber, with its subscriber count, sorted by name.
    pub fn list(&self) -> Vec<(Arc<str>, u64)> {
        let mut channels = Vec::new();
        for stripe in self.stripes.iter() {
            channels.extend(
                stripe
                    .lock()
                    .iter()
                    .filter(|(_, state)| state.subscribers > 0)
                    .map(|(name, state)| (Arc::clone(name), state.subscribers)),
            );
        }
        channels.sort_unstable();
        channels
    }

    /// How many channels have at least one subscriber, and how many subscriptions there are
    /// over all channels, in one pass.
    pub fn usage(&self) -> (usize, u64) {
        let (mut channels, mut subscriptions) = (0, 0);
        for stripe in self.stripes.iter() {
            for state in stripe.lock().values() {
                channels += usize::from(state.subscribers > 0);
                subscriptions += state.subscribers;
            }
        }
        (channels, subscriptions)
    }

    /// Drops history messages older than `ttl_ms`, then forgets channels without subscribers
    /// or history that nobody touched for [`RETENTION_MS`].
    pub fn sweep(&self, now_ms: u64, ttl_ms: u64, budget: &HistoryBudget) {
        let mut freed = 0;
        for stripe in self.stripes.iter() {
            stripe.lock().retain(|_, state| {
                freed += state.history.expire(now_ms, ttl_ms);
                state.subscribers > 0
                    || !state.history.is_empty()
                    || now_ms.saturating_sub(state.touched_ms) < RETENTION_MS
            });
        }
        budget.record(-(freed as i64));
    }

    /// Drops the oldest messages of the whole node until the histories hold no more than the
    /// budget's low-water mark. Runs one pass at a time; a publish that finds one running
    /// leaves the work to it.
    pub fn evict_oldest(&self, budget: &HistoryBudget) {
        if !budget.start_eviction() {
            return;
        }
        // The oldest message of every channel, oldest first; each eviction puts the channel's
        // next oldest back.
        let mut oldest: BinaryHeap<Reverse<(u64, usize, Arc<str>)>> = BinaryHeap::new();
        for (index, stripe) in self.stripes.iter().enumerate() {
            for (name, state) in stripe.lock().iter() {
                if let Some(at) = state.history.oldest_at() {
                    oldest.push(Reverse((at, index, Arc::clone(name))));
                }
            }
        }
        while budget.held() > budget.low_water() {
            let Some(Reverse((_, index, name))) = oldest.pop() else {
                break;
            };
            let mut stripe = self.stripes[index].lock();
            let Some(state) = stripe.get_mut(&name) else {
                continue;
            };
            budget.record(-(state.history.pop_oldest() as i64));
            if let Some(at) = state.history.oldest_at() {
                oldest.push(Reverse((at, index, name)));
            }
        }
        budget.end_eviction();
    }
}
