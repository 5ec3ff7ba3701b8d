//! `PATCH` on a WHIP resource (RFC 9725 §4.3): trickled candidates, and ICE restarts, both
//! as SDP fragments (`application/trickle-ice-sdpfrag`, RFC 8840). A phone that moves from
//! Wi-Fi to mobile data restarts ICE here and keeps its session, its recording and its
//! viewers; only if that fails does it publish anew.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tianwang_proto::v1::IceCandidate;
use tokio::sync::oneshot;

use super::problem;
use crate::session::HubContext;

pub const SDPFRAG: &str = "application/trickle-ice-sdpfrag";
/// Largest fragment accepted (candidates of a phone with a few interfaces fit easily).
pub const MAX_FRAG: usize = 16 * 1024;

/// A fragment, parsed: the ICE credentials (when it restarts ICE) and candidates by mid.
#[derive(Debug, Default, PartialEq)]
pub struct SdpFrag {
    pub ufrag: Option<String>,
    pub pwd: Option<String>,
    /// (mid, m-line index, `candidate:…`).
    pub candidates: Vec<(String, u32, String)>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FragError {
    #[error("the fragment is not UTF-8")]
    NotText,
    #[error("line {0}: a candidate before any m-line names its media")]
    CandidateOutsideMedia(usize),
    #[error("line {0}: not an SDP line (x=...)")]
    NotSdp(usize),
    #[error("an ICE restart needs both a=ice-ufrag and a=ice-pwd")]
    HalfCredentials,
}

impl SdpFrag {
    pub fn parse(body: &[u8]) -> Result<Self, FragError> {
        let text = std::str::from_utf8(body).map_err(|_| FragError::NotText)?;
        let mut frag = SdpFrag::default();
        let mut mline: Option<u32> = None;
        let mut mid: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if line.as_bytes().get(1) != Some(&b'=') {
                return Err(FragError::NotSdp(n + 1));
            }
            if line.starts_with("m=") {
                mline = Some(mline.map_or(0, |i| i + 1));
                mid = None;
            } else if let Some(v) = line.strip_prefix("a=mid:") {
                mid = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("a=ice-ufrag:") {
                frag.ufrag = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("a=ice-pwd:") {
                frag.pwd = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("a=candidate:") {
                let index = mline.ok_or(FragError::CandidateOutsideMedia(n + 1))?;
                frag.candidates.push((
                    mid.clone().unwrap_or_default(),
                    index,
                    format!("candidate:{v}"),
                ));
            }
        }
        if frag.ufrag.is_some() != frag.pwd.is_some() {
            return Err(FragError::HalfCredentials);
        }
        Ok(frag)
    }

    pub fn ice_candidates(&self) -> impl Iterator<Item = IceCandidate> + '_ {
        self.candidates
            .iter()
            .map(|(mid, index, candidate)| IceCandidate {
                candidate: candidate.clone(),
                sdp_mid: mid.clone(),
                sdp_mline_index: *index,
                username_fragment: self.ufrag.clone().unwrap_or_default(),
            })
    }
}

/// The value of an `a=` attribute, first occurrence.
pub fn attribute<'a>(sdp: &'a str, name: &str) -> Option<&'a str> {
    sdp.lines()
        .find_map(|l| l.trim_end().strip_prefix(name)?.strip_prefix(':'))
}

