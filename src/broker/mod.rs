//! The broker: where publishes, direct sends and broadcasts go before they reach connections.
//!
//! Without `--redis` it is the registry itself (the embedded in-memory broker): a publish takes
//! the channel's offset and is fanned out on this node. With `--redis` the node is one of a
//! cluster: every message goes through Redis pub/sub ([`backplane`]), Redis gives channel
//! messages their offsets, and each node delivers only what comes back from Redis, so every node
//! sees each channel in the same order with the same offsets.
//!
//! A request with an idempotency key is carried out at most once within the window: the
//! in-memory broker remembers keys in a [`Store`] per route, the backplane in Redis, in the
//! same script as the publish.

pub mod backplane;
pub mod streams;
pub mod wire;

use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::idempotency::{Outcome, Pending, RequestKey, Store};
use crate::protocol::Payload;
use bytes::Bytes;

use crate::registry::{
    CatchUp, ConnId, Cursor, Epoch, HistoryPage, Interest, Position, PublishError, Recovery,
    RecoveryFailure, Registry, Source, Standing, Topic, history_start,
};

pub use backplane::Hold;
use backplane::{BROADCAST_CHANNEL, Backplane};

/// Why a message could not be handed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The server is shutting down.
    #[error("server is shutting down")]
    ShuttingDown,
    /// Cluster mode, and Redis is down or did not answer in time: the message went nowhere.
    #[error("the message broker is unavailable: {0}")]
    Unavailable(String),
    /// A history request from a position the channel cannot continue from.
    #[error("channel {channel:?} cannot continue from that position ({})", failure.code())]
    NotRecovered {
        /// The channel.
        channel: String,
        /// Why not.
        failure: RecoveryFailure,
        /// The channel's current epoch.
        epoch: Epoch,
        /// The channel's latest offset.
        offset: u64,
    },
}

impl From<PublishError> for BrokerError {
    fn from(PublishError::ShuttingDown: PublishError) -> Self {
        BrokerError::ShuttingDown
    }
}

/// How far a message got: what the publish, send and broadcast replies report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Local mode: subscriptions (publish) or connections (send, broadcast) on this node.
    Local(u64),
    /// Cluster mode: nodes that had a subscription for it in Redis (`PUBLISH`'s count).
    Nodes(u64),
}

impl Reach {
    /// The reply field for this count: `local` (e.g. `"subscribers"`) or `"nodes"`.
    pub fn field(self, local: &'static str) -> &'static str {
        match self {
            Reach::Local(_) => local,
            Reach::Nodes(_) => "nodes",
        }
    }

    /// The count.
    pub fn count(self) -> u64 {
        match self {
            Reach::Local(count) | Reach::Nodes(count) => count,
        }
    }
}

/// The result of a channel publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The channel offset the message got.
    pub offset: u64,
    /// How far it got.
    pub reach: Reach,
}

/// The handle the HTTP API and connections publish through; cheap to clone.
#[derive(Debug, Clone)]
pub struct Broker {
    registry: Registry,
    mode: Mode,
}

/// Where messages go besides this node's registry.
#[derive(Debug, Clone)]
enum Mode {
    /// The embedded in-memory broker, with its idempotency keys.
    Local(Arc<Remembered>),
    /// Cluster mode: through Redis.
    Cluster(Arc<Backplane>),
}

/// The in-memory broker's idempotency keys, one store per route.
#[derive(Debug)]
struct Remembered {
    publishes: Store<Published>,
    sends: Store<Reach>,
    broadcasts: Store<Reach>,
}

impl Broker {
    /// The embedded in-memory broker over `registry`, remembering idempotency keys as
    /// [`Config::idempotency_window`] and [`Config::idempotency_keys`] say.
    pub fn local(registry: Registry, config: &Config) -> Self {
        let (window, keys) = (config.idempotency_window, config.idempotency_keys);
        let remembered = Remembered {
            publishes: Store::new(window, keys),
            sends: Store::new(window, keys),
            broadcasts: Store::new(window, keys),
        };
        Self {
            registry,
            mode: Mode::Local(Arc::new(remembered)),
        }
    }

