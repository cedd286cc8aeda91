//! The Redis side of cluster mode: one pipelined connection for publishing, one subscriber
//! connection that follows what this node wants, and the reconnect loop around the latter.
//!
//! Names in Redis (see the README's cluster section):
//! - `herald:{<channel>}:messages`, `:stream`, `:history`: a Herald channel's pub/sub channel,
//!   stream (epoch and offset) and history (see [`super::streams`]);
//! - `herald:client:<client_id>`: direct sends, subscribed by every node with a connection of
//!   that client id;
//! - `herald:broadcast`: broadcasts, subscribed by every node.
//!
//! A node that misses messages (its subscriber connection was down, or a message of another
//! epoch or past a gap arrives) reads them from the channel's history and delivers them in
//! order before going on; only what the history no longer holds is announced as a gap.
//! - `herald:{<channel>}:idem:<key>`, `herald:client:{<client_id>}:idem:<key>`,
//!   `herald:broadcast:idem:<key>`: idempotency records (hashes of the request's fingerprint
//!   and the first reply's numbers), expiring after the idempotency window.
//!
//! Every script touches keys of one hash slot only, ready for Redis Cluster: a channel's
//! stream, history and idempotency records share the `{<channel>}` hash tag.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use parking_lot::Mutex;
use rand::Rng as _;
use redis::aio::{MultiplexedConnection, PubSubSink};
use redis::{AsyncConnectionConfig, Client, Msg, RedisError, Script};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::BrokerError;
use super::streams::{self, Stamped, StreamRead, Streams, channel_name, channel_of};
use super::wire;
use crate::config::Config;
use crate::idempotency::{Outcome, RequestKey};
use crate::registry::{Interest, Position, Registry, Relayed, Topic};

/// Prefix of the Redis pub/sub channel of each client id (direct sends).
pub const CLIENT_PREFIX: &str = "herald:client:";
/// The Redis pub/sub channel of broadcasts.
pub const BROADCAST_CHANNEL: &str = "herald:broadcast";
/// Messages read from a channel's history per round trip while a node heals a gap.
const HEAL_BATCH: usize = 512;

/// The first pause after a failed connection; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest pause between two connection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a node renews the streams (epoch and offset) of the channels it subscribes to:
/// well within their time to live, so that a channel's stream goes on while it has
/// subscribers somewhere.
const STREAM_KEEPALIVE: Duration = Duration::from_secs(60);
/// How long a subscriber session must have lasted for the next reconnect to start with the
/// shortest pause again.
const STABLE_SESSION: Duration = Duration::from_secs(10);
/// How often the subscriber connection is pinged, to notice a Redis that stopped answering
/// without closing the connection.
const PING_EVERY: Duration = Duration::from_secs(5);
/// Subscribe commands in flight at once while (re)subscribing everything.
const SUBSCRIBE_PIPELINE: usize = 256;

/// A direct send or broadcast with an idempotency key: the publish script's idempotency logic
/// without a stream. A publish that reached fewer nodes than ARGV[5] is not stored (a direct send that
/// reached nobody is a `404`, which a retry may turn into a delivery).
/// KEYS[1] idempotency record; ARGV[1] pub/sub channel, ARGV[2] message body, ARGV[3] request
/// fingerprint, ARGV[4] idempotency window in ms, ARGV[5] fewest nodes to store.
/// Returns {status (see [`outcome`]), nodes}.
const PLAIN_SCRIPT: &str = r"
local seen = redis.call('HMGET', KEYS[1], 'request', 'nodes')
if seen[1] then
  if seen[1] ~= ARGV[3] then return {2, 0} end
  return {1, tonumber(seen[2])}
end
local nodes = redis.call('PUBLISH', ARGV[1], ARGV[2])
if nodes >= tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'request', ARGV[3], 'nodes', nodes)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return {0, nodes}
";

/// The scripts' status: a record with the same fingerprint answered; nothing was published.
const REPLAYED: u8 = 1;
/// The scripts' status: a record with another fingerprint refused; nothing was published.
const REUSED: u8 = 2;

