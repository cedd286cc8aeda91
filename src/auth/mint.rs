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
