//! A minimal WebSocket and HTTP/1.1 client, just enough to load a server without becoming the
//! bottleneck: URL parsing, connecting (optionally from a spread source address, with a chosen
//! receive buffer), the upgrade handshake written and checked by hand, a streaming frame scanner
//! that walks server frames straight out of large reads without allocating, and masked frame
//! encoding into a reused buffer.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use base64::Engine;
use herald::ws::handshake::derive_accept_key;
use tokio::net::{TcpSocket, TcpStream};

/// Bytes of each frame's payload kept for inspection (enough for Herald's JSON envelope up to
/// the `hb:` marker, its sequence and its timestamp, and for any control frame).
pub const PREFIX: usize = 256;

/// A parsed `ws://` or `http://` URL.
#[derive(Debug, Clone)]
pub struct Url {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The `Host` header value (`host:port`).
    pub host: String,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    /// Parses `scheme://host[:port][/path?query]`, accepting `ws` and `http` (no TLS), and
    /// resolves the host once.
    pub fn parse(text: &str) -> Result<Url, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("{text}: expected scheme://host:port/path"))?;
        if scheme != "ws" && scheme != "http" {
            return Err(format!("{text}: only ws:// and http:// are supported"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("{text}: {e}"))?
            .next()
            .ok_or_else(|| format!("{text}: no address"))?;
        Ok(Url {
            addr,
            host: authority.to_string(),
            path: path.to_string(),
        })
    }

    /// This URL with every `{i}` in the path replaced by `i` (per-connection endpoints).
    pub fn for_index(&self, i: usize) -> Url {
        if !self.path.contains("{i}") {
            return self.clone();
        }
        Url {
            path: self.path.replace("{i}", &i.to_string()),
            ..self.clone()
        }
    }
}

/// Opens a TCP connection to `addr` with `TCP_NODELAY`, bound to `source` if given (port 0) and
/// with `SO_RCVBUF` set to `rcvbuf` before connecting if given.
pub async fn connect(
    addr: SocketAddr,
    source: Option<SocketAddr>,
    rcvbuf: Option<u32>,
) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(source) = source {
        socket.bind(source)?;
    }
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size)?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Writes all of `data`, waiting for the socket to become writable as needed.
pub async fn write_all(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        stream.writable().await?;
        match stream.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Position of `needle` in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Performs the WebSocket upgrade on `stream` for `url` within `limit`: sends the request,
/// checks for `101` and the right `Sec-WebSocket-Accept`. Returns any bytes the server sent
/// after its response (frames already on their way).
pub async fn handshake(stream: &TcpStream, url: &Url, limit: Duration) -> io::Result<Vec<u8>> {
    match tokio::time::timeout(limit, handshake_inner(stream, url)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "handshake timed out",
        )),
    }
}

async fn handshake_inner(stream: &TcpStream, url: &Url) -> io::Result<Vec<u8>> {
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        url.path, url.host
    );
    write_all(stream, request.as_bytes()).await?;
    let (head, rest) = read_head(stream).await?;
    let status_line = head.lines().next().unwrap_or("");
    if !status_line.starts_with("HTTP/1.1 101") {
        return Err(io::Error::other(format!("upgrade refused: {status_line}")));
    }
    let expected = derive_accept_key(key.as_bytes());
    if header(&head, "sec-websocket-accept") != Some(expected.as_str()) {
        return Err(io::Error::other("wrong or missing Sec-WebSocket-Accept"));
    }
    Ok(rest)
}

/// Opens a Server-Sent Events stream (`GET` with `Accept: text/event-stream`) on `stream` for
/// `url` within `limit`, and checks for `200` with `Content-Type: text/event-stream`. Returns
/// any bytes of the stream the server sent after its head.
pub async fn open_event_stream(
    stream: &TcpStream,
    url: &Url,
    limit: Duration,
) -> io::Result<Vec<u8>> {
    let open = async {
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            url.path, url.host
        );
        write_all(stream, request.as_bytes()).await?;
        let (head, rest) = read_head(stream).await?;
        let status_line = head.lines().next().unwrap_or("");
        if !status_line.starts_with("HTTP/1.1 200") {
            return Err(io::Error::other(format!("stream refused: {status_line}")));
        }
        if !header(&head, "content-type").is_some_and(|t| t.starts_with("text/event-stream")) {
            return Err(io::Error::other("the reply is not text/event-stream"));
        }
        Ok(rest)
    };
    match tokio::time::timeout(limit, open).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "opening the stream timed out",
        )),
    }
}

