//! Who is online and what they publish: unit → broadcast → tracks.
//!
//! A broadcast outlives its publisher's connection while anyone watches it: when a unit's
//! link drops and comes back, its tracks are the same objects, so subscribers carry on from
//! the next keyframe without subscribing again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tianwang_core::{
    KeyframeCoalescer, KeyframeDecision, RelayStats, Subscription, Track, TrackConfig,
};
use tianwang_proto::v1::{
    KeyframeRequest, Recorded, TimeRange, TrackInfo, TrackKind, UnitStats, UnitSummary,
};
use tianwang_proto::{ControlMessage, Kind};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// One track of a broadcast, with what subscribers need to know of it.
pub struct TrackEntry {
    /// As announced, except `id`: the track's position in the broadcast.
    pub info: TrackInfo,
    pub track: Arc<Track>,
    /// Groups from the device's spool (backfill): only the recorder reads them, never a
    /// live viewer.
    pub backfill: Arc<Track>,
    keyframes: Mutex<KeyframeCoalescer>,
}

/// The live publisher of a broadcast.
pub struct PublisherLink {
    pub session: u64,
    /// Control messages to the device (keyframe requests, directives).
    pub control: mpsc::Sender<ControlMessage>,
    /// Track name → the id the device announced it with.
    pub track_ids: HashMap<String, u32>,
    /// Cancelled when another connection of the same unit takes over.
    pub replaced: CancellationToken,
    /// The officer carrying the device, as it said in its hello.
    pub officer: Option<String>,
    /// Where talkback to the unit goes; None for a pull from a child hub.
    pub talk: Option<TalkPath>,
}

/// The way down to a unit's speaker.
#[derive(Clone)]
pub enum TalkPath {
    /// Group streams on the device's own QUIC connection, a track per talk.
    Quic(quinn::Connection),
    /// The WHIP session's audio send track: one for the whole session, so the publisher
    /// hears every talk on one continuous RTP stream.
    Whip(Arc<Track>),
}

pub struct Broadcast {
    pub unit_id: String,
    tracks: RwLock<Vec<Arc<TrackEntry>>>,
    publisher: Mutex<Option<PublisherLink>>,
    online: AtomicBool,
    keyframe_interval: Duration,
    rates: Mutex<Rates>,
    /// Pulled from a child hub: the court the unit is connected to. Such a broadcast is
    /// relayed here but neither recorded nor watched by the alarm rules (its own hub does
    /// both), and its coming and going is the cascade's news, not the registry's.
    remote: Option<String>,
    /// Recorded windows (capture µs) per track name not yet told to the device: a control
    /// queue that was full, or a device away. Sent with the next confirmation.
    unconfirmed: Mutex<HashMap<String, Vec<(u64, u64)>>>,
}

/// Windows of one track kept for a device that could not be told yet; beyond this the
/// oldest go (the device then offers them again and they are recorded twice, not lost).
const MAX_UNCONFIRMED: usize = 4096;

/// Rates over the last sampling period, and the totals they were computed from.
#[derive(Debug, Default, Clone)]
struct Rates {
    stats: UnitStats,
    /// (track name, frames, payload bytes) at the last sample.
    totals: Vec<(String, u64, u64)>,
}

