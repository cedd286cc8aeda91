//! One WebSocket connection after the upgrade: our own read loop and write path.
//!
//! The task reads only when the socket is readable, into a buffer it allocates then and frees
//! as soon as no partial frame is left, so an idle connection holds no read buffer. Frames to
//! send wait in the connection's [`Outbox`]; the task takes all of them in one swap and writes
//! them with vectored writes, so a burst of queued frames costs one syscall, not one each.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::protocol::{self, Payload, Request};
use crate::registry::{
    CloseReason, ConnId, Format, Outbox, Push, Registry, Signal, SubscribeError,
};
use crate::ws::close::CloseCode;
use crate::ws::frame::{Decoder, Message, OpCode, encode_close, encode_frame};

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 8 * 1024;
/// Frames handed to one `writev` call at most.
const MAX_IOV: usize = 64;
/// How long a closing connection may take to accept its last frames.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the server waits for the client to close its side after the close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Who the client is and what it asked for in the upgrade request.
#[derive(Debug)]
pub struct Session {
    /// The client id: the one asked for, or one the server made up.
    pub client_id: Arc<str>,
    /// How the client wants its messages.
    pub format: Format,
    /// Channels to subscribe to at once (valid names, within `--max-subscriptions`).
    pub channels: Vec<String>,
}

/// Serves one upgraded connection until it closes. `leftover` holds bytes the HTTP layer read
/// past the upgrade request.
pub async fn run(
    stream: TcpStream,
    leftover: Bytes,
    registry: Registry,
    max_message_bytes: usize,
    session: Session,
) {
    let registration = registry.register(Arc::clone(&session.client_id), session.format);
    let guard = Registered {
        registry: &registry,
        id: registration.id,
    };
    for channel in &session.channels {
        if let Err(err) = registry.subscribe(registration.id, channel) {
            tracing::debug!(%err, channel, "initial subscription refused");
        }
    }
    if session.format == Format::Json {
        registration.outbox.push(
            protocol::welcome_frame(&session.client_id),
            registry.queue_capacity(),
        );
    }
    // Copy what hyper read past the request and let go of its buffer: `leftover` may be a
    // slice of hyper's whole read buffer, which an idle connection must not keep alive.
    let read_buf = (!leftover.is_empty()).then(|| BytesMut::from(&leftover[..]));
    drop(leftover);
    let mut conn = Connection {
        registry: &registry,
        id: registration.id,
        outbox: registration.outbox,
        client_id: session.client_id,
        format: session.format,
        decoder: Decoder::new(max_message_bytes),
        read_buf,
        batch: VecDeque::new(),
        head_written: 0,
    };
    let ending = conn.serve(&stream).await;
    // Boxed: the closing sequence (timers, a drain buffer) would otherwise be part of the
    // state of every idle connection's future.
    Box::pin(conn.finish(stream, ending, guard)).await;
}

/// Unregisters the connection when dropped, however the task ends.
struct Registered<'a> {
    registry: &'a Registry,
    id: ConnId,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.registry.unregister(self.id);
    }
}

/// What woke a waiting connection.
enum Wake {
    Readable,
    Writable,
    Frames,
    Close(CloseReason),
}

/// How a connection ends.
#[derive(Debug)]
enum Ending {
    /// The peer is gone (EOF or a socket error): nothing more can be sent.
    Gone,
    /// Send a close frame, then close.
    Close {
        /// The close frame's payload; `None` for an empty close frame.
        code: Option<CloseCode>,
        reason: Cow<'static, str>,
        /// Deliver the frames still queued first (a graceful shutdown).
        flush: bool,
    },
}

impl Ending {
    fn protocol(code: CloseCode, reason: impl Into<Cow<'static, str>>) -> Self {
        Ending::Close {
            code: Some(code),
            reason: reason.into(),
            flush: false,
        }
    }

    fn server(reason: CloseReason) -> Self {
        Ending::Close {
            code: Some(CloseCode(reason.code())),
            reason: Cow::Borrowed(reason.as_str()),
            flush: reason == CloseReason::GoingAway,
        }
    }
}

struct Connection<'a> {
    registry: &'a Registry,
    id: ConnId,
    outbox: Arc<Outbox>,
    client_id: Arc<str>,
    format: Format,
    decoder: Decoder,
    /// Bytes read and not yet decoded; `None` whenever no partial frame is pending.
    read_buf: Option<BytesMut>,
    /// Frames taken from the outbox and not yet fully written.
    batch: VecDeque<Bytes>,
    /// Bytes of `batch[0]` already written.
    head_written: usize,
}