/// Reads an HTTP response head; returns it and the bytes read past it.
async fn read_head(stream: &TcpStream) -> io::Result<(String, Vec<u8>)> {
    let mut buf = vec![0u8; 4096];
    let mut have = 0;
    let end = loop {
        if have == buf.len() {
            if buf.len() >= 64 * 1024 {
                return Err(io::Error::other("response headers too long"));
            }
            buf.resize(buf.len() * 2, 0);
        }
        stream.readable().await?;
        match stream.try_read(&mut buf[have..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the response head",
                ));
            }
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
        if let Some(i) = find(&buf[..have], b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = std::str::from_utf8(&buf[..end])
        .map_err(|_| io::Error::other("non-UTF-8 response head"))?
        .to_owned();
    buf.truncate(have);
    buf.drain(..end);
    Ok((head, buf))
}

/// The value of header `name` in a response head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// Appends one masked client frame (FIN set) carrying `payload` to `out`.
pub fn push_masked(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, byte) in out[start..].iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// A masked close frame with status 1000, as a client sends it.
pub fn close_frame() -> Vec<u8> {
    herald::ws::frame::encode_masked(
        herald::ws::frame::OpCode::Close,
        true,
        &1000u16.to_be_bytes(),
        rand::random(),
    )
}

/// Parses a frame header at the start of `b`: `(opcode, header length, payload length)`, or
/// `None` if `b` does not yet hold the whole header.
#[inline]
fn parse_header(b: &[u8]) -> Option<(u8, usize, u64)> {
    if b.len() < 2 {
        return None;
    }
    let masked = b[1] & 0x80 != 0;
    let len7 = b[1] & 0x7F;
    let ext = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let hlen = 2 + ext + if masked { 4 } else { 0 };
    if b.len() < hlen {
        return None;
    }
    let len = match len7 {
        126 => u64::from(u16::from_be_bytes([b[2], b[3]])),
        127 => u64::from_be_bytes(b[2..10].try_into().ok()?),
        n => u64::from(n),
    };
    Some((b[0] & 0x0F, hlen, len))
}

/// Walks server frames in a byte stream delivered in arbitrary pieces. For every complete frame
/// it reports the opcode, the first [`PREFIX`] bytes of the payload and the payload length.
/// Frames wholly inside one read are reported straight from the read buffer; only a frame split
/// across reads is copied, and then only its header and payload prefix. No allocation.
#[derive(Debug)]
pub struct FrameScanner {
    header: [u8; 14],
    header_have: usize,
    in_payload: bool,
    opcode: u8,
    remaining: u64,
    length: u64,
    prefix: [u8; PREFIX],
    prefix_len: usize,
}

impl Default for FrameScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameScanner {
    /// A scanner at a frame boundary.
    pub fn new() -> Self {
        Self {
            header: [0; 14],
            header_have: 0,
            in_payload: false,
            opcode: 0,
            remaining: 0,
            length: 0,
            prefix: [0; PREFIX],
            prefix_len: 0,
        }
    }

    /// Feeds the next bytes of the stream, calling `on_frame(opcode, payload_prefix, length)`
    /// for each frame completed by them.
    #[inline]
    pub fn feed(&mut self, mut buf: &[u8], mut on_frame: impl FnMut(u8, &[u8], u64)) {
        loop {
            if !self.in_payload {
                if self.header_have == 0 {
                    match parse_header(buf) {
                        Some((opcode, hlen, len)) => {
                            let rest = &buf[hlen..];
                            if (rest.len() as u64) >= len {
                                let len_usize = len as usize;
                                on_frame(opcode, &rest[..len_usize.min(PREFIX)], len);
                                buf = &rest[len_usize..];
                                continue;
                            }
                            self.begin_payload(opcode, len);
                            buf = rest;
                        }
                        None => {
                            self.header[..buf.len()].copy_from_slice(buf);
                            self.header_have = buf.len();
                            return;
                        }
                    }
                } else {
                    let have = self.header_have;
                    let take = (14 - have).min(buf.len());
                    self.header[have..have + take].copy_from_slice(&buf[..take]);
                    match parse_header(&self.header[..have + take]) {
                        Some((opcode, hlen, len)) => {
                            buf = &buf[hlen - have..];
                            self.header_have = 0;
                            self.begin_payload(opcode, len);
                        }
                        None => {
                            self.header_have = have + take;
                            return;
                        }
                    }
                }
            }
            let take = (self.remaining.min(buf.len() as u64)) as usize;
            let room = PREFIX - self.prefix_len;
            let keep = room.min(take);
            self.prefix[self.prefix_len..self.prefix_len + keep].copy_from_slice(&buf[..keep]);
            self.prefix_len += keep;
            self.remaining -= take as u64;
            buf = &buf[take..];
            if self.remaining > 0 {
                return;
            }
            self.in_payload = false;
            on_frame(self.opcode, &self.prefix[..self.prefix_len], self.length);
        }
    }

    fn begin_payload(&mut self, opcode: u8, len: u64) {
        self.in_payload = true;
        self.opcode = opcode;
        self.remaining = len;
        self.length = len;
        self.prefix_len = 0;
    }
}

/// Finds the `hb:<seq>:<send_ns>:` marker in a payload prefix: `(seq, send_ns)`.
#[inline]
pub fn parse_marker(payload: &[u8]) -> Option<(u64, u64)> {
    let start = find(payload, b"hb:")? + 3;
    let (seq, used) = parse_digits(&payload[start..])?;
    let (ns, _) = parse_digits(&payload[start + used + 1..])?;
    Some((seq, ns))
}

/// Parses leading decimal digits terminated by `:`: `(value, digits used)`.
#[inline]
fn parse_digits(b: &[u8]) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'0'..=b'9' => value = value.wrapping_mul(10).wrapping_add(u64::from(c - b'0')),
            b':' if i > 0 => return Some((value, i)),
            _ => return None,
        }
    }
    None
}

