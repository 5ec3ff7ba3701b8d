//! The court tree (see `docs/cascade.md`). A child hub links up to its parent over QUIC
//! with a certificate from the deployment CA (`uplink.rs`) and pushes its catalog: its
//! court and the courts below, and every unit with its state and tracks. The parent keeps
//! that catalog here (`child.rs` runs its side of the link), pulls a unit's media only
//! while someone at the parent watches it — once, however many do — and sends directives
//! down towards the unit. Jurisdiction is decided here too: a court covers itself and every
//! court below it.

pub mod child;
pub mod cli;
pub mod uplink;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tianwang_proto::v1::{
    Catalog, CatalogAlarm, CatalogOperation, CatalogUnit, CourtInfo, Subscribe, TrackInfo,
    UnitSummary, Unsubscribe,
};
use tianwang_proto::{ControlMessage, Kind};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::registry::{Broadcast, PublisherLink, TrackEntry, UnitChange, Units};

/// A unit below this hub, as the child hub it sits under reported it.
#[derive(Clone, Debug)]
pub struct RemoteUnit {
    pub court: String,
    pub online: bool,
    pub tracks: Vec<TrackInfo>,
    /// The child link it is reached through.
    pub link: u64,
}

/// What the console and the uplink hear about the tree.
#[derive(Clone, Debug)]
pub enum TreeChange {
    Unit(UnitChange),
    /// Courts were added or removed below.
    Courts,
    /// An alarm below was raised, settled or escalated.
    Alarm(Box<CatalogAlarm>),
    /// Operations below were opened or closed.
    Operations,
}

pub struct Cascade {
    own: CourtInfo,
    /// The courts below, with the child link each is reached through.
    courts: DashMap<String, (CourtInfo, u64)>,
    remote: DashMap<String, RemoteUnit>,
    /// Alarms below, by (court, id), with the link they came through.
    alarms: DashMap<(String, String), (CatalogAlarm, u64)>,
    /// Open operations below, likewise.
    operations: DashMap<(String, String), (CatalogOperation, u64)>,
    children: DashMap<u64, Arc<ChildLink>>,
    changes: broadcast::Sender<TreeChange>,
    next_link: AtomicU64,
    next_pull: AtomicU64,
    release_grace: Duration,
    metrics: Arc<Metrics>,
    /// Held while deciding to pull, so viewers arriving together cause one pull.
    pull_lock: Mutex<()>,
}

/// One pull of a unit from a child hub.
struct Pull {
    unit: String,
    /// The registry's publisher session id of the pull.
    session: u64,
    broadcast: Arc<Broadcast>,
    aliases: Vec<u32>,
}

/// A child hub linked to this one.
pub struct ChildLink {
    pub id: u64,
    pub court: CourtInfo,
    /// Control messages to the child (subscribes, directives).
    pub control: mpsc::Sender<ControlMessage>,
    pulls: Mutex<HashMap<u64, Pull>>,
    /// The child's track ids (from its Subscribed answers) → our tracks.
    aliases: Mutex<HashMap<u32, Arc<TrackEntry>>>,
    aliases_changed: Notify,
    /// Units named so far by a full catalog that arrives in parts.
    full_seen: Mutex<Option<std::collections::HashSet<String>>>,
    /// The newest group sequence seen per alias: an overtaken group is not relayed.
    newest: Mutex<HashMap<u32, u64>>,
    next_request: AtomicU64,
    /// Cancelled when the link ends (or a newer link of the same court replaces it).
    pub closed: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The publisher session ids of pulls are far from those of QUIC connections.
const PULL_SESSION_BASE: u64 = 1 << 62;

impl Cascade {
    pub fn new(own: CourtInfo, release_grace: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            own,
            courts: DashMap::new(),
            remote: DashMap::new(),
            alarms: DashMap::new(),
            operations: DashMap::new(),
            children: DashMap::new(),
            changes: broadcast::channel(1024).0,
            next_link: AtomicU64::new(1),
            next_pull: AtomicU64::new(PULL_SESSION_BASE),
            release_grace,
            metrics,
            pull_lock: Mutex::new(()),
        }
    }

