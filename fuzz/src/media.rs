//! H.264 parsing, and the stateful fuzzers of the relay core and the segmenter.

use std::sync::Arc;
use std::time::Instant;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use mp4_atom::{Decode, Moof};
use tianwang_core::frame::FrameIn;
use tianwang_core::segmenter::{Output, Segment, Segmenter, SegmenterConfig, VideoCodec};
use tianwang_core::{RelayStats, Subscription, Track, TrackConfig};

use crate::take;

/// H.264 as it reaches the hub: RTP payloads from WHIP publishers (depacketized by the
/// same depacketizer the hub uses), Annex-B access units from devices (split into NAL
/// units, searched for capture stamps, and recorded: a keyframe's parameter sets become
/// the init segment's avcC).
pub fn h264(data: &[u8]) {
    use rtc::rtp::codec::h264::H264Packet;
    use rtc::rtp::packetizer::Depacketizer;

    let (step, body) = crate::chunks(data);
    let mut depacketizer = H264Packet::default();
    for payload in body.chunks(step * 7) {
        // As the hub's WHIP assembler does: malformed aggregations never reach rtc-rtp.
        if !tianwang_core::codec::h264_rtp_payload_ok(payload)
            || depacketizer
                .depacketize(&Bytes::copy_from_slice(payload))
                .is_err()
        {
            depacketizer = H264Packet::default();
        }
    }
    for nal in tianwang_core::segmenter::annexb_nals(body) {
        let _ = tianwang_proto::stamp::read(nal);
    }
    let mut s = Segmenter::new(config(false));
    let pushed = s.push_video(body, 0, 33_333, true).is_ok()
        && s.push_video(body, 33_333, 33_333, false).is_ok()
        && s.flush().is_ok();
    if pushed {
        check_outputs(std::iter::from_fn(|| s.poll()).collect());
    }
}

fn config(audio: bool) -> SegmenterConfig {
    SegmenterConfig {
        target_us: 1_000_000,
        width: 640,
        height: 360,
        audio,
        video: VideoCodec::H264,
    }
}

/// What every recording must be, whatever came in: an init segment first, then media
/// segments numbered from 1 without a gap, each starting with a sync sample (a keyframe),
/// each a moof that decodes and counts the frames the segment claims.
fn check_outputs(outputs: Vec<Output>) {
    let mut next: Option<u32> = None;
    for out in outputs {
        match out {
            Output::Init(init) => {
                assert!(!init.data.is_empty());
                next = Some(1);
            }
            Output::Segment(seg) => {
                assert_eq!(Some(seg.sequence), next, "segments numbered without a gap");
                next = Some(seg.sequence + 1);
                check_segment(&seg);
            }
        }
    }
}

fn check_segment(seg: &Segment) {
    let data: Vec<u8> = seg.chunks.iter().flat_map(|c| c.iter().copied()).collect();
    assert_eq!(
        data.len() as u64,
        seg.bytes,
        "the segment's size is its bytes"
    );
    let moof = Moof::decode(&mut &data[..]).expect("a segment's moof decodes");
    let video = moof
        .traf
        .iter()
        .find(|t| t.tfhd.track_id == tianwang_core::segmenter::VIDEO_TRACK)
        .expect("a segment has video");
    // A capture clock that steps either way never turns a segment's range inside out
    // (the recorder confirms to the unit what the range holds).
    assert!(
        seg.end_us >= seg.start_us,
        "capture range {}..{}",
        seg.start_us,
        seg.end_us
    );
    let trun = video.trun.first().expect("video samples");
    assert_eq!(trun.samples.len(), seg.video_frames as usize);
    let first = trun.samples.get(0).expect("at least one sample");
    assert_eq!(
        first.flags,
        Some(0x0200_0000),
        "a segment starts at a keyframe"
    );
}

const SPS: [&[u8]; 2] = [
    &[0x67, 0x42, 0xe0, 0x1f, 0xda, 0x02, 0x80, 0xbf],
    &[0x67, 0x4d, 0x40, 0x28, 0x95, 0xa0, 0x1e, 0x00],
];
const PPS: &[u8] = &[0x68, 0xce, 0x3c, 0x80];

#[derive(Arbitrary, Debug)]
enum SegOp {
    /// A keyframe carrying parameter set `sps % 2` (a change starts a new recording).
    Keyframe {
        sps: u8,
        step_us: u16,
    },
    /// A keyframe without parameter sets (a device that sends them once).
    BareKeyframe {
        step_us: u16,
    },
    Delta {
        step_us: u16,
        len: u8,
    },
    /// A frame whose capture clock went back (a device clock stepped).
    Back {
        by_us: u32,
        keyframe: bool,
    },
    Audio {
        step_us: u16,
    },
    Flush,
}

