//! The id of every event on a Server-Sent Events stream: where the stream stands in each of its
//! channels, so that a client that comes back with the last id it saw (`Last-Event-ID`, which a
//! browser's `EventSource` sends by itself when it reconnects) resumes every channel exactly.
//!
//! An id is a tag naming the stream's channel list, then one position per channel, in the order
//! of `channels=`: `.`, the epoch of the channel's stream, `-`, and the offset of the last message
//! of that channel sent on the stream (the channel's offset when the stream started, before its
//! first one). For `channels=news,room:1`: `21ay7s.k3j9x0ab-12.p0o1ax9z-0`. The tag is six
//! characters of `0-9a-z`, a hash of the channel names in order, so that an id from a stream of
//! other channels is refused rather than applied to the wrong ones. Offsets are written without
//! leading zeros, so every id has one spelling.
//!
//! Size: at most [`TAG_LEN`] + [`MAX_BYTES_PER_CHANNEL`] bytes per channel (3 846 bytes for the
//! 128 channels `--max-subscriptions` allows by default), in characters that need no escaping
//! in a header, a URL query or an SSE field.

use std::fmt;

use bytes::BufMut;

use crate::registry::{Epoch, Position};

/// Characters of a tag (those of an epoch).
const TAG_ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
/// Length of a tag: 36^6 (about 2^31) values, so that another channel list has about one chance
/// in two billion to share one.
pub const TAG_LEN: usize = 6;
/// The most bytes one channel adds to an id: `.`, an 8-character epoch, `-`, and at most 20
/// digits of offset.
pub const MAX_BYTES_PER_CHANNEL: usize = 1 + crate::registry::history::EPOCH_LEN + 1 + 20;

/// Names a stream's channel list, in order; the start of every id of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelsTag(u32);

impl ChannelsTag {
    /// The tag of a stream of `channels`, in this order: a hash that every node and every
    /// restart computes alike (FNV-1a over the names, each followed by `,`, which no channel
    /// name holds).
    pub fn of<S: AsRef<str>>(channels: &[S]) -> Self {
        const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut hash = OFFSET_BASIS;
        for channel in channels {
            for &byte in channel.as_ref().as_bytes().iter().chain(b",") {
                hash = (hash ^ u64::from(byte)).wrapping_mul(PRIME);
            }
        }
        let values = (TAG_ALPHABET.len() as u64).pow(TAG_LEN as u32);
        Self(u32::try_from(hash % values).expect("36^6 fits in a u32"))
    }

    fn parse(text: &str) -> Option<Self> {
        if text.len() != TAG_LEN {
            return None;
        }
        text.bytes()
            .try_fold(0u32, |value, byte| {
                let digit = TAG_ALPHABET.iter().position(|&c| c == byte)?;
                Some(value * TAG_ALPHABET.len() as u32 + digit as u32)
            })
            .map(Self)
    }

    fn write_to(self, out: &mut impl BufMut) {
        let mut digits = [0u8; TAG_LEN];
        let mut value = self.0;
        for digit in digits.iter_mut().rev() {
            *digit = TAG_ALPHABET[(value % TAG_ALPHABET.len() as u32) as usize];
            value /= TAG_ALPHABET.len() as u32;
        }
        out.put_slice(&digits);
    }
}

/// Where a stream stands: its channel list's tag and its position in each channel, in order.
/// Its text form ([`fmt::Display`], [`EventId::parse`]) is the event id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventId {
    /// The stream's channel list.
    pub tag: ChannelsTag,
    /// One position per channel, in the order of the stream's `channels=`.
    pub positions: Vec<Position>,
}

/// Why a last event id cannot resume a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventIdError {
    /// It is not of the form this server writes.
    #[error(
        "the last event id is not one this server sent: {0} (an id is a 6-character tag, then \
         .<epoch>-<offset> for each channel)"
    )]
    Malformed(&'static str),
    /// It holds positions for another number of channels than the stream asks for.
    #[error(
        "the last event id holds positions for {found} channel(s) but channels= names \
         {expected}: reconnect with the channels= of the stream the id came from, or without a \
         last event id"
    )]
    ChannelCount {
        /// Channels in `channels=`.
        expected: usize,
        /// Positions in the id.
        found: usize,
    },
    /// It is for another channel list (other names, or the same in another order).
    #[error(
        "the last event id is for another list of channels than channels= (the same names in \
         the same order are needed): reconnect with the channels= of the stream the id came \
         from, or without a last event id"
    )]
    OtherChannels,
}

