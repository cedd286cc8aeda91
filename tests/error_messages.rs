//! Every error a client can see, provoked over real sockets, and every error variant listed:
//! each message must be written for the client developer, with no Rust type names, crate
//! names or `Debug` output in it.
//!
//! The WebSocket walk provokes every error frame code the README lists; the HTTP walk every
//! `HttpError` code (and the token codes, and the connection limit's `503`). What cannot be
//! provoked over a socket (a publisher that is not on loopback, a server shutting down) is
//! checked from the lists of every variant at the end, whose exhaustive matches make a new
//! variant fail to compile until it is listed, and then fail the walks until it is provoked
//! or named as unit-only.

mod common;

use std::collections::BTreeSet;

use base64::Engine as _;
use common::{TestServer, Ws, http_exchange, recv_json, upgrade_request_for};
use futures_util::SinkExt as _;
use herald::Config;
use herald::auth::{AuthError, PatternError};
use herald::broker::BrokerError;
use herald::http::HttpError;
use herald::idempotency::KeyError;
use herald::name::NameError;
use herald::protocol::{JsonError, Payload, PayloadError, RequestError, parse_request};
use herald::registry::{Epoch, RecoveryFailure, SubscribeError};
use herald::sse::event_id::EventIdError;
use herald::ws::handshake::HandshakeError;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

const SECRET: &str = "error-messages-secret-of-32-bytes!!";
const ISSUER: &str = "herald-tests";
const AUDIENCE: &str = "clients";

// ---------------------------------------------------------------------------------------------
// The checker.
// ---------------------------------------------------------------------------------------------

/// Words that are Rust or crate vocabulary, never the client's.
const RUST_WORDS: &[&str] = &[
    "u8",
    "u16",
    "u32",
    "u64",
    "u128",
    "usize",
    "i8",
    "i16",
    "i32",
    "i64",
    "i128",
    "isize",
    "f32",
    "f64",
    "bool",
    "char",
    "str",
    "String",
    "Vec",
    "Option",
    "Result",
    "Cow",
    "Box",
    "Arc",
    "HashMap",
    "RawValue",
    "serde",
    "serde_json",
    "jsonwebtoken",
    "hyper",
    "tokio",
    "tungstenite",
    "struct",
    "enum",
    "impl",
    "fn",
    "sequence",
];

/// Fragments of Rust syntax or serde's and `Debug`'s wording.
const RUST_FRAGMENTS: &[&str] = &[
    "::",
    "Some(",
    "None",
    "Ok(",
    "Err(",
    "invalid type:",
    "invalid value:",
    "expected struct",
    "{:?}",
];

/// Mixed-case words that are the protocol's own spelling, not Rust identifiers.
const ALLOWED_MIXED_CASE: &[&str] = &["WebSocket"];

/// What may stand in backticks: the JSON field and claim names a client sends, JSON literals,
/// and JSON punctuation (no letters at all).
const WIRE_NAMES: &[&str] = &[
    "type", "id", "channel", "to", "data", "token", "sub", "exp", "nbf", "iss", "aud", "channels",
    "publish", "send", "true", "false", "null",
];

/// Why `message` is not fit for a client, if it is not.
fn unfit(message: &str) -> Option<String> {
    if message.trim().is_empty() {
        return Some("empty".to_owned());
    }
    if let Some(fragment) = RUST_FRAGMENTS.iter().find(|f| message.contains(*f)) {
        return Some(format!("contains {fragment:?}"));
    }
    for word in message.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if RUST_WORDS.contains(&word) {
            return Some(format!("names {word:?}"));
        }
        let camel = word
            .as_bytes()
            .windows(2)
            .any(|pair| pair[0].is_ascii_lowercase() && pair[1].is_ascii_uppercase());
        if camel && !ALLOWED_MIXED_CASE.contains(&word) {
            return Some(format!("has the identifier {word:?}"));
        }
    }
    for quoted in message.split('`').skip(1).step_by(2) {
        if quoted.chars().any(char::is_alphabetic) && !WIRE_NAMES.contains(&quoted) {
            return Some(format!("puts {quoted:?} in backticks"));
        }
    }
    None
}

#[track_caller]
fn assert_fit(context: &str, message: &str) {
    if let Some(why) = unfit(message) {
        panic!("{context}: message {message:?} {why}");
    }
}

