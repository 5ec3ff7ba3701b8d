//! The device's spool: every encoded group on disk until the hub says its recording has
//! it, so evidence survives a dropped link, a hub that is away and an agent restart.
//!
//! Capture hands each frame over without waiting ([`Spool::frame`]); one writer thread
//! keeps a file per group in `<dir>`, written exactly as a backfill group stream carries it
//! (a `GroupHeader{backfill}`, then the frames as they are on the wire), so sending one is
//! a copy. A group being written is `<start>-<track>-<seq>.part`; once complete (synced) it
//! is `<start>-<end>-<track>-<seq>.grp`; once the hub confirmed it recorded it (`Recorded`)
//! it becomes `.sent`. Space is made by deleting the oldest `.sent` groups; when only
//! undelivered groups fill the spool, new groups are refused, counted and reported to the
//! hub (`Holdings.refused_groups`), never a delivered-looking deletion.
//!
//! On start the folder is read back: a `.part` left by a crash keeps its whole frames and
//! becomes a `.grp`.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tianwang_proto::v1::{GroupHeader, TimeRange, TrackKind};
use tianwang_proto::wire::{self, Progress};
use tracing::{debug, error, info, warn};

/// Frames waiting for the writer; a full queue drops (and counts) rather than stall capture.
const QUEUE: usize = 8192;
/// Audio groups are cut like the live ones: 50 packets (1 s of 20 ms Opus).
const AUDIO_GROUP_FRAMES: u32 = 50;
/// Two confirmed windows of a track closer than this are one: less than a video frame or
/// an audio packet, so a frame the hub lacks always leaves a hole.
const JOIN_US: u64 = 10_000;
/// A new group beginning this far before the newest confirmed capture time means the
/// capture clock stepped back (as the hub's segmenter takes it).
const CLOCK_STEP_US: u64 = 10_000_000;
/// A group sent as backfill is not offered again for this long (its `Recorded` is on the way).
const IN_FLIGHT: Duration = Duration::from_secs(60);
/// The largest frame a spool file may hold (as the hub's default limit).
const MAX_FRAME: usize = wire::DEFAULT_MAX_FRAME;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SpoolError {
    let what = what.into();
    move |source| SpoolError::Io { what, source }
}

/// Counters, for logs, telemetry and tests.
#[derive(Debug, Default)]
pub struct SpoolStats {
    pub groups: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Groups not kept: the spool was full of undelivered data (a device alarm).
    pub refused_groups: AtomicU64,
    /// Frames dropped because the writer fell behind capture.
    pub dropped_frames: AtomicU64,
    pub write_errors: AtomicU64,
    /// Groups the hub confirmed, and delivered groups deleted to make room.
    pub delivered: AtomicU64,
    pub evicted: AtomicU64,
    pub backfill_groups_sent: AtomicU64,
    /// Sound packets from before the first picture, not kept (no recording could hold them).
    pub before_picture: AtomicU64,
}

/// A spooled group: (start µs, track id, sequence).
pub type Key = (u64, u32, u64);

#[derive(Clone, Debug)]
struct Entry {
    end_us: u64,
    bytes: u64,
    delivered: bool,
    /// Capture gaps inside the group (a live source that dropped frames under load): no
    /// frame lies there, so no recording can hold anything there either.
    gaps: Vec<(u64, u64)>,
}

#[derive(Default)]
struct State {
    entries: BTreeMap<Key, Entry>,
    bytes: u64,
    /// What the hub confirmed per track, merged, oldest first.
    recorded: HashMap<u32, Vec<(u64, u64)>>,
    /// The newest end the hub confirmed (since the capture clock last stepped back):
    /// undelivered groups before it were missed live.
    recorded_until: u64,
    refused_unreported: u64,
    /// Refusing: full of undelivered data (warned once per episode).
    full: bool,
    in_flight: HashMap<Key, Instant>,
    next_seq: u64,
    /// Tracks whose frames are pictures (learned from the frames).
    video_tracks: std::collections::HashSet<u32>,
}

