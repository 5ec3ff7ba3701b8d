//! Relay frames → RTP on a WebRTC track, one pump per track of a tile (or WHEP viewer).
//!
//! A pump drains its own relay-core subscription, so a console that cannot keep up (a
//! stalled browser, a full send path) skips to the newest group there and never holds the
//! relay back. The first frames of a new tile come from the join cache: their RTP timestamps
//! are packed 1 ms apart so the browser catches up to live at once instead of playing the
//! cached group out at its own pace (audio from the cache is not sent at all).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::RTCRtpCodec;
use tianwang_core::Subscription;
use tokio::sync::watch;
use webrtc::media_stream::Track;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::rtp_transceiver::RtpSender;

use crate::metrics::Metrics;
use crate::registry::Broadcast;

/// RTP payload budget per packet (conservative for tunnels and VPNs).
pub const MTU: usize = 1200;

/// What a tile's pumps count, for its stats and overlay.
#[derive(Debug, Default)]
pub struct TileCounters {
    /// Video frames (the tile's frame rate), and bytes of every track.
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    /// Capture time (device clock, µs) of the newest video frame sent.
    pub last_capture_us: AtomicU64,
    /// Hub clock (µs since the Unix epoch) when it was sent.
    pub last_sent_us: AtomicU64,
    pub dropped: AtomicU64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Video,
    Audio,
}

impl Kind {
    fn clock_rate(self) -> u64 {
        match self {
            Kind::Video => 90_000,
            Kind::Audio => 48_000,
        }
    }
}

/// Maps capture times to RTP timestamps: steady for live frames (following the capture
/// clock, so skipped groups show as the gap they are), packed for the join cache.
struct Timeline {
    kind: Kind,
    rtp: u32,
    last_capture_us: Option<u64>,
}

impl Timeline {
    fn next(&mut self, capture_us: u64, from_cache: bool) -> u32 {
        let rate = self.kind.clock_rate();
        let step = match self.last_capture_us {
            None => 0,
            Some(_) if from_cache => rate / 1000,
            Some(last) => {
                // A device clock that jumps is held to a sane step.
                let delta_us = capture_us.saturating_sub(last).clamp(1_000, 5_000_000);
                delta_us * rate / 1_000_000
            }
        };
        self.rtp = self.rtp.wrapping_add(step as u32);
        self.last_capture_us = Some(capture_us);
        self.rtp
    }
}

pub struct Pump {
    pub kind: Kind,
    /// The codec the track was made for: its payload type is looked up by it.
    pub codec: RTCRtpCodec,
    pub track: Arc<TrackLocalStaticRTP>,
    pub sender: Arc<dyn RtpSender>,
    pub subscription: Subscription,
    /// The unit whose frames these are, for keyframe requests (none for talkback).
    pub broadcast: Option<Arc<Broadcast>>,
    pub counters: Arc<TileCounters>,
    pub metrics: Arc<Metrics>,
    /// True once the PeerConnection is connected and this track negotiated: frames before
    /// that would be lost, and the join cache with them.
    pub ready: watch::Receiver<bool>,
}

