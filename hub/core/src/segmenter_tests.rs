use bytes::{Buf, Bytes};
use mp4_atom::{Decode, Ftyp, Moof, Moov};

use super::*;

const SPS: &[u8] = &[0x67, 0x42, 0xe0, 0x1f, 0xda, 0x02, 0x80, 0xbf];
const PPS: &[u8] = &[0x68, 0xce, 0x3c, 0x80];

fn keyframe(n: u8) -> Vec<u8> {
    let mut au = vec![0, 0, 0, 1];
    au.extend_from_slice(SPS);
    au.extend_from_slice(&[0, 0, 0, 1]);
    au.extend_from_slice(PPS);
    au.extend_from_slice(&[0, 0, 1, 0x65, 0x88, n, n, n]);
    au
}

fn delta(n: u8) -> Vec<u8> {
    vec![0, 0, 0, 1, 0x41, 0x9a, n]
}

fn config(audio: bool) -> SegmenterConfig {
    SegmenterConfig {
        target_us: 4_000_000,
        width: 640,
        height: 360,
        audio,
        video: VideoCodec::H264,
    }
}

/// Feeds `seconds` of 30 fps video with a keyframe every 2 s, and 20 ms audio frames.
fn feed(s: &mut Segmenter, from_us: u64, seconds: u64) -> Vec<Output> {
    let mut outputs = Vec::new();
    let frames = seconds * 30;
    let mut audio_us = from_us;
    for i in 0..frames {
        let ts = from_us + i * 33_333;
        while audio_us < ts {
            s.push_audio(Bytes::from_static(&[0xfc, 0xff, 0xfe]), audio_us, 20_000);
            audio_us += 20_000;
        }
        let au = if i % 60 == 0 {
            keyframe(i as u8)
        } else {
            delta(i as u8)
        };
        s.push_video(&au, ts, 33_333, i % 60 == 0).unwrap();
        outputs.extend(std::iter::from_fn(|| s.poll()));
    }
    outputs
}

fn segments(outputs: &[Output]) -> Vec<&Segment> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Segment(s) => Some(s),
            _ => None,
        })
        .collect()
}

fn bytes_of(seg: &Segment) -> Vec<u8> {
    seg.chunks.iter().flat_map(|c| c.iter().copied()).collect()
}

#[test]
fn the_first_keyframe_starts_a_recording_with_an_init_segment() {
    let mut s = Segmenter::new(config(true));
    s.push_video(&delta(1), 0, 33_333, false).unwrap();
    assert!(s.poll().is_none(), "nothing before the first keyframe");
    s.push_video(&keyframe(2), 33_333, 33_333, true).unwrap();
    let Some(Output::Init(init)) = s.poll() else {
        panic!("an init segment")
    };
    assert_eq!(init.codecs, "avc1.42e01f,opus");
    let mut buf = &init.data[..];
    let ftyp = Ftyp::decode(&mut buf).unwrap();
    assert_eq!(ftyp.major_brand, b"iso6".into());
    let moov = Moov::decode(&mut buf).unwrap();
    assert_eq!(moov.trak.len(), 2);
    let Some(mp4_atom::Codec::Avc1(avc1)) = moov.trak[0].mdia.minf.stbl.stsd.codecs.first() else {
        panic!("avc1")
    };
    assert_eq!(avc1.avcc.sequence_parameter_sets, vec![SPS.to_vec()]);
    assert_eq!(avc1.avcc.picture_parameter_sets, vec![PPS.to_vec()]);
    assert_eq!(avc1.visual.width, 640);
    assert!(!buf.has_remaining());
}

#[test]
fn segments_start_at_keyframes_and_follow_each_other_without_a_gap() {
    let mut s = Segmenter::new(config(true));
    let out = feed(&mut s, 1_000_000_000, 20);
    s.flush().unwrap();
    let mut all = out;
    all.extend(std::iter::from_fn(|| s.poll()));
    let segs = segments(&all);
    // 20 s, keyframes every 2 s, 4 s target: five segments of 4 s.
    assert_eq!(
        segs.len(),
        5,
        "{:?}",
        segs.iter().map(|s| s.media_duration).collect::<Vec<_>>()
    );
    for pair in segs.windows(2) {
        assert_eq!(
            pair[0].media_start + pair[0].media_duration,
            pair[1].media_start,
            "contiguous media time"
        );
        assert_eq!(pair[0].end_us, pair[1].start_us, "contiguous capture time");
        assert_eq!(pair[1].sequence, pair[0].sequence + 1);
    }
    for seg in &segs {
        assert_eq!(seg.video_frames, 120);
        let secs = seg.media_duration as f64 / VIDEO_TIMESCALE as f64;
        assert!((secs - 4.0).abs() < 0.01, "{secs}");
        assert!(
            (195..=205).contains(&seg.audio_frames),
            "{}",
            seg.audio_frames
        );
        assert_eq!(seg.bytes as usize, bytes_of(seg).len());
    }
}