/// What a script's status and numbers say; status 0 is a message published now.
fn outcome<T>(status: u8, result: T) -> Outcome<T> {
    match status {
        REPLAYED => Outcome::Replayed(result),
        REUSED => Outcome::Reused,
        _ => Outcome::First(result),
    }
}

/// Whether the subscriber connection is up and subscribed, and why not.
#[derive(Debug)]
struct Health {
    ready: AtomicBool,
    reason: Mutex<String>,
}

impl Health {
    fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    fn set_down(&self, reason: String) {
        *self.reason.lock() = reason;
        self.ready.store(false, Ordering::Release);
    }
}

/// The Redis channels subscribed on the current subscriber connection, shared so that a
/// connection can wait until its channel (or client id) is heard from other nodes before it
/// tells its client it is subscribed.
#[derive(Debug, Default)]
struct Heard {
    names: Mutex<HashSet<String>>,
    /// Notified whenever names are added.
    added: Notify,
}

impl Heard {
    fn extend(&self, names: impl IntoIterator<Item = String>) {
        self.names.lock().extend(names);
        self.added.notify_waiters();
    }

    fn contains(&self, name: &str) -> bool {
        self.names.lock().contains(name)
    }

    /// The Herald channels among the names.
    fn channels(&self) -> Vec<String> {
        self.names
            .lock()
            .iter()
            .filter_map(|name| channel_of(name))
            .map(str::to_owned)
            .collect()
    }
}

/// Redis channel names held subscribed for connections about to register, with how many
/// holds each has ([`Backplane::hold`]).
type Holds = Arc<Mutex<HashMap<String, usize>>>;

/// Keeps names subscribed in Redis while it lives, whether or not the registry has a local
/// subscriber for them yet: a new connection holds its channels and client id until it is
/// registered, so that it hears other nodes from its welcome frame on.
#[derive(Debug)]
pub struct Hold {
    holds: Holds,
    interest: Arc<Interest>,
    topics: Vec<(Topic, String)>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut holds = self.holds.lock();
        for (topic, name) in self.topics.drain(..) {
            if let Some(count) = holds.get_mut(&name) {
                *count -= 1;
                if *count == 0 {
                    holds.remove(&name);
                }
            }
            self.interest.mark(topic);
        }
    }
}

/// The Redis pub/sub channel of a client id's direct sends.
pub fn client_name(client_id: &str) -> String {
    format!("{CLIENT_PREFIX}{client_id}")
}

/// Where a publish without an offset goes: a client id's direct sends or the broadcasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plain<'a> {
    /// Every connection of this client id.
    Client(&'a str),
    /// Every connection.
    Broadcast,
}

impl Plain<'_> {
    /// The Redis pub/sub channel.
    fn redis_channel(self) -> String {
        match self {
            Plain::Client(client_id) => client_name(client_id),
            Plain::Broadcast => BROADCAST_CHANNEL.to_owned(),
        }
    }

    /// The Redis key of a record for `key`. The names cannot be a channel's: those have a `{`
    /// right after `herald:`.
    fn record(self, key: &str) -> String {
        match self {
            Plain::Client(client_id) => format!("herald:client:{{{client_id}}}:idem:{key}"),
            Plain::Broadcast => format!("herald:broadcast:idem:{key}"),
        }
    }

    /// The fewest nodes a publish must reach for its reply to be kept: one for a direct
    /// send, whose reply says `404 client_not_found` otherwise.
    fn stored_from(self) -> u64 {
        match self {
            Plain::Client(_) => 1,
            Plain::Broadcast => 0,
        }
    }
}

/// The Redis channel name of a topic.
fn redis_name(topic: &Topic) -> String {
    match topic {
        Topic::Channel(name) => channel_name(name),
        Topic::Client(id) => client_name(id),
    }
}

/// The publisher connection, opened on first use and dropped on any failure.
type PublisherSlot = Arc<tokio::sync::Mutex<Option<MultiplexedConnection>>>;

