//! WHIP ingest (RFC 9725): a phone, a browser or a third-party camera publishes a unit over
//! WebRTC. `POST /whip/{unit}` with the unit's device token (`Authorization: Bearer`) and an
//! SDP offer → `201 Created`, the answer (all candidates, no trickle) and a resource URL;
//! `DELETE` on it ends the unit's session. Incoming RTP is reassembled into the same frames
//! and groups a QUIC agent sends — H.264 access units in Annex B, a group from each IDR;
//! one Opus packet per frame — so relay, recorder, cascade and alarms treat the unit like
//! any other. Keyframe requests from viewers become PLI to the publisher.
//!
//! A unit that is live already (over QUIC or WHIP) is refused (409) rather than taken
//! over: a second publisher with the same token is more likely a mistake or a stolen token
//! than a reconnect, and the first one's `DELETE` (or its link dying) frees the unit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp::codec::h264::H264Packet;
use rtc::rtp::packetizer::Depacketizer;
use tianwang_core::GroupWriter;
use tianwang_core::frame::FrameIn;
use tianwang_proto::v1::{FrameHeader, TrackInfo, TrackKind};
use tianwang_proto::{Kind, wire};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::RTCPeerConnectionState;

use crate::auth::Role;
use crate::console::peer::{Peer, PeerConfig, PeerEvent};
use crate::registry::{Broadcast, PublisherLink, TrackEntry};
use crate::session::HubContext;

/// Largest SDP offer accepted.
pub const MAX_OFFER: usize = 64 * 1024;
/// Publisher session ids of WHIP units, far from QUIC connections' and pulls'.
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1 << 61);
/// Opus audio is cut into groups of this many packets (one second), as agents do.
const AUDIO_GROUP: u32 = 50;

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message.into(),
    )
        .into_response()
}

