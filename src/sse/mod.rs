//! Server-Sent Events: `GET /sse` streams what a json WebSocket gets, as `text/event-stream`
//! events, to clients that only listen (a browser's `EventSource`, `curl -N`, networks that do
//! not pass WebSockets).
//!
//! # How a stream is carried
//!
//! A WebSocket belongs to its connection: after the upgrade, the shard writer writes published
//! frames straight from the connection's [`Outbox`] to its socket. An SSE stream is an ordinary
//! streaming HTTP response, whose socket hyper owns and writes. So the registry holds it with a
//! pulled outbox ([`Sink::Pulled`], next to [`Sink::Socket`]): the same bounded queue filled by
//! the same shard writers, but its owner is the response body, [`EventStream`], which hyper
//! polls when it can write more. The body takes the queued frames ([`Outbox::poll_take`]), and
//! the writer's flush after a push only wakes it. Hyper polls the body only while its own
//! bounded write buffer has room, so a client that stops reading leaves the frames in the
//! outbox, which overflows as a WebSocket's would: the stream is then cut off (the body fails,
//! or, while hyper waits for a full socket, the connection's [`Watch`] drops the connection),
//! counted and logged as a slow consumer, and the client comes back with its last event id.
//!
//! Each frame is the WebSocket text frame the registry built once for every subscriber; the
//! body takes its payload (the JSON envelope) as a slice of it and hands hyper `id: <id>\ndata:
//! `, the slice and `\n\n` as separate buffers of one [`Events`] chunk, so a batch of events
//! goes out in one vectored write and no envelope is copied or serialized again per
//! subscriber. (A JSON payload published with line breaks in it, which JSON allows between
//! tokens, is split over several `data:` lines; the client joins them with `\n` into the same
//! JSON value.) The housekeeping's ping frame becomes the heartbeat comment `: ping`; a pulled
//! stream is never closed as idle, since its client cannot send.
//!
//! # Ids and recovery
//!
//! Every event's id ([`event_id`]) holds the stream's position in each of its channels: the
//! body advances it as message envelopes pass (their channel and offset are read from the
//! envelope's fixed start, and a gap announcement moves it to where the channel goes on from).
//! A stream opened with a last event id recovers each channel exactly as a WebSocket's
//! `since=`: [`Registry::join`], then [`Broker::catch_up`] from the position (which reads the
//! channel's history in Redis in cluster mode), and the rest of the replay queued as the client
//! reads (the body tops it up, at most half the queue at a time, each time hyper takes frames;
//! a step that waits for Redis is polled along with the outbox), so a replay larger than the
//! queue streams instead of overflowing it. The welcome event says per channel whether it was
//! recovered.
//!
//! Not done here: one owner per socket for every transport. A WebSocket's socket is written by
//! whichever of the shard writer and its task flushes; a stream's by hyper's connection task,
//! whose state (hyper's buffers) makes an idle stream cost more memory than an idle WebSocket.

pub mod event_id;
mod watch;

pub use watch::Watch;

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body, Frame};

use crate::broker::Broker;
use crate::metrics::ClosedBy;
use crate::protocol;
use crate::registry::{
    CatchUp, CloseReason, ConnId, Cursor, Epoch, Outbox, Position, Recovery, Registry, Taken,
};
use crate::ws::frame::{OpCode, server_frame_payload};
use event_id::{ChannelsTag, EventId};

#[cfg(doc)]
use crate::registry::Sink;

/// Frames taken from the outbox per chunk: three buffers each, so one chunk stays within the
/// 64 buffers hyper hands one vectored write.
const MAX_BATCH: usize = 16;
/// The heartbeat, a comment line every client ignores.
const HEARTBEAT: Bytes = Bytes::from_static(b": ping\n\n");
/// The end of an event.
const END: Bytes = Bytes::from_static(b"\n\n");
/// Between the lines of an envelope published with line breaks in its payload.
const NEXT_DATA_LINE: Bytes = Bytes::from_static(b"\ndata: ");

/// Why a stream was cut off rather than ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// Its queue overflowed: the client reads slower than its events come. Failing the body
    /// makes hyper drop the connection at once, instead of waiting for the client to read what
    /// is still buffered.
    #[error("slow consumer: the stream's queue overflowed")]
    SlowConsumer,
}

/// The body of one `/sse` response: takes the stream's frames from its outbox as hyper polls
/// for more, and turns them into events. Unregisters the stream when hyper drops it.
#[derive(Debug)]
pub struct EventStream {
    broker: Broker,
    registry: Registry,
    conn: ConnId,
    outbox: Arc<Outbox>,
    /// The stream's channels, in the order of `channels=`.
    channels: Box<[Arc<str>]>,
    /// Where the stream stands in each channel: the id of the next event.
    id: EventId,
    /// Replays still to finish: the index of the channel and the position reached.
    replays: VecDeque<(usize, Position)>,
    /// The step of the first replay under way, while it waits for Redis.
    step: Option<Step>,
    phase: Phase,
}