/// The Redis backplane of one node.
#[derive(Debug)]
pub struct Backplane {
    client: Client,
    publisher: PublisherSlot,
    streams: Arc<Streams>,
    plain_script: Script,
    timeout: Duration,
    /// How long idempotency records are kept, in ms.
    window_ms: u64,
    health: Arc<Health>,
    heard: Arc<Heard>,
    holds: Holds,
    interest: Arc<Interest>,
    registry: Registry,
    subscriber: JoinHandle<()>,
}

impl Drop for Backplane {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

impl Backplane {
    /// Starts the subscriber task for `registry` (built with `interest`), which connects to
    /// `client`'s Redis and keeps reconnecting. [`Config::redis_timeout`] bounds every Redis
    /// call; idempotency records are kept for [`Config::idempotency_window`].
    pub fn start(
        client: Client,
        registry: Registry,
        interest: Arc<Interest>,
        config: &Config,
    ) -> Self {
        let timeout = config.redis_timeout;
        let limits = streams::StreamLimits::new(
            config.history_size,
            config.history_ttl,
            crate::registry::RETENTION_MS,
        );
        let streams = Arc::new(Streams::new(limits));
        let health = Arc::new(Health {
            ready: AtomicBool::new(false),
            reason: Mutex::new("not connected to redis yet".to_owned()),
        });
        let publisher = PublisherSlot::default();
        let heard = Arc::new(Heard::default());
        let holds = Holds::default();
        let subscriber = tokio::spawn(
            Subscriber {
                client: client.clone(),
                registry: registry.clone(),
                interest: Arc::clone(&interest),
                holds: Arc::clone(&holds),
                health: Arc::clone(&health),
                publisher: Arc::clone(&publisher),
                streams: Arc::clone(&streams),
                timeout,
                heard: Arc::clone(&heard),
            }
            .run(),
        );
        Self {
            client,
            publisher,
            streams,
            plain_script: Script::new(PLAIN_SCRIPT),
            timeout,
            window_ms: u64::try_from(config.idempotency_window.as_millis()).unwrap_or(u64::MAX),
            health,
            heard,
            holds,
            interest,
            registry,
            subscriber,
        }
    }

    /// Holds `topics` subscribed in Redis until the returned [`Hold`] is dropped, and waits
    /// until they are (see [`Backplane::until_heard`]).
    pub async fn hold(&self, topics: Vec<Topic>) -> Hold {
        let topics: Vec<(Topic, String)> = topics
            .into_iter()
            .map(|topic| {
                let name = redis_name(&topic);
                (topic, name)
            })
            .collect();
        {
            let mut holds = self.holds.lock();
            for (topic, name) in &topics {
                *holds.entry(name.clone()).or_default() += 1;
                self.interest.mark(topic.clone());
            }
        }
        let names: Vec<String> = topics.iter().map(|(_, name)| name.clone()).collect();
        let hold = Hold {
            holds: Arc::clone(&self.holds),
            interest: Arc::clone(&self.interest),
            topics,
        };
        self.until_heard(&names).await;
        hold
    }

    /// Waits until every one of `names` (Redis channel names) is subscribed on the subscriber
    /// connection, so that messages other nodes publish to them from now on reach this node;
    /// gives up at once while Redis is down and after the Redis timeout otherwise (the
    /// subscription is made, and a gap announced, once Redis is back).
    pub async fn until_heard(&self, names: &[String]) {
        if self.readiness().is_err() {
            // Redis is down: waiting would only stall the client, and the gap announced when
            // it is back covers what it misses meanwhile.
            return;
        }
        let heard = tokio::time::timeout(self.timeout, async {
            loop {
                let added = self.heard.added.notified();
                if names.iter().all(|name| self.heard.contains(name)) {
                    return;
                }
                added.await;
            }
        })
        .await;
        if heard.is_err() {
            tracing::debug!(?names, "redis subscriptions not confirmed in time");
        }
    }

    /// `Ok` while subscribed in Redis; otherwise why not.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] with the reason.
    pub fn readiness(&self) -> Result<(), BrokerError> {
        if self.health.ready.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(BrokerError::Unavailable(self.health.reason.lock().clone()))
        }
    }

