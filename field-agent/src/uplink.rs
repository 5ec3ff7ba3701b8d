//! The QUIC uplink of one unit: hello, announce, one sender per track, the control loop
//! (keyframe requests, directives, telemetry, talkback and its group streams from the hub),
//! and reconnection with backoff when the hub goes away. Capture never waits for the
//! uplink: while it is down, the local tracks keep only their newest group, and a reconnect
//! starts from that group's keyframe.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use secrecy::{ExposeSecret, SecretString};
use tianwang_proto::v1::{self, Announce, DeviceInfo, Hello, Telemetry};
use tianwang_proto::{ControlMessage, ErrorCode, Kind};
use tianwang_transport::client;
use tianwang_transport::control::{self, ControlError};
use tianwang_transport::{Limits, Priority, Reordering, Trust, send_track};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::abr::{PathSample, RateConfig, RateController};
use crate::broadcast::LocalBroadcast;
use crate::directives::Directives;
use crate::talkback::{Talkback, TalkbackConfig, TalkbackStats};

#[derive(Clone)]
pub struct UplinkConfig {
    /// host:port of the hub's QUIC listener.
    pub hub: String,
    /// The device token: a secret, so never printed (`secrecy`).
    pub token: SecretString,
    pub trust: Trust,
    pub device: DeviceInfo,
    /// Backoff between reconnects.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub limits: Limits,
    /// Where the position in the telemetry comes from (none: no position).
    pub position: Option<crate::position::PositionSource>,
    /// The SOS button: pressed until this instant (SIGUSR1 presses it for a while).
    pub sos: Arc<std::sync::Mutex<Option<Instant>>>,
    /// Where the unit keeps its files: the telemetry's free storage is measured there,
    /// talkback is kept there.
    pub data_dir: std::path::PathBuf,
    /// Play talkback from the command centre to the speaker (else keep it in files only).
    pub speaker: bool,
}

