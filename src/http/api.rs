//! The publish API used by backends: publish, direct send, broadcast, and channel listing.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::{AppState, HttpError, json_response};
use crate::config::Config;
use crate::name;
use crate::protocol::Payload;

/// `POST /api/publish/{channel}`.
pub async fn publish(
    req: Request<Incoming>,
    state: &Arc<AppState>,
    channel: &str,
) -> Result<Response<Full<Bytes>>, HttpError> {
    let channel = decode_segment(channel);
    name::validate(&channel).map_err(HttpError::InvalidChannel)?;
    let (body, declared_json) = read_body(req, &state.config).await?;
    let payload = Payload::from_body(&body, declared_json)?;
    let published = state.broker.publish(&channel, None, payload).await?;
    let mut reply = json!({"channel": channel, "offset": published.offset});
    reply[published.reach.field("subscribers")] = published.reach.count().into();
    Ok(json_response(StatusCode::OK, &reply))
}

/// `POST /api/send/{client_id}`.
pub async fn send(
    req: Request<Incoming>,
    state: &Arc<AppState>,
    client_id: &str,
) -> Result<Response<Full<Bytes>>, HttpError> {
    let client_id = decode_segment(client_id);
    name::validate(&client_id).map_err(HttpError::InvalidClientId)?;
    let (body, declared_json) = read_body(req, &state.config).await?;
    let payload = Payload::from_body(&body, declared_json)?;
    let reach = state.broker.send_to(&client_id, None, payload).await?;
    if reach.count() == 0 {
        return Err(HttpError::ClientNotFound(client_id.into_owned()));
    }
    let mut reply = json!({"client_id": client_id});
    reply[reach.field("connections")] = reach.count().into();
    Ok(json_response(StatusCode::OK, &reply))
}

/// `POST /api/broadcast`.
pub async fn broadcast(
    req: Request<Incoming>,
    state: &Arc<AppState>,
) -> Result<Response<Full<Bytes>>, HttpError> {
    let (body, declared_json) = read_body(req, &state.config).await?;
    let payload = Payload::from_body(&body, declared_json)?;
    let reach = state.broker.broadcast(payload).await?;
    let mut reply = json!({});
    reply[reach.field("connections")] = reach.count().into();
    Ok(json_response(StatusCode::OK, &reply))
}

/// `GET /api/channels`.
pub fn channels(state: &AppState) -> Response<Full<Bytes>> {
    let channels: Vec<_> = state
        .broker
        .registry()
        .channels()
        .into_iter()
        .map(|(name, subscribers)| json!({"name": &*name, "subscribers": subscribers}))
        .collect();
    json_response(StatusCode::OK, &json!({ "channels": channels }))
}

/// Reads a request body of at most `--max-message-bytes`, within `--handshake-timeout`. A
/// `Content-Length` over the limit is refused before a byte of the body is read; a chunked body
/// is cut off as soon as it passes the limit; a body that stalls is answered `408`, so a
/// client cannot hold a connection slot by never finishing its request. Also returns whether
/// the body is declared JSON (`application/json` or `*/*+json`).
async fn read_body(req: Request<Incoming>, config: &Config) -> Result<(Bytes, bool), HttpError> {
    let limit = config.max_message_bytes;
    let declared_length = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > limit as u64) {
        return Err(HttpError::PayloadTooLarge { limit });
    }
    let declared_json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(is_json_media_type);
    let collected = Limited::new(req.into_body(), limit).collect();
    let collected = tokio::time::timeout(config.handshake_timeout, collected)
        .await
        .map_err(|_| HttpError::RequestTimeout)?
        .map_err(|err| {
            if err.downcast_ref::<LengthLimitError>().is_some() {
                HttpError::PayloadTooLarge { limit }
            } else {
                HttpError::BodyRead
            }
        })?;
    Ok((collected.to_bytes(), declared_json))
}

fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence
            .rsplit_once('+')
            .is_some_and(|(_, suffix)| suffix.eq_ignore_ascii_case("json"))
}

/// Percent-decodes one path segment; invalid UTF-8 after decoding is kept lossy, which then
/// fails name validation with a clear error.
pub fn decode_segment(segment: &str) -> Cow<'_, str> {
    percent_encoding::percent_decode_str(segment).decode_utf8_lossy()
}