/// A change of a unit that watchers are told about.
#[derive(Clone, Debug, PartialEq)]
pub struct UnitChange {
    pub unit_id: String,
    pub online: bool,
    pub tracks: Vec<TrackInfo>,
    /// The unit's court; empty for a unit of this hub.
    pub court: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these leaves plain data behind; carry on with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Broadcast {
    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// Sends a control message to the live publisher (a device, or the child hub a pulled
    /// unit comes from) without waiting: false if there is none or its queue is full.
    pub fn send_control(&self, msg: ControlMessage) -> bool {
        lock(&self.publisher)
            .as_ref()
            .is_some_and(|l| l.control.try_send(msg).is_ok())
    }

    /// The live device's connection.
    pub fn talk_path(&self) -> Option<TalkPath> {
        lock(&self.publisher).as_ref().and_then(|l| l.talk.clone())
    }

    /// The publisher's ids for the tracks, by name (a child hub names them in Subscribed).
    pub fn set_track_ids(&self, ids: HashMap<String, u32>) {
        if let Some(link) = lock(&self.publisher).as_mut() {
            link.track_ids = ids;
        }
    }

    /// The id the live publisher announced a track with, by name.
    /// Tells the device that its recording holds `windows` of its track `name` (with any
    /// not told before). Never waits: what cannot go now goes with the next one.
    pub fn confirm(&self, name: &str, windows: &[(u64, u64)]) {
        let mut pending = lock(&self.unconfirmed);
        let list = pending.entry(name.to_string()).or_default();
        list.extend(windows.iter().filter(|(f, t)| t > f));
        if list.is_empty() {
            return;
        }
        list.sort_unstable();
        // Touching windows are one.
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(list.len());
        for &(f, t) in list.iter() {
            match merged.last_mut() {
                Some(last) if f <= last.1 => last.1 = last.1.max(t),
                _ => merged.push((f, t)),
            }
        }
        if merged.len() > MAX_UNCONFIRMED {
            merged.drain(..merged.len() - MAX_UNCONFIRMED);
        }
        let sent = self.device_track_id(name).is_some_and(|id| {
            self.send_control(ControlMessage::new(Kind::Recorded(Recorded {
                ranges: merged
                    .iter()
                    .map(|&(from_us, to_us)| TimeRange { from_us, to_us })
                    .collect(),
                track_ids: vec![id],
            })))
        });
        *list = if sent { Vec::new() } else { merged };
    }

    pub fn device_track_id(&self, name: &str) -> Option<u32> {
        lock(&self.publisher)
            .as_ref()
            .and_then(|l| l.track_ids.get(name).copied())
    }

    /// The officer of the unit's live publisher, if it said.
    pub fn officer(&self) -> Option<String> {
        lock(&self.publisher)
            .as_ref()
            .and_then(|l| l.officer.clone())
    }

    pub fn tracks(&self) -> Vec<Arc<TrackEntry>> {
        self.tracks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn subscriber_count(&self) -> usize {
        self.tracks()
            .iter()
            .map(|t| t.track.subscriber_count())
            .sum()
    }

    pub fn track_infos(&self) -> Vec<TrackInfo> {
        self.tracks().iter().map(|t| t.info.clone()).collect()
    }

    pub fn summary(&self) -> UnitSummary {
        UnitSummary {
            unit_id: self.unit_id.clone(),
            online: self.is_online(),
            tracks: self.track_infos(),
            subscribers: self.subscriber_count() as u32,
            stats: Some(self.stats()),
            court: self.remote.clone().unwrap_or_default(),
        }
    }

    /// Bitrate and frame rate as last sampled.
    pub fn stats(&self) -> UnitStats {
        lock(&self.rates).stats
    }

    /// Recomputes bitrate (all tracks) and frame rate (video) over `elapsed`.
    fn sample(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64().max(1e-3);
        let tracks = self.tracks();
        let mut rates = lock(&self.rates);
        let mut bytes = 0u64;
        let mut video_frames = 0u64;
        let mut last_frame_us = rates.stats.last_frame_us;
        let mut totals = Vec::with_capacity(tracks.len());
        for t in &tracks {
            let now = t.track.totals();
            let (f, b) = (
                now.frames.load(Ordering::Relaxed),
                now.payload_bytes.load(Ordering::Relaxed),
            );
            let (pf, pb) = rates
                .totals
                .iter()
                .find(|(n, _, _)| *n == t.info.name)
                .map(|(_, f, b)| (*f, *b))
                .unwrap_or((f, b));
            bytes += b.saturating_sub(pb);
            if t.info.kind() == TrackKind::Video {
                video_frames += f.saturating_sub(pf);
                last_frame_us = now.last_timestamp_us.load(Ordering::Relaxed);
            }
            totals.push((t.info.name.clone(), f, b));
        }
        rates.stats = UnitStats {
            bitrate_bps: (bytes as f64 * 8.0 / secs) as u64,
            framerate: (video_frames as f64 / secs) as f32,
            last_frame_us,
        };
        rates.totals = totals;
    }

    /// A subscriber wants a keyframe on a track: ask the device, at most once per interval.
    pub fn request_keyframe(self: &Arc<Self>, track_name: &str) {
        let Some(entry) = self
            .tracks()
            .into_iter()
            .find(|t| t.info.name == track_name)
        else {
            return;
        };
        let decision = lock(&entry.keyframes).request(Instant::now());
        match decision {
            KeyframeDecision::SendNow => self.send_keyframe_request(track_name),
            KeyframeDecision::Deferred { due: Some(due) } => {
                let this = Arc::clone(self);
                let name = track_name.to_string();
                tokio::spawn(async move {
                    tokio::time::sleep_until(due.into()).await;
                    if lock(&entry.keyframes).handle_timeout(Instant::now()) {
                        this.send_keyframe_request(&name);
                    }
                });
            }
            KeyframeDecision::Deferred { due: None } => {}
        }
    }

    fn send_keyframe_request(&self, track_name: &str) {
        let publisher = lock(&self.publisher);
        if let Some(link) = publisher.as_ref()
            && let Some(&track_id) = link.track_ids.get(track_name)
        {
            // Never wait on a device's control stream: a full queue drops the request.
            let _ = link
                .control
                .try_send(ControlMessage::new(Kind::KeyframeRequest(
                    KeyframeRequest { track_id },
                )));
        }
    }

    /// A keyframe arrived on a track: pending requests for it are answered.
    pub fn keyframe_arrived(&self, entry: &TrackEntry) {
        lock(&entry.keyframes).on_keyframe();
    }
}

/// A granted subscription: the broadcast, and each chosen track with its subscription.
pub type Subscribed = (Arc<Broadcast>, Vec<(Arc<TrackEntry>, Subscription)>);

/// Why a subscription was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeRefusal {
    #[error("unit {0:?} is not online")]
    UnknownUnit(String),
    #[error("unit {unit:?} has no track {track:?}")]
    UnknownTrack { unit: String, track: String },
    #[error("track {0:?} is asked for twice")]
    Repeated(String),
}

impl SubscribeRefusal {
    pub fn code(&self) -> tianwang_proto::ErrorCode {
        match self {
            SubscribeRefusal::UnknownUnit(_) => tianwang_proto::ErrorCode::UnknownUnit,
            SubscribeRefusal::UnknownTrack { .. } => tianwang_proto::ErrorCode::UnknownTrack,
            SubscribeRefusal::Repeated(_) => tianwang_proto::ErrorCode::Protocol,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("announce has no tracks")]
    Empty,
    #[error("announce has {0} tracks; at most 8 are allowed")]
    TooMany(usize),
    #[error("track name {0:?} is empty, too long or repeated")]
    BadName(String),
    #[error("track id {0} is repeated")]
    DuplicateId(u32),
    #[error("track {name:?}: codec {codec:?} is not supported for {kind} (h264 video, opus audio)")]
    Codec {
        name: String,
        codec: String,
        kind: &'static str,
    },
}

/// Checks a publisher's announced tracks.
pub fn validate_announce(tracks: &[TrackInfo]) -> Result<(), AnnounceError> {
    if tracks.is_empty() {
        return Err(AnnounceError::Empty);
    }
    if tracks.len() > 8 {
        return Err(AnnounceError::TooMany(tracks.len()));
    }
    let mut names = std::collections::HashSet::new();
    let mut ids = std::collections::HashSet::new();
    for t in tracks {
        let name_ok = !t.name.is_empty()
            && t.name.len() <= 32
            && t.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok || !names.insert(t.name.as_str()) {
            return Err(AnnounceError::BadName(t.name.clone()));
        }
        if !ids.insert(t.id) {
            return Err(AnnounceError::DuplicateId(t.id));
        }
        let (kind, ok) = match t.kind() {
            TrackKind::Video => ("video", t.codec == "h264"),
            TrackKind::Audio => ("audio", t.codec == "opus"),
            TrackKind::Unspecified => ("an unspecified kind", false),
        };
        if !ok {
            return Err(AnnounceError::Codec {
                name: t.name.clone(),
                codec: t.codec.clone(),
                kind,
            });
        }
    }
    Ok(())
}

/// What [`Units::attach`] hands the publisher's session.
pub struct Attached {
    pub broadcast: Arc<Broadcast>,
    /// The device's track id → the track and its entry.
    pub tracks: HashMap<u32, Arc<TrackEntry>>,
    /// The connection this one replaces, if the unit was still connected.
    pub replaced: Option<PublisherLink>,
}

/// Every unit this hub knows right now.
pub struct Units {
    map: DashMap<String, Arc<Broadcast>>,
    relay: Arc<RelayStats>,
    track_config: TrackConfig,
    keyframe_interval: Duration,
    changes: broadcast::Sender<UnitChange>,
}

impl Units {
    pub fn new(
        relay: Arc<RelayStats>,
        track_config: TrackConfig,
        keyframe_interval: Duration,
    ) -> Self {
        Self {
            map: DashMap::new(),
            relay,
            track_config,
            keyframe_interval,
            changes: broadcast::channel(256).0,
        }
    }

