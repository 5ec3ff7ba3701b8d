//! The evidence segmenter's cost per video frame, as the recorder feeds it: 30 fps H.264
//! (Annex-B access units of 4–8 KB, a 40 KB keyframe with SPS/PPS every 60 frames, about
//! 1.6 Mbit/s) with 20 ms Opus packets between frames, segments closing at the first keyframe
//! past the hub's default 4 s target (every 120 frames), outputs polled after every push.
//! `frame` averages all of that per video frame. On their own: `keyframe`, a keyframe push
//! mid-segment (the IDR scanned for parameter sets, converted to length-prefixed NAL units),
//! and `close`, the keyframe push that also closes a full 4 s segment (moof built over 120
//! video and 200 audio samples).
//! Run: cargo bench -p tianwang-core --bench segmenter
use std::hint::black_box;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tianwang_core::segmenter::{Segmenter, SegmenterConfig, VideoCodec};

#[path = "support/nal.rs"]
mod nal;
use nal::{PPS, SPS, START, slice};

const GOP: usize = 60;
const FRAME_US: u64 = 33_333;
const AUDIO_US: u64 = 20_000;

/// One GOP of access units: an IDR with SPS and PPS (as the agents send it), then deltas of
/// 4–8 KB.
fn gop() -> Vec<Vec<u8>> {
    (0..GOP)
        .map(|i| {
            let mut au = Vec::new();
            if i == 0 {
                for nal in [SPS, PPS, &slice(0x65, 40_000, 1)] {
                    au.extend_from_slice(&START);
                    au.extend_from_slice(nal);
                }
            } else {
                au.extend_from_slice(&START);
                au.extend_from_slice(&slice(0x41, 4096 + i * 997 % 4096, i as u32));
            }
            au
        })
        .collect()
}

fn segmenter() -> Segmenter {
    Segmenter::new(SegmenterConfig {
        target_us: 4_000_000,
        width: 640,
        height: 360,
        audio: true,
        video: VideoCodec::H264,
    })
}

/// Feeds frame `i`: the audio packets captured before it, then the access unit.
struct Feeder<'a> {
    aus: &'a [Vec<u8>],
    opus: Bytes,
    i: u64,
    audio_us: u64,
}

impl<'a> Feeder<'a> {
    fn new(aus: &'a [Vec<u8>]) -> Self {
        Self {
            aus,
            // 80 bytes: 20 ms at 32 kbit/s.
            opus: Bytes::from(vec![0xfc; 80]),
            i: 0,
            audio_us: 0,
        }
    }

    fn next(&mut self, s: &mut Segmenter) {
        let ts = self.i * FRAME_US;
        while self.audio_us < ts {
            s.push_audio(self.opus.clone(), self.audio_us, AUDIO_US as u32);
            self.audio_us += AUDIO_US;
        }
        let n = (self.i % GOP as u64) as usize;
        s.push_video(&self.aus[n], ts, FRAME_US as u32, n == 0)
            .expect("the segmenter takes well-formed access units");
        // The recorder writes out whatever came out; here it is dropped.
        while let Some(out) = s.poll() {
            black_box(out);
        }
        self.i += 1;
    }
}

fn segment(c: &mut Criterion) {
    let aus = gop();
    let mut group = c.benchmark_group("segmenter");
    group.throughput(Throughput::Elements(1));
    group.bench_function("frame", |b| {
        let mut s = segmenter();
        let mut feeder = Feeder::new(&aus);
        b.iter(|| feeder.next(&mut s));
    });
    // The keyframe that only starts a GOP (mid-segment), then the one that also closes the
    // segment: their difference is the closing itself.
    for (name, gops) in [("keyframe", 1), ("close", 2)] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    // A recording begun and `gops` GOPs of it buffered, with their sound.
                    let mut s = segmenter();
                    let mut feeder = Feeder::new(&aus);
                    for _ in 0..(gops * GOP) {
                        feeder.next(&mut s);
                    }
                    (s, feeder)
                },
                |(mut s, mut feeder)| {
                    feeder.next(&mut s);
                    (s, feeder)
                },
                // Each input holds up to a whole segment's samples (about 0.8 MB).
                BatchSize::PerIteration,
            );
        });
    }
    group.finish();
}

criterion_group!(benches, segment);
criterion_main!(benches);
