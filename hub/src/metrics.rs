//! Prometheus metrics. Hot-path counts live in the relay core's atomics and are read at
//! scrape time; the rest are prometheus counters and a lock-free histogram.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::registry::Units;

pub struct Metrics {
    registry: Registry,
    pub frames_out: IntCounter,
    pub bytes_out: IntCounter,
    pub forward_latency: Histogram,
    pub sessions: IntCounterVec,
    pub sessions_closed: IntCounterVec,
    /// Hellos read before the handshake ended (0-RTT data of a resuming client).
    pub early_hellos: IntCounter,
    pub telemetry: IntCounter,
    pub console_sessions: IntGauge,
    pub webrtc_peers: IntGauge,
    pub console_tiles: IntGauge,
    pub recordings_active: IntGauge,
    pub recorded_segments: IntCounter,
    /// Groups from devices' spools (backfill) taken in, and segments recorded from them.
    pub backfill_groups: IntCounter,
    pub backfill_segments: IntCounter,
    /// Groups devices reported they could not spool (full of unrecorded data).
    pub spool_refused: IntCounter,
    pub recorded_bytes: IntCounter,
    pub recording_errors: IntCounter,
    pub recording_lag: Histogram,
    pub retention_deleted: IntCounter,
    pub alarms_raised: IntCounterVec,
    /// Escalated here to the parent court (not acknowledged in time), by rule.
    pub alarms_escalated: IntCounterVec,
    pub telemetry_rejected: IntCounterVec,
    /// Media from WHIP publishers that the hub would not relay, by reason.
    pub whip_dropped: IntCounterVec,
    /// A video link's camera frames from consoles not relayed, by reason.
    pub link_dropped: IntCounterVec,
    /// Units pulled from child hubs right now (one per unit, however many watch here).
    pub cascade_pulls: IntGauge,
    pub cascade_pulls_started: IntCounter,
    /// Subscriptions the parent hub holds here right now.
    pub cascade_served: IntGauge,
    pub cascade_children: IntGauge,
    /// 1 while this hub is linked to its parent.
    pub cascade_uplink: IntGauge,
    pub directives: IntCounterVec,
}

/// Reads the units registry and the relay core's counters when scraped.
struct Live {
    units: Arc<Units>,
    scrape: Mutex<()>,
    units_online: IntGauge,
    tracks: IntGauge,
    subscribers: IntGauge,
    frames_in: IntCounter,
    bytes_in: IntCounter,
    groups_in: IntCounter,
    frames_stale_in: IntCounter,
    dropped: IntCounterVec,
    descs: Vec<Desc>,
}

fn advance(counter: &IntCounter, to: u64) {
    let now = counter.get();
    if to > now {
        counter.inc_by(to - now);
    }
}

impl Collector for Live {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // Scrapes one at a time, so counters only move forward.
        let _guard = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        let list = self.units.list();
        self.units_online
            .set(list.iter().filter(|b| b.is_online()).count() as i64);
        let tracks: Vec<_> = list.iter().flat_map(|b| b.tracks()).collect();
        self.tracks.set(tracks.len() as i64);
        self.subscribers.set(
            tracks
                .iter()
                .map(|t| t.track.subscriber_count() as i64)
                .sum(),
        );
        let relay = self.units.relay_stats();
        advance(&self.frames_in, relay.frames_in.load(Relaxed));
        advance(&self.bytes_in, relay.bytes_in.load(Relaxed));
        advance(&self.groups_in, relay.groups_in.load(Relaxed));
        advance(&self.frames_stale_in, relay.frames_stale_in.load(Relaxed));
        advance(
            &self.dropped.with_label_values(&["queue_full"]),
            relay.dropped_queue_full.load(Relaxed),
        );
        advance(
            &self.dropped.with_label_values(&["skipped"]),
            relay.dropped_skipped.load(Relaxed),
        );
        let mut out = Vec::new();
        out.extend(self.units_online.collect());
        out.extend(self.tracks.collect());
        out.extend(self.subscribers.collect());
        out.extend(self.frames_in.collect());
        out.extend(self.bytes_in.collect());
        out.extend(self.groups_in.collect());
        out.extend(self.frames_stale_in.collect());
        out.extend(self.dropped.collect());
        out
    }
}

/// Reads the runtime's live task count when scraped.
struct TaskGauge(IntGauge);

