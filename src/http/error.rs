//! Every way an HTTP request can fail, and the JSON reply each one gets.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{
    ALLOW, CONTENT_TYPE, HeaderValue, RETRY_AFTER, SEC_WEBSOCKET_VERSION, WWW_AUTHENTICATE,
};
use hyper::{Response, StatusCode};

use crate::auth::AuthError;
use crate::broker::BrokerError;
use crate::idempotency::KeyError;
use crate::name::NameError;
use crate::protocol::PayloadError;
use crate::registry::{Epoch, RecoveryFailure};
use crate::sse::event_id::EventIdError;
use crate::ws::handshake::HandshakeError;

/// A failed HTTP request. Each variant maps to one status code and one stable error code; the
/// reply body is `{"error":<code>,"message":<Display text>}`.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No route has this path.
    #[error("no such route")]
    NotFound,
    /// The route exists but not for this method; `allow` lists the ones it takes.
    #[error("method not allowed (allowed: {allow})")]
    MethodNotAllowed {
        /// The value of the `Allow` header.
        allow: &'static str,
    },
    /// The WebSocket upgrade request is malformed.
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
    /// A query parameter of the upgrade request is invalid.
    #[error("{0}")]
    InvalidQuery(String),
    /// An `/sse` request's last event id (`Last-Event-ID` or `?last_event_id=`) is not one
    /// this server sent, or is for other channels than `channels=`.
    #[error("{0}")]
    InvalidLastEventId(EventIdError),
    /// A channel name in the path or query breaks the naming rules.
    #[error("invalid channel name: {0}")]
    InvalidChannel(NameError),
    /// A client id in the path or query breaks the naming rules.
    #[error("invalid client id: {0}")]
    InvalidClientId(NameError),
    /// More channels were asked for on connect than `--max-subscriptions` allows.
    #[error("too many channels (limit {0})")]
    TooManySubscriptions(usize),
    /// The body is larger than `--max-message-bytes`.
    #[error("body larger than {limit} bytes")]
    PayloadTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The body was declared `application/json` but is not one JSON value.
    #[error("{0}")]
    InvalidJson(String),
    /// The body did not arrive within `--handshake-timeout`.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// The body could not be read (the client went away or sent a broken chunked body).
    #[error("could not read the request body")]
    BodyRead,
    /// No connection has the client id of a direct send.
    #[error("no connection has client id {0:?}")]
    ClientNotFound(String),
    /// The request target is longer than [`MAX_URI_BYTES`].
    #[error("request target longer than {MAX_URI_BYTES} bytes")]
    UriTooLong,
    /// The request headers add up to more than [`MAX_HEADER_BYTES`].
    #[error("request headers larger than {MAX_HEADER_BYTES} bytes")]
    HeadersTooLarge,
    /// `/api/*` without the right `Authorization: Bearer` key (keys are configured).
    #[error("a valid API key is required: Authorization: Bearer <key>")]
    Unauthorized,
    /// `/api/*` (or `/metrics`) from a client that is not on a loopback address, or that came
    /// through a proxy (`Forwarded`, `X-Forwarded-For`, `X-Real-IP`), while no API key is
    /// configured.
    #[error(
        "without --api-key this route answers only clients on the server's own machine that \
         did not come through a proxy; start the server with --api-key and send \
         Authorization: Bearer <key>"
    )]
    PublisherNotLocal,
    /// A `/ws` upgrade without a valid token while JWT auth is configured.
    #[error("{0}")]
    Token(AuthError),
    /// A `/ws` upgrade asks (`?channels=`) for a channel its token does not grant.
    #[error("the token does not grant channel {0:?}")]
    ChannelForbidden(String),
    /// A WebSocket upgrade from a browser origin that is not allowed.
    #[error("origin not allowed (see --allowed-origins)")]
    OriginNotAllowed,
    /// The server is shutting down.
    #[error("server is shutting down")]
    ShuttingDown,
    /// Cluster mode, and Redis is down: the message would go nowhere.
    #[error("{0}")]
    BrokerUnavailable(String),
    /// A position (`?since=` of a raw connection, or `/api/history`'s `since` and `epoch`)
    /// that the channel's history cannot continue from. The reply says where the channel
    /// stands, so the client can reload and go on from there.
    #[error(
        "channel {channel:?} cannot continue from that position ({}): it is now at epoch \
         {epoch}, offset {offset}; reload its state and go on from there",
        failure.code()
    )]
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
    /// The `Idempotency-Key` header breaks the key rules.
    #[error(
        "{0}; an Idempotency-Key is 1 to 128 visible ASCII characters (! to ~, no spaces), \
         sent once"
    )]
    InvalidIdempotencyKey(KeyError),
    /// The `Idempotency-Key` was used within the window for a different request (another
    /// content type or body) to the same route and target.
    #[error(
        "Idempotency-Key {0:?} was used for a different request (another content type or \
         body) to this route and target within --idempotency-window; use a new key for a new \
         request"
    )]
    IdempotencyKeyReused(String),
}

impl From<PayloadError> for HttpError {
    fn from(err: PayloadError) -> Self {
        HttpError::InvalidJson(err.to_string())
    }
}

