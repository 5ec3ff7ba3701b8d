//! A WHIP publisher in Rust (webrtc-rs) that sends whatever RTP a test hands it: whole
//! H.264 access units of a clip GStreamer encoded, or deliberately bad packets. Browsers and
//! `webrtcbin` publish only well-formed media; this is how the hub meets the rest.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::rtp::codec::h264::H264Payloader;
use rtc::rtp::packetizer::Payloader;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use tokio::sync::watch;
use webrtc::media_stream::MediaStreamTrack;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionEventHandler, RTCIceGatheringState, RTCPeerConnectionState,
};

const PAYLOAD_TYPE: u8 = 102;
const MTU: usize = 1200;

struct Handler {
    gathered: watch::Sender<bool>,
    connected: watch::Sender<bool>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.send_replace(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.connected
            .send_replace(state == RTCPeerConnectionState::Connected);
    }
}

pub struct WhipPublisher {
    pc: Arc<dyn PeerConnection>,
    track: Arc<TrackLocalStaticRTP>,
    pub ssrc: u32,
    /// The resource (`Location`), to DELETE.
    pub location: String,
    connected: watch::Receiver<bool>,
    sequence: u16,
}

impl WhipPublisher {
    /// Offers H.264 video (send only), lets `munge` rewrite the offer, POSTs it to
    /// `/whip/{unit}` and applies the answer. Returns the refusal as an error.
    pub async fn publish(
        http: SocketAddr,
        unit: &str,
        token: &str,
        munge: impl FnOnce(String) -> String,
    ) -> anyhow::Result<Self> {
        let (gathered, mut gathered_rx) = watch::channel(false);
        let (connected, connected_rx) = watch::channel(false);
        let handler = Arc::new(Handler {
            gathered,
            connected,
        });
        let pc =
            crate::console::peer_connection(handler, PAYLOAD_TYPE, "127.0.0.1:0".into()).await?;
        let ssrc: u32 = rand::random();
        let codec = RTCRtpCodec {
            mime_type: "video/H264".into(),
            clock_rate: 90_000,
            channels: 0,
            sdp_fmtp_line: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"
                .into(),
            rtcp_feedback: vec![],
        };
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            "whip".into(),
            "whip-video".into(),
            "video".into(),
            RtpCodecKind::Video,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec,
                ..Default::default()
            }],
        )));
        pc.add_transceiver_from_track(
            Arc::clone(&track) as Arc<dyn TrackLocal>,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Sendonly,
                streams: Vec::new(),
                send_encodings: Vec::new(),
            }),
        )
        .await?;
        let offer = pc.create_offer(None).await?;
        pc.set_local_description(offer).await?;
        let _ = tokio::time::timeout(Duration::from_secs(3), gathered_rx.wait_for(|g| *g)).await;
        let offer = pc
            .local_description()
            .await
            .context("no local description")?
            .sdp;
        let res = reqwest::Client::new()
            .post(format!("http://{http}/whip/{unit}"))
            .bearer_auth(token)
            .header("content-type", "application/sdp")
            .body(munge(offer))
            .send()
            .await?;
        let status = res.status().as_u16();
        let location = res
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let answer = res.text().await?;
        if status != 201 {
            let _ = pc.close().await;
            bail!("WHIP refused: {status} {answer}");
        }
        pc.set_remote_description(RTCSessionDescription::answer(answer)?)
            .await?;
        Ok(Self {
            pc,
            track,
            ssrc,
            location,
            connected: connected_rx,
            sequence: rand::random(),
        })
    }

    pub async fn wait_connected(&mut self, timeout: Duration) -> anyhow::Result<()> {
        tokio::time::timeout(timeout, self.connected.wait_for(|c| *c))
            .await
            .context("the WHIP connection did not connect")??;
        Ok(())
    }

    /// One RTP packet on the track's SSRC.
    pub async fn send_packet(
        &mut self,
        payload: Bytes,
        timestamp: u32,
        marker: bool,
    ) -> anyhow::Result<()> {
        let packet = rtc::rtp::Packet {
            header: rtc::rtp::Header {
                version: 2,
                marker,
                payload_type: PAYLOAD_TYPE,
                sequence_number: self.sequence,
                timestamp,
                ssrc: self.ssrc,
                ..Default::default()
            },
            payload,
        };
        self.sequence = self.sequence.wrapping_add(1);
        self.track.write_rtp(packet).await?;
        Ok(())
    }

    /// A whole access unit (Annex B), packetized as a browser would (FU-A past the MTU).
    pub async fn send_access_unit(&mut self, au: &[u8], timestamp: u32) -> anyhow::Result<()> {
        self.send_access_unit_reversed(au, timestamp, false).await
    }

    /// The same, its packets sent last first when `reversed` (sequence numbers as if in
    /// order: what a network that reorders delivers).
    pub async fn send_access_unit_reversed(
        &mut self,
        au: &[u8],
        timestamp: u32,
        reversed: bool,
    ) -> anyhow::Result<()> {
        let mut payloader = H264Payloader::default();
        let packets = payloader.payload(MTU, &Bytes::copy_from_slice(au))?;
        let last = packets.len().saturating_sub(1);
        let first_seq = self.sequence;
        let mut numbered: Vec<_> = packets
            .into_iter()
            .enumerate()
            .map(|(i, p)| (first_seq.wrapping_add(i as u16), i == last, p))
            .collect();
        if reversed {
            numbered.reverse();
        }
        for (seq, marker, p) in numbered {
            self.sequence = seq;
            self.send_packet(p, timestamp, marker).await?;
        }
        self.sequence = first_seq.wrapping_add(last as u16 + 1);
        Ok(())
    }

    pub async fn close(self) {
        let _ = self.pc.close().await;
    }
}

/// `frames` access units of a 320×240 test picture, encoded by GStreamer's x264 (constrained
/// baseline, a keyframe every 30), split at the access unit delimiters x264 writes.
pub fn h264_clip(dir: &Path, frames: u32) -> anyhow::Result<Vec<Bytes>> {
    let file = dir.join("clip.h264");
    let status = Command::new("gst-launch-1.0")
        .args([
            "-q",
            "videotestsrc",
            &format!("num-buffers={frames}"),
            "!",
            "video/x-raw,width=320,height=240,framerate=30/1",
            "!",
            "x264enc",
            "key-int-max=30",
            "aud=true",
            "tune=zerolatency",
            "speed-preset=ultrafast",
            "!",
            "video/x-h264,stream-format=byte-stream,alignment=au,profile=constrained-baseline",
            "!",
            "filesink",
            &format!("location={}", file.display()),
        ])
        .status()
        .context("running gst-launch-1.0")?;
    if !status.success() {
        bail!("gst-launch-1.0 failed: {status}");
    }
    let data = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    // Each access unit begins with a delimiter: 00 00 00 01 09.
    let starts: Vec<usize> = data
        .windows(5)
        .enumerate()
        .filter(|(_, w)| *w == [0, 0, 0, 1, 9])
        .map(|(i, _)| i)
        .collect();
    let units: Vec<Bytes> = starts
        .iter()
        .zip(starts.iter().skip(1).chain(std::iter::once(&data.len())))
        .map(|(&s, &e)| Bytes::copy_from_slice(&data[s..e]))
        .collect();
    if units.len() != frames as usize {
        bail!("{} access units in the clip, not {frames}", units.len());
    }
    Ok(units)
}
