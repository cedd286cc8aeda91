//! Differential tests of Herald's WebSocket frame codec against tungstenite
//! 0.28, used as the reference implementation of RFC 6455.
//!
//! The main test generates seeded random byte streams of client frames, a mix
//! of valid and invalid ones, feeds each stream to our [`Decoder`] (in random
//! chunk splits) and to a server-role tungstenite `WebSocket` over an
//! in-memory stream (in random read sizes), and checks that both accept the
//! same message sequence and that both reject the same streams.
//!
//! Known, legitimate divergences (handled explicitly in [`compare`]):
//!
//! 1. Close frames with a code that may not be sent on the wire: tungstenite
//!    does not fail the read, it returns `Message::Close` with the code
//!    replaced by 1002 "Protocol violation" (and would answer with that close
//!    frame). We return `ProtocolError::InvalidCloseCode`, whose close code is
//!    also 1002, so the connection ends the same way on the wire. RFC 6455
//!    section 7.4.1 says such codes "MUST NOT be set as a status code in a
//!    Close control frame", and Autobahn case 7.9.x expects the connection to
//!    be failed.
//! 2. Close codes 1012 and 1013: tungstenite accepts them (they were added to
//!    the IANA registry after RFC 6455). Our `CloseCode::is_valid_on_wire`
//!    follows the RFC 6455 section 7.4.1 list plus 3000-4999 (section 7.4.2),
//!    as the Autobahn suite expects, and rejects them.
//! 3. Which error is reported, and so which close code, can differ when a
//!    frame is wrong in several ways: tungstenite checks the frame size before
//!    the reserved bits, the mask bit and the control-frame rules, and checks
//!    the mask only after reading the payload. Only "both reject" is asserted.
//! 4. Tungstenite stops reading after a close frame (it answers it and then
//!    reports the connection closed), so the generator stops after a close
//!    frame and the comparison stops at the first close message.
//! 5. Our decoder rejects a bad header before the payload has arrived, while
//!    tungstenite waits for the whole frame; the generator therefore only
//!    produces complete frames (or headers that both reject on their own),
//!    and incomplete input is covered by the unit tests instead.

use std::fmt;
use std::io::{self, Read, Write};

use bytes::BytesMut;
use herald::ws::close::CloseCode;
use herald::ws::frame::{
    Decoder, Message, OpCode, ProtocolError, encode_close, encode_frame, encode_masked,
};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};

const BASE_SEED: u64 = 0x4845_5241_4C44; // "HERALD"
const ITERATIONS: u64 = 2000;

/// A message in a form both implementations can be mapped to.
#[derive(Clone, PartialEq, Eq)]
enum Msg {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

impl fmt::Debug for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, data) = match self {
            Msg::Text(d) => ("Text", d),
            Msg::Binary(d) => ("Binary", d),
            Msg::Ping(d) => ("Ping", d),
            Msg::Pong(d) => ("Pong", d),
            Msg::Close(c) => return write!(f, "Close({c:?})"),
        };
        let shown = &data[..data.len().min(16)];
        write!(f, "{kind}(len {}, {shown:02x?})", data.len())
    }
}

/// What one implementation made of a byte stream.
#[derive(Debug)]
struct Outcome {
    messages: Vec<Msg>,
    /// `Some` if the implementation rejected the stream.
    error: Option<Rejection>,
}

/// Why a stream was rejected, by our decoder or by tungstenite.
#[derive(Debug)]
enum Rejection {
    Ours(ProtocolError),
    Theirs(String),
}

/// Describes an outcome's error for assertion messages.
fn describe(error: Option<&Rejection>) -> String {
    match error {
        None => "accepted".to_owned(),
        Some(Rejection::Ours(err)) => format!("ours: {err} ({:?})", err.close_code()),
        Some(Rejection::Theirs(err)) => format!("tungstenite: {err}"),
    }
}

