//! Herald: a lean real-time notification server.
//!
//! Backends publish over HTTP; browsers and apps hold WebSocket connections and get each
//! message within milliseconds. One slow client never holds up the others: every connection has
//! a bounded queue, and a connection whose queue overflows is dropped.
//!
//! # Layout
//! - [`server`]: the accept loop, connection limit and graceful shutdown.
//! - [`http`]: routing, the publish API and the WebSocket upgrade (hyper stops here).
//! - [`connection`]: one WebSocket connection's read loop and vectored write path.
//! - [`sse`]: Server-Sent Events streams (`/sse`): the response body that pulls a stream's
//!   frames from its outbox, and the event ids that resume every channel.
//! - [`ws`]: RFC 6455: handshake validation, the sans-IO frame codec, masking, close codes.
//! - [`broker`]: where messages go: the in-memory broker, or Redis in cluster mode (with each
//!   channel's stream and history kept in Redis).
//! - [`idempotency`]: `Idempotency-Key` rules, request fingerprints and the in-memory key store.
//! - [`registry`]: sharded connections, channel epochs, offsets and history, fan-out with
//!   exact catch-up from a position, and per-connection outboxes.
//! - [`protocol`]: the JSON protocol (client requests and server envelopes).
//! - [`auth`]: JWT verification for clients and the channel patterns a token grants.
//! - [`rate`]: the per-connection publish rate limit.
//! - [`name`]: channel name and client id rules.
//! - [`metrics`]: Prometheus metrics for `/metrics`.
//! - [`config`]: every limit, with its default and the reason for it.

pub mod auth;
pub mod broker;
pub mod config;
pub mod connection;
pub mod error;
pub mod http;
pub mod idempotency;
pub mod metrics;
pub mod name;
pub mod protocol;
pub mod rate;
pub mod registry;
pub mod server;
pub mod sse;
pub mod ws;

pub use config::Config;
pub use error::{Error, Result};
