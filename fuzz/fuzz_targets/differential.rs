//! Herald's frame decoder against tungstenite 0.28 (server role) on the same
//! client byte stream, with the same size limit.
//!
//! Input: `[selector, stream...]`: the selector picks the size limit (low 3
//! bits) and how many bytes each read of tungstenite's in-memory socket
//! returns (next 2 bits). Reads return `WouldBlock` once the input is used up.
//!
//! Property: both accept the same message sequence, and then both reject the
//! stream or both wait for more input, except for the known legitimate
//! divergences documented in `tests/codec_vs_tungstenite.rs`:
//!
//! 1. A close frame with a code that may not be sent on the wire: tungstenite
//!    returns `Close(1002, "Protocol violation")`, Herald returns
//!    `InvalidCloseCode` (close code 1002 too; RFC 6455 section 7.4.1).
//! 2. Close codes 1012 and 1013: tungstenite accepts them (IANA registry,
//!    after RFC 6455), Herald rejects them (RFC 6455 section 7.4.1 list).
//! 3. Which error is reported can differ when a frame is wrong in several
//!    ways: only "both reject" is compared.
//! 4. Tungstenite stops reading after a close frame, so both sides stop at
//!    the first close message.
//! 5. Herald rejects a bad header as soon as the header (up to the extended
//!    length) is in, tungstenite only once the whole frame (or, for the size
//!    limit, the whole header with the masking key) is: when the input ends
//!    inside the frame Herald rejected, tungstenite may still be waiting.
//!    Herald is right to fail fast (RFC 6455 section 5.1: "The server MUST
//!    close the connection upon receiving a frame that is not masked", section
//!    10.4 on limits); the rejected frame must really be incomplete for this
//!    to apply.
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use std::io::{self, Read, Write};

use bytes::BytesMut;
use common::{Msg, from_ours, has_complete_frame};
use herald::ws::frame::{Decoder, ProtocolError};
use libfuzzer_sys::fuzz_target;
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};

const LIMITS: [usize; 8] = [0, 1, 2, 125, 126, 1000, 65_536, 1 << 20];
const READS: [usize; 4] = [1, 3, 64, usize::MAX];

#[derive(Debug)]
struct Outcome {
    messages: Vec<Msg>,
    /// Herald: the error and whether the frame it rejected was complete in
    /// the input. Tungstenite: the error text.
    error: Option<(String, bool)>,
    ours_error: Option<ProtocolError>,
}

/// Errors Herald detects from the frame header, before consuming the frame.
fn is_header_error(err: &ProtocolError) -> bool {
    !matches!(
        err,
        ProtocolError::InvalidUtf8 | ProtocolError::InvalidCloseCode(_) | ProtocolError::CloseBodyOneByte
    )
}

fn run_ours(stream: &[u8], limit: usize) -> Outcome {
    let mut decoder = Decoder::new(limit);
    let mut buf = BytesMut::from(stream);
    let mut messages = Vec::new();
    loop {
        match decoder.decode(&mut buf) {
            Ok(Some(message)) => {
                let message = from_ours(message);
                let is_close = matches!(message, Msg::Close(_));
                messages.push(message);
                if is_close {
                    return Outcome { messages, error: None, ours_error: None };
                }
            }
            Ok(None) => return Outcome { messages, error: None, ours_error: None },
            Err(err) => {
                // A header error leaves the rejected frame at the front of the
                // buffer; other errors come after the whole frame was consumed.
                let complete = !is_header_error(&err) || has_complete_frame(&buf);
                return Outcome {
                    messages,
                    error: Some((err.to_string(), complete)),
                    ours_error: Some(err),
                };
            }
        }
    }
}

/// An in-memory socket: reads return at most `read_size` bytes and end with
/// `WouldBlock` (not EOF, which tungstenite treats as a reset); writes (pongs,
/// close replies) go to a sink.
struct MemStream<'a> {
    input: &'a [u8],
    read_size: usize,
    sink: Vec<u8>,
}

impl Read for MemStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.input.len().min(buf.len()).min(self.read_size);
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for MemStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sink.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn from_theirs(message: tungstenite::Message) -> Msg {
    match message {
        tungstenite::Message::Text(t) => Msg::Text(t.as_bytes().to_vec()),
        tungstenite::Message::Binary(b) => Msg::Binary(b.to_vec()),
        tungstenite::Message::Ping(b) => Msg::Ping(b.to_vec()),
        tungstenite::Message::Pong(b) => Msg::Pong(b.to_vec()),
        tungstenite::Message::Close(c) => {
            Msg::Close(c.map(|c| (u16::from(c.code), c.reason.to_string())))
        }
        tungstenite::Message::Frame(_) => panic!("tungstenite returned a raw frame on read"),
    }
}

fn run_theirs(stream: &[u8], limit: usize, read_size: usize) -> Outcome {
    let socket = MemStream { input: stream, read_size, sink: Vec::new() };
    let config = WebSocketConfig::default()
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let mut socket = WebSocket::from_raw_socket(socket, Role::Server, Some(config));
    let mut messages = Vec::new();
    loop {
        match socket.read() {
            Ok(message) => {
                let message = from_theirs(message);
                let is_close = matches!(message, Msg::Close(_));
                messages.push(message);
                if is_close {
                    return Outcome { messages, error: None, ours_error: None };
                }
            }
            Err(tungstenite::Error::Io(err)) if err.kind() == io::ErrorKind::WouldBlock => {
                return Outcome { messages, error: None, ours_error: None };
            }
            Err(
                err @ (tungstenite::Error::Protocol(_)
                | tungstenite::Error::Capacity(_)
                | tungstenite::Error::Utf8(_)),
            ) => {
                return Outcome { messages, error: Some((err.to_string(), true)), ours_error: None };
            }
            Err(err) => panic!("unexpected tungstenite error: {err}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [selector, stream @ ..] = data else {
        return;
    };
    let limit = LIMITS[usize::from(selector & 7)];
    let read_size = READS[usize::from((selector >> 3) & 3)];
    let ours = run_ours(stream, limit);
    let theirs = run_theirs(stream, limit, read_size);

    // Divergences 1 and 2: a close code Herald refuses and tungstenite
    // reports as a close message.
    if let Some(ProtocolError::InvalidCloseCode(code)) = ours.ours_error {
        if theirs.error.is_none() {
            let (last, before) = theirs
                .messages
                .split_last()
                .expect("tungstenite returned nothing for a complete close frame");
            assert_eq!(ours.messages, before, "messages before the close frame");
            match last {
                Msg::Close(Some((1002, reason))) if reason == "Protocol violation" => {}
                Msg::Close(Some((c, _))) if *c == code && matches!(code, 1012 | 1013) => {}
                other => panic!("ours rejected close code {code}, theirs returned {other:?}"),
            }
            return;
        }
    }

    assert_eq!(ours.messages, theirs.messages, "message sequences differ");
    match (&ours.error, &theirs.error) {
        (None, None) | (Some(_), Some(_)) => {}
        // Divergence 5: Herald failed fast on the header of a frame whose
        // payload (or masking key) is not all there; tungstenite still waits.
        (Some((_, false)), None) => {}
        (Some((ours, true)), None) => {
            panic!("Herald rejected a complete frame ({ours}), tungstenite accepted it")
        }
        (None, Some((theirs, _))) => {
            panic!("tungstenite rejected ({theirs}), Herald accepted / waits for more")
        }
    }
});
