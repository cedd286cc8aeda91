//! Channel names and client ids: the two kinds of name clients and publishers pick.
//!
//! Both are 1 to 128 bytes of `A-Za-z0-9_.:@/-`, so they can be embedded in JSON, URLs, log lines
//! and Redis keys without escaping.

/// The longest channel name or client id, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// Why a string is not a valid channel name or client id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is the empty string.
    #[error("must not be empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_BYTES`].
    #[error("longer than 128 bytes")]
    TooLong,
    /// The name holds a byte outside `A-Za-z0-9_.:@/-`.
    #[error("may only contain A-Za-z0-9_.:@/-")]
    InvalidByte,
}

/// Checks that `name` is a valid channel name or client id.
///
/// # Errors
/// Which rule the name breaks, as a [`NameError`].
pub fn validate(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong);
    }
    if !name.bytes().all(is_name_byte) {
        return Err(NameError::InvalidByte);
    }
    Ok(())
}

fn is_name_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b':' | b'@' | b'/' | b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        assert_eq!(validate("room:lobby/a-b_c.d@e"), Ok(()));
        assert_eq!(validate(&"x".repeat(MAX_NAME_BYTES)), Ok(()));
    }

    #[test]
    fn rejects_each_rule() {
        assert_eq!(validate(""), Err(NameError::Empty));
        assert_eq!(validate(&"x".repeat(129)), Err(NameError::TooLong));
        assert_eq!(validate("a b"), Err(NameError::InvalidByte));
        assert_eq!(validate("a\"b"), Err(NameError::InvalidByte));
        assert_eq!(validate("é"), Err(NameError::InvalidByte));
    }
}