fn from_ours(message: Message) -> Msg {
    match message {
        Message::Text(b) => Msg::Text(b.to_vec()),
        Message::Binary(b) => Msg::Binary(b.to_vec()),
        Message::Ping(b) => Msg::Ping(b.to_vec()),
        Message::Pong(b) => Msg::Pong(b.to_vec()),
        Message::Close(c) => Msg::Close(c.map(|c| (c.code.0, c.reason))),
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

/// Feeds `bytes` to our decoder in random chunks.
fn run_ours(bytes: &[u8], limit: usize, rng: &mut StdRng) -> Outcome {
    let max_chunk = *[1, 7, 64, 4096, usize::MAX].choose(rng).expect("non-empty");
    let mut decoder = Decoder::new(limit);
    let mut buf = BytesMut::new();
    let mut messages = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let n = rng.random_range(1..=max_chunk.min(bytes.len() - pos));
        buf.extend_from_slice(&bytes[pos..pos + n]);
        pos += n;
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(message)) => {
                    let is_close = matches!(message, Message::Close(_));
                    messages.push(from_ours(message));
                    if is_close {
                        return Outcome {
                            messages,
                            error: None,
                        };
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    return Outcome {
                        messages,
                        error: Some(Rejection::Ours(err)),
                    };
                }
            }
        }
    }
    // The generator emits whole frames only, so nothing may be left over.
    assert!(
        buf.is_empty(),
        "decoder left {} bytes unconsumed",
        buf.len()
    );
    Outcome {
        messages,
        error: None,
    }
}

/// An in-memory socket: reads come from `input` in random sizes and end with
/// `WouldBlock` (not EOF, which tungstenite treats as a reset); writes (pongs,
/// close replies) go to a sink.
struct MemStream {
    input: Vec<u8>,
    pos: usize,
    rng: StdRng,
    sink: Vec<u8>,
}

impl Read for MemStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.input.len() - self.pos;
        if left == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.rng.random_range(1..=left.min(buf.len()).min(70_000));
        buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for MemStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sink.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Feeds `bytes` to a server-role tungstenite socket.
