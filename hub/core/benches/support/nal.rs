//! Access units for the hot-path benches (the segmenter's and the RTP payloader's): both
//! scan every byte for start codes, so the bytes must look like real slices.

pub const START: [u8; 4] = [0, 0, 0, 1];
pub const SPS: &[u8] = &[0x67, 0x42, 0xe0, 0x1f, 0xda, 0x02, 0x80, 0xbf];
pub const PPS: &[u8] = &[0x68, 0xce, 0x3c, 0x80];

/// A slice NAL unit: its header byte, then `len` bytes that look like entropy-coded data to
/// a start-code scanner: pseudo-random, with emulation prevention, so no start code occurs
/// inside, and a non-zero last byte.
pub fn slice(header: u8, len: usize, seed: u32) -> Vec<u8> {
    let mut nal = Vec::with_capacity(len + len / 64 + 1);
    nal.push(header);
    let (mut x, mut zeros) = (seed, 0);
    while nal.len() <= len {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let b = (x >> 24) as u8;
        if zeros >= 2 && b <= 3 {
            nal.push(3);
            zeros = 0;
        }
        nal.push(b);
        zeros = if b == 0 { zeros + 1 } else { 0 };
    }
    if let Some(last) = nal.last_mut().filter(|b| **b == 0) {
        *last = 0x80;
    }
    nal
}
