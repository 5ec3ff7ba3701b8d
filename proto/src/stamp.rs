//! Capture times inside the picture: an H.264 SEI message (user data unregistered) that the
//! simulator can put before each access unit, so a WebRTC viewer, which sees only RTP, can
//! measure capture → viewer delay through the relay. The time is written as hex digits, so
//! the NAL unit never needs emulation prevention bytes.

/// Marks Tianwang's stamp among other user data (a random UUID with no zero byte).
pub const UUID: [u8; 16] = [
    0x17, 0x19, 0x4a, 0x4c, 0x49, 0x8c, 0xce, 0x9b, 0x40, 0xa7, 0x62, 0xf5, 0xc3, 0x23, 0xa5, 0x40,
];

/// NAL header (SEI, nal_ref_idc 0), payload type 5 (user data unregistered), payload size.
const HEAD: [u8; 3] = [0x06, 5, 32];

/// Bytes [`write`] appends: a 4-byte start code, the header, the UUID, 16 hex digits and
/// the RBSP stop bit.
pub const LEN: usize = 4 + HEAD.len() + 16 + 16 + 1;

/// Appends a stamp of `capture_us` as one Annex-B NAL unit.
pub fn write(out: &mut Vec<u8>, capture_us: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(&[0, 0, 0, 1]);
    out.extend_from_slice(&HEAD);
    out.extend_from_slice(&UUID);
    out.extend(
        (0..16)
            .rev()
            .map(|i| HEX[((capture_us >> (i * 4)) & 0xf) as usize]),
    );
    out.push(0x80);
}

/// The capture time in a NAL unit (from its header byte on), if it is a stamp.
pub fn read(nal: &[u8]) -> Option<u64> {
    let digits = nal.strip_prefix(&HEAD)?.strip_prefix(&UUID)?.get(..16)?;
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_reads_back_and_other_nal_units_do_not() {
        let mut out = Vec::new();
        write(&mut out, 1_764_460_800_123_456);
        assert_eq!(out.len(), LEN);
        assert_eq!(read(&out[4..]), Some(1_764_460_800_123_456));
        // No start code can appear inside it.
        assert!(!out[4..].windows(3).any(|w| w == [0, 0, 1]));
        let mut other = out[4..].to_vec();
        other[5] ^= 1;
        assert_eq!(read(&other), None, "another UUID");
        assert_eq!(read(&[0x65, 0x88, 0x84]), None, "a slice");
        assert_eq!(read(&out[4..20]), None, "cut short");
    }
}