impl From<BrokerError> for HttpError {
    fn from(err: BrokerError) -> Self {
        match err {
            BrokerError::ShuttingDown => HttpError::ShuttingDown,
            BrokerError::Unavailable(_) => HttpError::BrokerUnavailable(err.to_string()),
            BrokerError::NotRecovered {
                channel,
                failure,
                epoch,
                offset,
            } => HttpError::NotRecovered {
                channel,
                failure,
                epoch,
                offset,
            },
        }
    }
}

/// The longest request target (path and query) answered; longer ones get `414`.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// The most header bytes (names and values) answered; more get `431`.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

impl HttpError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            HttpError::NotFound | HttpError::ClientNotFound(_) => StatusCode::NOT_FOUND,
            HttpError::MethodNotAllowed { .. }
            | HttpError::Handshake(HandshakeError::MethodNotGet) => StatusCode::METHOD_NOT_ALLOWED,
            HttpError::Handshake(HandshakeError::UnsupportedVersion) => {
                StatusCode::UPGRADE_REQUIRED
            }
            HttpError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            HttpError::UriTooLong => StatusCode::URI_TOO_LONG,
            HttpError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            HttpError::Unauthorized | HttpError::Token(_) => StatusCode::UNAUTHORIZED,
            HttpError::PublisherNotLocal
            | HttpError::OriginNotAllowed
            | HttpError::ChannelForbidden(_) => StatusCode::FORBIDDEN,
            HttpError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HttpError::IdempotencyKeyReused(_) => StatusCode::CONFLICT,
            HttpError::ShuttingDown | HttpError::BrokerUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            HttpError::NotRecovered { .. } => StatusCode::CONFLICT,
            HttpError::Handshake(_)
            | HttpError::InvalidQuery(_)
            | HttpError::InvalidLastEventId(_)
            | HttpError::InvalidChannel(_)
            | HttpError::InvalidClientId(_)
            | HttpError::TooManySubscriptions(_)
            | HttpError::InvalidJson(_)
            | HttpError::InvalidIdempotencyKey(_)
            | HttpError::BodyRead => StatusCode::BAD_REQUEST,
        }
    }

    /// The stable, machine-readable error code.
    pub fn code(&self) -> &'static str {
        match self {
            HttpError::NotFound => "not_found",
            HttpError::MethodNotAllowed { .. } => "method_not_allowed",
            HttpError::Handshake(HandshakeError::MethodNotGet) => "method_not_allowed",
            HttpError::Handshake(HandshakeError::UnsupportedVersion) => "unsupported_version",
            HttpError::Handshake(HandshakeError::NotUpgrade) => "not_websocket_upgrade",
            HttpError::Handshake(_) => "invalid_handshake",
            HttpError::InvalidQuery(_) => "invalid_query",
            HttpError::InvalidLastEventId(_) => "invalid_last_event_id",
            HttpError::InvalidChannel(_) => "invalid_channel",
            HttpError::InvalidClientId(_) => "invalid_client_id",
            HttpError::TooManySubscriptions(_) => "too_many_subscriptions",
            HttpError::PayloadTooLarge { .. } => "payload_too_large",
            HttpError::InvalidJson(_) => "invalid_json",
            HttpError::BodyRead => "body_read_error",
            HttpError::ClientNotFound(_) => "client_not_found",
            HttpError::UriTooLong => "uri_too_long",
            HttpError::RequestTimeout => "request_timeout",
            HttpError::Unauthorized => "unauthorized",
            HttpError::PublisherNotLocal => "publisher_not_local",
            HttpError::OriginNotAllowed => "origin_not_allowed",
            HttpError::Token(err) => err.code(),
            HttpError::ChannelForbidden(_) => "forbidden",
            HttpError::HeadersTooLarge => "headers_too_large",
            HttpError::ShuttingDown => "shutting_down",
            HttpError::BrokerUnavailable(_) => "broker_unavailable",
            HttpError::NotRecovered { failure, .. } => failure.code(),
            HttpError::InvalidIdempotencyKey(_) => "invalid_idempotency_key",
            HttpError::IdempotencyKeyReused(_) => "idempotency_key_reused",
        }
    }

    /// The JSON reply.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut body = serde_json::json!({ "error": self.code(), "message": self.to_string() });
        if let HttpError::NotRecovered {
            channel,
            epoch,
            offset,
            ..
        } = &self
        {
            body["channel"] = channel.as_str().into();
            body["epoch"] = epoch.as_str().into();
            body["offset"] = (*offset).into();
        }
        let mut response = json_response(self.status(), &body);
        let headers = response.headers_mut();
        match self {
            HttpError::MethodNotAllowed { allow } => {
                headers.insert(ALLOW, HeaderValue::from_static(allow));
            }
            HttpError::Handshake(HandshakeError::MethodNotGet) => {
                headers.insert(ALLOW, HeaderValue::from_static("GET"));
            }
            HttpError::Handshake(HandshakeError::UnsupportedVersion) => {
                headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            }
            HttpError::Unauthorized => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            HttpError::Token(_) => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer error="invalid_token""#),
                );
            }
            HttpError::BrokerUnavailable(_) => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// A reply with a JSON body.
pub fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).expect("our reply types always serialize");
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
