//! A video link's picture: the official's camera from the hub into a Matroska file and,
//! when the device has one, its screen.
//!
//! ```text
//! appsrc (H.264 Annex B | VP8) ! [h264parse !] [tee !] queue ! matroskamux ! filesink
//!                                              tee. ! queue ! decodebin ! videoconvert ! autovideosink
//! ```
//!
//! Frames keep the hub's capture spacing (the first one at zero); the screen shows each as
//! it comes (no clock sync: the link is live, not a replay).

use std::path::Path;

use bytes::Bytes;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use tianwang_core::codec::{VideoCodec, vp8_keyframe_size};

use super::TalkbackError;

/// The end of the stream must reach the file within this.
const EOS_WAIT: gst::ClockTime = gst::ClockTime::from_seconds(5);

fn media(m: impl Into<String>) -> TalkbackError {
    TalkbackError::Media(m.into())
}

/// One link's picture pipeline. Dropping it ends the stream properly (the file stays valid).
pub struct Screen {
    pipeline: gst::Pipeline,
    src: gst_app::AppSrc,
    screen: bool,
    /// The first frame's hub timestamp (µs): the file's zero.
    first_us: Option<u64>,
    last_pts: Option<u64>,
    playing: bool,
    failed: bool,
    ended: bool,
}

impl Screen {
    /// Opens `file` (created or truncated) and, with `screen`, the display. The first frame
    /// (a keyframe) is needed for VP8's caps. A device whose display cannot be opened
    /// still keeps the picture in its file. Blocking.
    pub fn start(
        file: &Path,
        codec: VideoCodec,
        first: &[u8],
        screen: bool,
    ) -> Result<Self, TalkbackError> {
        gst::init().map_err(|e| media(format!("initialising GStreamer: {e}")))?;
        if screen {
            match Self::build(file, codec, first, true) {
                Ok(p) => return Ok(p),
                Err(e) => {
                    tracing::warn!(error = %e, "no screen for the video link; keeping it in its file only")
                }
            }
        }
        Self::build(file, codec, first, false)
    }

    fn build(
        file: &Path,
        codec: VideoCodec,
        first: &[u8],
        screen: bool,
    ) -> Result<Self, TalkbackError> {
        let caps = match codec {
            VideoCodec::H264 => gst::Caps::builder("video/x-h264")
                .field("stream-format", "byte-stream")
                .field("alignment", "au")
                .build(),
            VideoCodec::Vp8 => {
                let (width, height) = vp8_keyframe_size(first)
                    .ok_or_else(|| media("the link's first VP8 frame is not a keyframe"))?;
                gst::Caps::builder("video/x-vp8")
                    .field("width", i32::from(width))
                    .field("height", i32::from(height))
                    .field("framerate", gst::Fraction::new(0, 1))
                    .build()
            }
        };
        let parse = match codec {
            VideoCodec::H264 => "h264parse ! ",
            VideoCodec::Vp8 => "",
        };
        let description = if screen {
            format!(
                "appsrc name=src ! {parse}tee name=t \
                 t. ! queue ! matroskamux ! filesink name=file \
                 t. ! queue ! decodebin ! videoconvert ! autovideosink sync=false"
            )
        } else {
            format!("appsrc name=src ! {parse}matroskamux ! filesink name=file")
        };
        let pipeline = gst::parse::launch(&description)
            .map_err(|e| media(format!("building the video link pipeline: {e}")))?
            .downcast::<gst::Pipeline>()
            .map_err(|_| media("the video link launch line is not a pipeline"))?;
        let src = pipeline
            .by_name("src")
            .and_then(|e| e.downcast::<gst_app::AppSrc>().ok())
            .ok_or_else(|| media("the video link pipeline lacks its appsrc"))?;
        let sink = pipeline
            .by_name("file")
            .ok_or_else(|| media("the video link pipeline lacks its filesink"))?;
        src.set_caps(Some(&caps));
        src.set_format(gst::Format::Time);
        sink.set_property("location", file.to_string_lossy().as_ref());
        let s = Screen {
            pipeline,
            src,
            screen,
            first_us: None,
            last_pts: None,
            playing: false,
            failed: false,
            ended: false,
        };
        // PAUSED opens the file and the display: failures show now, not mid-link.
        s.pipeline.set_state(gst::State::Paused).map_err(|_| {
            media(
                s.bus_error()
                    .unwrap_or_else(|| "the video link pipeline would not start".into()),
            )
        })?;
        if let Some(e) = s.bus_error() {
            return Err(media(e));
        }
        Ok(s)
    }

