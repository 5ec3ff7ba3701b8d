//! Field operations in the hub: telemetry from units (checked, rate-limited, stored in
//! batches and bound to the unit's active operation) and the deviation alarms of the
//! sans-IO `AlarmEngine` (`tianwang-core`), fed from telemetry, units coming and going,
//! media flowing, and the index's operations; alarms are stored, counted, audited, and
//! acknowledged and resolved over HTTP.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tianwang_core::alarms::{self, AlarmEngine, Event};
use tianwang_proto::{Sensitive, v1};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::evidence::audit::{Audit, unix_us};
use crate::evidence::index::{Index, IndexError, OperationRow};
use crate::metrics::Metrics;
use crate::registry::Units;

/// Telemetry a unit may send per second; beyond it points are refused and counted.
pub const TELEMETRY_PER_SECOND: u32 = 5;
/// Points queued for the writer; beyond it they are dropped and counted.
const QUEUE: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TelemetryError {
    #[error("position out of range or not a number")]
    Position,
    #[error("timestamp from the future")]
    Future,
    #[error("battery level outside 0..=100")]
    Battery,
    #[error("more than {TELEMETRY_PER_SECOND} telemetry messages a second")]
    Rate,
}

impl TelemetryError {
    pub fn label(self) -> &'static str {
        match self {
            TelemetryError::Position => "position",
            TelemetryError::Future => "future",
            TelemetryError::Battery => "battery",
            TelemetryError::Rate => "rate",
        }
    }
}

/// Checks a point; what the rules and the store may rely on.
pub fn validate(t: &v1::Telemetry, now_us: u64) -> Result<(), TelemetryError> {
    if let Some(p) = &t.position {
        let ok = p.latitude.is_finite()
            && p.longitude.is_finite()
            && (-90.0..=90.0).contains(&p.latitude)
            && (-180.0..=180.0).contains(&p.longitude)
            && p.accuracy_m.is_finite()
            && p.accuracy_m >= 0.0
            && p.speed_mps.is_finite()
            && p.heading_deg.is_finite();
        if !ok {
            return Err(TelemetryError::Position);
        }
    }
    // Device clocks drift; a minute ahead is a wrong clock, not drift.
    if t.timestamp_us > now_us + 60_000_000 {
        return Err(TelemetryError::Future);
    }
    if !t.battery_percent.is_finite() || !(0.0..=100.0).contains(&t.battery_percent) {
        return Err(TelemetryError::Battery);
    }
    Ok(())
}

/// Per publisher session: at most `TELEMETRY_PER_SECOND` points in any one-second window.
#[derive(Debug)]
pub struct RateLimit {
    window: Instant,
    count: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            window: Instant::now(),
            count: 0,
        }
    }
}

impl RateLimit {
    pub fn allow(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.count = 0;
        }
        self.count += 1;
        self.count <= TELEMETRY_PER_SECOND
    }
}

/// A unit's telemetry point as it arrives (QUIC or the unit's WebSocket): checked and rate
/// limited, then stored; bad telemetry is refused and counted, never a reason to cut the
/// unit's video.
pub fn accept(
    hub: &crate::session::HubContext,
    unit: &str,
    limit: &mut RateLimit,
    t: v1::Telemetry,
) {
    hub.metrics.telemetry.inc();
    let now = unix_us().max(0) as u64;
    let checked = if limit.allow(Instant::now()) {
        validate(&t, now)
    } else {
        Err(TelemetryError::Rate)
    };
    match checked {
        Ok(()) => hub.field.telemetry(&hub.metrics, unit, t),
        Err(e) => {
            hub.metrics
                .telemetry_rejected
                .with_label_values(&[e.label()])
                .inc();
            tracing::debug!(reason = %e, "telemetry refused");
        }
    }
}

/// The hub's handle on the field task.
#[derive(Clone, Debug)]
pub struct Field {
    tx: mpsc::Sender<Input>,
    /// Every alarm raised, settled or escalated here (the uplink tells the parent).
    alarm_changes: tokio::sync::broadcast::Sender<AlarmRow>,
    /// Every telemetry point taken, for the consoles' maps.
    telemetry_points: tokio::sync::broadcast::Sender<Arc<v1::TelemetryPoint>>,
}

impl Field {
    pub fn alarm_changes(&self) -> tokio::sync::broadcast::Receiver<AlarmRow> {
        self.alarm_changes.subscribe()
    }

    pub fn alarm_changed(&self, row: &AlarmRow) {
        let _ = self.alarm_changes.send(row.clone());
    }

    pub fn telemetry_points(&self) -> tokio::sync::broadcast::Receiver<Arc<v1::TelemetryPoint>> {
        self.telemetry_points.subscribe()
    }

