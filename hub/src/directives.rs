//! Directives from a command centre to a unit: issued at any tier, routed down hub by hub
//! to the unit's agent, their states (sent, delivered, acknowledged, done, failed) coming
//! back up. Every hub on the path keeps the directive in its index, so the state is visible
//! at every tier and survives a restart. Delivery is at least once: open directives are
//! sent again when their unit (or the child hub it sits under) comes back, and the agent
//! executes an id at most once. States only move forward, so late or repeated reports of an
//! older state change nothing.

use std::sync::Arc;

use tianwang_proto::v1::{
    Ack, Directive, DirectiveKind, DirectiveRequest, DirectiveState, DirectiveUpdate,
};
use tianwang_proto::{ControlMessage, Kind};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::evidence::audit::{Audit, unix_us};
use crate::evidence::index::{Index, IndexError};
use crate::session::HubContext;

/// Longest instruction text.
const MAX_TEXT: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DirectiveError {
    #[error("directive refused: {0}")]
    Invalid(String),
    #[error(transparent)]
    Index(#[from] IndexError),
}

impl From<sqlx::Error> for DirectiveError {
    fn from(e: sqlx::Error) -> Self {
        DirectiveError::Index(IndexError::from(e))
    }
}

/// A change of a directive's state, and whether it goes up to the parent hub.
#[derive(Clone, Debug)]
pub struct Change {
    pub update: DirectiveUpdate,
    pub from_parent: bool,
}

#[derive(Clone)]
pub struct Directives {
    index: Index,
    audit: Audit,
    hub_id: Arc<str>,
    changes: broadcast::Sender<Change>,
}

#[derive(sqlx::FromRow, Clone, Debug)]
struct Row {
    id: String,
    unit: String,
    kind: i64,
    text: String,
    bitrate: i64,
    height: i64,
    issued_by: String,
    court: String,
    issued_us: i64,
    state: i64,
    reason: String,
    updated_us: i64,
    from_parent: i64,
}

impl Row {
    fn update(&self) -> DirectiveUpdate {
        DirectiveUpdate {
            directive_id: self.id.clone(),
            unit_id: self.unit.clone(),
            kind: self.kind as i32,
            state: self.state as i32,
            reason: self.reason.clone(),
            issued_by: self.issued_by.clone(),
            court: self.court.clone(),
            issued_at_us: self.issued_us.max(0) as u64,
            updated_at_us: self.updated_us.max(0) as u64,
            text: self.text.clone(),
        }
    }

    fn directive(&self) -> Directive {
        Directive {
            id: self.id.clone(),
            kind: self.kind as i32,
            text: self.text.clone(),
            bitrate: self.bitrate.clamp(0, i64::from(u32::MAX)) as u32,
            issued_at_us: self.issued_us.max(0) as u64,
            unit_id: self.unit.clone(),
            issued_by: self.issued_by.clone(),
            court: self.court.clone(),
            height: self.height.clamp(0, i64::from(u32::MAX)) as u32,
        }
    }

    fn state(&self) -> DirectiveState {
        DirectiveState::try_from(self.state as i32).unwrap_or(DirectiveState::Unspecified)
    }
}

/// Where a state sits in the directive's life; a report may only move it forward.
fn rank(s: DirectiveState) -> u8 {
    match s {
        DirectiveState::Unspecified => 0,
        DirectiveState::Sent => 1,
        DirectiveState::Delivered => 2,
        DirectiveState::Acknowledged => 3,
        DirectiveState::Done | DirectiveState::Failed => 4,
    }
}

pub fn is_final(s: DirectiveState) -> bool {
    rank(s) == 4
}

const COLUMNS: &str = "id, unit, kind, text, bitrate, height, issued_by, court, issued_us, state, \
     reason, updated_us, from_parent";

/// Checks what a console asks for before anything is stored.
pub fn validate(req: &DirectiveRequest) -> Result<(), DirectiveError> {
    let bad = |m: &str| Err(DirectiveError::Invalid(m.to_string()));
    if !crate::session::valid_unit_id(&req.unit_id) {
        return bad("unit id is not valid");
    }
    let kind = DirectiveKind::try_from(req.kind).unwrap_or(DirectiveKind::Unspecified);
    if kind == DirectiveKind::Unspecified {
        return bad("no directive kind");
    }
    if req.text.len() > MAX_TEXT {
        return bad("text longer than 1024 bytes");
    }
    if kind == DirectiveKind::Message && req.text.trim().is_empty() {
        return bad("an instruction needs its text");
    }
    if kind == DirectiveKind::Quality && req.bitrate == 0 && req.height == 0 {
        return bad("a quality directive needs a bitrate or a height");
    }
    Ok(())
}

impl Directives {
    pub fn new(index: Index, audit: Audit, hub_id: &str) -> Self {
        Self {
            index,
            audit,
            hub_id: hub_id.into(),
            changes: broadcast::channel(1024).0,
        }
    }

    pub fn changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    async fn get(&self, id: &str) -> Result<Option<Row>, DirectiveError> {
        Ok(
            sqlx::query_as(&format!("SELECT {COLUMNS} FROM directives WHERE id = $1"))
                .bind(id)
                .fetch_optional(self.index.pool())
                .await?,
        )
    }

    /// False if a directive of that id is there already (a repeat raced this one).
    async fn insert(&self, r: &Row) -> Result<bool, DirectiveError> {
        let done = sqlx::query(&format!(
            "INSERT INTO directives ({COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (id) DO NOTHING"
        ))
        .bind(&r.id)
        .bind(&r.unit)
        .bind(r.kind)
        .bind(&r.text)
        .bind(r.bitrate)
        .bind(r.height)
        .bind(&r.issued_by)
        .bind(&r.court)
        .bind(r.issued_us)
        .bind(r.state)
        .bind(&r.reason)
        .bind(r.updated_us)
        .bind(r.from_parent)
        .execute(self.index.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    fn tell(&self, row: &Row) {
        // No listeners is fine.
        let _ = self.changes.send(Change {
            update: row.update(),
            from_parent: row.from_parent != 0,
        });
    }

    /// A user of this hub issues a directive: stored as SENT and audited. The caller has
    /// checked role and jurisdiction, and delivers it.
    pub async fn issue(
        &self,
        user: &str,
        court: &str,
        req: &DirectiveRequest,
    ) -> Result<Directive, DirectiveError> {
        validate(req)?;
        let now = unix_us();
        let row = Row {
            id: format!("{}-{now:x}-{:08x}", self.hub_id, rand::random::<u32>()),
            unit: req.unit_id.clone(),
            kind: i64::from(req.kind),
            text: req.text.clone(),
            bitrate: i64::from(req.bitrate),
            height: i64::from(req.height),
            issued_by: user.to_string(),
            court: court.to_string(),
            issued_us: now,
            state: DirectiveState::Sent as i64,
            reason: String::new(),
            updated_us: now,
            from_parent: 0,
        };
        if !self.insert(&row).await? {
            return Err(DirectiveError::Invalid(
                "directive id collision; issue it again".into(),
            ));
        }
        self.audit.record(
            user,
            "directive.issue",
            &row.unit,
            serde_json::json!({ "directive": row.id, "kind": kind_name(row.kind),
                "text": row.text, "bitrate": row.bitrate, "height": row.height, "court": court }),
        );
        self.tell(&row);
        Ok(row.directive())
    }

    /// A directive from the parent hub. New: stored (SENT) and to be delivered (`Ok(None)`).
    /// Known already (the parent sent it again): its current state, to report back up, and
    /// whether it still needs delivering here.
    pub async fn from_parent(&self, d: &Directive) -> Result<Option<(Ack, bool)>, DirectiveError> {
        if let Some(row) = self.get(&d.id).await? {
            let state = row.state();
            return Ok(Some((ack_of(&row), !is_final(state) && rank(state) < 2)));
        }
        let req = DirectiveRequest {
            unit_id: d.unit_id.clone(),
            kind: d.kind,
            text: d.text.clone(),
            bitrate: d.bitrate,
            height: d.height,
        };
        validate(&req)?;
        if d.id.is_empty() || d.id.len() > 128 {
            return Err(DirectiveError::Invalid(
                "directive id missing or too long".into(),
            ));
        }
        let now = unix_us();
        let row = Row {
            id: d.id.clone(),
            unit: d.unit_id.clone(),
            kind: i64::from(d.kind),
            text: d.text.clone(),
            bitrate: i64::from(d.bitrate),
            height: i64::from(d.height),
            issued_by: d.issued_by.clone(),
            court: d.court.clone(),
            issued_us: i64::try_from(d.issued_at_us).unwrap_or(now),
            state: DirectiveState::Sent as i64,
            reason: String::new(),
            updated_us: now,
            from_parent: 1,
        };
        if !self.insert(&row).await? {
            // The same directive, sent again meanwhile: answered as a repeat.
            return Box::pin(self.from_parent(d)).await;
        }
        self.audit.record(
            &row.issued_by,
            "directive.relay",
            &row.unit,
            serde_json::json!({ "directive": row.id, "kind": kind_name(row.kind),
                "court": row.court }),
        );
        self.tell(&row);
        Ok(None)
    }

    /// A report from the unit's agent or the child hub below: moves the state forward.
    pub async fn report(&self, unit: &str, ack: &Ack) -> Result<(), DirectiveError> {
        let Some(mut row) = self.get(&ack.directive_id).await? else {
            debug!(directive = %ack.directive_id, "report for an unknown directive");
            return Ok(());
        };
        if row.unit != unit {
            warn!(directive = %ack.directive_id, %unit, "report from the wrong unit ignored");
            return Ok(());
        }
        let state = match DirectiveState::try_from(ack.state) {
            Ok(DirectiveState::Unspecified) | Err(_) => {
                // An agent older than directive states: its one answer is the outcome.
                if ack.ok {
                    DirectiveState::Done
                } else {
                    DirectiveState::Failed
                }
            }
            Ok(s) => s,
        };
        if rank(state) <= rank(row.state()) {
            return Ok(());
        }
        row.state = state as i64;
        row.reason = ack.message.chars().take(MAX_TEXT).collect();
        row.updated_us = unix_us();
        // Reports are recorded concurrently: the row changes only if its state is still
        // behind (states are numbered in order; DONE and FAILED are both final).
        let behind = (state as i64).min(DirectiveState::Done as i64);
        let changed = sqlx::query(
            "UPDATE directives SET state = $1, reason = $2, updated_us = $3              WHERE id = $4 AND state < $5",
        )
        .bind(row.state)
        .bind(&row.reason)
        .bind(row.updated_us)
        .bind(&row.id)
        .bind(behind)
        .execute(self.index.pool())
        .await?
        .rows_affected();
        if changed == 0 {
            return Ok(());
        }
        info!(directive = %row.id, unit = %row.unit, state = ?state, reason = %row.reason, "directive");
        self.audit.record(
            unit,
            "directive.state",
            &row.id,
            serde_json::json!({ "state": state.as_str_name(), "reason": row.reason }),
        );
        self.tell(&row);
        Ok(())
    }

    /// Directives for `unit` that its agent has not yet confirmed, oldest first.
    pub async fn undelivered(&self, unit: &str) -> Result<Vec<Directive>, DirectiveError> {
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM directives WHERE unit = $1 AND state = $2 ORDER BY issued_us"
        ))
        .bind(unit)
        .bind(DirectiveState::Sent as i64)
        .fetch_all(self.index.pool())
        .await?;
        Ok(rows.iter().map(Row::directive).collect())
    }

    /// Newest first; `unit` empty for all.
    pub async fn list(
        &self,
        unit: &str,
        limit: u32,
    ) -> Result<Vec<DirectiveUpdate>, DirectiveError> {
        let limit = i64::from(limit.clamp(1, 1000));
        let rows: Vec<Row> = if unit.is_empty() {
            sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM directives ORDER BY issued_us DESC LIMIT $1"
            ))
            .bind(limit)
            .fetch_all(self.index.pool())
            .await?
        } else {
            sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM directives WHERE unit = $1 ORDER BY issued_us DESC LIMIT $2"
            ))
            .bind(unit)
            .bind(limit)
            .fetch_all(self.index.pool())
            .await?
        };
        Ok(rows.iter().map(Row::update).collect())
    }
}

