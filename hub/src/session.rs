//! QUIC sessions: one per connection. The first bidirectional stream carries Hello, then
//! the session is a publisher's (a field unit) or a subscriber's (a program watching).
//!
//! Bad input from a peer ends that peer's session with a QUIC close code and a reason, is
//! logged and counted, and touches nothing else.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tianwang_core::frame::FrameIn;
use tianwang_core::track::PushOutcome;
use tianwang_proto::v1::{self, Role as WireRole, Subscribed, SubscribeError, Welcome};
use tianwang_proto::wire::{PROTOCOL_VERSION, WireError};
use tianwang_proto::{ControlMessage, ErrorCode, Kind, RedactedHello};
use tianwang_transport::control::{self, Control, ControlError, ControlReceiver};
use tianwang_transport::group::{GroupError, GroupReader};
use tianwang_transport::{STREAM_STALE, close_code, send_track};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::auth::{Authority, Role};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::{Attached, PublisherLink, TrackEntry, Units, validate_announce};

/// What a session needs of the hub.
pub struct HubContext {
    pub config: Arc<Config>,
    pub authority: Arc<Authority>,
    pub units: Arc<Units>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    next_session: AtomicU64,
}

impl HubContext {
    pub fn new(
        config: Arc<Config>,
        authority: Arc<Authority>,
        units: Arc<Units>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            config,
            authority,
            units,
            metrics,
            shutdown,
            next_session: AtomicU64::new(1),
        }
    }
}

/// Why the hub ended a session: sent to the peer as the close code and reason.
#[derive(Debug)]
pub struct SessionError {
    pub code: ErrorCode,
    pub reason: String,
    /// The metric label.
    pub label: &'static str,
}

impl SessionError {
    fn new(code: ErrorCode, label: &'static str, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            label,
        }
    }

    fn protocol(reason: impl Into<String>) -> Self {
        Self::new(ErrorCode::Protocol, "protocol", reason)
    }
}

impl From<ControlError> for SessionError {
    fn from(e: ControlError) -> Self {
        let label = match &e {
            ControlError::Wire(WireError::TooLarge { .. }) => "too_large",
            ControlError::Wire(_) | ControlError::Unexpected { .. } => "malformed",
            ControlError::Timeout(_) => "timeout",
            _ => "control_stream",
        };
        Self::new(e.code(), label, e.to_string())
    }
}

impl From<GroupError> for SessionError {
    fn from(e: GroupError) -> Self {
        match &e {
            GroupError::Wire(WireError::TooLarge { .. }) => {
                Self::new(ErrorCode::TooLarge, "too_large", e.to_string())
            }
            _ => Self::new(ErrorCode::Protocol, "malformed", e.to_string()),
        }
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Accepts connections until shutdown.
pub async fn serve(hub: Arc<HubContext>, endpoint: quinn::Endpoint) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let hub = Arc::clone(&hub);
                sessions.spawn(async move { handle(hub, incoming).await });
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = hub.shutdown.cancelled() => break,
        }
    }
    endpoint.close(close_code(ErrorCode::Shutdown), b"hub shutting down");
    while sessions.join_next().await.is_some() {}
}

async fn handle(hub: Arc<HubContext>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            debug!(%remote, error = %e, "handshake failed");
            hub.metrics.sessions_closed.with_label_values(&["handshake"]).inc();
            return;
        }
    };
    let id = hub.next_session.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("session", id, %remote);
    let result = run(&hub, &conn, id).instrument(span.clone()).await;
    let _enter = span.enter();
    match result {
        Ok(()) => debug!("session ended"),
        Err(e) => {
            if e.code == ErrorCode::Shutdown || e.label == "link_lost" {
                info!(reason = %e.reason, "session ended");
            } else {
                warn!(code = ?e.code, reason = %e.reason, "closing session");
            }
            hub.metrics.sessions_closed.with_label_values(&[e.label]).inc();
            conn.close(close_code(e.code), e.reason.as_bytes());
        }
    }
}

