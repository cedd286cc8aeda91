//! JWT connection auth over real sockets: tokens signed here (HS256 with a secret; ES256,
//! RS256 and EdDSA with the test keys in tests/fixtures/jwt), every rejection reason, channel
//! patterns, publish and send permissions, expiry and refresh.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{TestServer, expect_close, http_exchange, recv_json, send_json, upgrade_request_for};
use herald::Config;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

const SECRET: &str = "test-secret-that-is-32-bytes-long!!";
const ES256_PRIVATE: &str = include_str!("fixtures/jwt/es256-private.pem");
const ES256_PUBLIC: &str = include_str!("fixtures/jwt/es256-public.pem");
const RS256_PRIVATE: &str = include_str!("fixtures/jwt/rs256-private.pem");
const RS256_PUBLIC: &str = include_str!("fixtures/jwt/rs256-public.pem");
const ED25519_PRIVATE: &str = include_str!("fixtures/jwt/ed25519-private.pem");
const ED25519_PUBLIC: &str = include_str!("fixtures/jwt/ed25519-public.pem");

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// Claims valid for an hour for `sub`, with `extra` merged in (a `null` removes a claim).
fn claims(sub: &str, extra: Value) -> Value {
    let mut claims = json!({"sub": sub, "exp": now() + 3600});
    for (key, value) in extra.as_object().expect("extra is an object") {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(key);
        } else {
            claims[key] = value.clone();
        }
    }
    claims
}

fn hs256(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn signed(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn es256(claims: &Value) -> String {
    let key = EncodingKey::from_ec_pem(ES256_PRIVATE.as_bytes()).unwrap();
    signed(Algorithm::ES256, &key, claims)
}

fn rs256(claims: &Value) -> String {
    let key = EncodingKey::from_rsa_pem(RS256_PRIVATE.as_bytes()).unwrap();
    signed(Algorithm::RS256, &key, claims)
}

/// A token with a hand-made header and no real signature (`alg: none` and friends).
fn unsigned(header: &Value, claims: &Value) -> String {
    let b64 = |value: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string().as_bytes())
    };
    format!("{}.{}.", b64(header), b64(claims))
}

async fn hs256_server() -> TestServer {
    TestServer::start(Config::default().jwt_secret(Some(SECRET.to_owned()))).await
}