    /// A unit's telemetry point (validated by the caller). Never waits.
    pub fn telemetry(&self, metrics: &Metrics, unit: &str, t: v1::Telemetry) {
        let received_us = unix_us().max(0) as u64;
        if self.telemetry_points.receiver_count() > 0 {
            let _ = self.telemetry_points.send(Arc::new(v1::TelemetryPoint {
                unit_id: unit.to_string(),
                telemetry: Some(t),
                received_us,
            }));
        }
        if self
            .tx
            .try_send(Input::Telemetry(unit.to_string(), t, received_us))
            .is_err()
        {
            metrics
                .telemetry_rejected
                .with_label_values(&["queue_full"])
                .inc();
        }
    }

    /// A unit's spool report: groups it could not keep since its last one.
    pub async fn spool(&self, unit: &str, refused_groups: u64) {
        // Rare and grave: waits for room rather than losing the alarm.
        let _ = self
            .tx
            .send(Input::Spool {
                unit: unit.to_string(),
                refused_groups,
            })
            .await;
    }
}

/// What the field task is told.
#[derive(Debug)]
enum Input {
    /// A validated telemetry point and when it was received (µs).
    Telemetry(String, v1::Telemetry, u64),
    Spool {
        unit: String,
        refused_groups: u64,
    },
}

#[derive(Clone, PartialEq, sqlx::FromRow, Serialize)]
pub struct TelemetryRow {
    pub unit: String,
    pub at_us: i64,
    pub received_us: i64,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
    pub accuracy_m: Option<f64>,
    pub speed_mps: Option<f64>,
    pub heading_deg: Option<f64>,
    pub battery_percent: Option<f64>,
    pub signal_dbm: i64,
    pub storage_free_bytes: i64,
    pub recording: i64,
    pub sos: i64,
    pub case_number: Option<String>,
    pub operation_id: Option<String>,
}

#[derive(Clone, PartialEq, sqlx::FromRow, Serialize)]
pub struct AlarmRow {
    pub id: String,
    pub rule: String,
    pub severity: String,
    pub unit: String,
    pub case_number: Option<String>,
    pub operation_id: Option<String>,
    pub raised_us: i64,
    pub evidence: String,
    /// "raised", "acknowledged" or "resolved".
    pub state: String,
    pub acked_by: Option<String>,
    pub acked_us: Option<i64>,
    pub resolved_by: Option<String>,
    pub resolved_us: Option<i64>,
    pub comment: Option<String>,
    /// When it was escalated to the parent court, not acknowledged in time.
    pub escalated_us: Option<i64>,
}

/// An officer's position is personal data: `Debug` shows everything else.
impl std::fmt::Debug for TelemetryRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |v: Option<f64>| v.map(Sensitive::new);
        f.debug_struct("TelemetryRow")
            .field("unit", &self.unit)
            .field("at_us", &self.at_us)
            .field("received_us", &self.received_us)
            .field("latitude", &redacted(self.latitude))
            .field("longitude", &redacted(self.longitude))
            .field("accuracy_m", &self.accuracy_m)
            .field("speed_mps", &self.speed_mps)
            .field("heading_deg", &self.heading_deg)
            .field("battery_percent", &self.battery_percent)
            .field("signal_dbm", &self.signal_dbm)
            .field("storage_free_bytes", &self.storage_free_bytes)
            .field("recording", &self.recording)
            .field("sos", &self.sos)
            .field("case_number", &self.case_number)
            .field("operation_id", &self.operation_id)
            .finish()
    }
}

/// The evidence of a `left_geofence` alarm holds the officer's position.
impl std::fmt::Debug for AlarmRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlarmRow")
            .field("id", &self.id)
            .field("rule", &self.rule)
            .field("severity", &self.severity)
            .field("unit", &self.unit)
            .field("case_number", &self.case_number)
            .field("operation_id", &self.operation_id)
            .field("raised_us", &self.raised_us)
            .field("evidence", &Sensitive::new(()))
            .field("state", &self.state)
            .field("acked_by", &self.acked_by)
            .field("acked_us", &self.acked_us)
            .field("resolved_by", &self.resolved_by)
            .field("resolved_us", &self.resolved_us)
            .field("comment", &self.comment)
            .field("escalated_us", &self.escalated_us)
            .finish()
    }
}

impl AlarmRow {
    /// The alarm as a parent hub's catalog carries it.
    pub fn catalog(&self, court: &str) -> v1::CatalogAlarm {
        v1::CatalogAlarm {
            id: self.id.clone(),
            rule: self.rule.clone(),
            severity: self.severity.clone(),
            unit_id: self.unit.clone(),
            case_number: self.case_number.clone().unwrap_or_default(),
            court: court.to_string(),
            raised_us: self.raised_us.max(0) as u64,
            state: self.state.clone(),
            escalated: self.escalated_us.is_some(),
            evidence: self.evidence.clone(),
            acked_by: self.acked_by.clone().unwrap_or_default(),
            resolved_by: self.resolved_by.clone().unwrap_or_default(),
            comment: self.comment.clone().unwrap_or_default(),
            operation_id: self.operation_id.clone().unwrap_or_default(),
        }
    }
}

