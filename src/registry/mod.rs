//! The registry: every live connection, what it subscribes to, and the fan-out to it.
//!
//! Connections are spread over N shards, each a `parking_lot::Mutex<Slab<..>>` with its own
//! channel and client indexes and its own writer task. A publish costs the publisher O(shards):
//! it takes the channel's next offset, encodes the frame once, stores it in the channel's
//! history and hands an `Arc` of it to each shard's writer, which pushes it into the bounded
//! outbox of every subscriber on the shard.
//!
//! Subscribing takes two steps: [`Registry::join`] counts the subscription, and
//! [`Registry::catch_up`] attaches it to the channel's fan-out under the channel's lock, after
//! replaying what the client missed, in steps that fit its queue. A subscriber attached at
//! offset n gets exactly the messages after n: those handed to the writers before the attach
//! are held back by a floor.
//!
//! Lock order: a channel stripe, then a shard, then an outbox; nothing takes a stripe while it
//! holds a shard.

mod channels;
pub mod history;
mod interest;
pub mod outbox;
mod shard;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::{self, Payload};
use crate::ws::frame::{OpCode, encode_frame};

use channels::ChannelTable;
pub use channels::RETENTION_MS;
pub use history::{Epoch, Fetched, Position, Recovery, RecoveryFailure, Standing};
use history::{HistoryBudget, HistoryLimits};
pub use interest::{Interest, Topic};
pub use outbox::{CloseReason, Flushed, Outbox, Push, Signal, Sink, Taken};
use shard::{Delivery, Entry, Fanout, Keys, Shard, ShardState};

/// How a connection wants its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON envelopes (`{"type":"message",...}`) and the JSON request protocol.
    Json,
    /// The payload of one channel's messages (and of direct sends and broadcasts), nothing
    /// else: a JSON string as its text, see [`Payload::raw`].
    Raw,
    /// The `/echo` endpoint: no messages at all, only the echo of what the client sends.
    Echo,
}

/// Names one registered connection. Slab keys are reused, so the generation makes sure a stale
/// id never reaches a newer connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnId {
    shard: u32,
    key: u32,
    generation: u32,
}

/// What [`Registry::register`] hands the connection task.
#[derive(Debug)]
pub struct Registration {
    /// The connection's id, for every later call.
    pub id: ConnId,
    /// The connection's outgoing queue.
    pub outbox: Arc<Outbox>,
}

/// Why a subscribe was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// The connection already has `--max-subscriptions` channels.
    #[error("too many subscriptions (limit {0})")]
    TooMany(usize),
    /// The connection is gone (it was closed while the request was handled).
    #[error("connection is closed")]
    Gone,
}

/// Why a publish could not be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The registry's writer tasks have stopped: the server is shutting down.
    #[error("server is shutting down")]
    ShuttingDown,
}

/// Where [`Registry::catch_up`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// A new subscription: from the client's position if it gave one, otherwise from now.
    Start(Option<Position>),
    /// A replay under way, after this position (returned by the previous step).
    Resume(Position),
}

/// What one step of [`Registry::catch_up`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// The subscription is attached: live messages follow what was queued.
    Live(Standing),
    /// Part of the replay is queued; call again with [`Cursor::Resume`] at `cursor` once the
    /// client has read some of it.
    Replaying {
        /// Where the channel stood when the subscription started.
        standing: Standing,
        /// The position of the last replayed message queued.
        cursor: Position,
    },
    /// The replay cannot go on: the messages after the cursor left the history window (or the
    /// channel's stream changed) before the client read up to them. The client must be
    /// closed, so that it reconnects with the position it really has.
    Interrupted,
    /// The connection is closed or closing (its queue overflowed).
    Gone,
}

/// Where [`Registry::catch_up`] reads what a client missed.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// This node's own history (memory mode).
    Local,
    /// What was just read from Redis (cluster mode).
    Fetched(&'a Fetched),
}

/// What [`Registry::deliver`] did with a message relayed from Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relayed {
    /// Handed to the writers.
    Delivered,
    /// Already relayed (or read from the history); dropped.
    Duplicate,
    /// Messages after `after` are missing before this one: read them from the history first.
    Gap {
        /// The offset this node last relayed.
        after: u64,
    },
    /// The message is of another epoch than the one this node follows: the stream was
    /// started again.
    NewEpoch,
    /// Nobody on this node subscribes to the channel.
    NotListening,
}

/// A page of a channel's history, for `/api/history`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// The channel's epoch.
    pub epoch: Epoch,
    /// The channel's latest offset.
    pub offset: u64,
    /// The messages' offsets and frames, oldest first.
    pub messages: Vec<(u64, Bytes)>,
}

/// The result of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishReceipt {
    /// The channel offset given to this message.
    pub offset: u64,
    /// The channel's subscriptions at the time of the publish.
    pub subscribers: u64,
}

