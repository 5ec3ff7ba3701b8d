//! WHIP ingest (RFC 9725): a phone, a browser or a third-party camera publishes a unit over
//! WebRTC. `POST /whip/{unit}` with the unit's device token (`Authorization: Bearer`) and an
//! SDP offer → `201 Created`, the answer (all candidates) and a resource URL;
//! `DELETE` on it ends the unit's session. Incoming RTP is reassembled into the same frames
//! and groups a QUIC agent sends — H.264 access units in Annex B (or VP8 frames), a group
//! from each keyframe; one Opus packet per frame — so relay, recorder, cascade and alarms treat the unit like
//! any other. Keyframe requests from viewers become PLI to the publisher.
//!
//! A unit that is live already (over QUIC or WHIP) is refused (409) rather than taken
//! over: a second publisher with the same token is more likely a mistake or a stolen token
//! than a reconnect, and the first one's `DELETE` (or its link dying) frees the unit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use tianwang_core::codec::VideoCodec;
use tianwang_core::{Track, TrackConfig};
use tianwang_proto::Kind;
use tianwang_proto::v1::{TrackInfo, TrackKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::RTCPeerConnectionState;

use crate::auth::Role;
use crate::console::peer::{Peer, PeerConfig, PeerEvent};
use crate::registry::{PublisherLink, TalkPath};
use crate::session::HubContext;

pub(crate) mod media;
pub mod patch;

use patch::{PatchReply, PatchRequest, SdpFrag};

/// A live WHIP resource.
pub struct WhipSession {
    pub unit: String,
    /// Its token's id and issue time, to end it when the token is revoked.
    pub jti: String,
    pub iat: u64,
    pub stop: CancellationToken,
    /// PATCH requests, to the task that owns the PeerConnection.
    pub patches: mpsc::Sender<PatchRequest>,
}

/// Largest SDP offer accepted.
pub const MAX_OFFER: usize = 64 * 1024;
/// A session whose video has not begun by then is ended.
const NO_MEDIA: Duration = Duration::from_secs(10);
/// Publisher session ids of WHIP units, far from QUIC connections' and pulls'.
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1 << 61);

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
    // Every refusal of a presented token is audited.
    let refuse = |who: &str, status: StatusCode, reason: String| {
        audit.record(
            who,
            "login.refused",
            &unit.chars().take(64).collect::<String>(),
            serde_json::json!({ "via": "whip", "reason": reason }),
        );
        problem(status, reason)
    };
    let claims = match hub.authority.verify(token) {
        Ok(c) => c,
        Err(e) => return refuse("?", StatusCode::UNAUTHORIZED, e.to_string()),
    };
    if !crate::session::valid_unit_id(&unit) {
        return problem(
            StatusCode::BAD_REQUEST,
            "unit ids are 1 to 64 of A-Z a-z 0-9 - _ . (not starting with .)",
        );
    }
    if claims.role != Role::Device {
        let reason = format!("a {:?} token cannot publish", claims.role);
        return refuse(&claims.sub, StatusCode::FORBIDDEN, reason);
    }
    if claims.sub != unit {
        let reason = format!("the token is for unit {:?}, not {unit:?}", claims.sub);
        return refuse(&claims.sub, StatusCode::FORBIDDEN, reason);
    }
    // A device of a court this hub does not serve does not publish here.
    if let Err(reason) = hub.scope_of(&claims) {
        return refuse(&claims.sub, StatusCode::FORBIDDEN, reason);
    }
    let offer = match crate::console::whep::sdp_offer(&headers, &body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let upper = offer.to_ascii_uppercase();
    // H.264 when offered (what agents send, what the recorder has written longest); VP8
    // otherwise, relayed and recorded as it comes.
    let video_codec = if upper.contains("H264/90000") {
        VideoCodec::H264
    } else if upper.contains("VP8/90000") {
        VideoCodec::Vp8
    } else {
        return problem(
            StatusCode::NOT_ACCEPTABLE,
            "the offer has no H.264 or VP8 video: units publish H.264 or VP8 (and Opus)",
        );
    };
    let has_audio = upper.contains("OPUS/48000");
    let wants_talkback = has_audio && receives_audio(&offer);
    if hub.units.get(&unit).is_some_and(|b| b.is_online()) {
        return problem(
            StatusCode::CONFLICT,
            format!("unit {unit:?} is live already; end that session first"),
        );
    }
    let config = PeerConfig {
        ips: hub.config.console.webrtc_ips.clone(),
    };
    let (mut peer, mut events, mut remote) =
        match Peer::new_ingest(&config, Arc::clone(&hub.metrics), video_codec).await {
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
    // A publisher that offers to receive audio hears talkback on it: one send track for
    // the whole session, bound before the answer so the answer says sendrecv.
    let talk = if wants_talkback {
        let track = Track::new("talkback", TrackConfig::default(), Arc::default());
        if let Err(e) = peer.send_talkback(&track).await {
            peer.close().await;
            return problem(
                StatusCode::BAD_REQUEST,
                format!("the offer's audio cannot carry talkback: {e}"),
            );
        }
        Some(track)
    } else {
        None
    };
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
        codec: video_codec.name().into(),
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
            talk: talk.clone().map(TalkPath::Whip),
        },
    );
    let tracks = attached.tracks;
    let broadcast = attached.broadcast;
    let id = format!("{:016x}", rand::random::<u64>());
    let stop = CancellationToken::new();
    let (patch_tx, mut patches) = mpsc::channel(4);
    hub.whip.insert(
        id.clone(),
        WhipSession {
            unit: unit.clone(),
            jti: claims.jti.clone(),
            iat: claims.iat,
            stop: stop.clone(),
            patches: patch_tx,
        },
    );
    let mut etag = etag_of(&answer);
    let created_etag = etag.clone();
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
            let mut started = std::collections::HashSet::new();
            let no_media = tokio::time::sleep(NO_MEDIA);
            tokio::pin!(no_media);
            let mut media = tokio::task::JoinSet::new();
            let max_frame = task_hub.config.quic.max_frame_bytes;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = task_hub.shutdown.cancelled() => break,
                    event = events.recv() => match event {
                        Some(PeerEvent::State(state)) => {
                            debug!(%state, "WHIP connection");
                            peer.set_connected(state == RTCPeerConnectionState::Connected);
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
                        let dropped = task_hub.metrics.whip_dropped.clone();
                        let ssrc = track.ssrcs().await.first().copied();
                        // One stream per kind: another SSRC would interleave with the
                        // first in the unit's track.
                        if !started.insert(name) {
                            warn!(name, ?ssrc, "a second stream of the same kind: ignored");
                            dropped.with_label_values(&["extra_stream"]).inc();
                            continue;
                        }
                        if name == "video" {
                            if let Some(ssrc) = ssrc {
                                video_ssrc = Some((Arc::clone(&track), ssrc));
                                // A fresh keyframe at once, for the first viewers and the recorder.
                                request_keyframe(&track, ssrc).await;
                            }
                            media.spawn(media::video(track, entry, Arc::clone(&broadcast), max_frame, video_codec, dropped));
                        } else {
                            media.spawn(media::audio(track, entry, dropped));
                        }
                    }
                    _ = &mut no_media, if !started.contains("video") => {
                        // Connected or not, no video RTP the session can place (a wrong
                        // SSRC, a blocked path): the unit is not live, and says why.
                        warn!("no video arrived in {NO_MEDIA:?}: ending the session");
                        task_hub.metrics.whip_dropped.with_label_values(&["no_media"]).inc();
                        task_hub.evidence.audit.record(
                            &broadcast.unit_id,
                            "whip.no_media",
                            &broadcast.unit_id,
                            serde_json::json!({ "resource": task_id,
                                "reason": format!("no video RTP the offer announced arrived in {NO_MEDIA:?}") }),
                        );
                        break;
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
                    Some(req) = patches.recv() => {
                        let reply = apply_patch(&peer, &mut events, req.frag, req.if_match, &mut etag).await;
                        if let Err((status, reason)) = &reply {
                            debug!(%status, %reason, "PATCH refused");
                        }
                        let _ = req.reply.send(reply);
                    }
                    Some(_) = media.join_next(), if !media.is_empty() => {}
                }
            }
            media.shutdown().await;
            if let Some(talk) = &talk {
                talk.close();
            }
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
            (header::ETAG, created_etag),
        ],
        answer,
    )
        .into_response()
}

