//! Runs one console session: the sans-IO `ConsoleSession` decides, this loop does the I/O
//! (token check, registry, the WebRTC peer, the transport) and feeds the outcomes back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tianwang_core::console::{Action, ConsoleSession, Principal};
use tianwang_proto::ErrorCode;
use tianwang_proto::v1::session_request::Kind as Request;
use tianwang_proto::v1::talk_state::State as TalkLifecycle;
use tianwang_proto::v1::{Auth, SessionEvent, SessionRequest, TalkState, TileStats, UnitEvent};
use tokio::sync::mpsc::error::TrySendError;
use tracing::{Instrument, debug, info, warn};
use webrtc::peer_connection::RTCPeerConnectionState;

use super::peer::{Peer, PeerConfig, PeerEvent};
use super::{ConsoleIo, Incoming};
use crate::session::HubContext;

/// Units' rates go to the console every this many seconds.
const UNIT_REFRESH_TICKS: u64 = 3;
/// Telemetry points held for one console between two batches: a second of 4,000 units.
const MAX_PENDING_POINTS: usize = 4096;

/// Why the loop stops.
enum Stop {
    Closed,
}

struct Driver {
    hub: Arc<HubContext>,
    session: ConsoleSession,
    io: ConsoleIo,
    peer: Option<Peer>,
    peer_events: Option<tokio::sync::mpsc::UnboundedReceiver<PeerEvent>>,
    id: u64,
    transport: &'static str,
    /// The signed-in user, for the audit trail.
    user: Option<String>,
    /// Their role, and the court they see (with the courts below it).
    role: Option<crate::auth::Role>,
    /// The token signed in with: the session ends when it is revoked.
    claims: Option<crate::auth::Claims>,
    scope: Option<String>,
    /// The push-to-talk under way, and whether the console was told its m-line.
    talk: Option<(Arc<crate::talkback::Talk>, bool)>,
    /// The case and operation the unit was working on when the talk began (its audit
    /// entries name them).
    talk_bound: Option<(String, String)>,
    /// Where the next unit refresh begins in the list of visible units.
    refresh_from: usize,
    /// Telemetry for the next batch.
    points: std::collections::VecDeque<Arc<tianwang_proto::v1::TelemetryPoint>>,
    /// Where a directive's first answer comes back from its task.
    directed: Option<tokio::sync::mpsc::Sender<SessionEvent>>,
    /// Tiles on view: tile → (unit, since), so each view is audited with its length.
    views: std::collections::HashMap<String, (String, Instant)>,
}

pub async fn run(
    hub: Arc<HubContext>,
    io: ConsoleIo,
    token: Option<String>,
    transport: &'static str,
) {
    let id = hub.next_console_id();
    let span = tracing::info_span!("console", id, transport);
    let metrics = Arc::clone(&hub.metrics);
    metrics.console_sessions.inc();
    let mut d = Driver {
        session: ConsoleSession::new(Instant::now(), hub.config.console_session_config()),
        hub,
        io,
        peer: None,
        peer_events: None,
        id,
        transport,
        user: None,
        role: None,
        claims: None,
        scope: None,
        directed: None,
        talk: None,
        talk_bound: None,
        refresh_from: 0,
        points: std::collections::VecDeque::new(),
        views: Default::default(),
    };
    async move {
        if let Some(token) = token {
            d.session.handle_request(
                Instant::now(),
                SessionRequest {
                    kind: Some(Request::Auth(Auth { token })),
                },
            );
        }
        let reason = d.run().await;
        debug!(reason, "console session ended");
        let tiles: Vec<String> = d.views.keys().cloned().collect();
        for tile in tiles {
            d.view_ended(&tile);
        }
        d.stop_talk();
        if let Some(peer) = d.peer.take() {
            peer.close().await;
        }
    }
    .instrument(span)
    .await;
    metrics.console_sessions.dec();
}