/// Upgrades `/ws?<query>` with an optional bearer token; returns the status and JSON body
/// (`Value::Null` for a `101`).
async fn upgrade(server: &TestServer, query: &str, bearer: Option<&str>) -> (u16, Value) {
    let header = bearer.map_or(String::new(), |token| {
        format!("authorization: Bearer {token}\r\n")
    });
    let reply = http_exchange(
        server.addr,
        upgrade_request_for(&format!("/ws?{query}"), &header).into_bytes(),
    )
    .await;
    if reply.status == 101 {
        return (101, Value::Null);
    }
    if reply.status == 401 {
        assert_eq!(
            reply.header("www-authenticate"),
            Some(r#"Bearer error="invalid_token""#)
        );
    }
    (reply.status, reply.json())
}

/// Connects a json client with `token` in the `Authorization` header; returns it and the
/// client id from its welcome frame.
async fn connect_with_header(
    server: &TestServer,
    query: &str,
    token: &str,
) -> (common::Ws, String) {
    let mut request = server
        .ws_url(&format!("/ws?{query}"))
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("connect");
    let welcome = recv_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome");
    (ws, welcome["client_id"].as_str().unwrap().to_owned())
}

async fn stats(server: &TestServer) -> Value {
    server.http().await.get("/api/stats").await.json()
}

#[tokio::test]
async fn a_valid_token_in_the_header_or_the_query_makes_sub_the_client_id() {
    let server = hs256_server().await;
    let token = hs256(&claims("alice", json!({"channels": ["news"]})));
    let (_ws, id) = connect_with_header(&server, "client_id=mallory&channels=news", &token).await;
    assert_eq!(id, "alice", "sub wins over ?client_id=");
    let bob = hs256(&claims("bob", json!({})));
    let (_ws, id) = connect_with_header(&server, &format!("token={bob}"), &token).await;
    assert_eq!(id, "alice", "the Authorization header wins over ?token=");
    let (mut ws, id) = server
        .connect_json(&format!("channels=news&client_id=mallory&token={token}"))
        .await;
    assert_eq!(id, "alice");
    let mut http = server.http().await;
    let reply = http.post_json("/api/publish/news", r#"{"n":1}"#).await;
    assert_eq!(
        reply.json()["subscribers"],
        2,
        "both connections subscribed on connect"
    );
    assert_eq!(recv_json(&mut ws).await["data"], json!({"n": 1}));
}

#[tokio::test]
async fn every_refused_token_gets_401_with_its_reason_and_registers_nothing() {
    let server = hs256_server().await;
    let other_secret = EncodingKey::from_secret(b"another-secret-also-32-bytes-long!!");
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, "token_missing"),
        ("garbage", Some("not-a-jwt".into()), "token_malformed"),
        (
            "wrong secret",
            Some(signed(
                Algorithm::HS256,
                &other_secret,
                &claims("a", json!({})),
            )),
            "token_bad_signature",
        ),
        (
            "expired",
            Some(hs256(&claims("a", json!({"exp": now() - 5})))),
            "token_expired",
        ),
        (
            "not yet valid",
            Some(hs256(&claims("a", json!({"nbf": now() + 60})))),
            "token_not_yet_valid",
        ),
        (
            "alg none",
            Some(unsigned(
                &json!({"alg": "none", "typ": "JWT"}),
                &claims("a", json!({})),
            )),
            "token_algorithm_not_allowed",
        ),
        (
            "no exp",
            Some(hs256(&claims("a", json!({"exp": null})))),
            "token_missing_claim",
        ),
        (
            "exp is now (valid strictly before exp)",
            Some(hs256(&claims("a", json!({"exp": now()})))),
            "token_expired",
        ),
        (
            "two parts",
            Some("eyJhbGciOiJIUzI1NiJ9.e30".into()),
            "token_malformed",
        ),
        (
            "no sub",
            Some(hs256(&json!({"exp": now() + 60}))),
            "token_missing_claim",
        ),
        (
            "sub not a client id",
            Some(hs256(&claims("bad sub", json!({})))),
            "token_invalid_claims",
        ),
        (
            "pattern with an inner star",
            Some(hs256(&claims("a", json!({"channels": ["a*b"]})))),
            "token_invalid_claims",
        ),
        (
            "exp not a number",
            Some(hs256(&claims("a", json!({"exp": "tomorrow"})))),
            "token_invalid_claims",
        ),
        (
            "ES256 without a public key configured",
            Some(es256(&claims("a", json!({})))),
            "token_algorithm_not_allowed",
        ),
    ];
    for (what, token, code) in cases {
        let (status, body) = upgrade(&server, "", token.as_deref()).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"], code, "{what}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let echo = http_exchange(server.addr, upgrade_request_for("/echo", "").into_bytes()).await;
    assert_eq!(echo.status, 401, "/echo needs a token too when auth is on");
    let (status, body) = upgrade(&server, "token=not-a-jwt", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_malformed"))
    );
    let stats = stats(&server).await;
    assert_eq!(
        stats["connections_opened"], 0,
        "nothing registered: {stats}"
    );
    let (status, _) = upgrade(&server, "", Some(&hs256(&claims("a", json!({}))))).await;
    assert_eq!(status, 101, "a good token still gets in");
}

#[tokio::test]
async fn public_key_tokens_are_verified_and_key_confusion_is_refused() {
    let es =
        TestServer::start(Config::default().jwt_public_key(Some(ES256_PUBLIC.to_owned()))).await;
    let (_ws, id) = connect_with_header(&es, "", &es256(&claims("carol", json!({})))).await;
    assert_eq!(id, "carol");
    // The same claims with the signature of another token: a bad signature.
    let good = es256(&claims("carol", json!({})));
    let forged_claims = es256(&claims("admin", json!({})));
    let signature = good.rsplit('.').next().unwrap();
    let (head, _) = forged_claims.rsplit_once('.').unwrap();
    let (status, body) = upgrade(&es, "", Some(&format!("{head}.{signature}"))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_bad_signature"))
    );

    let es384 = unsigned(
        &json!({"alg": "ES384", "typ": "JWT"}),
        &claims("carol", json!({})),
    );
    let (status, body) = upgrade(&es, "", Some(&format!("{es384}AAAA"))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_algorithm_not_allowed")),
        "a P-256 key verifies ES256 only"
    );

    let rs =
        TestServer::start(Config::default().jwt_public_key(Some(RS256_PUBLIC.to_owned()))).await;
    let (_ws, id) = connect_with_header(&rs, "", &rs256(&claims("dave", json!({})))).await;
    assert_eq!(id, "dave");
    // HS/RS confusion: an HS256 token whose "secret" is the server's public key.
    let confused = signed(
        Algorithm::HS256,
        &EncodingKey::from_secret(RS256_PUBLIC.as_bytes()),
        &claims("dave", json!({})),
    );
    let (status, body) = upgrade(&rs, "", Some(&confused)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_algorithm_not_allowed"))
    );
    let (status, body) = upgrade(&rs, "", Some(&es256(&claims("dave", json!({}))))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_algorithm_not_allowed")),
        "an EC token is not checked with an RSA key"
    );

    let ed =
        TestServer::start(Config::default().jwt_public_key(Some(ED25519_PUBLIC.to_owned()))).await;
    let ed_key = EncodingKey::from_ed_pem(ED25519_PRIVATE.as_bytes()).unwrap();
    let (_ws, id) = connect_with_header(
        &ed,
        "",
        &signed(Algorithm::EdDSA, &ed_key, &claims("erin", json!({}))),
    )
    .await;
    assert_eq!(id, "erin");
    let (status, body) = upgrade(&ed, "", Some(&rs256(&claims("erin", json!({}))))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_algorithm_not_allowed"))
    );

    let both = TestServer::start(
        Config::default()
            .jwt_secret(Some(SECRET.to_owned()))
            .jwt_public_key(Some(ES256_PUBLIC.to_owned())),
    )
    .await;
    for token in [
        hs256(&claims("e", json!({}))),
        es256(&claims("e", json!({}))),
    ] {
        assert_eq!(upgrade(&both, "", Some(&token)).await.0, 101);
    }
}

#[tokio::test]
async fn leeway_applies_to_exp_and_nbf_and_defaults_to_none() {
    let strict = hs256_server().await;
    let lenient = TestServer::start(
        Config::default()
            .jwt_secret(Some(SECRET.to_owned()))
            .jwt_leeway(Duration::from_secs(30)),
    )
    .await;
    let just_expired = hs256(&claims("a", json!({"exp": now() - 10})));
    let early = hs256(&claims("a", json!({"nbf": now() + 10})));
    for token in [&just_expired, &early] {
        assert_eq!(upgrade(&strict, "", Some(token)).await.0, 401);
        assert_eq!(upgrade(&lenient, "", Some(token)).await.0, 101);
    }
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let server = TestServer::start(
        Config::default()
            .jwt_secret(Some(SECRET.to_owned()))
            .jwt_issuer(Some("https://auth.example".to_owned()))
            .jwt_audience(Some("herald".to_owned())),
    )
    .await;
    let good = json!({"iss": "https://auth.example", "aud": "herald"});
    assert_eq!(
        upgrade(&server, "", Some(&hs256(&claims("a", good))))
            .await
            .0,
        101
    );
    for (extra, code) in [
        (
            json!({"iss": "https://evil.example", "aud": "herald"}),
            "token_wrong_issuer",
        ),
        (
            json!({"iss": "https://auth.example", "aud": "other"}),
            "token_wrong_audience",
        ),
        (json!({"aud": "herald"}), "token_missing_claim"),
    ] {
        let (status, body) = upgrade(&server, "", Some(&hs256(&claims("a", extra)))).await;
        assert_eq!((status, body["error"].as_str()), (401, Some(code)));
    }
}

#[tokio::test]
async fn channel_patterns_decide_what_a_client_may_subscribe_to() {
    let server = hs256_server().await;
    let token = hs256(&claims("u42", json!({"channels": ["news", "user:42:*"]})));
    let (status, body) = upgrade(
        &server,
        &format!("channels=news,user:43:inbox&token={token}"),
        None,
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], "forbidden");
    assert!(body["message"].as_str().unwrap().contains("user:43:inbox"));
    assert_eq!(
        stats(&server).await["connections_opened"],
        0,
        "a 403 registers nothing"
    );

    let (mut ws, _) = server
        .connect_json(&format!("channels=news,user:42:inbox&token={token}"))
        .await;
    send_json(
        &mut ws,
        json!({"type": "subscribe", "channel": "user:42:alerts", "id": 1}),
    )
    .await;
    assert_eq!(recv_json(&mut ws).await["type"], "subscribed");
    send_json(
        &mut ws,
        json!({"type": "subscribe", "channel": "user:43:alerts", "id": 2}),
    )
    .await;
    let refused = recv_json(&mut ws).await;
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("forbidden"))
    );
    assert_eq!(refused["id"], 2);
    send_json(&mut ws, json!({"type": "subscribe", "channel": "newsroom"})).await;
    assert_eq!(
        recv_json(&mut ws).await["code"],
        "forbidden",
        "exact names are exact"
    );
    // Still open and still receiving what it may.
    let mut http = server.http().await;
    for channel in ["user:43:alerts", "user:42:alerts"] {
        http.post_json(
            &format!("/api/publish/{channel}"),
            &format!("\"{channel}\""),
        )
        .await;
    }
    let message = recv_json(&mut ws).await;
    assert_eq!(
        (message["channel"].as_str(), message["data"].as_str()),
        (Some("user:42:alerts"), Some("user:42:alerts"))
    );
}

