//! The in-memory broker's idempotency keys for one route: each key's first reply, remembered
//! for the window, at most `capacity` of them (the oldest forgotten first).
//!
//! Time is tokio's clock ([`tokio::time::Instant`]), so tests can run the window out on a
//! paused clock. Entries are forgotten lazily, when the store is next used: in answer order,
//! which is also expiry order, since every entry is kept for the same window.

use std::collections::{HashMap, VecDeque, hash_map};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Fingerprint, Outcome, RequestKey};

/// The keys of one route (channel publishes, direct sends or broadcasts) and their replies.
#[derive(Debug)]
pub struct Store<T> {
    window: Duration,
    capacity: usize,
    inner: Mutex<Inner<T>>,
}

#[derive(Debug)]
struct Inner<T> {
    /// By name: the target and the key (see [`entry_name`]).
    entries: HashMap<Arc<str>, Entry<T>>,
    /// The answered entries, oldest first, with when each is forgotten.
    answered: VecDeque<(Instant, Arc<str>)>,
}

#[derive(Debug)]
enum Entry<T> {
    /// The first request with the key is being carried out. A duplicate waits for the end of
    /// it by subscribing to `ended`, which is dropped (waking every subscriber) when the entry
    /// is answered or removed; made by the first duplicate, so a request that has none costs
    /// no channel.
    Running {
        fingerprint: Fingerprint,
        ended: Option<watch::Sender<()>>,
    },
    /// The first request succeeded with `result`.
    Answered { fingerprint: Fingerprint, result: T },
}

/// What a request with a key is to do, from [`Store::begin`].
#[derive(Debug)]
pub enum Begin<'a, T> {
    /// No request has the key: carry this one out, then [`Pending::finish`] with its result
    /// (dropping the [`Pending`] instead frees the key for a retry).
    First(Pending<'a, T>),
    /// A retry of an answered request: its result.
    Replay(T),
    /// The key belongs to a different request.
    Reused,
}

impl<'a, T> Begin<'a, T> {
    /// The [`Pending`] mark of a first request, or else what the caller answers instead.
    ///
    /// # Errors
    /// The [`Outcome`] of a retry or of a reused key, to be answered as it is.
    pub fn first(self) -> Result<Pending<'a, T>, Outcome<T>> {
        match self {
            Begin::First(pending) => Ok(pending),
            Begin::Replay(result) => Err(Outcome::Replayed(result)),
            Begin::Reused => Err(Outcome::Reused),
        }
    }
}

/// The mark of a first request being carried out; see [`Begin::First`].
#[derive(Debug)]
pub struct Pending<'a, T> {
    store: &'a Store<T>,
    name: Arc<str>,
    fingerprint: Fingerprint,
    finished: bool,
}

/// The store's name of a key: the target, a space, the key. Neither may contain a space
/// (targets are channel names or client ids, keys visible ASCII), so names never collide.
fn entry_name(target: &str, key: &str) -> Arc<str> {
    let mut name = String::with_capacity(target.len() + 1 + key.len());
    name.push_str(target);
    name.push(' ');
    name.push_str(key);
    Arc::from(name)
}

impl<T: Clone> Store<T> {
    /// A store that remembers each answered key for `window`, and at most `capacity` keys.
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity,
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                answered: VecDeque::new(),
            }),
        }
    }

    /// Looks up `key` for `target` (a channel name or client id; empty for broadcasts). While
    /// the first request with the key is still being carried out, waits for its end: then a
    /// duplicate gets its reply, or, if it failed, goes ahead itself.
    pub async fn begin(&self, target: &str, key: &RequestKey) -> Begin<'_, T> {
        let name = entry_name(target, &key.key);
        loop {
            let mut ended = {
                let mut inner = self.inner.lock();
                inner.forget_expired(Instant::now());
                match inner.entries.entry(Arc::clone(&name)) {
                    hash_map::Entry::Vacant(vacant) => {
                        vacant.insert(Entry::Running {
                            fingerprint: key.fingerprint,
                            ended: None,
                        });
                        return Begin::First(Pending {
                            store: self,
                            name,
                            fingerprint: key.fingerprint,
                            finished: false,
                        });
                    }
                    hash_map::Entry::Occupied(occupied) => match occupied.into_mut() {
                        Entry::Answered {
                            fingerprint,
                            result,
                        } => {
                            return if *fingerprint == key.fingerprint {
                                Begin::Replay(result.clone())
                            } else {
                                Begin::Reused
                            };
                        }
                        Entry::Running { fingerprint, ended } => {
                            if *fingerprint != key.fingerprint {
                                return Begin::Reused;
                            }
                            ended
                                .get_or_insert_with(|| watch::channel(()).0)
                                .subscribe()
                        }
                    },
                }
            };
            // Resolves (with an error: the sender is gone) once the first request has ended.
            let _ = ended.changed().await;
        }
    }
}

