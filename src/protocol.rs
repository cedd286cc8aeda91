//! The JSON protocol spoken on `format=json` WebSocket connections.
//!
//! [`parse_request`] reads what a client sends; the `*_frame` functions build what the server
//! sends, each as a complete WebSocket text frame in one [`Bytes`], so a frame built once per
//! publish is shared by every subscriber without another copy.

use std::borrow::Cow;

use base64::Engine as _;
use bytes::{Buf as _, Bytes};
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::name::{self, NameError};
use crate::registry::{Epoch, Position, Recovery, Standing};
use crate::ws::frame::{OpCode, frame_header, header_len};

/// The content of a message: how a publisher's bytes are carried to subscribers.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// Bytes known to be one valid JSON value; embedded as they are under `data`.
    Json(&'a [u8]),
    /// UTF-8 text that is not JSON; delivered as a JSON string under `data`.
    Text(&'a str),
    /// Bytes that are not UTF-8; delivered base64-encoded under `data_b64`.
    Binary(&'a [u8]),
}

impl<'a> Payload<'a> {
    /// Classifies an HTTP body: JSON when the publisher declared it (checked), text when it is
    /// UTF-8, binary otherwise.
    ///
    /// # Errors
    /// [`PayloadError::InvalidJson`] when `declared_json` is set and the body is not one JSON value.
    pub fn from_body(body: &'a [u8], declared_json: bool) -> Result<Self, PayloadError> {
        if declared_json {
            serde_json::from_slice::<&RawValue>(body)
                .map_err(|err| PayloadError::InvalidJson(JsonError::from_serde(&err)))?;
            check_depth(body, MAX_JSON_DEPTH).map_err(PayloadError::InvalidJson)?;
            return Ok(Payload::Json(body));
        }
        Ok(match std::str::from_utf8(body) {
            Ok(text) => Payload::Text(text),
            Err(_) => Payload::Binary(body),
        })
    }

    /// The bytes a `format=raw` subscriber receives, and whether they go in a text frame: a
    /// JSON string's text, unescaped; any other JSON value as its JSON text; text as it is;
    /// binary byte for byte. (A JSON string whose escapes name no Unicode text, a lone
    /// surrogate, cannot be text: it goes as its JSON text.)
    pub fn raw(&self) -> (Cow<'a, [u8]>, bool) {
        match *self {
            Payload::Json(json) => match string_value(json) {
                Some(Cow::Borrowed(text)) => (Cow::Borrowed(text.as_bytes()), true),
                Some(Cow::Owned(text)) => (Cow::Owned(text.into_bytes()), true),
                None => (Cow::Borrowed(json), true),
            },
            Payload::Text(text) => (Cow::Borrowed(text.as_bytes()), true),
            Payload::Binary(bytes) => (Cow::Borrowed(bytes), false),
        }
    }

    fn len_hint(&self) -> usize {
        match self {
            Payload::Json(bytes) | Payload::Binary(bytes) => bytes.len() * 4 / 3 + 4,
            Payload::Text(text) => text.len() + 16,
        }
    }
}

/// The deepest nesting of arrays and objects accepted in a payload. The envelope a payload is
/// delivered in adds one level, which makes 127: the most serde_json reads by default, and so
/// the most a subscriber written with it can parse. Payloads pass through untouched, so without
/// this limit a publisher could hand every subscriber a document its parser refuses.
pub const MAX_JSON_DEPTH: usize = 126;

/// The text of `json` (one valid JSON value, whitespace around it allowed) when it is a string,
/// borrowed when it has no escapes; `None` for any other value, and for a string that does not
/// decode to Unicode text.
fn string_value(json: &[u8]) -> Option<Cow<'_, str>> {
    let literal = json.trim_ascii();
    let inner = literal.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    if inner.contains(&b'\\') {
        serde_json::from_slice(literal).ok().map(Cow::Owned)
    } else {
        std::str::from_utf8(inner).ok().map(Cow::Borrowed)
    }
}

/// Checks that valid JSON nests no deeper than `limit`, in one pass without recursion.
fn check_depth(json: &[u8], limit: usize) -> Result<(), JsonError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in json {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Err(JsonError::TooDeep(limit));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Why text is not one JSON value, said in terms of the JSON text: where the parser stopped and
/// why, never which Rust type it was reading into.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// The text breaks the JSON syntax at `line`:`column`.
    #[error("{reason} at line {line} column {column}")]
    Syntax {
        /// The line the parser stopped on, from 1.
        line: usize,
        /// The column the parser stopped at, from 1.
        column: usize,
        /// What it found wrong there, e.g. "expected `,` or `}`".
        reason: String,
    },
    /// The text ends before its JSON value does.
    #[error("the text ends at line {line} column {column} before the JSON value is complete")]
    Truncated {
        /// The last line, from 1.
        line: usize,
        /// The column the text ends at.
        column: usize,
    },
    /// Arrays and objects nest deeper than the limit.
    #[error("nested deeper than {0} levels")]
    TooDeep(usize),
}

impl JsonError {
    /// Describes a serde_json refusal of text read as raw JSON (`&RawValue`, or a struct of
    /// raw and string fields), which can only be about the syntax. serde_json describes those
    /// in JSON's own terms; its position suffix is rebuilt from `line()` and `column()`, and its
    /// one piece of parser jargon reworded.
    fn from_serde(err: &serde_json::Error) -> Self {
        let (line, column) = (err.line(), err.column());
        if err.is_eof() {
            return JsonError::Truncated { line, column };
        }
        let text = err.to_string();
        let reason = text
            .strip_suffix(&format!(" at line {line} column {column}"))
            .unwrap_or(&text);
        let reason = match reason {
            "expected ident" => "expected `true`, `false` or `null`",
            other => other,
        };
        JsonError::Syntax {
            line,
            column,
            reason: reason.to_owned(),
        }
    }
}

/// A publish body that cannot be delivered as declared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The body was declared `application/json` but is not one JSON value within
    /// [`MAX_JSON_DEPTH`].
    #[error("body is not valid JSON: {0}")]
    InvalidJson(JsonError),
}