    pub fn own(&self) -> &CourtInfo {
        &self.own
    }

    pub fn changes(&self) -> broadcast::Receiver<TreeChange> {
        self.changes.subscribe()
    }

    /// This hub's court or one below it.
    pub fn knows_court(&self, code: &str) -> bool {
        code == self.own.code || self.courts.contains_key(code)
    }

    /// Whether `scope` (a token's court) covers `court`: the same court or one above it.
    pub fn covers(&self, scope: &str, court: &str) -> bool {
        let mut c = court.to_string();
        // The tree is three tiers deep; the bound only guards against a bad catalog.
        for _ in 0..16 {
            if c == scope {
                return true;
            }
            if c == self.own.code {
                return false;
            }
            match self.courts.get(&c) {
                Some(entry) => c = entry.0.parent.clone(),
                None => return false,
            }
        }
        false
    }

    /// The courts `scope` covers: for a console's court tree.
    pub fn courts_under(&self, scope: &str) -> Vec<CourtInfo> {
        let mut out: Vec<CourtInfo> = std::iter::once(self.own.clone())
            .chain(self.courts.iter().map(|e| e.value().0.clone()))
            .filter(|c| self.covers(scope, &c.code))
            .collect();
        out.sort_by(|a, b| (a.tier, &a.code).cmp(&(b.tier, &b.code)));
        out
    }

    /// The court a unit belongs to: this hub's for its own units, the reported one for
    /// units below. None for a unit nobody here knows.
    pub fn unit_court(&self, units: &Units, unit: &str) -> Option<String> {
        if let Some(b) = units.get(unit)
            && !b.is_remote()
        {
            return Some(self.own.code.clone());
        }
        self.remote.get(unit).map(|r| r.court.clone())
    }

    /// Every unit `scope` may see: this hub's own and those below, sorted by id.
    pub fn visible_units(&self, units: &Units, scope: &str) -> Vec<UnitSummary> {
        let mut out = Vec::new();
        if self.covers(scope, &self.own.code) {
            for b in units.list() {
                let mut s = b.summary();
                s.court = self.own.code.clone();
                out.push(s);
            }
        }
        for r in self.remote.iter() {
            if !self.covers(scope, &r.court) || units.get(r.key()).is_some_and(|b| !b.is_remote()) {
                continue;
            }
            let pulled = units.get(r.key()).filter(|b| b.is_online());
            out.push(UnitSummary {
                unit_id: r.key().clone(),
                online: r.online,
                tracks: r.tracks.clone(),
                subscribers: pulled.as_ref().map_or(0, |b| b.subscriber_count() as u32),
                stats: Some(pulled.map(|b| b.stats()).unwrap_or_default()),
                court: r.court.clone(),
            });
        }
        out.sort_by(|a, b| a.unit_id.cmp(&b.unit_id));
        out
    }

    /// Sends a message to the child hub a unit sits under. False if none is linked.
    pub fn send_toward(&self, unit: &str, msg: ControlMessage) -> bool {
        let Some(link) = self.remote.get(unit).map(|r| r.link) else {
            return false;
        };
        self.children
            .get(&link)
            .is_some_and(|l| l.control.try_send(msg).is_ok())
    }

    /// This hub's whole catalog, for its parent.
    pub fn catalog(&self, units: &Units) -> Catalog {
        let mut out = Catalog {
            full: true,
            ..Default::default()
        };
        for b in units.list() {
            out.units.push(CatalogUnit {
                unit_id: b.unit_id.clone(),
                online: b.is_online(),
                tracks: b.track_infos(),
                court: self.own.code.clone(),
                removed: false,
            });
        }
        for r in self.remote.iter() {
            if units.get(r.key()).is_some_and(|b| !b.is_remote()) {
                continue;
            }
            out.units.push(CatalogUnit {
                unit_id: r.key().clone(),
                online: r.online,
                tracks: r.tracks.clone(),
                court: r.court.clone(),
                removed: false,
            });
        }
        out.courts = self.courts_under(&self.own.code);
        out.alarms = self
            .alarms
            .iter()
            .filter(|a| a.0.state != "resolved")
            .map(|a| a.0.clone())
            .collect();
        out.operations = self.operations.iter().map(|o| o.0.clone()).collect();
        out.operations_complete = true;
        out
    }