/// The main counters, for `/api/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    /// Connections open now.
    pub connections: u64,
    /// Connections registered since start.
    pub connections_opened: u64,
    /// Connections unregistered since start.
    pub connections_closed: u64,
    /// Channel publishes since start.
    pub publishes: u64,
    /// Frames queued to connections since start.
    pub deliveries: u64,
    /// Connections dropped because their queue overflowed.
    pub slow_consumer_drops: u64,
}

#[derive(Debug)]
struct Limits {
    queue_capacity: usize,
    history: HistoryLimits,
    max_subscriptions: usize,
    client_publish_rate: u32,
    ping_interval_ms: u64,
    idle_timeout_ms: u64,
}

/// Milliseconds since the registry started: cheap to read, and small enough for an atomic.
/// Tokio's clock, so that tests can pause and advance it.
#[derive(Debug)]
struct Clock(tokio::time::Instant);

impl Clock {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

#[derive(Debug)]
struct Inner {
    shards: Box<[Shard]>,
    channels: ChannelTable,
    limits: Limits,
    clock: Clock,
    metrics: Metrics,
    /// The cap on the bytes every channel's history holds together.
    history_budget: HistoryBudget,
    /// Round-robin cursor for placing new connections.
    next_shard: AtomicUsize,
    /// Registered connections.
    live: AtomicUsize,
    /// Connection tasks still running, closing ones included; [`Registry::drained`] waits
    /// for zero.
    tasks: AtomicUsize,
    /// Notified when `tasks` drops to zero.
    drained: Notify,
    /// In cluster mode, where channels and client ids gaining their first or losing their last
    /// local subscriber are marked for the backplane.
    interest: Option<Arc<Interest>>,
}

/// The shared handle to the registry; cheap to clone.
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

fn ping_frame() -> Bytes {
    static PING: &[u8] = &[0x89, 0x00];
    Bytes::from_static(PING)
}

impl Registry {
    /// Builds the registry and spawns each shard's writer and housekeeping tasks; they end when
    /// the last handle is dropped.
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    pub fn new(config: &Config) -> Self {
        Self::build(config, None)
    }

    /// A registry for cluster mode: like [`Registry::new`], and it marks in `interest` every
    /// channel and client id whose local subscribers or connections may have crossed zero.
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    pub fn with_interest(config: &Config, interest: Arc<Interest>) -> Self {
        Self::build(config, Some(interest))
    }

