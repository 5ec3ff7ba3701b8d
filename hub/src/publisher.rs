//! A publisher's session: a field unit announces its tracks and sends one group stream per
//! group; the hub reads each into the unit's relay track.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use std::sync::atomic::{AtomicU32, Ordering};
use tianwang_core::frame::FrameIn;
use tianwang_core::track::PushOutcome;
use tianwang_proto::{ControlMessage, ErrorCode, Kind};
use tianwang_transport::STREAM_STALE;
use tianwang_transport::control::{self, Control, ControlError};
use tianwang_transport::group::{GroupError, GroupReader};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::registry::{Attached, Broadcast, PublisherLink, TrackEntry, Units, validate_announce};
use crate::session::{HubContext, SessionError, connection_end};

/// Removes the publisher from the registry however its session ends.
struct DetachOnDrop<'a> {
    units: &'a Units,
    unit: &'a str,
    session: u64,
}

impl Drop for DetachOnDrop<'_> {
    fn drop(&mut self) {
        self.units.detach(self.unit, self.session);
    }
}

pub(crate) async fn run(
    hub: &Arc<HubContext>,
    conn: &quinn::Connection,
    session: u64,
    unit: &str,
    officer: Option<String>,
    mut control: Control,
) -> Result<(), SessionError> {
    let announce = tokio::time::timeout(hub.config.quic.hello_timeout, control.recv())
        .await
        .map_err(|_| SessionError::new(ErrorCode::Protocol, "timeout", "no announce in time"))??;
    let Some(Kind::Announce(announce)) = announce.kind else {
        return Err(SessionError::protocol(format!(
            "expected announce, got {}",
            announce.kind_name()
        )));
    };
    validate_announce(&announce.tracks).map_err(|e| SessionError::protocol(e.to_string()))?;

    let (to_device, outgoing) = mpsc::channel(64);
    let replaced = CancellationToken::new();
    let Attached {
        broadcast,
        tracks,
        replaced: previous,
    } = hub.units.attach(
        unit,
        &announce.tracks,
        PublisherLink {
            session,
            control: to_device,
            track_ids: announce
                .tracks
                .iter()
                .map(|t| (t.name.clone(), t.id))
                .collect(),
            replaced: replaced.clone(),
            officer,
            talk: Some(crate::registry::TalkPath::Quic(conn.clone())),
        },
    );
    let _detach = DetachOnDrop {
        units: &hub.units,
        unit,
        session,
    };
    if let Some(old) = previous {
        info!(
            old_session = old.session,
            "a new connection of this unit replaces the old one"
        );
        old.replaced.cancel();
    }
    info!(tracks = announce.tracks.len(), "unit online");
    crate::directives::resend_open(hub, unit);

    let ingest = Arc::new(Ingest {
        tracks,
        broadcast: Arc::clone(&broadcast),
        max_frame: hub.config.quic.max_frame_bytes,
        header_timeout: hub.config.quic.hello_timeout,
        newest: std::sync::Mutex::new(HashMap::new()),
        backfill_groups: hub.metrics.backfill_groups.clone(),
        slow_headers: AtomicU32::new(0),
    });
    let (tx, mut rx) = control.split();
    // Messages to the device go out from their own task: a device that stops reading its
    // control stream must not stall this loop (and with it, a takeover or a shutdown).
    let mut writer = JoinSet::new();
    writer.spawn(control::pump(tx, outgoing));
    let mut groups: JoinSet<Result<(), SessionError>> = JoinSet::new();
    let mut limit = crate::field::RateLimit::default();
    loop {
        tokio::select! {
            _ = replaced.cancelled() => {
                return Err(SessionError::new(ErrorCode::Replaced, "replaced", "a newer connection of this unit took over"));
            }
            _ = hub.shutdown.cancelled() => {
                return Err(SessionError::new(ErrorCode::Shutdown, "shutdown", "hub shutting down"));
            }
            msg = control::recv(&mut rx) => match msg {
                Ok(m) => publisher_message(hub, &broadcast, &mut limit, m)?,
                Err(ControlError::Closed) | Err(ControlError::Refused { .. }) => return Ok(()),
                Err(ControlError::Connection(e)) => return connection_end(e),
                Err(e) => return Err(e.into()),
            },
            Some(written) = writer.join_next(), if !writer.is_empty() => {
                // The writer ends cleanly only when the registry dropped our link (a
                // takeover, handled above); a write error ends the session.
                if let Ok(Err(e)) = written {
                    return Err(e.into());
                }
            }
            stream = conn.accept_uni() => match stream {
                Ok(recv) => {
                    groups.spawn(ingest_group(recv, Arc::clone(&ingest)));
                }
                Err(e) => return connection_end(e),
            },
            Some(done) = groups.join_next(), if !groups.is_empty() => {
                if let Ok(Err(e)) = done {
                    return Err(e);
                }
            }
        }
    }
}

fn publisher_message(
    hub: &Arc<HubContext>,
    broadcast: &Arc<Broadcast>,
    limit: &mut crate::field::RateLimit,
    msg: ControlMessage,
) -> Result<(), SessionError> {
    let unit = broadcast.unit_id.as_str();
    match msg.kind {
        Some(Kind::Holdings(h)) => crate::backfill::holdings(hub, broadcast, h)
            .map_err(|e| SessionError::protocol(e.to_string())),
        Some(Kind::Telemetry(t)) => {
            crate::field::accept(hub, unit, limit, t);
            Ok(())
        }
        Some(Kind::Ack(ack)) => {
            crate::directives::report(hub, unit, ack);
            Ok(())
        }
        other => Err(SessionError::protocol(format!(
            "unexpected {} from a publisher",
            ControlMessage { kind: other }.kind_name()
        ))),
    }
}