/// The refusal of a request on a WHIP resource unless it carries the unit's own token.
#[allow(clippy::result_large_err)] // a refusal is built once per refused request
pub(crate) fn own_unit(hub: &HubContext, headers: &HeaderMap, unit: &str) -> Result<(), Response> {
    let Some(token) = crate::console::whep::bearer(headers) else {
        return Err(problem(
            StatusCode::UNAUTHORIZED,
            "Authorization: Bearer required",
        ));
    };
    let (who, status, reason) = match hub.authority.verify(token) {
        Ok(c) if c.role == Role::Device && c.sub == unit => return Ok(()),
        Ok(c) => (
            c.sub,
            StatusCode::FORBIDDEN,
            "not this unit's token".to_string(),
        ),
        Err(e) => ("?".to_string(), StatusCode::UNAUTHORIZED, e.to_string()),
    };
    // Refused like a sign-in: someone tried to end or steer another unit's session.
    hub.evidence.audit.record(
        &who,
        "login.refused",
        &unit.chars().take(64).collect::<String>(),
        serde_json::json!({ "via": "whip", "reason": reason }),
    );
    Err(problem(status, reason))
}

/// DELETE /whip/{unit}/{id}: only with the unit's own token.
pub async fn stop(
    State(hub): State<Arc<HubContext>>,
    Path((unit, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = own_unit(&hub, &headers, &unit) {
        return refused;
    }
    match hub.whip.remove_if(&id, |_, s| s.unit == unit) {
        Some((_, session)) => {
            session.stop.cancel();
            StatusCode::OK.into_response()
        }
        None => problem(StatusCode::NOT_FOUND, "no such WHIP session for this unit"),
    }
}

/// The ETag of the ICE session: the hub's ICE username fragment, which a restart changes.
fn etag_of(local_sdp: &str) -> String {
    format!(
        "\"{}\"",
        patch::attribute(local_sdp, "a=ice-ufrag").unwrap_or("")
    )
}

/// Trickled candidates are added; new credentials restart ICE: the previous offer with
/// them is applied again, and the answer's credentials and candidates go back.
async fn apply_patch(
    peer: &Peer,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<PeerEvent>,
    frag: SdpFrag,
    if_match: Option<String>,
    etag: &mut String,
) -> PatchReply {
    if let Some(m) = if_match
        && m != "*"
        && m != *etag
    {
        return Err((
            StatusCode::PRECONDITION_FAILED,
            format!("the ICE session is now {etag}, not {m}"),
        ));
    }
    let previous = peer.remote_sdp().await.unwrap_or_default();
    let restart = match (&frag.ufrag, &frag.pwd) {
        (Some(u), Some(p)) if patch::attribute(&previous, "a=ice-ufrag") != Some(u.as_str()) => {
            Some((u.clone(), p.clone()))
        }
        _ => None,
    };
    if let Some((ufrag, pwd)) = &restart {
        let offer = patch::restart_offer(&previous, ufrag, pwd);
        peer.apply_offer(offer).await.map_err(|e| {
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("the ICE restart was refused: {e}"),
            )
        })?;
    }
    for c in frag.ice_candidates() {
        peer.add_candidate(c).await.map_err(|e| {
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("a candidate was refused: {e}"),
            )
        })?;
    }
    if restart.is_none() {
        return Ok(None);
    }
    peer.create_answer().await.map_err(|e| {
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("no answer to the ICE restart: {e}"),
        )
    })?;
    let mut answer = peer.local_sdp().await.unwrap_or_default();
    if !answer.contains("a=candidate:") {
        // The agent gathers again: wait for it (briefly), keeping the connection state.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(e) = events.recv().await {
                match e {
                    PeerEvent::GatheringComplete => return,
                    PeerEvent::State(s) => {
                        peer.set_connected(s == RTCPeerConnectionState::Connected)
                    }
                    _ => {}
                }
            }
        })
        .await;
        answer = peer.local_sdp().await.unwrap_or_default();
    }
    *etag = etag_of(&answer);
    info!(etag = %etag, "ICE restarted");
    Ok(Some((etag.clone(), patch::answer_frag(&answer))))
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

/// Whether the offer's audio m-line asks to receive as well as send (talkback).
fn receives_audio(offer: &str) -> bool {
    let Some(start) = offer.find("m=audio") else {
        return false;
    };
    let section = &offer[start..];
    let section = section[1..]
        .find("\nm=")
        .map_or(section, |end| &section[..end + 1]);
    let has = |a: &str| section.lines().any(|l| l.trim_end() == a);
    // No direction attribute means sendrecv (RFC 4566).
    has("a=sendrecv") || !(has("a=sendonly") || has("a=recvonly") || has("a=inactive"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn talkback_needs_an_audio_line_that_receives() {
        let offer = |dir: &str| {
            format!(
                "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n{dir}a=mid:0\r\nm=video 9 UDP/TLS/RTP/SAVPF 102\r\na=sendrecv\r\n"
            )
        };
        assert!(receives_audio(&offer("a=sendrecv\r\n")));
        assert!(receives_audio(&offer("")));
        assert!(!receives_audio(&offer("a=sendonly\r\n")));
        assert!(!receives_audio(
            "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 102\r\n"
        ));
    }
}
