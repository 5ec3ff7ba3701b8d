//! A console in Rust: the session over WebSocket (protobuf JSON) or gRPC (the same messages
//! as protobuf) and, for media, a webrtc-rs PeerConnection that answers the hub's offers and counts the RTP of each tile. Tests use
//! it to send bad input; `loadrun` to measure WebRTC fan-out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures::{SinkExt, StreamExt};
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_H264, MIME_TYPE_OPUS, MediaEngine,
};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::transport::RTCIceCandidateInit;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RTCRtpCodecParameters, RtpCodecKind};
use tianwang_proto::v1::console_client::ConsoleClient;
use tianwang_proto::v1::session_event::Kind as Event;
use tianwang_proto::v1::{SessionEvent, SessionRequest, TileState, tile_state::State};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCPeerConnectionIceEvent,
    Registry, SettingEngineBuilder,
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The session's signalling path.
enum Signalling {
    Ws(Box<Ws>),
    Grpc {
        requests: Option<tokio::sync::mpsc::Sender<SessionRequest>>,
        events: Box<tonic::Streaming<SessionEvent>>,
    },
}

/// What arrived for one tile (its stream id is the tile id).
#[derive(Debug, Default, Clone, Copy)]
pub struct TileMedia {
    pub packets: u64,
    pub bytes: u64,
    pub first_packet: Option<Instant>,
}

pub type MediaCounts = Arc<Mutex<HashMap<String, TileMedia>>>;
/// Capture → arrival delays (µs) of video frames stamped by `field-agent simulate --stamp`.
pub type Delays = Arc<Mutex<Vec<u64>>>;
type Tracks = Arc<Mutex<HashMap<String, Vec<Arc<dyn TrackRemote>>>>>;

#[derive(Clone)]
struct Handler {
    candidates: mpsc::UnboundedSender<RTCIceCandidateInit>,
    media: MediaCounts,
    delays: Delays,
    tracks: Tracks,
}

/// The capture time stamped in an RTP payload of H.264: a single NAL unit or one inside a
/// STAP-A (RFC 6184), where the payloader puts small NAL units.
fn stamp_in(payload: &[u8]) -> Option<u64> {
    match payload.first()? & 0x1f {
        6 => tianwang_proto::stamp::read(payload),
        24 => {
            let mut rest = &payload[1..];
            while rest.len() > 2 {
                let size = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let nal = rest.get(2..2 + size)?;
                if let Some(at) = tianwang_proto::stamp::read(nal) {
                    return Some(at);
                }
                rest = &rest[2 + size..];
            }
            None
        }
        _ => None,
    }
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let Ok(init) = event.candidate.to_json() {
            let _ = self.candidates.send(init);
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let tile = track.stream_id().await.to_string();
        self.tracks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tile.clone())
            .or_default()
            .push(Arc::clone(&track));
        let media = Arc::clone(&self.media);
        let delays = Arc::clone(&self.delays);
        tokio::spawn(async move {
            while let Some(event) = track.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(p) = event {
                    if let Some(at) = stamp_in(&p.payload) {
                        let delay = crate::unix_now_us().saturating_sub(at);
                        delays.lock().unwrap_or_else(|e| e.into_inner()).push(delay);
                    }
                    let mut m = media.lock().unwrap_or_else(|e| e.into_inner());
                    let t = m.entry(tile.clone()).or_default();
                    t.packets += 1;
                    t.bytes += p.payload.len() as u64;
                    t.first_packet.get_or_insert_with(Instant::now);
                }
            }
        });
    }
}

/// A console session over WebSocket or gRPC.
pub struct Console {
    signalling: Signalling,
    pc: Option<Arc<dyn PeerConnection>>,
    candidates: Option<mpsc::UnboundedReceiver<RTCIceCandidateInit>>,
    pub media: MediaCounts,
    pub delays: Delays,
    tracks: Tracks,
}

/// A PeerConnection as every Rust client here makes it: the H.264 the hub's consoles offer
/// (at `h264_payload_type`) and Opus, the default interceptors (NACK, reports), host
/// candidates on `udp` only, no mDNS, and connectivity checks every 20 ms, not webrtc-rs's
/// 200 (a browser answers a check with a check at once; this client only on its tick, and a
/// new viewer's first frame would wait for it).
pub async fn peer_connection(
    handler: Arc<dyn PeerConnectionEventHandler>,
    h264_payload_type: u8,
    udp: String,
) -> anyhow::Result<Arc<dyn PeerConnection>> {
    let mut engine = MediaEngine::default();
    engine.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: MIME_TYPE_H264.into(),
                clock_rate: 90_000,
                channels: 0,
                sdp_fmtp_line:
                    "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f".into(),
                rtcp_feedback: vec![],
            },
            payload_type: h264_payload_type,
        },
        RtpCodecKind::Video,
    )?;
    engine.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: MIME_TYPE_OPUS.into(),
                clock_rate: 48_000,
                channels: 2,
                sdp_fmtp_line: "minptime=10;useinbandfec=1".into(),
                rtcp_feedback: vec![],
            },
            payload_type: 111,
        },
        RtpCodecKind::Audio,
    )?;
    let registry = register_default_interceptors(Registry::new(), &mut engine)?;
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_setting_engine(
            SettingEngineBuilder::new()
                .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
                .with_ice_connection_attempts(Some(Duration::from_millis(20)), Some(70))
                .build(),
        )
        .with_media_engine(engine)
        .with_interceptor_registry(registry)
        .with_handler(handler)
        .with_udp_addrs(vec![udp])
        .build()
        .await
        .context("building a PeerConnection")?;
    Ok(Arc::new(pc))
}