/// What the group readers of one publisher session share.
struct Ingest {
    /// The device's track id → the track.
    tracks: HashMap<u32, Arc<TrackEntry>>,
    broadcast: Arc<Broadcast>,
    max_frame: usize,
    header_timeout: std::time::Duration,
    /// The newest group sequence the device sent per track, this session.
    newest: std::sync::Mutex<HashMap<u32, u64>>,
    backfill_groups: prometheus::IntCounter,
    /// Group streams let go for want of a header, this session.
    slow_headers: AtomicU32,
}

/// Group streams a publisher may leave without a header in time before its session ends.
const MAX_SLOW_HEADERS: u32 = 32;

impl Ingest {
    /// Whether a group the device numbered `sequence` is newer than every one before it. A
    /// group overtaken by a newer one (after loss, the newer stream's header can arrive
    /// first) is not relayed: viewers must never go back in time.
    fn is_newest(&self, track: u32, sequence: u64) -> bool {
        let mut newest = self.newest.lock().unwrap_or_else(|e| e.into_inner());
        match newest.get(&track) {
            Some(&n) if sequence <= n => false,
            _ => {
                newest.insert(track, sequence);
                true
            }
        }
    }
}

/// Reads one group stream of a publisher into its track.
async fn ingest_group(recv: quinn::RecvStream, ingest: Arc<Ingest>) -> Result<(), SessionError> {
    let opened = tokio::time::timeout(
        ingest.header_timeout,
        GroupReader::open(recv, ingest.max_frame),
    )
    .await;
    let (header, reader) = match opened {
        Ok(Ok(r)) => r,
        Err(_) => {
            // A stream can be open without a byte of it here: QUIC opens every lower
            // stream id when a later one arrives, and a device's backfill streams wait
            // behind its live ones on a narrow link. Such a stream is let go (dropping it
            // stops it; the device sends the group again); only many of them are abuse.
            let slow = ingest.slow_headers.fetch_add(1, Ordering::Relaxed) + 1;
            if slow > MAX_SLOW_HEADERS {
                return Err(SessionError::new(
                    ErrorCode::Protocol,
                    "timeout",
                    format!("{slow} group streams without their header in time"),
                ));
            }
            debug!(slow, "a group stream without its header in time: stopped");
            return Ok(());
        }
        // Given up by the device, or the link is going: not bad input.
        Ok(Err(e)) if e.is_reset() => return Ok(()),
        Ok(Err(GroupError::Read(_) | GroupError::Io(_))) => return Ok(()),
        Ok(Err(e)) => return Err(e.into()),
    };
    let Some(entry) = ingest.tracks.get(&header.track_id) else {
        return Err(SessionError::new(
            ErrorCode::UnknownTrack,
            "unknown_track",
            format!("group for unannounced track {}", header.track_id),
        ));
    };
    if header.backfill {
        // From the spool: to the recorder only, in the order it comes, whatever its age.
        ingest.backfill_groups.inc();
        return relay_into(reader, &entry.backfill).await;
    }
    if !ingest.is_newest(header.track_id, header.sequence) {
        reader.stop(STREAM_STALE);
        return Ok(());
    }
    relay_group(reader, entry, &ingest.broadcast).await
}

/// Reads a backfill group into a track no viewer reads. The device sends many at once:
/// each is read whole, then written whole (`Track::push_group`), so they never interleave
/// in the track.
async fn relay_into(
    mut reader: GroupReader,
    track: &Arc<tianwang_core::Track>,
) -> Result<(), SessionError> {
    let mut frames = Vec::new();
    loop {
        match reader.next_frame().await {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => break,
            // Given up, or the link is going: the device offers it again later.
            Err(e) if e.is_reset() => return Ok(()),
            Err(GroupError::Read(_)) | Err(GroupError::Io(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    let received_at = Instant::now();
    track.push_group(frames.into_iter().map(|frame| FrameIn {
        payload_offset: frame.payload_offset as u32,
        timestamp_us: frame.header.timestamp_us,
        duration_us: frame.header.duration_us,
        data: frame.encoded,
        received_at,
    }));
    Ok(())
}

/// Relays one group stream, frame by frame, into its track (a device's, or a unit pulled
/// from a child hub).
pub(crate) async fn relay_group(
    mut reader: GroupReader,
    entry: &TrackEntry,
    broadcast: &Broadcast,
) -> Result<(), SessionError> {
    let mut group = entry.track.begin_group();
    broadcast.keyframe_arrived(entry);
    loop {
        let frame = match reader.next_frame().await {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            // The device gave this group up (superseded), or the link is going: not bad input.
            Err(e) if e.is_reset() => return Ok(()),
            Err(GroupError::Read(_)) | Err(GroupError::Io(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let outcome = group.push(FrameIn {
            payload_offset: frame.payload_offset as u32,
            timestamp_us: frame.header.timestamp_us,
            duration_us: frame.header.duration_us,
            data: frame.encoded,
            received_at: Instant::now(),
        });
        if outcome == PushOutcome::Stale {
            reader.stop(STREAM_STALE);
            return Ok(());
        }
    }
}
