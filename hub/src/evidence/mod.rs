//! The hub as an evidence system: the recorder, the index (SQLite or PostgreSQL), the
//! signed segment chains, the audit trail, cases and operations, verification, export,
//! playback and retention.

pub mod audit;
pub mod cases;
pub mod cli;
pub mod export;
pub mod http;
pub mod index;
pub mod keys;
pub mod recorder;
pub mod retention;
pub mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{error, info, warn};

use self::audit::Audit;
use self::index::Index;
use self::keys::{Signer, sha256_hex};

/// What the rest of the hub uses of the evidence system.
#[derive(Clone, Debug)]
pub struct Evidence {
    pub index: Index,
    pub signer: Arc<Signer>,
    pub audit: Audit,
    /// Where recordings live.
    pub dir: PathBuf,
    /// Told when an operation is created or closed (the alarm rules follow at once).
    pub operations_changed: Arc<tokio::sync::Notify>,
    /// Bumped at the same moments, for any number of watchers (the uplink to the parent).
    pub operations_version: Arc<tokio::sync::watch::Sender<u64>>,
    /// Recordings besides the units' own (the official's side of a video link).
    pub extras: recorder::Extras,
    /// (user, unit, recording) → when its playback was last audited.
    played: Arc<dashmap::DashMap<(String, String, String), std::time::Instant>>,
}

/// A playback is audited once per user and recording in this window, whatever it fetches.
const PLAYBACK_AUDIT_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// Why a recorded file is not served.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("no such recorded file")]
    Unknown,
    #[error("deleted by retention (audited)")]
    Deleted,
    #[error("the file differs from its signed hash: it is damaged and not served")]
    Damaged,
    #[error("the file cannot be read")]
    Unreadable,
    #[error(transparent)]
    Index(#[from] index::IndexError),
}

/// What start-up found among the recordings.
#[derive(Debug, Default)]
pub struct Repair {
    /// Temporary files of segments being written when the hub stopped: removed.
    pub partial_removed: usize,
    /// Files no index row names (written, then the hub stopped before indexing): moved to
    /// `.orphans/`.
    pub orphans: usize,
    /// Indexed files that are missing or differ from their row: reported, never served.
    pub damaged: Vec<String>,
}

impl Evidence {
    pub async fn open(
        index_url: &str,
        dir: &Path,
        signer: Arc<Signer>,
    ) -> Result<Self, index::IndexError> {
        let index = Index::open(index_url).await?;
        let audit = Audit::start(index.clone(), Arc::clone(&signer));
        Ok(Self {
            index,
            signer,
            audit,
            dir: dir.to_path_buf(),
            played: Arc::default(),
            extras: recorder::Extras::default(),
            operations_changed: Arc::default(),
            operations_version: Arc::new(tokio::sync::watch::Sender::new(0)),
        })
    }

    /// A recorded file by its path (as in its URL), only if the index names it and its
    /// content matches the signed hash; damage is logged and audited.
    pub async fn read_recorded(
        &self,
        path: &str,
    ) -> Result<(index::SegmentRow, Vec<u8>), FileError> {
        let path = path.strip_prefix("/recordings/").unwrap_or(path);
        let row = match self.index.segment_by_path(path).await? {
            Some(r) if r.deleted_us.is_none() => r,
            Some(_) => return Err(FileError::Deleted),
            None => return Err(FileError::Unknown),
        };
        let data = tokio::fs::read(self.dir.join(&row.path))
            .await
            .map_err(|e| {
                error!(path = %row.path, error = %e, "a recorded file cannot be read");
                FileError::Unreadable
            })?;
        let (data, hash) = tokio::task::spawn_blocking(move || {
            let hash = sha256_hex(&data);
            (data, hash)
        })
        .await
        .map_err(|_| FileError::Unreadable)?;
        if hash != row.sha256 {
            error!(path = %row.path, "a recorded file differs from its signed hash: not served");
            self.audit.record(
                "hub",
                "recording.damaged",
                &row.unit,
                serde_json::json!({ "seq": row.seq, "path": row.path, "problem": "different content" }),
            );
            return Err(FileError::Damaged);
        }
        Ok((row, data))
    }