/// The fragment an answer sends back: its credentials, and each m-line with its mid and
/// candidates.
pub fn answer_frag(local_sdp: &str) -> String {
    let mut out = String::new();
    for name in ["a=ice-ufrag", "a=ice-pwd"] {
        if let Some(v) = attribute(local_sdp, name) {
            out.push_str(&format!("{name}:{v}\r\n"));
        }
    }
    for line in local_sdp.lines().map(str::trim_end) {
        if line.starts_with("m=") || line.starts_with("a=mid:") || line.starts_with("a=candidate:")
        {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out
}

/// The previous offer with new credentials and none of its old candidates: the offer an
/// ICE restart amounts to (the fragment's candidates are added after it).
pub fn restart_offer(previous: &str, ufrag: &str, pwd: &str) -> String {
    let mut out = String::with_capacity(previous.len());
    for line in previous.lines().map(str::trim_end) {
        if line.starts_with("a=candidate:") || line == "a=end-of-candidates" {
            continue;
        }
        if line.starts_with("a=ice-ufrag:") {
            out.push_str(&format!("a=ice-ufrag:{ufrag}"));
        } else if line.starts_with("a=ice-pwd:") {
            out.push_str(&format!("a=ice-pwd:{pwd}"));
        } else {
            out.push_str(line);
        }
        out.push_str("\r\n");
    }
    out
}

/// What the session task answers a PATCH with.
pub type PatchReply = Result<Option<(String, String)>, (StatusCode, String)>;

/// A PATCH handed to the session's task, which owns the PeerConnection.
pub struct PatchRequest {
    pub frag: SdpFrag,
    pub if_match: Option<String>,
    /// `Ok(None)`: candidates added (204); `Ok(Some((etag, frag)))`: ICE restarted (200).
    pub reply: oneshot::Sender<PatchReply>,
}

/// PATCH /whip/{unit}/{id}
pub async fn patch(
    State(hub): State<Arc<HubContext>>,
    Path((unit, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refused) = super::own_unit(&hub, &headers, &unit) {
        return refused;
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with(SDPFRAG) {
        return problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("a PATCH carries Content-Type: {SDPFRAG}"),
        );
    }
    let frag = match SdpFrag::parse(&body) {
        Ok(f) => f,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let Some(session) = hub
        .whip
        .get(&id)
        .filter(|s| s.unit == unit)
        .map(|s| s.patches.clone())
    else {
        return problem(StatusCode::NOT_FOUND, "no such WHIP session for this unit");
    };
    let if_match = headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (reply, answer) = oneshot::channel();
    if session
        .send(PatchRequest {
            frag,
            if_match,
            reply,
        })
        .await
        .is_err()
    {
        return problem(StatusCode::NOT_FOUND, "the WHIP session has ended");
    }
    match answer.await {
        Ok(Ok(None)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Ok(Some((etag, frag)))) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, SDPFRAG.to_string()),
                (header::ETAG, etag),
            ],
            frag,
        )
            .into_response(),
        Ok(Err((status, reason))) => problem(status, reason),
        Err(_) => problem(StatusCode::NOT_FOUND, "the WHIP session has ended"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHROME_RESTART: &str = "a=ice-ufrag:NEWU\r\na=ice-pwd:newpasswordnewpasswordnew\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n\
        a=candidate:1 1 udp 2122260223 192.0.2.7 50000 typ host generation 0\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 102\r\na=mid:1\r\n";

    #[test]
    fn a_restart_fragment_gives_credentials_and_candidates_by_mid() {
        let f = SdpFrag::parse(CHROME_RESTART.as_bytes()).expect("parses");
        assert_eq!(f.ufrag.as_deref(), Some("NEWU"));
        assert_eq!(f.pwd.as_deref(), Some("newpasswordnewpasswordnew"));
        assert_eq!(f.candidates.len(), 1);
        let c = f.ice_candidates().next().expect("one candidate");
        assert_eq!((c.sdp_mid.as_str(), c.sdp_mline_index), ("0", 0));
        assert!(c.candidate.starts_with("candidate:1 1 udp"));
        assert_eq!(c.username_fragment, "NEWU");
    }

    #[test]
    fn bad_fragments_are_refused_with_the_reason() {
        assert_eq!(
            SdpFrag::parse(b"a=candidate:1 1 udp 1 192.0.2.7 1 typ host\r\n"),
            Err(FragError::CandidateOutsideMedia(1))
        );
        assert_eq!(
            SdpFrag::parse(b"a=ice-ufrag:x\r\n"),
            Err(FragError::HalfCredentials)
        );
        assert_eq!(SdpFrag::parse(b"hello"), Err(FragError::NotSdp(1)));
        assert_eq!(SdpFrag::parse(&[0xff, 0xfe]), Err(FragError::NotText));
        // Only candidates (trickle) is fine.
        let trickle = SdpFrag::parse(
            b"m=audio 9 RTP/AVP 0\r\na=mid:0\r\na=candidate:1 1 udp 1 192.0.2.7 1 typ host\r\n",
        )
        .expect("parses");
        assert!(trickle.ufrag.is_none() && trickle.candidates.len() == 1);
    }

    #[test]
    fn the_restart_offer_swaps_credentials_and_drops_old_candidates() {
        let old = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=ice-ufrag:OLD\r\na=ice-pwd:oldpwd\r\n\
            a=candidate:1 1 udp 1 10.0.0.1 5 typ host\r\na=end-of-candidates\r\na=mid:0\r\n";
        let new = restart_offer(old, "NEWU", "newpwd");
        assert!(new.contains("a=ice-ufrag:NEWU\r\n") && new.contains("a=ice-pwd:newpwd\r\n"));
        assert!(!new.contains("OLD") && !new.contains("a=candidate") && new.contains("a=mid:0"));
        let frag = answer_frag(&format!(
            "{new}a=candidate:9 1 udp 1 127.0.0.1 7 typ host\r\n"
        ));
        assert_eq!(
            frag,
            "a=ice-ufrag:NEWU\r\na=ice-pwd:newpwd\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
             a=mid:0\r\na=candidate:9 1 udp 1 127.0.0.1 7 typ host\r\n"
        );
    }
}
