//! Channel streams in Redis: each channel's epoch and offset counter, its history, and the two
//! scripts that read and write them.
//!
//! All of one channel's names carry the channel as a hash tag (`herald:{<channel>}:…`), so
//! they share a Redis Cluster hash slot and each script touches one slot:
//! - `herald:{<channel>}:stream`: a hash with the stream's `epoch` and latest `offset`;
//! - `herald:{<channel>}:history`: a list of the last `--history-size` messages, as published;
//! - `herald:{<channel>}:messages`: the pub/sub channel the messages go out on.
//!
//! A publish is one script: it starts a new epoch if the stream is gone (Redis restarted, or
//! the stream expired), takes the next offset, stamps the message with the epoch, the offset
//! and Redis's clock, appends it to the history and publishes it, atomically. So the history
//! holds exactly what was published, and every node sees one order with the same offsets.

use std::time::Duration;

use redis::Script;
use redis::aio::MultiplexedConnection;

use super::wire;
use crate::idempotency::Outcome;
use crate::protocol;
use crate::registry::{Epoch, Fetched};

/// What [`Streams::read`] found: where a stream stands and the stored messages that can be
/// replayed, as published (see [`wire`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRead {
    /// The stream's epoch.
    pub epoch: Epoch,
    /// The stream's latest offset.
    pub latest: u64,
    /// The offset of the oldest message that can still be replayed (`latest + 1` when none).
    pub first: u64,
    /// Stored messages, oldest first, with consecutive offsets, none past the time to live.
    pub messages: Vec<Vec<u8>>,
}

impl StreamRead {
    /// The messages as the frames subscribers of `channel` get.
    pub fn fetched(&self, channel: &str) -> Fetched {
        let frames = self
            .messages
            .iter()
            .filter_map(|bytes| {
                let message = wire::decode(bytes, true).ok()?;
                let offset = message.stamp?.offset;
                Some((
                    offset,
                    protocol::message_frame(channel, offset, message.from, message.payload),
                ))
            })
            .collect();
        Fetched {
            epoch: self.epoch,
            latest: self.latest,
            first: self.first,
            frames,
        }
    }
}

/// The publish script's status: a record with the same fingerprint answered.
const REPLAYED: u8 = 1;
/// The publish script's status: a record with another fingerprint refused.
const REUSED: u8 = 2;

/// Where a channel's key names start.
const KEY_PREFIX: &str = "herald:{";

/// Publishes a channel message. KEYS[1] the stream, KEYS[2] the history, KEYS[3] (with an
/// idempotency key) the key's record; ARGV[1] the pub/sub channel, ARGV[2] the message body,
/// ARGV[3] the stream's time to live (ms), ARGV[4] the history size, ARGV[5] the history's
/// time to live (ms), ARGV[6] the epoch for a new stream, ARGV[7] the request's fingerprint,
/// ARGV[8] the idempotency window (ms). A record with the same fingerprint is the reply again
/// (nothing is published), one with another is refused; a publish stores its reply in the
/// record in the same atomic step, so two nodes racing with one key publish once. Returns
/// `{status, epoch, offset, nodes}`, status 0 for published now, 1 replayed, 2 refused.
const PUBLISH_SCRIPT: &str = r"
if KEYS[3] then
  local seen = redis.call('HMGET', KEYS[3], 'request', 'epoch', 'offset', 'nodes')
  if seen[1] then
    if seen[1] ~= ARGV[7] then return {2, '', 0, 0} end
    return {1, seen[2], tonumber(seen[3]), tonumber(seen[4])}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[6]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local time = redis.call('TIME')
local at = string.format('%d', time[1] * 1000 + math.floor(time[2] / 1000))
local message = epoch .. ':' .. string.format('%d', offset) .. ':' .. at .. ':' .. ARGV[2]
local size = tonumber(ARGV[4])
if size > 0 then
  redis.call('RPUSH', KEYS[2], message)
  redis.call('LTRIM', KEYS[2], -size, -1)
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
local nodes = redis.call('PUBLISH', ARGV[1], message)
if KEYS[3] then
  redis.call('HSET', KEYS[3], 'request', ARGV[7], 'epoch', epoch, 'offset', offset, 'nodes', nodes)
  redis.call('PEXPIRE', KEYS[3], ARGV[8])
end
return {0, epoch, offset, nodes}
";

