//! The JSON request protocol (`format=json` connections) on arbitrary text.
//!
//! Properties of `herald::protocol::parse_request`:
//! - on `Ok`, channel names and client ids pass `name::validate`, `data` is
//!   the one JSON value the input has under `data` (a publish or send without
//!   it is refused), and the input really was a JSON object whose `type`
//!   names that request;
//! - on `Err`, the code is one of the documented ones, and `invalid_json` is
//!   the only possible code when the input is not a JSON object;
//! - a returned `id` is itself valid JSON;
//! - depth (the bug in `fuzz/regressions/client_request/README.md`, now
//!   fixed): valid JSON nesting deeper than `MAX_JSON_DEPTH + 1` levels is
//!   refused as `invalid_json` with no `id`; nothing shallower is refused
//!   for its depth (by Herald's check or serde_json's recursion limit); so
//!   `data` and `id` nest at most `MAX_JSON_DEPTH` levels and every frame
//!   built from the request at most `MAX_JSON_DEPTH + 1`, which serde_json
//!   reads;
//! - the reply frames built from the result (`error_frame`,
//!   `subscribed_frame`, `unsubscribed_frame`, `published_frame`, `sent_frame`) are each a single
//!   valid, final, unmasked server text frame whose payload is the JSON object
//!   it claims to be, echoing the `id`;
//! - `publish`/`send` data delivered in a `message`/`direct` envelope comes
//!   out as the same JSON value.
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use common::{Json, SERDE_JSON_MAX_DEPTH, check_json, text_frame_json};
use herald::name;
use herald::protocol::{
    JsonError, MAX_JSON_DEPTH, Payload, Request, RequestError, direct_frame, error_frame,
    message_frame, parse_request, published_frame, sent_frame, subscribed_frame,
    unsubscribed_frame,
};
use herald::registry::{Epoch, Recovery, RecoveryFailure, Standing};
use libfuzzer_sys::fuzz_target;

const CODES: [&str; 6] = [
    "invalid_json",
    "missing_field",
    "unknown_type",
    "invalid_channel",
    "invalid_client_id",
    "invalid_position",
];