fn ack_of(row: &Row) -> Ack {
    Ack {
        directive_id: row.id.clone(),
        ok: row.state() != DirectiveState::Failed,
        message: row.reason.clone(),
        state: row.state as i32,
        unit_id: row.unit.clone(),
    }
}

fn kind_name(kind: i64) -> &'static str {
    DirectiveKind::try_from(kind as i32)
        .map(|k| k.as_str_name())
        .unwrap_or("DIRECTIVE_KIND_UNKNOWN")
}

/// Sends a directive one step down: to the unit's agent if it is connected here, else to
/// the child hub the unit sits under. False when neither is reachable now (it stays SENT
/// and goes out when the unit comes back).
pub fn deliver(hub: &HubContext, d: &Directive) -> bool {
    let msg = ControlMessage::new(Kind::Directive(d.clone()));
    if let Some(b) = hub.units.get(&d.unit_id)
        && !b.is_remote()
        && b.is_online()
    {
        return b.send_control(msg);
    }
    hub.cascade.send_toward(&d.unit_id, msg)
}

/// The unit (or the child hub it sits under) is reachable again: its open directives go out.
pub fn resend_open(hub: &Arc<HubContext>, unit: &str) {
    let hub = Arc::clone(hub);
    let unit = unit.to_string();
    tokio::spawn(async move {
        match hub.directives.undelivered(&unit).await {
            Ok(open) => {
                for d in open {
                    debug!(directive = %d.id, unit = %unit, "sending an open directive again");
                    deliver(&hub, &d);
                }
            }
            Err(e) => warn!(error = %e, unit = %unit, "reading open directives"),
        }
    });
}

