//! Who may use what: the operator routes (`/api/*` and `/metrics`) and browser origins for
//! WebSocket upgrades.
//!
//! With `--api-key`, every operator request needs `Authorization: Bearer <key>` (compared in
//! constant time). Without one, they answer only clients on this machine that did not come
//! through a proxy: a request from a loopback address that carries `Forwarded`,
//! `X-Forwarded-For` or `X-Real-IP` was relayed by a proxy on the same host (nginx in front of
//! Herald, the common deployment) for someone who may be anywhere, so it is not local.
//! `--public-metrics` opens `/metrics` to any scraper without a key.
//!
//! A WebSocket upgrade that carries an `Origin` (every browser sends one) must come from the
//! same host as the request (the pages Herald serves itself, the demo included), or from one of
//! `--allowed-origins`; this stops other sites from opening WebSockets with a visitor's cookies
//! (cross-site WebSocket hijacking). An `/sse` stream follows the same rule, and names an
//! allowed origin in `Access-Control-Allow-Origin` so that its page may read the events.

use std::net::SocketAddr;

use hyper::header::{AUTHORIZATION, HOST, HeaderMap, HeaderName, HeaderValue, ORIGIN};
use subtle::ConstantTimeEq as _;

use super::HttpError;

/// Headers that a proxy adds when it relays a request: their presence means the client is not
/// the peer that connected.
const FORWARDING_HEADERS: [HeaderName; 3] = [
    hyper::header::FORWARDED,
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-real-ip"),
];

/// Checks that an operator request (`/api/*`, `/metrics`) may be served.
///
/// # Errors
/// [`HttpError::Unauthorized`] for a missing or wrong key when keys are configured;
/// [`HttpError::PublisherNotLocal`] for a client that is not on a loopback address, or that
/// came through a proxy, when none are.
pub fn check_publisher(
    headers: &HeaderMap,
    peer: SocketAddr,
    api_keys: &[String],
) -> Result<(), HttpError> {
    if api_keys.is_empty() {
        let proxied = FORWARDING_HEADERS
            .iter()
            .any(|name| headers.contains_key(name));
        return if peer.ip().is_loopback() && !proxied {
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
/// otherwise it must name the same host as the `Host` header, or be in `allowed` (`*` allows
/// any; entries are checked at start-up by [`parse_allowed_origin`]).
///
/// # Errors
/// [`HttpError::OriginNotAllowed`] for any other origin.
pub fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), HttpError> {
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(());
    };
    let origin = origin
        .to_str()
        .ok()
        .and_then(|origin| SiteOrigin::parse(origin).ok())
        .ok_or(HttpError::OriginNotAllowed)?;
    let host = headers.get(HOST).and_then(|host| host.to_str().ok());
    let same_host = host.is_some_and(|host| origin.is_host(host));
    let listed = allowed
        .iter()
        .any(|entry| entry == "*" || SiteOrigin::parse(entry).is_ok_and(|entry| entry == origin));
    if same_host || listed {
        Ok(())
    } else {
        Err(HttpError::OriginNotAllowed)
    }
}

/// The `Origin` of a request from a browser page that may read the answer (by the rule of
/// [`check_origin`]), to name in `Access-Control-Allow-Origin`; `None` when the request has no
/// `Origin`.
///
/// # Errors
/// [`HttpError::OriginNotAllowed`] for an origin [`check_origin`] refuses.
pub fn cors_origin(
    headers: &HeaderMap,
    allowed: &[String],
) -> Result<Option<HeaderValue>, HttpError> {
    check_origin(headers, allowed)?;
    Ok(headers.get(ORIGIN).cloned())
}

/// Checks one `--allowed-origins` entry: `*`, or `scheme://host[:port]` with an optional
/// trailing `/`.
///
/// # Errors
/// Why the entry can never match a browser's `Origin`, as a sentence.
pub fn parse_allowed_origin(entry: &str) -> Result<(), String> {
    if entry == "*" {
        return Ok(());
    }
    SiteOrigin::parse(entry).map(drop)
}

/// A web origin (RFC 6454) as browsers send it: scheme, host and port, compared without case
/// and with the scheme's default port filled in.
#[derive(Debug, PartialEq, Eq)]
struct SiteOrigin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

impl SiteOrigin {
    fn parse(text: &str) -> Result<Self, String> {
        let text = text.strip_suffix('/').unwrap_or(text);
        let (scheme, authority) = text.split_once("://").ok_or_else(|| {
            "it has no scheme (write https://host or http://host:port)".to_owned()
        })?;
        let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !scheme_ok {
            return Err(format!("{scheme:?} is not a URL scheme"));
        }
        if authority.contains(['/', '?', '#', '@']) {
            return Err(
                "an origin is only scheme://host[:port], without a path, query or user".to_owned(),
            );
        }
        let (host, port) = split_port(authority)?;
        let host_ok = if let Some(inner) = host.strip_prefix('[') {
            inner
                .strip_suffix(']')
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
        } else {
            !host.is_empty()
                && host
                    .split('.')
                    .all(|label| !label.is_empty() && label.chars().all(is_host_char))
        };
        if !host_ok {
            return Err(format!("{host:?} is not a host name or IP address"));
        }
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        };
        Ok(Self {
            port: port.or(default_port),
            scheme,
            host: host.to_ascii_lowercase(),
        })
    }

    /// Whether this origin names the authority of a `Host` header (the page came from the
    /// server it connects to).
    fn is_host(&self, host: &str) -> bool {
        let Ok((name, port)) = split_port(host) else {
            return false;
        };
        name.eq_ignore_ascii_case(&self.host) && port.or(self.default_port()) == self.port
    }

    fn default_port(&self) -> Option<u16> {
        match self.scheme.as_str() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        }
    }
}

