//! Directives from the command centre, executed exactly once and reported state by state.
//!
//! A directive is answered DELIVERED on receipt, then DONE (what was done) or FAILED (why
//! not) once acted on; a MESSAGE is ACKNOWLEDGED when shown, in between. Delivery is at
//! least once, so every id goes through the [`SeenLog`] first: a repeated id is answered
//! with its last state and never run again, across reconnects and agent restarts.
//!
//! [`Executor`] does the work and needs no network (tests drive it directly);
//! [`Directives`] is the uplink's handle: it answers receipts at once, runs directives one
//! at a time in arrival order on a worker task, and queues their Acks for whichever
//! session is up.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tianwang_proto::v1::{Ack, Directive, DirectiveKind, TrackKind};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::broadcast::LocalBroadcast;
use crate::seen::{SEEN_CAPACITY, Seen, SeenLog, State};

/// QUALITY limits: a target outside them is refused.
pub const BITRATE_KBPS: std::ops::RangeInclusive<u32> = 100..=8000;
pub const HEIGHT_PX: std::ops::RangeInclusive<u32> = 144..=2160;

/// Longest directive id accepted (the hub makes ids of at most 128 bytes).
pub const MAX_ID_BYTES: usize = 128;

/// Where MARK, MESSAGE and SNAPSHOT leave their results in the data dir.
pub const MARKS_FILE: &str = "marks.jsonl";
pub const INSTRUCTIONS_FILE: &str = "instructions.jsonl";
pub const SNAPSHOTS_DIR: &str = "snapshots";

#[derive(Debug, thiserror::Error)]
pub enum DirectiveError {
    /// The directive asks for something out of bounds or malformed.
    #[error("{0}")]
    Refused(String),
    /// The media pipeline could not do it.
    #[error("{0}")]
    Media(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl DirectiveError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        DirectiveError::Io {
            what: what.into(),
            source,
        }
    }
}

/// The video's quality after a QUALITY directive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QualityChange {
    /// kbit/s
    pub bitrate: u32,
    pub width: u32,
    pub height: u32,
    /// What was done, for the DONE message.
    pub summary: String,
}

/// What a QUALITY directive changes: the live encoder (`run`), or the rendition a
/// simulated unit plays (`simulate`).
pub trait QualityControl: Send + Sync {
    /// Moves the video to `bitrate` kbit/s and, unless `height` is 0, to that picture
    /// height (already validated). Resolves once the change is made.
    fn set_quality(
        self: Arc<Self>,
        bitrate: u32,
        height: u32,
    ) -> BoxFuture<'static, Result<QualityChange, DirectiveError>>;
}

/// What happens to a directive on receipt.
#[derive(Clone, Debug, PartialEq)]
pub struct Receipt {
    /// To send at once: DELIVERED, the state a repeated id already has, or FAILED.
    pub ack: Ack,
    /// Whether to go on and execute it (a new id, recorded).
    pub execute: bool,
}

pub struct Executor {
    unit: String,
    dir: PathBuf,
    broadcast: Arc<LocalBroadcast>,
    quality: Arc<dyn QualityControl>,
    seen: Mutex<SeenLog>,
}