/// One request a client sent on a json connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// Start receiving the channel's messages.
    Subscribe {
        /// The channel, already validated.
        channel: Cow<'a, str>,
        /// The client's position in the channel: replay what follows it first.
        since: Option<Position>,
    },
    /// Stop receiving the channel's messages.
    Unsubscribe {
        /// The channel, already validated.
        channel: Cow<'a, str>,
    },
    /// Publish `data` to every subscriber of the channel.
    Publish {
        /// The channel, already validated.
        channel: Cow<'a, str>,
        /// One JSON value, as the client sent it (an explicit `null` included).
        data: &'a str,
    },
    /// Send `data` to every connection of one client id.
    Send {
        /// The receiving client id, already validated.
        to: Cow<'a, str>,
        /// One JSON value, as the client sent it (an explicit `null` included).
        data: &'a str,
    },
    /// Replace the connection's token (JWT auth) before it expires.
    Refresh {
        /// The new token, not yet verified.
        token: Cow<'a, str>,
    },
}

/// Why a client's request was refused. The connection stays open; the client gets an error
/// frame with [`RequestError::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The frame is not one JSON value, or nests deeper than [`MAX_JSON_DEPTH`] + 1 levels.
    #[error("invalid JSON: {0}")]
    InvalidJson(JsonError),
    /// The frame is JSON but not an object.
    #[error("the request must be a JSON object")]
    NotAnObject,
    /// A field that holds a name, a type or a token holds another kind of JSON value.
    #[error("field `{0}` must be a string")]
    NotAString(&'static str),
    /// A field the server reads appears more than once in the object.
    #[error("a request field appears more than once")]
    RepeatedField,
    /// A field the request type needs is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// `type` names no request this server knows.
    #[error("unknown request type")]
    UnknownType,
    /// The channel name breaks the naming rules.
    #[error("invalid channel name: {0}")]
    InvalidChannel(NameError),
    /// The client id breaks the naming rules.
    #[error("invalid client id: {0}")]
    InvalidClientId(NameError),
    /// `since` is not `{"epoch":<epoch>,"offset":<offset>}` with an epoch the server hands out.
    #[error(
        "since must be {{\"epoch\":<the epoch from a subscribed or welcome frame>,\"offset\":<the \
         offset of the last message you have>}}"
    )]
    InvalidPosition,
}

impl RequestError {
    /// The stable, machine-readable code carried in the error frame.
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::InvalidJson(_)
            | RequestError::NotAnObject
            | RequestError::NotAString(_)
            | RequestError::RepeatedField => "invalid_json",
            RequestError::MissingField(_) => "missing_field",
            RequestError::UnknownType => "unknown_type",
            RequestError::InvalidChannel(_) => "invalid_channel",
            RequestError::InvalidClientId(_) => "invalid_client_id",
            RequestError::InvalidPosition => "invalid_position",
        }
    }
}

/// A request as sent. The fields are read only as far as JSON goes (the ones that must be
/// strings as [`Text`]), so that serde refuses nothing but bad syntax and repeated fields, and
/// [`interpret`] says what else is wrong in the client's terms.
#[derive(Deserialize)]
struct WireRequest<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Text<'a>>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    channel: Option<Text<'a>>,
    #[serde(borrow)]
    to: Option<Text<'a>>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<Text<'a>>,
    #[serde(borrow)]
    since: Option<&'a RawValue>,
}

/// Reads a field that is there as `Some`, an explicit `null` included: `Option<&RawValue>` on
/// its own reads `"data":null` as `None`, the same as no `data` at all.
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// A request field that must be a string: its text, or the fact that it holds another JSON
/// value (`null` is an absent field, read as `None` around this).
enum Text<'a> {
    String(Cow<'a, str>),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TextVisitor)
    }
}

/// Takes any JSON value, keeping only a string's text.
struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Text<'de>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Text::String(Cow::Borrowed(text)))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Text::String(Cow::Owned(text.to_owned())))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Text::Other)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Text::Other)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Text::Other)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Text::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Text::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Text::Other)
    }
}