/// Sequences of frames (keyframes with and without parameter sets, a parameter change,
/// clocks that step back, sound) into the segmenter: every output must be a valid
/// recording (`check_outputs`), and the hash chain a recorder writes over its outputs must
/// verify with the hub's own verifier.
pub fn segmenter_ops(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let audio = take::<bool>(&mut u).unwrap_or(false);
    let mut s = Segmenter::new(config(audio));
    let mut ts: u64 = 1_000_000_000;
    let mut audio_ts = ts;
    let mut outputs = Vec::new();
    let mut n: u8 = 0;
    while let Some(op) = take::<SegOp>(&mut u) {
        n = n.wrapping_add(1);
        let pushed = match op {
            SegOp::Keyframe { sps, step_us } => {
                ts += u64::from(step_us);
                let mut au = vec![0, 0, 0, 1];
                au.extend_from_slice(SPS[usize::from(sps % 2)]);
                au.extend_from_slice(&[0, 0, 0, 1]);
                au.extend_from_slice(PPS);
                au.extend_from_slice(&[0, 0, 1, 0x65, 0x88, n]);
                s.push_video(&au, ts, u32::from(step_us), true)
            }
            SegOp::BareKeyframe { step_us } => {
                ts += u64::from(step_us);
                s.push_video(&[0, 0, 1, 0x65, 0x88, n], ts, u32::from(step_us), true)
            }
            SegOp::Delta { step_us, len } => {
                ts += u64::from(step_us);
                let mut au = vec![0, 0, 0, 1, 0x41, 0x9a];
                au.resize(6 + usize::from(len), n);
                s.push_video(&au, ts, u32::from(step_us), false)
            }
            SegOp::Back { by_us, keyframe } => {
                ts = ts.saturating_sub(u64::from(by_us));
                s.push_video(&[0, 0, 1, 0x41, n], ts, 33_333, keyframe)
            }
            SegOp::Audio { step_us } => {
                audio_ts += u64::from(step_us);
                s.push_audio(Bytes::from_static(&[0xfc, 0xff, 0xfe]), audio_ts, 20_000);
                Ok(())
            }
            SegOp::Flush => s.flush(),
        };
        pushed.expect("the segmenter builds boxes for any frames");
        outputs.extend(std::iter::from_fn(|| s.poll()));
    }
    s.flush().expect("flush");
    outputs.extend(std::iter::from_fn(|| s.poll()));
    crate::chain::check(&outputs);
    check_outputs(outputs);
}

#[derive(Arbitrary, Debug)]
enum RelayOp {
    Frame {
        len: u8,
    },
    Group,
    /// A whole group written at once (backfill).
    WholeGroup {
        frames: u8,
    },
    Drain {
        sub: u8,
        frames: u8,
    },
    Subscribe {
        deep: bool,
    },
    Unsubscribe {
        sub: u8,
    },
    ClearCache,
}

/// Publishing, whole-group writes, joins, leaves and reads in any order on one track with
/// a small ring: every subscriber sees whole groups in order from a keyframe (index 0),
/// rings stay within their bound, and each subscriber is charged exactly what it got.
pub fn relay_ops(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let queue = usize::from(take::<u8>(&mut u).unwrap_or(4) % 16) + 1;
    let lag = u64::from(take::<u8>(&mut u).unwrap_or(1) % 3);
    let track = Track::new(
        "video",
        TrackConfig {
            queue_frames: queue,
            group_cache_frames: 16,
            max_group_lag: lag,
            ..TrackConfig::default()
        },
        Arc::new(RelayStats::default()),
    );
    let mut writer = track.begin_group();
    let mut subs: Vec<(Subscription, Seen)> = Vec::new();
    let mut n: u64 = 0;
    let mut frame = |len: u8| {
        n += 1;
        FrameIn {
            data: Bytes::from(vec![len; usize::from(len) + 1]),
            payload_offset: 0,
            timestamp_us: n,
            duration_us: 33_333,
            received_at: Instant::now(),
        }
    };
    while let Some(op) = take::<RelayOp>(&mut u) {
        match op {
            RelayOp::Frame { len } => {
                writer.push(frame(len));
            }
            RelayOp::Group => writer = track.begin_group(),
            RelayOp::WholeGroup { frames } => {
                let group: Vec<FrameIn> = (0..frames % 8 + 1).map(&mut frame).collect();
                track.push_group(group);
            }
            RelayOp::Subscribe { deep } => {
                let s = if deep {
                    track.subscribe_with(256, u64::MAX)
                } else {
                    track.subscribe()
                };
                subs.push((s, Seen::default()));
            }
            RelayOp::Unsubscribe { sub } => {
                if !subs.is_empty() {
                    subs.remove(usize::from(sub) % subs.len());
                }
            }
            RelayOp::Drain { sub, frames } => {
                let i = usize::from(sub) % subs.len().max(1);
                if let Some((s, seen)) = subs.get_mut(i) {
                    for _ in 0..frames {
                        match s.try_next() {
                            Some(f) => seen.see(f.group, f.index),
                            None => break,
                        }
                    }
                }
            }
            RelayOp::ClearCache => track.clear_cache(),
        }
        assert_eq!(track.subscriber_count(), subs.len());
    }
    for (mut s, mut seen) in subs {
        while let Some(f) = s.try_next() {
            seen.see(f.group, f.index);
        }
        assert_eq!(s.stats().delivered, seen.count, "charged what it got");
    }
}

/// One subscriber's view: groups only move forward, each from index 0 without a hole.
#[derive(Default)]
struct Seen {
    last: Option<(u64, u32)>,
    count: u64,
}

impl Seen {
    fn see(&mut self, group: u64, index: u32) {
        match self.last {
            Some((g, i)) if g == group => assert_eq!(index, i + 1, "a hole inside group {g}"),
            Some((g, _)) => {
                assert!(group > g, "group {group} after {g}");
                assert_eq!(index, 0, "group {group} joined at frame {index}");
            }
            None => assert_eq!(index, 0, "the first frame is not a keyframe"),
        }
        self.last = Some((group, index));
        self.count += 1;
    }
}
