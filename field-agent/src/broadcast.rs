//! The device's own broadcast: encoded frames go into local relay-core tracks, and the
//! uplink is just a subscriber of them. The same bounded queues that protect the hub from a
//! slow viewer protect the device from a slow link: under congestion the uplink skips to the
//! newest group instead of building up delay.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tianwang_core::frame::FrameIn;
use tianwang_core::{GroupWriter, RelayStats, Track, TrackConfig};
use tianwang_proto::v1::{FrameHeader, TrackInfo, TrackKind};
use tianwang_proto::wire;

/// Audio frames are all random-access points; a group is cut every this many (1 s of 20 ms
/// Opus packets) so a late joiner starts within a second of audio.
pub const AUDIO_GROUP_FRAMES: u32 = 50;

/// Access units of the newest video group kept for a snapshot; a longer group is cut here
/// (its first frames still decode to a picture).
pub const PICTURE_FRAMES: usize = 1024;

pub struct LocalTrack {
    pub info: TrackInfo,
    pub track: Arc<Track>,
    writer: Mutex<Writer>,
    /// The broadcast's live switch (STOP_LIVE / GO_LIVE).
    live: Arc<AtomicBool>,
    /// Where every frame is kept, live or not, until the hub has recorded it.
    spool: Arc<OnceLock<Arc<crate::spool::Spool>>>,
}

#[derive(Default)]
struct Writer {
    group: Option<GroupWriter>,
    /// Video: the payloads of the newest group from its keyframe, kept whether live or not
    /// so that a snapshot works while the unit is off live. They share the frames' memory.
    picture: Vec<Bytes>,
}

impl LocalTrack {
    /// Adds one encoded frame. A video keyframe starts a new group; delta frames before
    /// the first keyframe are dropped (nothing could decode them). Off live, frames go
    /// nowhere but the snapshot picture.
    pub fn push(&self, payload: &[u8], timestamp_us: u64, duration_us: u32, keyframe: bool) {
        let mut state = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let header = FrameHeader {
            timestamp_us,
            duration_us,
        };
        let mut buf = BytesMut::with_capacity(wire::encoded_frame_len(&header, payload.len()));
        wire::encode_frame(&header, payload, &mut buf);
        let payload_offset = buf.len() - payload.len();
        let data = buf.freeze();
        // The spool keeps evidence whether the unit is live or not.
        if let Some(spool) = self.spool.get() {
            spool.frame(
                self.info.id,
                self.info.kind(),
                data.clone(),
                timestamp_us,
                duration_us,
                keyframe,
            );
        }
        if self.info.kind() == TrackKind::Video {
            if keyframe {
                state.picture.clear();
            }
            if (keyframe || !state.picture.is_empty()) && state.picture.len() < PICTURE_FRAMES {
                state.picture.push(data.slice(payload_offset..));
            }
        }
        // Checked under the writer's lock, so set_live(false) ends the group for good.
        if !self.live.load(Ordering::Acquire) {
            state.group = None;
            return;
        }
        let writer = &mut state.group;
        let new_group = match (self.info.kind(), writer.as_ref()) {
            (TrackKind::Audio, None) => true,
            (TrackKind::Audio, Some(w)) => w.frames_pushed() >= AUDIO_GROUP_FRAMES,
            (_, _) => keyframe,
        };
        if new_group {
            *writer = Some(self.track.begin_group());
        }
        let Some(w) = writer.as_mut() else { return };
        w.push(FrameIn {
            data,
            payload_offset: payload_offset as u32,
            timestamp_us,
            duration_us,
            received_at: Instant::now(),
        });
    }

    /// The access units of the newest video group, keyframe first (empty before the
    /// first keyframe, and for audio).
    pub fn picture(&self) -> Vec<Bytes> {
        self.writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .picture
            .clone()
    }
}

/// Something that can make the encoder emit a keyframe soon.
pub type KeyframeHook = Box<dyn Fn(&str) + Send + Sync>;

/// A live encoder's bitrate, for adaptive bitrate: the cap it may not exceed (configured,
/// or the hub's QUALITY), and the target it is steered to below that.
pub trait RateControl: Send + Sync {
    /// kbit/s
    fn cap(&self) -> u32;
    /// Aims the encoder at `kbps` (at most the cap).
    fn steer(&self, kbps: u32);
    /// Shrinks the picture below the bitrate floor (its size, then its frame rate).
    fn picture(&self, picture: crate::abr::Picture);
}