    /// Audits that `user` is playing back the recording `row` belongs to: on the first file
    /// fetched of it (init or media: either alone tells something), then once per window.
    pub fn audit_playback(&self, user: &str, row: &index::SegmentRow, via: &str) {
        let key = (user.to_string(), row.unit.clone(), row.recording.clone());
        let now = std::time::Instant::now();
        let due = match self.played.get(&key) {
            Some(at) => now.duration_since(*at) > PLAYBACK_AUDIT_WINDOW,
            None => true,
        };
        if due {
            // Keep the map small: forget what is past its window.
            if self.played.len() > 10_000 {
                self.played
                    .retain(|_, at| now.duration_since(*at) <= PLAYBACK_AUDIT_WINDOW);
            }
            self.played.insert(key, now);
            self.audit.record(
                user,
                "playback",
                &row.unit,
                serde_json::json!({ "recording": row.recording, "case": row.case_number,
                    "seq": row.seq, "via": via }),
            );
        }
    }

    /// Brings the recordings and the index back in line after a crash: partial files are
    /// removed, unindexed ones set aside, and each unit's last few segments checked byte for
    /// byte (all others by size).
    pub async fn repair(&self) -> Result<Repair, index::IndexError> {
        let mut repair = Repair::default();
        let mut indexed = std::collections::HashSet::new();
        for unit in self.index.recorded_units().await? {
            let rows = self.index.segments(&unit).await?;
            let n = rows.len();
            for (i, row) in rows.iter().enumerate() {
                if row.kind == "gap" || row.deleted_us.is_some() {
                    continue;
                }
                indexed.insert(row.path.clone());
                let path = self.dir.join(&row.path);
                let problem = match std::fs::metadata(&path) {
                    Err(_) => Some("missing"),
                    Ok(m) if m.len() as i64 != row.bytes => Some("a different size"),
                    // The newest ones are the likeliest to be damaged by a crash.
                    Ok(_) if i + 3 >= n => match std::fs::read(&path) {
                        Ok(data) if sha256_hex(&data) != row.sha256 => Some("different content"),
                        Ok(_) => None,
                        Err(_) => Some("unreadable"),
                    },
                    Ok(_) => None,
                };
                if let Some(what) = problem {
                    error!(path = %row.path, unit = %unit, seq = row.seq, "recorded file is {what}");
                    self.audit.record(
                        "hub",
                        "recording.damaged",
                        &unit,
                        serde_json::json!({ "seq": row.seq, "path": row.path, "problem": what }),
                    );
                    repair.damaged.push(format!("{} ({what})", row.path));
                }
            }
        }
        let walk = walk(&self.dir);
        for path in walk {
            let Ok(rel) = path.strip_prefix(&self.dir) else {
                continue;
            };
            let rel_str = rel.to_string_lossy().to_string();
            if rel_str.starts_with(".orphans") {
                continue;
            }
            if rel_str.ends_with(".tmp") {
                if std::fs::remove_file(&path).is_ok() {
                    repair.partial_removed += 1;
                }
            } else if !indexed.contains(&rel_str) {
                let to = self.dir.join(".orphans").join(rel);
                if let Some(parent) = to.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                match std::fs::rename(&path, &to) {
                    Ok(()) => {
                        warn!(path = %rel_str, "a recorded file without an index row was set aside");
                        repair.orphans += 1;
                    }
                    Err(e) => error!(path = %rel_str, error = %e, "setting an orphan aside"),
                }
            }
        }
        if repair.partial_removed + repair.orphans + repair.damaged.len() > 0 {
            info!(?repair, "recordings repaired at start-up");
        }
        Ok(repair)
    }
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