/// The text of a field that must be a string; `None` when it is absent or `null`.
fn string<'a>(
    field: Option<Text<'a>>,
    name: &'static str,
) -> Result<Option<Cow<'a, str>>, RequestError> {
    match field {
        None => Ok(None),
        Some(Text::String(text)) => Ok(Some(text)),
        Some(Text::Other) => Err(RequestError::NotAString(name)),
    }
}

/// A position as clients send it in `since`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WirePosition<'a> {
    #[serde(borrow)]
    epoch: Cow<'a, str>,
    offset: u64,
}

/// Reads a `since` value: `{"epoch":…,"offset":…}`.
fn parse_position(raw: &RawValue) -> Result<Position, RequestError> {
    let wire: WirePosition<'_> =
        serde_json::from_str(raw.get()).map_err(|_| RequestError::InvalidPosition)?;
    let epoch = Epoch::parse(&wire.epoch).ok_or(RequestError::InvalidPosition)?;
    Ok(Position {
        epoch,
        offset: wire.offset,
    })
}

/// What [`parse_request`] found: the request's `id` (echoed in the reply, even when the request
/// itself is refused) and the request or the reason it is refused.
#[derive(Debug)]
pub struct ParsedRequest<'a> {
    /// The client's `id`, as raw JSON, if it sent one.
    pub id: Option<&'a RawValue>,
    /// The request, or why it cannot be carried out.
    pub request: Result<Request<'a>, RequestError>,
}

/// Parses one text frame from a json-format client.
pub fn parse_request(text: &str) -> ParsedRequest<'_> {
    let refused = |err| ParsedRequest {
        id: None,
        request: Err(err),
    };
    // The request object is one level; its `data` and `id` may use the rest, exactly as deep
    // as an HTTP payload may be. Checked first, so that nothing too deep is echoed back either.
    if let Err(err) = check_depth(text.as_bytes(), MAX_JSON_DEPTH + 1) {
        return refused(RequestError::InvalidJson(err));
    }
    // serde would read an array as the request's fields in order.
    if !text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        return refused(RequestError::NotAnObject);
    }
    let wire: WireRequest<'_> = match serde_json::from_str(text) {
        Ok(wire) => wire,
        // Every field takes any JSON value: what is valid JSON yet refused is a repeated field.
        Err(err) if err.is_data() => return refused(RequestError::RepeatedField),
        Err(err) => return refused(RequestError::InvalidJson(JsonError::from_serde(&err))),
    };
    ParsedRequest {
        id: wire.id,
        request: interpret(wire),
    }
}

fn interpret(wire: WireRequest<'_>) -> Result<Request<'_>, RequestError> {
    let kind = string(wire.kind, "type")?.ok_or(RequestError::MissingField("type"))?;
    let channel = string(wire.channel, "channel")?;
    let to = string(wire.to, "to")?;
    let token = string(wire.token, "token")?;
    let channel = || -> Result<Cow<'_, str>, RequestError> {
        let channel = channel.ok_or(RequestError::MissingField("channel"))?;
        name::validate(&channel).map_err(RequestError::InvalidChannel)?;
        Ok(channel)
    };
    let data = wire
        .data
        .map(RawValue::get)
        .ok_or(RequestError::MissingField("data"));
    match &*kind {
        "subscribe" => Ok(Request::Subscribe {
            channel: channel()?,
            since: wire.since.map(parse_position).transpose()?,
        }),
        "unsubscribe" => Ok(Request::Unsubscribe {
            channel: channel()?,
        }),
        "publish" => Ok(Request::Publish {
            channel: channel()?,
            data: data?,
        }),
        "send" => {
            let to = to.ok_or(RequestError::MissingField("to"))?;
            name::validate(&to).map_err(RequestError::InvalidClientId)?;
            Ok(Request::Send { to, data: data? })
        }
        "refresh" => Ok(Request::Refresh {
            token: token.ok_or(RequestError::MissingField("token"))?,
        }),
        _ => Err(RequestError::UnknownType),
    }
}

/// Room left in front of every frame for the largest WebSocket header (2 + 8 bytes).
const HEADER_ROOM: usize = 10;

/// Builds a server text frame in one buffer: the JSON is written after [`HEADER_ROOM`] spare
/// bytes and the header is filled in backwards once the length is known, so neither the JSON
/// nor the frame is copied again.
struct TextFrame {
    buf: Vec<u8>,
}

impl TextFrame {
    fn with_capacity(json_len: usize) -> Self {
        let mut buf = Vec::with_capacity(HEADER_ROOM + json_len);
        buf.resize(HEADER_ROOM, 0);
        Self { buf }
    }

    fn push(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self
    }

    fn push_str(&mut self, text: &str) -> &mut Self {
        self.push(text.as_bytes())
    }

    /// Appends `text` as a JSON string literal.
    fn push_json_string(&mut self, text: &str) -> &mut Self {
        serde_json::to_writer(&mut self.buf, text).expect("writing to a Vec cannot fail");
        self
    }