/// Writes the `hb:<seq>:<send_ns>:` payload padded with `x` to at least `size` bytes into `out`.
pub fn push_payload(out: &mut Vec<u8>, seq: u64, send_ns: u64, size: usize) {
    let start = out.len();
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(b"hb:");
    out.extend_from_slice(digits.format(seq).as_bytes());
    out.push(b':');
    out.extend_from_slice(digits.format(send_ns).as_bytes());
    out.push(b':');
    let written = out.len() - start;
    if written < size {
        out.resize(start + size, b'x');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        herald::ws::frame::frame_header(herald::ws::frame::OpCode::Text, payload.len(), &mut out);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn scanner_handles_every_split() {
        let mut stream = Vec::new();
        let mut payloads = Vec::new();
        for (i, size) in [0usize, 5, 125, 126, 300, 70_000].into_iter().enumerate() {
            let mut p = Vec::new();
            push_payload(&mut p, i as u64, 42, size);
            stream.extend(frame(&p));
            payloads.push(p);
        }
        for chunk in [1, 2, 3, 7, 100, 4096, 1 << 20] {
            let mut scanner = FrameScanner::new();
            let mut seen = Vec::new();
            for piece in stream.chunks(chunk) {
                scanner.feed(piece, |op, prefix, len| {
                    assert_eq!(op, 1);
                    seen.push((parse_marker(prefix), len));
                });
            }
            let expected: Vec<_> = payloads
                .iter()
                .enumerate()
                .map(|(i, p)| (Some((i as u64, 42)), p.len() as u64))
                .collect();
            assert_eq!(seen, expected, "chunk {chunk}");
        }
    }

    #[test]
    fn marker_inside_an_envelope() {
        let text = br#"{"type":"message","channel":"bench","offset":7,"data":"hb:12:3456:xxxx"}"#;
        assert_eq!(parse_marker(text), Some((12, 3456)));
        assert_eq!(parse_marker(b"{\"type\":\"welcome\"}"), None);
    }
}
