//! Hostile clients at the HTTP / handshake stage: malformed upgrades, oversized heads,
//! slowloris and connections that never speak. Each case asserts the exact answer and that the
//! server still serves afterwards.

mod common;

use std::time::{Duration, Instant};

use common::{RAW_KEY, TestServer, assert_still_serves, http_exchange, serial, vm_rss_kib};
use herald::Config;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// An upgrade request to `/ws` with exactly the header lines in `headers` after `host`.
fn upgrade(method: &str, version: &str, headers: &str) -> Vec<u8> {
    format!("{method} /ws {version}\r\nhost: x\r\n{headers}\r\n").into_bytes()
}

const UPGRADE_HEADERS: &str = "connection: Upgrade\r\nupgrade: websocket\r\n";

/// Asserts a JSON error reply with `status` and `code`.
fn assert_error(reply: &common::RawReply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{} / {:?}", reply.head, reply.body);
    assert_eq!(
        reply.header("content-type"),
        Some("application/json"),
        "{}",
        reply.head
    );
    assert_eq!(reply.json()["error"], code, "{}", reply.head);
}

#[tokio::test]
async fn missing_key_is_400_invalid_handshake() {
    let _serial = serial().await;
    let server = TestServer::default().await;
    let request = upgrade(
        "GET",
        "HTTP/1.1",
        &format!("{UPGRADE_HEADERS}sec-websocket-version: 13\r\n"),
    );
    let reply = http_exchange(server.addr, request).await;
    assert_error(&reply, 400, "invalid_handshake");
    assert_eq!(reply.json()["message"], "missing Sec-WebSocket-Key header");
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn key_that_is_not_base64_of_16_bytes_is_400() {
    let _serial = serial().await;
    let server = TestServer::default().await;
    let keys = [
        "not base64 at all!!!!!!!".to_owned(),
        "c2hvcnQ=".to_owned(),                 // base64 of 5 bytes
        "AAAAAAAAAAAAAAAAAAAAAAA=".to_owned(), // base64 of 17 bytes
        "AAAAAAAAAAAAAAAAAAAAAA".to_owned(),   // 16 bytes, but without the padding
        format!("{RAW_KEY}{RAW_KEY}"),         // two keys glued together
        String::new(),                         // empty
    ];
    for key in keys {
        let request = upgrade(
            "GET",
            "HTTP/1.1",
            &format!("{UPGRADE_HEADERS}sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\n"),
        );
        let reply = http_exchange(server.addr, request).await;
        assert_error(&reply, 400, "invalid_handshake");
        assert_eq!(
            reply.json()["message"],
            "Sec-WebSocket-Key must be base64 of 16 bytes",
            "key {key:?}"
        );
    }
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn wrong_version_is_426_with_the_supported_version() {
    let _serial = serial().await;
    let server = TestServer::default().await;
    for version in ["8", "12", "14", "13, 8", "013", " "] {
        let request = upgrade(
            "GET",
            "HTTP/1.1",
            &format!(
                "{UPGRADE_HEADERS}sec-websocket-key: {RAW_KEY}\r\nsec-websocket-version: {version}\r\n"
            ),
        );
        let reply = http_exchange(server.addr, request).await;
        assert_error(&reply, 426, "unsupported_version");
        assert_eq!(
            reply.header("sec-websocket-version"),
            Some("13"),
            "version {version:?}: {}",
            reply.head
        );
    }
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn missing_version_is_426() {
    let _serial = serial().await;
    let server = TestServer::default().await;
    let request = upgrade(
        "GET",
        "HTTP/1.1",
        &format!("{UPGRADE_HEADERS}sec-websocket-key: {RAW_KEY}\r\n"),
    );
    let reply = http_exchange(server.addr, request).await;
    assert_error(&reply, 426, "unsupported_version");
    assert_eq!(reply.header("sec-websocket-version"), Some("13"));
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn upgrade_with_another_method_is_405() {
    let _serial = serial().await;
    let server = TestServer::default().await;
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        for path in ["/ws", "/echo"] {
            let request = format!(
                "{method} {path} HTTP/1.1\r\nhost: x\r\n{UPGRADE_HEADERS}sec-websocket-key: {RAW_KEY}\r\nsec-websocket-version: 13\r\ncontent-length: 0\r\n\r\n"
            );
            let reply = http_exchange(server.addr, request.into_bytes()).await;
            assert_error(&reply, 405, "method_not_allowed");
            assert_eq!(reply.header("allow"), Some("GET"), "{method} {path}");
        }
    }
    assert_still_serves(&server).await;
}

/// HTTP/1.0 has no upgrade mechanism: the server refuses with `400 invalid_handshake` (an
/// `HTTP/1.0` status line) and closes the connection (HTTP/1.0 without keep-alive).
#[tokio::test]
async fn http_1_0_upgrade_is_400() {
    let _serial = serial().await;
    let server = TestServer::default().await;
    let request = upgrade(
        "GET",
        "HTTP/1.0",
        &format!("{UPGRADE_HEADERS}sec-websocket-key: {RAW_KEY}\r\nsec-websocket-version: 13\r\n"),
    );
    let reply = http_exchange(server.addr, request).await;
    assert_error(&reply, 400, "invalid_handshake");
    assert_eq!(
        reply.json()["message"],
        "a WebSocket upgrade needs HTTP/1.1"
    );
    assert!(
        reply.head.starts_with("HTTP/1.0 400 Bad Request"),
        "{}",
        reply.head
    );
    assert!(
        reply.closed,
        "an HTTP/1.0 connection is closed after the reply"
    );
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn duplicate_handshake_headers_are_400() {
    let _serial = serial().await;
    let server = TestServer::default().await;
    let other_key = "AAAAAAAAAAAAAAAAAAAAAA==";
    let cases = [
        (
            format!(
                "{UPGRADE_HEADERS}sec-websocket-key: {RAW_KEY}\r\nsec-websocket-key: {other_key}\r\nsec-websocket-version: 13\r\n"
            ),
            "duplicate Sec-WebSocket-Key header",
        ),
        (
            // The same value twice is still ambiguous.
            format!(
                "{UPGRADE_HEADERS}sec-websocket-key: {RAW_KEY}\r\nSec-WebSocket-Key: {RAW_KEY}\r\nsec-websocket-version: 13\r\n"
            ),
            "duplicate Sec-WebSocket-Key header",
        ),
        (
            format!(
                "{UPGRADE_HEADERS}sec-websocket-key: {RAW_KEY}\r\nsec-websocket-version: 13\r\nsec-websocket-version: 13\r\n"
            ),
            "duplicate Sec-WebSocket-Version header",
        ),
    ];
    for (headers, message) in cases {
        let reply = http_exchange(server.addr, upgrade("GET", "HTTP/1.1", &headers)).await;
        assert_error(&reply, 400, "invalid_handshake");
        assert_eq!(reply.json()["message"], message);
    }
    assert_still_serves(&server).await;
}

/// A 64 KiB request line still fits the head hyper buffers (its 64 KiB `max_buf_size` is checked
/// only between reads, which grow adaptively, so heads up to roughly twice that are parsed), so
/// our own check answers: `414 uri_too_long` in JSON, and the connection stays usable. A 1 MiB
/// request line overflows hyper's buffer: hyper's own empty `431`, then close. Memory stays
/// bounded either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_line_of_64_kib_is_414_with_bounded_memory() {
    let _serial = serial().await;
    let server = TestServer::default().await;
    let request = || {
        // "GET /" + target + " HTTP/1.1\r\n" is exactly 64 KiB.
        let target = "a".repeat(64 * 1024 - "GET / HTTP/1.1\r\n".len());
        let line = format!("GET /{target} HTTP/1.1\r\n");
        assert_eq!(line.len(), 64 * 1024);
        format!("{line}host: x\r\n\r\n").into_bytes()
    };
    let reply = http_exchange(server.addr, request()).await;
    assert_error(&reply, 414, "uri_too_long");
    let huge = format!(
        "GET /{} HTTP/1.1\r\nhost: x\r\n\r\n",
        "a".repeat(1024 * 1024)
    );
    let reply = http_exchange(server.addr, huge.clone().into_bytes()).await;
    assert_eq!(reply.status, 431, "{}", reply.head);
    let mut before = 0;
    for round in 0..12 {
        let replies =
            futures_util::future::join_all((0..16).map(|_| http_exchange(server.addr, request())))
                .await;
        for reply in replies {
            assert_error(&reply, 414, "uri_too_long");
            assert!(!reply.closed, "a 414 from our check keeps the connection");
        }
        let replies = futures_util::future::join_all(
            (0..4).map(|_| http_exchange(server.addr, huge.clone().into_bytes())),
        )
        .await;
        for reply in replies {
            assert_eq!(reply.status, 431, "{}", reply.head);
            assert_eq!(reply.header("content-length"), Some("0"), "{}", reply.head);
            assert!(reply.closed, "hyper closes after its own 431");
        }
        if round == 1 {
            // Two warm-up rounds settle the allocator's arenas; growth is measured after them.
            before = vm_rss_kib();
        }
    }
    let after = vm_rss_kib();
    let growth = after.saturating_sub(before);
    assert!(
        growth < 4 * 1024,
        "RSS grew by {growth} KiB over 160 requests with 64 KiB request lines and 40 with 1 MiB ones"
    );
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn oversized_headers_are_431() {
    let _serial = serial().await;
    let server = TestServer::default().await;
    // One 20 KiB header: within hyper's buffer, over our 16 KiB limit: our JSON reply.
    let request = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "b".repeat(20 * 1024)
    );
    let reply = http_exchange(server.addr, request.into_bytes()).await;
    assert_error(&reply, 431, "headers_too_large");
    // The same on an upgrade request.
    let request = common::upgrade_request_for("/ws", &format!("x-big: {}\r\n", "b".repeat(17_000)));
    let reply = http_exchange(server.addr, request.into_bytes()).await;
    assert_error(&reply, 431, "headers_too_large");
    // Many small headers adding up to over 16 KiB (90 headers: under hyper's count limit).
    let mut request = String::from("GET /healthz HTTP/1.1\r\nhost: x\r\n");
    for i in 0..90 {
        request.push_str(&format!("x-h{i}: {}\r\n", "v".repeat(200)));
    }
    request.push_str("\r\n");
    let reply = http_exchange(server.addr, request.into_bytes()).await;
    assert_error(&reply, 431, "headers_too_large");
    // More headers than hyper parses (its limit is 100): hyper's own empty 431.
    let mut request = String::from("GET /healthz HTTP/1.1\r\nhost: x\r\n");
    for i in 0..200 {
        request.push_str(&format!("x-h{i}: v\r\n"));
    }
    request.push_str("\r\n");
    let reply = http_exchange(server.addr, request.into_bytes()).await;
    assert_eq!(reply.status, 431, "{}", reply.head);
    assert!(
        reply.body.is_empty(),
        "{} {:?}",
        reply.head,
        String::from_utf8_lossy(&reply.body)
    );
    // A 100 KiB header still reaches our check (hyper's buffer limit is checked between
    // adaptive reads): JSON 431.
    let request = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "b".repeat(100 * 1024)
    );
    let reply = http_exchange(server.addr, request.into_bytes()).await;
    assert_error(&reply, 431, "headers_too_large");
    // A 1 MiB header overflows hyper's buffer: hyper's own empty 431, then close.
    let request = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "b".repeat(1024 * 1024)
    );
    let reply = http_exchange(server.addr, request.into_bytes()).await;
    assert_eq!(reply.status, 431, "{}", reply.head);
    assert!(
        reply.body.is_empty(),
        "{} {:?}",
        reply.head,
        String::from_utf8_lossy(&reply.body)
    );
    assert!(reply.closed);
    assert_still_serves(&server).await;
}

/// Headers dribbled one byte every 200 ms: with `handshake_timeout` 1 s the server drops the
/// connection at 1 s of tokio's paused clock (without a reply: hyper sends nothing on a header
/// timeout).
#[tokio::test(start_paused = true)]
async fn slowloris_is_closed_at_the_handshake_timeout() {
    let _serial = serial().await;
    let server =
        TestServer::start(Config::default().handshake_timeout(Duration::from_secs(1))).await;
    let stream = TcpStream::connect(server.addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let started = tokio::time::Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let request = common::upgrade_request_for("/ws", "");
    let dribble = tokio::spawn(async move {
        let mut sent = 0;
        // Bounded: the request is ~150 bytes, i.e. ~30 s at this pace; the server must have
        // closed long before.
        for byte in request.bytes() {
            if writer.write_all(&[byte]).await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        sent
    });
    let mut received = Vec::new();
    let mut chunk = [0u8; 1024];
    let ended = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let elapsed = started.elapsed();
    dribble.abort();
    assert!(
        ended.is_ok(),
        "the server never closed the slowloris connection"
    );
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_millis(1500),
        "closed after {elapsed:?} of the paused clock, expected 1 s"
    );
    assert!(
        received.is_empty(),
        "no reply on a header timeout, got {:?}",
        String::from_utf8_lossy(&received)
    );
    assert_still_serves(&server).await;
}

/// Opens `count` connections that never send a byte and returns them with the time the last
/// one connected.
async fn silent_connections(server: &TestServer, count: usize) -> (Vec<TcpStream>, Instant) {
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        let stream = tokio::time::timeout(common::WAIT, TcpStream::connect(server.addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        sockets.push(stream);
    }
    (sockets, Instant::now())
}

/// Waits for the server to close every socket; each must see no byte at all (no `503`: each
/// connection got a slot) and then EOF or a reset. Returns the time the last one closed.
async fn expect_all_reaped(sockets: Vec<TcpStream>, bound: Duration) -> Instant {
    let reads = sockets.into_iter().map(|mut socket| async move {
        let mut buf = [0u8; 256];
        let outcome = tokio::time::timeout(bound, socket.read(&mut buf)).await;
        match outcome {
            Err(_) => Err("still open".to_owned()),
            Ok(Ok(0) | Err(_)) => Ok(Instant::now()),
            Ok(Ok(n)) => Err(format!(
                "got bytes: {:?}",
                String::from_utf8_lossy(&buf[..n])
            )),
        }
    });
    let outcomes = futures_util::future::join_all(reads).await;
    let mut last = None;
    for (index, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            Ok(at) => last = last.max(Some(at)),
            Err(err) => panic!("silent connection {index}: {err}"),
        }
    }
    last.expect("at least one socket")
}

/// 1,000 connections that never send a byte, with `handshake_timeout` 1 s and room for exactly
/// 1,000 connections: every one is closed by the server, silently, within a bounded time; then
/// all 1,000 slots are free again (a second round of 1,000 is served the same way, no `503`),
/// `/api/stats` shows no connection, and a new client works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_silent_connections_are_reaped() {
    let _serial = serial().await;
    let config = Config::default()
        .handshake_timeout(Duration::from_secs(1))
        .max_connections(1000);
    let server = TestServer::start(config).await;
    for round in 0..2 {
        let first = Instant::now();
        let (sockets, connected) = silent_connections(&server, 1000).await;
        let last_closed = expect_all_reaped(sockets, Duration::from_secs(8)).await;
        let open_for = last_closed - first;
        assert!(
            last_closed - connected < Duration::from_secs(5),
            "round {round}: the last connection closed {:?} after the last connect",
            last_closed - connected
        );
        assert!(
            open_for >= Duration::from_millis(900),
            "round {round}: closed after only {open_for:?}"
        );
    }
    let mut http = server.http().await;
    let stats = http.get("/api/stats").await.json();
    assert_eq!(stats["connections"], 0, "{stats}");
    assert_eq!(
        stats["connections_opened"], 0,
        "none was a WebSocket: {stats}"
    );
    drop(http);
    assert_still_serves(&server).await;
}
