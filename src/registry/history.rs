//! Channel history: the last messages of each channel, kept so that a client that lost its
//! connection (or was dropped as a slow consumer) can come back and get what it missed.
//!
//! Every channel stream has an [`Epoch`], chosen at random when the stream starts: offsets grow
//! by one within an epoch, and a new epoch says that continuity cannot be proven (the node
//! restarted, the channel was forgotten). A client's [`Position`] is an epoch and the offset of
//! the last message it has; recovery replays what follows, or says why it cannot.
//!
//! A channel's [`History`] holds the encoded frames subscribers got (the same [`Bytes`], so a
//! stored message costs no copy), at most `--history-size` of them and none older than
//! `--history-ttl`. [`HistoryBudget`] caps the bytes all channels hold together
//! (`--history-memory`); past it, the oldest messages of the whole node go first.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use rand::Rng as _;

/// Characters an epoch is made of: lowercase letters and digits, safe in URLs, query strings,
/// SSE ids and Redis keys without escaping.
const EPOCH_ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
/// Length of an epoch: 36^8 (about 2^41) values, so a restarted stream is never mistaken for
/// the one before it.
pub const EPOCH_LEN: usize = 8;

/// Bytes counted for each stored message besides its frame: the entry in the ring.
const ENTRY_OVERHEAD: u64 = std::mem::size_of::<Stored>() as u64;

/// The identity of one channel stream: offsets are comparable only within one epoch.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch([u8; EPOCH_LEN]);

impl Epoch {
    /// A new random epoch.
    pub fn random() -> Self {
        let mut rng = rand::rng();
        Self(std::array::from_fn(|_| {
            EPOCH_ALPHABET[rng.random_range(0..EPOCH_ALPHABET.len())]
        }))
    }

    /// Parses an epoch as clients send it back; `None` unless it is [`EPOCH_LEN`] characters of
    /// the epoch alphabet.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes: [u8; EPOCH_LEN] = text.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(|byte| EPOCH_ALPHABET.contains(byte))
            .then_some(Self(bytes))
    }

    /// The epoch as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("epochs are ASCII")
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch({})", self.as_str())
    }
}

/// Where a client stands in a channel: the epoch and the offset of the last message it has
/// (0 for none yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The stream the offset belongs to.
    pub epoch: Epoch,
    /// The last offset the client has.
    pub offset: u64,
}

/// Why a recovery could not replay what the client missed: the client must reload its state
/// (from `/api/history` or its own backend) and go on from the position it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryFailure {
    /// The channel's stream is not the one the position belongs to.
    EpochChanged,
    /// The message after the position has left the history window (or history is off).
    PositionExpired,
    /// The position is past the channel's latest offset in the same epoch: it was never
    /// handed out.
    PositionAhead,
    /// The connection is subscribed to the channel already; nothing is replayed.
    AlreadySubscribed,
    /// Cluster mode, and Redis is down: the history cannot be read now.
    HistoryUnavailable,
}

impl RecoveryFailure {
    /// The stable code clients see (`"reason"`).
    pub fn code(self) -> &'static str {
        match self {
            RecoveryFailure::EpochChanged => "epoch_changed",
            RecoveryFailure::PositionExpired => "position_expired",
            RecoveryFailure::PositionAhead => "position_ahead",
            RecoveryFailure::AlreadySubscribed => "already_subscribed",
            RecoveryFailure::HistoryUnavailable => "history_unavailable",
        }
    }
}

/// What a subscribe with a position came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// No position was given.
    NotAsked,
    /// Everything after the position is replayed before live messages.
    Recovered,
    /// Nothing is replayed, for this reason.
    Failed(RecoveryFailure),
}

/// Where a channel stands when a client subscribes: the epoch and latest offset to store, and
/// how a recovery went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// The channel's current epoch.
    pub epoch: Epoch,
    /// The channel's latest offset (0: nothing published in this epoch yet).
    pub offset: u64,
    /// The recovery's outcome.
    pub recovery: Recovery,
}

/// Where a channel stands in the cluster's shared history and what it holds after some
/// offset, as read from Redis, for [`crate::registry::Registry::catch_up`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The stream's epoch.
    pub epoch: Epoch,
    /// The stream's latest offset.
    pub latest: u64,
    /// The offset of the oldest message still kept (`latest + 1` when none is).
    pub first: u64,
    /// Message frames after the offset asked for, oldest first, with consecutive offsets.
    pub frames: Vec<(u64, Bytes)>,
}

/// The limits every channel's history keeps to.
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    /// Messages kept per channel; 0 turns history off.
    pub size: usize,
    /// How long a message is kept, in milliseconds of the registry clock.
    pub ttl_ms: u64,
}

/// One stored message: its frame and when it was published.
#[derive(Debug)]
struct Stored {
    at_ms: u64,
    frame: Bytes,
}

/// The stored messages of one channel, oldest first; their offsets are consecutive and end at
/// the channel's latest offset.
#[derive(Debug, Default)]
pub struct History {
    entries: VecDeque<Stored>,
}

impl History {
    /// Stores the frame of the message just published, then drops what the limits no longer
    /// allow. Returns the bytes the node's histories grew by (negative when they shrank).
    pub fn push(&mut self, frame: Bytes, now_ms: u64, limits: HistoryLimits) -> i64 {
        let added = entry_bytes(&frame);
        self.entries.push_back(Stored {
            at_ms: now_ms,
            frame,
        });
        let mut freed = 0;
        while self.entries.len() > limits.size {
            freed += self.pop_oldest();
        }
        freed += self.expire(now_ms, limits.ttl_ms);
        added as i64 - freed as i64
    }

