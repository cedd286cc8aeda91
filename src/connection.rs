//! One WebSocket connection after the upgrade: our own read loop, replies, and closing.
//!
//! The task reads only when the socket is readable, into a buffer it allocates then and frees
//! as soon as no partial frame is left, so an idle connection holds no read buffer. Published
//! frames never pass through this task: the shard writer writes them straight from the
//! connection's [`Outbox`] to the socket. The task writes its own replies the same way, and
//! takes over the writing only when the socket is full, waiting for it to drain.

use std::borrow::Cow;
use std::future::poll_fn;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::auth::{AuthError, ClientAuth};
use crate::broker::{Broker, BrokerError};
use crate::metrics::ClosedBy;
use crate::protocol::{self, Payload, Request};
use crate::rate::{RateLimit, Verdict};
use crate::registry::{
    CatchUp, CloseReason, ConnId, Cursor, Flushed, Format, Outbox, Position, Push, Recovery,
    RecoveryFailure, Signal, Standing, SubscribeError,
};
use crate::ws::close::CloseCode;
use crate::ws::frame::{Decoder, Message, OpCode, encode_close, encode_frame};

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 8 * 1024;
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
    /// Channels to subscribe to at once (valid names, within `--max-subscriptions`, granted
    /// by the token when there is one).
    pub channels: Vec<String>,
    /// Positions to recover from, for some of `channels` (`?since=`).
    pub since: Vec<(String, Position)>,
    /// The verified token's grant, when JWT auth is on; `None` for an anonymous client.
    pub auth: Option<Box<ClientAuth>>,
}

/// Registers an upgraded connection and spawns the task that serves it until it closes.
/// `leftover` holds bytes the HTTP layer read past the upgrade request; `permit` is the
/// connection's slot under `--max-connections`, released when the task ends.
pub fn spawn(
    stream: TcpStream,
    leftover: &[u8],
    broker: &Broker,
    max_message_bytes: usize,
    session: Session,
    permit: Option<OwnedSemaphorePermit>,
) {
    let registry = broker.registry();
    let stream = Arc::new(stream);
    // Held while the connection subscribes, so that the welcome, which says where each
    // channel stands, goes out before any message of those channels.
    let registration = registry.register(
        Arc::clone(&session.client_id),
        session.format,
        Some(Arc::clone(&stream)),
        session.format == Format::Json,
    );
    let id = registration.id;
    if let Some(auth) = &session.auth {
        registry.set_expiry(id, auth.grant.expires_in());
    }
    let mut channels = Vec::with_capacity(session.channels.len());
    for channel in session.channels {
        if let Err(err) = registry.join(id, &channel) {
            tracing::debug!(%err, channel, "initial subscription refused");
            continue;
        }
        let since = session
            .since
            .iter()
            .find(|(name, _)| *name == channel)
            .map(|(_, position)| *position);
        channels.push((Arc::from(channel), since));
    }
    registry.task_started();
    let conn = Connection {
        stream,
        broker: broker.clone(),
        id: registration.id,
        outbox: registration.outbox,
        format: session.format,
        decoder: Decoder::new(max_message_bytes),
        read_buf: (!leftover.is_empty()).then(|| BytesMut::from(leftover)),
        rate: RateLimit::new(registry.client_publish_rate(), registry.now_ms()),
        input_paused: false,
        auth: session.auth,
        start: (session.format != Format::Echo).then(|| Box::new(channels)),
        _permit: permit,
    };
    tokio::spawn(conn.run());
}

/// The channels a connection asked for in its URL, each with the position to recover from.
type Start = Vec<(Arc<str>, Option<Position>)>;

/// How many replayed frames may be queued now: up to half the queue (at least one frame, so
/// that a replay goes on whatever `--queue-capacity` is), so that live messages of the
/// connection's other channels and its replies have room next to a replay.
fn replay_room(outbox: &Outbox, capacity: usize) -> usize {
    (capacity / 2).max(1).saturating_sub(outbox.depth())
}

