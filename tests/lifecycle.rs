//! Connection lifecycle: slow consumers, idle timeouts, protocol errors, graceful shutdown.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{TestServer, expect_close, recv_json};
use herald::Config;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// Opens a WebSocket by hand on a socket with a tiny receive buffer, reads the `101`, and
/// returns the socket; the caller decides whether it ever reads again.
async fn raw_websocket(server: &TestServer, query: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut stream = socket.connect(server.addr).await.expect("connect");
    let request = format!(
        "GET /ws?{query} HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.expect("read 101");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// The offset in a message frame, found without parsing the (large) JSON.
fn offset_of(text: &str) -> u64 {
    let start = text.find(r#""offset":"#).expect("a message frame") + 9;
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().expect("offset digits")
}

/// Publishes 8 KiB messages on `channel` until the server reports a slow-consumer drop
/// (bounded), calling `caught_up` after every 32 publishes; returns how many were published.
async fn publish_until_dropped<F, Fut>(server: &TestServer, channel: &str, mut caught_up: F) -> u64
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut http = server.http().await;
    let payload = format!("\"{}\"", "x".repeat(8 * 1024));
    let path = format!("/api/publish/{channel}");
    let mut published = 0;
    while published < 4000 {
        for _ in 0..32 {
            let reply = http.post_json(&path, &payload).await;
            assert_eq!(
                reply.status, 200,
                "publishing never fails because of a slow client"
            );
            published += 1;
        }
        caught_up(published).await;
        if http.get("/api/stats").await.json()["slow_consumer_drops"] == 1 {
            return published;
        }
    }
    panic!("the slow consumer was never dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_dropped_while_fast_subscribers_get_everything_in_order() {
    let server = TestServer::start(Config::default().queue_capacity(128)).await;
    let _slow = raw_websocket(&server, "channels=feed").await;
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..100).map(|_| AtomicU64::new(0)).collect());
    let mut readers = Vec::new();
    for index in 0..100 {
        let (mut ws, _) = server.connect_json("channels=feed").await;
        let progress = Arc::clone(&progress);
        readers.push(tokio::spawn(async move {
            let mut expected = 1;
            loop {
                let Message::Text(text) = common::recv(&mut ws).await else {
                    panic!("text frames only");
                };
                assert_eq!(offset_of(&text), expected, "in order, nothing lost");
                if text.ends_with(r#""data":"end"}"#) {
                    return expected;
                }
                progress[index].store(expected, Ordering::Release);
                expected += 1;
            }
        }));
    }
    // The fast subscribers read as fast as they can; the publisher lets them catch up every
    // 32 messages so that only the client that never reads can overflow its queue.
    let published = publish_until_dropped(&server, "feed", |published| {
        let progress = Arc::clone(&progress);
        async move {
            let deadline = tokio::time::Instant::now() + common::WAIT;
            while progress
                .iter()
                .any(|p| p.load(Ordering::Acquire) < published)
            {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "fast readers stalled"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    })
    .await;
    let mut http = server.http().await;
    for _ in 0..50 {
        http.post_json("/api/publish/feed", "1").await;
    }
    let last = http.post_json("/api/publish/feed", r#""end""#).await.json()["offset"]
        .as_u64()
        .unwrap();
    assert_eq!(last, published + 51);
    for reader in readers {
        assert_eq!(
            reader.await.expect("fast subscriber got every message"),
            last
        );
    }
    let stats = http.get("/api/stats").await.json();
    assert_eq!(
        stats["slow_consumer_drops"], 1,
        "exactly the slow one: {stats}"
    );
}

#[tokio::test]
async fn slow_consumer_gets_close_1008_once_it_reads_again() {
    let server = TestServer::start(Config::default().queue_capacity(8)).await;
    let mut slow = raw_websocket(&server, "channels=feed").await;
    publish_until_dropped(&server, "feed", |_| async {}).await;
    let mut received = Vec::new();
    tokio::time::timeout(common::WAIT, slow.read_to_end(&mut received))
        .await
        .expect("the server closes the slow consumer")
        .expect("read");
    let mut close = vec![0x88, 15, 0x03, 0xf0];
    close.extend_from_slice(b"slow consumer");
    assert!(
        received.ends_with(&close),
        "ends with close 1008 \"slow consumer\""
    );
    // Its subscription is gone with it.
    let mut http = server.http().await;
    assert_eq!(
        http.get("/api/channels").await.json()["channels"],
        serde_json::json!([])
    );
}

/// On tokio's paused clock: the server's pings and its idle timeout are timers, so the test
/// takes no real time and asserts on the clock the server itself runs on.
#[tokio::test(start_paused = true)]
async fn idle_clients_are_pinged_then_closed() {
    let config = Config::default()
        .ping_interval(Duration::from_millis(100))
        .idle_timeout(Duration::from_millis(400));
    let server = TestServer::start(config).await;
    // A client that never answers: it receives pings, then close 1001.
    let mut silent = raw_websocket(&server, "").await;
    let connected = tokio::time::Instant::now();
    let mut received = Vec::new();
    tokio::time::timeout(common::WAIT, silent.read_to_end(&mut received))
        .await
        .expect("server closes the idle connection")
        .expect("read");
    let closed_after = connected.elapsed();
    assert!(received.windows(2).any(|w| w == [0x89, 0x00]), "got a ping");
    let text = String::from_utf8_lossy(&received);
    assert!(text.contains("idle timeout"), "close reason: {text:?}");
    // Closed by the first housekeeping round past 400 ms of silence (a round every 25 ms: a
    // quarter of the shorter of the two intervals).
    assert!(
        closed_after >= Duration::from_millis(400) && closed_after <= Duration::from_millis(500),
        "closed after {closed_after:?} of the paused clock"
    );
    // A client that answers pings (tungstenite does, while it reads) stays.
    let (mut live, _) = server.connect_json("channels=a").await;
    common::expect_silence(&mut live, Duration::from_millis(900)).await;
    let mut http = server.http().await;
    http.post_json("/api/publish/a", "1").await;
    assert_eq!(recv_json(&mut live).await["offset"], 1);
}

#[tokio::test]
async fn protocol_errors_close_with_the_rfc_code() {
    let server = TestServer::default().await;
    let cases: [(&[u8], u16); 4] = [
        (&[0x81, 0x02, b'h', b'i'], 1002), // unmasked
        (&[0xC1, 0x80, 0, 0, 0, 0], 1002), // RSV1 set
        (&[0x81, 0xFF, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], 1009), // 2^40 bytes declared
        (&[0x81, 0x82, 0, 0, 0, 0, 0xC0, 0x80], 1007), // invalid UTF-8
    ];
    for (frame, code) in cases {
        let mut ws = raw_websocket(&server, "").await;
        ws.write_all(frame).await.expect("write");
        let mut received = Vec::new();
        tokio::time::timeout(common::WAIT, ws.read_to_end(&mut received))
            .await
            .expect("server closes")
            .expect("read");
        let close_at = received
            .windows(2)
            .rposition(|w| w[0] == 0x88)
            .expect("a close frame");
        let got = u16::from_be_bytes([received[close_at + 2], received[close_at + 3]]);
        assert_eq!(got, code, "for {frame:02x?}");
    }
    // The server still serves.
    let (_ws, _) = server.connect_json("").await;
}

#[tokio::test]
async fn shutdown_closes_every_connection_with_1001() {
    let server = TestServer::default().await;
    let (mut a, _) = server.connect_json("channels=x").await;
    let mut echo = server.connect("/echo").await;
    let addr = server.addr;
    let stopping = tokio::spawn(server.shutdown());
    assert_eq!(expect_close(&mut a).await, (1001, "going away".to_owned()));
    assert_eq!(expect_close(&mut echo).await.0, 1001);
    stopping.await.expect("join").expect("run returned Ok");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}