/// POST /whip/{unit}
pub async fn start(
    State(hub): State<Arc<HubContext>>,
    Path(unit): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let audit = &hub.evidence.audit;
    let Some(token) = crate::console::whep::bearer(&headers) else {
        return problem(
            StatusCode::UNAUTHORIZED,
            "Authorization: Bearer <device token> required",
        );
    };
    let claims = match hub.authority.verify(token) {
        Ok(c) => c,
        Err(e) => {
            audit.record(
                "?",
                "login.refused",
                &unit.chars().take(64).collect::<String>(),
                serde_json::json!({ "via": "whip", "reason": e.to_string() }),
            );
            return problem(StatusCode::UNAUTHORIZED, e.to_string());
        }
    };
    if !crate::session::valid_unit_id(&unit) {
        return problem(
            StatusCode::BAD_REQUEST,
            "unit ids are 1 to 64 of A-Z a-z 0-9 - _ . (not starting with .)",
        );
    }
    if claims.role != Role::Device || claims.sub != unit {
        let reason = if claims.role != Role::Device {
            format!("a {:?} token cannot publish", claims.role)
        } else {
            format!("the token is for unit {:?}, not {unit:?}", claims.sub)
        };
        audit.record(
            &claims.sub,
            "login.refused",
            &unit,
            serde_json::json!({ "via": "whip", "reason": reason }),
        );
        return problem(StatusCode::FORBIDDEN, reason);
    }
    let offer = match crate::console::whep::sdp_offer(&headers, &body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let upper = offer.to_ascii_uppercase();
    if !upper.contains("H264/90000") {
        return problem(
            StatusCode::NOT_ACCEPTABLE,
            "the offer has no H.264 video: units publish H.264 (and Opus)",
        );
    }
    let has_audio = upper.contains("OPUS/48000");
    if hub.units.get(&unit).is_some_and(|b| b.is_online()) {
        return problem(
            StatusCode::CONFLICT,
            format!("unit {unit:?} is live already; end that session first"),
        );
    }
    let config = PeerConfig {
        ips: hub.config.console.webrtc_ips.clone(),
    };
    let (peer, mut events, mut remote) =
        match Peer::new_ingest(&config, Arc::clone(&hub.metrics)).await {
            Ok(p) => p,
            Err(e) => return problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
    if let Err(e) = peer.apply_offer(offer).await {
        peer.close().await;
        return problem(
            StatusCode::BAD_REQUEST,
            format!("the offer was refused: {e}"),
        );
    }
    let answer = match crate::console::whep::answer_with_candidates(&peer, &mut events).await {
        Ok(a) => a,
        Err(r) => {
            peer.close().await;
            return r;
        }
    };

    // The unit is online from here, with the tracks its offer carries.
    let mut announced = vec![TrackInfo {
        id: 0,
        name: "video".into(),
        kind: TrackKind::Video as i32,
        codec: "h264".into(),
        ..Default::default()
    }];
    if has_audio {
        announced.push(TrackInfo {
            id: 1,
            name: "audio".into(),
            kind: TrackKind::Audio as i32,
            codec: "opus".into(),
            sample_rate: 48_000,
            channels: 2,
            ..Default::default()
        });
    }
    let session = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let (control, mut requests) = mpsc::channel(64);
    let attached = hub.units.attach(
        &unit,
        &announced,
        PublisherLink {
            session,
            control,
            track_ids: announced.iter().map(|t| (t.name.clone(), t.id)).collect(),
            replaced: CancellationToken::new(),
            officer: None,
            conn: None,
        },
    );
    let tracks = attached.tracks;
    let broadcast = attached.broadcast;
    let id = format!("{:016x}", rand::random::<u64>());
    let stop = CancellationToken::new();
    hub.whip.insert(id.clone(), (unit.clone(), stop.clone()));
    audit.record(
        &claims.sub,
        "login",
        &unit,
        serde_json::json!({ "via": "whip", "role": claims.role, "resource": id }),
    );
    crate::directives::resend_open(&hub, &unit);
    let location = format!("/whip/{unit}/{id}");
    let span = tracing::info_span!("whip", %id, %unit);
    let task_hub = Arc::clone(&hub);
    let task_id = id.clone();
    tokio::spawn(
        async move {
            info!(audio = has_audio, "WHIP unit online");
            let mut video_ssrc: Option<(Arc<dyn TrackRemote>, u32)> = None;
            let mut media = tokio::task::JoinSet::new();
            let max_frame = task_hub.config.quic.max_frame_bytes;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = task_hub.shutdown.cancelled() => break,
                    event = events.recv() => match event {
                        Some(PeerEvent::State(state)) => {
                            debug!(%state, "WHIP connection");
                            if matches!(state, RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed) {
                                break;
                            }
                        }
                        Some(_) => {}
                        None => break,
                    },
                    Some(track) = remote.recv() => {
                        let kind = track.kind().await;
                        let name = if kind == rtc::rtp_transceiver::rtp_sender::RtpCodecKind::Video { "video" } else { "audio" };
                        let Some(entry) = tracks.values().find(|e| e.info.name == name).cloned() else {
                            debug!(name, "a track the offer did not announce: ignored");
                            continue;
                        };
                        if name == "video" {
                            if let Some(ssrc) = track.ssrcs().await.first().copied() {
                                video_ssrc = Some((Arc::clone(&track), ssrc));
                                // A fresh keyframe at once, for the first viewers and the recorder.
                                request_keyframe(&track, ssrc).await;
                            }
                            media.spawn(video(track, entry, Arc::clone(&broadcast), max_frame));
                        } else {
                            media.spawn(audio(track, entry));
                        }
                    }
                    Some(msg) = requests.recv() => {
                        if let Some(Kind::KeyframeRequest(_)) = msg.kind {
                            if let Some((track, ssrc)) = &video_ssrc {
                                request_keyframe(track, *ssrc).await;
                            }
                        } else if !crate::unit_ws::forward(&task_hub, &broadcast.unit_id, msg) {
                            // Directives wait (SENT) for the unit's control session.
                            debug!("no control session for a WHIP unit's message");
                        }
                    }
                    Some(_) = media.join_next(), if !media.is_empty() => {}
                }
            }
            media.shutdown().await;
            task_hub.whip.remove(&task_id);
            task_hub.units.detach(&broadcast.unit_id, session);
            peer.close().await;
            info!("WHIP unit offline");
        }
        .instrument(span),
    );
    (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/sdp".to_string()),
            (header::LOCATION, location),
        ],
        answer,
    )
        .into_response()
}

