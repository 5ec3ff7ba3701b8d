//! A subscriber's session: Subscribe / Unsubscribe / KeyframeRequest on the control
//! stream; each subscribed track goes out through its own sender task, drained from the
//! relay core by `send_track`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tianwang_proto::v1::{self, SubscribeError, Subscribed};
use tianwang_proto::{ControlMessage, ErrorCode, Kind};
use tianwang_transport::control::{self, Control, ControlError};
use tianwang_transport::{Priority, send_track};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, info};

use crate::registry::Broadcast;
use crate::session::{HubContext, SessionError, connection_end};

/// At most this many subscriptions on one session.
const MAX_SUBSCRIPTIONS: usize = 64;

/// One Subscribe that was granted.
struct Active {
    broadcast: Arc<Broadcast>,
    senders: Vec<AbortHandle>,
    aliases: Vec<u32>,
}

/// What a subscriber session holds (a program watching, or the parent hub's link).
pub(crate) struct Session<'a> {
    hub: &'a HubContext,
    conn: &'a quinn::Connection,
    /// The court whose units this subscriber may watch; None for the parent hub (this
    /// hub's whole subtree).
    scope: Option<String>,
    /// Who is watching (a token's subject), for the audit trail.
    pub(crate) user: String,
    active: HashMap<u64, Active>,
    /// Our track id → the broadcast and the track's name, for keyframe requests.
    aliases: HashMap<u32, (Arc<Broadcast>, String)>,
    next_alias: u32,
    priority: Priority,
    pub(crate) senders: JoinSet<()>,
}

pub(crate) async fn run(
    hub: &HubContext,
    conn: &quinn::Connection,
    control: Control,
    scope: String,
    user: String,
) -> Result<(), SessionError> {
    let (tx, mut rx) = control.split();
    // Replies and notices go out from their own task through a bounded queue: a subscriber
    // that stops reading its control stream is closed, not waited for.
    let (out, outgoing) = mpsc::channel(64);
    let mut writer = JoinSet::new();
    writer.spawn(control::pump(tx, outgoing));
    let mut session = Session::new(hub, conn, Some(scope));
    session.user = user;
    let mut changes = hub.units.changes();
    let result = loop {
        tokio::select! {
            _ = hub.shutdown.cancelled() => {
                break Err(SessionError::new(ErrorCode::Shutdown, "shutdown", "hub shutting down"));
            }
            change = changes.recv() => {
                // Tell the subscriber when a unit it watches goes offline or comes back.
                let change = match change {
                    Ok(c) => c,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        break Err(SessionError::new(ErrorCode::Shutdown, "shutdown", "hub shutting down"));
                    }
                };
                if session.watches(&change.unit_id) {
                    let state = ControlMessage::new(Kind::UnitState(v1::UnitState {
                        unit_id: change.unit_id,
                        online: change.online,
                    }));
                    if out.try_send(state).is_err() {
                        break Err(not_reading());
                    }
                }
            }
            Some(written) = writer.join_next() => {
                break match written {
                    Ok(Err(e)) => Err(e.into()),
                    _ => Ok(()),
                };
            }
            Some(_) = session.senders.join_next(), if !session.senders.is_empty() => {}
            msg = control::recv(&mut rx) => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(ControlError::Closed) | Err(ControlError::Refused { .. }) => break Ok(()),
                    Err(ControlError::Connection(e)) => break connection_end(e),
                    Err(e) => break Err(e.into()),
                };
                match session.handle(msg) {
                    Ok(Some(reply)) => {
                        if out.try_send(reply).is_err() {
                            break Err(not_reading());
                        }
                    }
                    Ok(None) => {}
                    Err(e) => break Err(e),
                }
            }
        }
    };
    session.finish().await;
    result
}

fn not_reading() -> SessionError {
    SessionError::new(
        ErrorCode::Protocol,
        "not_reading",
        "the subscriber does not read its control stream",
    )
}

fn refuse(request_id: u64, code: ErrorCode, reason: &str) -> ControlMessage {
    ControlMessage::new(Kind::SubscribeError(SubscribeError {
        request_id,
        code: code as i32,
        reason: reason.to_string(),
    }))
}

impl<'a> Session<'a> {
    pub(crate) fn new(
        hub: &'a HubContext,
        conn: &'a quinn::Connection,
        scope: Option<String>,
    ) -> Self {
        Session {
            hub,
            conn,
            scope,
            user: String::new(),
            active: HashMap::new(),
            aliases: HashMap::new(),
            next_alias: 0,
            priority: Priority::default(),
            senders: JoinSet::new(),
        }
    }

    /// Stops every sender and lets go of the units.
    pub(crate) async fn finish(&mut self) {
        self.senders.shutdown().await;
        for (_, a) in self.active.drain() {
            if self.scope.is_none() {
                self.hub.metrics.cascade_served.dec();
            }
            self.hub.units.release_if_idle(&a.broadcast.unit_id);
        }
    }

    pub(crate) fn watches(&self, unit: &str) -> bool {
        self.active.values().any(|a| a.broadcast.unit_id == unit)
    }