impl Driver {
    async fn run(&mut self) -> &'static str {
        let mut changes = self.hub.units.changes();
        let mut tree = self.hub.cascade.changes();
        let mut directives = self.hub.directives.changes();
        let mut alarms = self.hub.field.alarm_changes();
        let mut points = self.hub.field.telemetry_points();
        let mut revocations = self.hub.authority.revocations();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<SessionEvent>(16);
        self.directed = Some(done_tx);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut ticks: u64 = 0;
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            while let Some(action) = self.session.poll_action() {
                if let Err(Stop::Closed) = self.execute(action).await {
                    return "closed";
                }
            }
            if self.session.is_closed() {
                return "closed by the session";
            }
            let timeout = self.session.poll_timeout();
            let sleep = async {
                match timeout {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                incoming = self.io.incoming.recv() => match incoming {
                    Some(Incoming::Request(r)) => self.session.handle_request(Instant::now(), r),
                    Some(Incoming::Undecodable(e)) => self.session.handle_undecodable(&e),
                    None => return "the console went away",
                },
                _ = sleep => self.session.handle_timeout(Instant::now()),
                Some(event) = next_peer_event(&mut self.peer_events) => self.peer_event(event),
                change = changes.recv() => match change {
                    Ok(c) => {
                        let court = self.hub.cascade.own().code.clone();
                        self.unit_changed(c, court);
                    }
                    // Missed some: the next refresh lists every unit again.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return "hub stopping",
                },
                change = tree.recv() => match change {
                    Ok(crate::cascade::TreeChange::Unit(c)) => {
                        let court = c.court.clone();
                        self.unit_changed(c, court);
                    }
                    Ok(crate::cascade::TreeChange::Courts) => self.courts_changed(),
                    Ok(crate::cascade::TreeChange::Alarm(a)) => self.alarm_changed(*a, true),
                    // The map reads operations from /api/operations.
                    Ok(crate::cascade::TreeChange::Operations) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.courts_changed(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return "hub stopping",
                },
                change = alarms.recv() => match change {
                    Ok(row) => {
                        let own = self.hub.cascade.own().code.clone();
                        self.alarm_changed(row.catalog(&own), false);
                    }
                    // Missed some: the console's list reads /api/alarms again now and then.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return "hub stopping",
                },
                point = points.recv() => match point {
                    Ok(p) => self.telemetry_taken(p),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        debug!(missed = n, "telemetry points missed for this console");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return "hub stopping",
                },
                change = directives.recv() => match change {
                    Ok(c) => self.directive_changed(c.update),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return "hub stopping",
                },
                Ok(()) = revocations.changed() => {
                    let revoked = self
                        .claims
                        .as_ref()
                        .is_some_and(|c| revocations.borrow_and_update().covers(c));
                    if revoked {
                        let user = self.user.clone().unwrap_or_default();
                        info!(%user, "console session closed: its token was revoked");
                        self.hub.evidence.audit.record(
                            &user,
                            "session.revoked",
                            "console",
                            serde_json::json!({ "via": self.transport, "console": self.id }),
                        );
                        let _ = self
                            .io
                            .outgoing
                            .try_send(error_event(ErrorCode::Unauthorized, "token revoked"));
                        return "token revoked";
                    }
                }
                Some(event) = done_rx.recv() => {
                    if let Err(Stop::Closed) = self.execute(Action::Send(event)).await {
                        return "closed";
                    }
                }
                _ = tick.tick() => {
                    self.stats();
                    self.send_telemetry();
                    ticks += 1;
                    if ticks.is_multiple_of(UNIT_REFRESH_TICKS) {
                        self.refresh_units();
                    }
                }
                _ = self.hub.shutdown.cancelled() => {
                    let _ = self.io.outgoing.try_send(error_event(ErrorCode::Shutdown, "hub shutting down"));
                    return "hub stopping";
                }
            }
        }
    }

    fn peer_event(&mut self, event: PeerEvent) {
        match event {
            PeerEvent::LocalCandidate(c) => self.session.local_candidate(c),
            PeerEvent::GatheringComplete => {}
            PeerEvent::State(state) => {
                debug!(%state, "media connection");
                if let Some(peer) = &self.peer {
                    peer.set_connected(state == RTCPeerConnectionState::Connected);
                }
            }
        }
    }

    /// Every unit the console may see, with its rates, for its unit list.
    fn refresh_units(&mut self) {
        let Some(scope) = self.scope.clone() else {
            return;
        };
        let units = self.hub.cascade.visible_units(&self.hub.units, &scope);
        if units.is_empty() {
            return;
        }
        // A share of the free room in the event queue, resumed where the last refresh
        // stopped: a court of thousands of units is refreshed over several ticks rather
        // than overflowing the queue (which closes the console) in one.
        let budget = (self.io.outgoing.capacity() / 2).clamp(1, units.len());
        let start = self.refresh_from % units.len();
        for summary in units.into_iter().cycle().skip(start).take(budget) {
            self.session.unit_event(UnitEvent {
                unit_id: summary.unit_id,
                online: summary.online,
                tracks: summary.tracks,
                stats: summary.stats,
                subscribers: summary.subscribers,
                court: summary.court,
            });
        }
        self.refresh_from = start + budget;
    }

