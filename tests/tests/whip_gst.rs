//! WHIP ingest (RFC 9725) from a second, independent client: GStreamer's `webrtcbin`
//! (the first is Chromium, `tests/browser/whip.test.mjs`). It publishes x264 video and Opus
//! audio as a unit, with the unit's device token, offering every candidate at once (no
//! trickle). The hub lists the unit online, records it like a QUIC unit, and a `DELETE`
//! on the resource takes it offline while webrtcbin is still sending; the recording
//! decodes in ffprobe and `hub verify` accepts its chain.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_sdp as gst_sdp;
use gstreamer_webrtc as gst_webrtc;
use serde_json::Value;
use tianwang_tests::*;
use tokio::sync::mpsc;

const UNIT: &str = "gst-1";
/// How much of the stream the hub must have recorded before the publisher stops.
const RECORDED_SECONDS: f64 = 20.0;
/// The encoder's frame rate (the launch line's caps).
const FPS: f64 = 30.0;

/// x264 constrained baseline with SPS/PPS in band and Opus, into one bundled webrtcbin.
const LAUNCH: &str = "\
    videotestsrc is-live=true pattern=ball \
    ! video/x-raw,width=640,height=360,framerate=30/1 \
    ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=30 \
    ! video/x-h264,profile=constrained-baseline \
    ! rtph264pay config-interval=-1 aggregate-mode=zero-latency \
    ! application/x-rtp,media=video,encoding-name=H264,payload=102,clock-rate=90000 \
    ! webrtcbin name=w bundle-policy=max-bundle \
    audiotestsrc is-live=true wave=sine \
    ! audioconvert ! audioresample ! opusenc \
    ! rtpopuspay \
    ! application/x-rtp,media=audio,encoding-name=OPUS,payload=111,clock-rate=48000 \
    ! w.";

/// A webrtcbin pipeline publishing over WHIP.
struct Publisher {
    pipeline: gst::Pipeline,
    webrtc: gst::Element,
    negotiation: mpsc::UnboundedReceiver<()>,
}

impl Publisher {
    fn start() -> anyhow::Result<Self> {
        gst::init().context("GStreamer init")?;
        let pipeline = gst::parse::launch(LAUNCH)
            .context("the webrtcbin launch line")?
            .downcast::<gst::Pipeline>()
            .map_err(|_| anyhow!("the launch line is not a pipeline"))?;
        let webrtc = pipeline.by_name("w").context("webrtcbin named w")?;
        // The hub's WebRTC candidates are on loopback (`console.webrtc_ips`). libnice
        // gathers on every interface but loopback unless it is given addresses, and its
        // checks from a LAN address to 127.0.0.1 are not delivered on every host (not on
        // this one's sandbox), so the publisher gathers on 127.0.0.1, beside the hub.
        let ice = webrtc.property::<gst::Object>("ice-agent");
        let added = ice.emit_by_name::<bool>("add-local-ip-address", &[&"127.0.0.1"]);
        assert!(added, "libnice took 127.0.0.1 as its address");
        let (tx, negotiation) = mpsc::unbounded_channel();
        webrtc.connect("on-negotiation-needed", false, move |_| {
            let _ = tx.send(());
            None
        });
        pipeline
            .set_state(gst::State::Playing)
            .context("the publisher pipeline to PLAYING")?;
        Ok(Self {
            pipeline,
            webrtc,
            negotiation,
        })
    }

