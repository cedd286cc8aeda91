//! The WebSocket frame codec (RFC 6455 section 5): an incremental, zero-copy
//! decoder for the masked frames clients send, reassembling fragmented
//! messages and validating them, plus encoders for the unmasked frames the
//! server sends. It knows nothing about sockets: callers feed it bytes and
//! write out what it produces.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::close::{CloseCode, CloseFrame};
use super::mask::apply_mask;

/// Largest payload a control frame may carry (RFC 6455 section 5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;
/// Largest close reason that fits in a control frame after the 2-byte code.
const MAX_CLOSE_REASON: usize = 123;

/// A frame opcode (RFC 6455 section 5.2) that this codec understands.
///
/// Exists to give the 4-bit opcode field names; the reserved opcodes 0x3-0x7
/// and 0xB-0xF have no variant and are rejected by the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpCode {
    /// 0x0: continues a fragmented message.
    Continuation,
    /// 0x1: starts a text (UTF-8) message.
    Text,
    /// 0x2: starts a binary message.
    Binary,
    /// 0x8: starts or answers the closing handshake.
    Close,
    /// 0x9: a keep-alive probe the receiver must answer with a pong.
    Ping,
    /// 0xA: the answer to a ping, or an unsolicited heartbeat.
    Pong,
}

impl OpCode {
    /// Parses the low four bits of a frame's first byte.
    ///
    /// Exists so the decoder can reject reserved opcodes; returns `None` for
    /// them (and for any value above 0xF).
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0x0 => Some(Self::Continuation),
            0x1 => Some(Self::Text),
            0x2 => Some(Self::Binary),
            0x8 => Some(Self::Close),
            0x9 => Some(Self::Ping),
            0xA => Some(Self::Pong),
            _ => None,
        }
    }

    /// The 4-bit wire value of this opcode.
    ///
    /// Exists for the encoders, which place it in the frame's first byte.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Whether this is a control opcode (close, ping, pong).
    ///
    /// Exists because control frames follow different rules: they cannot be
    /// fragmented, carry at most 125 bytes and may interleave with the
    /// fragments of a data message.
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// A complete message received from a client.
///
/// Exists as the decoder's output: fragmented data messages have been
/// reassembled and validated, control frames are passed through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message; the bytes are guaranteed to be valid UTF-8 (kept as
    /// `Bytes` rather than `String` so they are never copied).
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A ping; the server must answer with a pong carrying the same payload.
    Ping(Bytes),
    /// A pong, usually answering one of the server's pings.
    Pong(Bytes),
    /// A close frame: `None` if it had an empty body, otherwise the validated
    /// code and reason.
    Close(Option<CloseFrame>),
}

/// Why a client's byte stream was rejected.
///
/// Exists so the connection can be failed with the right close code (see
/// [`ProtocolError::close_code`]); the `Display` text is at most 60 bytes so it
/// can be sent as the close reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A frame arrived without the mask bit set; clients must mask every
    /// frame (RFC 6455 section 5.1).
    #[error("unmasked client frame")]
    UnmaskedFrame,
    /// One of RSV1-RSV3 was set, but no extension that defines them was
    /// negotiated (RFC 6455 section 5.2).
    #[error("reserved bits set")]
    ReservedBits,
    /// The opcode was one of the reserved values 0x3-0x7 or 0xB-0xF.
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// A control frame (close, ping, pong) had FIN clear.
    #[error("fragmented control frame")]
    FragmentedControl,
    /// A control frame declared a payload longer than 125 bytes.
    #[error("control frame too long")]
    ControlTooLong,
    /// A continuation frame arrived while no fragmented message was open.
    #[error("continuation without a message")]
    ContinuationWithoutStart,
    /// A text or binary frame arrived while a fragmented message was still
    /// open (only continuation or control frames are allowed then).
    #[error("expected a continuation frame")]
    ExpectedContinuation,
    /// A text message or a close reason was not valid UTF-8, or a fragment
    /// of a text message contained bytes that can never become valid UTF-8.
    #[error("invalid UTF-8")]
    InvalidUtf8,
    /// A close frame carried a status code that may not be sent on the wire
    /// (see [`CloseCode::is_valid_on_wire`]).
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    /// A close frame had a 1-byte payload, too short for a status code.
    #[error("one-byte close payload")]
    CloseBodyOneByte,
    /// A frame, or a fragmented message including the next fragment, would
    /// exceed the decoder's size limit; detected from the header alone.
    #[error("message over {limit} bytes")]
    MessageTooBig {
        /// The decoder's `max_message_bytes`.
        limit: usize,
    },
    /// A 64-bit payload length had its most significant bit set, which
    /// RFC 6455 section 5.2 forbids.
    #[error("frame length MSB set")]
    LengthMsbSet,
}

