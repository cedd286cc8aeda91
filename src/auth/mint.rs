//! Minting client tokens with the shared secret: what `herald token` prints, for the demo page,
//! scripts and tests. Production backends mint their own with any JWT library; the claims are
//! documented in the README.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::{MIN_SECRET_BYTES, PatternError, Patterns};
use crate::name::{self, NameError};

/// What a minted token says.
#[derive(Debug, Clone, Default)]
pub struct TokenRequest {
    /// `sub`: the client id.
    pub subject: String,
    /// `channels`: patterns the client may subscribe to.
    pub channels: Vec<String>,
    /// `publish`: patterns the client may publish to.
    pub publish: Vec<String>,
    /// `send`: client-id patterns the client may send direct messages to.
    pub send: Vec<String>,
    /// From now until `exp`.
    pub ttl: Duration,
    /// `iss`, when the server checks one.
    pub issuer: Option<String>,
    /// `aud`, when the server checks one.
    pub audience: Option<String>,
}

/// Why no token was minted: anything that would make the server refuse it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    /// The secret is shorter than [`MIN_SECRET_BYTES`].
    #[error("the secret must be at least {MIN_SECRET_BYTES} bytes")]
    ShortSecret,
    /// `sub` is not a valid client id.
    #[error("sub is not a valid client id: {0}")]
    InvalidSubject(NameError),
    /// A pattern can match no valid name.
    #[error("{0}")]
    InvalidPattern(#[from] PatternError),
    /// A token valid for less than a second would be refused on arrival.
    #[error("the ttl must be at least one second")]
    ShortTtl,
    /// Only HMAC algorithms can be minted from a shared secret.
    #[error("{0:?} is not an HMAC algorithm (HS256, HS384, HS512)")]
    NotHmac(Algorithm),
    /// The JWT library refused to sign.
    #[error("signing failed: {0}")]
    Signing(String),
}

#[derive(Serialize)]
struct MintedClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    channels: &'a [String],
    publish: &'a [String],
    send: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Signs a token for `request` with `secret` and `algorithm` (HS256, HS384 or HS512).
///
/// # Errors
/// A short secret, an invalid `sub` or pattern, or a non-HMAC algorithm.
pub fn mint(
    secret: &str,
    algorithm: Algorithm,
    request: &TokenRequest,
) -> Result<String, MintError> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(MintError::ShortSecret);
    }
    if !matches!(
        algorithm,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    ) {
        return Err(MintError::NotHmac(algorithm));
    }
    if request.ttl < Duration::from_secs(1) {
        return Err(MintError::ShortTtl);
    }
    name::validate(&request.subject).map_err(MintError::InvalidSubject)?;
    for list in [&request.channels, &request.publish, &request.send] {
        Patterns::parse(list)?;
    }
    let now = jsonwebtoken::get_current_timestamp();
    let claims = MintedClaims {
        sub: &request.subject,
        iat: now,
        exp: now.saturating_add(request.ttl.as_secs()),
        channels: &request.channels,
        publish: &request.publish,
        send: &request.send,
        iss: request.issuer.as_deref(),
        aud: request.audience.as_deref(),
    };
    jsonwebtoken::encode(
        &Header::new(algorithm),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|err| MintError::Signing(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Verifier;
    use crate::config::Config;

    const SECRET: &str = "unit-test-secret-of-at-least-32-bytes";

    #[test]
    fn minted_tokens_verify_with_the_same_secret() {
        let request = TokenRequest {
            subject: "alice".into(),
            channels: vec!["news".into(), "user:alice:*".into()],
            publish: vec!["room:*".into()],
            ttl: Duration::from_secs(60),
            ..TokenRequest::default()
        };
        let config = Config::default().jwt_secret(Some(SECRET.into()));
        let verifier = Verifier::from_config(&config).unwrap().unwrap();
        for algorithm in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let grant = verifier
                .verify(&mint(SECRET, algorithm, &request).unwrap())
                .unwrap();
            assert_eq!(&*grant.subject, "alice");
            assert!(grant.subscribe.matches("user:alice:inbox"));
            assert!(grant.publish.matches("room:1") && !grant.publish.matches("news"));
            assert!(!grant.send.matches("bob"));
            assert!(grant.expires_in() > Duration::from_secs(58));
        }
    }

    #[test]
    fn refuses_what_the_server_would_refuse() {
        let ok = TokenRequest {
            subject: "a".into(),
            ttl: Duration::from_secs(60),
            ..TokenRequest::default()
        };
        let mint = |secret: &str, request: &TokenRequest| mint(secret, Algorithm::HS256, request);
        assert_eq!(mint("short", &ok), Err(MintError::ShortSecret));
        let short_ttl = TokenRequest {
            ttl: Duration::from_millis(500),
            ..ok.clone()
        };
        assert_eq!(mint(SECRET, &short_ttl), Err(MintError::ShortTtl));
        let bad_sub = TokenRequest {
            subject: "a b".into(),
            ..ok.clone()
        };
        assert!(matches!(
            mint(SECRET, &bad_sub),
            Err(MintError::InvalidSubject(_))
        ));
        let bad_pattern = TokenRequest {
            channels: vec!["a*b".into()],
            ..ok.clone()
        };
        assert!(matches!(
            mint(SECRET, &bad_pattern),
            Err(MintError::InvalidPattern(_))
        ));
        assert_eq!(
            super::mint(SECRET, Algorithm::RS256, &ok),
            Err(MintError::NotHmac(Algorithm::RS256))
        );
    }
}
