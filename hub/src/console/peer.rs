//! One WebRTC PeerConnection (webrtc-rs) carrying tiles: for a console session (the hub
//! offers, tiles come and go by renegotiation) or a WHEP viewer (the player offers).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rtc::interceptor::Registry;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_H264, MIME_TYPE_OPUS, MIME_TYPE_VP8, MediaEngine,
};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::transport::RTCIceCandidateInit;
use rtc::rtp_transceiver::rtp_sender::RTCPFeedback;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RtpCodecKind,
};
use tianwang_core::Subscription;
use tianwang_core::codec::VideoCodec;
use tianwang_proto::v1::{IceCandidate, TrackKind};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCIceGatheringState,
    RTCPeerConnectionIceEvent, RTCPeerConnectionState, SettingEngineBuilder,
};
use webrtc::rtp_transceiver::RtpSender;

use super::media::{Kind, Pump, TileCounters};
use crate::metrics::Metrics;
use crate::registry::{Broadcast, TrackEntry};

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("WebRTC: {0}")]
    WebRtc(#[from] webrtc::error::Error),
    #[error("{0}")]
    Refused(String),
}

/// What the PeerConnection reports to its owner.
#[derive(Debug)]
pub enum PeerEvent {
    LocalCandidate(IceCandidate),
    GatheringComplete,
    State(RTCPeerConnectionState),
}

#[derive(Clone)]
struct Handler {
    events: mpsc::UnboundedSender<PeerEvent>,
    /// The console's microphone goes to the talk under way (console sessions only).
    talk: crate::talkback::TalkSink,
    /// A publishing peer (WHIP): every remote track goes to its owner.
    ingest: Option<mpsc::UnboundedSender<Arc<dyn TrackRemote>>>,
    link_dropped: prometheus::IntCounterVec,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let Ok(init) = event.candidate.to_json() {
            let _ = self.events.send(PeerEvent::LocalCandidate(IceCandidate {
                candidate: init.candidate,
                sdp_mid: init.sdp_mid.unwrap_or_default(),
                sdp_mline_index: u32::from(init.sdp_mline_index.unwrap_or(0)),
                username_fragment: init.username_fragment.unwrap_or_default(),
            }));
        }
    }

    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.events.send(PeerEvent::GatheringComplete);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.events.send(PeerEvent::State(state));
    }

    /// A console sends its microphone, for talkback, and its camera, for a video link.
    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        if let Some(ingest) = &self.ingest {
            let _ = ingest.send(track);
            return;
        }
        if track.kind().await == RtpCodecKind::Video {
            tokio::spawn(crate::talkback::link_video(
                track,
                Arc::clone(&self.talk),
                self.link_dropped.clone(),
            ));
            return;
        }
        let talk = Arc::clone(&self.talk);
        tokio::spawn(async move {
            while let Some(event) = track.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(packet) = event {
                    // Between talks the browser may still send (or send silence): dropped.
                    let current = talk.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    if let Some(t) = current {
                        t.push(&packet.payload);
                    }
                }
            }
        });
    }
}

fn h264() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_H264.into(),
        clock_rate: 90_000,
        channels: 0,
        // Constrained baseline, what the field agents send and every browser decodes.
        sdp_fmtp_line: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"
            .into(),
        // The default interceptors add "nack" and "nack pli" themselves.
        rtcp_feedback: vec![RTCPFeedback {
            typ: "ccm".into(),
            parameter: "fir".into(),
        }],
    }
}

fn vp8() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.into(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: vec![RTCPFeedback {
            typ: "ccm".into(),
            parameter: "fir".into(),
        }],
    }
}

/// The WebRTC codec a unit's video goes out in.
fn video_codec(codec: VideoCodec) -> RTCRtpCodec {
    match codec {
        VideoCodec::H264 => h264(),
        VideoCodec::Vp8 => vp8(),
    }
}

fn opus() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.into(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".into(),
        rtcp_feedback: vec![],
    }
}

/// Where a PeerConnection's UDP sockets bind (one per connection; the host candidates).
#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub ips: Vec<IpAddr>,
}

