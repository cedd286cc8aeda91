//! One shard of the registry: a slab of connections, the shard's channel and client indexes,
//! and the two tasks that work on them (the writer that fans frames out, and housekeeping).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use slab::Slab;
use tokio::sync::mpsc;

use super::outbox::{CloseReason, Outbox, Push, PushedAll};
use super::{Format, Inner};
use crate::metrics::Metrics;

/// How many queued deliveries the writer takes per round: one round pushes them all, then
/// writes each touched connection once.
const WRITER_BATCH: usize = 64;
/// How many connections the writer flushes before it lets other tasks run.
const FLUSHES_PER_YIELD: usize = 128;

/// A frame (or pair of frames) to push to the connections it is meant for.
#[derive(Debug)]
pub struct Delivery {
    /// The channel's subscribers get it; `None` means every json and raw connection.
    pub channel: Option<Arc<str>>,
    /// The frame for json connections.
    pub json: Bytes,
    /// The frame for raw connections; `None` when the publish found no raw subscriber.
    pub raw: Option<Bytes>,
    /// The channel offset of a channel message, checked against the floors of subscribers
    /// attached after it was handed over; 0 for frames without one (gaps, broadcasts).
    pub offset: u64,
    /// When the publish was made, for the publish-to-enqueue latency.
    pub published_at: Instant,
}

impl Delivery {
    /// A delivery of `json` (and `raw`) to the subscribers of `channel`, or to every
    /// connection.
    pub fn new(channel: Option<Arc<str>>, json: Bytes, raw: Option<Bytes>) -> Self {
        Self {
            channel,
            json,
            raw,
            offset: 0,
            published_at: Instant::now(),
        }
    }

    /// A channel message with its offset.
    pub fn message(channel: Arc<str>, offset: u64, json: Bytes, raw: Option<Bytes>) -> Self {
        Self {
            offset,
            ..Self::new(Some(channel), json, raw)
        }
    }

    fn frame_for(&self, format: Format) -> Option<&Bytes> {
        match format {
            Format::Json => Some(&self.json),
            Format::Raw => self.raw.as_ref(),
            Format::Echo => None,
        }
    }
}

/// A registered connection, as the shard sees it.
#[derive(Debug)]
pub struct Entry {
    pub outbox: Arc<Outbox>,
    pub client_id: Arc<str>,
    /// The channels this connection is subscribed to (no duplicates).
    pub subscriptions: Vec<Arc<str>>,
    /// Tells this entry apart from earlier ones that had the same slab key.
    pub generation: u32,
    pub format: Format,
    /// When the shard last pinged this connection (registry clock, ms).
    pub pinged_ms: u64,
    /// When the connection's token expires (registry clock, ms); `u64::MAX` for never.
    pub expires_ms: u64,
}

/// Slab keys filed under one name. Most client ids have a single connection, so one key is
/// kept inline and only a second one allocates.
#[derive(Debug)]
pub enum Keys {
    /// Exactly one key.
    One(u32),
    /// Two or more keys (never fewer: a `Many` shrinking to one stays `Many`).
    Many(Vec<u32>),
}

impl Keys {
    fn push(&mut self, key: u32) {
        match self {
            Keys::One(first) => *self = Keys::Many(vec![*first, key]),
            Keys::Many(keys) => keys.push(key),
        }
    }

    /// Removes `key`; returns whether no key is left.
    fn remove(&mut self, key: u32) -> bool {
        match self {
            Keys::One(only) => *only == key,
            Keys::Many(keys) => {
                if let Some(at) = keys.iter().position(|&k| k == key) {
                    keys.swap_remove(at);
                }
                keys.is_empty()
            }
        }
    }

    /// Every key.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let slice = match self {
            Keys::One(key) => std::slice::from_ref(key),
            Keys::Many(keys) => keys.as_slice(),
        };
        slice.iter().copied()
    }
}

/// The shard's data, behind one lock that is never held across an `.await` or a socket write.
#[derive(Debug, Default)]
pub struct ShardState {
    pub conns: Slab<Entry>,
    /// Channel name to the slab keys of this shard's subscribers.
    pub channels: HashMap<Arc<str>, Keys>,
    /// Client id to the slab keys of that client's connections on this shard.
    pub clients: HashMap<Arc<str>, Keys>,
    /// Subscribers attached to a channel at some offset, while messages up to it may still be
    /// in the writer's queue: each gets only messages past its floor (it has the others from
    /// its replay, or it subscribed after them). Dropped at the first message past the floor.
    pub floors: HashMap<Arc<str>, HashMap<u32, u64>>,
    pub next_generation: u32,
}

impl ShardState {
    /// Adds `key` to the index under `name`; returns whether the name is new to the index.
    pub fn index_add(index: &mut HashMap<Arc<str>, Keys>, name: &Arc<str>, key: u32) -> bool {
        match index.get_mut(&**name) {
            Some(keys) => {
                keys.push(key);
                false
            }
            None => {
                index.insert(Arc::clone(name), Keys::One(key));
                true
            }
        }
    }

