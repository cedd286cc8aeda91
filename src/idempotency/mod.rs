//! Idempotent publishes: a publisher that retries a publish, send or broadcast with the same
//! `Idempotency-Key` gets the first attempt's reply again, and nothing is delivered twice.
//!
//! A key is scoped to its route and target (the same key on two channels names two requests)
//! and remembered for `--idempotency-window` with the [`Fingerprint`] of the request that
//! used it first, so that a different request under a used key is refused instead of being
//! answered with another request's reply. Only successful replies are remembered: a request
//! that failed can be retried with its key. The in-memory broker keeps keys in a [`Store`];
//! in cluster mode they live in Redis, checked and stored in the same script as the publish
//! (see [`crate::broker::backplane`]).

mod store;

use sha2::{Digest as _, Sha256};

pub use store::{Begin, Pending, Store};

/// The longest idempotency key, in characters.
pub const MAX_KEY_CHARS: usize = 128;

/// Why an `Idempotency-Key` header cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The header is there but empty.
    #[error("Idempotency-Key is empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_CHARS`].
    #[error("Idempotency-Key is longer than 128 characters")]
    TooLong,
    /// The key holds a byte that is not visible ASCII (a space, a control character, UTF-8).
    #[error("Idempotency-Key holds a character that is not visible ASCII")]
    InvalidByte,
    /// The header was sent more than once, so it is unclear which key is meant.
    #[error("Idempotency-Key is sent more than once")]
    Repeated,
}

/// Checks a key: 1 to [`MAX_KEY_CHARS`] visible ASCII characters (`!` to `~`), which keeps
/// keys printable in logs and usable as they are in Redis key names.
///
/// # Errors
/// Which rule the key breaks, as a [`KeyError`].
pub fn parse_key(value: &[u8]) -> Result<&str, KeyError> {
    if value.is_empty() {
        return Err(KeyError::Empty);
    }
    if value.len() > MAX_KEY_CHARS {
        return Err(KeyError::TooLong);
    }
    if !value.iter().all(u8::is_ascii_graphic) {
        return Err(KeyError::InvalidByte);
    }
    std::str::from_utf8(value).map_err(|_| KeyError::InvalidByte)
}

/// The SHA-256 of what a request asks for besides its route and target (which scope its key):
/// its content type and body. The same on every node, so a retry on another node of a cluster
/// is recognised too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a request with this `Content-Type` value (empty when there is none)
    /// and body.
    pub fn of(content_type: &[u8], body: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        // The length first, so that no content type and body pair reads as another one.
        hasher.update((content_type.len() as u64).to_be_bytes());
        hasher.update(content_type);
        hasher.update(body);
        Self(hasher.finalize().into())
    }

    /// Lower-case hex, as the Redis record keeps it (readable with `HGETALL`).
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = String::with_capacity(64);
        for byte in self.0 {
            hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
            hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
        }
        hex
    }
}

/// An `Idempotency-Key` and the fingerprint of the request that carries it: what a broker
/// needs to carry a request out at most once.
#[derive(Debug, Clone)]
pub struct RequestKey {
    /// The key, valid by [`parse_key`].
    pub key: String,
    /// The request's fingerprint.
    pub fingerprint: Fingerprint,
}

/// What became of a request that carried an idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<T> {
    /// The first request with the key: it was carried out now, with this result.
    First(T),
    /// A retry: the first request's result, which is not carried out again.
    Replayed(T),
    /// The key was used for a different request (another content type or body) within the
    /// window; nothing was done.
    Reused,
}

impl<T> Outcome<T> {
    /// The same outcome with its result mapped (a broker's result to what its caller reports).
    pub fn map<U>(self, map: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::First(result) => Outcome::First(map(result)),
            Outcome::Replayed(result) => Outcome::Replayed(map(result)),
            Outcome::Reused => Outcome::Reused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_one_to_128_visible_ascii_characters_once() {
        assert_eq!(parse_key(b"order-42:shipped"), Ok("order-42:shipped"));
        assert_eq!(parse_key(b"!~{}\"\\"), Ok("!~{}\"\\"));
        let longest = "k".repeat(MAX_KEY_CHARS);
        assert_eq!(parse_key(longest.as_bytes()), Ok(longest.as_str()));
        assert_eq!(parse_key(b""), Err(KeyError::Empty));
        assert_eq!(
            parse_key("k".repeat(129).as_bytes()),
            Err(KeyError::TooLong)
        );
        for invalid in [&b"a b"[..], b"a\tb", b"\x7f", "é".as_bytes(), b"\xff"] {
            assert_eq!(
                parse_key(invalid),
                Err(KeyError::InvalidByte),
                "{invalid:?}"
            );
        }
    }

    #[test]
    fn fingerprints_tell_content_types_and_bodies_apart() {
        let json = Fingerprint::of(b"application/json", b"{}");
        assert_eq!(json, Fingerprint::of(b"application/json", b"{}"));
        assert_ne!(json, Fingerprint::of(b"text/plain", b"{}"));
        assert_ne!(json, Fingerprint::of(b"application/json", b"[]"));
        // The boundary between content type and body is part of the fingerprint.
        assert_ne!(Fingerprint::of(b"ab", b"c"), Fingerprint::of(b"a", b"bc"));
        let hex = Fingerprint::of(b"", b"").to_hex();
        assert_eq!(
            hex, "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc",
            "SHA-256 of eight zero bytes"
        );
    }
}
