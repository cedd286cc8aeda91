//! What this node wants to hear about from other nodes: the channels it has subscribers for
//! and the client ids it has connections of.
//!
//! The registry marks a name here whenever its local count may have crossed zero (a channel's
//! first subscriber or last one leaving, a client id's first or last connection on a shard);
//! the cluster backplane takes the marked names and checks each against the registry's current
//! state before it subscribes or unsubscribes. Marks coalesce (a name churned a thousand times
//! is one entry), and the set is bounded by the names the registry knows, so nothing here grows
//! with the rate of changes.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// A name whose local interest may have changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// A channel name.
    Channel(Arc<str>),
    /// A client id.
    Client(Arc<str>),
}

/// The names marked since the backplane last looked, and a wake-up for it.
#[derive(Debug, Default)]
pub struct Interest {
    marked: Mutex<HashSet<Topic>>,
    changed: Notify,
}

impl Interest {
    /// Marks `topic` for the backplane to check.
    pub fn mark(&self, topic: Topic) {
        if self.marked.lock().insert(topic) {
            self.changed.notify_one();
        }
    }

    /// Takes every marked name.
    pub fn take(&self) -> HashSet<Topic> {
        std::mem::take(&mut *self.marked.lock())
    }

    /// Resolves once a name was marked since the last call (or immediately if one was marked
    /// before it and nobody has waited since).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}
