//! `hub verify`: proves recordings (in a data dir) or an export (anywhere, with only the
//! hub's public key) untampered, gap-free and in order — or says precisely what is wrong.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::Serialize;

use super::index::{AuditRow, GENESIS, Index, IndexError, SegmentRow};
use super::keys::{Verifier, sha256_hex};

/// Capture-time slack between consecutive media segments (a frame and then some).
const CONTINUITY_US: i64 = 100_000;

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub units: usize,
    pub segments: usize,
    pub bytes: u64,
    pub gaps: usize,
    pub audit_rows: usize,
    pub problems: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks one unit's chain. `read` returns a row's file (or why it cannot).
pub fn check_chain(
    unit: &str,
    rows: &[SegmentRow],
    verifier: &Verifier,
    deletions: &HashSet<(String, i64)>,
    mut read: impl FnMut(&SegmentRow) -> Result<Vec<u8>, String>,
    report: &mut Report,
) {
    // Which row a content belongs to, to tell a swapped file from a changed one.
    let by_hash: HashMap<&str, i64> = rows.iter().map(|r| (r.sha256.as_str(), r.seq)).collect();
    let mut problem =
        |seq: i64, what: String| report_problem(&mut report.problems, unit, seq, what);
    let mut expected_seq = 1;
    let mut prev_hash = GENESIS.to_string();
    // The last media row of each recording: backfill recordings interleave with the live
    // one in the chain, each continuous in itself.
    let mut last_media: HashMap<&str, &SegmentRow> = HashMap::new();
    // The latest capture time reached (backfill rows lie earlier in time than the rows
    // before them in the chain).
    let mut last_end: Option<i64> = None;
    let (mut segments, mut bytes, mut gaps) = (0usize, 0u64, 0usize);
    for row in rows {
        if row.seq != expected_seq {
            problem(
                row.seq,
                format!(
                    "rows {expected_seq}..{} are missing from the index",
                    row.seq - 1
                ),
            );
        }
        expected_seq = row.seq + 1;
        if row.prev_sha256 != prev_hash {
            problem(
                row.seq,
                "does not link to the row before it: the chain is broken (a row removed, \
                 reordered or altered)"
                    .into(),
            );
        }
        prev_hash = row.sha256.clone();
        if !verifier.verify_hex(&row.signed_bytes(), &row.signature) {
            problem(
                row.seq,
                "the signature does not match the row: the index row was edited".into(),
            );
        }
        match row.kind.as_str() {
            "gap" => {
                gaps += 1;
                let description = serde_json::json!(["gap", row.unit, row.start_us, row.end_us]);
                if sha256_hex(description.to_string().as_bytes()) != row.sha256 {
                    problem(row.seq, "the gap record was altered".into());
                }
                last_end = Some(last_end.map_or(row.end_us, |e| e.max(row.end_us)));
            }
            "init" | "media" => {
                if row.deleted_us.is_some() {
                    if !deletions.contains(&(row.unit.clone(), row.seq)) {
                        problem(
                            row.seq,
                            format!(
                                "{} is marked deleted, but no audited retention deleted it",
                                row.path
                            ),
                        );
                    }
                } else {
                    let data = read(row).map(|d| {
                        let hash = sha256_hex(&d);
                        (d, hash)
                    });
                    match data {
                        Err(why) => problem(row.seq, format!("{}: {why}", row.path)),
                        Ok((_, hash))
                            if hash != row.sha256 && by_hash.contains_key(hash.as_str()) =>
                        {
                            problem(
                                row.seq,
                                format!(
                                    "{} holds the content of row #{}: segments were swapped or moved",
                                    row.path,
                                    by_hash[hash.as_str()]
                                ),
                            )
                        }
                        Ok((data, _)) if data.len() as i64 != row.bytes => problem(
                            row.seq,
                            format!(
                                "{} has {} bytes, the signed record says {}: the file was cut or extended",
                                row.path,
                                data.len(),
                                row.bytes
                            ),
                        ),
                        Ok((_, hash)) if hash != row.sha256 => problem(
                            row.seq,
                            format!(
                                "{} differs from its signed SHA-256: its content was changed",
                                row.path
                            ),
                        ),
                        Ok((data, _)) => bytes += data.len() as u64,
                    }
                }
                if row.kind == "media" {
                    segments += 1;
                    if let Some(prev) = last_media.get(row.recording.as_str()) {
                        if row.number != prev.number + 1 {
                            problem(
                                row.seq,
                                format!(
                                    "segment {} of recording {} follows segment {}: a segment is missing or out of order",
                                    row.number, row.recording, prev.number
                                ),
                            );
                        } else if row.media_start != prev.media_start + prev.media_duration {
                            problem(
                                row.seq,
                                format!(
                                    "media time jumps from {} to {} within recording {}",
                                    prev.media_start + prev.media_duration,
                                    row.media_start,
                                    row.recording
                                ),
                            );
                        }
                    }
                    if let Some(end) = last_end
                        && row.start_us - end > CONTINUITY_US
                    {
                        problem(
                            row.seq,
                            format!(
                                "{:.3} s before it are neither recorded nor marked as a gap",
                                (row.start_us - end) as f64 / 1e6
                            ),
                        );
                    }
                    last_media.insert(row.recording.as_str(), row);
                    last_end = Some(last_end.map_or(row.end_us, |e| e.max(row.end_us)));
                }
            }
            other => problem(row.seq, format!("unknown kind {other:?}")),
        }
    }
    report.units += 1;
    report.segments += segments;
    report.bytes += bytes;
    report.gaps += gaps;
}