impl Collector for TaskGauge {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            self.0.set(handle.metrics().num_alive_tasks() as i64);
        }
        self.0.collect()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    pub fn new(units: Arc<Units>) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let live = Live {
            units,
            scrape: Mutex::new(()),
            units_online: IntGauge::new("tianwang_units_online", "Units with a live publisher")?,
            tracks: IntGauge::new("tianwang_tracks", "Tracks of all known broadcasts")?,
            subscribers: IntGauge::new(
                "tianwang_subscribers",
                "Subscriptions to tracks (one per subscriber and track)",
            )?,
            frames_in: IntCounter::new(
                "tianwang_frames_in_total",
                "Frames received from publishers",
            )?,
            bytes_in: IntCounter::new(
                "tianwang_bytes_in_total",
                "Payload bytes of frames received from publishers",
            )?,
            groups_in: IntCounter::new(
                "tianwang_groups_in_total",
                "Groups (GOPs) begun by publishers",
            )?,
            frames_stale_in: IntCounter::new(
                "tianwang_frames_stale_in_total",
                "Frames of a group that a newer group had superseded on arrival",
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "tianwang_frames_dropped_total",
                    "Frames not delivered to a subscriber, by reason",
                ),
                &["reason"],
            )?,
            descs: Vec::new(),
        };
        let descs = [
            live.units_online.desc(),
            live.tracks.desc(),
            live.subscribers.desc(),
            live.frames_in.desc(),
            live.bytes_in.desc(),
            live.groups_in.desc(),
            live.frames_stale_in.desc(),
            live.dropped.desc(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        registry.register(Box::new(Live { descs, ..live }))?;

        let frames_out = IntCounter::new(
            "tianwang_frames_out_total",
            "Frames handed to subscribers' transports",
        )?;
        let bytes_out = IntCounter::new(
            "tianwang_bytes_out_total",
            "Bytes of frames handed to subscribers' transports",
        )?;
        let forward_latency = Histogram::with_opts(
            HistogramOpts::new(
                "tianwang_forward_latency_seconds",
                "From a frame fully received to handed to a subscriber's transport",
            )
            .buckets(vec![
                // Fine around 1–3 ms: the hub-added delay target is read from here.
                0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005,
                0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
        )?;
        let sessions = IntCounterVec::new(
            Opts::new("tianwang_sessions_total", "Sessions accepted, by role"),
            &["role"],
        )?;
        let sessions_closed = IntCounterVec::new(
            Opts::new(
                "tianwang_sessions_closed_total",
                "Sessions the hub closed, by reason (bad input, auth, replaced, shutdown)",
            ),
            &["reason"],
        )?;
        let early_hellos = IntCounter::new(
            "tianwang_quic_early_hellos_total",
            "Hellos read before their connection's handshake ended: clients that resumed a session said hello in 0-RTT data and were welcomed a round trip sooner",
        )?;
        let telemetry = IntCounter::new(
            "tianwang_telemetry_total",
            "Telemetry messages received from units",
        )?;
        let console_sessions = IntGauge::new(
            "tianwang_console_sessions",
            "Console sessions open (gRPC and WebSocket)",
        )?;
        let webrtc_peers = IntGauge::new(
            "tianwang_webrtc_peers",
            "WebRTC PeerConnections open (consoles and WHEP viewers)",
        )?;
        let console_tiles = IntGauge::new(
            "tianwang_webrtc_tiles",
            "Units shown over WebRTC (console tiles and WHEP viewers)",
        )?;
        let tasks = IntGauge::new(
            "tianwang_tasks_alive",
            "Tasks alive in the hub's runtime (a leak shows here)",
        )?;
        let recordings_active =
            IntGauge::new("tianwang_recordings_active", "Units being recorded now")?;
        let recorded_segments = IntCounter::new(
            "tianwang_recorded_segments_total",
            "Media segments written and indexed",
        )?;
        let backfill_groups = IntCounter::new(
            "tianwang_backfill_groups_total",
            "Groups from devices' spools sent as backfill and taken in",
        )?;
        let backfill_segments = IntCounter::new(
            "tianwang_backfill_segments_total",
            "Media segments recorded from backfill",
        )?;
        let spool_refused = IntCounter::new(
            "tianwang_spool_refused_groups_total",
            "Groups devices could not keep in their spool (full of unrecorded evidence)",
        )?;
        let recorded_bytes = IntCounter::new(
            "tianwang_recorded_bytes_total",
            "Bytes of media segments written",
        )?;
        let recording_errors = IntCounter::new(
            "tianwang_recording_errors_total",
            "Segments that could not be written or indexed (disk full, index down)",
        )?;
        let recording_lag = Histogram::with_opts(
            HistogramOpts::new(
                "tianwang_recording_lag_seconds",
                "From a segment's last capture time to its index row written",
            )
            .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
        )?;
        let retention_deleted = IntCounter::new(
            "tianwang_retention_deleted_total",
            "Recorded files deleted by retention",
        )?;
        let alarms_raised = IntCounterVec::new(
            Opts::new("tianwang_alarms_raised_total", "Alarms raised, by rule"),
            &["rule"],
        )?;
        let telemetry_rejected = IntCounterVec::new(
            Opts::new(
                "tianwang_telemetry_rejected_total",
                "Telemetry points refused or lost, by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(alarms_raised.clone()))?;
        let alarms_escalated = IntCounterVec::new(
            Opts::new(
                "tianwang_alarms_escalated_total",
                "Alarms escalated to the parent court, not acknowledged in time, by rule",
            ),
            &["rule"],
        )?;
        registry.register(Box::new(alarms_escalated.clone()))?;
        registry.register(Box::new(telemetry_rejected.clone()))?;
        let whip_dropped = IntCounterVec::new(
            Opts::new(
                "tianwang_whip_dropped_total",
                "WHIP media not relayed: frames over the size limit or undecodable, streams the \
                 offer did not announce, sessions whose media never came; by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(whip_dropped.clone()))?;
        let link_dropped = IntCounterVec::new(
            Opts::new(
                "tianwang_link_dropped_total",
                "Video link camera media from consoles not relayed (lost, undecodable, \
                 oversize, a codec the hub cannot relay), by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(link_dropped.clone()))?;
        for c in [
            &recorded_segments,
            &backfill_groups,
            &backfill_segments,
            &spool_refused,
            &recorded_bytes,
            &recording_errors,
            &retention_deleted,
        ] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(recordings_active.clone()))?;
        registry.register(Box::new(recording_lag.clone()))?;
        registry.register(Box::new(console_sessions.clone()))?;
        registry.register(Box::new(webrtc_peers.clone()))?;
        registry.register(Box::new(console_tiles.clone()))?;
        registry.register(Box::new(TaskGauge(tasks)))?;
        registry.register(Box::new(frames_out.clone()))?;
        registry.register(Box::new(bytes_out.clone()))?;
        registry.register(Box::new(forward_latency.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(sessions_closed.clone()))?;
        registry.register(Box::new(early_hellos.clone()))?;
        registry.register(Box::new(telemetry.clone()))?;
        let cascade_pulls = IntGauge::new(
            "tianwang_cascade_pulls",
            "Units pulled from child hubs now (one upstream stream each)",
        )?;
        let cascade_pulls_started = IntCounter::new(
            "tianwang_cascade_pulls_total",
            "Pulls of units from child hubs started",
        )?;
        let cascade_served = IntGauge::new(
            "tianwang_cascade_served",
            "Units the parent hub pulls from this hub now",
        )?;
        let cascade_children = IntGauge::new("tianwang_cascade_children", "Child hubs linked now")?;
        let cascade_uplink = IntGauge::new(
            "tianwang_cascade_uplink",
            "1 while this hub is linked to its parent",
        )?;
        let directives = IntCounterVec::new(
            Opts::new(
                "tianwang_directives_total",
                "Directives issued here, by kind",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(cascade_pulls.clone()))?;
        registry.register(Box::new(cascade_pulls_started.clone()))?;
        registry.register(Box::new(cascade_served.clone()))?;
        registry.register(Box::new(cascade_children.clone()))?;
        registry.register(Box::new(cascade_uplink.clone()))?;
        registry.register(Box::new(directives.clone()))?;
        Ok(Self {
            cascade_pulls,
            cascade_pulls_started,
            cascade_served,
            cascade_children,
            cascade_uplink,
            directives,
            registry,
            frames_out,
            bytes_out,
            forward_latency,
            sessions,
            sessions_closed,
            early_hellos,
            telemetry,
            console_sessions,
            webrtc_peers,
            console_tiles,
            recordings_active,
            recorded_segments,
            backfill_groups,
            backfill_segments,
            spool_refused,
            recorded_bytes,
            recording_errors,
            recording_lag,
            retention_deleted,
            alarms_raised,
            alarms_escalated,
            telemetry_rejected,
            whip_dropped,
            link_dropped,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
