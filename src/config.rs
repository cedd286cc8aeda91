//! Server configuration: every limit Herald enforces, with its default and the reason for it.
//!
//! The binary fills a [`Config`] from command-line flags and `HERALD_*` environment variables;
//! tests and embedders build one with [`Config::default`] and the by-value setters.

use std::fmt;
use std::time::Duration;

/// Everything the server needs to know besides the listening socket.
///
/// Each field's default is chosen for a notification server at the edge: small messages, many
/// mostly idle connections, and clients that may be hostile or merely slow.
#[derive(Clone)]
#[non_exhaustive]
pub struct Config {
    /// Number of registry shards, each with its own lock and writer task. Default: the number of
    /// CPUs, so that fan-out work spreads over every core.
    pub shards: usize,
    /// Frames a connection may have queued before it is dropped as a slow consumer.
    /// Default 1024: absorbs bursts, while bounding memory to a few frames per connection.
    pub queue_capacity: usize,
    /// Largest publish body and largest client message, in bytes. Default 64 KiB: notifications
    /// are small, and the limit bounds what one client can make the server buffer.
    pub max_message_bytes: usize,
    /// Open TCP connections (HTTP and WebSocket together) above which new ones get `503`.
    /// Default 100 000.
    pub max_connections: usize,
    /// Channels one connection may be subscribed to at once. Default 128.
    pub max_subscriptions: usize,
    /// Time a new TCP connection has to deliver its request headers. Default 10 s: reaps
    /// connections that never speak and slowloris clients.
    pub handshake_timeout: Duration,
    /// How often the server pings a quiet WebSocket client. Default 25 s, below the idle
    /// timeouts of common proxies and load balancers (30-60 s).
    pub ping_interval: Duration,
    /// A WebSocket client that sends nothing (not even a pong) for this long is closed.
    /// Default 60 s: two missed pings.
    pub idle_timeout: Duration,
    /// On shutdown, how long connections get to take their close frame before the server exits
    /// anyway. Default 5 s.
    pub shutdown_grace: Duration,
    /// Publishes (and direct sends) per second one WebSocket connection may make, with bursts
    /// of as many; 0 for no limit. Default 50: plenty for a chat client, and a flooding client
    /// cannot make the server fan out more than that on its behalf.
    pub client_publish_rate: u32,
    /// Keys that authorize `/api/*` and `/metrics` requests (`Authorization: Bearer <key>`).
    /// Default none, in which case those routes answer only clients on a loopback address that
    /// did not come through a proxy.
    pub api_keys: Vec<String>,
    /// Serve `/metrics` to anyone, without a key. Default off: metrics follow the `/api/*`
    /// rule, since they tell outsiders how many clients and channels a server has.
    pub public_metrics: bool,
    /// Browser origins allowed to open WebSockets besides the server's own host (`*` for any),
    /// each `scheme://host[:port]`. Default empty: only pages served from the same host as the
    /// request (Herald's demo page among them), and clients that send no `Origin`.
    pub allowed_origins: Vec<String>,
    /// HMAC secret (HS256/384/512) that signs client tokens. With it or
    /// [`Config::jwt_public_key`], `/ws` needs a token; with neither, clients are anonymous.
    pub jwt_secret: Option<String>,
    /// Public key in PEM (RSA, EC P-256/P-384 or Ed25519) that verifies client tokens.
    pub jwt_public_key: Option<String>,
    /// Clock skew allowed when checking `exp` and `nbf`. Default zero: a token is valid exactly
    /// as long as it says.
    pub jwt_leeway: Duration,
    /// When set, tokens must carry this `iss`.
    pub jwt_issuer: Option<String>,
    /// When set, tokens' `aud` must include this.
    pub jwt_audience: Option<String>,
    /// The Redis URL (`redis://host:port/`) of the cluster backplane. Default none: the
    /// embedded in-memory broker, one node.
    pub redis: Option<String>,
    /// The longest any one Redis call (connect, publish, subscribe, ping) may take before it
    /// counts as failed. Default 2 s: an unreachable Redis never holds a publisher longer.
    pub redis_timeout: Duration,
    /// Messages each channel keeps for clients that come back (a reconnect, a slow consumer
    /// that was dropped); 0 turns history and recovery off. Default 100: a notification feed
    /// or a chat room rarely gets more in the minute or two a phone needs to switch networks
    /// or a deploy needs to roll, and 100 frames of a typical 200-byte notification are 20 KiB
    /// a channel.
    pub history_size: usize,
    /// How long a message stays in its channel's history. Default 5 minutes: longer than a
    /// network switch, a laptop lid or a rolling deploy, short enough that a client away for
    /// longer reloads its state instead of replaying a flood.
    pub history_ttl: Duration,
    /// The most bytes all channels' histories hold together, on this node; past it the oldest
    /// messages of the whole node are dropped first. Default 64 MiB: 300 000 typical
    /// notifications, a small share of a server's memory, whatever the number of channels.
    pub history_memory: u64,
    /// How long a publish, send or broadcast with an `Idempotency-Key` is remembered, so that
    /// a retry with the key gets the first reply and is not delivered again. Default 5 minutes:
    /// longer than any retry schedule worth following for a real-time message (one retried
    /// later is stale anyway), and as long as a channel keeps its offset counter without
    /// publishes, so a replayed offset never dates from before the channel's offsets started
    /// again at 1.
    pub idempotency_window: Duration,
    /// Keys the in-memory broker remembers per route (channel publishes, direct sends,
    /// broadcasts); past it the oldest is forgotten first, before its window ends, and a retry
    /// with it is carried out again. Default 100 000, which holds 5 minutes of 330 keyed
    /// publishes a second, in some 200 bytes a key (20 MB per route when full; 43 MB with
    /// 128-character keys and names). In cluster mode keys live in Redis, each expiring after
    /// the window, and this does not apply.
    pub idempotency_keys: usize,
}