#[tokio::test]
async fn publish_and_send_need_their_own_claims() {
    let server = hs256_server().await;
    let reader = hs256(&claims("reader", json!({"channels": ["chat:*"]})));
    let writer = hs256(&claims(
        "writer",
        json!({"channels": ["chat:*"], "publish": ["chat:*"], "send": ["reader"]}),
    ));
    let (mut reader_ws, _) = server
        .connect_json(&format!("channels=chat:1&token={reader}"))
        .await;
    let (mut writer_ws, _) = server.connect_json(&format!("token={writer}")).await;

    send_json(
        &mut reader_ws,
        json!({"type": "publish", "channel": "chat:1", "data": 1, "id": "p"}),
    )
    .await;
    let refused = recv_json(&mut reader_ws).await;
    assert_eq!(
        (refused["code"].as_str(), refused["id"].as_str()),
        (Some("forbidden"), Some("p"))
    );
    send_json(
        &mut reader_ws,
        json!({"type": "send", "to": "writer", "data": 1}),
    )
    .await;
    assert_eq!(recv_json(&mut reader_ws).await["code"], "forbidden");

    send_json(
        &mut writer_ws,
        json!({"type": "publish", "channel": "lobby", "data": 1}),
    )
    .await;
    assert_eq!(
        recv_json(&mut writer_ws).await["code"],
        "forbidden",
        "outside its publish patterns"
    );
    send_json(
        &mut writer_ws,
        json!({"type": "publish", "channel": "chat:1", "data": "hi"}),
    )
    .await;
    assert_eq!(recv_json(&mut writer_ws).await["type"], "published");
    let message = recv_json(&mut reader_ws).await;
    assert_eq!(
        (message["from"].as_str(), message["data"].as_str()),
        (Some("writer"), Some("hi"))
    );
    send_json(
        &mut writer_ws,
        json!({"type": "send", "to": "reader", "data": "dm"}),
    )
    .await;
    assert_eq!(recv_json(&mut writer_ws).await["type"], "sent");
    let direct = recv_json(&mut reader_ws).await;
    assert_eq!(
        (direct["type"].as_str(), direct["data"].as_str()),
        (Some("direct"), Some("dm"))
    );
}

