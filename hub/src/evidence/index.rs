//! The evidence index: cases, operations, the per-unit segment chain and the audit log, in
//! SQLite (a file in the data dir, the default) or PostgreSQL (by URL), through sqlx's Any
//! driver: one set of queries and migrations for both.

use std::path::Path;

use serde::Serialize;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor, FromRow};

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("index migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
}

#[derive(Clone, PartialEq, FromRow, Serialize)]
pub struct CaseRow {
    pub number: String,
    pub court: String,
    /// JSON array of names.
    pub parties: String,
    /// "open" or "closed".
    pub state: String,
    pub created_us: i64,
    pub closed_us: Option<i64>,
}

/// The parties are personal data: `Debug` shows the rest of the case.
impl std::fmt::Debug for CaseRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaseRow")
            .field("number", &self.number)
            .field("court", &self.court)
            .field("parties", &tianwang_proto::Sensitive::new(()))
            .field("state", &self.state)
            .field("created_us", &self.created_us)
            .field("closed_us", &self.closed_us)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, FromRow, Serialize)]
pub struct OperationRow {
    pub id: String,
    pub case_number: String,
    pub name: String,
    pub starts_us: i64,
    pub ends_us: i64,
    pub latitude: f64,
    pub longitude: f64,
    pub radius_m: f64,
    /// "planned" (active within its window) or "closed".
    pub state: String,
    pub created_us: i64,
    pub closed_us: Option<i64>,
}

/// One link of a unit's chain: an init segment, a media segment, or a gap. Exports carry it
/// as it is (serde), which is what `hub verify --export` checks signatures against.
#[derive(Debug, Clone, PartialEq, FromRow, Serialize, serde::Deserialize)]
pub struct SegmentRow {
    pub unit: String,
    pub seq: i64,
    /// "init", "media" or "gap".
    pub kind: String,
    pub recording: String,
    pub number: i64,
    /// Relative to the recordings directory; empty for a gap.
    pub path: String,
    pub codecs: String,
    pub start_us: i64,
    pub end_us: i64,
    pub media_start: i64,
    pub media_duration: i64,
    pub bytes: i64,
    pub sha256: String,
    pub prev_sha256: String,
    pub case_number: Option<String>,
    pub operation_id: Option<String>,
    pub officer: Option<String>,
    pub court: String,
    pub recorded_us: i64,
    pub signature: String,
    /// Set by retention; not signed, and not part of an export.
    #[serde(default, skip)]
    pub deleted_us: Option<i64>,
}

impl SegmentRow {
    /// A row of `unit`'s chain in `recording` with nothing else filled in: the writer sets
    /// its kind, span and hash, and `append` its link, binding and signature.
    pub fn new(unit: &str, recording: &str) -> Self {
        Self {
            unit: unit.to_string(),
            seq: 0,
            kind: String::new(),
            recording: recording.to_string(),
            number: 0,
            path: String::new(),
            codecs: String::new(),
            start_us: 0,
            end_us: 0,
            media_start: 0,
            media_duration: 0,
            bytes: 0,
            sha256: String::new(),
            prev_sha256: String::new(),
            case_number: None,
            operation_id: None,
            officer: None,
            court: String::new(),
            recorded_us: 0,
            signature: String::new(),
            deleted_us: None,
        }
    }

    /// What the signature covers: every field but the signature and the retention mark, as
    /// a JSON array (unambiguous whatever the fields contain).
    pub fn signed_bytes(&self) -> Vec<u8> {
        serde_json::json!([
            "tianwang-segment/1",
            self.unit,
            self.seq,
            self.kind,
            self.recording,
            self.number,
            self.path,
            self.codecs,
            self.start_us,
            self.end_us,
            self.media_start,
            self.media_duration,
            self.bytes,
            self.sha256,
            self.prev_sha256,
            self.case_number,
            self.operation_id,
            self.officer,
            self.court,
            self.recorded_us,
        ])
        .to_string()
        .into_bytes()
    }
}

#[derive(Debug, Clone, PartialEq, FromRow, Serialize, serde::Deserialize)]
pub struct AuditRow {
    pub seq: i64,
    pub at_us: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub detail: String,
    pub prev_sha256: String,
    pub sha256: String,
    /// The hub's signature over `sha256`.
    pub signature: String,
}

impl AuditRow {
    /// The row's hash: over the previous row's hash and this row's fields.
    pub fn compute_hash(&self) -> String {
        let body = serde_json::json!([
            "tianwang-audit/1",
            self.seq,
            self.at_us,
            self.actor,
            self.action,
            self.subject,
            self.detail,
            self.prev_sha256,
        ])
        .to_string();
        super::keys::sha256_hex(body.as_bytes())
    }
}

