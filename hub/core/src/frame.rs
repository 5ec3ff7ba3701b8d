use std::time::Instant;

use bytes::Bytes;

/// One media frame inside the relay.
///
/// `data` is a single shared allocation: every subscriber queue, the group cache and (later)
/// the recorder hold clones of the same `Bytes`, never copies. It holds the frame exactly as
/// it travelled on a QUIC group stream (length prefixes, header, payload), so a QUIC
/// subscriber forwards it verbatim; `payload()` is the media itself.
#[derive(Clone, Debug)]
pub struct Frame {
    pub data: Bytes,
    pub payload_offset: u32,
    /// Capture time by the device's clock, microseconds since the Unix epoch.
    pub timestamp_us: u64,
    pub duration_us: u32,
    /// Sequence number of the frame's group within its track, assigned by this relay.
    pub group: u64,
    /// Position within the group; 0 is the group's keyframe.
    pub index: u32,
    /// When the relay had the whole frame (the shell reads the clock, not the core).
    pub received_at: Instant,
}

impl Frame {
    pub fn is_keyframe(&self) -> bool {
        self.index == 0
    }

    pub fn payload(&self) -> &[u8] {
        self.data
            .get(self.payload_offset as usize..)
            .unwrap_or_default()
    }

    pub fn payload_len(&self) -> usize {
        self.data.len().saturating_sub(self.payload_offset as usize)
    }
}

/// A frame as a publisher hands it to [`crate::GroupWriter::push`]: the relay adds the
/// group and index.
#[derive(Clone, Debug)]
pub struct FrameIn {
    pub data: Bytes,
    pub payload_offset: u32,
    pub timestamp_us: u64,
    pub duration_us: u32,
    pub received_at: Instant,
}
