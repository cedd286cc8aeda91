//! Client tokens: `auth::Verifier::verify` on whatever a client puts in `Authorization: Bearer`
//! or `?token=`.
//!
//! Input: `[mode, rest...]`. Mode bit 0 clear: `rest` is the token string as sent. Set: `rest`
//! is the claims JSON, and the token is built around it with a valid HS256 signature, so that
//! the claims handling behind the signature check (required claims, `sub` rules, channel
//! patterns) is reached.
//!
//! Properties:
//! - `verify` never panics and answers every input with a grant or a reason;
//! - a grant's subject is a valid client id, its expiry is in the future (no leeway is
//!   configured), and every exact channel name listed in the claims matches its patterns;
//! - a token not signed with the secret is never granted.
#![no_main]

use base64::Engine as _;
use herald::Config;
use herald::auth::Verifier;
use herald::name;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret-that-is-at-least-32-bytes";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let verifier = Verifier::from_config(&Config::default().jwt_secret(Some(SECRET.to_owned())))
        .expect("a valid secret")
        .expect("auth is configured");
    let signed = mode & 1 == 1;
    let token = if signed {
        let message = format!("{}.{}", b64(br#"{"alg":"HS256","typ":"JWT"}"#), b64(rest));
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256)
            .expect("HMAC signing cannot fail");
        format!("{message}.{signature}")
    } else {
        String::from_utf8_lossy(rest).into_owned()
    };
    let Ok(grant) = verifier.verify(&token) else {
        return;
    };
    assert!(signed, "an unsigned input was granted: {token}");
    assert!(name::validate(&grant.subject).is_ok(), "granted sub {:?}", grant.subject);
    assert!(
        grant.expires_at >= jsonwebtoken::get_current_timestamp(),
        "granted an expired token"
    );
    // Lossy: serde_json skips unknown claims without checking their strings are UTF-8.
    let claims: serde_json::Value =
        serde_json::from_str(&String::from_utf8_lossy(rest)).expect("granted claims are JSON");
    for channel in claims["channels"].as_array().into_iter().flatten() {
        let channel = channel.as_str().expect("granted patterns are strings");
        if !channel.ends_with('*') {
            assert!(grant.subscribe.matches(channel), "{channel} does not match itself");
        }
    }
});
