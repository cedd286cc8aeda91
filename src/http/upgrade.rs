//! The WebSocket upgrade: checks the handshake and the query, replies `101`, and hands the
//! raw TCP stream to [`crate::connection::run`]. [`admit`] admits `/sse` streams the same way.

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
use crate::registry::{Epoch, Format, Position, Recovery};
use crate::ws::handshake;

/// Which subscriber endpoint was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/ws`: subscriptions and the JSON protocol (or raw delivery).
    Notify,
    /// `/echo`: echoes every message.
    Echo,
    /// `/sse`: a Server-Sent Events stream (no upgrade, the same admission as `/ws`).
    Events,
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
    let permit = slot.take_permit();
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
/// auth is on), the query, the channels the token grants and, for a raw client, that its
/// positions can be recovered. Returns the session the connection would run.
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
        Endpoint::Notify | Endpoint::Events => {
            parse_subscriber_query(query, &state.config, endpoint)?
        }
        Endpoint::Echo => {
            check_echo_query(query)?;
            Session {
                client_id: Arc::from(random_client_id()),
                format: Format::Echo,
                channels: Vec::new(),
                since: Vec::new(),
                auth: None,
            }
        }
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
    // A raw client cannot be told in a frame that its position was not recovered: it is told
    // here, before the upgrade, when the node can tell without asking Redis (memory mode; in
    // cluster mode it learns it from the close frame).
    if session.format == Format::Raw {
        for (channel, position) in &session.since {
            let Some(standing) = state.broker.standing_now(channel, Some(*position)) else {
                continue;
            };
            if let Recovery::Failed(failure) = standing.recovery {
                return Err(HttpError::NotRecovered {
                    channel: channel.clone(),
                    failure,
                    epoch: standing.epoch,
                    offset: standing.offset,
                });
            }
        }
    }
    Ok(session)
}

/// The query parameters `/ws` takes; any other is refused, so that a misspelt one
/// (`?chanels=news`) is an error instead of a connection that silently gets nothing.
const WS_PARAMETERS: &str = "channels, client_id, format, since, token";
/// The query parameters `/sse` takes, by the same rule.
const SSE_PARAMETERS: &str = "channels, client_id, last_event_id, token";

/// Reads `channels`, `client_id` and `format` from the `/ws` query; `token` is read by the
/// auth check, when auth is on (and ignored otherwise). `channels` may be given more than
/// once (the lists add up); the others at most once.
///
/// # Errors
/// The first invalid, unknown or repeated parameter, as an [`HttpError`] (all of them answer
/// `400`).
pub fn parse_query(query: &str, config: &crate::config::Config) -> Result<Session, HttpError> {
    parse_subscriber_query(query, config, Endpoint::Notify)
}

/// [`parse_query`] for `/ws` or `/sse`: a stream takes `channels`, `client_id` and `token` the
/// same way, and `last_event_id` (read by the stream) instead of `format` and `since`.
fn parse_subscriber_query(
    query: &str,
    config: &crate::config::Config,
    endpoint: Endpoint,
) -> Result<Session, HttpError> {
    let stream = endpoint == Endpoint::Events;
    let mut channels: Vec<String> = Vec::new();
    let mut client_id = None;
    let mut format = None;
    let mut token = false;
    let mut since = None;
    let mut last_event_id = false;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let repeated = match &*key {
            "client_id" => client_id.is_some(),
            "format" if !stream => format.is_some(),
            "since" if !stream => since.is_some(),
            "last_event_id" if stream => std::mem::replace(&mut last_event_id, true),
            "token" => std::mem::replace(&mut token, true),
            _ => false,
        };
        if repeated {
            return Err(HttpError::InvalidQuery(format!(
                "query parameter {key:?} is given more than once"
            )));
        }
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
            "format" if !stream => {
                format = Some(match &*value {
                    "json" => Format::Json,
                    "raw" => Format::Raw,
                    _ => {
                        return Err(HttpError::InvalidQuery(
                            "format must be json or raw".to_owned(),
                        ));
                    }
                });
            }
            "since" if !stream => since = Some(parse_positions(&value)?),
            "last_event_id" if stream => {}
            "token" => {}
            _ if stream => return Err(unknown_parameter(&key, SSE_PARAMETERS)),
            _ => return Err(unknown_parameter(&key, WS_PARAMETERS)),
        }
    }
    let format = format.unwrap_or(Format::Json);
    let since = since.unwrap_or_default();
    if let Some((channel, _)) = since
        .iter()
        .find(|(channel, _)| !channels.iter().any(|c| c == channel))
    {
        return Err(HttpError::InvalidQuery(format!(
            "since names channel {channel:?}, which is not in channels"
        )));
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
        since,
        auth: None,
    })
}

/// Reads `since=<channel>:<epoch>:<offset>,…`: the position (epoch and the offset of the last
/// message the client has) to recover each channel from. Channel names may hold `:`, epochs
/// and offsets never do, so both are taken from the right.
///
/// # Errors
/// [`HttpError::InvalidQuery`] naming the first entry that is not of that form, and for a
/// channel named twice.
pub fn parse_positions(value: &str) -> Result<Vec<(String, Position)>, HttpError> {
    let invalid = |entry: &str| {
        HttpError::InvalidQuery(format!(
            "since entry {entry:?} is not <channel>:<epoch>:<offset> (the epoch and offset of \
             the last message you have, from a welcome, subscribed or message frame)"
        ))
    };
    let mut positions: Vec<(String, Position)> = Vec::new();
    for entry in value.split(',') {
        let mut parts = entry.rsplitn(3, ':');
        let (Some(offset), Some(epoch), Some(channel)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid(entry));
        };
        name::validate(channel).map_err(HttpError::InvalidChannel)?;
        let digits = !offset.is_empty() && offset.bytes().all(|b| b.is_ascii_digit());
        let position = match (Epoch::parse(epoch), offset.parse::<u64>()) {
            (Some(epoch), Ok(offset)) if digits => Position { epoch, offset },
            _ => return Err(invalid(entry)),
        };
        if positions.iter().any(|(known, _)| known == channel) {
            return Err(HttpError::InvalidQuery(format!(
                "since names channel {channel:?} more than once"
            )));
        }
        positions.push((channel.to_owned(), position));
    }
    Ok(positions)
}

/// `/echo` takes only `token` (when auth is on; ignored otherwise).
fn check_echo_query(query: &str) -> Result<(), HttpError> {
    let mut tokens = 0;
    for (key, _) in form_urlencoded::parse(query.as_bytes()) {
        if key != "token" {
            return Err(unknown_parameter(&key, "token"));
        }
        tokens += 1;
        if tokens > 1 {
            return Err(HttpError::InvalidQuery(
                "query parameter \"token\" is given more than once".to_owned(),
            ));
        }
    }
    Ok(())
}

fn unknown_parameter(key: &str, accepted: &str) -> HttpError {
    HttpError::InvalidQuery(format!(
        "unknown query parameter {key:?} (accepted: {accepted})"
    ))
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
