//! Simulated units: one clip is encoded once at start-up, then N virtual units replay it at
//! its own pace, each under its own id and token, with fresh capture timestamps. Nothing is
//! encoded per unit, so hundreds of units fit on a laptop.
//!
//! QUALITY changes a simulated unit for real: it switches, at its next group, to the same
//! clip encoded at the ladder rendition closest to the target. Renditions are encoded only
//! when a directive first asks for one, once, and shared by all units, so start-up costs
//! one encode whatever the number of units.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use tianwang_proto::v1::TrackKind;
use tokio_util::sync::CancellationToken;

use crate::broadcast::LocalBroadcast;
use crate::capture::{EncodeSettings, OPUS_ENCODER, h264_encoder, scaled_size};
use crate::directives::{DirectiveError, QualityChange, QualityControl};

#[derive(Clone, Debug)]
pub struct ClipFrame {
    pub payload: Bytes,
    pub pts_us: u64,
    pub duration_us: u32,
    pub keyframe: bool,
}

/// A pre-encoded clip that loops seamlessly: a whole number of groups.
#[derive(Debug)]
pub struct Clip {
    pub video: Vec<ClipFrame>,
    pub audio: Vec<ClipFrame>,
    pub duration_us: u64,
    pub settings: EncodeSettings,
}

impl Clip {
    pub fn video_bitrate_kbps(&self) -> f64 {
        let bytes: usize = self.video.iter().map(|f| f.payload.len()).sum();
        bytes as f64 * 8.0 / (self.duration_us as f64 / 1e6) / 1000.0
    }
}

fn pull_all(sink: &gst_app::AppSink) -> Vec<ClipFrame> {
    let mut frames = Vec::new();
    while let Ok(sample) = sink.pull_sample() {
        let Some(buffer) = sample.buffer() else {
            continue;
        };
        let Ok(map) = buffer.map_readable() else {
            continue;
        };
        frames.push(ClipFrame {
            payload: Bytes::copy_from_slice(&map),
            pts_us: buffer.pts().map(|p| p.useconds()).unwrap_or(0),
            duration_us: buffer.duration().map(|d| d.useconds() as u32).unwrap_or(0),
            keyframe: !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT),
        });
    }
    frames
}

/// Shifts timestamps so the first frame is at 0 (encoders may offset them, e.g. x264enc
/// starts its output 1000 hours in to keep decode times positive).
fn from_zero(mut frames: Vec<ClipFrame>) -> Vec<ClipFrame> {
    let first = frames.first().map(|f| f.pts_us).unwrap_or(0);
    for f in &mut frames {
        f.pts_us = f.pts_us.saturating_sub(first);
    }
    frames
}

/// Encodes `groups` groups of test pattern (with a running time burned in) and a tone,
/// as fast as the machine can.
pub fn encode_clip(settings: &EncodeSettings, groups: u32) -> anyhow::Result<Clip> {
    gst::init().context("initialising GStreamer")?;
    let frames = settings.keyframe_interval.max(1) * groups.max(1);
    let duration_us = u64::from(frames) * 1_000_000 / u64::from(settings.framerate.max(1));
    let audio_buffers = duration_us / 20_000;
    let description = format!(
        "videotestsrc num-buffers={frames} pattern=smpte \
         ! video/x-raw,width={w},height={h},framerate={fps}/1 \
         ! textoverlay text=\"SIMULATED UNIT\" halignment=left valignment=top font-desc=\"Sans 20\" \
         ! timeoverlay halignment=right valignment=bottom font-desc=\"Sans 16\" \
         ! videoconvert ! {enc} ! appsink name=video sync=false \
         audiotestsrc num-buffers={audio_buffers} samplesperbuffer=960 wave=sine freq=660 volume=0.2 \
         ! audio/x-raw,rate=48000 ! {OPUS_ENCODER} ! appsink name=audio sync=false",
        w = settings.width,
        h = settings.height,
        fps = settings.framerate,
        enc = h264_encoder(settings),
    );
    let pipeline = gst::parse::launch(&description)
        .with_context(|| format!("building the clip pipeline: {description}"))?
        .downcast::<gst::Pipeline>()
        .map_err(|_| anyhow!("the clip launch line is not a pipeline"))?;
    let sink = |name: &str| {
        pipeline
            .by_name(name)
            .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
            .ok_or_else(|| anyhow!("clip pipeline lacks appsink {name}"))
    };
    let (video_sink, audio_sink) = (sink("video")?, sink("audio")?);
    pipeline
        .set_state(gst::State::Playing)
        .context("encoding the clip")?;
    let video = pull_all(&video_sink);
    let audio = pull_all(&audio_sink);
    let failed = pipeline.bus().and_then(|bus| {
        bus.pop_filtered(&[gst::MessageType::Error])
            .map(|m| match m.view() {
                gst::MessageView::Error(e) => e.error().to_string(),
                _ => String::new(),
            })
    });
    let _ = pipeline.set_state(gst::State::Null);
    if let Some(err) = failed {
        bail!("encoding the clip failed: {err}");
    }
    if video.len() != frames as usize || !video.first().is_some_and(|f| f.keyframe) {
        bail!(
            "the clip came out wrong: {} of {frames} frames, first a keyframe: {}",
            video.len(),
            video.first().is_some_and(|f| f.keyframe)
        );
    }
    tracing::debug!(
        video_first_pts_us = video.first().map(|f| f.pts_us),
        audio_first_pts_us = audio.first().map(|f| f.pts_us),
        "clip encoded"
    );
    Ok(Clip {
        video: from_zero(video),
        audio: from_zero(audio),
        duration_us,
        settings: settings.clone(),
    })
}