    /// Publishes `body` (see [`wire::encode_body`]) to `channel`: stores it in the channel's
    /// history and publishes it; returns the epoch and offset Redis gave it and how many nodes
    /// received it.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when Redis is down or did not answer in time.
    pub async fn publish(&self, channel: &str, body: Vec<u8>) -> Result<Stamped, BrokerError> {
        self.readiness()?;
        let mut conn = self.connection().await?;
        let result =
            tokio::time::timeout(self.timeout, self.streams.publish(&mut conn, channel, body))
                .await
                .map(|result| result.map_err(stream_error));
        self.settle(result).await
    }

    /// Where `channel`'s stream stands in Redis and up to `limit` of its stored messages after
    /// `after` (the newest when `None`).
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when Redis is down or did not answer in time.
    pub async fn read(
        &self,
        channel: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<StreamRead, BrokerError> {
        self.readiness()?;
        let mut conn = self.connection().await?;
        let result = tokio::time::timeout(
            self.timeout,
            self.streams.read(&mut conn, channel, after, limit),
        )
        .await
        .map(|result| result.map_err(stream_error));
        self.settle(result).await
    }

    /// [`Backplane::publish`] at most once per `key` within the idempotency window, on every
    /// node: the record is checked and stored in the publish script. A retry (on any node, also
    /// after this node timed out waiting for the first attempt's answer) gets the first
    /// publish's offset and node count.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when Redis is down or did not answer in time.
    pub async fn publish_keyed(
        &self,
        channel: &str,
        body: Vec<u8>,
        key: &RequestKey,
    ) -> Result<Outcome<Stamped>, BrokerError> {
        self.readiness()?;
        let mut conn = self.connection().await?;
        let record = (
            streams::publish_record(channel, &key.key),
            key.fingerprint.to_hex(),
            self.window_ms,
        );
        let result = tokio::time::timeout(
            self.timeout,
            self.streams
                .publish_keyed(&mut conn, channel, body, Some(&record)),
        )
        .await
        .map(|result| result.map_err(stream_error));
        self.settle(result).await
    }

    /// Publishes `body` on a pub/sub channel as it is; returns how many nodes received it.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when Redis is down or did not answer in time.
    pub async fn publish_plain(
        &self,
        redis_channel: &str,
        body: Vec<u8>,
    ) -> Result<u64, BrokerError> {
        self.readiness()?;
        let mut conn = self.connection().await?;
        let mut command = redis::cmd("PUBLISH");
        command.arg(redis_channel).arg(body);
        let result = tokio::time::timeout(self.timeout, command.query_async(&mut conn)).await;
        self.settle(result).await
    }

    /// Publishes `body` to `target` at most once per `key` within the idempotency window, on
    /// every node, as [`Backplane::publish_keyed`] does; returns how many nodes received it.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when Redis is down or did not answer in time.
    pub async fn publish_plain_keyed(
        &self,
        target: Plain<'_>,
        body: Vec<u8>,
        key: &RequestKey,
    ) -> Result<Outcome<u64>, BrokerError> {
        self.readiness()?;
        let mut conn = self.connection().await?;
        let mut invocation = self.plain_script.key(target.record(&key.key));
        invocation
            .arg(target.redis_channel())
            .arg(body)
            .arg(key.fingerprint.to_hex())
            .arg(self.window_ms)
            .arg(target.stored_from());
        let result = tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn)).await;
        let (status, nodes): (u8, u64) = self.settle(result).await?;
        Ok(outcome(status, nodes))
    }

    /// Turns a Redis call's outcome into ours; a failure drops the publisher connection, so
    /// the next publish opens a fresh one.
    async fn settle<T>(
        &self,
        result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, BrokerError> {
        let reason = match result {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(err)) => {
                tracing::warn!(%err, "publish to redis failed");
                describe(&err)
            }
            Err(_) => {
                let reason = format!(
                    "redis did not answer within {} ms",
                    self.timeout.as_millis()
                );
                tracing::warn!(%reason, "publish to redis failed");
                reason
            }
        };
        self.registry.metrics().broker_publish_failures.inc();
        *self.publisher.lock().await = None;
        Err(BrokerError::Unavailable(reason))
    }

    async fn connection(&self) -> Result<MultiplexedConnection, BrokerError> {
        publisher_connection(&self.client, &self.publisher, self.timeout, &self.registry).await
    }
}