struct Msg {
    track: u32,
    kind: TrackKind,
    data: Bytes,
    timestamp_us: u64,
    duration_us: u32,
    keyframe: bool,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    /// Frames for the writer; `None` ends it. No lock on capture's path: `closed` keeps
    /// frames out once the end is sent.
    tx: SyncSender<Option<Msg>>,
    closed: std::sync::atomic::AtomicBool,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub stats: SpoolStats,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn file_name(key: Key, end: Option<u64>, ext: &str) -> String {
    let (start, track, seq) = key;
    match end {
        Some(end) => format!("{start:020}-{end:020}-{track}-{seq}.{ext}"),
        None => format!("{start:020}-{track}-{seq}.{ext}"),
    }
}

/// (key, end, extension) from a spool file's name.
fn parse_name(name: &str) -> Option<(Key, Option<u64>, &str)> {
    let (stem, ext) = name.rsplit_once('.')?;
    let parts: Vec<&str> = stem.split('-').collect();
    match (ext, parts.as_slice()) {
        ("part", [start, track, seq]) => Some((
            (start.parse().ok()?, track.parse().ok()?, seq.parse().ok()?),
            None,
            ext,
        )),
        ("grp" | "sent", [start, end, track, seq]) => Some((
            (start.parse().ok()?, track.parse().ok()?, seq.parse().ok()?),
            Some(end.parse().ok()?),
            ext,
        )),
        _ => None,
    }
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, at most `max_bytes`, and starts its writer.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Arc<Spool>, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let mut state = State::default();
        let listing = std::fs::read_dir(dir).map_err(io(format!("reading {}", dir.display())))?;
        for item in listing.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            let Some((key, end, ext)) = parse_name(&name) else {
                continue;
            };
            let path = item.path();
            let (end, delivered) = match (ext, end) {
                ("part", _) => match recover(&path) {
                    Ok(Some(end)) => {
                        let done = dir.join(file_name(key, Some(end), "grp"));
                        std::fs::rename(&path, &done)
                            .map_err(io(format!("renaming {}", path.display())))?;
                        (end, false)
                    }
                    Ok(None) => {
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    Err(e) => {
                        warn!(file = %path.display(), error = %e, "a spooled group that cannot be read back: kept aside");
                        continue;
                    }
                },
                (ext, Some(end)) => (end, ext == "sent"),
                _ => continue,
            };
            let bytes = std::fs::metadata(dir.join(file_name(
                key,
                Some(end),
                if delivered { "sent" } else { "grp" },
            )))
            .map(|m| m.len())
            .unwrap_or(0);
            state.bytes += bytes;
            state.next_seq = state.next_seq.max(key.2 + 1);
            state.entries.insert(
                key,
                Entry {
                    end_us: end,
                    bytes,
                    delivered,
                    gaps: Vec::new(),
                },
            );
        }
        let undelivered = state.entries.values().filter(|e| !e.delivered).count();
        info!(dir = %dir.display(), groups = state.entries.len(), undelivered, bytes = state.bytes,
            "spool opened");
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let spool = Arc::new(Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            state: Mutex::new(state),
            tx,
            closed: std::sync::atomic::AtomicBool::new(false),
            writer: Mutex::new(None),
            stats: SpoolStats::default(),
        });
        let writer = Arc::clone(&spool);
        let span = tracing::Span::current();
        let handle = std::thread::Builder::new()
            .name("spool".into())
            .spawn(move || span.in_scope(|| writer.write_loop(rx)))
            .map_err(io("starting the spool writer"))?;
        *spool.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(spool)
    }

    /// One encoded frame from capture (its wire encoding, as the live track has it). Never
    /// waits.
    pub fn frame(
        &self,
        track: u32,
        kind: TrackKind,
        data: Bytes,
        timestamp_us: u64,
        duration_us: u32,
        keyframe: bool,
    ) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let msg = Msg {
            track,
            kind,
            data,
            timestamp_us,
            duration_us,
            keyframe,
        };
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Some(msg)) {
            self.stats.dropped_frames.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Ends the writer: groups under way are completed and synced. Blocking.
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            // Behind the frames already queued, so they are written first.
            let _ = self.tx.send(None);
        }
        if let Some(h) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }

    fn write_loop(&self, rx: Receiver<Option<Msg>>) {
        let mut open: HashMap<u32, Open> = HashMap::new();
        // The first picture's capture time: a recording begins with a picture, so sound
        // from before it could never be recorded, never confirmed, and would stay.
        let mut first_picture: Option<u64> = None;
        while let Ok(Some(m)) = rx.recv() {
            if m.kind == TrackKind::Video && first_picture.is_none() && m.keyframe {
                first_picture = Some(m.timestamp_us);
                lock(&self.state).video_tracks.insert(m.track);
            }
            if m.kind == TrackKind::Audio && first_picture.is_none_or(|p| m.timestamp_us < p) {
                self.stats.before_picture.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let starts = match (m.kind, open.get(&m.track)) {
                (TrackKind::Audio, Some(o)) => o.frames >= AUDIO_GROUP_FRAMES,
                (TrackKind::Audio, None) => true,
                (_, _) => m.keyframe,
            };
            if starts {
                if let Some(o) = open.remove(&m.track) {
                    self.finish(o);
                }
                match self.begin(m.track, m.timestamp_us) {
                    Ok(Some(o)) => {
                        open.insert(m.track, o);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                        error!(error = %e, "spool: a group could not be started");
                    }
                }
            }
            // Frames before a track's first group (video before a keyframe), or of a
            // refused group, go nowhere.
            let Some(o) = open.get_mut(&m.track) else {
                continue;
            };
            if let Err(e) = o.file.write_all(&m.data) {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                error!(error = %e, file = %o.path.display(), "spool: writing a frame failed; the group is dropped");
                if let Some(o) = open.remove(&m.track) {
                    let _ = std::fs::remove_file(&o.path);
                }
                continue;
            }
            if o.frames > 0 && m.timestamp_us > o.end_us + JOIN_US {
                o.gaps.push((o.end_us, m.timestamp_us));
            }
            o.frames += 1;
            o.bytes += m.data.len() as u64;
            o.end_us = o
                .end_us
                .max(m.timestamp_us.saturating_add(u64::from(m.duration_us)));
        }
        for (_, o) in open.drain() {
            self.finish(o);
        }
    }

    /// Opens a group's file, after making room; None when the spool is full of
    /// undelivered data (the group is refused).
    fn begin(&self, track: u32, start_us: u64) -> Result<Option<Open>, SpoolError> {
        let seq = {
            let mut s = lock(&self.state);
            self.make_room(&mut s);
            if s.bytes >= self.max_bytes {
                s.refused_unreported += 1;
                self.stats.refused_groups.fetch_add(1, Ordering::Relaxed);
                if !s.full {
                    s.full = true;
                    error!(
                        bytes = s.bytes,
                        max = self.max_bytes,
                        "spool full of evidence the hub has not recorded: new groups are not kept"
                    );
                }
                return Ok(None);
            }
            if s.full {
                s.full = false;
                info!("spool has room again");
            }
            // A group begun well before what the hub already confirmed: the capture clock
            // stepped back. Groups of the new time are not missed ones (the live recording
            // has yet to reach them), so what was confirmed counts from here on.
            if start_us.saturating_add(CLOCK_STEP_US) < s.recorded_until {
                warn!(
                    back_us = s.recorded_until - start_us,
                    "capture clock stepped back"
                );
                s.recorded_until = start_us;
            }
            s.next_seq += 1;
            s.next_seq
        };
        let key = (start_us, track, seq);
        let path = self.dir.join(file_name(key, None, "part"));
        let file =
            std::fs::File::create(&path).map_err(io(format!("creating {}", path.display())))?;
        let mut file = std::io::BufWriter::with_capacity(256 * 1024, file);
        let mut header = BytesMut::new();
        wire::encode_delimited(
            &GroupHeader {
                track_id: track,
                sequence: seq,
                backfill: true,
            },
            &mut header,
        );
        file.write_all(&header)
            .map_err(io(format!("writing {}", path.display())))?;
        Ok(Some(Open {
            key,
            path,
            file,
            frames: 0,
            bytes: header.len() as u64,
            end_us: start_us,
            gaps: Vec::new(),
        }))
    }

    /// Completes a group: synced, renamed with its end, indexed.
    fn finish(&self, o: Open) {
        let Open {
            key,
            path,
            file,
            bytes,
            end_us,
            frames,
            gaps,
        } = o;
        if frames == 0 {
            let _ = std::fs::remove_file(&path);
            return;
        }
        let done = self.dir.join(file_name(key, Some(end_us), "grp"));
        let result = file
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_data())
            .and_then(|()| std::fs::rename(&path, &done));
        if let Err(e) = result {
            self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            error!(error = %e, file = %path.display(), "spool: a group could not be completed");
            let _ = std::fs::remove_file(&path);
            return;
        }
        self.stats.groups.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_written.fetch_add(bytes, Ordering::Relaxed);
        let mut s = lock(&self.state);
        s.bytes += bytes;
        let delivered = s
            .recorded
            .get(&key.1)
            .is_some_and(|r| covered(r, key.0, end_us, &gaps));
        s.entries.insert(
            key,
            Entry {
                end_us,
                bytes,
                delivered: false,
                gaps,
            },
        );
        if delivered {
            self.deliver(&mut s, key);
        }
    }

    /// Deletes delivered groups, oldest first, until there is room for one more.
    fn make_room(&self, s: &mut State) {
        let budget = self.max_bytes.saturating_sub(self.max_bytes / 64);
        if s.bytes < budget {
            return;
        }
        let old: Vec<Key> = s
            .entries
            .iter()
            .filter(|(_, e)| e.delivered)
            .map(|(k, _)| *k)
            .collect();
        for key in old {
            if s.bytes < budget {
                break;
            }
            let Some(e) = s.entries.remove(&key) else {
                continue;
            };
            let path = self.dir.join(file_name(key, Some(e.end_us), "sent"));
            if let Err(err) = std::fs::remove_file(&path) {
                warn!(error = %err, file = %path.display(), "spool: a delivered group could not be deleted");
            }
            s.bytes = s.bytes.saturating_sub(e.bytes);
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn deliver(&self, s: &mut State, key: Key) {
        let Some(e) = s.entries.get_mut(&key) else {
            return;
        };
        if e.delivered {
            return;
        }
        let from = self.dir.join(file_name(key, Some(e.end_us), "grp"));
        let to = self.dir.join(file_name(key, Some(e.end_us), "sent"));
        match std::fs::rename(&from, &to) {
            Ok(()) => {
                e.delivered = true;
                s.in_flight.remove(&key);
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                warn!(error = %err, file = %from.display(), "spool: marking a group delivered failed")
            }
        }
    }

    /// The hub recorded these windows of `tracks` (all of them when empty): the groups
    /// within them are delivered.
    pub fn recorded(&self, ranges: &[TimeRange], tracks: &[u32]) {
        let mut s = lock(&self.state);
        let all: Vec<u32> = if tracks.is_empty() {
            let mut t: Vec<u32> = s.entries.keys().map(|k| k.1).collect();
            t.sort_unstable();
            t.dedup();
            t
        } else {
            tracks.to_vec()
        };
        let oldest = s.entries.keys().next().map(|k| k.0).unwrap_or(u64::MAX);
        for r in ranges {
            if r.to_us <= r.from_us {
                continue;
            }
            s.recorded_until = s.recorded_until.max(r.to_us);
            for t in &all {
                let list = s.recorded.entry(*t).or_default();
                merge(list, (r.from_us, r.to_us));
                // Windows older than the oldest spooled group are of no more use.
                list.retain(|&(_, to)| to + JOIN_US >= oldest);
            }
        }
        let now_covered: Vec<Key> = s
            .entries
            .iter()
            .filter(|(k, e)| {
                !e.delivered
                    && s.recorded
                        .get(&k.1)
                        .is_some_and(|r| covered(r, k.0, e.end_us, &e.gaps))
            })
            .map(|(k, _)| *k)
            .collect();
        for key in now_covered {
            self.deliver(&mut s, key);
        }
    }

    /// What the hub should know the spool holds: undelivered windows (merged), not sent as
    /// backfill lately; with `before`, only what ends before it. Takes the count of refused
    /// groups since the last report.
    pub fn holdings(&self, before: Option<u64>) -> tianwang_proto::v1::Holdings {
        let mut s = lock(&self.state);
        let now = Instant::now();
        s.in_flight
            .retain(|_, at| now.duration_since(*at) < IN_FLIGHT);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (k, e) in &s.entries {
            if e.delivered || s.in_flight.contains_key(k) || before.is_some_and(|b| e.end_us > b) {
                continue;
            }
            merge(&mut ranges, (k.0, e.end_us));
        }
        let refused = std::mem::take(&mut s.refused_unreported);
        tianwang_proto::v1::Holdings {
            ranges: ranges
                .into_iter()
                .map(|(from_us, to_us)| TimeRange { from_us, to_us })
                .collect(),
            spooled_bytes: s.bytes,
            refused_groups: refused,
        }
    }

    /// Whether the hub should hear from the spool: groups it missed, or groups refused
    /// since the last report (the spool is full of unrecorded evidence: an alarm there).
    pub fn has_news(&self) -> bool {
        let s = lock(&self.state);
        s.refused_unreported > 0
            || s.entries.iter().any(|(k, e)| {
                !e.delivered
                    && e.end_us + JOIN_US < s.recorded_until
                    && !s.in_flight.contains_key(k)
            })
    }

    pub fn recorded_until(&self) -> u64 {
        lock(&self.state).recorded_until
    }

    /// The undelivered groups overlapping `ranges` and not already on their way, oldest
    /// first, with their files; marked in flight.
    pub fn take_for_backfill(&self, ranges: &[TimeRange]) -> Vec<(Key, PathBuf)> {
        let mut s = lock(&self.state);
        let now = Instant::now();
        let mut out = Vec::new();
        let keys: Vec<(Key, u64)> = s
            .entries
            .iter()
            .filter(|(k, e)| !e.delivered && !s.in_flight.contains_key(k))
            .map(|(k, e)| (*k, e.end_us))
            .collect();
        for (k, end) in keys {
            if ranges.iter().any(|r| k.0 < r.to_us && end > r.from_us) {
                s.in_flight.insert(k, now);
                out.push((k, self.dir.join(file_name(k, Some(end), "grp"))));
            }
        }
        // Sound is recorded from the first picture of its window on: a group of sound
        // alone (its pictures came live) takes the pictures of its time along, delivered
        // or not while the spool has them, or it could never be confirmed and would be
        // asked for again and again. They are recorded twice, never lost.
        let sound: Vec<(u64, u64)> = out
            .iter()
            .filter(|(k, _)| !s.video_tracks.contains(&k.1))
            .filter_map(|(k, _)| s.entries.get(k).map(|e| (k.0, e.end_us)))
            .collect();
        let pictures: Vec<(Key, u64, bool)> = s
            .entries
            .iter()
            .filter(|(k, _)| s.video_tracks.contains(&k.1) && !s.in_flight.contains_key(k))
            .filter(|(k, e)| sound.iter().any(|&(f, t)| k.0 < t && e.end_us > f))
            .map(|(k, e)| (*k, e.end_us, e.delivered))
            .collect();
        for (k, end, delivered) in pictures {
            let ext = if delivered { "sent" } else { "grp" };
            if !delivered {
                s.in_flight.insert(k, now);
            }
            out.push((k, self.dir.join(file_name(k, Some(end), ext))));
        }
        out.sort_by_key(|(k, _)| *k);
        out
    }

    /// Undelivered groups and bytes in the spool.
    pub fn undelivered(&self) -> (usize, u64) {
        let s = lock(&self.state);
        s.entries
            .values()
            .filter(|e| !e.delivered)
            .fold((0, 0), |(n, b), e| (n + 1, b + e.bytes))
    }

    pub fn bytes(&self) -> u64 {
        lock(&self.state).bytes
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.close();
    }
}

struct Open {
    key: Key,
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    frames: u32,
    bytes: u64,
    end_us: u64,
    gaps: Vec<(u64, u64)>,
}

/// Adds a window to a merged, sorted list.
fn merge(list: &mut Vec<(u64, u64)>, (from, to): (u64, u64)) {
    list.push((from, to));
    list.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(list.len());
    for &(f, t) in list.iter() {
        match out.last_mut() {
            Some(last) if f <= last.1 + JOIN_US => last.1 = last.1.max(t),
            _ => out.push((f, t)),
        }
    }
    *list = out;
}

/// Whether the frames of [from, to) (less its capture `gaps`, sorted) lie within merged
/// windows: each stretch between gaps within one.
fn covered(list: &[(u64, u64)], from: u64, to: u64, gaps: &[(u64, u64)]) -> bool {
    let within = |a: u64, b: u64| {
        list.iter()
            .any(|&(f, t)| a + JOIN_US >= f && b <= t + JOIN_US)
    };
    let mut start = from;
    for &(gap_from, gap_to) in gaps {
        if !within(start, gap_from) {
            return false;
        }
        start = gap_to;
    }
    within(start, to)
}

/// A `.part` left by a crash: its whole frames are kept (a torn last one cut off); returns
/// the end of its last frame, or None when it holds none.
fn recover(path: &Path) -> Result<Option<u64>, SpoolError> {
    let data = std::fs::read(path).map_err(io(format!("reading {}", path.display())))?;
    let mut buf = BytesMut::from(&data[..]);
    let total = buf.len();
    match wire::decode_group_header(&mut buf) {
        Ok(Progress::Done(_)) => {}
        _ => return Ok(None),
    }
    let mut end = None;
    let mut good = total - buf.len();
    while let Ok(Progress::Done(f)) = wire::decode_frame(&mut buf, MAX_FRAME) {
        end = Some(
            f.header
                .timestamp_us
                .saturating_add(u64::from(f.header.duration_us)),
        );
        good = total - buf.len();
    }
    if good < total {
        debug!(file = %path.display(), kept = good, of = total, "spool: a torn group cut to its whole frames");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io(format!("opening {}", path.display())))?;
        file.set_len(good as u64)
            .and_then(|()| file.sync_data())
            .map_err(io(format!("truncating {}", path.display())))?;
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tianwang_proto::v1::FrameHeader;

    fn frame(ts: u64) -> Bytes {
        let header = FrameHeader {
            timestamp_us: ts,
            duration_us: 33_333,
        };
        let payload = vec![7u8; 1000];
        let mut buf = BytesMut::new();
        wire::encode_frame(&header, &payload, &mut buf);
        buf.freeze()
    }

    fn feed(spool: &Spool, from_ms: u64, frames: u64) {
        for i in 0..frames {
            let ts = (from_ms + i * 33) * 1000;
            spool.frame(0, TrackKind::Video, frame(ts), ts, 33_333, i % 30 == 0);
        }
    }

    fn range(from_ms: u64, to_ms: u64) -> TimeRange {
        TimeRange {
            from_us: from_ms * 1000,
            to_us: to_ms * 1000,
        }
    }

    #[test]
    fn groups_are_kept_until_recorded_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spool = Spool::open(dir.path(), 1 << 30).expect("spool");
        feed(&spool, 0, 91); // groups at 0, 990, 1980 ms and one frame of a fourth
        spool.close();
        let h = spool.holdings(None);
        assert_eq!(h.ranges.len(), 1, "{h:?}");
        assert_eq!(h.ranges[0].from_us, 0);
        assert!(h.ranges[0].to_us >= 2_970_000, "{h:?}");
        // The hub recorded the first two seconds: those groups are delivered.
        spool.recorded(&[range(0, 1990)], &[]);
        assert_eq!(spool.stats.delivered.load(Ordering::Relaxed), 2);
        let h = spool.holdings(None);
        assert_eq!(h.ranges.len(), 1);
        assert!(h.ranges[0].from_us >= 1_980_000, "{h:?}");
        drop(spool);
        // Restarted: the same holdings, read back from the files.
        let spool = Spool::open(dir.path(), 1 << 30).expect("reopened");
        assert_eq!(spool.undelivered().0, 2);
        let taken = spool.take_for_backfill(&[range(1900, 4000)]);
        assert_eq!(taken.len(), 2);
        let bytes = std::fs::read(&taken[0].1).expect("a spool file");
        let mut buf = BytesMut::from(&bytes[..]);
        let Ok(Progress::Done(header)) = wire::decode_group_header(&mut buf) else {
            panic!("no group header");
        };
        assert!(header.backfill);
        // In flight: not offered again at once.
        assert!(spool.holdings(None).ranges.is_empty());
    }

    #[test]
    fn after_a_step_back_of_the_capture_clock_new_groups_are_not_taken_for_missed_ones() {
        const HOUR_MS: u64 = 3_600_000;
        let dir = tempfile::tempdir().expect("temp dir");
        let spool = Spool::open(dir.path(), 1 << 30).expect("spool");
        // The hub recorded up to two hours in; then the clock steps back an hour.
        spool.recorded(&[range(2 * HOUR_MS, 2 * HOUR_MS + 2000)], &[]);
        feed(&spool, HOUR_MS, 91);
        spool.close();
        assert!(
            !spool.has_news(),
            "the live recording has yet to reach them"
        );
        // Once the live recording passed a group without it, that one was missed.
        spool.recorded(&[range(HOUR_MS + 990, HOUR_MS + 1980)], &[]);
        assert!(spool.has_news());
        let missed = spool.holdings(Some(spool.recorded_until()));
        // The first group: 30 frames, the last one's end included.
        let first = TimeRange {
            from_us: HOUR_MS * 1000,
            to_us: (HOUR_MS + 957) * 1000 + 33_333,
        };
        assert_eq!(missed.ranges, vec![first]);
    }

    #[test]
    fn sound_before_the_first_picture_is_not_kept_and_sound_alone_brings_its_pictures() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spool = Spool::open(dir.path(), 1 << 30).expect("spool");
        // 200 ms of sound before the camera's first keyframe, then both for 2 s.
        let sound = |from_ms: u64, to_ms: u64| {
            for ms in (from_ms..to_ms).step_by(20) {
                spool.frame(
                    1,
                    TrackKind::Audio,
                    frame(ms * 1000),
                    ms * 1000,
                    20_000,
                    true,
                );
            }
        };
        sound(0, 200);
        for i in 0..60u64 {
            let ts = (200 + i * 33) * 1000;
            spool.frame(0, TrackKind::Video, frame(ts), ts, 33_333, i % 30 == 0);
            sound(200 + i * 33, 200 + (i + 1) * 33);
        }
        spool.close();
        assert_eq!(spool.stats.before_picture.load(Ordering::Relaxed), 10);
        let h = spool.holdings(None);
        assert_eq!(h.ranges[0].from_us, 200_000, "{h:?}");
        // The hub recorded the pictures live but lost a second of sound: asked for it, the
        // spool sends the sound and the pictures of its time (already delivered), so the
        // recording made of them holds the sound from its start.
        spool.recorded(&[range(200, 2200)], &[0]);
        spool.recorded(&[range(200, 1200)], &[1]);
        let taken = spool.take_for_backfill(&[range(1200, 2200)]);
        let tracks: Vec<u32> = taken.iter().map(|(k, _)| k.1).collect();
        assert!(tracks.contains(&1) && tracks.contains(&0), "{taken:?}");
        for (_, path) in &taken {
            assert!(path.exists(), "{}", path.display());
        }
    }

    #[test]
    fn a_group_with_a_capture_gap_is_delivered_by_windows_around_the_gap() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spool = Spool::open(dir.path(), 1 << 30).expect("spool");
        // A live source that dropped two frames under load: 33 ms frames at 0..330 ms and
        // from 429 ms on, one group.
        for i in (0..10u64).chain(13..30) {
            let ts = i * 33_000;
            spool.frame(0, TrackKind::Video, frame(ts), ts, 33_000, i == 0);
        }
        spool.frame(0, TrackKind::Video, frame(990_000), 990_000, 33_000, true);
        spool.close();
        // The hub holds every frame, as two runs with the gap between them.
        spool.recorded(&[range(0, 330), range(429, 990)], &[0]);
        assert_eq!(spool.stats.delivered.load(Ordering::Relaxed), 1);
        // A real hole (a frame missing where one was encoded) is not passed over.
        let dir = tempfile::tempdir().expect("temp dir");
        let spool = Spool::open(dir.path(), 1 << 30).expect("spool");
        feed(&spool, 0, 31);
        spool.close();
        spool.recorded(&[range(0, 330), range(363, 990)], &[0]);
        assert_eq!(spool.stats.delivered.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_torn_group_keeps_its_whole_frames() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut header = BytesMut::new();
        wire::encode_delimited(
            &GroupHeader {
                track_id: 0,
                sequence: 4,
                backfill: true,
            },
            &mut header,
        );
        let mut data = header.to_vec();
        data.extend_from_slice(&frame(1_000_000));
        data.extend_from_slice(&frame(1_033_000));
        data.extend_from_slice(&frame(1_066_000)[..500]);
        std::fs::write(
            dir.path().join(file_name((1_000_000, 0, 4), None, "part")),
            &data,
        )
        .expect("write");
        let spool = Spool::open(dir.path(), 1 << 30).expect("spool");
        let h = spool.holdings(None);
        // Two whole frames: the second ends 33.333 ms after it began.
        assert_eq!(
            h.ranges,
            vec![TimeRange {
                from_us: 1_000_000,
                to_us: 1_066_333
            }]
        );
    }

    #[test]
    fn a_full_spool_refuses_new_groups_and_never_drops_undelivered_ones() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Room for about two groups of 30 frames.
        let spool = Spool::open(dir.path(), 70_000).expect("spool");
        feed(&spool, 0, 150);
        spool.close();
        let (groups, _) = spool.undelivered();
        assert!(groups >= 2, "{groups}");
        let refused = spool.stats.refused_groups.load(Ordering::Relaxed);
        assert!(refused >= 2, "{refused}");
        assert_eq!(spool.stats.evicted.load(Ordering::Relaxed), 0);
        assert_eq!(spool.holdings(None).refused_groups, refused);
        // Reported once.
        assert_eq!(spool.holdings(None).refused_groups, 0);
    }

    #[test]
    fn delivered_groups_make_room_oldest_first() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spool = Spool::open(dir.path(), 70_000).expect("spool");
        feed(&spool, 0, 60);
        // Both groups recorded (the second completes when the third begins).
        std::thread::sleep(Duration::from_millis(200));
        spool.recorded(&[range(0, 100_000)], &[]);
        feed(&spool, 1980, 90);
        spool.close();
        assert_eq!(spool.stats.refused_groups.load(Ordering::Relaxed), 0);
        assert!(spool.stats.evicted.load(Ordering::Relaxed) >= 1);
        assert!(spool.bytes() <= 70_000 + 40_000);
    }
}
