//! The publish path: `/api/publish/{segment}` with an arbitrary body.
//!
//! Input: `[flags, segment..., 0x00, body...]` (no 0x00: all segment, empty
//! body). Flags bit 0 is "declared Content-Type: application/json", bit 1
//! adds a `from` client id to the envelope; the remaining bits vary the offset.
//!
//! Properties:
//! - `decode_segment` leaves segments without `%` alone, and undoes a full
//!   percent-encoding of any valid channel name;
//! - `Payload::from_body` classifies the body as declared JSON (only if
//!   serde_json parses it), UTF-8 text, or binary, and `raw()` returns the
//!   body bytes, in a text frame unless binary, except that a JSON string
//!   comes out as its text (as the reference parser reads it) when it has
//!   one (no lone surrogate);
//! - for a valid channel, `message_frame`, `direct_frame` and
//!   `broadcast_frame` are each one valid server text frame (2/4/10-byte header
//!   rules) whose JSON `data` equals the body parsed as JSON (JSON payload) or
//!   the body as a string (text payload), or whose `data_b64` base64-decodes to
//!   the body (binary payload);
//! - declared JSON is refused only when invalid or nested deeper than
//!   `MAX_JSON_DEPTH`, so every envelope nests at most `MAX_JSON_DEPTH + 1`
//!   levels, which serde_json reads (`common::SERDE_JSON_MAX_DEPTH`; the bug
//!   in `fuzz/regressions/publish_body/README.md`, now fixed).
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use base64::Engine as _;
use common::{Json, SERDE_JSON_MAX_DEPTH, check_json, text_frame_json};
use herald::http::decode_segment;
use herald::name;
use herald::protocol::{MAX_JSON_DEPTH, Payload, broadcast_frame, direct_frame, message_frame};
use libfuzzer_sys::fuzz_target;

fn check_data(envelope: &Json, body: &[u8], payload: &Payload<'_>) {
    assert!(envelope.is_object(), "envelope is an object");
    match payload {
        Payload::Json(_) => {
            let expected = Json::parse(std::str::from_utf8(body).unwrap()).unwrap();
            assert_eq!(envelope.get("data"), Some(&expected), "json data differs");
            assert!(envelope.get("data_b64").is_none());
        }
        Payload::Text(_) => {
            let text = std::str::from_utf8(body).unwrap();
            assert_eq!(envelope.get("data"), Some(&Json::str(text)), "text data differs");
            assert!(envelope.get("data_b64").is_none());
        }
        Payload::Binary(_) => {
            let b64 = envelope
                .get("data_b64")
                .and_then(Json::as_str)
                .expect("binary payload carries data_b64");
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("data_b64 is base64");
            assert_eq!(decoded, body, "data_b64 does not decode to the body");
            assert!(envelope.get("data").is_none());
        }
    }
}

/// Every envelope is one object level around the payload: JSON data adds
/// its own depth, text and base64 strings none. The result must fit both
/// Herald's bound and what serde_json reads.
fn check_depth(envelope: &Json, payload: &Payload<'_>, json_depth: usize) {
    let expected = 1 + if matches!(payload, Payload::Json(_)) { json_depth } else { 0 };
    assert_eq!(envelope.depth(), expected, "envelope depth");
    assert!(
        envelope.depth() <= MAX_JSON_DEPTH + 1,
        "envelope nests {} levels, more than MAX_JSON_DEPTH + 1 = {}",
        envelope.depth(),
        MAX_JSON_DEPTH + 1
    );
    assert!(
        envelope.depth() <= SERDE_JSON_MAX_DEPTH,
        "envelope nests {} levels, more than serde_json reads",
        envelope.depth()
    );
}

