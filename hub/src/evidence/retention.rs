//! Retention: recorded files older than their court's rule are deleted, each deletion
//! audited (so `hub verify` can tell a retention deletion from a missing file). Segments of
//! an open case are never touched: the index query leaves them out. A recording's init
//! segment goes last, with the last of its media segments.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::Evidence;
use super::audit::unix_us;
use super::index::{IndexError, SegmentRow};
use crate::config::{RetentionConfig, RetentionRule};
use crate::session::HubContext;

/// Runs retention at start-up and every `interval` until shutdown.
pub async fn run(hub: Arc<HubContext>) {
    let config = hub.config.evidence.retention.clone();
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                match apply(&hub.evidence, &config, unix_us()).await {
                    Ok(0) => {}
                    Ok(n) => {
                        hub.metrics.retention_deleted.inc_by(n as u64);
                        info!(files = n, "retention deleted expired recordings");
                    }
                    Err(e) => warn!(error = %e, "retention failed; will try again"),
                }
            }
            _ = hub.shutdown.cancelled() => return,
        }
    }
}

fn rule<'a>(config: &'a RetentionConfig, court: &str) -> &'a RetentionRule {
    config.courts.get(court).unwrap_or(&config.default)
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Deletes what has expired at `now_us`; returns how many files.
pub async fn apply(
    evidence: &Evidence,
    config: &RetentionConfig,
    now_us: i64,
) -> Result<usize, IndexError> {
    let rules = std::iter::once(&config.default).chain(config.courts.values());
    let shortest_unbound = rules.clone().map(|r| r.unbound).min().unwrap_or_default();
    let shortest_closed = rules.map(|r| r.closed_case).min().unwrap_or_default();
    let mut candidates: Vec<(SegmentRow, bool)> = Vec::new();
    for (closed_case, shortest) in [(false, shortest_unbound), (true, shortest_closed)] {
        let before = now_us.saturating_sub(micros(shortest));
        for row in evidence.index.expired(before, closed_case).await? {
            let r = rule(config, &row.court);
            let keep = if closed_case {
                r.closed_case
            } else {
                r.unbound
            };
            if row.recorded_us < now_us.saturating_sub(micros(keep)) {
                candidates.push((row, closed_case));
            }
        }
    }
    let mut deleted = 0;
    for (row, _) in candidates.iter().filter(|(r, _)| r.kind == "media") {
        if delete(evidence, row, now_us).await? {
            deleted += 1;
        }
    }
    // Init segments go once nothing of their recording is left to play.
    let mut chains: HashMap<String, Vec<SegmentRow>> = HashMap::new();
    for (row, _) in candidates.iter().filter(|(r, _)| r.kind == "init") {
        if !chains.contains_key(&row.unit) {
            chains.insert(row.unit.clone(), evidence.index.segments(&row.unit).await?);
        }
        let remaining = chains.get(&row.unit).is_some_and(|rows| {
            rows.iter().any(|r| {
                r.kind == "media" && r.recording == row.recording && r.deleted_us.is_none()
            })
        });
        if !remaining && delete(evidence, row, now_us).await? {
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Audits, marks and removes one file. The audit entry comes first: a deletion that is not
/// vouched for is what `hub verify` reports as tampering.
async fn delete(evidence: &Evidence, row: &SegmentRow, now_us: i64) -> Result<bool, IndexError> {
    let audited = evidence
        .audit
        .record_written(
            "hub",
            "retention.delete",
            &row.unit,
            serde_json::json!({ "seq": row.seq, "path": row.path, "court": row.court,
                "case": row.case_number }),
        )
        .await;
    if !audited {
        warn!(path = %row.path, "the deletion could not be audited: the file is kept");
        return Ok(false);
    }
    evidence
        .index
        .mark_deleted(&row.unit, row.seq, now_us)
        .await?;
    match tokio::fs::remove_file(evidence.dir.join(&row.path)).await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => {
            warn!(path = %row.path, error = %e, "retention could not remove a file");
            Ok(false)
        }
    }
}