impl UplinkConfig {
    pub fn new(hub: String, token: impl Into<SecretString>, trust: Trust) -> Self {
        Self {
            hub,
            token: token.into(),
            trust,
            device: DeviceInfo {
                model: "tianwang-field-agent".into(),
                software: env!("CARGO_PKG_VERSION").into(),
                ..Default::default()
            },
            min_backoff: Duration::from_millis(200),
            // Attempts themselves are staggered (a new one a second while the link is
            // dark): the pause between rounds stays short, so a returning link is used
            // within about a second.
            max_backoff: Duration::from_secs(2),
            position: None,
            sos: Arc::default(),
            data_dir: ".".into(),
            speaker: false,
            limits: Limits {
                // Notice a dead link within a few seconds.
                idle_timeout: Duration::from_secs(6),
                // A handshake packet lost to a dark link is sent again soon.
                initial_rtt: Some(Duration::from_millis(100)),
                // Radio paths reorder; only this uplink widens quinn's loss thresholds.
                reordering: Some(Reordering::MOBILE),
                ..Limits::default()
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The hub refused who we are: retrying cannot help.
    #[error("the hub refused this unit: {0}")]
    Refused(String),
    #[error("{0}")]
    Setup(String),
}

/// Counters of an uplink, for logs and tests.
#[derive(Debug, Default)]
pub struct UplinkStats {
    pub connects: AtomicU64,
    /// Connections whose hello went in 0-RTT data and was taken (a resumed session).
    pub early_hellos: AtomicU64,
    pub frames_sent: AtomicU64,
    pub telemetry_sent: AtomicU64,
    pub talkback: Arc<TalkbackStats>,
}

/// Keeps the unit connected until `shutdown`. Returns early only when the hub refuses the
/// unit's identity (bad token, wrong unit), which reconnecting would not fix. Directives
/// go to `directives`; their Acks go out on whichever session is up.
pub async fn run(
    config: UplinkConfig,
    broadcast: Arc<LocalBroadcast>,
    directives: Arc<Directives>,
    stats: Arc<UplinkStats>,
    shutdown: CancellationToken,
) -> Result<(), UplinkError> {
    let span = tracing::info_span!("uplink", unit = %broadcast.unit);
    async move {
        let mut backoff = new_backoff(&config);
        let mut endpoint: Option<(bool, quinn::Endpoint)> = None;
        // Adaptive bitrate carries its target across reconnects (a path that was full is
        // likely still full).
        let mut rate = broadcast
            .rate_control()
            .map(|r| RateController::new(RateConfig::default(), r.cap()));
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let started = Instant::now();
            let outcome = tokio::select! {
                r = session(&config, &broadcast, &directives, &stats, &mut endpoint, &mut rate, &shutdown) => r,
                _ = shutdown.cancelled() => return Ok(()),
            };
            match outcome {
                Ok(()) => return Ok(()),
                Err(SessionEnd::Fatal(reason)) => return Err(UplinkError::Refused(reason)),
                Err(SessionEnd::Retry(reason)) => {
                    // A connection that lived a while earns a fresh backoff.
                    if started.elapsed() > Duration::from_secs(10) {
                        backoff = new_backoff(&config);
                    }
                    // Jitter may push a delay past the cap: hold it to the cap.
                    let delay = backoff
                        .next()
                        .unwrap_or(config.max_backoff)
                        .min(config.max_backoff);
                    warn!(%reason, retry_in = ?delay, "uplink down");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                }
            }
        }
    }
    .instrument(span)
    .await
}

fn new_backoff(config: &UplinkConfig) -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(config.min_backoff)
        .with_max_delay(config.max_backoff)
        .with_jitter()
        .without_max_times()
        .build()
}

enum SessionEnd {
    Retry(String),
    Fatal(String),
}

/// Whether reconnecting could help. A refused identity will be refused again; being
/// replaced means another device is using this unit's id (this agent never has two
/// connections), and fighting it over the slot would cut both off in turn.
async fn classify(e: impl Into<Ended>, conn: &quinn::Connection) -> SessionEnd {
    let e = e.into();
    if let Ended::Control(ControlError::Refused { code, reason }) = &e {
        return fatal_or_retry(*code, reason);
    }
    // The hub ends a session by closing the connection with a code and a reason, but a
    // stream may report the end first (its control stream finished, a group stream
    // stopped): give the close frame a moment to arrive before deciding.
    let closed = match conn.close_reason() {
        Some(c) => Some(c),
        None => tokio::time::timeout(CLOSE_GRACE, conn.closed()).await.ok(),
    };
    match closed {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            let code = ErrorCode::try_from(close.error_code.into_inner() as i32)
                .unwrap_or(ErrorCode::Unspecified);
            fatal_or_retry(code, &String::from_utf8_lossy(&close.reason))
        }
        _ => SessionEnd::Retry(e.to_string()),
    }
}

/// How long a stream error waits for the connection's close reason.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

fn fatal_or_retry(code: ErrorCode, reason: &str) -> SessionEnd {
    let message = format!("{code:?}: {reason}");
    match code {
        ErrorCode::Unauthorized | ErrorCode::Forbidden | ErrorCode::Replaced => {
            SessionEnd::Fatal(message)
        }
        _ => SessionEnd::Retry(message),
    }
}

/// What ended a session, before it is classified.
enum Ended {
    Control(ControlError),
    Other(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Control(e) => e.fmt(f),
            Ended::Other(s) => f.write_str(s),
        }
    }
}

impl From<ControlError> for Ended {
    fn from(e: ControlError) -> Self {
        Ended::Control(e)
    }
}

impl From<String> for Ended {
    fn from(s: String) -> Self {
        Ended::Other(s)
    }
}