impl ProtocolError {
    /// The close code to fail the connection with.
    ///
    /// Exists so every error maps to the code RFC 6455 section 7.4.1 asks
    /// for: 1007 for bad UTF-8, 1009 for oversized messages, 1002 otherwise.
    pub fn close_code(&self) -> CloseCode {
        match self {
            Self::InvalidUtf8 => CloseCode::INVALID_PAYLOAD,
            Self::MessageTooBig { .. } => CloseCode::MESSAGE_TOO_BIG,
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }
}

/// Per-connection incremental decoder for the frames a client sends.
///
/// Exists to turn the bytes read from a client socket into complete,
/// validated [`Message`]s. It lives in every connection, so when no
/// fragmented message is open it is just a limit and an empty `Option<Box>`
/// (two words); the reassembly state is only allocated while a fragmented
/// message is in flight.
///
/// Once [`Decoder::decode`] has returned an error the stream is out of sync
/// and the connection must be failed: the decoder must not be used again
/// (its results would be meaningless, though it will not panic).
#[derive(Debug)]
pub struct Decoder {
    max_message_bytes: usize,
    partial: Option<Box<Partial>>,
}

/// A fragmented data message whose final fragment has not arrived yet.
#[derive(Debug)]
struct Partial {
    /// Whether the message was started by a text frame (else binary).
    is_text: bool,
    /// The unmasked payload of the fragments received so far.
    data: BytesMut,
    /// Length of the prefix of `data` already known to be valid UTF-8 (only
    /// meaningful for text); at most 3 bytes of an incomplete character follow.
    utf8_valid_up_to: usize,
}

/// What the decoder needs from a frame header once it has been validated.
#[derive(Debug)]
struct Header {
    fin: bool,
    opcode: OpCode,
    mask: [u8; 4],
    /// Header length including the extended length and the masking key.
    header_len: usize,
    payload_len: usize,
}

impl Decoder {
    /// Creates a decoder that rejects any frame or reassembled message longer
    /// than `max_message_bytes` payload bytes.
    ///
    /// Exists so each connection starts with no fragmented message open and a
    /// limit that bounds how much a client can make the server buffer.
    pub fn new(max_message_bytes: usize) -> Self {
        Self {
            max_message_bytes,
            partial: None,
        }
    }

    /// Decodes the next complete message from the front of `buf`.
    ///
    /// Exists as the connection's read path: call it after appending bytes
    /// read from the socket, until it returns `Ok(None)`. Complete frames are
    /// consumed from `buf` (payloads are split off and unmasked in place, not
    /// copied, except when fragments are joined); a frame that is not complete
    /// yet is left untouched and `Ok(None)` is returned. Control frames that
    /// arrive between the fragments of a data message are returned as soon as
    /// they are complete. Headers are checked before their payload is waited
    /// for, so an oversized or malformed frame fails as soon as its header
    /// (up to the extended length) is in `buf`. The decoder does not reserve
    /// space in `buf`; the caller decides how much to read.
    ///
    /// # Errors
    /// Returns a [`ProtocolError`] if the client broke RFC 6455 or the size
    /// limit. After an error the decoder must not be used again.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, ProtocolError> {
        loop {
            let Some(header) = self.parse_header(buf)? else {
                return Ok(None);
            };
            if buf.len().saturating_sub(header.header_len) < header.payload_len {
                return Ok(None);
            }
            buf.advance(header.header_len);
            let mut payload = buf.split_to(header.payload_len);
            apply_mask(&mut payload, header.mask);
            if let Some(message) = self.on_frame(header.opcode, header.fin, payload)? {
                return Ok(Some(message));
            }
        }
    }

    /// Validates the header at the front of `buf` without consuming it.
    /// Returns `Ok(None)` while more header bytes are needed.
    fn parse_header(&self, buf: &[u8]) -> Result<Option<Header>, ProtocolError> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        let extended_len = match b1 & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let Some(extended) = buf.get(2..2 + extended_len) else {
            return Ok(None);
        };

