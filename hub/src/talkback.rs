//! Talkback: a command-centre user's microphone to an officer's device. The console sends
//! Opus over its WebRTC session (a receive-only audio m-line the hub offers); each packet
//! becomes a frame of a relay-core track, and that track goes to the unit's agent like any
//! track goes to a subscriber — group streams on the unit's own QUIC connection — after a
//! `Talkback{on}` control message names it. The agent plays it and keeps it in a file.
//! A WHIP unit (a phone's officer app) hears it on the audio m-line it offered: the
//! session's send track carries every talk (see `whip`).
//!
//! A remote video link is a talk with the console's camera as well: the console sends it
//! on a receive-only video m-line, [`link_video`] assembles its RTP into frames (as WHIP
//! ingest does) on a second track, sent to the agent beside the audio once the codec is
//! known (a second `Talkback{on}` names it), and both tracks are recorded as the
//! official's side of the link (`<unit>~official`, bound to the unit's case).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use prometheus::IntCounterVec;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use tianwang_core::codec::VideoCodec;
use tianwang_core::frame::FrameIn;
use tianwang_core::reorder::{Released, Reorder};
use tianwang_core::{GroupWriter, Track, TrackConfig};
use tianwang_proto::v1::{FrameHeader, Talkback, TrackInfo, TrackKind};
use tianwang_proto::{ControlMessage, Kind, wire};
use tianwang_transport::{Priority, send_track};
use tracing::{debug, info, warn};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};

use crate::evidence::recorder::{Extra, Extras, official_chain};
use crate::registry::{Broadcast, TalkPath};
use crate::whip::media::{Assembler, Keyframes, REORDER_PACKETS, REORDER_WAIT};

/// The id talkback group streams carry towards a device (its own tracks go the other way).
pub const TRACK_ID: u32 = 0x7a1c;
/// The id of a video link's camera track towards a device.
pub const VIDEO_TRACK_ID: u32 = 0x7a1d;
/// The largest camera frame taken from a console (and the agent's limit for one).
pub const MAX_VIDEO_FRAME: usize = 4 << 20;
/// Keyframe requests to the console's camera, at most this often.
const PLI_INTERVAL: Duration = Duration::from_millis(300);
/// A keyframe asked for and not come by then is asked for again.
const PLI_AGAIN: Duration = Duration::from_secs(1);
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
    /// A video link: the console's camera, its codec once the console's line has one, and
    /// where the official's side is recorded.
    video: Option<Arc<Track>>,
    video_codec: OnceLock<VideoCodec>,
    recording: Option<Extras>,
    pub video_frames: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum TalkError {
    #[error("unit {0:?} is not connected to this hub")]
    NotHere(String),
    #[error("unit {0:?} is not online")]
    Offline(String),
    #[error(
        "unit {0:?} publishes through the officer app, which takes talk but not video: a video link needs a field agent"
    )]
    NoVideo(String),
}