/// Secrets (API keys, the JWT secret, the Redis URL) are left out, so that a logged
/// configuration leaks none.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("shards", &self.shards)
            .field("queue_capacity", &self.queue_capacity)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_connections", &self.max_connections)
            .field("max_subscriptions", &self.max_subscriptions)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("ping_interval", &self.ping_interval)
            .field("idle_timeout", &self.idle_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("client_publish_rate", &self.client_publish_rate)
            .field(
                "api_keys",
                &format_args!("[{} redacted]", self.api_keys.len()),
            )
            .field("public_metrics", &self.public_metrics)
            .field("allowed_origins", &self.allowed_origins)
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("jwt_public_key", &self.jwt_public_key.is_some())
            .field("jwt_leeway", &self.jwt_leeway)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            // The URL may carry a password.
            .field("redis", &self.redis.as_ref().map(|_| "<redacted>"))
            .field("redis_timeout", &self.redis_timeout)
            .field("history_size", &self.history_size)
            .field("history_ttl", &self.history_ttl)
            .field("history_memory", &self.history_memory)
            .field("idempotency_window", &self.idempotency_window)
            .field("idempotency_keys", &self.idempotency_keys)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            shards: std::thread::available_parallelism().map_or(1, usize::from),
            queue_capacity: 1024,
            max_message_bytes: 64 * 1024,
            max_connections: 100_000,
            max_subscriptions: 128,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(5),
            client_publish_rate: 50,
            api_keys: Vec::new(),
            public_metrics: false,
            allowed_origins: Vec::new(),
            jwt_secret: None,
            jwt_public_key: None,
            jwt_leeway: Duration::ZERO,
            jwt_issuer: None,
            jwt_audience: None,
            redis: None,
            redis_timeout: Duration::from_secs(2),
            history_size: 100,
            history_ttl: Duration::from_secs(5 * 60),
            history_memory: 64 * 1024 * 1024,
            idempotency_window: Duration::from_secs(5 * 60),
            idempotency_keys: 100_000,
        }
    }
}

