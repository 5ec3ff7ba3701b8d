//! Capture and encode with GStreamer: H.264 (x264, zero latency) and Opus, from a test
//! pattern, a V4L2 camera or a file, into the device's local tracks.

use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use tianwang_proto::v1::TrackKind;

use crate::broadcast::{LocalBroadcast, LocalTrack};

/// Where the picture comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A moving test pattern with the unit id and a clock burned in.
    Test,
    /// A V4L2 camera, e.g. /dev/video0.
    V4l2(String),
    /// A media file, played at its own pace.
    File(String),
}

impl FromStr for Source {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "test" {
            return Ok(Source::Test);
        }
        if let Some(dev) = s.strip_prefix("v4l2:") {
            return Ok(Source::V4l2(dev.to_string()));
        }
        if let Some(path) = s.strip_prefix("file:") {
            return Ok(Source::File(path.to_string()));
        }
        Err(format!(
            "unknown source {s:?}: use test, v4l2:/dev/videoN or file:PATH"
        ))
    }
}

/// Where the sound comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Audio {
    /// A test tone.
    Test,
    /// The system's default microphone (autoaudiosrc).
    Auto,
    /// The file's own audio track (file sources only).
    File,
    None,
}

#[derive(Clone, Debug)]
pub struct EncodeSettings {
    pub width: u32,
    pub height: u32,
    pub framerate: u32,
    /// kbit/s
    pub bitrate: u32,
    /// Frames between keyframes (the group length).
    pub keyframe_interval: u32,
}

impl Default for EncodeSettings {
    fn default() -> Self {
        Self {
            width: 640,
            height: 360,
            framerate: 30,
            bitrate: 1500,
            keyframe_interval: 60,
        }
    }
}

/// Text for a GStreamer launch line, quoted.
fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The x264 → Annex-B access units tail of every video branch.
pub fn h264_encoder(e: &EncodeSettings) -> String {
    format!(
        "x264enc tune=zerolatency speed-preset=ultrafast bitrate={} key-int-max={} bframes=0 \
         ! video/x-h264,profile=constrained-baseline ! h264parse config-interval=-1 \
         ! video/x-h264,stream-format=byte-stream,alignment=au",
        e.bitrate, e.keyframe_interval
    )
}

pub const OPUS_ENCODER: &str = "audioconvert ! audioresample ! audio/x-raw,rate=48000,channels=1 \
     ! opusenc bitrate=32000 frame-size=20";

/// The launch line for a source. Video ends in `appsink name=video`, audio (if any) in
/// `appsink name=audio`.
pub fn pipeline_description(
    unit: &str,
    source: &Source,
    audio: Audio,
    e: &EncodeSettings,
) -> String {
    let raw = format!(
        "video/x-raw,width={},height={},framerate={}/1",
        e.width, e.height, e.framerate
    );
    let clock = "clockoverlay time-format=\"%Y-%m-%d %H:%M:%S\" halignment=right valignment=bottom font-desc=\"Sans 16\"";
    // Live sources must not wait for preroll; a file is paced by the sinks' clock sync.
    let (sink_opts, live) = match source {
        Source::File(_) => ("sync=true async=false", false),
        _ => ("sync=false", true),
    };
    let video = match source {
        Source::Test => format!(
            "videotestsrc is-live=true pattern=ball ! {raw} \
             ! textoverlay text={} halignment=left valignment=top font-desc=\"Sans 20\" ! {clock}",
            quoted(unit)
        ),
        Source::V4l2(dev) => format!(
            "v4l2src device={} ! videoconvert ! videoscale ! videorate ! {raw} ! {clock}",
            quoted(dev)
        ),
        Source::File(path) => format!(
            "filesrc location={} ! decodebin name=d d. ! queue ! videoconvert ! videoscale \
             ! videorate ! {raw} ! {clock}",
            quoted(path)
        ),
    };
    let mut desc = format!(
        "{video} ! videoconvert ! {} ! appsink name=video {sink_opts} max-buffers=64",
        h264_encoder(e)
    );
    let audio_src = match (audio, source) {
        (Audio::None, _) => None,
        (Audio::Test, _) => Some(format!(
            "audiotestsrc is-live={live} wave=sine freq=440 volume=0.2"
        )),
        (Audio::Auto, _) => Some("autoaudiosrc".to_string()),
        (Audio::File, Source::File(_)) => Some("d. ! queue".to_string()),
        (Audio::File, _) => None,
    };
    if let Some(src) = audio_src {
        desc.push_str(&format!(
            " {src} ! {OPUS_ENCODER} ! appsink name=audio {sink_opts} max-buffers=64"
        ));
    }
    desc
}