async fn session(
    config: &UplinkConfig,
    broadcast: &Arc<LocalBroadcast>,
    directives: &Directives,
    stats: &Arc<UplinkStats>,
    endpoint: &mut Option<(bool, quinn::Endpoint)>,
    rate: &mut Option<RateController>,
    shutdown: &CancellationToken,
) -> Result<(), SessionEnd> {
    let target = tianwang_transport::endpoint::resolve(&config.hub)
        .await
        .map_err(|e| SessionEnd::Retry(e.to_string()))?;
    let ep = match endpoint {
        Some((v6, ep)) if *v6 == target.is_ipv6() => ep.clone(),
        _ => {
            let ep = tianwang_transport::client_endpoint(
                &config.trust,
                &config.limits,
                target.is_ipv6(),
            )
            .map_err(|e| SessionEnd::Fatal(e.to_string()))?;
            *endpoint = Some((target.is_ipv6(), ep.clone()));
            ep
        }
    };
    let hello = Hello {
        role: v1::Role::Publisher as i32,
        unit_id: broadcast.unit.clone(),
        token: config.token.expose_secret().to_owned(),
        device: Some(config.device.clone()),
        ..Default::default()
    };
    let tianwang_transport::endpoint::Connected {
        conn,
        mut control,
        early,
    } = tianwang_transport::endpoint::connect_staggered(
        &ep,
        &config.hub,
        CONNECT_EVERY,
        CONNECT_WITHIN,
        &hello,
    )
    .await
    .map_err(|e| SessionEnd::Retry(e.to_string()))?;
    if let Err(e) = client::welcome(&mut control, Duration::from_secs(10)).await {
        return Err(classify(e, &conn).await);
    }
    if early {
        stats.early_hellos.fetch_add(1, Ordering::Relaxed);
    }
    let announce = ControlMessage::new(Kind::Announce(Announce {
        tracks: broadcast.infos(),
    }));
    if let Err(e) = control.send(announce).await {
        return Err(classify(e, &conn).await);
    }
    // What the spool holds that the hub has not confirmed: the hub asks for what its
    // recording lacks.
    if let Some(spool) = broadcast.spool() {
        let holdings = spool.holdings(None);
        if !holdings.ranges.is_empty() || holdings.refused_groups > 0 {
            info!(
                windows = holdings.ranges.len(),
                refused = holdings.refused_groups,
                "telling the hub what the spool holds"
            );
        }
        if let Err(e) = control
            .send(ControlMessage::new(Kind::Holdings(holdings)))
            .await
        {
            return Err(classify(e, &conn).await);
        }
    }
    stats.connects.fetch_add(1, Ordering::Relaxed);
    info!(hub = %config.hub, early, "connected");

    let mut senders = JoinSet::new();
    let priority = Priority::default();
    for t in &broadcast.tracks {
        let conn = conn.clone();
        let sub = t.track.subscribe();
        let id = t.info.id;
        let base = if t.info.kind() == v1::TrackKind::Audio {
            Priority::AUDIO
        } else {
            0
        };
        let priority = priority.clone();
        let stats = Arc::clone(stats);
        senders.spawn(async move {
            let sent = |_: &tianwang_core::Frame, _| {
                stats.frames_sent.fetch_add(1, Ordering::Relaxed);
            };
            send_track(&conn, id, &priority, base, sub, sent).await
        });
    }

    let (mut tx, mut rx) = control.split();
    // One session at a time: this lock is never contended.
    let mut acks = directives.acks().lock().await;
    let mut telemetry = tokio::time::interval(Duration::from_secs(1));
    let mut talkback = Talkback::new(
        TalkbackConfig {
            data_dir: config.data_dir.clone(),
            speaker: config.speaker,
        },
        Arc::clone(&stats.talkback),
    );
    let mut backfills: JoinSet<()> = JoinSet::new();
    let mut queued: Vec<(crate::spool::Key, std::path::PathBuf)> = Vec::new();
    let mut missed = tokio::time::interval(MISSED_CHECK);
    let mut path = PathWatch::new(&conn);
    let mut steer = tokio::time::interval(Duration::from_secs(1));
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                use futures::SinkExt;
                let _ = tx.send(control::close_message(ErrorCode::Unspecified, "agent stopping")).await;
                conn.close(tianwang_transport::close_code(ErrorCode::Unspecified), b"agent stopping");
                break Ok(());
            }
            msg = control::recv(&mut rx) => match msg {
                Ok(ControlMessage { kind: Some(Kind::Recorded(r)) }) => {
                    if let Some(spool) = broadcast.spool().cloned() {
                        // Renames on the spool's disk: off the control loop.
                        tokio::task::spawn_blocking(move || spool.recorded(&r.ranges, &r.track_ids));
                    }
                }
                Ok(ControlMessage { kind: Some(Kind::BackfillRequest(req)) }) => {
                    if let Some(spool) = broadcast.spool().cloned() {
                        let groups = spool.take_for_backfill(&req.ranges);
                        info!(windows = req.ranges.len(), groups = groups.len(), "the hub asked for backfill");
                        // One sender at a time keeps the groups in order: later requests queue.
                        queued.extend(groups);
                        queued.sort_by_key(|(k, _)| *k);
                        if backfills.is_empty() && !queued.is_empty() {
                            backfills.spawn(send_backfill(conn.clone(), spool, std::mem::take(&mut queued)).in_current_span());
                        }
                    }
                }
                Ok(m) => handle_control(broadcast, directives, &mut talkback, m),
                Err(e) => break Err(classify(e, &conn).await),
            },
            _ = steer.tick(), if rate.is_some() => {
                if let (Some(c), Some(r)) = (rate.as_mut(), broadcast.rate_control()) {
                    let sample = path.sample(&conn, !backfills.is_empty() || !queued.is_empty());
                    c.set_cap(r.cap());
                    let (before, picture_before) = (c.target(), c.picture());
                    let target = c.tick(&sample);
                    let lost = sample.lost_packets as f64 / sample.sent_packets.max(1) as f64;
                    if c.picture() != picture_before {
                        // The smaller picture first, then the floor it allows.
                        r.picture(c.picture());
                        info!(kbps = target, rtt_ms = sample.rtt.as_millis() as u64,
                            loss_pct = format!("{:.1}", lost * 100.0),
                            "adaptive bitrate: picture at {}", c.picture());
                    }
                    if target != before {
                        r.steer(target);
                        info!(kbps = target, cap = c.cap(), rtt_ms = sample.rtt.as_millis() as u64,
                            loss_pct = format!("{:.1}", lost * 100.0), "adaptive bitrate: {target} kbit/s");
                    }
                }
            }
            Some(_) = backfills.join_next(), if !backfills.is_empty() => {
                if let Some(spool) = broadcast.spool().cloned().filter(|_| !queued.is_empty()) {
                    backfills.spawn(send_backfill(conn.clone(), spool, std::mem::take(&mut queued)).in_current_span());
                }
            }
            _ = missed.tick() => {
                // Groups the hub has not recorded though it recorded later ones (the link
                // lost them live, a hub restart): the hub hears of them again; and of
                // groups a full spool could not keep, at once.
                if let Some(spool) = broadcast.spool().filter(|s| s.has_news()) {
                    use futures::SinkExt;
                    let holdings = spool.holdings(Some(spool.recorded_until()));
                    if (!holdings.ranges.is_empty() || holdings.refused_groups > 0)
                        && let Err(e) = tx.send(ControlMessage::new(Kind::Holdings(holdings))).await
                    {
                        break Err(classify(e, &conn).await);
                    }
                }
            }
            // The hub's only streams towards a unit carry talkback.
            stream = conn.accept_uni() => match stream {
                Ok(recv) => talkback.accept(recv),
                Err(e) => break Err(classify(e.to_string(), &conn).await),
            },
            Some(ack) = acks.recv() => {
                use futures::SinkExt;
                if let Err(e) = tx.send(ControlMessage::new(Kind::Ack(ack))).await {
                    break Err(classify(e, &conn).await);
                }
            }
            _ = telemetry.tick() => {
                use futures::SinkExt;
                let t = ControlMessage::new(Kind::Telemetry(current_telemetry(config, broadcast)));
                if let Err(e) = tx.send(t).await {
                    break Err(classify(e, &conn).await);
                }
                stats.telemetry_sent.fetch_add(1, Ordering::Relaxed);
            }
            Some(done) = senders.join_next() => {
                match done {
                    Ok(Ok(summary)) => debug!(?summary, "track sender ended"),
                    Ok(Err(e)) => break Err(classify(e.to_string(), &conn).await),
                    Err(e) => break Err(SessionEnd::Retry(format!("track sender failed: {e}"))),
                }
            }
        }
    };
    senders.shutdown().await;
    backfills.shutdown().await;
    if result.is_err() {
        conn.close(
            tianwang_transport::close_code(ErrorCode::Unspecified),
            b"reconnecting",
        );
    }
    // A talk ends with its session; its file is finished before the next one starts.
    talkback.close().await;
    result
}