impl Executor {
    /// An executor keeping its files in `data_dir` (which must exist), with the ids seen
    /// before this start read back from there.
    pub fn open(
        data_dir: &Path,
        broadcast: Arc<LocalBroadcast>,
        quality: Arc<dyn QualityControl>,
    ) -> Result<Self, DirectiveError> {
        Ok(Self {
            unit: broadcast.unit.clone(),
            dir: data_dir.to_path_buf(),
            seen: Mutex::new(SeenLog::open(data_dir, SEEN_CAPACITY)?),
            broadcast,
            quality,
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// The last state recorded for a directive id.
    pub fn last_state(&self, id: &str) -> Option<Seen> {
        self.seen().get(id).cloned()
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, SeenLog> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ack(&self, id: &str, state: State, ok: bool, message: String) -> Ack {
        Ack {
            directive_id: id.to_string(),
            ok,
            message,
            state: state.proto() as i32,
            unit_id: self.unit.clone(),
        }
    }

    /// Records a state (on disk before it is reported) and makes its Ack.
    fn record(&self, id: &str, state: State, ok: bool, message: String) -> Ack {
        let seen = Seen {
            id: id.to_string(),
            state,
            ok,
            message: message.clone(),
        };
        if let Err(e) = self.seen().record(seen) {
            warn!(directive = %id, error = %e, "could not persist a directive state");
        }
        self.ack(id, state, ok, message)
    }

    /// The first step: a new id is recorded DELIVERED before anything is done, so that
    /// neither a resend nor a restart runs it twice; a known id gets its last state back.
    pub fn receive(&self, d: &Directive) -> Receipt {
        if d.id.is_empty() || d.id.len() > MAX_ID_BYTES {
            // Nothing to remember it by: refuse it without recording.
            return Receipt {
                ack: self.ack(
                    &d.id,
                    State::Failed,
                    false,
                    "directive id missing or longer than 128 bytes".into(),
                ),
                execute: false,
            };
        }
        let mut seen = self.seen();
        if let Some(s) = seen.get(&d.id) {
            return Receipt {
                ack: self.ack(&s.id, s.state, s.ok, s.message.clone()),
                execute: false,
            };
        }
        let delivered = Seen {
            id: d.id.clone(),
            state: State::Delivered,
            ok: true,
            message: String::new(),
        };
        match seen.record(delivered) {
            Ok(()) => Receipt {
                ack: self.ack(&d.id, State::Delivered, true, String::new()),
                execute: true,
            },
            // Without a record a restart could run it again: better not to run it at all.
            Err(e) => {
                let message = format!("cannot record the directive, not run: {e}");
                let failed = Seen {
                    id: d.id.clone(),
                    state: State::Failed,
                    ok: false,
                    message: message.clone(),
                };
                let _ = seen.record(failed);
                Receipt {
                    ack: self.ack(&d.id, State::Failed, false, message),
                    execute: false,
                }
            }
        }
    }

    /// The second step, for a directive [`Executor::receive`] accepted: acts on it and
    /// returns the Acks of the states it went through (ACKNOWLEDGED for a MESSAGE, then
    /// DONE or FAILED), each recorded first.
    pub async fn execute(&self, d: &Directive) -> Vec<Ack> {
        let mut acks = Vec::new();
        let kind = DirectiveKind::try_from(d.kind).unwrap_or(DirectiveKind::Unspecified);
        let outcome = if !d.unit_id.is_empty() && d.unit_id != self.unit {
            Err(DirectiveError::Refused(format!(
                "directive for unit {:?} reached unit {:?}",
                d.unit_id, self.unit
            )))
        } else {
            match kind {
                DirectiveKind::Quality => self.quality(d).await,
                DirectiveKind::GoLive => Ok(self.live(true)),
                DirectiveKind::StopLive => Ok(self.live(false)),
                DirectiveKind::Keyframe => Ok(self.keyframe()),
                DirectiveKind::Snapshot => self.snapshot(d).await,
                DirectiveKind::Mark => self.mark(d),
                DirectiveKind::Message => self.message(d).map(|()| {
                    // No officer screen on a headless agent: shown is acknowledged.
                    acks.push(self.record(
                        &d.id,
                        State::Acknowledged,
                        true,
                        format!("shown (logged, appended to {INSTRUCTIONS_FILE})"),
                    ));
                    "instruction shown and acknowledged".to_string()
                }),
                DirectiveKind::Unspecified => {
                    Err(DirectiveError::Refused("unknown directive kind".into()))
                }
            }
        };
        let ack = match outcome {
            Ok(done) => self.record(&d.id, State::Done, true, done),
            Err(e) => {
                let reason = match kind {
                    DirectiveKind::Unspecified => e.to_string(),
                    _ => format!("{}: {e}", kind_label(kind)),
                };
                self.record(&d.id, State::Failed, false, reason)
            }
        };
        info!(directive = %d.id, kind = kind_label(kind), ok = ack.ok, message = %ack.message, "directive");
        acks.push(ack);
        acks
    }

    /// Both steps: every Ack a directive causes, in order. Tests use it; the uplink goes
    /// through [`Directives`] so that receipts are not held up by a running directive.
    pub async fn handle(&self, d: &Directive) -> Vec<Ack> {
        let receipt = self.receive(d);
        let mut acks = vec![receipt.ack];
        if receipt.execute {
            acks.extend(self.execute(d).await);
        }
        acks
    }

    async fn quality(&self, d: &Directive) -> Result<String, DirectiveError> {
        validate_quality(d.bitrate, d.height)?;
        let change = Arc::clone(&self.quality)
            .set_quality(d.bitrate, d.height)
            .await?;
        self.broadcast
            .note_video_quality(change.bitrate, change.width, change.height);
        // The new settings start clean from a keyframe (a live encoder; a simulated unit
        // switches at its next group anyway).
        self.request_keyframes();
        Ok(change.summary)
    }

    fn request_keyframes(&self) -> bool {
        let mut asked = false;
        for t in &self.broadcast.tracks {
            if t.info.kind() == TrackKind::Video {
                asked |= self.broadcast.request_keyframe(t.info.id);
            }
        }
        asked
    }

    fn keyframe(&self) -> String {
        if self.request_keyframes() {
            "keyframe requested".into()
        } else {
            "no encoder to ask: the next group starts with a keyframe".into()
        }
    }

    fn live(&self, live: bool) -> String {
        let was = self.broadcast.set_live(live);
        match (was, live) {
            (true, true) => "already live".into(),
            (false, false) => "already off live".into(),
            (false, true) => "live again: media goes to the hub from the next keyframe".into(),
            (true, false) => {
                "off live: no media goes to the hub (control and telemetry carry on)".into()
            }
        }
    }

    async fn snapshot(&self, d: &Directive) -> Result<String, DirectiveError> {
        let frames = self
            .broadcast
            .track(TrackKind::Video)
            .map(|t| t.picture())
            .unwrap_or_default();
        let name = format!("{}.jpg", crate::file_name_for(&d.id));
        let dir = self.dir.join(SNAPSHOTS_DIR);
        let path = dir.join(&name);
        let written = path.clone();
        let picture = tokio::task::spawn_blocking(move || {
            let picture = crate::snapshot::jpeg_from_h264(&frames)?;
            std::fs::create_dir_all(&dir)
                .map_err(|e| DirectiveError::io(format!("creating {}", dir.display()), e))?;
            write_file(&written, &picture.jpeg)?;
            Ok::<_, DirectiveError>(picture)
        })
        .await
        .map_err(|e| DirectiveError::Media(format!("the snapshot task failed: {e}")))??;
        Ok(format!(
            "{SNAPSHOTS_DIR}/{name}: {}x{}, {} bytes",
            picture.width,
            picture.height,
            picture.jpeg.len()
        ))
    }

    fn mark(&self, d: &Directive) -> Result<String, DirectiveError> {
        let (action, label) = parse_mark(&d.text)?;
        let line = serde_json::json!({
            "id": d.id,
            "action": action,
            "label": label,
            "device_time_us": crate::unix_now_us(),
        });
        append_line(&self.dir.join(MARKS_FILE), &line)?;
        Ok(format!("mark {action} {label:?} in {MARKS_FILE}"))
    }

    fn message(&self, d: &Directive) -> Result<(), DirectiveError> {
        if d.text.trim().is_empty() {
            return Err(DirectiveError::Refused("no text to show".into()));
        }
        info!(
            directive = %d.id, issued_by = %d.issued_by, court = %d.court, text = %d.text,
            "instruction from the command centre"
        );
        let line = serde_json::json!({
            "id": d.id,
            "text": d.text,
            "issued_by": d.issued_by,
            "court": d.court,
            "issued_at_us": d.issued_at_us,
            "shown_at_us": crate::unix_now_us(),
        });
        append_line(&self.dir.join(INSTRUCTIONS_FILE), &line)
    }
}

/// The lower-case name used in FAILED reasons and logs.
pub fn kind_label(kind: DirectiveKind) -> &'static str {
    match kind {
        DirectiveKind::Unspecified => "unspecified",
        DirectiveKind::GoLive => "go_live",
        DirectiveKind::StopLive => "stop_live",
        DirectiveKind::Quality => "quality",
        DirectiveKind::Keyframe => "keyframe",
        DirectiveKind::Snapshot => "snapshot",
        DirectiveKind::Mark => "mark",
        DirectiveKind::Message => "message",
    }
}

/// A QUALITY target within the agent's limits (height 0 keeps the picture size).
pub fn validate_quality(bitrate: u32, height: u32) -> Result<(), DirectiveError> {
    if !BITRATE_KBPS.contains(&bitrate) {
        return Err(DirectiveError::Refused(format!(
            "bitrate {bitrate} kbit/s is outside {}..={}",
            BITRATE_KBPS.start(),
            BITRATE_KBPS.end()
        )));
    }
    if height != 0 && !HEIGHT_PX.contains(&height) {
        return Err(DirectiveError::Refused(format!(
            "height {height} px is outside {}..={} (0 keeps it)",
            HEIGHT_PX.start(),
            HEIGHT_PX.end()
        )));
    }
    Ok(())
}

/// MARK text: `start <label>` or `stop <label>`.
pub fn parse_mark(text: &str) -> Result<(&'static str, &str), DirectiveError> {
    let text = text.trim();
    let (action, label) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    let action = match action {
        "start" => "start",
        "stop" => "stop",
        _ => {
            return Err(DirectiveError::Refused(format!(
                "expected \"start <label>\" or \"stop <label>\", got {text:?}"
            )));
        }
    };
    let label = label.trim();
    if label.is_empty() {
        return Err(DirectiveError::Refused(format!("{action} without a label")));
    }
    Ok((action, label))
}

/// Appends one JSON line, synced: marks and instructions are evidence of what was asked.
fn append_line(path: &Path, value: &serde_json::Value) -> Result<(), DirectiveError> {
    let mut line = value.to_string();
    line.push('\n');
    let append = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        file.write_all(line.as_bytes())?;
        file.sync_data()
    };
    append().map_err(|e| DirectiveError::io(format!("appending to {}", path.display()), e))
}

/// Writes a whole file under its name only once complete (temporary file, then rename).
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), DirectiveError> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| DirectiveError::io(format!("writing {}", path.display()), e))
}

