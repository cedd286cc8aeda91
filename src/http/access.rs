//! Who may use what: the publish API (`/api/*`) and browser origins for WebSocket upgrades.
//!
//! With `--api-key`, every `/api/*` request needs `Authorization: Bearer <key>` (compared in
//! constant time); without one, `/api/*` answers only clients on a loopback address, so that
//! a server started without configuration cannot be published to from the network. A WebSocket
//! upgrade that carries an `Origin` (every browser sends one) must come from the same host as
//! the request, or from one of `--allowed-origins`; this stops other sites from opening
//! WebSockets with a visitor's cookies (cross-site WebSocket hijacking).

use std::net::SocketAddr;

use hyper::header::{AUTHORIZATION, HOST, HeaderMap, ORIGIN};
use subtle::ConstantTimeEq as _;

use super::HttpError;

/// Checks that a `/api/*` request may publish.
///
/// # Errors
/// [`HttpError::Unauthorized`] for a missing or wrong key when keys are configured;
/// [`HttpError::PublisherNotLocal`] for a non-loopback client when none are.
pub fn check_publisher(
    headers: &HeaderMap,
    peer: SocketAddr,
    api_keys: &[String],
) -> Result<(), HttpError> {
    if api_keys.is_empty() {
        return if peer.ip().is_loopback() {
            Ok(())
        } else {
            Err(HttpError::PublisherNotLocal)
        };
    }
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
        .ok_or(HttpError::Unauthorized)?;
    // Every key is compared, and each comparison takes the same time whatever the bytes.
    let matched = api_keys.iter().fold(0u8, |matched, key| {
        matched | presented.ct_eq(key.as_bytes()).unwrap_u8()
    });
    if matched == 1 {
        Ok(())
    } else {
        Err(HttpError::Unauthorized)
    }
}

/// Checks the `Origin` of a WebSocket upgrade. No `Origin` (a non-browser client) is allowed;
/// otherwise it must be in `allowed` (`*` allows any), or, with `allowed` empty, name the same
/// host as the `Host` header.
///
/// # Errors
/// [`HttpError::OriginNotAllowed`] for any other origin.
pub fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), HttpError> {
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().map_err(|_| HttpError::OriginNotAllowed)?;
    let permitted = if allowed.is_empty() {
        let host = headers.get(HOST).and_then(|host| host.to_str().ok());
        host.is_some_and(|host| same_host(origin, host))
    } else {
        allowed
            .iter()
            .any(|entry| entry == "*" || entry.trim_end_matches('/').eq_ignore_ascii_case(origin))
    };
    if permitted {
        Ok(())
    } else {
        Err(HttpError::OriginNotAllowed)
    }
}

/// Whether `origin` (`scheme://host[:port]`) names the authority in `host`, default ports
/// aside.
fn same_host(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return false,
    };
    let strip = |value: &str| -> String {
        let value = value.to_ascii_lowercase();
        value
            .strip_suffix(default_port)
            .map_or(value.clone(), str::to_owned)
    };
    strip(authority) == strip(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    name.parse().expect("header name"),
                    HeaderValue::from_static(value),
                )
            })
            .collect()
    }

    #[test]
    fn without_keys_only_loopback_may_publish() {
        let none = HeaderMap::new();
        assert!(check_publisher(&none, "127.0.0.1:5000".parse().unwrap(), &[]).is_ok());
        assert!(check_publisher(&none, "[::1]:5000".parse().unwrap(), &[]).is_ok());
        assert!(matches!(
            check_publisher(&none, "10.0.0.7:5000".parse().unwrap(), &[]),
            Err(HttpError::PublisherNotLocal)
        ));
    }

    #[test]
    fn keys_are_required_from_everyone() {
        let keys = ["k1".to_owned(), "second-key".to_owned()];
        let remote = "10.0.0.7:5000".parse().unwrap();
        let ok = headers(&[("authorization", "Bearer second-key")]);
        assert!(check_publisher(&ok, remote, &keys).is_ok());
        for bad in ["Bearer k2", "Bearer ", "bearer k1", "k1", "Bearer k1x"] {
            let bad = headers(&[("authorization", bad)]);
            assert!(check_publisher(&bad, remote, &keys).is_err());
        }
        assert!(check_publisher(&HeaderMap::new(), "127.0.0.1:1".parse().unwrap(), &keys).is_err());
    }

    #[test]
    fn origins() {
        let same = headers(&[
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080"),
        ]);
        assert!(check_origin(&same, &[]).is_ok());
        let default_port = headers(&[
            ("origin", "https://app.example"),
            ("host", "APP.example:443"),
        ]);
        assert!(check_origin(&default_port, &[]).is_ok());
        let other = headers(&[
            ("origin", "http://evil.example"),
            ("host", "127.0.0.1:8080"),
        ]);
        assert!(check_origin(&other, &[]).is_err());
        let other_port = headers(&[
            ("origin", "http://127.0.0.1:9999"),
            ("host", "127.0.0.1:8080"),
        ]);
        assert!(check_origin(&other_port, &[]).is_err());
        assert!(
            check_origin(&headers(&[("host", "x")]), &[]).is_ok(),
            "no Origin"
        );
        let listed = ["https://app.example/".to_owned()];
        let app = headers(&[("origin", "https://app.example"), ("host", "herald:8080")]);
        assert!(check_origin(&app, &listed).is_ok());
        assert!(
            check_origin(&same, &listed).is_err(),
            "a list replaces the same-host rule"
        );
        assert!(check_origin(&other, &["*".to_owned()]).is_ok());
    }
}
