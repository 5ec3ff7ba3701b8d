//! Talkback: the command centre speaks to the officer (push-to-talk), and the device keeps
//! what was heard.
//!
//! The hub announces a talk with `Talkback{on}` on the control stream, then opens one
//! unidirectional group stream per group of the talk's track: Opus packets of 20 ms, each
//! stamped with the hub's wall clock when it arrived from the console. [`Talkback`] is one
//! session's side of it: it reads those streams, runs one [`player::Player`] per talk (an
//! Ogg Opus file in `<data-dir>/talkback/`, and the speaker unless disabled), and at the end
//! of each talk appends a [`TalkRecord`] with the hub → device delay to
//! `<data-dir>/talkback.jsonl`.
//!
//! A remote video link is a talk with a picture: `Talkback{on}` names a second track
//! (`video_track_id`) and, once the hub knows it, its codec (`video_codec`, sent again for
//! the talk that is on); that track's frames go to a [`screen::Screen`] (a Matroska file
//! beside the talk's audio, and the display unless disabled), and the talk's record gets
//! the picture's figures.
//!
//! Bad input costs the talk or the stream, never the session: a stream for no talk is
//! stopped, a frame too large for Opus stops its stream, a codec other than Opus is
//! refused, a failing pipeline ends its talk. Every such case is counted in
//! [`TalkbackStats`].

pub mod player;
pub mod screen;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tianwang_proto::v1;
use tianwang_proto::wire::WireFrame;
use tianwang_transport::{GroupReader, STREAM_PROTOCOL, STREAM_SHUTDOWN};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use player::{AudioFormat, Player, Pushed};
use screen::Screen;
use tianwang_core::codec::{VideoCodec, vp8_keyframe_size};

/// Where talks land in the data dir.
pub const TALKBACK_DIR: &str = "talkback";
pub const TALKBACK_LOG: &str = "talkback.jsonl";

