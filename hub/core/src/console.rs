//! A command console's session, sans-IO: what the console asked for, what the hub must do
//! about it, and what the console is told. The same state machine serves gRPC and
//! WebSocket consoles; the shell feeds it requests, the outcomes of the work it asked for
//! (token checked, tracks attached, offer created, answer applied) and the clock, and
//! executes the [`Action`]s it returns.
//!
//! The hub is always the offerer: a console's one PeerConnection gets a transceiver per
//! track of every tile, and every change of tiles is one renegotiation (queued while an
//! offer is outstanding).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use tianwang_proto::v1::session_event::Kind as Event;
use tianwang_proto::v1::session_request::Kind as Request;
use tianwang_proto::v1::tile_state::State as TileLifecycle;
use tianwang_proto::v1::{
    DirectiveRequest, IceCandidate, Pong, SessionDescription, SessionError, SessionEvent,
    SessionReady, SessionRequest, TileState, TileStats, UnitEvent, UnitSummary,
};
use tianwang_proto::{ErrorCode, Sensitive};

#[derive(Clone, Copy, Debug)]
pub struct ConsoleConfig {
    pub max_tiles: usize,
    /// A console must authenticate within this.
    pub auth_timeout: Duration,
    /// ... and answer each offer within this.
    pub answer_timeout: Duration,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            max_tiles: 25,
            auth_timeout: Duration::from_secs(10),
            answer_timeout: Duration::from_secs(15),
        }
    }
}

/// Who is at the console, once the token checked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub role: String,
}

