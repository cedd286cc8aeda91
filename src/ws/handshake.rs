//! The server side of the WebSocket opening handshake (RFC 6455 section 4.2).
//!
//! [`validate`] checks an HTTP request in the order axum does (method, version, `Connection`,
//! `Upgrade`, `Sec-WebSocket-Key`, `Sec-WebSocket-Version`) and returns the
//! `Sec-WebSocket-Accept` value for the `101` reply, or the first reason the request is not a
//! valid upgrade.

use base64::Engine as _;
use hyper::header::{
    CONNECTION, HeaderMap, HeaderName, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use hyper::{Method, Version};

pub use tungstenite::handshake::derive_accept_key;

/// Why a request cannot be upgraded to a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The request is not a GET.
    #[error("a WebSocket upgrade must be a GET request")]
    MethodNotGet,
    /// The request is not HTTP/1.1 (HTTP/1.0 has no upgrade mechanism).
    #[error("a WebSocket upgrade needs HTTP/1.1")]
    NotHttp11,
    /// `Connection` does not list `upgrade`, or `Upgrade` is not `websocket`.
    #[error(
        "not a WebSocket upgrade request (Connection: upgrade and Upgrade: websocket are required)"
    )]
    NotUpgrade,
    /// A handshake header appears more than once.
    #[error("duplicate {0} header")]
    DuplicateHeader(&'static str),
    /// `Sec-WebSocket-Key` is absent.
    #[error("missing Sec-WebSocket-Key header")]
    MissingKey,
    /// `Sec-WebSocket-Key` is not base64 of 16 bytes.
    #[error("Sec-WebSocket-Key must be base64 of 16 bytes")]
    InvalidKey,
    /// `Sec-WebSocket-Version` is absent or not 13.
    #[error("unsupported WebSocket version: only 13 is supported")]
    UnsupportedVersion,
}

/// Whether a request asks for a protocol upgrade at all (so that a plain GET on a WebSocket
/// route can be told apart from a broken handshake).
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    header_has_token(headers, &CONNECTION, "upgrade")
}

/// Checks a WebSocket upgrade request and returns the `Sec-WebSocket-Accept` value.
///
/// # Errors
/// The first [`HandshakeError`] the request has.
pub fn validate(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<String, HandshakeError> {
    if method != Method::GET {
        return Err(HandshakeError::MethodNotGet);
    }
    if version != Version::HTTP_11 {
        return Err(HandshakeError::NotHttp11);
    }
    for (name, label) in [
        (&UPGRADE, "Upgrade"),
        (&SEC_WEBSOCKET_KEY, "Sec-WebSocket-Key"),
        (&SEC_WEBSOCKET_VERSION, "Sec-WebSocket-Version"),
    ] {
        if headers.get_all(name).iter().nth(1).is_some() {
            return Err(HandshakeError::DuplicateHeader(label));
        }
    }
    let upgrade_ok = headers
        .get(UPGRADE)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if !is_upgrade_request(headers) || !upgrade_ok {
        return Err(HandshakeError::NotUpgrade);
    }
    let key = headers
        .get(SEC_WEBSOCKET_KEY)
        .ok_or(HandshakeError::MissingKey)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key.as_bytes())
        .map_err(|_| HandshakeError::InvalidKey)?;
    if decoded.len() != 16 {
        return Err(HandshakeError::InvalidKey);
    }
    if headers.get(SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(HandshakeError::UnsupportedVersion);
    }
    Ok(derive_accept_key(key.as_bytes()))
}

/// Whether any `name` header holds `token` in its comma-separated list (case-insensitive).
fn header_has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|part| part.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    const GOOD: &[(&str, &str)] = &[
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "WebSocket"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-version", "13"),
    ];

    #[test]
    fn accepts_the_rfc_sample() {
        let accept = validate(&Method::GET, Version::HTTP_11, &headers(GOOD));
        assert_eq!(accept.as_deref(), Ok("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    }

    #[test]
    fn rejects_each_broken_part() {
        let check = |method: Method, version: Version, pairs: &[(&'static str, &'static str)]| {
            validate(&method, version, &headers(pairs)).unwrap_err()
        };
        assert_eq!(
            check(Method::POST, Version::HTTP_11, GOOD),
            HandshakeError::MethodNotGet
        );
        assert_eq!(
            check(Method::GET, Version::HTTP_10, GOOD),
            HandshakeError::NotHttp11
        );
        assert_eq!(
            check(Method::GET, Version::HTTP_11, &GOOD[1..]),
            HandshakeError::NotUpgrade
        );
        let mut no_key = GOOD.to_vec();
        no_key.remove(2);
        assert_eq!(
            check(Method::GET, Version::HTTP_11, &no_key),
            HandshakeError::MissingKey
        );
        let mut short_key = GOOD.to_vec();
        short_key[2].1 = "c2hvcnQ=";
        assert_eq!(
            check(Method::GET, Version::HTTP_11, &short_key),
            HandshakeError::InvalidKey
        );
        let mut version = GOOD.to_vec();
        version[3].1 = "8";
        assert_eq!(
            check(Method::GET, Version::HTTP_11, &version),
            HandshakeError::UnsupportedVersion
        );
        let mut twice = GOOD.to_vec();
        twice.push(("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(
            check(Method::GET, Version::HTTP_11, &twice),
            HandshakeError::DuplicateHeader("Sec-WebSocket-Key")
        );
    }
}