/// A report arrived (from an agent or a child hub): recorded off the caller's task.
pub fn report(hub: &Arc<HubContext>, unit: &str, ack: Ack) {
    let hub = Arc::clone(hub);
    let unit = unit.to_string();
    tokio::spawn(async move {
        if let Err(e) = hub.directives.report(&unit, &ack).await {
            warn!(error = %e, directive = %ack.directive_id, "recording a directive state");
        }
    });
}

/// The state a hub reports up for a directive it knows.
pub fn ack_for(update: &DirectiveUpdate) -> Ack {
    Ack {
        directive_id: update.directive_id.clone(),
        ok: update.state != DirectiveState::Failed as i32,
        message: update.reason.clone(),
        state: update.state,
        unit_id: update.unit_id.clone(),
    }
}

/// A user of this hub directs a unit: role and jurisdiction checked (refusals audited),
/// the directive stored and sent one step down. Answers with its first state.
pub async fn direct(
    hub: &Arc<HubContext>,
    user: &str,
    role: crate::auth::Role,
    scope: &str,
    req: &DirectiveRequest,
) -> Result<DirectiveUpdate, (tianwang_proto::ErrorCode, String)> {
    use tianwang_proto::ErrorCode;
    let refuse = |code: ErrorCode, reason: String| {
        hub.evidence.audit.record(
            user,
            "directive.refused",
            &req.unit_id.chars().take(64).collect::<String>(),
            serde_json::json!({ "reason": reason }),
        );
        Err((code, reason))
    };
    if !role.can_direct() {
        return refuse(
            ErrorCode::Forbidden,
            format!("a {role:?} token cannot issue directives"),
        );
    }
    let Some(court) = hub.cascade.unit_court(&hub.units, &req.unit_id) else {
        return refuse(
            ErrorCode::UnknownUnit,
            format!("unit {:?} is not known here", req.unit_id),
        );
    };
    if !hub.cascade.covers(scope, &court) {
        return refuse(
            ErrorCode::Forbidden,
            format!(
                "unit {:?} belongs to court {court}, outside your court {scope}",
                req.unit_id
            ),
        );
    }
    let d = match hub.directives.issue(user, scope, req).await {
        Ok(d) => d,
        Err(DirectiveError::Invalid(m)) => return Err((ErrorCode::Protocol, m)),
        Err(e) => return Err((ErrorCode::Internal, e.to_string())),
    };
    hub.metrics
        .directives
        .with_label_values(&[kind_name(i64::from(d.kind))])
        .inc();
    deliver(hub, &d);
    Ok(DirectiveUpdate {
        directive_id: d.id,
        unit_id: d.unit_id,
        kind: d.kind,
        state: DirectiveState::Sent as i32,
        reason: String::new(),
        issued_by: d.issued_by,
        court: d.court,
        issued_at_us: d.issued_at_us,
        updated_at_us: d.issued_at_us,
        text: d.text,
    })
}