    /// Whether this shows on a display (it may have fallen back to the file only).
    pub fn has_screen(&self) -> bool {
        self.screen
    }

    fn bus_error(&self) -> Option<String> {
        let bus = self.pipeline.bus()?;
        let msg = bus.pop_filtered(&[gst::MessageType::Error])?;
        match msg.view() {
            gst::MessageView::Error(e) => Some(super::player::describe(e)),
            _ => None,
        }
    }

    /// Queues one frame (never waits for the pipeline). An error means the pipeline has
    /// failed: the picture is over.
    pub fn push(
        &mut self,
        frame: Bytes,
        hub_us: u64,
        keyframe: bool,
        duration_us: u32,
    ) -> Result<(), TalkbackError> {
        if self.ended || self.failed {
            return Err(media("the video link pipeline has ended"));
        }
        let result = self.queue(frame, hub_us, keyframe, duration_us);
        self.failed = result.is_err();
        result
    }

    fn queue(
        &mut self,
        frame: Bytes,
        hub_us: u64,
        keyframe: bool,
        duration_us: u32,
    ) -> Result<(), TalkbackError> {
        if !self.playing {
            self.pipeline.set_state(gst::State::Playing).map_err(|_| {
                media(
                    self.bus_error()
                        .unwrap_or_else(|| "the video link pipeline would not play".into()),
                )
            })?;
            self.playing = true;
        }
        let first = *self.first_us.get_or_insert(hub_us);
        // Never backwards: a muxer refuses decreasing timestamps.
        let mut pts = hub_us.saturating_sub(first).saturating_mul(1000);
        if let Some(last) = self.last_pts {
            pts = pts.max(last + 1);
        }
        self.last_pts = Some(pts);
        let mut buffer = gst::Buffer::from_slice(frame);
        if let Some(b) = buffer.get_mut() {
            b.set_pts(gst::ClockTime::from_nseconds(pts));
            b.set_dts(gst::ClockTime::from_nseconds(pts));
            if (1_000..=1_000_000).contains(&duration_us) {
                b.set_duration(gst::ClockTime::from_useconds(u64::from(duration_us)));
            }
            if !keyframe {
                b.set_flags(gst::BufferFlags::DELTA_UNIT);
            }
        }
        self.src
            .push_buffer(buffer)
            .map_err(|e| media(format!("the video link pipeline refused a frame: {e:?}")))?;
        if let Some(e) = self.bus_error() {
            return Err(media(e));
        }
        Ok(())
    }

    /// Ends the stream, waits until the file is complete, and stops. Blocking.
    pub fn finish(mut self) -> Result<(), TalkbackError> {
        self.end()
    }

    fn end(&mut self) -> Result<(), TalkbackError> {
        if self.ended {
            return Ok(());
        }
        self.ended = true;
        let result = if self.playing && !self.failed {
            self.drain()
        } else {
            Ok(())
        };
        let _ = self.pipeline.set_state(gst::State::Null);
        result
    }

    fn drain(&self) -> Result<(), TalkbackError> {
        self.src
            .end_of_stream()
            .map_err(|e| media(format!("ending the video link stream: {e:?}")))?;
        let bus = self
            .pipeline
            .bus()
            .ok_or_else(|| media("the video link pipeline has no bus"))?;
        let ended =
            bus.timed_pop_filtered(EOS_WAIT, &[gst::MessageType::Eos, gst::MessageType::Error]);
        match ended.as_ref().map(|m| m.view()) {
            Some(gst::MessageView::Eos(_)) => Ok(()),
            Some(gst::MessageView::Error(e)) => Err(media(super::player::describe(e))),
            _ => Err(media("the video link file was not finished in time")),
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = self.end();
    }
}