/// Alarms not yet resolved, oldest first (a parent's catalog).
pub async fn open_alarms(index: &Index) -> Result<Vec<AlarmRow>, IndexError> {
    Ok(sqlx::query_as(
        "SELECT * FROM alarms WHERE state <> 'resolved' ORDER BY raised_us LIMIT 1000",
    )
    .fetch_all(index.pool())
    .await?)
}

/// Alarms raised before `before_us`, still not acknowledged and not yet escalated: marked
/// escalated now, and returned.
async fn escalate(index: &Index, before_us: i64, now_us: i64) -> Result<Vec<AlarmRow>, IndexError> {
    let due: Vec<AlarmRow> = sqlx::query_as(
        "SELECT * FROM alarms WHERE state = 'raised' AND escalated_us IS NULL AND raised_us <= $1",
    )
    .bind(before_us)
    .fetch_all(index.pool())
    .await?;
    let mut out = Vec::with_capacity(due.len());
    for mut a in due {
        let changed = sqlx::query(
            "UPDATE alarms SET escalated_us = $1 WHERE id = $2 AND escalated_us IS NULL",
        )
        .bind(now_us)
        .bind(&a.id)
        .execute(index.pool())
        .await?
        .rows_affected();
        if changed == 1 {
            a.escalated_us = Some(now_us);
            out.push(a);
        }
    }
    Ok(out)
}