impl<T> Inner<T> {
    fn forget_expired(&mut self, now: Instant) {
        while let Some((until, _)) = self.answered.front() {
            if *until > now {
                break;
            }
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((_, name)) = self.answered.pop_front() {
            // Only answering queues a name, and only this removes an answered entry, so the
            // entry is the one answered then.
            self.entries.remove(&name);
        }
    }
}

impl<T> Pending<'_, T> {
    /// Remembers the first request's `result` for the window, and wakes its duplicates.
    /// Returns whether an older key was forgotten before the end of its window to make room.
    pub fn finish(mut self, result: T) -> bool {
        self.finished = true;
        let store = self.store;
        let mut inner = store.inner.lock();
        let now = Instant::now();
        // Replacing the running entry drops its `ended` sender: the duplicates wake up.
        inner.entries.insert(
            Arc::clone(&self.name),
            Entry::Answered {
                fingerprint: self.fingerprint,
                result,
            },
        );
        inner
            .answered
            .push_back((now + store.window, Arc::clone(&self.name)));
        inner.forget_expired(now);
        let crowded = inner.answered.len() > store.capacity;
        if crowded {
            inner.forget_oldest();
        }
        crowded
    }
}

/// A first request that ends without a result (it failed, or its client went away) frees its
/// key: a retry is carried out, and its duplicates wake up to do so.
impl<T> Drop for Pending<'_, T> {
    fn drop(&mut self) {
        if !self.finished {
            self.store.inner.lock().entries.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    fn key(key: &str, body: &str) -> RequestKey {
        RequestKey {
            key: key.to_owned(),
            fingerprint: Fingerprint::of(b"", body.as_bytes()),
        }
    }

    const WINDOW: Duration = Duration::from_secs(300);

    fn remembered<T>(store: &Store<T>) -> usize {
        store.inner.lock().entries.len()
    }

    #[tokio::test(start_paused = true)]
    async fn an_answered_key_is_replayed_until_its_window_ends() {
        let store = Store::new(WINDOW, 10);
        let Begin::First(pending) = store.begin("news", &key("k", "a")).await else {
            panic!("a new key goes first");
        };
        assert!(!pending.finish(7));
        tokio::time::advance(WINDOW - Duration::from_nanos(1)).await;
        assert!(matches!(
            store.begin("news", &key("k", "a")).await,
            Begin::Replay(7)
        ));
        assert!(matches!(
            store.begin("news", &key("k", "b")).await,
            Begin::Reused
        ));
        tokio::time::advance(Duration::from_nanos(1)).await;
        assert!(matches!(
            store.begin("news", &key("k", "b")).await,
            Begin::First(_)
        ));
        assert_eq!(remembered(&store), 0, "dropping the pending key freed it");
    }

    #[tokio::test]
    async fn keys_are_scoped_by_target() {
        let store = Store::new(WINDOW, 10);
        let Begin::First(pending) = store.begin("a", &key("k", "x")).await else {
            panic!("first");
        };
        pending.finish(1);
        assert!(matches!(
            store.begin("b", &key("k", "x")).await,
            Begin::First(_)
        ));
        // "a b" + "k" and "a" + "b k" would be the same name if spaces were allowed.
        assert!(matches!(
            store.begin("", &key("k", "x")).await,
            Begin::First(_)
        ));
    }

    #[tokio::test]
    async fn a_failed_first_request_is_forgotten() {
        let store: Store<u64> = Store::new(WINDOW, 10);
        let Begin::First(pending) = store.begin("news", &key("k", "a")).await else {
            panic!("first");
        };
        drop(pending);
        assert_eq!(remembered(&store), 0);
        assert!(matches!(
            store.begin("news", &key("k", "b")).await,
            Begin::First(_)
        ));
    }

    #[tokio::test]
    async fn past_the_capacity_the_oldest_key_is_forgotten_first() {
        let store = Store::new(WINDOW, 2);
        for (n, name) in ["k1", "k2", "k3"].into_iter().enumerate() {
            let Begin::First(pending) = store.begin("news", &key(name, "a")).await else {
                panic!("first");
            };
            assert_eq!(pending.finish(n), n == 2, "{name}");
        }
        assert_eq!(remembered(&store), 2);
        assert!(matches!(
            store.begin("news", &key("k2", "a")).await,
            Begin::Replay(1)
        ));
        assert!(matches!(
            store.begin("news", &key("k3", "a")).await,
            Begin::Replay(2)
        ));
        assert!(matches!(
            store.begin("news", &key("k1", "a")).await,
            Begin::First(_)
        ));
    }

    /// Polls `future` once, without a runtime's waker.
    fn poll_once<F: Future>(future: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        future.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test]
    async fn a_duplicate_waits_for_the_first_and_gets_its_reply() {
        let store = Store::new(WINDOW, 10);
        let Begin::First(pending) = store.begin("news", &key("k", "a")).await else {
            panic!("first");
        };
        let same = key("k", "a");
        let mut duplicate = pin!(store.begin("news", &same));
        assert!(poll_once(duplicate.as_mut()).is_pending(), "waits");
        // A different request under the running key is refused at once.
        assert!(matches!(
            store.begin("news", &key("k", "b")).await,
            Begin::Reused
        ));
        pending.finish(5);
        assert!(matches!(duplicate.await, Begin::Replay(5)));
    }

    #[tokio::test]
    async fn a_duplicate_goes_ahead_when_the_first_fails() {
        let store: Store<u64> = Store::new(WINDOW, 10);
        let Begin::First(pending) = store.begin("news", &key("k", "a")).await else {
            panic!("first");
        };
        let same = key("k", "a");
        let mut duplicate = pin!(store.begin("news", &same));
        assert!(poll_once(duplicate.as_mut()).is_pending());
        drop(pending);
        assert!(matches!(duplicate.await, Begin::First(_)));
    }
}