    pub(crate) fn handle(
        &mut self,
        msg: ControlMessage,
    ) -> Result<Option<ControlMessage>, SessionError> {
        match msg.kind {
            Some(Kind::Subscribe(s)) => Ok(Some(self.subscribe(&s))),
            Some(Kind::Unsubscribe(u)) => {
                if let Some(a) = self.active.remove(&u.request_id) {
                    if self.scope.is_none() {
                        self.hub.metrics.cascade_served.dec();
                    }
                    a.senders.iter().for_each(AbortHandle::abort);
                    for alias in &a.aliases {
                        self.aliases.remove(alias);
                    }
                    let unit = a.broadcast.unit_id.clone();
                    drop(a);
                    self.hub.units.release_if_idle(&unit);
                }
                Ok(None)
            }
            Some(Kind::KeyframeRequest(k)) => {
                if let Some((broadcast, name)) = self.aliases.get(&k.track_id) {
                    broadcast.request_keyframe(name);
                }
                Ok(None)
            }
            other => Err(SessionError::protocol(format!(
                "unexpected {} from a subscriber",
                ControlMessage { kind: other }.kind_name()
            ))),
        }
    }

    fn subscribe(&mut self, s: &v1::Subscribe) -> ControlMessage {
        if self.active.contains_key(&s.request_id) {
            return refuse(
                s.request_id,
                ErrorCode::Protocol,
                "request id already in use",
            );
        }
        if self.active.len() >= MAX_SUBSCRIPTIONS {
            return refuse(
                s.request_id,
                ErrorCode::Forbidden,
                "too many subscriptions on one session",
            );
        }
        match self.start(s) {
            Ok(answer) => {
                info!(unit = %s.unit_id, tracks = answer.tracks.len(), "watching");
                ControlMessage::new(Kind::Subscribed(answer))
            }
            Err((code, reason)) => {
                debug!(unit = %s.unit_id, %reason, "subscribe refused");
                refuse(s.request_id, code, &reason)
            }
        }
    }

    fn start(&mut self, s: &v1::Subscribe) -> Result<Subscribed, (ErrorCode, String)> {
        let cascade = &self.hub.cascade;
        if let Some(scope) = &self.scope {
            match cascade.unit_court(&self.hub.units, &s.unit_id) {
                Some(court) if !cascade.covers(scope, &court) => {
                    let reason = format!(
                        "unit {:?} belongs to court {court}, outside this token's court {scope}",
                        s.unit_id
                    );
                    self.hub.evidence.audit.record(
                        &self.user,
                        "view.refused",
                        &s.unit_id,
                        serde_json::json!({ "via": "quic", "reason": reason }),
                    );
                    return Err((ErrorCode::Forbidden, reason));
                }
                _ => {}
            }
        }
        cascade.ensure_pulled(&self.hub.units, &s.unit_id);
        let (broadcast, chosen) = self
            .hub
            .units
            .subscribe(&s.unit_id, &s.tracks)
            .map_err(|e| (e.code(), e.to_string()))?;
        let mut answer = Subscribed {
            request_id: s.request_id,
            unit_id: s.unit_id.clone(),
            tracks: Vec::new(),
        };
        let mut active = Active {
            broadcast: Arc::clone(&broadcast),
            senders: Vec::new(),
            aliases: Vec::new(),
        };
        for (entry, subscription) in chosen {
            let alias = self.next_alias;
            self.next_alias = self.next_alias.wrapping_add(1);
            answer.tracks.push(v1::TrackInfo {
                id: alias,
                ..entry.info.clone()
            });
            self.aliases
                .insert(alias, (Arc::clone(&broadcast), entry.info.name.clone()));
            active.aliases.push(alias);
            // Audio ahead of video: it is small and losing it costs more.
            let base = if entry.info.kind() == v1::TrackKind::Audio {
                Priority::AUDIO
            } else {
                0
            };
            let conn = self.conn.clone();
            let metrics = Arc::clone(&self.hub.metrics);
            let priority = self.priority.clone();
            let subscribed_at = Instant::now();
            let handle = self.senders.spawn(async move {
                let on_sent = |frame: &tianwang_core::Frame, now: Instant| {
                    metrics.frames_out.inc();
                    metrics.bytes_out.inc_by(frame.payload_len() as u64);
                    // Frames from the join cache waited for this subscriber, not in the relay.
                    if frame.received_at >= subscribed_at {
                        metrics.forward_latency.observe(
                            now.saturating_duration_since(frame.received_at)
                                .as_secs_f64(),
                        );
                    }
                };
                match send_track(&conn, alias, &priority, base, subscription, on_sent).await {
                    Ok(summary) => debug!(?summary, "track ended"),
                    Err(e) => debug!(error = %e, "sending a track ended"),
                }
            });
            active.senders.push(handle);
        }
        self.active.insert(s.request_id, active);
        if self.scope.is_none() {
            self.hub.metrics.cascade_served.inc();
        }
        Ok(answer)
    }
}
