//! The bounded queue of frames waiting to be written to one connection, and the write path.
//!
//! A shard's writer pushes a publish's frame into the outbox of every subscriber on the shard,
//! then flushes each of those outboxes once, writing straight to the socket with one vectored,
//! non-blocking write of everything queued. A connection whose socket is full is left to its
//! own task, which waits for the socket to drain; the writer never waits. When a push finds the
//! queue full, the connection is marked for closing as a slow consumer, so nobody else waits
//! for it either.
//!
//! Where the frames go is the outbox's [`Sink`]: a WebSocket's socket, which a flush writes to;
//! or, for a stream whose bytes someone else writes (a Server-Sent Events response, which hyper
//! owns), the owner itself, which takes the frames with [`Outbox::poll_take`] and which a flush
//! only wakes. Either way the queue, its capacity and the slow-consumer rule are the same.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::net::TcpStream;

use crate::metrics::Metrics;

/// Frames handed to one `writev` call at most.
const MAX_IOV: usize = 64;

/// Why a connection is closing on the server's initiative (or has stopped taking frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The connection's queue overflowed: it reads slower than messages arrive.
    SlowConsumer,
    /// The server is shutting down.
    GoingAway,
    /// The client sent nothing, not even a pong, for the idle timeout.
    IdleTimeout,
    /// The client's token expired and no fresh one was sent (`refresh`).
    TokenExpired,
    /// A replay could not be completed: the messages the client still had to read left the
    /// history window, or a `format=raw` client's position in the connect URL could not be
    /// recovered.
    RecoveryFailed,
    /// Writing to the socket failed: the client is gone.
    WriteFailed,
    /// The connection's own task is closing it (client close, protocol error); set so that
    /// nothing more is queued meanwhile.
    Closing,
}

impl CloseReason {
    /// The WebSocket close code sent for this reason.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::SlowConsumer => 1008,
            CloseReason::TokenExpired => 4001,
            CloseReason::RecoveryFailed => 4002,
            CloseReason::GoingAway | CloseReason::IdleTimeout => 1001,
            CloseReason::WriteFailed | CloseReason::Closing => 1000,
        }
    }

    /// The close frame's reason text, also used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::GoingAway => "going away",
            CloseReason::IdleTimeout => "idle timeout",
            CloseReason::TokenExpired => "token expired",
            CloseReason::RecoveryFailed => "recovery failed",
            CloseReason::WriteFailed => "write failed",
            CloseReason::Closing => "closing",
        }
    }
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// The frame is queued. `first` says the queue was empty before, so whoever pushed should
    /// see that the outbox gets flushed.
    Queued {
        /// The queue was empty before this frame.
        first: bool,
    },
    /// The queue was full: the connection is now closing as a slow consumer and the frame was
    /// dropped. Returned once per connection, so the caller can count and log the drop.
    Overflowed,
    /// The connection is closing; the frame was dropped.
    Closing,
}

/// What [`Outbox::push_all`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushedAll {
    /// Frames queued.
    pub queued: u64,
    /// The queue was empty before them (and at least one was queued): whoever pushed should
    /// see that the outbox gets flushed.
    pub first: bool,
    /// The queue filled up: the connection is now closing as a slow consumer, and the frames
    /// from there on were dropped. True once per connection, so the caller can count and log
    /// the drop.
    pub overflowed: bool,
}

/// Where an outbox's frames go: the one owner of the connection's outgoing bytes.
#[derive(Debug)]
pub enum Sink {
    /// Nowhere: frames just queue until [`Outbox::clear`] (connections without a socket, as in
    /// benchmarks).
    Detached,
    /// A WebSocket: whoever flushes (the shard writer, or the connection's own task) writes the
    /// queued frames straight to this socket.
    Socket(Arc<TcpStream>),
    /// A stream whose owner writes the bytes itself (a Server-Sent Events response body, which
    /// hyper polls): it takes the frames with [`Outbox::poll_take`], and a flush only wakes it.
    /// Its client has no way to send anything, so it is never closed as idle.
    Pulled,
}

/// What [`Outbox::poll_take`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Queued frames were moved out.
    Frames,
    /// The connection must close; frames queued before the close are left in the queue, for
    /// [`Outbox::take`] when the close lets them be delivered.
    Close(CloseReason),
}