/// One step of a replay, as a future of its own so the body can poll it next to the outbox.
struct Step(Pin<Box<dyn Future<Output = CatchUp> + Send>>);

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Step")
    }
}

/// How far a stream has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Events flow.
    Open,
    /// The stream ends for this reason once what was queued before is delivered.
    Draining(ClosedBy),
    /// The stream has ended (or was cut off); it is unregistered.
    Done,
}

/// What a stream asks for when it opens.
#[derive(Debug)]
pub struct Opening {
    /// The client id (direct sends to it reach the stream).
    pub client_id: Arc<str>,
    /// Channels to subscribe to, valid names within `--max-subscriptions`, in order.
    pub channels: Vec<String>,
    /// The positions to recover each channel from (one per channel, in order), from the last
    /// event id the client gave.
    pub since: Option<Vec<Position>>,
    /// When the client's token expires; the stream ends then.
    pub expires_in: Option<Duration>,
}

impl EventStream {
    /// Registers a stream, subscribes it to its channels (recovering each from its position
    /// when one is given) and queues its welcome in front of whatever those queued. `watch`
    /// is the HTTP connection's, which drops the connection if the stream is cut off while
    /// hyper waits for the socket.
    pub async fn open(broker: &Broker, opening: Opening, watch: &Watch) -> Self {
        let registry = broker.registry();
        let registration = registry.register_pulled(Arc::clone(&opening.client_id), true);
        let conn = registration.id;
        let outbox = registration.outbox;
        watch.set(&outbox);
        if let Some(expires_in) = opening.expires_in {
            registry.set_expiry(conn, expires_in);
        }
        let capacity = registry.queue_capacity();
        let mut positions = Vec::with_capacity(opening.channels.len());
        let mut standings = Vec::with_capacity(opening.channels.len());
        let mut replays = VecDeque::new();
        for (index, channel) in opening.channels.iter().enumerate() {
            let since = opening
                .since
                .as_ref()
                .and_then(|since| since.get(index).copied());
            // Nothing of the stream's own goes in front of a replay: its welcome, queued first,
            // says where each channel stands.
            let outcome = match registry.join(conn, channel) {
                Ok(_) => {
                    let room = replay_room(&outbox, capacity);
                    broker
                        .catch_up(conn, channel, Cursor::Start(since), room, |_| None)
                        .await
                }
                // Refused only to a connection already gone (the channels were checked).
                Err(_) => CatchUp::Gone,
            };
            let standing = match outcome {
                CatchUp::Live(standing) => standing,
                CatchUp::Replaying { standing, cursor } => {
                    replays.push_back((index, cursor));
                    standing
                }
                CatchUp::Interrupted | CatchUp::Gone => registry.standing(channel, since),
            };
            positions.push(match (standing.recovery, since) {
                (Recovery::Recovered, Some(since)) => since,
                _ => Position {
                    epoch: standing.epoch,
                    offset: standing.offset,
                },
            });
            standings.push((channel.as_str(), standing));
        }
        outbox.release(Some(protocol::welcome_frame(
            &opening.client_id,
            &standings,
        )));
        registry.task_started();
        Self {
            broker: broker.clone(),
            registry: registry.clone(),
            conn,
            outbox,
            id: EventId {
                tag: ChannelsTag::of(&opening.channels),
                positions,
            },
            channels: opening.channels.into_iter().map(Arc::from).collect(),
            replays,
            step: None,
            phase: Phase::Open,
        }
    }

    /// Queues the next part of the replay under way while the queue has room for it. A step
    /// that waits for Redis is left pending, to be polled again when `cx` is woken.
    fn continue_replays(&mut self, cx: &mut Context<'_>) {
        let capacity = self.registry.queue_capacity();
        while let Some(&(index, cursor)) = self.replays.front() {
            let step = match &mut self.step {
                Some(step) => step,
                None => {
                    let room = replay_room(&self.outbox, capacity);
                    if room == 0 {
                        return;
                    }
                    let broker = self.broker.clone();
                    let channel = Arc::clone(&self.channels[index]);
                    let conn = self.conn;
                    self.step.insert(Step(Box::pin(async move {
                        broker
                            .catch_up(conn, &channel, Cursor::Resume(cursor), room, |_| None)
                            .await
                    })))
                }
            };
            let Poll::Ready(outcome) = step.0.as_mut().poll(cx) else {
                return;
            };
            self.step = None;
            match outcome {
                CatchUp::Live(_) => {
                    self.replays.pop_front();
                }
                CatchUp::Replaying { cursor, .. } => self.replays[0].1 = cursor,
                // The messages still to replay left the history: the client comes back with
                // the position it has, and learns that from the welcome.
                CatchUp::Interrupted => {
                    self.outbox.close(CloseReason::RecoveryFailed);
                    return;
                }
                CatchUp::Gone => return,
            }
        }
    }

