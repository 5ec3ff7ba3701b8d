//! Frames per second through one track to 1, 10 and 100 subscribers, each drained after
//! every frame as a live sender would. Run: cargo bench -p tianwang-core
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tianwang_core::frame::FrameIn;
use tianwang_core::{RelayStats, Track, TrackConfig};

fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan_out");
    let payload = Bytes::from(vec![0u8; 4000]);
    let received_at = Instant::now();
    for subscribers in [1usize, 10, 100] {
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(
            BenchmarkId::from_parameter(subscribers),
            &subscribers,
            |b, &n| {
                let track = Track::new(
                    "video",
                    TrackConfig::default(),
                    Arc::new(RelayStats::default()),
                );
                let mut subs: Vec<_> = (0..n).map(|_| track.subscribe()).collect();
                let mut g = track.begin_group();
                let mut i = 0u64;
                b.iter(|| {
                    // A 60-frame GOP, as a 2 s keyframe interval at 30 fps.
                    if i.is_multiple_of(60) {
                        g = track.begin_group();
                    }
                    g.push(FrameIn {
                        data: payload.clone(),
                        payload_offset: 0,
                        timestamp_us: i,
                        duration_us: 33_333,
                        received_at,
                    });
                    for s in subs.iter_mut() {
                        black_box(s.try_next());
                    }
                    i += 1;
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, fan_out);
criterion_main!(benches);
