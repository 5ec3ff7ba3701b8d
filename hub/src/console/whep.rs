//! WHEP (WebRTC-HTTP Egress Protocol): any standard WebRTC player watches a unit.
//!
//! `POST /whep/{unit}` with `Authorization: Bearer <token>` and an SDP offer →
//! `201 Created`, the answer (with all of the hub's candidates: no trickle), and a resource
//! URL; `DELETE` on that URL ends it.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info};
use webrtc::peer_connection::RTCPeerConnectionState;

use super::peer::{Peer, PeerConfig, PeerEvent};
use crate::session::HubContext;
use tianwang_core::codec::VideoCodec;

/// Largest SDP offer accepted.
pub const MAX_OFFER: usize = 64 * 1024;

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message.into(),
    )
        .into_response()
}

/// The token of an `Authorization: Bearer` header (WHEP, and the hub's other HTTP APIs).
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Checks the bearer token: the refusal (status and reason) if it does not allow watching.
fn authorize(
    hub: &HubContext,
    headers: &HeaderMap,
) -> Result<(String, String), (StatusCode, String)> {
    let Some(token) = bearer(headers) else {
        return Err((
            StatusCode::UNAUTHORIZED,
            "Authorization: Bearer <token> required".into(),
        ));
    };
    let refused = |actor: &str, status: StatusCode, reason: String| {
        hub.evidence.audit.record(
            actor,
            "login.refused",
            "whep",
            serde_json::json!({ "via": "whep", "reason": reason }),
        );
        (status, reason)
    };
    let claims = hub
        .authority
        .verify(token)
        .map_err(|e| refused("?", StatusCode::UNAUTHORIZED, e.to_string()))?;
    if !claims.role.can_watch_live() {
        return Err(refused(
            &claims.sub,
            StatusCode::FORBIDDEN,
            format!("a {:?} token cannot watch live", claims.role),
        ));
    }
    let scope = hub
        .scope_of(&claims)
        .map_err(|reason| refused(&claims.sub, StatusCode::FORBIDDEN, reason))?;
    Ok((claims.sub, scope))
}

/// The SDP offer of a WHEP or WHIP request, or the refusal to send back.
#[allow(clippy::result_large_err)] // a refusal is built once per refused request
pub(crate) fn sdp_offer(headers: &HeaderMap, body: &[u8]) -> Result<String, Response> {
    let sdp_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !sdp_type.starts_with("application/sdp") {
        return Err(problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the offer must be Content-Type: application/sdp",
        ));
    }
    let Ok(offer) = String::from_utf8(body.to_vec()) else {
        return Err(problem(StatusCode::BAD_REQUEST, "the offer is not UTF-8"));
    };
    if !offer.starts_with("v=0") {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "the body is not an SDP offer",
        ));
    }
    Ok(offer)
}

/// Answers the applied offer with every local candidate in it: WHEP and WHIP do not
/// trickle, so gathering is waited for (briefly).
#[allow(clippy::result_large_err)]
pub(crate) async fn answer_with_candidates(
    peer: &Peer,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<PeerEvent>,
) -> Result<String, Response> {
    if let Err(e) = peer.create_answer().await {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            format!("no answer to this offer: {e}"),
        ));
    }
    let gathered = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(e) = events.recv().await {
            if matches!(e, PeerEvent::GatheringComplete) {
                return;
            }
        }
    })
    .await;
    if gathered.is_err() {
        debug!("ICE gathering did not complete in time; answering with what there is");
    }
    peer.local_sdp()
        .await
        .ok_or_else(|| problem(StatusCode::INTERNAL_SERVER_ERROR, "no local description"))
}

