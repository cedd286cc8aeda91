//! Helpers shared by the fuzz targets (included with `#[path]`, so each
//! target only uses part of it).
#![allow(dead_code)]

use herald::ws::frame::Message;

/// The syntactic extent of the client frame at the front of `buf`, read
/// straight from RFC 6455 section 5.2 without validating anything:
/// `Some((header_len, payload_len))` once the header (including the masking
/// key, if the mask bit is set) is complete, `None` while it is not.
/// The payload length is a `u64` because a hostile header can declare 2^64-1.
pub fn frame_extent(buf: &[u8]) -> Option<(usize, u64)> {
    let (&b0, rest) = buf.split_first()?;
    let _ = b0;
    let &b1 = rest.first()?;
    let (ext, len) = match b1 & 0x7F {
        126 => {
            let bytes = buf.get(2..4)?;
            (2, u64::from(u16::from_be_bytes([bytes[0], bytes[1]])))
        }
        127 => {
            let bytes: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            (8, u64::from_be_bytes(bytes))
        }
        n => (0, u64::from(n)),
    };
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    let header_len = 2 + ext + mask;
    if buf.len() < header_len {
        return None;
    }
    Some((header_len, len))
}

/// Whether `buf` starts with a complete frame (header and payload).
pub fn has_complete_frame(buf: &[u8]) -> bool {
    match frame_extent(buf) {
        Some((header, len)) => (buf.len() - header) as u64 >= len,
        None => false,
    }
}

/// Offsets at which frames start when `stream` is cut purely by the header
/// fields (the chain stops at the first frame that is not complete). Whatever
/// a decoder consumes must end on one of these offsets.
pub fn frame_boundaries(stream: &[u8]) -> Vec<usize> {
    let mut out = vec![0];
    let mut pos = 0usize;
    while let Some((header, len)) = frame_extent(&stream[pos..]) {
        let available = (stream.len() - pos - header) as u64;
        if len > available {
            break;
        }
        pos += header + len as usize;
        out.push(pos);
    }
    out
}

/// Splits a server frame (unmasked, final) into its first byte and payload,
/// asserting the 2/4/10-byte header rules: minimal length encoding, no mask,
/// no RSV bits, and the declared length is exactly what follows.
pub fn strip_server_frame(frame: &[u8]) -> (u8, &[u8]) {
    assert!(frame.len() >= 2, "server frame shorter than a header");
    let b0 = frame[0];
    assert_eq!(b0 & 0x80, 0x80, "server frame must be final");
    assert_eq!(b0 & 0x70, 0, "server frame must not set RSV bits");
    let b1 = frame[1];
    assert_eq!(b1 & 0x80, 0, "server frame must not be masked");
    let (header, len) = match b1 {
        126 => {
            assert!(frame.len() >= 4);
            let len = usize::from(u16::from_be_bytes([frame[2], frame[3]]));
            assert!(len >= 126, "16-bit length {len} is not minimal");
            (4, len)
        }
        127 => {
            assert!(frame.len() >= 10);
            let len = u64::from_be_bytes(frame[2..10].try_into().unwrap());
            assert!(len > 0xFFFF, "64-bit length {len} is not minimal");
            assert_eq!(len >> 63, 0, "64-bit length has its MSB set");
            (10, usize::try_from(len).unwrap())
        }
        n => (2, usize::from(n)),
    };
    assert_eq!(
        frame.len() - header,
        len,
        "declared length must match the payload exactly (one frame)"
    );
    (b0, &frame[header..])
}

/// The deepest nesting `serde_json::from_str::<serde_json::Value>` accepts
/// with its default recursion limit (the deserializer starts with 128 and
/// fails when a nested value takes it to 0). `check_json` asserts that
/// serde_json reads every valid document up to this depth.
pub const SERDE_JSON_MAX_DEPTH: usize = 127;