pub fn unix_now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl Pump {
    pub async fn run(mut self) {
        if self.ready.wait_for(|r| *r).await.is_err() {
            return;
        }
        let started = Instant::now();
        let payload_type = match self.sender.get_parameters().await {
            Ok(p) => p
                .rtp_parameters
                .codecs
                .iter()
                .find(|c| {
                    c.rtp_codec
                        .mime_type
                        .eq_ignore_ascii_case(&self.codec.mime_type)
                })
                .map(|c| c.payload_type),
            Err(_) => None,
        };
        let (Some(payload_type), Some(&ssrc)) = (payload_type, self.track.ssrcs().await.first())
        else {
            tracing::debug!("track without a negotiated codec or SSRC: not sending");
            return;
        };
        let mut payloader = match self.codec.payloader() {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "no payloader for the track's codec: not sending");
                return;
            }
        };
        let mut timeline = Timeline {
            kind: self.kind,
            rtp: rand::random(),
            last_capture_us: None,
        };
        let mut sequence: u16 = rand::random();
        let track = Arc::clone(&self.track);
        loop {
            let frame = tokio::select! {
                f = self.subscription.next() => match f {
                    Some(f) => f,
                    None => return,
                },
                // Keyframe requests (PLI/FIR) from the browser go to the unit, coalesced.
                event = track.poll() => match event {
                    Some(TrackLocalEvent::OnRtcpPacket(packets)) => {
                        let wants_keyframe = packets.iter().any(|p| {
                            let p = p.as_any();
                            p.is::<PictureLossIndication>() || p.is::<FullIntraRequest>()
                        });
                        if wants_keyframe && self.kind == Kind::Video
                            && let Some(unit) = &self.broadcast
                        {
                            unit.request_keyframe("video");
                        }
                        continue;
                    }
                    Some(_) => continue,
                    None => return,
                },
            };
            let from_cache = frame.received_at < started;
            if from_cache && self.kind == Kind::Audio {
                // Old sound is no use to a new listener.
                continue;
            }
            let payload: Bytes = frame.data.slice(frame.payload_offset as usize..);
            let timestamp = timeline.next(frame.timestamp_us, from_cache);
            let chunks = match self.kind {
                Kind::Video => match payloader.payload(MTU, &payload) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "unpacketizable frame");
                        continue;
                    }
                },
                // One Opus packet is one RTP payload.
                Kind::Audio => vec![payload],
            };
            let last = chunks.len().saturating_sub(1);
            for (i, chunk) in chunks.into_iter().enumerate() {
                let packet = rtc::rtp::Packet {
                    header: rtc::rtp::Header {
                        version: 2,
                        // The last packet of a video frame; audio has no talk spurts here.
                        marker: self.kind == Kind::Video && i == last,
                        payload_type,
                        sequence_number: sequence,
                        timestamp,
                        ssrc,
                        ..Default::default()
                    },
                    payload: chunk,
                };
                sequence = sequence.wrapping_add(1);
                if track.write_rtp(packet).await.is_err() {
                    // Unbound (the tile was removed) or the connection closed.
                    return;
                }
            }
            let now = Instant::now();
            self.metrics.frames_out.inc();
            self.metrics.bytes_out.inc_by(frame.payload_len() as u64);
            if !from_cache {
                self.metrics.forward_latency.observe(
                    now.saturating_duration_since(frame.received_at)
                        .as_secs_f64(),
                );
            }
            let c = &self.counters;
            c.bytes
                .fetch_add(frame.payload_len() as u64, Ordering::Relaxed);
            if self.kind == Kind::Video {
                c.frames.fetch_add(1, Ordering::Relaxed);
                c.last_capture_us
                    .store(frame.timestamp_us, Ordering::Relaxed);
                c.last_sent_us.store(unix_now_us(), Ordering::Relaxed);
                c.dropped
                    .store(self.subscription.stats().dropped(), Ordering::Relaxed);
            }
        }
    }
}

/// Rates of a tile between two samples.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sample {
    frames: u64,
    bytes: u64,
    at: Option<Instant>,
}

impl Sample {
    /// (bitrate bps, frames per second) since the previous sample.
    pub fn rates(&mut self, counters: &TileCounters, now: Instant) -> (u64, f32) {
        let frames = counters.frames.load(Ordering::Relaxed);
        let bytes = counters.bytes.load(Ordering::Relaxed);
        let secs = self
            .at
            .map(|t| now.saturating_duration_since(t).as_secs_f64())
            .unwrap_or(0.0)
            .max(1e-3);
        let rates = match self.at {
            Some(_) => (
                (bytes.saturating_sub(self.bytes) as f64 * 8.0 / secs) as u64,
                (frames.saturating_sub(self.frames) as f64 / secs) as f32,
            ),
            None => (0, 0.0),
        };
        *self = Sample {
            frames,
            bytes,
            at: Some(now),
        };
        rates
    }
}

/// No video frame for this long while the unit is online: the tile shows "stalled".
pub const STALL_AFTER: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_frames_follow_the_capture_clock_and_cached_ones_are_packed() {
        let mut t = Timeline {
            kind: Kind::Video,
            rtp: 1000,
            last_capture_us: None,
        };
        assert_eq!(t.next(10_000_000, true), 1000);
        assert_eq!(t.next(10_033_333, true), 1090, "1 ms apart from the cache");
        assert_eq!(t.next(10_066_666, false), 1090 + 2999, "33 ms at 90 kHz");
        // A skipped second shows as a second.
        assert_eq!(t.next(11_066_666, false), 1090 + 2999 + 90_000);
        // A clock jumping back does not run the timeline backwards.
        assert_eq!(t.next(1_000, false), 1090 + 2999 + 90_000 + 90);
    }
}