    /// Alarms below that `scope` covers, newest first.
    pub fn alarms_under(&self, scope: &str) -> Vec<CatalogAlarm> {
        let mut out: Vec<CatalogAlarm> = self
            .alarms
            .iter()
            .filter(|a| self.covers(scope, &a.0.court))
            .map(|a| a.0.clone())
            .collect();
        out.sort_by_key(|a| std::cmp::Reverse(a.raised_us));
        out
    }

    /// Open operations below that `scope` covers.
    pub fn operations_under(&self, scope: &str) -> Vec<CatalogOperation> {
        let mut out: Vec<CatalogOperation> = self
            .operations
            .iter()
            .filter(|o| self.covers(scope, &o.0.court))
            .map(|o| o.0.clone())
            .collect();
        out.sort_by(|a, b| (a.starts_us, &a.id).cmp(&(b.starts_us, &b.id)));
        out
    }

    /// Sends a message to the child hub through which `court` is reached.
    pub fn send_to_court(&self, court: &str, msg: ControlMessage) -> bool {
        let Some(link) = self.courts.get(court).map(|c| c.1) else {
            return false;
        };
        self.children
            .get(&link)
            .is_some_and(|l| l.control.try_send(msg).is_ok())
    }

    /// Makes sure a unit below is being pulled here (before subscribing to it). Nothing
    /// happens for a unit of this hub, one already pulled, or one not online below.
    pub fn ensure_pulled(&self, units: &Arc<Units>, unit: &str) {
        if units.get(unit).is_some_and(|b| b.is_online()) {
            return;
        }
        let _deciding = lock(&self.pull_lock);
        if units.get(unit).is_some_and(|b| b.is_online()) {
            return;
        }
        let Some(r) = self.remote.get(unit).map(|r| r.clone()) else {
            return;
        };
        if !r.online {
            return;
        }
        let Some(link) = self.children.get(&r.link).map(|l| Arc::clone(&l)) else {
            return;
        };
        self.pull(&link, units, unit, &r);
    }

    fn pull(&self, link: &Arc<ChildLink>, units: &Arc<Units>, unit: &str, r: &RemoteUnit) {
        let request_id = link.next_request.fetch_add(1, Ordering::Relaxed);
        let session = self.next_pull.fetch_add(1, Ordering::Relaxed);
        let tracks: Vec<TrackInfo> = r
            .tracks
            .iter()
            .enumerate()
            .map(|(i, t)| TrackInfo {
                id: i as u32,
                ..t.clone()
            })
            .collect();
        let publisher = PublisherLink {
            session,
            control: link.control.clone(),
            track_ids: HashMap::new(),
            replaced: CancellationToken::new(),
            officer: None,
            talk: None,
        };
        let Some(attached) = units.attach_remote(unit, &r.court, &tracks, publisher) else {
            warn!(%unit, court = %r.court, "a unit below has the id of a unit of this hub: not pulled");
            return;
        };
        lock(&link.pulls).insert(
            request_id,
            Pull {
                unit: unit.to_string(),
                session,
                broadcast: Arc::clone(&attached.broadcast),
                aliases: Vec::new(),
            },
        );
        let subscribe = ControlMessage::new(Kind::Subscribe(Subscribe {
            request_id,
            unit_id: unit.to_string(),
            tracks: Vec::new(),
        }));
        if link.control.try_send(subscribe).is_err() {
            link.end_pull(request_id, units, &self.metrics, false);
            return;
        }
        self.metrics.cascade_pulls.inc();
        self.metrics.cascade_pulls_started.inc();
        info!(%unit, via = %link.court.code, "pulling a unit from below");
        let link = Arc::clone(link);
        let grace = self.release_grace;
        let broadcast = attached.broadcast;
        let units_weak = Arc::downgrade(units);
        let metrics = Arc::clone(&self.metrics);
        tokio::spawn(async move {
            let step = Duration::from_millis(250).min(grace);
            let mut idle = Duration::ZERO;
            loop {
                tokio::select! {
                    _ = link.closed.cancelled() => return,
                    _ = tokio::time::sleep(step) => {}
                }
                if !lock(&link.pulls).contains_key(&request_id) {
                    return;
                }
                if broadcast.subscriber_count() > 0 {
                    idle = Duration::ZERO;
                    continue;
                }
                idle += step;
                if idle >= grace {
                    if let Some(units) = units_weak.upgrade() {
                        debug!(unit = %broadcast.unit_id, "no viewer left: releasing the pull");
                        link.end_pull(request_id, &units, &metrics, true);
                    }
                    return;
                }
            }
        });
    }