pub struct LocalBroadcast {
    pub unit: String,
    pub tracks: Vec<LocalTrack>,
    keyframe_hook: Mutex<Option<KeyframeHook>>,
    pub stats: Arc<RelayStats>,
    live: Arc<AtomicBool>,
    /// The video's quality since the last QUALITY directive (bitrate bit/s, width,
    /// height), announced on the next connection instead of the start-up figures.
    video_quality: Mutex<Option<(u32, u32, u32)>>,
    spool: Arc<OnceLock<Arc<crate::spool::Spool>>>,
    rate: OnceLock<Arc<dyn RateControl>>,
}

impl LocalBroadcast {
    /// `queue_frames` bounds what the uplink may lag behind the encoder.
    pub fn new(unit: &str, infos: Vec<TrackInfo>, queue_frames: usize) -> Arc<Self> {
        let stats = Arc::new(RelayStats::default());
        // Units start live.
        let live = Arc::new(AtomicBool::new(true));
        let spool = Arc::new(OnceLock::new());
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
                    writer: Mutex::new(Writer::default()),
                    live: Arc::clone(&live),
                    spool: Arc::clone(&spool),
                })
                .collect(),
            keyframe_hook: Mutex::new(None),
            stats,
            live,
            video_quality: Mutex::new(None),
            spool,
            rate: OnceLock::new(),
        })
    }

    /// The live encoder adaptive bitrate steers (none for replayed clips).
    pub fn set_rate_control(&self, rate: Arc<dyn RateControl>) {
        let _ = self.rate.set(rate);
    }

    pub fn rate_control(&self) -> Option<&Arc<dyn RateControl>> {
        self.rate.get()
    }

    /// Keeps every frame from now on in `spool` (once; a second spool is ignored).
    pub fn set_spool(&self, spool: Arc<crate::spool::Spool>) {
        let _ = self.spool.set(spool);
    }

    pub fn spool(&self) -> Option<&Arc<crate::spool::Spool>> {
        self.spool.get()
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Turns sending media on or off; returns whether it was on. Off: the group being
    /// sent ends at once and the cached group is forgotten, so no picture from before the
    /// stop reaches the hub later (a reconnect would otherwise replay it). On: the next
    /// keyframe, asked for now, starts the first group.
    pub fn set_live(&self, live: bool) -> bool {
        let was = self.live.swap(live, Ordering::AcqRel);
        if live {
            for t in &self.tracks {
                if t.info.kind() == TrackKind::Video {
                    self.request_keyframe(t.info.id);
                }
            }
        } else {
            for t in &self.tracks {
                t.writer.lock().unwrap_or_else(|e| e.into_inner()).group = None;
                t.track.clear_cache();
            }
        }
        was
    }

    /// Records the video's new quality for the next Announce.
    pub fn note_video_quality(&self, bitrate_kbps: u32, width: u32, height: u32) {
        *self.video_quality.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((bitrate_kbps.saturating_mul(1000), width, height));
    }

    pub fn track(&self, kind: TrackKind) -> Option<&LocalTrack> {
        self.tracks.iter().find(|t| t.info.kind() == kind)
    }

    pub fn set_keyframe_hook(&self, hook: KeyframeHook) {
        *self.keyframe_hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// The hub asked for a keyframe on the track it knows by `track_id`. Returns whether
    /// an encoder was there to ask (a simulated unit's clip has none).
    pub fn request_keyframe(&self, track_id: u32) -> bool {
        let Some(t) = self.tracks.iter().find(|t| t.info.id == track_id) else {
            return false;
        };
        match self
            .keyframe_hook
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(hook) => {
                hook(&t.info.name);
                true
            }
            None => false,
        }
    }

    /// The tracks as announced to the hub, with the video's current quality.
    pub fn infos(&self) -> Vec<TrackInfo> {
        let quality = *self.video_quality.lock().unwrap_or_else(|e| e.into_inner());
        self.tracks
            .iter()
            .map(|t| {
                let mut info = t.info.clone();
                if let (TrackKind::Video, Some((bitrate, width, height))) = (info.kind(), quality) {
                    info.bitrate = bitrate;
                    info.width = width;
                    info.height = height;
                }
                info
            })
            .collect()
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