    /// The offer once webrtcbin asks for negotiation: every transceiver send-only, set as
    /// the local description, returned with its candidates once gathering is complete.
    async fn offer(&mut self) -> anyhow::Result<String> {
        tokio::time::timeout(Duration::from_secs(10), self.negotiation.recv())
            .await
            .map_err(|_| anyhow!("webrtcbin never asked for negotiation: {:?}", self.errors()))?
            .context("webrtcbin's negotiation signal closed")?;
        let mut transceivers = 0;
        while let Some(t) = self
            .webrtc
            .emit_by_name::<Option<gst_webrtc::WebRTCRTPTransceiver>>(
                "get-transceiver",
                &[&transceivers],
            )
        {
            t.set_property(
                "direction",
                gst_webrtc::WebRTCRTPTransceiverDirection::Sendonly,
            );
            transceivers += 1;
        }
        assert_eq!(transceivers, 2, "a video and an audio transceiver");

        let (promise, reply) = gst::Promise::new_future();
        self.webrtc
            .emit_by_name::<()>("create-offer", &[&None::<gst::Structure>, &promise]);
        let reply = tokio::time::timeout(Duration::from_secs(10), reply)
            .await
            .context("create-offer did not answer")?
            .map_err(|e| anyhow!("create-offer: {e:?}"))?
            .context("create-offer replied nothing")?;
        let offer = reply
            .get::<gst_webrtc::WebRTCSessionDescription>("offer")
            .map_err(|e| anyhow!("create-offer replied no offer ({e}): {reply:?}"))?;
        let (promise, set) = gst::Promise::new_future();
        self.webrtc
            .emit_by_name::<()>("set-local-description", &[&offer, &promise]);
        settled("set-local-description", set).await?;

        // No trickle: the offer goes out with every candidate (bounded wait).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self
            .webrtc
            .property::<gst_webrtc::WebRTCICEGatheringState>("ice-gathering-state")
            != gst_webrtc::WebRTCICEGatheringState::Complete
        {
            if tokio::time::Instant::now() > deadline {
                bail!("ICE gathering did not complete in 10 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let local = self
            .webrtc
            .property::<Option<gst_webrtc::WebRTCSessionDescription>>("local-description")
            .context("no local description after set-local-description")?;
        local.sdp().as_text().context("the offer as SDP text")
    }

    async fn answer(&self, sdp: &str) -> anyhow::Result<()> {
        let message =
            gst_sdp::SDPMessage::parse_buffer(sdp.as_bytes()).context("the hub's answer")?;
        let answer =
            gst_webrtc::WebRTCSessionDescription::new(gst_webrtc::WebRTCSDPType::Answer, message);
        let (promise, set) = gst::Promise::new_future();
        self.webrtc
            .emit_by_name::<()>("set-remote-description", &[&answer, &promise]);
        settled("set-remote-description", set).await
    }

    fn connection(&self) -> gst_webrtc::WebRTCPeerConnectionState {
        self.webrtc.property("connection-state")
    }

    /// Errors the pipeline has posted since the last call.
    fn errors(&self) -> Vec<String> {
        let Some(bus) = self.pipeline.bus() else {
            return Vec::new();
        };
        std::iter::from_fn(|| bus.pop_filtered(&[gst::MessageType::Error]))
            .filter_map(|m| match m.view() {
                gst::MessageView::Error(e) => Some(format!(
                    "{}: {} ({:?})",
                    m.src().map(|s| s.path_string()).unwrap_or_default(),
                    e.error(),
                    e.debug()
                )),
                _ => None,
            })
            .collect()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// Waits (bounded) for a webrtcbin promise; an error in its reply fails.
async fn settled(what: &str, reply: gst::promise::PromiseFuture) -> anyhow::Result<()> {
    let reply = tokio::time::timeout(Duration::from_secs(10), reply)
        .await
        .map_err(|_| anyhow!("{what} did not settle in 10 s"))?
        .map_err(|e| anyhow!("{what}: {e:?}"))?;
    if let Some(r) = reply
        && let Ok(e) = r.get::<gst::glib::Error>("error")
    {
        bail!("{what}: {e}");
    }
    Ok(())
}

async fn get(hub: &Hub, token: &str, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let r = reqwest::Client::new()
        .get(format!("http://{}{path}", hub.http))
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("GET {path}"))?;
    Ok((r.status().as_u16(), r.bytes().await?.to_vec()))
}

/// The unit's recordings listing (`/api/recordings`).
async fn recordings(hub: &Hub, token: &str) -> anyhow::Result<Value> {
    let (status, body) = get(hub, token, &format!("/api/recordings?unit={UNIT}")).await?;
    let list: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    assert_eq!(status, 200, "{list}");
    Ok(list)
}

fn segments(list: &Value) -> Vec<Value> {
    list["recordings"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["segments"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// Seconds of media in the listing's closed segments (90 kHz media time).
fn recorded_seconds(list: &Value) -> f64 {
    segments(list)
        .iter()
        .map(|s| match &s["mediaDuration"] {
            Value::String(d) => d.parse().unwrap_or(0.0),
            Value::Number(d) => d.as_f64().unwrap_or(0.0),
            _ => 0.0,
        })
        .sum::<f64>()
        / 90_000.0
}

/// ffprobe decoding every frame: its streams (JSON) and whatever it reported as an error.
fn ffprobe_streams(path: &Path) -> (Vec<Value>, String) {
    let o = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-show_entries"])
        .args([
            "stream=codec_name,width,height,nb_read_frames",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .expect("ffprobe runs (scripts/deps test)");
    let json: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    let streams = json["streams"].as_array().cloned().unwrap_or_default();
    let mut err = String::from_utf8_lossy(&o.stderr).trim().to_string();
    if !o.status.success() {
        err.push_str(&format!(" (ffprobe {})", o.status));
    }
    (streams, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gstreamer_webrtcbin_publishes_a_unit_over_whip_that_is_recorded_and_verifies()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start(tmp.path(), None).await?;
    let device = hub.token("device", UNIT);
    let judge = hub.token("auditor", "judge-1");
    let http = reqwest::Client::new();

    let mut publisher = Publisher::start()?;
    let offer = publisher.offer().await?;
    assert!(offer.contains("H264/90000"), "{offer}");
    assert!(offer.contains("a=candidate:"), "no candidates: {offer}");
    let response = http
        .post(format!("http://{}/whip/{UNIT}", hub.http))
        .header("content-type", "application/sdp")
        .bearer_auth(&device)
        .body(offer.clone())
        .send()
        .await
        .context("POST /whip")?;
    let status = response.status().as_u16();
    let location = response
        .headers()
        .get("location")
        .and_then(|l| l.to_str().ok())
        .map(str::to_string);
    let answer = response.text().await?;
    assert_eq!(
        status,
        201,
        "the hub refused webrtcbin's offer: {answer}\noffer:\n{offer}\nhub log:\n{}",
        hub.log()
    );
    let location = location.context("a 201 without Location")?;
    assert!(
        location.starts_with(&format!("/whip/{UNIT}/")),
        "{location}"
    );
    publisher.answer(&answer).await?;

    // 1. Online, and webrtcbin connected (ICE and DTLS) to the hub.
    hub.wait_metric("tianwang_units_online", Duration::from_secs(10), |v| {
        v == 1.0
    })
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while publisher.connection() != gst_webrtc::WebRTCPeerConnectionState::Connected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "webrtcbin did not connect ({:?}): {:?}\noffer:\n{offer}\nanswer:\n{answer}\nhub log:\n{}",
            publisher.connection(),
            publisher.errors(),
            hub.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Publishing until the hub has recorded RECORDED_SECONDS of it (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let errors = publisher.errors();
        assert!(errors.is_empty(), "the publisher failed: {errors:?}");
        let list = recordings(&hub, &judge).await?;
        if recorded_seconds(&list) >= RECORDED_SECONDS {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not recorded in time: {list}\nhub log:\n{}",
            hub.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // 2. DELETE on the resource: the unit goes offline while webrtcbin is still sending.
    let deleted = http
        .delete(format!("http://{}{location}", hub.http))
        .bearer_auth(&device)
        .send()
        .await
        .context("DELETE the WHIP resource")?;
    assert_eq!(deleted.status().as_u16(), 200, "{}", deleted.text().await?);
    hub.wait_metric("tianwang_units_online", Duration::from_secs(10), |v| {
        v == 0.0
    })
    .await?;
    hub.wait_metric("tianwang_recordings_active", Duration::from_secs(20), |v| {
        v == 0.0
    })
    .await?;
    drop(publisher);

    // 3. One recording, fetched through the hub (hash-checked), decodes in ffprobe: H.264
    // at the sent size, at least 25 of the 30 frames a second, and the Opus track.
    let list = recordings(&hub, &judge).await?;
    let recs = list["recordings"].as_array().cloned().unwrap_or_default();
    assert_eq!(recs.len(), 1, "one recording: {list}");
    let seconds = recorded_seconds(&list);
    assert!(seconds >= RECORDED_SECONDS, "{seconds} s recorded: {list}");
    let rec = &recs[0];
    let (status, mut whole) = get(&hub, &judge, rec["initUrl"].as_str().unwrap()).await?;
    assert_eq!(status, 200, "the init segment");
    for s in segments(&list) {
        let (status, data) = get(&hub, &judge, s["url"].as_str().unwrap()).await?;
        assert_eq!(status, 200, "segment {s}");
        whole.extend_from_slice(&data);
    }
    let mp4 = tmp.path().join(format!("{UNIT}.mp4"));
    std::fs::write(&mp4, &whole)?;
    let (streams, err) = ffprobe_streams(&mp4);
    assert!(err.is_empty(), "ffprobe: {err}");
    let video = streams
        .iter()
        .find(|s| s["codec_name"] == "h264")
        .with_context(|| format!("no H.264 stream: {streams:?}"))?;
    assert_eq!(
        (video["width"].as_u64(), video["height"].as_u64()),
        (Some(640), Some(360)),
        "{video}"
    );
    let frames: f64 = video["nb_read_frames"]
        .as_str()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no frame count: {video}"))?;
    assert!(
        frames >= (FPS - 5.0) * seconds,
        "{frames} frames decoded in {seconds} s of recording"
    );
    assert!(
        streams.iter().any(|s| s["codec_name"] == "opus"),
        "no Opus stream: {streams:?}"
    );
    println!(
        "{{\"recorded_s\": {seconds:.2}, \"segments\": {}, \"h264_frames\": {frames}}}",
        segments(&list).len()
    );

    // The chain, signatures and files of the unit's recording hold.
    let data = hub.dir.join("data");
    let out = Command::new(bin("hub"))
        .args(["verify", "--data"])
        .arg(&data)
        .args(["--unit", UNIT])
        .output()?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "hub verify: {report}");
    assert!(
        report.contains("OK") && report.contains("segment"),
        "{report}"
    );
    Ok(())
}