    /// A child hub linked: it replaces an older link of the same court.
    fn add_link(&self, court: CourtInfo, control: mpsc::Sender<ControlMessage>) -> Arc<ChildLink> {
        let link = Arc::new(ChildLink {
            id: self.next_link.fetch_add(1, Ordering::Relaxed),
            court,
            control,
            pulls: Mutex::new(HashMap::new()),
            aliases: Mutex::new(HashMap::new()),
            aliases_changed: Notify::new(),
            newest: Mutex::new(HashMap::new()),
            full_seen: Mutex::new(None),
            next_request: AtomicU64::new(1),
            closed: CancellationToken::new(),
        });
        let older: Vec<Arc<ChildLink>> = self
            .children
            .iter()
            .filter(|l| l.court.code == link.court.code)
            .map(|l| Arc::clone(l.value()))
            .collect();
        for old in older {
            old.closed.cancel();
        }
        self.children.insert(link.id, Arc::clone(&link));
        self.metrics
            .cascade_children
            .set(self.children.len() as i64);
        link
    }

    /// A child link ended: its pulls end (their viewers stay on the broadcast and carry on
    /// when the unit is pulled again) and its units are offline. They stay known, with
    /// their courts, so directives for them are still taken and wait for the link to return.
    fn remove_link(&self, link: &ChildLink, units: &Units) {
        link.closed.cancel();
        self.children.remove(&link.id);
        self.metrics
            .cascade_children
            .set(self.children.len() as i64);
        let requests: Vec<u64> = lock(&link.pulls).keys().copied().collect();
        for r in requests {
            link.end_pull(r, units, &self.metrics, false);
        }
        let mut offline = Vec::new();
        for mut r in self.remote.iter_mut() {
            if r.link == link.id && r.online {
                r.online = false;
                offline.push((r.key().clone(), r.court.clone()));
            }
        }
        for (unit, court) in offline {
            self.tell_unit(&unit, false, Vec::new(), &court);
        }
    }

    fn tell_unit(&self, unit: &str, online: bool, tracks: Vec<TrackInfo>, court: &str) {
        let _ = self.changes.send(TreeChange::Unit(UnitChange {
            unit_id: unit.to_string(),
            online,
            tracks,
            court: court.to_string(),
        }));
    }