/// The node's publisher connection: the open one, or a new one (kept for the next call).
async fn publisher_connection(
    client: &Client,
    publisher: &PublisherSlot,
    timeout: Duration,
    registry: &Registry,
) -> Result<MultiplexedConnection, BrokerError> {
    let mut slot = publisher.lock().await;
    if let Some(conn) = &*slot {
        return Ok(conn.clone());
    }
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let connect = client.get_multiplexed_async_connection_with_config(&config);
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(conn)) => {
            *slot = Some(conn.clone());
            Ok(conn)
        }
        Ok(Err(err)) => {
            registry.metrics().broker_publish_failures.inc();
            tracing::warn!(%err, "connecting to redis for publishing failed");
            Err(BrokerError::Unavailable(format!(
                "cannot connect to redis: {}",
                describe(&err)
            )))
        }
        Err(_) => {
            registry.metrics().broker_publish_failures.inc();
            Err(BrokerError::Unavailable(
                "redis connect timed out".to_owned(),
            ))
        }
    }
}

/// A Redis failure in words for the clients that see it (`broker_unavailable` replies and
/// `/readyz`): the redis crate's own text names its error kinds as Rust identifiers. The full
/// error goes to the log where it happens.
/// A stream reply that cannot be used, as a Redis error for [`describe`].
fn stream_error(err: streams::StreamError) -> RedisError {
    match err {
        streams::StreamError::Redis(err) => err,
        streams::StreamError::Epoch => RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "invalid epoch in the stream",
        )),
    }
}

fn describe(err: &RedisError) -> String {
    if err.is_timeout() {
        return "redis did not answer in time".to_owned();
    }
    if err.is_connection_refusal() {
        return "redis refused the connection".to_owned();
    }
    if err.is_io_error() || err.is_connection_dropped() {
        return "the connection to redis failed".to_owned();
    }
    match (err.code(), err.detail()) {
        (Some(code), Some(detail)) => format!("redis answered {code} {detail}"),
        (Some(code), None) => format!("redis answered {code}"),
        (None, _) => format!("redis failed: {}", err.category()),
    }
}

/// The subscriber task's state.
struct Subscriber {
    client: Client,
    registry: Registry,
    interest: Arc<Interest>,
    /// Names held subscribed for connections about to register.
    holds: Holds,
    health: Arc<Health>,
    publisher: PublisherSlot,
    /// The stream scripts, for healing from the history.
    streams: Arc<Streams>,
    timeout: Duration,
    /// The Redis channels subscribed on the current connection.
    heard: Arc<Heard>,
}

/// Why a subscriber session ended.
struct Ended {
    /// Whether it had subscribed everything (so the next pause starts short again).
    was_ready: bool,
    reason: String,
}