/// What the connection task is told when it waits on its outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The socket filled up (or drained) since the task last looked: it must now wait for the
    /// socket to be writable (or stop waiting).
    BlockedChanged,
    /// The connection must close.
    Close(CloseReason),
}

/// One connection's outgoing queue, shared (in an `Arc`) by the connection task and the
/// registry. Holds no heap memory while nothing is queued.
#[derive(Debug)]
pub struct Outbox {
    /// Locked for a push or to take or return frames, never across a write or an `.await`.
    state: Mutex<State>,
    /// When the client last sent anything, in milliseconds of the registry's clock; written by
    /// the connection task, read by the shard's housekeeping.
    last_active_ms: AtomicU64,
    /// Where the frames go.
    sink: Sink,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Bytes>,
    /// Bytes of `frames[0]` already written.
    head_written: usize,
    /// Frames taken by a flush in progress; they count toward the capacity.
    in_flight: usize,
    /// A flush is writing to the socket; nobody else may.
    writing: bool,
    /// The socket is full: only the connection task flushes, once it is writable again.
    blocked: bool,
    /// Nothing is written until [`Outbox::release`]: the connection is still putting its
    /// first frame together.
    held: bool,
    close: Option<CloseReason>,
    /// The connection task's waker (a pulled stream's owner's), when it is waiting.
    waker: Option<Waker>,
}

/// What [`Outbox::flush`] left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Nothing is left to write (or someone else is writing it).
    Done,
    /// The socket is full; the connection task has been told to wait for it.
    Blocked,
    /// Writing failed: the client is gone, and the connection is closing.
    Failed,
}

impl Outbox {
    /// An empty outbox sending to `sink`, for a client last active at `now_ms`; a `held` one
    /// hands out nothing until [`Outbox::release`].
    pub fn new(sink: Sink, now_ms: u64, held: bool) -> Self {
        Self {
            state: Mutex::new(State {
                held,
                ..State::default()
            }),
            last_active_ms: AtomicU64::new(now_ms),
            sink,
        }
    }

    /// Whether the frames are taken by the stream's owner ([`Sink::Pulled`]), whose client
    /// cannot send (and so is never idle-closed).
    pub fn is_pulled(&self) -> bool {
        matches!(self.sink, Sink::Pulled)
    }

