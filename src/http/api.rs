//! The publish API used by backends: publish, direct send, broadcast, and channel listing.
//!
//! Publish, send and broadcast take an `Idempotency-Key` header: a retry with the same key
//! within `--idempotency-window` gets the first reply again, marked `Idempotent-Replayed:
//! true`, and delivers nothing (see [`crate::idempotency`]). Without the header a request costs
//! one header lookup more, nothing else.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::{AppState, HttpError, json_response};
use crate::config::Config;
use crate::idempotency::{self, Fingerprint, KeyError, Outcome, RequestKey};
use crate::name;
use crate::protocol::{Payload, StoredMessage};
use crate::registry::{Epoch, Position};

/// The request header that makes a publish, send or broadcast idempotent (a `HeaderName`, so
/// that looking for it on every request parses no name).
static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The reply header that marks a reply given again to a retry.
static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// `POST /api/publish/{channel}`.
pub async fn publish(
    req: Request<Incoming>,
    state: &Arc<AppState>,
    channel: &str,
) -> Result<Response<Full<Bytes>>, HttpError> {
    let channel = decode_segment(channel);
    name::validate(&channel).map_err(HttpError::InvalidChannel)?;
    let keyed = KeyedHead::of(req.headers())?;
    let (body, declared_json) = read_body(req, &state.config).await?;
    let payload = Payload::from_body(&body, declared_json)?;
    let (published, replayed) = match keyed {
        None => (state.broker.publish(&channel, None, payload).await?, false),
        Some(head) => {
            let key = head.with_body(&body);
            settle(
                state.broker.publish_keyed(&channel, payload, &key).await?,
                key,
            )?
        }
    };
    let mut reply = json!({"channel": channel, "offset": published.offset});
    reply[published.reach.field("subscribers")] = published.reach.count().into();
    Ok(marked(json_response(StatusCode::OK, &reply), replayed))
}

/// `POST /api/send/{client_id}`.
pub async fn send(
    req: Request<Incoming>,
    state: &Arc<AppState>,
    client_id: &str,
) -> Result<Response<Full<Bytes>>, HttpError> {
    let client_id = decode_segment(client_id);
    name::validate(&client_id).map_err(HttpError::InvalidClientId)?;
    let keyed = KeyedHead::of(req.headers())?;
    let (body, declared_json) = read_body(req, &state.config).await?;
    let payload = Payload::from_body(&body, declared_json)?;
    let (reach, replayed) = match keyed {
        None => (
            state.broker.send_to(&client_id, None, payload).await?,
            false,
        ),
        Some(head) => {
            let key = head.with_body(&body);
            settle(
                state
                    .broker
                    .send_to_keyed(&client_id, payload, &key)
                    .await?,
                key,
            )?
        }
    };
    if reach.count() == 0 {
        return Err(HttpError::ClientNotFound(client_id.into_owned()));
    }
    let mut reply = json!({"client_id": client_id});
    reply[reach.field("connections")] = reach.count().into();
    Ok(marked(json_response(StatusCode::OK, &reply), replayed))
}

/// `POST /api/broadcast`.
pub async fn broadcast(
    req: Request<Incoming>,
    state: &Arc<AppState>,
) -> Result<Response<Full<Bytes>>, HttpError> {
    let keyed = KeyedHead::of(req.headers())?;
    let (body, declared_json) = read_body(req, &state.config).await?;
    let payload = Payload::from_body(&body, declared_json)?;
    let (reach, replayed) = match keyed {
        None => (state.broker.broadcast(payload).await?, false),
        Some(head) => {
            let key = head.with_body(&body);
            settle(state.broker.broadcast_keyed(payload, &key).await?, key)?
        }
    };
    let mut reply = json!({});
    reply[reach.field("connections")] = reach.count().into();
    Ok(marked(json_response(StatusCode::OK, &reply), replayed))
}

/// A request's `Idempotency-Key`, checked, with the content type that goes into the request's
/// fingerprint: taken from the head, before the body is read.
struct KeyedHead {
    key: String,
    content_type: Option<HeaderValue>,
}

impl KeyedHead {
    /// `None` without the header.
    fn of(headers: &HeaderMap) -> Result<Option<Self>, HttpError> {
        let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(HttpError::InvalidIdempotencyKey(KeyError::Repeated));
        }
        let key =
            idempotency::parse_key(value.as_bytes()).map_err(HttpError::InvalidIdempotencyKey)?;
        Ok(Some(Self {
            key: key.to_owned(),
            content_type: headers.get(CONTENT_TYPE).cloned(),
        }))
    }

    fn with_body(self, body: &[u8]) -> RequestKey {
        let content_type = self
            .content_type
            .as_ref()
            .map_or(&b""[..], HeaderValue::as_bytes);
        RequestKey {
            fingerprint: Fingerprint::of(content_type, body),
            key: self.key,
        }
    }
}