/// Feeds an appsink's samples into a local track, stamping each with its capture time.
fn connect_sink(
    pipeline: &gst::Pipeline,
    sink: &gst_app::AppSink,
    broadcast: &Arc<LocalBroadcast>,
    kind: TrackKind,
) {
    let broadcast = Arc::clone(broadcast);
    let pipeline = pipeline.downgrade();
    sink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                let Some(buffer) = sample.buffer() else {
                    return Ok(gst::FlowSuccess::Ok);
                };
                let Some(track): Option<&LocalTrack> = broadcast.track(kind) else {
                    return Ok(gst::FlowSuccess::Ok);
                };
                // Capture time: now, minus how long ago (in pipeline running time) the
                // buffer was captured.
                let mut timestamp_us = crate::unix_now_us();
                if let (Some(p), Some(pts)) = (pipeline.upgrade(), buffer.pts())
                    && let (Some(clock), Some(base)) = (p.clock(), p.base_time())
                {
                    let running = clock.time().saturating_sub(base);
                    let age = running.saturating_sub(pts);
                    timestamp_us = timestamp_us.saturating_sub(age.useconds());
                }
                let duration_us = buffer.duration().map(|d| d.useconds() as u32).unwrap_or(0);
                let keyframe = !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT);
                let map = buffer.map_readable().map_err(|_| gst::FlowError::Error)?;
                if !map.is_empty() {
                    track.push(&map, timestamp_us, duration_us, keyframe);
                }
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
}

/// A running capture pipeline. Dropping it stops the pipeline.
pub struct Capture {
    pipeline: gst::Pipeline,
}

impl Capture {
    pub fn start(description: &str, broadcast: &Arc<LocalBroadcast>) -> anyhow::Result<Self> {
        gst::init().context("initialising GStreamer")?;
        let pipeline = gst::parse::launch(description)
            .with_context(|| format!("building the pipeline: {description}"))?
            .downcast::<gst::Pipeline>()
            .map_err(|_| anyhow!("the launch line is not a pipeline"))?;
        let video = pipeline
            .by_name("video")
            .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
            .ok_or_else(|| anyhow!("the pipeline has no appsink named video"))?;
        connect_sink(&pipeline, &video, broadcast, TrackKind::Video);
        if let Some(audio) = pipeline
            .by_name("audio")
            .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
        {
            connect_sink(&pipeline, &audio, broadcast, TrackKind::Audio);
        }
        let sink = video.downgrade();
        broadcast.set_keyframe_hook(Box::new(move |name| {
            if name != "video" {
                return;
            }
            if let Some(s) = sink.upgrade() {
                let event = gstreamer_video::UpstreamForceKeyUnitEvent::builder()
                    .all_headers(true)
                    .build();
                s.send_event(event);
            }
        }));
        pipeline
            .set_state(gst::State::Playing)
            .context("starting the pipeline (is the source there?)")?;
        Ok(Self { pipeline })
    }

    /// Resolves when the pipeline fails or reaches the end of its input.
    pub async fn wait(&self) -> anyhow::Result<()> {
        let Some(bus) = self.pipeline.bus() else {
            bail!("the pipeline has no bus");
        };
        let mut messages = bus.stream();
        while let Some(msg) = messages.next().await {
            match msg.view() {
                gst::MessageView::Eos(_) => return Ok(()),
                gst::MessageView::Error(err) => {
                    bail!(
                        "capture failed in {}: {} ({})",
                        err.src()
                            .map(|s| s.path_string().to_string())
                            .unwrap_or_default(),
                        err.error(),
                        err.debug().map(|d| d.to_string()).unwrap_or_default()
                    );
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// The tracks a source produces.
pub fn track_kinds(source: &Source, audio: Audio) -> (bool, bool) {
    let has_audio = match (audio, source) {
        (Audio::None, _) => false,
        (Audio::File, Source::File(_)) => true,
        (Audio::File, _) => false,
        _ => true,
    };
    (true, has_audio)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_and_refuse_unknown_ones() {
        assert_eq!("test".parse::<Source>(), Ok(Source::Test));
        assert_eq!(
            "v4l2:/dev/video2".parse::<Source>(),
            Ok(Source::V4l2("/dev/video2".into()))
        );
        assert_eq!(
            "file:/a b.mp4".parse::<Source>(),
            Ok(Source::File("/a b.mp4".into()))
        );
        assert!("rtsp://x".parse::<Source>().is_err());
    }

    #[test]
    fn unit_ids_are_quoted_into_the_launch_line() {
        let d = pipeline_description(
            "a\"b",
            &Source::Test,
            Audio::Test,
            &EncodeSettings::default(),
        );
        assert!(d.contains(r#"text="a\"b""#), "{d}");
        assert!(d.contains("appsink name=audio"));
        let d = pipeline_description(
            "u",
            &Source::V4l2("/dev/video0".into()),
            Audio::None,
            &EncodeSettings::default(),
        );
        assert!(!d.contains("appsink name=audio"));
    }
}
