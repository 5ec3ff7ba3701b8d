//! What the relay needs to know of the video codecs it carries: their names, and where a
//! VP8 frame says it is a keyframe and how large its picture is (RFC 6386 §9.1). H.264
//! access units are read in `segmenter` (parameter sets) and by the publishers.

/// A unit's video codec, as its track announces it (`TrackInfo.codec`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VideoCodec {
    /// Annex-B access units; what agents send and browsers decode everywhere.
    #[default]
    H264,
    /// Whole frames as RFC 6386 defines them (from WHIP publishers that offer no H.264).
    Vp8,
}

impl VideoCodec {
    /// From a track's codec name; unknown names are None.
    pub fn from_name(name: &str) -> Option<Self> {
        if name.eq_ignore_ascii_case("h264") || name.eq_ignore_ascii_case("avc") {
            Some(Self::H264)
        } else if name.eq_ignore_ascii_case("vp8") {
            Some(Self::Vp8)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::H264 => "h264",
            Self::Vp8 => "vp8",
        }
    }
}

/// Whether a VP8 frame is a keyframe: bit 0 of the frame tag is 0.
pub fn vp8_is_keyframe(frame: &[u8]) -> bool {
    frame.first().is_some_and(|b| b & 1 == 0)
}

/// The picture size a VP8 keyframe declares, if it is a well-formed keyframe header: the
/// frame tag, the start code 9d 01 2a, then width and height (14 bits each, little endian;
/// the top two bits are upscaling hints).
pub fn vp8_keyframe_size(frame: &[u8]) -> Option<(u16, u16)> {
    if frame.len() < 10 || !vp8_is_keyframe(frame) || frame[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let width = u16::from_le_bytes([frame[6], frame[7]]) & 0x3fff;
    let height = u16::from_le_bytes([frame[8], frame[9]]) & 0x3fff;
    (width > 0 && height > 0).then_some((width, height))
}

/// Whether an H.264 RTP payload's aggregation (STAP-A) lengths stay inside the packet.
/// rtc-rtp 0.21's depacketizer indexes past the end of one that does not (a panic found by
/// the `h264` fuzz target), so the hub checks before handing a packet over.
pub fn h264_rtp_payload_ok(payload: &[u8]) -> bool {
    const STAP_A: u8 = 24;
    if payload.first().is_none_or(|b| b & 0x1f != STAP_A) {
        return true;
    }
    let mut at = 1;
    while at < payload.len() {
        let Some(len) = payload.get(at..at + 2) else {
            return false;
        };
        at += 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
    }
    at == payload.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stap_a_lengths_must_stay_inside_the_packet() {
        // Two NAL units of 2 and 1 bytes.
        assert!(h264_rtp_payload_ok(&[24, 0, 2, 0x67, 1, 0, 1, 0x68]));
        // A trailing byte where a length should be (the fuzzer's crash).
        assert!(!h264_rtp_payload_ok(&[24, 0, 2, 0x67, 1, 0]));
        // A length past the end.
        assert!(!h264_rtp_payload_ok(&[24, 0, 9, 0x67]));
        // Not an aggregation: the depacketizer's own checks apply.
        assert!(h264_rtp_payload_ok(&[0x65, 0x88]));
    }

    #[test]
    fn a_vp8_keyframe_header_gives_its_size() {
        // Frame tag (key, version 0, shown), start code, 640 × 360.
        let key = [
            0x50, 0x2a, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0x68, 0x01, 0xff,
        ];
        assert!(vp8_is_keyframe(&key));
        assert_eq!(vp8_keyframe_size(&key), Some((640, 360)));
        let inter = [0x31, 0x2a, 0x00, 0xaa];
        assert!(!vp8_is_keyframe(&inter));
        assert_eq!(vp8_keyframe_size(&inter), None);
        // A keyframe tag without the start code is not a header to trust.
        assert_eq!(vp8_keyframe_size(&[0x50, 0, 0, 1, 2, 3, 4, 5, 6, 7]), None);
        assert_eq!(vp8_keyframe_size(&[]), None);
    }

    #[test]
    fn codec_names() {
        assert_eq!(VideoCodec::from_name("H264"), Some(VideoCodec::H264));
        assert_eq!(VideoCodec::from_name("vp8"), Some(VideoCodec::Vp8));
        assert_eq!(VideoCodec::from_name("av1"), None);
    }
}