    fn push_u64(&mut self, value: u64) -> &mut Self {
        let mut digits = itoa::Buffer::new();
        self.push_str(digits.format(value))
    }

    /// Appends `,"id":<id>` when the request carried an id.
    fn push_id(&mut self, id: Option<&RawValue>) -> &mut Self {
        if let Some(id) = id {
            self.push_str(r#","id":"#).push_str(id.get());
        }
        self
    }

    /// Appends `"epoch":…,"offset":…` and, for a recovery, `"recovered":…` (with `"reason"`).
    fn push_standing(&mut self, standing: &Standing) -> &mut Self {
        self.push_str(r#""epoch":""#)
            .push_str(standing.epoch.as_str())
            .push_str(r#"","offset":"#)
            .push_u64(standing.offset);
        match standing.recovery {
            Recovery::NotAsked => {}
            Recovery::Recovered => {
                self.push_str(r#","recovered":true"#);
            }
            Recovery::Failed(failure) => {
                self.push_str(r#","recovered":false,"reason":""#)
                    .push_str(failure.code())
                    .push_str("\"");
            }
        }
        self
    }

    /// Appends `,"data":…` or `,"data_b64":…` for the payload.
    fn push_payload(&mut self, payload: Payload<'_>) -> &mut Self {
        match payload {
            Payload::Json(json) => self.push_str(r#","data":"#).push(json),
            Payload::Text(text) => self.push_str(r#","data":"#).push_json_string(text),
            Payload::Binary(bytes) => {
                let engine = &base64::engine::general_purpose::STANDARD;
                self.push_str(r#","data_b64":""#);
                let start = self.buf.len();
                let encoded_len = base64::encoded_len(bytes.len(), true)
                    .expect("a message under the size limit has a base64 length");
                self.buf.resize(start + encoded_len, 0);
                engine
                    .encode_slice(bytes, &mut self.buf[start..])
                    .expect("the buffer was sized with encoded_len");
                self.push_str("\"")
            }
        }
    }

    fn finish(mut self) -> Bytes {
        self.push_str("}");
        let json_len = self.buf.len() - HEADER_ROOM;
        let start = HEADER_ROOM - header_len(json_len);
        frame_header(
            OpCode::Text,
            json_len,
            &mut &mut self.buf[start..HEADER_ROOM],
        );
        let mut frame = Bytes::from(self.buf);
        frame.advance(start);
        frame
    }
}

/// `{"type":"message","channel":…,"offset":…,"from":…,"data":…}`: a channel publish.
pub fn message_frame(
    channel: &str,
    offset: u64,
    from: Option<&str>,
    payload: Payload<'_>,
) -> Bytes {
    let mut frame = TextFrame::with_capacity(64 + channel.len() + payload.len_hint());
    frame
        .push_str(r#"{"type":"message","channel":"#)
        .push_json_string(channel)
        .push_str(r#","offset":"#)
        .push_u64(offset);
    if let Some(from) = from {
        frame.push_str(r#","from":"#).push_json_string(from);
    }
    frame.push_payload(payload);
    frame.finish()
}

/// The channel and offset of a channel message's envelope (the payload of a
/// [`message_frame`]); `None` for any other envelope.
///
/// Exists for transports that keep each subscriber's position in every channel next to the
/// shared frames (the event ids of a Server-Sent Events stream): it reads the fixed start that
/// [`message_frame`] writes (a valid channel name needs no escaping), not the whole JSON.
pub fn message_position(json: &[u8]) -> Option<(&str, u64)> {
    let rest = json.strip_prefix(br#"{"type":"message","channel":""#)?;
    let end = rest.iter().position(|&byte| byte == b'"')?;
    let channel = std::str::from_utf8(&rest[..end]).ok()?;
    let rest = rest[end..].strip_prefix(br#"","offset":"#)?;
    let digits = rest.iter().take_while(|byte| byte.is_ascii_digit()).count();
    let offset = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    Some((channel, offset))
}

/// `{"type":"direct","from":…,"data":…}`: a message to one client id.
pub fn direct_frame(from: Option<&str>, payload: Payload<'_>) -> Bytes {
    let mut frame = TextFrame::with_capacity(48 + payload.len_hint());
    frame.push_str(r#"{"type":"direct""#);
    if let Some(from) = from {
        frame.push_str(r#","from":"#).push_json_string(from);
    }
    frame.push_payload(payload);
    frame.finish()
}

/// `{"type":"broadcast","data":…}`: a message to every connection.
pub fn broadcast_frame(payload: Payload<'_>) -> Bytes {
    let mut frame = TextFrame::with_capacity(32 + payload.len_hint());
    frame
        .push_str(r#"{"type":"broadcast""#)
        .push_payload(payload);
    frame.finish()
}

/// The channel and the position a gap announcement with a position (a [`gap_frame`]) moves its
/// subscribers to; `None` for any other envelope, or a gap without a position.
///
/// For the same transports as [`message_position`]: after a gap a subscriber stands where the
/// channel goes on from, in what may be a new epoch.
pub fn gap_position(json: &[u8]) -> Option<(&str, Position)> {
    let rest = json.strip_prefix(br#"{"type":"gap","channel":""#)?;
    let end = rest.iter().position(|&byte| byte == b'"')?;
    let channel = std::str::from_utf8(&rest[..end]).ok()?;
    let rest = rest[end..].strip_prefix(br#"","epoch":""#)?;
    let end = rest.iter().position(|&byte| byte == b'"')?;
    let epoch = Epoch::parse(std::str::from_utf8(&rest[..end]).ok()?)?;
    let rest = rest[end..].strip_prefix(br#"","offset":"#)?;
    let digits = rest.iter().take_while(|byte| byte.is_ascii_digit()).count();
    let offset = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    Some((channel, Position { epoch, offset }))
}

/// `{"type":"gap","channel":…,"epoch":…,"offset":…}`: messages of the channel were missed
/// (cluster mode: the history could not replay all that the node missed while it was cut off
/// from Redis); what follows comes after `position`, which the client stores as its own. No
/// position when the node cannot tell where the stream stands.
pub fn gap_frame(channel: &str, position: Option<Position>) -> Bytes {
    let mut frame = TextFrame::with_capacity(64 + channel.len());
    frame
        .push_str(r#"{"type":"gap","channel":"#)
        .push_json_string(channel);
    if let Some(position) = position {
        frame
            .push_str(r#","epoch":""#)
            .push_str(position.epoch.as_str())
            .push_str(r#"","offset":"#)
            .push_u64(position.offset);
    }
    frame.finish()
}

/// `{"type":"welcome","client_id":…}`: the first frame on a json connection.
pub fn welcome_frame(client_id: &str, channels: &[(&str, Standing)]) -> Bytes {
    let mut frame = TextFrame::with_capacity(48 + client_id.len() + 80 * channels.len());
    frame
        .push_str(r#"{"type":"welcome","client_id":"#)
        .push_json_string(client_id);
    if !channels.is_empty() {
        frame.push_str(r#","channels":{"#);
        for (at, (channel, standing)) in channels.iter().enumerate() {
            if at > 0 {
                frame.push_str(",");
            }
            frame.push_json_string(channel).push_str(":{");
            frame.push_standing(standing);
            frame.push_str("}");
        }
        frame.push_str("}");
    }
    frame.finish()
}

/// `{"type":"subscribed","id":…,"channel":…,"epoch":…,"offset":…}`: the reply to subscribe,
/// with where the channel stands (the position to store) and, for a subscribe with `since`,
/// `"recovered"` and, when it is false, the `"reason"`.
pub fn subscribed_frame(id: Option<&RawValue>, channel: &str, standing: &Standing) -> Bytes {
    let mut frame = TextFrame::with_capacity(96 + channel.len());
    frame
        .push_str(r#"{"type":"subscribed""#)
        .push_id(id)
        .push_str(r#","channel":"#)
        .push_json_string(channel)
        .push_str(",");
    frame.push_standing(standing);
    frame.finish()
}

/// `{"type":"unsubscribed","id":…,"channel":…}`: the reply to unsubscribe (also sent when a
/// refreshed token no longer grants the channel).
pub fn unsubscribed_frame(id: Option<&RawValue>, channel: &str) -> Bytes {
    let mut frame = TextFrame::with_capacity(48 + channel.len());
    frame
        .push_str(r#"{"type":"unsubscribed""#)
        .push_id(id)
        .push_str(r#","channel":"#)
        .push_json_string(channel);
    frame.finish()
}

/// A channel message as the server stored it in its history, read back from its frame.
#[derive(Debug, Deserialize)]
pub struct StoredMessage<'a> {
    /// The message's offset.
    pub offset: u64,
    /// The publishing client's id, when a client published it.
    #[serde(borrow)]
    pub from: Option<Cow<'a, str>>,
    /// The payload as JSON (JSON and text payloads).
    #[serde(borrow)]
    pub data: Option<&'a RawValue>,
    /// The payload base64-encoded (binary payloads).
    #[serde(borrow)]
    pub data_b64: Option<Cow<'a, str>>,
}

impl StoredMessage<'_> {
    /// Reads a frame built by [`message_frame`]; `None` for anything else.
    pub fn parse(frame: &[u8]) -> Option<StoredMessage<'_>> {
        let json = frame.get(server_header_len(frame)?..)?;
        serde_json::from_slice(json).ok()
    }

    /// The payload bytes, as a `format=raw` subscriber gets them, and whether they go in a
    /// text frame.
    pub fn raw_payload(&self) -> Option<(Cow<'_, [u8]>, bool)> {
        match (&self.data, &self.data_b64) {
            (Some(data), None) => Some(Payload::Json(data.get().as_bytes()).raw()),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .ok()
                .map(|bytes| (Cow::Owned(bytes), false)),
            _ => None,
        }
    }
}

/// The length of the header of an unmasked frame the server built, if `frame` holds one.
fn server_header_len(frame: &[u8]) -> Option<usize> {
    match frame.get(1)? & 0x7f {
        126 => Some(4),
        127 => Some(10),
        _ => Some(2),
    }
}

/// `{"type":"published","id":…,"channel":…,"offset":…,"subscribers":…}`: the reply to a publish
/// (`"nodes"` instead of `"subscribers"` in cluster mode: `reach_field` names the count).
pub fn published_frame(
    id: Option<&RawValue>,
    channel: &str,
    offset: u64,
    reach_field: &str,
    subscribers: u64,
) -> Bytes {
    let mut frame = TextFrame::with_capacity(80 + channel.len());
    frame
        .push_str(r#"{"type":"published""#)
        .push_id(id)
        .push_str(r#","channel":"#)
        .push_json_string(channel)
        .push_str(r#","offset":"#)
        .push_u64(offset)
        .push_str(",\"")
        .push_str(reach_field)
        .push_str("\":")
        .push_u64(subscribers);
    frame.finish()
}

/// `{"type":"sent","id":…,"to":…,"connections":…}`: the reply to a direct send (`"nodes"`
/// instead of `"connections"` in cluster mode: `reach_field` names the count).
pub fn sent_frame(id: Option<&RawValue>, to: &str, reach_field: &str, connections: u64) -> Bytes {
    let mut frame = TextFrame::with_capacity(64 + to.len());
    frame
        .push_str(r#"{"type":"sent""#)
        .push_id(id)
        .push_str(r#","to":"#)
        .push_json_string(to)
        .push_str(",\"")
        .push_str(reach_field)
        .push_str("\":")
        .push_u64(connections);
    frame.finish()
}

/// `{"type":"refreshed","id":…,"expires_in":…}`: the reply to an accepted token refresh;
/// `expires_in` is in seconds.
pub fn refreshed_frame(id: Option<&RawValue>, expires_in: u64) -> Bytes {
    let mut frame = TextFrame::with_capacity(64);
    frame
        .push_str(r#"{"type":"refreshed""#)
        .push_id(id)
        .push_str(r#","expires_in":"#)
        .push_u64(expires_in);
    frame.finish()
}

/// `{"type":"error","id":…,"code":…,"message":…}`: a refused request; the connection stays open.
pub fn error_frame(id: Option<&RawValue>, code: &str, message: &str) -> Bytes {
    let mut frame = TextFrame::with_capacity(64 + message.len());
    frame
        .push_str(r#"{"type":"error""#)
        .push_id(id)
        .push_str(r#","code":"#)
        .push_json_string(code)
        .push_str(r#","message":"#)
        .push_json_string(message);
    frame.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_envelopes_give_their_channel_and_offset() {
        let payload = |frame: &Bytes| frame.slice(server_header_len(frame).unwrap()..);
        for (channel, offset, from) in [
            ("news", 1, None),
            ("room:1/a@b.c-d_E", u64::MAX, Some("alice")),
            ("x", 0, Some("a\"b")),
        ] {
            let frame = message_frame(channel, offset, from, Payload::Text("\"offset\":9"));
            assert_eq!(
                message_position(&payload(&frame)),
                Some((channel, offset)),
                "{channel}"
            );
        }
        for other in [
            direct_frame(Some("alice"), Payload::Json(b"1")),
            broadcast_frame(Payload::Json(b"{}")),
            gap_frame("news", None),
            welcome_frame("me", &[]),
        ] {
            assert_eq!(message_position(&payload(&other)), None);
        }
        assert_eq!(
            message_position(br#"{"type":"message","channel":"a","offset":x}"#),
            None
        );
    }

    #[test]
    fn gap_announcements_give_the_position_to_go_on_from() {
        let payload = |frame: &Bytes| frame.slice(server_header_len(frame).unwrap()..);
        let position = Position {
            epoch: Epoch::parse("abcd0123").unwrap(),
            offset: 42,
        };
        let frame = gap_frame("room:1", Some(position));
        assert_eq!(gap_position(&payload(&frame)), Some(("room:1", position)));
        for other in [
            gap_frame("room:1", None),
            message_frame("room:1", 7, None, Payload::Json(b"1")),
        ] {
            assert_eq!(gap_position(&payload(&other)), None);
        }
        assert_eq!(
            gap_position(br#"{"type":"gap","channel":"a","epoch":"short","offset":1}"#),
            None
        );
    }

    fn json_of(frame: &Bytes) -> serde_json::Value {
        let header = if frame[1] & 0x7f == 126 { 4 } else { 2 };
        assert_eq!(frame[0], 0x81, "FIN + text opcode");
        serde_json::from_slice(&frame[header..]).expect("frame carries JSON")
    }

    #[test]
    fn message_frames_carry_each_payload_kind() {
        let json = json_of(&message_frame(
            "news",
            7,
            None,
            Payload::Json(br#"{"a":1}"#),
        ));
        assert_eq!(
            json,
            serde_json::json!({"type":"message","channel":"news","offset":7,"data":{"a":1}})
        );
        let text = json_of(&message_frame(
            "c",
            1,
            Some("bob"),
            Payload::Text("hi \"x\""),
        ));
        assert_eq!(text["data"], "hi \"x\"");
        assert_eq!(text["from"], "bob");
        let binary = json_of(&message_frame("c", 1, None, Payload::Binary(&[0xff, 0])));
        assert_eq!(binary["data_b64"], "/wA=");
        let big = json_of(&message_frame(
            "c",
            1,
            None,
            Payload::Text(&"x".repeat(300)),
        ));
        assert_eq!(big["data"].as_str().map(str::len), Some(300));
    }

    #[test]
    fn replies_echo_the_request_id() {
        let id: &RawValue = serde_json::from_str(r#"{"n":[1,2]}"#).unwrap();
        let epoch = Epoch::parse("abcd1234").unwrap();
        let standing = Standing {
            epoch,
            offset: 7,
            recovery: Recovery::NotAsked,
        };
        let reply = json_of(&subscribed_frame(Some(id), "a", &standing));
        assert_eq!(
            reply,
            serde_json::json!({"type":"subscribed","id":{"n":[1,2]},"channel":"a","epoch":"abcd1234","offset":7})
        );
        let failed = Standing {
            recovery: Recovery::Failed(crate::registry::RecoveryFailure::PositionExpired),
            ..standing
        };
        let welcome = json_of(&welcome_frame("me", &[("a", standing), ("b:c", failed)]));
        assert_eq!(
            welcome,
            serde_json::json!({"type":"welcome","client_id":"me","channels":{
                "a":{"epoch":"abcd1234","offset":7},
                "b:c":{"epoch":"abcd1234","offset":7,"recovered":false,"reason":"position_expired"}
            }})
        );
        assert_eq!(
            json_of(&unsubscribed_frame(None, "a")),
            serde_json::json!({"type":"unsubscribed","channel":"a"})
        );
        let error = json_of(&error_frame(None, "invalid_json", "bad"));
        assert_eq!(
            error,
            serde_json::json!({"type":"error","code":"invalid_json","message":"bad"})
        );
    }

    #[test]
    fn parses_every_request_type() {
        let parsed = parse_request(r#"{"type":"publish","channel":"room:1","data":[1],"id":3}"#);
        assert_eq!(parsed.id.map(RawValue::get), Some("3"));
        assert_eq!(
            parsed.request,
            Ok(Request::Publish {
                channel: "room:1".into(),
                data: "[1]"
            })
        );
        let send = parse_request(r#"{"type":"send","to":"bob","data":null}"#).request;
        assert_eq!(
            send,
            Ok(Request::Send {
                to: "bob".into(),
                data: "null"
            })
        );
        let escaped = parse_request(r#"{"type":"refresh","token":"a\u002eb"}"#).request;
        assert_eq!(
            escaped,
            Ok(Request::Refresh {
                token: "a.b".into()
            })
        );
        let sub = parse_request(r#"{"type":"subscribe","channel":"a\/b"}"#).request;
        assert_eq!(
            sub,
            Ok(Request::Subscribe {
                channel: "a/b".into(),
                since: None
            })
        );
        let since = parse_request(
            r#"{"type":"subscribe","channel":"a","since":{"epoch":"abcd1234","offset":9}}"#,
        )
        .request;
        assert_eq!(
            since,
            Ok(Request::Subscribe {
                channel: "a".into(),
                since: Some(Position {
                    epoch: Epoch::parse("abcd1234").unwrap(),
                    offset: 9
                })
            })
        );
        for bad in [
            r#"{"epoch":"abcd1234"}"#,
            r#"{"epoch":"ABCD1234","offset":1}"#,
            r#"{"epoch":"abcd1234","offset":-1}"#,
            r#"{"epoch":"abcd1234","offset":1,"x":1}"#,
            r#""abcd1234:1""#,
        ] {
            let text = format!(r#"{{"type":"subscribe","channel":"a","since":{bad}}}"#);
            let code = parse_request(&text).request.unwrap_err().code();
            assert_eq!(code, "invalid_position", "{bad}");
        }
    }

    #[test]
    fn refuses_bad_requests_with_a_code() {
        let code = |text: &str| parse_request(text).request.unwrap_err().code();
        assert_eq!(code("{"), "invalid_json");
        assert_eq!(code("[1]"), "invalid_json");
        assert_eq!(code(r#"{"channel":"a"}"#), "missing_field");
        assert_eq!(code(r#"{"type":"publish","channel":"a"}"#), "missing_field");
        assert_eq!(code(r#"{"type":"send","to":"b"}"#), "missing_field");
        assert_eq!(code(r#"{"type":"dance"}"#), "unknown_type");
        assert_eq!(
            code(r#"{"type":"subscribe","channel":"a b"}"#),
            "invalid_channel"
        );
        assert_eq!(code(r#"{"type":"send","to":""}"#), "invalid_client_id");
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(
            code(&format!(
                r#"{{"type":"publish","channel":"a","data":{deep}}}"#
            )),
            "invalid_json"
        );
        let parsed = parse_request(r#"{"type":"nope","id":"x"}"#);
        assert_eq!(parsed.id.map(RawValue::get), Some(r#""x""#));
    }

    #[test]
    fn refusals_name_what_is_wrong_in_json_terms() {
        let error = |text: &str| parse_request(text).request.unwrap_err();
        assert_eq!(
            error(r#"["subscribe",null,"a"]"#),
            RequestError::NotAnObject
        );
        assert_eq!(error(r#" "x""#), RequestError::NotAnObject);
        assert_eq!(
            error(r#"{"type":"subscribe","channel":7}"#),
            RequestError::NotAString("channel")
        );
        assert_eq!(
            error(r#"{"type":{"a":[1]},"channel":"a"}"#),
            RequestError::NotAString("type")
        );
        assert_eq!(
            error(r#"{"type":"subscribe","channel":"a","to":[]}"#),
            RequestError::NotAString("to")
        );
        assert_eq!(
            error(r#"{"type":"subscribe","type":"publish","channel":"a"}"#),
            RequestError::RepeatedField
        );
        assert_eq!(
            error(r#"{"type":"publish","channel":"a","data":1,"data":2}"#),
            RequestError::RepeatedField
        );
        assert_eq!(
            error(r#"{"type":"subscribe","channel":"a"#).to_string(),
            "invalid JSON: the text ends at line 1 column 32 before the JSON value is complete"
        );
        assert_eq!(
            error(r#"{"type" "subscribe"}"#).to_string(),
            "invalid JSON: expected `:` at line 1 column 9"
        );
        assert_eq!(
            error(r#"{"type":"publish","channel":"a","data":tru}"#).to_string(),
            "invalid JSON: expected `true`, `false` or `null` at line 1 column 43"
        );
        assert_eq!(
            error(r#"{"type":"subscribe","channel":"\ud800"}"#).code(),
            "invalid_json"
        );
    }

    #[test]
    fn raw_subscribers_get_a_json_string_as_its_text() {
        let raw = |payload: Payload<'_>| {
            let (bytes, text) = payload.raw();
            (String::from_utf8_lossy(&bytes).into_owned(), text)
        };
        assert_eq!(raw(Payload::Json(br#""hi""#)), ("hi".to_owned(), true));
        assert_eq!(
            raw(Payload::Json(b" \"a\\n\\u00e9\\\"\" \n")),
            ("a\n\u{e9}\"".to_owned(), true)
        );
        assert_eq!(
            raw(Payload::Json(br#"{"a":"b"}"#)),
            (r#"{"a":"b"}"#.to_owned(), true)
        );
        assert_eq!(raw(Payload::Json(b"null")), ("null".to_owned(), true));
        assert_eq!(raw(Payload::Json(b"17")), ("17".to_owned(), true));
        assert_eq!(
            raw(Payload::Json(br#""\ud800""#)),
            (r#""\ud800""#.to_owned(), true),
            "a lone surrogate is no text: it goes as JSON"
        );
        assert_eq!(raw(Payload::Text(r#""hi""#)), (r#""hi""#.to_owned(), true));
        assert!(matches!(
            Payload::Json(br#""plain""#).raw().0,
            Cow::Borrowed(_)
        ));
        let (bytes, text) = Payload::Binary(&[0xff]).raw();
        assert_eq!((&*bytes, text), (&[0xff][..], false));
    }

    #[test]
    fn payload_errors_describe_the_json() {
        let error = |body: &[u8]| Payload::from_body(body, true).unwrap_err().to_string();
        assert_eq!(
            error(b"[1,]"),
            "body is not valid JSON: expected value at line 1 column 4"
        );
        assert_eq!(
            error(b""),
            "body is not valid JSON: the text ends at line 1 column 0 before the JSON value is complete"
        );
        let deep = format!("{}{}", "[".repeat(127), "]".repeat(127));
        assert_eq!(
            error(deep.as_bytes()),
            "body is not valid JSON: nested deeper than 126 levels"
        );
    }

    #[test]
    fn classifies_publish_bodies() {
        assert!(matches!(
            Payload::from_body(b"{}", true),
            Ok(Payload::Json(_))
        ));
        assert!(Payload::from_body(b"{", true).is_err());
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(Payload::from_body(nested(126).as_bytes(), true).is_ok());
        assert!(Payload::from_body(nested(127).as_bytes(), true).is_err());
        // The deepest accepted payload still parses with serde_json once enveloped.
        let frame = message_frame("c", 1, None, Payload::Json(nested(126).as_bytes()));
        json_of(&frame);
        let in_string = format!(r#"["{}"]"#, "[".repeat(1000));
        assert!(Payload::from_body(in_string.as_bytes(), true).is_ok());
        assert!(matches!(
            Payload::from_body(b"{", false),
            Ok(Payload::Text("{"))
        ));
        assert!(matches!(
            Payload::from_body(&[0xc3], false),
            Ok(Payload::Binary(_))
        ));
    }
}