/// The queries of this module, on the evidence index.
pub async fn store_telemetry(index: &Index, rows: &[TelemetryRow]) -> Result<(), IndexError> {
    let mut tx = index.pool().begin().await?;
    for r in rows {
        sqlx::query(
            "INSERT INTO telemetry (unit, at_us, received_us, latitude, longitude, accuracy_m, \
             speed_mps, heading_deg, battery_percent, signal_dbm, storage_free_bytes, recording, \
             sos, case_number, operation_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(&r.unit)
        .bind(r.at_us)
        .bind(r.received_us)
        .bind(r.latitude)
        .bind(r.longitude)
        .bind(r.accuracy_m)
        .bind(r.speed_mps)
        .bind(r.heading_deg)
        .bind(r.battery_percent)
        .bind(r.signal_dbm)
        .bind(r.storage_free_bytes)
        .bind(r.recording)
        .bind(r.sos)
        .bind(&r.case_number)
        .bind(&r.operation_id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub async fn telemetry_between(
    index: &Index,
    unit: &str,
    from_us: i64,
    to_us: i64,
) -> Result<Vec<TelemetryRow>, IndexError> {
    Ok(sqlx::query_as(
        "SELECT * FROM telemetry WHERE unit = $1 AND at_us >= $2 AND at_us < $3 ORDER BY at_us \
         LIMIT 100000",
    )
    .bind(unit)
    .bind(from_us)
    .bind(to_us)
    .fetch_all(index.pool())
    .await?)
}

pub async fn alarms(index: &Index, state: Option<&str>) -> Result<Vec<AlarmRow>, IndexError> {
    let rows = match state {
        Some(s) => {
            sqlx::query_as(
                "SELECT * FROM alarms WHERE state = $1 ORDER BY raised_us DESC LIMIT 1000",
            )
            .bind(s)
            .fetch_all(index.pool())
            .await?
        }
        None => {
            sqlx::query_as("SELECT * FROM alarms ORDER BY raised_us DESC LIMIT 1000")
                .fetch_all(index.pool())
                .await?
        }
    };
    Ok(rows)
}

pub async fn alarm(index: &Index, id: &str) -> Result<Option<AlarmRow>, IndexError> {
    Ok(sqlx::query_as("SELECT * FROM alarms WHERE id = $1")
        .bind(id)
        .fetch_optional(index.pool())
        .await?)
}

/// Acknowledges (`resolve` false) or resolves an alarm; refused when it is past that state.
pub async fn settle(
    index: &Index,
    audit: &Audit,
    id: &str,
    user: &str,
    resolve: bool,
    comment: &str,
) -> Result<AlarmRow, SettleError> {
    let a = alarm(index, id)
        .await?
        .ok_or_else(|| SettleError::NotFound(format!("no alarm {id}")))?;
    let now = unix_us();
    let comment = comment.chars().take(500).collect::<String>();
    // Acknowledging needs a raised alarm; resolving, any that is not resolved yet.
    let settled = if resolve {
        a.state == "resolved"
    } else {
        a.state != "raised"
    };
    if settled {
        return Err(SettleError::Conflict(format!(
            "alarm {id} is {} already",
            a.state
        )));
    }
    let (state, by, at) = if resolve {
        ("resolved", "resolved_by", "resolved_us")
    } else {
        ("acknowledged", "acked_by", "acked_us")
    };
    sqlx::query(&format!(
        "UPDATE alarms SET state = $1, {by} = $2, {at} = $3, comment = $4 WHERE id = $5"
    ))
    .bind(state)
    .bind(user)
    .bind(now)
    .bind(&comment)
    .bind(id)
    .execute(index.pool())
    .await
    .map_err(IndexError::from)?;
    audit.record(
        user,
        if resolve { "alarm.resolve" } else { "alarm.ack" },
        &a.unit,
        serde_json::json!({ "alarm": id, "rule": a.rule, "case": a.case_number, "comment": comment }),
    );
    alarm(index, id)
        .await?
        .ok_or_else(|| SettleError::NotFound(format!("no alarm {id}")))
}

#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// Operations not closed, as a parent hub's catalog carries them.
pub async fn open_operations(
    index: &Index,
    court: &str,
) -> Result<Vec<v1::CatalogOperation>, IndexError> {
    Ok(planned_operations(index)
        .await?
        .into_iter()
        .map(|(op, units)| v1::CatalogOperation {
            id: op.id,
            case_number: op.case_number,
            name: op.name,
            starts_us: op.starts_us.max(0) as u64,
            ends_us: op.ends_us.max(0) as u64,
            latitude: op.latitude,
            longitude: op.longitude,
            radius_m: op.radius_m,
            units,
            court: court.to_string(),
        })
        .collect())
}

async fn planned_operations(index: &Index) -> Result<Vec<(OperationRow, Vec<String>)>, IndexError> {
    let ops: Vec<OperationRow> = sqlx::query_as("SELECT * FROM operations WHERE state = 'planned'")
        .fetch_all(index.pool())
        .await?;
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        let units = index.operation_units(&op.id).await?;
        out.push((op, units));
    }
    Ok(out)
}

fn engine_operation(op: &OperationRow, units: Vec<String>) -> alarms::Operation {
    alarms::Operation {
        id: op.id.clone(),
        case_number: op.case_number.clone(),
        starts_us: op.starts_us.max(0) as u64,
        ends_us: op.ends_us.max(0) as u64,
        latitude: op.latitude,
        longitude: op.longitude,
        radius_m: op.radius_m,
        units: units.into(),
    }
}

/// What the field task works with.
pub struct FieldTask {
    pub index: Index,
    pub audit: Audit,
    pub metrics: Arc<Metrics>,
    pub units: Arc<Units>,
    pub config: alarms::AlarmConfig,
    pub shutdown: CancellationToken,
    /// Operations created or closed: read them now rather than at the next poll.
    pub operations_changed: Arc<tokio::sync::Notify>,
    /// Alarms not acknowledged this long escalate to the parent court (None: no parent).
    pub escalate_after: Option<Duration>,
    pub alarm_changes: tokio::sync::broadcast::Sender<AlarmRow>,
}

/// Starts the field task; returns its handle.
pub fn start(task: FieldTask) -> (Field, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let field = Field {
        tx,
        alarm_changes: task.alarm_changes.clone(),
        // Deep enough for 2,000 units' second between two console batches.
        telemetry_points: tokio::sync::broadcast::channel(4096).0,
    };
    (field, tokio::spawn(run(task, rx)))
}

async fn run(t: FieldTask, mut rx: mpsc::Receiver<Input>) {
    let mut engine = AlarmEngine::new(t.config.clone());
    let mut changes = t.units.changes();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ops_tick = tokio::time::interval(Duration::from_secs(2));
    let mut flush_tick = tokio::time::interval(Duration::from_millis(500));
    for i in [&mut tick, &mut ops_tick, &mut flush_tick] {
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let mut known: HashMap<String, alarms::Operation> = HashMap::new();
    // unit → (case, operation) while an operation of it is active.
    let mut binding: HashMap<String, (String, String)> = HashMap::new();
    let mut batch: Vec<TelemetryRow> = Vec::new();
    let now = || unix_us().max(0) as u64;
    for b in t.units.list().into_iter().filter(|b| b.is_online()) {
        engine.handle(now(), Event::Online(b.unit_id.clone()));
    }
    loop {
        tokio::select! {
            msg = rx.recv() => {
                match msg {
                    None => break,
                    Some(Input::Telemetry(unit, p, received)) => {
                        let bound = binding.get(&unit).cloned();
                        batch.push(row(&unit, &p, received, bound));
                        engine.handle(now(), Event::Telemetry(unit, core_telemetry(&p)));
                        if batch.len() >= 1000 {
                            flush(&t, &mut batch).await;
                        }
                    }
                    Some(Input::Spool { unit, refused_groups }) => {
                        engine.handle(now(), Event::Spool { unit, refused_groups });
                    }
                }
            }
            change = changes.recv() => match change {
                Ok(c) if c.online => engine.handle(now(), Event::Online(c.unit_id)),
                Ok(c) => engine.handle(now(), Event::Offline(c.unit_id)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    for b in t.units.list() {
                        let e = if b.is_online() { Event::Online(b.unit_id.clone()) } else { Event::Offline(b.unit_id.clone()) };
                        engine.handle(now(), e);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            _ = tick.tick() => {
                let n = now();
                for b in t.units.list().into_iter().filter(|b| b.is_online()) {
                    if b.stats().framerate > 0.0 {
                        engine.handle(n, Event::Media(b.unit_id.clone()));
                    }
                }
                engine.handle_timeout(n);
                if let Some(after) = t.escalate_after {
                    let before = n.saturating_sub(after.as_micros() as u64) as i64;
                    match escalate(&t.index, before, n as i64).await {
                        Ok(rows) => {
                            for a in rows {
                                t.metrics.alarms_escalated.with_label_values(&[&a.rule]).inc();
                                info!(alarm = %a.id, rule = %a.rule, unit = %a.unit, "alarm escalated to the parent court");
                                t.audit.record("hub", "alarm.escalate", &a.unit,
                                    serde_json::json!({ "alarm": a.id, "rule": a.rule }));
                                let _ = t.alarm_changes.send(a);
                            }
                        }
                        Err(e) => warn!(error = %e, "escalating alarms"),
                    }
                }
            }
            _ = t.operations_changed.notified() => {
                match planned_operations(&t.index).await {
                    Ok(ops) => sync_operations(&t, &mut engine, &mut known, &mut binding, ops).await,
                    Err(e) => warn!(error = %e, "reading operations for the alarm rules"),
                }
                ops_tick.reset();
            }
            _ = ops_tick.tick() => {
                match planned_operations(&t.index).await {
                    Ok(ops) => sync_operations(&t, &mut engine, &mut known, &mut binding, ops).await,
                    Err(e) => warn!(error = %e, "reading operations for the alarm rules"),
                }
            }
            _ = flush_tick.tick() => flush(&t, &mut batch).await,
            _ = t.shutdown.cancelled() => break,
        }
        while let Some(a) = engine.poll_alarm() {
            raise(&t, a).await;
        }
    }
    flush(&t, &mut batch).await;
}

/// Brings the engine's operations in line with the index: new ones planned, gone ones
/// closed (with what their units recorded, for `missing_evidence`).
async fn sync_operations(
    t: &FieldTask,
    engine: &mut AlarmEngine,
    known: &mut HashMap<String, alarms::Operation>,
    binding: &mut HashMap<String, (String, String)>,
    ops: Vec<(OperationRow, Vec<String>)>,
) {
    let n = unix_us().max(0) as u64;
    let mut current: HashMap<String, alarms::Operation> = HashMap::new();
    for (row, units) in ops {
        current.insert(row.id.clone(), engine_operation(&row, units));
    }
    for (id, op) in &current {
        if known.get(id) != Some(op) {
            engine.handle(n, Event::Operation(op.clone()));
        }
    }
    for (id, op) in known.iter() {
        if current.contains_key(id) {
            continue;
        }
        let mut recorded = HashMap::new();
        for unit in op.units.iter() {
            let spans = t
                .index
                .segments_between(unit, op.starts_us as i64, op.ends_us as i64)
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|r| r.kind == "media" && r.deleted_us.is_none())
                .map(|r| (r.start_us.max(0) as u64, r.end_us.max(0) as u64))
                .collect::<Vec<_>>();
            recorded.insert(unit.clone(), spans);
        }
        engine.handle(
            n,
            Event::OperationClosed {
                id: id.clone(),
                recorded,
            },
        );
    }
    binding.clear();
    for op in current.values() {
        if op.starts_us <= n && n < op.ends_us {
            for u in op.units.iter() {
                binding.insert(u.clone(), (op.case_number.clone(), op.id.clone()));
            }
        }
    }
    *known = current;
}

async fn raise(t: &FieldTask, a: alarms::Alarm) {
    let rule = a.rule.name();
    let severity = format!("{:?}", a.severity).to_lowercase();
    t.metrics.alarms_raised.with_label_values(&[rule]).inc();
    // Not the evidence: a geofence alarm's says where the officer is (it is stored, audited
    // and shown to the consoles, never logged).
    info!(rule, unit = %a.unit, severity, "alarm");
    let row = AlarmRow {
        id: format!("a{}-{:04x}", a.at_us, rand::random::<u16>()),
        rule: rule.to_string(),
        severity,
        unit: a.unit.clone(),
        case_number: a.case_number.clone(),
        operation_id: a.operation.clone(),
        raised_us: a.at_us as i64,
        evidence: a.evidence.clone(),
        state: "raised".into(),
        acked_by: None,
        acked_us: None,
        resolved_by: None,
        resolved_us: None,
        comment: None,
        escalated_us: None,
    };
    let stored = sqlx::query(
        "INSERT INTO alarms (id, rule, severity, unit, case_number, operation_id, raised_us, \
         evidence, state) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&row.id)
    .bind(&row.rule)
    .bind(&row.severity)
    .bind(&row.unit)
    .bind(&row.case_number)
    .bind(&row.operation_id)
    .bind(row.raised_us)
    .bind(&row.evidence)
    .bind(&row.state)
    .execute(t.index.pool())
    .await;
    if let Err(e) = stored {
        warn!(error = %e, "storing an alarm");
    }
    t.audit.record(
        "hub",
        "alarm.raise",
        &row.unit,
        serde_json::json!({ "alarm": row.id, "rule": rule, "case": row.case_number,
            "operation": row.operation_id, "evidence": row.evidence }),
    );
    let _ = t.alarm_changes.send(row);
}

async fn flush(t: &FieldTask, batch: &mut Vec<TelemetryRow>) {
    if batch.is_empty() {
        return;
    }
    let rows = std::mem::take(batch);
    if let Err(e) = store_telemetry(&t.index, &rows).await {
        warn!(error = %e, points = rows.len(), "storing telemetry");
        t.metrics
            .telemetry_rejected
            .with_label_values(&["store"])
            .inc_by(rows.len() as u64);
    }
}

fn row(
    unit: &str,
    t: &v1::Telemetry,
    received: u64,
    bound: Option<(String, String)>,
) -> TelemetryRow {
    let p = t.position.as_ref();
    TelemetryRow {
        unit: unit.to_string(),
        at_us: t.timestamp_us.min(i64::MAX as u64) as i64,
        received_us: received as i64,
        latitude: p.map(|p| p.latitude),
        longitude: p.map(|p| p.longitude),
        accuracy_m: p.map(|p| f64::from(p.accuracy_m)),
        speed_mps: p.map(|p| f64::from(p.speed_mps)),
        heading_deg: p.map(|p| f64::from(p.heading_deg)),
        battery_percent: Some(f64::from(t.battery_percent)),
        signal_dbm: i64::from(t.signal_dbm),
        storage_free_bytes: t.storage_free_bytes.min(i64::MAX as u64) as i64,
        recording: i64::from(t.recording),
        sos: i64::from(t.sos),
        case_number: bound.as_ref().map(|b| b.0.clone()),
        operation_id: bound.map(|b| b.1),
    }
}

fn core_telemetry(t: &v1::Telemetry) -> alarms::Telemetry {
    alarms::Telemetry {
        at_us: t.timestamp_us,
        position: t
            .position
            .as_ref()
            .map(|p| (p.latitude, p.longitude, f64::from(p.accuracy_m))),
        // Zero is what a device without a battery or a file system report sends: unknown.
        battery_percent: (t.battery_percent > 0.0).then_some(t.battery_percent),
        storage_free_bytes: (t.storage_free_bytes > 0).then_some(t.storage_free_bytes),
        recording: t.recording,
        sos: t.sos,
    }
}

/// HTTP for the console: `GET /api/alarms[?state=raised]`, `POST /api/alarms/{id}/ack` and
/// `/resolve` (JSON `{"comment": "…"}`, audited), `GET /api/telemetry?unit=U&from_us=&to_us=`.
pub mod http {
    use std::sync::Arc;

    use axum::Router;
    use axum::extract::{Path, Query, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use serde::Deserialize;

    use super::SettleError;
    use crate::auth::Claims;
    use crate::session::HubContext;

    pub fn routes() -> Router<Arc<HubContext>> {
        Router::new()
            .route("/api/alarms", get(list))
            .route("/api/alarms/{id}/ack", post(ack))
            .route("/api/alarms/{id}/resolve", post(resolve))
            .route("/api/telemetry", get(telemetry))
            .route("/api/operations", get(operations))
    }

    fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
        (
            status,
            axum::Json(serde_json::json!({ "error": message.into() })),
        )
            .into_response()
    }

    /// Any console role reads alarms; commanders and officials settle them.
    #[allow(clippy::result_large_err)] // a refusal is built once per refused request
    fn authorize(
        hub: &HubContext,
        headers: &HeaderMap,
        settle: bool,
    ) -> Result<(Claims, String), Response> {
        let token = crate::console::whep::bearer(headers).ok_or_else(|| {
            refuse(
                StatusCode::UNAUTHORIZED,
                "Authorization: Bearer <token> required",
            )
        })?;
        let claims = hub
            .authority
            .verify(token)
            .map_err(|e| refuse(StatusCode::UNAUTHORIZED, e.to_string()))?;
        let allowed = if settle {
            claims.role.can_manage_cases()
        } else {
            claims.role != crate::auth::Role::Device
        };
        if !allowed {
            hub.evidence.audit.record(
                &claims.sub,
                "denied",
                "alarms",
                serde_json::json!({ "role": claims.role, "settle": settle }),
            );
            return Err(refuse(
                StatusCode::FORBIDDEN,
                format!("a {:?} token cannot do this with alarms", claims.role),
            ));
        }
        let scope = hub.scope_of(&claims).map_err(|reason| {
            hub.evidence.audit.record(
                &claims.sub,
                "denied",
                "alarms",
                serde_json::json!({ "reason": reason }),
            );
            refuse(StatusCode::FORBIDDEN, reason)
        })?;
        Ok((claims, scope))
    }

    /// This hub's own records need a token of this hub's court (or above).
    #[allow(clippy::result_large_err)]
    fn own_court(hub: &HubContext, claims: &Claims) -> Result<(), Response> {
        let Err(reason) = hub.check_own_court(claims) else {
            return Ok(());
        };
        hub.evidence.audit.record(
            &claims.sub,
            "denied",
            "alarms",
            serde_json::json!({ "reason": reason }),
        );
        Err(refuse(StatusCode::FORBIDDEN, reason))
    }

    #[derive(Deserialize)]
    struct ListQuery {
        state: Option<String>,
    }

    async fn list(
        State(hub): State<Arc<HubContext>>,
        headers: HeaderMap,
        Query(q): Query<ListQuery>,
    ) -> Response {
        let (_, scope) = match authorize(&hub, &headers, false) {
            Ok(who) => who,
            Err(r) => return r,
        };
        let own = hub.config.court.code.clone();
        // This hub's alarms (for its own court and above), then those of the courts below.
        let mut out: Vec<serde_json::Value> = Vec::new();
        if hub.cascade.covers(&scope, &own) {
            match super::alarms(&hub.evidence.index, q.state.as_deref()).await {
                Ok(rows) => out.extend(rows.into_iter().map(|r| {
                    let escalated = r.escalated_us.is_some();
                    let mut v = serde_json::to_value(r).unwrap_or_default();
                    v["court"] = serde_json::json!(own);
                    v["escalated"] = serde_json::json!(escalated);
                    v
                })),
                Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            }
        }
        for a in hub.cascade.alarms_under(&scope) {
            if q.state.as_deref().is_some_and(|s| s != a.state) {
                continue;
            }
            let text = |s: String| (!s.is_empty()).then_some(s);
            out.push(serde_json::json!({
                "id": a.id, "rule": a.rule, "severity": a.severity, "unit": a.unit_id,
                "case_number": text(a.case_number), "operation_id": text(a.operation_id),
                "raised_us": a.raised_us, "evidence": a.evidence, "state": a.state,
                "acked_by": text(a.acked_by), "acked_us": null,
                "resolved_by": text(a.resolved_by), "resolved_us": null,
                "comment": text(a.comment), "court": a.court, "escalated": a.escalated,
                "below": true,
            }));
        }
        axum::Json(serde_json::json!({ "alarms": out })).into_response()
    }

    #[derive(Deserialize, Default)]
    struct Settle {
        #[serde(default)]
        comment: String,
    }

    /// `?court=` names the court of an alarm below; without it, the alarm is this hub's.
    #[derive(Deserialize, Default)]
    struct CourtQuery {
        court: Option<String>,
    }

    async fn settle(
        hub: &Arc<HubContext>,
        headers: &HeaderMap,
        id: &str,
        court: Option<String>,
        body: &[u8],
        resolve: bool,
    ) -> Response {
        let (who, scope) = match authorize(hub, headers, true) {
            Ok(c) => c,
            Err(r) => return r,
        };
        let form: Settle = if body.is_empty() {
            Settle::default()
        } else {
            match serde_json::from_slice(body) {
                Ok(f) => f,
                Err(e) => {
                    return refuse(
                        StatusCode::BAD_REQUEST,
                        format!("the body is not {{\"comment\": \"…\"}}: {e}"),
                    );
                }
            }
        };
        let own = hub.config.court.code.clone();
        if let Some(court) = court.filter(|c| *c != own) {
            // An alarm below: passed down to its hub, which settles it and reports back.
            if !hub.cascade.covers(&scope, &court) || !hub.cascade.knows_court(&court) {
                let reason = format!("court {court} is not within your court {scope}");
                hub.evidence.audit.record(
                    &who.sub,
                    "denied",
                    "alarms",
                    serde_json::json!({ "reason": reason }),
                );
                return refuse(StatusCode::FORBIDDEN, reason);
            }
            let action = tianwang_proto::v1::AlarmAction {
                alarm_id: id.to_string(),
                court: court.clone(),
                resolve,
                by: format!("{} ({scope})", who.sub),
                comment: form.comment.chars().take(500).collect(),
            };
            hub.evidence.audit.record(
                &who.sub,
                if resolve {
                    "alarm.resolve"
                } else {
                    "alarm.ack"
                },
                id,
                serde_json::json!({ "court": court, "comment": action.comment, "forwarded": true }),
            );
            crate::cascade::uplink::alarm_action(hub, action);
            return (
                StatusCode::ACCEPTED,
                axum::Json(serde_json::json!({ "id": id, "court": court, "forwarded": true })),
            )
                .into_response();
        }
        if let Err(r) = own_court(hub, &who) {
            return r;
        }
        match super::settle(
            &hub.evidence.index,
            &hub.evidence.audit,
            id,
            &who.sub,
            resolve,
            &form.comment,
        )
        .await
        {
            Ok(row) => {
                hub.field.alarm_changed(&row);
                axum::Json(row).into_response()
            }
            Err(SettleError::NotFound(m)) => refuse(StatusCode::NOT_FOUND, m),
            Err(SettleError::Conflict(m)) => refuse(StatusCode::CONFLICT, m),
            Err(SettleError::Index(e)) => refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    async fn ack(
        State(hub): State<Arc<HubContext>>,
        headers: HeaderMap,
        Path(id): Path<String>,
        Query(q): Query<CourtQuery>,
        body: axum::body::Bytes,
    ) -> Response {
        settle(&hub, &headers, &id, q.court, &body, false).await
    }

    async fn resolve(
        State(hub): State<Arc<HubContext>>,
        headers: HeaderMap,
        Path(id): Path<String>,
        Query(q): Query<CourtQuery>,
        body: axum::body::Bytes,
    ) -> Response {
        settle(&hub, &headers, &id, q.court, &body, true).await
    }

    /// Open operations (for the map's fences): this hub's, and those of the courts below
    /// the token's court. Any console role.
    async fn operations(State(hub): State<Arc<HubContext>>, headers: HeaderMap) -> Response {
        let (_, scope) = match authorize(&hub, &headers, false) {
            Ok(who) => who,
            Err(r) => return r,
        };
        let own = hub.config.court.code.clone();
        let mut ops = Vec::new();
        if hub.cascade.covers(&scope, &own) {
            match super::open_operations(&hub.evidence.index, &own).await {
                Ok(local) => ops.extend(local),
                Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            }
        }
        ops.extend(hub.cascade.operations_under(&scope));
        let list: Vec<serde_json::Value> = ops
            .into_iter()
            .map(|o| {
                serde_json::json!({
                    "id": o.id, "case_number": o.case_number, "name": o.name,
                    "starts_us": o.starts_us, "ends_us": o.ends_us, "latitude": o.latitude,
                    "longitude": o.longitude, "radius_m": o.radius_m, "units": o.units,
                    "court": o.court, "state": "planned",
                })
            })
            .collect();
        axum::Json(serde_json::json!({ "operations": list })).into_response()
    }

    #[derive(Deserialize)]
    struct TelemetryQuery {
        unit: String,
        #[serde(default)]
        from_us: i64,
        #[serde(default)]
        to_us: Option<i64>,
    }

    async fn telemetry(
        State(hub): State<Arc<HubContext>>,
        headers: HeaderMap,
        Query(q): Query<TelemetryQuery>,
    ) -> Response {
        let (who, _) = match authorize(&hub, &headers, false) {
            Ok(c) => c,
            Err(r) => return r,
        };
        // Telemetry is kept by the unit's own hub.
        if let Err(r) = own_court(&hub, &who) {
            return r;
        }
        let to = q.to_us.unwrap_or(i64::MAX);
        match super::telemetry_between(&hub.evidence.index, &q.unit, q.from_us, to).await {
            Ok(rows) => axum::Json(serde_json::json!({ "points": rows })).into_response(),
            Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn debug_of_stored_points_and_alarms_shows_no_position() {
        let point = TelemetryRow {
            unit: "bwc-1".into(),
            at_us: 1,
            received_us: 2,
            latitude: Some(39.912_345),
            longitude: Some(116.398_765),
            accuracy_m: Some(4.0),
            speed_mps: None,
            heading_deg: None,
            battery_percent: Some(80.0),
            signal_dbm: -70,
            storage_free_bytes: 1,
            recording: 1,
            sos: 0,
            case_number: None,
            operation_id: None,
        };
        let alarm = AlarmRow {
            id: "a1".into(),
            rule: "left_geofence".into(),
            severity: "warning".into(),
            unit: "bwc-1".into(),
            case_number: None,
            operation_id: None,
            raised_us: 1,
            evidence: "at 39.91234,116.39877, 900 m from the centre".into(),
            state: "raised".into(),
            acked_by: None,
            acked_us: None,
            resolved_by: None,
            resolved_us: None,
            comment: None,
            escalated_us: None,
        };
        let printed = format!("{point:?} {alarm:?} {alarm:#?}");
        for value in ["39.91", "116.39"] {
            assert!(!printed.contains(value), "{value} in {printed}");
        }
        assert!(printed.contains("bwc-1") && printed.contains("<redacted>"));
    }
}
