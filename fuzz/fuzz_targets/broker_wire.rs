//! The cluster wire format (`herald::broker::wire`): what nodes read from Redis.
//!
//! Input: `[flags, bytes...]`. Flags bit 0 says whether the bytes are read as a channel
//! message (with a stamp: epoch, offset, time) or as a direct send / broadcast (without).
//!
//! Properties:
//! - `decode` never panics on arbitrary bytes;
//! - whatever it accepts is canonical: `encode(decode(b)) == b` byte for byte (so nodes never
//!   disagree on what one message means), a JSON payload is one JSON value (serde_json's
//!   syntax check), a text payload is UTF-8, and `from` is a valid client id;
//! - built messages round-trip: the bytes are also read as a message to build (bits 1-2 pick
//!   the payload kind, bit 3 adds a sender, the next 8 bytes are the offset and the 8 after
//!   them the time), and `decode(encode(m))` gives back exactly `m`; the stamp is what the
//!   Redis publish script writes (`epoch .. ':' .. offset .. ':' .. at_ms .. ':' .. body`).
#![no_main]

use herald::broker::wire::{Stamp, WireMessage, decode, encode, encode_body};
use herald::registry::Epoch;
use herald::name;
use herald::protocol::Payload;
use libfuzzer_sys::fuzz_target;

/// The payload's kind and bytes, for comparing payloads.
fn parts<'a>(payload: &Payload<'a>) -> (u8, &'a [u8]) {
    match *payload {
        Payload::Json(bytes) => (0, bytes),
        Payload::Text(text) => (1, text.as_bytes()),
        Payload::Binary(bytes) => (2, bytes),
    }
}

fuzz_target!(|data: &[u8]| {
    let [flags, rest @ ..] = data else {
        return;
    };
    let with_offset = flags & 1 != 0;

    // Arbitrary bytes from the network.
    if let Ok(message) = decode(rest, with_offset) {
        assert_eq!(message.stamp.is_some(), with_offset);
        assert_eq!(encode(&message), rest, "accepted bytes are canonical");
        if let Some(from) = message.from {
            assert!(name::validate(from).is_ok(), "from is a valid client id");
        }
        if let Payload::Json(bytes) = message.payload {
            // Syntax only: serde_json's Value refuses valid JSON such as numbers beyond f64.
            serde_json::from_slice::<&serde_json::value::RawValue>(bytes)
                .expect("JSON payload is one JSON value");
        }
    }

    // A message built from the bytes round-trips.
    let (offset_bytes, rest) = rest.split_at(rest.len().min(8));
    let (at_bytes, body) = rest.split_at(rest.len().min(8));
    let number = |bytes: &[u8]| {
        let mut number = [0u8; 8];
        number[..bytes.len()].copy_from_slice(bytes);
        u64::from_le_bytes(number)
    };
    let stamp = with_offset.then(|| Stamp {
        epoch: Epoch::parse("fuzz0000").expect("an epoch"),
        offset: number(offset_bytes),
        at_ms: number(at_bytes),
    });
    let from = (flags & 8 != 0).then_some("sender-1");
    let payload = match (flags >> 1) & 3 {
        0 => match Payload::from_body(body, true) {
            Ok(payload) => payload,
            Err(_) => return,
        },
        1 => match std::str::from_utf8(body) {
            Ok(text) => Payload::Text(text),
            Err(_) => return,
        },
        _ => Payload::Binary(body),
    };
    let message = WireMessage {
        stamp,
        from,
        payload,
    };
    let bytes = encode(&message);
    if let Some(Stamp { epoch, offset, at_ms }) = stamp {
        let mut scripted = format!("{epoch}:{offset}:{at_ms}:").into_bytes();
        scripted.extend_from_slice(&encode_body(from, payload));
        assert_eq!(
            bytes, scripted,
            "encode matches the publish script's layout"
        );
    }
    let decoded = decode(&bytes, with_offset).expect("an encoded message decodes");
    assert_eq!(decoded.stamp, stamp);
    assert_eq!(decoded.from, from);
    assert_eq!(parts(&decoded.payload), parts(&payload));
});
