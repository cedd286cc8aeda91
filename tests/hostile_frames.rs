//! Hostile clients after a valid upgrade: every RFC 6455 violation gets its exact close code
//! (read from the close frame in the raw bytes), the server closes TCP, and it keeps serving
//! other clients. Also the allowed-but-unusual: control frames inside a fragmented message, a
//! ping flood, and a clean close.

mod common;

use std::time::{Duration, Instant};

use common::{
    RawEnd, TestServer, WAIT, assert_still_serves, client_frame, close_body, raw_upgrade,
    read_until_close, send_and_read_close, serial, take_server_frame, vm_rss_kib,
};
use herald::Config;
use herald::ws::frame::{OpCode, encode_masked};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpSocket;

const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

/// Opcode bytes with FIN set.
const TEXT: u8 = 0x81;
const BINARY: u8 = 0x82;
const CLOSE: u8 = 0x88;
const PING: u8 = 0x89;
const PONG: u8 = 0x8A;

/// Asserts that the server ended the connection with exactly `code` and `reason` in its close
/// frame, closed TCP with nothing after the close frame, and sent no other frame than
/// `allowed_before` (the welcome on `/ws`).
fn assert_closed_with(end: &RawEnd, code: u16, reason: &str, what: &str) {
    assert_eq!(end.close_code, Some(code), "{what}: {end:?}");
    assert_eq!(end.close_reason, reason, "{what}");
    assert!(
        end.tcp_closed,
        "{what}: the server closes TCP after its close frame"
    );
    assert_eq!(end.trailing, 0, "{what}: nothing after the close frame");
}

/// Sends `bytes` on a fresh `/echo` and a fresh `/ws` connection and checks the close on both.
async fn expect_close_on_both(server: &TestServer, bytes: &[u8], code: u16, reason: &str) {
    let end = send_and_read_close(server.addr, "/echo", bytes).await;
    assert_closed_with(&end, code, reason, &format!("/echo {bytes:02x?}"));
    assert!(end.frames.is_empty(), "nothing echoed: {end:?}");
    let end = send_and_read_close(server.addr, "/ws", bytes).await;
    assert_closed_with(&end, code, reason, &format!("/ws {bytes:02x?}"));
    assert_eq!(
        end.frames.len(),
        1,
        "only the welcome before the close: {end:?}"
    );
}