    /// Drops messages older than the ttl; returns the bytes freed.
    pub fn expire(&mut self, now_ms: u64, ttl_ms: u64) -> u64 {
        let mut freed = 0;
        while self
            .entries
            .front()
            .is_some_and(|oldest| now_ms.saturating_sub(oldest.at_ms) >= ttl_ms)
        {
            freed += self.pop_oldest();
        }
        freed
    }

    /// Drops the oldest message; returns the bytes freed.
    pub fn pop_oldest(&mut self) -> u64 {
        self.entries
            .pop_front()
            .map_or(0, |stored| entry_bytes(&stored.frame))
    }

    /// When the oldest message was published, if there is one.
    pub fn oldest_at(&self) -> Option<u64> {
        self.entries.front().map(|stored| stored.at_ms)
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The offset of the oldest message kept, for a channel whose latest offset is `latest`;
    /// `latest + 1` when nothing is kept.
    pub fn first_offset(&self, latest: u64) -> u64 {
        latest + 1 - self.entries.len() as u64
    }

    /// Up to `limit` frames of the messages after offset `after`, oldest first, for a channel
    /// whose latest offset is `latest`; `None` when the message after `after` is no longer
    /// kept (or `after` is past `latest`).
    pub fn after(&self, after: u64, latest: u64, limit: usize) -> Option<Vec<(u64, Bytes)>> {
        let first = self.first_offset(latest);
        if after > latest || after + 1 < first {
            return None;
        }
        let skip = usize::try_from(after + 1 - first).ok()?;
        Some(
            self.entries
                .iter()
                .skip(skip)
                .take(limit)
                .zip(after + 1..)
                .map(|(stored, offset)| (offset, stored.frame.clone()))
                .collect(),
        )
    }
}

fn entry_bytes(frame: &Bytes) -> u64 {
    frame.len() as u64 + ENTRY_OVERHEAD
}

/// The node-wide cap on the bytes all histories hold together.
#[derive(Debug)]
pub struct HistoryBudget {
    /// The cap, in bytes.
    limit: u64,
    /// Bytes held now (frames and entries).
    held: AtomicU64,
    /// An eviction pass is running; another publish that finds the budget exceeded leaves it to
    /// that pass.
    evicting: AtomicBool,
}

impl HistoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            held: AtomicU64::new(0),
            evicting: AtomicBool::new(false),
        }
    }

    /// Records that the histories grew (or shrank) by `delta` bytes; returns whether they now
    /// hold more than the cap.
    pub fn record(&self, delta: i64) -> bool {
        let held = if delta >= 0 {
            self.held.fetch_add(delta as u64, Ordering::Relaxed) + delta as u64
        } else {
            let freed = delta.unsigned_abs();
            self.held.fetch_sub(freed, Ordering::Relaxed) - freed
        };
        held > self.limit
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Where an eviction pass stops: nine tenths of the cap, so that the next pass is many
    /// publishes away.
    pub fn low_water(&self) -> u64 {
        self.limit / 10 * 9
    }

    /// Claims the eviction pass; `false` when one is running already.
    pub fn start_eviction(&self) -> bool {
        !self.evicting.swap(true, Ordering::Acquire)
    }

    /// Ends the eviction pass claimed with [`HistoryBudget::start_eviction`].
    pub fn end_eviction(&self) {
        self.evicting.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HistoryLimits = HistoryLimits {
        size: 3,
        ttl_ms: 1000,
    };

    fn frame(n: u8) -> Bytes {
        Bytes::from(vec![n; 10])
    }

    #[test]
    fn epochs_round_trip_and_reject_other_text() {
        let epoch = Epoch::random();
        assert_eq!(epoch.as_str().len(), EPOCH_LEN);
        assert_eq!(Epoch::parse(epoch.as_str()), Some(epoch));
        for bad in ["", "abc", "ABCDEFGH", "abcdefg!", "abcdefghi"] {
            assert_eq!(Epoch::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn keeps_the_last_messages_within_size_and_ttl() {
        let mut history = History::default();
        let mut held = 0i64;
        for n in 1..=5u8 {
            held += history.push(frame(n), u64::from(n) * 100, LIMITS);
        }
        // Offsets 3, 4, 5 are kept.
        assert_eq!(history.first_offset(5), 3);
        assert_eq!(held as u64, 3 * entry_bytes(&frame(0)));
        let after_3: Vec<u64> = history
            .after(3, 5, 10)
            .expect("kept")
            .into_iter()
            .map(|(offset, _)| offset)
            .collect();
        assert_eq!(after_3, [4, 5]);
        assert_eq!(history.after(2, 5, 10).map(|m| m.len()), Some(3));
        assert!(history.after(1, 5, 10).is_none(), "offset 2 is gone");
        assert_eq!(history.after(5, 5, 10).map(|m| m.len()), Some(0));
        assert!(history.after(6, 5, 10).is_none(), "ahead of the stream");
        assert_eq!(history.after(2, 5, 1).map(|m| m[0].0), Some(3), "limit");
        // Published at 300, 400, 500: at 1350 the first has lived 1050 ms.
        assert_eq!(history.expire(1350, LIMITS.ttl_ms), entry_bytes(&frame(0)));
        assert_eq!(history.first_offset(5), 4);
        let off = HistoryLimits { size: 0, ..LIMITS };
        assert!(history.push(frame(6), 1400, off) < 0);
        assert!(history.is_empty());
    }

    #[test]
    fn budget_reports_crossing_its_limit() {
        let budget = HistoryBudget::new(100);
        assert!(!budget.record(60));
        assert!(budget.record(60));
        assert!(!budget.record(-30));
        assert_eq!(budget.held(), 90);
        assert!(budget.start_eviction());
        assert!(!budget.start_eviction(), "one pass at a time");
        budget.end_eviction();
        assert!(budget.start_eviction());
    }
}
