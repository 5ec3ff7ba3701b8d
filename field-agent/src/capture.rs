//! Capture and encode with GStreamer: H.264 (x264, zero latency) and Opus, from a test
//! pattern, a V4L2 camera or a file, into the device's local tracks.

use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use tianwang_proto::v1::TrackKind;

use crate::broadcast::{LocalBroadcast, LocalTrack};
use crate::clock::CaptureClock;
use crate::directives::{DirectiveError, QualityChange, QualityControl};

/// Where the picture comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A moving test pattern with the unit id and a clock burned in.
    Test,
    /// The same with noise for a picture: it fills any bitrate (for adaptive bitrate and
    /// load tests; the ball pattern compresses to a few hundred kbit/s).
    Noise,
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
        if s == "noise" {
            return Ok(Source::Noise);
        }
        if let Some(dev) = s.strip_prefix("v4l2:") {
            return Ok(Source::V4l2(dev.to_string()));
        }
        if let Some(path) = s.strip_prefix("file:") {
            return Ok(Source::File(path.to_string()));
        }
        Err(format!(
            "unknown source {s:?}: use test, noise, v4l2:/dev/videoN or file:PATH"
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

/// The x264 → Annex-B access units tail of every video branch. The encoder is named
/// `encoder` so its bitrate can be changed while it plays.
pub fn h264_encoder(e: &EncodeSettings) -> String {
    format!(
        "x264enc name=encoder tune=zerolatency speed-preset=ultrafast bitrate={} key-int-max={} bframes=0 \
         ! video/x-h264,profile=constrained-baseline ! h264parse config-interval=-1 \
         ! video/x-h264,stream-format=byte-stream,alignment=au",
        e.bitrate, e.keyframe_interval
    )
}

/// The agent's video encoder branch, from raw video of the capture's size to H.264 access
/// units: a scaler whose output size (`capsfilter name=picture`) a QUALITY directive
/// changes at run time, then the encoder.
pub fn video_encoder_branch(e: &EncodeSettings) -> String {
    format!(
        "videoscale ! capsfilter name=picture caps=\"video/x-raw,width={},height={},pixel-aspect-ratio=1/1\" ! {}",
        e.width,
        e.height,
        h264_encoder(e)
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
        Source::Test | Source::Noise => format!(
            "videotestsrc is-live=true pattern={} ! {raw} \
             ! textoverlay text={} halignment=left valignment=top font-desc=\"Sans 20\" ! {clock}",
            if *source == Source::Noise {
                "snow"
            } else {
                "ball"
            },
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
        video_encoder_branch(e)
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
    capture_clock: &Arc<CaptureClock>,
) {
    let broadcast = Arc::clone(broadcast);
    let capture_clock = Arc::clone(capture_clock);
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
                let keyframe = !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT);
                // Capture time: when the buffer was taken (its PTS as running time, through
                // the sample's segment: encoders shift their PTS, x264enc by 1000 hours), on
                // the capture clock (the wall clock as it stood when the video group began).
                let mut timestamp_us = crate::unix_now_us();
                if let Some(p) = pipeline.upgrade()
                    && let (Some(clock), Some(base)) = (p.clock(), p.base_time())
                {
                    let running = clock.time().saturating_sub(base);
                    let taken = buffer
                        .pts()
                        .and_then(|pts| {
                            sample
                                .segment()?
                                .downcast_ref::<gst::ClockTime>()?
                                .to_running_time(pts)
                        })
                        .filter(|t| *t <= running)
                        .unwrap_or(running);
                    timestamp_us = capture_clock.stamp(
                        taken.useconds(),
                        timestamp_us,
                        running.useconds(),
                        keyframe && kind == TrackKind::Video,
                    );
                }
                let duration_us = buffer.duration().map(|d| d.useconds() as u32).unwrap_or(0);
                let map = buffer.map_readable().map_err(|_| gst::FlowError::Error)?;
                if !map.is_empty() {
                    track.push(&map, timestamp_us, duration_us, keyframe);
                }
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
}

/// The picture size for a target height: no larger than the capture (scaling up adds bits,
/// not detail), the capture's aspect ratio, even numbers (4:2:0 needs them). Returns the
/// size and whether the target was above the capture.
pub fn scaled_size(capture: (u32, u32), height: u32) -> ((u32, u32), bool) {
    let (cw, ch) = capture;
    if height >= ch || ch == 0 {
        return ((cw, ch), height > ch);
    }
    let h = (height / 2 * 2).max(2);
    let w = ((u64::from(h) * u64::from(cw) + u64::from(ch)) / (2 * u64::from(ch))) * 2;
    ((w.max(2) as u32, h), false)
}

/// Changes a playing encoder: its bitrate (x264enc takes a new one while it plays) and
/// the picture size (the caps of the `picture` capsfilter after the scaler: the encoder
/// restarts on the new size with a keyframe).
pub struct EncoderControl {
    encoder: gst::glib::WeakRef<gst::Element>,
    picture: gst::glib::WeakRef<gst::Element>,
    capture: (u32, u32),
    /// bitrate kbit/s, width, height: as configured or directed (QUALITY)
    current: Mutex<(u32, u32, u32)>,
    /// Adaptive bitrate's share of that height, in %, below its bitrate floor.
    shrink: AtomicU32,
    /// And the frames it keeps: one in this many (read by the probe on the encoder's
    /// input, see [`thin_frames`]).
    frames_1_in: Arc<AtomicU32>,
    /// The bitrate adaptive bitrate last aimed at, kbit/s.
    steered: AtomicU32,
}

/// Drops all but one captured frame in `frames_1_in` before the encoder, without holding
/// any back (`videorate` would hold each frame until the next one came). x264 budgets its
/// bits per frame at the caps' frame rate and counts its keyframe interval in frames, so
/// the kept frames take the dropped ones' duration (the hub's recorder reads gaps from
/// durations), the encoder's bitrate is scaled by the caller, and keyframes are asked for
/// by time.
fn thin_frames(
    encoder: &gst::Element,
    frames_1_in: Arc<AtomicU32>,
    keyframe_interval: u32,
) -> anyhow::Result<()> {
    let pad = encoder
        .static_pad("sink")
        .ok_or_else(|| anyhow!("the encoder has no sink pad"))?;
    let seen = AtomicU64::new(0);
    let kept = AtomicU64::new(0);
    pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
        let n = frames_1_in.load(Ordering::Relaxed).max(1);
        if n == 1 {
            return gst::PadProbeReturn::Ok;
        }
        if !seen
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(u64::from(n))
        {
            return gst::PadProbeReturn::Drop;
        }
        if let Some(gst::PadProbeData::Buffer(buffer)) = info.data.as_mut() {
            let buffer = buffer.make_mut();
            if let Some(d) = buffer.duration() {
                buffer.set_duration(gst::ClockTime::from_nseconds(
                    d.nseconds().saturating_mul(u64::from(n)),
                ));
            }
        }
        let every = u64::from((keyframe_interval / n).max(1));
        let k = kept.fetch_add(1, Ordering::Relaxed);
        if k > 0 && k.is_multiple_of(every) {
            pad.send_event(
                gstreamer_video::DownstreamForceKeyUnitEvent::builder()
                    .all_headers(true)
                    .build(),
            );
        }
        gst::PadProbeReturn::Ok
    })
    .ok_or_else(|| anyhow!("could not watch the encoder's input"))?;
    Ok(())
}

impl EncoderControl {
    /// Finds the `encoder` and `picture` elements of a pipeline built from
    /// [`video_encoder_branch`] with `settings`.
    pub fn find(pipeline: &gst::Pipeline, settings: &EncodeSettings) -> anyhow::Result<Self> {
        let encoder = pipeline
            .by_name("encoder")
            .filter(|e| e.has_property_with_type("bitrate", u32::static_type()))
            .ok_or_else(|| anyhow!("the pipeline has no x264enc named encoder"))?;
        let picture = pipeline
            .by_name("picture")
            .filter(|e| e.has_property_with_type("caps", gst::Caps::static_type()))
            .ok_or_else(|| anyhow!("the pipeline has no capsfilter named picture"))?;
        let frames_1_in = Arc::new(AtomicU32::new(1));
        thin_frames(
            &encoder,
            Arc::clone(&frames_1_in),
            settings.keyframe_interval,
        )?;
        Ok(Self {
            encoder: encoder.downgrade(),
            picture: picture.downgrade(),
            capture: (settings.width, settings.height),
            current: Mutex::new((settings.bitrate, settings.width, settings.height)),
            shrink: AtomicU32::new(100),
            frames_1_in,
            steered: AtomicU32::new(settings.bitrate),
        })
    }

    /// What x264 must be told for `kbps` out: it budgets per frame at the caps' rate, and
    /// only one frame in `frames_1_in` reaches it.
    fn encoder_bitrate(&self, kbps: u32) -> u32 {
        kbps.saturating_mul(self.frames_1_in.load(Ordering::Relaxed))
    }

    /// The size the encoder makes: the directed one, shrunk by adaptive bitrate.
    fn effective(&self, (w, h): (u32, u32)) -> (u32, u32) {
        match self.shrink.load(Ordering::Relaxed) {
            100.. => (w, h),
            percent => scaled_size(self.capture, h * percent / 100).0,
        }
    }

    fn set_size(picture: &gst::Element, (w, h): (u32, u32)) {
        let caps = gst::Caps::builder("video/x-raw")
            .field("width", w as i32)
            .field("height", h as i32)
            .field("pixel-aspect-ratio", gst::Fraction::new(1, 1))
            .build();
        picture.set_property("caps", caps);
    }

    /// bitrate kbit/s, width, height, as last set.
    pub fn current(&self) -> (u32, u32, u32) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets a validated target (height 0 keeps the size).
    pub fn apply(&self, bitrate: u32, height: u32) -> Result<QualityChange, DirectiveError> {
        let stopped = || DirectiveError::Media("the capture pipeline has stopped".into());
        let encoder = self.encoder.upgrade().ok_or_else(stopped)?;
        let picture = self.picture.upgrade().ok_or_else(stopped)?;
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let (old_bitrate, old_w, old_h) = *current;
        let ((w, h), capped) = if height == 0 {
            ((old_w, old_h), false)
        } else {
            scaled_size(self.capture, height)
        };
        encoder.set_property("bitrate", self.encoder_bitrate(bitrate));
        if (w, h) != (old_w, old_h) {
            Self::set_size(&picture, self.effective((w, h)));
        }
        *current = (bitrate, w, h);
        let size = match (height, (w, h) == (old_w, old_h)) {
            (0, _) => format!("{w}x{h} kept"),
            (_, true) => format!("{w}x{h} unchanged"),
            (_, false) => format!("{old_w}x{old_h} → {w}x{h}"),
        };
        let capped = if capped {
            format!(
                " (the capture's {}x{} is the largest)",
                self.capture.0, self.capture.1
            )
        } else {
            String::new()
        };
        Ok(QualityChange {
            bitrate,
            width: w,
            height: h,
            summary: format!("bitrate {old_bitrate} → {bitrate} kbit/s, {size}{capped}"),
        })
    }
}

impl crate::broadcast::RateControl for EncoderControl {
    fn cap(&self) -> u32 {
        self.current().0
    }

    fn steer(&self, kbps: u32) {
        let kbps = kbps.min(self.cap());
        self.steered.store(kbps, Ordering::Relaxed);
        if let Some(encoder) = self.encoder.upgrade() {
            encoder.set_property("bitrate", self.encoder_bitrate(kbps));
        }
    }

    fn picture(&self, step: crate::abr::Picture) {
        let (Some(picture), Some(encoder)) = (self.picture.upgrade(), self.encoder.upgrade())
        else {
            return;
        };
        // Under the lock of the directed size, so a QUALITY directive and a step do not
        // cross.
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.effective((current.1, current.2));
        self.shrink.store(step.height, Ordering::Relaxed);
        let after = self.effective((current.1, current.2));
        if after != before {
            Self::set_size(&picture, after);
        }
        let frames_1_in = step.frames_1_in.max(1);
        if self.frames_1_in.swap(frames_1_in, Ordering::Relaxed) != frames_1_in {
            let kbps = self.steered.load(Ordering::Relaxed).min(current.0);
            encoder.set_property("bitrate", self.encoder_bitrate(kbps));
        }
    }
}

impl QualityControl for EncoderControl {
    fn set_quality(
        self: Arc<Self>,
        bitrate: u32,
        height: u32,
    ) -> futures::future::BoxFuture<'static, Result<QualityChange, DirectiveError>> {
        Box::pin(std::future::ready(self.apply(bitrate, height)))
    }
}