/// What woke a waiting connection.
enum Wake {
    Readable,
    Writable,
    BlockedChanged,
    Close(CloseReason),
}

/// How a connection ends.
#[derive(Debug)]
enum Ending {
    /// The peer is gone (EOF or a socket error): nothing more can be sent.
    Gone,
    /// Send a close frame, then close.
    Close {
        /// Why, for the metrics.
        by: ClosedBy,
        /// The close frame's payload; `None` for an empty close frame.
        code: Option<CloseCode>,
        reason: Cow<'static, str>,
        /// Deliver the frames still queued first. True for every close except a slow
        /// consumer's (whose queue is the problem): replies and echoes to messages the client
        /// sent before a protocol error or its close frame are still its due.
        flush: bool,
    },
}

impl Ending {
    fn protocol(code: CloseCode, reason: impl Into<Cow<'static, str>>) -> Self {
        Ending::Close {
            by: ClosedBy::ProtocolError,
            code: Some(code),
            reason: reason.into(),
            flush: true,
        }
    }

    fn server(reason: CloseReason) -> Self {
        let by = match reason {
            CloseReason::SlowConsumer => ClosedBy::SlowConsumer,
            CloseReason::IdleTimeout => ClosedBy::IdleTimeout,
            CloseReason::TokenExpired => ClosedBy::TokenExpired,
            CloseReason::RecoveryFailed => ClosedBy::RecoveryFailed,
            CloseReason::GoingAway => ClosedBy::Shutdown,
            CloseReason::WriteFailed | CloseReason::Closing => return Ending::Gone,
        };
        Ending::Close {
            by,
            code: Some(CloseCode(reason.code())),
            reason: Cow::Borrowed(reason.as_str()),
            flush: reason != CloseReason::SlowConsumer,
        }
    }
}

/// Everything one connection keeps, in the one struct its task owns. Kept small on purpose:
/// every idle connection pays for each field.
struct Connection {
    /// Shared with the outbox, which writes to it (from the shard writer, or from here).
    stream: Arc<TcpStream>,
    /// Where the client's publishes and sends go, and the registry it is in.
    broker: Broker,
    id: ConnId,
    outbox: Arc<Outbox>,
    format: Format,
    decoder: Decoder,
    /// Bytes read and not yet decoded; `None` whenever no partial frame is pending.
    read_buf: Option<BytesMut>,
    /// The client's publish rate limit.
    rate: RateLimit,
    /// Decoding stopped because replies filled half the queue and the socket is full: neither
    /// decode nor read until it drains.
    input_paused: bool,
    /// What the client's token grants; `None` for an anonymous client.
    auth: Option<Box<ClientAuth>>,
    /// The channels of the connect URL, until the connection has caught up on them and sent
    /// its welcome; boxed, since an idle connection has none.
    start: Option<Box<Start>>,
    _permit: Option<OwnedSemaphorePermit>,
}

/// Unregisters the connection however its task ends (a repeated unregister is a no-op).
impl Drop for Connection {
    fn drop(&mut self) {
        self.broker.registry().unregister(self.id);
        self.broker.registry().task_done();
    }
}

/// What [`Connection::process_input`] stopped at.
enum Input {
    /// Everything buffered is handled.
    Done,
    /// A request that needs an `.await` (its text frame's payload).
    Request(Bytes),
    /// The connection must end.
    End(Ending),
}

impl Connection {
    async fn run(mut self) {
        let ending = self.serve().await;
        let by = match ending {
            Ending::Gone => ClosedBy::PeerGone,
            Ending::Close { by, .. } => by,
        };
        self.broker.registry().metrics().record_close(by);
        // Boxed: the closing sequence (timers, a drain buffer) would otherwise be part of the
        // state of every idle connection's future.
        Box::pin(self.finish(ending)).await;
    }

