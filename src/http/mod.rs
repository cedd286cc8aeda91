//! The HTTP side of Herald: routing, the publish API, and the WebSocket upgrade.
//!
//! | route | method | what |
//! |---|---|---|
//! | `/` | GET | the demo page |
//! | `/favicon.ico` | GET | the demo page's icon |
//! | `/demo/check` | POST | why the demo page's WebSocket would be refused (see `demo`) |
//! | `/healthz` | GET | `ok` while the server runs |
//! | `/readyz` | GET | ready to take publishes (in cluster mode: subscribed in Redis) |
//! | `/ws` | GET | WebSocket for subscribers (`channels`, `client_id`, `format`, `token` query) |
//! | `/sse` | GET | Server-Sent Events for subscribers (`channels`, `client_id`, `last_event_id`, `token` query) |
//! | `/echo` | GET | WebSocket that echoes every message (conformance testing) |
//! | `/api/publish/{channel}` | POST | publish the body to a channel |
//! | `/api/send/{client_id}` | POST | send the body to every connection of a client |
//! | `/api/broadcast` | POST | send the body to every connection |
//! | `/api/history/{channel}` | GET | the channel's stored messages (`since`, `epoch`, `limit`) |
//! | `/api/channels` | GET | channels with subscribers |
//! | `/api/stats` | GET | connection and delivery counters |
//! | `/metrics` | GET | Prometheus metrics |
//!
//! `/api/*` and `/metrics` need an API key when keys are configured, and a loopback client that
//! did not come through a proxy otherwise (`--public-metrics` opens `/metrics`); a WebSocket
//! upgrade (or `/sse` stream) from a browser must come from an allowed origin (see `access`),
//! and `/ws` and `/sse` need a client token when a JWT key is configured (see [`crate::auth`]).
//!
//! Every route answers with a whole body but `/sse`, whose body streams (see `body`).

mod access;
mod api;
mod body;
mod demo;
mod error;
mod sse;
mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use parking_lot::Mutex;
use tokio::sync::OwnedSemaphorePermit;

use crate::auth::Verifier;
use crate::broker::Broker;
use crate::config::Config;
use crate::sse::Watch;

pub use access::parse_allowed_origin;
pub use api::{HISTORY_PAGE_MAX, decode_segment, parse_history_query};
pub use body::{Chunk, ResponseBody};
pub use error::{HttpError, MAX_HEADER_BYTES, MAX_URI_BYTES, json_response};
pub use upgrade::parse_query;

/// What every request handler needs.
#[derive(Debug)]
pub struct AppState {
    /// Where publishes go (the registry itself, or the Redis backplane in cluster mode), and
    /// the registry of this node's connections.
    pub broker: Broker,
    /// The server's configuration.
    pub config: Config,
    /// Checks client tokens; `None` when clients are anonymous (no `--jwt-*` key).
    pub verifier: Option<Arc<Verifier>>,
}

/// One TCP connection's share of the server, for its whole life: its permit under the
/// connection limit, and the watch on the `/sse` stream its response carries.
#[derive(Debug)]
pub struct Slot {
    /// The HTTP connection holds it; an upgrade takes it out and moves it into the WebSocket
    /// task, so the limit counts each socket once for its whole life.
    permit: Mutex<Option<OwnedSemaphorePermit>>,
    /// Polled by the connection's task next to hyper (see [`Watch`]).
    stream: Watch,
}

impl Slot {
    /// The slot of a connection that holds `permit`.
    pub fn new(permit: OwnedSemaphorePermit) -> Self {
        Self {
            permit: Mutex::new(Some(permit)),
            stream: Watch::default(),
        }
    }

    /// Takes the permit out, for a connection that moves to a task of its own (an upgrade).
    pub fn take_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.permit.lock().take()
    }

    /// The watch on the connection's `/sse` stream.
    pub fn stream(&self) -> &Watch {
        &self.stream
    }
}

/// The [`Slot`] of one TCP connection, shared by its task and its requests.
pub type ConnectionSlot = Arc<Slot>;

