//! The directive ids this unit has seen and the last state of each. Hubs resend directives
//! after a reconnect or a restart (delivery is at least once), so an id found here is
//! answered with its state and not executed again. The log is persisted as append-only JSON
//! lines, so an agent restart does not re-execute either; it is bounded (the newest
//! [`SEEN_CAPACITY`] ids) and rewritten compact on open and when it has grown.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tianwang_proto::v1::DirectiveState;

use crate::directives::DirectiveError;

/// How many directive ids are remembered. An id older than this may run again if a hub
/// still resends it, which no hub does after that many newer directives.
pub const SEEN_CAPACITY: usize = 1024;

/// The log's file name in the data dir.
pub const SEEN_FILE: &str = "directives.jsonl";

/// What the agent tells a hub that resends a directive interrupted by an agent restart: it
/// may or may not have acted, and it will not act again (at most once).
pub const INTERRUPTED: &str = "interrupted: the agent stopped before it finished; not run again";

/// The last state of one directive, as sent in its latest Ack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub id: String,
    pub state: State,
    pub ok: bool,
    #[serde(default)]
    pub message: String,
}

/// The states a device reports (the proto's enum, named in the file for people to read).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Delivered,
    Acknowledged,
    Done,
    Failed,
}

impl State {
    pub fn proto(self) -> DirectiveState {
        match self {
            State::Delivered => DirectiveState::Delivered,
            State::Acknowledged => DirectiveState::Acknowledged,
            State::Done => DirectiveState::Done,
            State::Failed => DirectiveState::Failed,
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, State::Done | State::Failed)
    }
}

pub struct SeenLog {
    path: PathBuf,
    capacity: usize,
    /// Ids in the order first seen; the oldest is forgotten first.
    order: VecDeque<String>,
    entries: HashMap<String, Seen>,
    /// Lines in the file, to know when a rewrite pays.
    lines: usize,
}

impl SeenLog {
    /// Reads `dir/directives.jsonl` if there is one. Lines that do not parse (a write torn
    /// by a crash or power cut) are skipped; directives still under way when the agent
    /// stopped become FAILED ([`INTERRUPTED`]).
    pub fn open(dir: &Path, capacity: usize) -> Result<Self, DirectiveError> {
        let path = dir.join(SEEN_FILE);
        let mut log = Self {
            path,
            capacity: capacity.max(1),
            order: VecDeque::new(),
            entries: HashMap::new(),
            lines: 0,
        };
        let bytes = match std::fs::read(&log.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(log),
            Err(e) => {
                return Err(DirectiveError::io(
                    format!("reading {}", log.path.display()),
                    e,
                ));
            }
        };
        let mut lines = 0;
        let mut skipped = 0;
        for line in bytes.split(|b| *b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            lines += 1;
            match serde_json::from_slice::<Seen>(line) {
                Ok(seen) if !seen.id.is_empty() => log.remember(seen),
                _ => skipped += 1,
            }
        }
        let mut interrupted = 0;
        for seen in log.entries.values_mut() {
            if !seen.state.is_final() {
                *seen = Seen {
                    id: std::mem::take(&mut seen.id),
                    state: State::Failed,
                    ok: false,
                    message: INTERRUPTED.into(),
                };
                interrupted += 1;
            }
        }
        if skipped > 0 {
            tracing::warn!(file = %log.path.display(), skipped, "skipped unreadable lines of the directive log");
        }
        log.lines = lines;
        // A torn line would glue itself to the next append: rewrite without it. Rewrite
        // also when states changed or the file holds more lines than ids.
        if skipped > 0 || interrupted > 0 || lines > log.entries.len() {
            log.compact()?;
        }
        Ok(log)
    }

    pub fn get(&self, id: &str) -> Option<&Seen> {
        self.entries.get(id)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sets a directive's state and appends it to the file (synced: it must be on disk
    /// before the agent acts on it). The state is kept in memory even if the write fails.
    pub fn record(&mut self, seen: Seen) -> Result<(), DirectiveError> {
        let mut line = serde_json::to_vec(&seen)
            .map_err(|e| DirectiveError::Media(format!("encoding the directive log: {e}")))?;
        line.push(b'\n');
        self.remember(seen);
        let append = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            file.write_all(&line)?;
            file.sync_data()
        };
        append().map_err(|e| DirectiveError::io(format!("writing {}", self.path.display()), e))?;
        self.lines += 1;
        if self.lines > self.capacity.saturating_mul(4) {
            self.compact()?;
        }
        Ok(())
    }

    fn remember(&mut self, seen: Seen) {
        if !self.entries.contains_key(&seen.id) {
            self.order.push_back(seen.id.clone());
        }
        self.entries.insert(seen.id.clone(), seen);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
    }

    /// Rewrites the file with one line per remembered id: a temporary file, synced, then
    /// renamed over the log, so a crash leaves either the old or the new file.
    fn compact(&mut self) -> Result<(), DirectiveError> {
        let tmp = self.path.with_extension("jsonl.tmp");
        let write = || -> std::io::Result<()> {
            let mut out = Vec::new();
            for id in &self.order {
                if let Some(seen) = self.entries.get(id) {
                    serde_json::to_writer(&mut out, seen)?;
                    out.push(b'\n');
                }
            }
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&out)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                // The rename itself is durable only once the directory is synced.
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| DirectiveError::io(format!("rewriting {}", self.path.display()), e))?;
        self.lines = self.entries.len();
        Ok(())
    }
}