        if b0 & 0x70 != 0 {
            return Err(ProtocolError::ReservedBits);
        }
        let opcode = OpCode::from_u8(b0 & 0x0F).ok_or(ProtocolError::UnknownOpcode(b0 & 0x0F))?;
        let fin = b0 & 0x80 != 0;
        // Non-minimal length encodings are accepted, like tungstenite does.
        let declared = if extended_len == 0 {
            u64::from(b1 & 0x7F)
        } else {
            extended
                .iter()
                .fold(0u64, |acc, &byte| (acc << 8) | u64::from(byte))
        };
        if opcode.is_control() {
            if !fin {
                return Err(ProtocolError::FragmentedControl);
            }
            if declared > MAX_CONTROL_PAYLOAD {
                return Err(ProtocolError::ControlTooLong);
            }
        }
        if b1 & 0x80 == 0 {
            return Err(ProtocolError::UnmaskedFrame);
        }
        if declared >> 63 != 0 {
            return Err(ProtocolError::LengthMsbSet);
        }
        let limit = self.max_message_bytes;
        let already = match (&self.partial, opcode) {
            (Some(partial), OpCode::Continuation) => partial.data.len(),
            _ => 0,
        };
        let payload_len = usize::try_from(declared)
            .ok()
            .filter(|&len| len <= limit.saturating_sub(already))
            .ok_or(ProtocolError::MessageTooBig { limit })?;
        match (opcode, self.partial.is_some()) {
            (OpCode::Continuation, false) => return Err(ProtocolError::ContinuationWithoutStart),
            (OpCode::Text | OpCode::Binary, true) => {
                return Err(ProtocolError::ExpectedContinuation);
            }
            _ => {}
        }

        let mask_start = 2 + extended_len;
        let Some(&[m0, m1, m2, m3]) = buf.get(mask_start..mask_start + 4) else {
            return Ok(None);
        };
        Ok(Some(Header {
            fin,
            opcode,
            mask: [m0, m1, m2, m3],
            header_len: mask_start + 4,
            payload_len,
        }))
    }

    /// Handles one complete, unmasked frame whose header passed
    /// [`Decoder::parse_header`]; returns a message if one is now complete.
    fn on_frame(
        &mut self,
        opcode: OpCode,
        fin: bool,
        payload: BytesMut,
    ) -> Result<Option<Message>, ProtocolError> {
        match opcode {
            OpCode::Ping => Ok(Some(Message::Ping(payload.freeze()))),
            OpCode::Pong => Ok(Some(Message::Pong(payload.freeze()))),
            OpCode::Close => parse_close(&payload).map(|close| Some(Message::Close(close))),
            OpCode::Text | OpCode::Binary => {
                let is_text = opcode == OpCode::Text;
                let utf8_valid_up_to = if is_text {
                    validate_utf8(&payload, 0, fin)?
                } else {
                    0
                };
                if fin {
                    return Ok(Some(data_message(is_text, payload.freeze())));
                }
                self.partial = Some(Box::new(Partial {
                    is_text,
                    data: payload,
                    utf8_valid_up_to,
                }));
                Ok(None)
            }
            OpCode::Continuation => {
                let Some(mut partial) = self.partial.take() else {
                    return Err(ProtocolError::ContinuationWithoutStart);
                };
                partial.data.extend_from_slice(&payload);
                if partial.is_text {
                    partial.utf8_valid_up_to =
                        validate_utf8(&partial.data, partial.utf8_valid_up_to, fin)?;
                }
                if fin {
                    return Ok(Some(data_message(partial.is_text, partial.data.freeze())));
                }
                self.partial = Some(partial);
                Ok(None)
            }
        }
    }
}

/// Builds the message for a complete data payload.
fn data_message(is_text: bool, payload: Bytes) -> Message {
    if is_text {
        Message::Text(payload)
    } else {
        Message::Binary(payload)
    }
}

/// Extends the validated UTF-8 prefix of `data`, which starts at
/// `valid_up_to`, and returns its new length. An incomplete character at the
/// end is tolerated unless `is_final`; bytes that can never become valid fail
/// immediately.
fn validate_utf8(data: &[u8], valid_up_to: usize, is_final: bool) -> Result<usize, ProtocolError> {
    let unchecked = data.get(valid_up_to..).unwrap_or_default();
    match std::str::from_utf8(unchecked) {
        Ok(_) => Ok(data.len()),
        Err(err) if err.error_len().is_none() && !is_final => Ok(valid_up_to + err.valid_up_to()),
        Err(_) => Err(ProtocolError::InvalidUtf8),
    }
}

