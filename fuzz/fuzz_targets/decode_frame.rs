//! Herald's incremental frame decoder on arbitrary client byte streams.
//!
//! Input: `[selector, seed, stream...]`. The selector picks the decoder's
//! `max_message_bytes` (low 3 bits) and the largest chunk the stream is fed in
//! (next 3 bits); the seed drives the chunk sizes and the masks used to
//! re-encode messages.
//!
//! Properties:
//! - chunking invariance: feeding the stream in chunks gives exactly the same
//!   messages and the same final error (or the same unconsumed tail) as
//!   feeding it at once;
//! - the buffer is always an untouched tail of what was fed, and whatever was
//!   consumed ends on a frame boundary; after `Ok(None)` the tail never holds
//!   a complete frame (so no partial frame was consumed and none was skipped);
//! - text messages and close reasons are valid UTF-8, close codes are valid on
//!   the wire, control payloads are at most 125 bytes, no payload exceeds the
//!   limit;
//! - every message round-trips through `encode_masked` (also as a fragmented
//!   message with a ping in between) to an identical message.
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use bytes::BytesMut;
use common::{Rng, frame_boundaries, has_complete_frame};
use herald::ws::frame::{Decoder, Message, OpCode, ProtocolError, encode_masked};
use libfuzzer_sys::fuzz_target;

const LIMITS: [usize; 8] = [0, 1, 125, 126, 1000, 65_535, 65_536, 1 << 20];
const CHUNKS: [usize; 8] = [1, 2, 3, 7, 16, 125, 1000, usize::MAX];

#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The decoder returned an error.
    Error(ProtocolError),
    /// Everything fed was decoded; these bytes were left over.
    Incomplete(Vec<u8>),
}

/// Feeds `stream` in chunks of `1..=max_chunk` bytes (sizes from `rng`) and
/// checks the buffer invariants after every call.
fn run(stream: &[u8], limit: usize, max_chunk: usize, rng: &mut Rng) -> (Vec<Message>, End) {
    let boundaries = frame_boundaries(stream);
    let mut decoder = Decoder::new(limit);
    let mut buf = BytesMut::new();
    let mut messages = Vec::new();
    let mut fed = 0;
    while fed < stream.len() || fed == 0 {
        let n = rng.chunk(max_chunk).min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            let result = decoder.decode(&mut buf);
            // The buffer is always exactly the unconsumed tail of what was fed.
            assert!(buf.len() <= fed, "buffer grew beyond what was fed");
            let consumed = fed - buf.len();
            assert_eq!(&buf[..], &stream[consumed..fed], "buffer is not a tail of the input");
            match result {
                Ok(Some(message)) => {
                    assert!(
                        boundaries.binary_search(&consumed).is_ok(),
                        "message returned after consuming {consumed} bytes, not a frame boundary ({boundaries:?})"
                    );
                    check_message(&message, limit);
                    messages.push(message);
                }
                Ok(None) => {
                    assert!(
                        boundaries.binary_search(&consumed).is_ok(),
                        "Ok(None) after consuming {consumed} bytes, not a frame boundary ({boundaries:?})"
                    );
                    assert!(
                        !has_complete_frame(&buf),
                        "Ok(None) with a complete frame in the buffer"
                    );
                    break;
                }
                Err(err) => {
                    assert!(err.to_string().len() <= 60, "error text too long for a close reason");
                    return (messages, End::Error(err));
                }
            }
        }
        if stream.is_empty() {
            break;
        }
    }
    (messages, End::Incomplete(buf.to_vec()))
}

fn check_message(message: &Message, limit: usize) {
    match message {
        Message::Text(payload) => {
            assert!(std::str::from_utf8(payload).is_ok(), "text message is not UTF-8");
            assert!(payload.len() <= limit, "text over the limit");
        }
        Message::Binary(payload) => assert!(payload.len() <= limit, "binary over the limit"),
        Message::Ping(payload) | Message::Pong(payload) => {
            assert!(payload.len() <= 125, "control payload over 125");
            assert!(payload.len() <= limit, "control payload over the limit");
        }
        Message::Close(None) => {}
        Message::Close(Some(close)) => {
            assert!(close.code.is_valid_on_wire(), "close code {} accepted", close.code.0);
            assert!(close.reason.len() <= 123, "close reason over 123 bytes");
            assert!(close.reason.len() + 2 <= limit, "close payload over the limit");
        }
    }
}

/// The opcode and payload that encode `message` again.
fn wire_form(message: &Message) -> (OpCode, Vec<u8>) {
    match message {
        Message::Text(p) => (OpCode::Text, p.to_vec()),
        Message::Binary(p) => (OpCode::Binary, p.to_vec()),
        Message::Ping(p) => (OpCode::Ping, p.to_vec()),
        Message::Pong(p) => (OpCode::Pong, p.to_vec()),
        Message::Close(None) => (OpCode::Close, Vec::new()),
        Message::Close(Some(close)) => {
            let mut p = close.code.0.to_be_bytes().to_vec();
            p.extend_from_slice(close.reason.as_bytes());
            (OpCode::Close, p)
        }
    }
}

fn decode_all(bytes: &[u8], limit: usize) -> Vec<Message> {
    let mut decoder = Decoder::new(limit);
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    loop {
        match decoder.decode(&mut buf) {
            Ok(Some(message)) => out.push(message),
            Ok(None) => break,
            Err(err) => panic!("re-encoded message rejected: {err}"),
        }
    }
    assert!(buf.is_empty(), "re-encoded frames not fully consumed");
    out
}

fn round_trip(message: &Message, limit: usize, rng: &mut Rng) {
    let (opcode, payload) = wire_form(message);
    // As one frame.
    let frame = encode_masked(opcode, true, &payload, rng.mask());
    assert_eq!(decode_all(&frame, limit), [message.clone()], "single-frame round trip");

    // Data messages again as two fragments around an empty ping; the cut may
    // fall inside a UTF-8 character.
    if matches!(opcode, OpCode::Text | OpCode::Binary) {
        let cut = if payload.is_empty() { 0 } else { (rng.next() as usize) % (payload.len() + 1) };
        let mut bytes = encode_masked(opcode, false, &payload[..cut], rng.mask());
        bytes.extend(encode_masked(OpCode::Ping, true, b"", rng.mask()));
        bytes.extend(encode_masked(OpCode::Continuation, true, &payload[cut..], rng.mask()));
        let ping = Message::Ping(bytes::Bytes::new());
        assert_eq!(
            decode_all(&bytes, limit),
            [ping, message.clone()],
            "fragmented round trip cut at {cut}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let [selector, seed, stream @ ..] = data else {
        return;
    };
    let limit = LIMITS[usize::from(selector & 7)];
    let max_chunk = CHUNKS[usize::from((selector >> 3) & 7)];

    let whole = run(stream, limit, usize::MAX, &mut Rng::new(*seed));
    let mut rng = Rng::new(*seed);
    let chunked = run(stream, limit, max_chunk, &mut rng);
    assert_eq!(whole, chunked, "chunking changed the outcome (max chunk {max_chunk})");

    for message in &whole.0 {
        round_trip(message, limit, &mut rng);
    }
});
