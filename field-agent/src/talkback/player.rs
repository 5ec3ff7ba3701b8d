//! The talkback player: Opus packets from the hub into an Ogg Opus file and, when the device
//! has one, its speaker.
//!
//! ```text
//! appsrc (audio/x-opus) ! opusparse ! [tee !] queue ! oggmux ! filesink
//!                                      tee. ! queue ! opusdec ! audioconvert ! audioresample ! autoaudiosink
//! ```
//!
//! The pipeline goes to PLAYING at the first packet, so the file's timeline starts at zero
//! and the speaker plays that packet a fixed lead later (the pipeline latency). Packets are
//! laid end to end ([`Timeline`]): network jitter never tears the audio, a pause in what
//! the hub received stays a pause, and with a speaker the officer never hears more than
//! [`MAX_AHEAD`] behind.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use super::TalkbackError;

/// The speaker plays a packet this long after it arrives: room for the network's jitter.
pub const SPEAKER_LEAD: Duration = Duration::from_millis(80);
/// With a speaker, packets that would play further than this behind are dropped (a burst
/// after a stalled link), so the officer hears the command centre nearly live.
pub const MAX_AHEAD: Duration = Duration::from_secs(1);
/// A pause longer than this in the hub's timestamps (beyond a packet's own duration) is
/// kept as a pause; shorter ones are jitter and closed up.
pub const GAP: Duration = Duration::from_millis(100);
/// The end of the stream must reach the file within this (plus what the speaker still has
/// to play).
const EOS_WAIT: Duration = Duration::from_secs(5);

/// What the hub announced about the talk's audio.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AudioFormat {
    pub sample_rate: u32,
    pub channels: u32,
}

/// Where a packet goes on the pipeline's timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Presentation time (ns, running time) and whether it follows its predecessor with a
    /// gap.
    At { pts: u64, discont: bool },
    /// Too late to be worth playing.
    Drop,
}

/// Lays packets end to end. Pure: time is an input.
#[derive(Debug)]
pub struct Timeline {
    /// With a speaker, packets are held to the clock: one due in the past plays now (after
    /// a pause or a stall), one more than [`MAX_AHEAD`] ahead is dropped. Without, only the
    /// hub's pauses move them.
    live: bool,
    /// The previous packet: its pts, duration (ns) and hub timestamp (µs).
    last: Option<(u64, u64, u64)>,
}

impl Timeline {
    pub fn new(live: bool) -> Self {
        Self { live, last: None }
    }

    /// Places a packet of `duration_ns` the hub stamped `hub_us`; `now_ns` is the
    /// pipeline's running time (used only when live).
    pub fn place(&mut self, hub_us: u64, duration_ns: u64, now_ns: u64) -> Placement {
        let expected = self.end();
        let (pts, discont) = match (self.last, self.live) {
            (None, true) => (now_ns, false),
            (None, false) => (0, false),
            (Some(_), true) => {
                if expected.saturating_sub(now_ns) > MAX_AHEAD.as_nanos() as u64 {
                    return Placement::Drop;
                }
                (expected.max(now_ns), now_ns > expected)
            }
            (Some((pts, dur, last_us)), false) => {
                let hub_elapsed = hub_us.saturating_sub(last_us).saturating_mul(1000);
                if hub_elapsed > dur.saturating_add(GAP.as_nanos() as u64) {
                    (pts.saturating_add(hub_elapsed).max(expected), true)
                } else {
                    (expected, false)
                }
            }
        };
        self.last = Some((pts, duration_ns, hub_us));
        Placement::At { pts, discont }
    }

    /// Where the last placed packet ends (ns).
    pub fn end(&self) -> u64 {
        self.last
            .map(|(pts, dur, _)| pts.saturating_add(dur))
            .unwrap_or(0)
    }
}

/// One talk's pipeline. Dropping it ends the stream properly (the file stays valid).
pub struct Player {
    pipeline: gst::Pipeline,
    src: gst_app::AppSrc,
    speaker: bool,
    playing: bool,
    /// The pipeline reported an error: nothing more will flow through it.
    failed: bool,
    ended: bool,
    timeline: Timeline,
}

/// What became of a pushed packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Dropped: too far behind for the speaker.
    Dropped,
}

fn media(m: impl Into<String>) -> TalkbackError {
    TalkbackError::Media(m.into())
}

impl Player {
    /// Opens `file` (created or truncated) and, with `speaker`, the default audio output.
    /// A device whose speaker cannot be opened still keeps the talk in its file. Blocking.
    pub fn start(file: &Path, format: AudioFormat, speaker: bool) -> Result<Self, TalkbackError> {
        gst::init().map_err(|e| media(format!("initialising GStreamer: {e}")))?;
        if speaker {
            match Self::build(file, format, true) {
                Ok(p) => return Ok(p),
                Err(e) => {
                    tracing::warn!(error = %e, "no speaker for talkback; keeping it in its file only")
                }
            }
        }
        Self::build(file, format, false)
    }

