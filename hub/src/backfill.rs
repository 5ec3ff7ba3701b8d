//! Backfill: what a device's spool holds fills what the unit's recording lacks.
//!
//! The recorder confirms to the device what its recording holds (`Recorded`), frame by
//! frame: the runs of frames it wrote without a hole, never a segment's whole span (a
//! group whose tail was lost, or one skipped on a slow link, lies inside a span). The
//! device says what it holds that was not confirmed (`Holdings`, after Announce and again
//! while it has groups older than what the hub confirmed), and the hub asks for all of it
//! (`BackfillRequest`). The device then sends those groups, flagged backfill, below live
//! media; they go into the unit's backfill tracks, which only the recorder reads, and the
//! recorder writes them into the unit's chain as recordings of their own with their
//! original capture times, confirming them in turn.

use std::sync::Arc;

use tianwang_proto::v1::{BackfillRequest, Holdings, TimeRange};
use tianwang_proto::{ControlMessage, Kind};
use tracing::{info, warn};

use crate::registry::Broadcast;
use crate::session::HubContext;

/// Windows one Holdings may carry.
pub const MAX_WINDOWS: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HoldingsError {
    #[error("holdings with {0} windows (at most {MAX_WINDOWS})")]
    TooMany(usize),
}

/// Checks a device's Holdings and asks for what it holds.
pub fn holdings(
    hub: &Arc<HubContext>,
    broadcast: &Arc<Broadcast>,
    h: Holdings,
) -> Result<(), HoldingsError> {
    if h.ranges.len() > MAX_WINDOWS {
        return Err(HoldingsError::TooMany(h.ranges.len()));
    }
    let unit = broadcast.unit_id.clone();
    // The alarm rule `spool_full` raises on refusals and clears on a report without.
    let field = hub.field.clone();
    let (who, refused) = (unit.clone(), h.refused_groups);
    tokio::spawn(async move { field.spool(&who, refused).await });
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
    // The device holds only what the hub has not confirmed, and confirmations are made
    // frame by frame as segments are written: what it holds is what the recording lacks
    // (or a confirmation lost on the way, recorded twice then).
    let seconds = windows.iter().map(|(f, t)| t - f).sum::<u64>() as f64 / 1e6;
    info!(
        windows = windows.len(),
        seconds, "asking the unit for what its recording lacks"
    );
    broadcast.send_control(ControlMessage::new(Kind::BackfillRequest(
        BackfillRequest {
            ranges: windows
                .into_iter()
                .map(|(from_us, to_us)| TimeRange { from_us, to_us })
                .collect(),
        },
    )));
    Ok(())
}

/// Tells a unit that its recording holds these windows (capture time) of its track
/// `name`, so its spool may let them go (kept for the next one if its control queue is
/// full: a confirmation lost would leave recorded groups in the spool).
pub fn confirm(broadcast: &Broadcast, name: &str, windows: &[(u64, u64)]) {
    broadcast.confirm(name, windows);
}
