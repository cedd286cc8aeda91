//! Payload masking (RFC 6455 section 5.3).
//!
//! Input: `[m0, m1, m2, m3, data...]`.
//!
//! Properties: the word-at-a-time `apply_mask` equals the byte-at-a-time
//! `apply_mask_fallback` and the RFC's definition (`octet i XOR mask[i % 4]`),
//! on the whole data and on every sub-slice starting at offsets 0..8 (so every
//! alignment and every tail length is covered); masking twice is the identity.
#![no_main]

use herald::ws::mask::{apply_mask, apply_mask_fallback};
use libfuzzer_sys::fuzz_target;

fn check(original: &[u8], mask: [u8; 4]) {
    let mut fast = original.to_vec();
    apply_mask(&mut fast, mask);
    let mut slow = original.to_vec();
    apply_mask_fallback(&mut slow, mask);
    assert_eq!(fast, slow, "apply_mask differs from apply_mask_fallback");
    for (i, (&masked, &byte)) in fast.iter().zip(original).enumerate() {
        assert_eq!(masked, byte ^ mask[i % 4], "byte {i} differs from the RFC definition");
    }
    apply_mask(&mut fast, mask);
    assert_eq!(fast, original, "apply_mask twice is not the identity");
    apply_mask_fallback(&mut slow, mask);
    assert_eq!(slow, original, "apply_mask_fallback twice is not the identity");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mask, payload)) = data.split_first_chunk::<4>() else {
        return;
    };
    check(payload, mask);
    // Sub-slices of one buffer, masked in place, so the start address moves
    // through every alignment.
    let mut buffer = payload.to_vec();
    for offset in 0..8.min(payload.len() + 1) {
        check(&payload[offset..], mask);
        let slice = &mut buffer[offset..];
        let before = slice.to_vec();
        apply_mask(slice, mask);
        let mut expected = before.clone();
        apply_mask_fallback(&mut expected, mask);
        assert_eq!(&buffer[offset..], &expected[..], "in-place mask at offset {offset}");
        apply_mask(&mut buffer[offset..], mask);
        assert_eq!(&buffer[offset..], &before[..], "in-place unmask at offset {offset}");
    }
});