/// Work for the shell.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Send(SessionEvent),
    /// Check the token; answer with `authenticated` or `auth_failed`. (Redacted in `Debug`:
    /// actions may be logged.)
    Authenticate {
        token: Sensitive<String>,
    },
    /// Add the unit's tracks to the PeerConnection; answer with `tile_attached` or
    /// `tile_failed`.
    AttachTile {
        tile_id: String,
        unit_id: String,
    },
    /// Remove the tile's tracks (its media stops at once).
    DetachTile {
        tile_id: String,
    },
    /// Create an offer for the PeerConnection as it is now; answer with `offer_created` or
    /// `negotiation_failed`.
    CreateOffer {
        revision: u64,
    },
    /// Apply the console's answer; answer with `answer_applied`.
    ApplyAnswer {
        revision: u64,
        sdp: String,
    },
    AddRemoteCandidate(IceCandidate),
    RequestKeyframe {
        tile_id: String,
    },
    /// Issue a directive for the console's user (the shell checks role and jurisdiction,
    /// and its states come back as events).
    Direct(DirectiveRequest),
    /// Start (or stop) push-to-talk to a unit, or with `video` a remote video link; the
    /// shell answers with `talk_channel_added` when the PeerConnection needs a new offer
    /// for it, and sends the TalkState.
    Talk {
        unit_id: String,
        on: bool,
        video: bool,
    },
    /// End the session (the error was sent already).
    Close {
        code: ErrorCode,
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TileStage {
    Attaching,
    /// Tracks attached, not yet in an answered offer.
    Pending {
        offered_in: Option<u64>,
    },
    Live,
}

#[derive(Clone, Debug)]
struct Tile {
    unit_id: String,
    stage: TileStage,
    video_mid: String,
    audio_mid: String,
}

#[derive(Debug)]
pub struct ConsoleSession {
    config: ConsoleConfig,
    principal: Option<Principal>,
    authenticating: bool,
    auth_deadline: Option<Instant>,
    tiles: BTreeMap<String, Tile>,
    /// The last offer's revision.
    revision: u64,
    /// An offer is being made or awaits its answer (revision, answer deadline once sent).
    negotiating: Option<(u64, Option<Instant>)>,
    /// Tiles changed while negotiating: offer again afterwards.
    renegotiate: bool,
    actions: VecDeque<Action>,
    closed: bool,
}

fn event(kind: Event) -> Action {
    Action::Send(SessionEvent { kind: Some(kind) })
}

fn error(code: ErrorCode, message: impl Into<String>, tile_id: &str) -> Action {
    event(Event::Error(SessionError {
        code: code as i32,
        message: message.into(),
        tile_id: tile_id.to_string(),
    }))
}

impl ConsoleSession {
    pub fn new(now: Instant, config: ConsoleConfig) -> Self {
        Self {
            config,
            principal: None,
            authenticating: false,
            auth_deadline: Some(now + config.auth_timeout),
            tiles: BTreeMap::new(),
            revision: 0,
            negotiating: None,
            renegotiate: false,
            actions: VecDeque::new(),
            closed: false,
        }
    }

    pub fn principal(&self) -> Option<&Principal> {
        self.principal.as_ref()
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    pub fn tile_count(&self) -> usize {
        self.tiles.len()
    }

    /// The unit shown on a tile.
    pub fn tile_unit(&self, tile_id: &str) -> Option<&str> {
        self.tiles.get(tile_id).map(|t| t.unit_id.as_str())
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`ConsoleSession::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let answer = self.negotiating.and_then(|(_, d)| d);
        match (self.auth_deadline, answer) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if self.auth_deadline.is_some_and(|d| now >= d) {
            self.close(ErrorCode::Unauthorized, "no authentication in time");
            return;
        }
        if let Some((revision, Some(deadline))) = self.negotiating
            && now >= deadline
        {
            self.close(
                ErrorCode::Protocol,
                format!("no answer to offer {revision} in time"),
            );
        }
    }

    fn close(&mut self, code: ErrorCode, reason: impl Into<String>) {
        let reason = reason.into();
        self.actions.push_back(error(code, reason.clone(), ""));
        self.actions.push_back(Action::Close { code, reason });
        self.closed = true;
        self.auth_deadline = None;
        self.negotiating = None;
    }

    /// A message the transport could not decode (bad JSON, unknown fields of the wrong
    /// type): the console is told, the session goes on.
    pub fn handle_undecodable(&mut self, reason: &str) {
        self.actions.push_back(error(
            ErrorCode::Protocol,
            format!("message not understood: {reason}"),
            "",
        ));
    }

    pub fn handle_request(&mut self, now: Instant, request: SessionRequest) {
        if self.closed {
            return;
        }
        let Some(kind) = request.kind else {
            self.actions
                .push_back(error(ErrorCode::Protocol, "empty request", ""));
            return;
        };
        match kind {
            Request::Ping(p) => self
                .actions
                .push_back(event(Event::Pong(Pong { nonce: p.nonce }))),
            Request::Auth(a) => {
                if self.principal.is_some() || self.authenticating {
                    self.actions
                        .push_back(error(ErrorCode::Protocol, "already authenticated", ""));
                } else {
                    self.authenticating = true;
                    self.actions.push_back(Action::Authenticate {
                        token: Sensitive::new(a.token),
                    });
                }
            }
            _ if self.principal.is_none() => {
                self.actions
                    .push_back(error(ErrorCode::Unauthorized, "authenticate first", ""));
            }
            Request::AddTile(t) => self.add_tile(t.tile_id, t.unit_id),
            Request::RemoveTile(t) => self.remove_tile(now, &t.tile_id),
            Request::Answer(answer) => self.answer(answer),
            Request::IceCandidate(c) => self.actions.push_back(Action::AddRemoteCandidate(c)),
            Request::Directive(d) => self.actions.push_back(Action::Direct(d)),
            Request::Talk(t) => self.actions.push_back(Action::Talk {
                unit_id: t.unit_id,
                on: t.on,
                video: t.video,
            }),
            Request::Keyframe(k) => {
                if self.tiles.contains_key(&k.tile_id) {
                    self.actions
                        .push_back(Action::RequestKeyframe { tile_id: k.tile_id });
                } else {
                    self.actions
                        .push_back(error(ErrorCode::Protocol, "no such tile", &k.tile_id));
                }
            }
        }
    }

    fn add_tile(&mut self, tile_id: String, unit_id: String) {
        let bad_id = tile_id.is_empty()
            || tile_id.len() > 64
            || !tile_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if bad_id {
            self.actions.push_back(error(
                ErrorCode::Protocol,
                "tile ids are 1 to 64 letters, digits, - or _",
                &tile_id,
            ));
        } else if self.tiles.contains_key(&tile_id) {
            self.actions.push_back(error(
                ErrorCode::Protocol,
                "tile id already in use",
                &tile_id,
            ));
        } else if self.tiles.len() >= self.config.max_tiles {
            self.actions.push_back(error(
                ErrorCode::Forbidden,
                format!("at most {} tiles per console", self.config.max_tiles),
                &tile_id,
            ));
        } else {
            self.tiles.insert(
                tile_id.clone(),
                Tile {
                    unit_id: unit_id.clone(),
                    stage: TileStage::Attaching,
                    video_mid: String::new(),
                    audio_mid: String::new(),
                },
            );
            self.actions
                .push_back(Action::AttachTile { tile_id, unit_id });
        }
    }

    fn remove_tile(&mut self, _now: Instant, tile_id: &str) {
        let Some(tile) = self.tiles.remove(tile_id) else {
            self.actions
                .push_back(error(ErrorCode::Protocol, "no such tile", tile_id));
            return;
        };
        self.actions.push_back(Action::DetachTile {
            tile_id: tile_id.to_string(),
        });
        self.actions
            .push_back(self.tile_event(tile_id, &tile, TileLifecycle::Removed, "removed"));
        if tile.stage != TileStage::Attaching {
            self.negotiate();
        }
    }

    fn answer(&mut self, answer: SessionDescription) {
        match self.negotiating {
            Some((revision, Some(_))) if revision == answer.revision => {
                // Waiting for the shell now, not the console.
                self.negotiating = Some((revision, None));
                self.actions.push_back(Action::ApplyAnswer {
                    revision,
                    sdp: answer.sdp,
                });
            }
            Some((revision, _)) => self.actions.push_back(error(
                ErrorCode::Protocol,
                format!(
                    "answer for offer {}, but the offer outstanding is {revision}",
                    answer.revision
                ),
                "",
            )),
            None => {
                self.actions
                    .push_back(error(ErrorCode::Protocol, "no offer is outstanding", ""))
            }
        }
    }

    fn tile_event(&self, tile_id: &str, tile: &Tile, state: TileLifecycle, reason: &str) -> Action {
        event(Event::Tile(TileState {
            tile_id: tile_id.to_string(),
            unit_id: tile.unit_id.clone(),
            state: state as i32,
            video_mid: tile.video_mid.clone(),
            audio_mid: tile.audio_mid.clone(),
            reason: reason.to_string(),
        }))
    }

    /// Offers now, or after the offer outstanding is answered.
    fn negotiate(&mut self) {
        if self.negotiating.is_some() {
            self.renegotiate = true;
            return;
        }
        self.revision += 1;
        let revision = self.revision;
        for tile in self.tiles.values_mut() {
            if let TileStage::Pending {
                offered_in: o @ None,
            } = &mut tile.stage
            {
                *o = Some(revision);
            }
        }
        self.negotiating = Some((revision, None));
        self.renegotiate = false;
        self.actions.push_back(Action::CreateOffer { revision });
    }

    // ---- outcomes of the shell's work ----

    pub fn authenticated(&mut self, now: Instant, principal: Principal, ready: SessionReady) {
        let _ = now;
        self.authenticating = false;
        self.auth_deadline = None;
        self.principal = Some(principal);
        self.actions.push_back(event(Event::Ready(ready)));
    }

    pub fn auth_failed(&mut self, reason: &str) {
        self.authenticating = false;
        self.close(ErrorCode::Unauthorized, reason);
    }

    pub fn tile_attached(&mut self, tile_id: &str, video_mid: &str, audio_mid: &str) {
        let Some(tile) = self.tiles.get_mut(tile_id) else {
            // Removed while attaching: the shell detaches what it attached.
            self.actions.push_back(Action::DetachTile {
                tile_id: tile_id.to_string(),
            });
            return;
        };
        tile.stage = TileStage::Pending { offered_in: None };
        tile.video_mid = video_mid.to_string();
        tile.audio_mid = audio_mid.to_string();
        let tile = tile.clone();
        self.actions
            .push_back(self.tile_event(tile_id, &tile, TileLifecycle::Pending, ""));
        self.negotiate();
    }

    pub fn tile_failed(&mut self, tile_id: &str, code: ErrorCode, reason: &str) {
        if let Some(tile) = self.tiles.remove(tile_id) {
            self.actions.push_back(error(code, reason, tile_id));
            self.actions
                .push_back(self.tile_event(tile_id, &tile, TileLifecycle::Removed, reason));
        }
    }

    /// `send_mids`: the offer's lines the console sends on (talk, link).
    pub fn offer_created(
        &mut self,
        now: Instant,
        revision: u64,
        sdp: String,
        send_mids: Vec<String>,
    ) {
        if self.negotiating.map(|(r, _)| r) != Some(revision) {
            return;
        }
        self.negotiating = Some((revision, Some(now + self.config.answer_timeout)));
        self.actions
            .push_back(event(Event::Offer(SessionDescription {
                r#type: "offer".into(),
                sdp,
                revision,
                send_mids,
            })));
    }

    pub fn negotiation_failed(&mut self, reason: &str) {
        self.close(ErrorCode::Internal, format!("negotiation failed: {reason}"));
    }

    pub fn answer_applied(&mut self, revision: u64, result: Result<(), String>) {
        if self.negotiating.map(|(r, _)| r) != Some(revision) {
            return;
        }
        if let Err(reason) = result {
            self.close(
                ErrorCode::Protocol,
                format!("the answer was refused: {reason}"),
            );
            return;
        }
        self.negotiating = None;
        let live: Vec<String> = self
            .tiles
            .iter()
            .filter(|(_, t)| matches!(t.stage, TileStage::Pending { offered_in: Some(r) } if r <= revision))
            .map(|(id, _)| id.clone())
            .collect();
        for id in live {
            if let Some(tile) = self.tiles.get_mut(&id) {
                tile.stage = TileStage::Live;
                let tile = tile.clone();
                self.actions
                    .push_back(self.tile_event(&id, &tile, TileLifecycle::Live, ""));
            }
        }
        let unoffered = self
            .tiles
            .values()
            .any(|t| t.stage == TileStage::Pending { offered_in: None });
        if self.renegotiate || unoffered {
            self.negotiate();
        }
    }

    pub fn local_candidate(&mut self, candidate: IceCandidate) {
        if !self.closed {
            self.actions
                .push_back(event(Event::IceCandidate(candidate)));
        }
    }

    pub fn unit_event(&mut self, unit: UnitEvent) {
        if self.principal.is_some() && !self.closed {
            self.actions.push_back(event(Event::Unit(unit)));
        }
    }

    /// The shell added the talkback m-line: the console needs an offer that carries it.
    pub fn talk_channel_added(&mut self) {
        if self.principal.is_some() && !self.closed {
            self.negotiate();
        }
    }

    /// An event for a signed-in console (court tree changes, directive states).
    pub fn send_event(&mut self, kind: Event) {
        if self.principal.is_some() && !self.closed {
            self.actions.push_back(event(kind));
        }
    }

    pub fn tile_stats(&mut self, stats: TileStats) {
        if self.tiles.contains_key(&stats.tile_id) && !self.closed {
            self.actions.push_back(event(Event::Stats(stats)));
        }
    }

    /// The units listed in a Ready event.
    pub fn ready(
        session_id: &str,
        principal: &Principal,
        hub_id: &str,
        units: Vec<UnitSummary>,
    ) -> SessionReady {
        SessionReady {
            session_id: session_id.to_string(),
            user: principal.user.clone(),
            role: principal.role.clone(),
            hub_id: hub_id.to_string(),
            units,
            ..Default::default()
        }
    }
}

#[cfg(test)]
#[path = "console_tests.rs"]
mod tests;