    /// Turns frames taken from the outbox into one chunk of events. The `id: <id>\ndata: `
    /// lines of the chunk share one buffer, freed once hyper has written the chunk; an event
    /// that leaves the id as it was (a direct send, a broadcast) shares its predecessor's.
    fn events(&mut self, frames: Vec<Bytes>) -> Events {
        let mut events = Events::with_capacity(frames.len() * 3);
        let mut ids = BytesMut::new();
        let mut prefix = Bytes::new();
        let count = frames.len();
        for (at, frame) in frames.into_iter().enumerate() {
            match server_frame_payload(&frame) {
                Some((OpCode::Ping, _)) => events.push(HEARTBEAT),
                Some((OpCode::Text, json)) => {
                    let moved = match protocol::message_position(&json) {
                        Some((channel, offset)) => self.advance(channel, None, offset),
                        None => protocol::gap_position(&json).is_some_and(|(channel, position)| {
                            self.advance(channel, Some(position.epoch), position.offset)
                        }),
                    };
                    if moved {
                        prefix = Bytes::new();
                    }
                    if prefix.is_empty() {
                        prefix = self.write_prefix(&mut ids, count - at);
                    }
                    events.push(prefix.clone());
                    events.push_data(json);
                    events.push(END);
                }
                // A json stream's outbox holds text frames and pings only: nothing writes
                // close frames for a pulled stream, and raw frames are not for json clients.
                _ => {}
            }
        }
        events
    }

    /// Moves the stream's position in `channel` to `offset` (of a new epoch, after a gap);
    /// returns whether the stream has that channel.
    fn advance(&mut self, channel: &str, epoch: Option<Epoch>, offset: u64) -> bool {
        let Some(index) = self.channels.iter().position(|c| &**c == channel) else {
            return false;
        };
        let position = &mut self.id.positions[index];
        position.offset = offset;
        if let Some(epoch) = epoch {
            position.epoch = epoch;
        }
        true
    }

    /// `id: <id>\ndata: ` for the current id, written into the chunk's buffer of ids, with
    /// room made for the `frames_left` events of the chunk still to come.
    fn write_prefix(&self, ids: &mut BytesMut, frames_left: usize) -> Bytes {
        const ID: &[u8] = b"id: ";
        const DATA: &[u8] = b"\ndata: ";
        // Offsets may gain a digit within a chunk: a little slack for each.
        let len = ID.len() + self.id.text_len() + 2 * self.id.positions.len() + DATA.len();
        if ids.capacity() - ids.len() < len {
            ids.reserve(len * frames_left);
        }
        ids.extend_from_slice(ID);
        self.id.write_to(ids);
        ids.extend_from_slice(DATA);
        ids.split().freeze()
    }

    /// Ends the stream: counts why, and unregisters it.
    fn finish(&mut self, by: ClosedBy) {
        self.phase = Phase::Done;
        self.registry.metrics().record_close(by);
        self.registry.unregister(self.conn);
    }
}

/// How many replayed frames may be queued now: up to half the queue (at least one frame), so
/// that live messages of the other channels have room next to a replay.
fn replay_room(outbox: &Outbox, capacity: usize) -> usize {
    (capacity / 2).max(1).saturating_sub(outbox.depth())
}

/// How a close asked of the outbox is counted.
fn closed_by(reason: CloseReason) -> ClosedBy {
    match reason {
        CloseReason::SlowConsumer => ClosedBy::SlowConsumer,
        CloseReason::GoingAway => ClosedBy::Shutdown,
        CloseReason::IdleTimeout => ClosedBy::IdleTimeout,
        CloseReason::TokenExpired => ClosedBy::TokenExpired,
        CloseReason::RecoveryFailed => ClosedBy::RecoveryFailed,
        CloseReason::WriteFailed | CloseReason::Closing => ClosedBy::PeerGone,
    }
}

