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
async fn allowed_origins_add_to_the_same_host_rule() {
    let config = Config::default().allowed_origins(vec!["https://app.example".into()]);
    let server = TestServer::start(config).await;
    let addr = server.addr;
    let app = format!("{UPGRADE}host: {addr}\r\norigin: https://app.example\r\n\r\n");
    assert_eq!(raw_exchange(addr, app.as_bytes()).await.0, 101);
    let same = format!("{UPGRADE}host: {addr}\r\norigin: http://{addr}\r\n\r\n");
    assert_eq!(
        raw_exchange(addr, same.as_bytes()).await.0,
        101,
        "the server's own pages (the demo) keep working"
    );
    let evil = format!("{UPGRADE}host: {addr}\r\norigin: http://evil.example\r\n\r\n");
    assert_eq!(raw_exchange(addr, evil.as_bytes()).await.0, 403);

    let any = TestServer::start(Config::default().allowed_origins(vec!["*".into()])).await;
    let addr = any.addr;
    let evil = format!("{UPGRADE}host: {addr}\r\norigin: http://evil.example\r\n\r\n");
    assert_eq!(raw_exchange(addr, evil.as_bytes()).await.0, 101);
}

/// A proxy on the same host (nginx in front of Herald) connects from 127.0.0.1 for clients
/// anywhere: without an API key, what it forwards is refused like any remote request.
#[tokio::test]
async fn requests_forwarded_by_a_local_proxy_are_not_local() {
    let server = TestServer::default().await;
    let (mut ws, _) = server.connect_json("channels=news").await;
    let mut http = server.http().await;
    for header in [
        "forwarded",
        "x-forwarded-for",
        "x-real-ip",
        "X-Forwarded-For",
    ] {
        for (method, path) in [
            ("POST", "/api/publish/news"),
            ("POST", "/api/send/alice"),
            ("POST", "/api/broadcast"),
            ("GET", "/api/channels"),
            ("GET", "/api/stats"),
            ("GET", "/metrics"),
        ] {
            let reply = http
                .request(method, path, &[(header, "203.0.113.7")], b"\"hi\"")
                .await;
            assert_eq!(reply.status, 403, "{method} {path} with {header}");
            assert_eq!(reply.json()["error"], "publisher_not_local");
            let message = reply.json()["message"].as_str().unwrap().to_owned();
            assert!(message.contains("--api-key"), "{message}");
        }
    }
    // Nothing of it reached the subscriber: the next frame is this direct publish.
    assert_eq!(http.post_json("/api/publish/news", "1").await.status, 200);
    let frame = common::recv_json(&mut ws).await;
    assert_eq!(frame["data"], 1, "{frame}");

    let keyed = TestServer::start(Config::default().api_keys(vec!["k".into()])).await;
    let mut http = keyed.http().await;
    let proxied_with_key = http
        .request(
            "POST",
            "/api/publish/news",
            &[
                ("x-forwarded-for", "203.0.113.7"),
                ("authorization", "Bearer k"),
            ],
            b"1",
        )
        .await;
    assert_eq!(proxied_with_key.status, 200, "an API key authorizes anyone");
}

#[tokio::test]
async fn metrics_follow_the_api_rule_unless_public() {
    let keyed = TestServer::start(Config::default().api_keys(vec!["k".into()])).await;
    let mut http = keyed.http().await;
    assert_eq!(http.get("/metrics").await.status, 401);
    let ok = http
        .request("GET", "/metrics", &[("authorization", "Bearer k")], b"")
        .await;
    assert_eq!(ok.status, 200);
    let text = String::from_utf8_lossy(&ok.body);
    assert!(text.contains("herald_connections"), "{text}");
    assert_eq!(http.get("/healthz").await.status, 200, "health stays open");
    assert_eq!(
        http.get("/readyz").await.status,
        200,
        "readiness stays open"
    );

    let public = TestServer::start(
        Config::default()
            .api_keys(vec!["k".into()])
            .public_metrics(true),
    )
    .await;
    let mut http = public.http().await;
    let scraped = http
        .request(
            "GET",
            "/metrics",
            &[("x-forwarded-for", "203.0.113.7")],
            b"",
        )
        .await;
    assert_eq!(
        scraped.status, 200,
        "--public-metrics needs no key, proxied or not"
    );
    assert_eq!(
        http.get("/api/stats").await.status,
        401,
        "only /metrics is opened"
    );
}

#[tokio::test]
async fn unknown_query_parameters_are_refused_with_their_name() {
    let server = TestServer::default().await;
    let addr = server.addr;
    for (target, named) in [
        ("/ws?chanels=news", "\\\"chanels\\\""),
        ("/ws?channels=news&cache=1", "\\\"cache\\\""),
        ("/ws?format=json&format=raw&channels=a", "more than once"),
        ("/ws?client_id=a&client_id=b", "more than once"),
        ("/echo?channels=news", "\\\"channels\\\""),
    ] {
        let request = UPGRADE.replace("GET /ws ", &format!("GET {target} "));
        let (status, reply) =
            raw_exchange(addr, format!("{request}host: {addr}\r\n\r\n").as_bytes()).await;
        assert_eq!(status, 400, "{target}: {reply}");
        assert!(reply.contains("invalid_query"), "{target}: {reply}");
        assert!(reply.contains(named), "{target} names {named}: {reply}");
    }
    // Every documented parameter is accepted; `channels` may repeat.
    let (mut ws, id) = server
        .connect_json("channels=a&channels=b&client_id=me&format=json&token=ignored")
        .await;
    assert_eq!(id, "me");
    let mut http = server.http().await;
    assert_eq!(http.post_json("/api/publish/b", "2").await.status, 200);
    assert_eq!(common::recv_json(&mut ws).await["channel"], "b");
    let _echo = server.connect("/echo?token=ignored").await;
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