fn report_problem(problems: &mut Vec<String>, unit: &str, seq: i64, what: String) {
    problems.push(format!("{unit} #{seq}: {what}"));
}

/// Checks the audit chain: contiguous, linked, each hash and signature right.
pub fn check_audit(rows: &[AuditRow], verifier: &Verifier, contiguous: bool, report: &mut Report) {
    let mut prev: Option<&AuditRow> = None;
    for row in rows {
        let bad = |what: &str| format!("audit #{}: {what}", row.seq);
        if row.compute_hash() != row.sha256 {
            report.problems.push(bad(
                "its content does not match its hash: the entry was edited",
            ));
        }
        if !verifier.verify_hex(row.sha256.as_bytes(), &row.signature) {
            report
                .problems
                .push(bad("the signature does not match: the entry was forged"));
        }
        if contiguous {
            let expected_prev = prev.map(|p| p.sha256.as_str()).unwrap_or(GENESIS);
            let expected_seq = prev.map(|p| p.seq + 1).unwrap_or(1);
            if row.seq != expected_seq {
                report.problems.push(bad(&format!(
                    "entries {expected_seq}..{} are missing",
                    row.seq - 1
                )));
            } else if row.prev_sha256 != expected_prev {
                report.problems.push(bad(
                    "does not link to the entry before it: the log was altered",
                ));
            }
        } else if prev.is_some_and(|p| p.seq >= row.seq) {
            report.problems.push(bad("out of order"));
        }
        prev = Some(row);
    }
    report.audit_rows += rows.len();
}

/// Units and the deletions the audit log vouches for.
fn audited_deletions(audit: &[AuditRow]) -> HashSet<(String, i64)> {
    audit
        .iter()
        .filter(|r| r.action == "retention.delete")
        .filter_map(|r| {
            let detail: serde_json::Value = serde_json::from_str(&r.detail).ok()?;
            Some((r.subject.clone(), detail.get("seq")?.as_i64()?))
        })
        .collect()
}

/// The newest chain head the audit log recorded per unit: (seq, sha256).
fn audited_heads(audit: &[AuditRow]) -> HashMap<String, (i64, String)> {
    let mut heads: HashMap<String, (i64, String)> = HashMap::new();
    for r in audit.iter().filter(|r| r.action == "chain.head") {
        let Ok(detail) = serde_json::from_str::<serde_json::Value>(&r.detail) else {
            continue;
        };
        let (Some(seq), Some(sha)) = (detail["seq"].as_i64(), detail["sha256"].as_str()) else {
            continue;
        };
        if heads.get(&r.subject).is_none_or(|(s, _)| seq >= *s) {
            heads.insert(r.subject.clone(), (seq, sha.to_string()));
        }
    }
    heads
}