impl Console {
    pub async fn connect(http: SocketAddr) -> anyhow::Result<Self> {
        // No Nagle, as browsers do: offers, answers and candidates are small writes in a row.
        let (ws, _) = tokio_tungstenite::connect_async_with_config(
            format!("ws://{http}/api/session"),
            None,
            true,
        )
        .await
        .context("opening the console WebSocket")?;
        Ok(Self::over(Signalling::Ws(Box::new(ws))))
    }

    /// A session over gRPC, signed in by its metadata (`authorization: Bearer`): returns
    /// once the hub said Ready.
    pub async fn connect_grpc(http: SocketAddr, token: &str) -> anyhow::Result<Self> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{http}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .context("connecting to the hub's gRPC")?;
        let (tx, rx) = tokio::sync::mpsc::channel::<SessionRequest>(64);
        let requests =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        let events = ConsoleClient::new(channel)
            .session(crate::tree::authed(token, requests))
            .await
            .context("opening the gRPC session")?
            .into_inner();
        let mut c = Self::over(Signalling::Grpc {
            requests: Some(tx),
            events: Box::new(events),
        });
        c.until(Duration::from_secs(10), |e| match &e.kind {
            Some(Event::Ready(_)) => Some(()),
            _ => None,
        })
        .await?;
        Ok(c)
    }

    fn over(signalling: Signalling) -> Self {
        Self {
            signalling,
            pc: None,
            candidates: None,
            media: MediaCounts::default(),
            delays: Delays::default(),
            tracks: Tracks::default(),
        }
    }

    /// Sends a request written as protobuf JSON (over gRPC, as the message it stands for).
    pub async fn send(&mut self, request: serde_json::Value) -> anyhow::Result<()> {
        match &mut self.signalling {
            Signalling::Ws(_) => self.send_raw(Message::text(request.to_string())).await,
            Signalling::Grpc { requests, .. } => {
                let request: SessionRequest = serde_json::from_value(request)
                    .context("a request that is not a SessionRequest")?;
                requests
                    .as_ref()
                    .context("the request stream is closed")?
                    .send(request)
                    .await
                    .map_err(|_| anyhow!("the gRPC session ended"))
            }
        }
    }

    /// Sends a WebSocket message as it is (malformed ones included).
    pub async fn send_raw(&mut self, message: Message) -> anyhow::Result<()> {
        match &mut self.signalling {
            Signalling::Ws(ws) => ws
                .send(message)
                .await
                .context("sending to the console WebSocket"),
            Signalling::Grpc { .. } => bail!("raw WebSocket messages need a WebSocket session"),
        }
    }

    /// The next event off the signalling path: `Ok(None)`: the hub closed; `Some(None)`: a
    /// message that is not an event.
    async fn receive(
        signalling: &mut Signalling,
        deadline: tokio::time::Instant,
    ) -> anyhow::Result<Option<Option<SessionEvent>>> {
        let ws = match signalling {
            Signalling::Ws(ws) => ws,
            Signalling::Grpc { events, .. } => {
                return match tokio::time::timeout_at(deadline, events.next()).await {
                    Err(_) => Err(anyhow!("no console event in time")),
                    Ok(None) => Ok(None),
                    Ok(Some(Err(status))) => Err(anyhow!(
                        "the gRPC session failed: {:?}: {}",
                        status.code(),
                        status.message()
                    )),
                    Ok(Some(Ok(event))) => Ok(Some(Some(event))),
                };
            }
        };
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| anyhow!("no console event in time"))?;
        let text = match msg {
            None | Some(Ok(Message::Close(_))) => return Ok(None),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Message::Text(t))) => t,
            // Not an event (a ping, a pong): none this time.
            Some(Ok(_)) => return Ok(Some(None)),
        };
        let event: SessionEvent = serde_json::from_str(text.as_str())
            .with_context(|| format!("decoding a console event: {text}"))?;
        Ok(Some(Some(event)))
    }

    /// The next event, answering offers and passing ICE candidates on the way when the
    /// console has media (see [`Console::with_media`]). `Ok(None)`: the hub closed.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<Option<SessionEvent>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let candidate = async {
                match self.candidates.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let received = tokio::select! {
                r = Self::receive(&mut self.signalling, deadline) => r.map_err(|e| anyhow!("{e} ({timeout:?})"))?,
                Some(c) = candidate => {
                    self.send(serde_json::json!({"iceCandidate": {
                        "candidate": c.candidate,
                        "sdpMid": c.sdp_mid.unwrap_or_default(),
                        "sdpMlineIndex": c.sdp_mline_index.unwrap_or(0),
                    }})).await?;
                    continue;
                }
            };
            let event = match received {
                None => return Ok(None),
                Some(None) => continue,
                Some(Some(event)) => event,
            };
            if let (Some(Event::Offer(offer)), Some(pc)) = (&event.kind, self.pc.clone()) {
                pc.set_remote_description(RTCSessionDescription::offer(offer.sdp.clone())?)
                    .await?;
                let answer = pc.create_answer(None).await?;
                pc.set_local_description(answer.clone()).await?;
                self.send(serde_json::json!({"answer": {
                    "type": "answer", "sdp": answer.sdp, "revision": offer.revision,
                }}))
                .await?;
            }
            if let (Some(Event::IceCandidate(c)), Some(pc)) = (&event.kind, self.pc.as_ref())
                && !c.candidate.is_empty()
            {
                let _ = pc
                    .add_ice_candidate(RTCIceCandidateInit {
                        candidate: c.candidate.clone(),
                        sdp_mid: Some(c.sdp_mid.clone()),
                        sdp_mline_index: u16::try_from(c.sdp_mline_index).ok(),
                        ..Default::default()
                    })
                    .await;
            }
            return Ok(Some(event));
        }
    }

    /// Reads events until one satisfies `pick`.
    pub async fn until<T>(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(&SessionEvent) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(event) = self.next(left).await? else {
                bail!("the hub closed the session");
            };
            if let Some(t) = pick(&event) {
                return Ok(t);
            }
        }
    }

    /// The next error event's message.
    pub async fn error(&mut self, timeout: Duration) -> anyhow::Result<String> {
        self.until(timeout, |e| match &e.kind {
            Some(Event::Error(err)) => Some(err.message.clone()),
            _ => None,
        })
        .await
    }

    pub async fn auth(&mut self, token: &str) -> anyhow::Result<()> {
        self.send(serde_json::json!({"auth": {"token": token}}))
            .await?;
        self.until(Duration::from_secs(10), |e| match &e.kind {
            Some(Event::Ready(_)) => Some(()),
            _ => None,
        })
        .await
    }

    /// Gives the console a PeerConnection that answers the hub's offers.
    pub async fn with_media(&mut self) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::unbounded_channel();
        let handler = Arc::new(Handler {
            candidates: tx,
            media: Arc::clone(&self.media),
            delays: Arc::clone(&self.delays),
            tracks: Arc::clone(&self.tracks),
        });
        let pc = peer_connection(handler, 102, "127.0.0.1:0".into()).await?;
        self.pc = Some(pc);
        self.candidates = Some(rx);
        Ok(())
    }

    pub async fn add_tile(&mut self, tile: &str, unit: &str) -> anyhow::Result<()> {
        self.send(serde_json::json!({"addTile": {"tileId": tile, "unitId": unit}}))
            .await
    }

    /// Waits for a tile's state.
    pub async fn tile(
        &mut self,
        tile: &str,
        state: State,
        timeout: Duration,
    ) -> anyhow::Result<TileState> {
        self.until(timeout, |e| match &e.kind {
            Some(Event::Tile(t)) if t.tile_id == tile && t.state() == state => Some(t.clone()),
            _ => None,
        })
        .await
    }

    /// Sends a picture loss indication (a keyframe request) on a tile's video, as a browser
    /// does when its decoder lost its reference.
    pub async fn pli(&self, tile: &str) -> anyhow::Result<()> {
        let tracks = self
            .tracks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(tile)
            .cloned()
            .unwrap_or_default();
        for track in tracks {
            if track.kind().await != RtpCodecKind::Video {
                continue;
            }
            let Some(&ssrc) = track.ssrcs().await.first() else {
                continue;
            };
            let pli =
                rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication {
                    sender_ssrc: 0,
                    media_ssrc: ssrc,
                };
            track.write_rtcp(vec![Box::new(pli)]).await?;
            return Ok(());
        }
        bail!("tile {tile} has no video track yet")
    }

    pub fn media_of(&self, tile: &str) -> TileMedia {
        self.media
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(tile)
            .copied()
            .unwrap_or_default()
    }

    pub async fn close(mut self) {
        match &mut self.signalling {
            Signalling::Ws(ws) => {
                let _ = WebSocketStream::close(ws.as_mut(), None).await;
            }
            // Ending the request stream ends the session.
            Signalling::Grpc { requests, .. } => drop(requests.take()),
        }
        if let Some(pc) = self.pc.take() {
            let _ = pc.close().await;
        }
    }

    /// Leaves as a killed browser tab does: the TCP connection ends with no WebSocket close.
    /// The PeerConnection is closed afterwards only so this process does not keep its tasks.
    pub async fn abandon(mut self) {
        let pc = self.pc.take();
        drop(self.signalling);
        if let Some(pc) = pc {
            let _ = pc.close().await;
        }
    }
}