/// Parses and validates a close frame body (RFC 6455 section 5.5.1).
fn parse_close(payload: &[u8]) -> Result<Option<CloseFrame>, ProtocolError> {
    match *payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::CloseBodyOneByte),
        [high, low, ref reason @ ..] => {
            let code = CloseCode(u16::from_be_bytes([high, low]));
            if !code.is_valid_on_wire() {
                return Err(ProtocolError::InvalidCloseCode(code.0));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(Some(CloseFrame {
                code,
                reason: reason.to_owned(),
            }))
        }
    }
}

/// The length of the unmasked header the server puts in front of a payload of
/// `payload_len` bytes: 2, 4 or 10.
///
/// Exists so callers can size a buffer for header plus payload exactly.
pub fn header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// Writes the header of a final, unmasked server frame to `out` ([`header_len`] bytes).
///
/// Exists so callers can assemble header and payload in one buffer they own
/// (for example, encoding a JSON payload straight after the header, or filling in
/// room left in front of it) without an intermediate copy. The minimal length
/// encoding is used.
pub fn frame_header(opcode: OpCode, payload_len: usize, out: &mut impl BufMut) {
    out.put_u8(0x80 | opcode.as_u8());
    write_length(payload_len, 0, out);
}

/// Writes the second header byte (with `mask_bit`) and the extended length.
fn write_length(payload_len: usize, mask_bit: u8, out: &mut impl BufMut) {
    match u16::try_from(payload_len) {
        // The match arm guarantees the value fits in 7 bits.
        Ok(len @ 0..=125) => out.put_u8(mask_bit | len as u8),
        Ok(len) => {
            out.put_u8(mask_bit | 126);
            out.put_u16(len);
        }
        Err(_) => {
            out.put_u8(mask_bit | 127);
            out.put_u64(payload_len as u64);
        }
    }
}

/// Encodes `payload` as one final, unmasked server frame.
///
/// Exists for the server's send path; it allocates exactly once, exactly
/// header plus payload bytes, and the result can be shared between all the
/// connections a notification fans out to.
pub fn encode_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(header_len(payload.len()) + payload.len());
    frame_header(opcode, payload.len(), &mut out);
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// The opcode and payload of `frame`, one whole final unmasked frame as [`encode_frame`] (or a
/// frame built in place with [`frame_header`]) makes it; `None` for anything else.
///
/// Exists for transports that carry the server's messages without WebSocket framing (Server-Sent
/// Events): a message's frame is built once for every subscriber, and each of them takes the
/// payload as a slice of the same bytes, without a copy.
pub fn server_frame_payload(frame: &Bytes) -> Option<(OpCode, Bytes)> {
    let [first, second, ..] = frame[..] else {
        return None;
    };
    if first & 0xF0 != 0x80 {
        return None;
    }
    let opcode = OpCode::from_u8(first & 0x0F)?;
    let (header, len) = match second {
        0..=125 => (2, u64::from(second)),
        126 => (
            4,
            u64::from(u16::from_be_bytes(frame.get(2..4)?.try_into().ok()?)),
        ),
        127 => (10, u64::from_be_bytes(frame.get(2..10)?.try_into().ok()?)),
        _ => return None,
    };
    let payload = frame.get(header..)?;
    (payload.len() as u64 == len).then(|| (opcode, frame.slice(header..)))
}

/// Encodes a server close frame with `code` and `reason`.
///
/// Exists so the server can start or answer the closing handshake; the reason
/// is truncated to at most 123 bytes (on a character boundary) so the frame
/// stays within the 125-byte control frame limit. `code` should be one that
/// is valid on the wire.
pub fn encode_close(code: CloseCode, reason: &str) -> Bytes {
    let reason_len = (0..=reason.len().min(MAX_CLOSE_REASON))
        .rev()
        .find(|&end| reason.is_char_boundary(end))
        .unwrap_or(0);
    let reason = reason.as_bytes().get(..reason_len).unwrap_or_default();
    let payload_len = 2 + reason.len();
    let mut out = Vec::with_capacity(header_len(payload_len) + payload_len);
    frame_header(OpCode::Close, payload_len, &mut out);
    out.extend_from_slice(&code.0.to_be_bytes());
    out.extend_from_slice(reason);
    Bytes::from(out)
}