    /// Builds the registry and, with [`Config::redis`] set, the Redis backplane, whose
    /// subscriber task starts connecting at once (and keeps retrying).
    ///
    /// # Errors
    /// [`ConfigError::RedisUrl`] when the Redis URL is invalid.
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    pub fn start(config: &Config) -> Result<Self, ConfigError> {
        let Some(url) = &config.redis else {
            return Ok(Self::local(Registry::new(config), config));
        };
        let client = redis::Client::open(url.as_str())
            .map_err(|err| ConfigError::RedisUrl(err.to_string()))?;
        let interest = Arc::new(Interest::default());
        let registry = Registry::with_interest(config, Arc::clone(&interest));
        let backplane = Backplane::start(client, registry.clone(), interest, config);
        Ok(Self {
            registry,
            mode: Mode::Cluster(Arc::new(backplane)),
        })
    }

    /// The registry of this node's connections.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// `Ok` when the node can take publishes: always in local mode, while subscribed in Redis
    /// in cluster mode.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] with the reason.
    pub fn readiness(&self) -> Result<(), BrokerError> {
        match &self.mode {
            Mode::Local(_) => Ok(()),
            Mode::Cluster(backplane) => backplane.readiness(),
        }
    }

    /// Waits until this node hears what other nodes publish to `channel` (cluster mode: until
    /// its Redis subscription is confirmed, at most the Redis timeout), so that a client told
    /// it is subscribed misses nothing published after that. Returns at once in local mode.
    pub async fn until_heard(&self, channel: &str) {
        if let Mode::Cluster(backplane) = &self.mode {
            backplane
                .until_heard(&[streams::channel_name(channel)])
                .await;
        }
    }

    /// Cluster mode: makes this node hear other nodes' messages for `channels` and direct
    /// sends to `client_id` before a new connection registers, and keeps it so while the
    /// returned [`Hold`] lives (drop it once the connection is registered). Waits at most the
    /// Redis timeout. `None` at once in local mode.
    pub async fn hold_for(&self, channels: &[String], client_id: &str) -> Option<Hold> {
        let Mode::Cluster(backplane) = &self.mode else {
            return None;
        };
        let topics = channels
            .iter()
            .map(|channel| Topic::Channel(Arc::from(channel.as_str())))
            .chain([Topic::Client(Arc::from(client_id))])
            .collect();
        Some(backplane.hold(topics).await)
    }

    /// Publishes to `channel` (a valid name).
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when Redis is down; [`BrokerError::ShuttingDown`].
    pub async fn publish(
        &self,
        channel: &str,
        from: Option<&str>,
        payload: Payload<'_>,
    ) -> Result<Published, BrokerError> {
        match &self.mode {
            Mode::Local(_) => {
                let receipt = self.registry.publish(channel, from, payload).await?;
                Ok(Published {
                    offset: receipt.offset,
                    reach: Reach::Local(receipt.subscribers),
                })
            }
            Mode::Cluster(backplane) => {
                let body = wire::encode_body(from, payload);
                let stamped = backplane.publish(channel, body).await?;
                self.registry.metrics().publishes.inc();
                Ok(Published {
                    offset: stamped.offset,
                    reach: Reach::Nodes(stamped.nodes),
                })
            }
        }
    }

