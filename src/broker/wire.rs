//! How a message travels through Redis between nodes: a compact, binary-safe encoding, and a
//! decoder that treats what it reads as hostile network input.
//!
//! ```text
//! message = [stamp] body
//! stamp   = epoch ":" offset ":" at_ms ":"     (channel messages only)
//! epoch   = 8 characters of 0-9 a-z            (the channel stream's epoch)
//! offset  = decimal u64, 1 to 20 digits, no leading zero
//! at_ms   = decimal u64, the same rule          (Redis's clock at the publish, in ms)
//! body    = VERSION kind from_len from payload
//! kind    = 0 JSON | 1 text | 2 binary          (one byte, see protocol::Payload)
//! from_len= one byte, 0 for none, else 1..=128; from is a valid client id
//! payload = the rest, byte for byte
//! ```
//!
//! The publishing node encodes the body; for channel messages the Redis script puts the stamp
//! in front of it (the stream's epoch, the offset it took and the time), in the same atomic
//! step that stores the message in the channel's history and publishes it. What is published
//! and what is stored are the same bytes. The encoding is canonical: every accepted message
//! re-encodes to exactly the same bytes.

use crate::name;
use crate::protocol::Payload;
use crate::registry::Epoch;
use crate::registry::history::EPOCH_LEN;

/// The body's first byte; a different one is refused, so a future format is never misread.
pub const VERSION: u8 = 1;

const KIND_JSON: u8 = 0;
const KIND_TEXT: u8 = 1;
const KIND_BINARY: u8 = 2;
/// The most digits a u64 has.
const MAX_OFFSET_DIGITS: usize = 20;

/// Where a channel message stands in its stream, as the Redis script stamped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The channel stream's epoch.
    pub epoch: Epoch,
    /// The offset Redis gave the message.
    pub offset: u64,
    /// Redis's clock when the message was published, in milliseconds since the Unix epoch
    /// (the history's time to live is measured on it).
    pub at_ms: u64,
}

/// One decoded message.
#[derive(Debug, Clone, Copy)]
pub struct WireMessage<'a> {
    /// The stamp of a channel message; `None` for direct sends and broadcasts.
    pub stamp: Option<Stamp>,
    /// The sending client's id, when a client sent it.
    pub from: Option<&'a str>,
    /// The content.
    pub payload: Payload<'a>,
}

/// Why bytes read from Redis are not a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The stamp's epoch is not one this server makes, or its `:` is missing.
    #[error("invalid epoch")]
    Epoch,
    /// A number of the stamp is not a decimal u64 written canonically, or its `:` is missing.
    #[error("invalid offset")]
    Offset,
    /// The body is shorter than its header says.
    #[error("message truncated")]
    Truncated,
    /// The body's version byte is not [`VERSION`].
    #[error("unknown version {0}")]
    Version(u8),
    /// The payload kind byte is unknown.
    #[error("unknown payload kind {0}")]
    Kind(u8),
    /// The sender's id is not a valid client id.
    #[error("invalid sender id")]
    From,
    /// A JSON payload is not one JSON value within the depth limit, or a text one not UTF-8.
    #[error("payload does not match its kind")]
    Payload,
}