    /// Units coming online, going offline or changing tracks. A receiver that lags behind
    /// gets `Lagged` and should re-read [`Units::list`].
    pub fn changes(&self) -> broadcast::Receiver<UnitChange> {
        self.changes.subscribe()
    }

    fn tell(&self, b: &Broadcast) {
        // No receivers is fine.
        let _ = self.changes.send(UnitChange {
            unit_id: b.unit_id.clone(),
            online: b.is_online(),
            tracks: b.track_infos(),
            court: String::new(),
        });
    }

    /// Recomputes every unit's rates, and forgets units offline and unwatched (a viewer's
    /// subscription may end a moment after its session let go); the hub calls this once a
    /// second.
    pub fn sample_rates(&self, elapsed: Duration) {
        let all: Vec<_> = self.map.iter().map(|e| Arc::clone(e.value())).collect();
        for b in all {
            b.sample(elapsed);
            if !b.is_online() {
                self.release_if_idle(&b.unit_id);
            }
        }
    }

    /// Subscribes to tracks of a unit (all of them when `names` is empty). Done under the
    /// registry's lock for the unit, so a unit being forgotten cannot leave the subscriber
    /// on tracks that will never carry anything again.
    pub fn subscribe(&self, unit: &str, names: &[String]) -> Result<Subscribed, SubscribeRefusal> {
        let guard = self
            .map
            .get(unit)
            .ok_or_else(|| SubscribeRefusal::UnknownUnit(unit.to_string()))?;
        let broadcast = Arc::clone(guard.value());
        let entries = broadcast.tracks();
        let chosen: Vec<Arc<TrackEntry>> = if names.is_empty() {
            entries
        } else {
            let mut seen = std::collections::HashSet::new();
            names
                .iter()
                .map(|name| {
                    if !seen.insert(name.as_str()) {
                        return Err(SubscribeRefusal::Repeated(name.clone()));
                    }
                    entries
                        .iter()
                        .find(|e| &e.info.name == name)
                        .cloned()
                        .ok_or_else(|| SubscribeRefusal::UnknownTrack {
                            unit: unit.to_string(),
                            track: name.clone(),
                        })
                })
                .collect::<Result<_, _>>()?
        };
        let subscriptions = chosen
            .into_iter()
            .map(|e| {
                let s = e.track.subscribe();
                (e, s)
            })
            .collect();
        drop(guard);
        Ok((broadcast, subscriptions))
    }