/// The simulated bitrates, kbit/s; a unit's start-up bitrate is one too.
pub const LADDER_KBPS: [u32; 8] = [150, 300, 600, 1000, 1500, 2500, 4000, 6000];
/// The simulated picture heights below the start-up one (which is the largest, as a
/// camera's).
pub const LADDER_HEIGHTS: [u32; 5] = [144, 240, 360, 480, 720];

/// A rendition, encoded by whoever asks first while the others wait for it.
type RenditionCell = Arc<tokio::sync::OnceCell<Arc<Clip>>>;

/// The clip at every rendition asked for so far, shared by all simulated units.
pub struct Renditions {
    base: Arc<Clip>,
    groups: u32,
    /// (bitrate, height) → the clip, encoded once by whoever asks first.
    encoded: Mutex<HashMap<(u32, u32), RenditionCell>>,
}

impl Renditions {
    /// `base` was encoded with `groups` groups; the others will be too.
    pub fn new(base: Clip, groups: u32) -> Arc<Self> {
        let base = Arc::new(base);
        let key = (base.settings.bitrate, base.settings.height);
        let cell = Arc::new(tokio::sync::OnceCell::new_with(Some(Arc::clone(&base))));
        Arc::new(Self {
            base,
            groups,
            encoded: Mutex::new(HashMap::from([(key, cell)])),
        })
    }

    pub fn base(&self) -> &Arc<Clip> {
        &self.base
    }

    /// How many renditions exist (1 until a QUALITY directive asks for another).
    pub fn encoded(&self) -> usize {
        self.encoded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|c| c.initialized())
            .count()
    }

    /// The ladder rung closest to a target: bitrate by ratio, height by distance (0 keeps
    /// `current_height`), never above the start-up picture.
    pub fn closest(&self, bitrate: u32, height: u32, current_height: u32) -> EncodeSettings {
        let base = &self.base.settings;
        let by_ratio = |r: &u32| ((f64::from(*r)).ln() - f64::from(bitrate.max(1)).ln()).abs();
        let kbps = LADDER_KBPS
            .iter()
            .chain(std::iter::once(&base.bitrate))
            .min_by(|a, b| by_ratio(a).total_cmp(&by_ratio(b)))
            .copied()
            .unwrap_or(base.bitrate);
        let want = if height == 0 { current_height } else { height };
        let h = LADDER_HEIGHTS
            .iter()
            .filter(|h| **h < base.height)
            .chain(std::iter::once(&base.height))
            .min_by_key(|h| h.abs_diff(want))
            .copied()
            .unwrap_or(base.height);
        let ((width, height), _) = scaled_size((base.width, base.height), h);
        EncodeSettings {
            width,
            height,
            bitrate: kbps,
            ..base.clone()
        }
    }

    /// The clip at `settings` (a rung from [`Renditions::closest`]), encoded on first use.
    pub async fn get(&self, settings: &EncodeSettings) -> Result<Arc<Clip>, DirectiveError> {
        let cell = {
            let mut encoded = self.encoded.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(
                encoded
                    .entry((settings.bitrate, settings.height))
                    .or_default(),
            )
        };
        let (settings, groups) = (settings.clone(), self.groups);
        let clip = cell
            .get_or_try_init(|| async move {
                tracing::info!(
                    width = settings.width,
                    height = settings.height,
                    kbps = settings.bitrate,
                    "encoding a rendition of the simulated clip"
                );
                let clip = tokio::task::spawn_blocking(move || encode_clip(&settings, groups))
                    .await
                    .map_err(|e| DirectiveError::Media(format!("rendition encoder: {e}")))?
                    .map_err(|e| DirectiveError::Media(format!("{e:#}")))?;
                Ok::<_, DirectiveError>(Arc::new(clip))
            })
            .await?;
        Ok(Arc::clone(clip))
    }
}