/// Encodes the body: everything but the offset.
pub fn encode_body(from: Option<&str>, payload: Payload<'_>) -> Vec<u8> {
    let (kind, bytes) = match payload {
        Payload::Json(bytes) => (KIND_JSON, bytes),
        Payload::Text(text) => (KIND_TEXT, text.as_bytes()),
        Payload::Binary(bytes) => (KIND_BINARY, bytes),
    };
    let from = from.unwrap_or("");
    let mut out = Vec::with_capacity(3 + from.len() + bytes.len());
    out.push(VERSION);
    out.push(kind);
    // Client ids are at most 128 bytes (name::MAX_LEN), so the length fits one byte.
    out.push(u8::try_from(from.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(from.as_bytes());
    out.extend_from_slice(bytes);
    out
}

/// Encodes a whole message, as the Redis script assembles it for channel messages.
pub fn encode(message: &WireMessage<'_>) -> Vec<u8> {
    let body = encode_body(message.from, message.payload);
    match message.stamp {
        Some(stamp) => {
            let mut out = Vec::with_capacity(EPOCH_LEN + 44 + body.len());
            out.extend_from_slice(stamp.epoch.as_str().as_bytes());
            out.push(b':');
            for number in [stamp.offset, stamp.at_ms] {
                out.extend_from_slice(itoa::Buffer::new().format(number).as_bytes());
                out.push(b':');
            }
            out.extend_from_slice(&body);
            out
        }
        None => body,
    }
}

/// Decodes a message; `stamped` says whether a stamp must be there (channel messages) or must
/// not (direct sends and broadcasts).
///
/// # Errors
/// The first thing wrong with the bytes, as a [`WireError`]. Never panics.
pub fn decode(bytes: &[u8], stamped: bool) -> Result<WireMessage<'_>, WireError> {
    let (stamp, body) = if stamped {
        let (stamp, body) = split_stamp(bytes)?;
        (Some(stamp), body)
    } else {
        (None, bytes)
    };
    let [version, kind, from_len, rest @ ..] = body else {
        return Err(WireError::Truncated);
    };
    if *version != VERSION {
        return Err(WireError::Version(*version));
    }
    let from_len = usize::from(*from_len);
    let (from, payload) = rest
        .split_at_checked(from_len)
        .ok_or(WireError::Truncated)?;
    let from = if from_len == 0 {
        None
    } else {
        let from = std::str::from_utf8(from).map_err(|_| WireError::From)?;
        name::validate(from).map_err(|_| WireError::From)?;
        Some(from)
    };
    let payload = match *kind {
        KIND_JSON => match Payload::from_body(payload, true) {
            Ok(payload) => payload,
            Err(_) => return Err(WireError::Payload),
        },
        KIND_TEXT => Payload::Text(std::str::from_utf8(payload).map_err(|_| WireError::Payload)?),
        KIND_BINARY => Payload::Binary(payload),
        other => return Err(WireError::Kind(other)),
    };
    Ok(WireMessage {
        stamp,
        from,
        payload,
    })
}

/// Splits `epoch ":" offset ":" at_ms ":" body`.
fn split_stamp(bytes: &[u8]) -> Result<(Stamp, &[u8]), WireError> {
    let (epoch, rest) = bytes
        .split_at_checked(EPOCH_LEN)
        .filter(|(_, rest)| rest.first() == Some(&b':'))
        .ok_or(WireError::Epoch)?;
    let epoch = std::str::from_utf8(epoch)
        .ok()
        .and_then(Epoch::parse)
        .ok_or(WireError::Epoch)?;
    let (offset, rest) = split_number(&rest[1..])?;
    let (at_ms, body) = split_number(rest)?;
    Ok((
        Stamp {
            epoch,
            offset,
            at_ms,
        },
        body,
    ))
}

/// Splits `digits ":" rest`, refusing anything but a canonical decimal u64.
fn split_number(bytes: &[u8]) -> Result<(u64, &[u8]), WireError> {
    let colon = bytes
        .iter()
        .take(MAX_OFFSET_DIGITS + 1)
        .position(|&b| b == b':')
        .ok_or(WireError::Offset)?;
    let (digits, body) = (&bytes[..colon], &bytes[colon + 1..]);
    if digits.is_empty()
        || (digits.len() > 1 && digits[0] == b'0')
        || !digits.iter().all(u8::is_ascii_digit)
    {
        return Err(WireError::Offset);
    }
    let offset = std::str::from_utf8(digits)
        .ok()
        .and_then(|digits| digits.parse::<u64>().ok())
        .ok_or(WireError::Offset)?;
    Ok((offset, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(offset: u64) -> Option<Stamp> {
        Some(Stamp {
            epoch: Epoch::parse("abcd1234").unwrap(),
            offset,
            at_ms: 1_764_000_000_000,
        })
    }

    fn round_trip(message: WireMessage<'_>) {
        let bytes = encode(&message);
        let decoded = decode(&bytes, message.stamp.is_some()).expect("decodes");
        assert_eq!(decoded.stamp, message.stamp);
        assert_eq!(decoded.from, message.from);
        assert_eq!(encode(&decoded), bytes);
    }

    #[test]
    fn every_payload_kind_round_trips() {
        round_trip(WireMessage {
            stamp: stamp(7),
            from: Some("alice"),
            payload: Payload::Json(br#"{"a":[1,2]}"#),
        });
        round_trip(WireMessage {
            stamp: stamp(u64::MAX),
            from: None,
            payload: Payload::Text("hi: there"),
        });
        round_trip(WireMessage {
            stamp: None,
            from: Some(&"x".repeat(128)),
            payload: Payload::Binary(&[0, 0xff, b':', 1]),
        });
        round_trip(WireMessage {
            stamp: None,
            from: None,
            payload: Payload::Binary(&[]),
        });
    }

    #[test]
    fn refuses_malformed_messages() {
        let body = encode_body(None, Payload::Text("x"));
        let with = |prefix: &[u8]| [prefix, &body].concat();
        let stamped = |numbers: &[u8]| with(&[b"abcd1234:", numbers].concat());
        assert_eq!(
            decode(&stamped(b"01:5:"), true).unwrap_err(),
            WireError::Offset
        );
        assert_eq!(
            decode(&stamped(b"1:05:"), true).unwrap_err(),
            WireError::Offset
        );
        assert_eq!(
            decode(&stamped(b":5:"), true).unwrap_err(),
            WireError::Offset
        );
        assert_eq!(
            decode(&stamped(b"-1:5:"), true).unwrap_err(),
            WireError::Offset
        );
        assert_eq!(
            decode(&stamped(b"1:"), true).unwrap_err(),
            WireError::Offset
        );
        assert_eq!(
            decode(&stamped(b"18446744073709551616:5:"), true).unwrap_err(),
            WireError::Offset
        );
        assert_eq!(
            decode(&with(b"ABCD1234:1:5:"), true).unwrap_err(),
            WireError::Epoch
        );
        assert_eq!(
            decode(&with(b"abcd123:1:5:"), true).unwrap_err(),
            WireError::Epoch
        );
        assert_eq!(decode(&body, true).unwrap_err(), WireError::Epoch);
        assert_eq!(decode(&[1, 0], false).unwrap_err(), WireError::Truncated);
        assert_eq!(
            decode(&[9, 0, 0], false).unwrap_err(),
            WireError::Version(9)
        );
        assert_eq!(decode(&[1, 7, 0], false).unwrap_err(), WireError::Kind(7));
        assert_eq!(
            decode(&[1, 0, 5, b'a'], false).unwrap_err(),
            WireError::Truncated
        );
        assert_eq!(
            decode(&[1, 0, 1, b' ', b'1'], false).unwrap_err(),
            WireError::From
        );
        assert_eq!(
            decode(&[1, 0, 0, b'{'], false).unwrap_err(),
            WireError::Payload
        );
        assert_eq!(
            decode(&[1, 1, 0, 0xff], false).unwrap_err(),
            WireError::Payload
        );
    }
}
