//! What a hub recorded, measured from outside: `hub verify` on its data dir, the media rows
//! of its index, and which of the frames a device captured (read back from the device's
//! spool, which keeps every group it encoded) those rows hold.

use std::path::Path;
use std::process::Command;

use anyhow::Context;
use bytes::BytesMut;
use tianwang_proto::wire::{self, Progress};

use crate::bin;

/// The outcome of `hub verify --data DIR [extra]`.
#[derive(Debug, Clone)]
pub struct Verified {
    pub ok: bool,
    /// Segments the summary line counts (init and media).
    pub segments: usize,
    /// `FAIL` lines.
    pub problems: Vec<String>,
    pub text: String,
}

/// Runs `hub verify --data DATA` with `extra` arguments (`--config`, `--unit`).
pub fn verify(data: &Path, extra: &[&str]) -> anyhow::Result<Verified> {
    let out = Command::new(bin("hub"))
        .args(["verify", "--data"])
        .arg(data)
        .args(extra)
        .output()
        .context("running hub verify")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // "… 1 unit(s), 42 segment(s), …"
    let segments = text
        .split(", ")
        .find_map(|part| part.strip_suffix(" segment(s)")?.parse().ok())
        .unwrap_or(0);
    let problems = text
        .lines()
        .filter_map(|l| l.strip_prefix("FAIL "))
        .map(str::to_string)
        .collect();
    Ok(Verified {
        ok: out.status.success(),
        segments,
        problems,
        text,
    })
}

/// One media row of a unit's chain.
#[derive(Debug, Clone)]
pub struct Row {
    pub seq: i64,
    pub recording: String,
    /// Capture span, µs since the epoch (device clock).
    pub start_us: i64,
    pub end_us: i64,
    /// When the hub wrote the row (hub clock).
    pub recorded_us: i64,
}

impl Row {
    /// From the last frame's capture to the row written.
    pub fn lag_us(&self) -> i64 {
        self.recorded_us - self.end_us
    }
}

/// A unit's media rows (not deleted), in chain order, from an index URL (`sqlite://…` or
/// `postgres://…`).
pub async fn media_rows(index_url: &str, unit: &str) -> anyhow::Result<Vec<Row>> {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(index_url)
        .await
        .with_context(|| format!("opening the index {index_url}"))?;
    let rows: Vec<(i64, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT seq, recording, start_us, end_us, recorded_us FROM segments \
         WHERE unit = $1 AND kind = 'media' AND deleted_us IS NULL ORDER BY seq",
    )
    .bind(unit)
    .fetch_all(&pool)
    .await
    .context("reading the segment rows")?;
    pool.close().await;
    Ok(rows
        .into_iter()
        .map(|(seq, recording, start_us, end_us, recorded_us)| Row {
            seq,
            recording,
            start_us,
            end_us,
            recorded_us,
        })
        .collect())
}

/// The SQLite index of a hub's data dir.
pub fn sqlite_url(data: &Path) -> String {
    format!("sqlite://{}", data.join("index.sqlite").display())
}

/// Capture times (µs) of the frames of `track` a device's spool holds (delivered or not;
/// a torn group's whole frames), sorted. A file renamed while it is read (delivered, so
/// `.grp` → `.sent`) makes the listing start over.
pub fn spooled_frames(spool: &Path, track: u32) -> anyhow::Result<Vec<u64>> {
    'listing: for _ in 0..5 {
        let mut out = Vec::new();
        let dir = std::fs::read_dir(spool)
            .with_context(|| format!("reading the spool {}", spool.display()))?;
        for entry in dir {
            let path = entry.context("listing the spool")?.path();
            if !matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("grp" | "sent" | "part")
            ) {
                continue;
            }
            let data = match std::fs::read(&path) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue 'listing,
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            let mut buf = BytesMut::from(&data[..]);
            match wire::decode_group_header(&mut buf) {
                Ok(Progress::Done(h)) if h.track_id == track => {}
                _ => continue,
            }
            while let Ok(Progress::Done(f)) = wire::decode_frame(&mut buf, wire::DEFAULT_MAX_FRAME)
            {
                out.push(f.header.timestamp_us);
            }
        }
        out.sort_unstable();
        out.dedup();
        return Ok(out);
    }
    anyhow::bail!(
        "the spool {} kept changing under the reader",
        spool.display()
    )
}

/// How many of `frames` (capture µs) lie within `[from, to)` and how many of those a row
/// of `rows` holds (its capture span covers the frame's time).
pub fn covered<'a>(
    frames: &[u64],
    rows: impl IntoIterator<Item = &'a Row>,
    from: i64,
    to: i64,
) -> (usize, usize) {
    let mut spans: Vec<(i64, i64)> = rows.into_iter().map(|r| (r.start_us, r.end_us)).collect();
    spans.sort_unstable();
    // Merged, so a frame is looked up once.
    let mut merged: Vec<(i64, i64)> = Vec::new();
    for (s, e) in spans {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let mut total = 0;
    let mut held = 0;
    for &f in frames {
        let f = f as i64;
        if f < from || f >= to {
            continue;
        }
        total += 1;
        let i = merged.partition_point(|&(s, _)| s <= f);
        if i > 0 && f < merged[i - 1].1 {
            held += 1;
        }
    }
    (total, held)
}
