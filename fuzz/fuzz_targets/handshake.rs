//! The WebSocket opening handshake and the `/ws` query on arbitrary HTTP/1.x
//! request heads.
//!
//! The input is parsed with httparse (64 header slots); heads it accepts are
//! turned into `http` types (inputs `http` refuses are skipped) and given to
//! `herald::ws::handshake::validate`, and the request target's query to
//! `herald::http::parse_query`.
//!
//! Properties:
//! - `validate` agrees with an independent model of RFC 6455 section 4.2.1
//!   and the documented check order (method, version, duplicate headers,
//!   Connection/Upgrade, key, version): it returns `Ok` exactly when the
//!   method is GET, the version HTTP/1.1, `Connection` lists `upgrade`,
//!   there is one `Upgrade: websocket`, one `Sec-WebSocket-Key` that is
//!   base64 of 16 bytes, and one `Sec-WebSocket-Version: 13`;
//! - the accept key equals `tungstenite::handshake::derive_accept_key` and
//!   an independent SHA-1 + base64 computation;
//! - `parse_query` never panics and agrees with a model: on `Ok` every
//!   channel and the client id pass `name::validate`, channels are the
//!   deduplicated list in order, at most `max_subscriptions`, and `format=raw`
//!   has exactly one channel; `since` positions (channel, epoch, offset) are
//!   exactly the model's, each naming a channel of `channels`.
#![no_main]

use base64::Engine as _;
use herald::http::parse_query;
use herald::name;
use herald::registry::Format;
use herald::ws::handshake::{HandshakeError, validate};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Version};
use libfuzzer_sys::fuzz_target;
use sha1::{Digest, Sha1};

/// The model of `validate`: which error it should return, in its order.
fn expected(method: &Method, version: Version, headers: &HeaderMap) -> Result<Vec<u8>, HandshakeError> {
    if method.as_str() != "GET" {
        return Err(HandshakeError::MethodNotGet);
    }
    if version != Version::HTTP_11 {
        return Err(HandshakeError::NotHttp11);
    }
    let all = |name: &str| -> Vec<&[u8]> {
        headers
            .iter()
            .filter(|(n, _)| n.as_str().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_bytes())
            .collect()
    };
    for (name, label) in [
        ("upgrade", "Upgrade"),
        ("sec-websocket-key", "Sec-WebSocket-Key"),
        ("sec-websocket-version", "Sec-WebSocket-Version"),
    ] {
        if all(name).len() > 1 {
            return Err(HandshakeError::DuplicateHeader(label));
        }
    }
    let connection_upgrade = all("connection").iter().any(|value| {
        value
            .split(|&b| b == b',')
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    });
    let upgrade_websocket = all("upgrade")
        .first()
        .is_some_and(|v| v.eq_ignore_ascii_case(b"websocket"));
    if !connection_upgrade || !upgrade_websocket {
        return Err(HandshakeError::NotUpgrade);
    }
    let Some(&key) = all("sec-websocket-key").first() else {
        return Err(HandshakeError::MissingKey);
    };
    if !is_base64_of_16_bytes(key) {
        return Err(HandshakeError::InvalidKey);
    }
    if all("sec-websocket-version").first() != Some(&&b"13"[..]) {
        return Err(HandshakeError::UnsupportedVersion);
    }
    Ok(key.to_vec())
}

/// Canonical base64 (RFC 4648, padded) of exactly 16 bytes: 22 alphabet
/// characters, the last of which carries 2 data bits and 4 zero bits, then `==`.
fn is_base64_of_16_bytes(key: &[u8]) -> bool {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let [body @ .., b'=', b'='] = key else {
        return false;
    };
    body.len() == 22
        && body.iter().all(|b| ALPHABET.contains(b))
        && ALPHABET.iter().position(|&c| c == body[21]).is_some_and(|v| v % 16 == 0)
}

fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

fn check_handshake(method: &Method, version: Version, headers: &HeaderMap) {
    let got = validate(method, version, headers);
    let want = expected(method, version, headers);
    match (&got, &want) {
        (Ok(accept), Ok(key)) => {
            assert_eq!(*accept, tungstenite::handshake::derive_accept_key(key));
            assert_eq!(*accept, accept_key(key));
            assert_eq!(accept.len(), 28);
        }
        (Err(got), Err(want)) => assert_eq!(got, want, "a different first error"),
        _ => panic!("validate returned {got:?}, the model {want:?}"),
    }
}

/// One `since` entry of the model: `(channel, epoch, offset)`.
type ModelPosition = (String, String, u64);

