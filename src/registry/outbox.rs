//! The bounded queue of frames waiting to be written to one connection.
//!
//! Shard writer tasks push into it and never wait; the connection's own task takes everything
//! queued in one swap and writes it with as few syscalls as it can. When a push finds the queue
//! full the connection is marked for closing as a slow consumer, so nobody else waits for it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use parking_lot::Mutex;

/// Why the server is closing a connection on its own initiative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The connection's queue overflowed: it reads slower than messages arrive.
    SlowConsumer,
    /// The server is shutting down.
    GoingAway,
    /// The client sent nothing, not even a pong, for the idle timeout.
    IdleTimeout,
}

impl CloseReason {
    /// The WebSocket close code sent for this reason.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::SlowConsumer => 1008,
            CloseReason::GoingAway | CloseReason::IdleTimeout => 1001,
        }
    }

    /// The close frame's reason text, also used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::GoingAway => "going away",
            CloseReason::IdleTimeout => "idle timeout",
        }
    }
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// The frame is queued.
    Queued,
    /// The queue was full: the connection is now closing as a slow consumer and the frame was
    /// dropped. Returned once per connection, so the caller can count and log the drop.
    Overflowed,
    /// The connection is already closing; the frame was dropped.
    Closing,
}

/// What the connection task is told when it waits on its outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Frames are queued.
    Frames,
    /// The server wants the connection closed.
    Close(CloseReason),
}

/// One connection's outgoing queue, shared (in an `Arc`) by the connection task and the
/// registry. Holds no heap memory until the first frame is queued.
#[derive(Debug)]
pub struct Outbox {
    /// Locked only for a push or a swap, never across a write or an `.await`.
    state: Mutex<State>,
    /// When the client last sent anything, in milliseconds of the registry's clock; written by
    /// the connection task, read by the shard's housekeeping.
    last_active_ms: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Bytes>,
    /// Frames taken by the connection task and not yet fully written; they count toward the
    /// capacity so that taking a batch does not double the bound.
    in_flight: usize,
    close: Option<CloseReason>,
    /// The connection task's waker, when it is waiting for frames or a close.
    waker: Option<Waker>,
}

impl Outbox {
    /// An empty outbox for a client that was last active at `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        Self {
            state: Mutex::new(State::default()),
            last_active_ms: AtomicU64::new(now_ms),
        }
    }

    /// Queues `frame` unless that would put more than `capacity` frames in the queue.
    pub fn push(&self, frame: Bytes, capacity: usize) -> Push {
        let waker = {
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
            state.frames.push_back(frame);
            state.waker.take()
        };
        wake(waker);
        Push::Queued
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

    /// Waits (as a poll function) for queued frames, when `want_frames`, or for a close.
    pub fn poll_signal(&self, cx: &mut Context<'_>, want_frames: bool) -> Poll<Signal> {
        let mut state = self.state.lock();
        if let Some(reason) = state.close {
            return Poll::Ready(Signal::Close(reason));
        }
        if want_frames && !state.frames.is_empty() {
            return Poll::Ready(Signal::Frames);
        }
        match &mut state.waker {
            Some(waker) => waker.clone_from(cx.waker()),
            slot @ None => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Moves every queued frame into `batch` (which must be empty) in one swap; the queue
    /// keeps `batch`'s old buffer for the next frames, so a busy connection allocates nothing.
    /// The frames stay counted against the capacity until [`Outbox::finish_batch`].
    pub fn take_batch(&self, batch: &mut VecDeque<Bytes>) {
        debug_assert!(batch.is_empty());
        let mut state = self.state.lock();
        if !state.frames.is_empty() {
            std::mem::swap(&mut state.frames, batch);
        }
        state.in_flight = batch.len();
    }

    /// Marks the last batch written.
    pub fn finish_batch(&self) {
        self.state.lock().in_flight = 0;
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

fn wake(waker: Option<Waker>) {
    if let Some(waker) = waker {
        waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_closes_once_and_counts_in_flight_frames() {
        let outbox = Outbox::new(0);
        assert_eq!(outbox.push(Bytes::from_static(b"a"), 2), Push::Queued);
        let mut batch = VecDeque::new();
        outbox.take_batch(&mut batch);
        assert_eq!(batch.len(), 1);
        assert_eq!(outbox.push(Bytes::from_static(b"b"), 2), Push::Queued);
        assert_eq!(outbox.depth(), 2);
        assert_eq!(outbox.push(Bytes::from_static(b"c"), 2), Push::Overflowed);
        assert_eq!(outbox.push(Bytes::from_static(b"d"), 2), Push::Closing);
        assert!(!outbox.close(CloseReason::GoingAway), "first reason wins");
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert_eq!(
            outbox.poll_signal(&mut cx, true),
            Poll::Ready(Signal::Close(CloseReason::SlowConsumer))
        );
    }

    #[test]
    fn batches_swap_buffers_and_release_the_bound() {
        let outbox = Outbox::new(0);
        let mut batch = VecDeque::new();
        outbox.take_batch(&mut batch);
        assert_eq!(batch.capacity(), 0, "nothing queued, nothing allocated");
        outbox.push(Bytes::from_static(b"a"), 1);
        outbox.take_batch(&mut batch);
        assert_eq!(batch.len(), 1);
        assert_eq!(outbox.push(Bytes::from_static(b"b"), 2), Push::Queued);
        batch.clear();
        outbox.finish_batch();
        assert_eq!(outbox.depth(), 1);
        assert_eq!(outbox.push(Bytes::from_static(b"c"), 2), Push::Queued);
    }
}