    pub fn relay_stats(&self) -> &Arc<RelayStats> {
        &self.relay
    }

    pub fn get(&self, unit: &str) -> Option<Arc<Broadcast>> {
        // Clone the Arc and let the shard guard go at once.
        self.map.get(unit).map(|b| Arc::clone(&b))
    }

    /// A publisher announced its tracks: make it the unit's live publisher. Tracks keep
    /// their identity across reconnects when name, kind and codec stay the same.
    pub fn attach(&self, unit: &str, announced: &[TrackInfo], link: PublisherLink) -> Attached {
        // Only a pull can be refused.
        self.attach_as(unit, None, announced, link)
            .expect("a device's attach always succeeds")
    }

    /// A unit of a child hub is pulled here. Refused (with what was attached undone) if a
    /// unit of that id is connected to this hub itself: unit ids are unique in the tree,
    /// and a local one wins.
    pub fn attach_remote(
        &self,
        unit: &str,
        court: &str,
        tracks: &[TrackInfo],
        link: PublisherLink,
    ) -> Option<Attached> {
        self.attach_as(unit, Some(court.to_string()), tracks, link)
    }

    fn attach_as(
        &self,
        unit: &str,
        remote: Option<String>,
        announced: &[TrackInfo],
        link: PublisherLink,
    ) -> Option<Attached> {
        // The entry stays locked until the broadcast is online: release_if_idle cannot
        // forget it half way.
        let mut entry = self.map.entry(unit.to_string()).or_insert_with(|| {
            Arc::new(Broadcast {
                unit_id: unit.to_string(),
                tracks: RwLock::new(Vec::new()),
                publisher: Mutex::new(None),
                online: AtomicBool::new(false),
                keyframe_interval: self.keyframe_interval,
                rates: Mutex::new(Rates::default()),
                remote: remote.clone(),
                unconfirmed: Mutex::default(),
            })
        });
        if entry.value().remote != remote {
            if remote.is_some() && !entry.value().is_remote() {
                // A local unit of that id exists: the pull is refused.
                return None;
            }
            // A device of this hub takes the id over from a pulled unit (or the unit moved
            // to another court): a new broadcast.
            let old = Arc::clone(entry.value());
            *entry.value_mut() = Arc::new(Broadcast {
                unit_id: unit.to_string(),
                tracks: RwLock::new(Vec::new()),
                publisher: Mutex::new(None),
                online: AtomicBool::new(false),
                keyframe_interval: self.keyframe_interval,
                rates: Mutex::new(Rates::default()),
                remote: None,
                unconfirmed: Mutex::default(),
            });
            for t in old.tracks() {
                t.track.close();
                t.backfill.close();
            }
        }
        let broadcast = Arc::clone(entry.value());
        let mut by_device_id = HashMap::new();
        {
            let mut tracks = broadcast.tracks.write().unwrap_or_else(|e| e.into_inner());
            let old = std::mem::take(&mut *tracks);
            for (position, info) in announced.iter().enumerate() {
                let reuse = old.iter().find(|e| {
                    e.info.name == info.name
                        && e.info.kind == info.kind
                        && e.info.codec == info.codec
                });
                let entry = match reuse {
                    Some(e) => Arc::new(TrackEntry {
                        info: TrackInfo {
                            id: position as u32,
                            ..info.clone()
                        },
                        track: Arc::clone(&e.track),
                        backfill: Arc::clone(&e.backfill),
                        keyframes: Mutex::new(KeyframeCoalescer::new(broadcast.keyframe_interval)),
                    }),
                    None => Arc::new(TrackEntry {
                        info: TrackInfo {
                            id: position as u32,
                            ..info.clone()
                        },
                        track: Track::new(
                            info.name.clone(),
                            self.track_config,
                            Arc::clone(&self.relay),
                        ),
                        backfill: Track::new(
                            format!("{}-backfill", info.name),
                            self.track_config,
                            Arc::default(),
                        ),
                        keyframes: Mutex::new(KeyframeCoalescer::new(broadcast.keyframe_interval)),
                    }),
                };
                by_device_id.insert(info.id, Arc::clone(&entry));
                tracks.push(entry);
            }
            // Tracks the device no longer announces end for their subscribers.
            for e in &old {
                if !tracks.iter().any(|t| Arc::ptr_eq(&t.track, &e.track)) {
                    e.track.close();
                    e.backfill.close();
                }
            }
        }
        let replaced = lock(&broadcast.publisher).replace(link);
        broadcast.online.store(true, Ordering::Release);
        drop(entry);
        if !broadcast.is_remote() {
            self.tell(&broadcast);
        }
        Some(Attached {
            broadcast,
            tracks: by_device_id,
            replaced,
        })
    }