#[test]
fn the_moof_points_at_its_samples_in_the_mdat() {
    let mut s = Segmenter::new(config(true));
    let mut out = feed(&mut s, 0, 5);
    s.flush().unwrap();
    out.extend(std::iter::from_fn(|| s.poll()));
    let seg = segments(&out)[0];
    let data = bytes_of(seg);
    let mut buf = &data[..];
    let moof = Moof::decode(&mut buf).unwrap();
    let moof_len = data.len() - buf.len();
    assert_eq!(&buf[4..8], b"mdat");
    let video = &moof.traf[0];
    assert_eq!(video.tfhd.track_id, VIDEO_TRACK);
    assert_eq!(
        video.tfdt.as_ref().map(|t| t.base_media_decode_time),
        Some(0)
    );
    let trun = &video.trun[0];
    assert_eq!(trun.samples.len(), seg.video_frames as usize);
    let first = trun.samples.get(0).unwrap();
    assert_eq!(
        first.flags,
        Some(0x0200_0000),
        "the first sample is a sync sample"
    );
    assert_eq!(trun.samples.get(1).unwrap().flags, Some(0x0101_0000));
    // The first video sample: the IDR as a length-prefixed NAL, no parameter sets.
    let offset = trun.data_offset.unwrap() as usize;
    assert_eq!(offset, moof_len + 8);
    let size = first.size.unwrap() as usize;
    assert_eq!(
        &data[offset..offset + size],
        &[0, 0, 0, 5, 0x65, 0x88, 0, 0, 0]
    );
    // The audio run starts right after the video samples.
    let audio = &moof.traf[1];
    let video_bytes: usize = trun.samples.iter().map(|e| e.size.unwrap() as usize).sum();
    assert_eq!(
        audio.trun[0].data_offset.unwrap() as usize,
        offset + video_bytes
    );
    assert_eq!(
        &data[offset + video_bytes..offset + video_bytes + 3],
        &[0xfc, 0xff, 0xfe]
    );
}

#[test]
fn new_parameter_sets_start_a_new_recording() {
    let mut s = Segmenter::new(config(false));
    let mut out = feed(&mut s, 0, 3);
    let mut other = keyframe(9);
    other[8] = 0xdb; // a different SPS
    s.push_video(&other, 3_000_000, 33_333, true).unwrap();
    out.extend(std::iter::from_fn(|| s.poll()));
    let kinds: Vec<&str> = out
        .iter()
        .map(|o| match o {
            Output::Init(_) => "init",
            Output::Segment(_) => "segment",
        })
        .collect();
    assert_eq!(kinds, vec!["init", "segment", "init"]);
    s.flush().unwrap();
    let Some(Output::Segment(seg)) = s.poll() else {
        panic!()
    };
    assert_eq!(
        (seg.sequence, seg.media_start),
        (1, 0),
        "the new recording starts over"
    );
}

#[test]
fn annexb_splitting_handles_three_and_four_byte_start_codes() {
    let au = [
        0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 4, 5,
    ];
    let nals: Vec<&[u8]> = annexb_nals(&au).collect();
    assert_eq!(
        nals,
        vec![&[0x67, 1, 2][..], &[0x68, 3][..], &[0x65, 4, 5][..]]
    );
    assert_eq!(annexb_nals(&[1, 2, 3]).count(), 0);
}

#[test]
fn an_hour_at_30_fps_does_not_drift_from_capture_time() {
    let mut s = Segmenter::new(config(false));
    let start = 1_000_000u64;
    let outputs = feed(&mut s, start, 3600);
    let segs = segments(&outputs);
    let last = segs.last().unwrap();
    // Media time of the last segment's start equals its capture time on the recording's
    // timeline, to a tick: per-frame rounding (2 999.97 ticks a frame) does not add up.
    let expected = (last.start_us - start) * VIDEO_TIMESCALE / 1_000_000;
    assert!(
        last.media_start.abs_diff(expected) <= 1,
        "media {} vs capture {expected}",
        last.media_start
    );
}

#[test]
fn audio_before_the_first_keyframe_is_dropped_and_audio_time_follows_capture() {
    let mut s = Segmenter::new(config(true));
    // Three seconds of sound before any picture.
    for i in 0..150u64 {
        s.push_audio(Bytes::from_static(&[0xfc]), i * 20_000, 20_000);
    }
    let outputs = feed(&mut s, 3_000_000, 9);
    let segs = segments(&outputs);
    let first = segs[0];
    // 4 s of video at 50 audio packets a second: no more than that (not the 150 early ones).
    assert!(
        (199..=201).contains(&first.audio_frames),
        "{} audio frames",
        first.audio_frames
    );
    let audio_tfdt = |seg: &Segment| {
        let data = bytes_of(seg);
        let moof = Moof::decode(&mut &data[..]).unwrap();
        let traf = moof
            .traf
            .iter()
            .find(|t| t.tfhd.track_id == AUDIO_TRACK)
            .unwrap();
        traf.tfdt.as_ref().unwrap().base_media_decode_time
    };
    assert_eq!(audio_tfdt(first), 0);
    // The second segment's sound starts where its capture time says.
    let second = segs[1];
    let expected = (second.start_us - 3_000_000) * AUDIO_TIMESCALE / 1_000_000;
    assert!(
        audio_tfdt(second).abs_diff(expected) <= 960,
        "{} vs {expected}",
        audio_tfdt(second)
    );
}

