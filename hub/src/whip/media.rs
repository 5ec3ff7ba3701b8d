//! A WHIP publisher's RTP → the relay core's frames and groups, as a QUIC agent sends
//! them: H.264 access units in Annex B with a group from each IDR, or VP8 frames with a
//! group from each keyframe; one Opus packet per frame, a group a second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use prometheus::IntCounterVec;
use rtc::rtp::codec::h264::H264Packet;
use rtc::rtp::codec::vp8::Vp8Packet;
use rtc::rtp::packetizer::Depacketizer;
use tianwang_core::GroupWriter;
use tianwang_core::codec::{VideoCodec, vp8_keyframe_size};
use tianwang_core::frame::FrameIn;
use tianwang_core::reorder::{Released, Reorder};
use tianwang_proto::v1::FrameHeader;
use tianwang_proto::wire;
use tracing::{debug, warn};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};

use crate::registry::{Broadcast, TrackEntry};

/// Opus audio is cut into groups of this many packets (one second), as agents do.
const AUDIO_GROUP: u32 = 50;

/// Capture time from RTP timestamps: the first packet's arrival, then the RTP clock
/// (unwrapped), so frame spacing is the publisher's, not the network's.
struct Clock {
    rate: u64,
    base_us: u64,
    first: Option<u32>,
    last: u32,
    extended: i64,
    /// Never ahead of arrival: when a frame arrives sooner after the first than its RTP
    /// time says (the first was held up), the base moves back to it, so timestamps read
    /// as arrival at the least delayed frame and the receiver's delay figures mean
    /// something (a video link's). Timestamps stay non-decreasing.
    anchored: bool,
    last_out: u64,
}

impl Clock {
    fn new(rate: u64) -> Self {
        Self {
            rate,
            base_us: 0,
            first: None,
            last: 0,
            extended: 0,
            anchored: false,
            last_out: 0,
        }
    }

    fn us(&mut self, ts: u32) -> u64 {
        match self.first {
            None => {
                self.first = Some(ts);
                self.last = ts;
                self.base_us = crate::evidence::audit::unix_us().max(0) as u64;
            }
            Some(_) => {
                self.extended += i64::from(ts.wrapping_sub(self.last) as i32);
                self.last = ts;
            }
        }
        let offset = self.extended.max(0) as u64 * 1_000_000 / self.rate;
        let mut us = self.base_us + offset;
        if self.anchored {
            let now = crate::evidence::audit::unix_us().max(0) as u64;
            if us > now {
                self.base_us -= us - now;
                us = now;
            }
            us = us.max(self.last_out);
            self.last_out = us;
        }
        us
    }
}

fn frame(payload: &[u8], timestamp_us: u64, duration_us: u32) -> FrameIn {
    let header = FrameHeader {
        timestamp_us,
        duration_us,
    };
    let mut buf = BytesMut::with_capacity(wire::encoded_frame_len(&header, payload.len()));
    wire::encode_frame(&header, payload, &mut buf);
    let payload_offset = (buf.len() - payload.len()) as u32;
    FrameIn {
        payload_offset,
        timestamp_us,
        duration_us,
        data: buf.freeze(),
        received_at: Instant::now(),
    }
}

