//! Bad RTP from WHIP publishers, sent by a webrtc-rs publisher that can send anything: a
//! frame over the size limit, packets that do not depacketize, P-frames that follow them,
//! and a stream whose SSRC the offer does not announce. Each is dropped and counted; the
//! unit resumes at its next keyframe with whole groups; the session whose video never
//! arrives is ended with the reason audited; the hub and its other units carry on.

use std::time::Duration;

use bytes::Bytes;
use tianwang_proto::v1::TrackKind;
use tianwang_tests::whip::{WhipPublisher, h264_clip};
use tianwang_tests::{
    Hub, Subscriber, assert_whole_groups, collect, is_idr_with_parameter_sets, track_id,
};
use tianwang_transport::Limits;

const MAX_FRAME: usize = 64 * 1024;

/// The NAL units of an Annex B access unit without their start codes and delimiters.
fn nal_bodies(au: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= au.len() {
        if au[i..i + 3] == [0, 0, 1] {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    let ends = starts.iter().skip(1).map(|s| s - 3).chain([au.len()]);
    starts
        .iter()
        .zip(ends)
        .map(|(&s, e)| {
            let mut e = e;
            while e > s && au[e - 1] == 0 {
                e -= 1;
            }
            &au[s..e]
        })
        .filter(|n| n.first().is_some_and(|b| b & 0x1f != 9))
        .collect()
}

/// The offer with its SSRC swapped for another: the packets that follow it are strangers.
fn another_ssrc(offer: String) -> String {
    let ssrc = offer
        .lines()
        .find_map(|l| l.strip_prefix("a=ssrc:")?.split(' ').next())
        .and_then(|s| s.parse::<u32>().ok())
        .expect("the offer announces its SSRC");
    offer.replace(&format!("a=ssrc:{ssrc} "), &format!("a=ssrc:{} ", ssrc ^ 1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rtp_is_dropped_and_counted_and_the_unit_resumes_at_its_next_keyframe()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(
        dir.path(),
        Some(&format!("[quic]\nmax_frame_bytes = {MAX_FRAME}\n")),
    )
    .await?;
    // Malformed SDP that names H.264: refused with the reason, nothing made live.
    let res = reqwest::Client::new()
        .post(format!("http://{}/whip/phone-3", hub.http))
        .bearer_auth(hub.token("device", "phone-3"))
        .header("content-type", "application/sdp")
        .body("v=0\r\nthis is not an offer but mentions H264/90000\r\n")
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 400);
    assert!(res.text().await?.contains("the offer was refused"));
    let clip = h264_clip(dir.path(), 120)?;
    assert!(is_idr_with_parameter_sets(&clip[0]) && is_idr_with_parameter_sets(&clip[60]));

    // A publisher whose offer names another SSRC than the one it sends on.
    let mut stranger = WhipPublisher::publish(
        hub.http,
        "phone-2",
        &hub.token("device", "phone-2"),
        another_ssrc,
    )
    .await?;
    stranger.wait_connected(Duration::from_secs(10)).await?;

    let mut phone =
        WhipPublisher::publish(hub.http, "phone-1", &hub.token("device", "phone-1"), |o| o).await?;
    phone.wait_connected(Duration::from_secs(10)).await?;
    let mut viewer = Subscriber::connect(
        hub.quic,
        &hub.trust(),
        &hub.token("viewer", "desk"),
        &Limits::default(),
    )
    .await?;
    let (subscribed, mut frames) = viewer.subscribe("phone-1", 256).await?;
    let video = track_id(&subscribed, TrackKind::Video);

    let pace = Duration::from_millis(10);
    let mut ts: u32 = 1000;
    let mut next_ts = || {
        ts = ts.wrapping_add(3000);
        ts
    };
    // A good group: frames 0..30.
    for au in &clip[..30] {
        phone.send_access_unit(au, next_ts()).await?;
        stranger.send_access_unit(au, next_ts()).await?;
        tokio::time::sleep(pace).await;
    }
    // Packets that do not depacketize: an FU-A without its header, a STAP-A whose NAL
    // length runs past the packet. The P-frames after them cannot be decoded either.
    phone
        .send_packet(Bytes::from_static(&[0x1c]), next_ts(), true)
        .await?;
    phone
        .send_packet(
            Bytes::from_static(&[0x18, 0xff, 0xff, 0x65, 1]),
            next_ts(),
            true,
        )
        .await?;
    for au in &clip[31..40] {
        phone.send_access_unit(au, next_ts()).await?;
        tokio::time::sleep(pace).await;
    }
    // A frame over the limit: an IDR slice of 100 kB in FU-A fragments, one timestamp.
    let mut huge = vec![0, 0, 0, 1, 0x65];
    huge.resize(100_000, 0x42);
    phone.send_access_unit(&huge, next_ts()).await?;
    // Good again from the next keyframe: frames 60..120, two groups. Frame 100's packets
    // arrive last first: put back in order, it is whole.
    for (i, au) in clip.iter().enumerate().skip(60) {
        phone
            .send_access_unit_reversed(au, next_ts(), i == 100)
            .await?;
        tokio::time::sleep(pace).await;
    }

    let got = collect(&mut frames, video, 90, Duration::from_secs(20)).await?;
    assert_whole_groups(&got);
    let groups: Vec<_> = got.iter().filter(|f| f.index == 0).collect();
    assert_eq!(
        groups.len(),
        3,
        "the first group, then the two after the bad input"
    );
    assert!(
        groups
            .iter()
            .all(|f| is_idr_with_parameter_sets(f.frame.payload()))
    );
    assert!(got.iter().all(|f| f.frame.payload().len() <= MAX_FRAME));
    // Frame 100 is the 71st received (30 + 40): the same NAL units as the clip's.
    assert_eq!(nal_bodies(got[70].frame.payload()), nal_bodies(&clip[100]));
    assert!(
        clip[100].len() > 2 * 1200,
        "frame 100 spans several packets"
    );
    // Nothing more came: the P-frames after the bad packets and the huge frame were dropped.
    let more = collect(&mut frames, video, 1, Duration::from_millis(500)).await;
    assert!(more.is_err(), "a frame beyond the 90 good ones arrived");

    let m = hub.metrics().await?;
    assert!(m.get("tianwang_whip_dropped_total{reason=\"undecodable\"}") >= 1.0);
    assert!(m.get("tianwang_whip_dropped_total{reason=\"oversize\"}") >= 1.0);

    // The stranger's video never reached its unit: its session ends, with the reason.
    hub.wait_metric(
        "tianwang_whip_dropped_total{reason=\"no_media\"}",
        Duration::from_secs(20),
        |v| v >= 1.0,
    )
    .await?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(10), |v| {
        v == 1.0
    })
    .await?;
    // The phone is still live.
    phone.send_access_unit(&clip[0], next_ts()).await?;
    collect(&mut frames, video, 1, Duration::from_secs(10)).await?;

    phone.close().await;
    stranger.close().await;
    sqlx::any::install_default_drivers();
    let db = format!("sqlite://{}", hub.dir.join("data/index.sqlite").display());
    let pool = sqlx::AnyPool::connect(&db).await?;
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT action, detail FROM audit WHERE subject = 'phone-2'")
            .fetch_all(&pool)
            .await?;
    pool.close().await;
    assert!(
        rows.iter()
            .any(|(a, d)| a == "whip.no_media" && d.contains("no video RTP")),
        "{rows:?}"
    );
    Ok(())
}