fn run_theirs(bytes: &[u8], limit: usize, rng: &mut StdRng) -> Outcome {
    let stream = MemStream {
        input: bytes.to_vec(),
        pos: 0,
        rng: StdRng::seed_from_u64(rng.random()),
        sink: Vec::new(),
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let mut socket = WebSocket::from_raw_socket(stream, Role::Server, Some(config));
    let mut messages = Vec::new();
    loop {
        match socket.read() {
            Ok(message) => {
                let message = from_theirs(message);
                let is_close = matches!(message, Msg::Close(_));
                messages.push(message);
                if is_close {
                    return Outcome {
                        messages,
                        error: None,
                    };
                }
            }
            Err(tungstenite::Error::Io(err)) if err.kind() == io::ErrorKind::WouldBlock => {
                return Outcome {
                    messages,
                    error: None,
                };
            }
            Err(
                err @ (tungstenite::Error::Protocol(_)
                | tungstenite::Error::Capacity(_)
                | tungstenite::Error::Utf8(_)),
            ) => {
                return Outcome {
                    messages,
                    error: Some(Rejection::Theirs(err.to_string())),
                };
            }
            Err(err) => panic!("unexpected tungstenite error: {err}"),
        }
    }
}

/// Asserts that both implementations agree, modulo the documented
/// divergences 1 and 2 (see the file header).
fn compare(ours: &Outcome, theirs: &Outcome, context: &str) {
    if let Some(Rejection::Ours(ProtocolError::InvalidCloseCode(code))) = ours.error {
        if theirs.error.is_none() {
            let (last, before) = theirs
                .messages
                .split_last()
                .unwrap_or_else(|| panic!("{context}: tungstenite returned nothing"));
            assert_eq!(ours.messages, before, "{context}");
            match last {
                // Divergence 1: tungstenite substitutes 1002 for a bad code.
                Msg::Close(Some((1002, reason))) if reason == "Protocol violation" => {}
                // Divergence 2: IANA-registered codes outside RFC 6455.
                Msg::Close(Some((c, _))) if *c == code && matches!(code, 1012 | 1013) => {}
                other => panic!("{context}: ours rejected close code {code}, theirs {other:?}"),
            }
            return;
        }
    }
    assert_eq!(ours.messages, theirs.messages, "{context}");
    assert_eq!(
        ours.error.is_some(),
        theirs.error.is_some(),
        "{context}: {} vs {}",
        describe(ours.error.as_ref()),
        describe(theirs.error.as_ref())
    );
}

/// How the payload length of a generated frame is written.
#[derive(Debug, Clone, Copy)]
enum LenEncoding {
    Minimal,
    /// 16-bit extended length even if the 7-bit form would do.
    Force16,
    /// 64-bit extended length even if a shorter form would do.
    Force64,
}

/// Writes a client frame with full control over every header field.
fn raw_frame(
    out: &mut Vec<u8>,
    first: u8,
    mask: Option<[u8; 4]>,
    payload: &[u8],
    encoding: LenEncoding,
) {
    out.push(first);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    let encoding = match encoding {
        LenEncoding::Minimal if len <= 125 => None,
        LenEncoding::Minimal | LenEncoding::Force16 if len <= 0xFFFF => Some(false),
        _ => Some(true),
    };
    match encoding {
        None => out.push(mask_bit | len as u8),
        Some(false) => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        Some(true) => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(mask) = mask {
        out.splice(start..start, mask);
        for (i, byte) in out[start + 4..].iter_mut().enumerate() {
            *byte ^= mask[i % 4];
        }
    }
}

const INVALID_UTF8: [&[u8]; 9] = [
    &[0xC0, 0x80],             // overlong NUL, invalid immediately
    &[0xFF],                   // never valid
    &[0x80],                   // lone continuation byte
    &[0xED, 0xA0, 0x80],       // surrogate
    &[0xF4, 0x90, 0x80, 0x80], // above U+10FFFF
    &[0xE0, 0x80, 0x80],       // overlong
    &[0xF0, 0x9F, 0x98],       // truncated 4-byte char
    &[0xC3],                   // truncated 2-byte char
    &[0xE2, 0x82],             // truncated 3-byte char
];

/// Builds random frame sequences. Stops after a close frame or a header that
/// cannot be completed.
struct Generator {
    rng: StdRng,
    out: Vec<u8>,
    done: bool,
    /// Human-readable log of what was generated, for failure messages.
    log: Vec<String>,
}

impl Generator {
    fn payload_len(&mut self) -> usize {
        match self.rng.random_range(0..100) {
            0..=9 => 0,
            10..=19 => 1,
            20..=27 => 125,
            28..=33 => 126,
            34..=39 => 127,
            40..=49 => 1000,
            50..=52 => 70_000,
            53..=55 => 65_536,
            _ => self.rng.random_range(2..300),
        }
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.rng.fill(&mut v[..]);
        v
    }

    /// Text of about `len` bytes; invalid UTF-8 with some probability.
    fn text(&mut self, len: usize) -> Vec<u8> {
        const POOL: [char; 8] = ['a', 'Z', ' ', 'é', 'ß', '€', '中', '😀'];
        let mut s = String::with_capacity(len + 4);
        while s.len() < len {
            let c = if self.rng.random_bool(0.1) {
                self.rng.random::<char>()
            } else {
                *POOL.choose(&mut self.rng).expect("non-empty")
            };
            s.push(c);
        }
        let mut bytes = s.into_bytes();
        if self.rng.random_bool(0.08) {
            let bad = *INVALID_UTF8.choose(&mut self.rng).expect("non-empty");
            let at = self.rng.random_range(0..=bytes.len());
            bytes.splice(at..at, bad.iter().copied());
        }
        bytes
    }

    fn mask(&mut self) -> Option<[u8; 4]> {
        if self.rng.random_bool(0.015) {
            None
        } else {
            Some(self.rng.random())
        }
    }

    fn rsv(&mut self) -> u8 {
        if self.rng.random_bool(0.015) {
            self.rng.random_range(1..8u8) << 4
        } else {
            0
        }
    }

    fn encoding(&mut self) -> LenEncoding {
        match self.rng.random_range(0..10) {
            0 => LenEncoding::Force16,
            1 => LenEncoding::Force64,
            _ => LenEncoding::Minimal,
        }
    }

    /// Emits one frame with mostly valid header bits.
    fn frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let first = if fin { 0x80 } else { 0 } | self.rsv() | opcode;
        let mask = self.mask();
        let encoding = self.encoding();
        self.log.push(format!(
            "frame {first:#04x} mask {} len {} {encoding:?}",
            mask.is_some(),
            payload.len()
        ));
        raw_frame(&mut self.out, first, mask, payload, encoding);
        if opcode == 0x8 {
            self.done = true;
        }
    }

    fn control_payload(&mut self) -> Vec<u8> {
        let len = if self.rng.random_bool(0.05) {
            self.rng.random_range(126..200)
        } else {
            self.rng.random_range(0..=125)
        };
        self.bytes(len)
    }

    fn ping_or_pong(&mut self) {
        let opcode = if self.rng.random_bool(0.5) { 0x9 } else { 0xA };
        let fin = !self.rng.random_bool(0.03);
        let payload = self.control_payload();
        self.frame(fin, opcode, &payload);
    }

    fn close(&mut self) {
        const CODES: [u16; 28] = [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999, 0, 999,
            1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ];
        let payload = match self.rng.random_range(0..10) {
            0 => Vec::new(),
            1 => vec![0x03],
            _ => {
                let code = if self.rng.random_bool(0.1) {
                    self.rng.random()
                } else {
                    *CODES.choose(&mut self.rng).expect("non-empty")
                };
                let reason_len = if self.rng.random_bool(0.05) {
                    124
                } else {
                    self.rng.random_range(0..=20)
                };
                let mut p = code.to_be_bytes().to_vec();
                p.extend(self.text(reason_len));
                p
            }
        };
        self.frame(true, 0x8, &payload);
    }

    fn data_payload(&mut self, text: bool) -> Vec<u8> {
        let len = self.payload_len();
        if text {
            self.text(len)
        } else {
            self.bytes(len)
        }
    }

    fn message(&mut self) {
        let text = self.rng.random_bool(0.5);
        let payload = self.data_payload(text);
        self.frame(true, if text { 0x1 } else { 0x2 }, &payload);
    }

    fn fragmented_message(&mut self) {
        let text = self.rng.random_bool(0.5);
        let payload = self.data_payload(text);
        let pieces = self.rng.random_range(2..=5);
        let mut cuts: Vec<usize> = (1..pieces)
            .map(|_| self.rng.random_range(0..=payload.len()))
            .collect();
        cuts.sort_unstable();
        cuts.insert(0, 0);
        cuts.push(payload.len());
        // Sometimes leave the message open at the end of the stream.
        let finish = self.rng.random_bool(0.95);
        for (i, window) in cuts.windows(2).enumerate() {
            let fragment = &payload[window[0]..window[1]];
            let opcode = if i == 0 {
                if text { 0x1 } else { 0x2 }
            } else {
                0x0
            };
            let last = i + 2 == cuts.len();
            self.frame(last && finish, opcode, fragment);
            if !last && self.rng.random_bool(0.25) {
                self.ping_or_pong();
            }
            if !last && self.rng.random_bool(0.03) {
                // A new data frame while the message is open.
                self.message();
            }
        }
    }

    /// A frame with random header bits: reserved opcodes, continuation
    /// without a start, fragmented control frames and so on.
    fn random_frame(&mut self) {
        let opcode = if self.rng.random_bool(0.5) {
            self.rng.random_range(0..16u8)
        } else {
            *[0x0u8, 0x1, 0x2, 0x8, 0x9, 0xA]
                .choose(&mut self.rng)
                .expect("non-empty")
        };
        let fin = self.rng.random_bool(0.7);
        let len = self.payload_len().min(200);
        let payload = if opcode == 0x1 {
            self.text(len)
        } else {
            self.bytes(len)
        };
        self.frame(fin, opcode, &payload);
    }

    /// A masked header declaring more than any limit, with no payload: both
    /// implementations must reject it from the header alone.
    fn huge_header(&mut self) {
        let declared: u64 = match self.rng.random_range(0..3) {
            0 => 1 << 40,
            1 => (1 << 63) | self.rng.random_range(0..1000),
            _ => u64::MAX,
        };
        let opcode = *[0x1u8, 0x2, 0x0].choose(&mut self.rng).expect("non-empty");
        self.log
            .push(format!("huge header {opcode:#x} len {declared:#x}"));
        self.out.push(0x80 | opcode);
        self.out.push(0x80 | 127);
        self.out.extend_from_slice(&declared.to_be_bytes());
        let mask: [u8; 4] = self.rng.random();
        self.out.extend_from_slice(&mask);
        self.done = true;
    }
}

fn generate(seed: u64) -> (Vec<u8>, usize, Vec<String>) {
    let mut g = Generator {
        rng: StdRng::seed_from_u64(seed),
        out: Vec::new(),
        done: false,
        log: Vec::new(),
    };
    let limit = *[64, 1000, 65_536, 100_000, 1 << 20, 1 << 20]
        .choose(&mut g.rng)
        .expect("non-empty");
    let steps = g.rng.random_range(1..=8);
    for _ in 0..steps {
        if g.done {
            break;
        }
        match g.rng.random_range(0..100) {
            0..=31 => g.message(),
            32..=57 => g.fragmented_message(),
            58..=76 => g.ping_or_pong(),
            77..=84 => g.close(),
            85..=96 => g.random_frame(),
            _ => g.huge_header(),
        }
    }
    (g.out, limit, g.log)
}

#[test]
fn decoder_agrees_with_tungstenite_on_random_streams() {
    let mut rejected = 0;
    let mut messages = 0;
    for i in 0..ITERATIONS {
        let seed = BASE_SEED + i;
        let (bytes, limit, log) = generate(seed);
        let mut rng = StdRng::seed_from_u64(!seed);
        let ours = run_ours(&bytes, limit, &mut rng);
        let theirs = run_theirs(&bytes, limit, &mut rng);
        let context = format!("seed {seed} limit {limit} frames {log:?}");
        compare(&ours, &theirs, &context);
        rejected += usize::from(ours.error.is_some());
        messages += ours.messages.len();
    }
    // Guard against a generator that only produces trivially valid or
    // trivially invalid input.
    let rejected_share = rejected as f64 / ITERATIONS as f64;
    assert!(
        (0.2..0.8).contains(&rejected_share),
        "rejected {rejected} of {ITERATIONS}"
    );
    assert!(messages as u64 > ITERATIONS, "only {messages} messages");
}

#[test]
fn encode_masked_matches_reference_framing() {
    let mask = [9, 8, 7, 6];
    for len in [0usize, 1, 125, 126, 65535, 65536] {
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        for (opcode, fin) in [(OpCode::Text, false), (OpCode::Binary, true)] {
            let mut expected = Vec::new();
            let first = if fin { 0x80 } else { 0 } | opcode.as_u8();
            raw_frame(
                &mut expected,
                first,
                Some(mask),
                &payload,
                LenEncoding::Minimal,
            );
            assert_eq!(encode_masked(opcode, fin, &payload, mask), expected);
        }
    }
}

/// Our server frames, read by a client-role tungstenite socket.
#[test]
fn tungstenite_client_reads_our_server_frames() {
    let big: Vec<u8> = (0..70_000).map(|i| (i % 253) as u8).collect();
    let text = "héllo wörld €".repeat(10);
    let reason = "ü".repeat(100); // 200 bytes, truncated to 122 (61 chars)
    let frames = [
        encode_frame(OpCode::Text, text.as_bytes()),
        encode_frame(OpCode::Binary, &big),
        encode_frame(OpCode::Binary, &big[..126]),
        encode_frame(OpCode::Ping, b"are you there"),
        encode_frame(OpCode::Pong, b""),
        encode_close(CloseCode::GOING_AWAY, &reason),
    ];
    let stream = MemStream {
        input: frames.concat(),
        pos: 0,
        rng: StdRng::seed_from_u64(7),
        sink: Vec::new(),
    };
    let mut socket = WebSocket::from_raw_socket(stream, Role::Client, None);
    let mut read = || from_theirs(socket.read().expect("tungstenite accepts our frame"));
    assert_eq!(read(), Msg::Text(text.into_bytes()));
    assert_eq!(read(), Msg::Binary(big.clone()));
    assert_eq!(read(), Msg::Binary(big[..126].to_vec()));
    assert_eq!(read(), Msg::Ping(b"are you there".to_vec()));
    assert_eq!(read(), Msg::Pong(Vec::new()));
    assert_eq!(read(), Msg::Close(Some((1001, "ü".repeat(61)))));
}
