//! The evidence chain over a segmenter's outputs, as the recorder writes it (one signed row
//! per init and media segment, each linking to the one before; a gap row where the
//! capture time jumps), checked by the hub's own verifier: whatever frames came in, the
//! chain stays continuous and every row verifies.

use std::sync::OnceLock;

use hub::evidence::index::{GENESIS, SegmentRow};
use hub::evidence::keys::{Signer, sha256_hex};
use hub::evidence::verify::{Report, check_chain};
use tianwang_core::segmenter::Output;

/// Where the verifier calls a jump in capture time a gap (`CONTINUITY_US` there).
const GAP_US: i64 = 100_000;

fn signer() -> &'static Signer {
    static SIGNER: OnceLock<Signer> = OnceLock::new();
    SIGNER.get_or_init(|| {
        let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .expect("generating an Ed25519 key")
            .serialize_pem();
        Signer::from_pem(&pem).expect("a fresh key loads")
    })
}

pub(crate) fn check(outputs: &[Output]) {
    let signer = signer();
    let mut rows: Vec<(SegmentRow, Vec<u8>)> = Vec::new();
    let mut recording = String::new();
    let mut last_end: Option<i64> = None;
    let push = |mut row: SegmentRow, data: Vec<u8>, rows: &mut Vec<(SegmentRow, Vec<u8>)>| {
        row.seq = rows.len() as i64 + 1;
        row.prev_sha256 = rows
            .last()
            .map_or(GENESIS.to_string(), |(r, _)| r.sha256.clone());
        row.signature = signer.sign_hex(&row.signed_bytes());
        rows.push((row, data));
    };
    for out in outputs {
        match out {
            Output::Init(init) => {
                // Unique even when a stepped clock repeats a start time (the recorder adds
                // random bits for the same reason).
                recording = format!("r{}-{}", init.start_us, rows.len());
                let row = SegmentRow {
                    kind: "init".into(),
                    recording: recording.clone(),
                    path: format!("{recording}/init.mp4"),
                    bytes: init.data.len() as i64,
                    sha256: sha256_hex(&init.data),
                    ..blank()
                };
                push(row, init.data.to_vec(), &mut rows);
            }
            Output::Segment(seg) => {
                let (start, end) = (seg.start_us as i64, seg.end_us as i64);
                if let Some(e) = last_end.filter(|e| start - e > GAP_US) {
                    let gap = serde_json::json!(["gap", "unit", e, start]).to_string();
                    let row = SegmentRow {
                        kind: "gap".into(),
                        start_us: e,
                        end_us: start,
                        sha256: sha256_hex(gap.as_bytes()),
                        ..blank()
                    };
                    push(row, Vec::new(), &mut rows);
                }
                last_end = Some(last_end.map_or(end, |l| l.max(end)));
                let data: Vec<u8> = seg.chunks.iter().flat_map(|c| c.iter().copied()).collect();
                let row = SegmentRow {
                    kind: "media".into(),
                    recording: recording.clone(),
                    number: i64::from(seg.sequence),
                    path: format!("{recording}/{}.m4s", seg.sequence),
                    start_us: start,
                    end_us: end,
                    media_start: seg.media_start as i64,
                    media_duration: seg.media_duration as i64,
                    bytes: data.len() as i64,
                    sha256: sha256_hex(&data),
                    ..blank()
                };
                push(row, data, &mut rows);
            }
        }
    }
    let (segments, files): (Vec<SegmentRow>, Vec<Vec<u8>>) = rows.into_iter().unzip();
    let mut report = Report::default();
    check_chain(
        "unit",
        &segments,
        &signer.verifier(),
        &Default::default(),
        |row| {
            let i = usize::try_from(row.seq - 1).map_err(|e| e.to_string())?;
            files.get(i).cloned().ok_or_else(|| "no file".to_string())
        },
        &mut report,
    );
    assert!(
        report.ok(),
        "the chain does not verify: {:?}",
        report.problems
    );
}

fn blank() -> SegmentRow {
    SegmentRow {
        codecs: "avc1.42e01f".into(),
        court: "court".into(),
        ..SegmentRow::new("unit", "")
    }
}