    /// A catalog from a child link. Courts must lie below the child's own court, units in
    /// those courts; anything else is ignored and logged. Returns the units now online
    /// below (their open directives go out again).
    fn apply_catalog(&self, link: &Arc<ChildLink>, units: &Arc<Units>, c: Catalog) -> Vec<String> {
        let mut courts_changed = false;
        if c.full {
            let before = self.courts.len();
            self.courts.retain(|_, (_, via)| *via != link.id);
            courts_changed |= before != self.courts.len();
        }
        // The child's court first, then each court whose parent is already accepted.
        let mut pending: Vec<CourtInfo> = c.courts;
        loop {
            let before = pending.len();
            pending.retain(|court| {
                let placed = if court.code == link.court.code {
                    court.parent == self.own.code
                } else {
                    self.courts
                        .get(&court.parent)
                        .is_some_and(|e| e.1 == link.id)
                        && court.code != self.own.code
                };
                if placed {
                    self.courts
                        .insert(court.code.clone(), (court.clone(), link.id));
                    courts_changed = true;
                }
                !placed
            });
            if pending.is_empty() || pending.len() == before {
                break;
            }
        }
        for court in pending {
            warn!(court = %court.code, parent = %court.parent, child = %link.court.code,
                "a child hub reported a court outside its subtree: ignored");
        }
        if courts_changed {
            let _ = self.changes.send(TreeChange::Courts);
        }
        // A full catalog may come in parts: the units of every part count as seen.
        let pending = if c.full {
            Some(std::collections::HashSet::new())
        } else {
            lock(&link.full_seen).take()
        };
        let in_full = pending.is_some();
        let mut seen = pending.unwrap_or_default();
        let mut online_now = Vec::new();
        for u in c.units {
            let in_subtree = self.courts.get(&u.court).is_some_and(|e| e.1 == link.id);
            if !crate::session::valid_unit_id(&u.unit_id) || !in_subtree {
                warn!(unit = %u.unit_id.chars().take(64).collect::<String>(), court = %u.court,
                    child = %link.court.code, "a child hub reported a unit outside its subtree: ignored");
                continue;
            }
            seen.insert(u.unit_id.clone());
            if u.removed {
                if self
                    .remote
                    .remove_if(&u.unit_id, |_, r| r.link == link.id)
                    .is_some()
                {
                    self.unit_went_away(link, units, &u.unit_id);
                    self.tell_unit(&u.unit_id, false, Vec::new(), &u.court);
                }
                continue;
            }
            let was_online = self
                .remote
                .get(&u.unit_id)
                .is_some_and(|r| r.online && r.link == link.id);
            self.remote.insert(
                u.unit_id.clone(),
                RemoteUnit {
                    court: u.court.clone(),
                    online: u.online,
                    tracks: u.tracks.clone(),
                    link: link.id,
                },
            );
            if u.online {
                online_now.push(u.unit_id.clone());
                // Viewers were left waiting (the link or the unit came back): pull again.
                if units
                    .get(&u.unit_id)
                    .is_some_and(|b| b.is_remote() && !b.is_online() && b.subscriber_count() > 0)
                {
                    self.ensure_pulled(units, &u.unit_id);
                }
            } else if was_online {
                self.unit_went_away(link, units, &u.unit_id);
            }
            self.tell_unit(&u.unit_id, u.online, u.tracks, &u.court);
        }
        if c.operations_complete {
            self.operations.retain(|(court, _), (_, via)| {
                let through_this = *via == link.id
                    || (!self.children.contains_key(via)
                        && self.courts.get(court).is_some_and(|c| c.1 == link.id));
                !through_this
            });
        }
        let operations_changed = c.operations_complete || !c.operations.is_empty();
        for o in c.operations {
            let in_subtree = self.courts.get(&o.court).is_some_and(|e| e.1 == link.id);
            if !in_subtree || o.id.is_empty() || o.id.len() > 128 {
                warn!(court = %o.court, child = %link.court.code,
                    "a child hub reported an operation outside its subtree: ignored");
                continue;
            }
            self.operations
                .insert((o.court.clone(), o.id.clone()), (o, link.id));
        }
        if operations_changed {
            let _ = self.changes.send(TreeChange::Operations);
        }
        if c.full {
            // Alarms resolved while the link was down are simply not listed any more.
            self.alarms.retain(|(court, _), (_, via)| {
                let through_this = *via == link.id
                    || (!self.children.contains_key(via)
                        && self.courts.get(court).is_some_and(|c| c.1 == link.id));
                !through_this
            });
        }
        for a in c.alarms {
            let in_subtree = self.courts.get(&a.court).is_some_and(|e| e.1 == link.id);
            if !in_subtree || a.id.is_empty() || a.id.len() > 128 {
                warn!(court = %a.court, child = %link.court.code,
                    "a child hub reported an alarm outside its subtree: ignored");
                continue;
            }
            let key = (a.court.clone(), a.id.clone());
            let newly_escalated = a.escalated
                && a.court == link.court.code
                && !self.alarms.get(&key).is_some_and(|old| old.0.escalated);
            if newly_escalated {
                warn!(alarm = %a.id, rule = %a.rule, unit = %a.unit_id, court = %a.court,
                    "an alarm below was not acknowledged in time: escalated here");
            }
            if a.state == "resolved" {
                self.alarms.remove(&key);
            } else {
                self.alarms.insert(key, (a.clone(), link.id));
            }
            let _ = self.changes.send(TreeChange::Alarm(Box::new(a)));
        }
        if in_full && c.more {
            *lock(&link.full_seen) = Some(seen);
            return online_now;
        }
        if in_full {
            // Units this child (or its predecessor link) reported before and not now: not
            // online below any more. They stay known until the child says `removed`.
            let stale: Vec<(String, String)> = self
                .remote
                .iter()
                .filter(|r| {
                    let ours = r.link == link.id || !self.children.contains_key(&r.link);
                    ours && r.online && !seen.contains(r.key())
                })
                .map(|r| (r.key().clone(), r.court.clone()))
                .collect();
            for (unit, court) in stale {
                if let Some(mut r) = self.remote.get_mut(&unit) {
                    r.online = false;
                }
                self.unit_went_away(link, units, &unit);
                self.tell_unit(&unit, false, Vec::new(), &court);
            }
        }
        online_now
    }

