//! The recorder: every online unit is recorded, whoever watches. One task per unit drains
//! its tracks (through deep subscriptions that never skip for lag) into the sans-IO
//! segmenter and writes what comes out: files under a temporary name, synced, renamed, then
//! an index row that links to the unit's previous one and is signed.
//!
//! A gap in a unit's recording (offline, a lost segment, a restart) becomes an explicit,
//! signed gap record in its chain. A write that fails (disk full) loses that segment, is
//! counted, logged and audited; recording goes on and resumes when writes succeed again.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use tianwang_core::Track;
use tianwang_core::segmenter::{Init, Output, Segment, Segmenter, SegmenterConfig, VideoCodec};
use tianwang_proto::v1::{TrackInfo, TrackKind};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, warn};

use super::audit::{Audit, unix_us};
use super::index::{GENESIS, Index, SegmentRow};
use super::keys::{Signer, sha256_hex};
use crate::metrics::Metrics;
use crate::registry::{Broadcast, Units};

/// Frames a recorder may have queued per track before the relay evicts (at 30 fps and
/// 50 Opus packets a second, over a minute of media).
const QUEUE_FRAMES: usize = 4096;
/// A jump in capture time longer than this between segments is a gap in the recording.
const GAP_TOLERANCE_US: i64 = 100_000;

#[derive(Clone, Debug)]
pub struct RecorderConfig {
    pub dir: PathBuf,
    pub target: Duration,
    pub court: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Index(#[from] super::index::IndexError),
    #[error(transparent)]
    Segmenter(#[from] tianwang_core::segmenter::SegmenterError),
}

/// What every unit recorder shares.
pub struct Shared {
    pub config: RecorderConfig,
    pub index: Index,
    pub signer: Arc<Signer>,
    pub audit: Audit,
    pub metrics: Arc<Metrics>,
}

/// Media recorded besides the units' own: the official's side of a remote video link (the
/// console's camera and microphone), in a chain of its own named `<unit>~official` (`~`
/// never occurs in a unit id), bound to the unit's case like the unit's own recording.
pub struct Extra {
    pub chain: String,
    /// The unit whose active operation binds the segments.
    pub unit: String,
    /// Who is on camera, kept in each row's officer field.
    pub by: String,
    pub video: (TrackInfo, Arc<Track>),
    pub audio: Option<(TrackInfo, Arc<Track>)>,
}

/// The chain the official's side of a link with `unit` is recorded in.
pub fn official_chain(unit: &str) -> String {
    format!("{unit}~official")
}

/// Where extra recordings are handed to the recorder; without one (recording off) they
/// are refused.
#[derive(Clone)]
pub struct Extras {
    tx: mpsc::Sender<Extra>,
    rx: Arc<std::sync::Mutex<Option<mpsc::Receiver<Extra>>>>,
}

impl std::fmt::Debug for Extras {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extras").finish_non_exhaustive()
    }
}

impl Default for Extras {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(16);
        Self {
            tx,
            rx: Arc::new(std::sync::Mutex::new(Some(rx))),
        }
    }
}