impl Talk {
    /// Starts a talk to a unit connected to this hub: tells the device, and sends it the
    /// talk's track on its own connection. With `video` (a video link: QUIC agents only)
    /// a camera track as well, recorded through `recording` once its codec is known.
    pub fn start(
        broadcast: Arc<Broadcast>,
        by: &str,
        video: Option<Extras>,
    ) -> Result<Arc<Talk>, TalkError> {
        if broadcast.is_remote() {
            return Err(TalkError::NotHere(broadcast.unit_id.clone()));
        }
        let path = broadcast
            .talk_path()
            .ok_or_else(|| TalkError::Offline(broadcast.unit_id.clone()))?;
        if video.is_some() && matches!(path, TalkPath::Whip(_)) {
            return Err(TalkError::NoVideo(broadcast.unit_id.clone()));
        }
        let with_video = video.is_some();
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
            video_track_id: if with_video { VIDEO_TRACK_ID } else { 0 },
            video_codec: String::new(),
        }));
        // A QUIC agent needs to hear of the talk before its track arrives; a WHIP unit's
        // app shows it (through its control session, if it has one).
        let delivered = broadcast.send_control(on);
        let (track, shared, video_track) = match path {
            TalkPath::Quic(conn) => {
                if !delivered {
                    return Err(TalkError::Offline(broadcast.unit_id.clone()));
                }
                let priority = Priority::default();
                let track = Track::new("talkback", TrackConfig::default(), Arc::default());
                send_to_device(&conn, &id, TRACK_ID, &priority, Priority::AUDIO, &track);
                let video_track = with_video.then(|| {
                    let t = Track::new("link-video", TrackConfig::default(), Arc::default());
                    send_to_device(&conn, &id, VIDEO_TRACK_ID, &priority, 0, &t);
                    t
                });
                (track, false, video_track)
            }
            TalkPath::Whip(track) => (track, true, None),
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
            video: video_track,
            video_codec: OnceLock::new(),
            recording: video,
            video_frames: AtomicU64::new(0),
        }))
    }

    pub fn has_video(&self) -> bool {
        self.video.is_some()
    }

    /// The console's camera line has a codec: the device is told (its frames follow), and
    /// the official's side starts recording. Once per talk.
    fn video_codec_known(&self, codec: VideoCodec) {
        if self.video_codec.set(codec).is_err() {
            return;
        }
        let Some(video) = &self.video else { return };
        let on = ControlMessage::new(Kind::Talkback(Talkback {
            talk_id: self.id.clone(),
            track_id: TRACK_ID,
            codec: "opus".into(),
            sample_rate: 48_000,
            channels: 2,
            on: true,
            by: self.by.clone(),
            video_track_id: VIDEO_TRACK_ID,
            video_codec: codec.name().into(),
        }));
        if !self.broadcast.send_control(on) {
            warn!(talk = %self.id, "the device's control queue is full: it may not show the link");
        }
        let Some(extras) = &self.recording else {
            return;
        };
        let recorded = extras.record(Extra {
            chain: official_chain(&self.unit),
            unit: self.unit.clone(),
            by: self.by.clone(),
            video: (
                TrackInfo {
                    name: "video".into(),
                    kind: TrackKind::Video as i32,
                    codec: codec.name().into(),
                    ..Default::default()
                },
                Arc::clone(video),
            ),
            audio: Some((
                TrackInfo {
                    id: 1,
                    name: "audio".into(),
                    kind: TrackKind::Audio as i32,
                    codec: "opus".into(),
                    sample_rate: 48_000,
                    channels: 2,
                    ..Default::default()
                },
                Arc::clone(&self.track),
            )),
        });
        if !recorded {
            warn!(talk = %self.id, "the official's side of the link is not recorded (recording is off)");
        }
    }

    /// The chain the official's side is recorded in, for a video link.
    pub fn recording_chain(&self) -> Option<String> {
        self.video.as_ref().map(|_| official_chain(&self.unit))
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
        if let Some(v) = &self.video {
            v.close();
        }
        info!(talk = %self.id, unit = %self.unit, packets = self.packets.load(Ordering::Relaxed),
            "talkback ended");
    }
}

/// Where a console's incoming talk audio goes: the talk under way, if any.
pub type TalkSink = Arc<Mutex<Option<Arc<Talk>>>>;

/// Sends a talk's track to the device on its own connection until the track closes.
fn send_to_device(
    conn: &quinn::Connection,
    talk: &str,
    track_id: u32,
    priority: &Priority,
    base: i32,
    track: &Arc<Track>,
) {
    let subscription = track.subscribe();
    let (conn, priority, talk) = (conn.clone(), priority.clone(), talk.to_string());
    tokio::spawn(async move {
        match send_track(&conn, track_id, &priority, base, subscription, |_, _| {}).await {
            Ok(summary) => debug!(%talk, track_id, ?summary, "talk track ended"),
            Err(e) => debug!(%talk, track_id, error = %e, "talk track ended"),
        }
    });
}

/// A link's camera: a broken group asks the console for a keyframe (sent as PLI by
/// [`link_video`], which owns the RTP track); until one begins a group, the link waits.
struct LinkKeyframes {
    wanted: Arc<AtomicBool>,
    awaiting: Arc<AtomicBool>,
}

