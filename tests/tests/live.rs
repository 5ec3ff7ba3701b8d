//! A real field agent (GStreamer, test source) streams over QUIC to a real hub; subscribers
//! receive it: the same frames in order, starting at a keyframe, decodable by ffmpeg; a late
//! joiner starts at once from the cached group; a stalled subscriber holds nobody back.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;
use std::time::Duration;

use tianwang_proto::v1::TrackKind;
use tianwang_tests::*;
use tianwang_transport::Limits;

const UNIT: &str = "bwc-001";

async fn hub_and_agent(dir: &std::path::Path, agent_args: &[&str]) -> anyhow::Result<(Hub, Agent)> {
    let hub = Hub::start(dir, None).await?;
    let token = hub.token("device", UNIT);
    let agent = Agent::start(
        &hub.quic.to_string(),
        &hub.ca(),
        UNIT,
        &token,
        dir,
        agent_args,
    )?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(20), |v| {
        v == 1.0
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\nagent log:\n{}", agent.log()))?;
    Ok((hub, agent))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_subscribers_receive_the_same_frames_in_order_and_the_file_decodes()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (hub, _agent) = hub_and_agent(tmp.path(), &["--keyframe-interval", "1"]).await?;
    let token = hub.token("viewer", "alice");

    let mut a = Subscriber::connect(hub.quic, &hub.trust(), &token, &Limits::default()).await?;
    let mut b = Subscriber::connect(hub.quic, &hub.trust(), &token, &Limits::default()).await?;
    let (sa, mut ra) = a.subscribe(UNIT, 1024).await?;
    let (sb, mut rb) = b.subscribe(UNIT, 1024).await?;
    let (va, vb) = (
        track_id(&sa, TrackKind::Video),
        track_id(&sb, TrackKind::Video),
    );
    let fa = collect(&mut ra, va, 90, Duration::from_secs(20)).await?;
    let fb = collect(&mut rb, vb, 90, Duration::from_secs(20)).await?;

    for frames in [&fa, &fb] {
        assert!(
            is_idr_with_parameter_sets(frames[0].frame.payload()),
            "first frame is an IDR with SPS/PPS"
        );
        assert_whole_groups(frames);
        assert!(
            frames
                .windows(2)
                .all(|w| w[0].frame.header.timestamp_us < w[1].frame.header.timestamp_us)
        );
    }
    // Both subscribed to the same group stream of the same relay: from where the later one
    // starts, the two sequences are the same frames, byte for byte.
    let start = fb[0]
        .frame
        .header
        .timestamp_us
        .max(fa[0].frame.header.timestamp_us);
    let tail_a: Vec<_> = fa
        .iter()
        .filter(|f| f.frame.header.timestamp_us >= start)
        .collect();
    let tail_b: Vec<_> = fb
        .iter()
        .filter(|f| f.frame.header.timestamp_us >= start)
        .collect();
    let common = tail_a.len().min(tail_b.len());
    assert!(common >= 60, "only {common} frames in common");
    for (x, y) in tail_a.iter().zip(&tail_b).take(common) {
        assert_eq!(x.frame.encoded, y.frame.encoded);
        assert_eq!((x.group, x.index), (y.group, y.index));
    }

    // `hub watch` writes an Annex-B file that ffmpeg decodes without a single error.
    let out = tmp.path().join("watch.h264");
    let watch = Command::new(bin("hub"))
        .args([
            "watch",
            "--hub",
            &hub.quic.to_string(),
            "--token",
            &token,
            "--unit",
            UNIT,
            "--duration",
            "3",
            "--json",
            "--ca",
        ])
        .arg(hub.ca())
        .arg("--out")
        .arg(&out)
        .output()?;
    assert!(
        watch.status.success(),
        "hub watch: {}",
        String::from_utf8_lossy(&watch.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&watch.stdout)?;
    assert!(
        report["video_frames"].as_u64().unwrap_or(0) >= 30,
        "{report}"
    );
    assert!(report["first_frame_ms"].as_f64().is_some(), "{report}");
    let decode = Command::new("ffmpeg")
        .args(["-v", "error", "-f", "h264", "-i"])
        .arg(&out)
        .args(["-f", "null", "-"])
        .output()?;
    assert!(decode.status.success());
    assert_eq!(
        String::from_utf8_lossy(&decode.stderr),
        "",
        "ffmpeg reports decode errors"
    );
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=codec_name,width,height,nb_read_frames",
            "-of",
            "json",
        ])
        .arg(&out)
        .output()?;
    let probe: serde_json::Value = serde_json::from_slice(&probe.stdout)?;
    let stream = &probe["streams"][0];
    assert_eq!(stream["codec_name"], "h264");
    assert_eq!(stream["width"], 640);
    let decoded: u64 = stream["nb_read_frames"].as_str().unwrap_or("0").parse()?;
    assert_eq!(
        decoded,
        report["video_frames"].as_u64().unwrap_or(0),
        "every written frame decodes"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_starts_from_the_cached_group_without_waiting_for_a_keyframe()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    // Keyframes only every 20 s: a joiner that had to wait for one would get nothing soon.
    let (hub, _agent) = hub_and_agent(tmp.path(), &["--keyframe-interval", "20"]).await?;
    let token = hub.token("viewer", "alice");
    // Let the group grow for a while before joining.
    hub.wait_metric("tianwang_frames_in_total", Duration::from_secs(20), |v| {
        v >= 150.0
    })
    .await?;
    let mut s = Subscriber::connect(hub.quic, &hub.trust(), &token, &Limits::default()).await?;
    let joined_at = unix_now_us();
    let (sub, mut rx) = s.subscribe(UNIT, 1024).await?;
    let video = track_id(&sub, TrackKind::Video);
    let frames = collect(&mut rx, video, 40, Duration::from_secs(10)).await?;
    let first = &frames[0];
    assert_eq!(first.index, 0);
    assert!(is_idr_with_parameter_sets(first.frame.payload()));
    // The keyframe was captured before we asked: it came from the hub's cache, not from a
    // keyframe the device made for us.
    assert!(
        first.frame.header.timestamp_us < joined_at,
        "first frame captured {} µs after joining",
        first.frame.header.timestamp_us.saturating_sub(joined_at)
    );
    // And the cache is the whole current group: the frames up to now follow it without a hole.
    assert_whole_groups(&frames);
    assert!(frames.iter().all(|f| f.group == first.group));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_holds_back_neither_the_publisher_nor_another_subscriber()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (hub, _agent) = hub_and_agent(
        tmp.path(),
        &["--keyframe-interval", "1", "--bitrate", "2000"],
    )
    .await?;
    let token = hub.token("viewer", "alice");

    let mut fast = Subscriber::connect(hub.quic, &hub.trust(), &token, &Limits::default()).await?;
    // Small windows: a reader that stops is felt by the hub within a fraction of a second.
    let tight = Limits {
        stream_receive_window: 32 * 1024,
        receive_window: 64 * 1024,
        ..Limits::default()
    };
    let mut slow = Subscriber::connect(hub.quic, &hub.trust(), &token, &tight).await?;
    let (fs, mut fast_rx) = fast.subscribe(UNIT, 1024).await?;
    let (ss, mut slow_rx) = slow.subscribe(UNIT, 4).await?;
    let fast_video = track_id(&fs, TrackKind::Video);
    let slow_video = track_id(&ss, TrackKind::Video);
    collect(&mut slow_rx, slow_video, 10, Duration::from_secs(10)).await?;

    // The slow one stops reading while the fast one takes 6 s of video.
    let stalled_at = unix_now_us();
    let during = collect(&mut fast_rx, fast_video, 180, Duration::from_secs(30)).await?;
    assert_whole_groups(&during);
    let span_s =
        (during[179].frame.header.timestamp_us - during[0].frame.header.timestamp_us) as f64 / 1e6;
    assert!(
        span_s < 6.5,
        "the fast subscriber got 180 consecutive frames over {span_s:.1} s of capture"
    );
    let m = hub.metrics().await?;
    assert!(
        m.sum("tianwang_frames_dropped_total") > 0.0,
        "the stalled subscriber's drops are counted"
    );

    // It reads again: after what was already buffered, it jumps to a new group, captured
    // after it stalled, and carries on whole.
    let resumed_at = unix_now_us();
    let after = collect(&mut slow_rx, slow_video, 120, Duration::from_secs(30)).await?;
    let jump = after
        .iter()
        .position(|f| f.index == 0 && f.frame.header.timestamp_us > resumed_at)
        .expect("a fresh group after resuming");
    // Of the six seconds it missed, it got at most the last two groups (the newest when it
    // resumed, and the one before, both at most 1 s long) and a stray frame: the rest was
    // skipped, not queued for it.
    let missed = after
        .iter()
        .filter(|f| (stalled_at..resumed_at - 2_500_000).contains(&f.frame.header.timestamp_us))
        .count();
    let trace: Vec<_> = after
        .iter()
        .map(|f| {
            (
                f.group,
                f.index,
                (f.frame.header.timestamp_us as i64 - stalled_at as i64) / 1000,
            )
        })
        .collect();
    assert!(
        missed <= 2,
        "{missed} frames of the stall's first seconds were delivered late (resumed at {} ms): {trace:?}",
        (resumed_at - stalled_at) / 1000
    );
    let live = &after[jump..];
    assert!(
        live.len() >= 30,
        "only {} frames after the jump",
        live.len()
    );
    assert_whole_groups(live);
    assert!(live[0].frame.header.timestamp_us > stalled_at);
    Ok(())
}
