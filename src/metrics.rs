//! Prometheus metrics, served at `GET /metrics` in the text exposition format.
//!
//! Every handle is a lock-free atomic (the `prometheus` crate's counters and histograms), and
//! the hot paths touch them per batch, not per delivery: a shard's writer adds up what it
//! queued in one pass and records it once; a connection records its queue depth once per batch
//! it takes and its bytes once per syscall. Gauges that can be derived (connections, channels)
//! are computed when scraped instead of being kept up to date.

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Why a WebSocket connection ended, as the `reason` label of
/// `herald_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedBy {
    /// The client sent a close frame.
    ClientClose,
    /// The socket reached EOF or failed without a close handshake.
    PeerGone,
    /// The client broke RFC 6455 (or sent data on a receive-only connection).
    ProtocolError,
    /// The connection's queue overflowed.
    SlowConsumer,
    /// The client was silent for the idle timeout.
    IdleTimeout,
    /// The server shut down.
    Shutdown,
    /// The client's token expired and was not refreshed.
    TokenExpired,
    /// A recovery asked for in the connect URL, or a replay under way, could not be
    /// completed (the client reconnects with the position it has).
    RecoveryFailed,
}

impl ClosedBy {
    const ALL: [ClosedBy; 8] = [
        ClosedBy::ClientClose,
        ClosedBy::PeerGone,
        ClosedBy::ProtocolError,
        ClosedBy::SlowConsumer,
        ClosedBy::IdleTimeout,
        ClosedBy::Shutdown,
        ClosedBy::TokenExpired,
        ClosedBy::RecoveryFailed,
    ];

    fn label(self) -> &'static str {
        match self {
            ClosedBy::ClientClose => "client_close",
            ClosedBy::PeerGone => "peer_gone",
            ClosedBy::ProtocolError => "protocol_error",
            ClosedBy::SlowConsumer => "slow_consumer",
            ClosedBy::IdleTimeout => "idle_timeout",
            ClosedBy::Shutdown => "shutdown",
            ClosedBy::TokenExpired => "token_expired",
            ClosedBy::RecoveryFailed => "recovery_failed",
        }
    }
}

/// All of Herald's metrics, registered in their own Prometheus registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// WebSocket connections open now (set at scrape time).
    pub connections: IntGauge,
    /// WebSocket connections opened since start.
    pub connections_opened: IntCounter,
    /// WebSocket connections closed since start, by [`ClosedBy`].
    pub connections_closed: IntCounterVec,
    /// Subscriptions (connection, channel pairs) now.
    pub subscriptions: IntGauge,
    /// Channels with at least one subscriber (set at scrape time).
    pub channels: IntGauge,
    /// Channel publishes since start (HTTP and WebSocket).
    pub publishes: IntCounter,
    /// Frames queued to connections for publishes, direct sends and broadcasts.
    pub deliveries: IntCounter,
    /// Connections dropped because their queue overflowed.
    pub slow_consumer_drops: IntCounter,
    /// Frames waiting in a connection's queue when it takes them to write.
    pub queue_depth: Histogram,
    /// Seconds from a publish's call to its frame being queued on every subscriber of a shard.
    pub publish_to_enqueue: Histogram,
    /// WebSocket bytes read from clients.
    pub bytes_received: IntCounter,
    /// WebSocket bytes written to clients.
    pub bytes_sent: IntCounter,
    /// Cluster mode: times the Redis subscriber connection was back after being lost (or after
    /// Redis was down at start).
    pub broker_reconnects: IntCounter,
    /// Cluster mode: gap announcements made, one per channel whose missed messages the
    /// history could not replay, or whose stream Redis started anew (each reaches every json
    /// subscriber of that channel on this node).
    pub broker_gaps: IntCounter,
    /// Cluster mode: messages this node missed and read back from a channel's history in
    /// Redis, delivered in order before newer ones.
    pub broker_healed: IntCounter,
    /// Cluster mode: publishes, sends and broadcasts refused because Redis failed or did not
    /// answer in time (not counting those refused at once while the node was not ready).
    pub broker_publish_failures: IntCounter,
    /// In-memory broker: idempotency keys forgotten before the end of their window, because
    /// their route already remembered `--idempotency-keys` newer ones.
    pub idempotency_keys_forgotten: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    ///
    /// # Panics
    /// Never in practice: registration fails only on duplicate or malformed names, which are
    /// fixed here.
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let gauge = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(gauge.clone()))
                .expect("unique metric");
            gauge
        };
        let counter = |name: &str, help: &str| {
            let counter = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(counter.clone()))
                .expect("unique metric");
            counter
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let histogram = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(histogram.clone()))
                .expect("unique metric");
            histogram
        };
        let connections_closed = IntCounterVec::new(
            Opts::new(
                "herald_connections_closed_total",
                "WebSocket connections closed, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(connections_closed.clone()))
            .expect("unique metric");
        for reason in ClosedBy::ALL {
            connections_closed.with_label_values(&[reason.label()]);
        }
        Self {
            connections: gauge("herald_connections", "WebSocket connections open now"),
            connections_opened: counter(
                "herald_connections_opened_total",
                "WebSocket connections opened",
            ),
            connections_closed,
            subscriptions: gauge("herald_subscriptions", "Channel subscriptions now"),
            channels: gauge("herald_channels", "Channels with at least one subscriber"),
            publishes: counter("herald_publishes_total", "Channel publishes"),
            deliveries: counter("herald_deliveries_total", "Frames queued to connections"),
            slow_consumer_drops: counter(
                "herald_slow_consumer_drops_total",
                "Connections dropped because their queue overflowed",
            ),
            queue_depth: histogram(
                "herald_queue_depth_frames",
                "Frames in a connection's queue when it takes them to write",
                vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                ],
            ),
            publish_to_enqueue: histogram(
                "herald_publish_to_enqueue_seconds",
                "Time from a publish to its frame being queued on every subscriber of a shard",
                prometheus::exponential_buckets(0.000_01, 2.0, 18).expect("valid buckets"),
            ),
            bytes_received: counter(
                "herald_websocket_received_bytes_total",
                "WebSocket bytes read",
            ),
            bytes_sent: counter(
                "herald_websocket_sent_bytes_total",
                "WebSocket bytes written",
            ),
            broker_reconnects: counter(
                "herald_broker_reconnects_total",
                "Times the Redis subscriber connection came back after being lost or down",
            ),
            broker_gaps: counter(
                "herald_broker_gaps_announced_total",
                "Channels whose subscribers were told messages were missed (history could not replay them)",
            ),
            broker_healed: counter(
                "herald_broker_healed_total",
                "Messages this node missed and read back from the channel's history in Redis",
            ),
            broker_publish_failures: counter(
                "herald_broker_publish_failures_total",
                "Publishes, sends and broadcasts that failed because Redis failed or timed out",
            ),
            idempotency_keys_forgotten: counter(
                "herald_idempotency_keys_forgotten_total",
                "Idempotency keys forgotten early to stay within --idempotency-keys",
            ),
            registry,
        }
    }

    /// Counts one closed connection.
    pub fn record_close(&self, reason: ClosedBy) {
        self.connections_closed
            .with_label_values(&[reason.label()])
            .inc();
    }

    /// Connections closed since start, all reasons together.
    pub fn connections_closed_total(&self) -> u64 {
        ClosedBy::ALL
            .iter()
            .map(|reason| {
                self.connections_closed
                    .with_label_values(&[reason.label()])
                    .get()
            })
            .sum()
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("the text encoder writes to a Vec without failing");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}