/// A configuration value that the server cannot run with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A count or size that must be at least one was zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// A duration that must be positive was zero.
    #[error("{0} must be longer than zero")]
    ZeroDuration(&'static str),
    /// The Redis URL cannot be parsed.
    #[error("invalid --redis URL: {0}; expected redis://host:port/ (e.g. redis://127.0.0.1:6379/)")]
    RedisUrl(String),
    /// An API key is the empty string, which would let anyone in.
    #[error("an api-key must not be empty")]
    EmptyApiKey,
    /// An `--allowed-origins` entry that no browser `Origin` can ever match.
    #[error(
        "invalid --allowed-origins entry {origin:?}: {reason}; an origin is scheme://host[:port], \
         e.g. https://app.example.com or http://localhost:3000 (or * for any)"
    )]
    InvalidOrigin {
        /// The entry as configured.
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The JWT secret or public key cannot be used.
    #[error("{0}")]
    Jwt(#[from] crate::auth::KeyError),
    /// The idle timeout is not longer than the ping interval, so a healthy client that answers
    /// every ping would still be closed.
    #[error("idle-timeout ({idle:?}) must be longer than ping-interval ({ping:?})")]
    IdleNotAfterPing {
        /// The configured idle timeout.
        idle: Duration,
        /// The configured ping interval.
        ping: Duration,
    },
}

impl Config {
    /// Sets [`Config::shards`].
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards;
        self
    }

    /// Sets [`Config::queue_capacity`].
    pub fn queue_capacity(mut self, frames: usize) -> Self {
        self.queue_capacity = frames;
        self
    }

    /// Sets [`Config::max_message_bytes`].
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Sets [`Config::max_connections`].
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections;
        self
    }

    /// Sets [`Config::max_subscriptions`].
    pub fn max_subscriptions(mut self, subscriptions: usize) -> Self {
        self.max_subscriptions = subscriptions;
        self
    }

    /// Sets [`Config::handshake_timeout`].
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets [`Config::ping_interval`].
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// Sets [`Config::idle_timeout`].
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets [`Config::shutdown_grace`].
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Sets [`Config::client_publish_rate`].
    pub fn client_publish_rate(mut self, per_second: u32) -> Self {
        self.client_publish_rate = per_second;
        self
    }

    /// Sets [`Config::api_keys`].
    pub fn api_keys(mut self, keys: Vec<String>) -> Self {
        self.api_keys = keys;
        self
    }

    /// Sets [`Config::public_metrics`].
    pub fn public_metrics(mut self, public: bool) -> Self {
        self.public_metrics = public;
        self
    }

    /// Sets [`Config::allowed_origins`].
    pub fn allowed_origins(mut self, origins: Vec<String>) -> Self {
        self.allowed_origins = origins;
        self
    }

    /// Sets [`Config::jwt_secret`].
    pub fn jwt_secret(mut self, secret: Option<String>) -> Self {
        self.jwt_secret = secret;
        self
    }

    /// Sets [`Config::jwt_public_key`] (the PEM text, not a path).
    pub fn jwt_public_key(mut self, pem: Option<String>) -> Self {
        self.jwt_public_key = pem;
        self
    }

    /// Sets [`Config::jwt_leeway`].
    pub fn jwt_leeway(mut self, leeway: Duration) -> Self {
        self.jwt_leeway = leeway;
        self
    }

    /// Sets [`Config::jwt_issuer`].
    pub fn jwt_issuer(mut self, issuer: Option<String>) -> Self {
        self.jwt_issuer = issuer;
        self
    }

    /// Sets [`Config::jwt_audience`].
    pub fn jwt_audience(mut self, audience: Option<String>) -> Self {
        self.jwt_audience = audience;
        self
    }

    /// Sets [`Config::redis`].
    pub fn redis(mut self, url: Option<String>) -> Self {
        self.redis = url;
        self
    }

    /// Sets [`Config::redis_timeout`].
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.redis_timeout = timeout;
        self
    }

    /// Sets [`Config::history_size`].
    pub fn history_size(mut self, messages: usize) -> Self {
        self.history_size = messages;
        self
    }

    /// Sets [`Config::history_ttl`].
    pub fn history_ttl(mut self, ttl: Duration) -> Self {
        self.history_ttl = ttl;
        self
    }

    /// Sets [`Config::history_memory`].
    pub fn history_memory(mut self, bytes: u64) -> Self {
        self.history_memory = bytes;
        self
    }

    /// Sets [`Config::idempotency_window`].
    pub fn idempotency_window(mut self, window: Duration) -> Self {
        self.idempotency_window = window;
        self
    }

    /// Sets [`Config::idempotency_keys`].
    pub fn idempotency_keys(mut self, keys: usize) -> Self {
        self.idempotency_keys = keys;
        self
    }

    /// Checks that the values make a server that can run.
    ///
    /// # Errors
    /// The first value that cannot work, as a [`ConfigError`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("shards", self.shards),
            ("queue-capacity", self.queue_capacity),
            ("max-message-bytes", self.max_message_bytes),
            ("max-connections", self.max_connections),
            ("max-subscriptions", self.max_subscriptions),
            ("idempotency-keys", self.idempotency_keys),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        for (name, value) in [
            ("handshake-timeout", self.handshake_timeout),
            ("ping-interval", self.ping_interval),
            ("idle-timeout", self.idle_timeout),
            ("redis-timeout", self.redis_timeout),
            ("history-ttl", self.history_ttl),
            ("idempotency-window", self.idempotency_window),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration(name));
            }
        }
        if let Some(url) = &self.redis {
            redis_address(url)?;
        }
        if self.api_keys.iter().any(String::is_empty) {
            return Err(ConfigError::EmptyApiKey);
        }
        for origin in &self.allowed_origins {
            crate::http::parse_allowed_origin(origin).map_err(|reason| {
                ConfigError::InvalidOrigin {
                    origin: origin.clone(),
                    reason,
                }
            })?;
        }
        crate::auth::Verifier::from_config(self)?;
        if self.idle_timeout <= self.ping_interval {
            return Err(ConfigError::IdleNotAfterPing {
                idle: self.idle_timeout,
                ping: self.ping_interval,
            });
        }
        Ok(())
    }
}