/// The largest frame accepted on a talkback stream: an Opus packet is at most 1275 bytes.
pub const MAX_FRAME: usize = 2048;
/// The largest frame of a video link's picture.
pub const MAX_VIDEO_FRAME: usize = 4 << 20;
/// Picture frames held while the link's codec is not yet known (a group's worth).
const PENDING_VIDEO: usize = 600;
/// Longest talk id accepted: it becomes a file name (escaped, at most three times longer).
pub const MAX_TALK_ID_BYTES: usize = 64;
/// How long a group stream may take to send its header.
const HEADER_WAIT: Duration = Duration::from_secs(5);
/// Streams and control messages travel separately: a group stream may arrive just before
/// the `Talkback{on}` that names its track. It waits this long for one.
pub const TALK_WAIT: Duration = Duration::from_millis(500);
/// After `Talkback{off}`, frames still on their way are played for this long.
const OFF_GRACE: Duration = Duration::from_millis(300);
/// Frames waiting for a talk's player; a full queue holds the streams back (QUIC flow
/// control), it never grows.
const QUEUED_FRAMES: usize = 256;
/// At most this many delays are kept per talk for its percentiles (an hour of 20 ms
/// packets); later frames are still counted.
const MAX_DELAY_SAMPLES: usize = 180_000;
/// A session's end waits this long for its talks' files to be finished.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TalkbackError {
    /// The hub asked for something this agent does not do.
    #[error("{0}")]
    Refused(String),
    /// The GStreamer pipeline failed.
    #[error("{0}")]
    Media(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl TalkbackError {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        TalkbackError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Counters of a unit's talkback, across sessions; for logs and tests.
#[derive(Debug, Default)]
pub struct TalkbackStats {
    /// Talks whose player started.
    pub talks: AtomicU64,
    /// `Talkback{on}` refused: not Opus, or parameters out of range.
    pub talks_refused: AtomicU64,
    /// Talks ended by a media or file error.
    pub talks_failed: AtomicU64,
    /// Frames handed to a player.
    pub frames: AtomicU64,
    /// Frames of a group two or more behind the newest: too late, dropped.
    pub frames_late: AtomicU64,
    /// Frames too far ahead of the speaker (a burst after a stall), dropped.
    pub frames_dropped: AtomicU64,
    /// Group streams read for a talk.
    pub streams: AtomicU64,
    /// Group streams for a track no talk is on: stopped (STREAM_PROTOCOL).
    pub streams_refused: AtomicU64,
    /// Group streams that broke the framing (an oversized frame, garbage, no header in
    /// time): stopped.
    pub streams_bad: AtomicU64,
    /// A video link's picture frames handed to its screen.
    pub video_frames: AtomicU64,
    /// Picture frames of a group older than the newest, or before the first keyframe:
    /// dropped (they would not decode).
    pub video_frames_late: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Where talks are kept, and whether they are played.
#[derive(Clone, Debug)]
pub struct TalkbackConfig {
    pub data_dir: PathBuf,
    /// Play to the device's speaker (`run`, unless `--no-speaker`); otherwise files only.
    pub speaker: bool,
}

/// One finished talk, as appended to `talkback.jsonl`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TalkRecord {
    pub talk_id: String,
    pub by: String,
    pub frames: u64,
    /// Device wall clock (µs since the Unix epoch) at the first and last frame's arrival.
    pub first_frame_us: Option<u64>,
    pub last_frame_us: Option<u64>,
    /// Device clock minus the hub's timestamp, over the talk's frames.
    pub delay_p50_ms: Option<f64>,
    pub delay_p95_ms: Option<f64>,
    /// The Ogg Opus file, relative to the data dir; none when no frame came.
    pub file: Option<String>,
    /// Why the talk ended early, if it did.
    pub error: Option<String>,
    /// A video link's picture: its codec, frames shown, the Matroska file (relative to
    /// the data dir) and the hub → device delay of its frames.
    #[serde(default)]
    pub video_codec: Option<String>,
    #[serde(default)]
    pub video_frames: u64,
    #[serde(default)]
    pub video_file: Option<String>,
    #[serde(default)]
    pub video_delay_p50_ms: Option<f64>,
    #[serde(default)]
    pub video_delay_p95_ms: Option<f64>,
}

/// A talk as the hub announced it, validated.
#[derive(Clone, Debug)]
struct TalkSpec {
    id: String,
    by: String,
    track_id: u32,
    format: AudioFormat,
    /// A video link: the picture's track, and its codec once the hub says.
    video_track_id: Option<u32>,
    video_codec: Option<VideoCodec>,
}

/// Checks a `Talkback{on}`.
fn validate(t: &v1::Talkback) -> Result<TalkSpec, TalkbackError> {
    let refuse = |m: String| Err(TalkbackError::Refused(m));
    if t.talk_id.is_empty()
        || t.talk_id.len() > MAX_TALK_ID_BYTES
        || t.talk_id.chars().any(char::is_control)
    {
        return refuse(format!(
            "talk id missing, longer than {MAX_TALK_ID_BYTES} bytes or not printable"
        ));
    }
    if !t.codec.eq_ignore_ascii_case("opus") {
        return refuse(format!(
            "codec {:?} is not supported (opus only)",
            printable(&t.codec)
        ));
    }
    if ![8_000, 12_000, 16_000, 24_000, 48_000].contains(&t.sample_rate) {
        return refuse(format!("{} Hz is not an Opus rate", t.sample_rate));
    }
    if !(1..=2).contains(&t.channels) {
        return refuse(format!("{} channels (1 or 2)", t.channels));
    }
    let video_track_id = (t.video_track_id != 0).then_some(t.video_track_id);
    if video_track_id == Some(t.track_id) {
        return refuse("the picture and the sound on one track".into());
    }
    let video_codec = match t.video_codec.as_str() {
        "" => None,
        name => match VideoCodec::from_name(name) {
            Some(c) if video_track_id.is_some() => Some(c),
            Some(_) => return refuse("a video codec without a video track".into()),
            None => {
                return refuse(format!(
                    "video codec {:?} is not supported (h264, vp8)",
                    printable(name)
                ));
            }
        },
    };
    Ok(TalkSpec {
        id: t.talk_id.clone(),
        by: printable(&t.by),
        track_id: t.track_id,
        format: AudioFormat {
            sample_rate: t.sample_rate,
            channels: t.channels,
        },
        video_track_id,
        video_codec,
    })
}

/// A name from the network made fit for one log line: control characters replaced, at
/// most 128 characters.
fn printable(s: &str) -> String {
    s.chars()
        .take(128)
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect()
}

/// A frame as read from a talk's stream.
struct Incoming {
    group: u64,
    frame: WireFrame,
    /// Device wall clock when it was read, µs since the Unix epoch.
    arrived_us: u64,
}

/// Where a talk's streams deliver: the talk on for a track (and its picture's track).
#[derive(Clone)]
struct Route {
    track_id: u32,
    talk_id: Arc<str>,
    frames: mpsc::Sender<Incoming>,
    video: Option<(u32, mpsc::Sender<Incoming>)>,
}

impl Route {
    /// The talk's queue for `track`, and whether it is the picture.
    fn queue(&self, track: u32) -> Option<(&mpsc::Sender<Incoming>, bool)> {
        if track == self.track_id {
            return Some((&self.frames, false));
        }
        match &self.video {
            Some((id, q)) if *id == track => Some((q, true)),
            _ => None,
        }
    }
}

/// The talk that is on.
struct Current {
    id: String,
    end: CancellationToken,
    /// A video link's codec, once the hub has said.
    video_codec: Option<watch::Sender<Option<VideoCodec>>>,
}

/// One session's talkback: the talk that is on and its streams. Dropping it ends the talk
/// (its file is finished either way); [`Talkback::close`] also waits for that.
pub struct Talkback {
    config: TalkbackConfig,
    stats: Arc<TalkbackStats>,
    current: Option<Current>,
    /// Talk tasks, the current one and ended ones still finishing their files.
    talks: JoinSet<()>,
    route: watch::Sender<Option<Route>>,
    readers: JoinSet<()>,
}

impl Talkback {
    pub fn new(config: TalkbackConfig, stats: Arc<TalkbackStats>) -> Self {
        Self {
            config,
            stats,
            current: None,
            talks: JoinSet::new(),
            route: watch::Sender::new(None),
            readers: JoinSet::new(),
        }
    }

    /// A `Talkback` control message from the hub.
    pub fn control(&mut self, t: v1::Talkback) {
        while self.talks.try_join_next().is_some() {}
        if !t.on {
            match &self.current {
                Some(c) if c.id == t.talk_id => self.end_current(),
                _ => {
                    debug!(talk = %printable(&t.talk_id), "talkback off for a talk not on: ignored")
                }
            }
            return;
        }
        let spec = match validate(&t) {
            Ok(spec) => spec,
            Err(e) => {
                bump(&self.stats.talks_refused);
                warn!(talk = %printable(&t.talk_id), by = %printable(&t.by), error = %e, "talkback refused");
                return;
            }
        };
        if let Some(c) = self.current.as_ref().filter(|c| c.id == spec.id) {
            // The talk that is on: the hub may now name its picture's codec.
            match (&c.video_codec, spec.video_codec) {
                (Some(known), Some(codec)) => {
                    known.send_if_modified(|k| k.is_none() && k.replace(codec).is_none());
                }
                _ => debug!(talk = %spec.id, "talkback on again for the talk that is on: ignored"),
            }
            return;
        }
        // One talk at a time: a new one ends the one before (its file is finished).
        self.end_current();
        let (tx, rx) = mpsc::channel(QUEUED_FRAMES);
        let video = spec.video_track_id.map(|id| {
            let (vtx, vrx) = mpsc::channel(QUEUED_FRAMES);
            let (codec_tx, codec_rx) = watch::channel(spec.video_codec);
            ((id, vtx), (vrx, codec_rx), codec_tx)
        });
        let (video_route, video_in, codec_tx) = match video {
            Some((route, input, codec)) => (Some(route), Some(input), Some(codec)),
            None => (None, None, None),
        };
        let end = CancellationToken::new();
        self.route.send_replace(Some(Route {
            track_id: spec.track_id,
            talk_id: spec.id.as_str().into(),
            frames: tx,
            video: video_route,
        }));
        self.current = Some(Current {
            id: spec.id.clone(),
            end: end.clone(),
            video_codec: codec_tx,
        });
        // The session's span (the unit) follows the talk into its tasks and threads.
        self.talks.spawn(
            run_talk(
                spec,
                self.config.clone(),
                Arc::clone(&self.stats),
                rx,
                video_in,
                end,
            )
            .instrument(tracing::Span::current()),
        );
    }

    fn end_current(&mut self) {
        self.route.send_replace(None);
        if let Some(c) = self.current.take() {
            c.end.cancel();
        }
    }

    /// A unidirectional stream the hub opened: a group of the talk's track.
    pub fn accept(&mut self, recv: quinn::RecvStream) {
        while self.readers.try_join_next().is_some() {}
        self.readers.spawn(
            read_stream(recv, self.route.subscribe(), Arc::clone(&self.stats))
                .instrument(tracing::Span::current()),
        );
    }

    /// The session is over: ends the talk and waits (bounded) until its file is finished.
    pub async fn close(mut self) {
        self.end_current();
        self.readers.shutdown().await;
        let talks = &mut self.talks;
        let finished = tokio::time::timeout(CLOSE_WAIT, async {
            while talks.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            warn!("talkback files still finishing as the session ends");
        }
    }
}

impl Drop for Talkback {
    fn drop(&mut self) {
        self.end_current();
    }
}

/// Reads one group stream into the talk on for its track.
async fn read_stream(
    recv: quinn::RecvStream,
    mut route: watch::Receiver<Option<Route>>,
    stats: Arc<TalkbackStats>,
) {
    let (header, mut reader) =
        match tokio::time::timeout(HEADER_WAIT, GroupReader::open(recv, MAX_VIDEO_FRAME)).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => {
                bump(&stats.streams_bad);
                debug!(error = %e, "talkback stream without a group header");
                return;
            }
            Err(_) => {
                bump(&stats.streams_bad);
                debug!("talkback stream sent no group header in time");
                return;
            }
        };
    let track = header.track_id;
    let wanted = |r: &Option<Route>| r.as_ref().is_some_and(|r| r.queue(track).is_some());
    // The watch's guard is released within this statement: the session loop writes it.
    let Some(talk) = tokio::time::timeout(TALK_WAIT, route.wait_for(wanted))
        .await
        .ok()
        .and_then(|r| r.ok())
        .and_then(|r| (*r).clone())
    else {
        bump(&stats.streams_refused);
        debug!(
            track,
            group = header.sequence,
            "group stream for no talk: stopped"
        );
        reader.stop(STREAM_PROTOCOL);
        return;
    };
    drop(route);
    let Some((queue, picture)) = talk.queue(track) else {
        return;
    };
    bump(&stats.streams);
    loop {
        match reader.next_frame().await {
            Ok(Some(frame)) if !picture && frame.encoded.len() > MAX_FRAME + 32 => {
                bump(&stats.streams_bad);
                debug!(talk = %talk.talk_id, bytes = frame.encoded.len(), "a talkback frame too large for Opus");
                reader.stop(STREAM_PROTOCOL);
                return;
            }
            Ok(Some(frame)) => {
                let incoming = Incoming {
                    group: header.sequence,
                    frame,
                    arrived_us: crate::unix_now_us(),
                };
                if queue.send(incoming).await.is_err() {
                    // The talk is over: the rest of this group is not wanted.
                    reader.stop(STREAM_SHUTDOWN);
                    return;
                }
            }
            Ok(None) => return,
            Err(e) if e.is_reset() => return,
            Err(e) => {
                bump(&stats.streams_bad);
                debug!(talk = %talk.talk_id, group = header.sequence, error = %e, "talkback stream ended");
                reader.stop(STREAM_PROTOCOL);
                return;
            }
        }
    }
}

/// A video link's picture as the talk task receives it: frames, and the codec once known.
type VideoIn = (
    mpsc::Receiver<Incoming>,
    watch::Receiver<Option<VideoCodec>>,
);

/// One talk, from its `on` to its end: the player fed from the talk's streams, and a video
/// link's screen from its picture's.
async fn run_talk(
    spec: TalkSpec,
    config: TalkbackConfig,
    stats: Arc<TalkbackStats>,
    mut frames: mpsc::Receiver<Incoming>,
    video: Option<VideoIn>,
    end: CancellationToken,
) {
    let span = tracing::Span::current();
    let in_span = span.clone();
    let started = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || in_span.in_scope(|| Talk::start(spec, &config, stats)))
            .await
    };
    let Ok(mut talk) = started else {
        return;
    };
    let (mut pictures, mut codec) = match video {
        Some((p, c)) => (Some(p), Some(c)),
        None => (None, None),
    };
    // Frames already on their way when the talk is ended still belong to it.
    let over = async {
        end.cancelled().await;
        tokio::time::sleep(OFF_GRACE).await;
    };
    tokio::pin!(over);
    if talk.is_playing() {
        loop {
            tokio::select! {
                biased;
                _ = &mut over => break,
                f = frames.recv() => match f {
                    Some(f) => if !talk.frame(f) { break },
                    None => break,
                },
                f = next_picture(&mut pictures) => match f {
                    Some(f) => {
                        let known = codec.as_ref().and_then(|c| *c.borrow());
                        talk.picture(f, known, &config, &span).await;
                    }
                    None => pictures = None,
                },
                changed = codec_changed(&mut codec) => {
                    if changed {
                        let known = codec.as_ref().and_then(|c| *c.borrow());
                        talk.picture_codec(known, &config, &span).await;
                    } else {
                        codec = None;
                    }
                }
            }
        }
    }
    // Streams of this talk still open are stopped from here on.
    drop(frames);
    drop(pictures);
    let _ = tokio::task::spawn_blocking(move || span.in_scope(|| talk.end())).await;
}

