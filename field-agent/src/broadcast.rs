//! The device's own broadcast: encoded frames go into local relay-core tracks, and the
//! uplink is just a subscriber of them. The same bounded queues that protect the hub from a
//! slow viewer protect the device from a slow link: under congestion the uplink skips to the
//! newest group instead of building up delay.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;
use tianwang_core::frame::FrameIn;
use tianwang_core::{GroupWriter, RelayStats, Track, TrackConfig};
use tianwang_proto::v1::{FrameHeader, TrackInfo, TrackKind};
use tianwang_proto::wire;

/// Audio frames are all random-access points; a group is cut every this many (1 s of 20 ms
/// Opus packets) so a late joiner starts within a second of audio.
pub const AUDIO_GROUP_FRAMES: u32 = 50;

pub struct LocalTrack {
    pub info: TrackInfo,
    pub track: Arc<Track>,
    writer: Mutex<Option<GroupWriter>>,
}

impl LocalTrack {
    /// Adds one encoded frame. A video keyframe starts a new group; delta frames before
    /// the first keyframe are dropped (nothing could decode them).
    pub fn push(&self, payload: &[u8], timestamp_us: u64, duration_us: u32, keyframe: bool) {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let new_group = match (self.info.kind(), writer.as_ref()) {
            (TrackKind::Audio, None) => true,
            (TrackKind::Audio, Some(w)) => w.frames_pushed() >= AUDIO_GROUP_FRAMES,
            (_, _) => keyframe,
        };
        if new_group {
            *writer = Some(self.track.begin_group());
        }
        let Some(w) = writer.as_mut() else { return };
        let header = FrameHeader {
            timestamp_us,
            duration_us,
        };
        let mut buf = BytesMut::with_capacity(wire::encoded_frame_len(&header, payload.len()));
        wire::encode_frame(&header, payload, &mut buf);
        let payload_offset = (buf.len() - payload.len()) as u32;
        w.push(FrameIn {
            data: buf.freeze(),
            payload_offset,
            timestamp_us,
            duration_us,
            received_at: Instant::now(),
        });
    }
}

/// Something that can make the encoder emit a keyframe soon.
pub type KeyframeHook = Box<dyn Fn(&str) + Send + Sync>;

pub struct LocalBroadcast {
    pub unit: String,
    pub tracks: Vec<LocalTrack>,
    keyframe_hook: Mutex<Option<KeyframeHook>>,
    pub stats: Arc<RelayStats>,
}

impl LocalBroadcast {
    /// `queue_frames` bounds what the uplink may lag behind the encoder.
    pub fn new(unit: &str, infos: Vec<TrackInfo>, queue_frames: usize) -> Arc<Self> {
        let stats = Arc::new(RelayStats::default());
        let config = TrackConfig {
            queue_frames,
            ..TrackConfig::default()
        };
        Arc::new(Self {
            unit: unit.to_string(),
            tracks: infos
                .into_iter()
                .map(|info| LocalTrack {
                    track: Track::new(info.name.clone(), config, Arc::clone(&stats)),
                    info,
                    writer: Mutex::new(None),
                })
                .collect(),
            keyframe_hook: Mutex::new(None),
            stats,
        })
    }

    pub fn track(&self, kind: TrackKind) -> Option<&LocalTrack> {
        self.tracks.iter().find(|t| t.info.kind() == kind)
    }

    pub fn set_keyframe_hook(&self, hook: KeyframeHook) {
        *self.keyframe_hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// The hub asked for a keyframe on the track it knows by `track_id`.
    pub fn request_keyframe(&self, track_id: u32) {
        let Some(t) = self.tracks.iter().find(|t| t.info.id == track_id) else {
            return;
        };
        if let Some(hook) = self
            .keyframe_hook
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            hook(&t.info.name);
        }
    }

    pub fn infos(&self) -> Vec<TrackInfo> {
        self.tracks.iter().map(|t| t.info.clone()).collect()
    }
}

pub fn video_info(id: u32, width: u32, height: u32, framerate: u32, bitrate: u32) -> TrackInfo {
    TrackInfo {
        id,
        name: "video".into(),
        kind: TrackKind::Video as i32,
        codec: "h264".into(),
        width,
        height,
        framerate,
        bitrate,
        ..Default::default()
    }
}

pub fn audio_info(id: u32) -> TrackInfo {
    TrackInfo {
        id,
        name: "audio".into(),
        kind: TrackKind::Audio as i32,
        codec: "opus".into(),
        sample_rate: 48_000,
        channels: 1,
        bitrate: 32_000,
        ..Default::default()
    }
}