    /// A unit below went offline or away: its pull (if any) ends; its viewers stay.
    fn unit_went_away(&self, link: &ChildLink, units: &Units, unit: &str) {
        let requests: Vec<u64> = lock(&link.pulls)
            .iter()
            .filter(|(_, p)| p.unit == unit)
            .map(|(r, _)| *r)
            .collect();
        for r in requests {
            link.end_pull(r, units, &self.metrics, false);
        }
    }
}

impl ChildLink {
    /// Ends a pull: the child is told (unless it ended it), the broadcast goes offline and
    /// is forgotten once unwatched.
    fn end_pull(&self, request_id: u64, units: &Units, metrics: &Metrics, tell_child: bool) {
        let Some(pull) = lock(&self.pulls).remove(&request_id) else {
            return;
        };
        {
            let mut aliases = lock(&self.aliases);
            let mut newest = lock(&self.newest);
            for a in &pull.aliases {
                aliases.remove(a);
                newest.remove(a);
            }
        }
        if tell_child {
            let _ = self
                .control
                .try_send(ControlMessage::new(Kind::Unsubscribe(Unsubscribe {
                    request_id,
                })));
        }
        metrics.cascade_pulls.dec();
        units.detach(&pull.unit, pull.session);
        drop(pull.broadcast);
    }

    /// The child granted a pull: its track ids are mapped to our tracks.
    fn subscribed(&self, s: &tianwang_proto::v1::Subscribed) {
        let mut pulls = lock(&self.pulls);
        let Some(pull) = pulls.get_mut(&s.request_id) else {
            return;
        };
        let ours = pull.broadcast.tracks();
        let mut ids = HashMap::new();
        let mut aliases = lock(&self.aliases);
        for t in &s.tracks {
            if let Some(entry) = ours.iter().find(|e| e.info.name == t.name) {
                aliases.insert(t.id, Arc::clone(entry));
                pull.aliases.push(t.id);
                ids.insert(t.name.clone(), t.id);
            }
        }
        pull.broadcast.set_track_ids(ids);
        drop(aliases);
        self.aliases_changed.notify_waiters();
    }

