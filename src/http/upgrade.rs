//! The WebSocket upgrade: checks the handshake and the query, replies `101`, and hands the
//! raw TCP stream to [`crate::connection::run`].

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    AUTHORIZATION, CONNECTION, HeaderMap, HeaderValue, SEC_WEBSOCKET_ACCEPT, UPGRADE,
};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::Rng as _;
use tokio::net::TcpStream;

use super::{AppState, ConnectionSlot, HttpError};
use crate::auth::{AuthError, ClientAuth, Verifier};
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
    let query = req.uri().query().unwrap_or("");
    let session = admit(state, req.headers(), query, endpoint)?;
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
        // Cluster mode: other nodes' messages for this connection reach this node from its
        // welcome frame on.
        let _hold = match session.format {
            Format::Echo => None,
            // Boxed: the wait is cluster-only, and this task's size is paid per handshake.
            _ => Box::pin(broker.hold_for(&session.channels, &session.client_id)).await,
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

/// Checks what a WebSocket client asks for, past the handshake itself: its token (when JWT
/// auth is on) and, on `/ws`, the query and the channels the token grants. Returns the
/// session the connection would run.
///
/// # Errors
/// The [`HttpError`] the upgrade is refused with.
pub fn admit(
    state: &AppState,
    headers: &HeaderMap,
    query: &str,
    endpoint: Endpoint,
) -> Result<Session, HttpError> {
    // With auth on, the token is checked first (a client without one learns that, not what
    // else is wrong), and nobody holds a connection without one, echo included.
    let auth = match &state.verifier {
        Some(verifier) => Some(authenticate(verifier, headers, query)?),
        None => None,
    };
    let mut session = match endpoint {
        Endpoint::Notify => parse_query(query, &state.config)?,
        Endpoint::Echo => Session {
            client_id: Arc::from(random_client_id()),
            format: Format::Echo,
            channels: Vec::new(),
            auth: None,
        },
    };
    if let Some(auth) = auth {
        if let Some(forbidden) = session
            .channels
            .iter()
            .find(|channel| !auth.grant.subscribe.matches(channel))
        {
            return Err(HttpError::ChannelForbidden(forbidden.clone()));
        }
        session.client_id = Arc::clone(&auth.grant.subject);
        session.auth = Some(auth);
    }
    Ok(session)
}

/// Reads `channels`, `client_id` and `format` from the `/ws` query. Unknown parameters are
/// ignored, so clients may add their own (a cache buster, say); `token` is read by the auth
/// check, when auth is on.
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
        auth: None,
    })
}

/// Verifies the client's token (`Authorization: Bearer` first, then `?token=`). Runs before
/// the upgrade, so a refused client costs no registry entry.
fn authenticate(
    verifier: &Arc<Verifier>,
    headers: &HeaderMap,
    query: &str,
) -> Result<Box<ClientAuth>, HttpError> {
    let token = bearer_token(headers)
        .map(str::to_owned)
        .or_else(|| query_token(query))
        .ok_or(HttpError::Token(AuthError::Missing))?;
    let grant = verifier.verify(&token).map_err(HttpError::Token)?;
    Ok(Box::new(ClientAuth {
        verifier: Arc::clone(verifier),
        grant,
    }))
}

/// The token of an `Authorization: Bearer <token>` header, if there is one.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The `token` query parameter (browsers cannot set headers on a WebSocket).
fn query_token(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "token")
        .map(|(_, token)| token.into_owned())
}

/// A client id for clients that did not name themselves: `c-` and 16 random hex digits.
fn random_client_id() -> String {
    format!("c-{:016x}", rand::rng().random::<u64>())
}
