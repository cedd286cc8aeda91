//! Hostile publishers and resource exhaustion: oversized and broken bodies, invalid channel
//! names, a concurrent publish flood with ordered delivery, the connection limit, memory after a
//! flood, and running out of file descriptors (the real binary under `ulimit -n 64`).

mod common;

use std::io::Read as _;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    TestServer, WAIT, assert_still_serves, http_exchange, raw_upgrade_json, serial, vm_rss_kib,
};
use herald::Config;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn assert_json_error(reply: &common::RawReply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{} {:?}", reply.head, reply.body);
    assert_eq!(reply.json()["error"], code, "{}", reply.head);
}

#[tokio::test]
async fn body_over_the_limit_is_413_from_content_length_alone() {
    let _serial = serial().await;
    let server = TestServer::start(Config::default().max_message_bytes(1024)).await;
    for path in ["/api/publish/news", "/api/broadcast", "/api/send/alice"] {
        // Declares far more than the limit and sends none of it: the answer comes anyway.
        for length in ["1025", "10000000", "9223372036854775807"] {
            let request =
                format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {length}\r\n\r\n");
            let started = Instant::now();
            let reply = http_exchange(server.addr, request.into_bytes()).await;
            assert_json_error(&reply, 413, "payload_too_large");
            assert_eq!(reply.json()["message"], "body larger than 1024 bytes");
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "answered at once"
            );
        }
    }
    // A Content-Length hyper cannot represent is refused by hyper itself (an empty 431).
    let request = "POST /api/publish/news HTTP/1.1\r\nhost: x\r\ncontent-length: 18446744073709551615\r\n\r\n";
    let reply = http_exchange(server.addr, request.as_bytes().to_vec()).await;
    assert_eq!(reply.status, 431, "{}", reply.head);
    assert!(reply.body.is_empty() && reply.closed);
    let mut http = server.http().await;
    let ok = http.post_json("/api/publish/news", &"1".repeat(1024)).await;
    assert_eq!((ok.status, ok.json()["offset"].as_u64()), (200, Some(1)));
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn chunked_body_over_the_limit_is_413() {
    let _serial = serial().await;
    let server = TestServer::start(Config::default().max_message_bytes(1024)).await;
    // Many small chunks adding up to more than the limit, with more promised after.
    let mut request = String::from(
        "POST /api/publish/news HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    for _ in 0..20 {
        request.push_str(&format!("64\r\n{}\r\n", "x".repeat(100)));
    }
    let reply = http_exchange(server.addr, request.into_bytes()).await;
    assert_json_error(&reply, 413, "payload_too_large");
    // One chunk declaring a huge size, and more than the limit of it sent.
    let request = format!(
        "POST /api/publish/news HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nffffffff\r\n{}",
        "x".repeat(2000)
    );
    let reply = http_exchange(server.addr, request.into_bytes()).await;
    assert_json_error(&reply, 413, "payload_too_large");
    let mut http = server.http().await;
    let ok = http.post_json("/api/publish/news", "1").await;
    assert_eq!(
        ok.json()["offset"],
        1,
        "the refused publishes used no offset"
    );
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn invalid_json_declared_as_json_is_400() {
    let _serial = serial().await;
    let server = TestServer::default().await;
    let mut http = server.http().await;
    for body in ["{nope", "", "1 2", "[", "\u{0}", "{\"a\":1}}"] {
        for content_type in [
            "application/json",
            "application/vnd.api+json; charset=utf-8",
        ] {
            let reply = http
                .request(
                    "POST",
                    "/api/publish/news",
                    &[("content-type", content_type)],
                    body.as_bytes(),
                )
                .await;
            assert_eq!(reply.status, 400, "{body:?} as {content_type}");
            assert_eq!(reply.json()["error"], "invalid_json", "{body:?}");
        }
    }
    // Not UTF-8 at all, declared JSON.
    let reply = http
        .request(
            "POST",
            "/api/publish/news",
            &[("content-type", "application/json")],
            &[0xFF, 0xFE],
        )
        .await;
    assert_eq!(
        (reply.status, reply.json()["error"].as_str()),
        (400, Some("invalid_json"))
    );
    let ok = http.post_json("/api/publish/news", "{}").await;
    assert_eq!(ok.json()["offset"], 1);
    assert_still_serves(&server).await;
}

#[tokio::test]
async fn invalid_channel_names_in_the_path_are_400() {
    let _serial = serial().await;
    let server = TestServer::default().await;
    let mut http = server.http().await;
    let long = "x".repeat(129);
    for name in [
        "%00", "%20", "a%20b", "%FF", "%C3%A9", "a%2Cb", "a%22b", "%0D%0A", "", &long, "%",
    ] {
        let reply = http.post_json(&format!("/api/publish/{name}"), "1").await;
        assert_eq!(reply.status, 400, "{name:?}: {:?}", reply.body);
        assert_eq!(reply.json()["error"], "invalid_channel", "{name:?}");
        let reply = http.post_json(&format!("/api/send/{name}"), "1").await;
        assert_eq!(reply.status, 400, "{name:?}");
        assert_eq!(reply.json()["error"], "invalid_client_id", "{name:?}");
    }
    // A raw space in the target is not even a valid request line: hyper's 400, then close.
    let reply = http_exchange(
        server.addr,
        b"POST /api/publish/a b HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\n1".to_vec(),
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.head);
    // 128 bytes is the longest valid name.
    let reply = http
        .post_json(&format!("/api/publish/{}", "y".repeat(128)), "1")
        .await;
    assert_eq!(reply.status, 200);
    assert_still_serves(&server).await;
}

/// A publisher that declares a body and then stalls must not hold its connection (and a slot
/// of `--max-connections`) for ever: the body, like the headers, must arrive within
/// `--handshake-timeout`, else `408`.
#[tokio::test]
async fn stalled_publish_body_is_dropped() {
    let server = TestServer::start(
        Config::default()
            .handshake_timeout(Duration::from_secs(1))
            .max_connections(2),
    )
    .await;
    let mut stalled = Vec::new();
    for request in [
        &b"POST /api/publish/a HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123"[..],
        b"POST /api/publish/a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n64\r\n0123",
    ] {
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        tokio::io::AsyncWriteExt::write_all(&mut stream, request)
            .await
            .expect("write");
        stalled.push(stream);
    }
    for (index, mut stream) in stalled.into_iter().enumerate() {
        let mut buf = [0u8; 1024];
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read(&mut stream, &mut buf),
        )
        .await;
        assert!(
            outcome.is_ok(),
            "stalled body {index} still holds its connection after 10 s"
        );
    }
    assert_still_serves(&server).await;
}