    /// Up to `limit` stored messages of `channel`, oldest first: after `since`, or the newest.
    /// In cluster mode they are read from the channel's history in Redis.
    ///
    /// # Errors
    /// [`BrokerError::NotRecovered`] when `since` cannot be continued from;
    /// [`BrokerError::Unavailable`] when Redis is down.
    pub async fn history(
        &self,
        channel: &str,
        since: Option<Position>,
        limit: usize,
    ) -> Result<HistoryPage, BrokerError> {
        let not_recovered =
            |(failure, standing): (RecoveryFailure, Standing)| BrokerError::NotRecovered {
                channel: channel.to_owned(),
                failure,
                epoch: standing.epoch,
                offset: standing.offset,
            };
        let Mode::Cluster(backplane) = &self.mode else {
            return self
                .registry
                .history(channel, since, limit)
                .map_err(not_recovered);
        };
        let read = backplane
            .read(channel, since.map(|position| position.offset), limit)
            .await?;
        let fetched = read.fetched(channel);
        let after = history_start(&fetched, since, limit).map_err(not_recovered)?;
        Ok(HistoryPage {
            epoch: fetched.epoch,
            offset: fetched.latest,
            messages: fetched
                .frames
                .into_iter()
                .filter(|(offset, _)| *offset > after)
                .take(limit)
                .collect(),
        })
    }

    /// Where `channel` stands and what a recovery from `since` would come to, when this node
    /// can tell without a round trip (memory mode); `None` in cluster mode.
    pub fn standing_now(&self, channel: &str, since: Option<Position>) -> Option<Standing> {
        match self.mode {
            Mode::Local(_) => Some(self.registry.standing(channel, since)),
            Mode::Cluster(_) => None,
        }
    }

    /// One step of a subscription's catch-up (see [`Registry::catch_up`]): what the client
    /// missed comes from this node's history in memory mode, and from the channel's history in
    /// Redis in cluster mode (read first, at most `room` messages). While Redis is down a
    /// recovery fails with `history_unavailable`, and a subscription goes on from where this
    /// node stands.
    pub async fn catch_up(
        &self,
        id: ConnId,
        channel: &str,
        cursor: Cursor,
        room: usize,
        reply: impl FnOnce(&Standing) -> Option<Bytes>,
    ) -> CatchUp {
        let Mode::Cluster(backplane) = &self.mode else {
            return self
                .registry
                .catch_up(id, channel, cursor, room, Source::Local, reply);
        };
        let (after, limit) = match cursor {
            Cursor::Start(None) => (0, 0),
            Cursor::Start(Some(position)) | Cursor::Resume(position) => (position.offset, room),
        };
        match backplane.read(channel, Some(after), limit).await {
            Ok(read) => {
                let fetched = read.fetched(channel);
                self.registry
                    .catch_up(id, channel, cursor, room, Source::Fetched(&fetched), reply)
            }
            Err(err) => match cursor {
                Cursor::Resume(_) => CatchUp::Interrupted,
                Cursor::Start(since) => {
                    tracing::debug!(%err, channel, "history unavailable for a subscribe");
                    let unavailable = |mut standing: Standing| {
                        if since.is_some() {
                            standing.recovery =
                                Recovery::Failed(RecoveryFailure::HistoryUnavailable);
                        }
                        standing
                    };
                    let caught_up = self.registry.catch_up(
                        id,
                        channel,
                        Cursor::Start(None),
                        0,
                        Source::Local,
                        |standing| reply(&unavailable(*standing)),
                    );
                    match caught_up {
                        CatchUp::Live(standing) => CatchUp::Live(unavailable(standing)),
                        other => other,
                    }
                }
            },
        }
    }

    /// Sends to every connection of `client_id`, on every node. A count of zero means nobody
    /// has that client id.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when Redis is down.
    pub async fn send_to(
        &self,
        client_id: &str,
        from: Option<&str>,
        payload: Payload<'_>,
    ) -> Result<Reach, BrokerError> {
        match &self.mode {
            Mode::Local(_) => Ok(Reach::Local(
                self.registry.send_to(client_id, from, payload),
            )),
            Mode::Cluster(backplane) => {
                let body = wire::encode_body(from, payload);
                let nodes = backplane
                    .publish_plain(&backplane::client_name(client_id), body)
                    .await?;
                Ok(Reach::Nodes(nodes))
            }
        }
    }

    /// Sends to every json and raw connection, on every node.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when Redis is down; [`BrokerError::ShuttingDown`].
    pub async fn broadcast(&self, payload: Payload<'_>) -> Result<Reach, BrokerError> {
        match &self.mode {
            Mode::Local(_) => Ok(Reach::Local(self.registry.broadcast(payload).await?)),
            Mode::Cluster(backplane) => {
                let body = wire::encode_body(None, payload);
                let nodes = backplane.publish_plain(BROADCAST_CHANNEL, body).await?;
                Ok(Reach::Nodes(nodes))
            }
        }
    }

