use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters of a whole relay, shared by all its tracks. Plain atomics: the shell exports them
/// (Prometheus) at scrape time, so counting costs one relaxed add on the hot path.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub frames_in: AtomicU64,
    /// Payload bytes of those frames.
    pub bytes_in: AtomicU64,
    pub groups_in: AtomicU64,
    /// Frames of a group older than the track's newest, arriving late from the publisher.
    pub frames_stale_in: AtomicU64,
    /// Frames a full subscriber queue evicted to make room for a newer one.
    pub dropped_queue_full: AtomicU64,
    /// Frames a subscriber skipped: the rest of a group it could not have whole, or a group
    /// it was too far behind to still want.
    pub dropped_skipped: AtomicU64,
}

impl RelayStats {
    pub fn dropped_total(&self) -> u64 {
        self.dropped_queue_full.load(Relaxed) + self.dropped_skipped.load(Relaxed)
    }
}

/// Counters of one subscriber.
#[derive(Debug, Default)]
pub struct SubscriberStats {
    pub delivered: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_skipped: AtomicU64,
    pub groups_skipped: AtomicU64,
}

/// A copy of [`SubscriberStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubscriberStatsSnapshot {
    pub delivered: u64,
    pub dropped_queue_full: u64,
    pub dropped_skipped: u64,
    pub groups_skipped: u64,
}

impl SubscriberStatsSnapshot {
    pub fn dropped(&self) -> u64 {
        self.dropped_queue_full + self.dropped_skipped
    }
}

impl SubscriberStats {
    pub fn snapshot(&self) -> SubscriberStatsSnapshot {
        SubscriberStatsSnapshot {
            delivered: self.delivered.load(Relaxed),
            dropped_queue_full: self.dropped_queue_full.load(Relaxed),
            dropped_skipped: self.dropped_skipped.load(Relaxed),
            groups_skipped: self.groups_skipped.load(Relaxed),
        }
    }
}