/// Verifies the recordings of a data dir (all units, one unit, or the units of a case) and
/// the audit log.
pub async fn verify_data(
    index: &Index,
    recordings: &Path,
    verifier: &Verifier,
    unit: Option<&str>,
    case: Option<&str>,
) -> Result<Report, IndexError> {
    let mut report = Report::default();
    let audit = index.audit().await?;
    check_audit(&audit, verifier, true, &mut report);
    let deletions = audited_deletions(&audit);
    let heads = audited_heads(&audit);
    let units: Vec<String> = match (unit, case) {
        (Some(u), _) => vec![u.to_string()],
        (None, Some(c)) => {
            if index.case(c).await?.is_none() {
                report.problems.push(format!("no case {c} in the index"));
            }
            let mut units: Vec<String> = index
                .segments_of_case(c)
                .await?
                .into_iter()
                .map(|r| r.unit)
                .collect();
            units.dedup();
            units
        }
        (None, None) => index.recorded_units().await?,
    };
    for u in units {
        let rows = index.segments(&u).await?;
        if rows.is_empty() {
            report.problems.push(format!("{u}: nothing recorded"));
            continue;
        }
        if let Some((seq, sha)) = heads.get(&u) {
            match rows.iter().find(|r| r.seq == *seq) {
                Some(r) if r.sha256 == *sha => {}
                Some(_) => report.problems.push(format!(
                    "{u} #{seq}: differs from the head the audit log recorded for it"
                )),
                None => report.problems.push(format!(
                    "{u}: the chain ends at #{} but the audit log recorded its head at #{seq}: rows were cut off the end",
                    rows.last().map(|r| r.seq).unwrap_or(0)
                )),
            }
        }
        check_chain(
            &u,
            &rows,
            verifier,
            &deletions,
            |row| {
                std::fs::read(recordings.join(&row.path))
                    .map_err(|e| format!("cannot be read ({e})"))
            },
            &mut report,
        );
    }
    Ok(report)
}

/// One file of an export: the recording of a unit during an operation, as one MP4.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExportFile {
    pub name: String,
    pub unit: String,
    pub operation: Option<String>,
    pub recording: String,
    pub sha256: String,
    pub parts: Vec<ExportPart>,
}

/// Where a signed segment lies in an export file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExportPart {
    pub offset: u64,
    pub length: u64,
    /// The segment's index row, as the hub signed it.
    pub row: SegmentRow,
}

/// The manifest of an export (`manifest.json`, signed in `manifest.sig`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format: String,
    pub case: serde_json::Value,
    pub hub_public_key: String,
    pub created_us: i64,
    pub files: Vec<ExportFile>,
    /// Gap records of the exported units within the case.
    pub gaps: Vec<SegmentRow>,
    /// The case's audit excerpt.
    pub audit: Vec<AuditRow>,
}

pub const EXPORT_FORMAT: &str = "tianwang-export/1";

/// Verifies an export directory with the hub's public key only.
pub fn verify_export(dir: &Path, verifier: &Verifier) -> Report {
    let manifest_bytes = match std::fs::read(dir.join("manifest.json")) {
        Ok(b) => b,
        Err(e) => {
            let mut report = Report::default();
            report
                .problems
                .push(format!("manifest.json cannot be read: {e}"));
            return report;
        }
    };
    let signature = std::fs::read_to_string(dir.join("manifest.sig")).unwrap_or_default();
    verify_manifest(&manifest_bytes, &signature, verifier, |name| {
        std::fs::read(dir.join(name))
    })
}

/// Whether a manifest's file name stays inside the export: one plain component, so a
/// crafted manifest cannot make the verifier read `/dev/zero` or files outside the bundle.
fn plain_file_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(_)), None)
    ) && !name.contains(['/', '\\'])
}