    fn unit_changed(&mut self, c: crate::registry::UnitChange, court: String) {
        let Some(scope) = &self.scope else { return };
        if self.hub.cascade.covers(scope, &court) {
            self.session.unit_event(UnitEvent {
                unit_id: c.unit_id,
                online: c.online,
                tracks: c.tracks,
                court,
                ..Default::default()
            });
        }
    }

    fn courts_changed(&mut self) {
        let Some(scope) = &self.scope else { return };
        let courts = self.hub.cascade.courts_under(scope);
        self.session
            .send_event(tianwang_proto::v1::session_event::Kind::Courts(
                tianwang_proto::v1::ListCourtsResponse { courts },
            ));
    }

    fn directive_changed(&mut self, update: tianwang_proto::v1::DirectiveUpdate) {
        let Some(scope) = &self.scope else { return };
        let visible = self
            .hub
            .cascade
            .unit_court(&self.hub.units, &update.unit_id)
            .is_some_and(|court| self.hub.cascade.covers(scope, &court));
        if visible {
            self.session
                .send_event(tianwang_proto::v1::session_event::Kind::Directive(update));
        }
    }

    /// An alarm of this hub (`below` false) or of a court below, to consoles that see it.
    fn alarm_changed(&mut self, alarm: tianwang_proto::v1::CatalogAlarm, below: bool) {
        let Some(scope) = &self.scope else { return };
        if self.hub.cascade.covers(scope, &alarm.court) {
            self.session
                .send_event(tianwang_proto::v1::session_event::Kind::Alarm(
                    tianwang_proto::v1::AlarmEvent {
                        alarm: Some(Box::new(alarm)),
                        below,
                    },
                ));
        }
    }

    /// Telemetry of this hub's units waits for the next tick, to go out as one batch.
    fn telemetry_taken(&mut self, point: Arc<tianwang_proto::v1::TelemetryPoint>) {
        let Some(scope) = &self.scope else { return };
        if !self.hub.cascade.covers(scope, &self.hub.cascade.own().code) {
            return;
        }
        if self.points.len() >= MAX_PENDING_POINTS {
            self.points.pop_front();
        }
        self.points.push_back(point);
    }

    fn send_telemetry(&mut self) {
        if self.points.is_empty() {
            return;
        }
        let points = self.points.drain(..).map(|p| (*p).clone()).collect();
        self.session
            .send_event(tianwang_proto::v1::session_event::Kind::Telemetry(
                tianwang_proto::v1::TelemetryBatch { points },
            ));
    }

    fn stats(&mut self) {
        let Some(peer) = self.peer.as_mut() else {
            return;
        };
        let now = Instant::now();
        for tile_id in peer.tile_ids() {
            if let Some(n) = peer.tile_stats(&tile_id, now) {
                self.session.tile_stats(TileStats {
                    tile_id,
                    bitrate_bps: n.bitrate_bps,
                    framerate: n.framerate,
                    frames_sent: n.frames_sent,
                    frames_dropped: n.frames_dropped,
                    delay_us: n.delay_us,
                    stalled: n.stalled,
                });
            }
        }
    }

    async fn ensure_peer(&mut self) -> Result<&mut Peer, String> {
        if self.peer.is_none() {
            let config = PeerConfig {
                ips: self.hub.config.console.webrtc_ips.clone(),
            };
            let (peer, events) = Peer::new(&config, Arc::clone(&self.hub.metrics))
                .await
                .map_err(|e| e.to_string())?;
            self.peer = Some(peer);
            self.peer_events = Some(events);
        }
        self.peer.as_mut().ok_or_else(|| "no peer".to_string())
    }