async fn run(hub: &HubContext, conn: &quinn::Connection, id: u64) -> Result<(), SessionError> {
    let timeout = hub.config.quic.hello_timeout;
    let mut control = tokio::time::timeout(timeout, Control::accept(conn))
        .await
        .map_err(|_| SessionError::new(ErrorCode::Protocol, "timeout", "no control stream in time"))??;
    let first = tokio::time::timeout(timeout, control.recv())
        .await
        .map_err(|_| SessionError::new(ErrorCode::Protocol, "timeout", "no hello in time"))??;
    let Some(Kind::Hello(hello)) = first.kind else {
        return Err(SessionError::protocol(format!(
            "expected hello, got {}",
            first.kind_name()
        )));
    };
    debug!(hello = ?RedactedHello(&hello), "hello");
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(SessionError::protocol(format!(
            "protocol version {} is not supported (this hub speaks {PROTOCOL_VERSION})",
            hello.protocol_version
        )));
    }
    let claims = hub
        .authority
        .verify(&hello.token)
        .map_err(|e| SessionError::new(ErrorCode::Unauthorized, "unauthorized", e.to_string()))?;
    let welcome = ControlMessage::new(Kind::Welcome(Welcome {
        session_id: format!("{id}"),
        hub_time_us: now_us(),
        hub_id: hub.config.hub_id.clone(),
    }));
    match hello.role() {
        WireRole::Publisher => {
            if claims.role != Role::Device {
                return Err(SessionError::new(
                    ErrorCode::Forbidden,
                    "forbidden",
                    format!("a {:?} token cannot publish", claims.role),
                ));
            }
            if claims.sub != hello.unit_id {
                return Err(SessionError::new(
                    ErrorCode::Forbidden,
                    "forbidden",
                    format!("the token is for unit {:?}, not {:?}", claims.sub, hello.unit_id),
                ));
            }
            hub.metrics.sessions.with_label_values(&["publisher"]).inc();
            control.send(welcome).await?;
            let span = tracing::info_span!("publisher", unit = %hello.unit_id);
            publish(hub, conn, id, &hello.unit_id, control).instrument(span).await
        }
        WireRole::Subscriber => {
            if !claims.role.can_watch_live() {
                return Err(SessionError::new(
                    ErrorCode::Forbidden,
                    "forbidden",
                    format!("a {:?} token cannot watch live", claims.role),
                ));
            }
            hub.metrics.sessions.with_label_values(&["subscriber"]).inc();
            control.send(welcome).await?;
            let span = tracing::info_span!("subscriber", user = %claims.sub);
            subscribe(hub, conn, control).instrument(span).await
        }
        WireRole::Unspecified => Err(SessionError::protocol("hello without a role")),
    }
}

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

fn connection_end(e: quinn::ConnectionError) -> Result<(), SessionError> {
    match e {
        quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed => Ok(()),
        quinn::ConnectionError::TimedOut => Err(SessionError::new(
            ErrorCode::Unspecified,
            "link_lost",
            "the peer went silent (idle timeout)",
        )),
        other => Err(SessionError::new(ErrorCode::Unspecified, "link_lost", other.to_string())),
    }
}