fn is_host_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Splits `host[:port]` (the host may be a bracketed IPv6 address).
fn split_port(authority: &str) -> Result<(&str, Option<u16>), String> {
    let port_at = match authority.rfind(':') {
        Some(at) if !authority[at..].contains(']') => at,
        _ => return Ok((authority, None)),
    };
    let (host, port) = (&authority[..port_at], &authority[port_at + 1..]);
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok((host, Some(port))),
        _ => Err(format!("{port:?} is not a port number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn without_keys_only_unproxied_loopback_may_publish() {
        let none = HeaderMap::new();
        assert!(check_publisher(&none, "127.0.0.1:5000".parse().unwrap(), &[]).is_ok());
        assert!(check_publisher(&none, "[::1]:5000".parse().unwrap(), &[]).is_ok());
        assert!(matches!(
            check_publisher(&none, "10.0.0.7:5000".parse().unwrap(), &[]),
            Err(HttpError::PublisherNotLocal)
        ));
        for header in ["forwarded", "x-forwarded-for", "x-real-ip"] {
            let proxied = headers(&[(header, "127.0.0.1")]);
            assert!(
                matches!(
                    check_publisher(&proxied, "127.0.0.1:5000".parse().unwrap(), &[]),
                    Err(HttpError::PublisherNotLocal)
                ),
                "{header}"
            );
        }
    }

    #[test]
    fn keys_are_required_from_everyone() {
        let keys = ["k1".to_owned(), "second-key".to_owned()];
        let remote = "10.0.0.7:5000".parse().unwrap();
        let ok = headers(&[("authorization", "Bearer second-key")]);
        assert!(check_publisher(&ok, remote, &keys).is_ok());
        let proxied = headers(&[
            ("authorization", "Bearer k1"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert!(check_publisher(&proxied, remote, &keys).is_ok());
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
        let app_port = ["https://APP.example:443".to_owned()];
        assert!(check_origin(&app, &app_port).is_ok(), "default port");
        assert!(
            check_origin(&same, &listed).is_ok(),
            "the same host stays allowed next to a list"
        );
        assert!(check_origin(&other, &listed).is_err());
        assert!(check_origin(&other, &["*".to_owned()]).is_ok());
        let ipv6 = headers(&[("origin", "http://[::1]:8080"), ("host", "[::1]:8080")]);
        assert!(check_origin(&ipv6, &[]).is_ok());
        let garbage = headers(&[("origin", "null"), ("host", "127.0.0.1:8080")]);
        assert!(check_origin(&garbage, &[]).is_err());
    }

    #[test]
    fn allowed_origin_entries_are_checked() {
        for good in [
            "*",
            "https://app.example.com",
            "https://app.example.com/",
            "http://localhost:3000",
            "http://127.0.0.1:8080",
            "http://[::1]:8080",
            "chrome-extension://abcdef",
        ] {
            assert_eq!(parse_allowed_origin(good), Ok(()), "{good}");
        }
        for bad in [
            "example.com",
            "",
            "https://",
            "https://app.example.com/path",
            "https://app.example.com:0",
            "https://app.example.com:99999",
            "https://app.example.com:x",
            "https://user@app.example.com",
            "https://app..example.com",
            "1http://a",
            "https://a b",
        ] {
            assert!(parse_allowed_origin(bad).is_err(), "{bad:?}");
        }
    }
}