    async fn serve(&mut self) -> Ending {
        if let Some(start) = self.start.take() {
            if let Some(ending) = Box::pin(self.start(*start)).await {
                return ending;
            }
        }
        if let Some(ending) = self.drain_input().await {
            return ending;
        }
        loop {
            // Checked on every turn, so a client that keeps the socket readable cannot hold
            // off a close the server asked for.
            if let Some(reason) = self.outbox.close_reason() {
                return Ending::server(reason);
            }
            // Writes this connection's own replies; publishes are written by the shard writer.
            let blocked = match self.outbox.flush(self.broker.registry().metrics()) {
                Flushed::Done => false,
                Flushed::Blocked => true,
                Flushed::Failed => return Ending::Gone,
            };
            if self.input_paused && !blocked {
                self.input_paused = false;
                if let Some(ending) = self.drain_input().await {
                    return ending;
                }
                continue;
            }
            match poll_fn(|cx| self.poll_wake(cx, blocked)).await {
                Wake::Readable => {
                    if let Some(ending) = self.read() {
                        return ending;
                    }
                    if let Some(ending) = self.drain_input().await {
                        return ending;
                    }
                }
                Wake::Writable => self.outbox.unblock(),
                Wake::BlockedChanged => {}
                Wake::Close(reason) => return Ending::server(reason),
            }
        }
    }

    /// Handles every complete message buffered, awaiting the requests that need it.
    async fn drain_input(&mut self) -> Option<Ending> {
        loop {
            match self.process_input() {
                Input::Done => return None,
                Input::End(ending) => return Some(ending),
                // Boxed: a publish's state is needed only while it runs, not in every idle
                // connection's future.
                Input::Request(payload) => {
                    if let Some(ending) = Box::pin(self.handle_request(payload)).await {
                        return Some(ending);
                    }
                }
            }
        }
    }

