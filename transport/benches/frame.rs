//! The group-stream framing, per frame. `decode`: what `GroupReader` (`src/group.rs`) runs
//! once a group's bytes are in its arena. The reader itself reads a quinn `RecvStream`, which
//! needs a live connection, so this calls the pure parser it is built on,
//! `tianwang_proto::wire::decode_group_header` then `decode_frame` per frame (two length
//! prefixes peeked, the `FrameHeader` decoded, the frame split off as `Bytes`, not copied),
//! over a whole group as it lies in memory: a video GOP (a 40 KB keyframe, 59 deltas of
//! 4–8 KB) and an audio group (50 Opus packets of 80 B). Throughput counts frames.
//! `encode`: the publisher's side, one frame into a buffer of its exact size, frozen, as the
//! agent's broadcast and the WHIP ingest do; throughput in payload bytes.
//! Run: cargo bench -p tianwang-transport --bench frame
use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tianwang_proto::v1::{FrameHeader, GroupHeader};
use tianwang_proto::wire::{self, Progress};

/// Capture times are µs since the Unix epoch: eight-byte varints, as on the wire.
const EPOCH_US: u64 = 1_760_000_000_000_000;

fn header(i: usize, duration_us: u32) -> FrameHeader {
    FrameHeader {
        timestamp_us: EPOCH_US + i as u64 * u64::from(duration_us),
        duration_us,
    }
}

/// A group stream's bytes: its header, then the frames.
fn group_stream(sizes: &[usize], duration_us: u32) -> Bytes {
    let mut buf = BytesMut::new();
    wire::encode_delimited(
        &GroupHeader {
            track_id: 1,
            sequence: 12_345,
            backfill: false,
        },
        &mut buf,
    );
    for (i, &size) in sizes.iter().enumerate() {
        wire::encode_frame(&header(i, duration_us), &vec![0x41; size], &mut buf);
    }
    buf.freeze()
}

/// Reads the group as `GroupReader` does; returns the first frame, which keeps the arena
/// alive, so freeing it falls outside the measurement.
fn read_group(mut buf: BytesMut) -> (Option<wire::WireFrame>, usize) {
    let Ok(Progress::Done(h)) = wire::decode_group_header(&mut buf) else {
        panic!("the group header decodes");
    };
    black_box(h);
    let mut first = None;
    let mut n = 0;
    while let Ok(Progress::Done(f)) = wire::decode_frame(&mut buf, wire::DEFAULT_MAX_FRAME) {
        n += 1;
        // The reader hands each frame to the track here.
        if first.is_none() {
            first = Some(f);
        } else {
            black_box(f);
        }
    }
    (first, n)
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    let video: Vec<usize> = (0..60)
        .map(|i| {
            if i == 0 {
                40_000
            } else {
                4096 + i * 997 % 4096
            }
        })
        .collect();
    for (name, sizes, duration_us) in [
        ("video_gop", video, 33_333),
        ("audio_group", vec![80; 50], 20_000),
    ] {
        let stream = group_stream(&sizes, duration_us);
        assert_eq!(
            read_group(BytesMut::from(&stream[..])).1,
            sizes.len(),
            "every frame decodes"
        );
        group.throughput(Throughput::Elements(sizes.len() as u64));
        group.bench_function(name, |b| {
            b.iter_batched(
                // A fresh copy each time, as just read: decoding consumes the buffer.
                || BytesMut::from(&stream[..]),
                read_group,
                // A video group is about 400 KB; more than one at a time would measure cache
                // misses the reader (decoding right after its read) does not have.
                BatchSize::PerIteration,
            );
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for size in [80usize, 5_000, 40_000] {
        let payload = vec![0x41; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &payload, |b, payload| {
            let mut i = 0;
            b.iter(|| {
                let h = header(i, 33_333);
                let mut buf = BytesMut::with_capacity(wire::encoded_frame_len(&h, payload.len()));
                wire::encode_frame(&h, payload, &mut buf);
                i += 1;
                black_box(buf.freeze())
            });
        });
    }
    group.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