impl Subscriber {
    /// Connects, subscribes, relays; on any failure marks the node not ready, waits (capped
    /// exponential backoff with jitter) and starts again. After a failure, every channel
    /// subscribed again gets a gap announcement.
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        let mut failed_before = false;
        loop {
            let started = tokio::time::Instant::now();
            let ended = self.session(failed_before).await;
            self.heard.names.lock().clear();
            self.health.set_down(ended.reason.clone());
            *self.publisher.lock().await = None;
            tracing::warn!(reason = %ended.reason, "redis backplane down; reconnecting");
            failed_before = true;
            // Only a session that lasted starts the pauses short again: a Redis (or proxy)
            // that takes connections and drops them must not cost every subscriber a gap
            // frame every 100 ms.
            if ended.was_ready && started.elapsed() >= STABLE_SESSION {
                backoff = BACKOFF_MIN;
            }
            let jittered = rand::rng().random_range(backoff / 2..=backoff);
            tokio::time::sleep(jittered).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn session(&mut self, failed_before: bool) -> Ended {
        let not_ready = |reason: String| Ended {
            was_ready: false,
            reason,
        };
        let pubsub = match tokio::time::timeout(self.timeout, self.client.get_async_pubsub()).await
        {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(err)) => {
                tracing::debug!(%err, "redis subscriber connection failed");
                return not_ready(format!("cannot connect to redis: {}", describe(&err)));
            }
            Err(_) => return not_ready("connecting to redis timed out".to_owned()),
        };
        let (mut sink, mut stream) = pubsub.split();
        // Marks made from now on are handled after the full subscription below.
        self.interest.take();
        let mut wanted: Vec<String> = vec![BROADCAST_CHANNEL.to_owned()];
        wanted.extend(
            self.registry
                .channels()
                .into_iter()
                .map(|(name, _)| channel_name(&name)),
        );
        wanted.extend(
            self.registry
                .client_ids()
                .into_iter()
                .map(|id| client_name(&id)),
        );
        wanted.extend(self.holds.lock().keys().cloned());
        wanted.sort_unstable();
        wanted.dedup();
        for chunk in wanted.chunks(SUBSCRIBE_PIPELINE) {
            if let Err(reason) = self.command(&sink, "SUBSCRIBE", chunk).await {
                return not_ready(reason);
            }
        }
        self.heard.extend(wanted);
        self.health.set_ready();
        if failed_before {
            self.registry.metrics().broker_reconnects.inc();
            // What was published while the node was cut off comes from the histories.
            for channel in self.heard.channels() {
                if let Err(reason) = self.heal(&channel).await {
                    return not_ready(reason);
                }
            }
        }
        tracing::info!(
            subscriptions = self.heard.names.lock().len(),
            "redis backplane connected"
        );
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.reset();
        let mut keep_streams = tokio::time::interval(STREAM_KEEPALIVE);
        keep_streams.reset();
        loop {
            let outcome = tokio::select! {
                message = stream.next() => match message {
                    Some(message) => self.relay(&message).await,
                    None => Err("the redis subscriber connection closed".to_owned()),
                },
                () = self.interest.changed() => self.follow_interest(&sink).await,
                _ = keep_streams.tick() => {
                    self.keep_streams().await;
                    Ok(())
                }
                _ = ping.tick() => {
                    match tokio::time::timeout(self.timeout, sink.ping::<redis::Value>()).await {
                        // Also a backstop for a wake-up lost in a race: marks never wait
                        // longer than one ping.
                        Ok(Ok(_)) => self.follow_interest(&sink).await,
                        Ok(Err(err)) => Err(format!("redis ping failed: {}", describe(&err))),
                        Err(_) => Err("redis did not answer a ping in time".to_owned()),
                    }
                }
            };
            if let Err(reason) = outcome {
                return Ended {
                    was_ready: true,
                    reason,
                };
            }
        }
    }

