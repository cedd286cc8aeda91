//! Connection auth: verifying a client's JWT and what a verified token grants.
//!
//! With `--jwt-secret` (HS256/384/512) and/or `--jwt-public-key` (RS*/PS*, ES256/384, EdDSA), a
//! `/ws` client must present a token. The token's header names its algorithm, which picks the
//! key: HMAC algorithms are checked with the secret only and public-key algorithms with the
//! public key only, so a token "signed" with the public key as an HMAC secret (key confusion)
//! and `alg: none` are both refused. `exp` is required and, like `nbf`, enforced with no
//! leeway unless `--jwt-leeway` sets one. Signature checks are the `jsonwebtoken` crate's.

mod mint;
mod pattern;

use std::collections::HashSet;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::Config;
use crate::name;

pub use mint::{MintError, TokenRequest, mint};
pub use pattern::{PatternError, Patterns};

/// The shortest `--jwt-secret` accepted: RFC 7518 (3.2) wants an HMAC key at least as long as
/// the hash, and a short shared secret can be brute-forced from any one token.
pub const MIN_SECRET_BYTES: usize = 32;

/// The longest `--jwt-leeway` accepted: clock skew is seconds, and a leeway of days would
/// quietly keep expired tokens valid.
pub const MAX_LEEWAY: Duration = Duration::from_secs(3600);

/// Why the JWT settings cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The secret is shorter than [`MIN_SECRET_BYTES`].
    #[error("jwt-secret must be at least {MIN_SECRET_BYTES} bytes")]
    ShortSecret,
    /// The file holds a private key: a notification server at the edge must not hold the
    /// signing key (and the JWT crate would take it and then verify nothing).
    #[error("jwt-public-key holds a private key; give the server the public key only")]
    PrivateKey,
    /// The leeway is over [`MAX_LEEWAY`].
    #[error("jwt-leeway must be at most {}s", MAX_LEEWAY.as_secs())]
    LeewayTooLong,
    /// The public key file is not an RSA, EC or Ed25519 public key in PEM.
    #[error("jwt-public-key is not an RSA, EC (P-256/P-384) or Ed25519 public key in PEM")]
    BadPublicKey,
}

/// Why a token was refused. Each variant has a stable code for the `401` body or error frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in `Authorization: Bearer` or `?token=`.
    #[error("a token is required: Authorization: Bearer <jwt> or ?token=<jwt>")]
    Missing,
    /// Not three base64url parts with a JSON header and claims; says which.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header's `alg` is `none`, unknown, or not one the configured keys verify.
    #[error("algorithm {0} is not accepted")]
    AlgorithmNotAllowed(String),
    /// The signature does not match.
    #[error("bad signature")]
    BadSignature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not yet valid (nbf)")]
    NotYetValid,
    /// A claim the server requires is absent.
    #[error("missing claim `{0}`")]
    MissingClaim(String),
    /// `iss` is not `--jwt-issuer`.
    #[error("wrong issuer")]
    WrongIssuer,
    /// `aud` does not include `--jwt-audience`.
    #[error("wrong audience")]
    WrongAudience,
    /// A claim has the wrong type, `sub` is not a valid client id, or a pattern is invalid.
    #[error("invalid claims: {0}")]
    InvalidClaims(String),
    /// A refresh token names a different `sub` than the connection's.
    #[error("the new token is for a different sub")]
    SubjectChanged,
}

impl AuthError {
    /// The stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "token_missing",
            AuthError::Malformed(_) => "token_malformed",
            AuthError::AlgorithmNotAllowed(_) => "token_algorithm_not_allowed",
            AuthError::BadSignature => "token_bad_signature",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::MissingClaim(_) => "token_missing_claim",
            AuthError::WrongIssuer => "token_wrong_issuer",
            AuthError::WrongAudience => "token_wrong_audience",
            AuthError::InvalidClaims(_) => "token_invalid_claims",
            AuthError::SubjectChanged => "token_subject_changed",
        }
    }
}

/// The claims Herald reads. Unknown claims are ignored.
#[derive(Debug, Deserialize)]
struct Claims {
    /// Defaulted so that a token without `sub` or `exp` gets "missing claim" from the
    /// validation (which requires both) rather than a parse error.
    #[serde(default)]
    sub: String,
    #[serde(default)]
    exp: u64,
    /// Channel patterns the client may subscribe to.
    #[serde(default)]
    channels: Vec<String>,
    /// Channel patterns the client may publish to from its socket.
    #[serde(default)]
    publish: Vec<String>,
    /// Client-id patterns the client may send direct messages to.
    #[serde(default)]
    send: Vec<String>,
}