/// Whether an Annex B access unit holds an IDR slice.
fn has_idr(au: &[u8]) -> bool {
    let mut i = 0;
    while i + 3 < au.len() {
        if au[i] == 0 && au[i + 1] == 0 && au[i + 2] == 1 {
            if au[i + 3] & 0x1f == 5 {
                return true;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    false
}

fn depacketizer(codec: VideoCodec) -> Box<dyn Depacketizer + Send> {
    match codec {
        VideoCodec::H264 => Box::<H264Packet>::default(),
        VideoCodec::Vp8 => Box::<Vp8Packet>::default(),
    }
}

/// Whether a whole frame starts a group: an H.264 access unit with an IDR slice; a VP8
/// frame with a keyframe header (the start code too, so a frame whose first packet was
/// lost is not taken for one).
fn starts_group(codec: VideoCodec, frame: &[u8]) -> bool {
    match codec {
        VideoCodec::H264 => has_idr(frame),
        VideoCodec::Vp8 => vp8_keyframe_size(frame).is_some(),
    }
}

/// How many packets may wait behind a hole, and for how long: enough for a retransmission
/// (NACK) on a mobile link, short enough that a real loss costs little live delay.
pub(crate) const REORDER_PACKETS: usize = 512;
pub(crate) const REORDER_WAIT: Duration = Duration::from_millis(250);

/// Where an assembler's keyframe news goes: a WHIP unit's keyframe coalescer, or a video
/// link's PLI to the console.
pub(crate) trait Keyframes: Send {
    /// A group broke while one was being written: ask the sender for a keyframe.
    fn request(&self);
    /// A keyframe began a group.
    fn arrived(&self) {}
}

/// A WHIP unit's video track: requests go through the unit's coalescer.
struct UnitKeyframes {
    entry: Arc<TrackEntry>,
    broadcast: Arc<Broadcast>,
}

impl Keyframes for UnitKeyframes {
    fn request(&self) {
        self.broadcast.request_keyframe("video");
    }

    fn arrived(&self) {
        self.broadcast.keyframe_arrived(&self.entry);
    }
}

/// Video RTP, in sequence order → frames (a marker bit, or a new timestamp, ends one; H.264
/// as Annex B access units) → groups from each keyframe. A lost packet, a packet that does
/// not depacketize or a frame over the limit breaks the group: nothing more of it until
/// the next keyframe, which is asked for.
pub(crate) struct Assembler {
    codec: VideoCodec,
    depacketizer: Box<dyn Depacketizer + Send>,
    clock: Clock,
    frame: BytesMut,
    frame_ts: Option<u32>,
    last_us: Option<u64>,
    group: Option<GroupWriter>,
    broken: bool,
    max_frame: usize,
    track: Arc<tianwang_core::Track>,
    keyframes: Box<dyn Keyframes>,
    dropped: IntCounterVec,
}

impl Assembler {
    /// Frames into `track`; drops are counted in `dropped` by reason. `anchored`: capture
    /// times never ahead of arrival (see `Clock`).
    pub(crate) fn new(
        codec: VideoCodec,
        track: Arc<tianwang_core::Track>,
        keyframes: Box<dyn Keyframes>,
        max_frame: usize,
        dropped: IntCounterVec,
        anchored: bool,
    ) -> Self {
        Self {
            codec,
            depacketizer: depacketizer(codec),
            clock: Clock {
                anchored,
                ..Clock::new(90_000)
            },
            frame: BytesMut::new(),
            frame_ts: None,
            last_us: None,
            group: None,
            broken: false,
            max_frame,
            track,
            keyframes,
            dropped,
        }
    }

    pub(crate) fn packet(&mut self, p: &rtc::rtp::Packet) {
        let ts = p.header.timestamp;
        if let Some(t) = self.frame_ts.filter(|t| *t != ts) {
            // The previous frame lost its last packet (marker): take what came.
            self.flush(t);
        }
        self.frame_ts = Some(ts);
        // rtc-rtp's H.264 depacketizer panics on a STAP-A whose lengths overrun the packet.
        let sane =
            self.codec != VideoCodec::H264 || tianwang_core::codec::h264_rtp_payload_ok(&p.payload);
        let depacketized = if sane {
            self.depacketizer
                .depacketize(&p.payload)
                .map_err(|e| e.to_string())
        } else {
            Err("aggregation lengths overrun the packet".to_string())
        };
        match depacketized {
            Ok(data) => self.frame.extend_from_slice(&data),
            Err(e) => {
                debug!(error = %e, "a video packet that does not depacketize");
                self.depacketizer = depacketizer(self.codec);
                self.break_group("undecodable");
            }
        }
        if self.frame.len() > self.max_frame {
            warn!(
                bytes = self.frame.len(),
                "a frame over quic.max_frame_bytes: dropped with its group"
            );
            self.frame.clear();
            self.break_group("oversize");
        }
        if p.header.marker {
            self.flush(ts);
            self.frame_ts = None;
        }
    }

    /// Packets that never came: whatever they belonged to cannot be decoded.
    pub(crate) fn lost(&mut self, count: u16) {
        debug!(count, "video packets lost");
        self.depacketizer = depacketizer(self.codec);
        self.break_group("lost");
    }

    fn break_group(&mut self, reason: &str) {
        if !self.broken {
            self.dropped.with_label_values(&[reason]).inc();
            if self.group.is_some() {
                self.keyframes.request();
            }
        }
        self.broken = true;
    }

    fn flush(&mut self, ts: u32) {
        if self.broken {
            // The frame and the rest of its group go; a keyframe begins the next.
            self.frame.clear();
            self.group = None;
            self.broken = false;
            return;
        }
        if self.frame.is_empty() {
            return;
        }
        let data = self.frame.split().freeze();
        let us = self.clock.us(ts);
        let duration = self
            .last_us
            .map(|l| us.saturating_sub(l).min(1_000_000) as u32)
            .filter(|d| *d > 0)
            .unwrap_or(33_333);
        self.last_us = Some(us);
        if starts_group(self.codec, &data) {
            self.group = Some(self.track.begin_group());
            self.keyframes.arrived();
        }
        if let Some(g) = self.group.as_mut() {
            g.push(frame(&data, us, duration));
        }
    }
}

pub(super) async fn video(
    track: Arc<dyn TrackRemote>,
    entry: Arc<TrackEntry>,
    broadcast: Arc<Broadcast>,
    max_frame: usize,
    codec: VideoCodec,
    dropped: IntCounterVec,
) {
    let track_out = Arc::clone(&entry.track);
    let keyframes = Box::new(UnitKeyframes { entry, broadcast });
    let mut assembler = Assembler::new(codec, track_out, keyframes, max_frame, dropped, false);
    let mut reorder = Reorder::new(REORDER_PACKETS, REORDER_WAIT);
    let mut released = Vec::new();
    loop {
        let deadline = reorder.deadline();
        tokio::select! {
            event = track.poll() => match event {
                Some(TrackRemoteEvent::OnRtpPacket(p)) => {
                    let seq = p.header.sequence_number;
                    reorder.push(seq, p, Instant::now(), &mut |r| released.push(r));
                }
                Some(_) => continue,
                None => break,
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into()), if deadline.is_some() => {
                reorder.poll(Instant::now(), &mut |r| released.push(r));
            }
        }
        for r in released.drain(..) {
            match r {
                Released::Packet(p) => assembler.packet(&p),
                Released::Lost(n) => assembler.lost(n),
            }
        }
    }
}

/// Opus RTP → one frame per packet, a group a second.
pub(super) async fn audio(
    track: Arc<dyn TrackRemote>,
    entry: Arc<TrackEntry>,
    dropped: IntCounterVec,
) {
    let mut clock = Clock::new(48_000);
    let mut group: Option<GroupWriter> = None;
    while let Some(event) = track.poll().await {
        let TrackRemoteEvent::OnRtpPacket(p) = event else {
            continue;
        };
        if p.payload.is_empty() || p.payload.len() > 2048 {
            // An Opus packet is at most 1275 bytes.
            dropped.with_label_values(&["oversize"]).inc();
            continue;
        }
        let us = clock.us(p.header.timestamp);
        if group
            .as_ref()
            .is_none_or(|g| g.frames_pushed() >= AUDIO_GROUP)
        {
            group = Some(entry.track.begin_group());
        }
        if let Some(g) = group.as_mut() {
            g.push(frame(&p.payload, us, 20_000));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idr_is_found_in_annex_b_access_units() {
        let sps_pps_idr = [
            0, 0, 0, 1, 0x67, 1, 2, 0, 0, 0, 1, 0x68, 3, 0, 0, 1, 0x65, 9,
        ];
        assert!(has_idr(&sps_pps_idr));
        let p_slice = [0, 0, 0, 1, 0x41, 1, 2, 3];
        assert!(!has_idr(&p_slice));
        assert!(!has_idr(&[]));
    }

    #[test]
    fn an_anchored_clock_is_never_ahead_of_arrival_nor_goes_back() {
        let mut c = Clock {
            anchored: true,
            ..Clock::new(90_000)
        };
        let now = || crate::evidence::audit::unix_us() as u64;
        let t0 = c.us(0);
        // A frame a whole second later by the RTP clock, arriving at once: the first was
        // held up, so the base moves back and the new frame reads as arriving now.
        let t1 = c.us(90_000);
        assert!(t1 <= now() && t1 >= t0, "{t0} {t1}");
        let t2 = c.us(90_000 + 3_000);
        assert!(t2 >= t1 && t2 <= now());
    }

    #[test]
    fn rtp_time_unwraps_and_follows_the_clock() {
        let mut c = Clock::new(90_000);
        let t0 = c.us(u32::MAX - 1_499);
        let t1 = c.us(1_500); // 3000 ticks later, across the wrap: 33.3 ms
        assert_eq!(t1 - t0, 33_333);
        let t2 = c.us(1_000); // reordered: earlier, not a huge jump
        assert!(t2 < t1);
    }
}