async fn next_picture(p: &mut Option<mpsc::Receiver<Incoming>>) -> Option<Incoming> {
    match p {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// True when the codec changed; false once the sender is gone.
async fn codec_changed(c: &mut Option<watch::Receiver<Option<VideoCodec>>>) -> bool {
    match c {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// A video link's picture on the device.
struct Picture {
    screen: Option<Screen>,
    codec: Option<VideoCodec>,
    /// The Matroska file, relative to the data dir, once opened.
    file: Option<String>,
    frames: u64,
    delays_us: Vec<i64>,
    newest_group: Option<u64>,
    /// Frames held while the codec is unknown (the newest group's only).
    pending: Vec<Incoming>,
    /// The screen could not be opened, or failed: the rest of the picture is dropped.
    failed: bool,
}

impl Picture {
    fn new() -> Self {
        Self {
            screen: None,
            codec: None,
            file: None,
            frames: 0,
            delays_us: Vec::new(),
            newest_group: None,
            pending: Vec::new(),
            failed: false,
        }
    }
}

/// A talk's state: its player, what it received, and how late.
struct Talk {
    spec: TalkSpec,
    data_dir: PathBuf,
    /// The file, relative to the data dir.
    file: String,
    player: Option<Player>,
    stats: Arc<TalkbackStats>,
    frames: u64,
    first_us: Option<u64>,
    last_us: Option<u64>,
    delays_us: Vec<i64>,
    newest_group: Option<u64>,
    error: Option<String>,
    ended: bool,
    picture: Picture,
}

impl Talk {
    /// Opens the talk's file and player. Blocking. A failure is kept and ends the talk.
    fn start(spec: TalkSpec, config: &TalkbackConfig, stats: Arc<TalkbackStats>) -> Talk {
        match talk_file(&config.data_dir, &spec.id, "ogg") {
            Ok((file, path)) => {
                let player = Player::start(&path, spec.format, config.speaker);
                Talk::opened(spec, &config.data_dir, file, player, stats)
            }
            Err(e) => Talk::opened(spec, &config.data_dir, String::new(), Err(e), stats),
        }
    }

    /// A talk with its player (or the reason it has none); `file` is relative to
    /// `data_dir`.
    fn opened(
        spec: TalkSpec,
        data_dir: &Path,
        file: String,
        player: Result<Player, TalkbackError>,
        stats: Arc<TalkbackStats>,
    ) -> Talk {
        let mut talk = Talk {
            spec,
            data_dir: data_dir.to_path_buf(),
            file,
            player: None,
            stats,
            frames: 0,
            first_us: None,
            last_us: None,
            delays_us: Vec::new(),
            newest_group: None,
            error: None,
            ended: false,
            picture: Picture::new(),
        };
        match player {
            Ok(player) => {
                bump(&talk.stats.talks);
                info!(
                    talk = %talk.spec.id, by = %talk.spec.by, track = talk.spec.track_id,
                    file = %talk.file, speaker = player.has_speaker(),
                    "talkback {} from {} started", talk.spec.id, talk.spec.by
                );
                talk.player = Some(player);
            }
            Err(e) => talk.fail(e),
        }
        talk
    }

    fn is_playing(&self) -> bool {
        self.player.is_some()
    }

    /// Keeps the first error: the one that ended the talk.
    fn fail(&mut self, e: TalkbackError) {
        if self.error.is_some() {
            debug!(talk = %self.spec.id, error = %e, "talkback: a further error");
            return;
        }
        bump(&self.stats.talks_failed);
        warn!(talk = %self.spec.id, error = %e, "talkback {} failed; the talk ends", self.spec.id);
        self.error = Some(e.to_string());
    }

    /// Plays one frame; false once the talk has failed.
    fn frame(&mut self, f: Incoming) -> bool {
        let Some(player) = self.player.as_mut() else {
            return false;
        };
        // Groups are read concurrently, so the previous one may still finish while the
        // next begins; anything older is stale.
        let newest = self.newest_group.get_or_insert(f.group);
        if f.group.saturating_add(1) < *newest {
            bump(&self.stats.frames_late);
            return true;
        }
        *newest = (*newest).max(f.group);
        let duration = match f.frame.header.duration_us {
            // 2.5 to 120 ms are Opus packet durations; anything else is taken as 20 ms.
            d @ 2_500..=120_000 => Duration::from_micros(u64::from(d)),
            _ => Duration::from_millis(20),
        };
        let payload = f.frame.encoded.slice(f.frame.payload_offset..);
        match player.push(payload, f.frame.header.timestamp_us, duration) {
            Ok(Pushed::Queued) => {}
            Ok(Pushed::Dropped) => {
                bump(&self.stats.frames_dropped);
                return true;
            }
            Err(e) => {
                self.fail(e);
                return false;
            }
        }
        bump(&self.stats.frames);
        self.frames += 1;
        self.first_us.get_or_insert(f.arrived_us);
        self.last_us = Some(f.arrived_us);
        if self.delays_us.len() < MAX_DELAY_SAMPLES {
            let delay = i128::from(f.arrived_us) - i128::from(f.frame.header.timestamp_us);
            self.delays_us
                .push(delay.clamp(i64::MIN.into(), i64::MAX.into()) as i64);
        }
        true
    }

    /// The hub named the picture's codec: frames held for it go to the screen.
    async fn picture_codec(
        &mut self,
        codec: Option<VideoCodec>,
        config: &TalkbackConfig,
        span: &tracing::Span,
    ) {
        if self.picture.codec.is_some() || codec.is_none() {
            return;
        }
        self.picture.codec = codec;
        for f in std::mem::take(&mut self.picture.pending) {
            self.show(f, config, span).await;
        }
    }

    /// One frame of the picture: held until the codec is known, then shown.
    async fn picture(
        &mut self,
        f: Incoming,
        codec: Option<VideoCodec>,
        config: &TalkbackConfig,
        span: &tracing::Span,
    ) {
        if self.picture.codec.is_none() && codec.is_some() {
            self.picture_codec(codec, config, span).await;
        }
        if self.picture.codec.is_none() {
            let p = &mut self.picture.pending;
            // Only the newest group is worth keeping: it starts at a keyframe.
            if p.first().is_some_and(|first| first.group < f.group) {
                p.clear();
            }
            if p.len() < PENDING_VIDEO {
                p.push(f);
            } else {
                bump(&self.stats.video_frames_late);
            }
            return;
        }
        self.show(f, config, span).await;
    }

    async fn show(&mut self, f: Incoming, config: &TalkbackConfig, span: &tracing::Span) {
        let Some(codec) = self.picture.codec else {
            return;
        };
        if self.picture.failed {
            return;
        }
        // A picture decodes only from a group's keyframe on, and groups never mix: a
        // frame of a group older than the newest is dropped.
        let payload = f.frame.encoded.slice(f.frame.payload_offset..);
        // The hub begins a group at each keyframe: only a group's first frame is one.
        let keyframe = match self.picture.newest_group {
            Some(g) if f.group < g => {
                bump(&self.stats.video_frames_late);
                return;
            }
            Some(g) if f.group == g => false,
            _ => {
                let keyframe = match codec {
                    VideoCodec::H264 => is_idr(&payload),
                    VideoCodec::Vp8 => vp8_keyframe_size(&payload).is_some(),
                };
                if !keyframe {
                    // A group whose start was lost: nothing of it decodes.
                    bump(&self.stats.video_frames_late);
                    return;
                }
                self.picture.newest_group = Some(f.group);
                true
            }
        };
        if self.picture.screen.is_none() {
            let opened = match talk_file(&self.data_dir, &self.spec.id, "mkv") {
                Ok((file, path)) => {
                    let first = payload.clone();
                    let show = config.speaker;
                    let in_span = span.clone();
                    let started = tokio::task::spawn_blocking(move || {
                        in_span.in_scope(|| Screen::start(&path, codec, &first, show))
                    })
                    .await
                    .unwrap_or_else(|e| Err(TalkbackError::Media(e.to_string())));
                    started.map(|s| (file, s))
                }
                Err(e) => Err(e),
            };
            match opened {
                Ok((file, s)) => {
                    info!(talk = %self.spec.id, codec = codec.name(), file = %file,
                        screen = s.has_screen(), "video link {} from {} shown", self.spec.id, self.spec.by);
                    self.picture.file = Some(file);
                    self.picture.screen = Some(s);
                }
                Err(e) => {
                    self.picture.failed = true;
                    self.fail(e);
                    return;
                }
            }
        }
        let Some(screen) = self.picture.screen.as_mut() else {
            return;
        };
        if let Err(e) = screen.push(
            payload,
            f.frame.header.timestamp_us,
            keyframe,
            f.frame.header.duration_us,
        ) {
            self.picture.failed = true;
            self.fail(e);
            return;
        }
        bump(&self.stats.video_frames);
        self.picture.frames += 1;
        if self.picture.delays_us.len() < MAX_DELAY_SAMPLES {
            let delay = i128::from(f.arrived_us) - i128::from(f.frame.header.timestamp_us);
            self.picture
                .delays_us
                .push(delay.clamp(i64::MIN.into(), i64::MAX.into()) as i64);
        }
    }

    /// Finishes the file, appends the record and logs the figures. Blocking; once.
    fn end(&mut self) -> Option<TalkRecord> {
        if self.ended {
            return None;
        }
        self.ended = true;
        if let Some(player) = self.player.take()
            && let Err(e) = player.finish()
        {
            self.fail(e);
        }
        let mut file = (!self.file.is_empty()).then(|| self.file.clone());
        if self.frames == 0
            && let Some(f) = file.take()
        {
            // Nothing was said: no empty file to mistake for a recording.
            let _ = std::fs::remove_file(self.data_dir.join(f));
        }
        if let Some(screen) = self.picture.screen.take()
            && let Err(e) = screen.finish()
        {
            self.fail(e);
        }
        let video_file = self.picture.file.clone();
        self.delays_us.sort_unstable();
        self.picture.delays_us.sort_unstable();
        let record = TalkRecord {
            talk_id: self.spec.id.clone(),
            by: self.spec.by.clone(),
            frames: self.frames,
            first_frame_us: self.first_us,
            last_frame_us: self.last_us,
            delay_p50_ms: percentile_ms(&self.delays_us, 50),
            delay_p95_ms: percentile_ms(&self.delays_us, 95),
            file,
            error: self.error.clone(),
            video_codec: self.picture.codec.map(|c| c.name().to_string()),
            video_frames: self.picture.frames,
            video_file,
            video_delay_p50_ms: percentile_ms(&self.picture.delays_us, 50),
            video_delay_p95_ms: percentile_ms(&self.picture.delays_us, 95),
        };
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
        info!(
            talk = %record.talk_id, frames = record.frames, file = ?record.file, error = ?record.error,
            "talkback {} from {}: {} frames, hub→device delay p50 {} ms p95 {} ms",
            record.talk_id, record.by, record.frames, ms(record.delay_p50_ms), ms(record.delay_p95_ms)
        );
        if let Err(e) = append_record(&self.data_dir.join(TALKBACK_LOG), &record) {
            warn!(talk = %record.talk_id, error = %e, "talkback record not written");
        }
        Some(record)
    }
}

/// A talk task aborted mid-way (its session dropped, the runtime shutting down) still
/// finishes its file and writes its record.
impl Drop for Talk {
    fn drop(&mut self) {
        self.end();
    }
}

/// Nearest-rank percentile of sorted µs values, in ms.
fn percentile_ms(sorted_us: &[i64], p: usize) -> Option<f64> {
    if sorted_us.is_empty() {
        return None;
    }
    let rank = (p * sorted_us.len()).div_ceil(100).max(1);
    Some(sorted_us[rank - 1] as f64 / 1000.0)
}

/// Whether an Annex B access unit holds an IDR slice.
fn is_idr(au: &[u8]) -> bool {
    au.windows(4)
        .any(|w| w[0] == 0 && w[1] == 0 && w[2] == 1 && w[3] & 0x1f == 5)
}

/// `talkback/<id>.<ext>` under the data dir (the directory made), relative and absolute. A
/// talk id seen before (a talk resumed after a reconnect) gets `<id>~2.<ext>` and so on:
/// what was heard is never overwritten, and `~` never occurs in an escaped id.
fn talk_file(
    data_dir: &Path,
    talk_id: &str,
    ext: &str,
) -> Result<(String, PathBuf), TalkbackError> {
    let dir = data_dir.join(TALKBACK_DIR);
    std::fs::create_dir_all(&dir)
        .map_err(|e| TalkbackError::io(format!("creating {}", dir.display()), e))?;
    let base = crate::file_name_for(talk_id);
    for n in 1..=1000u32 {
        let name = match n {
            1 => format!("{base}.{ext}"),
            n => format!("{base}~{n}.{ext}"),
        };
        let path = dir.join(&name);
        if std::fs::symlink_metadata(&path).is_err() {
            return Ok((format!("{TALKBACK_DIR}/{name}"), path));
        }
    }
    Err(TalkbackError::Refused(format!(
        "talk {talk_id:?} has been started too many times"
    )))
}

/// Appends one JSON line, synced: the record of what the officer was told.
fn append_record(path: &Path, record: &TalkRecord) -> Result<(), TalkbackError> {
    let mut line = serde_json::to_string(record)
        .map_err(|e| TalkbackError::io("encoding a talkback record", e.into()))?;
    line.push('\n');
    let append = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        file.write_all(line.as_bytes())?;
        file.sync_data()
    };
    append().map_err(|e| TalkbackError::io(format!("appending to {}", path.display()), e))
}

#[cfg(test)]
mod tests;