/// POST /whep/{unit}
pub async fn start(
    State(hub): State<Arc<HubContext>>,
    Path(unit): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (user, scope) = match authorize(&hub, &headers) {
        Ok(who) => who,
        Err((status, reason)) => return problem(status, reason),
    };
    if let Some(court) = hub.cascade.unit_court(&hub.units, &unit)
        && !hub.cascade.covers(&scope, &court)
    {
        let reason = format!("unit {unit:?} belongs to court {court}, outside your court {scope}");
        hub.evidence.audit.record(
            &user,
            "view.refused",
            &unit,
            serde_json::json!({ "via": "whep", "reason": reason }),
        );
        return problem(StatusCode::FORBIDDEN, reason);
    }
    let offer = match sdp_offer(&headers, &body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    hub.cascade.ensure_pulled(&hub.units, &unit);
    let (broadcast, tracks) = match hub.units.subscribe(&unit, &[]) {
        Ok(s) => s,
        Err(e) => return problem(StatusCode::NOT_FOUND, e.to_string()),
    };
    // A unit's video goes out as it came (H.264, or VP8 from some WHIP publishers): a
    // player that cannot take it gets told.
    let video = tracks
        .iter()
        .find(|(e, _)| e.info.kind() == tianwang_proto::v1::TrackKind::Video)
        .map(|(e, _)| VideoCodec::from_name(&e.info.codec).unwrap_or_default());
    let (wanted, name) = match video {
        Some(VideoCodec::Vp8) => ("VP8/90000", "VP8"),
        _ => ("H264/90000", "H.264"),
    };
    if !offer.to_ascii_uppercase().contains(wanted) {
        return problem(
            StatusCode::NOT_ACCEPTABLE,
            format!(
                "the offer has no {name}: unit {unit:?} sends {name} video (and Opus); the hub does not transcode"
            ),
        );
    }
    let config = PeerConfig {
        ips: hub.config.console.webrtc_ips.clone(),
    };
    let (mut peer, mut events) = match Peer::new(&config, Arc::clone(&hub.metrics)).await {
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
    let id = format!("{:016x}", rand::random::<u64>());
    if let Err(e) = peer.attach(&id, broadcast, tracks).await {
        peer.close().await;
        return problem(
            StatusCode::BAD_REQUEST,
            format!("cannot send {unit} on this offer: {e}"),
        );
    }
    let answer = match answer_with_candidates(&peer, &mut events).await {
        Ok(a) => a,
        Err(r) => {
            peer.close().await;
            return r;
        }
    };
    let stop = CancellationToken::new();
    hub.whep.insert(id.clone(), (unit.clone(), stop.clone()));
    let location = format!("/whep/{unit}/{id}");
    let span = tracing::info_span!("whep", %id, %unit);
    let task_hub = Arc::clone(&hub);
    let task_id = id.clone();
    tokio::spawn(
        async move {
            info!("WHEP viewer started");
            let since = std::time::Instant::now();
            let audit = task_hub.evidence.audit.clone();
            audit.record(&user, "view.start", &unit, serde_json::json!({ "via": "whep", "id": task_id }));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = task_hub.shutdown.cancelled() => break,
                    event = events.recv() => match event {
                        Some(PeerEvent::State(state)) => {
                            peer.set_connected(state == RTCPeerConnectionState::Connected);
                            if matches!(state, RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed) {
                                break;
                            }
                        }
                        Some(_) => {}
                        None => break,
                    },
                }
            }
            task_hub.whep.remove(&task_id);
            peer.close().await;
            audit.record(&user, "view.end", &unit, serde_json::json!({ "via": "whep", "id": task_id,
                "seconds": since.elapsed().as_secs_f64() }));
            info!("WHEP viewer ended");
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

/// DELETE /whep/{unit}/{id}
pub async fn stop(
    State(hub): State<Arc<HubContext>>,
    Path((unit, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err((status, reason)) = authorize(&hub, &headers) {
        return problem(status, reason);
    }
    match hub.whep.remove_if(&id, |_, (u, _)| *u == unit) {
        Some((_, (_, stop))) => {
            stop.cancel();
            StatusCode::OK.into_response()
        }
        None => problem(StatusCode::NOT_FOUND, "no such WHEP session"),
    }
}

/// PATCH (trickle ICE): not offered; the answer carries every candidate.
pub async fn patch() -> Response {
    problem(
        StatusCode::METHOD_NOT_ALLOWED,
        "trickle ICE is not supported: the answer carries all of the hub's candidates",
    )
}
