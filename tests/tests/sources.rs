//! Capture sources beyond the test pattern: a media file (video and its own audio) is
//! decoded, re-encoded and streamed like a camera, at the file's own pace.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;
use std::time::Duration;

use tianwang_proto::v1::TrackKind;
use tianwang_tests::*;
use tianwang_transport::Limits;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_media_file_streams_like_a_camera() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let clip = tmp.path().join("clip.mp4");
    let made = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=320x240:rate=25",
            "-f",
            "lavfi",
        ])
        .args([
            "-i",
            "sine=frequency=440:sample_rate=44100",
            "-t",
            "20",
            "-c:v",
            "libx264",
        ])
        .args(["-pix_fmt", "yuv420p", "-c:a", "aac"])
        .arg(&clip)
        .status()?;
    assert!(made.success(), "ffmpeg made the clip");

    let hub = Hub::start(tmp.path(), None).await?;
    let token = hub.token("device", "bwc-file");
    let source = format!("file:{}", clip.display());
    let agent = Agent::start(
        &hub.quic.to_string(),
        &hub.ca(),
        "bwc-file",
        &token,
        tmp.path(),
        &["--source", &source],
    )?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(20), |v| {
        v == 1.0
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", agent.log()))?;

    let viewer = hub.token("viewer", "alice");
    let mut s = Subscriber::connect(hub.quic, &hub.trust(), &viewer, &Limits::default()).await?;
    let (sub, mut rx) = s.subscribe("bwc-file", 1024).await?;
    assert_eq!(
        sub.tracks.len(),
        2,
        "video and the file's own audio: {sub:?}"
    );
    let video = track_id(&sub, TrackKind::Video);
    let frames = collect(&mut rx, video, 60, Duration::from_secs(20)).await?;
    assert!(is_idr_with_parameter_sets(frames[0].frame.payload()));
    assert_whole_groups(&frames);
    // Paced by the file, not as fast as it decodes: 60 frames at 30 fps span about 2 s.
    let span = frames[59].frame.header.timestamp_us - frames[0].frame.header.timestamp_us;
    assert!(span > 1_500_000, "60 frames captured within {span} µs");
    Ok(())
}
