//! Parking an idle connection: while nothing happens on it, a connection has no task.
//!
//! A tokio task costs its connection the task's cell (header, scheduler hooks, trailer) next to
//! the connection's own state, some 640 bytes of every idle connection's memory. A connection
//! that would wait with nothing in progress (no partial frame, no blocked write, no replay)
//! parks instead: it leaves its state in a [`Parking`], whose waker it registers where its task
//! would have waited (the socket's readiness and its outbox's signal), and its task ends. The
//! first wake spawns a task that takes the state back and carries on from the top of the
//! connection's loop; later wakes of the same parking do nothing.
//!
//! Only connections that are idle park: one that is woken again within [`PARK_AFTER_MS`] of its
//! previous wake keeps its task, so a busy connection (an echo client, a chatty publisher)
//! does not pay a spawn per message.

use std::sync::Arc;
use std::task::Wake;

use parking_lot::Mutex;
use tokio::runtime::Handle;

use super::Connection;

/// How long a connection must have been quiet before a wake for it to park once it is done.
pub const PARK_AFTER_MS: u64 = 1000;

/// Where a parked connection waits, and the waker that brings it back.
pub struct Parking {
    state: Mutex<State>,
    /// The runtime to spawn the connection's next task on (a waker may be called from any
    /// thread).
    runtime: Handle,
}

enum State {
    /// Registered as the waker, not yet holding the connection.
    Armed,
    /// Woken: whoever holds the connection next carries on at once.
    Woken,
    /// Holding the parked connection until a wake.
    Holding(Connection),
}

impl Parking {
    /// A parking on the current runtime; register its waker, then [`Parking::hold`] the
    /// connection.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::Armed),
            runtime: Handle::current(),
        })
    }

    /// Parks `connection` here, or hands it back when a wake came since the waker was
    /// registered (the caller then carries on without parking).
    pub fn hold(&self, connection: Connection) -> Option<Connection> {
        let mut state = self.state.lock();
        match *state {
            State::Woken => Some(connection),
            State::Armed | State::Holding(_) => {
                *state = State::Holding(connection);
                None
            }
        }
    }
}

impl Wake for Parking {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let parked = match std::mem::replace(&mut *self.state.lock(), State::Woken) {
            State::Holding(connection) => connection,
            State::Armed | State::Woken => return,
        };
        self.runtime.spawn(parked.resume());
    }
}