/// The JSON payload of a single server text frame.
pub fn text_frame_json(frame: &[u8]) -> Json {
    let (b0, payload) = strip_server_frame(frame);
    assert_eq!(b0, 0x81, "expected FIN + text opcode");
    let text = std::str::from_utf8(payload).expect("text frame payload is UTF-8");
    check_json(text).unwrap_or_else(|err| panic!("frame is not JSON ({err}): {text}"))
}

/// Parses `text` as one JSON document with the reference parser below and
/// cross-checks serde_json: its syntax check (`IgnoredAny`, no depth limit)
/// must agree, and building a `serde_json::Value` must succeed too unless the
/// only problem is a number outside f64's range (valid JSON by RFC 8259's
/// grammar, which Herald passes through untouched), nesting deeper than
/// [`SERDE_JSON_MAX_DEPTH`], or an unpaired `\u` surrogate escape (RFC 8259 section 8.2:
/// grammatically valid, meaning unpredictable).
pub fn check_json(text: &str) -> Result<Json, String> {
    let ours = Json::parse(text);
    let serde_syntax = {
        use serde::Deserialize as _;
        let mut de = serde_json::Deserializer::from_str(text);
        de.disable_recursion_limit();
        serde::de::IgnoredAny::deserialize(&mut de).and_then(|_| de.end())
    };
    assert_eq!(
        ours.is_ok(),
        serde_syntax.is_ok(),
        "reference JSON parser ({ours:?}) and serde_json ({serde_syntax:?}) disagree on {text:?}"
    );
    if let Ok(value) = &ours {
        match serde_json::from_str::<serde_json::Value>(text) {
            Err(err) => {
                let msg = err.to_string();
                assert!(
                    msg.contains("number out of range")
                        || msg.contains("surrogate")
                        || msg.contains("hex escape")
                        || msg.contains("unicode code point")
                        || (msg.contains("recursion limit")
                            && value.depth() > SERDE_JSON_MAX_DEPTH),
                    "serde_json::Value refuses valid JSON ({msg}): {text:?}"
                );
            }
            // Keeps SERDE_JSON_MAX_DEPTH honest.
            Ok(_) => assert!(
                value.depth() <= SERDE_JSON_MAX_DEPTH,
                "serde_json::Value read {} levels, SERDE_JSON_MAX_DEPTH is wrong",
                value.depth()
            ),
        }
    }
    ours
}

