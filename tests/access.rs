//! Publisher API keys and browser origin checks, over real sockets.

mod common;

use common::{TestServer, raw_exchange};
use herald::Config;

const UPGRADE: &str = "GET /ws HTTP/1.1\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n";

#[tokio::test]
async fn api_keys_are_required_on_every_api_route() {
    let server =
        TestServer::start(Config::default().api_keys(vec!["s3cret".into(), "other".into()])).await;
    let mut http = server.http().await;
    for (path, method) in [
        ("/api/publish/news", "POST"),
        ("/api/send/alice", "POST"),
        ("/api/broadcast", "POST"),
        ("/api/channels", "GET"),
        ("/api/stats", "GET"),
    ] {
        let missing = http.request(method, path, &[], b"1").await;
        assert_eq!(missing.status, 401, "{path} without a key");
        assert_eq!(missing.json()["error"], "unauthorized");
        assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
        let wrong = http
            .request(method, path, &[("authorization", "Bearer nope")], b"1")
            .await;
        assert_eq!(wrong.status, 401, "{path} with a wrong key");
    }
    let (mut ws, _) = server.connect_json("channels=news").await;
    let ok = http
        .request(
            "POST",
            "/api/publish/news",
            &[("authorization", "Bearer other")],
            b"{\"a\":1}",
        )
        .await;
    assert_eq!(ok.status, 200, "either configured key works");
    assert_eq!(common::recv_json(&mut ws).await["data"], "{\"a\":1}");
    assert_eq!(
        http.get("/healthz").await.status,
        200,
        "health needs no key"
    );
}

#[tokio::test]
async fn without_keys_loopback_publishers_are_served() {
    let server = TestServer::default().await;
    let mut http = server.http().await;
    assert_eq!(http.post_json("/api/publish/news", "1").await.status, 200);
}

#[tokio::test]
async fn websocket_origins_default_to_the_same_host() {
    let server = TestServer::default().await;
    let addr = server.addr;
    let same = format!("{UPGRADE}host: {addr}\r\norigin: http://{addr}\r\n\r\n");
    assert_eq!(raw_exchange(addr, same.as_bytes()).await.0, 101);
    let none = format!("{UPGRADE}host: {addr}\r\n\r\n");
    assert_eq!(
        raw_exchange(addr, none.as_bytes()).await.0,
        101,
        "no Origin: not a browser"
    );
    let evil = format!("{UPGRADE}host: {addr}\r\norigin: http://evil.example\r\n\r\n");
    let (status, reply) = raw_exchange(addr, evil.as_bytes()).await;
    assert_eq!(status, 403);
    assert!(reply.contains("origin_not_allowed"), "{reply}");
}

#[tokio::test]
async fn allowed_origins_replace_the_same_host_rule() {
    let config = Config::default().allowed_origins(vec!["https://app.example".into()]);
    let server = TestServer::start(config).await;
    let addr = server.addr;
    let app = format!("{UPGRADE}host: {addr}\r\norigin: https://app.example\r\n\r\n");
    assert_eq!(raw_exchange(addr, app.as_bytes()).await.0, 101);
    let same = format!("{UPGRADE}host: {addr}\r\norigin: http://{addr}\r\n\r\n");
    assert_eq!(raw_exchange(addr, same.as_bytes()).await.0, 403);

    let any = TestServer::start(Config::default().allowed_origins(vec!["*".into()])).await;
    let addr = any.addr;
    let evil = format!("{UPGRADE}host: {addr}\r\norigin: http://evil.example\r\n\r\n");
    assert_eq!(raw_exchange(addr, evil.as_bytes()).await.0, 101);
}

#[tokio::test]
async fn client_publishes_over_the_rate_are_refused_then_closed() {
    use futures_util::SinkExt as _;
    use tokio_tungstenite::tungstenite::Message;
    let server = TestServer::start(Config::default().client_publish_rate(5)).await;
    let (mut ws, _) = server.connect_json("").await;
    let publish = r#"{"type":"publish","channel":"c","data":1}"#;
    // The burst: 5 allowed, then refused with an error frame, the connection still open.
    for _ in 0..5 {
        ws.send(Message::text(publish)).await.expect("send");
        assert_eq!(common::recv_json(&mut ws).await["type"], "published");
    }
    ws.send(Message::text(publish)).await.expect("send");
    let refused = common::recv_json(&mut ws).await;
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    // Subscribing is not publishing: not limited.
    ws.send(Message::text(r#"{"type":"subscribe","channel":"c"}"#))
        .await
        .expect("send");
    assert_eq!(common::recv_json(&mut ws).await["type"], "subscribed");
    // Keeping on regardless closes the connection with 1008.
    for _ in 0..5 {
        let _ = ws.send(Message::text(publish)).await;
    }
    assert_eq!(
        common::expect_close(&mut ws).await,
        (1008, "rate limit exceeded".to_owned())
    );
}