/// What a verified token lets its connection do.
#[derive(Debug, Clone)]
pub struct Grant {
    /// `sub`: the connection's client id.
    pub subject: Arc<str>,
    /// `channels`: what it may subscribe to.
    pub subscribe: Patterns,
    /// `publish`: where it may publish.
    pub publish: Patterns,
    /// `send`: which client ids it may send direct messages to.
    pub send: Patterns,
    /// When the connection must end (Unix seconds): `exp` plus the leeway. The token is valid
    /// strictly before this second.
    pub expires_at: u64,
}

impl Grant {
    /// Time left until [`Grant::expires_at`], to the millisecond (zero once it has passed).
    pub fn expires_in(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Duration::from_secs(self.expires_at).saturating_sub(now)
    }
}

/// An authenticated connection's grant, with the verifier that checks its refresh tokens.
/// Boxed on the connection, so that anonymous connections pay one pointer for it.
#[derive(Debug)]
pub struct ClientAuth {
    /// Checks the tokens the client sends to refresh its grant.
    pub verifier: Arc<Verifier>,
    /// What the client may do now.
    pub grant: Grant,
}

/// One configured key and the checks that go with it.
struct Key {
    key: DecodingKey,
    validation: Validation,
}

/// Checks tokens against the configured keys; built once at start-up and shared.
pub struct Verifier {
    secret: Option<Key>,
    public: Option<Key>,
    leeway: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("secret", &self.secret.is_some())
            .field("public", &self.public.is_some())
            .field("leeway", &self.leeway)
            .finish()
    }
}

impl Verifier {
    /// The verifier for `config`, or `None` when no JWT key is configured (clients are then
    /// anonymous).
    ///
    /// # Errors
    /// A secret that is too short or a public key that does not parse.
    pub fn from_config(config: &Config) -> Result<Option<Self>, KeyError> {
        if config.jwt_secret.is_none() && config.jwt_public_key.is_none() {
            return Ok(None);
        }
        if config.jwt_leeway > MAX_LEEWAY {
            return Err(KeyError::LeewayTooLong);
        }
        let leeway = config.jwt_leeway.as_secs();
        let validation = |family: AlgorithmFamily| {
            let mut validation = Validation::new(family.algorithms()[0]);
            validation.algorithms = family.algorithms().to_vec();
            validation.leeway = leeway;
            validation.validate_exp = true;
            validation.validate_nbf = true;
            validation.set_required_spec_claims(&["exp", "sub"]);
            match &config.jwt_audience {
                Some(audience) => validation.set_audience(&[audience]),
                None => validation.validate_aud = false,
            }
            if let Some(issuer) = &config.jwt_issuer {
                validation.set_issuer(&[issuer]);
                validation.required_spec_claims =
                    HashSet::from(["exp", "sub", "iss"].map(String::from));
            }
            validation
        };
        let secret = match &config.jwt_secret {
            Some(secret) if secret.len() < MIN_SECRET_BYTES => return Err(KeyError::ShortSecret),
            Some(secret) => Some(Key {
                key: DecodingKey::from_secret(secret.as_bytes()),
                validation: validation(AlgorithmFamily::Hmac),
            }),
            None => None,
        };
        let public = match &config.jwt_public_key {
            Some(pem) if pem.contains("PRIVATE KEY") => return Err(KeyError::PrivateKey),
            Some(pem) => {
                let pem = pem.as_bytes();
                let key = DecodingKey::from_rsa_pem(pem)
                    .or_else(|_| DecodingKey::from_ec_pem(pem))
                    .or_else(|_| DecodingKey::from_ed_pem(pem))
                    .map_err(|_| KeyError::BadPublicKey)?;
                let mut validation = validation(key.family());
                if let Some(curve) = ec_curve_algorithm(&key) {
                    validation.algorithms = vec![curve];
                }
                Some(Key { key, validation })
            }
            None => None,
        };
        Ok(Some(Self {
            secret,
            public,
            leeway,
        }))
    }

    /// Verifies `token` and returns what it grants.
    ///
    /// # Errors
    /// Why the token is refused, as an [`AuthError`].
    pub fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|err| header_error(token, &err))?;
        let key = [&self.secret, &self.public]
            .into_iter()
            .flatten()
            .find(|key| key.validation.algorithms.contains(&header.alg))
            .ok_or_else(|| AuthError::AlgorithmNotAllowed(alg_name(header.alg).to_owned()))?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .map_err(|err| claims_error(err.into_kind(), header.alg))?
            .claims;
        let expires_at = claims.exp.saturating_add(self.leeway);
        // The JWT crate still accepts a token in its `exp` second; RFC 7519 (4.1.4) does not.
        if expires_at <= jsonwebtoken::get_current_timestamp() {
            return Err(AuthError::Expired);
        }
        let sub = claims.sub;
        name::validate(&sub).map_err(|err| {
            AuthError::InvalidClaims(format!("sub is not a valid client id: {err}"))
        })?;
        let patterns = |list: &[String], claim: &str| {
            Patterns::parse(list).map_err(|err| AuthError::InvalidClaims(format!("{claim}: {err}")))
        };
        Ok(Grant {
            subscribe: patterns(&claims.channels, "channels")?,
            publish: patterns(&claims.publish, "publish")?,
            send: patterns(&claims.send, "send")?,
            subject: Arc::from(sub),
            expires_at,
        })
    }

    /// Verifies a token sent to refresh a connection's grant: valid, and for the same `sub`.
    ///
    /// # Errors
    /// As [`Verifier::verify`], and [`AuthError::SubjectChanged`].
    pub fn refresh(&self, current: &Grant, token: &str) -> Result<Grant, AuthError> {
        let grant = self.verify(token)?;
        if grant.subject != current.subject {
            return Err(AuthError::SubjectChanged);
        }
        Ok(grant)
    }
}