fuzz_target!(|data: &[u8]| {
    let [flags, rest @ ..] = data else {
        return;
    };
    let declared_json = flags & 1 != 0;
    let from = (flags & 2 != 0).then_some("publisher-7");
    let offset = u64::from(flags >> 2) << 56 | rest.len() as u64;
    let (segment, body) = match rest.iter().position(|&b| b == 0) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &[][..]),
    };
    let segment = String::from_utf8_lossy(segment);

    // Percent-decoding of the path segment.
    let channel = decode_segment(&segment);
    if !segment.contains('%') {
        assert_eq!(channel, segment, "a segment without % must be left alone");
    }
    let channel_ok = name::validate(&channel).is_ok();
    if channel_ok {
        let encoded: String = channel.bytes().map(|b| format!("%{b:02X}")).collect();
        assert_eq!(decode_segment(&encoded), channel, "full percent-encoding round trip");
    }

    // Body classification.
    let reference = std::str::from_utf8(body).ok().map(check_json);
    let payload = match Payload::from_body(body, declared_json) {
        Ok(payload) => payload,
        Err(err) => {
            assert!(declared_json, "only declared JSON can be refused");
            // Valid JSON may only be refused for being too deep.
            if let Some(Ok(value)) = &reference {
                assert!(
                    value.depth() > MAX_JSON_DEPTH,
                    "valid JSON of depth {} refused: {err}",
                    value.depth()
                );
            }
            return;
        }
    };
    let mut json_depth = 0;
    match payload {
        Payload::Json(bytes) => {
            assert!(declared_json);
            assert_eq!(bytes, body);
            let value = match &reference {
                Some(Ok(value)) => value,
                other => panic!("accepted JSON the reference parser refuses: {other:?}"),
            };
            json_depth = value.depth();
            assert!(
                json_depth <= MAX_JSON_DEPTH,
                "JSON of depth {json_depth} accepted, deeper than MAX_JSON_DEPTH = {MAX_JSON_DEPTH}"
            );
        }
        Payload::Text(text) => {
            assert!(!declared_json);
            assert_eq!(text.as_bytes(), body);
        }
        Payload::Binary(bytes) => {
            assert!(!declared_json);
            assert!(std::str::from_utf8(body).is_err(), "UTF-8 body classified as binary");
            assert_eq!(bytes, body);
        }
    }
    let (raw, is_text) = payload.raw();
    let string_text = match (&payload, &reference) {
        (Payload::Json(_), Some(Ok(Json::String(text)))) => {
            serde_json::from_slice::<String>(body).ok().inspect(|decoded| {
                assert_eq!(decoded, text, "serde_json and the reference read the string differently");
            })
        }
        _ => None,
    };
    match string_text {
        Some(text) => assert_eq!(&*raw, text.as_bytes(), "raw() must return the string's text"),
        None => assert_eq!(&*raw, body, "raw() must return the exact body"),
    }
    assert_eq!(is_text, !matches!(payload, Payload::Binary(_)));

    // Envelopes.
    let from_json = from.map(Json::str);
    if channel_ok {
        let frame = message_frame(&channel, offset, from, payload);
        let envelope = text_frame_json(&frame);
        // Regression: fuzz/regressions/publish_body/README.md.
        check_depth(&envelope, &payload, json_depth);
        assert_eq!(envelope.get("type"), Some(&Json::str("message")));
        assert_eq!(envelope.get("channel"), Some(&Json::str(&channel)));
        assert_eq!(envelope.get("offset"), Some(&Json::num(offset)));
        assert_eq!(envelope.get("from"), from_json.as_ref());
        assert_eq!(envelope.keys().len(), 4 + usize::from(from.is_some()));
        check_data(&envelope, body, &payload);
    }
    let envelope = text_frame_json(&direct_frame(from, payload));
    check_depth(&envelope, &payload, json_depth);
    assert_eq!(envelope.get("type"), Some(&Json::str("direct")));
    assert_eq!(envelope.get("from"), from_json.as_ref());
    assert_eq!(envelope.keys().len(), 2 + usize::from(from.is_some()));
    check_data(&envelope, body, &payload);

    let envelope = text_frame_json(&broadcast_frame(payload));
    check_depth(&envelope, &payload, json_depth);
    assert_eq!(envelope.get("type"), Some(&Json::str("broadcast")));
    assert_eq!(envelope.keys().len(), 2);
    check_data(&envelope, body, &payload);
});