    fn build(file: &Path, format: AudioFormat, speaker: bool) -> Result<Self, TalkbackError> {
        let description = if speaker {
            "appsrc name=src ! opusparse ! tee name=t \
             t. ! queue ! oggmux ! filesink name=file \
             t. ! queue ! opusdec ! audioconvert ! audioresample ! autoaudiosink"
        } else {
            "appsrc name=src ! opusparse ! oggmux ! filesink name=file"
        };
        let pipeline = gst::parse::launch(description)
            .map_err(|e| media(format!("building the talkback pipeline: {e}")))?
            .downcast::<gst::Pipeline>()
            .map_err(|_| media("the talkback launch line is not a pipeline"))?;
        let src = pipeline
            .by_name("src")
            .and_then(|e| e.downcast::<gst_app::AppSrc>().ok())
            .ok_or_else(|| media("the talkback pipeline lacks its appsrc"))?;
        let sink = pipeline
            .by_name("file")
            .ok_or_else(|| media("the talkback pipeline lacks its filesink"))?;
        let caps = gst::Caps::builder("audio/x-opus")
            .field("rate", format.sample_rate as i32)
            .field("channels", format.channels as i32)
            .field("channel-mapping-family", 0i32)
            .build();
        src.set_caps(Some(&caps));
        src.set_format(gst::Format::Time);
        src.set_is_live(true);
        sink.set_property("location", file.to_string_lossy().as_ref());
        if speaker {
            // The sink renders each packet this long after its running time.
            pipeline.set_latency(gst::ClockTime::from_nseconds(SPEAKER_LEAD.as_nanos() as u64));
        }
        let player = Player {
            pipeline,
            src,
            speaker,
            playing: false,
            failed: false,
            ended: false,
            timeline: Timeline::new(speaker),
        };
        // PAUSED opens the file and the audio device: failures show now, not mid-talk.
        player.pipeline.set_state(gst::State::Paused).map_err(|_| {
            media(
                player
                    .bus_error()
                    .unwrap_or_else(|| "the talkback pipeline would not start".into()),
            )
        })?;
        if let Some(e) = player.bus_error() {
            return Err(media(e));
        }
        Ok(player)
    }

    /// Whether this player plays to a speaker (it may have fallen back to the file only).
    pub fn has_speaker(&self) -> bool {
        self.speaker
    }

    /// The first error on the bus, if any (without waiting).
    fn bus_error(&self) -> Option<String> {
        let bus = self.pipeline.bus()?;
        let msg = bus.pop_filtered(&[gst::MessageType::Error])?;
        match msg.view() {
            gst::MessageView::Error(e) => Some(describe(e)),
            _ => None,
        }
    }

    /// Queues one Opus packet (never waits for the pipeline). An error means the pipeline
    /// has failed: the talk is over.
    pub fn push(
        &mut self,
        packet: Bytes,
        hub_us: u64,
        duration: Duration,
    ) -> Result<Pushed, TalkbackError> {
        if self.ended || self.failed {
            return Err(media("the talkback pipeline has ended"));
        }
        let result = self.queue(packet, hub_us, duration);
        self.failed = result.is_err();
        result
    }

    fn queue(
        &mut self,
        packet: Bytes,
        hub_us: u64,
        duration: Duration,
    ) -> Result<Pushed, TalkbackError> {
        if !self.playing {
            self.pipeline.set_state(gst::State::Playing).map_err(|_| {
                media(
                    self.bus_error()
                        .unwrap_or_else(|| "the talkback pipeline would not play".into()),
                )
            })?;
            self.playing = true;
        }
        let now = self
            .pipeline
            .current_running_time()
            .map(|t| t.nseconds())
            .unwrap_or(0);
        let duration_ns = duration.as_nanos() as u64;
        let (pts, discont) = match self.timeline.place(hub_us, duration_ns, now) {
            Placement::At { pts, discont } => (pts, discont),
            Placement::Drop => return Ok(Pushed::Dropped),
        };
        let mut buffer = gst::Buffer::from_slice(packet);
        if let Some(b) = buffer.get_mut() {
            b.set_pts(gst::ClockTime::from_nseconds(pts));
            b.set_duration(gst::ClockTime::from_nseconds(duration_ns));
            if discont {
                b.set_flags(gst::BufferFlags::DISCONT);
            }
        }
        self.src
            .push_buffer(buffer)
            .map_err(|e| media(format!("the talkback pipeline refused a packet: {e:?}")))?;
        if let Some(e) = self.bus_error() {
            return Err(media(e));
        }
        Ok(Pushed::Queued)
    }