/// A JSON value as the reference parser sees it: numbers are kept as their
/// lexeme (so no range limit and exact comparison of passed-through JSON),
/// objects keep their members in order, duplicates included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Json {
    Null,
    Bool(bool),
    Number(String),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    /// Parses one JSON text (RFC 8259), surrounding whitespace allowed.
    pub fn parse(text: &str) -> Result<Json, String> {
        let mut p = JsonParser { s: text.as_bytes(), i: 0 };
        p.ws();
        let value = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing characters at {}", p.i));
        }
        Ok(value)
    }

    /// The member `key` of an object (the last one, like serde_json).
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(members) => members.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn is_object(&self) -> bool {
        matches!(self, Json::Object(_))
    }

    /// Number of distinct member names of an object.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = match self {
            Json::Object(members) => members.iter().map(|(k, _)| k.as_str()).collect(),
            _ => Vec::new(),
        };
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Nesting depth of arrays and objects (scalars are 0).
    pub fn depth(&self) -> usize {
        match self {
            Json::Array(items) => 1 + items.iter().map(Json::depth).max().unwrap_or(0),
            Json::Object(members) => 1 + members.iter().map(|(_, v)| v.depth()).max().unwrap_or(0),
            _ => 0,
        }
    }

    pub fn str(s: &str) -> Json {
        Json::String(s.to_owned())
    }

    pub fn num(n: u64) -> Json {
        Json::Number(n.to_string())
    }
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, lit: &[u8]) -> Result<(), String> {
        if self.s[self.i..].starts_with(lit) {
            self.i += lit.len();
            Ok(())
        } else {
            Err(format!("expected {:?} at {}", String::from_utf8_lossy(lit), self.i))
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        match self.peek() {
            Some(b'n') => self.eat(b"null").map(|()| Json::Null),
            Some(b't') => self.eat(b"true").map(|()| Json::Bool(true)),
            Some(b'f') => self.eat(b"false").map(|()| Json::Bool(false)),
            Some(b'"') => self.string().map(Json::String),
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(Json::Array(items));
                }
                loop {
                    self.ws();
                    items.push(self.value()?);
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Array(items));
                        }
                        _ => return Err(format!("bad array at {}", self.i)),
                    }
                }
            }
            Some(b'{') => {
                self.i += 1;
                let mut members = Vec::new();
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Ok(Json::Object(members));
                }
                loop {
                    self.ws();
                    if self.peek() != Some(b'"') {
                        return Err(format!("expected a key at {}", self.i));
                    }
                    let key = self.string()?;
                    self.ws();
                    self.eat(b":")?;
                    self.ws();
                    members.push((key, self.value()?));
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Object(members));
                        }
                        _ => return Err(format!("bad object at {}", self.i)),
                    }
                }
            }
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(format!("unexpected byte at {}", self.i)),
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<Json, String> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(format!("bad number at {}", self.i)),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(format!("bad fraction at {}", self.i));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(format!("bad exponent at {}", self.i));
            }
        }
        Ok(Json::Number(String::from_utf8(self.s[start..self.i].to_vec()).unwrap()))
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let hex = self.s.get(self.i..self.i + 4).ok_or("short \\u escape")?;
        let text = std::str::from_utf8(hex).map_err(|e| e.to_string())?;
        if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("bad \\u escape at {}", self.i));
        }
        self.i += 4;
        Ok(u32::from_str_radix(text, 16).unwrap())
    }

    fn string(&mut self) -> Result<String, String> {
        self.i += 1; // opening quote
        let mut out = String::new();
        loop {
            let start = self.i;
            while let Some(b) = self.peek() {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.i += 1;
            }
            out.push_str(std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?);
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.i += 1;
                    let esc = self.peek().ok_or("unterminated escape")?;
                    self.i += 1;
                    match esc {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hi = self.hex4()?;
                            // RFC 8259 section 8.2: unpaired surrogates match the
                            // grammar (their meaning is unpredictable); keep them
                            // as U+FFFD.
                            let mut c = hi;
                            if (0xD800..0xDC00).contains(&hi) && self.s[self.i..].starts_with(b"\\u") {
                                let save = self.i;
                                self.i += 2;
                                let lo = self.hex4()?;
                                if (0xDC00..0xE000).contains(&lo) {
                                    c = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                                } else {
                                    self.i = save;
                                }
                            }
                            out.push(char::from_u32(c).unwrap_or('\u{FFFD}'));
                        }
                        _ => return Err(format!("bad escape at {}", self.i)),
                    }
                }
                Some(_) => return Err(format!("control character in string at {}", self.i)),
                None => return Err("unterminated string".into()),
            }
        }
    }
}

/// A message in a form both Herald and tungstenite can be mapped to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

pub fn from_ours(message: Message) -> Msg {
    match message {
        Message::Text(b) => Msg::Text(b.to_vec()),
        Message::Binary(b) => Msg::Binary(b.to_vec()),
        Message::Ping(b) => Msg::Ping(b.to_vec()),
        Message::Pong(b) => Msg::Pong(b.to_vec()),
        Message::Close(c) => Msg::Close(c.map(|c| (c.code.0, c.reason))),
    }
}

/// A tiny deterministic PRNG (xorshift64*) for chunk sizes and masks derived
/// from one input byte, so a crash reproduces from its input alone.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u8) -> Self {
        Rng(0x9E37_79B9_7F4A_7C15 ^ u64::from(seed).wrapping_mul(0x2545_F491_4F6C_DD1D) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `1..=max`.
    pub fn chunk(&mut self, max: usize) -> usize {
        if max == usize::MAX {
            return usize::MAX;
        }
        1 + (self.next() % max as u64) as usize
    }

    pub fn mask(&mut self) -> [u8; 4] {
        (self.next() as u32).to_le_bytes()
    }
}
