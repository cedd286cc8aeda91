//! The last event id of a Server-Sent Events stream (`herald::sse::event_id`): what a client
//! sends back in `Last-Event-ID` or `?last_event_id=` to resume every channel of its stream.
//!
//! Input: `[channels, bytes...]`. The low 3 bits of the first byte give the stream's channel
//! count (the channels are `c0`, `c1`, ...).
//!
//! Properties:
//! - `EventId::parse` never panics on arbitrary text (the bytes, lossily UTF-8);
//! - whatever it accepts is canonical: it writes back to the same text, byte for byte, within
//!   the size bound the README states (6 + 30 bytes per channel);
//! - `positions_for` gives an accepted id's positions to a stream of as many channels with
//!   the same tag, and refuses every other stream;
//! - ids built from the bytes (16 bytes per position: an epoch and an offset) round-trip
//!   through their text, and resume exactly the stream they were made for.
#![no_main]

use herald::registry::{Epoch, Position};
use herald::sse::event_id::{ChannelsTag, EventId, EventIdError, MAX_BYTES_PER_CHANNEL, TAG_LEN};
use libfuzzer_sys::fuzz_target;

const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

fuzz_target!(|data: &[u8]| {
    let [selector, rest @ ..] = data else {
        return;
    };
    let channels: Vec<String> = (0..usize::from(selector & 7)).map(|n| format!("c{n}")).collect();

    // Arbitrary text from the network.
    let text = String::from_utf8_lossy(rest);
    if let Ok(id) = EventId::parse(&text) {
        assert_eq!(id.to_string(), text, "accepted ids are canonical");
        assert_eq!(id.text_len(), text.len());
        assert!(text.len() <= TAG_LEN + MAX_BYTES_PER_CHANNEL * id.positions.len());
        let same_tag = id.tag == ChannelsTag::of(&channels);
        let count = id.positions.len();
        match id.clone().positions_for(&channels) {
            Ok(positions) => {
                assert!(same_tag && count == channels.len());
                assert_eq!(positions, id.positions);
            }
            Err(EventIdError::ChannelCount { expected, found }) => {
                assert_eq!((expected, found), (channels.len(), count));
                assert_ne!(expected, found);
            }
            Err(EventIdError::OtherChannels) => assert!(!same_tag && count == channels.len()),
            Err(EventIdError::Malformed(_)) => panic!("positions_for does not parse"),
        }
    }

    // An id built from the bytes round-trips and resumes its own stream.
    let positions: Vec<Position> = rest
        .chunks_exact(16)
        .take(channels.len())
        .map(|chunk| {
            let epoch: String = chunk[..8]
                .iter()
                .map(|&byte| char::from(ALPHABET[usize::from(byte) % ALPHABET.len()]))
                .collect();
            Position {
                epoch: Epoch::parse(&epoch).expect("alphabet characters make an epoch"),
                offset: u64::from_le_bytes(chunk[8..].try_into().expect("8 bytes")),
            }
        })
        .collect();
    let streamed = &channels[..positions.len()];
    let id = EventId {
        tag: ChannelsTag::of(streamed),
        positions: positions.clone(),
    };
    let written = id.to_string();
    assert_eq!(id.text_len(), written.len());
    assert!(written.len() <= TAG_LEN + MAX_BYTES_PER_CHANNEL * positions.len());
    assert_eq!(EventId::parse(&written).as_ref(), Ok(&id), "{written}");
    assert_eq!(
        EventId::parse(&written).and_then(|id| id.positions_for(streamed)),
        Ok(positions)
    );
});