/// A keyed request's result, and whether it is a first request's result given again; a key
/// used for a different request is refused with `409`.
fn settle<T>(outcome: Outcome<T>, key: RequestKey) -> Result<(T, bool), HttpError> {
    match outcome {
        Outcome::First(result) => Ok((result, false)),
        Outcome::Replayed(result) => Ok((result, true)),
        Outcome::Reused => Err(HttpError::IdempotencyKeyReused(key.key)),
    }
}

/// Marks a reply given again with `Idempotent-Replayed: true`.
fn marked(mut response: Response<Full<Bytes>>, replayed: bool) -> Response<Full<Bytes>> {
    if replayed {
        response.headers_mut().insert(
            IDEMPOTENT_REPLAYED.clone(),
            HeaderValue::from_static("true"),
        );
    }
    response
}

/// The most messages one `/api/history` request returns; page with `since` for more.
pub const HISTORY_PAGE_MAX: usize = 1000;

/// `GET /api/history/{channel}?since=<offset>&epoch=<epoch>&limit=<n>`: the channel's stored
/// messages, oldest first: those after `since` (in `epoch`), or the newest `limit` without it.
pub async fn history(
    req: &Request<Incoming>,
    state: &Arc<AppState>,
    channel: &str,
) -> Result<Response<Full<Bytes>>, HttpError> {
    let channel = decode_segment(channel);
    name::validate(&channel).map_err(HttpError::InvalidChannel)?;
    let (since, limit) = parse_history_query(req.uri().query().unwrap_or(""))?;
    let page = state.broker.history(&channel, since, limit).await?;
    let mut messages = Vec::with_capacity(page.messages.len());
    for (_, frame) in &page.messages {
        let Some(message) = StoredMessage::parse(frame) else {
            continue;
        };
        let mut entry = json!({"offset": message.offset});
        if let Some(from) = &message.from {
            entry["from"] = from.as_ref().into();
        }
        if let Some(data) = message.data {
            entry["data"] = serde_json::from_str(data.get()).unwrap_or_default();
        }
        if let Some(b64) = &message.data_b64 {
            entry["data_b64"] = b64.as_ref().into();
        }
        messages.push(entry);
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "channel": channel,
            "epoch": page.epoch.as_str(),
            "offset": page.offset,
            "messages": messages,
        }),
    ))
}

/// Reads the query of `/api/history`: `since` and `epoch` (together: the position to read
/// after) and `limit` (1 to [`HISTORY_PAGE_MAX`], default 100). Returns the position and the
/// limit.
///
/// # Errors
/// [`HttpError::InvalidQuery`] naming the first unknown, repeated or invalid parameter, and
/// for `since` without `epoch` or the other way round.
pub fn parse_history_query(query: &str) -> Result<(Option<Position>, usize), HttpError> {
    let mut since = None;
    let mut epoch = None;
    let mut limit = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let slot = match &*key {
            "since" => &mut since,
            "epoch" => &mut epoch,
            "limit" => &mut limit,
            _ => {
                return Err(HttpError::InvalidQuery(format!(
                    "unknown query parameter {key:?} (accepted: since, epoch, limit)"
                )));
            }
        };
        if slot.replace(value.into_owned()).is_some() {
            return Err(HttpError::InvalidQuery(format!(
                "query parameter {key:?} is given more than once"
            )));
        }
    }
    let number = |name: &str, value: &str| {
        value
            .parse::<u64>()
            .ok()
            .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                HttpError::InvalidQuery(format!("{name} must be a whole number, not {value:?}"))
            })
    };
    let limit = match limit {
        None => 100,
        Some(value) => {
            let limit = number("limit", &value)?;
            if limit == 0 || limit > HISTORY_PAGE_MAX as u64 {
                return Err(HttpError::InvalidQuery(format!(
                    "limit must be between 1 and {HISTORY_PAGE_MAX}"
                )));
            }
            limit as usize
        }
    };
    let since = match (since, epoch) {
        (None, None) => None,
        (Some(since), Some(epoch)) => Some(Position {
            offset: number("since", &since)?,
            epoch: Epoch::parse(&epoch).ok_or_else(|| {
                HttpError::InvalidQuery(format!(
                    "epoch {epoch:?} is not an epoch this server hands out"
                ))
            })?,
        }),
        _ => {
            return Err(HttpError::InvalidQuery(
                "since and epoch go together: offsets count within an epoch".to_owned(),
            ));
        }
    };
    Ok((since, limit))
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