impl Connection<'_> {
    async fn serve(&mut self, stream: &TcpStream) -> Ending {
        if self.read_buf.is_some() {
            if let Some(ending) = self.process_input().await {
                return ending;
            }
        }
        loop {
            // Checked on every turn, so a client that keeps the socket readable cannot hold
            // off a close the server asked for.
            if let Some(reason) = self.outbox.close_reason() {
                return Ending::server(reason);
            }
            let blocked = match self.write_queued(stream) {
                Ok(blocked) => blocked,
                Err(_) => return Ending::Gone,
            };
            match poll_fn(|cx| self.poll_wake(cx, stream, blocked)).await {
                Wake::Readable => {
                    if let Some(ending) = self.read(stream).await {
                        return ending;
                    }
                }
                Wake::Writable | Wake::Frames => {}
                Wake::Close(reason) => return Ending::server(reason),
            }
        }
    }

    /// Waits until the socket is readable, writable again (when `blocked`), or the outbox has
    /// something. Uses the socket's own readiness slots (`poll_read_ready`), which keeps this
    /// future tiny and replaces the waker the HTTP task left there during the upgrade (which
    /// would otherwise keep that finished task's memory alive for the connection's life).
    fn poll_wake(&self, cx: &mut Context<'_>, stream: &TcpStream, blocked: bool) -> Poll<Wake> {
        if stream.poll_read_ready(cx).is_ready() {
            return Poll::Ready(Wake::Readable);
        }
        if blocked && stream.poll_write_ready(cx).is_ready() {
            return Poll::Ready(Wake::Writable);
        }
        match self.outbox.poll_signal(cx, !blocked) {
            Poll::Ready(Signal::Frames) => Poll::Ready(Wake::Frames),
            Poll::Ready(Signal::Close(reason)) => Poll::Ready(Wake::Close(reason)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Writes queued frames until the outbox is empty or the socket is full. Returns whether
    /// the socket is full with frames still waiting.
    fn write_queued(&mut self, stream: &TcpStream) -> io::Result<bool> {
        loop {
            if self.batch.is_empty() {
                self.outbox.take_batch(&mut self.batch);
                if self.batch.is_empty() {
                    // Quiet again: free the batch buffer so an idle connection holds nothing.
                    self.batch = VecDeque::new();
                    return Ok(false);
                }
            }
            if !write_batch(stream, &mut self.batch, &mut self.head_written)? {
                return Ok(true);
            }
            self.outbox.finish_batch();
        }
    }

    /// Reads what the socket has and handles every complete message in it.
    async fn read(&mut self, stream: &TcpStream) -> Option<Ending> {
        let buf = self
            .read_buf
            .get_or_insert_with(|| BytesMut::with_capacity(READ_CHUNK));
        buf.reserve(READ_CHUNK);
        match stream.try_read_buf(buf) {
            Ok(0) => return Some(Ending::Gone),
            Ok(_) => self.outbox.touch(self.registry.now_ms()),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Some(Ending::Gone),
        }
        self.process_input().await
    }

    /// Decodes and handles every complete message in the read buffer, then frees the buffer if
    /// nothing is left in it.
    async fn process_input(&mut self) -> Option<Ending> {
        loop {
            let buf = self.read_buf.as_mut()?;
            let message = match self.decoder.decode(buf) {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(err) => return Some(Ending::protocol(err.close_code(), err.to_string())),
            };
            if let Some(ending) = self.handle(message).await {
                return Some(ending);
            }
        }
        if self.read_buf.as_ref().is_some_and(BytesMut::is_empty) {
            self.read_buf = None;
        }
        None
    }

    async fn handle(&mut self, message: Message) -> Option<Ending> {
        match message {
            Message::Ping(payload) => self.reply(encode_frame(OpCode::Pong, &payload)),
            Message::Pong(_) => {}
            Message::Close(frame) => {
                return Some(Ending::Close {
                    code: frame.map(|frame| frame.code),
                    reason: Cow::Borrowed(""),
                    flush: false,
                });
            }
            Message::Text(payload) if self.format == Format::Echo => {
                self.reply(encode_frame(OpCode::Text, &payload));
            }
            Message::Binary(payload) if self.format == Format::Echo => {
                self.reply(encode_frame(OpCode::Binary, &payload));
            }
            Message::Text(_) | Message::Binary(_) if self.format == Format::Raw => {
                return Some(Ending::protocol(
                    CloseCode::UNSUPPORTED_DATA,
                    "raw connections are receive-only",
                ));
            }
            Message::Binary(_) => self.reply(protocol::error_frame(
                None,
                "binary_not_supported",
                "json connections take text frames only",
            )),
            Message::Text(payload) => match std::str::from_utf8(&payload) {
                // Boxed for the same reason: a publish's state is needed only while it runs.
                Ok(text) => Box::pin(self.handle_request(text)).await,
                Err(_) => {
                    return Some(Ending::protocol(
                        CloseCode::INVALID_PAYLOAD,
                        "invalid UTF-8",
                    ));
                }
            },
        }
        None
    }

    async fn handle_request(&mut self, text: &str) {
        let parsed = protocol::parse_request(text);
        let id = parsed.id;
        let request = match parsed.request {
            Ok(request) => request,
            Err(err) => {
                self.reply(protocol::error_frame(id, err.code(), &err.to_string()));
                return;
            }
        };
        let reply = match request {
            Request::Subscribe { channel } => match self.registry.subscribe(self.id, &channel) {
                Ok(_) => protocol::subscription_frame(true, id, &channel),
                Err(err @ SubscribeError::TooMany(_)) => {
                    protocol::error_frame(id, "too_many_subscriptions", &err.to_string())
                }
                Err(SubscribeError::Gone) => return,
            },
            Request::Unsubscribe { channel } => {
                if self.registry.unsubscribe(self.id, &channel) {
                    protocol::subscription_frame(false, id, &channel)
                } else {
                    protocol::error_frame(id, "not_subscribed", "not subscribed to that channel")
                }
            }
            Request::Publish { channel, data } => {
                let payload = Payload::Json(data.as_bytes());
                match self
                    .registry
                    .publish(&channel, Some(&self.client_id), payload)
                    .await
                {
                    Ok(receipt) => {
                        protocol::published_frame(id, &channel, receipt.offset, receipt.subscribers)
                    }
                    Err(err) => protocol::error_frame(id, "unavailable", &err.to_string()),
                }
            }
            Request::Send { to, data } => {
                let payload = Payload::Json(data.as_bytes());
                match self.registry.send_to(&to, Some(&self.client_id), payload) {
                    0 => protocol::error_frame(
                        id,
                        "client_not_found",
                        "no connection has that client id",
                    ),
                    reached => protocol::sent_frame(id, &to, reached),
                }
            }
        };
        self.reply(reply);
    }

    /// Queues a frame for this connection itself. Replies count against the queue like any
    /// frame, so a client that floods requests without reading is dropped as a slow consumer.
    fn reply(&self, frame: Bytes) {
        if self.outbox.push(frame, self.registry.queue_capacity()) == Push::Overflowed {
            tracing::warn!(client_id = %self.client_id, "dropping slow consumer: its queue is full");
        }
    }

    /// Sends the close frame (after the queued frames, for a graceful shutdown), closes the
    /// write side, and waits briefly for the client to close its side. A slow consumer's queued
    /// frames are dropped, and its close frame waits at most [`CLOSE_WRITE_TIMEOUT`] for room:
    /// this costs only the connection's own task, never anyone else.
    async fn finish(mut self, mut stream: TcpStream, ending: Ending, guard: Registered<'_>) {
        let Ending::Close {
            code,
            reason,
            flush,
        } = ending
        else {
            return;
        };
        if flush {
            let mut more = VecDeque::new();
            self.outbox.take_batch(&mut more);
            self.batch.extend(more);
        } else {
            // Keep only a partly written frame: it must be finished to keep the framing valid.
            let keep = usize::from(self.head_written > 0);
            self.batch.truncate(keep);
        }
        let close = match code {
            Some(code) => encode_close(code, &reason),
            None => encode_frame(OpCode::Close, &[]),
        };
        self.batch.push_back(close);
        let written = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
            loop {
                match write_batch(&stream, &mut self.batch, &mut self.head_written) {
                    Ok(true) => return true,
                    Ok(false) => {
                        if stream.writable().await.is_err() {
                            return false;
                        }
                    }
                    Err(_) => return false,
                }
            }
        })
        .await;
        if !matches!(written, Ok(true)) {
            return;
        }
        let _ = stream.shutdown().await;
        drop(guard);
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            let mut sink = [0u8; 512];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

/// Writes as much of `batch` as the socket takes now, in vectored writes. Returns `Ok(true)`
/// once all of it is written and `Ok(false)` when the socket would block.
fn write_batch(
    stream: &TcpStream,
    batch: &mut VecDeque<Bytes>,
    head_written: &mut usize,
) -> io::Result<bool> {
    while !batch.is_empty() {
        let mut slices = [IoSlice::new(&[]); MAX_IOV];
        let mut count = 0;
        for (slot, frame) in slices.iter_mut().zip(batch.iter()) {
            let bytes = if count == 0 {
                &frame[*head_written..]
            } else {
                &frame[..]
            };
            *slot = IoSlice::new(bytes);
            count += 1;
        }
        let mut written = match stream.try_write_vectored(&slices[..count]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => written,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(err) => return Err(err),
        };
        while written > 0 {
            let remaining = batch[0].len() - *head_written;
            if written >= remaining {
                written -= remaining;
                batch.pop_front();
                *head_written = 0;
            } else {
                *head_written += written;
                written = 0;
            }
        }
    }
    Ok(true)
}