/// The offset in a delivered message, found without parsing the JSON.
fn field_u64(text: &str, field: &str) -> u64 {
    let key = format!("\"{field}\":");
    let start = text
        .find(&key)
        .unwrap_or_else(|| panic!("{field} in {text}"))
        + key.len();
    text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .expect("digits")
}

/// 10,000 publishes from 32 concurrent keep-alive HTTP clients while 3 subscribers read: every
/// subscriber gets all 10,000, offsets 1..=10000 contiguous and in order, and each publisher's
/// messages in the order it published them. Afterwards, with every client gone, the process
/// RSS is within 30 MB of where it was before the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_flood_is_delivered_complete_and_in_order() {
    const TOTAL: u64 = 10_000;
    const PUBLISHERS: u64 = 32;
    let _serial = serial().await;
    let server = TestServer::default().await;
    // Warm-up so that lazily allocated state is part of the baseline.
    assert_still_serves(&server).await;
    let before = vm_rss_kib();
    let mut subscribers = Vec::new();
    for _ in 0..3 {
        let (mut ws, _) = server.connect_json("channels=flood").await;
        subscribers.push(tokio::spawn(async move {
            let mut last_seq = vec![None::<u64>; PUBLISHERS as usize];
            for expected in 1..=TOTAL {
                let Message::Text(text) = common::recv(&mut ws).await else {
                    panic!("text frames only");
                };
                assert_eq!(
                    field_u64(&text, "offset"),
                    expected,
                    "contiguous and in order"
                );
                let publisher = field_u64(&text, "p") as usize;
                let seq = field_u64(&text, "s");
                assert!(
                    last_seq[publisher].is_none_or(|last| last < seq),
                    "publisher {publisher}'s messages in its order"
                );
                last_seq[publisher] = Some(seq);
            }
            ws
        }));
    }
    let started = Instant::now();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let addr = server.addr;
            tokio::spawn(async move {
                let mut http = common::HttpClient::connect(addr).await;
                let mut seq = 0;
                let mut offsets = Vec::new();
                let mut n = p;
                while n < TOTAL {
                    let reply = http
                        .post_json("/api/publish/flood", &format!(r#"{{"p":{p},"s":{seq}}}"#))
                        .await;
                    assert_eq!(reply.status, 200);
                    assert_eq!(reply.json()["subscribers"], 3);
                    offsets.push(reply.json()["offset"].as_u64().expect("offset"));
                    seq += 1;
                    n += PUBLISHERS;
                }
                offsets
            })
        })
        .collect();
    let mut offsets = Vec::new();
    for publisher in publishers {
        let mine = tokio::time::timeout(Duration::from_secs(120), publisher)
            .await
            .expect("publishing took too long")
            .expect("publisher");
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "a client's offsets increase"
        );
        offsets.extend(mine);
    }
    offsets.sort_unstable();
    assert_eq!(
        offsets,
        (1..=TOTAL).collect::<Vec<_>>(),
        "each offset used exactly once"
    );
    for subscriber in subscribers {
        let ws = tokio::time::timeout(Duration::from_secs(60), subscriber)
            .await
            .expect("subscriber took too long")
            .expect("subscriber got everything in order");
        drop(ws);
    }
    let elapsed = started.elapsed();
    let mut http = server.http().await;
    let stats = http.get("/api/stats").await.json();
    assert_eq!(stats["slow_consumer_drops"], 0, "{stats}");
    assert_eq!(stats["publishes"], TOTAL + 1, "{stats}");
    // Wait for the subscribers to be unregistered, then measure.
    let deadline = Instant::now() + WAIT;
    while http.get("/api/stats").await.json()["connections"] != 0 {
        assert!(Instant::now() < deadline, "subscribers never unregistered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(http);
    let after = vm_rss_kib();
    let growth = after.saturating_sub(before);
    eprintln!("flood of {TOTAL} in {elapsed:?}; RSS {before} -> {after} KiB");
    assert!(
        growth < 30 * 1024,
        "RSS after the flood is {growth} KiB above where it started"
    );
    assert_still_serves(&server).await;
}

/// `max_connections` counts every TCP connection; the next one gets a JSON `503` (not a refused
/// connection), and the server recovers as soon as clients leave.
#[tokio::test]
async fn connection_limit_gives_503_json_and_recovers() {
    let _serial = serial().await;
    let server = TestServer::start(Config::default().max_connections(4)).await;
    let mut ws_a = raw_upgrade_json(server.addr, "channels=a").await;
    let ws_b = raw_upgrade_json(server.addr, "channels=b").await;
    let http = server.http().await; // a keep-alive HTTP connection holds a slot too
    let idle = TcpStream::connect(server.addr).await.expect("connect"); // so does a silent one
    tokio::time::sleep(Duration::from_millis(100)).await;
    for request in [
        &b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"[..],
        common::upgrade_request_for("/ws", "").as_bytes(),
        b"POST /api/publish/a HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\n1",
    ] {
        let reply = http_exchange(server.addr, request.to_vec()).await;
        assert_eq!(reply.status, 503, "{}", reply.head);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert_eq!(reply.json()["error"], "too_many_connections");
        assert!(reply.closed);
    }
    // The existing clients are unaffected.
    let mut http = http;
    let published = http.post_json("/api/publish/a", "7").await;
    assert_eq!(published.json()["subscribers"], 1);
    let frame = common::read_server_frame(&mut ws_a)
        .await
        .expect("delivery");
    assert!(String::from_utf8_lossy(&frame.payload).contains(r#""data":7"#));
    // Clients leave: two slots free up.
    drop((ws_b, idle));
    let deadline = Instant::now() + WAIT;
    let reply = loop {
        let reply = http_exchange(
            server.addr,
            b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_vec(),
        )
        .await;
        if reply.status == 200 || Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(reply.status, 200, "a slot frees up once clients leave");
    drop(http);
    assert_still_serves(&server).await;
}

/// A child `herald` process killed (by PID) when dropped, also when the test panics.
struct Child_ {
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Drop for Child_ {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Child_ {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stdout_and_stderr(&self) -> String {
        let out = self.output.lock().expect("lock").clone();
        let err = self.stderr.lock().expect("lock").clone();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        )
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("lock")).into_owned()
    }
}

/// Starts the real binary under `ulimit -n <nofile>` on a free port.
fn spawn_herald(nofile: u32, extra: &[&str]) -> (Child_, SocketAddr) {
    let addr = StdListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {nofile}; exec \"$0\" --listen {addr} \"$@\""
        ))
        .arg(env!("CARGO_BIN_EXE_herald"))
        .args(extra)
        .env("RUST_LOG", "herald=info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn herald");
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock().expect("lock").extend_from_slice(&chunk[..n]);
            }
        });
        buf
    };
    let output = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    (
        Child_ {
            child,
            output,
            stderr,
        },
        addr,
    )
}