/// Reads a stream: where it stands and up to `limit` stored messages after an offset (or the
/// newest ones). Starts the stream, with a new epoch, if there is none: a subscriber must be
/// told the epoch that the next publish will use. KEYS[1] the stream, KEYS[2] the history;
/// ARGV[1] the stream's time to live (ms), ARGV[2] the epoch for a new stream, ARGV[3] the
/// offset to read after (-1: the newest), ARGV[4] the limit. Returns `{epoch, offset, length,
/// now_ms, messages}`.
const READ_SCRIPT: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[2]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset'))
local length = redis.call('LLEN', KEYS[2])
local limit = tonumber(ARGV[4])
local after = tonumber(ARGV[3])
local start
if after < 0 then
  start = math.max(length - limit, 0)
else
  start = after + 1 - (offset - length + 1)
end
local messages = {}
if limit > 0 and start >= 0 and start < length then
  messages = redis.call('LRANGE', KEYS[2], start, start + limit - 1)
end
local time = redis.call('TIME')
local now = string.format('%d', time[1] * 1000 + math.floor(time[2] / 1000))
return {epoch, offset, length, now, messages}
";

/// The key of the idempotency record of a channel publish, in the channel's hash slot (the
/// publish script touches it with the stream).
pub fn publish_record(channel: &str, key: &str) -> String {
    format!("{KEY_PREFIX}{channel}}}:idem:{key}")
}

/// The key of a channel's stream hash.
pub fn stream_key(channel: &str) -> String {
    format!("{KEY_PREFIX}{channel}}}:stream")
}

/// The key of a channel's history list.
pub fn history_key(channel: &str) -> String {
    format!("{KEY_PREFIX}{channel}}}:history")
}

/// The Redis pub/sub channel of a Herald channel.
pub fn channel_name(channel: &str) -> String {
    format!("{KEY_PREFIX}{channel}}}:messages")
}

/// The Herald channel of a Redis pub/sub channel name, if it is one.
pub fn channel_of(name: &str) -> Option<&str> {
    name.strip_prefix(KEY_PREFIX)?.strip_suffix("}:messages")
}

/// What a channel's streams keep to: the history's size and time to live, and how long a
/// stream outlives its last publish.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Messages kept per channel (0: none).
    pub history_size: usize,
    /// How long a stored message counts, in milliseconds.
    pub history_ttl_ms: u64,
    /// How long a stream (its epoch and offsets) outlives its last publish or renewal.
    pub stream_ttl_ms: u64,
}

impl StreamLimits {
    /// The limits for a history of `size` messages kept for `ttl`: a stream lives at least as
    /// long as the channel retention of the in-memory broker, and as long as its history.
    pub fn new(size: usize, ttl: Duration, retention_ms: u64) -> Self {
        let history_ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        Self {
            history_size: size,
            history_ttl_ms,
            stream_ttl_ms: history_ttl_ms.max(retention_ms),
        }
    }
}

/// What the publish script answers: the message's epoch and offset, and the nodes that got it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamped {
    /// The stream's epoch.
    pub epoch: Epoch,
    /// The offset the message got.
    pub offset: u64,
    /// Nodes subscribed to the channel in Redis.
    pub nodes: u64,
}

/// The scripts, loaded once per node.
#[derive(Debug)]
pub struct Streams {
    publish: Script,
    read: Script,
    limits: StreamLimits,
}

/// Why a Redis reply about a stream cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The call failed.
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    /// The reply names an epoch this server does not make (something else wrote the key).
    #[error("redis holds an invalid epoch for this channel")]
    Epoch,
}

impl Streams {
    /// The scripts for streams kept to `limits`.
    pub fn new(limits: StreamLimits) -> Self {
        Self {
            publish: Script::new(PUBLISH_SCRIPT),
            read: Script::new(READ_SCRIPT),
            limits,
        }
    }

    /// The limits streams keep to.
    pub fn limits(&self) -> StreamLimits {
        self.limits
    }

    /// Publishes `body` (see [`wire::encode_body`]) to `channel`.
    ///
    /// # Errors
    /// [`StreamError`] when Redis fails or answers with something that is not a stream.
    pub async fn publish(
        &self,
        conn: &mut MultiplexedConnection,
        channel: &str,
        body: Vec<u8>,
    ) -> Result<Stamped, StreamError> {
        match self.publish_keyed(conn, channel, body, None).await? {
            Outcome::First(stamped) | Outcome::Replayed(stamped) => Ok(stamped),
            Outcome::Reused => Err(StreamError::Epoch),
        }
    }

