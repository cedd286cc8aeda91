//! Shared test harness: a real server on 127.0.0.1:0, real WebSocket clients
//! (tokio-tungstenite), and a minimal keep-alive HTTP/1.1 client over a real socket.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod cluster;
pub mod positions;
pub mod redis_server;
pub mod sse;
pub mod stall_proxy;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use herald::Config;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Every wait in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A running server; dropping it shuts the server down.
pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<herald::Result<()>>>,
}

impl TestServer {
    pub async fn start(config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(herald::server::run(listener, config, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub async fn default() -> Self {
        Self::start(Config::default()).await
    }

    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }

    /// Connects a WebSocket client to `path_and_query` (e.g. `/ws?channels=a`).
    pub async fn connect(&self, path_and_query: &str) -> Ws {
        let (ws, response) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::connect_async(self.ws_url(path_and_query)),
        )
        .await
        .expect("connect timed out")
        .expect("connect failed");
        assert_eq!(response.status(), 101);
        ws
    }

    /// Connects to `/ws` and consumes the welcome frame; returns the client and its id.
    pub async fn connect_json(&self, query: &str) -> (Ws, String) {
        let mut ws = self.connect(&format!("/ws?{query}")).await;
        let welcome = recv_json(&mut ws).await;
        assert_eq!(welcome["type"], "welcome", "first frame is the welcome");
        let id = welcome["client_id"].as_str().expect("client id").to_owned();
        (ws, id)
    }

    pub async fn http(&self) -> HttpClient {
        HttpClient::connect(self.addr).await
    }

    /// Triggers shutdown and waits for `run` to return.
    pub async fn shutdown(mut self) -> herald::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().expect("server task");
        tokio::time::timeout(WAIT, task)
            .await
            .expect("shutdown timed out")
            .expect("server task panicked")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The value of the Prometheus metric `name` (without labels) on `server`.
pub async fn metric(server: &TestServer, name: &str) -> u64 {
    let body = server.http().await.get("/metrics").await.body;
    String::from_utf8(body)
        .expect("utf-8 metrics")
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

/// The next data frame, within [`WAIT`]; control frames are skipped.
pub async fn recv(ws: &mut Ws) -> Message {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("stream ended")
            .expect("websocket error");
        if !matches!(message, Message::Ping(_) | Message::Pong(_)) {
            return message;
        }
    }
}

/// The next frame, parsed as JSON.
pub async fn recv_json(ws: &mut Ws) -> Value {
    match recv(ws).await {
        Message::Text(text) => serde_json::from_str(&text).expect("server sent JSON"),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

pub async fn send_json(ws: &mut Ws, value: Value) {
    ws.send(Message::text(value.to_string()))
        .await
        .expect("send");
}

/// Reads until the server's close frame and returns its code and reason.
pub async fn expect_close(ws: &mut Ws) -> (u16, String) {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for close")
        {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Some(Ok(Message::Close(None))) => return (1005, String::new()),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Asserts that no data frame arrives within `quiet`, while answering pings meanwhile.
pub async fn expect_silence(ws: &mut Ws, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    while let Ok(next) = tokio::time::timeout_at(deadline, ws.next()).await {
        match next {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected nothing, got {other:?}"),
        }
    }
}

/// A reply from [`HttpClient`].
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("reply body is JSON")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// A minimal HTTP/1.1 client over one keep-alive TCP connection.
pub struct HttpClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl HttpClient {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("http connect");
        stream.set_nodelay(true).expect("nodelay");
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpReply {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        self.stream.write_all(&request).await.expect("http write");
        tokio::time::timeout(WAIT, self.read_reply())
            .await
            .expect("http reply timed out")
    }

    pub async fn get(&mut self, path: &str) -> HttpReply {
        self.request("GET", path, &[], b"").await
    }

    pub async fn post_json(&mut self, path: &str, body: &str) -> HttpReply {
        self.request(
            "POST",
            path,
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
        .await
    }

    async fn read_reply(&mut self) -> HttpReply {
        let head_end = loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                break at;
            }
            self.fill().await;
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).expect("utf-8 head");
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().expect("content-length"));
        while self.buf.len() < length {
            self.fill().await;
        }
        let body = self.buf.drain(..length).collect();
        HttpReply {
            status,
            headers,
            body,
        }
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await.expect("http read");
        assert!(n > 0, "server closed the connection mid-reply");
        self.buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Sends raw bytes as a request on a fresh connection and returns the status code and the
/// whole reply (read until the server closes or `WAIT`).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stream.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&chunk[..n]);
            if find(&reply, b"\r\n\r\n").is_some() {
                break;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&reply).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

// ---------------------------------------------------------------------------------------------
// Hostile-client helpers: hand-made upgrades, raw frames, raw HTTP, and memory measurements.
// ---------------------------------------------------------------------------------------------

/// A valid `Sec-WebSocket-Key` (the RFC 6455 sample).
pub const RAW_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Serializes the tests of one test binary that measure memory or load the server heavily.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes the per-binary lock for tests whose measurements must not overlap other tests.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// A `GET` upgrade request for `path_and_query` with the usual headers and `extra` header
/// lines (each ending in `\r\n`).
pub fn upgrade_request_for(path_and_query: &str, extra: &str) -> String {
    format!(
        "GET {path_and_query} HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-key: {RAW_KEY}\r\nsec-websocket-version: 13\r\n{extra}\r\n"
    )
}

/// Opens a WebSocket by hand on a fresh socket, reads the `101` head byte by byte (so no frame
/// after it is consumed) and returns the socket.
pub async fn raw_upgrade(addr: SocketAddr, path_and_query: &str) -> TcpStream {
    let mut stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let request = upgrade_request_for(path_and_query, "");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    tokio::time::timeout(WAIT, async {
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.expect("read 101");
            head.push(byte[0]);
            assert!(head.len() < 8192, "101 head too long");
        }
    })
    .await
    .expect("101 timed out");
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// Like [`raw_upgrade`] on `/ws`, then reads and checks the welcome frame.
pub async fn raw_upgrade_json(addr: SocketAddr, query: &str) -> TcpStream {
    let mut stream = raw_upgrade(addr, &format!("/ws?{query}")).await;
    let frame = read_server_frame(&mut stream).await.expect("welcome frame");
    assert_eq!(frame.opcode, 0x1, "welcome is a text frame");
    assert!(
        String::from_utf8_lossy(&frame.payload).contains(r#""type":"welcome""#),
        "{frame:?}"
    );
    stream
}

/// A masked client frame with an arbitrary first byte (FIN, RSV bits, any opcode) and the
/// minimal length encoding.
pub fn client_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![first_byte];
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// The body of a close frame.
pub fn close_body(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(reason);
    body
}

/// One frame the server sent (server frames are never masked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// Takes one complete server frame off the front of `buf`, if there is one.
pub fn take_server_frame(buf: &mut Vec<u8>) -> Option<ServerFrame> {
    let [b0, b1, ..] = buf[..] else {
        return None;
    };
    assert_eq!(b1 & 0x80, 0, "server frames are not masked");
    let (header, len) = match b1 & 0x7F {
        126 => (
            4,
            usize::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
        ),
        127 => (
            10,
            usize::try_from(u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?))
                .expect("length fits"),
        ),
        len => (2, usize::from(len)),
    };
    if buf.len() < header + len {
        return None;
    }
    let payload = buf[header..header + len].to_vec();
    buf.drain(..header + len);
    Some(ServerFrame {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0F,
        payload,
    })
}

/// Reads exactly one server frame (within [`WAIT`]); `None` if the connection ended first.
/// Reads byte-exact, so nothing after the frame is consumed.
pub async fn read_server_frame(stream: &mut TcpStream) -> Option<ServerFrame> {
    tokio::time::timeout(WAIT, async {
        let mut buf = Vec::new();
        loop {
            if let Some(frame) = take_server_frame(&mut buf) {
                return Some(frame);
            }
            let mut byte = [0u8; 1];
            match stream.read(&mut byte).await {
                Ok(1) => buf.push(byte[0]),
                _ => return None,
            }
        }
    })
    .await
    .expect("timed out waiting for a server frame")
}

/// How a raw connection ended, as seen by [`read_until_close`].
#[derive(Debug, Default)]
pub struct RawEnd {
    /// Frames before the close frame.
    pub frames: Vec<ServerFrame>,
    /// The close frame's code (`Some(1005)` stands for an empty close frame); `None` if none came.
    pub close_code: Option<u16>,
    /// The close frame's reason.
    pub close_reason: String,
    /// Whether the server closed TCP (EOF or a reset) within the time allowed.
    pub tcp_closed: bool,
    /// Whether the end was a reset rather than an orderly EOF.
    pub reset: bool,
    /// Bytes after the close frame (there must be none).
    pub trailing: usize,
}

/// Reads server frames until the server sends a close frame and closes TCP, or `within` passes.
pub async fn read_until_close<R>(stream: &mut R, within: Duration) -> RawEnd
where
    R: tokio::io::AsyncRead + Unpin,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut end = RawEnd::default();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if end.close_code.is_none() {
            while let Some(frame) = take_server_frame(&mut buf) {
                if frame.opcode == 0x8 {
                    end.close_code = Some(match frame.payload[..] {
                        [] => 1005,
                        [high, low, ..] => u16::from_be_bytes([high, low]),
                        [_] => panic!("server sent a one-byte close body"),
                    });
                    end.close_reason =
                        String::from_utf8_lossy(&frame.payload[2.min(frame.payload.len())..])
                            .into_owned();
                    end.trailing = buf.len();
                    break;
                }
                end.frames.push(frame);
            }
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return end,
            Ok(Ok(0)) => {
                end.tcp_closed = true;
                return end;
            }
            Ok(Ok(n)) => {
                if end.close_code.is_some() {
                    end.trailing += n;
                } else {
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
            Ok(Err(_)) => {
                end.tcp_closed = true;
                end.reset = true;
                return end;
            }
        }
    }
}

/// Opens a raw upgrade to `path_and_query`, writes `bytes`, and reads until the server closes.
pub async fn send_and_read_close(addr: SocketAddr, path_and_query: &str, bytes: &[u8]) -> RawEnd {
    let mut stream = raw_upgrade(addr, path_and_query).await;
    stream.write_all(bytes).await.expect("write frames");
    read_until_close(&mut stream, WAIT).await
}

/// A whole HTTP reply read off a raw socket.
#[derive(Debug, Default)]
pub struct RawReply {
    pub status: u16,
    /// The head (status line and headers), without the final blank line.
    pub head: String,
    pub body: Vec<u8>,
    /// Whether the server closed the connection after the reply (within a short wait).
    pub closed: bool,
}

impl RawReply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "reply body is not JSON ({err}): {} / {:?}",
                self.head,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }
}

/// Sends `request` on a fresh connection (the write runs concurrently, so a server that stops
/// reading cannot block it) and reads one whole reply: head and `Content-Length` body. The
/// status is 0 when the server closed without replying.
pub async fn http_exchange(addr: SocketAddr, request: Vec<u8>) -> RawReply {
    let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let writing = tokio::spawn(async move {
        let _ = tokio::time::timeout(WAIT, writer.write_all(&request)).await;
        writer
    });
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut reply = RawReply::default();
    let mut eof = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    let head_end = loop {
        if let Some(at) = find(&buf, b"\r\n\r\n") {
            break Some(at);
        }
        match tokio::time::timeout_at(deadline, reader.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            Ok(_) => {
                eof = true;
                break None;
            }
            Err(_) => panic!("no reply within {WAIT:?}"),
        }
    };
    if let Some(head_end) = head_end {
        reply.head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end + 4);
        reply.status = reply
            .head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let length: usize = reply
            .header("content-length")
            .map_or(0, |v| v.parse().expect("content-length"));
        while buf.len() < length {
            match tokio::time::timeout_at(deadline, reader.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        reply.body = buf.drain(..length.min(buf.len())).collect();
    }
    if !eof {
        // Did the server close after the reply? Wait for EOF or a reset: up to 2 s when the
        // reply says it will close, else 100 ms (on loopback a close follows the reply at once).
        let announced = reply
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
            || reply.head.starts_with("HTTP/1.0");
        let wait = Duration::from_millis(if announced { 2000 } else { 100 });
        eof = matches!(
            tokio::time::timeout(wait, reader.read(&mut chunk)).await,
            Ok(Ok(0) | Err(_))
        );
    }
    reply.closed = eof;
    writing.abort();
    reply
}

/// The resident set size of this process (the server runs in it), in KiB.
pub fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Asserts that the server still serves: `/healthz` answers, and a fresh subscriber receives
/// a publish.
pub async fn assert_still_serves(server: &TestServer) {
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let probe = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let channel = format!("alive-{probe}");
    let mut http = server.http().await;
    let health = http.get("/healthz").await;
    assert_eq!((health.status, &health.body[..]), (200, &b"ok"[..]));
    let (mut ws, _) = server.connect_json(&format!("channels={channel}")).await;
    let reply = http
        .post_json(&format!("/api/publish/{channel}"), r#"{"probe":true}"#)
        .await;
    assert_eq!(reply.status, 200, "publish after the attack");
    let message = recv_json(&mut ws).await;
    assert_eq!(message["type"], "message");
    assert_eq!(message["channel"], channel.as_str());
    assert_eq!(message["data"], serde_json::json!({"probe": true}));
}