/// The one algorithm an EC public key verifies, from the size of its point (P-256 for ES256,
/// P-384 for ES384, uncompressed or compressed); `None` for other keys. Without it, a token
/// naming the other curve's algorithm would be refused as malformed instead of as the wrong
/// algorithm.
fn ec_curve_algorithm(key: &DecodingKey) -> Option<Algorithm> {
    if key.family() != AlgorithmFamily::Ec {
        return None;
    }
    match key.as_bytes().len() {
        65 | 33 => Some(Algorithm::ES256),
        97 | 49 => Some(Algorithm::ES384),
        _ => None,
    }
}

/// Why a token's header was refused: an `alg` the JWT crate does not know (`none` included)
/// gets its own reason; anything else is malformed.
fn header_error(token: &str, err: &jsonwebtoken::errors::Error) -> AuthError {
    #[derive(Deserialize)]
    struct AlgOnly {
        alg: String,
    }
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return malformed(err.kind());
    };
    let alg = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|json| serde_json::from_slice::<AlgOnly>(&json).ok());
    match alg {
        Some(AlgOnly { alg }) if Algorithm::from_str(&alg).is_err() => {
            AuthError::AlgorithmNotAllowed(alg)
        }
        _ => match err.kind() {
            ErrorKind::Json(_) => {
                AuthError::Malformed("the header is not a JSON object with an alg")
            }
            other => malformed(other),
        },
    }
}

fn claims_error(kind: ErrorKind, alg: Algorithm) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim),
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidAlgorithm => AuthError::AlgorithmNotAllowed(alg_name(alg).to_owned()),
        ErrorKind::InvalidClaimFormat(claim) => {
            AuthError::InvalidClaims(format!("`{claim}` has the wrong type"))
        }
        // The claims are JSON of the wrong shape (serde_json's own words would name our types).
        ErrorKind::Json(err) if err.is_data() => AuthError::InvalidClaims(
            "a claim has the wrong type: `sub` must be a string, `exp` and `nbf` whole numbers \
             of seconds, `channels`, `publish` and `send` lists of strings"
                .to_owned(),
        ),
        ErrorKind::Json(_) => AuthError::Malformed("the claims are not a JSON object"),
        other => malformed(&other),
    }
}

/// Says which part of the token format is broken, in the client's terms (the JWT crate's own
/// text for these is the name of its error variant).
fn malformed(kind: &ErrorKind) -> AuthError {
    AuthError::Malformed(match kind {
        ErrorKind::InvalidToken => "not three parts separated by dots",
        ErrorKind::Base64(_) => "a part is not base64url",
        ErrorKind::Utf8(_) => "a part is not UTF-8",
        ErrorKind::Json(_) => "a part is not JSON",
        _ => "it cannot be decoded",
    })
}

/// The name of `alg` in a JWT header (RFC 7518, RFC 8037).
fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alg_names_are_the_ones_tokens_use() {
        for alg in [
            AlgorithmFamily::Hmac,
            AlgorithmFamily::Rsa,
            AlgorithmFamily::Ec,
            AlgorithmFamily::Ed,
        ]
        .iter()
        .flat_map(AlgorithmFamily::algorithms)
        {
            assert_eq!(Algorithm::from_str(alg_name(*alg)).ok(), Some(*alg));
        }
    }

    #[test]
    fn malformed_tokens_say_which_part_is_broken() {
        let config = Config::default().jwt_secret(Some("s".repeat(MIN_SECRET_BYTES)));
        let verifier = Verifier::from_config(&config).unwrap().unwrap();
        let encode = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        let header = encode(r#"{"alg":"HS256"}"#);
        for (token, reason) in [
            ("abc", "not three parts separated by dots"),
            ("a.b.c", "a part is not base64url"),
            (
                &format!("{}.e30.sig", encode("[1]")),
                "the header is not a JSON object with an alg",
            ),
            (&format!("{header}.e30.!"), "a part is not base64url"),
        ] {
            assert_eq!(
                verifier.verify(token).unwrap_err(),
                AuthError::Malformed(reason),
                "{token}"
            );
        }
    }
}
