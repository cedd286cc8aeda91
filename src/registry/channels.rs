//! The table of channels: each channel's offset counter and subscriber counts.
//!
//! Striped by the channel name's hash so that publishes to different channels rarely share a
//! lock. A publish holds its channel's stripe while it takes the next offset and hands the frame
//! to every shard, which is what keeps each channel's offsets in order on every connection.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

/// How long a channel nobody subscribes to keeps its offset counter after its last publish, so
/// that a subscriber joining soon after sees offsets continue instead of restarting at 1.
pub const RETENTION_MS: u64 = 5 * 60 * 1000;

const STRIPES: usize = 64;

/// One channel's state.
#[derive(Debug, Default)]
pub struct ChannelState {
    /// The offset of the last publish; the next one gets `offset + 1`.
    pub offset: u64,
    /// Connections subscribed, over all shards.
    pub subscribers: u64,
    /// How many of those take `format=raw` frames.
    pub raw_subscribers: u64,
    /// When the channel was last published to or last lost a subscriber (registry clock, ms).
    pub touched_ms: u64,
}

/// One stripe of the table: the channels whose name hashes to it.
type Stripe = Mutex<HashMap<Arc<str>, ChannelState>>;

/// All channels, striped.
#[derive(Debug)]
pub struct ChannelTable {
    stripes: Box<[Stripe]>,
    hasher: RandomState,
}

impl Default for ChannelTable {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl ChannelTable {
    /// Locks the stripe holding `channel`. The guard must not be held across an `.await`.
    pub fn lock(&self, channel: &str) -> MutexGuard<'_, HashMap<Arc<str>, ChannelState>> {
        let stripe = self.hasher.hash_one(channel) as usize % STRIPES;
        self.stripes[stripe].lock()
    }

    /// Adds (`delta` = 1) or removes (-1) one subscriber of `channel`; returns whether the
    /// channel gained its first subscriber or lost its last.
    pub fn count_subscriber(&self, channel: &Arc<str>, raw: bool, delta: i64, now_ms: u64) -> bool {
        let mut stripe = self.lock(channel);
        let state = stripe.entry(Arc::clone(channel)).or_default();
        let before = state.subscribers;
        state.subscribers = state.subscribers.saturating_add_signed(delta);
        if raw {
            state.raw_subscribers = state.raw_subscribers.saturating_add_signed(delta);
        }
        if delta < 0 {
            state.touched_ms = now_ms;
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

    /// Forgets channels without subscribers that nobody touched for [`RETENTION_MS`].
    pub fn sweep(&self, now_ms: u64) {
        for stripe in self.stripes.iter() {
            stripe.lock().retain(|_, state| {
                state.subscribers > 0 || now_ms.saturating_sub(state.touched_ms) < RETENTION_MS
            });
        }
    }
}