    /// [`Streams::publish`] at most once per idempotency `record` (its key's name, the
    /// request's fingerprint, the window in ms): see the script.
    ///
    /// # Errors
    /// [`StreamError`] when Redis fails or answers with something that is not a stream.
    pub async fn publish_keyed(
        &self,
        conn: &mut MultiplexedConnection,
        channel: &str,
        body: Vec<u8>,
        record: Option<&(String, String, u64)>,
    ) -> Result<Outcome<Stamped>, StreamError> {
        let mut invocation = self.publish.key(stream_key(channel));
        invocation.key(history_key(channel));
        if let Some((name, _, _)) = record {
            invocation.key(name);
        }
        invocation
            .arg(channel_name(channel))
            .arg(body)
            .arg(self.limits.stream_ttl_ms)
            .arg(self.limits.history_size)
            .arg(self.limits.history_ttl_ms)
            .arg(Epoch::random().as_str());
        if let Some((_, fingerprint, window_ms)) = record {
            invocation.arg(fingerprint).arg(*window_ms);
        }
        let (status, epoch, offset, nodes): (u8, String, u64, u64) =
            invocation.invoke_async(conn).await?;
        if status == REUSED {
            return Ok(Outcome::Reused);
        }
        let stamped = Stamped {
            epoch: Epoch::parse(&epoch).ok_or(StreamError::Epoch)?,
            offset,
            nodes,
        };
        Ok(if status == REPLAYED {
            Outcome::Replayed(stamped)
        } else {
            Outcome::First(stamped)
        })
    }

    /// Where `channel` stands and up to `limit` of its stored messages after `after` (the
    /// newest ones when `None`), as message frames; messages past the history's time to live
    /// are left out, and the window starts after them.
    ///
    /// # Errors
    /// [`StreamError`] when Redis fails or answers with something that is not a stream.
    pub async fn read(
        &self,
        conn: &mut MultiplexedConnection,
        channel: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<StreamRead, StreamError> {
        let mut invocation = self.read.key(stream_key(channel));
        invocation
            .key(history_key(channel))
            .arg(self.limits.stream_ttl_ms)
            .arg(Epoch::random().as_str())
            .arg(after.map_or(-1, |after| i64::try_from(after).unwrap_or(i64::MAX)))
            .arg(limit);
        let (epoch, latest, length, now_ms, messages): (String, u64, u64, u64, Vec<Vec<u8>>) =
            invocation.invoke_async(conn).await?;
        let epoch = Epoch::parse(&epoch).ok_or(StreamError::Epoch)?;
        Ok(self.replayable(epoch, latest, length, now_ms, messages))
    }

    /// Keeps the stored messages that can be replayed, from the first that is neither expired
    /// nor out of place: an expired message moves the window's start past it, and a message
    /// that does not decode (or breaks the offsets' sequence) ends what can be replayed.
    fn replayable(
        &self,
        epoch: Epoch,
        latest: u64,
        length: u64,
        now_ms: u64,
        messages: Vec<Vec<u8>>,
    ) -> StreamRead {
        let mut first = (latest + 1).saturating_sub(length);
        let mut kept: Vec<Vec<u8>> = Vec::with_capacity(messages.len());
        let mut last = None;
        for bytes in messages {
            let stamp = wire::decode(&bytes, true)
                .ok()
                .and_then(|message| message.stamp)
                .filter(|stamp| stamp.epoch == epoch)
                .filter(|stamp| last.is_none_or(|last: u64| last + 1 == stamp.offset));
            let Some(stamp) = stamp else {
                // Not what the script stores: nothing from here on can be replayed.
                if kept.is_empty() {
                    first = latest + 1;
                }
                break;
            };
            last = Some(stamp.offset);
            if stamp.at_ms.saturating_add(self.limits.history_ttl_ms) <= now_ms {
                first = first.max(stamp.offset + 1);
                continue;
            }
            kept.push(bytes);
        }
        StreamRead {
            epoch,
            latest,
            first: first.min(latest + 1),
            messages: kept,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_channel_one_hash_slot() {
        for name in [
            stream_key("room:1"),
            history_key("room:1"),
            channel_name("room:1"),
        ] {
            assert!(name.starts_with("herald:{room:1}:"), "{name}");
        }
        assert_eq!(channel_of(&channel_name("a/b:c")), Some("a/b:c"));
        assert_eq!(channel_of("herald:client:x"), None);
    }
}
