//! Close codes and close frame bodies (RFC 6455 sections 5.5.1 and 7.4).
//! The server needs to validate the codes clients send and to pick the right
//! code when it closes a connection itself (policy, size, protocol errors).

/// A WebSocket close status code as carried in the first two bytes of a close
/// frame body.
///
/// Exists as a newtype so any `u16` a peer sends can be represented and then
/// checked with [`CloseCode::is_valid_on_wire`], while the well-known codes the
/// server emits have names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// 1000: the purpose of the connection has been fulfilled.
    pub const NORMAL: Self = Self(1000);
    /// 1001: the endpoint is going away (server shutdown, page navigation).
    pub const GOING_AWAY: Self = Self(1001);
    /// 1002: the peer violated the WebSocket protocol.
    pub const PROTOCOL_ERROR: Self = Self(1002);
    /// 1003: the peer sent a kind of data the endpoint cannot accept.
    pub const UNSUPPORTED_DATA: Self = Self(1003);
    /// 1007: a text message or close reason was not valid UTF-8.
    pub const INVALID_PAYLOAD: Self = Self(1007);
    /// 1008: the peer violated the server's policy.
    pub const POLICY_VIOLATION: Self = Self(1008);
    /// 1009: the peer sent a message larger than the configured limit.
    pub const MESSAGE_TOO_BIG: Self = Self(1009);
    /// 1011: the server hit an unexpected internal condition.
    pub const INTERNAL_ERROR: Self = Self(1011);

    /// Whether this code may appear in a close frame on the wire.
    ///
    /// Exists so the decoder can fail connections that send reserved or
    /// unassigned codes, matching what the Autobahn test suite expects:
    /// 1000-1003 and 1007-1011 (RFC 6455 section 7.4.1) plus the
    /// registered/private range 3000-4999 (section 7.4.2) are valid;
    /// everything else, including 1004-1006, 1012-1016, 0-999, 1100-2999 and
    /// 5000 and above, is not.
    pub fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1011 | 3000..=4999)
    }
}

/// The decoded body of a close frame that carried a status code.
///
/// Exists so the server can echo the client's code when completing the
/// closing handshake and log why the client left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// The status code, already checked with [`CloseCode::is_valid_on_wire`].
    pub code: CloseCode,
    /// The human-readable reason, already checked to be valid UTF-8.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_validity_matches_autobahn_expectations() {
        let valid = [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
        ];
        let invalid = [
            0, 1, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 1100, 2000, 2999, 5000,
            65535,
        ];
        for code in valid {
            assert!(CloseCode(code).is_valid_on_wire(), "{code}");
        }
        for code in invalid {
            assert!(!CloseCode(code).is_valid_on_wire(), "{code}");
        }
    }

    #[test]
    fn named_codes_are_valid() {
        for code in [
            CloseCode::NORMAL,
            CloseCode::GOING_AWAY,
            CloseCode::PROTOCOL_ERROR,
            CloseCode::UNSUPPORTED_DATA,
            CloseCode::INVALID_PAYLOAD,
            CloseCode::POLICY_VIOLATION,
            CloseCode::MESSAGE_TOO_BIG,
            CloseCode::INTERNAL_ERROR,
        ] {
            assert!(code.is_valid_on_wire(), "{code:?}");
        }
    }
}
