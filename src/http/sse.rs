//! `GET /sse`: a Server-Sent Events stream (see [`crate::sse`]). Admitted like a `/ws` upgrade
//! (token, query, channel grants, origin), then answered `200 text/event-stream` with a body
//! that streams the subscriber's events until it ends.
//!
//! A last event id, from `Last-Event-ID` (which a browser's `EventSource` sends by itself when
//! it reconnects) or else `?last_event_id=` (for a client that opens a new stream itself, say
//! with a fresh token), resumes every channel from where that event left it; an empty one counts
//! as none. An id this server did not send, or one from a stream of other channels (other names,
//! or another order), is refused with `400 invalid_last_event_id`: applied to the wrong channels
//! it could only fail, and a client that changed its channels on purpose can leave it out.
//!
//! Cross-origin pages may read a stream when their origin is allowed by the rule for WebSocket
//! upgrades (`--allowed-origins`): the reply names it in `Access-Control-Allow-Origin`. A
//! preflight (`OPTIONS /sse`, which a fetch-based client sending `Authorization` or
//! `Last-Event-ID` makes) is answered by the same rule.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_MAX_AGE, ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue,
    VARY,
};
use hyper::{Method, Request, Response, StatusCode};

use super::body::ResponseBody;
use super::upgrade::{self, Endpoint};
use super::{AppState, HttpError, access};
use crate::sse::event_id::{EventId, EventIdError};
use crate::sse::{EventStream, Opening, Watch};

/// The header `EventSource` resends with the id of the last event it got.
const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");
/// Tells nginx not to buffer the stream (it would hold events back).
const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");
/// The methods `/sse` answers.
const METHODS: &str = "GET, OPTIONS";

/// Answers a request for `/sse`.
///
/// # Errors
/// The [`HttpError`] the stream is refused with.
pub async fn respond(
    req: &Request<Incoming>,
    state: &AppState,
    watch: &Watch,
) -> Result<Response<ResponseBody>, HttpError> {
    let origin = access::cors_origin(req.headers(), &state.config.allowed_origins)?;
    match *req.method() {
        Method::GET => {}
        Method::OPTIONS => return Ok(preflight(origin)),
        _ => return Err(HttpError::MethodNotAllowed { allow: METHODS }),
    }
    let query = req.uri().query().unwrap_or("");
    let session = upgrade::admit(state, req.headers(), query, Endpoint::Events)?;
    let since = match last_event_id(req.headers(), query)? {
        Some(id) => Some(
            id.positions_for(&session.channels)
                .map_err(HttpError::InvalidLastEventId)?,
        ),
        None => None,
    };
    let broker = &state.broker;
    // Cluster mode: other nodes' messages for the stream reach this node from its welcome on.
    let _hold = Box::pin(broker.hold_for(&session.channels, &session.client_id)).await;
    let stream = EventStream::open(
        broker,
        Opening {
            client_id: session.client_id,
            channels: session.channels,
            since,
            expires_in: session.auth.map(|auth| auth.grant.expires_in()),
        },
        watch,
    )
    .await;
    let mut response = Response::new(ResponseBody::Events(Box::new(stream)));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
    allow_origin(headers, origin);
    Ok(response)
}

/// The last event id the client gave: the header, or else the query parameter.
fn last_event_id(headers: &HeaderMap, query: &str) -> Result<Option<EventId>, HttpError> {
    let text = match headers.get(LAST_EVENT_ID) {
        Some(value) if !value.is_empty() => value
            .to_str()
            .map_err(|_| {
                HttpError::InvalidLastEventId(EventIdError::Malformed("it is not ASCII text"))
            })?
            .to_owned(),
        _ => form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == "last_event_id")
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default(),
    };
    if text.is_empty() {
        return Ok(None);
    }
    EventId::parse(&text)
        .map(Some)
        .map_err(HttpError::InvalidLastEventId)
}

/// The answer to a CORS preflight for an allowed origin (or a plain `OPTIONS`).
fn preflight(origin: Option<HeaderValue>) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::from(Full::new(Bytes::new())));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(ALLOW, HeaderValue::from_static(METHODS));
    if origin.is_some() {
        headers.insert(
            ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET"),
        );
        headers.insert(
            ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, last-event-id"),
        );
        headers.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    }
    allow_origin(headers, origin);
    response
}

/// Names an allowed origin in the reply; the reply depends on `Origin` either way.
fn allow_origin(headers: &mut HeaderMap, origin: Option<HeaderValue>) {
    headers.insert(VARY, HeaderValue::from_static("origin"));
    if let Some(origin) = origin {
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
}