/// The QUIC path's figures between two ticks of adaptive bitrate.
struct PathWatch {
    last: quinn::PathStats,
    min_rtt: Duration,
}

impl PathWatch {
    fn new(conn: &quinn::Connection) -> Self {
        let last = conn.stats().path;
        Self {
            min_rtt: last.rtt,
            last,
        }
    }

    fn sample(&mut self, conn: &quinn::Connection, backfilling: bool) -> PathSample {
        let now = conn.stats().path;
        self.min_rtt = self.min_rtt.min(now.rtt);
        let s = PathSample {
            rtt: now.rtt,
            min_rtt: self.min_rtt,
            sent_packets: now.sent_packets.saturating_sub(self.last.sent_packets),
            lost_packets: now.lost_packets.saturating_sub(self.last.lost_packets),
            congestion_events: now
                .congestion_events
                .saturating_sub(self.last.congestion_events),
            backfilling,
        };
        self.last = now;
        s
    }
}

/// A new connection attempt this often while earlier ones wait, for this long.
const CONNECT_EVERY: Duration = Duration::from_secs(1);
const CONNECT_WITHIN: Duration = Duration::from_secs(30);

/// How often the uplink looks for spooled groups the hub missed live.
const MISSED_CHECK: Duration = Duration::from_secs(5);