/// A running capture pipeline. Dropping it stops the pipeline.
pub struct Capture {
    pipeline: gst::Pipeline,
    encoder: Arc<EncoderControl>,
}

impl Capture {
    /// Starts a pipeline made by [`pipeline_description`] (or any with the same named
    /// elements: appsink `video`, x264enc `encoder`, capsfilter `picture`) encoding with
    /// `settings`.
    pub fn start(
        description: &str,
        broadcast: &Arc<LocalBroadcast>,
        settings: &EncodeSettings,
    ) -> anyhow::Result<Self> {
        gst::init().context("initialising GStreamer")?;
        let pipeline = gst::parse::launch(description)
            .with_context(|| format!("building the pipeline: {description}"))?
            .downcast::<gst::Pipeline>()
            .map_err(|_| anyhow!("the launch line is not a pipeline"))?;
        let video = pipeline
            .by_name("video")
            .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
            .ok_or_else(|| anyhow!("the pipeline has no appsink named video"))?;
        let encoder = Arc::new(EncoderControl::find(&pipeline, settings)?);
        broadcast.set_rate_control(Arc::clone(&encoder) as Arc<dyn crate::broadcast::RateControl>);
        // One capture clock for both sinks: a step of the wall clock moves them together.
        let capture_clock = Arc::new(CaptureClock::default());
        connect_sink(
            &pipeline,
            &video,
            broadcast,
            TrackKind::Video,
            &capture_clock,
        );
        if let Some(audio) = pipeline
            .by_name("audio")
            .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
        {
            connect_sink(
                &pipeline,
                &audio,
                broadcast,
                TrackKind::Audio,
                &capture_clock,
            );
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
        Ok(Self { pipeline, encoder })
    }

    /// The live encoder's controls (QUALITY directives).
    pub fn encoder(&self) -> Arc<EncoderControl> {
        Arc::clone(&self.encoder)
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