    /// The publisher's session `session` ended. Unless a newer one took over, the unit is
    /// offline; its broadcast stays while anyone still watches.
    pub fn detach(&self, unit: &str, session: u64) {
        let Some(b) = self.get(unit) else { return };
        {
            let mut publisher = lock(&b.publisher);
            if publisher.as_ref().is_some_and(|l| l.session == session) {
                *publisher = None;
                b.online.store(false, Ordering::Release);
                // Whoever joins while the unit is away waits for its next keyframe
                // instead of starting from stale pictures.
                for t in b.tracks() {
                    t.track.clear_cache();
                }
            }
        }
        if !b.is_online() && !b.is_remote() {
            self.tell(&b);
        }
        self.release_if_idle(unit);
    }

    /// Forgets a unit that is offline and unwatched.
    pub fn release_if_idle(&self, unit: &str) {
        let removed = self
            .map
            .remove_if(unit, |_, b| !b.is_online() && b.subscriber_count() == 0);
        if let Some((_, b)) = removed {
            for t in b.tracks() {
                t.track.close();
                t.backfill.close();
            }
        }
    }

    /// The units connected to this hub (not those pulled from child hubs).
    pub fn list(&self) -> Vec<Arc<Broadcast>> {
        self.map
            .iter()
            .filter(|e| !e.value().is_remote())
            .map(|e| Arc::clone(e.value()))
            .collect()
    }