/// One simulated unit's video: the rendition it plays, switched by QUALITY.
pub struct UnitVideo {
    renditions: Arc<Renditions>,
    selected: Mutex<Arc<Clip>>,
}

impl UnitVideo {
    pub fn new(renditions: Arc<Renditions>) -> Arc<Self> {
        let base = Arc::clone(renditions.base());
        Arc::new(Self {
            renditions,
            selected: Mutex::new(base),
        })
    }

    /// The rendition this unit switches to (or plays) at its next group.
    pub fn selected(&self) -> Arc<Clip> {
        Arc::clone(&self.selected.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl QualityControl for UnitVideo {
    fn set_quality(
        self: Arc<Self>,
        bitrate: u32,
        height: u32,
    ) -> futures::future::BoxFuture<'static, Result<QualityChange, DirectiveError>> {
        let unit = self;
        Box::pin(async move {
            let before = unit.selected().settings.clone();
            let target = unit.renditions.closest(bitrate, height, before.height);
            let clip = unit.renditions.get(&target).await?;
            *unit.selected.lock().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&clip);
            let s = &clip.settings;
            Ok(QualityChange {
                bitrate: s.bitrate,
                width: s.width,
                height: s.height,
                summary: format!(
                    "rendition {}x{} at {} kbit/s (closest to {bitrate} kbit/s{}), was {}x{} at {} kbit/s; from the next group",
                    s.width,
                    s.height,
                    s.bitrate,
                    if height == 0 {
                        String::new()
                    } else {
                        format!(", {height} px")
                    },
                    before.width,
                    before.height,
                    before.bitrate
                ),
            })
        })
    }
}

/// Picks each video frame from the rendition playing, switching to the selected one only
/// where its frame is a keyframe, so every group is whole and decodable. Renditions share
/// frame count and timing (same rate, same group length), so frame `i` is the same moment
/// in each.
pub struct VideoSelector {
    unit: Arc<UnitVideo>,
    playing: Arc<Clip>,
}

impl VideoSelector {
    pub fn new(unit: Arc<UnitVideo>) -> Self {
        let playing = unit.selected();
        Self { unit, playing }
    }

    /// The clip's video frame `i` from the rendition playing.
    pub fn frame(&mut self, i: usize) -> Option<&ClipFrame> {
        let selected = self.unit.selected();
        if !Arc::ptr_eq(&selected, &self.playing)
            && selected.video.get(i).is_some_and(|f| f.keyframe)
        {
            self.playing = selected;
        }
        self.playing.video.get(i)
    }