    /// Removes `key` from the index under `name`, dropping the name once it has no keys;
    /// returns whether it was dropped.
    pub fn index_remove(index: &mut HashMap<Arc<str>, Keys>, name: &str, key: u32) -> bool {
        let emptied = index.get_mut(name).is_some_and(|keys| keys.remove(key));
        if emptied {
            index.remove(name);
        }
        emptied
    }

    /// Forgets the floor of `key` on `channel`, if it has one.
    pub fn remove_floor(&mut self, channel: &str, key: u32) {
        if let Some(floors) = self.floors.get_mut(channel) {
            floors.remove(&key);
            if floors.is_empty() {
                self.floors.remove(channel);
            }
        }
    }

    /// The shard's own copy of a channel name, so that its subscribers share one allocation.
    pub fn intern_channel(&self, channel: &str) -> Arc<str> {
        self.channels
            .get_key_value(channel)
            .map_or_else(|| Arc::from(channel), |(name, _)| Arc::clone(name))
    }
}

/// One pass of pushes over a shard's connections: what it queued, what it dropped, and the
/// outboxes to flush once the shard lock is released. Shared by the writer and direct sends so
/// that both count and log a slow consumer the same way.
#[derive(Debug, Default)]
pub struct Fanout {
    queued: u64,
    overflowed: u64,
    /// Outboxes that went from empty to non-empty in this pass.
    pub touched: Vec<Arc<Outbox>>,
}

impl Fanout {
    /// Queues `frame` on `entry`'s outbox, counting the delivery, or counting and logging the
    /// drop when the outbox overflows.
    pub fn push(&mut self, entry: &Entry, frame: &Bytes, capacity: usize) {
        match entry.outbox.push(frame.clone(), capacity) {
            Push::Queued { first } => {
                self.queued += 1;
                if first {
                    self.touched.push(Arc::clone(&entry.outbox));
                }
            }
            Push::Overflowed => {
                self.overflowed += 1;
                log_slow_consumer(&entry.client_id, capacity);
            }
            Push::Closing => {}
        }
    }

    /// Queues `frames` on `entry`'s outbox under one lock (see [`Outbox::push_all`]), counting
    /// the deliveries, or counting and logging the drop when the outbox overflows.
    pub fn push_all<'a>(
        &mut self,
        entry: &Entry,
        frames: impl IntoIterator<Item = &'a Bytes>,
        capacity: usize,
    ) {
        let PushedAll {
            queued,
            first,
            overflowed,
        } = entry.outbox.push_all(frames, capacity);
        self.queued += queued;
        if first {
            self.touched.push(Arc::clone(&entry.outbox));
        }
        if overflowed {
            self.overflowed += 1;
            log_slow_consumer(&entry.client_id, capacity);
        }
    }

    /// Adds the pass's counts to the metrics and starts the next pass from zero.
    pub fn record(&mut self, metrics: &Metrics) {
        metrics.deliveries.inc_by(std::mem::take(&mut self.queued));
        metrics
            .slow_consumer_drops
            .inc_by(std::mem::take(&mut self.overflowed));
    }
}

/// The one log line for a connection dropped because its queue overflowed (whatever frame
/// overflowed it: a delivery, a ping or a reply); the caller counts it in the metrics.
pub fn log_slow_consumer(client_id: &str, capacity: usize) {
    tracing::warn!(
        client_id,
        capacity,
        "dropping slow consumer: its queue is full"
    );
}

/// One shard: its state and the sending side of its writer's queue.
#[derive(Debug)]
pub struct Shard {
    pub state: Mutex<ShardState>,
    /// Publishers reserve a slot here before they take a channel's offset; bounded, so a server
    /// short of CPU slows publishers down instead of growing without limit.
    pub tx: mpsc::Sender<Arc<Delivery>>,
}

/// Deliveries a shard's writer queue holds before publishers wait. Small on purpose: under a
/// saturating load, latency is the backlog divided by the throughput, and this queue plus the
/// round in progress is the backlog. 32 deliveries per round still share each write.
pub const WRITER_QUEUE: usize = 64;

impl Shard {
    /// A shard and the receiving end of its writer queue.
    pub fn new() -> (Self, mpsc::Receiver<Arc<Delivery>>) {
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let shard = Self {
            state: Mutex::new(ShardState::default()),
            tx,
        };
        (shard, rx)
    }
}