/// The chain's start: the "previous hash" of a unit's first segment and the audit's first row.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Clone, Debug)]
pub struct Index {
    pool: AnyPool,
}

const SEGMENT_COLUMNS: &str = "unit, seq, kind, recording, number, path, codecs, start_us, end_us, \
     media_start, media_duration, bytes, sha256, prev_sha256, case_number, operation_id, officer, \
     court, recorded_us, signature, deleted_us";

impl Index {
    /// `sqlite://PATH?mode=rwc` or `postgres://…`; migrates to the current schema.
    pub async fn open(url: &str) -> Result<Self, IndexError> {
        install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 1 } else { 8 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        // Durable and concurrent enough for an index: WAL, full sync.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = FULL").await?;
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    /// The default index: SQLite in the data dir.
    pub fn sqlite_url(data_dir: &Path) -> String {
        format!(
            "sqlite://{}?mode=rwc",
            data_dir.join("index.sqlite").display()
        )
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- cases and operations ----

    pub async fn create_case(&self, c: &CaseRow) -> Result<(), IndexError> {
        if self.case(&c.number).await?.is_some() {
            return Err(IndexError::Conflict(format!(
                "case {} exists already",
                c.number
            )));
        }
        sqlx::query(
            "INSERT INTO cases (number, court, parties, state, created_us, closed_us) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&c.number)
        .bind(&c.court)
        .bind(&c.parties)
        .bind(&c.state)
        .bind(c.created_us)
        .bind(c.closed_us)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn case(&self, number: &str) -> Result<Option<CaseRow>, IndexError> {
        Ok(sqlx::query_as("SELECT * FROM cases WHERE number = $1")
            .bind(number)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn cases(&self) -> Result<Vec<CaseRow>, IndexError> {
        Ok(
            sqlx::query_as("SELECT * FROM cases ORDER BY created_us, number")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    pub async fn close_case(&self, number: &str, now_us: i64) -> Result<(), IndexError> {
        sqlx::query("UPDATE cases SET state = 'closed', closed_us = $1 WHERE number = $2")
            .bind(now_us)
            .bind(number)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn create_operation(
        &self,
        op: &OperationRow,
        units: &[String],
    ) -> Result<(), IndexError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO operations (id, case_number, name, starts_us, ends_us, latitude, \
             longitude, radius_m, state, created_us, closed_us) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&op.id)
        .bind(&op.case_number)
        .bind(&op.name)
        .bind(op.starts_us)
        .bind(op.ends_us)
        .bind(op.latitude)
        .bind(op.longitude)
        .bind(op.radius_m)
        .bind(&op.state)
        .bind(op.created_us)
        .bind(op.closed_us)
        .execute(&mut *tx)
        .await?;
        for unit in units {
            sqlx::query("INSERT INTO operation_units (operation_id, unit) VALUES ($1, $2)")
                .bind(&op.id)
                .bind(unit)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn operation(&self, id: &str) -> Result<Option<OperationRow>, IndexError> {
        Ok(sqlx::query_as("SELECT * FROM operations WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn operations(&self, case_number: &str) -> Result<Vec<OperationRow>, IndexError> {
        Ok(
            sqlx::query_as(
                "SELECT * FROM operations WHERE case_number = $1 ORDER BY starts_us, id",
            )
            .bind(case_number)
            .fetch_all(&self.pool)
            .await?,
        )
    }

    pub async fn operation_units(&self, id: &str) -> Result<Vec<String>, IndexError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT unit FROM operation_units WHERE operation_id = $1 ORDER BY unit",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(u,)| u).collect())
    }

    pub async fn close_operation(&self, id: &str, now_us: i64) -> Result<(), IndexError> {
        sqlx::query("UPDATE operations SET state = 'closed', closed_us = $1 WHERE id = $2")
            .bind(now_us)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The operation a unit is assigned to at `at_us` (planned, within its window), with
    /// its case number.
    pub async fn active_operation(
        &self,
        unit: &str,
        at_us: i64,
    ) -> Result<Option<(String, String)>, IndexError> {
        Ok(sqlx::query_as(
            "SELECT o.case_number, o.id FROM operations o \
             JOIN operation_units u ON u.operation_id = o.id \
             WHERE u.unit = $1 AND o.state = 'planned' AND o.starts_us <= $2 AND o.ends_us > $2 \
             ORDER BY o.starts_us DESC LIMIT 1",
        )
        .bind(unit)
        .bind(at_us)
        .fetch_optional(&self.pool)
        .await?)
    }

    // ---- the segment chain ----

    pub async fn last_segment(&self, unit: &str) -> Result<Option<SegmentRow>, IndexError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {SEGMENT_COLUMNS} FROM segments WHERE unit = $1 ORDER BY seq DESC LIMIT 1"
        ))
        .bind(unit)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The latest capture time a unit's chain reaches (backfill rows come later in the
    /// chain but earlier in time, so this is not the last row's end).
    pub async fn chain_end(&self, unit: &str) -> Result<Option<i64>, IndexError> {
        let row: (Option<i64>,) =
            sqlx::query_as("SELECT MAX(end_us) FROM segments WHERE unit = $1")
                .bind(unit)
                .fetch_one(&self.pool)
                .await?;
        Ok(row.0)
    }

    pub async fn insert_segment(&self, r: &SegmentRow) -> Result<(), IndexError> {
        sqlx::query(&format!(
            "INSERT INTO segments ({SEGMENT_COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)"
        ))
        .bind(&r.unit)
        .bind(r.seq)
        .bind(&r.kind)
        .bind(&r.recording)
        .bind(r.number)
        .bind(&r.path)
        .bind(&r.codecs)
        .bind(r.start_us)
        .bind(r.end_us)
        .bind(r.media_start)
        .bind(r.media_duration)
        .bind(r.bytes)
        .bind(&r.sha256)
        .bind(&r.prev_sha256)
        .bind(&r.case_number)
        .bind(&r.operation_id)
        .bind(&r.officer)
        .bind(&r.court)
        .bind(r.recorded_us)
        .bind(&r.signature)
        .bind(r.deleted_us)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A unit's chain in order.
    pub async fn segments(&self, unit: &str) -> Result<Vec<SegmentRow>, IndexError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {SEGMENT_COLUMNS} FROM segments WHERE unit = $1 ORDER BY seq"
        ))
        .bind(unit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Segments of a unit overlapping [from, to) (capture time), with their recording's
    /// init rows, in chain order.
    pub async fn segments_between(
        &self,
        unit: &str,
        from_us: i64,
        to_us: i64,
    ) -> Result<Vec<SegmentRow>, IndexError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {SEGMENT_COLUMNS} FROM segments WHERE unit = $1 AND start_us < $3 AND end_us > $2 \
             ORDER BY seq"
        ))
        .bind(unit)
        .bind(from_us)
        .bind(to_us)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn segments_of_case(&self, case_number: &str) -> Result<Vec<SegmentRow>, IndexError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {SEGMENT_COLUMNS} FROM segments WHERE case_number = $1 ORDER BY unit, seq"
        ))
        .bind(case_number)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The init row of a unit's recording.
    pub async fn init_of(
        &self,
        unit: &str,
        recording: &str,
    ) -> Result<Option<SegmentRow>, IndexError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {SEGMENT_COLUMNS} FROM segments WHERE unit = $1 AND recording = $2 AND kind = 'init'"
        ))
        .bind(unit)
        .bind(recording)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The row that names a recorded file.
    pub async fn segment_by_path(&self, path: &str) -> Result<Option<SegmentRow>, IndexError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {SEGMENT_COLUMNS} FROM segments WHERE path = $1 AND kind <> 'gap'"
        ))
        .bind(path)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Planned operations with `unit` whose window overlaps [starts, ends).
    pub async fn overlapping_operations(
        &self,
        unit: &str,
        starts_us: i64,
        ends_us: i64,
    ) -> Result<Vec<String>, IndexError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT o.id FROM operations o JOIN operation_units u ON u.operation_id = o.id              WHERE u.unit = $1 AND o.state = 'planned' AND o.starts_us < $3 AND o.ends_us > $2",
        )
        .bind(unit)
        .bind(starts_us)
        .bind(ends_us)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Audit rows about a case: its changes, and the playback and export of its recordings.
    pub async fn audit_of_case(&self, case_number: &str) -> Result<Vec<AuditRow>, IndexError> {
        // LIKE narrows the search (wildcards in the number escaped); the exact test is on
        // the parsed detail, as SQLite's LIKE ignores ASCII case and PostgreSQL's does not.
        let needle = format!("\"case\":{}", serde_json::Value::from(case_number));
        let escaped: String = needle
            .chars()
            .flat_map(|c| match c {
                '!' | '%' | '_' => vec!['!', c],
                c => vec![c],
            })
            .collect();
        let rows: Vec<AuditRow> = sqlx::query_as(
            "SELECT * FROM audit WHERE subject = $1 OR detail LIKE $2 ESCAPE '!' ORDER BY seq",
        )
        .bind(case_number)
        .bind(format!("%{escaped}%"))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter(|r| {
                r.subject == case_number
                    || serde_json::from_str::<serde_json::Value>(&r.detail)
                        .is_ok_and(|d| d["case"].as_str() == Some(case_number))
            })
            .collect())
    }

    pub async fn recorded_units(&self) -> Result<Vec<String>, IndexError> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT DISTINCT unit FROM segments ORDER BY unit")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(|(u,)| u).collect())
    }

    /// Init and media rows recorded (hub clock) before `before_us` that retention may
    /// remove: not deleted yet, and not of an open case.
    pub async fn expired(
        &self,
        before_us: i64,
        bound_to_closed_case: bool,
    ) -> Result<Vec<SegmentRow>, IndexError> {
        let case_clause = if bound_to_closed_case {
            "AND case_number IN (SELECT number FROM cases WHERE state = 'closed')"
        } else {
            "AND case_number IS NULL"
        };
        Ok(sqlx::query_as(&format!(
            "SELECT {SEGMENT_COLUMNS} FROM segments WHERE recorded_us < $1 AND deleted_us IS NULL \
             AND kind <> 'gap' {case_clause} ORDER BY unit, seq"
        ))
        .bind(before_us)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn mark_deleted(&self, unit: &str, seq: i64, now_us: i64) -> Result<(), IndexError> {
        sqlx::query("UPDATE segments SET deleted_us = $1 WHERE unit = $2 AND seq = $3")
            .bind(now_us)
            .bind(unit)
            .bind(seq)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---- audit ----

    pub async fn last_audit(&self) -> Result<Option<AuditRow>, IndexError> {
        Ok(
            sqlx::query_as("SELECT * FROM audit ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn insert_audit(&self, r: &AuditRow) -> Result<(), IndexError> {
        sqlx::query(
            "INSERT INTO audit (seq, at_us, actor, action, subject, detail, prev_sha256, sha256, \
             signature) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(r.seq)
        .bind(r.at_us)
        .bind(&r.actor)
        .bind(&r.action)
        .bind(&r.subject)
        .bind(&r.detail)
        .bind(&r.prev_sha256)
        .bind(&r.sha256)
        .bind(&r.signature)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn audit(&self) -> Result<Vec<AuditRow>, IndexError> {
        Ok(sqlx::query_as("SELECT * FROM audit ORDER BY seq")
            .fetch_all(&self.pool)
            .await?)
    }

    // ---- revoked tokens ----

    /// Revokes a token id or a subject; a subject revoked again takes the newer moment.
    pub async fn revoke(&self, r: &RevocationRow) -> Result<(), IndexError> {
        sqlx::query(
            "INSERT INTO revocations (kind, value, at_us, actor, reason) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (kind, value) DO UPDATE SET \
             at_us = excluded.at_us, actor = excluded.actor, reason = excluded.reason",
        )
        .bind(&r.kind)
        .bind(&r.value)
        .bind(r.at_us)
        .bind(&r.actor)
        .bind(&r.reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn revocations(&self) -> Result<Vec<RevocationRow>, IndexError> {
        Ok(
            sqlx::query_as("SELECT * FROM revocations ORDER BY at_us, kind, value")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// How many revocations there are and the newest one's moment: a change of either is a
    /// change of the list.
    pub async fn revocations_version(&self) -> Result<(i64, Option<i64>), IndexError> {
        Ok(
            sqlx::query_as("SELECT COUNT(*), MAX(at_us) FROM revocations")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Raw access for tests that tamper with the index on purpose.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

/// A revoked token (`jti`) or subject (`subject`: its tokens issued up to `at_us`).
#[derive(Debug, Clone, PartialEq, FromRow, Serialize)]
pub struct RevocationRow {
    pub kind: String,
    pub value: String,
    pub at_us: i64,
    pub actor: String,
    pub reason: String,
}

impl RevocationRow {
    /// The list the token check consults.
    pub fn to_revoked(rows: &[RevocationRow]) -> crate::auth::Revoked {
        let mut r = crate::auth::Revoked::default();
        for row in rows {
            match row.kind.as_str() {
                "jti" => {
                    r.jtis.insert(row.value.clone());
                }
                "subject" => {
                    let at = u64::try_from(row.at_us / 1_000_000).unwrap_or(0);
                    r.subjects.insert(row.value.clone(), at);
                }
                other => tracing::warn!(kind = other, "unknown revocation kind ignored"),
            }
        }
        r
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::CaseRow;

    #[test]
    fn debug_of_a_case_shows_no_party() {
        let case = CaseRow {
            number: "(2026)京0113执1号".into(),
            court: "c".into(),
            parties: r#"["王小明","Example Party"]"#.into(),
            state: "open".into(),
            created_us: 1,
            closed_us: None,
        };
        let printed = format!("{case:?} {case:#?}");
        assert!(!printed.contains("王小明") && !printed.contains("Example Party"));
        assert!(printed.contains("京0113执1") && printed.contains("<redacted>"));
    }
}