/// The address part of a Redis URL (`host:port` or a socket path), which may be logged: the
/// URL itself can carry a password.
///
/// # Errors
/// [`ConfigError::RedisUrl`] when the URL cannot be used, without echoing a URL that holds a
/// password.
pub fn redis_address(url: &str) -> Result<String, ConfigError> {
    let shown = if url.contains('@') {
        "(the URL, not shown: it holds a password)".to_owned()
    } else {
        format!("{url:?}")
    };
    if !url.contains("://") {
        return Err(ConfigError::RedisUrl(format!("{shown} has no scheme")));
    }
    redis::IntoConnectionInfo::into_connection_info(url)
        .map(|info| info.addr().to_string())
        .map_err(|err| ConfigError::RedisUrl(format!("{shown}: {err}")))
}

/// The settings a server runs with, one `key=value` pair after another for the start-up log:
/// what an operator checks first when something is refused. Secrets are never shown.
#[derive(Debug)]
pub struct Summary<'a>(&'a Config);

impl Config {
    /// The effective settings, for the start-up log (see [`Summary`]).
    pub fn summary(&self) -> Summary<'_> {
        Summary(self)
    }
}

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = self.0;
        let clients = match (&config.jwt_secret, &config.jwt_public_key) {
            (None, None) => "anonymous",
            (Some(_), None) => "jwt (hmac secret)",
            (None, Some(_)) => "jwt (public key)",
            (Some(_), Some(_)) => "jwt (hmac secret and public key)",
        };
        write!(f, "clients={clients}")?;
        match config.api_keys.len() {
            0 => write!(f, " api=loopback-only")?,
            keys => write!(f, " api=api-key ({keys} configured)")?,
        }
        let metrics = if config.public_metrics {
            "public"
        } else {
            "like-api"
        };
        write!(f, " metrics={metrics}")?;
        if config.allowed_origins.iter().any(|origin| origin == "*") {
            write!(f, " origins=any")?;
        } else if config.allowed_origins.is_empty() {
            write!(f, " origins=same-host")?;
        } else {
            write!(f, " origins=same-host,{}", config.allowed_origins.join(","))?;
        }
        match &config.redis {
            None => write!(f, " broker=memory")?,
            Some(url) => {
                let address = redis_address(url).unwrap_or_else(|_| "<invalid>".to_owned());
                write!(f, " broker=redis({address})")?;
            }
        }
        if config.history_size == 0 {
            write!(f, " history=off")?;
        } else {
            write!(
                f,
                " history={}x{:?},{}",
                config.history_size,
                config.history_ttl,
                bytesize::ByteSize::b(config.history_memory)
                    .display()
                    .iec_short()
            )?;
        }
        write!(
            f,
            " shards={} queue_capacity={} max_message_bytes={} max_connections={} \
             max_subscriptions={} client_publish_rate={} ping_interval={:?} idle_timeout={:?}",
            config.shards,
            config.queue_capacity,
            config.max_message_bytes,
            config.max_connections,
            config.max_subscriptions,
            config.client_publish_rate,
            config.ping_interval,
            config.idle_timeout,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Config::default().validate(), Ok(()));
    }

    #[test]
    fn debug_output_leaves_secrets_out() {
        let config = Config::default()
            .api_keys(vec!["key-one".into()])
            .jwt_secret(Some("jwt-secret-jwt-secret-jwt-secret-!".into()));
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("key-one") && !debug.contains("jwt-secret-jwt"),
            "{debug}"
        );
        assert!(debug.contains("queue_capacity"));
    }

    #[test]
    fn rejects_unusable_jwt_settings() {
        use crate::auth::KeyError;
        let jwt = |config: Config| config.jwt_secret(Some("s".repeat(32)));
        assert_eq!(jwt(Config::default()).validate(), Ok(()));
        assert_eq!(
            Config::default()
                .jwt_secret(Some("s".repeat(31)))
                .validate(),
            Err(ConfigError::Jwt(KeyError::ShortSecret))
        );
        assert_eq!(
            jwt(Config::default().jwt_leeway(Duration::from_secs(3601))).validate(),
            Err(ConfigError::Jwt(KeyError::LeewayTooLong))
        );
        let private = include_str!("../tests/fixtures/jwt/es256-private.pem");
        assert_eq!(
            Config::default()
                .jwt_public_key(Some(private.into()))
                .validate(),
            Err(ConfigError::Jwt(KeyError::PrivateKey))
        );
        assert_eq!(
            Config::default()
                .jwt_public_key(Some("not a key".into()))
                .validate(),
            Err(ConfigError::Jwt(KeyError::BadPublicKey))
        );
        let public = include_str!("../tests/fixtures/jwt/es256-public.pem");
        assert_eq!(
            Config::default()
                .jwt_public_key(Some(public.into()))
                .validate(),
            Ok(())
        );
    }

    #[test]
    fn rejects_origins_that_can_never_match() {
        let config = Config::default()
            .allowed_origins(vec!["https://a.example".into(), "example.com".into()]);
        let err = config.validate().expect_err("no scheme");
        assert!(
            matches!(&err, ConfigError::InvalidOrigin { origin, .. } if origin == "example.com"),
            "{err}"
        );
        assert!(err.to_string().contains("\"example.com\""), "{err}");
    }

    #[test]
    fn redis_urls_need_a_scheme_and_passwords_stay_hidden() {
        let no_scheme = Config::default().redis(Some("127.0.0.1:6379".into()));
        let err = no_scheme.validate().expect_err("no scheme").to_string();
        assert!(err.contains("redis://host:port/"), "{err}");
        let with_password = Config::default().redis(Some("redis//:hunter2@host:6379".into()));
        let err = with_password.validate().expect_err("no scheme").to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert_eq!(
            redis_address("redis://:hunter2@10.1.2.3:6380/").as_deref(),
            Ok("10.1.2.3:6380")
        );
    }

    #[test]
    fn summary_names_the_modes_and_no_secret() {
        let config = Config::default()
            .api_keys(vec!["key-one".into()])
            .jwt_secret(Some("jwt-secret-jwt-secret-jwt-secret-!".into()))
            .redis(Some("redis://:hunter2@127.0.0.1:6379/".into()))
            .allowed_origins(vec!["https://a.example".into()]);
        let summary = config.summary().to_string();
        for part in [
            "clients=jwt (hmac secret)",
            "api=api-key (1 configured)",
            "metrics=like-api",
            "origins=same-host,https://a.example",
            "broker=redis(127.0.0.1:6379)",
            "queue_capacity=1024",
        ] {
            assert!(summary.contains(part), "{part} in {summary}");
        }
        for secret in ["key-one", "jwt-secret", "hunter2"] {
            assert!(!summary.contains(secret), "{secret} in {summary}");
        }
        let summary = Config::default().summary().to_string();
        assert!(
            summary.contains("clients=anonymous api=loopback-only"),
            "{summary}"
        );
        assert!(summary.contains("broker=memory"), "{summary}");
    }

    #[test]
    fn rejects_zero_and_inverted_timeouts() {
        assert_eq!(
            Config::default().queue_capacity(0).validate(),
            Err(ConfigError::Zero("queue-capacity"))
        );
        let config = Config::default()
            .ping_interval(Duration::from_secs(30))
            .idle_timeout(Duration::from_secs(30));
        assert!(matches!(
            config.validate(),
            Err(ConfigError::IdleNotAfterPing { .. })
        ));
        assert_eq!(
            Config::default().idempotency_keys(0).validate(),
            Err(ConfigError::Zero("idempotency-keys"))
        );
        assert_eq!(
            Config::default()
                .idempotency_window(Duration::ZERO)
                .validate(),
            Err(ConfigError::ZeroDuration("idempotency-window"))
        );
    }
}
