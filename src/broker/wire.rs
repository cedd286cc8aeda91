//! How a message travels through Redis between nodes: a compact, binary-safe encoding, and a
//! decoder that treats what it reads as hostile network input.
//!
//! ```text
//! message = [offset ":"] body
//! offset  = decimal u64, 1 to 20 digits, no leading zero (channel messages only)
//! body    = VERSION kind from_len from payload
//! kind    = 0 JSON | 1 text | 2 binary          (one byte, see protocol::Payload)
//! from_len= one byte, 0 for none, else 1..=128; from is a valid client id
//! payload = the rest, byte for byte
//! ```
//!
//! The publishing node encodes the body; for channel messages the Redis script puts the offset
//! it took in front of it, in the same round trip as the `PUBLISH`. The encoding is canonical:
//! every accepted message re-encodes to exactly the same bytes.

use crate::name;
use crate::protocol::Payload;

/// The body's first byte; a different one is refused, so a future format is never misread.
pub const VERSION: u8 = 1;

const KIND_JSON: u8 = 0;
const KIND_TEXT: u8 = 1;
const KIND_BINARY: u8 = 2;
/// The most digits a u64 has.
const MAX_OFFSET_DIGITS: usize = 20;

/// One decoded message.
#[derive(Debug, Clone, Copy)]
pub struct WireMessage<'a> {
    /// The channel offset Redis gave it; `None` for direct sends and broadcasts.
    pub offset: Option<u64>,
    /// The sending client's id, when a client sent it.
    pub from: Option<&'a str>,
    /// The content.
    pub payload: Payload<'a>,
}

/// Why bytes read from Redis are not a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The offset prefix is not a decimal u64 written canonically, or its `:` is missing.
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
    match message.offset {
        Some(offset) => {
            let mut digits = itoa::Buffer::new();
            let digits = digits.format(offset).as_bytes();
            let mut out = Vec::with_capacity(digits.len() + 1 + body.len());
            out.extend_from_slice(digits);
            out.push(b':');
            out.extend_from_slice(&body);
            out
        }
        None => body,
    }
}

/// Decodes a message; `with_offset` says whether an offset prefix must be there (channel
/// messages) or must not (direct sends and broadcasts).
///
/// # Errors
/// The first thing wrong with the bytes, as a [`WireError`]. Never panics.
pub fn decode(bytes: &[u8], with_offset: bool) -> Result<WireMessage<'_>, WireError> {
    let (offset, body) = if with_offset {
        let (offset, body) = split_offset(bytes)?;
        (Some(offset), body)
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
        offset,
        from,
        payload,
    })
}

/// Splits `digits ":" body`, refusing anything but a canonical decimal u64.
fn split_offset(bytes: &[u8]) -> Result<(u64, &[u8]), WireError> {
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

    fn round_trip(message: WireMessage<'_>) {
        let bytes = encode(&message);
        let decoded = decode(&bytes, message.offset.is_some()).expect("decodes");
        assert_eq!(decoded.offset, message.offset);
        assert_eq!(decoded.from, message.from);
        assert_eq!(encode(&decoded), bytes);
    }

    #[test]
    fn every_payload_kind_round_trips() {
        round_trip(WireMessage {
            offset: Some(7),
            from: Some("alice"),
            payload: Payload::Json(br#"{"a":[1,2]}"#),
        });
        round_trip(WireMessage {
            offset: Some(u64::MAX),
            from: None,
            payload: Payload::Text("hi: there"),
        });
        round_trip(WireMessage {
            offset: None,
            from: Some(&"x".repeat(128)),
            payload: Payload::Binary(&[0, 0xff, b':', 1]),
        });
        round_trip(WireMessage {
            offset: None,
            from: None,
            payload: Payload::Binary(&[]),
        });
    }

    #[test]
    fn refuses_malformed_messages() {
        let body = encode_body(None, Payload::Text("x"));
        let with = |prefix: &[u8]| [prefix, &body].concat();
        assert_eq!(decode(&with(b"01:"), true).unwrap_err(), WireError::Offset);
        assert_eq!(decode(&with(b":"), true).unwrap_err(), WireError::Offset);
        assert_eq!(decode(&with(b"-1:"), true).unwrap_err(), WireError::Offset);
        assert_eq!(
            decode(&with(b"18446744073709551616:"), true).unwrap_err(),
            WireError::Offset
        );
        assert_eq!(decode(&body, true).unwrap_err(), WireError::Offset);
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