/// A tile's tracks on the PeerConnection.
struct PeerTile {
    senders: Vec<Arc<dyn RtpSender>>,
    pumps: Vec<AbortHandle>,
    counters: Arc<TileCounters>,
    sample: super::media::Sample,
    unit: Arc<Broadcast>,
}

pub struct Peer {
    pc: Arc<dyn PeerConnection>,
    tiles: HashMap<String, PeerTile>,
    /// Set when connected: pumps wait for it (frames before would be lost).
    connected: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    pumps: tokio::task::JoinSet<()>,
    /// The receive-only audio transceiver for talkback, once asked for.
    talk: Option<Arc<dyn webrtc::rtp_transceiver::RtpTransceiver>>,
    /// The receive-only video transceiver for a video link's camera, once asked for.
    link: Option<Arc<dyn webrtc::rtp_transceiver::RtpTransceiver>>,
    pub talk_sink: crate::talkback::TalkSink,
}

impl Peer {
    pub async fn new(
        config: &PeerConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, mpsc::UnboundedReceiver<PeerEvent>), PeerError> {
        Self::build(config, metrics, None, None).await
    }

    /// A peer that receives media (a WHIP publisher) in one video codec: its remote tracks
    /// arrive on the returned channel.
    #[allow(clippy::type_complexity)]
    pub async fn new_ingest(
        config: &PeerConfig,
        metrics: Arc<Metrics>,
        video: VideoCodec,
    ) -> Result<
        (
            Self,
            mpsc::UnboundedReceiver<PeerEvent>,
            mpsc::UnboundedReceiver<Arc<dyn TrackRemote>>,
        ),
        PeerError,
    > {
        let (tx, rx) = mpsc::unbounded_channel();
        let (peer, events) = Self::build(config, metrics, Some(tx), Some(video)).await?;
        Ok((peer, events, rx))
    }