/// Answers one HTTP request.
pub async fn handle(
    req: Request<Incoming>,
    state: Arc<AppState>,
    slot: ConnectionSlot,
    peer: SocketAddr,
) -> Response<ResponseBody> {
    let answer = match check_head_size(&req) {
        Ok(()) if req.uri().path() == "/sse" => return respond_sse(&req, &state, &slot).await,
        Ok(()) => route(req, &state, &slot, peer).await,
        Err(err) => Err(err),
    };
    answer
        .unwrap_or_else(HttpError::into_response)
        .map(ResponseBody::Whole)
}

/// `/sse`, the one route whose body streams. Boxed: every request's future (a WebSocket
/// upgrade's too) would otherwise have room for a stream's admission.
async fn respond_sse(
    req: &Request<Incoming>,
    state: &AppState,
    slot: &Slot,
) -> Response<ResponseBody> {
    Box::pin(sse::respond(req, state, slot.stream()))
        .await
        .unwrap_or_else(|err| err.into_response().map(ResponseBody::Whole))
}

async fn route(
    req: Request<Incoming>,
    state: &Arc<AppState>,
    slot: &ConnectionSlot,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, HttpError> {
    let path = req.uri().path().to_owned();
    let operator_route =
        path.starts_with("/api/") || (path == "/metrics" && !state.config.public_metrics);
    if operator_route {
        access::check_publisher(req.headers(), peer, &state.config.api_keys)?;
    } else if path == "/ws" || path == "/echo" {
        access::check_origin(req.headers(), &state.config.allowed_origins)?;
    }
    let method = req.method().clone();
    let allow = |expected: &Method, allow: &'static str| {
        if method == *expected {
            Ok(())
        } else {
            Err(HttpError::MethodNotAllowed { allow })
        }
    };
    match path.as_str() {
        "/" | "/favicon.ico" | "/demo/check" => demo::route(&req, state),
        "/healthz" => {
            allow(&Method::GET, "GET")?;
            Ok(text_response("text/plain; charset=utf-8", "ok"))
        }
        "/readyz" => {
            allow(&Method::GET, "GET")?;
            state.broker.readiness()?;
            Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({"status": "ready"}),
            ))
        }
        "/ws" => upgrade::websocket(req, state, slot, upgrade::Endpoint::Notify),
        "/echo" => upgrade::websocket(req, state, slot, upgrade::Endpoint::Echo),
        "/api/channels" => {
            allow(&Method::GET, "GET")?;
            Ok(api::channels(state))
        }
        "/metrics" => {
            allow(&Method::GET, "GET")?;
            Ok(text_response(
                "text/plain; version=0.0.4; charset=utf-8",
                state.broker.registry().render_metrics(),
            ))
        }
        "/api/stats" => {
            allow(&Method::GET, "GET")?;
            Ok(json_response(
                StatusCode::OK,
                &state.broker.registry().stats(),
            ))
        }
        "/api/broadcast" => {
            allow(&Method::POST, "POST")?;
            api::broadcast(req, state).await
        }
        _ => {
            if let Some(channel) = path.strip_prefix("/api/publish/") {
                allow(&Method::POST, "POST")?;
                api::publish(req, state, channel).await
            } else if let Some(channel) = path.strip_prefix("/api/history/") {
                allow(&Method::GET, "GET")?;
                api::history(&req, state, channel).await
            } else if let Some(client_id) = path.strip_prefix("/api/send/") {
                allow(&Method::POST, "POST")?;
                api::send(req, state, client_id).await
            } else {
                Err(HttpError::NotFound)
            }
        }
    }
}

/// Refuses request heads over our limits with a JSON reply. (hyper itself answers heads larger
/// than its read buffer, [`crate::server::MAX_REQUEST_HEAD`], with an empty `414`/`431`.)
fn check_head_size<B>(req: &Request<B>) -> Result<(), HttpError> {
    let uri_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if uri_len > MAX_URI_BYTES {
        return Err(HttpError::UriTooLong);
    }
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Err(HttpError::HeadersTooLarge);
    }
    Ok(())
}

fn text_response(content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