impl EventId {
    /// Reads an id as this server writes it.
    ///
    /// # Errors
    /// [`EventIdError::Malformed`] for anything else.
    pub fn parse(text: &str) -> Result<Self, EventIdError> {
        let mut parts = text.split('.');
        let tag = parts
            .next()
            .and_then(ChannelsTag::parse)
            .ok_or(EventIdError::Malformed("it does not start with a tag"))?;
        let positions = parts
            .map(|part| {
                let (epoch, offset) = part.split_once('-')?;
                let canonical = match offset.as_bytes() {
                    [b'0'] => true,
                    [first, ..] => *first != b'0' && offset.bytes().all(|b| b.is_ascii_digit()),
                    [] => false,
                };
                Some(Position {
                    epoch: Epoch::parse(epoch)?,
                    offset: offset.parse().ok().filter(|_| canonical)?,
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or(EventIdError::Malformed(
                "a position is not <epoch>-<offset> (8 characters of 0-9 and a-z, a dash, and \
                 an offset without leading zeros)",
            ))?;
        Ok(Self { tag, positions })
    }

    /// The positions this id gives a stream of `channels`, in order.
    ///
    /// # Errors
    /// [`EventIdError::ChannelCount`] or [`EventIdError::OtherChannels`] when the id is not
    /// from a stream of these channels in this order.
    pub fn positions_for<S: AsRef<str>>(
        self,
        channels: &[S],
    ) -> Result<Vec<Position>, EventIdError> {
        if self.positions.len() != channels.len() {
            return Err(EventIdError::ChannelCount {
                expected: channels.len(),
                found: self.positions.len(),
            });
        }
        if self.tag != ChannelsTag::of(channels) {
            return Err(EventIdError::OtherChannels);
        }
        Ok(self.positions)
    }

    /// The length of the id's text.
    pub fn text_len(&self) -> usize {
        let digits = |offset: u64| offset.checked_ilog10().map_or(1, |log| log as usize + 1);
        TAG_LEN
            + self
                .positions
                .iter()
                .map(|position| 2 + position.epoch.as_str().len() + digits(position.offset))
                .sum::<usize>()
    }

    /// Writes the id's text to `out`.
    pub fn write_to(&self, out: &mut impl BufMut) {
        self.tag.write_to(out);
        let mut digits = itoa::Buffer::new();
        for position in &self.positions {
            out.put_u8(b'.');
            out.put_slice(position.epoch.as_str().as_bytes());
            out.put_u8(b'-');
            out.put_slice(digits.format(position.offset).as_bytes());
        }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = Vec::with_capacity(TAG_LEN + MAX_BYTES_PER_CHANNEL * self.positions.len());
        self.write_to(&mut text);
        f.write_str(std::str::from_utf8(&text).expect("ids are ASCII"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(text: &str) -> Epoch {
        Epoch::parse(text).expect("an epoch")
    }

    #[test]
    fn ids_round_trip_and_name_their_channels() {
        let channels = ["news", "room:1"];
        let id = EventId {
            tag: ChannelsTag::of(&channels),
            positions: vec![
                Position {
                    epoch: epoch("k3j9x0ab"),
                    offset: 12,
                },
                Position {
                    epoch: epoch("p0o1ax9z"),
                    offset: 0,
                },
            ],
        };
        let text = id.to_string();
        assert_eq!(
            text, "21ay7s.k3j9x0ab-12.p0o1ax9z-0",
            "the module's example"
        );
        assert_eq!(text.len(), TAG_LEN + 12 + 11);
        assert_eq!(EventId::parse(&text), Ok(id.clone()));
        assert_eq!(
            EventId::parse(&text).unwrap().positions_for(&channels),
            Ok(id.positions.clone())
        );
        assert_eq!(
            EventId::parse(&text)
                .unwrap()
                .positions_for(&["room:1", "news"]),
            Err(EventIdError::OtherChannels),
            "another order"
        );
        assert_eq!(
            EventId::parse(&text).unwrap().positions_for(&["news"]),
            Err(EventIdError::ChannelCount {
                expected: 1,
                found: 2
            })
        );
        let none: [&str; 0] = [];
        let empty = EventId {
            tag: ChannelsTag::of(&none),
            positions: Vec::new(),
        };
        assert_eq!(empty.to_string().len(), TAG_LEN);
        assert_eq!(EventId::parse(&empty.to_string()), Ok(empty));
    }

    #[test]
    fn tags_are_stable_across_processes() {
        // Part of the wire format: ids one node sent must resume on every node (the value is
        // FNV-1a of "news," mod 36^6, computed independently).
        assert_eq!(
            EventId {
                tag: ChannelsTag::of(&["news"]),
                positions: Vec::new()
            }
            .to_string(),
            "7rn1tq"
        );
        assert_ne!(ChannelsTag::of(&["a", "b"]), ChannelsTag::of(&["ab"]));
    }

    #[test]
    fn the_longest_id_is_within_the_stated_bound() {
        let positions = vec![
            Position {
                epoch: epoch("zzzzzzzz"),
                offset: u64::MAX,
            };
            128
        ];
        let id = EventId {
            tag: ChannelsTag(u32::MAX % 36u32.pow(6)),
            positions,
        };
        assert_eq!(id.to_string().len(), TAG_LEN + 128 * MAX_BYTES_PER_CHANNEL);
        assert_eq!(id.text_len(), id.to_string().len());
        assert_eq!(EventId::parse(&id.to_string()), Ok(id));
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "",
            "1ejb1",
            "7rn1tqj",
            "1EJB1J",
            "7rn1tq.",
            "7rn1tq.k3j9x0ab",
            "7rn1tq.k3j9x0ab-",
            "7rn1tq.k3j9x0ab-01",
            "7rn1tq.k3j9x0ab-+1",
            "7rn1tq.k3j9x0ab--1",
            "7rn1tq.k3j9x0ab-1x",
            "7rn1tq.k3j9x0a-1",
            "7rn1tq.k3j9x0ab-18446744073709551616",
            "7rn1tq..k3j9x0ab-1",
            "7rn1tq.k3j9x0ab-1.",
            " 7rn1tq",
        ] {
            assert!(
                matches!(EventId::parse(bad), Err(EventIdError::Malformed(_))),
                "{bad:?}"
            );
        }
    }
}
