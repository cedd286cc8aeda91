//! WebSocket (RFC 6455) on the server side: the opening handshake, a sans-IO frame codec,
//! masking and close codes.
//!
//! What we implement: text, binary, ping, pong and close frames, fragmentation with control
//! frames interleaved, UTF-8 validation of text (incremental across fragments) and close
//! reasons, and size limits checked from the frame header before any allocation.
//! What we reject: extensions (any RSV bit), unmasked client frames, unknown opcodes, and
//! subprotocols (none is negotiated; `Sec-WebSocket-Protocol` is ignored).

pub mod close;
pub mod frame;
pub mod handshake;
pub mod mask;
