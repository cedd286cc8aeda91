//! Client-to-server payload masking (RFC 6455 section 5.3). Every frame a
//! client sends is XORed with a 4-byte key; the server must undo it before the
//! payload can be interpreted. Masking is on the hot path of every inbound
//! byte, so a word-at-a-time version is provided alongside a byte-at-a-time
//! reference that the tests compare it against.

/// Applies (or removes: XOR is its own inverse) the 4-byte `mask` to `buf`
/// in place, eight bytes at a time.
///
/// Exists because unmasking is done for every inbound payload byte; working on
/// `u64` words is several times faster than the byte loop while staying free of
/// `unsafe`. The mask phase starts at `buf[0]`: callers must pass the whole
/// payload (or a slice starting at a multiple of 4 bytes into it).
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let [m0, m1, m2, m3] = mask;
    // Native byte order on both sides of the XOR, so the in-memory byte pattern
    // of the word is exactly the repeated mask whatever the endianness.
    let word_mask = u64::from_ne_bytes([m0, m1, m2, m3, m0, m1, m2, m3]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let unmasked = u64::from_ne_bytes(word) ^ word_mask;
        chunk.copy_from_slice(&unmasked.to_ne_bytes());
    }
    // Each chunk is a multiple of 4 bytes long, so the tail starts at phase 0.
    apply_mask_fallback(chunks.into_remainder(), mask);
}

/// Applies (or removes) the 4-byte `mask` to `buf` one byte at a time.
///
/// Exists as the obviously-correct reference for [`apply_mask`] (tests and
/// fuzzing compare the two) and to handle the short tail the fast version
/// leaves over.
pub fn apply_mask_fallback(buf: &mut [u8], mask: [u8; 4]) {
    for (byte, key) in buf.iter_mut().zip(mask.iter().cycle()) {
        *byte ^= key;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASKS: [[u8; 4]; 5] = [
        [0, 0, 0, 0],
        [0xFF, 0xFF, 0xFF, 0xFF],
        [0x12, 0x34, 0x56, 0x78],
        [0x01, 0x00, 0x00, 0x80],
        [0xA5, 0x5A, 0xC3, 0x3C],
    ];

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + 7) as u8).collect()
    }

    #[test]
    fn fast_matches_fallback_for_all_small_lengths() {
        for mask in MASKS {
            for len in 0..=100 {
                let mut fast = sample(len);
                let mut slow = fast.clone();
                apply_mask(&mut fast, mask);
                apply_mask_fallback(&mut slow, mask);
                assert_eq!(fast, slow, "len {len} mask {mask:?}");
            }
        }
    }

    #[test]
    fn fallback_matches_rfc_definition() {
        let mask = [1, 2, 3, 4];
        let mut buf = vec![0u8; 9];
        apply_mask_fallback(&mut buf, mask);
        assert_eq!(buf, [1, 2, 3, 4, 1, 2, 3, 4, 1]);
    }

    #[test]
    fn masking_twice_is_identity() {
        for mask in MASKS {
            for len in [0, 1, 3, 4, 7, 8, 9, 15, 16, 17, 64, 100, 1000] {
                let original = sample(len);
                let mut buf = original.clone();
                apply_mask(&mut buf, mask);
                apply_mask(&mut buf, mask);
                assert_eq!(buf, original);
                apply_mask_fallback(&mut buf, mask);
                apply_mask_fallback(&mut buf, mask);
                assert_eq!(buf, original);
            }
        }
    }
}
