//! HTTP-level behaviour: handshake rejections, publish limits, routes and methods.

mod common;

use common::{TestServer, raw_exchange};
use herald::Config;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn upgrade_request(extra: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n{extra}\r\n"
    )
}

#[tokio::test]
async fn handshake_rejections_have_status_and_json_reason() {
    let server = TestServer::default().await;
    let (status, reply) = raw_exchange(
        server.addr,
        upgrade_request("sec-websocket-version: 13\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status, 400, "missing key: {reply}");
    assert!(reply.contains(r#""error":"invalid_handshake""#), "{reply}");

    let request = upgrade_request(&format!(
        "sec-websocket-key: {KEY}\r\nsec-websocket-version: 8\r\n"
    ));
    let (status, reply) = raw_exchange(server.addr, request.as_bytes()).await;
    assert_eq!(status, 426, "{reply}");
    assert!(
        reply
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{reply}"
    );

    let mut http = server.http().await;
    let plain = http.get("/ws").await;
    assert_eq!(plain.status, 400);
    assert_eq!(plain.json()["error"], "not_websocket_upgrade");

    let request = format!(
        "POST /ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-key: {KEY}\r\nsec-websocket-version: 13\r\ncontent-length: 0\r\n\r\n"
    );
    let (status, _) = raw_exchange(server.addr, request.as_bytes()).await;
    assert_eq!(status, 405);

    let request = upgrade_request(&format!(
        "sec-websocket-key: {KEY}\r\nsec-websocket-version: 13\r\n"
    ))
    .replace("/ws", "/ws?channels=bad%20name");
    let (status, reply) = raw_exchange(server.addr, request.as_bytes()).await;
    assert_eq!(status, 400);
    assert!(reply.contains("invalid_channel"), "{reply}");

    let request = upgrade_request(&format!(
        "sec-websocket-key: {KEY}\r\nsec-websocket-version: 13\r\n"
    ));
    let (status, reply) = raw_exchange(server.addr, request.as_bytes()).await;
    assert_eq!(status, 101, "and a good one still works: {reply}");
    assert!(reply.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{reply}");
}

#[tokio::test]
async fn publish_over_the_limit_is_413_from_the_header_alone() {
    let server = TestServer::start(Config::default().max_message_bytes(1024)).await;
    // Declares 10 MB and sends none of it: the answer must come anyway.
    let request = "POST /api/publish/news HTTP/1.1\r\nhost: x\r\ncontent-length: 10000000\r\n\r\n";
    let (status, reply) = raw_exchange(server.addr, request.as_bytes()).await;
    assert_eq!(status, 413, "{reply}");
    assert!(reply.contains("payload_too_large"));

    // A chunked body is cut off once it passes the limit.
    let mut http = server.http().await;
    let big = "x".repeat(2000);
    let chunked = format!(
        "POST /api/publish/news HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    let (status, _) = raw_exchange(server.addr, chunked.as_bytes()).await;
    assert_eq!(status, 413);

    let ok = http
        .post_json("/api/publish/news", &format!("\"{}\"", "y".repeat(1000)))
        .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["offset"], 1, "rejected publishes used no offset");
}

#[tokio::test]
async fn invalid_publishes_are_400_and_use_no_offset() {
    let server = TestServer::default().await;
    let mut http = server.http().await;
    let bad_json = http.post_json("/api/publish/news", "{nope").await;
    assert_eq!(bad_json.status, 400);
    assert_eq!(bad_json.json()["error"], "invalid_json");
    let bad_name = http.post_json("/api/publish/has%20space", "1").await;
    assert_eq!(bad_name.status, 400);
    assert_eq!(bad_name.json()["error"], "invalid_channel");
    let long_name = http
        .post_json(&format!("/api/publish/{}", "x".repeat(129)), "1")
        .await;
    assert_eq!(long_name.status, 400);
    let ok = http.post_json("/api/publish/news", "1").await;
    assert_eq!(ok.json()["offset"], 1);
    let encoded = http.post_json("/api/publish/room%3Alobby", "1").await;
    assert_eq!(encoded.json()["channel"], "room:lobby");
}

#[tokio::test]
async fn routes_methods_and_pages() {
    let server = TestServer::default().await;
    let mut http = server.http().await;
    let page = http.get("/").await;
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    assert!(String::from_utf8_lossy(&page.body).contains("<html"));
    let health = http.get("/healthz").await;
    assert_eq!((health.status, &health.body[..]), (200, &b"ok"[..]));
    let missing = http.get("/nope").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"], "not_found");
    let wrong = http.get("/api/publish/news").await;
    assert_eq!(wrong.status, 405);
    assert_eq!(wrong.header("allow"), Some("POST"));
    let wrong = http.post_json("/api/channels", "").await;
    assert_eq!(wrong.status, 405);
    assert_eq!(wrong.header("allow"), Some("GET"));
}

#[tokio::test]
async fn connection_limit_answers_503_and_recovers() {
    let server = TestServer::start(Config::default().max_connections(2)).await;
    let (a, _) = server.connect_json("").await;
    let (_b, _) = server.connect_json("").await;
    let (status, reply) =
        raw_exchange(server.addr, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(status, 503, "{reply}");
    assert!(reply.contains("too_many_connections"));
    drop(a);
    let mut recovered = false;
    for _ in 0..50 {
        let (status, _) = raw_exchange(
            server.addr,
            b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        if status == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(recovered, "a slot frees up once a client leaves");
}

#[tokio::test]
async fn oversized_request_heads_are_refused() {
    let server = TestServer::default().await;
    let long_target = format!(
        "GET /healthz?{} HTTP/1.1\r\nhost: x\r\n\r\n",
        "a".repeat(10_000)
    );
    let (status, reply) = raw_exchange(server.addr, long_target.as_bytes()).await;
    assert_eq!(status, 414);
    assert!(reply.contains("uri_too_long"), "{reply}");
    let big_header = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "b".repeat(20_000)
    );
    let (status, reply) = raw_exchange(server.addr, big_header.as_bytes()).await;
    assert_eq!(status, 431);
    assert!(reply.contains("headers_too_large"), "{reply}");
    // Past hyper's buffer the answer is hyper's own, still bounded.
    let huge = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "c".repeat(70_000));
    let (status, _) = raw_exchange(server.addr, huge.as_bytes()).await;
    assert!(matches!(status, 414 | 431 | 400), "got {status}");
    let mut http = server.http().await;
    assert_eq!(http.get("/healthz").await.status, 200, "still serving");
}

#[tokio::test]
async fn readyz_is_always_ready_without_redis() {
    let server = TestServer::default().await;
    let mut http = server.http().await;
    let reply = http.get("/readyz").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json(), serde_json::json!({"status":"ready"}));
    assert_eq!(http.request("POST", "/readyz", &[], b"").await.status, 405);
}
