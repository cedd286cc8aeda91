//! What the server tells the demo page: the facts served in the page (`GET /`), its icon, and
//! `POST /demo/check`, which answers what `/ws` answers the same client (after the handshake),
//! so that the page can say why its WebSocket was refused.

mod common;

use common::{TestServer, http_exchange, upgrade_request_for};
use herald::Config;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const SECRET: &str = "demo-test-secret-that-is-32-bytes-long";

fn token(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

fn claims(channels: &[&str], exp_from_now: i64) -> Value {
    let now = jsonwebtoken::get_current_timestamp() as i64;
    json!({"sub": "zoe", "exp": now + exp_from_now, "channels": channels})
}

/// The JSON the server put in the page it served.
async fn page_facts(server: &TestServer) -> Value {
    let page = server.http().await.get("/").await;
    assert_eq!(page.status, 200);
    let html = String::from_utf8(page.body).expect("utf-8 page");
    let start = r#"<script type="application/json" id="herald-config">"#;
    let after = &html[html.find(start).expect("config script") + start.len()..];
    let json = &after[..after.find("</script>").expect("script end")];
    serde_json::from_str(json).expect("config is JSON")
}

#[tokio::test]
async fn the_page_carries_the_servers_mode_as_booleans_only() {
    let anonymous = TestServer::default().await;
    assert_eq!(
        page_facts(&anonymous).await,
        json!({"api_key_required": false, "jwt_auth": false, "cluster": false})
    );
    let key = "a-key-the-page-must-never-show";
    let secured = TestServer::start(
        Config::default()
            .api_keys(vec![key.to_owned()])
            .jwt_secret(Some(SECRET.to_owned())),
    )
    .await;
    assert_eq!(
        page_facts(&secured).await,
        json!({"api_key_required": true, "jwt_auth": true, "cluster": false})
    );
    let page = secured.http().await.get("/").await.body;
    let page = String::from_utf8_lossy(&page);
    assert!(!page.contains(key) && !page.contains(SECRET));
    // Port 1: nothing listens, the node serves without its broker.
    let cluster =
        TestServer::start(Config::default().redis(Some("redis://127.0.0.1:1/".to_owned()))).await;
    assert_eq!(page_facts(&cluster).await["cluster"], true);
}

/// What `/ws?<query>` answers with `headers` (`101` and `Null`), and what `/demo/check?<query>`
/// answers with the same headers.
async fn ws_and_check(server: &TestServer, query: &str, headers: &str) -> [(u16, Value); 2] {
    let upgrade = upgrade_request_for(&format!("/ws?{query}"), headers);
    let ws = http_exchange(server.addr, upgrade.into_bytes()).await;
    let ws = match ws.status {
        101 => (101, Value::Null),
        status => (status, ws.json()),
    };
    let check = format!(
        "POST /demo/check?{query} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n{headers}\r\n"
    );
    let check = http_exchange(server.addr, check.into_bytes()).await;
    [ws, (check.status, check.json())]
}

/// Asserts that `/demo/check` says what `/ws` does: `ok` for an upgrade, else the same reply.
async fn assert_check_agrees(server: &TestServer, query: &str, headers: &str, expected: &str) {
    let [ws, check] = ws_and_check(server, query, headers).await;
    if expected == "ok" {
        assert_eq!(ws.0, 101, "{query} {headers}: /ws answered {ws:?}");
        assert_eq!(check, (200, json!({"status": "ok"})), "{query} {headers}");
    } else {
        assert_eq!(
            ws.1["error"], expected,
            "{query} {headers}: /ws answered {ws:?}"
        );
        assert_eq!(check, ws, "{query} {headers}: the check differs from /ws");
    }
}

#[tokio::test]
async fn the_check_answers_what_ws_answers_about_origins_and_queries() {
    let server = TestServer::default().await;
    assert_check_agrees(&server, "channels=news", "", "ok").await;
    assert_check_agrees(&server, "channels=news", "origin: http://x\r\n", "ok").await;
    let other = "origin: http://app.example.com\r\n";
    assert_check_agrees(&server, "channels=news", other, "origin_not_allowed").await;
    assert_check_agrees(&server, "channels=bad%20name", "", "invalid_channel").await;
    assert_check_agrees(&server, "client_id=a%20b", "", "invalid_client_id").await;
    let listed = TestServer::start(
        Config::default().allowed_origins(vec!["http://app.example.com".to_owned()]),
    )
    .await;
    assert_check_agrees(&listed, "channels=news", other, "ok").await;
    // A list adds to the same-host rule: the page of the server itself still connects.
    let own = "origin: http://x\r\n";
    assert_check_agrees(&listed, "channels=news", own, "ok").await;
    let stranger = "origin: http://stranger.example\r\n";
    assert_check_agrees(&listed, "channels=news", stranger, "origin_not_allowed").await;
    let get = server.http().await.get("/demo/check").await;
    assert_eq!((get.status, get.header("allow")), (405, Some("POST")));
}

#[tokio::test]
async fn the_check_answers_what_ws_answers_about_tokens() {
    let server = TestServer::start(Config::default().jwt_secret(Some(SECRET.to_owned()))).await;
    let bearer = |token: &str| format!("authorization: Bearer {token}\r\n");
    let valid = token(&claims(&["news", "room:*"], 600), SECRET);
    assert_check_agrees(&server, "channels=news", &bearer(&valid), "ok").await;
    assert_check_agrees(&server, &format!("channels=news&token={valid}"), "", "ok").await;
    assert_check_agrees(&server, "channels=news", "", "token_missing").await;
    assert_check_agrees(&server, "channels=news", &bearer("junk"), "token_malformed").await;
    let expired = token(&claims(&["news"], -3600), SECRET);
    assert_check_agrees(&server, "channels=news", &bearer(&expired), "token_expired").await;
    let forged = token(
        &claims(&["news"], 600),
        "another-secret-that-is-32-bytes-long",
    );
    let forged = bearer(&forged);
    assert_check_agrees(&server, "channels=news", &forged, "token_bad_signature").await;
    let no_news = bearer(&token(&claims(&["room:*"], 600), SECRET));
    assert_check_agrees(&server, "channels=news", &no_news, "forbidden").await;
    // The origin is checked first, as on /ws: a valid token from another site is refused.
    let other = format!("origin: http://app.example.com\r\n{}", bearer(&valid));
    assert_check_agrees(&server, "channels=news", &other, "origin_not_allowed").await;
}

#[tokio::test]
async fn the_icon_is_served_so_that_no_page_load_gets_a_404() {
    let server = TestServer::default().await;
    let mut http = server.http().await;
    let icon = http.get("/favicon.ico").await;
    assert_eq!(icon.status, 200);
    assert_eq!(icon.header("content-type"), Some("image/svg+xml"));
    assert!(String::from_utf8_lossy(&icon.body).starts_with("<svg "));
    let post = http.post_json("/favicon.ico", "{}").await;
    assert_eq!((post.status, post.header("allow")), (405, Some("GET")));
    let post = http.post_json("/", "{}").await;
    assert_eq!((post.status, post.header("allow")), (405, Some("GET")));
}