impl Body for EventStream {
    type Data = Events;
    type Error = StreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Events>, StreamError>>> {
        let this = self.get_mut();
        loop {
            let mut frames = Vec::new();
            match this.phase {
                Phase::Done => return Poll::Ready(None),
                Phase::Draining(by) => {
                    if this.outbox.take(&mut frames, MAX_BATCH) == 0 {
                        this.finish(by);
                        return Poll::Ready(None);
                    }
                }
                Phase::Open => {
                    this.continue_replays(cx);
                    match ready!(this.outbox.poll_take(cx, &mut frames, MAX_BATCH)) {
                        Taken::Frames => {}
                        Taken::Close(CloseReason::SlowConsumer) => {
                            this.finish(ClosedBy::SlowConsumer);
                            return Poll::Ready(Some(Err(StreamError::SlowConsumer)));
                        }
                        Taken::Close(reason) => {
                            this.phase = Phase::Draining(closed_by(reason));
                            continue;
                        }
                    }
                }
            }
            let events = this.events(frames);
            if events.has_remaining() {
                return Poll::Ready(Some(Ok(Frame::data(events))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.phase == Phase::Done
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if self.phase != Phase::Done {
            // Hyper dropped the body before it ended: the client went away, or the connection
            // was dropped because the stream was cut off while hyper waited for the socket.
            let by = match self.outbox.close_reason() {
                Some(CloseReason::SlowConsumer) => ClosedBy::SlowConsumer,
                _ => ClosedBy::PeerGone,
            };
            self.finish(by);
        }
        self.registry.task_done();
    }
}

/// One chunk of a stream: a few events, as the buffers they are made of (shared slices of the
/// frames, the id lines, and constants), written with one vectored write.
#[derive(Debug)]
pub struct Events {
    /// The buffers, none empty; those before `next` are written.
    parts: Vec<Bytes>,
    next: usize,
    remaining: usize,
}

impl Events {
    fn with_capacity(parts: usize) -> Self {
        Self {
            parts: Vec::with_capacity(parts),
            next: 0,
            remaining: 0,
        }
    }

    fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.remaining += part.len();
            self.parts.push(part);
        }
    }

    /// Adds an envelope after its `data: `, one `data:` line per line of it: a JSON payload
    /// may hold line breaks between its tokens, which would otherwise end the field.
    fn push_data(&mut self, mut json: Bytes) {
        while let Some(at) = memchr::memchr2(b'\n', b'\r', &json) {
            let breaks = json[at..]
                .iter()
                .take_while(|&&byte| byte == b'\n' || byte == b'\r')
                .count();
            self.push(json.slice(..at));
            self.push(NEXT_DATA_LINE);
            json.advance(at + breaks);
        }
        self.push(json);
    }
}

impl Buf for Events {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.parts.get(self.next).map_or(&[], |part| &part[..])
    }

    fn advance(&mut self, mut count: usize) {
        assert!(
            count <= self.remaining,
            "advanced past the end of the events"
        );
        self.remaining -= count;
        while count > 0 {
            let part = &mut self.parts[self.next];
            let step = count.min(part.len());
            part.advance(step);
            count -= step;
            if part.is_empty() {
                self.next += 1;
            }
        }
    }

    fn chunks_vectored<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let mut filled = 0;
        for (slot, part) in slices.iter_mut().zip(&self.parts[self.next..]) {
            *slot = IoSlice::new(part);
            filled += 1;
        }
        filled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(events: &mut Events) -> String {
        let bytes = events.copy_to_bytes(events.remaining());
        String::from_utf8(bytes.to_vec()).expect("events are UTF-8")
    }

    #[test]
    fn line_breaks_in_an_envelope_become_data_lines() {
        let mut events = Events::with_capacity(4);
        events.push(Bytes::from_static(b"id: x\ndata: "));
        events.push_data(Bytes::from_static(b"{\"a\":\r\n [1,\n\n2]\r}"));
        events.push(END);
        assert_eq!(
            text(&mut events),
            "id: x\ndata: {\"a\":\ndata:  [1,\ndata: 2]\ndata: }\n\n"
        );
    }

    #[test]
    fn events_are_written_as_vectored_slices_and_advance_across_them() {
        let mut events = Events::with_capacity(3);
        for part in ["ab", "", "cde", "f"] {
            events.push(Bytes::from(part));
        }
        assert_eq!(events.remaining(), 6);
        let mut slices = [IoSlice::new(&[]); 8];
        assert_eq!(events.chunks_vectored(&mut slices), 3, "no empty buffer");
        events.advance(3);
        assert_eq!(events.chunk(), b"de");
        let mut one = [IoSlice::new(&[]); 1];
        assert_eq!(events.chunks_vectored(&mut one), 1);
        assert_eq!(&*one[0], b"de");
        assert_eq!(text(&mut events), "def");
        assert_eq!(events.chunk(), b"");
    }
}