    async fn build(
        config: &PeerConfig,
        metrics: Arc<Metrics>,
        ingest: Option<mpsc::UnboundedSender<Arc<dyn TrackRemote>>>,
        ingest_video: Option<VideoCodec>,
    ) -> Result<(Self, mpsc::UnboundedReceiver<PeerEvent>), PeerError> {
        let mut engine = MediaEngine::default();
        // Viewers get both (a unit's codec is its own); a publisher exactly the one chosen
        // from its offer, so the answer leaves it no other.
        if ingest_video.is_none_or(|v| v == VideoCodec::H264) {
            engine.register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: h264(),
                    payload_type: 102,
                },
                RtpCodecKind::Video,
            )?;
        }
        if ingest_video.is_none_or(|v| v == VideoCodec::Vp8) {
            engine.register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: vp8(),
                    payload_type: 96,
                },
                RtpCodecKind::Video,
            )?;
        }
        if ingest_video == Some(VideoCodec::H264) {
            // Publishers (browsers, cameras) offer baseline without the constraint flag too.
            engine.register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: RTCRtpCodec {
                        sdp_fmtp_line:
                            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f"
                                .into(),
                        ..h264()
                    },
                    payload_type: 103,
                },
                RtpCodecKind::Video,
            )?;
        }
        engine.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: opus(),
                payload_type: 111,
            },
            RtpCodecKind::Audio,
        )?;
        // NACK responder, reports, and the forwarder of keyframe requests to the pumps.
        let registry = register_default_interceptors(Registry::new(), &mut engine)?;
        let registry = registry.with(
            rtc::interceptor::Slot::from(14_000),
            super::rtcp::KeyframeRequests::default(),
        );
        let (events, rx) = mpsc::unbounded_channel();
        let talk_sink = crate::talkback::TalkSink::default();
        let addrs: Vec<String> = config.ips.iter().map(|ip| format!("{ip}:0")).collect();
        // No mDNS: its default mode binds a multicast socket on :5353 for every connection.
        // The viewer's first checks arrive before its trickled candidates, so its address is
        // first known as peer-reflexive: the default 1 s wait before nominating such a pair
        // (there to prefer host pairs) made every new tile's first frame 1 s late, and the
        // hub gathers host candidates only, so nothing better can turn up. Checks go out on a
        // tick, and the nomination waits for the next one: every 20 ms instead of 200, 70 of
        // them, so a pair is still given up after 1.4 s.
        let settings = SettingEngineBuilder::new()
            .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
            .with_prflx_acceptance_min_wait(Some(Duration::ZERO))
            .with_ice_connection_attempts(Some(Duration::from_millis(20)), Some(70))
            .build();
        let pc = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_setting_engine(settings)
            .with_media_engine(engine)
            .with_interceptor_registry(registry)
            .with_handler(Arc::new(Handler {
                events,
                talk: Arc::clone(&talk_sink),
                ingest,
                link_dropped: metrics.link_dropped.clone(),
            }))
            .with_udp_addrs(addrs)
            .build()
            .await?;
        metrics.webrtc_peers.inc();
        Ok((
            Self {
                pc: Arc::new(pc),
                tiles: HashMap::new(),
                connected: watch::channel(false).0,
                metrics,
                pumps: tokio::task::JoinSet::new(),
                talk: None,
                link: None,
                talk_sink,
            },
            rx,
        ))
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.send_replace(connected);
    }

    /// Adds a tile's tracks (video, and audio if the unit has it). The stream id of both is
    /// the tile id, so the console can tell which tile a track belongs to. Returns the mids.
    pub async fn attach(
        &mut self,
        tile_id: &str,
        unit: Arc<Broadcast>,
        tracks: Vec<(Arc<TrackEntry>, Subscription)>,
    ) -> Result<(String, String), PeerError> {
        let counters = Arc::new(TileCounters::default());
        let mut tile = PeerTile {
            senders: Vec::new(),
            pumps: Vec::new(),
            counters: Arc::clone(&counters),
            sample: super::media::Sample::default(),
            unit: Arc::clone(&unit),
        };
        let mut mids = (String::new(), String::new());
        for (entry, subscription) in tracks {
            let video = VideoCodec::from_name(&entry.info.codec).unwrap_or_default();
            let (kind, codec, rtp_kind) = match entry.info.kind() {
                TrackKind::Video => (Kind::Video, video_codec(video), RtpCodecKind::Video),
                TrackKind::Audio => (Kind::Audio, opus(), RtpCodecKind::Audio),
                TrackKind::Unspecified => continue,
            };
            let (track, sender, mid) = self
                .add_sender(tile_id, &entry.info.name, codec.clone(), rtp_kind)
                .await?;
            if let Some(mid) = mid {
                match kind {
                    Kind::Video => mids.0 = mid,
                    Kind::Audio => mids.1 = mid,
                }
            }
            let pump = Pump {
                kind,
                codec,
                track,
                sender: Arc::clone(&sender),
                subscription,
                broadcast: Some(Arc::clone(&unit)),
                counters: Arc::clone(&counters),
                metrics: Arc::clone(&self.metrics),
                ready: self.connected.subscribe(),
            };
            tile.pumps.push(self.pumps.spawn(pump.run()));
            tile.senders.push(sender);
        }
        if tile.senders.is_empty() {
            return Err(PeerError::Refused(format!(
                "unit {:?} has no video or audio track",
                unit.unit_id
            )));
        }
        self.tiles.insert(tile_id.to_string(), tile);
        self.metrics.console_tiles.inc();
        Ok(mids)
    }

    /// A send track on the connection (on an offered transceiver of its kind, if the remote
    /// side offered one), with its sender and its mid once negotiated.
    async fn add_sender(
        &self,
        stream_id: &str,
        name: &str,
        codec: RTCRtpCodec,
        kind: RtpCodecKind,
    ) -> Result<(Arc<TrackLocalStaticRTP>, Arc<dyn RtpSender>, Option<String>), PeerError> {
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            stream_id.to_string(),
            format!("{stream_id}-{name}"),
            name.to_string(),
            kind,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(rand::random()),
                    ..Default::default()
                },
                codec,
                ..Default::default()
            }],
        )));
        let sender = self
            .pc
            .add_track(Arc::clone(&track) as Arc<dyn TrackLocal>)
            .await?;
        let mut mid = None;
        for t in self.pc.get_transceivers().await {
            if let Ok(Some(s)) = t.sender().await
                && s.id() == sender.id()
            {
                mid = t.mid().await.ok().flatten();
            }
        }
        Ok((track, sender, mid))
    }

    /// Sends a talkback track (Opus) to a WHIP publisher, on the audio m-line it offered
    /// to receive on: before the answer is made, so the answer says sendrecv.
    pub async fn send_talkback(
        &mut self,
        talk: &Arc<tianwang_core::Track>,
    ) -> Result<(), PeerError> {
        let (track, sender, _) = self
            .add_sender("talkback", "talkback", opus(), RtpCodecKind::Audio)
            .await?;
        let pump = Pump {
            kind: Kind::Audio,
            codec: opus(),
            track,
            sender,
            subscription: talk.subscribe(),
            broadcast: None,
            counters: Arc::default(),
            metrics: Arc::clone(&self.metrics),
            ready: self.connected.subscribe(),
        };
        self.pumps.spawn(pump.run());
        Ok(())
    }

    /// Stops a tile's media and takes its tracks off the connection (their transceivers are
    /// reused by the next tile of the same kind).
    pub async fn detach(&mut self, tile_id: &str) {
        let Some(tile) = self.tiles.remove(tile_id) else {
            return;
        };
        tile.pumps.iter().for_each(AbortHandle::abort);
        for sender in &tile.senders {
            if let Err(e) = self.pc.remove_track(sender).await {
                tracing::debug!(error = %e, tile = tile_id, "removing a track");
            }
        }
        self.metrics.console_tiles.dec();
    }

    pub fn tile_ids(&self) -> Vec<String> {
        self.tiles.keys().cloned().collect()
    }

    /// (bitrate, fps, frames, dropped, delay µs, stalled) of a tile since the last call.
    pub fn tile_stats(&mut self, tile_id: &str, now: std::time::Instant) -> Option<TileNumbers> {
        use std::sync::atomic::Ordering::Relaxed;
        let tile = self.tiles.get_mut(tile_id)?;
        let (bitrate, fps) = tile.sample.rates(&tile.counters, now);
        let c = &tile.counters;
        let sent_us = c.last_sent_us.load(Relaxed);
        let capture_us = c.last_capture_us.load(Relaxed);
        let now_us = super::media::unix_now_us();
        let stalled = tile.unit.is_online()
            && (sent_us == 0
                || now_us.saturating_sub(sent_us) > super::media::STALL_AFTER.as_micros() as u64);
        Some(TileNumbers {
            bitrate_bps: bitrate,
            framerate: fps,
            frames_sent: c.frames.load(Relaxed),
            frames_dropped: c.dropped.load(Relaxed),
            delay_us: if capture_us == 0 {
                0
            } else {
                sent_us as i64 - capture_us as i64
            },
            stalled,
        })
    }

    pub async fn create_offer(&self) -> Result<String, PeerError> {
        let offer = self.pc.create_offer(None).await?;
        self.pc.set_local_description(offer.clone()).await?;
        Ok(offer.sdp)
    }

    pub async fn apply_answer(&self, sdp: String) -> Result<(), PeerError> {
        let answer = RTCSessionDescription::answer(sdp)?;
        self.pc.set_remote_description(answer).await?;
        Ok(())
    }

    /// Answers a player's offer (WHEP): tracks must be attached after this, before
    /// [`Peer::create_answer`].
    pub async fn apply_offer(&self, sdp: String) -> Result<(), PeerError> {
        let offer = RTCSessionDescription::offer(sdp)?;
        self.pc.set_remote_description(offer).await?;
        Ok(())
    }

    pub async fn create_answer(&self) -> Result<(), PeerError> {
        let answer = self.pc.create_answer(None).await?;
        self.pc.set_local_description(answer).await?;
        Ok(())
    }

    pub async fn remote_sdp(&self) -> Option<String> {
        self.pc.remote_description().await.map(|d| d.sdp)
    }

    pub async fn local_sdp(&self) -> Option<String> {
        self.pc.local_description().await.map(|d| d.sdp)
    }

    pub async fn add_candidate(&self, c: IceCandidate) -> Result<(), PeerError> {
        if c.candidate.is_empty() {
            return Ok(());
        }
        self.pc
            .add_ice_candidate(RTCIceCandidateInit {
                candidate: c.candidate,
                sdp_mid: (!c.sdp_mid.is_empty()).then_some(c.sdp_mid),
                sdp_mline_index: u16::try_from(c.sdp_mline_index).ok(),
                username_fragment: (!c.username_fragment.is_empty()).then_some(c.username_fragment),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// Makes sure there is a receive-only audio m-line for the console's microphone (and,
    /// with `video`, a receive-only video m-line for its camera). True if one was added
    /// now (the session must offer again before it carries anything).
    pub async fn ensure_talk(&mut self, video: bool) -> Result<bool, PeerError> {
        let mut added = false;
        if self.talk.is_none() {
            self.talk = Some(self.receive_only(RtpCodecKind::Audio).await?);
            added = true;
        }
        if video && self.link.is_none() {
            self.link = Some(self.receive_only(RtpCodecKind::Video).await?);
            added = true;
        }
        Ok(added)
    }

    /// A receive-only line that `add_track` never takes over: it reuses any transceiver
    /// of the kind without a sender (and would make the console's talk line a tile's), so
    /// this one is made with a sender that never sends, then turned receive-only.
    async fn receive_only(
        &self,
        kind: RtpCodecKind,
    ) -> Result<Arc<dyn webrtc::rtp_transceiver::RtpTransceiver>, PeerError> {
        let (name, codec) = match kind {
            RtpCodecKind::Video => ("link-video", h264()),
            _ => ("talk-audio", opus()),
        };
        let placeholder = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            "console".to_string(),
            name.to_string(),
            name.to_string(),
            kind,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(rand::random()),
                    ..Default::default()
                },
                codec,
                ..Default::default()
            }],
        )));
        let t = self
            .pc
            .add_transceiver_from_track(
                placeholder as Arc<dyn TrackLocal>,
                Some(rtc::rtp_transceiver::RTCRtpTransceiverInit {
                    direction: rtc::rtp_transceiver::RTCRtpTransceiverDirection::Sendrecv,
                    streams: Vec::new(),
                    send_encodings: Vec::new(),
                }),
            )
            .await?;
        t.set_direction(rtc::rtp_transceiver::RTCRtpTransceiverDirection::Recvonly)
            .await?;
        Ok(t)
    }

    /// The talk m-line's mid, once an offer has carried it.
    pub async fn talk_mid(&self) -> Option<String> {
        match &self.talk {
            Some(t) => t.mid().await.ok().flatten(),
            None => None,
        }
    }

    /// The camera m-line's mid, once an offer has carried it.
    pub async fn link_mid(&self) -> Option<String> {
        match &self.link {
            Some(t) => t.mid().await.ok().flatten(),
            None => None,
        }
    }

    /// The mids of the lines the console sends on (talk, then link), for the offer.
    pub async fn send_mids(&self) -> Vec<String> {
        let mut mids = Vec::with_capacity(2);
        mids.extend(self.talk_mid().await);
        mids.extend(self.link_mid().await);
        mids
    }

    pub async fn transceiver_count(&self) -> usize {
        self.pc.get_transceivers().await.len()
    }

    /// Stops every pump and closes the connection.
    pub async fn close(mut self) {
        let tiles = std::mem::take(&mut self.tiles).len();
        self.metrics.console_tiles.sub(tiles as i64);
        self.pumps.shutdown().await;
        if let Err(e) = self.pc.close().await {
            tracing::debug!(error = %e, "closing a PeerConnection");
        }
        self.metrics.webrtc_peers.dec();
    }
}

/// A tile's numbers for its stats event.
#[derive(Debug, Clone, Copy)]
pub struct TileNumbers {
    pub bitrate_bps: u64,
    pub framerate: f32,
    pub frames_sent: u64,
    pub frames_dropped: u64,
    pub delay_us: i64,
    pub stalled: bool,
}