/// The writer task: pushes every delivery of a batch into the outboxes of the shard's
/// connections it is meant for, then flushes each of those outboxes once, writing straight to
/// the sockets. Never waits on a connection: a full socket is left to the connection's own
/// task, and a full outbox closes that connection. Ends when the registry is dropped.
pub async fn run_writer(inner: Weak<Inner>, index: usize, mut rx: mpsc::Receiver<Arc<Delivery>>) {
    let mut batch = Vec::with_capacity(WRITER_BATCH);
    let mut fanout = Fanout::default();
    while rx.recv_many(&mut batch, WRITER_BATCH).await > 0 {
        // Let the tasks that are ready to publish run first, and take what they queued too:
        // every delivery in a batch shares one write per connection.
        tokio::task::yield_now().await;
        while batch.len() < WRITER_BATCH {
            match rx.try_recv() {
                Ok(delivery) => batch.push(delivery),
                Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        let capacity = inner.limits.queue_capacity;
        let shard = &inner.shards[index];
        {
            let mut state = shard.state.lock();
            // Consecutive deliveries for the same connections (one channel's, or every
            // connection's) are pushed connection by connection: each outbox is locked, and
            // its memory touched, once for all of them instead of once per delivery. A
            // connection still gets its frames in the order of the batch.
            for run in batch.chunk_by(|a, b| a.channel == b.channel) {
                match &run[0].channel {
                    Some(channel) => {
                        fan_out_to_channel(&mut state, channel, run, &mut fanout, capacity)
                    }
                    None => {
                        for (_, entry) in state.conns.iter() {
                            let frames = run.iter().filter_map(|d| d.frame_for(entry.format));
                            fanout.push_all(entry, frames, capacity);
                        }
                    }
                }
                for delivery in run {
                    inner
                        .metrics
                        .publish_to_enqueue
                        .observe(delivery.published_at.elapsed().as_secs_f64());
                }
            }
        }
        // Outside the shard lock: one write per connection for the whole batch. Yielding now
        // and then lets publishers go on meanwhile, so the next batch carries more deliveries
        // and each write carries more frames.
        for (done, outbox) in fanout.touched.drain(..).enumerate() {
            outbox.flush(&inner.metrics);
            if done % FLUSHES_PER_YIELD == FLUSHES_PER_YIELD - 1 {
                tokio::task::yield_now().await;
            }
        }
        batch.clear();
        fanout.record(&inner.metrics);
    }
}

/// Pushes a run of `channel`'s deliveries to the channel's subscribers on this shard: to each
/// the frames for its format past its floor, if it has one (a subscriber attached at some
/// offset has the messages up to it already).
fn fan_out_to_channel(
    state: &mut ShardState,
    channel: &str,
    run: &[Arc<Delivery>],
    fanout: &mut Fanout,
    capacity: usize,
) {
    let ShardState {
        conns,
        channels,
        floors,
        ..
    } = state;
    let channel_floors = floors.get(channel);
    for key in channels.get(channel).into_iter().flat_map(Keys::iter) {
        let entry = &conns[key as usize];
        let floor = channel_floors.and_then(|floors| floors.get(&key)).copied();
        let frames = run
            .iter()
            .filter(|d| !floor.is_some_and(|floor| d.offset > 0 && d.offset <= floor))
            .filter_map(|d| d.frame_for(entry.format));
        fanout.push_all(entry, frames, capacity);
    }
    // Messages come in offset order: a floor the run reached is done.
    let reached = run.iter().map(|d| d.offset).max().unwrap_or(0);
    if reached > 0
        && let Some(channel_floors) = floors.get_mut(channel)
    {
        channel_floors.retain(|_, floor| *floor > reached);
        if channel_floors.is_empty() {
            floors.remove(channel);
        }
    }
}

/// The housekeeping task: pings quiet connections, closes idle ones, and (on shard 0) forgets
/// abandoned channels. A pulled stream (Server-Sent Events) is pinged every ping interval but
/// never closed as idle: its client has no way to send anything. Ends when the registry is
/// dropped.
pub async fn run_housekeeping(inner: Weak<Inner>, index: usize, tick: Duration) {
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sweep_ms = 0;
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = inner.clock.now_ms();
        let limits = &inner.limits;
        let mut pinged = Vec::new();
        let mut overflowed = 0;
        let mut state = inner.shards[index].state.lock();
        for (_, entry) in state.conns.iter_mut() {
            let quiet = now.saturating_sub(entry.outbox.last_active_ms());
            if now >= entry.expires_ms {
                if entry.outbox.close(CloseReason::TokenExpired) {
                    tracing::debug!(client_id = %entry.client_id, "closing: token expired");
                }
            } else if quiet >= limits.idle_timeout_ms && !entry.outbox.is_pulled() {
                if entry.outbox.close(CloseReason::IdleTimeout) {
                    tracing::debug!(client_id = %entry.client_id, "closing idle connection");
                }
            } else if quiet >= limits.ping_interval_ms
                && now.saturating_sub(entry.pinged_ms) >= limits.ping_interval_ms
            {
                entry.pinged_ms = now;
                match entry
                    .outbox
                    .push(super::ping_frame(), limits.queue_capacity)
                {
                    Push::Queued { first: true } => pinged.push(Arc::clone(&entry.outbox)),
                    Push::Overflowed => {
                        overflowed += 1;
                        log_slow_consumer(&entry.client_id, limits.queue_capacity);
                    }
                    Push::Queued { first: false } | Push::Closing => {}
                }
            }
        }
        drop(state);
        inner.metrics.slow_consumer_drops.inc_by(overflowed);
        for outbox in pinged {
            outbox.flush(&inner.metrics);
        }
        if index == 0 && now.saturating_sub(last_sweep_ms) >= SWEEP_EVERY_MS {
            last_sweep_ms = now;
            inner
                .channels
                .sweep(now, inner.limits.history.ttl_ms, &inner.history_budget);
        }
    }
}

const SWEEP_EVERY_MS: u64 = 10_000;
