//! The WebSocket upgrade: checks the handshake and the query, replies `101`, and hands the
//! raw TCP stream to [`crate::connection::run`].

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderValue, SEC_WEBSOCKET_ACCEPT, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::Rng as _;
use tokio::net::TcpStream;

use super::{AppState, ConnectionSlot, HttpError};
use crate::connection::{self, Session};
use crate::name;
use crate::registry::Format;
use crate::ws::handshake;

/// Which WebSocket endpoint was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/ws`: subscriptions and the JSON protocol (or raw delivery).
    Notify,
    /// `/echo`: echoes every message.
    Echo,
}

/// Upgrades `req` to a WebSocket served by our own connection loop.
pub fn websocket(
    mut req: Request<Incoming>,
    state: &Arc<AppState>,
    slot: &ConnectionSlot,
    endpoint: Endpoint,
) -> Result<Response<Full<Bytes>>, HttpError> {
    let accept = handshake::validate(req.method(), req.version(), req.headers())?;
    let session = match endpoint {
        Endpoint::Notify => parse_query(req.uri().query().unwrap_or(""), &state.config)?,
        Endpoint::Echo => Session {
            client_id: Arc::from(random_client_id()),
            format: Format::Echo,
            channels: Vec::new(),
        },
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let permit = slot.lock().take();
    let broker = state.broker.clone();
    let max_message_bytes = state.config.max_message_bytes;
    // This task only waits for the upgrade; the connection gets a task of its own, so that
    // nothing of this one stays alive for the connection's lifetime.
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                tracing::debug!(%err, "upgrade did not complete");
                return;
            }
        };
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => connection::spawn(
                parts.io.into_inner(),
                &parts.read_buf,
                &broker,
                max_message_bytes,
                session,
                permit,
            ),
            Err(_) => tracing::error!("upgraded connection is not a TCP stream"),
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    Ok(response)
}

/// Reads `channels`, `client_id` and `format` from the `/ws` query. Unknown parameters are
/// ignored, so clients may add their own (a cache buster, say).
///
/// # Errors
/// The first invalid parameter, as an [`HttpError`] (all of them answer `400`).
pub fn parse_query(query: &str, config: &crate::config::Config) -> Result<Session, HttpError> {
    let mut channels: Vec<String> = Vec::new();
    let mut client_id = None;
    let mut format = Format::Json;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "channels" => {
                for channel in value.split(',').filter(|c| !c.is_empty()) {
                    name::validate(channel).map_err(HttpError::InvalidChannel)?;
                    if !channels.iter().any(|c| c == channel) {
                        if channels.len() == config.max_subscriptions {
                            return Err(HttpError::TooManySubscriptions(config.max_subscriptions));
                        }
                        channels.push(channel.to_owned());
                    }
                }
            }
            "client_id" => {
                name::validate(&value).map_err(HttpError::InvalidClientId)?;
                client_id = Some(value.into_owned());
            }
            "format" => {
                format = match &*value {
                    "json" => Format::Json,
                    "raw" => Format::Raw,
                    _ => {
                        return Err(HttpError::InvalidQuery(
                            "format must be json or raw".to_owned(),
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    if format == Format::Raw && channels.len() != 1 {
        return Err(HttpError::InvalidQuery(
            "format=raw needs exactly one channel".to_owned(),
        ));
    }
    Ok(Session {
        client_id: Arc::from(client_id.unwrap_or_else(random_client_id)),
        format,
        channels,
    })
}

/// A client id for clients that did not name themselves: `c-` and 16 random hex digits.
fn random_client_id() -> String {
    format!("c-{:016x}", rand::rng().random::<u64>())
}
