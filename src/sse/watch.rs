//! What an HTTP connection's task watches besides hyper: the `/sse` stream its response
//! carries, if any.
//!
//! Hyper polls a response body only while its write buffer has room. A client that stops
//! reading fills the socket, then that buffer, and hyper waits for the socket without polling
//! the body again, so the body would never learn that its queue overflowed. The connection's
//! task polls this watch next to hyper (woken by the same outbox close that would wake the
//! body): a stream cut off as a slow consumer drops the connection at once, and a stream that
//! is to end for another reason (shutdown, token expiry, a replay that cannot go on) but has
//! not ended [`LINGER`] later is dropped then, as a WebSocket's close frame waits at most that
//! long for a socket that does not drain.

use std::future::poll_fn;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;

use crate::registry::{CloseReason, Outbox, Signal};

/// How long a stream asked to end may take to deliver what was queued before it is dropped.
pub const LINGER: Duration = Duration::from_secs(2);

/// The stream of one HTTP connection, held weakly: once the stream's body and registration are
/// gone (it ended), there is nothing left to watch.
#[derive(Debug, Default)]
pub struct Watch {
    stream: Mutex<Option<Weak<Outbox>>>,
}

impl Watch {
    /// Watches the stream writing to `outbox` (replacing the connection's previous one, which
    /// has ended: a connection carries one response at a time).
    pub fn set(&self, outbox: &Arc<Outbox>) {
        *self.stream.lock() = Some(Arc::downgrade(outbox));
    }

    /// Resolves when the connection must be dropped: its stream was cut off as a slow
    /// consumer, or was asked to end and has not within [`LINGER`]. Never resolves for a
    /// connection without a stream.
    pub async fn cut_off(&self) {
        loop {
            let (stream, reason) = poll_fn(|cx| self.poll_close(cx)).await;
            if reason == CloseReason::SlowConsumer {
                return;
            }
            // Boxed: every HTTP connection's task holds this future, and only a closing
            // stream needs the timer.
            Box::pin(tokio::time::sleep(LINGER)).await;
            if stream.upgrade().is_some() {
                return;
            }
            let mut watched = self.stream.lock();
            if watched.as_ref().is_some_and(|w| w.ptr_eq(&stream)) {
                *watched = None;
            }
        }
    }

    /// Ready with the stream and the reason once a close of the watched stream was asked for;
    /// otherwise leaves the waker with its outbox.
    fn poll_close(&self, cx: &mut Context<'_>) -> Poll<(Weak<Outbox>, CloseReason)> {
        let watched = self.stream.lock();
        let Some(stream) = watched.as_ref() else {
            return Poll::Pending;
        };
        let Some(outbox) = stream.upgrade() else {
            return Poll::Pending;
        };
        // A pulled outbox is never blocked: only a close ends the wait.
        match outbox.poll_signal(cx, false) {
            Poll::Ready(Signal::Close(reason)) => Poll::Ready((stream.clone(), reason)),
            Poll::Ready(Signal::BlockedChanged) | Poll::Pending => Poll::Pending,
        }
    }
}