/// DELETE /whip/{unit}/{id}: only with the unit's own token.
pub async fn stop(
    State(hub): State<Arc<HubContext>>,
    Path((unit, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(token) = crate::console::whep::bearer(&headers) else {
        return problem(StatusCode::UNAUTHORIZED, "Authorization: Bearer required");
    };
    match hub.authority.verify(token) {
        Ok(c) if c.role == Role::Device && c.sub == unit => {}
        Ok(_) => return problem(StatusCode::FORBIDDEN, "not this unit's token"),
        Err(e) => return problem(StatusCode::UNAUTHORIZED, e.to_string()),
    }
    match hub.whip.remove(&id) {
        Some((_, (u, stop))) if u == unit => {
            stop.cancel();
            StatusCode::OK.into_response()
        }
        Some((k, v)) => {
            hub.whip.insert(k, v);
            problem(StatusCode::NOT_FOUND, "no such WHIP session for this unit")
        }
        None => problem(StatusCode::NOT_FOUND, "no such WHIP session"),
    }
}

async fn request_keyframe(track: &Arc<dyn TrackRemote>, ssrc: u32) {
    let pli = PictureLossIndication {
        sender_ssrc: 0,
        media_ssrc: ssrc,
    };
    if let Err(e) = track.write_rtcp(vec![Box::new(pli)]).await {
        debug!(error = %e, "sending PLI to the publisher");
    }
}

/// Capture time from RTP timestamps: the first packet's arrival, then the RTP clock
/// (unwrapped), so frame spacing is the publisher's, not the network's.
struct Clock {
    rate: u64,
    base_us: u64,
    first: Option<u32>,
    last: u32,
    extended: i64,
}

impl Clock {
    fn new(rate: u64) -> Self {
        Self {
            rate,
            base_us: 0,
            first: None,
            last: 0,
            extended: 0,
        }
    }

    fn us(&mut self, ts: u32) -> u64 {
        match self.first {
            None => {
                self.first = Some(ts);
                self.last = ts;
                self.base_us = crate::evidence::audit::unix_us().max(0) as u64;
            }
            Some(_) => {
                self.extended += i64::from(ts.wrapping_sub(self.last) as i32);
                self.last = ts;
            }
        }
        let offset = self.extended.max(0) as u64 * 1_000_000 / self.rate;
        self.base_us + offset
    }
}

fn frame(payload: &[u8], timestamp_us: u64, duration_us: u32) -> FrameIn {
    let header = FrameHeader {
        timestamp_us,
        duration_us,
    };
    let mut buf = BytesMut::with_capacity(wire::encoded_frame_len(&header, payload.len()));
    wire::encode_frame(&header, payload, &mut buf);
    let payload_offset = (buf.len() - payload.len()) as u32;
    FrameIn {
        payload_offset,
        timestamp_us,
        duration_us,
        data: buf.freeze(),
        received_at: Instant::now(),
    }
}

/// Whether an Annex B access unit holds an IDR slice.
fn has_idr(au: &[u8]) -> bool {
    let mut i = 0;
    while i + 3 < au.len() {
        if au[i] == 0 && au[i + 1] == 0 && au[i + 2] == 1 {
            if au[i + 3] & 0x1f == 5 {
                return true;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    false
}

/// H.264 RTP → access units (a marker bit, or a new timestamp, ends one) → groups from
/// each IDR. Anything undecodable drops frames until the next keyframe.
async fn video(
    track: Arc<dyn TrackRemote>,
    entry: Arc<TrackEntry>,
    broadcast: Arc<Broadcast>,
    max_frame: usize,
) {
    let mut depacketizer = H264Packet::default();
    let mut clock = Clock::new(90_000);
    let mut au = BytesMut::new();
    let mut au_ts: Option<u32> = None;
    let mut last_us: Option<u64> = None;
    let mut group: Option<GroupWriter> = None;
    let mut broken = false;
    let mut flush =
        |au: &mut BytesMut, ts: u32, group: &mut Option<GroupWriter>, broken: &mut bool| {
            if au.is_empty() {
                return;
            }
            let data = au.split().freeze();
            if *broken || data.len() > max_frame {
                *group = None;
                *broken = false;
                return;
            }
            let us = clock.us(ts);
            let duration = last_us
                .map(|l| us.saturating_sub(l).min(1_000_000) as u32)
                .filter(|d| *d > 0)
                .unwrap_or(33_333);
            last_us = Some(us);
            if has_idr(&data) {
                *group = Some(entry.track.begin_group());
                broadcast.keyframe_arrived(&entry);
            }
            if let Some(g) = group.as_mut() {
                g.push(frame(&data, us, duration));
            }
        };
    while let Some(event) = track.poll().await {
        let TrackRemoteEvent::OnRtpPacket(p) = event else {
            continue;
        };
        let ts = p.header.timestamp;
        if au_ts.is_some_and(|t| t != ts) {
            // The previous access unit lost its last packet (marker): take what came.
            if let Some(t) = au_ts {
                flush(&mut au, t, &mut group, &mut broken);
            }
        }
        au_ts = Some(ts);
        match depacketizer.depacketize(&p.payload) {
            Ok(nals) => au.extend_from_slice(&nals),
            Err(e) => {
                debug!(error = %e, "an H.264 packet that does not depacketize");
                depacketizer = H264Packet::default();
                broken = true;
            }
        }
        if au.len() > max_frame {
            warn!(
                bytes = au.len(),
                "an access unit over quic.max_frame_bytes: dropped"
            );
            au.clear();
            broken = true;
        }
        if p.header.marker {
            flush(&mut au, ts, &mut group, &mut broken);
            au_ts = None;
        }
    }
}

/// Opus RTP → one frame per packet, a group a second.
async fn audio(track: Arc<dyn TrackRemote>, entry: Arc<TrackEntry>) {
    let mut clock = Clock::new(48_000);
    let mut group: Option<GroupWriter> = None;
    while let Some(event) = track.poll().await {
        let TrackRemoteEvent::OnRtpPacket(p) = event else {
            continue;
        };
        if p.payload.is_empty() || p.payload.len() > 2048 {
            continue;
        }
        let us = clock.us(p.header.timestamp);
        if group
            .as_ref()
            .is_none_or(|g| g.frames_pushed() >= AUDIO_GROUP)
        {
            group = Some(entry.track.begin_group());
        }
        if let Some(g) = group.as_mut() {
            g.push(frame(&p.payload, us, 20_000));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idr_is_found_in_annex_b_access_units() {
        let sps_pps_idr = [
            0, 0, 0, 1, 0x67, 1, 2, 0, 0, 0, 1, 0x68, 3, 0, 0, 1, 0x65, 9,
        ];
        assert!(has_idr(&sps_pps_idr));
        let p_slice = [0, 0, 0, 1, 0x41, 1, 2, 3];
        assert!(!has_idr(&p_slice));
        assert!(!has_idr(&[]));
    }

    #[test]
    fn rtp_time_unwraps_and_follows_the_clock() {
        let mut c = Clock::new(90_000);
        let t0 = c.us(u32::MAX - 1_499);
        let t1 = c.us(1_500); // 3000 ticks later, across the wrap: 33.3 ms
        assert_eq!(t1 - t0, 33_333);
        let t2 = c.us(1_000); // reordered: earlier, not a huge jump
        assert!(t2 < t1);
    }
}