    /// [`Broker::publish`] (from the HTTP API) at most once per `key` within the idempotency
    /// window: a retry gets the first publish's offset and reach, and delivers nothing.
    ///
    /// # Errors
    /// As [`Broker::publish`]; a failed publish leaves the key free for a retry.
    pub async fn publish_keyed(
        &self,
        channel: &str,
        payload: Payload<'_>,
        key: &RequestKey,
    ) -> Result<Outcome<Published>, BrokerError> {
        match &self.mode {
            Mode::Local(remembered) => {
                let pending = match remembered.publishes.begin(channel, key).await.first() {
                    Ok(pending) => pending,
                    Err(known) => return Ok(known),
                };
                let published = self.publish(channel, None, payload).await?;
                self.remember(pending, published);
                Ok(Outcome::First(published))
            }
            Mode::Cluster(backplane) => {
                let body = wire::encode_body(None, payload);
                let outcome = backplane.publish_keyed(channel, body, key).await?;
                if let Outcome::First(_) = outcome {
                    self.registry.metrics().publishes.inc();
                }
                Ok(outcome.map(|stamped| Published {
                    offset: stamped.offset,
                    reach: Reach::Nodes(stamped.nodes),
                }))
            }
        }
    }

    /// [`Broker::send_to`] (from the HTTP API) at most once per `key` within the idempotency
    /// window. A send that reached no connection is not remembered: it delivered nothing, and
    /// a retry once the client is connected should.
    ///
    /// # Errors
    /// As [`Broker::send_to`]; a failed send leaves the key free for a retry.
    pub async fn send_to_keyed(
        &self,
        client_id: &str,
        payload: Payload<'_>,
        key: &RequestKey,
    ) -> Result<Outcome<Reach>, BrokerError> {
        match &self.mode {
            Mode::Local(remembered) => {
                let pending = match remembered.sends.begin(client_id, key).await.first() {
                    Ok(pending) => pending,
                    Err(known) => return Ok(known),
                };
                let reach = self.send_to(client_id, None, payload).await?;
                if reach.count() > 0 {
                    self.remember(pending, reach);
                }
                Ok(Outcome::First(reach))
            }
            Mode::Cluster(backplane) => {
                let body = wire::encode_body(None, payload);
                let target = backplane::Plain::Client(client_id);
                let outcome = backplane.publish_plain_keyed(target, body, key).await?;
                Ok(outcome.map(Reach::Nodes))
            }
        }
    }

    /// [`Broker::broadcast`] at most once per `key` within the idempotency window.
    ///
    /// # Errors
    /// As [`Broker::broadcast`]; a failed broadcast leaves the key free for a retry.
    pub async fn broadcast_keyed(
        &self,
        payload: Payload<'_>,
        key: &RequestKey,
    ) -> Result<Outcome<Reach>, BrokerError> {
        match &self.mode {
            Mode::Local(remembered) => {
                let pending = match remembered.broadcasts.begin("", key).await.first() {
                    Ok(pending) => pending,
                    Err(known) => return Ok(known),
                };
                let reach = self.broadcast(payload).await?;
                self.remember(pending, reach);
                Ok(Outcome::First(reach))
            }
            Mode::Cluster(backplane) => {
                let body = wire::encode_body(None, payload);
                let target = backplane::Plain::Broadcast;
                let outcome = backplane.publish_plain_keyed(target, body, key).await?;
                Ok(outcome.map(Reach::Nodes))
            }
        }
    }

    /// Remembers a first request's result for its retries, counting a key forgotten early to
    /// make room.
    fn remember<T>(&self, pending: Pending<'_, T>, result: T) {
        if pending.finish(result) {
            self.registry.metrics().idempotency_keys_forgotten.inc();
        }
    }
}