    /// Units pulled from child hubs.
    pub fn pulled(&self) -> Vec<Arc<Broadcast>> {
        self.map
            .iter()
            .filter(|e| e.value().is_remote())
            .map(|e| Arc::clone(e.value()))
            .collect()
    }

    pub fn online_count(&self) -> usize {
        self.map
            .iter()
            .filter(|e| e.value().is_online() && !e.value().is_remote())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u32, name: &str, kind: TrackKind, codec: &str) -> TrackInfo {
        TrackInfo {
            id,
            name: name.into(),
            kind: kind as i32,
            codec: codec.into(),
            ..Default::default()
        }
    }

    fn link(session: u64) -> (PublisherLink, mpsc::Receiver<ControlMessage>) {
        let (tx, rx) = mpsc::channel(4);
        (
            PublisherLink {
                session,
                control: tx,
                track_ids: HashMap::new(),
                replaced: CancellationToken::new(),
                officer: None,
                talk: None,
            },
            rx,
        )
    }

    fn units() -> Units {
        Units::new(
            Arc::default(),
            TrackConfig::default(),
            Duration::from_millis(500),
        )
    }

    #[test]
    fn announces_are_checked() {
        let v = info(1, "video", TrackKind::Video, "h264");
        assert!(validate_announce(std::slice::from_ref(&v)).is_ok());
        assert!(matches!(validate_announce(&[]), Err(AnnounceError::Empty)));
        assert!(matches!(
            validate_announce(&[v.clone(), info(1, "audio", TrackKind::Audio, "opus")]),
            Err(AnnounceError::DuplicateId(1))
        ));
        assert!(matches!(
            validate_announce(&[info(1, "video", TrackKind::Video, "vp9")]),
            Err(AnnounceError::Codec { .. })
        ));
        assert!(matches!(
            validate_announce(&[info(1, "../x", TrackKind::Video, "h264")]),
            Err(AnnounceError::BadName(_))
        ));
    }

    #[test]
    fn a_reconnecting_unit_keeps_its_tracks_and_watchers() {
        let u = units();
        let tracks = [info(7, "video", TrackKind::Video, "h264")];
        let (l1, _r1) = link(1);
        let first = u.attach("bwc-1", &tracks, l1);
        let sub = first.tracks[&7].track.subscribe();
        u.detach("bwc-1", 1);
        let b = u.get("bwc-1").expect("kept while watched");
        assert!(!b.is_online());

        let (l2, _r2) = link(2);
        let second = u.attach("bwc-1", &tracks, l2);
        assert!(Arc::ptr_eq(&second.tracks[&7].track, sub.track()));
        assert!(second.replaced.is_none());
        drop(sub);
        u.detach("bwc-1", 2);
        assert!(u.get("bwc-1").is_none(), "offline and unwatched: forgotten");
    }

    #[test]
    fn watchers_are_told_when_units_come_and_go() {
        let u = units();
        let mut changes = u.changes();
        let (l1, _r1) = link(1);
        u.attach("bwc-1", &[info(1, "video", TrackKind::Video, "h264")], l1);
        u.detach("bwc-1", 1);
        let on = changes.try_recv().unwrap();
        assert!(on.online && on.tracks.len() == 1 && on.unit_id == "bwc-1");
        assert!(!changes.try_recv().unwrap().online);
    }

    #[test]
    fn a_second_connection_of_a_unit_replaces_the_first() {
        let u = units();
        let tracks = [info(1, "video", TrackKind::Video, "h264")];
        let (l1, _r1) = link(1);
        u.attach("bwc-1", &tracks, l1);
        let (l2, _r2) = link(2);
        let second = u.attach("bwc-1", &tracks, l2);
        assert_eq!(second.replaced.map(|l| l.session), Some(1));
        // The old session ending later does not take the new one offline.
        u.detach("bwc-1", 1);
        assert!(u.get("bwc-1").is_some_and(|b| b.is_online()));
    }
}