impl Extras {
    /// Hands a recording to the recorder; false when no recorder runs.
    pub fn record(&self, extra: Extra) -> bool {
        // Not taken: no recorder runs, nothing would drain the queue.
        if self.rx.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            return false;
        }
        self.tx.try_send(extra).is_ok()
    }

    /// The recorder's end, once.
    fn take(&self) -> Option<mpsc::Receiver<Extra>> {
        self.rx.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// What one recorder task records.
struct Source {
    /// The chain's name (a unit id, or an extra's chain).
    chain: String,
    /// The unit whose operation binds the rows.
    bind: String,
    tracks: Vec<(TrackInfo, Arc<Track>)>,
    /// A unit's backfill tracks (its spool's groups), by kind.
    backfill: Vec<(TrackKind, Arc<Track>)>,
    officer: Officer,
}

enum Officer {
    /// The unit's live publisher says.
    Unit(Arc<Broadcast>),
    Fixed(String),
}

impl Source {
    fn unit(b: Arc<Broadcast>) -> Self {
        Self {
            chain: b.unit_id.clone(),
            bind: b.unit_id.clone(),
            tracks: b
                .tracks()
                .iter()
                .map(|e| (e.info.clone(), Arc::clone(&e.track)))
                .collect(),
            backfill: b
                .tracks()
                .iter()
                .map(|e| (e.info.kind(), Arc::clone(&e.backfill)))
                .collect(),
            officer: Officer::Unit(b),
        }
    }

    fn extra(e: Extra) -> Self {
        Self {
            chain: e.chain,
            bind: e.unit,
            tracks: std::iter::once(e.video).chain(e.audio).collect(),
            backfill: Vec::new(),
            officer: Officer::Fixed(e.by),
        }
    }

    fn officer(&self) -> Option<String> {
        match &self.officer {
            Officer::Unit(b) => b.officer(),
            Officer::Fixed(by) => Some(by.clone()),
        }
    }
}

/// Records every unit that comes online, and the extras handed over, until `stop`; then
/// finishes the open segments.
pub async fn run(shared: Arc<Shared>, units: Arc<Units>, extras: Extras, stop: CancellationToken) {
    let mut changes = units.changes();
    // Unit → its recorder's stop token. A recorder told to stop stays here until its task
    // has written its last segment, so a unit that comes back meanwhile never gets a second
    // recorder appending to the same chain: the finishing one's end starts the next.
    let mut running: HashMap<String, CancellationToken> = HashMap::new();
    let mut ids: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut extras = extras.take();
    // Extras waiting for the previous recording of their chain to finish.
    let mut waiting: HashMap<String, Extra> = HashMap::new();
    // Units online before the recorder started.
    for b in units.list().into_iter().filter(|b| b.is_online()) {
        start(&shared, &mut running, &mut ids, &mut tasks, b);
    }
    loop {
        tokio::select! {
            change = changes.recv() => match change {
                Ok(c) if c.online => {
                    if !running.contains_key(&c.unit_id)
                        && let Some(b) = units.get(&c.unit_id)
                    {
                        start(&shared, &mut running, &mut ids, &mut tasks, b);
                    }
                }
                Ok(c) => {
                    if let Some(token) = running.get(&c.unit_id) {
                        token.cancel();
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Missed events: stop recorders of units that left, start the others.
                    for (unit, token) in &running {
                        if !units.get(unit).is_some_and(|b| b.is_online()) {
                            token.cancel();
                        }
                    }
                    for b in units.list().into_iter().filter(|b| b.is_online()) {
                        if !running.contains_key(&b.unit_id) {
                            start(&shared, &mut running, &mut ids, &mut tasks, b);
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            Some(extra) = next_extra(&mut extras) => {
                if let Some(token) = running.get(&extra.chain) {
                    // One recording per chain at a time: the one before ends first.
                    token.cancel();
                    waiting.insert(extra.chain.clone(), extra);
                } else {
                    spawn(&shared, &mut running, &mut ids, &mut tasks, Source::extra(extra));
                }
            }
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let id = match &done {
                    Ok((id, _)) => *id,
                    Err(e) => {
                        error!(error = %e, "a recorder task failed");
                        e.id()
                    }
                };
                if let Some(unit) = ids.remove(&id) {
                    running.remove(&unit);
                    if let Some(extra) = waiting.remove(&unit) {
                        spawn(&shared, &mut running, &mut ids, &mut tasks, Source::extra(extra));
                        continue;
                    }
                    units.release_if_idle(&unit);
                    // Online again (or still): record it on.
                    if let Some(b) = units.get(&unit).filter(|b| b.is_online()) {
                        start(&shared, &mut running, &mut ids, &mut tasks, b);
                    }
                }
            }
            _ = stop.cancelled() => break,
        }
    }
    for token in running.values() {
        token.cancel();
    }
    while tasks.join_next().await.is_some() {}
}

async fn next_extra(extras: &mut Option<mpsc::Receiver<Extra>>) -> Option<Extra> {
    match extras {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn start(
    shared: &Arc<Shared>,
    running: &mut HashMap<String, CancellationToken>,
    ids: &mut HashMap<tokio::task::Id, String>,
    tasks: &mut JoinSet<()>,
    broadcast: Arc<Broadcast>,
) {
    spawn(shared, running, ids, tasks, Source::unit(broadcast));
}

fn spawn(
    shared: &Arc<Shared>,
    running: &mut HashMap<String, CancellationToken>,
    ids: &mut HashMap<tokio::task::Id, String>,
    tasks: &mut JoinSet<()>,
    source: Source,
) {
    let token = CancellationToken::new();
    let unit = source.chain.clone();
    running.insert(unit.clone(), token.clone());
    let span = tracing::info_span!("recorder", unit = %unit);
    let shared = Arc::clone(shared);
    let handle = tasks.spawn(
        async move {
            shared.metrics.recordings_active.inc();
            // Counted down however the task ends.
            let _active = scopeguard(&shared.metrics.recordings_active);
            record(&shared, source, token).await;
        }
        .instrument(span),
    );
    ids.insert(handle.id(), unit);
}

/// Decrements a gauge when dropped.
fn scopeguard(gauge: &prometheus::IntGauge) -> impl Drop + '_ {
    struct Dec<'a>(&'a prometheus::IntGauge);
    impl Drop for Dec<'_> {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    Dec(gauge)
}

/// The chain of one unit, as this recorder extends it.
struct Chain {
    unit: String,
    /// The unit whose active operation binds the rows (the chain's own, or a link's unit).
    bind: String,
    seq: i64,
    prev: String,
    /// End (capture time) of the last media segment, for gap detection.
    last_end_us: Option<i64>,
    recording: String,
    failing: bool,
    /// The current recording's init segment, and whether the next media segment must begin
    /// a new recording with it: after a lost segment, so that every recording plays
    /// without a hole in its media time.
    init: Option<Init>,
    restart_recording: bool,
    /// The officer last seen with the unit (its final segment is written after it left).
    officer: Option<String>,
    /// Writing backfill: rows join the chain but not its live timeline (no gap rows, the
    /// live end unchanged). `other` holds the other mode's recording state.
    backfill: bool,
    other: (String, Option<Init>, bool),
}

impl Chain {
    /// Switches between the live recording and the backfill one.
    fn set_backfill(&mut self, on: bool) {
        if self.backfill != on {
            self.backfill = on;
            let live = (
                std::mem::take(&mut self.recording),
                self.init.take(),
                self.restart_recording,
            );
            let (recording, init, restart) = std::mem::replace(&mut self.other, live);
            self.recording = recording;
            self.init = init;
            self.restart_recording = restart;
        }
    }
}

/// A backfill gap-filler: frames from the spool's groups, put back in capture order across
/// tracks (groups arrive a track at a time) and recorded window by window, each window a
/// recording of its own.
struct Backfill {
    pending: std::collections::BTreeMap<(u64, u8, u64), (bool, tianwang_core::Frame)>,
    n: u64,
    newest_video: u64,
    newest_audio: u64,
    has_audio: bool,
    segmenter: Option<Segmenter>,
    /// What closed windows left to write.
    done: Vec<Output>,
    /// The frames handed to the segmenters, for truthful confirmations.
    runs: Runs,
    config: SegmenterConfig,
    last_video_us: Option<u64>,
    last_frame: Option<tokio::time::Instant>,
}

/// Backfill frames wait this long for the other track's before a window is closed.
const BACKFILL_IDLE: Duration = Duration::from_secs(1);
/// Groups of a backfill arrive a few at a time, not quite in order: frames are held until
/// both tracks are this far past them.
const BACKFILL_HOLD_US: u64 = 3_000_000;
/// A jump in backfilled capture time longer than this begins another window.
const BACKFILL_JUMP_US: u64 = 1_000_000;

impl Backfill {
    fn push(&mut self, video: bool, f: tianwang_core::Frame) {
        if video {
            self.newest_video = self.newest_video.max(f.timestamp_us);
        } else {
            self.newest_audio = self.newest_audio.max(f.timestamp_us);
        }
        self.n += 1;
        self.pending
            .insert((f.timestamp_us, u8::from(!video), self.n), (video, f));
        self.last_frame = Some(tokio::time::Instant::now());
    }

    /// Hands the segmenter what is ready (all of it with `all`), and closes the window
    /// at a jump or, with `all`, at its end.
    fn release(&mut self, all: bool) {
        let limit = if all {
            u64::MAX
        } else if self.has_audio {
            self.newest_video
                .min(self.newest_audio)
                .saturating_sub(BACKFILL_HOLD_US)
        } else {
            self.newest_video.saturating_sub(BACKFILL_HOLD_US)
        };
        while let Some(entry) = self.pending.first_entry() {
            if entry.key().0 > limit {
                break;
            }
            let (video, f) = entry.remove();
            if video {
                let jump = self
                    .last_video_us
                    .is_some_and(|l| f.timestamp_us < l || f.timestamp_us > l + BACKFILL_JUMP_US);
                if jump {
                    self.close();
                }
                self.last_video_us = Some(f.timestamp_us);
                self.runs.add(true, f.timestamp_us, f.duration_us);
                let seg = self
                    .segmenter
                    .get_or_insert_with(|| Segmenter::new(self.config));
                if let Err(e) =
                    seg.push_video(f.payload(), f.timestamp_us, f.duration_us, f.is_keyframe())
                {
                    error!(error = %e, "segmenting backfilled video");
                }
            } else if let Some(seg) = self.segmenter.as_mut() {
                self.runs.add(false, f.timestamp_us, f.duration_us);
                seg.push_audio(
                    f.data.slice(f.payload_offset as usize..),
                    f.timestamp_us,
                    f.duration_us,
                );
            }
        }
        if all {
            self.close();
            self.last_frame = None;
        }
    }

    /// Ends the window under way: its last segment goes out, and the next window (a
    /// jump either way in capture time) starts a recording of its own, so media time
    /// always follows capture time.
    fn close(&mut self) {
        if let Some(mut seg) = self.segmenter.take() {
            if let Err(e) = seg.flush() {
                error!(error = %e, "closing a backfilled segment");
            }
            while let Some(o) = seg.poll() {
                self.done.push(o);
            }
        }
        self.last_video_us = None;
    }

    fn outputs(&mut self) -> Vec<Output> {
        let mut out = std::mem::take(&mut self.done);
        if let Some(seg) = self.segmenter.as_mut() {
            while let Some(o) = seg.poll() {
                out.push(o);
            }
        }
        out
    }

    fn idle_deadline(&self) -> Option<tokio::time::Instant> {
        self.last_frame.map(|t| t + BACKFILL_IDLE)
    }
}

async fn record(shared: &Shared, source: Source, stop: CancellationToken) {
    let unit = source.chain.clone();
    let base = unit.strip_suffix("~official").unwrap_or(&unit);
    if !crate::session::valid_unit_id(base) {
        // Publishers are refused such ids; this is a second line against path tricks.
        error!("a unit id unfit for a path: not recording");
        stop.cancelled().await;
        return;
    }
    let tracks = &source.tracks;
    let video = tracks
        .iter()
        .find(|(info, _)| info.kind() == TrackKind::Video);
    let Some(video) = video else {
        // Wait for the unit to go: returning would have the recorder start this one again.
        warn!("no video track: not recording");
        stop.cancelled().await;
        return;
    };
    let (video_info, video_track) = video;
    let codec = if video_info.codec.is_empty() {
        Some(VideoCodec::H264)
    } else {
        VideoCodec::from_name(&video_info.codec)
    };
    let Some(codec) = codec else {
        warn!(codec = %video_info.codec, "a video codec the recorder cannot write: not recording");
        stop.cancelled().await;
        return;
    };
    let audio = tracks
        .iter()
        .find(|(info, _)| info.kind() == TrackKind::Audio);
    let mut video_sub = video_track.subscribe_with(QUEUE_FRAMES, u64::MAX);
    let mut audio_sub = audio.map(|(_, t)| t.subscribe_with(QUEUE_FRAMES, u64::MAX));
    let config = SegmenterConfig {
        target_us: shared.config.target.as_micros() as u64,
        width: video_info.width.min(u32::from(u16::MAX)) as u16,
        height: video_info.height.min(u32::from(u16::MAX)) as u16,
        audio: audio.is_some(),
        video: codec,
    };
    let mut segmenter = Segmenter::new(config);
    let back_track = |kind| {
        source
            .backfill
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, t)| t.subscribe_with(QUEUE_FRAMES, u64::MAX))
    };
    let mut back_video = back_track(TrackKind::Video);
    let mut back_audio = back_track(TrackKind::Audio).filter(|_| audio.is_some());
    let mut backfill = Backfill {
        pending: Default::default(),
        n: 0,
        newest_video: 0,
        newest_audio: 0,
        has_audio: back_audio.is_some(),
        segmenter: None,
        done: Vec::new(),
        runs: Runs::default(),
        config,
        last_video_us: None,
        last_frame: None,
    };
    let chain_end = shared.index.chain_end(&unit).await;
    let mut chain = match (shared.index.last_segment(&unit).await, chain_end) {
        (Ok(last), Ok(end)) => Chain {
            unit: unit.clone(),
            bind: source.bind.clone(),
            seq: last.as_ref().map(|r| r.seq).unwrap_or(0),
            prev: last
                .as_ref()
                .map(|r| r.sha256.clone())
                .unwrap_or_else(|| GENESIS.into()),
            last_end_us: end,
            recording: String::new(),
            failing: false,
            init: None,
            restart_recording: false,
            officer: None,
            backfill: false,
            other: (String::new(), None, false),
        },
        (Err(e), _) | (_, Err(e)) => {
            // Returning restarts this recorder: not faster than once a second.
            error!(error = %e, "reading the unit's chain: not recording yet");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.cancelled() => {}
            }
            return;
        }
    };
    let mut live_runs = Runs::default();
    info!("recording");
    loop {
        tokio::select! {
            frame = video_sub.next() => match frame {
                Some(f) => {
                    live_runs.add(true, f.timestamp_us, f.duration_us);
                    if let Err(e) = segmenter.push_video(f.payload(), f.timestamp_us, f.duration_us, f.is_keyframe()) {
                        error!(error = %e, "segmenting video");
                    }
                }
                None => break,
            },
            frame = next_audio(&mut audio_sub) => match frame {
                Some(f) => {
                    live_runs.add(false, f.timestamp_us, f.duration_us);
                    segmenter.push_audio(f.data.slice(f.payload_offset as usize..), f.timestamp_us, f.duration_us);
                }
                None => audio_sub = None,
            },
            frame = next_audio(&mut back_video) => match frame {
                Some(f) => {
                    backfill.push(true, f);
                    backfill.release(false);
                }
                None => back_video = None,
            },
            frame = next_audio(&mut back_audio) => match frame {
                Some(f) => {
                    backfill.push(false, f);
                    backfill.release(false);
                }
                None => back_audio = None,
            },
            _ = sleep_until(backfill.idle_deadline()) => backfill.release(true),
            _ = stop.cancelled() => break,
        }
        while let Some(out) = segmenter.poll() {
            if let Some((from, to)) = write(shared, &source, &mut chain, out).await {
                confirm(&source, live_runs.take(from, to));
            }
        }
        write_backfill(shared, &source, &mut chain, &mut backfill).await;
    }
    // Backfill taken in is recorded before the end.
    backfill.release(true);
    write_backfill(shared, &source, &mut chain, &mut backfill).await;
    // What is queued was received: record it, in capture order, before closing.
    let mut rest: Vec<(bool, tianwang_core::Frame)> = Vec::new();
    while let Some(Some(f)) = video_sub.next().now_or_never() {
        rest.push((true, f));
    }
    if let Some(a) = audio_sub.as_mut() {
        while let Some(Some(f)) = a.next().now_or_never() {
            rest.push((false, f));
        }
    }
    rest.sort_by_key(|(_, f)| f.timestamp_us);
    for (is_video, f) in rest {
        live_runs.add(is_video, f.timestamp_us, f.duration_us);
        if is_video {
            if let Err(e) =
                segmenter.push_video(f.payload(), f.timestamp_us, f.duration_us, f.is_keyframe())
            {
                error!(error = %e, "segmenting video");
            }
        } else {
            segmenter.push_audio(
                f.data.slice(f.payload_offset as usize..),
                f.timestamp_us,
                f.duration_us,
            );
        }
        while let Some(out) = segmenter.poll() {
            if let Some((from, to)) = write(shared, &source, &mut chain, out).await {
                confirm(&source, live_runs.take(from, to));
            }
        }
    }
    // Finish the segment under way.
    if let Err(e) = segmenter.flush() {
        error!(error = %e, "closing the last segment");
    }
    while let Some(out) = segmenter.poll() {
        if let Some((from, to)) = write(shared, &source, &mut chain, out).await {
            confirm(&source, live_runs.take(from, to));
        }
    }
    // The chain's head goes into the audit trail, so cutting rows off the end of a chain
    // (which no link would reveal) shows in `hub verify`.
    shared.audit.record(
        "hub",
        "chain.head",
        &chain.unit,
        serde_json::json!({ "seq": chain.seq, "sha256": chain.prev }),
    );
    info!("recording stopped");
}

/// Writes what backfill has ready, as backfill rows, confirming what was written.
async fn write_backfill(
    shared: &Shared,
    source: &Source,
    chain: &mut Chain,
    backfill: &mut Backfill,
) {
    let back = backfill.outputs();
    if back.is_empty() {
        return;
    }
    chain.set_backfill(true);
    for out in back {
        if let Some((from, to)) = write(shared, source, chain, out).await {
            confirm(source, backfill.runs.take(from, to));
        }
    }
    chain.set_backfill(false);
}

/// Tells the unit which capture times of each track its recording now holds, so its
/// spool may let them go: only where every frame came (a group whose tail was lost, or
/// skipped on a slow link, is not confirmed and comes again as backfill).
fn confirm(source: &Source, (video, audio): (Windows, Windows)) {
    if let Officer::Unit(b) = &source.officer {
        crate::backfill::confirm(b, "video", &video);
        crate::backfill::confirm(b, "audio", &audio);
    }
}

/// Capture-time windows, [from, to) µs.
type Windows = Vec<(u64, u64)>;

/// Runs of frames without a missing one between them, per track: what the recorder really
/// got, as opposed to the span a segment covers.
#[derive(Default)]
struct Runs {
    video: Vec<(u64, u64)>,
    audio: Vec<(u64, u64)>,
}

impl Runs {
    fn add(&mut self, video: bool, ts: u64, duration: u32) {
        let runs = if video {
            &mut self.video
        } else {
            &mut self.audio
        };
        let end = ts + u64::from(duration.max(1));
        // A frame that starts within half a frame of the run's end continues it.
        let slack = u64::from(duration / 2) + 5_000;
        match runs.last_mut() {
            Some(last) if ts <= last.1 + slack && ts + slack >= last.0 => last.1 = last.1.max(end),
            _ => runs.push((ts, end)),
        }
        // Bounded: a run list only grows with holes, and old ones are taken.
        if runs.len() > 4096 {
            runs.remove(0);
        }
    }

    /// Each track's runs within [from, to) (a written segment; audio up to its end too,
    /// as the segment holds the packets before its cut), forgetting what ends before it
    /// among the runs that came before the segment's last. Runs that came after it are
    /// kept whatever their time: after a step back of the capture clock, frames of the
    /// next recording come before this segment is written, an hour earlier.
    fn take(&mut self, from: u64, to: u64) -> (Windows, Windows) {
        fn take_from(runs: &mut Vec<(u64, u64)>, from: u64, to: u64) -> Windows {
            let within = |&(s, e): &(u64, u64)| e > from && s < to;
            let out = runs
                .iter()
                .filter(|r| within(r))
                .map(|(s, e)| ((*s).max(from), (*e).min(to)))
                .collect();
            if let Some(last) = runs.iter().rposition(within) {
                let mut i = 0;
                runs.retain(|(_, e)| {
                    i += 1;
                    i > last + 1 || *e > to
                });
            }
            out
        }
        (
            take_from(&mut self.video, from, to),
            take_from(&mut self.audio, from, to),
        )
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn next_audio(sub: &mut Option<tianwang_core::Subscription>) -> Option<tianwang_core::Frame> {
    match sub {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Writes one output; for a media segment written, returns its capture-time range.
async fn write(
    shared: &Shared,
    source: &Source,
    chain: &mut Chain,
    out: Output,
) -> Option<(u64, u64)> {
    let range = match &out {
        Output::Segment(s) => Some((s.start_us, s.end_us)),
        Output::Init(_) => None,
    };
    let result = match out {
        Output::Init(init) => write_init(shared, source, chain, init).await,
        Output::Segment(segment) => write_segment(shared, source, chain, segment).await,
    };
    let written = result.is_ok();
    match result {
        Ok(()) if chain.failing => {
            chain.failing = false;
            info!("recording resumed");
            shared.audit.record(
                "hub",
                "recording.resumed",
                &chain.unit,
                serde_json::json!({}),
            );
        }
        Ok(()) => {}
        Err(e) => {
            chain.restart_recording = true;
            // The row may have been written though the index reported an error (a lost
            // connection after COMMIT): continue from what the index holds.
            if matches!(e, RecordError::Index(_))
                && let Ok(last) = shared.index.last_segment(&chain.unit).await
            {
                chain.seq = last.as_ref().map(|r| r.seq).unwrap_or(0);
                chain.prev = last
                    .as_ref()
                    .map(|r| r.sha256.clone())
                    .unwrap_or_else(|| GENESIS.into());
                if !chain.backfill {
                    chain.last_end_us = last.as_ref().map(|r| r.end_us).or(chain.last_end_us);
                }
            }
            shared.metrics.recording_errors.inc();
            error!(error = %e, "a segment could not be recorded");
            if !chain.failing {
                chain.failing = true;
                shared.audit.record(
                    "hub",
                    "recording.failed",
                    &chain.unit,
                    serde_json::json!({ "error": e.to_string() }),
                );
            }
        }
    }
    if written { range } else { None }
}

fn recording_id(start_us: u64) -> String {
    format!("r{start_us}-{:04x}", rand::random::<u16>())
}

async fn write_init(
    shared: &Shared,
    source: &Source,
    chain: &mut Chain,
    init: Init,
) -> Result<(), RecordError> {
    chain.init = Some(init.clone());
    chain.restart_recording = false;
    chain.recording = recording_id(init.start_us);
    let rel = format!("{}/{}/init.mp4", chain.unit, chain.recording);
    let sha = write_file(&shared.config.dir, &rel, vec![init.data.clone()]).await?;
    let start = init.start_us as i64;
    if !chain.backfill {
        gap_if_any(shared, source, chain, start).await?;
    }
    append(
        shared,
        source,
        chain,
        SegmentRow {
            kind: "init".into(),
            number: 0,
            path: rel,
            codecs: init.codecs,
            start_us: start,
            end_us: start,
            bytes: init.data.len() as i64,
            sha256: sha,
            ..row(chain)
        },
    )
    .await
}

async fn write_segment(
    shared: &Shared,
    source: &Source,
    chain: &mut Chain,
    segment: Segment,
) -> Result<(), RecordError> {
    if chain.restart_recording
        && let Some(init) = chain.init.clone()
    {
        let init = Init {
            start_us: segment.start_us,
            ..init
        };
        write_init(shared, source, chain, init).await?;
    }
    let rel = format!(
        "{}/{}/{:06}.m4s",
        chain.unit, chain.recording, segment.sequence
    );
    let bytes = segment.bytes as i64;
    let sha = write_file(&shared.config.dir, &rel, segment.chunks).await?;
    let start = segment.start_us as i64;
    if !chain.backfill {
        gap_if_any(shared, source, chain, start).await?;
    }
    append(
        shared,
        source,
        chain,
        SegmentRow {
            kind: "media".into(),
            number: i64::from(segment.sequence),
            path: rel,
            start_us: start,
            end_us: segment.end_us as i64,
            media_start: segment.media_start as i64,
            media_duration: segment.media_duration as i64,
            bytes,
            sha256: sha,
            ..row(chain)
        },
    )
    .await?;
    shared.metrics.recorded_segments.inc();
    shared.metrics.recorded_bytes.inc_by(segment.bytes);
    if chain.backfill {
        shared.metrics.backfill_segments.inc();
    } else {
        chain.last_end_us = Some(segment.end_us as i64);
        let lag = (unix_us() - segment.end_us as i64).max(0) as f64 / 1e6;
        shared.metrics.recording_lag.observe(lag);
    }
    Ok(())
}

/// An empty row of the chain's current recording (the caller fills it in).
fn row(chain: &Chain) -> SegmentRow {
    SegmentRow::new(&chain.unit, &chain.recording)
}

/// Records the time between the last media segment and `start_us`, when it is a gap.
async fn gap_if_any(
    shared: &Shared,
    source: &Source,
    chain: &mut Chain,
    start_us: i64,
) -> Result<(), RecordError> {
    let Some(end) = chain.last_end_us else {
        return Ok(());
    };
    if start_us - end <= GAP_TOLERANCE_US {
        return Ok(());
    }
    let description = serde_json::json!(["gap", chain.unit, end, start_us]).to_string();
    append(
        shared,
        source,
        chain,
        SegmentRow {
            kind: "gap".into(),
            start_us: end,
            end_us: start_us,
            sha256: sha256_hex(description.as_bytes()),
            ..row(chain)
        },
    )
    .await?;
    chain.last_end_us = Some(start_us);
    Ok(())
}

/// Links, binds, signs and indexes a row; advances the chain.
async fn append(
    shared: &Shared,
    source: &Source,
    chain: &mut Chain,
    mut r: SegmentRow,
) -> Result<(), RecordError> {
    r.seq = chain.seq + 1;
    r.prev_sha256 = chain.prev.clone();
    // Bound by the hub's clock, not the device's: a device clock hours off must neither
    // unbind an operation's evidence nor expose it to early deletion.
    r.recorded_us = unix_us();
    if let Some((case, op)) = shared
        .index
        .active_operation(&chain.bind, r.recorded_us)
        .await?
    {
        r.case_number = Some(case);
        r.operation_id = Some(op);
    }
    if let Some(o) = source.officer() {
        chain.officer = Some(o);
    }
    r.officer = chain.officer.clone();
    r.court = shared.config.court.clone();
    r.signature = shared.signer.sign_hex(&r.signed_bytes());
    shared.index.insert_segment(&r).await?;
    chain.seq = r.seq;
    chain.prev = r.sha256;
    Ok(())
}

/// Writes a file under a temporary name, syncs it, renames it into place and syncs the
/// directory; returns its SHA-256. On error nothing is left at the final name.
async fn write_file(root: &Path, rel: &str, chunks: Vec<Bytes>) -> Result<String, RecordError> {
    let root = root.to_path_buf();
    let rel = rel.to_string();
    let path = root.join(&rel);
    let err_path = path.display().to_string();
    tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let dir = path.parent().unwrap_or(&root).to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let tmp = path.with_extension("tmp");
        let result = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            for c in &chunks {
                file.write_all(c)?;
                ctx.update(c);
            }
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&dir)?.sync_all()?;
            Ok(hex::encode(ctx.finish().as_ref()))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    })
    .await
    .map_err(|e| RecordError::Io {
        path: err_path.clone(),
        source: std::io::Error::other(e),
    })?
    .map_err(|source| RecordError::Io {
        path: err_path,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_a_later_recording_survive_a_step_back_of_the_capture_clock() {
        const HOUR: u64 = 3_600_000_000;
        let t0 = 10 * HOUR;
        let mut runs = Runs::default();
        // 30 frames, then the clock steps back an hour and 30 more arrive before the
        // first segment is written.
        for i in 0..30 {
            runs.add(true, t0 + i * 33_333, 33_333);
        }
        for i in 0..30 {
            runs.add(true, t0 - HOUR + i * 33_333, 33_333);
        }
        let end = t0 + 30 * 33_333;
        assert_eq!(runs.take(t0, end).0, vec![(t0, end)]);
        // The next recording's segment finds its frames, all of them.
        let back = t0 - HOUR;
        assert_eq!(
            runs.take(back, back + 30 * 33_333).0,
            vec![(back, back + 30 * 33_333)]
        );
        assert!(runs.video.is_empty());
    }

    #[test]
    fn a_segment_forgets_the_runs_before_it() {
        let mut runs = Runs::default();
        runs.add(true, 0, 33_333);
        // A hole, then a run the segment covers.
        for i in 10..20 {
            runs.add(true, i * 33_333, 33_333);
        }
        let (video, _) = runs.take(10 * 33_333, 20 * 33_333);
        assert_eq!(video, vec![(333_330, 666_660)]);
        assert!(runs.video.is_empty());
    }
}