#[tokio::test]
async fn unmasked_client_frame_is_1002() {
    let server = TestServer::default().await;
    expect_close_on_both(
        &server,
        &[0x81, 0x02, b'h', b'i'],
        1002,
        "unmasked client frame",
    )
    .await;
    // An unmasked control frame too.
    expect_close_on_both(&server, &[0x89, 0x00], 1002, "unmasked client frame").await;
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn reserved_bits_are_1002() {
    let server = TestServer::default().await;
    for rsv in [0x40, 0x20, 0x10, 0x70] {
        expect_close_on_both(
            &server,
            &client_frame(TEXT | rsv, b"hi"),
            1002,
            "reserved bits set",
        )
        .await;
    }
    // On a control frame as well.
    expect_close_on_both(
        &server,
        &client_frame(PING | 0x40, b""),
        1002,
        "reserved bits set",
    )
    .await;
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn unknown_opcodes_are_1002() {
    let server = TestServer::default().await;
    for (opcode, reason) in [
        (0x3, "unknown opcode 0x3"),
        (0x7, "unknown opcode 0x7"),
        (0xB, "unknown opcode 0xb"),
        (0xF, "unknown opcode 0xf"),
    ] {
        expect_close_on_both(&server, &client_frame(0x80 | opcode, b"x"), 1002, reason).await;
    }
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn fragmented_control_frames_are_1002() {
    let server = TestServer::default().await;
    for opcode in [0x8, 0x9, 0xA] {
        expect_close_on_both(
            &server,
            &client_frame(opcode, b"p"),
            1002,
            "fragmented control frame",
        )
        .await;
    }
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn control_frame_over_125_bytes_is_1002() {
    let server = TestServer::default().await;
    expect_close_on_both(
        &server,
        &client_frame(PING, &[b'p'; 126]),
        1002,
        "control frame too long",
    )
    .await;
    expect_close_on_both(
        &server,
        &client_frame(CLOSE, &close_body(1000, &[b'r'; 124])),
        1002,
        "control frame too long",
    )
    .await;
    // 125 bytes is fine: the pong carries the same payload.
    let mut stream = raw_upgrade(server.addr, "/echo").await;
    stream
        .write_all(&client_frame(PING, &[b'p'; 125]))
        .await
        .expect("write");
    let pong = common::read_server_frame(&mut stream).await.expect("pong");
    assert_eq!((pong.opcode, pong.payload.len()), (0xA, 125));
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn continuation_without_a_start_is_1002() {
    let server = TestServer::default().await;
    for fin in [0x80, 0x00] {
        expect_close_on_both(
            &server,
            &client_frame(fin, b"x"),
            1002,
            "continuation without a message",
        )
        .await;
    }
    // Also right after a complete (unfragmented) message.
    let mut bytes = client_frame(TEXT, b"done");
    bytes.extend(client_frame(0x80, b"more"));
    let end = send_and_read_close(server.addr, "/echo", &bytes).await;
    assert_closed_with(
        &end,
        1002,
        "continuation without a message",
        "after a message",
    );
    assert_eq!(
        end.frames.len(),
        1,
        "the complete message was echoed: {end:?}"
    );
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn new_data_frame_inside_a_fragmented_message_is_1002() {
    let server = TestServer::default().await;
    for (start, intruder) in [(0x01, TEXT), (0x01, BINARY), (0x02, TEXT), (0x02, 0x01)] {
        let mut bytes = client_frame(start, b"part one");
        bytes.extend(client_frame(intruder, b"intruder"));
        expect_close_on_both(&server, &bytes, 1002, "expected a continuation frame").await;
    }
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn invalid_utf8_in_a_text_message_is_1007() {
    let server = TestServer::default().await;
    let cases: Vec<Vec<u8>> = vec![
        client_frame(TEXT, &[0xC0, 0x80]),             // overlong NUL
        client_frame(TEXT, b"ok \xFF"),                // never valid
        client_frame(TEXT, &[0xED, 0xA0, 0x80]),       // surrogate
        client_frame(TEXT, &[b'a', 0xE2, 0x82]),       // truncated at the end
        client_frame(TEXT, &[0xF4, 0x90, 0x80, 0x80]), // above U+10FFFF
        [client_frame(0x01, b"fine"), client_frame(0x80, b"\xFE")].concat(), // in a fragment
        [client_frame(0x01, &[0xE2]), client_frame(0x80, &[0x82])].concat(), // truncated across
    ];
    for bytes in cases {
        expect_close_on_both(&server, &bytes, 1007, "invalid UTF-8").await;
    }
    // A character split across fragments is valid.
    let mut stream = raw_upgrade(server.addr, "/echo").await;
    stream
        .write_all(
            &[
                client_frame(0x01, &[b'h', 0xC3]),
                client_frame(0x80, &[0xA9]),
            ]
            .concat(),
        )
        .await
        .expect("write");
    let echoed = common::read_server_frame(&mut stream).await.expect("echo");
    assert_eq!((echoed.opcode, &echoed.payload[..]), (0x1, "hé".as_bytes()));
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn invalid_utf8_in_a_close_reason_is_1007() {
    let server = TestServer::default().await;
    for reason in [&b"\xFF"[..], b"bye \xC0\x80", b"\xE2\x82"] {
        expect_close_on_both(
            &server,
            &client_frame(CLOSE, &close_body(1000, reason)),
            1007,
            "invalid UTF-8",
        )
        .await;
    }
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn invalid_close_codes_are_1002() {
    let server = TestServer::default().await;
    for code in [0, 999, 1004, 1005, 1006, 1012, 1015, 2999, 5000, 65535] {
        expect_close_on_both(
            &server,
            &client_frame(CLOSE, &close_body(code, b"")),
            1002,
            &format!("invalid close code {code}"),
        )
        .await;
    }
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn one_byte_close_payload_is_1002() {
    let server = TestServer::default().await;
    expect_close_on_both(
        &server,
        &client_frame(CLOSE, &[0x03]),
        1002,
        "one-byte close payload",
    )
    .await;
    assert_still_serves(&server).await;
}

/// A header declaring more than the limit is refused from the header alone: the payload is
/// never sent, and the close comes at once.
#[tokio::test]
async fn oversized_frame_header_is_1009_without_the_payload() {
    let server = TestServer::default().await;
    // 64-bit length 65537 with the default 64 KiB limit.
    let mut header = vec![BINARY, 0x80 | 127];
    header.extend_from_slice(&65_537u64.to_be_bytes());
    header.extend_from_slice(&MASK);
    let started = Instant::now();
    let end = send_and_read_close(server.addr, "/echo", &header).await;
    assert_closed_with(&end, 1009, "message over 65536 bytes", "65537 declared");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "closed at once, not after waiting for the payload: {:?}",
        started.elapsed()
    );
    // The mask key need not even arrive: the length alone decides.
    let mut header = vec![TEXT, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 40).to_be_bytes());
    expect_close_on_both(&server, &header, 1009, "message over 65536 bytes").await;
    assert_still_serves(&server).await;

    // A smaller limit with a 16-bit length; exactly the limit is fine.
    let server = TestServer::start(Config::default().max_message_bytes(1000)).await;
    let header = [TEXT, 0x80 | 126, 0x03, 0xE9, 1, 2, 3, 4]; // 1001
    expect_close_on_both(&server, &header, 1009, "message over 1000 bytes").await;
    let mut stream = raw_upgrade(server.addr, "/echo").await;
    let exactly = "x".repeat(1000);
    stream
        .write_all(&encode_masked(OpCode::Text, true, exactly.as_bytes(), MASK))
        .await
        .expect("write");
    let echoed = common::read_server_frame(&mut stream).await.expect("echo");
    assert_eq!(echoed.payload, exactly.as_bytes());
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn length_with_the_most_significant_bit_set_is_1002() {
    let server = TestServer::default().await;
    for length in [1u64 << 63, u64::MAX] {
        let mut header = vec![BINARY, 0x80 | 127];
        header.extend_from_slice(&length.to_be_bytes());
        header.extend_from_slice(&MASK);
        expect_close_on_both(&server, &header, 1002, "frame length MSB set").await;
    }
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn fragmented_message_over_the_limit_is_1009() {
    let server = TestServer::default().await;
    let mut bytes = client_frame(0x01, &[b'a'; 40_000]);
    bytes.extend(client_frame(0x00, &[b'b'; 20_000]));
    bytes.extend(client_frame(0x00, &[b'c'; 6_000])); // 66,000 in all
    expect_close_on_both(&server, &bytes, 1009, "message over 65536 bytes").await;
    // Many tiny fragments add up too (and a ping in between does not reset the count).
    let mut bytes = client_frame(0x02, &[0; 100]);
    for _ in 0..700 {
        bytes.extend(client_frame(0x00, &[1; 100]));
        bytes.extend(client_frame(PONG, b""));
    }
    bytes.extend(client_frame(0x80, &[2; 100]));
    let end = send_and_read_close(server.addr, "/echo", &bytes).await;
    assert_closed_with(&end, 1009, "message over 65536 bytes", "tiny fragments");
    assert!(end.frames.is_empty(), "{end:?}");
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn control_frames_inside_a_fragmented_message_are_answered_on_echo() {
    let server = TestServer::default().await;
    let mut stream = raw_upgrade(server.addr, "/echo").await;
    let bytes = [
        client_frame(0x01, b"Hel"),
        client_frame(PING, b"p1"),
        client_frame(0x00, b"lo, "),
        client_frame(PONG, b"unsolicited"),
        client_frame(PING, b"p2"),
        client_frame(0x80, b"world"),
        client_frame(0x02, &[1, 2]),
        client_frame(PING, b""),
        client_frame(0x80, &[3]),
        client_frame(TEXT, b"after"),
    ]
    .concat();
    stream.write_all(&bytes).await.expect("write");
    let mut got = Vec::new();
    for _ in 0..6 {
        let frame = common::read_server_frame(&mut stream).await.expect("frame");
        assert!(frame.fin, "server frames are never fragmented");
        got.push((frame.opcode, frame.payload));
    }
    assert_eq!(
        got,
        vec![
            (0xA, b"p1".to_vec()),
            (0xA, b"p2".to_vec()),
            (0x1, b"Hello, world".to_vec()),
            (0xA, Vec::new()),
            (0x2, vec![1, 2, 3]),
            (0x1, b"after".to_vec()),
        ]
    );
    // And a clean close after all that.
    stream
        .write_all(&client_frame(CLOSE, &close_body(1000, b"")))
        .await
        .expect("write");
    let end = read_until_close(&mut stream, WAIT).await;
    assert_closed_with(&end, 1000, "", "clean close");
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn clean_client_close_is_echoed_and_tcp_closed() {
    let server = TestServer::default().await;
    for path in ["/echo", "/ws"] {
        for code in [1000, 1001, 3000, 4999] {
            let end = send_and_read_close(
                server.addr,
                path,
                &client_frame(CLOSE, &close_body(code, b"bye")),
            )
            .await;
            assert_closed_with(&end, code, "", &format!("{path} close {code}"));
            assert!(!end.reset, "an orderly close, not a reset");
        }
        // An empty close frame gets an empty close frame back.
        let end = send_and_read_close(server.addr, path, &client_frame(CLOSE, b"")).await;
        assert_closed_with(&end, 1005, "", &format!("{path} empty close"));
    }
    let mut http = server.http().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = http.get("/api/stats").await.json();
        if stats["connections"] == 0 {
            assert_eq!(stats["connections_closed"], 10, "{stats}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connections never unregistered: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_still_serves(&server).await;
}

/// How a ping flood ended.
#[derive(Debug, PartialEq, Eq)]
enum FloodEnd {
    /// Every ping was answered and the connection is still open.
    AllAnswered,
    /// The server dropped the client as a slow consumer after answering `pongs` pings.
    SlowConsumer { pongs: usize },
}

/// Writes `count` pings of `size` bytes as fast as the socket takes them, without reading
/// (a write that makes no progress for 500 ms ends the writing: the server has stopped reading),
/// then reads: every frame must be the pong of the next ping, in order, until either all are
/// answered (then a clean close) or a close 1008 "slow consumer" arrives, followed by EOF.
async fn ping_flood(
    server: &TestServer,
    count: usize,
    size: usize,
    rcvbuf: Option<u32>,
) -> FloodEnd {
    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(bytes) = rcvbuf {
        socket.set_recv_buffer_size(bytes).expect("rcvbuf");
    }
    let mut stream = tokio::time::timeout(WAIT, socket.connect(server.addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    stream
        .write_all(common::upgrade_request_for("/echo", "").as_bytes())
        .await
        .expect("write upgrade");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(WAIT, stream.read_exact(&mut byte))
            .await
            .expect("101 timed out")
            .expect("read 101");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let payload = |i: usize| {
        let mut p = format!("{i:08}").into_bytes();
        p.resize(size, b'.');
        p
    };
    let mut flood = Vec::with_capacity(count * (size + 8));
    for i in 0..count {
        flood.extend(client_frame(PING, &payload(i)));
    }
    let started = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let mut written = 0;
    for chunk in flood.chunks(16 * 1024) {
        match tokio::time::timeout(Duration::from_millis(500), writer.write_all(chunk)).await {
            Ok(Ok(())) => written += chunk.len(),
            Ok(Err(_)) | Err(_) => break,
        }
        assert!(started.elapsed() < WAIT, "writing the flood took too long");
    }
    let fully_written = written == flood.len();
    // Now read everything the server sends.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut pongs = 0;
    loop {
        while let Some(frame) = take_server_frame(&mut buf) {
            match frame.opcode {
                0xA => {
                    assert_eq!(frame.payload, payload(pongs), "pongs in order");
                    pongs += 1;
                }
                0x8 => {
                    assert_eq!(&frame.payload[..2], &1008u16.to_be_bytes(), "{frame:?}");
                    assert_eq!(&frame.payload[2..], b"slow consumer");
                    assert!(buf.is_empty(), "nothing after the close frame");
                    let mut rest = Vec::new();
                    let eof =
                        tokio::time::timeout_at(deadline, reader.read_to_end(&mut rest)).await;
                    assert!(eof.is_ok(), "TCP closed after the close frame");
                    assert!(rest.is_empty(), "nothing after the close frame");
                    return FloodEnd::SlowConsumer { pongs };
                }
                other => panic!("unexpected frame opcode {other:#x}"),
            }
        }
        if pongs == count {
            assert!(fully_written, "every ping answered, so every ping was read");
            // Still open: a clean close works.
            writer
                .write_all(&client_frame(CLOSE, &close_body(1000, b"")))
                .await
                .expect("write close");
            let end = read_until_close(&mut reader, WAIT).await;
            assert_closed_with(&end, 1000, "", "close after the flood");
            return FloodEnd::AllAnswered;
        }
        match tokio::time::timeout_at(deadline, reader.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            other => panic!(
                "the flood ended without all pongs or a close 1008: {other:?} after {pongs} pongs \
                 ({written} of {} bytes written)",
                flood.len()
            ),
        }
    }
}

/// 20,000 pings written as fast as possible by a client that does not read meanwhile: the
/// server either answers all of them or drops the client with close 1008, within a bound and
/// without unbounded memory growth. Two variants: 8-byte pings, and full-size (125-byte) pings
/// to a client with a tiny receive buffer. (Observed: the small flood is dropped, because one
/// socket read holds more than 1024 pings and all their pongs are queued before any is written;
/// the large one is answered, because loopback send buffers grow to hold 2.6 MB of pongs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_is_answered_or_dropped_as_slow_consumer() {
    let _serial = serial().await;
    let server = TestServer::default().await;
    let before = vm_rss_kib();
    let started = Instant::now();
    let small = ping_flood(&server, 20_000, 8, None).await;
    let large = ping_flood(&server, 20_000, 125, Some(4096)).await;
    let elapsed = started.elapsed();
    let growth = vm_rss_kib().saturating_sub(before);
    eprintln!("ping flood: small {small:?}, large {large:?}, {elapsed:?}, RSS +{growth} KiB");
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    assert!(growth < 50 * 1024, "RSS grew by {growth} KiB");
    assert_still_serves(&server).await;
}

/// A client that reads everything promptly but pipelines 1,500 empty pings (9 KB, one write) is
/// not slow: the socket has room for every pong. RFC 6455 section 5.5.3 even allows answering
/// only the latest of several pings. It must not be dropped as a "slow consumer".
#[tokio::test]
async fn reading_client_that_pipelines_pings_is_not_dropped() {
    let server = TestServer::default().await;
    let stream = raw_upgrade(server.addr, "/echo").await;
    let (mut reader, mut writer) = stream.into_split();
    // The reader runs before and during the write, so the client is never slow.
    let reading = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut pongs = 0;
        loop {
            while let Some(frame) = take_server_frame(&mut buf) {
                match frame.opcode {
                    0xA => pongs += 1,
                    0x1 => return Ok((pongs, frame.payload)),
                    _ => return Err(format!("after {pongs} pongs: {frame:?}")),
                }
            }
            match tokio::time::timeout(WAIT, reader.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                other => return Err(format!("after {pongs} pongs: {other:?}")),
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut bytes = client_frame(PING, b"").repeat(1500);
    bytes.extend(client_frame(TEXT, b"after"));
    writer.write_all(&bytes).await.expect("write");
    let (pongs, echoed) = reading
        .await
        .expect("reader")
        .unwrap_or_else(|err| panic!("the connection did not survive: {err}"));
    assert!(pongs >= 1, "at least the latest ping is answered");
    assert_eq!(echoed, b"after");
}