    /// Waits until the socket is readable, writable again (when `blocked`), the socket fills up
    /// (a flush from the shard writer hit a full socket), or a close is asked for. Uses the
    /// socket's own readiness slots (`poll_read_ready`), which keeps this future tiny and
    /// replaces the waker the HTTP task left there during the upgrade (which would otherwise
    /// keep that finished task's memory alive for the connection's life).
    fn poll_wake(&self, cx: &mut Context<'_>, blocked: bool) -> Poll<Wake> {
        if !self.input_paused && self.stream.poll_read_ready(cx).is_ready() {
            return Poll::Ready(Wake::Readable);
        }
        if blocked && self.stream.poll_write_ready(cx).is_ready() {
            return Poll::Ready(Wake::Writable);
        }
        match self.outbox.poll_signal(cx, blocked) {
            Poll::Ready(Signal::BlockedChanged) => Poll::Ready(Wake::BlockedChanged),
            Poll::Ready(Signal::Close(reason)) => Poll::Ready(Wake::Close(reason)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Reads what the socket has into the read buffer.
    fn read(&mut self) -> Option<Ending> {
        let buf = self
            .read_buf
            .get_or_insert_with(|| BytesMut::with_capacity(READ_CHUNK));
        buf.reserve(READ_CHUNK);
        match self.stream.try_read_buf(buf) {
            Ok(0) => Some(Ending::Gone),
            Ok(read) => {
                self.broker
                    .registry()
                    .metrics()
                    .bytes_received
                    .inc_by(read as u64);
                self.outbox.touch(self.broker.registry().now_ms());
                None
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => None,
            Err(_) => Some(Ending::Gone),
        }
    }

    /// Decodes and handles buffered messages until one needs an `.await` or none is left; then
    /// frees the read buffer if nothing is left in it.
    fn process_input(&mut self) -> Input {
        while let Some(buf) = self.read_buf.as_mut() {
            let message = match self.decoder.decode(buf) {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(err) => return Input::End(Ending::protocol(err.close_code(), err.to_string())),
            };
            match self.handle(message) {
                Input::Done => {}
                other => return other,
            }
            // Backpressure: replies (pongs, echoes, acks) may not pile up faster than the
            // client reads them. At half the queue, write; if the socket is full, stop decoding
            // and stop reading until it drains, instead of dropping a client that does read.
            if self.outbox.depth() * 2 >= self.broker.registry().queue_capacity()
                && self.outbox.flush(self.broker.registry().metrics()) == Flushed::Blocked
            {
                self.input_paused = true;
                return Input::Done;
            }
        }
        if self.read_buf.as_ref().is_some_and(BytesMut::is_empty) {
            self.read_buf = None;
        }
        Input::Done
    }

    fn handle(&mut self, message: Message) -> Input {
        match message {
            Message::Ping(payload) => self.reply(encode_frame(OpCode::Pong, &payload)),
            Message::Pong(_) => {}
            Message::Close(frame) => {
                return Input::End(Ending::Close {
                    by: ClosedBy::ClientClose,
                    code: frame.map(|frame| frame.code),
                    reason: Cow::Borrowed(""),
                    flush: true,
                });
            }
            Message::Text(payload) if self.format == Format::Echo => {
                self.reply(encode_frame(OpCode::Text, &payload));
            }
            Message::Binary(payload) if self.format == Format::Echo => {
                self.reply(encode_frame(OpCode::Binary, &payload));
            }
            Message::Text(_) | Message::Binary(_) if self.format == Format::Raw => {
                return Input::End(Ending::protocol(
                    CloseCode::UNSUPPORTED_DATA,
                    "raw connections are receive-only",
                ));
            }
            Message::Binary(_) => self.reply(protocol::error_frame(
                None,
                "binary_not_supported",
                "json connections take text frames only",
            )),
            Message::Text(payload) => return Input::Request(payload),
        }
        Input::Done
    }

    /// Carries out one request from a json client and queues the reply. Returns how the
    /// connection ends when the client keeps publishing over its rate limit.
    async fn handle_request(&mut self, payload: Bytes) -> Option<Ending> {
        let Ok(text) = std::str::from_utf8(&payload) else {
            // The decoder validated it; nothing to do if that ever changed.
            return None;
        };
        let parsed = protocol::parse_request(text);
        let id = parsed.id;
        let request = match parsed.request {
            Ok(request) => request,
            Err(err) => {
                self.reply(protocol::error_frame(id, err.code(), &err.to_string()));
                return None;
            }
        };
        if matches!(
            request,
            Request::Publish { .. } | Request::Send { .. } | Request::Refresh { .. }
        ) {
            let rate = self.broker.registry().client_publish_rate();
            match self.rate.check(rate, self.broker.registry().now_ms()) {
                Verdict::Allowed => {}
                Verdict::Refused => {
                    let message = format!("over {rate} publishes per second");
                    self.reply(protocol::error_frame(id, "rate_limited", &message));
                    return None;
                }
                Verdict::Exceeded => {
                    return Some(Ending::protocol(
                        CloseCode::POLICY_VIOLATION,
                        "rate limit exceeded",
                    ));
                }
            }
        }
        if let Some(denied) = self.denied(&request) {
            self.reply(protocol::error_frame(id, "forbidden", denied));
            return None;
        }
        let reply = match request {
            Request::Subscribe { channel, since } => {
                return self.subscribe(id, &channel, since).await;
            }
            Request::Unsubscribe { channel } => {
                if self.broker.registry().unsubscribe(self.id, &channel) {
                    protocol::unsubscribed_frame(id, &channel)
                } else {
                    protocol::error_frame(id, "not_subscribed", "not subscribed to that channel")
                }
            }
            Request::Publish { channel, data } => {
                let payload = Payload::Json(data.as_bytes());
                let from = self.broker.registry().client_id(self.id)?;
                match self.broker.publish(&channel, Some(&from), payload).await {
                    Ok(published) => protocol::published_frame(
                        id,
                        &channel,
                        published.offset,
                        published.reach.field("subscribers"),
                        published.reach.count(),
                    ),
                    Err(err) => broker_error_frame(id, &err),
                }
            }
            Request::Send { to, data } => {
                let payload = Payload::Json(data.as_bytes());
                let from = self.broker.registry().client_id(self.id)?;
                match self.broker.send_to(&to, Some(&from), payload).await {
                    Ok(reach) if reach.count() == 0 => protocol::error_frame(
                        id,
                        "client_not_found",
                        "no connection has that client id",
                    ),
                    Ok(reach) => {
                        protocol::sent_frame(id, &to, reach.field("connections"), reach.count())
                    }
                    Err(err) => broker_error_frame(id, &err),
                }
            }
            Request::Refresh { token } => self.refresh(id, &token),
        };
        self.reply(reply);
        None
    }

    /// Why the client's token does not allow `request`, if it does not.
    fn denied(&self, request: &Request<'_>) -> Option<&'static str> {
        let grant = &self.auth.as_ref()?.grant;
        match request {
            Request::Subscribe { channel, .. } => (!grant.subscribe.matches(channel))
                .then_some("the token does not grant subscribing to this channel"),
            Request::Publish { channel, .. } => (!grant.publish.matches(channel))
                .then_some("the token does not grant publishing to this channel"),
            Request::Send { to, .. } => (!grant.send.matches(to))
                .then_some("the token does not grant sending to this client id"),
            // Leaving is always allowed; a refresh is checked by the verifier.
            Request::Unsubscribe { .. } | Request::Refresh { .. } => None,
        }
    }

    /// Replaces the connection's grant with a fresh token's (same `sub`): moves its expiry, and
    /// drops the subscriptions the new token no longer grants (each with an `unsubscribed`
    /// frame). A refused token changes nothing; the old one still holds until it expires.
    fn refresh(&mut self, id: Option<&RawValue>, token: &str) -> Bytes {
        let Some(auth) = self.auth.as_mut() else {
            return protocol::error_frame(
                id,
                "auth_disabled",
                "this server has no JWT auth; there is no token to refresh",
            );
        };
        let grant = match auth.verifier.refresh(&auth.grant, token) {
            Ok(grant) => grant,
            Err(err) => return protocol::error_frame(id, err.code(), &err.to_string()),
        };
        if self.outbox.close_reason() == Some(CloseReason::TokenExpired) {
            // Too late: the expiry check got there first, and its close stands.
            let err = AuthError::Expired;
            return protocol::error_frame(id, err.code(), &err.to_string());
        }
        let expires_in = grant.expires_in();
        let revoked: Vec<_> = self
            .broker
            .registry()
            .subscriptions(self.id)
            .into_iter()
            .filter(|channel| !grant.subscribe.matches(channel))
            .collect();
        auth.grant = grant;
        self.broker.registry().set_expiry(self.id, expires_in);
        for channel in revoked {
            if self.broker.registry().unsubscribe(self.id, &channel) {
                self.reply(protocol::unsubscribed_frame(None, &channel));
            }
        }
        protocol::refreshed_frame(id, expires_in.as_secs())
    }

    /// Catches up on the channels of the connect URL (each from its position, if it has one),
    /// then sends the welcome, which says where each stands, before anything else queued
    /// meanwhile; then finishes the replays that did not fit the queue at once.
    async fn start(&mut self, channels: Start) -> Option<Ending> {
        let capacity = self.broker.registry().queue_capacity();
        let mut standings = Vec::with_capacity(channels.len());
        let mut replays = Vec::new();
        for (channel, since) in &channels {
            let room = replay_room(&self.outbox, capacity);
            let step = self
                .broker
                .catch_up(self.id, channel, Cursor::Start(*since), room, |_| None)
                .await;
            match step {
                CatchUp::Live(standing) => standings.push((&**channel, standing)),
                CatchUp::Replaying { standing, cursor } => {
                    standings.push((&**channel, standing));
                    replays.push((channel, cursor));
                }
                CatchUp::Interrupted | CatchUp::Gone => {}
            }
        }
        match self.format {
            Format::Json => {
                let client_id = self.broker.registry().client_id(self.id)?;
                self.outbox
                    .release(Some(protocol::welcome_frame(&client_id, &standings)));
            }
            // A raw client cannot be told in a frame that its position was not recovered: it
            // is closed, and learns why from the close frame.
            Format::Raw
                if standings
                    .iter()
                    .any(|(_, standing)| matches!(standing.recovery, Recovery::Failed(_))) =>
            {
                return Some(Ending::server(CloseReason::RecoveryFailed));
            }
            Format::Raw | Format::Echo => {}
        }
        for (channel, cursor) in replays {
            if let Some(ending) = self.replay(channel, cursor).await {
                return Some(ending);
            }
        }
        None
    }

    /// Subscribes to `channel`: the `subscribed` reply says where the channel stands and, with
    /// `since`, whether what the client missed is replayed; the replay (queued a part at a time,
    /// as the client reads) comes next, then live messages, each exactly once.
    async fn subscribe(
        &mut self,
        id: Option<&RawValue>,
        channel: &str,
        since: Option<Position>,
    ) -> Option<Ending> {
        let registry = self.broker.registry().clone();
        match registry.join(self.id, channel) {
            Ok(true) => {}
            Ok(false) => {
                let mut standing = registry.standing(channel, None);
                if since.is_some() {
                    standing.recovery = Recovery::Failed(RecoveryFailure::AlreadySubscribed);
                }
                self.reply(protocol::subscribed_frame(id, channel, &standing));
                return None;
            }
            Err(err @ SubscribeError::TooMany(_)) => {
                self.reply(protocol::error_frame(
                    id,
                    "too_many_subscriptions",
                    &err.to_string(),
                ));
                return None;
            }
            Err(SubscribeError::Gone) => return None,
        }
        // Cluster mode: `subscribed` means messages from every node reach it.
        self.broker.until_heard(channel).await;
        // The reply goes first and takes a place of its own.
        let room = replay_room(&self.outbox, registry.queue_capacity()).saturating_sub(1);
        let reply = |standing: &Standing| Some(protocol::subscribed_frame(id, channel, standing));
        let step = self
            .broker
            .catch_up(self.id, channel, Cursor::Start(since), room, reply)
            .await;
        match step {
            CatchUp::Live(_) | CatchUp::Gone => None,
            CatchUp::Replaying { cursor, .. } => Box::pin(self.replay(channel, cursor)).await,
            CatchUp::Interrupted => Some(Ending::server(CloseReason::RecoveryFailed)),
        }
    }

    /// Queues the rest of a replay after `cursor` as the client reads it, then attaches the
    /// subscription to live messages. Reading from the client pauses meanwhile.
    async fn replay(&mut self, channel: &str, mut cursor: Position) -> Option<Ending> {
        let registry = self.broker.registry().clone();
        let capacity = registry.queue_capacity();
        loop {
            if let Some(ending) = self.make_room(capacity).await {
                return Some(ending);
            }
            let room = replay_room(&self.outbox, capacity);
            let step = self
                .broker
                .catch_up(self.id, channel, Cursor::Resume(cursor), room, |_| None)
                .await;
            match step {
                CatchUp::Live(_) => return None,
                CatchUp::Replaying { cursor: next, .. } => cursor = next,
                CatchUp::Interrupted => return Some(Ending::server(CloseReason::RecoveryFailed)),
                CatchUp::Gone => return None,
            }
        }
    }

    /// Writes until at most half the queue is left, waiting for the socket when it is full.
    async fn make_room(&mut self, capacity: usize) -> Option<Ending> {
        loop {
            if let Some(reason) = self.outbox.close_reason() {
                return Some(Ending::server(reason));
            }
            if self.outbox.depth() * 2 < capacity.max(2) {
                return None;
            }
            match self.outbox.flush(self.broker.registry().metrics()) {
                Flushed::Failed => return Some(Ending::Gone),
                Flushed::Blocked => {
                    if self.stream.writable().await.is_err() {
                        return Some(Ending::Gone);
                    }
                    self.outbox.unblock();
                }
                // The shard writer is writing this connection's frames: let it finish.
                Flushed::Done => tokio::task::yield_now().await,
            }
        }
    }

    /// Queues a frame for this connection itself. Replies count against the queue like any
    /// frame, so a client that floods requests without reading is dropped as a slow consumer.
    fn reply(&self, frame: Bytes) {
        if self
            .outbox
            .push(frame, self.broker.registry().queue_capacity())
            == Push::Overflowed
        {
            self.broker.registry().slow_consumer_dropped(self.id);
        }
    }

    /// Sends the close frame (after the queued frames, for a graceful shutdown), closes the
    /// write side, and waits briefly for the client to close its side. A slow consumer's queued
    /// frames are dropped, and its close frame waits at most [`CLOSE_WRITE_TIMEOUT`] for room:
    /// this costs only the connection's own task, never anyone else.
    async fn finish(&mut self, ending: Ending) {
        let Ending::Close {
            code,
            reason,
            flush,
            ..
        } = ending
        else {
            return;
        };
        // Nothing more is queued for a closing connection (a server reason has done this
        // already), and a flush the shard writer may have under way finishes first: the close
        // frame must follow whole frames.
        self.outbox.close(CloseReason::Closing);
        while self.outbox.is_writing() {
            tokio::task::yield_now().await;
        }
        let close = match code {
            Some(code) => encode_close(code, &reason),
            None => encode_frame(OpCode::Close, &[]),
        };
        self.outbox.queue_close(close, flush);
        let metrics = self.broker.registry().metrics();
        let written = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
            loop {
                match self.outbox.flush_closing(metrics) {
                    Flushed::Done => return true,
                    Flushed::Failed => return false,
                    Flushed::Blocked => {
                        if self.stream.writable().await.is_err() {
                            return false;
                        }
                        self.outbox.unblock();
                    }
                }
            }
        })
        .await;
        if !matches!(written, Ok(true)) {
            return;
        }
        let _ = rustix::net::shutdown(&*self.stream, rustix::net::Shutdown::Write);
        // The close is sent: the connection is gone as far as everyone else is concerned.
        self.broker.registry().unregister(self.id);
        // Wait for the client's side of the close before dropping the socket: closing it with
        // the client's close frame unread would reset the connection, and a reset can destroy
        // our close frame before the client reads it. The task still counts for a graceful
        // shutdown meanwhile (`Registry::task_done`).
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            let mut sink = vec![0u8; 512];
            loop {
                match self.stream.try_read(&mut sink) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        if self.stream.readable().await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        })
        .await;
    }
}

/// The error frame for a publish or send the broker refused: `broker_unavailable` while Redis
/// is down (the connection stays open), `unavailable` when the server is shutting down.
fn broker_error_frame(id: Option<&RawValue>, err: &BrokerError) -> Bytes {
    let code = match err {
        BrokerError::Unavailable(_) => "broker_unavailable",
        BrokerError::ShuttingDown => "unavailable",
        BrokerError::NotRecovered { failure, .. } => failure.code(),
    };
    protocol::error_frame(id, code, &err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::registry::Registry;

    /// Every idle connection pays for its task's future: keep it small.
    #[tokio::test]
    async fn idle_connection_state_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let registry = Registry::new(&Config::default());
        let client = Arc::new(client);
        let registration = registry.register(
            Arc::from("a"),
            Format::Json,
            Some(Arc::clone(&client)),
            false,
        );
        registry.task_started();
        let conn = Connection {
            stream: client,
            broker: Broker::local(registry.clone(), &Config::default()),
            id: registration.id,
            outbox: registration.outbox,
            format: Format::Json,
            decoder: Decoder::new(1024),
            read_buf: None,
            rate: RateLimit::new(50, 0),
            input_paused: false,
            auth: None,
            start: None,
            _permit: None,
        };
        let future = conn.run();
        let size = std::mem::size_of_val(&future);
        assert!(size <= 512, "an idle connection's future is {size} bytes");
    }
}
