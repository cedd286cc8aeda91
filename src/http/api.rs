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
use crate::protocol::{Payload, StoredMessage};
use crate::registry::{Epoch, Position};

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
    let query = HistoryQuery::parse(req.uri().query().unwrap_or(""))?;
    let page = state
        .broker
        .history(&channel, query.since, query.limit)
        .await?;
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

/// The query of `/api/history`.
#[derive(Debug)]
struct HistoryQuery {
    since: Option<Position>,
    limit: usize,
}

impl HistoryQuery {
    fn parse(query: &str) -> Result<Self, HttpError> {
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
            None => HISTORY_PAGE_MAX.min(100),
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
        Ok(Self { since, limit })
    }
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
