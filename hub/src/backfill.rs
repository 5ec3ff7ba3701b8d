//! Backfill: what a device's spool holds fills what the unit's recording lacks.
//!
//! The device says what it holds and the hub has not confirmed (`Holdings`, after Announce
//! and again while it has groups older than what the hub confirmed). The hub compares each
//! window with the unit's chain in the index: the parts already recorded are confirmed at
//! once (`Recorded`, so the spool lets them go), the parts missing are asked for
//! (`BackfillRequest`). The device then sends those groups, flagged backfill, below live
//! media; they go into the unit's backfill tracks, which only the recorder reads, and the
//! recorder writes them into the unit's chain as recordings of their own with their
//! original capture times, confirming each segment as it is written.

use std::sync::Arc;

use tianwang_proto::v1::{BackfillRequest, Holdings, Recorded, TimeRange};
use tianwang_proto::{ControlMessage, Kind};
use tracing::{info, warn};

use crate::registry::Broadcast;
use crate::session::HubContext;

/// Windows one Holdings may carry.
pub const MAX_WINDOWS: usize = 4096;
/// A hole shorter than this between recorded segments is none (segments abut within a
/// frame).
const TOLERANCE_US: u64 = 200_000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HoldingsError {
    #[error("holdings with {0} windows (at most {MAX_WINDOWS})")]
    TooMany(usize),
}

/// Checks a device's Holdings, then answers it from the index without holding up the
/// session.
pub fn holdings(
    hub: &Arc<HubContext>,
    broadcast: &Arc<Broadcast>,
    h: Holdings,
) -> Result<(), HoldingsError> {
    if h.ranges.len() > MAX_WINDOWS {
        return Err(HoldingsError::TooMany(h.ranges.len()));
    }
    let unit = broadcast.unit_id.clone();
    if h.refused_groups > 0 {
        warn!(
            refused = h.refused_groups,
            spooled = h.spooled_bytes,
            "the unit's spool was full of unrecorded evidence: it could not keep some groups"
        );
        hub.metrics.spool_refused.inc_by(h.refused_groups);
        hub.evidence.audit.record(
            &unit,
            "spool.full",
            &unit,
            serde_json::json!({ "refused_groups": h.refused_groups,
                "spooled_bytes": h.spooled_bytes }),
        );
    }
    // A window that ends before it begins says nothing.
    let windows: Vec<(u64, u64)> = h
        .ranges
        .iter()
        .filter(|r| r.to_us > r.from_us)
        .map(|r| (r.from_us, r.to_us))
        .collect();
    if windows.is_empty() {
        return Ok(());
    }
    let hub = Arc::clone(hub);
    let broadcast = Arc::clone(broadcast);
    tokio::spawn(async move {
        let mut recorded = Vec::new();
        let mut missing = Vec::new();
        for (from, to) in windows {
            let rows = match hub
                .evidence
                .index
                .segments_between(
                    &unit,
                    from.min(i64::MAX as u64) as i64,
                    to.min(i64::MAX as u64) as i64,
                )
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    warn!(error = %e, "reading the unit's recording for its holdings");
                    return;
                }
            };
            let covered: Vec<(u64, u64)> = rows
                .iter()
                .filter(|r| r.kind == "media" && r.deleted_us.is_none())
                .map(|r| (r.start_us.max(0) as u64, r.end_us.max(0) as u64))
                .collect();
            let (have, lack) = split(from, to, covered);
            recorded.extend(have);
            missing.extend(lack);
        }
        let seconds = |w: &[(u64, u64)]| w.iter().map(|(f, t)| t - f).sum::<u64>() as f64 / 1e6;
        if !missing.is_empty() {
            info!(
                windows = missing.len(),
                seconds = seconds(&missing),
                "asking the unit for what its recording lacks"
            );
        }
        let ranges = |w: Vec<(u64, u64)>| {
            w.into_iter()
                .map(|(from_us, to_us)| TimeRange { from_us, to_us })
                .collect()
        };
        if !recorded.is_empty() {
            broadcast.send_control(ControlMessage::new(Kind::Recorded(Recorded {
                ranges: ranges(recorded),
            })));
        }
        if !missing.is_empty() {
            broadcast.send_control(ControlMessage::new(Kind::BackfillRequest(
                BackfillRequest {
                    ranges: ranges(missing),
                },
            )));
        }
    });
    Ok(())
}

/// Capture-time windows, [from, to) µs.
type Windows = Vec<(u64, u64)>;

/// Splits [from, to) into the parts `covered` holds and the parts it lacks (holes shorter
/// than the tolerance belong to neither).
fn split(from: u64, to: u64, mut covered: Windows) -> (Windows, Windows) {
    covered.sort_unstable();
    let mut have = Vec::new();
    let mut lack = Vec::new();
    let mut at = from;
    for (s, e) in covered {
        if e <= at || s >= to {
            continue;
        }
        if s > at + TOLERANCE_US {
            lack.push((at, s));
        }
        let start = s.max(at);
        let end = e.min(to);
        match have.last_mut() {
            Some((_, last_end)) if start <= *last_end + TOLERANCE_US => {
                *last_end = end.max(*last_end)
            }
            _ => have.push((start, end)),
        }
        at = at.max(end);
        if at >= to {
            break;
        }
    }
    if to > at + TOLERANCE_US {
        lack.push((at, to));
    }
    (have, lack)
}

/// Tells a unit that its recording holds [start, end) (capture time), so its spool may
/// let it go.
pub fn confirm(broadcast: &Broadcast, start_us: u64, end_us: u64) {
    if end_us > start_us {
        broadcast.send_control(ControlMessage::new(Kind::Recorded(Recorded {
            ranges: vec![TimeRange {
                from_us: start_us,
                to_us: end_us,
            }],
        })));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    #[test]
    fn a_window_splits_into_what_is_recorded_and_what_is_not() {
        // Recorded 0–10 s and 40–50 s; the device holds 0–60 s.
        let (have, lack) = split(0, 60 * S, vec![(40 * S, 50 * S), (0, 10 * S)]);
        assert_eq!(have, vec![(0, 10 * S), (40 * S, 50 * S)]);
        assert_eq!(lack, vec![(10 * S, 40 * S), (50 * S, 60 * S)]);
        // Segments that abut (within a frame) leave no hole.
        let (have, lack) = split(0, 8 * S, vec![(0, 4 * S), (4 * S + 30_000, 8 * S)]);
        assert_eq!((have, lack), (vec![(0, 8 * S)], vec![]));
        // Nothing recorded: all of it is asked for.
        assert_eq!(split(5 * S, 9 * S, vec![]), (vec![], vec![(5 * S, 9 * S)]));
    }
}