#[test]
fn a_device_clock_step_ends_the_segment_at_its_own_end_and_begins_a_recording() {
    const HOUR: u64 = 3_600_000_000;
    for (what, to) in [
        ("back", 4_000_000_000 - HOUR),
        ("forward", 4_000_000_000 + HOUR),
    ] {
        let mut s = Segmenter::new(config(true));
        let mut outputs = feed(&mut s, 4_000_000_000, 3);
        outputs.extend(feed(&mut s, to, 3));
        s.flush().unwrap();
        outputs.extend(std::iter::from_fn(|| s.poll()));
        let kinds: Vec<&str> = outputs
            .iter()
            .map(|o| match o {
                Output::Init(_) => "init",
                Output::Segment(_) => "segment",
            })
            .collect();
        assert_eq!(kinds, ["init", "segment", "init", "segment"], "{what}");
        let segs = segments(&outputs);
        // Every frame before the step is in the first segment, whose capture-time range
        // is its own (not up to the keyframe an hour away), as is its sound.
        assert_eq!(segs[0].video_frames, 90, "{what}");
        assert_eq!(segs[0].start_us, 4_000_000_000, "{what}");
        assert_eq!(segs[0].end_us, 4_000_000_000 + 90 * 33_333, "{what}");
        assert!(
            (149..=151).contains(&segs[0].audio_frames),
            "{what}: {}",
            segs[0].audio_frames
        );
        // The new recording's media time starts over at the step, its sound with it.
        assert_eq!((segs[1].sequence, segs[1].media_start), (1, 0), "{what}");
        assert_eq!((segs[1].start_us, segs[1].video_frames), (to, 90), "{what}");
        assert!(
            (149..=151).contains(&segs[1].audio_frames),
            "{what}: {}",
            segs[1].audio_frames
        );
        let media_s = segs[1].media_duration as f64 / VIDEO_TIMESCALE as f64;
        assert!((media_s - 3.0).abs() < 0.05, "{what}: {media_s} s");
    }
}

#[test]
fn vp8_is_recorded_as_vp08_frames_unchanged_and_a_new_size_starts_a_new_recording() {
    let vp8_key = |w: u16, h: u16| {
        let mut f = vec![0x50, 0x2a, 0x00, 0x9d, 0x01, 0x2a];
        f.extend_from_slice(&w.to_le_bytes());
        f.extend_from_slice(&h.to_le_bytes());
        f.extend_from_slice(&[7; 32]);
        f
    };
    let inter = [0x31, 0x2a, 0x00, 1, 2, 3];
    let mut s = Segmenter::new(SegmenterConfig {
        video: VideoCodec::Vp8,
        ..config(false)
    });
    s.push_video(&inter, 0, 33_333, false).unwrap();
    assert!(s.poll().is_none(), "nothing before the first keyframe");
    s.push_video(&vp8_key(1280, 720), 33_333, 33_333, true)
        .unwrap();
    let Some(Output::Init(init)) = s.poll() else {
        panic!("an init segment")
    };
    assert_eq!(init.codecs, "vp08.00.10.08");
    let mut buf = &init.data[..];
    Ftyp::decode(&mut buf).unwrap();
    let moov = Moov::decode(&mut buf).unwrap();
    let Some(mp4_atom::Codec::Vp08(vp08)) = moov.trak[0].mdia.minf.stbl.stsd.codecs.first() else {
        panic!("vp08")
    };
    // The size the keyframe declares, not the configured one.
    assert_eq!((vp08.visual.width, vp08.visual.height), (1280, 720));
    s.push_video(&inter, 66_666, 33_333, false).unwrap();
    // Another size: the recording under way ends, another begins.
    s.push_video(&vp8_key(640, 360), 99_999, 33_333, true)
        .unwrap();
    let Some(Output::Segment(seg)) = s.poll() else {
        panic!("the first recording's segment")
    };
    assert_eq!(seg.video_frames, 2);
    // The frames go into the mdat as they came (VP8 needs no rewriting).
    let bytes = bytes_of(&seg);
    assert!(bytes.windows(inter.len()).any(|w| w == inter));
    assert!(matches!(s.poll(), Some(Output::Init(_))));
}