impl Keyframes for LinkKeyframes {
    fn request(&self) {
        self.wanted.store(true, Ordering::Relaxed);
        self.awaiting.store(true, Ordering::Relaxed);
    }

    fn arrived(&self) {
        self.awaiting.store(false, Ordering::Relaxed);
    }
}

/// A console's camera line, for as long as the PeerConnection has it: RTP in sequence
/// order into the video track of the link under way (between links it is dropped). Each
/// new link starts at a keyframe the console is asked for.
pub async fn link_video(track: Arc<dyn TrackRemote>, sink: TalkSink, dropped: IntCounterVec) {
    let mut reorder = Reorder::new(REORDER_PACKETS, REORDER_WAIT);
    let mut released = Vec::new();
    let wanted = Arc::new(AtomicBool::new(false));
    let awaiting = Arc::new(AtomicBool::new(false));
    let mut current: Option<(Arc<Talk>, Assembler)> = None;
    let mut codec: Option<VideoCodec> = None;
    let mut ssrc: Option<u32> = None;
    let mut last_pli: Option<Instant> = None;
    loop {
        let deadline = reorder.deadline();
        tokio::select! {
            event = track.poll() => match event {
                Some(TrackRemoteEvent::OnRtpPacket(p)) => {
                    ssrc.get_or_insert(p.header.ssrc);
                    let seq = p.header.sequence_number;
                    reorder.push(seq, p, Instant::now(), &mut |r| released.push(r));
                }
                Some(_) => continue,
                None => break,
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into()), if deadline.is_some() => {
                reorder.poll(Instant::now(), &mut |r| released.push(r));
            }
        }
        let talk = sink
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|t| t.has_video());
        let same = match (&talk, &current) {
            (Some(t), Some((c, _))) => Arc::ptr_eq(t, c),
            (None, None) => true,
            _ => false,
        };
        if !same {
            current = None;
            if let Some(t) = talk {
                if codec.is_none()
                    && let Some(s) = ssrc
                {
                    codec = track.codec(s).await.and_then(|c| {
                        let mime = c.mime_type.to_ascii_lowercase();
                        VideoCodec::from_name(mime.trim_start_matches("video/"))
                    });
                }
                match (codec, t.video.clone()) {
                    (Some(c), Some(out)) => {
                        t.video_codec_known(c);
                        let keyframes = Box::new(LinkKeyframes {
                            wanted: Arc::clone(&wanted),
                            awaiting: Arc::clone(&awaiting),
                        });
                        let a = Assembler::new(
                            c,
                            out,
                            keyframes,
                            MAX_VIDEO_FRAME,
                            dropped.clone(),
                            true,
                        );
                        current = Some((t, a));
                        // The link starts at a fresh picture.
                        wanted.store(true, Ordering::Relaxed);
                        awaiting.store(true, Ordering::Relaxed);
                    }
                    _ => {
                        if ssrc.is_some() {
                            dropped.with_label_values(&["codec"]).inc();
                        }
                    }
                }
            }
        }
        for r in released.drain(..) {
            let Some((talk, assembler)) = current.as_mut() else {
                continue;
            };
            match r {
                Released::Packet(p) => {
                    assembler.packet(&p);
                    if p.header.marker {
                        talk.video_frames.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Released::Lost(n) => assembler.lost(n),
            }
        }
        // Asked again while no keyframe came: a PLI or the keyframe it brought can be lost,
        // and nothing of the link plays until one arrives.
        let again =
            awaiting.load(Ordering::Relaxed) && last_pli.is_some_and(|t| t.elapsed() >= PLI_AGAIN);
        if current.is_some()
            && last_pli.is_none_or(|t| t.elapsed() >= PLI_INTERVAL)
            && let Some(s) = ssrc
            && (wanted.swap(false, Ordering::Relaxed) || again)
        {
            last_pli = Some(Instant::now());
            let pli = PictureLossIndication {
                sender_ssrc: 0,
                media_ssrc: s,
            };
            if let Err(e) = track.write_rtcp(vec![Box::new(pli)]).await {
                debug!(error = %e, "asking the console's camera for a keyframe");
            }
        }
    }
}
