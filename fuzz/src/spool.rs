//! The device spool under operation sequences: frames of two tracks, the hub's
//! confirmations, backfill requests, restarts, and a torn `.part` file left by a crash
//! (whose bytes the fuzzer writes). Undelivered groups are never lost silently: across
//! every phase and every restart, the undelivered count only falls by what the hub
//! confirmed.

use arbitrary::{Arbitrary, Unstructured};
use bytes::{Bytes, BytesMut};
use field_agent::spool::Spool;
use tianwang_proto::v1::{FrameHeader, TimeRange, TrackKind};
use tianwang_proto::wire;

use crate::take;

#[derive(Arbitrary, Debug)]
enum SpoolOp {
    Video {
        keyframe: bool,
        len: u8,
        step_ms: u8,
    },
    Audio {
        len: u8,
        step_ms: u8,
    },
    /// The hub confirms it recorded [from, to) (offsets from the start, in ms).
    Recorded {
        from_ms: u16,
        to_ms: u16,
    },
    Backfill {
        from_ms: u16,
        to_ms: u16,
    },
    Holdings,
}

#[derive(Arbitrary, Debug)]
struct Phase {
    /// The spool's bound: small, so it fills and must choose what to delete.
    max_bytes: u16,
    ops: Vec<SpoolOp>,
    /// A torn group a crash left behind, found by the next open.
    torn: Option<Vec<u8>>,
}

const START_US: u64 = 1_700_000_000_000_000;

fn encoded(ts: u64, len: u8) -> Bytes {
    let header = FrameHeader {
        timestamp_us: ts,
        duration_us: 20_000,
    };
    let mut out = BytesMut::new();
    wire::encode_frame(&header, &vec![len; usize::from(len) + 1], &mut out);
    out.freeze()
}

fn range(from_ms: u16, to_ms: u16) -> TimeRange {
    TimeRange {
        from_us: START_US + u64::from(from_ms) * 1000,
        to_us: START_US + u64::from(to_ms) * 1000,
    }
}

pub fn spool_ops(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let dir = tempfile::Builder::new()
        .prefix("tianwang-fuzz-spool")
        .tempdir_in(scratch())
        .expect("a scratch directory");
    let mut ts = START_US;
    let mut undelivered_before: Option<usize> = None;
    let mut torn_seq = 1_000_000u64;
    for _ in 0..4 {
        let Some(phase) = take::<Phase>(&mut u) else {
            break;
        };
        let spool = Spool::open(dir.path(), 200 + u64::from(phase.max_bytes))
            .expect("the spool opens whatever a crash left");
        let (u0, _) = spool.undelivered();
        if let Some(before) = undelivered_before {
            // A restart keeps every undelivered group; a torn one may add one more.
            assert!(
                u0 == before || u0 == before + 1,
                "{before} undelivered groups before the restart, {u0} after"
            );
        }
        for op in phase.ops.into_iter().take(200) {
            match op {
                SpoolOp::Video {
                    keyframe,
                    len,
                    step_ms,
                } => {
                    ts += u64::from(step_ms) * 1000;
                    spool.frame(1, TrackKind::Video, encoded(ts, len), ts, 33_333, keyframe);
                }
                SpoolOp::Audio { len, step_ms } => {
                    ts += u64::from(step_ms) * 1000;
                    spool.frame(2, TrackKind::Audio, encoded(ts, len), ts, 20_000, true);
                }
                SpoolOp::Recorded { from_ms, to_ms } => {
                    spool.recorded(&[range(from_ms, to_ms)], &[]);
                }
                SpoolOp::Backfill { from_ms, to_ms } => {
                    for (_, path) in spool.take_for_backfill(&[range(from_ms, to_ms)]) {
                        assert!(path.exists(), "backfill offers {}", path.display());
                    }
                }
                SpoolOp::Holdings => {
                    let _ = spool.holdings(None);
                }
            }
        }
        spool.close();
        let stats = &spool.stats;
        let completed = stats.groups.load(std::sync::atomic::Ordering::Relaxed) as usize;
        let delivered = stats.delivered.load(std::sync::atomic::Ordering::Relaxed) as usize;
        let (after, _) = spool.undelivered();
        assert!(
            after + delivered >= u0 + completed,
            "undelivered groups vanished: {u0} at open + {completed} written, \
             {delivered} confirmed, {after} left"
        );
        assert_eq!(
            stats
                .write_errors
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        drop(spool);
        undelivered_before = Some(after);
        if let Some(bytes) = phase.torn {
            torn_seq += 1;
            let name = format!("{START_US:020}-7-{torn_seq}.part");
            std::fs::write(dir.path().join(name), bytes).expect("writing a torn group");
        }
    }
}

/// Memory-backed when the machine has it: the fuzzer writes thousands of spools.
fn scratch() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}
