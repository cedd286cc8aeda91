//! A minimal Server-Sent Events client over a raw socket: HTTP/1.1, the chunked transfer
//! coding and the event-stream line format, read byte by byte so that a test sees exactly what
//! the server wrote (events, comments, and whether the body ended or was cut off).

use std::net::SocketAddr;

use herald::sse::event_id::EventId;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::WAIT;

/// What the stream carried: an event, or a comment line (the heartbeat).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Event { id: Option<String>, data: String },
    Comment(String),
}

/// How a stream's body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// With the last chunk: the server ended the stream.
    Clean,
    /// The connection closed mid-stream: the server cut it off.
    Cut,
}

/// One event stream, read off a raw socket.
pub struct Sse {
    stream: TcpStream,
    /// The response head.
    pub head: String,
    /// Bytes read, not yet taken out of the chunked coding.
    raw: Vec<u8>,
    /// Body bytes not yet parsed into events.
    body: Vec<u8>,
    /// Bytes left in the current chunk, and whether its CRLF is still to come.
    chunk_left: usize,
    chunk_crlf: bool,
    end: Option<End>,
}

impl Sse {
    /// Opens `/sse?{query}` with `headers` (lines ending in `\r\n`) and reads the `200` head.
    pub async fn open(addr: SocketAddr, query: &str, headers: &str) -> Self {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        Self::open_on(stream, query, headers).await
    }

    pub async fn open_on(mut stream: TcpStream, query: &str, headers: &str) -> Self {
        let request = format!(
            "GET /sse?{query} HTTP/1.1\r\nhost: herald.test\r\naccept: text/event-stream\r\n{headers}\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut sse = Self {
            stream,
            head: String::new(),
            raw: Vec::new(),
            body: Vec::new(),
            chunk_left: 0,
            chunk_crlf: false,
            end: None,
        };
        let head_end = loop {
            if let Some(at) = find(&sse.raw, b"\r\n\r\n") {
                break at;
            }
            assert!(sse.fill().await, "closed before the head: {:?}", sse.raw);
        };
        sse.head = String::from_utf8(sse.raw[..head_end].to_vec()).expect("utf-8 head");
        sse.raw.drain(..head_end + 4);
        assert!(sse.head.starts_with("HTTP/1.1 200 "), "{}", sse.head);
        assert_eq!(
            sse.header("transfer-encoding"),
            Some("chunked"),
            "{}",
            sse.head
        );
        sse
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }

    /// Reads more from the socket; false at EOF (or a reset).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("timed out waiting for the stream")
        {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.raw.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Moves what the chunked coding holds into `body`.
    fn decode(&mut self) {
        loop {
            if self.chunk_left > 0 {
                let take = self.chunk_left.min(self.raw.len());
                self.body.extend(self.raw.drain(..take));
                self.chunk_left -= take;
                if self.chunk_left > 0 {
                    return;
                }
                self.chunk_crlf = true;
            }
            if self.chunk_crlf {
                if self.raw.len() < 2 {
                    return;
                }
                assert_eq!(&self.raw[..2], b"\r\n", "a chunk ends with CRLF");
                self.raw.drain(..2);
                self.chunk_crlf = false;
            }
            let Some(at) = find(&self.raw, b"\r\n") else {
                return;
            };
            let line = std::str::from_utf8(&self.raw[..at]).expect("chunk size line");
            let size = usize::from_str_radix(line, 16).expect("hex chunk size");
            self.raw.drain(..at + 2);
            if size == 0 {
                self.end = Some(End::Clean);
                return;
            }
            self.chunk_left = size;
        }
    }

    /// The next event or comment; `None` once the body has ended (a partly received event at
    /// a cut is dropped, as `EventSource` drops it).
    pub async fn next_item(&mut self) -> Option<Item> {
        loop {
            self.decode();
            if let Some(at) = find(&self.body, b"\n\n") {
                let block: Vec<u8> = self.body.drain(..at + 2).collect();
                return Some(parse_block(&block[..at]));
            }
            if self.end.is_some() {
                return None;
            }
            if !self.fill().await {
                self.end = Some(End::Cut);
            }
        }
    }

    /// The next event (comments skipped): its id and its data as JSON.
    pub async fn next_event(&mut self) -> (String, Value) {
        loop {
            match self.next_item().await.expect("the stream ended") {
                Item::Event { id, data } => {
                    let value = serde_json::from_str(&data)
                        .unwrap_or_else(|err| panic!("event data is not JSON ({err}): {data}"));
                    return (id.expect("every event has an id"), value);
                }
                Item::Comment(_) => {}
            }
        }
    }

    /// Reads to the end of the body; returns the events on the way and how it ended.
    pub async fn read_to_end(&mut self) -> (Vec<(String, Value)>, End) {
        let mut events = Vec::new();
        while let Some(item) = self.next_item().await {
            if let Item::Event { id, data } = item {
                let data = serde_json::from_str(&data).expect("event data is JSON");
                events.push((id.expect("an id"), data));
            }
        }
        (events, self.end.expect("ended"))
    }
}

/// One block of lines (without its blank line) as the SSE format reads it.
fn parse_block(block: &[u8]) -> Item {
    let text = std::str::from_utf8(block).expect("events are UTF-8");
    let mut id = None;
    let mut data: Option<String> = None;
    let mut comment = None;
    for line in text.split('\n') {
        if let Some(rest) = line.strip_prefix(':') {
            comment = Some(rest.trim_start().to_owned());
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.to_owned()),
            "data" => match &mut data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => data = Some(value.to_owned()),
            },
            other => panic!("unexpected field {other:?} in {text:?}"),
        }
    }
    match (data, comment) {
        (Some(data), None) => Item::Event { id, data },
        (None, Some(comment)) if id.is_none() => Item::Comment(comment),
        other => panic!("a block is one event or one comment: {text:?} ({other:?})"),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The positions an id holds: (epoch, offset) per channel.
pub fn positions(id: &str) -> Vec<(String, u64)> {
    EventId::parse(id)
        .unwrap_or_else(|err| panic!("{id:?}: {err}"))
        .positions
        .iter()
        .map(|position| (position.epoch.as_str().to_owned(), position.offset))
        .collect()
}