/// `/healthz` on a fresh connection, within `within`; the status or an error description.
async fn healthz(addr: SocketAddr, within: Duration) -> Result<u16, String> {
    tokio::time::timeout(within, async {
        let reply = http_exchange(
            addr,
            b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_vec(),
        )
        .await;
        reply.status
    })
    .await
    .map_err(|_| "timed out".to_owned())
}

async fn wait_healthy(addr: SocketAddr, child: &mut Child_) {
    let deadline = Instant::now() + WAIT;
    loop {
        if TcpStream::connect(addr).await.is_ok()
            && healthz(addr, Duration::from_secs(2)).await == Ok(200)
        {
            return;
        }
        if let Ok(Some(status)) = child.child.try_wait() {
            panic!("herald exited: {status}: {}", child.stdout_and_stderr());
        }
        assert!(Instant::now() < deadline, "herald never became healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CPU time (user + system) of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which is in parentheses): state is field 3, utime 14,
    // stime 15.
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let utime: u64 = fields[11].parse().expect("utime");
    let stime: u64 = fields[12].parse().expect("stime");
    utime + stime
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100)
}

/// The real binary under `ulimit -n 64`: 100 connections exhaust its descriptors. It logs the
/// accept error, does not spin (< 50% of one core while saturated), and serves again once the
/// connections are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_descriptor_exhaustion_is_logged_without_spinning_and_recovers() {
    let _serial = serial().await;
    let (mut child, addr) = spawn_herald(64, &["--handshake-timeout", "60s"]);
    wait_healthy(addr, &mut child).await;
    let pid = child.pid();
    // 100 connections; those past the server's descriptors wait in the backlog (or, if it is
    // full, time out or are refused: all expected).
    let mut held = Vec::new();
    let mut failed = 0;
    for _ in 0..100 {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => held.push(stream),
            _ => failed += 1,
        }
    }
    // Saturated: a request on a fresh connection is not served.
    assert!(
        healthz(addr, Duration::from_millis(500)).await != Ok(200),
        "still answering with 100 connections under ulimit -n 64?"
    );
    let deadline = Instant::now() + WAIT;
    while !child.stdout_and_stderr().contains("accept failed") {
        assert!(
            Instant::now() < deadline,
            "no accept error logged: {}",
            child.stdout_and_stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Not busy-looping while saturated.
    let ticks = clock_ticks_per_second();
    let start = cpu_ticks(pid);
    let measured_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - start;
    let wall = measured_from.elapsed().as_secs_f64();
    let share = used as f64 / ticks as f64 / wall;
    let log = child.stdout_and_stderr();
    let accept_errors = log.matches("accept failed").count();
    eprintln!(
        "fd exhaustion: {} held, {failed} failed to connect; CPU {:.1}% of a core; {accept_errors} accept errors logged",
        held.len(),
        share * 100.0
    );
    assert!(
        share < 0.5,
        "the server uses {:.0}% of a core while saturated",
        share * 100.0
    );
    assert!(
        log.contains("Too many open files"),
        "the log names the cause: {log}"
    );
    // Close everything: the server serves again.
    drop(held);
    let deadline = Instant::now() + WAIT;
    loop {
        if healthz(addr, Duration::from_secs(2)).await == Ok(200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never recovered: {}",
            child.stdout_and_stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        child.child.try_wait().expect("try_wait").is_none(),
        "the server is still running"
    );
}

/// README: "Logs go to stderr". The binary's log lines (the startup line, the accept error)
/// appear on stdout instead: `tracing_subscriber::fmt()` in src/main.rs writes to stdout unless
/// given `.with_writer(std::io::stderr)`.
#[tokio::test]
async fn the_binary_logs_to_stderr() {
    let _serial = serial().await;
    let (mut child, addr) = spawn_herald(1024, &[]);
    wait_healthy(addr, &mut child).await;
    let deadline = Instant::now() + WAIT;
    while !child.stderr().contains("herald listening") {
        assert!(
            Instant::now() < deadline,
            "startup log not on stderr; stdout+stderr: {}",
            child.stdout_and_stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