/// Encodes one masked frame as a client would send it.
///
/// Exists for tests, fuzzing and benchmarks of the decoder, which only
/// accepts masked client frames. `fin` controls fragmentation; the minimal
/// length encoding is used and RSV bits are clear.
pub fn encode_masked(opcode: OpCode, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header_len(payload.len()) + 4 + payload.len());
    out.push(if fin { 0x80 } else { 0 } | opcode.as_u8());
    write_length(payload.len(), 0x80, &mut out);
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_frames_give_back_their_payload() {
        for len in [0, 1, 125, 126, 300, 0xFFFF, 0x1_0000] {
            let payload = vec![b'x'; len];
            let frame = encode_frame(OpCode::Text, &payload);
            let (opcode, got) = server_frame_payload(&frame).expect("a server frame");
            assert_eq!((opcode, &got[..]), (OpCode::Text, &payload[..]), "{len}");
            assert!(server_frame_payload(&frame.slice(..frame.len() - 1)).is_none());
        }
        let ping = encode_frame(OpCode::Ping, b"");
        assert_eq!(
            server_frame_payload(&ping),
            Some((OpCode::Ping, Bytes::new()))
        );
        let masked = Bytes::from(encode_masked(OpCode::Text, true, b"hi", [1, 2, 3, 4]));
        assert!(
            server_frame_payload(&masked).is_none(),
            "client frames are not ours"
        );
        let unfinished = Bytes::from_static(&[0x01, 0x00]);
        assert!(server_frame_payload(&unfinished).is_none());
        assert!(server_frame_payload(&Bytes::from_static(&[0x81])).is_none());
    }

    const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];
    const LIMIT: usize = 1 << 20;

    fn masked(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        encode_masked(opcode, fin, payload, MASK)
    }

    /// Decodes everything in `bytes`, returning the messages and the first error.
    fn decode_all(decoder: &mut Decoder, bytes: &[u8]) -> (Vec<Message>, Option<ProtocolError>) {
        let mut buf = BytesMut::from(bytes);
        let mut messages = Vec::new();
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(message)) => messages.push(message),
                Ok(None) => return (messages, None),
                Err(err) => return (messages, Some(err)),
            }
        }
    }

    fn decode_err(bytes: &[u8]) -> ProtocolError {
        match decode_all(&mut Decoder::new(LIMIT), bytes) {
            (_, Some(err)) => err,
            (messages, None) => panic!("expected an error, got {messages:?}"),
        }
    }

    fn decode_one(bytes: &[u8]) -> Message {
        let mut buf = BytesMut::from(bytes);
        let message = Decoder::new(LIMIT)
            .decode(&mut buf)
            .expect("valid frame")
            .expect("complete frame");
        assert!(buf.is_empty(), "frame fully consumed");
        message
    }

    /// A masked header with an explicit 7-bit length code and extended length
    /// bytes, for non-minimal and out-of-range lengths.
    fn raw_header(first: u8, len_code: u8, extended: &[u8]) -> Vec<u8> {
        let mut out = vec![first, 0x80 | len_code];
        out.extend_from_slice(extended);
        out.extend_from_slice(&MASK);
        out
    }

    #[test]
    fn opcode_round_trips_and_rejects_reserved() {
        for value in 0u8..=0xFF {
            match OpCode::from_u8(value) {
                Some(opcode) => assert_eq!(opcode.as_u8(), value),
                None => assert!(matches!(value, 0x3..=0x7 | 0xB..)),
            }
        }
    }

    #[test]
    fn idle_decoder_is_two_words() {
        assert_eq!(
            std::mem::size_of::<Decoder>(),
            2 * std::mem::size_of::<usize>()
        );
    }

    #[test]
    fn every_size_class_round_trips() {
        for len in [0usize, 1, 125, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let frame = masked(OpCode::Binary, true, &payload);
            assert_eq!(frame.len(), header_len(len) + 4 + len, "len {len}");
            assert_eq!(
                decode_one(&frame),
                Message::Binary(Bytes::from(payload.clone()))
            );

            let server = encode_frame(OpCode::Binary, &payload);
            assert_eq!(server.len(), header_len(len) + len);
            assert_eq!(server[0], 0x82);
            assert_eq!(&server[header_len(len)..], &payload[..]);
        }
    }

    #[test]
    fn header_sizes_use_minimal_encoding() {
        let cases: [(usize, &[u8]); 6] = [
            (0, &[0x81, 0]),
            (125, &[0x81, 125]),
            (126, &[0x81, 126, 0, 126]),
            (65535, &[0x81, 126, 0xFF, 0xFF]),
            (65536, &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
            (1 << 32, &[0x81, 127, 0, 0, 0, 1, 0, 0, 0, 0]),
        ];
        for (len, expected) in cases {
            let mut out = Vec::new();
            frame_header(OpCode::Text, len, &mut out);
            assert_eq!(out, expected, "len {len}");
            assert_eq!(header_len(len), expected.len());
        }
    }

    #[test]
    fn text_and_control_frames_decode() {
        assert_eq!(
            decode_one(&masked(OpCode::Text, true, "héllo".as_bytes())),
            Message::Text(Bytes::from("héllo"))
        );
        assert_eq!(
            decode_one(&masked(OpCode::Ping, true, b"p")),
            Message::Ping(Bytes::from_static(b"p"))
        );
        assert_eq!(
            decode_one(&masked(OpCode::Pong, true, b"")),
            Message::Pong(Bytes::new())
        );
        assert_eq!(
            decode_one(&masked(OpCode::Close, true, b"")),
            Message::Close(None)
        );
        assert_eq!(
            decode_one(&masked(OpCode::Close, true, b"\x03\xE8bye")),
            Message::Close(Some(CloseFrame {
                code: CloseCode::NORMAL,
                reason: "bye".to_owned()
            }))
        );
    }

    #[test]
    fn several_frames_in_one_buffer() {
        let mut bytes = masked(OpCode::Text, true, b"a");
        bytes.extend(masked(OpCode::Binary, true, b"b"));
        let (messages, err) = decode_all(&mut Decoder::new(LIMIT), &bytes);
        assert_eq!(err, None);
        assert_eq!(
            messages,
            [
                Message::Text(Bytes::from_static(b"a")),
                Message::Binary(Bytes::from_static(b"b"))
            ]
        );
    }

    #[test]
    fn non_minimal_lengths_are_accepted() {
        let mut frame = raw_header(0x82, 126, &[0, 3]);
        frame.extend_from_slice(b"abc");
        apply_mask(&mut frame[8..], MASK);
        assert_eq!(decode_one(&frame), Message::Binary(Bytes::from("abc")));

        let mut ping = raw_header(0x89, 127, &[0, 0, 0, 0, 0, 0, 0, 2]);
        ping.extend_from_slice(b"hi");
        apply_mask(&mut ping[14..], MASK);
        assert_eq!(decode_one(&ping), Message::Ping(Bytes::from("hi")));
    }

    #[test]
    fn fragments_reassemble_around_interleaved_ping() {
        let mut bytes = masked(OpCode::Text, false, b"Hel");
        bytes.extend(masked(OpCode::Ping, true, b"ping"));
        bytes.extend(masked(OpCode::Continuation, false, b""));
        bytes.extend(masked(OpCode::Continuation, false, b"lo, "));
        bytes.extend(masked(OpCode::Pong, true, b""));
        bytes.extend(masked(OpCode::Continuation, true, b"world"));
        bytes.extend(masked(OpCode::Binary, false, b"\x00"));
        bytes.extend(masked(OpCode::Continuation, true, b"\xFF"));
        let mut decoder = Decoder::new(LIMIT);
        let (messages, err) = decode_all(&mut decoder, &bytes);
        assert_eq!(err, None);
        assert_eq!(
            messages,
            [
                Message::Ping(Bytes::from_static(b"ping")),
                Message::Pong(Bytes::new()),
                Message::Text(Bytes::from_static(b"Hello, world")),
                Message::Binary(Bytes::from_static(b"\x00\xFF")),
            ]
        );
        assert!(decoder.partial.is_none());
    }

    #[test]
    fn utf8_char_split_across_fragments() {
        let text = "a😀b".as_bytes(); // the emoji is 4 bytes at offset 1
        for split in 2..=4 {
            let mut bytes = masked(OpCode::Text, false, &text[..split]);
            bytes.extend(masked(OpCode::Continuation, true, &text[split..]));
            assert_eq!(
                decode_all(&mut Decoder::new(LIMIT), &bytes),
                (vec![Message::Text(Bytes::from("a😀b"))], None),
                "split at {split}"
            );
        }
        // One byte per fragment.
        let mut bytes = masked(OpCode::Text, false, &text[..1]);
        for byte in &text[1..] {
            bytes.extend(masked(
                OpCode::Continuation,
                false,
                std::slice::from_ref(byte),
            ));
        }
        bytes.extend(masked(OpCode::Continuation, true, b""));
        assert_eq!(
            decode_all(&mut Decoder::new(LIMIT), &bytes),
            (vec![Message::Text(Bytes::from("a😀b"))], None)
        );
    }

    #[test]
    fn invalid_utf8_fragment_fails_fast() {
        let mut decoder = Decoder::new(LIMIT);
        let mut buf = BytesMut::from(&masked(OpCode::Text, false, b"ok\xC0\x80")[..]);
        assert_eq!(decoder.decode(&mut buf), Err(ProtocolError::InvalidUtf8));

        // Also when the bad bytes arrive in a continuation.
        let mut bytes = masked(OpCode::Text, false, b"ok");
        bytes.extend(masked(OpCode::Continuation, false, b"\xF0\x28"));
        assert_eq!(decode_err(&bytes), ProtocolError::InvalidUtf8);
    }

    #[test]
    fn incomplete_utf8_at_end_of_message_fails() {
        assert_eq!(
            decode_err(&masked(OpCode::Text, true, b"\xF0\x9F\x98")),
            ProtocolError::InvalidUtf8
        );
        let mut bytes = masked(OpCode::Text, false, b"\xF0\x9F");
        bytes.extend(masked(OpCode::Continuation, true, b"\x98"));
        assert_eq!(decode_err(&bytes), ProtocolError::InvalidUtf8);
    }

    #[test]
    fn frame_fed_one_byte_at_a_time() {
        let payload = vec![7u8; 300];
        let frame = masked(OpCode::Binary, true, &payload);
        let mut decoder = Decoder::new(LIMIT);
        let mut buf = BytesMut::new();
        for (i, byte) in frame.iter().enumerate() {
            buf.extend_from_slice(&[*byte]);
            let result = decoder.decode(&mut buf).expect("valid prefix");
            if i + 1 < frame.len() {
                assert_eq!(result, None, "byte {i}");
                assert_eq!(buf.len(), i + 1, "nothing consumed at byte {i}");
            } else {
                assert_eq!(result, Some(Message::Binary(Bytes::from(payload.clone()))));
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn reserved_bits_are_rejected() {
        for rsv in [0x40, 0x20, 0x10] {
            let mut frame = masked(OpCode::Text, true, b"x");
            frame[0] |= rsv;
            assert_eq!(decode_err(&frame), ProtocolError::ReservedBits);
        }
    }

    #[test]
    fn reserved_opcodes_are_rejected() {
        for opcode in [0x3, 0x7, 0xB, 0xF] {
            let mut frame = masked(OpCode::Binary, true, b"x");
            frame[0] = 0x80 | opcode;
            assert_eq!(decode_err(&frame), ProtocolError::UnknownOpcode(opcode));
        }
    }

    #[test]
    fn control_frame_rules() {
        assert_eq!(
            decode_err(&masked(OpCode::Ping, false, b"")),
            ProtocolError::FragmentedControl
        );
        assert_eq!(
            decode_err(&masked(OpCode::Pong, true, &[0; 126])),
            ProtocolError::ControlTooLong
        );
        assert_eq!(
            decode_one(&masked(OpCode::Ping, true, &[0; 125])),
            Message::Ping(Bytes::from(vec![0; 125]))
        );
        // Detected from the header alone.
        assert_eq!(
            decode_err(&raw_header(0x88, 126, &[0, 200])),
            ProtocolError::ControlTooLong
        );
    }

    #[test]
    fn unmasked_frames_are_rejected() {
        let mut frame = encode_frame(OpCode::Text, b"hi").to_vec();
        assert_eq!(decode_err(&frame), ProtocolError::UnmaskedFrame);
        frame[1] = 0; // header-only, empty payload
        assert_eq!(decode_err(&frame[..2]), ProtocolError::UnmaskedFrame);
    }

    #[test]
    fn continuation_without_start_is_rejected() {
        assert_eq!(
            decode_err(&masked(OpCode::Continuation, true, b"x")),
            ProtocolError::ContinuationWithoutStart
        );
    }

    #[test]
    fn new_data_frame_inside_fragmented_message_is_rejected() {
        let mut bytes = masked(OpCode::Binary, false, b"x");
        bytes.extend(masked(OpCode::Text, true, b"y"));
        assert_eq!(decode_err(&bytes), ProtocolError::ExpectedContinuation);
    }

    #[test]
    fn close_frame_validation() {
        assert_eq!(
            decode_err(&masked(OpCode::Close, true, b"\x03")),
            ProtocolError::CloseBodyOneByte
        );
        for code in [0u16, 999, 1004, 1005, 1006, 1012, 1015, 2999, 5000] {
            assert_eq!(
                decode_err(&masked(OpCode::Close, true, &code.to_be_bytes())),
                ProtocolError::InvalidCloseCode(code)
            );
        }
        assert_eq!(
            decode_err(&masked(OpCode::Close, true, b"\x03\xE8\xFF")),
            ProtocolError::InvalidUtf8
        );
        assert_eq!(
            decode_one(&masked(OpCode::Close, true, b"\x0F\xA0")),
            Message::Close(Some(CloseFrame {
                code: CloseCode(4000),
                reason: String::new()
            }))
        );
    }

    #[test]
    fn message_too_big_from_header_alone() {
        // 10 header bytes declaring 2^40, no mask key and no payload yet.
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        let mut decoder = Decoder::new(LIMIT);
        let mut buf = BytesMut::from(&header[..]);
        assert_eq!(
            decoder.decode(&mut buf),
            Err(ProtocolError::MessageTooBig { limit: LIMIT })
        );
    }

    #[test]
    fn message_size_limit_is_inclusive_and_covers_fragments() {
        let mut decoder = Decoder::new(4);
        assert_eq!(
            decode_all(&mut decoder, &masked(OpCode::Binary, true, b"1234")),
            (vec![Message::Binary(Bytes::from_static(b"1234"))], None)
        );
        assert_eq!(
            decode_all(
                &mut Decoder::new(4),
                &masked(OpCode::Binary, true, b"12345")
            ),
            (vec![], Some(ProtocolError::MessageTooBig { limit: 4 }))
        );
        let mut bytes = masked(OpCode::Text, false, b"123");
        bytes.extend(masked(OpCode::Ping, true, b"pp"));
        bytes.extend(masked(OpCode::Continuation, true, b"45"));
        assert_eq!(
            decode_all(&mut Decoder::new(4), &bytes),
            (
                vec![Message::Ping(Bytes::from_static(b"pp"))],
                Some(ProtocolError::MessageTooBig { limit: 4 })
            )
        );
    }

    #[test]
    fn length_with_msb_set_is_rejected() {
        let header = raw_header(0x82, 127, &(1u64 << 63 | 5).to_be_bytes());
        assert_eq!(
            Decoder::new(usize::MAX).decode(&mut BytesMut::from(&header[..10])),
            Err(ProtocolError::LengthMsbSet)
        );
    }

    #[test]
    fn error_texts_fit_a_close_reason_and_map_to_codes() {
        let errors = [
            ProtocolError::UnmaskedFrame,
            ProtocolError::ReservedBits,
            ProtocolError::UnknownOpcode(0xF),
            ProtocolError::FragmentedControl,
            ProtocolError::ControlTooLong,
            ProtocolError::ContinuationWithoutStart,
            ProtocolError::ExpectedContinuation,
            ProtocolError::InvalidUtf8,
            ProtocolError::InvalidCloseCode(u16::MAX),
            ProtocolError::CloseBodyOneByte,
            ProtocolError::MessageTooBig { limit: usize::MAX },
            ProtocolError::LengthMsbSet,
        ];
        for err in errors {
            assert!(err.to_string().len() <= 60, "{err}");
            let expected = match err {
                ProtocolError::InvalidUtf8 => 1007,
                ProtocolError::MessageTooBig { .. } => 1009,
                _ => 1002,
            };
            assert_eq!(err.close_code(), CloseCode(expected), "{err}");
        }
    }

    #[test]
    fn encode_close_truncates_on_char_boundary() {
        let frame = encode_close(CloseCode::GOING_AWAY, "bye");
        assert_eq!(&frame[..], b"\x88\x05\x03\xE9bye");

        // 122 ASCII bytes then a 2-byte char: the char would end at 124 > 123.
        let reason = format!("{}é", "x".repeat(122));
        let frame = encode_close(CloseCode::NORMAL, &reason);
        assert_eq!(frame[1] as usize, 2 + 122);
        assert_eq!(&frame[4..], "x".repeat(122).as_bytes());

        let long = "€".repeat(100);
        let frame = encode_close(CloseCode::NORMAL, &long);
        assert!(frame.len() <= 2 + 125);
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
        assert_eq!(frame.len() - 4, 123); // 41 three-byte chars
    }

    #[test]
    fn server_frames_are_final_and_unmasked() {
        for opcode in [OpCode::Text, OpCode::Binary, OpCode::Ping, OpCode::Pong] {
            let frame = encode_frame(opcode, b"abc");
            assert_eq!(&frame[..], [0x80 | opcode.as_u8(), 3, b'a', b'b', b'c']);
        }
    }
}