    pub fn playing(&self) -> &Arc<Clip> {
        &self.playing
    }
}

/// Replays the clip into a unit's tracks in real time, looping, until `shutdown`; the
/// video from the rendition `unit` selects. With `stamp`, each video frame begins with its
/// capture time in an SEI message ([`tianwang_proto::stamp`]).
pub async fn play(
    unit: Arc<UnitVideo>,
    broadcast: Arc<LocalBroadcast>,
    start_delay: Duration,
    stamp: bool,
    shutdown: CancellationToken,
) {
    let clip = Arc::clone(unit.renditions.base());
    let mut video = VideoSelector::new(unit);
    // Both tracks on one timeline.
    let mut schedule: Vec<(u64, TrackKind, usize)> = clip
        .video
        .iter()
        .enumerate()
        .map(|(i, f)| (f.pts_us, TrackKind::Video, i))
        .chain(
            clip.audio
                .iter()
                .enumerate()
                .filter(|(_, f)| f.pts_us < clip.duration_us)
                .map(|(i, f)| (f.pts_us, TrackKind::Audio, i)),
        )
        .collect();
    schedule.sort_by_key(|(pts, kind, _)| (*pts, *kind as i32));
    let start = tokio::time::Instant::now() + start_delay;
    let capture_clock = crate::clock::CaptureClock::default();
    let mut stamped = Vec::new();
    for lap in 0u64.. {
        let base = start + Duration::from_micros(lap * clip.duration_us);
        for &(pts, kind, i) in &schedule {
            tokio::select! {
                _ = tokio::time::sleep_until(base + Duration::from_micros(pts)) => {}
                _ = shutdown.cancelled() => return,
            }
            let (frame, track) = match kind {
                TrackKind::Audio => (clip.audio.get(i), broadcast.track(TrackKind::Audio)),
                _ => (video.frame(i), broadcast.track(TrackKind::Video)),
            };
            if let (Some(f), Some(t)) = (frame, track) {
                let mono = start.elapsed().as_micros() as u64;
                let now = capture_clock.stamp(
                    mono,
                    crate::unix_now_us(),
                    mono,
                    f.keyframe && kind == TrackKind::Video,
                );
                let payload = if stamp && kind == TrackKind::Video {
                    stamped.clear();
                    tianwang_proto::stamp::write(&mut stamped, now);
                    stamped.extend_from_slice(&f.payload);
                    &stamped[..]
                } else {
                    &f.payload[..]
                };
                t.push(payload, now, f.duration_us, f.keyframe);
            }
        }
    }
}

/// Reads a tokens file: one `unit token` pair per line; `#` starts a comment.
pub fn read_tokens(path: &Path) -> anyhow::Result<HashMap<String, String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut tokens = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(unit), Some(token), None) => {
                tokens.insert(unit.to_string(), token.to_string());
            }
            _ => bail!("{}:{}: expected `unit token`", path.display(), n + 1),
        }
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> EncodeSettings {
        EncodeSettings {
            width: 320,
            height: 180,
            framerate: 10,
            bitrate: 1000,
            keyframe_interval: 10,
        }
    }

    /// Bytes of each whole group over `laps` laps of the clip, as a unit plays it.
    fn group_bytes(video: &mut VideoSelector, frames: usize, laps: usize) -> Vec<usize> {
        let mut groups: Vec<usize> = Vec::new();
        for _ in 0..laps {
            for i in 0..frames {
                let f = video.frame(i).expect("a frame");
                if f.keyframe {
                    groups.push(0);
                }
                if let Some(g) = groups.last_mut() {
                    *g += f.payload.len();
                }
            }
        }
        groups
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quality_switches_a_unit_to_a_rendition_at_its_next_group() {
        let base = tokio::task::spawn_blocking(|| encode_clip(&small(), 2))
            .await
            .expect("encoder task")
            .expect("the base clip");
        let frames = base.video.len();
        let renditions = Renditions::new(base, 2);
        assert_eq!(
            renditions.encoded(),
            1,
            "start-up encodes the base clip only"
        );
        let unit = UnitVideo::new(Arc::clone(&renditions));
        let other = UnitVideo::new(Arc::clone(&renditions));
        let mut video = VideoSelector::new(Arc::clone(&unit));
        let before = group_bytes(&mut video, frames, 2);

        // Mid-group the unit goes on with the rendition it plays.
        video.frame(0);
        video.frame(1);
        let (done, also) = tokio::join!(
            Arc::clone(&unit).set_quality(150, 0),
            Arc::clone(&other).set_quality(160, 0)
        );
        let done = done.expect("a rendition");
        also.expect("the same rendition");
        assert_eq!(
            done.summary,
            "rendition 320x180 at 150 kbit/s (closest to 150 kbit/s), was 320x180 at 1000 kbit/s; from the next group"
        );
        assert_eq!(renditions.encoded(), 2, "encoded once for both units");
        assert!(
            Arc::ptr_eq(&unit.selected(), &other.selected()),
            "one rendition shared by both units"
        );
        video.frame(2);
        assert!(Arc::ptr_eq(video.playing(), renditions.base()));

        let after = group_bytes(&mut video, frames, 2);
        assert!(!Arc::ptr_eq(video.playing(), renditions.base()));
        let mean = |g: &[usize]| g.iter().sum::<usize>() / g.len().max(1);
        eprintln!("bytes per group: {before:?} at 1000 kbit/s, {after:?} at 150 kbit/s");
        assert!(
            mean(&after) * 3 < mean(&before),
            "{before:?} at 1000 kbit/s, {after:?} at 150 kbit/s"
        );

        // A height picks the rung's picture size; the stream's own SPS says so.
        let done = Arc::clone(&unit)
            .set_quality(300, 144)
            .await
            .expect("a rendition");
        assert_eq!((done.width, done.height, done.bitrate), (256, 144, 300));
        let clip = unit.selected();
        let group: Vec<Bytes> = clip
            .video
            .iter()
            .take(10)
            .map(|f| f.payload.clone())
            .collect();
        let picture = crate::snapshot::jpeg_from_h264(&group).expect("decodes");
        assert_eq!((picture.width, picture.height), (256, 144));
        assert_eq!(renditions.encoded(), 3);
    }

    #[test]
    fn the_closest_rung_never_exceeds_the_start_up_picture() {
        let clip = Clip {
            video: Vec::new(),
            audio: Vec::new(),
            duration_us: 0,
            settings: EncodeSettings::default(),
        };
        let r = Renditions::new(clip, 2);
        let pick = |b, h, cur| {
            let s = r.closest(b, h, cur);
            (s.width, s.height, s.bitrate)
        };
        assert_eq!(pick(1500, 0, 360), (640, 360, 1500));
        assert_eq!(pick(5, 0, 360), (640, 360, 150));
        assert_eq!(pick(350, 0, 240), (426, 240, 300));
        assert_eq!(pick(8000, 2160, 360), (640, 360, 6000));
        assert_eq!(pick(800, 200, 360), (426, 240, 1000));
        assert_eq!(pick(100, 144, 360), (256, 144, 150));
    }
}