#[test]
fn the_checker_catches_what_it_is_for() {
    for bad in [
        "",
        "invalid JSON: invalid type: string \"x\", expected struct WireRequest",
        "malformed token: InvalidToken",
        "invalid claims: invalid type: string \"x\", expected u64 at line 1 column 9",
        "the message broker is unavailable: Connection refused - IoError",
        "limit Some(3)",
        "algorithm None is not accepted",
        "protocol::RequestError",
        "missing field `kind`",
        "expected a sequence",
    ] {
        assert!(unfit(bad).is_some(), "the checker lets {bad:?} through");
    }
    for good in [
        "field `channel` must be a string",
        "invalid JSON: expected `,` or `}` at line 1 column 12",
        "missing Sec-WebSocket-Key header",
        "a token is required: Authorization: Bearer <jwt> or ?token=<jwt>",
        "body larger than 1024 bytes",
    ] {
        assert_eq!(unfit(good), None, "{good}");
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens.
// ---------------------------------------------------------------------------------------------

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// Claims the JWT server accepts for `sub`, with `extra` merged in (a `null` removes a claim).
fn claims(sub: &str, extra: &Value) -> Value {
    let mut claims = json!({
        "sub": sub,
        "exp": now() + 3600,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "channels": ["granted"],
        "publish": ["granted"],
        "send": ["bob"],
    });
    let object = claims.as_object_mut().expect("claims are an object");
    for (key, value) in extra.as_object().expect("extra is an object") {
        if value.is_null() {
            object.remove(key);
        } else {
            object.insert(key.clone(), value.clone());
        }
    }
    claims
}

fn signed(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

fn token(sub: &str, extra: Value) -> String {
    signed(&claims(sub, &extra), SECRET)
}

/// A token with these header and claims parts as they are, correctly signed.
fn signed_raw(header: &str, claims: &str) -> String {
    let message = format!("{header}.{claims}");
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let signature =
        jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).expect("sign");
    format!("{message}.{signature}")
}

fn b64(json: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

/// Tokens the JWT server refuses, each with the code it gets; every refusal `Verifier::verify`
/// has (the ones a refresh adds are the caller's).
fn refused_tokens() -> Vec<(String, &'static str)> {
    let header = b64(r#"{"alg":"HS256","typ":"JWT"}"#);
    vec![
        ("not-a-token".to_owned(), "token_malformed"),
        ("a.b.c".to_owned(), "token_malformed"),
        (format!("{}.e30.x", b64("[1]")), "token_malformed"),
        (signed_raw(&header, &b64("not json")), "token_malformed"),
        (
            format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64("{}")),
            "token_algorithm_not_allowed",
        ),
        (
            signed(
                &claims("alice", &json!({})),
                "another-secret-that-is-32-bytes!!!",
            ),
            "token_bad_signature",
        ),
        (token("alice", json!({"exp": now() - 10})), "token_expired"),
        (
            token("alice", json!({"nbf": now() + 3600})),
            "token_not_yet_valid",
        ),
        (token("alice", json!({"exp": null})), "token_missing_claim"),
        (token("alice", json!({"iss": null})), "token_missing_claim"),
        (
            token("alice", json!({"iss": "other"})),
            "token_wrong_issuer",
        ),
        (
            token("alice", json!({"aud": "others"})),
            "token_wrong_audience",
        ),
        (token("a b", json!({})), "token_invalid_claims"),
        (
            token("alice", json!({"channels": "granted"})),
            "token_invalid_claims",
        ),
        (
            token("alice", json!({"exp": "tomorrow"})),
            "token_invalid_claims",
        ),
        (
            token("alice", json!({"channels": ["a*b"]})),
            "token_invalid_claims",
        ),
        (signed(&json!(["alice"]), SECRET), "token_invalid_claims"),
    ]
}

async fn jwt_server() -> TestServer {
    TestServer::start(
        Config::default()
            .jwt_secret(Some(SECRET.to_owned()))
            .jwt_issuer(Some(ISSUER.to_owned()))
            .jwt_audience(Some(AUDIENCE.to_owned())),
    )
    .await
}

/// A server in cluster mode whose Redis is not there (a port nobody listens on).
async fn server_without_redis() -> TestServer {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    TestServer::start(
        Config::default()
            .redis(Some(format!("redis://127.0.0.1:{port}")))
            .redis_timeout(std::time::Duration::from_millis(200)),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// The WebSocket walk.
// ---------------------------------------------------------------------------------------------

/// Every error frame code the README lists.
const WS_CODES: &[&str] = &[
    "invalid_json",
    "missing_field",
    "unknown_type",
    "invalid_channel",
    "invalid_client_id",
    "too_many_subscriptions",
    "not_subscribed",
    "client_not_found",
    "binary_not_supported",
    "forbidden",
    "auth_disabled",
    "token_malformed",
    "token_algorithm_not_allowed",
    "token_bad_signature",
    "token_expired",
    "token_not_yet_valid",
    "token_missing_claim",
    "token_wrong_issuer",
    "token_wrong_audience",
    "token_invalid_claims",
    "token_subject_changed",
    "rate_limited",
    "broker_unavailable",
    "invalid_position",
];

/// The error frames one connection gets, checked as they come.
struct Walk {
    seen: BTreeSet<String>,
}

impl Walk {
    /// Sends `message` and checks the error frame that answers it: `code` when given, and a
    /// message fit for a client. Returns the message.
    async fn expect(&mut self, ws: &mut Ws, message: Message, code: Option<&str>) -> String {
        let context = format!("{message:?}");
        ws.send(message).await.expect("send");
        self.next(ws, &context, code).await
    }

    /// Checks the next frame on `ws`: an error frame as [`Walk::expect`] says.
    async fn next(&mut self, ws: &mut Ws, context: &str, code: Option<&str>) -> String {
        let reply = recv_json(ws).await;
        assert_eq!(reply["type"], "error", "{context}: {reply}");
        let got = reply["code"].as_str().expect("code").to_owned();
        if let Some(code) = code {
            assert_eq!(got, code, "{context}: {reply}");
        }
        let text = reply["message"].as_str().expect("message").to_owned();
        assert_fit(&format!("{context} ({got})"), &text);
        self.seen.insert(got);
        text
    }

    async fn request(&mut self, ws: &mut Ws, request: &str, code: &str) -> String {
        self.expect(ws, Message::text(request), Some(code)).await
    }
}

#[tokio::test]
async fn every_error_frame_speaks_to_the_client() {
    let mut walk = Walk {
        seen: BTreeSet::new(),
    };

    let server = TestServer::start(Config::default().max_subscriptions(1)).await;
    let (mut ws, _) = server.connect_json("client_id=walker").await;
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    for (request, message) in [
        ("not json", Some("the request must be a JSON object")),
        ("[1]", Some("the request must be a JSON object")),
        (
            r#"{"type":"subscribe","channel":7}"#,
            Some("field `channel` must be a string"),
        ),
        (
            r#"{"type":["subscribe"],"channel":"a"}"#,
            Some("field `type` must be a string"),
        ),
        (
            r#"{"type":"send","to":{"id":1},"data":1}"#,
            Some("field `to` must be a string"),
        ),
        (
            r#"{"type":"refresh","token":false}"#,
            Some("field `token` must be a string"),
        ),
        (
            r#"{"type":"subscribe","type":"publish","channel":"a"}"#,
            Some("a request field appears more than once"),
        ),
        (
            r#"{"type":"subscribe","channel":"a""#,
            Some(
                "invalid JSON: the text ends at line 1 column 33 before the JSON value is complete",
            ),
        ),
        (
            r#"{"type":"publish","channel":"a","data":tru}"#,
            Some("invalid JSON: expected `true`, `false` or `null` at line 1 column 43"),
        ),
        (r#"{"type":"subscribe","channel":"\ud800"}"#, None),
        (r#"{"type":"publish","channel":"a","data":[1,]}"#, None),
        (
            &format!(r#"{{"type":"publish","channel":"a","data":{deep}}}"#),
            None,
        ),
    ] {
        let got = walk.request(&mut ws, request, "invalid_json").await;
        if let Some(message) = message {
            assert_eq!(got, message, "{request}");
        }
    }
    for (request, message) in [
        (r#"{"channel":"a"}"#, "missing field `type`"),
        (r#"{"type":"subscribe"}"#, "missing field `channel`"),
        (
            r#"{"type":"publish","channel":"a"}"#,
            "missing field `data`",
        ),
        (r#"{"type":"send","data":1}"#, "missing field `to`"),
        (r#"{"type":"send","to":"bob"}"#, "missing field `data`"),
        (r#"{"type":"refresh"}"#, "missing field `token`"),
    ] {
        assert_eq!(
            walk.request(&mut ws, request, "missing_field").await,
            message
        );
    }
    walk.request(&mut ws, r#"{"type":"dance"}"#, "unknown_type")
        .await;
    for channel in ["", "a b", &"x".repeat(129)] {
        let request = json!({"type":"subscribe","channel":channel}).to_string();
        walk.request(&mut ws, &request, "invalid_channel").await;
    }
    for to in ["", "é"] {
        let request = json!({"type":"send","to":to,"data":1}).to_string();
        walk.request(&mut ws, &request, "invalid_client_id").await;
    }
    let subscribe = json!({"type":"subscribe","channel":"one"}).to_string();
    ws.send(Message::text(subscribe)).await.expect("send");
    assert_eq!(recv_json(&mut ws).await["type"], "subscribed");
    walk.request(
        &mut ws,
        r#"{"type":"subscribe","channel":"two"}"#,
        "too_many_subscriptions",
    )
    .await;
    walk.request(
        &mut ws,
        r#"{"type":"unsubscribe","channel":"never"}"#,
        "not_subscribed",
    )
    .await;
    walk.request(
        &mut ws,
        r#"{"type":"send","to":"nobody","data":1}"#,
        "client_not_found",
    )
    .await;
    walk.expect(
        &mut ws,
        Message::binary(vec![1, 2]),
        Some("binary_not_supported"),
    )
    .await;
    walk.request(
        &mut ws,
        r#"{"type":"refresh","token":"x"}"#,
        "auth_disabled",
    )
    .await;

    // A burst of two, then one more in the same write: refused (not yet closed, which takes
    // a second's worth of refusals, two).
    let limited = TestServer::start(Config::default().client_publish_rate(2)).await;
    let (mut ws, _) = limited.connect_json("").await;
    let publish = r#"{"type":"publish","channel":"c","data":1}"#;
    for _ in 0..3 {
        ws.feed(Message::text(publish)).await.expect("feed");
    }
    ws.flush().await.expect("flush");
    for _ in 0..2 {
        assert_eq!(recv_json(&mut ws).await["type"], "published");
    }
    walk.next(&mut ws, publish, Some("rate_limited")).await;

    let jwt = jwt_server().await;
    let mut ws = connect_with_token(&jwt, &token("alice", json!({}))).await;
    for request in [
        r#"{"type":"subscribe","channel":"other"}"#,
        r#"{"type":"publish","channel":"other","data":1}"#,
        r#"{"type":"send","to":"carol","data":1}"#,
    ] {
        walk.request(&mut ws, request, "forbidden").await;
    }
    let mut refusals = refused_tokens();
    refusals.push((token("bob", json!({})), "token_subject_changed"));
    for (token, code) in refusals {
        let request = json!({"type":"refresh","token":token}).to_string();
        walk.request(&mut ws, &request, code).await;
    }

    let cluster = server_without_redis().await;
    let (mut ws, _) = cluster.connect_json("client_id=c").await;
    walk.request(&mut ws, publish, "broker_unavailable").await;
    walk.request(
        &mut ws,
        r#"{"type":"subscribe","channel":"c","since":{"epoch":"x","offset":1}}"#,
        "invalid_position",
    )
    .await;
    walk.request(
        &mut ws,
        r#"{"type":"send","to":"c","data":1}"#,
        "broker_unavailable",
    )
    .await;

    let expected: BTreeSet<String> = WS_CODES.iter().map(|code| (*code).to_owned()).collect();
    assert_eq!(
        walk.seen, expected,
        "codes provoked vs codes the README lists"
    );
    // The codes of the error types are among them.
    for err in request_errors() {
        assert!(walk.seen.contains(err.code()), "{err:?}");
    }
}

/// Connects a json client that presents `token`, and consumes its welcome frame.
async fn connect_with_token(server: &TestServer, token: &str) -> Ws {
    let mut request = server.ws_url("/ws").into_client_request().expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let (mut ws, _) = tokio::time::timeout(common::WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("connect timed out")
        .expect("connect");
    assert_eq!(recv_json(&mut ws).await["type"], "welcome");
    ws
}

// ---------------------------------------------------------------------------------------------
// The HTTP walk.
// ---------------------------------------------------------------------------------------------

/// Codes only the lists below can check: a publisher not on loopback (the tests run on it) and
/// a server shutting down (the moment cannot be held).
const HTTP_UNIT_ONLY: &[&str] = &["publisher_not_local", "shutting_down"];

/// The HTTP error replies, checked as they come.
struct HttpWalk {
    seen: BTreeSet<String>,
}

impl HttpWalk {
    /// Sends `request` on a fresh connection and checks the reply: `status` and `code`, a JSON
    /// body, and a message fit for a client. Returns the message.
    async fn expect(
        &mut self,
        server: &TestServer,
        request: impl Into<Vec<u8>>,
        status: u16,
        code: &str,
    ) -> String {
        let request = request.into();
        let context = String::from_utf8_lossy(&request[..request.len().min(120)]).into_owned();
        let reply = http_exchange(server.addr, request).await;
        assert_eq!(reply.status, status, "{context}: {}", reply.head);
        assert_eq!(
            reply.header("content-type"),
            Some("application/json"),
            "{context}: {}",
            reply.head
        );
        let body = reply.json();
        assert_eq!(body["error"], code, "{context}: {body}");
        let message = body["message"].as_str().expect("message").to_owned();
        assert_fit(&format!("{context} ({code})"), &message);
        self.seen.insert(code.to_owned());
        message
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n")
}

fn post(path: &str, headers: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n{headers}\r\n{body}",
        body.len()
    )
}

fn upgrade(path_and_query: &str) -> String {
    upgrade_request_for(path_and_query, "")
}

/// An upgrade to `/ws` with exactly these handshake header lines.
fn handshake(version: &str, headers: &str) -> String {
    format!("GET /ws {version}\r\nhost: x\r\n{headers}\r\n")
}

#[tokio::test]
async fn every_http_error_speaks_to_the_client() {
    let mut walk = HttpWalk {
        seen: BTreeSet::new(),
    };
    const KEY: &str = common::RAW_KEY;
    let upgrade_headers = "connection: Upgrade\r\nupgrade: websocket\r\n";

    let server = TestServer::start(
        Config::default()
            .max_subscriptions(1)
            .max_message_bytes(64)
            .handshake_timeout(std::time::Duration::from_millis(300)),
    )
    .await;
    walk.expect(&server, get("/nope"), 404, "not_found").await;
    walk.expect(
        &server,
        post("/api/send/nobody", "", "hi"),
        404,
        "client_not_found",
    )
    .await;
    walk.expect(&server, post("/healthz", "", ""), 405, "method_not_allowed")
        .await;
    walk.expect(
        &server,
        format!(
            "POST /ws HTTP/1.1\r\nhost: x\r\n{upgrade_headers}sec-websocket-key: {KEY}\r\nsec-websocket-version: 13\r\ncontent-length: 0\r\n\r\n"
        ),
        405,
        "method_not_allowed",
    )
    .await;
    for request in [
        handshake(
            "HTTP/1.1",
            &format!("{upgrade_headers}sec-websocket-version: 13\r\n"),
        ),
        handshake(
            "HTTP/1.1",
            &format!(
                "{upgrade_headers}sec-websocket-key: c2hvcnQ=\r\nsec-websocket-version: 13\r\n"
            ),
        ),
        handshake(
            "HTTP/1.0",
            &format!("{upgrade_headers}sec-websocket-key: {KEY}\r\nsec-websocket-version: 13\r\n"),
        ),
        handshake(
            "HTTP/1.1",
            &format!(
                "{upgrade_headers}sec-websocket-key: {KEY}\r\nsec-websocket-key: {KEY}\r\nsec-websocket-version: 13\r\n"
            ),
        ),
    ] {
        walk.expect(&server, request, 400, "invalid_handshake")
            .await;
    }
    walk.expect(&server, get("/ws"), 400, "not_websocket_upgrade")
        .await;
    walk.expect(
        &server,
        handshake(
            "HTTP/1.1",
            &format!("{upgrade_headers}sec-websocket-key: {KEY}\r\nsec-websocket-version: 8\r\n"),
        ),
        426,
        "unsupported_version",
    )
    .await;
    for query in ["format=xml", "format=raw"] {
        walk.expect(
            &server,
            upgrade(&format!("/ws?{query}")),
            400,
            "invalid_query",
        )
        .await;
    }
    walk.expect(&server, get("/sse?format=raw"), 400, "invalid_query")
        .await;
    // Last event ids that cannot resume a stream: not one the server sent, one with positions
    // for two channels, one from a stream of `news` (its tag).
    for request in [
        get("/sse?channels=a&last_event_id=nope"),
        "GET /sse?channels=a HTTP/1.1\r\nhost: x\r\nlast-event-id: 7rn1tq.abcd1234-1.abcd1234-2\r\n\r\n"
            .to_owned(),
        get("/sse?channels=a&last_event_id=7rn1tq.abcd1234-1"),
    ] {
        walk.expect(&server, request, 400, "invalid_last_event_id")
            .await;
    }
    walk.expect(
        &server,
        upgrade("/ws?channels=a%20b"),
        400,
        "invalid_channel",
    )
    .await;
    walk.expect(
        &server,
        post("/api/publish/a%22b", "", "1"),
        400,
        "invalid_channel",
    )
    .await;
    walk.expect(&server, upgrade("/ws?client_id="), 400, "invalid_client_id")
        .await;
    walk.expect(
        &server,
        get("/api/history/news?since=1&epoch=abcd1234"),
        409,
        "epoch_changed",
    )
    .await;
    walk.expect(
        &server,
        post("/api/publish/news", "idempotency-key: a b\r\n", "1"),
        400,
        "invalid_idempotency_key",
    )
    .await;
    let keyed = post("/api/publish/news", "idempotency-key: once\r\n", "1");
    assert_eq!(
        http_exchange(server.addr, keyed.into_bytes()).await.status,
        200
    );
    walk.expect(
        &server,
        post("/api/publish/news", "idempotency-key: once\r\n", "2"),
        409,
        "idempotency_key_reused",
    )
    .await;
    walk.expect(
        &server,
        post(&format!("/api/send/{}", "x".repeat(129)), "", "1"),
        400,
        "invalid_client_id",
    )
    .await;
    walk.expect(
        &server,
        upgrade("/ws?channels=a,b"),
        400,
        "too_many_subscriptions",
    )
    .await;
    let json = "content-type: application/json\r\n";
    let deep = format!("{}{}", "[".repeat(30), "]".repeat(30));
    let too_deep = format!("{}{}", "[".repeat(127), "]".repeat(127));
    for (body, message) in [
        (
            "{",
            Some(
                "body is not valid JSON: the text ends at line 1 column 1 before the JSON value is complete",
            ),
        ),
        (
            "[1,]",
            Some("body is not valid JSON: expected value at line 1 column 4"),
        ),
        (
            "nulx",
            Some("body is not valid JSON: expected `true`, `false` or `null` at line 1 column 4"),
        ),
        ("\"a\" \"b\"", None),
        ("", None),
        (&deep[1..], None),
    ] {
        let got = walk
            .expect(
                &server,
                post("/api/publish/c", json, body),
                400,
                "invalid_json",
            )
            .await;
        if let Some(message) = message {
            assert_eq!(got, message, "{body}");
        }
    }
    let big = TestServer::default().await;
    walk.expect(
        &big,
        post("/api/publish/c", json, &too_deep),
        400,
        "invalid_json",
    )
    .await;
    walk.expect(
        &server,
        post("/api/publish/c", "", &"x".repeat(65)),
        413,
        "payload_too_large",
    )
    .await;
    walk.expect(
        &server,
        get(&format!("/{}", "x".repeat(9 * 1024))),
        414,
        "uri_too_long",
    )
    .await;
    walk.expect(
        &server,
        format!(
            "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
            "x".repeat(17 * 1024)
        ),
        431,
        "headers_too_large",
    )
    .await;
    walk.expect(
        &server,
        "POST /api/publish/c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n\r\n",
        400,
        "body_read_error",
    )
    .await;
    // The body never comes: the server's own timeout answers.
    walk.expect(
        &server,
        "POST /api/publish/c HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n12",
        408,
        "request_timeout",
    )
    .await;
    walk.expect(
        &server,
        upgrade_request_for("/ws", "origin: http://evil.example\r\n"),
        403,
        "origin_not_allowed",
    )
    .await;

    let keyed = TestServer::start(Config::default().api_keys(vec!["k".to_owned()])).await;
    walk.expect(&keyed, post("/api/broadcast", "", "1"), 401, "unauthorized")
        .await;
    walk.expect(
        &keyed,
        post("/api/broadcast", "authorization: Bearer nope\r\n", "1"),
        401,
        "unauthorized",
    )
    .await;

    let jwt = jwt_server().await;
    walk.expect(&jwt, upgrade("/ws"), 401, "token_missing")
        .await;
    for (token, code) in refused_tokens() {
        walk.expect(
            &jwt,
            upgrade_request_for("/ws", &format!("authorization: Bearer {token}\r\n")),
            401,
            code,
        )
        .await;
    }
    walk.expect(
        &jwt,
        upgrade(&format!(
            "/ws?channels=other&token={}",
            token("alice", json!({}))
        )),
        403,
        "forbidden",
    )
    .await;

    let cluster = server_without_redis().await;
    walk.expect(&cluster, get("/readyz"), 503, "broker_unavailable")
        .await;
    walk.expect(
        &cluster,
        post("/api/publish/c", "", "1"),
        503,
        "broker_unavailable",
    )
    .await;

    // The connection limit is answered before hyper, by the accept loop.
    let full = TestServer::start(Config::default().max_connections(1)).await;
    let (_holder, _) = full.connect_json("").await;
    walk.expect(&full, get("/healthz"), 503, "too_many_connections")
        .await;

    let mut expected: BTreeSet<String> = http_errors()
        .into_iter()
        .chain(handshake_errors().into_iter().map(HttpError::Handshake))
        .chain(auth_errors().into_iter().map(HttpError::Token))
        .map(|err| err.code().to_owned())
        // A different `sub` is a refusal of a refresh only.
        .filter(|code| code != "token_subject_changed")
        .filter(|code| !HTTP_UNIT_ONLY.contains(&code.as_str()))
        .collect();
    expected.insert("too_many_connections".to_owned());
    assert_eq!(
        walk.seen, expected,
        "codes provoked vs the error types' codes"
    );
}

// ---------------------------------------------------------------------------------------------
// Every variant, including what no socket can provoke.
// ---------------------------------------------------------------------------------------------

/// One example of every `HttpError` variant. The match has no wildcard, so a new variant does
/// not compile until it is numbered here, and then the coverage check wants an example of it.
fn http_errors() -> Vec<HttpError> {
    let examples = vec![
        HttpError::NotFound,
        HttpError::MethodNotAllowed { allow: "GET" },
        HttpError::Handshake(HandshakeError::MissingKey),
        HttpError::InvalidQuery("format must be json or raw".to_owned()),
        HttpError::InvalidChannel(NameError::Empty),
        HttpError::InvalidClientId(NameError::TooLong),
        HttpError::TooManySubscriptions(128),
        HttpError::PayloadTooLarge { limit: 65536 },
        HttpError::from(Payload::from_body(b"{", true).expect_err("invalid body")),
        HttpError::RequestTimeout,
        HttpError::BodyRead,
        HttpError::ClientNotFound("bob".to_owned()),
        HttpError::UriTooLong,
        HttpError::HeadersTooLarge,
        HttpError::Unauthorized,
        HttpError::PublisherNotLocal,
        HttpError::Token(AuthError::Missing),
        HttpError::ChannelForbidden("other".to_owned()),
        HttpError::OriginNotAllowed,
        HttpError::ShuttingDown,
        HttpError::from(BrokerError::Unavailable(
            "redis refused the connection".to_owned(),
        )),
        HttpError::NotRecovered {
            channel: "news".to_owned(),
            failure: RecoveryFailure::EpochChanged,
            epoch: Epoch::parse("abcd1234").expect("an epoch"),
            offset: 7,
        },
        HttpError::InvalidIdempotencyKey(KeyError::InvalidByte),
        HttpError::IdempotencyKeyReused("order-42".to_owned()),
        HttpError::InvalidLastEventId(EventIdError::OtherChannels),
    ];
    assert_covers(&examples, 25, |err| match err {
        HttpError::NotFound => 0,
        HttpError::MethodNotAllowed { .. } => 1,
        HttpError::Handshake(_) => 2,
        HttpError::InvalidQuery(_) => 3,
        HttpError::InvalidChannel(_) => 4,
        HttpError::InvalidClientId(_) => 5,
        HttpError::TooManySubscriptions(_) => 6,
        HttpError::PayloadTooLarge { .. } => 7,
        HttpError::InvalidJson(_) => 8,
        HttpError::RequestTimeout => 9,
        HttpError::BodyRead => 10,
        HttpError::ClientNotFound(_) => 11,
        HttpError::UriTooLong => 12,
        HttpError::HeadersTooLarge => 13,
        HttpError::Unauthorized => 14,
        HttpError::PublisherNotLocal => 15,
        HttpError::Token(_) => 16,
        HttpError::ChannelForbidden(_) => 17,
        HttpError::OriginNotAllowed => 18,
        HttpError::ShuttingDown => 19,
        HttpError::BrokerUnavailable(_) => 20,
        HttpError::NotRecovered { .. } => 21,
        HttpError::InvalidIdempotencyKey(_) => 22,
        HttpError::IdempotencyKeyReused(_) => 23,
        HttpError::InvalidLastEventId(_) => 24,
    });
    examples
}

fn handshake_errors() -> Vec<HandshakeError> {
    let examples = vec![
        HandshakeError::MethodNotGet,
        HandshakeError::NotHttp11,
        HandshakeError::NotUpgrade,
        HandshakeError::DuplicateHeader("Sec-WebSocket-Key"),
        HandshakeError::MissingKey,
        HandshakeError::InvalidKey,
        HandshakeError::UnsupportedVersion,
    ];
    assert_covers(&examples, 7, |err| match err {
        HandshakeError::MethodNotGet => 0,
        HandshakeError::NotHttp11 => 1,
        HandshakeError::NotUpgrade => 2,
        HandshakeError::DuplicateHeader(_) => 3,
        HandshakeError::MissingKey => 4,
        HandshakeError::InvalidKey => 5,
        HandshakeError::UnsupportedVersion => 6,
    });
    examples
}

fn auth_errors() -> Vec<AuthError> {
    let examples = vec![
        AuthError::Missing,
        AuthError::Malformed("not three parts separated by dots"),
        AuthError::AlgorithmNotAllowed("none".to_owned()),
        AuthError::BadSignature,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::MissingClaim("exp".to_owned()),
        AuthError::WrongIssuer,
        AuthError::WrongAudience,
        AuthError::InvalidClaims(PatternError::InnerWildcard("a*b".to_owned()).to_string()),
        AuthError::SubjectChanged,
    ];
    assert_covers(&examples, 11, |err| match err {
        AuthError::Missing => 0,
        AuthError::Malformed(_) => 1,
        AuthError::AlgorithmNotAllowed(_) => 2,
        AuthError::BadSignature => 3,
        AuthError::Expired => 4,
        AuthError::NotYetValid => 5,
        AuthError::MissingClaim(_) => 6,
        AuthError::WrongIssuer => 7,
        AuthError::WrongAudience => 8,
        AuthError::InvalidClaims(_) => 9,
        AuthError::SubjectChanged => 10,
    });
    examples
}

/// Real refusals from the parser, so that the messages are the ones clients get.
fn request_errors() -> Vec<RequestError> {
    let examples: Vec<RequestError> = [
        "{",
        "[]",
        r#"{"type":1}"#,
        r#"{"type":"a","type":"b"}"#,
        r#"{"channel":"a"}"#,
        r#"{"type":"what"}"#,
        r#"{"type":"subscribe","channel":""}"#,
        r#"{"type":"send","to":"a b","data":1}"#,
        r#"{"type":"subscribe","channel":"a","since":1}"#,
    ]
    .iter()
    .map(|text| parse_request(text).request.expect_err(text))
    .collect();
    assert_covers(&examples, 9, |err| match err {
        RequestError::InvalidJson(_) => 0,
        RequestError::NotAnObject => 1,
        RequestError::NotAString(_) => 2,
        RequestError::RepeatedField => 3,
        RequestError::MissingField(_) => 4,
        RequestError::UnknownType => 5,
        RequestError::InvalidChannel(_) => 6,
        RequestError::InvalidClientId(_) => 7,
        RequestError::InvalidPosition => 8,
    });
    examples
}

fn json_errors() -> Vec<JsonError> {
    let examples: Vec<JsonError> = [
        &b"[1 2]"[..],
        b"[1",
        format!("{}{}", "[".repeat(127), "]".repeat(127)).as_bytes(),
    ]
    .iter()
    .map(|body| match Payload::from_body(body, true) {
        Err(PayloadError::InvalidJson(err)) => err,
        Ok(_) => panic!("{body:?} accepted"),
    })
    .collect();
    assert_covers(&examples, 3, |err| match err {
        JsonError::Syntax { .. } => 0,
        JsonError::Truncated { .. } => 1,
        JsonError::TooDeep(_) => 2,
    });
    examples
}

/// Asserts that `examples` has one of each of the `count` variants `index` numbers.
fn assert_covers<E: std::fmt::Debug>(examples: &[E], count: usize, index: impl Fn(&E) -> usize) {
    let mut covered = vec![false; count];
    for example in examples {
        let index = index(example);
        assert!(
            index < count,
            "{example:?} is numbered {index}: raise the count to list it"
        );
        covered[index] = true;
    }
    let missing: Vec<usize> = (0..count).filter(|index| !covered[*index]).collect();
    assert!(missing.is_empty(), "no example of variants {missing:?}");
}

#[test]
fn every_error_variant_speaks_to_the_client() {
    let mut messages: Vec<(String, String)> = Vec::new();
    let mut add = |what: &str, message: String| messages.push((what.to_owned(), message));
    for err in http_errors() {
        add(err.code(), err.to_string());
    }
    for err in handshake_errors() {
        add("handshake", HttpError::Handshake(err).to_string());
    }
    for err in auth_errors() {
        add(err.code(), err.to_string());
    }
    for err in request_errors() {
        add(err.code(), err.to_string());
    }
    for err in json_errors() {
        add("json", err.to_string());
        add("json", PayloadError::InvalidJson(err).to_string());
    }
    for err in [NameError::Empty, NameError::TooLong, NameError::InvalidByte] {
        match err {
            NameError::Empty | NameError::TooLong | NameError::InvalidByte => {}
        }
        add("name", err.to_string());
    }
    for err in [SubscribeError::TooMany(128), SubscribeError::Gone] {
        match err {
            SubscribeError::TooMany(_) | SubscribeError::Gone => {}
        }
        add("subscribe", err.to_string());
    }
    for err in [
        BrokerError::ShuttingDown,
        BrokerError::Unavailable("redis did not answer within 2000 ms".to_owned()),
        BrokerError::NotRecovered {
            channel: "news".to_owned(),
            failure: RecoveryFailure::PositionExpired,
            epoch: Epoch::parse("abcd1234").expect("an epoch"),
            offset: 7,
        },
    ] {
        match err {
            BrokerError::ShuttingDown
            | BrokerError::Unavailable(_)
            | BrokerError::NotRecovered { .. } => {}
        }
        add("broker", err.to_string());
    }
    for err in [
        EventIdError::Malformed("it does not start with a tag"),
        EventIdError::ChannelCount {
            expected: 1,
            found: 2,
        },
        EventIdError::OtherChannels,
    ] {
        match err {
            EventIdError::Malformed(_)
            | EventIdError::ChannelCount { .. }
            | EventIdError::OtherChannels => {}
        }
        add("last_event_id", err.to_string());
    }
    for (what, message) in &messages {
        assert_fit(what, message);
    }
}
