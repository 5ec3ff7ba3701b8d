//! Simulated units: one clip is encoded once at start-up, then N virtual units replay it at
//! its own pace, each under its own id and token, with fresh capture timestamps. Nothing is
//! encoded per unit, so hundreds of units fit on a laptop.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use tianwang_proto::v1::TrackKind;
use tokio_util::sync::CancellationToken;

use crate::broadcast::LocalBroadcast;
use crate::capture::{EncodeSettings, OPUS_ENCODER, h264_encoder};

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

/// Replays the clip into a unit's tracks in real time, looping, until `shutdown`.
pub async fn play(
    clip: Arc<Clip>,
    broadcast: Arc<LocalBroadcast>,
    start_delay: Duration,
    shutdown: CancellationToken,
) {
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
    for lap in 0u64.. {
        let base = start + Duration::from_micros(lap * clip.duration_us);
        for &(pts, kind, i) in &schedule {
            tokio::select! {
                _ = tokio::time::sleep_until(base + Duration::from_micros(pts)) => {}
                _ = shutdown.cancelled() => return,
            }
            let (frames, track) = match kind {
                TrackKind::Audio => (&clip.audio, broadcast.track(TrackKind::Audio)),
                _ => (&clip.video, broadcast.track(TrackKind::Video)),
            };
            if let (Some(f), Some(t)) = (frames.get(i), track) {
                t.push(&f.payload, crate::unix_now_us(), f.duration_us, f.keyframe);
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