/// Directives queued for the worker; more waiting than this are refused (FAILED).
const QUEUED_DIRECTIVES: usize = 64;
/// Acks waiting for a session; past this the newest are dropped (a hub that resends a
/// directive gets its state again).
const QUEUED_ACKS: usize = 256;

/// The uplink's side of the executor: lives as long as the unit, across sessions.
pub struct Directives {
    executor: Arc<Executor>,
    work: mpsc::Sender<Directive>,
    acks_tx: mpsc::Sender<Ack>,
    acks: tokio::sync::Mutex<mpsc::Receiver<Ack>>,
}

impl Directives {
    /// Starts the worker that runs directives one at a time, in arrival order (on the
    /// current tokio runtime). It ends when this handle is dropped.
    pub fn start(executor: Executor) -> Arc<Self> {
        let executor = Arc::new(executor);
        let (work, mut queue) = mpsc::channel::<Directive>(QUEUED_DIRECTIVES);
        let (acks_tx, acks) = mpsc::channel(QUEUED_ACKS);
        let worker = Arc::clone(&executor);
        let out = acks_tx.clone();
        tokio::spawn(async move {
            while let Some(d) = queue.recv().await {
                for ack in worker.execute(&d).await {
                    send_ack(&out, ack);
                }
            }
        });
        Arc::new(Self {
            executor,
            work,
            acks_tx,
            acks: tokio::sync::Mutex::new(acks),
        })
    }

    pub fn executor(&self) -> &Arc<Executor> {
        &self.executor
    }

    /// A directive arrived: its receipt is answered at once, a new one queued to run.
    /// The receipt's record is a small synced append on the caller's thread: directives
    /// are rare, and it must be on disk before the worker acts.
    pub fn submit(&self, d: Directive) {
        let receipt = self.executor.receive(&d);
        send_ack(&self.acks_tx, receipt.ack);
        if !receipt.execute {
            return;
        }
        let id = d.id.clone();
        if self.work.try_send(d).is_err() {
            let ack = self.executor.record(
                &id,
                State::Failed,
                false,
                "the agent is busy: too many directives waiting".into(),
            );
            send_ack(&self.acks_tx, ack);
        }
    }

    /// The Acks to send, in order; a session holds this for as long as it is up.
    pub fn acks(&self) -> &tokio::sync::Mutex<mpsc::Receiver<Ack>> {
        &self.acks
    }
}

fn send_ack(tx: &mpsc::Sender<Ack>, ack: Ack) {
    if let Err(e) = tx.try_send(ack) {
        warn!(error = %e, "directive report dropped: too many waiting for the hub");
    }
}

#[cfg(test)]
#[path = "directives_tests.rs"]
mod tests;
