//! Internet checksums for packets the datapath builds itself (resets, ICMP errors).
//! Fixed-size inputs only, so the loops unroll and the verifier sees straight-line code.

/// One's-complement sum of `bytes` (even length) as big-endian 16-bit words, added to `sum`.
#[inline(always)]
pub fn add_bytes<const N: usize>(mut sum: u64, bytes: &[u8; N]) -> u64 {
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u64;
        i += 2;
    }
    sum
}

/// Folds a sum of at most a few thousand words to 16 bits and complements it.
#[inline(always)]
pub fn finish(mut sum: u64) -> [u8; 2] {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}