    /// Sends `SUBSCRIBE` or `UNSUBSCRIBE` for each name, one name per command (so each reply
    /// answers exactly one request), pipelined, each bounded by the timeout.
    async fn command(
        &self,
        sink: &PubSubSink,
        command: &str,
        names: &[String],
    ) -> Result<(), String> {
        let calls = names.iter().map(|name| {
            let mut sink = sink.clone();
            async move {
                let call = async {
                    if command == "SUBSCRIBE" {
                        sink.subscribe(name).await
                    } else {
                        sink.unsubscribe(name).await
                    }
                };
                match tokio::time::timeout(self.timeout, call).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(err)) => Err(format!("redis {command} failed: {}", describe(&err))),
                    Err(_) => Err(format!("redis did not answer {command} in time")),
                }
            }
        });
        futures_util::future::join_all(calls)
            .await
            .into_iter()
            .collect()
    }

    /// Subscribes to or unsubscribes from what the marked names need now.
    async fn follow_interest(&mut self, sink: &PubSubSink) -> Result<(), String> {
        let mut subscribe = Vec::new();
        let mut unsubscribe = Vec::new();
        let mut kept = Vec::new();
        for topic in self.interest.take() {
            let redis_name = redis_name(&topic);
            // Out of `heard` before the registry is asked: a connection that subscribes after
            // the answer must wait for the SUBSCRIBE its own mark brings, not be told it hears
            // a name that is about to be unsubscribed.
            let was_heard = self.heard.names.lock().remove(&redis_name);
            let held = self.holds.lock().contains_key(&redis_name);
            let wanted = held
                || match &topic {
                    Topic::Channel(name) => self.registry.has_subscribers(name),
                    Topic::Client(id) => self.registry.has_client(id),
                };
            match (wanted, was_heard) {
                (true, false) => subscribe.push(redis_name),
                (true, true) => kept.push(redis_name),
                (false, true) => unsubscribe.push(redis_name),
                (false, false) => {}
            }
        }
        self.heard.extend(kept);
        for chunk in subscribe.chunks(SUBSCRIBE_PIPELINE) {
            self.command(sink, "SUBSCRIBE", chunk).await?;
        }
        for chunk in unsubscribe.chunks(SUBSCRIBE_PIPELINE) {
            self.command(sink, "UNSUBSCRIBE", chunk).await?;
        }
        self.heard.extend(subscribe);
        Ok(())
    }

    /// Renews the streams of the channels this node subscribes to, so that a channel's epoch
    /// and offsets go on while it has subscribers somewhere, as on one node. Best effort: a
    /// failure is logged, and the next round (or a publish) renews them.
    async fn keep_streams(&self) {
        let keys: Vec<String> = self
            .heard
            .channels()
            .iter()
            .map(|channel| streams::stream_key(channel))
            .collect();
        if keys.is_empty() {
            return;
        }
        let ttl = i64::try_from(self.streams.limits().stream_ttl_ms).unwrap_or(i64::MAX);
        let renewed = async {
            let mut conn = self.connection().await.map_err(|err| err.to_string())?;
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.pexpire(key, ttl).ignore();
            }
            tokio::time::timeout(self.timeout, pipe.query_async::<()>(&mut conn))
                .await
                .map_err(|_| "timed out".to_owned())?
                .map_err(|err| describe(&err))
        };
        if let Err(err) = renewed.await {
            tracing::warn!(%err, channels = keys.len(), "renewing channel streams failed");
        }
    }

    async fn connection(&self) -> Result<MultiplexedConnection, BrokerError> {
        publisher_connection(&self.client, &self.publisher, self.timeout, &self.registry).await
    }

    /// Reads a channel's stream for healing; a failure ends the session (Redis is in trouble,
    /// and the next session heals again).
    async fn read(&self, channel: &str, after: u64) -> Result<StreamRead, String> {
        let mut conn = self.connection().await.map_err(|err| err.to_string())?;
        match tokio::time::timeout(
            self.timeout,
            self.streams
                .read(&mut conn, channel, Some(after), HEAL_BATCH),
        )
        .await
        {
            Ok(Ok(read)) => Ok(read),
            Ok(Err(err)) => Err(format!(
                "reading a channel's history failed: {}",
                describe(&stream_error(err))
            )),
            Err(_) => Err("redis did not answer a history read in time".to_owned()),
        }
    }

    /// Brings this node's position in `channel` up to Redis's: delivers, in order, what the
    /// history holds of the messages the node missed, and skips (with a gap frame saying where
    /// messages go on from) only what it no longer holds, or a stream Redis started anew.
    async fn heal(&self, channel: &str) -> Result<(), String> {
        loop {
            let Some(known) = self.registry.relayed(channel) else {
                // No subscriber here relies on a position yet: it reads its own on subscribe.
                return Ok(());
            };
            let read = self.read(channel, known.offset).await?;
            if read.epoch != known.epoch {
                self.skip(
                    channel,
                    Position {
                        epoch: read.epoch,
                        offset: 0,
                    },
                )
                .await?;
                continue;
            }
            if known.offset >= read.latest {
                return Ok(());
            }
            if known.offset + 1 < read.first {
                self.skip(
                    channel,
                    Position {
                        epoch: read.epoch,
                        offset: read.first - 1,
                    },
                )
                .await?;
                continue;
            }
            if read.messages.is_empty() {
                // Nothing replayable follows the position: go on from the latest.
                self.skip(
                    channel,
                    Position {
                        epoch: read.epoch,
                        offset: read.latest,
                    },
                )
                .await?;
                return Ok(());
            }
            for bytes in &read.messages {
                let Ok(message) = wire::decode(bytes, true) else {
                    break;
                };
                let Some(stamp) = message.stamp else { break };
                let relayed = self
                    .registry
                    .deliver(
                        channel,
                        stamp.epoch,
                        stamp.offset,
                        message.from,
                        message.payload,
                    )
                    .await
                    .map_err(|err| err.to_string())?;
                if relayed == Relayed::Delivered {
                    self.registry.metrics().broker_healed.inc();
                }
            }
        }
    }

    /// Moves this node's position in `channel` to `position`, announcing the gap.
    async fn skip(&self, channel: &str, position: Position) -> Result<(), String> {
        self.registry.metrics().broker_gaps.inc();
        self.registry
            .skip_to(channel, position)
            .await
            .map_err(|err| err.to_string())
    }

    /// Hands one message from Redis to this node's connections. A channel message that does
    /// not follow on from the last one is healed from the history first. A message that does
    /// not decode is logged and dropped, with a gap announced to its channel's subscribers;
    /// only a stopped registry or Redis failing a history read ends the session.
    async fn relay(&self, message: &Msg) -> Result<(), String> {
        let name = message.get_channel_name();
        let (route, stamped) = if let Some(channel) = channel_of(name) {
            (Route::Channel(channel), true)
        } else if let Some(client_id) = name.strip_prefix(CLIENT_PREFIX) {
            (Route::Client(client_id), false)
        } else if name == BROADCAST_CHANNEL {
            (Route::Broadcast, false)
        } else {
            return Ok(());
        };
        let decoded = match wire::decode(message.get_payload_bytes(), stamped) {
            Ok(decoded) => decoded,
            Err(err) => {
                tracing::warn!(%err, name, "dropping an undecodable message from redis");
                // Its subscribers missed a message: they are told so.
                return match route {
                    Route::Channel(channel) => {
                        self.registry.metrics().broker_gaps.inc();
                        self.registry
                            .announce_gap(channel)
                            .await
                            .map_err(|err| err.to_string())
                    }
                    Route::Client(_) | Route::Broadcast => Ok(()),
                };
            }
        };
        match route {
            Route::Channel(channel) => {
                let stamp = decoded.stamp.expect("channel messages are stamped");
                let deliver = || {
                    self.registry.deliver(
                        channel,
                        stamp.epoch,
                        stamp.offset,
                        decoded.from,
                        decoded.payload,
                    )
                };
                let relayed = deliver().await.map_err(|err| err.to_string())?;
                if matches!(relayed, Relayed::Gap { .. } | Relayed::NewEpoch) {
                    self.heal(channel).await?;
                    deliver().await.map_err(|err| err.to_string())?;
                }
                Ok(())
            }
            Route::Client(client_id) => {
                self.registry
                    .send_to(client_id, decoded.from, decoded.payload);
                Ok(())
            }
            Route::Broadcast => self
                .registry
                .broadcast(decoded.payload)
                .await
                .map(drop)
                .map_err(|err| err.to_string()),
        }
    }
}

/// Where a message from Redis goes on this node.
enum Route<'a> {
    Channel(&'a str),
    Client(&'a str),
    Broadcast,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_failures_are_described_in_words() {
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(describe(&refused), "redis refused the connection");
        let reset = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(describe(&reset), "the connection to redis failed");
        let typed = RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "Response was of incompatible type",
            "\"nil\"".to_owned(),
        ));
        assert!(
            typed.to_string().contains("UnexpectedReturnType"),
            "the crate's own text: {typed}"
        );
        assert_eq!(describe(&typed), "redis failed: type error");
    }
}