/// Verifies an export's manifest (untrusted input) and the files it names, read through
/// `read_file`: `hub verify` reads them from the bundle, the fuzzer from memory.
pub fn verify_manifest(
    manifest_bytes: &[u8],
    signature: &str,
    verifier: &Verifier,
    mut read_file: impl FnMut(&str) -> std::io::Result<Vec<u8>>,
) -> Report {
    let mut report = Report::default();
    if !verifier.verify_hex(manifest_bytes, signature.trim()) {
        report.problems.push(
            "manifest.sig does not match manifest.json under this key: the manifest was altered, or the key is not the hub's"
                .into(),
        );
    }
    let manifest: Manifest = match serde_json::from_slice(manifest_bytes) {
        Ok(m) => m,
        Err(e) => {
            report
                .problems
                .push(format!("manifest.json is not a manifest: {e}"));
            return report;
        }
    };
    if manifest.format != EXPORT_FORMAT {
        report
            .problems
            .push(format!("unknown export format {:?}", manifest.format));
    }
    let mut by_unit: HashMap<String, Vec<SegmentRow>> = HashMap::new();
    for file in &manifest.files {
        if !plain_file_name(&file.name) {
            report.problems.push(format!(
                "{:?}: not a file name inside the export: not read",
                file.name
            ));
            continue;
        }
        let data = match read_file(&file.name) {
            Ok(d) => d,
            Err(e) => {
                report
                    .problems
                    .push(format!("{}: cannot be read ({e})", file.name));
                continue;
            }
        };
        if sha256_hex(&data) != file.sha256 {
            report.problems.push(format!(
                "{}: differs from the manifest: its content was changed",
                file.name
            ));
        }
        // Within one file, media segments follow each other by number.
        for pair in file.parts.windows(2) {
            let (a, b) = (&pair[0].row, &pair[1].row);
            if a.kind == "media" && b.kind == "media" && b.number != a.number + 1 {
                report.problems.push(format!(
                    "{}: segment {} is followed by segment {}: a segment is missing or out of order",
                    file.name, a.number, b.number
                ));
            }
        }
        let mut expected_offset = 0u64;
        for part in &file.parts {
            let row = part.row.clone();
            if part.offset != expected_offset {
                report.problems.push(format!(
                    "{}: segment #{} does not follow the one before it in the file",
                    file.name, row.seq
                ));
            }
            let end = part.offset.saturating_add(part.length);
            expected_offset = end;
            let slice = usize::try_from(part.offset)
                .ok()
                .zip(usize::try_from(end).ok())
                .and_then(|(a, b)| data.get(a..b));
            match slice {
                Some(bytes) if sha256_hex(bytes) == row.sha256 => {
                    report.bytes += bytes.len() as u64
                }
                Some(_) => report.problems.push(format!(
                    "{}: bytes {}..{} (segment #{} of {}) differ from the signed SHA-256",
                    file.name, part.offset, end, row.seq, row.unit
                )),
                None => report.problems.push(format!(
                    "{}: is too short for segment #{} (the file was cut)",
                    file.name, row.seq
                )),
            }
            if !verifier.verify_hex(&row.signed_bytes(), &row.signature) {
                report.problems.push(format!(
                    "{}: the signature of segment #{} of {} does not match its record",
                    file.name, row.seq, row.unit
                ));
            }
            by_unit.entry(row.unit.clone()).or_default().push(row);
        }
        if expected_offset != data.len() as u64 {
            report.problems.push(format!(
                "{}: {} bytes after the last signed segment",
                file.name,
                data.len() as u64 - expected_offset.min(data.len() as u64)
            ));
        }
    }
    for gap in &manifest.gaps {
        let row = gap.clone();
        if !verifier.verify_hex(&row.signed_bytes(), &row.signature) {
            report.problems.push(format!(
                "gap record #{} of {} was altered",
                row.seq, row.unit
            ));
        }
        by_unit.entry(row.unit.clone()).or_default().push(row);
    }
    // Within each unit, consecutive rows must link, and media must run without holes.
    for (unit, mut rows) in by_unit {
        rows.sort_by_key(|r| r.seq);
        rows.dedup_by_key(|r| r.seq);
        for pair in rows.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if b.seq == a.seq + 1 && b.prev_sha256 != a.sha256 {
                report.problems.push(format!(
                    "{unit} #{}: does not link to #{}: segments were swapped or replaced",
                    b.seq, a.seq
                ));
            }
        }
        report.units += 1;
        report.segments += rows.iter().filter(|r| r.kind == "media").count();
        report.gaps += rows.iter().filter(|r| r.kind == "gap").count();
    }
    check_audit(&manifest.audit, verifier, false, &mut report);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_cannot_make_the_verifier_read_outside_the_export() {
        let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .expect("a key")
            .serialize_pem();
        let signer = crate::evidence::keys::Signer::from_pem(&pem).expect("the key loads");
        let file = |name: &str| {
            serde_json::json!({"name": name, "unit": "u", "operation": null, "recording": "r",
                "sha256": "00", "parts": []})
        };
        let manifest = serde_json::json!({
            "format": EXPORT_FORMAT, "case": {}, "hub_public_key": "", "created_us": 0,
            "files": [file("../../etc/passwd"), file("/dev/zero"), file("a/b.mp4"),
                file(".."), file("unit.mp4")],
            "gaps": [], "audit": [],
        })
        .to_string();
        let mut asked = Vec::new();
        let report = verify_manifest(manifest.as_bytes(), "", &signer.verifier(), |name| {
            asked.push(name.to_string());
            Ok(Vec::new())
        });
        assert_eq!(asked, ["unit.mp4"], "only the plain file name is read");
        let refused = report
            .problems
            .iter()
            .filter(|p| p.contains("not a file name inside the export"))
            .count();
        assert_eq!(refused, 4, "{:?}", report.problems);
    }
}
