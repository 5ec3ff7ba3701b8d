//! Talkback: a command-centre user's microphone to an officer's device. The console sends
//! Opus over its WebRTC session (a receive-only audio m-line the hub offers); each packet
//! becomes a frame of a relay-core track, and that track goes to the unit's agent like any
//! track goes to a subscriber — group streams on the unit's own QUIC connection — after a
//! `Talkback{on}` control message names it. The agent plays it and keeps it in a file.
//! A WHIP unit (a phone's officer app) hears it on the audio m-line it offered: the
//! session's send track carries every talk (see `whip`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;
use tianwang_core::frame::FrameIn;
use tianwang_core::{GroupWriter, Track, TrackConfig};
use tianwang_proto::v1::{FrameHeader, Talkback};
use tianwang_proto::{ControlMessage, Kind, wire};
use tianwang_transport::{Priority, send_track};
use tracing::{debug, info};

use crate::registry::{Broadcast, TalkPath};

/// The id talkback group streams carry towards a device (its own tracks go the other way).
pub const TRACK_ID: u32 = 0x7a1c;
/// Opus from browsers: 20 ms packets, 48 kHz; one group a second.
const FRAME_US: u32 = 20_000;
const GROUP_FRAMES: u32 = 50;
/// An Opus packet is at most 1275 bytes; anything larger is not one.
const MAX_PACKET: usize = 2048;

static NEXT: AtomicU64 = AtomicU64::new(1);

/// One push-to-talk, from its start to its end.
pub struct Talk {
    pub id: String,
    pub unit: String,
    pub by: String,
    pub started: Instant,
    track: Arc<Track>,
    /// The WHIP session's track, which outlives the talk.
    shared: bool,
    broadcast: Arc<Broadcast>,
    writer: Mutex<Option<GroupWriter>>,
    pub packets: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum TalkError {
    #[error("unit {0:?} is not connected to this hub")]
    NotHere(String),
    #[error("unit {0:?} is not online")]
    Offline(String),
}

impl Talk {
    /// Starts a talk to a unit connected to this hub: tells the device, and sends it the
    /// talk's track on its own connection.
    pub fn start(broadcast: Arc<Broadcast>, by: &str) -> Result<Arc<Talk>, TalkError> {
        if broadcast.is_remote() {
            return Err(TalkError::NotHere(broadcast.unit_id.clone()));
        }
        let path = broadcast
            .talk_path()
            .ok_or_else(|| TalkError::Offline(broadcast.unit_id.clone()))?;
        let id = format!(
            "talk-{}-{}",
            crate::evidence::audit::unix_us() / 1000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let on = ControlMessage::new(Kind::Talkback(Talkback {
            talk_id: id.clone(),
            track_id: TRACK_ID,
            codec: "opus".into(),
            sample_rate: 48_000,
            channels: 2,
            on: true,
            by: by.to_string(),
        }));
        // A QUIC agent needs to hear of the talk before its track arrives; a WHIP unit's
        // app shows it (through its control session, if it has one).
        let delivered = broadcast.send_control(on);
        let (track, shared) = match path {
            TalkPath::Quic(conn) => {
                if !delivered {
                    return Err(TalkError::Offline(broadcast.unit_id.clone()));
                }
                let track = Track::new("talkback", TrackConfig::default(), Arc::default());
                let subscription = track.subscribe();
                let talk_id = id.clone();
                tokio::spawn(async move {
                    let priority = Priority::default();
                    match send_track(
                        &conn,
                        TRACK_ID,
                        &priority,
                        Priority::AUDIO,
                        subscription,
                        |_, _| {},
                    )
                    .await
                    {
                        Ok(summary) => debug!(talk = %talk_id, ?summary, "talkback track ended"),
                        Err(e) => debug!(talk = %talk_id, error = %e, "talkback track ended"),
                    }
                });
                (track, false)
            }
            TalkPath::Whip(track) => (track, true),
        };
        info!(talk = %id, unit = %broadcast.unit_id, %by, "talkback started");
        Ok(Arc::new(Talk {
            id,
            unit: broadcast.unit_id.clone(),
            by: by.to_string(),
            started: Instant::now(),
            track,
            shared,
            broadcast,
            writer: Mutex::new(None),
            packets: AtomicU64::new(0),
        }))
    }

    /// One Opus packet from the console.
    pub fn push(&self, packet: &[u8]) {
        if packet.is_empty() || packet.len() > MAX_PACKET {
            return;
        }
        let header = FrameHeader {
            timestamp_us: crate::evidence::audit::unix_us().max(0) as u64,
            duration_us: FRAME_US,
        };
        let mut buf = BytesMut::with_capacity(wire::encoded_frame_len(&header, packet.len()));
        wire::encode_frame(&header, packet, &mut buf);
        let payload_offset = (buf.len() - packet.len()) as u32;
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if writer
            .as_ref()
            .is_none_or(|w| w.frames_pushed() >= GROUP_FRAMES)
        {
            *writer = Some(self.track.begin_group());
        }
        if let Some(w) = writer.as_mut() {
            w.push(FrameIn {
                payload_offset,
                timestamp_us: header.timestamp_us,
                duration_us: FRAME_US,
                data: buf.freeze(),
                received_at: Instant::now(),
            });
        }
        self.packets.fetch_add(1, Ordering::Relaxed);
    }

    /// Ends the talk: the device is told, the track closes.
    pub fn stop(&self) {
        let off = ControlMessage::new(Kind::Talkback(Talkback {
            talk_id: self.id.clone(),
            track_id: TRACK_ID,
            on: false,
            by: self.by.clone(),
            ..Default::default()
        }));
        self.broadcast.send_control(off);
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if !self.shared {
            self.track.close();
        }
        info!(talk = %self.id, unit = %self.unit, packets = self.packets.load(Ordering::Relaxed),
            "talkback ended");
    }
}

/// Where a console's incoming talk audio goes: the talk under way, if any.
pub type TalkSink = Arc<Mutex<Option<Arc<Talk>>>>;