/// Backfill streams in flight at once: few, so groups reach the hub nearly in order.
const BACKFILL_IN_FLIGHT: usize = 4;

/// Sends spooled groups as backfill streams, oldest first, below live media, with at most
/// a few unacknowledged at a time.
async fn send_backfill(
    conn: quinn::Connection,
    spool: Arc<crate::spool::Spool>,
    groups: Vec<(crate::spool::Key, std::path::PathBuf)>,
) {
    let total = groups.len();
    let mut in_flight = JoinSet::new();
    for (n, (_, path)) in groups.into_iter().enumerate() {
        let data = match tokio::fs::read(&path).await {
            Ok(d) => d,
            Err(e) => {
                // Delivered (and evicted) meanwhile, or the disk failed: the next holdings
                // tell the hub what is still there.
                debug!(file = %path.display(), error = %e, "a spooled group is gone");
                continue;
            }
        };
        while in_flight.len() >= BACKFILL_IN_FLIGHT {
            in_flight.join_next().await;
        }
        let mut send = match conn.open_uni().await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, sent = n, total, "backfill ended with the connection");
                return;
            }
        };
        // Below all live media, and the oldest first (live goes newest first).
        let _ = send.set_priority(Priority::BACKFILL.saturating_sub(n.min(1 << 20) as i32));
        if let Err(e) = send.write_all(&data).await {
            debug!(error = %e, sent = n, total, "backfill ended");
            return;
        }
        let _ = send.finish();
        // Done once the hub has read it all (or stopped it).
        in_flight.spawn(async move {
            let _ = send.stopped().await;
        });
        spool
            .stats
            .backfill_groups_sent
            .fetch_add(1, Ordering::Relaxed);
    }
    while in_flight.join_next().await.is_some() {}
    info!(groups = total, "backfill sent");
}

fn handle_control(
    broadcast: &LocalBroadcast,
    directives: &Directives,
    talkback: &mut Talkback,
    msg: ControlMessage,
) {
    match msg.kind {
        Some(Kind::KeyframeRequest(k)) => {
            debug!(track = k.track_id, "keyframe requested");
            broadcast.request_keyframe(k.track_id);
        }
        Some(Kind::Directive(d)) => directives.submit(d),
        Some(Kind::Talkback(t)) => talkback.control(t),
        other => {
            debug!(
                kind = ControlMessage { kind: other }.kind_name(),
                "ignoring control message"
            );
        }
    }
}

/// What the device knows of itself right now.
fn current_telemetry(config: &UplinkConfig, broadcast: &LocalBroadcast) -> Telemetry {
    let storage_free_bytes = nix::sys::statvfs::statvfs(&config.data_dir)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .unwrap_or(0);
    Telemetry {
        timestamp_us: crate::unix_now_us(),
        storage_free_bytes,
        // Off live, only the spool records (and without one, nothing does): the hub's
        // recording has stopped either way, and the hub should know.
        recording: broadcast.is_live(),
        battery_percent: battery_percent().unwrap_or(0.0),
        sos: config
            .sos
            .lock()
            .map(|until| until.is_some_and(|u| Instant::now() < u))
            .unwrap_or(false),
        position: config.position.as_ref().and_then(|p| p.position()),
        ..Default::default()
    }
}

/// The first battery the kernel reports, if any.
fn battery_percent() -> Option<f32> {
    let dir = std::fs::read_dir("/sys/class/power_supply").ok()?;
    dir.flatten().find_map(|e| {
        std::fs::read_to_string(e.path().join("capacity"))
            .ok()?
            .trim()
            .parse()
            .ok()
    })
}