/// The model of `since=`: `<channel>:<epoch>:<offset>` entries, comma-separated, each channel
/// at most once; an epoch is 8 of `0-9a-z`, an offset decimal digits that fit a u64.
fn expected_positions(value: &str) -> Option<Vec<ModelPosition>> {
    let mut positions: Vec<ModelPosition> = Vec::new();
    for entry in value.split(',') {
        let offset_at = entry.rfind(':')?;
        let (rest, offset) = (&entry[..offset_at], &entry[offset_at + 1..]);
        let epoch_at = rest.rfind(':')?;
        let (channel, epoch) = (&rest[..epoch_at], &rest[epoch_at + 1..]);
        name::validate(channel).ok()?;
        let epoch_ok = epoch.len() == 8
            && epoch
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
        let digits_ok = !offset.is_empty() && offset.bytes().all(|b| b.is_ascii_digit());
        if !epoch_ok || !digits_ok {
            return None;
        }
        let offset: u64 = offset.parse().ok()?;
        if positions.iter().any(|(known, _, _)| known == channel) {
            return None;
        }
        positions.push((channel.to_owned(), epoch.to_owned(), offset));
    }
    Some(positions)
}

/// What the model of `parse_query` accepts: `(channels, client_id, format, since)`.
type ModelQuery = (Vec<String>, Option<String>, Format, Vec<ModelPosition>);

/// The model of `parse_query` for `Ok` results.
fn expected_query(query: &str, max: usize) -> Option<ModelQuery> {
    let mut channels: Vec<String> = Vec::new();
    let mut client_id = None;
    let mut format = None;
    let mut tokens = 0;
    let mut since = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "channels" => {
                for channel in value.split(',').filter(|c| !c.is_empty()) {
                    name::validate(channel).ok()?;
                    if !channels.iter().any(|c| c == channel) {
                        channels.push(channel.to_owned());
                    }
                    if channels.len() > max {
                        return None;
                    }
                }
            }
            "client_id" => {
                if client_id.is_some() {
                    return None;
                }
                name::validate(&value).ok()?;
                client_id = Some(value.into_owned());
            }
            "format" => {
                if format.is_some() {
                    return None;
                }
                match &*value {
                    "json" => format = Some(Format::Json),
                    "raw" => format = Some(Format::Raw),
                    _ => return None,
                }
            }
            "token" => {
                tokens += 1;
                if tokens > 1 {
                    return None;
                }
            }
            "since" => {
                if since.is_some() {
                    return None;
                }
                since = Some(expected_positions(&value)?);
            }
            // Unknown parameters are refused.
            _ => return None,
        }
    }
    let format = format.unwrap_or(Format::Json);
    let since = since.unwrap_or_default();
    if since
        .iter()
        .any(|(channel, _, _)| !channels.contains(channel))
    {
        return None;
    }
    if format == Format::Raw && channels.len() != 1 {
        return None;
    }
    Some((channels, client_id, format, since))
}

fn check_query(query: &str, config: &herald::Config) {
    let max = config.max_subscriptions;
    let got = parse_query(query, config);
    let want = expected_query(query, max);
    match (got, want) {
        (Ok(session), Some((channels, client_id, format, since))) => {
            let got: Vec<ModelPosition> = session
                .since
                .iter()
                .map(|(channel, position)| {
                    (channel.clone(), position.epoch.to_string(), position.offset)
                })
                .collect();
            assert_eq!(got, since, "since positions");
            for channel in &session.channels {
                assert!(name::validate(channel).is_ok(), "invalid channel {channel:?} accepted");
            }
            let mut unique = session.channels.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), session.channels.len(), "duplicate channels");
            assert!(session.channels.len() <= max, "more than max_subscriptions channels");
            if session.format == Format::Raw {
                assert_eq!(session.channels.len(), 1, "raw format needs exactly one channel");
            }
            assert!(name::validate(&session.client_id).is_ok(), "invalid client id");
            assert_eq!(session.channels, channels);
            assert_eq!(session.format, format);
            if let Some(id) = client_id {
                assert_eq!(&*session.client_id, id);
            }
        }
        (Err(_), None) => {}
        (got, want) => panic!("parse_query gave {got:?}, the model {want:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut slots);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else {
        return;
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return;
    };

    if let Some((_, query)) = path.split_once('?') {
        check_query(query, &herald::Config::default());
        // A small limit too, so the subscription cap is reachable.
        check_query(query, &herald::Config::default().max_subscriptions(2));
    }

    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let version = match version {
        0 => Version::HTTP_10,
        1 => Version::HTTP_11,
        _ => return,
    };
    let mut headers = HeaderMap::new();
    for header in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(header.name.as_bytes()),
            HeaderValue::from_bytes(header.value),
        ) else {
            return;
        };
        headers.append(name, value);
    }
    check_handshake(&method, version, &headers);
});