    /// Queues `frame` unless that would put more than `capacity` frames in the queue. Does not
    /// write: call [`Outbox::flush`] after the pushes of a batch.
    pub fn push(&self, frame: Bytes, capacity: usize) -> Push {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return Push::Closing;
        }
        if state.frames.len() + state.in_flight >= capacity {
            state.close = Some(CloseReason::SlowConsumer);
            let waker = state.waker.take();
            drop(state);
            wake(waker);
            return Push::Overflowed;
        }
        let first = state.frames.is_empty();
        state.frames.push_back(frame);
        Push::Queued { first }
    }

    /// Queues each of `frames` in order, as [`Outbox::push`] would, under one lock: the shard
    /// writer pushes the frames of consecutive deliveries to one connection at once, so that
    /// a connection's outbox is touched once per round rather than once per delivery. Stops at
    /// an overflow, which closes the connection as a slow consumer.
    pub fn push_all<'a>(
        &self,
        frames: impl IntoIterator<Item = &'a Bytes>,
        capacity: usize,
    ) -> PushedAll {
        let mut state = self.state.lock();
        let mut pushed = PushedAll {
            queued: 0,
            first: state.frames.is_empty(),
            overflowed: false,
        };
        if state.close.is_some() {
            pushed.first = false;
            return pushed;
        }
        for frame in frames {
            if state.frames.len() + state.in_flight >= capacity {
                state.close = Some(CloseReason::SlowConsumer);
                let waker = state.waker.take();
                drop(state);
                wake(waker);
                pushed.first &= pushed.queued > 0;
                pushed.overflowed = true;
                return pushed;
            }
            state.frames.push_back(frame.clone());
            pushed.queued += 1;
        }
        pushed.first &= pushed.queued > 0;
        pushed
    }

    /// Writes what is queued, now, without blocking: one vectored write per `MAX_IOV` frames
    /// until the queue is empty or the socket is full. Frames pushed meanwhile (from another
    /// thread) are written in the same call. Does nothing while another flush is writing, while
    /// the socket is known to be full, or once the connection is closing.
    pub fn flush(&self, metrics: &Metrics) -> Flushed {
        self.flush_inner(metrics, false)
    }

    /// [`Outbox::flush`] for the connection's own task while it closes: writes even though a
    /// close was asked for (that is how the close frame goes out).
    pub fn flush_closing(&self, metrics: &Metrics) -> Flushed {
        self.flush_inner(metrics, true)
    }

    fn flush_inner(&self, metrics: &Metrics, closing: bool) -> Flushed {
        let socket = match &self.sink {
            Sink::Socket(socket) => socket,
            Sink::Detached => return Flushed::Done,
            Sink::Pulled => {
                self.wake_taker();
                return Flushed::Done;
            }
        };
        let (mut batch, mut head) = {
            let mut state = self.state.lock();
            // A closing connection writes its close frame even if it never got to release.
            if state.writing || ((state.held || state.close.is_some()) && !closing) {
                return Flushed::Done;
            }
            if state.blocked {
                return Flushed::Blocked;
            }
            if state.frames.is_empty() {
                return Flushed::Done;
            }
            state.writing = true;
            state.in_flight = state.frames.len();
            let head = std::mem::take(&mut state.head_written);
            (std::mem::take(&mut state.frames), head)
        };
        loop {
            metrics.queue_depth.observe(batch.len() as f64);
            let result = write_batch(socket, &mut batch, &mut head, metrics);
            let mut state = self.state.lock();
            match result {
                Ok(true) if !state.frames.is_empty() && (state.close.is_none() || closing) => {
                    // Pushed while we wrote: take those too, reusing the emptied buffer.
                    std::mem::swap(&mut state.frames, &mut batch);
                    state.in_flight = batch.len();
                    continue;
                }
                Ok(true) => {}
                Ok(false) => {
                    // Socket full: the unwritten frames go back in front of any new ones, and
                    // the connection task takes over once the socket drains.
                    batch.extend(state.frames.drain(..));
                    state.frames = batch;
                    state.head_written = head;
                    state.blocked = true;
                }
                Err(_) => {
                    state.close.get_or_insert(CloseReason::WriteFailed);
                }
            }
            state.writing = false;
            state.in_flight = 0;
            let outcome = match result {
                Err(_) => Flushed::Failed,
                Ok(_) if state.blocked => Flushed::Blocked,
                Ok(_) => Flushed::Done,
            };
            let waker = if outcome == Flushed::Done && state.close.is_none() {
                None
            } else {
                state.waker.take()
            };
            drop(state);
            wake(waker);
            return outcome;
        }
    }

    /// A pulled outbox's flush: wakes the owner if frames wait for it.
    fn wake_taker(&self) {
        let waker = {
            let mut state = self.state.lock();
            if state.held || state.frames.is_empty() {
                return;
            }
            state.waker.take()
        };
        wake(waker);
    }

    /// For the owner of a pulled stream ([`Sink::Pulled`]): moves up to `max` queued frames
    /// into `into` ([`Taken::Frames`]), or says that the connection must close; otherwise
    /// leaves the waker of `cx` for the next flush or close to wake. Frames taken no longer
    /// count toward the capacity: the owner hands them straight to its writer.
    pub fn poll_take(
        &self,
        cx: &mut Context<'_>,
        into: &mut Vec<Bytes>,
        max: usize,
    ) -> Poll<Taken> {
        let mut state = self.state.lock();
        if let Some(reason) = state.close {
            return Poll::Ready(Taken::Close(reason));
        }
        if !state.held && !state.frames.is_empty() {
            take_front(state, into, max);
            return Poll::Ready(Taken::Frames);
        }
        match &mut state.waker {
            Some(waker) => waker.clone_from(cx.waker()),
            slot @ None => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Moves up to `max` queued frames into `into` whatever the state, for a pulled stream
    /// that delivers what was queued before its close; returns how many.
    pub fn take(&self, into: &mut Vec<Bytes>, max: usize) -> usize {
        let before = into.len();
        take_front(self.state.lock(), into, max);
        into.len() - before
    }

    /// Ends the hold of a held outbox, putting `first` in front of everything queued
    /// meanwhile. The caller flushes next.
    pub fn release(&self, first: Option<Bytes>) {
        let mut state = self.state.lock();
        if let Some(first) = first {
            state.frames.push_front(first);
        }
        state.held = false;
    }

    /// Called by the connection task once the socket is writable again.
    pub fn unblock(&self) {
        self.state.lock().blocked = false;
    }

    /// Whether a flush is writing right now (from another thread).
    pub fn is_writing(&self) -> bool {
        self.state.lock().writing
    }

    /// Asks the connection to close for `reason`; the first reason given wins.
    /// Returns whether this call was the one that started the close.
    pub fn close(&self, reason: CloseReason) -> bool {
        let waker = {
            let mut state = self.state.lock();
            if state.close.is_some() {
                return false;
            }
            state.close = Some(reason);
            state.waker.take()
        };
        wake(waker);
        true
    }

    /// Why the connection is closing, once a close has been asked for.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.state.lock().close
    }

    /// Waits (as a poll function) for a close, or for the socket's blocked state to differ from
    /// `blocked_seen`.
    pub fn poll_signal(&self, cx: &mut Context<'_>, blocked_seen: bool) -> Poll<Signal> {
        let mut state = self.state.lock();
        if let Some(reason) = state.close {
            return Poll::Ready(Signal::Close(reason));
        }
        if state.blocked != blocked_seen {
            return Poll::Ready(Signal::BlockedChanged);
        }
        match &mut state.waker {
            Some(waker) => waker.clone_from(cx.waker()),
            slot @ None => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Prepares the queue for the close frame: keeps every queued frame (`keep_queued`) or only
    /// a partly written one (which must be finished to keep the framing valid), then appends
    /// `close_frame`, past any capacity. Call once no flush is writing.
    pub fn queue_close(&self, close_frame: Bytes, keep_queued: bool) {
        let mut state = self.state.lock();
        if !keep_queued {
            let keep = usize::from(state.head_written > 0);
            state.frames.truncate(keep);
        }
        state.frames.push_back(close_frame);
    }

    /// Drops every queued frame (for connections without a socket, such as in benchmarks).
    pub fn clear(&self) {
        self.state.lock().frames = VecDeque::new();
    }

    /// Records that the client just sent something.
    pub fn touch(&self, now_ms: u64) {
        self.last_active_ms.store(now_ms, Ordering::Relaxed);
    }

    /// When the client last sent something, in milliseconds of the registry's clock.
    pub fn last_active_ms(&self) -> u64 {
        self.last_active_ms.load(Ordering::Relaxed)
    }

    /// Frames queued plus frames being written: the connection's queue depth.
    pub fn depth(&self) -> usize {
        let state = self.state.lock();
        state.frames.len() + state.in_flight
    }
}

/// Moves up to `max` frames from the front of the queue into `into`. Taking them all leaves
/// the queue without its allocation, as an idle connection's should be.
fn take_front(mut state: parking_lot::MutexGuard<'_, State>, into: &mut Vec<Bytes>, max: usize) {
    if state.frames.len() <= max {
        let all = std::mem::take(&mut state.frames);
        drop(state);
        into.extend(all);
    } else {
        into.extend(state.frames.drain(..max));
    }
}

fn wake(waker: Option<Waker>) {
    if let Some(waker) = waker {
        waker.wake();
    }
}

/// Writes as much of `batch` as the socket takes now, in vectored writes. Returns `Ok(true)`
/// once all of it is written and `Ok(false)` when the socket would block.
fn write_batch(
    socket: &TcpStream,
    batch: &mut VecDeque<Bytes>,
    head_written: &mut usize,
    metrics: &Metrics,
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
        let mut written = match socket.try_write_vectored(&slices[..count]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => {
                metrics.bytes_sent.inc_by(written as u64);
                written
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_closes_once() {
        let outbox = Outbox::new(Sink::Detached, 0, false);
        assert_eq!(
            outbox.push(Bytes::from_static(b"a"), 2),
            Push::Queued { first: true }
        );
        assert_eq!(
            outbox.push(Bytes::from_static(b"b"), 2),
            Push::Queued { first: false }
        );
        assert_eq!(outbox.depth(), 2);
        assert_eq!(outbox.push(Bytes::from_static(b"c"), 2), Push::Overflowed);
        assert_eq!(outbox.push(Bytes::from_static(b"d"), 2), Push::Closing);
        assert!(!outbox.close(CloseReason::GoingAway), "first reason wins");
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(
            outbox.poll_signal(&mut cx, false),
            Poll::Ready(Signal::Close(CloseReason::SlowConsumer))
        );
    }

    #[test]
    fn push_all_queues_in_order_and_stops_at_an_overflow() {
        let outbox = Outbox::new(Sink::Detached, 0, false);
        let frames: Vec<Bytes> = [b"a", b"b", b"c", b"d"]
            .map(|s| Bytes::from_static(s))
            .to_vec();
        let none: [&Bytes; 0] = [];
        assert_eq!(
            outbox.push_all(none, 3),
            PushedAll {
                queued: 0,
                first: false,
                overflowed: false
            },
            "nothing pushed: nothing to flush"
        );
        assert_eq!(
            outbox.push_all(&frames[..2], 3),
            PushedAll {
                queued: 2,
                first: true,
                overflowed: false
            }
        );
        assert_eq!(
            outbox.push_all(&frames[2..], 3),
            PushedAll {
                queued: 1,
                first: false,
                overflowed: true
            },
            "c fits, d overflows"
        );
        let queued: Vec<_> = outbox.state.lock().frames.iter().cloned().collect();
        assert_eq!(queued, frames[..3]);
        assert_eq!(
            outbox.push_all(&frames[..1], 3),
            PushedAll {
                queued: 0,
                first: false,
                overflowed: false
            },
            "a closing outbox takes nothing, and the overflow is told once"
        );
        assert_eq!(outbox.close_reason(), Some(CloseReason::SlowConsumer));
    }

    #[test]
    fn close_keeps_only_a_partly_written_frame() {
        let outbox = Outbox::new(Sink::Detached, 0, false);
        outbox.push(Bytes::from_static(b"aa"), 8);
        outbox.push(Bytes::from_static(b"bb"), 8);
        outbox.state.lock().head_written = 1;
        outbox.queue_close(Bytes::from_static(b"close"), false);
        let frames: Vec<_> = outbox.state.lock().frames.iter().cloned().collect();
        assert_eq!(
            frames,
            [Bytes::from_static(b"aa"), Bytes::from_static(b"close")]
        );
    }

    /// A waker that counts its wakes.
    fn counting_waker() -> (Waker, Arc<std::sync::atomic::AtomicUsize>) {
        struct Count(Arc<std::sync::atomic::AtomicUsize>);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (Waker::from(Arc::new(Count(Arc::clone(&count)))), count)
    }

    #[test]
    fn a_pulled_outbox_is_woken_by_flush_and_taken_by_its_owner() {
        let metrics = Metrics::new();
        let outbox = Outbox::new(Sink::Pulled, 0, true);
        let (waker, wakes) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut taken = Vec::new();
        outbox.push(Bytes::from_static(b"queued while held"), 8);
        assert_eq!(
            outbox.poll_take(&mut cx, &mut taken, 8),
            Poll::Pending,
            "held"
        );
        outbox.release(Some(Bytes::from_static(b"first")));
        outbox.flush(&metrics);
        assert_eq!(
            wakes.load(Ordering::Relaxed),
            1,
            "the flush after release wakes"
        );
        assert_eq!(
            outbox.poll_take(&mut cx, &mut taken, 1),
            Poll::Ready(Taken::Frames)
        );
        assert_eq!(taken, [Bytes::from_static(b"first")], "at most max frames");
        assert_eq!(outbox.depth(), 1);
        assert_eq!(
            outbox.poll_take(&mut cx, &mut taken, 8),
            Poll::Ready(Taken::Frames)
        );
        assert_eq!(outbox.depth(), 0, "taken frames leave the queue");
        assert_eq!(outbox.poll_take(&mut cx, &mut taken, 8), Poll::Pending);
        outbox.flush(&metrics);
        assert_eq!(wakes.load(Ordering::Relaxed), 1, "nothing queued: no wake");
        assert_eq!(
            outbox.push(Bytes::from_static(b"live"), 8),
            Push::Queued { first: true }
        );
        outbox.flush(&metrics);
        assert_eq!(
            wakes.load(Ordering::Relaxed),
            2,
            "a push and its flush wake"
        );
        outbox.push(Bytes::from_static(b"before the close"), 8);
        outbox.close(CloseReason::GoingAway);
        assert_eq!(
            outbox.poll_take(&mut cx, &mut taken, 8),
            Poll::Ready(Taken::Close(CloseReason::GoingAway))
        );
        let mut rest = Vec::new();
        assert_eq!(
            outbox.take(&mut rest, 8),
            2,
            "what was queued before the close"
        );
        assert_eq!(outbox.take(&mut rest, 8), 0);
        assert!(outbox.is_pulled());
        assert!(!Outbox::new(Sink::Detached, 0, false).is_pulled());
    }
}