async fn publish(
    hub: &HubContext,
    conn: &quinn::Connection,
    session: u64,
    unit: &str,
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

    let (to_device, mut outgoing) = mpsc::channel(64);
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
            track_ids: announce.tracks.iter().map(|t| (t.name.clone(), t.id)).collect(),
            replaced: replaced.clone(),
        },
    );
    let _detach = DetachOnDrop {
        units: &hub.units,
        unit,
        session,
    };
    if let Some(old) = previous {
        info!(old_session = old.session, "a new connection of this unit replaces the old one");
        old.replaced.cancel();
    }
    info!(tracks = announce.tracks.len(), "unit online");

    let tracks = Arc::new(tracks);
    let (mut tx, mut rx) = control.split();
    let mut groups: JoinSet<Result<(), SessionError>> = JoinSet::new();
    let max_frame = hub.config.quic.max_frame_bytes;
    loop {
        tokio::select! {
            _ = replaced.cancelled() => {
                return Err(SessionError::new(ErrorCode::Replaced, "replaced", "a newer connection of this unit took over"));
            }
            _ = hub.shutdown.cancelled() => {
                return Err(SessionError::new(ErrorCode::Shutdown, "shutdown", "hub shutting down"));
            }
            msg = control::recv(&mut rx) => match msg {
                Ok(m) => publisher_message(hub, m)?,
                Err(ControlError::Closed) | Err(ControlError::Refused { .. }) => return Ok(()),
                Err(ControlError::Connection(e)) => return connection_end(e),
                Err(e) => return Err(e.into()),
            },
            Some(out) = outgoing.recv() => {
                use futures::SinkExt;
                tx.send(out).await?;
            }
            stream = conn.accept_uni() => match stream {
                Ok(recv) => {
                    groups.spawn(ingest_group(recv, Arc::clone(&tracks), Arc::clone(&broadcast), max_frame));
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

fn publisher_message(hub: &HubContext, msg: ControlMessage) -> Result<(), SessionError> {
    match msg.kind {
        Some(Kind::Telemetry(_)) => {
            hub.metrics.telemetry.inc();
            Ok(())
        }
        Some(Kind::Ack(ack)) => {
            info!(directive = %ack.directive_id, ok = ack.ok, message = %ack.message, "directive acknowledged");
            Ok(())
        }
        other => Err(SessionError::protocol(format!(
            "unexpected {} from a publisher",
            ControlMessage { kind: other }.kind_name()
        ))),
    }
}

/// Reads one group stream of a publisher into its track.
async fn ingest_group(
    recv: quinn::RecvStream,
    tracks: Arc<HashMap<u32, Arc<TrackEntry>>>,
    broadcast: Arc<crate::registry::Broadcast>,
    max_frame: usize,
) -> Result<(), SessionError> {
    let (header, mut reader) = match GroupReader::open(recv, max_frame).await {
        Ok(r) => r,
        Err(e) if e.is_reset() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let Some(entry) = tracks.get(&header.track_id) else {
        return Err(SessionError::new(
            ErrorCode::UnknownTrack,
            "unknown_track",
            format!("group for unannounced track {}", header.track_id),
        ));
    };
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

async fn subscribe(
    hub: &HubContext,
    conn: &quinn::Connection,
    control: Control,
) -> Result<(), SessionError> {
    const MAX_SUBSCRIPTIONS: usize = 64;
    let (mut tx, mut rx): (_, ControlReceiver) = control.split();
    // request id → the sender tasks of its tracks
    let mut active: HashMap<u64, (Vec<tokio::task::AbortHandle>, Arc<crate::registry::Broadcast>)> =
        HashMap::new();
    // our track alias → (broadcast, track name), for keyframe requests
    let mut aliases: HashMap<u32, (Arc<crate::registry::Broadcast>, String)> = HashMap::new();
    let mut next_alias: u32 = 0;
    let mut senders = JoinSet::new();
    let result = loop {
        tokio::select! {
            _ = hub.shutdown.cancelled() => {
                break Err(SessionError::new(ErrorCode::Shutdown, "shutdown", "hub shutting down"));
            }
            Some(_) = senders.join_next(), if !senders.is_empty() => {}
            msg = control::recv(&mut rx) => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(ControlError::Closed) | Err(ControlError::Refused { .. }) => break Ok(()),
                    Err(ControlError::Connection(e)) => break connection_end(e),
                    Err(e) => break Err(e.into()),
                };
                let reply = match msg.kind {
                    Some(Kind::Subscribe(s)) => {
                        if active.contains_key(&s.request_id) {
                            Some(refuse(s.request_id, ErrorCode::Protocol, "request id already in use"))
                        } else if active.len() >= MAX_SUBSCRIPTIONS {
                            Some(refuse(s.request_id, ErrorCode::Forbidden, "too many subscriptions on one session"))
                        } else {
                            match start_subscription(hub, conn, &s, &mut next_alias, &mut senders) {
                                Ok((answer, handles, broadcast, names)) => {
                                    info!(unit = %s.unit_id, tracks = names.len(), "watching");
                                    for (alias, name) in names {
                                        aliases.insert(alias, (Arc::clone(&broadcast), name));
                                    }
                                    active.insert(s.request_id, (handles, broadcast));
                                    Some(ControlMessage::new(Kind::Subscribed(answer)))
                                }
                                Err((code, reason)) => {
                                    debug!(unit = %s.unit_id, %reason, "subscribe refused");
                                    Some(refuse(s.request_id, code, &reason))
                                }
                            }
                        }
                    }
                    Some(Kind::Unsubscribe(u)) => {
                        if let Some((handles, broadcast)) = active.remove(&u.request_id) {
                            handles.iter().for_each(|h| h.abort());
                            let unit = broadcast.unit_id.clone();
                            aliases.retain(|_, (b, _)| !Arc::ptr_eq(b, &broadcast));
                            drop(broadcast);
                            hub.units.release_if_idle(&unit);
                        }
                        None
                    }
                    Some(Kind::KeyframeRequest(k)) => {
                        if let Some((broadcast, name)) = aliases.get(&k.track_id) {
                            broadcast.request_keyframe(name);
                        }
                        None
                    }
                    other => {
                        break Err(SessionError::protocol(format!(
                            "unexpected {} from a subscriber",
                            ControlMessage { kind: other }.kind_name()
                        )));
                    }
                };
                if let Some(reply) = reply {
                    use futures::SinkExt;
                    if let Err(e) = tx.send(reply).await {
                        break Err(e.into());
                    }
                }
            }
        }
    };
    senders.shutdown().await;
    for (_, (_, broadcast)) in active {
        hub.units.release_if_idle(&broadcast.unit_id);
    }
    result
}

fn refuse(request_id: u64, code: ErrorCode, reason: &str) -> ControlMessage {
    ControlMessage::new(Kind::SubscribeError(SubscribeError {
        request_id,
        code: code as i32,
        reason: reason.to_string(),
    }))
}

type Started = (
    Subscribed,
    Vec<tokio::task::AbortHandle>,
    Arc<crate::registry::Broadcast>,
    Vec<(u32, String)>,
);

fn start_subscription(
    hub: &HubContext,
    conn: &quinn::Connection,
    s: &v1::Subscribe,
    next_alias: &mut u32,
    senders: &mut JoinSet<()>,
) -> Result<Started, (ErrorCode, String)> {
    let broadcast = hub
        .units
        .get(&s.unit_id)
        .ok_or_else(|| (ErrorCode::UnknownUnit, format!("unit {:?} is not online", s.unit_id)))?;
    let entries = broadcast.tracks();
    let chosen: Vec<_> = if s.tracks.is_empty() {
        entries
    } else {
        let mut chosen = Vec::new();
        for name in &s.tracks {
            let e = entries.iter().find(|e| &e.info.name == name).ok_or_else(|| {
                (
                    ErrorCode::UnknownTrack,
                    format!("unit {:?} has no track {name:?}", s.unit_id),
                )
            })?;
            chosen.push(Arc::clone(e));
        }
        chosen
    };
    let mut answer = Subscribed {
        request_id: s.request_id,
        unit_id: s.unit_id.clone(),
        tracks: Vec::new(),
    };
    let mut handles = Vec::new();
    let mut names = Vec::new();
    for entry in chosen {
        let alias = *next_alias;
        *next_alias = next_alias.wrapping_add(1);
        answer.tracks.push(v1::TrackInfo {
            id: alias,
            ..entry.info.clone()
        });
        names.push((alias, entry.info.name.clone()));
        // Audio ahead of video: it is small and losing it costs more.
        let priority_base = if entry.info.kind() == v1::TrackKind::Audio { 1 << 24 } else { 0 };
        let subscription = entry.track.subscribe();
        let conn = conn.clone();
        let metrics = Arc::clone(&hub.metrics);
        let subscribed_at = Instant::now();
        let handle = senders.spawn(async move {
            let on_sent = |frame: &tianwang_core::Frame, now: Instant| {
                metrics.frames_out.inc();
                metrics.bytes_out.inc_by(frame.payload_len() as u64);
                // Frames from the join cache waited for this subscriber, not in the relay.
                if frame.received_at >= subscribed_at {
                    metrics
                        .forward_latency
                        .observe(now.saturating_duration_since(frame.received_at).as_secs_f64());
                }
            };
            match send_track(&conn, alias, priority_base, subscription, on_sent).await {
                Ok(summary) => debug!(?summary, "track ended"),
                Err(e) => debug!(error = %e, "sending a track ended"),
            }
        });
        handles.push(handle);
    }
    Ok((answer, handles, broadcast, names))
}