/// A frame Herald sends nests at most `MAX_JSON_DEPTH + 1` levels, which
/// serde_json-based clients can read.
fn check_frame_depth(frame: &Json, what: &str) {
    assert!(
        frame.depth() <= MAX_JSON_DEPTH + 1,
        "{what} nests {} levels, more than MAX_JSON_DEPTH + 1 = {}",
        frame.depth(),
        MAX_JSON_DEPTH + 1
    );
    assert!(
        frame.depth() <= SERDE_JSON_MAX_DEPTH,
        "{what} nests {} levels, more than serde_json reads",
        frame.depth()
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_request(text);
    let input: Option<Json> = check_json(text).ok();
    let input_depth = input.as_ref().map(Json::depth);

    // Depth bound of the whole request (regression:
    // fuzz/regressions/client_request/README.md).
    match input_depth {
        Some(depth) if depth > MAX_JSON_DEPTH + 1 => {
            let code = parsed.request.as_ref().err().map(|err| err.code());
            assert_eq!(code, Some("invalid_json"), "valid JSON of depth {depth} not refused");
            assert!(parsed.id.is_none(), "id echoed from a request of depth {depth}");
        }
        Some(depth) => {
            // Herald's own check and serde_json's recursion limit; matched at
            // the start, as other serde_json messages may quote the input.
            if let Err(RequestError::InvalidJson(err)) = &parsed.request {
                let too_deep = match err {
                    JsonError::TooDeep(_) => true,
                    JsonError::Syntax { reason, .. } => reason.starts_with("recursion limit"),
                    JsonError::Truncated { .. } => false,
                };
                assert!(!too_deep, "request of depth {depth} refused for its depth: {err}");
            }
        }
        None => {}
    }

    let id_value: Option<Json> = parsed
        .id
        .map(|id| check_json(id.get()).unwrap_or_else(|err| panic!("id is not JSON: {err}")));
    if let Some(id) = &id_value {
        assert!(id.depth() <= MAX_JSON_DEPTH, "id nests {} levels", id.depth());
    }
    if let (Some(id), Some(object)) = (&id_value, &input) {
        if object.is_object() {
            assert_eq!(object.get("id"), Some(id), "id differs from the input's");
        }
    }

    let offset = data.len() as u64 * 0x1_0000_0001;
    let mut channel_for_reply = "fuzz".to_owned();
    match &parsed.request {
        Ok(request) => {
            let object = input
                .as_ref()
                .filter(|input| input.is_object())
                .expect("accepted input must be a JSON object");
            let kind = object.get("type").and_then(Json::as_str);
            let (expected_kind, data) = match request {
                Request::Subscribe { channel, since } => {
                    assert!(name::validate(channel).is_ok(), "invalid channel {channel:?}");
                    if let Some(position) = since {
                        let wire = object.get("since").filter(|since| since.is_object());
                        let wire = wire.expect("a position comes from a since object");
                        assert_eq!(
                            wire.get("epoch").and_then(Json::as_str),
                            Some(position.epoch.as_str())
                        );
                    }
                    channel_for_reply = channel.to_string();
                    ("subscribe", None)
                }
                Request::Unsubscribe { channel } => {
                    assert!(name::validate(channel).is_ok(), "invalid channel {channel:?}");
                    channel_for_reply = channel.to_string();
                    ("unsubscribe", None)
                }
                Request::Publish { channel, data } => {
                    assert!(name::validate(channel).is_ok(), "invalid channel {channel:?}");
                    assert_eq!(object.get("channel").and_then(Json::as_str), Some(&**channel));
                    channel_for_reply = channel.to_string();
                    ("publish", Some(*data))
                }
                Request::Send { to, data } => {
                    assert!(name::validate(to).is_ok(), "invalid client id {to:?}");
                    assert_eq!(object.get("to").and_then(Json::as_str), Some(&**to));
                    ("send", Some(*data))
                }
                Request::Refresh { token } => {
                    assert_eq!(object.get("token").and_then(Json::as_str), Some(&**token));
                    ("refresh", None)
                }
            };
            assert_eq!(kind, Some(expected_kind), "request type does not match the input");
            if let Some(data) = data {
                let value = check_json(data)
                    .unwrap_or_else(|err| panic!("data is not JSON ({err}): {data}"));
                assert!(value.depth() <= MAX_JSON_DEPTH, "data nests {} levels", value.depth());
                let sent = object.get("data").expect("a request without data must be refused");
                assert_eq!(&value, sent, "data differs from the input's");
                // What subscribers get: the data embedded as a JSON payload.
                let frame = match request {
                    Request::Publish { channel, .. } => {
                        message_frame(channel, offset, Some("c-1"), Payload::Json(data.as_bytes()))
                    }
                    _ => direct_frame(Some("c-1"), Payload::Json(data.as_bytes())),
                };
                let envelope = text_frame_json(&frame);
                assert_eq!(envelope.get("data"), Some(&value), "delivered data differs");
                assert_eq!(envelope.depth(), 1 + value.depth(), "envelope depth");
                check_frame_depth(&envelope, "delivered envelope");
            }
        }
        Err(err) => {
            let code = err.code();
            assert!(CODES.contains(&code), "undocumented error code {code}");
            if !input.as_ref().is_some_and(Json::is_object) {
                assert_eq!(code, "invalid_json", "a non-object input must be invalid_json");
            }
        }
    }

    let id = parsed.id;
    let id_matches = |reply: &Json| match &id_value {
        Some(id) => assert_eq!(reply.get("id"), Some(id), "reply does not echo the id"),
        None => assert!(reply.get("id").is_none(), "reply has an id nobody sent"),
    };
    let n_id = usize::from(id.is_some());

    let (code, message) = match &parsed.request {
        Ok(_) => ("unknown_type", text.to_owned()),
        Err(err) => (err.code(), err.to_string()),
    };
    let reply = text_frame_json(&error_frame(id, code, &message));
    id_matches(&reply);
    check_frame_depth(&reply, "error reply");
    assert_eq!(reply.keys().len(), 3 + n_id);
    assert_eq!(reply.get("type"), Some(&Json::str("error")));
    assert_eq!(reply.get("code"), Some(&Json::str(code)));
    assert_eq!(reply.get("message"), Some(&Json::str(&message)));

    let epoch = Epoch::parse("abcd1234").expect("an epoch");
    for (recovery, extra) in [
        (Recovery::NotAsked, 0),
        (Recovery::Recovered, 1),
        (Recovery::Failed(RecoveryFailure::PositionExpired), 2),
    ] {
        let standing = Standing {
            epoch,
            offset,
            recovery,
        };
        let reply = text_frame_json(&subscribed_frame(id, &channel_for_reply, &standing));
        id_matches(&reply);
        check_frame_depth(&reply, "subscribed reply");
        assert_eq!(reply.keys().len(), 4 + extra + n_id);
        assert_eq!(reply.get("type"), Some(&Json::str("subscribed")));
        assert_eq!(reply.get("channel"), Some(&Json::str(&channel_for_reply)));
        assert_eq!(reply.get("epoch"), Some(&Json::str("abcd1234")));
    }
    let reply = text_frame_json(&unsubscribed_frame(id, &channel_for_reply));
    id_matches(&reply);
    check_frame_depth(&reply, "unsubscribed reply");
    assert_eq!(reply.keys().len(), 2 + n_id);
    assert_eq!(reply.get("type"), Some(&Json::str("unsubscribed")));
    assert_eq!(reply.get("channel"), Some(&Json::str(&channel_for_reply)));

    let reply = text_frame_json(&published_frame(
        id,
        &channel_for_reply,
        offset,
        "subscribers",
        u64::MAX,
    ));
    id_matches(&reply);
    check_frame_depth(&reply, "published reply");
    assert_eq!(reply.keys().len(), 4 + n_id);
    assert_eq!(reply.get("type"), Some(&Json::str("published")));
    assert_eq!(reply.get("channel"), Some(&Json::str(&channel_for_reply)));
    assert_eq!(reply.get("offset"), Some(&Json::num(offset)));
    assert_eq!(reply.get("subscribers"), Some(&Json::num(u64::MAX)));

    let reply = text_frame_json(&sent_frame(id, &channel_for_reply, "connections", 3));
    id_matches(&reply);
    check_frame_depth(&reply, "sent reply");
    assert_eq!(reply.keys().len(), 3 + n_id);
    assert_eq!(reply.get("type"), Some(&Json::str("sent")));
    assert_eq!(reply.get("to"), Some(&Json::str(&channel_for_reply)));
    assert_eq!(reply.get("connections"), Some(&Json::num(3)));
});