    async fn execute(&mut self, action: Action) -> Result<(), Stop> {
        match action {
            Action::Send(event) => match self.io.outgoing.try_send(event) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    info!("the console does not read its events: closing");
                    return Err(Stop::Closed);
                }
                Err(TrySendError::Closed(_)) => return Err(Stop::Closed),
            },
            Action::Authenticate { token } => self.authenticate(token.expose()),
            Action::AttachTile { tile_id, unit_id } => {
                let scope = self.scope.clone().unwrap_or_default();
                let cascade = &self.hub.cascade;
                if let Some(court) = cascade.unit_court(&self.hub.units, &unit_id)
                    && !cascade.covers(&scope, &court)
                {
                    let reason = format!(
                        "unit {unit_id:?} belongs to court {court}, outside your court {scope}"
                    );
                    self.hub.evidence.audit.record(
                        self.user.as_deref().unwrap_or("?"),
                        "view.refused",
                        &unit_id,
                        serde_json::json!({ "via": self.transport, "console": self.id, "reason": reason }),
                    );
                    self.session
                        .tile_failed(&tile_id, ErrorCode::Forbidden, &reason);
                    return Ok(());
                }
                cascade.ensure_pulled(&self.hub.units, &unit_id);
                let subscribed = self.hub.units.subscribe(&unit_id, &[]);
                let (broadcast, tracks) = match subscribed {
                    Ok(s) => s,
                    Err(e) => {
                        self.session.tile_failed(&tile_id, e.code(), &e.to_string());
                        return Ok(());
                    }
                };
                let attached = match self.ensure_peer().await {
                    Ok(peer) => peer
                        .attach(&tile_id, broadcast, tracks)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
                match attached {
                    Ok((video_mid, audio_mid)) => {
                        info!(tile = %tile_id, unit = %unit_id, "tile added");
                        self.view_ended(&tile_id);
                        self.hub.evidence.audit.record(
                            self.user.as_deref().unwrap_or("?"),
                            "view.start",
                            &unit_id,
                            serde_json::json!({ "console": self.id, "tile": tile_id }),
                        );
                        self.views
                            .insert(tile_id.clone(), (unit_id.clone(), Instant::now()));
                        self.session.tile_attached(&tile_id, &video_mid, &audio_mid);
                    }
                    Err(e) => self.session.tile_failed(&tile_id, ErrorCode::Internal, &e),
                }
            }
            Action::DetachTile { tile_id } => {
                self.view_ended(&tile_id);
                if let Some(peer) = self.peer.as_mut() {
                    peer.detach(&tile_id).await;
                }
            }
            Action::CreateOffer { revision } => {
                let offer = match self.ensure_peer().await {
                    Ok(peer) => match peer.create_offer().await {
                        // Mids exist once the offer is set locally.
                        Ok(sdp) => Ok((sdp, peer.send_mids().await)),
                        Err(e) => Err(e.to_string()),
                    },
                    Err(e) => Err(e),
                };
                match offer {
                    Ok((sdp, send_mids)) => {
                        self.session
                            .offer_created(Instant::now(), revision, sdp, send_mids);
                        self.announce_talk().await;
                    }
                    Err(e) => self.session.negotiation_failed(&e),
                }
            }
            Action::ApplyAnswer { revision, sdp } => {
                let result = match self.peer.as_ref() {
                    Some(peer) => peer.apply_answer(sdp).await.map_err(|e| e.to_string()),
                    None => Err("no offer was made".to_string()),
                };
                self.session.answer_applied(revision, result);
            }
            Action::AddRemoteCandidate(c) => {
                if let Some(peer) = self.peer.as_ref()
                    && let Err(e) = peer.add_candidate(c).await
                {
                    let _ = self.io.outgoing.try_send(error_event(
                        ErrorCode::Protocol,
                        &format!("ICE candidate refused: {e}"),
                    ));
                }
            }
            Action::RequestKeyframe { tile_id } => {
                if let Some(unit) = self.session.tile_unit(&tile_id)
                    && let Some(b) = self.hub.units.get(unit)
                {
                    b.request_keyframe("video");
                }
            }
            Action::Talk { unit_id, on, video } => {
                if on {
                    self.start_talk(unit_id, video).await;
                } else {
                    self.stop_talk();
                }
            }
            Action::Direct(req) => {
                let (Some(user), Some(role), Some(scope)) =
                    (self.user.clone(), self.role, self.scope.clone())
                else {
                    return Ok(());
                };
                let hub = Arc::clone(&self.hub);
                let Some(done) = self.directed.clone() else {
                    return Ok(());
                };
                // The index write must not hold up the session's media signalling.
                tokio::spawn(async move {
                    let event = match crate::directives::direct(&hub, &user, role, &scope, &req)
                        .await
                    {
                        Ok(update) => tianwang_proto::v1::session_event::Kind::Directive(update),
                        Err((code, message)) => tianwang_proto::v1::session_event::Kind::Error(
                            tianwang_proto::v1::SessionError {
                                code: code as i32,
                                message,
                                tile_id: String::new(),
                            },
                        ),
                    };
                    let _ = done.send(SessionEvent { kind: Some(event) }).await;
                });
            }
            Action::Close { code, reason } => {
                info!(?code, %reason, "closing console session");
                return Err(Stop::Closed);
            }
        }
        Ok(())
    }

    fn talk_state(
        &mut self,
        unit: &str,
        state: TalkLifecycle,
        mids: (&str, &str),
        reason: &str,
        id: &str,
    ) {
        self.session
            .send_event(tianwang_proto::v1::session_event::Kind::Talk(TalkState {
                unit_id: unit.to_string(),
                state: state as i32,
                mid: mids.0.to_string(),
                reason: reason.to_string(),
                talk_id: id.to_string(),
                video_mid: mids.1.to_string(),
            }));
    }

    /// Push-to-talk pressed, or a video link opened: an official, a unit of this hub
    /// within their court, online (for video, a field agent).
    async fn start_talk(&mut self, unit: String, video: bool) {
        let what = if video { "link" } else { "talk" };
        let refuse = |d: &mut Self, reason: String| {
            d.hub.evidence.audit.record(
                d.user.as_deref().unwrap_or("?"),
                &format!("{what}.refused"),
                &unit,
                serde_json::json!({ "reason": reason }),
            );
            d.talk_state(&unit, TalkLifecycle::Refused, ("", ""), &reason, "");
        };
        if !self.role.is_some_and(|r| r.can_talk()) {
            let role = self.role.map(|r| format!("{r:?}")).unwrap_or_default();
            let reason = if video {
                format!("a {role} token cannot open a video link with officers (officials can)")
            } else {
                format!("a {role} token cannot talk to officers (officials can)")
            };
            return refuse(self, reason);
        }
        let scope = self.scope.clone().unwrap_or_default();
        let cascade = &self.hub.cascade;
        match cascade.unit_court(&self.hub.units, &unit) {
            None => return refuse(self, format!("unit {unit:?} is not known here")),
            Some(court) if !cascade.covers(&scope, &court) => {
                return refuse(
                    self,
                    format!("unit {unit:?} belongs to court {court}, outside your court {scope}"),
                );
            }
            Some(court) if court != cascade.own().code => {
                return refuse(
                    self,
                    format!(
                        "talkback reaches the units of this hub only; {unit:?} is at court {court}'s hub"
                    ),
                );
            }
            Some(_) => {}
        }
        let Some(broadcast) = self.hub.units.get(&unit).filter(|b| b.is_online()) else {
            return refuse(self, format!("unit {unit:?} is not online"));
        };
        self.stop_talk();
        let added = match self.ensure_peer().await {
            Ok(peer) => peer.ensure_talk(video).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let added = match added {
            Ok(a) => a,
            Err(e) => return refuse(self, format!("talkback: {e}")),
        };
        let by = self.user.clone().unwrap_or_default();
        let recording = video.then(|| self.hub.evidence.extras.clone());
        let talk = match crate::talkback::Talk::start(broadcast, &by, recording) {
            Ok(t) => t,
            Err(e) => return refuse(self, e.to_string()),
        };
        if let Some(peer) = self.peer.as_ref() {
            *peer.talk_sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&talk));
        }
        // A link is part of the case the unit is working on: the audit entry names it.
        let bound = match self
            .hub
            .evidence
            .index
            .active_operation(&unit, crate::evidence::audit::unix_us())
            .await
        {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "reading the unit's operation for the audit trail");
                None
            }
        };
        self.talk_bound = bound.clone();
        let (case, operation) = bound.unzip();
        self.hub.evidence.audit.record(
            &by,
            &format!("{what}.start"),
            &unit,
            serde_json::json!({ "talk": talk.id, "console": self.id, "case": case,
                "operation": operation, "recording": talk.recording_chain() }),
        );
        self.talk = Some((talk, false));
        if added {
            // The next offer carries the m-line; its mid is told once it exists.
            self.session.talk_channel_added();
        } else {
            self.announce_talk().await;
        }
    }

    /// Tells the console where to send its microphone, once the talk m-line has a mid.
    async fn announce_talk(&mut self) {
        let Some((talk, false)) = self.talk.clone() else {
            return;
        };
        let (mid, video_mid) = match self.peer.as_ref() {
            Some(peer) => (peer.talk_mid().await, peer.link_mid().await),
            None => (None, None),
        };
        let video_mid = if talk.has_video() {
            video_mid
        } else {
            Some(String::new())
        };
        if let (Some(mid), Some(video_mid)) = (mid, video_mid) {
            self.talk = Some((Arc::clone(&talk), true));
            self.talk_state(
                &talk.unit,
                TalkLifecycle::Live,
                (&mid, &video_mid),
                "",
                &talk.id,
            );
        }
    }

    fn stop_talk(&mut self) {
        let Some((talk, _)) = self.talk.take() else {
            return;
        };
        if let Some(peer) = self.peer.as_ref() {
            peer.talk_sink
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
        }
        talk.stop();
        let what = if talk.has_video() {
            "link.end"
        } else {
            "talk.end"
        };
        let (case, operation) = self.talk_bound.take().unzip();
        self.hub.evidence.audit.record(
            &talk.by,
            what,
            &talk.unit,
            serde_json::json!({ "talk": talk.id, "seconds": talk.started.elapsed().as_secs_f64(),
                "case": case, "operation": operation,
                "packets": talk.packets.load(std::sync::atomic::Ordering::Relaxed),
                "video_frames": talk.video_frames.load(std::sync::atomic::Ordering::Relaxed),
                "recording": talk.recording_chain() }),
        );
        let (unit, id) = (talk.unit.clone(), talk.id.clone());
        self.talk_state(&unit, TalkLifecycle::Stopped, ("", ""), "", &id);
    }

    /// Audits the end of a tile's view, with how long it lasted.
    fn view_ended(&mut self, tile_id: &str) {
        if let Some((unit, since)) = self.views.remove(tile_id) {
            self.hub.evidence.audit.record(
                self.user.as_deref().unwrap_or("?"),
                "view.end",
                &unit,
                serde_json::json!({ "console": self.id, "tile": tile_id,
                    "seconds": since.elapsed().as_secs_f64() }),
            );
        }
    }

    fn authenticate(&mut self, token: &str) {
        let audit = &self.hub.evidence.audit;
        let claims = match self.hub.authority.verify(token) {
            Ok(c) => c,
            Err(e) => {
                audit.record(
                    "?",
                    "login.refused",
                    "console",
                    serde_json::json!({ "via": self.transport, "reason": e.to_string() }),
                );
                self.session.auth_failed(&e.to_string());
                return;
            }
        };
        if !claims.role.can_watch_live() {
            audit.record(
                &claims.sub,
                "login.refused",
                "console",
                serde_json::json!({ "via": self.transport, "reason": "role", "role": claims.role }),
            );
            self.session
                .auth_failed(&format!("a {:?} token cannot use the console", claims.role));
            return;
        }
        audit.record(
            &claims.sub,
            "login",
            "console",
            serde_json::json!({ "via": self.transport, "role": claims.role, "console": self.id }),
        );
        let scope = match self.hub.scope_of(&claims) {
            Ok(s) => s,
            Err(reason) => {
                audit.record(
                    &claims.sub,
                    "login.refused",
                    "console",
                    serde_json::json!({ "via": self.transport, "reason": reason }),
                );
                self.session.auth_failed(&reason);
                return;
            }
        };
        self.user = Some(claims.sub.clone());
        self.role = Some(claims.role);
        self.claims = Some(claims.clone());
        let principal = Principal {
            user: claims.sub.clone(),
            role: format!("{:?}", claims.role).to_lowercase(),
        };
        let units = self.hub.cascade.visible_units(&self.hub.units, &scope);
        let mut ready = ConsoleSession::ready(
            &self.id.to_string(),
            &principal,
            &self.hub.config.hub_id,
            units,
        );
        ready.courts = self.hub.cascade.courts_under(&scope);
        ready.court = scope.clone();
        self.scope = Some(scope);
        info!(user = %principal.user, role = %principal.role, "console signed in");
        self.session.authenticated(Instant::now(), principal, ready);
    }
}

async fn next_peer_event(
    events: &mut Option<tokio::sync::mpsc::UnboundedReceiver<PeerEvent>>,
) -> Option<PeerEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn error_event(code: ErrorCode, message: &str) -> SessionEvent {
    SessionEvent {
        kind: Some(tianwang_proto::v1::session_event::Kind::Error(
            tianwang_proto::v1::SessionError {
                code: code as i32,
                message: message.to_string(),
                tile_id: String::new(),
            },
        )),
    }
}