    /// The track a group stream of the child is for; waits a moment for the Subscribed
    /// that names it (the stream can overtake it).
    async fn track_for(
        &self,
        alias: u32,
        sequence: u64,
    ) -> Option<(Arc<TrackEntry>, Arc<Broadcast>)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let notified = self.aliases_changed.notified();
            if let Some(entry) = lock(&self.aliases).get(&alias).cloned() {
                let broadcast = lock(&self.pulls)
                    .values()
                    .find(|p| p.aliases.contains(&alias))
                    .map(|p| Arc::clone(&p.broadcast))?;
                let mut newest = lock(&self.newest);
                if newest.get(&alias).is_some_and(|&n| sequence <= n) {
                    return None;
                }
                newest.insert(alias, sequence);
                return Some((entry, broadcast));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tianwang_core::TrackConfig;

    fn court(code: &str, parent: &str) -> CourtInfo {
        CourtInfo {
            code: code.into(),
            parent: parent.into(),
            ..Default::default()
        }
    }

    fn unit(id: &str, online: bool) -> CatalogUnit {
        CatalogUnit {
            unit_id: id.into(),
            online,
            court: "京01".into(),
            ..Default::default()
        }
    }

    fn setup() -> (
        Cascade,
        Arc<Units>,
        Arc<ChildLink>,
        mpsc::Receiver<ControlMessage>,
    ) {
        let units = Arc::new(Units::new(
            Arc::default(),
            TrackConfig::default(),
            Duration::from_millis(500),
        ));
        let metrics = Arc::new(Metrics::new(Arc::clone(&units)).expect("metrics"));
        let cascade = Cascade::new(court("京", "最高法"), Duration::from_secs(1), metrics);
        let (tx, rx) = mpsc::channel(16);
        let link = cascade.add_link(court("京01", "京"), tx);
        (cascade, units, link, rx)
    }

    #[test]
    fn courts_and_units_outside_the_childs_subtree_are_ignored() {
        let (cascade, units, link, _rx) = setup();
        cascade.apply_catalog(
            &link,
            &units,
            Catalog {
                full: true,
                courts: vec![
                    court("京01", "京"),
                    court("沪", "最高法"),
                    court("京01-a", "京01"),
                ],
                units: vec![
                    unit("bwc-1", true),
                    CatalogUnit {
                        court: "沪".into(),
                        ..unit("bwc-x", true)
                    },
                ],
                ..Default::default()
            },
        );
        assert!(cascade.knows_court("京01") && cascade.knows_court("京01-a"));
        assert!(!cascade.knows_court("沪"));
        assert!(cascade.covers("京", "京01-a") && cascade.covers("京01", "京01-a"));
        assert!(!cascade.covers("京01-a", "京01"));
        assert_eq!(cascade.unit_court(&units, "bwc-1").as_deref(), Some("京01"));
        assert_eq!(cascade.unit_court(&units, "bwc-x"), None);
    }

    #[test]
    fn a_full_catalog_in_parts_marks_offline_only_what_no_part_names() {
        let (cascade, units, link, _rx) = setup();
        let mut changes = cascade.changes();
        let full = |units: Vec<CatalogUnit>, more: bool, first: bool| Catalog {
            full: first,
            more,
            courts: if first {
                vec![court("京01", "京")]
            } else {
                vec![]
            },
            units,
            ..Default::default()
        };
        cascade.apply_catalog(
            &link,
            &units,
            full(vec![unit("a", true), unit("b", true)], false, true),
        );
        // Again, in two parts, without "a": "b" in the second part must not flap offline.
        cascade.apply_catalog(&link, &units, full(vec![], true, true));
        cascade.apply_catalog(&link, &units, full(vec![unit("b", true)], false, false));
        let mut offline = Vec::new();
        while let Ok(c) = changes.try_recv() {
            if let TreeChange::Unit(u) = c
                && !u.online
            {
                offline.push(u.unit_id);
            }
        }
        assert_eq!(offline, vec!["a".to_string()]);
        let listed = cascade.visible_units(&units, "京");
        assert!(listed.iter().any(|u| u.unit_id == "b" && u.online));
        assert!(
            listed.iter().any(|u| u.unit_id == "a" && !u.online),
            "still known, offline"
        );
    }
}