#[tokio::test]
async fn an_expired_token_closes_the_connection_with_4001() {
    let server = hs256_server().await;
    let exp = now() + 4;
    let token = hs256(&claims("short", json!({"exp": exp, "channels": ["*"]})));
    let (mut json_ws, _) = server
        .connect_json(&format!("channels=news&token={token}"))
        .await;
    // A raw connection cannot refresh: it is closed at the same time.
    let mut raw_ws = server
        .connect(&format!("/ws?format=raw&channels=news&token={token}"))
        .await;
    server
        .http()
        .await
        .post_json("/api/publish/news", r#""before""#)
        .await;
    assert_eq!(recv_json(&mut json_ws).await["data"], "before");
    for ws in [&mut json_ws, &mut raw_ws] {
        assert_eq!(expect_close(ws).await, (4001, "token expired".to_owned()));
        assert!(now() >= exp, "closed before the token's exp");
    }
    let metrics = server.http().await.get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        text.contains(r#"herald_connections_closed_total{reason="token_expired"} 2"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_refresh_keeps_the_connection_and_applies_the_new_grant() {
    let server = hs256_server().await;
    let first_exp = now() + 4;
    let first = hs256(&claims(
        "bob",
        json!({"exp": first_exp, "channels": ["a", "b"]}),
    ));
    let (mut ws, _) = server
        .connect_json(&format!("channels=a,b&token={first}"))
        .await;

    let other_sub = hs256(&claims("eve", json!({"channels": ["*"]})));
    send_json(
        &mut ws,
        json!({"type": "refresh", "token": other_sub, "id": 1}),
    )
    .await;
    let refused = recv_json(&mut ws).await;
    assert_eq!(
        (refused["code"].as_str(), refused["id"].as_i64()),
        (Some("token_subject_changed"), Some(1))
    );
    send_json(
        &mut ws,
        json!({"type": "refresh", "token": "junk", "id": 2}),
    )
    .await;
    assert_eq!(recv_json(&mut ws).await["code"], "token_malformed");
    let expired = hs256(&claims("bob", json!({"exp": now() - 1})));
    send_json(&mut ws, json!({"type": "refresh", "token": expired})).await;
    assert_eq!(recv_json(&mut ws).await["code"], "token_expired");
    let forged = signed(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"not-the-server-secret-but-32-bytes!"),
        &claims("bob", json!({"channels": ["*"]})),
    );
    send_json(&mut ws, json!({"type": "refresh", "token": forged})).await;
    assert_eq!(recv_json(&mut ws).await["code"], "token_bad_signature");

    let fresh = hs256(&claims("bob", json!({"channels": ["a"]})));
    send_json(&mut ws, json!({"type": "refresh", "token": fresh, "id": 3})).await;
    let revoked = recv_json(&mut ws).await;
    assert_eq!(
        (revoked["type"].as_str(), revoked["channel"].as_str()),
        (Some("unsubscribed"), Some("b"))
    );
    let refreshed = recv_json(&mut ws).await;
    assert_eq!(refreshed["type"], "refreshed");
    assert_eq!(refreshed["id"], 3);
    assert!(refreshed["expires_in"].as_u64().unwrap() > 3000);

    // Past the first token's expiry (and the once-a-second check), the connection receives.
    while now() <= first_exp + 1 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut http = server.http().await;
    let reply = http.post_json("/api/publish/b", "1").await;
    assert_eq!(reply.json()["subscribers"], 0, "the revoked channel");
    http.post_json("/api/publish/a", r#""still here""#).await;
    assert_eq!(recv_json(&mut ws).await["data"], "still here");
}

#[tokio::test]
async fn anonymous_servers_ignore_tokens_and_refuse_refresh() {
    let server = TestServer::default().await;
    let (mut ws, id) = server.connect_json("client_id=alice&token=whatever").await;
    assert_eq!(id, "alice");
    send_json(&mut ws, json!({"type": "refresh", "token": "x"})).await;
    assert_eq!(recv_json(&mut ws).await["code"], "auth_disabled");
}
