//! Deviation early warning, sans-IO: events about units and operations and the time go in,
//! alarms come out. The shell feeds what it sees (telemetry, units coming and going, media
//! arriving, operations starting and closing with what was recorded) and asks
//! `poll_timeout()` when to call `handle_timeout()`. Time is Unix µs, an input like any
//! other, so the rules are tested with a fake clock.
//!
//! Each rule raises at most one alarm per unit (and operation) while its condition lasts;
//! the condition clearing re-arms it.

use std::collections::{HashMap, HashSet};

/// The rules, named as in the configuration and the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    UnitOffline,
    StreamStalled,
    RecordingStopped,
    LeftGeofence,
    OperationOverrun,
    Sos,
    BatteryLow,
    StorageLow,
    MissingEvidence,
    SpoolFull,
}

impl Rule {
    pub const ALL: [Rule; 10] = [
        Rule::UnitOffline,
        Rule::StreamStalled,
        Rule::RecordingStopped,
        Rule::LeftGeofence,
        Rule::OperationOverrun,
        Rule::Sos,
        Rule::BatteryLow,
        Rule::StorageLow,
        Rule::MissingEvidence,
        Rule::SpoolFull,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rule::UnitOffline => "unit_offline",
            Rule::StreamStalled => "stream_stalled",
            Rule::RecordingStopped => "recording_stopped",
            Rule::LeftGeofence => "left_geofence",
            Rule::OperationOverrun => "operation_overrun",
            Rule::Sos => "sos",
            Rule::BatteryLow => "battery_low",
            Rule::StorageLow => "storage_low",
            Rule::MissingEvidence => "missing_evidence",
            Rule::SpoolFull => "spool_full",
        }
    }

    pub fn from_name(name: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.name() == name)
    }

    pub fn severity(self) -> Severity {
        match self {
            // A full spool is evidence not kept on the device: as grave as a recording
            // that stopped.
            Rule::Sos
            | Rule::UnitOffline
            | Rule::RecordingStopped
            | Rule::MissingEvidence
            | Rule::SpoolFull => Severity::Critical,
            Rule::StreamStalled | Rule::LeftGeofence | Rule::OperationOverrun => Severity::Warning,
            Rule::BatteryLow | Rule::StorageLow => Severity::Info,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// Thresholds and grace periods, µs where a time.
#[derive(Clone, Debug)]
pub struct AlarmConfig {
    pub enabled: HashSet<Rule>,
    /// A unit of an active operation offline this long.
    pub offline_grace_us: u64,
    /// An online unit whose media stopped this long.
    pub stall_us: u64,
    /// A unit of an active operation not recording this long.
    pub recording_grace_us: u64,
    /// Outside the fence by more than this (plus the fix's accuracy).
    pub geofence_margin_m: f64,
    /// An operation still open this long after its planned end.
    pub overrun_grace_us: u64,
    pub battery_low_percent: f32,
    pub storage_low_bytes: u64,
    /// Holes in an operation's recording shorter than this are not missing evidence.
    pub evidence_tolerance_us: u64,
}

impl Default for AlarmConfig {
    fn default() -> Self {
        Self {
            enabled: Rule::ALL.into_iter().collect(),
            offline_grace_us: 30_000_000,
            stall_us: 10_000_000,
            recording_grace_us: 10_000_000,
            geofence_margin_m: 20.0,
            overrun_grace_us: 15 * 60_000_000,
            battery_low_percent: 15.0,
            storage_low_bytes: 1 << 30,
            evidence_tolerance_us: 10_000_000,
        }
    }
}

/// An operation as the rules see it.
#[derive(Clone, Debug, PartialEq)]
pub struct Operation {
    pub id: String,
    pub case_number: String,
    pub starts_us: u64,
    pub ends_us: u64,
    pub latitude: f64,
    pub longitude: f64,
    pub radius_m: f64,
    /// Shared: the engine copies operations while it evaluates them.
    pub units: std::sync::Arc<[String]>,
}

/// One telemetry point, already validated by the shell.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Telemetry {
    pub at_us: u64,
    /// Latitude, longitude, accuracy (m), when there is a fix.
    pub position: Option<(f64, f64, f64)>,
    pub battery_percent: Option<f32>,
    pub storage_free_bytes: Option<u64>,
    pub recording: bool,
    pub sos: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Planned (or replanned); it is active within its window until closed.
    Operation(Operation),
    /// Closed, with what each of its units has recorded (capture time spans).
    OperationClosed {
        id: String,
        recorded: HashMap<String, Vec<(u64, u64)>>,
    },
    Online(String),
    Offline(String),
    /// Media arrived from the unit (the shell may send this at most once a second).
    Media(String),
    Telemetry(String, Telemetry),
    /// A unit's spool report: groups it could not keep since its last report (its spool
    /// was full of evidence the hub has not recorded); zero once it keeps everything again.
    Spool {
        unit: String,
        refused_groups: u64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Alarm {
    pub rule: Rule,
    pub severity: Severity,
    pub unit: String,
    pub operation: Option<String>,
    pub case_number: Option<String>,
    pub at_us: u64,
    /// What the rule saw, in words, for the console and the audit trail.
    pub evidence: String,
}

#[derive(Default)]
struct UnitState {
    online: bool,
    since_us: u64,
    last_media_us: Option<u64>,
    not_recording_since: Option<u64>,
}

/// The rule engine.
pub struct AlarmEngine {
    config: AlarmConfig,
    operations: HashMap<String, Operation>,
    units: HashMap<String, UnitState>,
    /// Conditions that have raised and not cleared: (rule, unit, operation).
    raised: HashSet<(Rule, String, Option<String>)>,
    out: Vec<Alarm>,
    started_us: Option<u64>,
    /// When the timers were last evaluated: events evaluate them at most every
    /// `EVENT_SCAN_US` (a scan visits every unit of every active operation).
    scanned_us: Option<u64>,
}

/// Timers run at second granularity; events between two scans need not rescan.
const EVENT_SCAN_US: u64 = 100_000;

/// Great-circle distance in metres (haversine).
pub fn distance_m(a: (f64, f64), b: (f64, f64)) -> f64 {
    const R: f64 = 6_371_000.0;
    let (la1, la2) = (a.0.to_radians(), b.0.to_radians());
    let dla = la2 - la1;
    let dlo = (b.1 - a.1).to_radians();
    let h = (dla / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlo / 2.0).sin().powi(2);
    2.0 * R * h.sqrt().asin()
}

impl AlarmEngine {
    pub fn new(config: AlarmConfig) -> Self {
        Self {
            config,
            operations: HashMap::new(),
            units: HashMap::new(),
            raised: HashSet::new(),
            out: Vec::new(),
            started_us: None,
            scanned_us: None,
        }
    }

    /// Alarms raised since the last call.
    pub fn poll_alarm(&mut self) -> Option<Alarm> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.remove(0))
        }
    }

    /// Operations active at `now`, with `unit` among their units.
    fn active_ops(&self, unit: &str, now: u64) -> Vec<&Operation> {
        self.operations
            .values()
            .filter(|o| o.starts_us <= now && now < o.ends_us && o.units.iter().any(|u| u == unit))
            .collect()
    }

    fn raise(
        &mut self,
        rule: Rule,
        unit: &str,
        op: Option<&Operation>,
        now: u64,
        evidence: String,
    ) {
        if !self.config.enabled.contains(&rule) {
            return;
        }
        let key = (rule, unit.to_string(), op.map(|o| o.id.clone()));
        if !self.raised.insert(key) {
            return;
        }
        self.out.push(Alarm {
            rule,
            severity: rule.severity(),
            unit: unit.to_string(),
            operation: op.map(|o| o.id.clone()),
            case_number: op.map(|o| o.case_number.clone()),
            at_us: now,
            evidence,
        });
    }

    fn clear(&mut self, rule: Rule, unit: &str) {
        self.raised.retain(|(r, u, _)| !(*r == rule && u == unit));
    }

    pub fn handle(&mut self, now: u64, event: Event) {
        self.started_us.get_or_insert(now);
        match event {
            Event::Operation(op) => {
                self.operations.insert(op.id.clone(), op);
            }
            Event::OperationClosed { id, recorded } => {
                if let Some(op) = self.operations.remove(&id) {
                    self.missing_evidence(&op, now, &recorded);
                }
                self.raised
                    .retain(|(_, _, o)| o.as_deref() != Some(id.as_str()));
            }
            Event::Online(unit) => {
                let s = self.units.entry(unit.clone()).or_default();
                s.online = true;
                s.since_us = now;
                s.last_media_us = Some(now);
                self.clear(Rule::UnitOffline, &unit);
                self.clear(Rule::StreamStalled, &unit);
            }
            Event::Offline(unit) => {
                let s = self.units.entry(unit).or_default();
                s.online = false;
                s.since_us = now;
            }
            Event::Media(unit) => {
                let s = self.units.entry(unit.clone()).or_default();
                s.last_media_us = Some(now);
                self.clear(Rule::StreamStalled, &unit);
            }
            Event::Telemetry(unit, t) => self.telemetry(now, &unit, &t),
            Event::Spool {
                unit,
                refused_groups: 0,
            } => self.clear(Rule::SpoolFull, &unit),
            Event::Spool {
                unit,
                refused_groups,
            } => {
                let op = self.active_ops(&unit, now).into_iter().next().cloned();
                self.raise(
                    Rule::SpoolFull,
                    &unit,
                    op.as_ref(),
                    now,
                    format!(
                        "the unit's spool is full of evidence the hub has not recorded: \
                         {refused_groups} groups not kept"
                    ),
                );
            }
        }
        if self
            .scanned_us
            .is_none_or(|s| now.saturating_sub(s) >= EVENT_SCAN_US)
        {
            self.handle_timeout(now);
        }
    }

    fn telemetry(&mut self, now: u64, unit: &str, t: &Telemetry) {
        let ops: Vec<Operation> = self.active_ops(unit, now).into_iter().cloned().collect();
        if t.sos {
            let op = ops.first();
            self.raise(
                Rule::Sos,
                unit,
                op,
                now,
                format!("SOS pressed at {}", t.at_us),
            );
        } else {
            self.clear(Rule::Sos, unit);
        }
        match t.battery_percent {
            Some(b) if b < self.config.battery_low_percent => self.raise(
                Rule::BatteryLow,
                unit,
                ops.first(),
                now,
                format!("battery {b:.0} %"),
            ),
            // A few percent of hysteresis so a level at the threshold does not flap.
            Some(b) if b > self.config.battery_low_percent + 5.0 => {
                self.clear(Rule::BatteryLow, unit)
            }
            _ => {}
        }
        match t.storage_free_bytes {
            Some(f) if f < self.config.storage_low_bytes => self.raise(
                Rule::StorageLow,
                unit,
                ops.first(),
                now,
                format!("{} MiB free", f >> 20),
            ),
            Some(_) => self.clear(Rule::StorageLow, unit),
            None => {}
        }
        // A unit that sends telemetry is connected, whether or not the news of it coming
        // online has arrived yet (the shell's two feeds are not ordered).
        let s = self.units.entry(unit.to_string()).or_default();
        if !s.online {
            s.online = true;
            s.since_us = now;
            s.last_media_us.get_or_insert(now);
        }
        if t.recording {
            s.not_recording_since = None;
            self.clear(Rule::RecordingStopped, unit);
        } else if s.not_recording_since.is_none() {
            s.not_recording_since = Some(now);
        }
        if let Some((lat, lon, accuracy)) = t.position {
            for op in &ops {
                let d = distance_m((lat, lon), (op.latitude, op.longitude));
                let limit = op.radius_m + self.config.geofence_margin_m + accuracy.max(0.0);
                if d > limit {
                    self.raise(
                        Rule::LeftGeofence,
                        unit,
                        Some(op),
                        now,
                        format!(
                            "at {lat:.5},{lon:.5}, {d:.0} m from the centre of a {:.0} m fence",
                            op.radius_m
                        ),
                    );
                } else if d <= op.radius_m {
                    let key = (Rule::LeftGeofence, unit.to_string(), Some(op.id.clone()));
                    self.raised.remove(&key);
                }
            }
        }
    }

    /// Time-based rules: offline, stalled, not recording, overrun.
    pub fn handle_timeout(&mut self, now: u64) {
        self.scanned_us = Some(now);
        let ops: Vec<Operation> = self
            .operations
            .values()
            .filter(|o| o.starts_us <= now)
            .cloned()
            .collect();
        for op in &ops {
            if now >= op.ends_us.saturating_add(self.config.overrun_grace_us) {
                for unit in op.units.iter().take(1) {
                    self.raise(
                        Rule::OperationOverrun,
                        unit,
                        Some(op),
                        now,
                        format!(
                            "planned to end at {}, still open {} s later",
                            op.ends_us,
                            (now - op.ends_us) / 1_000_000
                        ),
                    );
                }
            }
            if now >= op.ends_us {
                continue;
            }
            for unit in op.units.iter() {
                let started = self.started_us.unwrap_or(now);
                let (online, since, not_recording) = match self.units.get(unit) {
                    Some(s) => (s.online, s.since_us, s.not_recording_since),
                    None => (false, started, None),
                };
                let absent_since = since.max(op.starts_us);
                if !online && now >= absent_since.saturating_add(self.config.offline_grace_us) {
                    self.raise(
                        Rule::UnitOffline,
                        unit,
                        Some(op),
                        now,
                        format!("offline since {absent_since}"),
                    );
                }
                if online
                    && let Some(t) = not_recording
                    && now
                        >= t.max(op.starts_us)
                            .saturating_add(self.config.recording_grace_us)
                {
                    self.raise(
                        Rule::RecordingStopped,
                        unit,
                        Some(op),
                        now,
                        format!("not recording since {t}"),
                    );
                }
            }
        }
        let stalled: Vec<(String, u64)> = self
            .units
            .iter()
            .filter(|(_, s)| s.online)
            .filter_map(|(u, s)| {
                let last = s.last_media_us?;
                (now >= last.saturating_add(self.config.stall_us)).then(|| (u.clone(), last))
            })
            .collect();
        for (unit, last) in stalled {
            let op = self.active_ops(&unit, now).into_iter().next().cloned();
            self.raise(
                Rule::StreamStalled,
                &unit,
                op.as_ref(),
                now,
                format!("no media since {last}"),
            );
        }
    }

    /// When `handle_timeout` next has something to decide.
    pub fn poll_timeout(&self, now: u64) -> Option<u64> {
        // Rules are evaluated on a short tick while anything is watched: simple and cheap
        // (a few thousand units), and bounded in delay by the tick.
        (!self.operations.is_empty() || self.units.values().any(|s| s.online))
            .then_some(now + 1_000_000)
    }

    fn missing_evidence(
        &mut self,
        op: &Operation,
        now: u64,
        recorded: &HashMap<String, Vec<(u64, u64)>>,
    ) {
        let window = (op.starts_us, op.ends_us.min(now));
        for unit in op.units.iter() {
            let mut spans = recorded.get(unit).cloned().unwrap_or_default();
            spans.sort_unstable();
            let mut missing = 0u64;
            let mut at = window.0;
            for (from, to) in spans {
                if from > at {
                    missing += from.min(window.1).saturating_sub(at);
                }
                at = at.max(to);
                if at >= window.1 {
                    break;
                }
            }
            missing += window.1.saturating_sub(at);
            if missing > self.config.evidence_tolerance_us {
                self.raise(
                    Rule::MissingEvidence,
                    unit,
                    Some(op),
                    now,
                    format!(
                        "{} s of the operation's window unrecorded",
                        missing / 1_000_000
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
#[path = "alarms_tests.rs"]
mod tests;