    /// Ends the stream, waits until the file is complete (and the speaker has played what
    /// it holds), and stops. Blocking.
    pub fn finish(mut self) -> Result<(), TalkbackError> {
        self.end()
    }

    fn end(&mut self) -> Result<(), TalkbackError> {
        if self.ended {
            return Ok(());
        }
        self.ended = true;
        // A failed pipeline has nothing left to finish (and would not answer).
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
            .map_err(|e| media(format!("ending the talkback stream: {e:?}")))?;
        let now = self
            .pipeline
            .current_running_time()
            .map(|t| t.nseconds())
            .unwrap_or(0);
        let playout = if self.speaker {
            Duration::from_nanos(self.timeline.end().saturating_sub(now)) + SPEAKER_LEAD
        } else {
            Duration::ZERO
        };
        let bus = self
            .pipeline
            .bus()
            .ok_or_else(|| media("the talkback pipeline has no bus"))?;
        let wait = (EOS_WAIT + playout).min(EOS_WAIT + MAX_AHEAD + SPEAKER_LEAD);
        let ended = bus.timed_pop_filtered(
            gst::ClockTime::from_nseconds(wait.as_nanos() as u64),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        );
        match ended.as_ref().map(|m| m.view()) {
            Some(gst::MessageView::Eos(_)) => Ok(()),
            Some(gst::MessageView::Error(e)) => Err(media(describe(e))),
            _ => Err(media("the talkback file was not finished in time")),
        }
    }
}

/// An error message as one line: the element, what failed, and the system's reason when
/// the debug text gives one (its first line is only the source location).
pub(super) fn describe(e: &gst::message::Error) -> String {
    let element = e.src().map(|s| s.name().to_string()).unwrap_or_default();
    let reason = e
        .debug()
        .map(|d| {
            d.lines()
                .skip(1)
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    if reason.is_empty() {
        format!("{element}: {}", e.error())
    } else {
        format!("{element}: {} ({reason})", e.error())
    }
}

impl Drop for Player {
    fn drop(&mut self) {
        let _ = self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn pts(p: Placement) -> u64 {
        match p {
            Placement::At { pts, .. } => pts,
            Placement::Drop => panic!("dropped"),
        }
    }

    #[test]
    fn jitter_is_closed_up_and_pauses_are_kept() {
        let mut t = Timeline::new(false);
        // Arrivals at the hub 0, 35, 37, 60 ms: laid end to end regardless.
        assert_eq!(
            t.place(1_000_000, 20 * MS, 999 * MS),
            Placement::At {
                pts: 0,
                discont: false
            }
        );
        assert_eq!(pts(t.place(1_035_000, 20 * MS, 0)), 20 * MS);
        assert_eq!(pts(t.place(1_037_000, 20 * MS, 0)), 40 * MS);
        assert_eq!(pts(t.place(1_060_000, 20 * MS, 0)), 60 * MS);
        // Half a second of nothing at the hub: a pause.
        assert_eq!(
            t.place(1_560_000, 20 * MS, 0),
            Placement::At {
                pts: 560 * MS,
                discont: true
            }
        );
        // A timestamp going backwards never moves a packet back.
        assert_eq!(pts(t.place(1_000_000, 20 * MS, 0)), 580 * MS);
        assert_eq!(t.end(), 600 * MS);
    }

    #[test]
    fn with_a_speaker_late_packets_play_now_and_far_ahead_ones_drop() {
        let mut t = Timeline::new(true);
        assert_eq!(pts(t.place(0, 20 * MS, 5 * MS)), 5 * MS);
        assert_eq!(pts(t.place(20_000, 20 * MS, 24 * MS)), 25 * MS);
        // The link stalled: the next packet comes 300 ms later, its slot long past.
        assert_eq!(
            t.place(40_000, 20 * MS, 345 * MS),
            Placement::At {
                pts: 345 * MS,
                discont: true
            }
        );
        // Then a burst: end to end up to a second ahead of the clock, the rest dropped.
        let mut placed = 0;
        let mut dropped = 0;
        for i in 0..100u64 {
            match t.place(60_000 + i * 20_000, 20 * MS, 345 * MS) {
                Placement::At { .. } => placed += 1,
                Placement::Drop => dropped += 1,
            }
        }
        assert_eq!((placed, dropped), (50, 50));
        // Live again: the packets play on from where the burst ended, within the bound.
        assert_eq!(pts(t.place(2_060_000, 20 * MS, 365 * MS)), 1365 * MS);
    }
}
