//! The broker: where publishes, direct sends and broadcasts go before they reach connections.
//!
//! Without `--redis` it is the registry itself (the embedded in-memory broker): a publish takes
//! the channel's offset and is fanned out on this node. With `--redis` the node is one of a
//! cluster: every message goes through Redis pub/sub ([`backplane`]), Redis gives channel
//! messages their offsets, and each node delivers only what comes back from Redis, so every node
//! sees each channel in the same order with the same offsets.

pub mod backplane;
pub mod wire;

use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::protocol::Payload;
use crate::registry::{
    Epoch, HistoryPage, Interest, Position, PublishError, RecoveryFailure, Registry, Topic,
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
    backplane: Option<Arc<Backplane>>,
}

impl Broker {
    /// The embedded in-memory broker over `registry`.
    pub fn local(registry: Registry) -> Self {
        Self {
            registry,
            backplane: None,
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
            return Ok(Self::local(Registry::new(config)));
        };
        let client = redis::Client::open(url.as_str())
            .map_err(|err| ConfigError::RedisUrl(err.to_string()))?;
        let interest = Arc::new(Interest::default());
        let registry = Registry::with_interest(config, Arc::clone(&interest));
        let backplane = Backplane::start(client, registry.clone(), interest, config.redis_timeout);
        Ok(Self {
            registry,
            backplane: Some(Arc::new(backplane)),
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
        self.backplane
            .as_ref()
            .map_or(Ok(()), |backplane| backplane.readiness())
    }

    /// Waits until this node hears what other nodes publish to `channel` (cluster mode: until
    /// its Redis subscription is confirmed, at most the Redis timeout), so that a client told
    /// it is subscribed misses nothing published after that. Returns at once in local mode.
    pub async fn until_heard(&self, channel: &str) {
        if let Some(backplane) = &self.backplane {
            backplane
                .until_heard(&[backplane::channel_name(channel)])
                .await;
        }
    }

    /// Cluster mode: makes this node hear other nodes' messages for `channels` and direct
    /// sends to `client_id` before a new connection registers, and keeps it so while the
    /// returned [`Hold`] lives (drop it once the connection is registered). Waits at most the
    /// Redis timeout. `None` at once in local mode.
    pub async fn hold_for(&self, channels: &[String], client_id: &str) -> Option<Hold> {
        let backplane = self.backplane.as_ref()?;
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
        match &self.backplane {
            None => {
                let receipt = self.registry.publish(channel, from, payload).await?;
                Ok(Published {
                    offset: receipt.offset,
                    reach: Reach::Local(receipt.subscribers),
                })
            }
            Some(backplane) => {
                let body = wire::encode_body(from, payload);
                let (offset, nodes) = backplane.publish(channel, body).await?;
                self.registry.metrics().publishes.inc();
                Ok(Published {
                    offset,
                    reach: Reach::Nodes(nodes),
                })
            }
        }
    }

    /// Up to `limit` stored messages of `channel`, oldest first: after `since`, or the newest.
    ///
    /// # Errors
    /// [`BrokerError::NotRecovered`] when `since` cannot be continued from.
    pub async fn history(
        &self,
        channel: &str,
        since: Option<Position>,
        limit: usize,
    ) -> Result<HistoryPage, BrokerError> {
        self.registry
            .history(channel, since, limit)
            .map_err(|(failure, standing)| BrokerError::NotRecovered {
                channel: channel.to_owned(),
                failure,
                epoch: standing.epoch,
                offset: standing.offset,
            })
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
        match &self.backplane {
            None => Ok(Reach::Local(
                self.registry.send_to(client_id, from, payload),
            )),
            Some(backplane) => {
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
        match &self.backplane {
            None => Ok(Reach::Local(self.registry.broadcast(payload).await?)),
            Some(backplane) => {
                let body = wire::encode_body(None, payload);
                let nodes = backplane.publish_plain(BROADCAST_CHANNEL, body).await?;
                Ok(Reach::Nodes(nodes))
            }
        }
    }
}