    fn build(config: &Config, interest: Option<Arc<Interest>>) -> Self {
        let (shards, receivers): (Vec<_>, Vec<_>) =
            (0..config.shards).map(|_| Shard::new()).unzip();
        let inner = Arc::new(Inner {
            shards: shards.into_boxed_slice(),
            channels: ChannelTable::new(interest.is_none()),
            limits: Limits {
                queue_capacity: config.queue_capacity,
                history: HistoryLimits {
                    size: config.history_size,
                    ttl_ms: duration_ms(config.history_ttl),
                },
                max_subscriptions: config.max_subscriptions,
                client_publish_rate: config.client_publish_rate,
                ping_interval_ms: duration_ms(config.ping_interval),
                idle_timeout_ms: duration_ms(config.idle_timeout),
            },
            clock: Clock(tokio::time::Instant::now()),
            metrics: Metrics::new(),
            history_budget: HistoryBudget::new(config.history_memory),
            next_shard: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            tasks: AtomicUsize::new(0),
            drained: Notify::new(),
            interest,
        });
        let tick = (config.ping_interval.min(config.idle_timeout) / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        for (index, rx) in receivers.into_iter().enumerate() {
            tokio::spawn(shard::run_writer(Arc::downgrade(&inner), index, rx));
            tokio::spawn(shard::run_housekeeping(Arc::downgrade(&inner), index, tick));
        }
        Self { inner }
    }

    /// The registry clock, in milliseconds; pass it to [`Outbox::touch`].
    pub fn now_ms(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    /// Publishes per second each client connection may make (0: no limit).
    pub fn client_publish_rate(&self) -> u32 {
        self.inner.limits.client_publish_rate
    }

    /// The configured outbox capacity, for connections pushing their own replies.
    pub fn queue_capacity(&self) -> usize {
        self.inner.limits.queue_capacity
    }

    /// Adds a connection that writes to `socket` (`None`: a connection without one, whose
    /// frames just queue up, as in benchmarks). It receives broadcasts and direct sends at
    /// once, and channel messages once subscribed. A `held` outbox writes nothing until
    /// [`Outbox::release`], so that the connection's first frame (the welcome, which says
    /// where its channels stand) can go in front of what is queued while it subscribes.
    pub fn register(
        &self,
        client_id: Arc<str>,
        format: Format,
        socket: Option<Arc<TcpStream>>,
        held: bool,
    ) -> Registration {
        self.add(
            client_id,
            format,
            socket.map_or(Sink::Detached, Sink::Socket),
            held,
        )
    }

    /// Adds a json connection whose frames its owner takes itself ([`Outbox::poll_take`]): a
    /// Server-Sent Events stream, whose bytes hyper writes. Everything else is as for
    /// [`Registry::register`]: the same queue and slow-consumer rule, pings (which the owner
    /// turns into its own heartbeat), and no idle timeout, since its client cannot send.
    pub fn register_pulled(&self, client_id: Arc<str>, held: bool) -> Registration {
        self.add(client_id, Format::Json, Sink::Pulled, held)
    }

    fn add(&self, client_id: Arc<str>, format: Format, sink: Sink, held: bool) -> Registration {
        let inner = &*self.inner;
        let shard_index = inner.next_shard.fetch_add(1, Ordering::Relaxed) % inner.shards.len();
        let outbox = Arc::new(Outbox::new(sink, inner.clock.now_ms(), held));
        let mut state = inner.shards[shard_index].state.lock();
        let generation = state.next_generation;
        state.next_generation = generation.wrapping_add(1);
        let key = state.conns.insert(Entry {
            outbox: Arc::clone(&outbox),
            client_id: Arc::clone(&client_id),
            subscriptions: Vec::new(),
            generation,
            format,
            pinged_ms: 0,
            expires_ms: u64::MAX,
        });
        let key = u32::try_from(key).expect("fewer than 2^32 connections per shard");
        let new_client =
            format != Format::Echo && ShardState::index_add(&mut state.clients, &client_id, key);
        drop(state);
        if new_client {
            self.mark(|| Topic::Client(Arc::clone(&client_id)));
        }
        inner.live.fetch_add(1, Ordering::Relaxed);
        inner.metrics.connections_opened.inc();
        Registration {
            id: ConnId {
                shard: shard_index as u32,
                key,
                generation,
            },
            outbox,
        }
    }

    fn with_entry<T>(&self, id: ConnId, f: impl FnOnce(&mut ShardState, u32) -> T) -> Option<T> {
        let mut state = self.inner.shards[id.shard as usize].state.lock();
        match state.conns.get(id.key as usize) {
            Some(entry) if entry.generation == id.generation => Some(f(&mut state, id.key)),
            _ => None,
        }
    }

    /// Closes the connection with 4001 "token expired" once `expires_in` has passed, unless a
    /// later call moves the time. Checked by the shard's housekeeping, so it happens within a
    /// second of the time.
    pub fn set_expiry(&self, id: ConnId, expires_in: Duration) {
        let at = self.now_ms().saturating_add(duration_ms(expires_in));
        self.with_entry(id, |state, key| state.conns[key as usize].expires_ms = at);
    }

    /// The connection's client id (`None` once it is unregistered). Looked up rather than
    /// kept by the connection task, which every idle connection would pay for.
    pub fn client_id(&self, id: ConnId) -> Option<Arc<str>> {
        self.with_entry(id, |state, key| {
            Arc::clone(&state.conns[key as usize].client_id)
        })
    }

    /// Counts and logs a connection dropped because a frame of its own (a reply) overflowed
    /// its queue; deliveries and pings count theirs where they push.
    pub fn slow_consumer_dropped(&self, id: ConnId) {
        self.inner.metrics.slow_consumer_drops.inc();
        let client_id = self.client_id(id);
        shard::log_slow_consumer(client_id.as_deref().unwrap_or("?"), self.queue_capacity());
    }

    /// The channels the connection is subscribed to.
    pub fn subscriptions(&self, id: ConnId) -> Vec<Arc<str>> {
        self.with_entry(id, |state, key| {
            state.conns[key as usize].subscriptions.clone()
        })
        .unwrap_or_default()
    }

    /// Removes a connection and all its subscriptions. A stale or repeated id does nothing.
    pub fn unregister(&self, id: ConnId) {
        let removed = self.with_entry(id, |state, key| {
            let entry = state.conns.remove(key as usize);
            for channel in &entry.subscriptions {
                ShardState::index_remove(&mut state.channels, channel, key);
                state.remove_floor(channel, key);
            }
            if ShardState::index_remove(&mut state.clients, &entry.client_id, key) {
                self.mark(|| Topic::Client(Arc::clone(&entry.client_id)));
            }
            entry
        });
        let Some(entry) = removed else { return };
        // Counted outside the shard lock: a stripe is never taken under a shard.
        let now = self.now_ms();
        let raw = entry.format == Format::Raw;
        for channel in &entry.subscriptions {
            if self.inner.channels.count_subscriber(channel, raw, -1, now) {
                self.mark(|| Topic::Channel(Arc::clone(channel)));
            }
        }
        self.inner.live.fetch_sub(1, Ordering::Relaxed);
    }

    /// Subscribes the connection to `channel` (a valid name) from now on: [`Registry::join`]
    /// and [`Registry::catch_up`] from the latest offset. Returns `false` when it already was
    /// subscribed, which is not an error.
    ///
    /// # Errors
    /// [`SubscribeError::TooMany`] past `--max-subscriptions`; [`SubscribeError::Gone`] for a
    /// connection that is no longer registered.
    pub fn subscribe(&self, id: ConnId, channel: &str) -> Result<bool, SubscribeError> {
        if !self.join(id, channel)? {
            return Ok(false);
        }
        match self.catch_up(id, channel, Cursor::Start(None), 0, Source::Local, |_| None) {
            CatchUp::Live(_) => Ok(true),
            _ => Err(SubscribeError::Gone),
        }
    }

    /// The first step of a subscription: counts the connection as a subscriber of `channel`
    /// (a valid name), so that publishes are handed to the writers and, in cluster mode, the
    /// node subscribes in Redis. It gets no message until [`Registry::catch_up`] attaches it.
    /// Returns `false` when it already was subscribed.
    ///
    /// # Errors
    /// [`SubscribeError::TooMany`] past `--max-subscriptions`; [`SubscribeError::Gone`] for a
    /// connection that is no longer registered.
    pub fn join(&self, id: ConnId, channel: &str) -> Result<bool, SubscribeError> {
        let limit = self.inner.limits.max_subscriptions;
        let joined = self
            .with_entry(id, |state, key| {
                let entry = &state.conns[key as usize];
                if entry.subscriptions.iter().any(|c| &**c == channel) {
                    return Ok(None);
                }
                if entry.subscriptions.len() >= limit {
                    return Err(SubscribeError::TooMany(limit));
                }
                let channel = state.intern_channel(channel);
                let entry = &mut state.conns[key as usize];
                // Grown one at a time: most connections subscribe to a handful of channels, and
                // every idle connection pays for spare capacity.
                entry.subscriptions.reserve_exact(1);
                entry.subscriptions.push(Arc::clone(&channel));
                Ok(Some((channel, entry.format == Format::Raw)))
            })
            .unwrap_or(Err(SubscribeError::Gone))?;
        let Some((channel, raw)) = joined else {
            return Ok(false);
        };
        if self
            .inner
            .channels
            .count_subscriber(&channel, raw, 1, self.now_ms())
        {
            self.mark(|| Topic::Channel(Arc::clone(&channel)));
        }
        Ok(true)
    }

    /// The second step of a subscription the connection has [joined](Registry::join): under
    /// the channel's lock, queues what the client missed after `cursor` (at most `room`
    /// frames) from `source` and, once nothing is missing, attaches the subscription so that
    /// live messages follow. On [`Cursor::Start`], `reply` is given where the channel stands
    /// and what the recovery came to, and the frame it returns is queued first.
    pub fn catch_up(
        &self,
        id: ConnId,
        channel: &str,
        cursor: Cursor,
        room: usize,
        source: Source<'_>,
        reply: impl FnOnce(&Standing) -> Option<Bytes>,
    ) -> CatchUp {
        let inner = &*self.inner;
        let Some((outbox, format)) = self.with_entry(id, |state, key| {
            let entry = &state.conns[key as usize];
            (Arc::clone(&entry.outbox), entry.format)
        }) else {
            return CatchUp::Gone;
        };
        let mut stripe = inner.channels.lock(channel);
        let (_, state) = inner.channels.entry(&mut stripe, channel);
        if let Source::Fetched(fetched) = source {
            if !state.confirmed {
                state.epoch = fetched.epoch;
                state.offset = fetched.latest;
                state.confirmed = true;
            }
        }
        // The stream as the source has it: this node's own (memory mode), or Redis's, where
        // the node may already have relayed messages published after the read.
        let (epoch, latest, first) = match source {
            Source::Local => (
                state.epoch,
                state.offset,
                state.history.first_offset(state.offset),
            ),
            Source::Fetched(fetched) => {
                let relayed = if state.epoch == fetched.epoch {
                    state.offset
                } else {
                    0
                };
                (fetched.epoch, fetched.latest.max(relayed), fetched.first)
            }
        };
        let (after, standing, reply) = match cursor {
            Cursor::Start(since) => {
                let recovery = since.map_or(Recovery::NotAsked, |position| {
                    recovery_of(position, epoch, latest, first)
                });
                let after = match (recovery, since) {
                    (Recovery::Recovered, Some(position)) => position.offset,
                    _ => latest,
                };
                let standing = Standing {
                    epoch,
                    offset: latest,
                    recovery,
                };
                (after, standing, reply(&standing))
            }
            Cursor::Resume(position) => {
                if position.epoch != epoch
                    || (position.offset < latest && position.offset + 1 < first)
                {
                    return CatchUp::Interrupted;
                }
                let standing = Standing {
                    epoch,
                    offset: latest,
                    recovery: Recovery::Recovered,
                };
                (position.offset, standing, None)
            }
        };
        let frames = if after >= latest || room == 0 {
            Vec::new()
        } else {
            match source {
                Source::Local => match state.history.after(after, latest, room) {
                    Some(frames) => frames,
                    None => return CatchUp::Interrupted,
                },
                Source::Fetched(fetched) => fetched
                    .frames
                    .iter()
                    .filter(|(offset, _)| *offset > after)
                    .take(room)
                    .cloned()
                    .collect(),
            }
        };
        if frames
            .first()
            .is_some_and(|(offset, _)| *offset != after + 1)
            || (frames.is_empty() && after < latest && room > 0)
        {
            // What the source holds does not follow on from the cursor.
            return CatchUp::Interrupted;
        }
        let capacity = inner.limits.queue_capacity;
        let replayed = frames.last().map_or(after, |(offset, _)| *offset);
        for frame in
            reply
                .into_iter()
                .chain(frames.into_iter().filter_map(|(_, frame)| match format {
                    Format::Raw => raw_of_stored(&frame),
                    _ => Some(frame),
                }))
        {
            match outbox.push(frame, capacity) {
                Push::Queued { .. } => {}
                Push::Overflowed => {
                    self.slow_consumer_dropped(id);
                    return CatchUp::Gone;
                }
                Push::Closing => return CatchUp::Gone,
            }
        }
        // In cluster mode the node may have relayed messages past what was read from Redis;
        // those must be read too before the subscription can follow the relay.
        let caught_up = replayed >= latest
            && (state.epoch != epoch || !state.confirmed || replayed >= state.offset);
        if !caught_up {
            return CatchUp::Replaying {
                standing,
                cursor: Position {
                    epoch,
                    offset: replayed,
                },
            };
        }
        // Still under the channel's lock: no message can be handed to the writers past
        // `replayed` before the subscription is in the fan-out, and those up to it that the
        // writers have yet to push stop at the floor.
        let attached = self.with_entry(id, |shard, key| {
            let entry = &shard.conns[key as usize];
            let Some(channel) = entry.subscriptions.iter().find(|c| &***c == channel) else {
                return false;
            };
            let channel = Arc::clone(channel);
            ShardState::index_add(&mut shard.channels, &channel, key);
            if replayed > 0 {
                shard
                    .floors
                    .entry(channel)
                    .or_default()
                    .insert(key, replayed);
            }
            true
        });
        if attached == Some(true) {
            CatchUp::Live(standing)
        } else {
            CatchUp::Gone
        }
    }

    /// Where `channel` stands on this node (its epoch and latest offset), and what a recovery
    /// from `since` would come to, in memory mode. Does not subscribe anything: a peek, for
    /// answering a request before a connection exists.
    pub fn standing(&self, channel: &str, since: Option<Position>) -> Standing {
        let mut stripe = self.inner.channels.lock(channel);
        let (_, state) = self.inner.channels.entry(&mut stripe, channel);
        let first = state.history.first_offset(state.offset);
        Standing {
            epoch: state.epoch,
            offset: state.offset,
            recovery: since.map_or(Recovery::NotAsked, |position| {
                recovery_of(position, state.epoch, state.offset, first)
            }),
        }
    }

    /// Up to `limit` messages of `channel`'s history in memory mode, oldest first: those
    /// after `since` when it is given, the newest ones otherwise.
    ///
    /// # Errors
    /// The [`RecoveryFailure`] when `since` is in another epoch, before the window or ahead of
    /// the stream.
    pub fn history(
        &self,
        channel: &str,
        since: Option<Position>,
        limit: usize,
    ) -> Result<HistoryPage, (RecoveryFailure, Standing)> {
        let mut stripe = self.inner.channels.lock(channel);
        let (_, state) = self.inner.channels.entry(&mut stripe, channel);
        let latest = state.offset;
        let fetched = Fetched {
            epoch: state.epoch,
            latest,
            first: state.history.first_offset(latest),
            frames: Vec::new(),
        };
        let after = history_start(&fetched, since, limit)?;
        Ok(HistoryPage {
            epoch: state.epoch,
            offset: latest,
            messages: state
                .history
                .after(after, latest, limit)
                .unwrap_or_default(),
        })
    }

    /// Unsubscribes the connection from `channel`. Returns whether it was subscribed.
    pub fn unsubscribe(&self, id: ConnId, channel: &str) -> bool {
        let removed = self
            .with_entry(id, |state, key| {
                let entry = &mut state.conns[key as usize];
                let at = entry.subscriptions.iter().position(|c| &**c == channel)?;
                let channel = entry.subscriptions.swap_remove(at);
                let raw = entry.format == Format::Raw;
                ShardState::index_remove(&mut state.channels, &channel, key);
                state.remove_floor(&channel, key);
                Some((channel, raw))
            })
            .flatten();
        let Some((channel, raw)) = removed else {
            return false;
        };
        if self
            .inner
            .channels
            .count_subscriber(&channel, raw, -1, self.now_ms())
        {
            self.mark(|| Topic::Channel(Arc::clone(&channel)));
        }
        true
    }

    /// Publishes to `channel` (a valid name): takes the next offset, stores the message in the
    /// channel's history and hands one encoded frame to every shard's writer. Waits only while
    /// the writers are behind (their queues are short, so a saturated server slows publishers
    /// down instead of queueing up latency), never for a slow connection.
    ///
    /// # Errors
    /// [`PublishError::ShuttingDown`] when the writer tasks have stopped; no offset is used.
    pub async fn publish(
        &self,
        channel: &str,
        from: Option<&str>,
        payload: Payload<'_>,
    ) -> Result<PublishReceipt, PublishError> {
        let inner = &*self.inner;
        let permits = self.reserve_writers().await?;
        let now = self.now_ms();
        let history = inner.limits.history;
        let mut grown = 0;
        let receipt = {
            let mut stripe = inner.channels.lock(channel);
            let (name, state) = inner.channels.entry(&mut stripe, channel);
            state.offset += 1;
            state.touched_ms = now;
            let receipt = PublishReceipt {
                offset: state.offset,
                subscribers: state.subscribers,
            };
            if state.subscribers > 0 || history.size > 0 {
                let raw = state.raw_subscribers > 0;
                let delivery = message_delivery(name, receipt.offset, from, payload, raw);
                if history.size > 0 {
                    grown = state.history.push(delivery.json.clone(), now, history);
                }
                // Handed to the writers while the stripe is locked: that is what keeps each
                // channel's offsets in order on every connection.
                if state.subscribers > 0 {
                    for permit in permits {
                        permit.send(Arc::clone(&delivery));
                    }
                }
            }
            receipt
        };
        if inner.history_budget.record(grown) {
            inner.channels.evict_oldest(&inner.history_budget);
        }
        inner.metrics.publishes.inc();
        Ok(receipt)
    }

    /// A slot in every shard writer's queue, taken before a channel's lock so that handing a
    /// message over under the lock never waits.
    async fn reserve_writers(
        &self,
    ) -> Result<Vec<tokio::sync::mpsc::Permit<'_, Arc<Delivery>>>, PublishError> {
        let mut permits = Vec::with_capacity(self.inner.shards.len());
        for shard in self.inner.shards.iter() {
            permits.push(
                shard
                    .tx
                    .reserve()
                    .await
                    .map_err(|_| PublishError::ShuttingDown)?,
            );
        }
        Ok(permits)
    }

    /// Delivers a message that already has its epoch and offset (stamped in Redis) to this
    /// node's subscribers of `channel`, unless it does not follow on from what the node last
    /// relayed: a duplicate is dropped, and a gap or another epoch is handed back for the
    /// backplane to heal from the history first. Calls must come one at a time, in the order
    /// the node hears them.
    ///
    /// # Errors
    /// [`PublishError::ShuttingDown`] when the writer tasks have stopped.
    pub async fn deliver(
        &self,
        channel: &str,
        epoch: Epoch,
        offset: u64,
        from: Option<&str>,
        payload: Payload<'_>,
    ) -> Result<Relayed, PublishError> {
        if !self.inner.channels.subscribed(channel).0 {
            return Ok(Relayed::NotListening);
        }
        let permits = self.reserve_writers().await?;
        let mut stripe = self.inner.channels.lock(channel);
        let (name, state) = self.inner.channels.entry(&mut stripe, channel);
        if state.confirmed {
            if state.epoch != epoch {
                return Ok(Relayed::NewEpoch);
            }
            if offset <= state.offset {
                return Ok(Relayed::Duplicate);
            }
            if offset > state.offset + 1 {
                return Ok(Relayed::Gap {
                    after: state.offset,
                });
            }
        }
        state.epoch = epoch;
        state.offset = offset;
        state.confirmed = true;
        state.touched_ms = self.now_ms();
        if state.subscribers > 0 {
            let raw = state.raw_subscribers > 0;
            let delivery = message_delivery(name, offset, from, payload, raw);
            for permit in permits {
                permit.send(Arc::clone(&delivery));
            }
        }
        Ok(Relayed::Delivered)
    }

    /// Where this node stands in `channel`'s stream: its epoch and the offset it last relayed,
    /// once Redis has confirmed them.
    pub fn relayed(&self, channel: &str) -> Option<Position> {
        let stripe = self.inner.channels.lock(channel);
        let state = stripe.get(channel).filter(|state| state.confirmed)?;
        Some(Position {
            epoch: state.epoch,
            offset: state.offset,
        })
    }

    /// Moves this node's position in `channel`'s stream to `position` without delivering
    /// what lies between, and tells every json subscriber so with a gap frame that says where
    /// messages go on from (`{"type":"gap","channel":..,"epoch":..,"offset":..}`): what the
    /// history could not replay (it left the window, or Redis lost the stream) is lost to
    /// them. Raw subscribers have no way to be told.
    ///
    /// # Errors
    /// [`PublishError::ShuttingDown`] when the writer tasks have stopped.
    pub async fn skip_to(&self, channel: &str, position: Position) -> Result<(), PublishError> {
        let permits = self.reserve_writers().await?;
        let mut stripe = self.inner.channels.lock(channel);
        let (name, state) = self.inner.channels.entry(&mut stripe, channel);
        state.epoch = position.epoch;
        state.offset = position.offset;
        state.confirmed = true;
        let gap = protocol::gap_frame(&name, Some(position));
        let delivery = Arc::new(Delivery::new(Some(name), gap, None));
        for permit in permits {
            permit.send(Arc::clone(&delivery));
        }
        Ok(())
    }

    /// Tells every json subscriber of `channel` on this node that messages may have been
    /// missed (`{"type":"gap","channel":..}`), where the node cannot say from where: a
    /// message reached it in a form it cannot read. Raw subscribers have no way to be told.
    ///
    /// # Errors
    /// [`PublishError::ShuttingDown`] when the writer tasks have stopped.
    pub async fn announce_gap(&self, channel: &str) -> Result<(), PublishError> {
        let gap = protocol::gap_frame(channel, None);
        self.to_every_writer(Arc::new(Delivery::new(Some(Arc::from(channel)), gap, None)))
            .await
    }

    /// Whether `channel` has a subscriber on this node.
    pub fn has_subscribers(&self, channel: &str) -> bool {
        self.inner.channels.subscribed(channel).0
    }

    /// Whether `client_id` has a connection on this node.
    pub fn has_client(&self, client_id: &str) -> bool {
        self.inner
            .shards
            .iter()
            .any(|shard| shard.state.lock().clients.contains_key(client_id))
    }

    /// Every client id with a connection on this node.
    pub fn client_ids(&self) -> Vec<Arc<str>> {
        let mut ids = std::collections::HashSet::new();
        for shard in self.inner.shards.iter() {
            ids.extend(shard.state.lock().clients.keys().cloned());
        }
        ids.into_iter().collect()
    }

    fn mark(&self, topic: impl FnOnce() -> Topic) {
        if let Some(interest) = &self.inner.interest {
            interest.mark(topic());
        }
    }

    /// Hands `delivery` to every shard's writer, in order behind what they already have.
    async fn to_every_writer(&self, delivery: Arc<Delivery>) -> Result<(), PublishError> {
        for shard in self.inner.shards.iter() {
            shard
                .tx
                .send(Arc::clone(&delivery))
                .await
                .map_err(|_| PublishError::ShuttingDown)?;
        }
        Ok(())
    }

    /// Sends to every json and raw connection.
    ///
    /// # Errors
    /// [`PublishError::ShuttingDown`] when the writer tasks have stopped.
    pub async fn broadcast(&self, payload: Payload<'_>) -> Result<u64, PublishError> {
        let json = protocol::broadcast_frame(payload);
        let raw = Some(raw_frame(payload));
        let delivery = Arc::new(Delivery::new(None, json, raw));
        self.to_every_writer(delivery).await?;
        Ok(self.inner.live.load(Ordering::Relaxed) as u64)
    }

    /// Sends to every connection of `client_id`; returns how many there were.
    pub fn send_to(&self, client_id: &str, from: Option<&str>, payload: Payload<'_>) -> u64 {
        let json = protocol::direct_frame(from, payload);
        let raw = raw_frame(payload);
        let capacity = self.inner.limits.queue_capacity;
        let mut reached = 0;
        let mut fanout = Fanout::default();
        for shard in self.inner.shards.iter() {
            let state = shard.state.lock();
            for key in state
                .clients
                .get(client_id)
                .into_iter()
                .flat_map(Keys::iter)
            {
                let entry = &state.conns[key as usize];
                let frame = if entry.format == Format::Raw {
                    &raw
                } else {
                    &json
                };
                fanout.push(entry, frame, capacity);
                reached += 1;
            }
        }
        for outbox in fanout.touched.drain(..) {
            outbox.flush(&self.inner.metrics);
        }
        fanout.record(&self.inner.metrics);
        reached
    }

    /// Every channel with subscribers and its subscriber count, sorted by name.
    pub fn channels(&self) -> Vec<(Arc<str>, u64)> {
        self.inner.channels.list()
    }

    /// Asks every connection to close for `reason`.
    pub fn close_all(&self, reason: CloseReason) {
        for shard in self.inner.shards.iter() {
            for (_, entry) in shard.state.lock().conns.iter() {
                entry.outbox.close(reason);
            }
        }
    }

    /// Connections registered now.
    pub fn len(&self) -> usize {
        self.inner.live.load(Ordering::Relaxed)
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts a task serving a connection, so that [`Registry::drained`] waits for it. A
    /// closing connection is unregistered as soon as its close frame is sent, but its task
    /// lingers a little for the client's side of the close.
    pub fn task_started(&self) {
        self.inner.tasks.fetch_add(1, Ordering::Relaxed);
    }

    /// Ends what [`Registry::task_started`] counted.
    pub fn task_done(&self) {
        if self.inner.tasks.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.drained.notify_waiters();
        }
    }

    /// Resolves once no connection task is running.
    pub async fn drained(&self) {
        loop {
            let notified = self.inner.drained.notified();
            if self.inner.tasks.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// The metrics, for recording and for `/metrics`.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// `/metrics`: refreshes the derived gauges and renders every metric.
    pub fn render_metrics(&self) -> String {
        let metrics = &self.inner.metrics;
        metrics.connections.set(self.len() as i64);
        let (channels, subscriptions) = self.inner.channels.usage();
        metrics.channels.set(channels as i64);
        metrics.subscriptions.set(subscriptions as i64);
        metrics.render()
    }

    /// A copy of the main counters.
    pub fn stats(&self) -> StatsSnapshot {
        let metrics = &self.inner.metrics;
        StatsSnapshot {
            connections: self.len() as u64,
            connections_opened: metrics.connections_opened.get(),
            connections_closed: metrics.connections_closed_total(),
            publishes: metrics.publishes.get(),
            deliveries: metrics.deliveries.get(),
            slow_consumer_drops: metrics.slow_consumer_drops.get(),
        }
    }
}

/// One channel message for the shard writers: the JSON envelope, and the raw frame when the
/// channel has `format=raw` subscribers.
/// What a recovery from `position` would come to, in a stream at `epoch` whose latest offset
/// is `latest` and whose oldest kept message is `first`.
fn recovery_of(position: Position, epoch: Epoch, latest: u64, first: u64) -> Recovery {
    if position.epoch != epoch {
        Recovery::Failed(RecoveryFailure::EpochChanged)
    } else if position.offset > latest {
        Recovery::Failed(RecoveryFailure::PositionAhead)
    } else if position.offset < latest && position.offset + 1 < first {
        Recovery::Failed(RecoveryFailure::PositionExpired)
    } else {
        Recovery::Recovered
    }
}

/// The offset a page of history starts after: `since`'s, when the stream can continue from
/// it, or the one before the newest `limit` messages kept.
///
/// # Errors
/// Why `since` cannot be continued from, with where the stream stands.
pub fn history_start(
    fetched: &Fetched,
    since: Option<Position>,
    limit: usize,
) -> Result<u64, (RecoveryFailure, Standing)> {
    let Some(position) = since else {
        return Ok(fetched
            .latest
            .saturating_sub(limit as u64)
            .max(fetched.first.saturating_sub(1)));
    };
    match recovery_of(position, fetched.epoch, fetched.latest, fetched.first) {
        Recovery::Failed(failure) => Err((
            failure,
            Standing {
                epoch: fetched.epoch,
                offset: fetched.latest,
                recovery: Recovery::Failed(failure),
            },
        )),
        _ => Ok(position.offset),
    }
}

fn message_delivery(
    channel: Arc<str>,
    offset: u64,
    from: Option<&str>,
    payload: Payload<'_>,
    raw: bool,
) -> Arc<Delivery> {
    let raw = raw.then(|| raw_frame(payload));
    let json = protocol::message_frame(&channel, offset, from, payload);
    Arc::new(Delivery::message(channel, offset, json, raw))
}

/// The frame a `format=raw` connection gets for a message replayed from the history, which
/// keeps the json frame only.
fn raw_of_stored(frame: &[u8]) -> Option<Bytes> {
    let message = protocol::StoredMessage::parse(frame)?;
    let (bytes, text) = message.raw_payload()?;
    Some(encode_frame(
        if text { OpCode::Text } else { OpCode::Binary },
        &bytes,
    ))
}

/// The frame a `format=raw` connection gets (see [`Payload::raw`]): a JSON string's text, any
/// other payload's bytes; in a text frame unless the payload is binary.
fn raw_frame(payload: Payload<'_>) -> Bytes {
    let (bytes, text) = payload.raw();
    encode_frame(if text { OpCode::Text } else { OpCode::Binary }, &bytes)
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
